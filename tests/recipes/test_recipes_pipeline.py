"""BASIC's layers 1..k across pipeline stages, through the recipe: ``conf/tiny.yaml`` on 2 gloo
processes with ``parallel.pipeline=2`` and k = 3 of 4 layers (stage 0 holds layers 1-2, so the
supervision travels to stage 1 with the activation, `nemo_basic.models.pipeline`) trains, step for
step, as the single process does: the same LM, L_das and L_sds losses and the same weights after 2
steps, in stage 1 (projector only) and in stage 2 (the LLM trains, so the stage completing L_sds
needs the current input embedding E every step).

The tiny model's weights do not depend on the layout (`nemo_basic.models.tiny.layout_free_init`),
so both runs start from the same model; stage 2 of each starts from its own stage-1 checkpoint.
"""
from __future__ import annotations

import os

import pytest
import torch
from test_recipes_training import LOSSES, finish, start

PP2 = ("trainer.devices=2", "parallel.pipeline=2")
COMMON = ("basic.layers=3", "trainer.max_steps=2", "checkpoint.every_n_steps=2")
REL = 1e-5  # float32 sums in another order on two processes (seen: <= 1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single, pp = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("pp2")
    out = {}
    for stage, extra in ((1, ()), (2, ("checkpoint.init_from=auto",))):
        a = start(stage, single, *COMMON, *extra)
        b = start(stage, pp, *COMMON, *PP2, *extra)
        out[stage] = (finish(a), finish(b))
    return out


def _close(x: float, y: float) -> bool:
    return abs(x - y) <= REL * max(abs(x), abs(y))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_pipeline_spanning_k_matches_the_single_process(runs, stage):
    from nemo_basic.export.checkpoint import load_checkpoint_weights

    single, pp = runs[stage]
    assert "BASIC k = 3 (layers 1..k span pipeline stages)" in pp["stdout"]
    assert "(layers 1..k span" not in single["stdout"]
    for step in (1, 2):
        for key in LOSSES:
            x, y = single["rows"][step][key], pp["rows"][step][key]
            assert x is not None and y is not None and _close(x, y), (stage, step, key, x, y)
    w1 = load_checkpoint_weights(single["checkpoint"])
    w2 = load_checkpoint_weights(pp["checkpoint"])
    trained = ["vision_projection."] + (["language_model."] if stage == 2 else [])
    names = [n for n in w1 if any(n.startswith(t) for t in trained)]
    assert names and set(names) <= set(w2)
    start_digest = single["parameters"]["digest_start"]["projector"]
    assert single["parameters"]["digest_end"]["projector"] != start_digest  # the projector moved
    for n in names:
        a, b = w1[n].double(), w2[n].double()
        assert a.shape == b.shape, n
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (n, float((a - b).abs().max()))
    if stage == 2:  # the LLM trained too, and the compared weights include both stages' layers
        digest = single["parameters"]
        assert digest["digest_end"]["language_model"] != digest["digest_start"]["language_model"]
        assert {f"language_model.decoder.layers.{i}.mlp.linear_fc1.weight" for i in range(4)} <= set(names)
