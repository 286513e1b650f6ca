"""The training callback (``analysis.every_n_steps``) in a tiny NeMo run of ``examples/basic_pretrain.py``:
it logs the layer-0 metrics at the configured steps (and the last) to metrics.jsonl and TensorBoard,
and its nearest tokens at the last step equal an independent float64 recomputation from the final
checkpoint, with V taken from the decoder input of a real NeVA forward pass."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCENES = 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from nemo_basic.testing import free_port

    log_dir = tmp_path_factory.mktemp("run")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "basic_pretrain.py"), "--config",
                           os.path.join(REPO, "conf", "tiny.yaml"), f"run.log_dir={log_dir}", "trainer.max_steps=4",
                           "analysis.every_n_steps=3", f"analysis.scenes={SCENES}"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = os.path.join(str(log_dir), "tiny", "stage1")
    with open(os.path.join(run_dir, "recipe", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"run_dir": run_dir, "rows": rows, "stdout": proc.stdout}


def _reference_ids(ckpt: str, pixels: torch.Tensor) -> list:
    """Nearest token ids (float64 argmax over the 1024 real rows) of V from a real NeVA forward."""
    from megatron.core.num_microbatches_calculator import (destroy_num_microbatches_calculator,
                                                           init_num_microbatches_calculator)

    from nemo_basic.convert import convert_mcore_spec, ensure_model_parallel
    from nemo_basic.export.checkpoint import load_checkpoint_weights
    from nemo_basic.testing import tiny_neva

    ensure_model_parallel()
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(0, None, 1, 1, 1)
    model = tiny_neva.tiny_neva_config().configure_model(tiny_neva.TinyTokenizer()).eval()
    state = convert_mcore_spec(load_checkpoint_weights(ckpt), "te", "local")
    for key in [k for k in state if re.match(r"^vision_model\.decoder\.layers\.(?!\d+\.)", k)]:
        stacked = state.pop(key)  # load_checkpoint_weights splits only the language model's stacked layers
        rest = key[len("vision_model.decoder.layers."):]
        for i, t in enumerate(stacked.unbind(0)):
            state[f"vision_model.decoder.layers.{i}.{rest}"] = t
    # the tiny GPT's LayerNorms have biases, which convert_mcore_spec leaves under the TE names
    for te_name, local in (("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
                           ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias")):
        for key in [k for k in state if k.endswith(te_name)]:
            state[key[:-len(te_name)] + local] = state.pop(key)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing[:5], unexpected[:5])
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None).detach()

    handle = model.language_model.decoder.register_forward_pre_hook(grab, with_kwargs=True)
    n = pixels.shape[0]
    ids = torch.tensor([[5, 6, -200, 7, 8]] * n)
    with torch.no_grad():
        model(input_ids=ids, position_ids=None, loss_mask=None, labels=None, images=pixels,
              num_image_tiles=torch.ones(n, dtype=torch.int))
    handle.remove()
    E = model.language_model.embedding.word_embeddings.weight.detach().double()[:tiny_neva.VOCAB]
    out = []
    for j in range(n):
        v = seen["x"][2:2 + 16, j].double()                                   # V: the image rows
        cos = (v @ E.T) / (v.norm(dim=-1, keepdim=True) * E.norm(dim=-1))
        out.append(cos.argmax(-1).tolist())
    return out


@pytest.mark.slow
def test_callback_logs_metrics_at_the_configured_steps(tiny_run):
    rows, run_dir = tiny_run["rows"], tiny_run["run_dir"]
    analysis = [r for r in rows if "analysis" in r]
    assert [r["step"] for r in analysis] == [3, 4]  # every 3 steps, and the last
    losses = {r["step"]: r for r in rows if "lm_loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]
    last_per_step = {r["step"]: r for r in rows}
    assert all("lm_loss" in last_per_step[s] for s in (1, 2, 3, 4))  # loss rows stay the last of each step
    assert "analysis step 3: layer 0 meaningful" in tiny_run["stdout"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(os.path.join(run_dir, "tb_logs", "**", "events*"), recursive=True)
    ea = EventAccumulator(events, size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    for key in ("meaningful", "grounded", "distinct_per_image", "top_token_share"):
        logged = [(e.step, e.value) for e in ea.Scalars(f"analysis/layer0/{key}")]
        assert [s for s, _ in logged] == [3, 4]
        for (step, value), row in zip(logged, analysis):
            assert value == pytest.approx(row["analysis"][key], rel=1e-6, abs=1e-7)
    assert [e.step for e in ea.Images("analysis/lens_scene0")] == [3, 4]
    assert os.path.isfile(os.path.join(run_dir, "recipe", "analysis", "step4.png"))

    # the tokens at the last step, recomputed from the final checkpoint
    from nemo_basic.analysis.callback import AlignmentMonitor
    from nemo_basic.analysis.scenes import make_scenes
    from nemo_basic.recipes.train import latest_checkpoint

    with open(os.path.join(run_dir, "recipe", "analysis", "step4.json")) as f:
        step4 = json.load(f)
    mon = AlignmentMonitor(every_n_steps=1, max_steps=1, run_dir=run_dir)
    mon.processor = None
    scenes = make_scenes(SCENES, 16, 4, seed=0)
    ref = _reference_ids(latest_checkpoint(run_dir), mon._pixels([s["image"] for s in scenes]))
    assert [img["token_ids"]["0"] for img in step4["images"]] == ref
    assert [img["labels"] for img in step4["images"]] == [s["labels"] for s in scenes]
    distinct = np.mean([len(set(r)) for r in ref])
    top = np.mean([max(r.count(t) for t in r) / 16 for r in ref])
    assert analysis[-1]["analysis"]["distinct_per_image"] == pytest.approx(distinct)
    assert analysis[-1]["analysis"]["top_token_share"] == pytest.approx(top)
    assert analysis[-1]["analysis"]["meaningful"] == 0.0  # the tiny tokenizer has no words


def test_callback_is_off_unless_configured():
    from nemo_basic.recipes.schema import load_config

    assert load_config(os.path.join(REPO, "conf", "llava15_7b_stage1.yaml")).analysis.every_n_steps is None
    assert load_config(os.path.join(REPO, "conf", "tiny.yaml"), stage=1).analysis.every_n_steps is None
    assert load_config(os.path.join(REPO, "conf", "embedded_stage1.yaml")).analysis.every_n_steps == 5
    from nemo_basic.recipes.schema import RecipeConfigError

    with pytest.raises(RecipeConfigError, match="analysis.every_n_steps = 0 is invalid"):
        load_config(os.path.join(REPO, "conf", "tiny.yaml"), ["analysis.every_n_steps=0"], stage=1)
