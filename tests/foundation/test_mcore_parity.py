"""The real Megatron-core LLaVA model on CPU: single process, TP=2 and PP=2 (1F1B) agree.

Each run is a separate set of spawned gloo processes; TP/PP runs start from the single-process
weights and must reproduce its loss and gradient norm to 1e-6 relative.
"""
import math

import pytest

from foundation_workers import run_tiny_llava
from nemo_basic.testing import run_distributed


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ref") / "tiny_llava.pt")
    (result,) = run_distributed(run_tiny_llava, 1, 1, 1, None, path)
    return path, result


def test_single_process_forward_backward(reference):
    _, ref = reference
    # An untrained LM over 1024 tokens: the loss is near ln(1024); gradients reach the projector.
    assert abs(ref["loss"] - math.log(1024)) < 1.0
    assert ref["grad_norm"] > 0 and math.isfinite(ref["grad_norm"])
    assert all(g.abs().sum() > 0 for g in ref["projector_grads"].values())


def test_tensor_parallel_2_matches_single_process(reference):
    path, ref = reference
    results = run_distributed(run_tiny_llava, 2, 2, 1, path, None)
    for r in results:
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6)


def test_pipeline_parallel_2_matches_single_process(reference):
    path, ref = reference
    first, last = run_distributed(run_tiny_llava, 2, 1, 2, path, None)
    assert last["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert first["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6)
    # fp32 sums over tokens and micro-batches in another order (1F1B): a few tens of ulps of the
    # largest entry. 1e-6 held on the machines of earlier sessions; this session's machine (same
    # pinned packages, on the old code too) gives 1.2e-6 for encoder.linear_fc2.bias.
    for name, g in first["projector_grads"].items():
        ref_g = ref["projector_grads"][name]
        assert (g - ref_g).abs().max() <= 5e-6 * ref_g.abs().max(), name


def test_vision_encoder_is_not_causal():
    from foundation_workers import vision_attention_is_bidirectional

    (delta,) = run_distributed(vision_attention_is_bidirectional, 1)
    assert delta > 1e-4
