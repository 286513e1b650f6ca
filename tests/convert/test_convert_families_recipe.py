"""A table-3 family through the real recipe path: a tiny random HF Gemma (multi-query, head_dim !=
hidden / heads, tanh-GELU, zero-centred norms, tied embeddings, vocabulary 500 padded to 512) with a
tiny CLIP tower runs 2 steps of stage 1 and 2 steps of stage 2 (``examples/basic_pretrain.py`` /
``basic_finetune.py`` on the embedded data, NeMo's trainer, Megatron checkpoints).

Checked against the HF model: stage 1 leaves the LLM as it was (its checkpoint exports back to the HF
Gemma tensors bit for bit, so import, the frozen LLM and the stored family config are right);
stage 2 starts from stage 1's checkpoint and trains exactly the HF model's parameters (+ the 12
padding rows Megatron adds), and they move.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _family_workers as W  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def example(stage: int, tmp: Path) -> dict:
    script = REPO / "examples" / ("basic_pretrain.py" if stage == 1 else "basic_finetune.py")
    conf = REPO / "conf" / f"embedded_stage{stage}.yaml"
    from nemo_basic.testing import free_port

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        [sys.executable, str(script), "--config", str(conf), f"run.log_dir={tmp / 'logs'}", "run.name=gemma",
         f"model.llm_path={tmp / 'gemma'}", f"model.vision_path={tmp / 'clip'}", "model.image_size=28",
         "model.seq_length=96", "trainer.max_steps=2", "data.global_batch_size=2", "data.micro_batch_size=2",
         "data.num_workers=0", "analysis.every_n_steps=null", "checkpoint.every_n_steps=2"],
        capture_output=True, text=True, timeout=900, cwd=str(REPO), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(tmp / "logs" / "gemma" / f"stage{stage}" / "recipe" / "summary.json") as f:
        return json.load(f)


def llm_as_hf(ckpt: str) -> tuple[dict, object]:
    from nemo_basic.convert import ensure_model_parallel, mcore_to_hf_llama
    from nemo_basic.export.checkpoint import load_checkpoint_context, load_checkpoint_weights
    from nemo_basic.models.builder import layer_spec_of

    ensure_model_parallel()
    config = load_checkpoint_context(ckpt).config.language_transformer_config
    full = load_checkpoint_weights(ckpt)
    lm = {k: v for k, v in full.items() if k.startswith("language_model.")}
    return mcore_to_hf_llama(lm, config, spec=layer_spec_of(lm), prefix="language_model."), config


def test_gemma_stage1_and_stage2_through_the_recipe(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    hf = W.tiny_hf_lm("gemma", seed=0)
    hf.save_pretrained(str(tmp_path / "gemma"))
    W.tiny_tokenizer().save_pretrained(str(tmp_path / "gemma"))
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=W.IMG, patch_size=W.PATCH)).save_pretrained(str(tmp_path / "clip"))
    CLIPImageProcessor(size={"shortest_edge": W.IMG},
                       crop_size={"height": W.IMG, "width": W.IMG}).save_pretrained(str(tmp_path / "clip"))
    reference = hf.state_dict()

    s1 = example(1, tmp_path)
    assert s1["steps_done"] == 2
    for row in (s1["first"], s1["last"]):
        assert all(math.isfinite(row[k]) for k in ("lm_loss", "basic_das_loss", "basic_sds_loss")), row
    assert s1["parameters"]["digest_end"]["projector"] != s1["parameters"]["digest_start"]["projector"]
    back, config = llm_as_hf(s1["checkpoint"])
    assert (type(config).__name__, config.hf_model_type, config.hf_vocab_size, config.vocab_size) == \
        ("HFGemmaConfig", "gemma", W.VOCAB, 512)  # the family facts survive NeMo's checkpoint context
    assert set(back) == set(reference)
    for key, value in reference.items():
        assert torch.equal(back[key], value), key

    s2 = example(2, tmp_path)
    assert s2["init_from"] == os.path.realpath(s1["checkpoint"]) and s2["steps_done"] == 2
    assert math.isfinite(s2["first"]["lm_loss"]) and math.isfinite(s2["last"]["lm_loss"])
    hf_params = sum(p.numel() for p in hf.parameters())  # tied: the embedding once
    lm = s2["parameters"]["by_part"]["language_model"]
    assert lm["trainable"] == lm["total"] == hf_params + (512 - W.VOCAB) * W.HIDDEN
    after, _ = llm_as_hf(s2["checkpoint"])
    moved = [k for k in reference if not torch.equal(after[k], reference[k])]
    assert len(moved) == len(reference), sorted(set(reference) - set(moved))
