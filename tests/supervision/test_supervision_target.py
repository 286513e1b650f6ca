"""Eq. 4: layer weights and the supervisory target, against a float64 loop reference."""
from __future__ import annotations

import pytest
import torch

from nemo_basic.supervision import layer_weights, supervisory_target


def reference_weights(k: int, scheme: str) -> list[float]:
    denom = sum(j * j for j in range(1, k + 1))
    if scheme == "inc":
        return [l * l / denom for l in range(1, k + 1)]
    if scheme == "dec":
        return [(k - l + 1) ** 2 / denom for l in range(1, k + 1)]
    return [1.0 / k] * k


@pytest.mark.parametrize("scheme", ["inc", "const", "dec"])
@pytest.mark.parametrize("k", [1, 2, 3, 7, 16, 20, 40])
def test_layer_weights_formula_and_sum(k: int, scheme: str) -> None:
    w = layer_weights(k, scheme)
    assert w.shape == (k,) and w.dtype == torch.float32
    torch.testing.assert_close(w.double(), torch.tensor(reference_weights(k, scheme), dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)
    assert abs(float(w.double().sum()) - 1.0) < 1e-6


def test_layer_weights_default_is_inc_and_increasing() -> None:
    w = layer_weights(16)
    torch.testing.assert_close(w, layer_weights(16, "inc"))
    assert bool((w[1:] > w[:-1]).all())
    assert bool((layer_weights(16, "dec")[1:] < layer_weights(16, "dec")[:-1]).all())


@pytest.mark.parametrize("k", [0, -3, 2.5, "4", True, None])
def test_layer_weights_bad_k_names_argument(k) -> None:
    with pytest.raises(ValueError, match=r"\bk\b"):
        layer_weights(k)


def test_layer_weights_bad_scheme_names_argument_and_choices() -> None:
    with pytest.raises(ValueError, match=r"scheme.*inc.*const.*dec"):
        layer_weights(4, "quadratic")


@pytest.mark.parametrize("shape", [(3, 1, 5, 8), (4, 2, 7, 16), (1, 3, 2, 4)])
def test_supervisory_target_matches_reference(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    k = shape[0]
    states = torch.randn(shape)
    for scheme in ("inc", "const", "dec"):
        expected = torch.zeros(shape[1:], dtype=torch.float64)
        for l, w in enumerate(reference_weights(k, scheme)):
            expected += w * states[l].double()
        out_stacked = supervisory_target(states, scheme)
        out_list = supervisory_target([s for s in states], scheme)
        assert out_stacked.dtype == torch.float32 and out_stacked.shape == shape[1:]
        torch.testing.assert_close(out_stacked.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_list, out_stacked)


def test_supervisory_target_bf16_is_fp32_and_detached() -> None:
    states = [torch.randn(2, 5, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(4)]
    out = supervisory_target(states)
    assert out.dtype == torch.float32 and not out.requires_grad
    expected = sum(w * s.detach().double() for w, s in zip(reference_weights(4, "inc"), states))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_supervisory_target_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        supervisory_target(torch.randn(2, 3, 4))
    with pytest.raises(ValueError):
        supervisory_target([torch.randn(2, 3, 4), torch.randn(2, 3, 5)])
    with pytest.raises(ValueError):
        supervisory_target([])
