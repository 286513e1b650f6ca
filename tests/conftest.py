"""Test-suite set-up: offline, deterministic, CPU backend selected before anything imports Megatron."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import nemo_basic  # noqa: E402,F401  (applies the CPU backend where CUDA is absent)

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

_REPO = Path(__file__).resolve().parents[1]
_EXAMPLES = {1: _REPO / "examples" / "basic_pretrain.py", 2: _REPO / "examples" / "basic_finetune.py"}


@pytest.fixture(scope="session")
def embedded_runs(tmp_path_factory):
    """The README's main job, shortened and trained once for the whole suite: the embedded default
    (SmolLM2-135M + DINOv2-small, embedded data, BASIC on), one step of 2 samples per stage, stage 2
    continuing from stage 1. {stage: {"summary": summary.json, "stdout": console}}; used by the
    recipe test of the defaults and by the serving test of their export."""
    log_dir = tmp_path_factory.mktemp("embedded_runs")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = {}
    for stage in (1, 2):
        proc = subprocess.run([sys.executable, str(_EXAMPLES[stage]), f"run.log_dir={log_dir}", "trainer.max_steps=1",
                               "data.global_batch_size=2", "data.micro_batch_size=2", "data.num_workers=0",
                               "trainer.progress_bar=false", "analysis.every_n_steps=null"],
                              capture_output=True, text=True, timeout=900, cwd=str(_REPO), env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        with open(log_dir / "embedded" / f"stage{stage}" / "recipe" / "summary.json") as f:
            out[stage] = {"summary": json.load(f), "stdout": proc.stdout}
    return out


# -- shared gloo ranks for the spawned tests (tests/models, tests/supervision) ---------------------
# Starting a rank (a fresh interpreter importing torch, Megatron and NeMo) costs more than the tiny
# models and tensors the tests run, so each world size is started once per folder and every test's
# call runs on it in turn (nemo_basic.testing.spawn.DistributedPool: it tears Megatron's state down
# between calls and restarts the ranks after a failure).
_POOLS: dict = {}


@pytest.fixture(scope="session")
def spawn():
    """``spawn(fn, world_size, *args, timeout=...)``: as run_distributed, on shared ranks."""
    from nemo_basic.testing.spawn import DistributedPool

    def run(fn, world_size, *args, timeout=600.0):
        if world_size not in _POOLS:
            _POOLS[world_size] = DistributedPool(world_size)
        return _POOLS[world_size].run(fn, *args, timeout=timeout)
    return run


def _close_pools():
    while _POOLS:
        _POOLS.popitem()[1].close()


def pytest_runtest_teardown(item, nextitem):
    # Idle ranks hold a few hundred MB each: give them back when the tests of a folder are done.
    if _POOLS and (nextitem is None or Path(nextitem.path).resolve().parent != Path(item.path).resolve().parent):
        _close_pools()


def pytest_sessionfinish(session, exitstatus):
    _close_pools()
