"""The table-3 families through the real recipe path: a tiny random HF model of each family
(Qwen2: q/k/v biases, tied; Llama-3: llama3 RoPE scaling; Mistral: head_dim != hidden / heads, a
sliding window longer than the sequences; Gemma: multi-query, head_dim != hidden / heads, tanh-GELU,
zero-centred norms, tied; Phi-3: fused qkv / gate_up; vocabulary 500 padded to 512) with a tiny CLIP
tower (Qwen2, Llama-3, Gemma) or SigLIP tower (Mistral, Phi-3: no class token, the "full" feature
strategy) runs 2 steps of stage 1 and 2 steps of stage 2 (``examples/basic_pretrain.py`` /
``basic_finetune.py`` on the embedded data, NeMo's trainer, Megatron checkpoints).

Checked against the HF model: stage 1 leaves the LLM as it was (its checkpoint exports back to the HF
tensors bit for bit, so import, the frozen LLM and the stored family config are right); stage 2
starts from stage 1's checkpoint and trains exactly the HF model's parameters (+ the 12 padding rows
Megatron adds to each vocabulary matrix), and they all move.

The ten runs share one import of NeMo (``_recipe_forks.py`` forks each run after it, two at a time):
as ten ``python examples/...`` processes they would spend ~4 minutes of CPU on imports alone.
A Mistral whose sliding window is shorter than ``model.seq_length`` is refused by the recipe's
configuration check, naming the key.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _family_workers as W  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOWERS = {"qwen2": "clip", "llama3": "clip", "mistral": "siglip", "gemma": "clip", "phi3": "siglip"}
# the family facts NeMo's checkpoint context must keep: config class, HF model type, tied embeddings
FACTS = {"qwen2": ("HFQwen2Config", "qwen2", True), "llama3": ("HFLlamaLlama3Config", "llama", False),
         "mistral": ("HFMistralConfig", "mistral", False), "gemma": ("HFGemmaConfig", "gemma", True),
         "phi3": ("HFPhi3Config", "phi3", False)}


def save_tower(path: Path, tower: str) -> None:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, SiglipImageProcessor,
                              SiglipVisionConfig, SiglipVisionModel)

    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=W.IMG, patch_size=W.PATCH)
    if tower == "clip":
        CLIPVisionModel(CLIPVisionConfig(**shape)).save_pretrained(str(path))
        CLIPImageProcessor(size={"shortest_edge": W.IMG},
                           crop_size={"height": W.IMG, "width": W.IMG}).save_pretrained(str(path))
    else:
        SiglipVisionModel(SiglipVisionConfig(**shape)).save_pretrained(str(path))
        SiglipImageProcessor(size={"height": W.IMG, "width": W.IMG}).save_pretrained(str(path))


def recipe_argv(stage: int, tmp: Path, family: str, seq_length: int = 96) -> list:
    return ["--config", str(REPO / "conf" / f"embedded_stage{stage}.yaml"), f"run.log_dir={tmp / 'logs'}",
            f"run.name={family}", f"model.llm_path={tmp / family}", f"model.vision_path={tmp / TOWERS[family]}",
            "model.image_size=28", f"model.seq_length={seq_length}", "trainer.max_steps=2",
            "data.global_batch_size=2", "data.micro_batch_size=2", "data.num_workers=0",
            "analysis.every_n_steps=null", "checkpoint.every_n_steps=2"]


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """Every family's HF model, and its stage-1 and stage-2 summaries (or what its failed run printed)."""
    tmp = tmp_path_factory.mktemp("families_recipe")
    for tower in set(TOWERS.values()):
        save_tower(tmp / tower, tower)
    models = {}
    for family in W.FAMILIES:
        models[family] = W.tiny_hf_lm(family, seed=0)
        models[family].save_pretrained(str(tmp / family))
        W.tiny_tokenizer().save_pretrained(str(tmp / family))
    jobs = {"parallel": 2, "results": str(tmp / "results.json"),
            "runs": [dict(name=f, log=str(tmp / f), argv1=recipe_argv(1, tmp, f), argv2=recipe_argv(2, tmp, f))
                     for f in W.FAMILIES]}
    with open(tmp / "jobs.json", "w") as f:
        json.dump(jobs, f)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # two single-threaded runs on two cores
    proc = subprocess.Popen([sys.executable, str(Path(W.__file__).with_name("_recipe_forks.py")),
                             str(tmp / "jobs.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(REPO), env=env)
    try:
        import nemo_basic.export.checkpoint  # noqa: F401  (llm_as_hf's NeMo import, while the driver imports its own)
    except BaseException:
        proc.kill()
        raise
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    with open(tmp / "results.json") as f:
        results = json.load(f)
    out = {}
    for family in W.FAMILIES:
        runs = {}
        for stage in (1, 2):
            if results[family].get(f"rc{stage}") == 0:
                with open(tmp / "logs" / family / f"stage{stage}" / "recipe" / "summary.json") as f:
                    runs[stage] = json.load(f)
            else:  # the test of this family fails with what the run printed
                log = tmp / f"{family}.stage{stage}.txt"
                runs[stage] = f"stage {stage}: {results[family]}\n" + (log.read_text()[-6000:] if log.exists()
                                                                      else "(not run)")
        out[family] = (models[family], runs)
    return out


def llm_as_hf(ckpt: str) -> tuple[dict, object]:
    from nemo_basic.convert import ensure_model_parallel, mcore_to_hf_llama
    from nemo_basic.export.checkpoint import load_checkpoint_context, load_checkpoint_weights
    from nemo_basic.models.builder import layer_spec_of

    ensure_model_parallel()
    config = load_checkpoint_context(ckpt).config.language_transformer_config
    full = load_checkpoint_weights(ckpt)
    lm = {k: v for k, v in full.items() if k.startswith("language_model.")}
    return mcore_to_hf_llama(lm, config, spec=layer_spec_of(lm), prefix="language_model."), config


@pytest.mark.parametrize("family", W.FAMILIES)
def test_family_stage1_and_stage2_through_the_recipe(recipe_runs, family):
    hf, runs = recipe_runs[family]
    reference = hf.state_dict()
    cls, model_type, tied = FACTS[family]

    s1 = runs[1]
    assert isinstance(s1, dict), s1
    assert s1["steps_done"] == 2
    for row in (s1["first"], s1["last"]):
        assert all(math.isfinite(row[k]) for k in ("lm_loss", "basic_das_loss", "basic_sds_loss")), row
    assert s1["parameters"]["digest_end"]["projector"] != s1["parameters"]["digest_start"]["projector"]
    back, config = llm_as_hf(s1["checkpoint"])
    assert (type(config).__name__, config.hf_model_type, config.hf_vocab_size, config.vocab_size) == \
        (cls, model_type, W.VOCAB, 512)  # the family facts survive NeMo's checkpoint context
    assert config.share_embeddings_and_output_weights == tied
    if family == "mistral":
        assert config.hf_sliding_window == hf.config.sliding_window == 256
    if family == "llama3":
        assert config.rope_llama3["original_max_position_embeddings"] == 32
    assert set(back) == set(reference)
    for key, value in reference.items():
        assert torch.equal(back[key], value), key

    s2 = runs[2]
    assert isinstance(s2, dict), s2
    assert s2["init_from"] == os.path.realpath(s1["checkpoint"]) and s2["steps_done"] == 2
    assert math.isfinite(s2["first"]["lm_loss"]) and math.isfinite(s2["last"]["lm_loss"])
    hf_params = sum(p.numel() for p in hf.parameters())  # tied: the embedding once
    lm = s2["parameters"]["by_part"]["language_model"]
    padding = (512 - W.VOCAB) * W.HIDDEN * (1 if tied else 2)  # the embedding's rows (and the output layer's)
    assert lm["trainable"] == lm["total"] == hf_params + padding
    after, _ = llm_as_hf(s2["checkpoint"])
    moved = [k for k in reference if not torch.equal(after[k], reference[k])]
    assert len(moved) == len(reference), sorted(set(reference) - set(moved))


def test_mistral_window_shorter_than_seq_length_is_a_config_error(tmp_path):
    """The recipe refuses it before building anything (``--check`` runs the same validation as a
    training run's preflight), naming model.seq_length and the window, without a traceback."""
    hf = W.hf_text_config("mistral")
    hf.sliding_window = 64
    hf.save_pretrained(str(tmp_path / "mistral"))
    save_tower(tmp_path / "siglip", "siglip")
    argv = recipe_argv(1, tmp_path, "mistral", seq_length=96)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for extra in (["--check"], []):  # the configuration check, and a training run's preflight
        proc = subprocess.run([sys.executable, str(REPO / "examples" / "basic_pretrain.py"), *extra, *argv],
                              capture_output=True, text=True, timeout=300, cwd=str(REPO), env=env)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert ("model.seq_length = 96 is invalid: expected an integer <= 64 (the LLM's sliding_window"
                in proc.stderr), proc.stderr[-3000:]
