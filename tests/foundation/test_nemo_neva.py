"""NeMo 2 NeVA trains on CPU through nemo.lightning (MegatronStrategy, Trainer(accelerator="cpu")),
saves a Megatron distributed checkpoint and resumes from it."""
import math

import pytest
import torch

from nemo_basic.testing import run_distributed
from nemo_workers import train


@pytest.mark.slow
def test_neva_trains_3_steps_saves_and_resumes(tmp_path):
    log_dir = str(tmp_path / "logs")
    (run,) = run_distributed(train, 1, 1, 1, 3, log_dir, init_group=False)
    assert run["step"] == 3
    assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])
    # An untrained model on uniform random tokens over a 1024-word vocabulary: loss ≈ ln 1024.
    assert all(abs(x - math.log(1024)) < 0.5 for x in run["losses"])

    # A new process with another seed resumes from the last checkpoint in log_dir: nothing is left
    # to train, and every weight must be the saved one.
    (back,) = run_distributed(train, 1, 1, 1, 3, log_dir, 999, init_group=False)
    assert back["losses"] == []
    assert back["step"] == 3
    assert back["weights"].keys() == run["weights"].keys()
    for name, w in run["weights"].items():
        assert torch.equal(back["weights"][name], w), name
