"""Long runs that lose no work, on the tiny NeVA through NeMo's real trainer (CPU subprocesses of
``examples/basic_pretrain.py``): a run killed with SIGKILL between checkpoints, then its newest
checkpoint damaged (a ``.distcp`` truncated, later one deleted) and its ``-last`` link removed, resumes
each time from the newest complete checkpoint; a run sent SIGTERM saves a checkpoint at the next
step boundary and exits non-zero. The reference is one uninterrupted run of the same 12 steps: every
step's losses of the interrupted runs (the last record of each step over all jobs) equal it to 1e-6.

Four jobs run two at a time (2 cores): about 2.5 minutes in all.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "conf", "tiny.yaml")
SCRIPT = os.path.join(REPO, "examples", "basic_pretrain.py")
LOSSES = ("lm_loss", "basic_das_loss", "basic_sds_loss")
STEPS = 12
COMMON = (f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=3", "checkpoint.keep=10")


def start(log_dir, *overrides):
    from nemo_basic.testing import free_port

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    return subprocess.Popen([sys.executable, SCRIPT, "--config", TINY, f"run.log_dir={log_dir}", *COMMON, *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                            start_new_session=True)


def signal_at(proc, line_start: str, sig, group: bool = False) -> str:
    """Read the output until a line starts with ``line_start``, send ``sig`` (to the whole process
    group with ``group``: a job killed by its scheduler, checkpoint helper processes included), read
    the rest."""
    out = []
    sent = False
    for line in proc.stdout:
        out.append(line)
        if not sent and line.startswith(line_start):
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            sent = True
    proc.wait(timeout=600)
    assert sent, "".join(out)[-4000:]
    return "".join(out)


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=600)
    return out


def run_dir(log_dir) -> str:
    return os.path.join(str(log_dir), "tiny", "stage1")


def records(log_dir) -> dict:
    """{step: the last metrics.jsonl row of that step} over all jobs of the run."""
    with open(os.path.join(run_dir(log_dir), "recipe", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows}


def summary(log_dir) -> dict:
    with open(os.path.join(run_dir(log_dir), "recipe", "summary.json")) as f:
        return json.load(f)


def ckpts(log_dir) -> dict:
    """{name: trainer steps done} of the checkpoint folders (not links) NeMo finished: no
    ``-unfinished`` marker next to them. Checkpoint ``step=N`` is saved after N + 1 steps."""
    d = os.path.join(run_dir(log_dir), "checkpoints")
    out = {}
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if os.path.isdir(p) and not os.path.islink(p) and not os.path.exists(p + "-unfinished"):
            out[name] = int(name.split("step=")[1].split("-")[0]) + 1
    return out


def remove_last_links(log_dir):
    d = os.path.join(run_dir(log_dir), "checkpoints")
    for name in os.listdir(d):
        if name.endswith("-last"):
            p = os.path.join(d, name)
            os.unlink(p) if os.path.islink(p) else __import__("shutil").rmtree(p)


def newest(c: dict) -> str:
    return max(c, key=c.get)


def assert_losses(ref: dict, got: dict):
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step in range(1, STEPS + 1):
        for key in LOSSES:
            x, y = ref[step][key], got[step][key]
            assert x is not None and math.isfinite(x), (step, key, x)
            assert abs(x - y) <= 1e-6, (step, key, x, y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ref_dir, broken_dir, pre_dir = (tmp_path_factory.mktemp(n) for n in ("straight", "broken", "preempted"))
    out = {"dirs": (ref_dir, broken_dir, pre_dir)}
    # 1. the uninterrupted run | a run killed with SIGKILL after step 7 (checkpoints after steps 3 and 6)
    straight = start(ref_dir)
    killed = start(broken_dir)
    out["killed_out"] = signal_at(killed, "[stage 1] step 7/", signal.SIGKILL, group=True)
    out["killed_rc"] = killed.returncode
    out["straight_out"] = finish(straight)
    out["straight_rc"] = straight.returncode
    # 2. the newest finished checkpoint of the killed run truncated, "-last" removed: resume (stop after
    #    3 steps) | a run sent SIGTERM after step 4
    c = ckpts(broken_dir)
    out["before_1"] = dict(c)
    bad1 = newest(c)
    weights = os.path.join(run_dir(broken_dir), "checkpoints", bad1, "weights")
    shard = sorted(f for f in os.listdir(weights) if f.endswith(".distcp"))[-1]
    os.truncate(os.path.join(weights, shard), os.path.getsize(os.path.join(weights, shard)) // 2)
    out["bad1"] = (bad1, shard)
    remove_last_links(broken_dir)
    resumed1 = start(broken_dir, "trainer.stop_after_steps=3")
    pre = start(pre_dir)
    out["pre_out"] = signal_at(pre, "[stage 1] step 4/", signal.SIGTERM)
    out["pre_rc"] = pre.returncode
    out["pre_ckpts"] = ckpts(pre_dir)
    out["pre_summary"] = summary(pre_dir)
    out["resumed1_out"] = finish(resumed1)
    out["resumed1_rc"] = resumed1.returncode
    out["resumed1_summary"] = summary(broken_dir)
    # 3. a file of the newest checkpoint deleted, "-last" removed: resume to the end | the preempted run again
    c = ckpts(broken_dir)
    out["before_2"] = dict(c)
    bad2 = newest(c)
    weights = os.path.join(run_dir(broken_dir), "checkpoints", bad2, "weights")
    shard = sorted(f for f in os.listdir(weights) if f.endswith(".distcp"))[0]
    os.remove(os.path.join(weights, shard))
    out["bad2"] = (bad2, shard)
    remove_last_links(broken_dir)
    resumed2 = start(broken_dir)
    pre2 = start(pre_dir)
    out["resumed2_out"], out["pre2_out"] = finish(resumed2), finish(pre2)
    out["resumed2_rc"], out["pre2_rc"] = resumed2.returncode, pre2.returncode
    out["resumed2_summary"], out["pre2_summary"] = summary(broken_dir), summary(pre_dir)
    out["after_2"] = ckpts(broken_dir)
    out["ref"], out["broken"], out["pre"] = records(ref_dir), records(broken_dir), records(pre_dir)
    return out


@pytest.mark.slow
def test_resume_skips_broken_checkpoints_with_the_uninterrupted_losses(runs):
    r = runs
    assert r["straight_rc"] == 0, r["straight_out"][-3000:]
    assert r["killed_rc"] == -signal.SIGKILL
    assert r["resumed1_rc"] == 0, r["resumed1_out"][-4000:]
    assert r["resumed2_rc"] == 0, r["resumed2_out"][-4000:]
    # job 2: the truncated newest checkpoint is named with its file, and the one before it is used
    bad1, shard1 = r["bad1"]
    good1 = max((n for n in r["before_1"] if n != bad1), key=r["before_1"].get)
    assert f"checkpoint checkpoints/{bad1} is not usable: weights/{shard1} is truncated" in r["resumed1_out"]
    assert f"resuming from checkpoints/{good1}" in r["resumed1_out"]
    assert f"resumed at step {r['before_1'][good1]} of {STEPS}" in r["resumed1_out"]
    s1 = r["resumed1_summary"]
    assert os.path.basename(s1["resumed_from"]) == good1 and s1["first"]["step"] == r["before_1"][good1] + 1
    # job 3: the deleted file is named; the summary says the truth
    bad2, shard2 = r["bad2"]
    good2 = max((n for n in r["before_2"] if n != bad2), key=r["before_2"].get)
    assert f"checkpoint checkpoints/{bad2} is not usable: weights/{shard2} is missing" in r["resumed2_out"]
    s2 = r["resumed2_summary"]
    assert os.path.basename(s2["resumed_from"]) == good2 and s2["steps_done"] == STEPS
    assert s2["first"]["step"] == r["before_2"][good2] + 1
    assert f"(resumed from {s2['resumed_from']})" in r["resumed2_out"]
    # nothing valid deleted: every finished, undamaged checkpoint is still there; the damaged ones were
    # moved aside, not deleted; one name per step
    for before, bad in ((r["before_1"], bad1), (r["before_2"], bad2)):
        for name in before:
            if name != bad:
                assert name in r["after_2"], (name, sorted(r["after_2"]))
    aside = os.listdir(os.path.join(run_dir(runs["dirs"][1]), "checkpoints_set_aside"))
    assert bad1 in aside and bad2 in aside
    every = list(r["after_2"]) + aside
    assert not any("-v1" in n for n in every), every
    assert len({n.split("-")[0] for n in r["after_2"]}) == len(r["after_2"])
    # the losses of all 12 steps equal the uninterrupted run's
    assert_losses(r["ref"], r["broken"])


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_nonzero(runs):
    r = runs
    assert r["pre_rc"] == 128 + signal.SIGTERM, r["pre_out"][-4000:]
    s = r["pre_summary"]
    assert s["preempted"] == "SIGTERM" and 2 < s["steps_done"] < STEPS
    assert "SIGTERM received: saving a checkpoint at step" in r["pre_out"]
    # the checkpoint of the very step it stopped at (not the last every-3-steps one)
    assert max(r["pre_ckpts"].values()) == s["steps_done"], r["pre_ckpts"]
    assert r["pre2_rc"] == 0, r["pre2_out"][-4000:]
    assert f"resumed at step {s['steps_done']} of {STEPS}" in r["pre2_out"]
    assert r["pre2_summary"]["first"]["step"] == s["steps_done"] + 1
    assert_losses(r["ref"], r["pre"])


@pytest.mark.slow
def test_console_keeps_known_upstream_warnings_in_the_run_folder(runs):
    out = runs["straight_out"]  # stdout and stderr of the uninterrupted run
    kept_file = os.path.join(run_dir(runs["dirs"][0]), "recipe", "console-filtered-rank0.txt")
    with open(kept_file) as f:
        kept = f.read()
    for message in ("The pynvml package is deprecated", "Transformer Engine and Apex are not installed",
                    "The deploy module could not be imported"):
        assert message not in out and message in kept, message
    assert "[stage 1] step 12/12" in out and out.count("[stage 1] step 5/12 ") == 1  # each step printed once
    # the quiet console (issue 23): NeMo's and Lightning's set-up chatter kept in the file, not printed
    before_first_step = out[:out.index("[stage 1] step 1/12")].strip().splitlines()
    assert len(before_first_step) <= 25, before_first_step
    for chatter in ("megatron_init", "Setting up DistributedDataParallel", "Trainable params"):
        assert chatter not in out and chatter in kept, chatter


def test_a_fresh_start_refuses_a_folder_with_checkpoints(tmp_path):
    """checkpoint.resume=false would write over the old checkpoints step by step (one name per step)."""
    from nemo_basic.recipes import train
    from nemo_basic.recipes.schema import RecipeConfigError, load_config

    cfg = load_config(TINY, [f"run.log_dir={tmp_path}", "checkpoint.resume=false"], stage=1)
    old = os.path.join(cfg.run_dir, "checkpoints", "step=2-consumed_samples=12.0")
    os.makedirs(os.path.join(old, "weights"))
    with pytest.raises(RecipeConfigError) as e:
        train.choose_resume(cfg, cfg.run_dir)
    assert str(e.value).startswith("checkpoint.resume = False is invalid") and "1 checkpoint(s)" in str(e.value)
    assert os.path.isdir(old)
