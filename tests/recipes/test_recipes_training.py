"""The two examples train the tiny NeVA on CPU through NeMo's real trainer, save Megatron distributed
checkpoints and resume from them exactly; stage 2 starts from stage 1's checkpoint.

Each run is a subprocess of ``examples/basic_pretrain.py`` / ``examples/basic_finetune.py`` with
``conf/tiny.yaml`` (4 steps, checkpoints every 2). "Interrupted" runs stop after 2 steps
(``trainer.stop_after_steps=2``, as a Slurm job at its time limit) and are launched again.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from nemo_basic.recipes import presets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "conf", "tiny.yaml")
SCRIPTS = {1: os.path.join(REPO, "examples", "basic_pretrain.py"), 2: os.path.join(REPO, "examples", "basic_finetune.py")}
LOSSES = ("lm_loss", "basic_das_loss", "basic_sds_loss")


def start(stage: int, log_dir, *overrides: str) -> tuple:
    """Launch an example as a subprocess (one thread, its own rendezvous port)."""
    from nemo_basic.testing import free_port

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    proc = subprocess.Popen([sys.executable, SCRIPTS[stage], "--config", TINY, f"run.log_dir={log_dir}", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    return proc, stage, log_dir


def finish(started: tuple) -> dict:
    proc, stage, log_dir = started
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    run_dir = os.path.join(str(log_dir), "tiny", f"stage{stage}")
    with open(os.path.join(run_dir, "recipe", "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "recipe", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    summary["rows"] = {r["step"]: r for r in rows}  # the last record of each step, over all jobs
    summary["stdout"] = out
    return summary


def run(stage: int, log_dir, *overrides: str) -> dict:
    return finish(start(stage, log_dir, *overrides))


def run_pair(a: tuple, b: tuple) -> tuple:
    """Two independent runs side by side (2 cores, one thread each)."""
    pa, pb = start(*a), start(*b)
    return finish(pa), finish(pb)


def assert_same_losses(a: dict, b: dict, steps) -> None:
    for step in steps:
        for key in LOSSES:
            x, y = a["rows"][step][key], b["rows"][step][key]
            assert x is not None and math.isfinite(x), (step, key, x)
            assert abs(x - y) <= 1e-6, (step, key, x, y)


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory):
    straight = tmp_path_factory.mktemp("straight")
    broken = tmp_path_factory.mktemp("interrupted")
    s, first = run_pair((1, straight), (1, broken, "trainer.stop_after_steps=2"))
    return {"straight": s, "first": first, "resumed": run(1, broken), "dirs": (straight, broken)}


@pytest.mark.slow
def test_stage1_resumes_with_the_uninterrupted_losses(stage1_runs):
    s, first, resumed = stage1_runs["straight"], stage1_runs["first"], stage1_runs["resumed"]
    assert s["steps_done"] == 4 and sorted(s["rows"]) == [1, 2, 3, 4]
    assert first["steps_done"] == 2 and first["checkpoint"].endswith("-last")
    assert "stopped after 2 steps of this job" in first["stdout"]
    assert resumed["resumed_from"] == first["checkpoint"] and resumed["steps_done"] == 4
    assert "resumed at step 2 of 4" in resumed["stdout"]
    assert sorted(resumed["rows"]) == [1, 2, 3, 4]  # steps 1-2 from the first job, 3-4 from the second
    assert_same_losses(s, resumed, [1, 2, 3, 4])
    # warm-up 1 step, then cosine to 0 over the remaining 3 (lr 1e-3): NeMo's CosineAnnealing
    expected_lr = [0.5e-3, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 3)), 1e-3 * 0.5 * (1 + math.cos(2 * math.pi / 3))]
    for step, lr in enumerate(expected_lr, start=1):
        assert s["rows"][step]["lr"] == pytest.approx(lr, rel=1e-6) == resumed["rows"][step]["lr"]
    # stage 1 trains the projector only (tiny: 32 -> 64 -> 64, mlp2x_gelu)
    assert s["parameters"]["trainable"] == presets.projector_parameters("mlp2x_gelu", 32, 64) == 6272
    assert s["parameters"]["by_part"]["language_model"]["trainable"] == 0
    d0, d1 = s["parameters"]["digest_start"], s["parameters"]["digest_end"]
    assert d1["projector"] != d0["projector"]
    assert d1["language_model"] == d0["language_model"] and d1["vision_model"] == d0["vision_model"]
    # TensorBoard has the three losses, the learning rate and the throughput of every step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(s["tensorboard"])
    tb.Reload()
    tags = set(tb.Tags()["scalars"])
    assert {"lm loss", "basic das loss", "basic sds loss", "lr", "throughput/samples_per_s",
            "throughput/tokens_per_s"} <= tags
    for tag, key in (("lm loss", "lm_loss"), ("basic das loss", "basic_das_loss"), ("lr", "lr")):
        values = [e.value for e in tb.Scalars(tag)]
        assert values == pytest.approx([s["rows"][i][key] for i in (1, 2, 3, 4)], rel=1e-6), tag
    # the resumed run ends with the same weights as the uninterrupted one
    assert resumed["parameters"]["digest_end"]["projector"] == pytest.approx(d1["projector"], rel=1e-9)


@pytest.mark.slow
def test_stage2_starts_from_stage1_and_resumes(stage1_runs):
    straight_dir, broken_dir = stage1_runs["dirs"]
    s1 = stage1_runs["straight"]
    s, first = run_pair((2, straight_dir, "checkpoint.init_from=auto", "optim.lr=1e-4"),
                        (2, broken_dir, "checkpoint.init_from=auto", "optim.lr=1e-4", "trainer.stop_after_steps=2"))
    resumed = run(2, broken_dir, "checkpoint.init_from=auto", "optim.lr=1e-4")
    # started from the stage-1 checkpoint: the weights at the start of stage 2 are stage 1's last ones
    assert s["init_from"] == os.path.realpath(s1["checkpoint"])
    start = s["parameters"]["digest_start"]
    for part in ("projector", "language_model", "vision_model"):
        assert start[part] == pytest.approx(s1["parameters"]["digest_end"][part], rel=1e-9), part
    # stage 2 trains the projector and the language model
    end = s["parameters"]["digest_end"]
    assert end["projector"] != start["projector"] and end["language_model"] != start["language_model"]
    assert end["vision_model"] == start["vision_model"]
    parts = s["parameters"]["by_part"]
    assert parts["projector"]["trainable"] == 6272 and parts["vision_model"]["trainable"] == 0
    assert parts["language_model"]["trainable"] == parts["language_model"]["total"] > 100_000
    assert s["parameters"]["trainable"] == 6272 + parts["language_model"]["total"]
    # interrupted after 2 steps, resumed from the stage-2 checkpoint (not from stage 1 again)
    assert first["steps_done"] == 2 and resumed["resumed_from"] == first["checkpoint"]
    assert_same_losses(s, resumed, [1, 2, 3, 4])


@pytest.mark.slow
def test_embedded_default_one_step_each_stage(embedded_runs):
    """The README's main job, shortened: the default configs (SmolLM2-135M + DINOv2-small, embedded
    data, BASIC on) for one step of 2 samples per stage; stage 2 continues from stage 1 (trained
    once for the suite: tests/conftest.py, embedded_runs)."""
    def example(stage):
        return embedded_runs[stage]["summary"], embedded_runs[stage]["stdout"]

    s1, out1 = example(1)
    row = s1["first"]
    # the pretrained SmolLM2 was loaded: a caption loss far below a random model's ln(49152) = 10.8
    assert 1.0 < row["lm_loss"] < 7.0, row
    assert row["basic_das_loss"] > 0 and row["basic_sds_loss"] > 0
    assert s1["parameters"]["trainable"] == presets.projector_parameters("mlp2x_gelu", 384, 576) == 554_112
    assert "stage 1 summary" in out1 and "losses at step 1: lm" in out1 and s1["checkpoint"] in out1
    s2, out2 = example(2)
    assert s2["init_from"] == os.path.realpath(s1["checkpoint"])
    parts = s2["parameters"]["by_part"]
    assert parts["language_model"]["trainable"] == 134_515_008 and parts["vision_model"]["trainable"] == 0
    assert s2["parameters"]["digest_start"]["projector"] == pytest.approx(
        s1["parameters"]["digest_end"]["projector"], rel=1e-9)
    assert math.isfinite(s2["first"]["lm_loss"]) and "started from" in out2
