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
