"""The study engine's runs are independent of the runs before them in the same process (the
runner's order, and resuming a folder, must not change a result)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check_rerun(dtype: str) -> None:
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "study", "_engine_rerun.py"), dtype],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["dtypes"] == [f"torch.{dtype}"], r["dtypes"]  # the model ran in the dtype asked for
    assert r["llm_tensors_moved_by_stage2"] > 0  # stage 2 trained the LLM, so restoring it is tested
    assert r["first"] == r["again"], (r["first"], r["again"])  # losses bit-identical, both stages
    assert r["states_equal"]


def test_a_run_repeated_after_other_runs_is_identical():
    """float32 (the recipe's CPU precision), the engine's code unchanged: ~1.5 min on one core. On a
    CPU without AVX-512 BF16 / AMX PyTorch's bf16 GEMMs take a slow fallback (~10x float32)."""
    _check_rerun("float32")


@pytest.mark.benchmark  # ~11 min on 2 AVX2 cores (672 s in the 2026-12-07 suite): run with pytest -m benchmark
def test_a_run_repeated_after_other_runs_is_identical_in_bf16():
    """The same check in bfloat16, the study's precision."""
    _check_rerun("bfloat16")
