"""The supervisory visual embedding V̂ of BASIC (METHOD.md, eq. 4).

V̂ is a weighted average of the refined visual embeddings Ṽ_l (the decoder's hidden states at the
image positions after layer l) over the shallow layers l = 1..k. It is a *target*: computed in
fp32 and detached, so no gradient ever flows back into the LLM through it.
"""
from __future__ import annotations

from typing import Sequence

import torch

WEIGHT_SCHEMES: tuple[str, ...] = ("inc", "const", "dec")


def layer_weights(k: int, scheme: str = "inc", device: torch.device | str | None = None) -> torch.Tensor:
    """Per-layer weights w_1..w_k of eq. 4, as a float32 tensor of shape [k] that sums to 1.

    - ``inc`` (the paper's choice): w_l = l² / Σ_{j=1..k} j², deeper (more refined) layers count more.
    - ``const``: w_l = 1/k.
    - ``dec``: w_l = (k − l + 1)² / Σ_{j=1..k} j², the mirror image of ``inc`` (an ablation).
    """
    # bool is a subclass of int; k=True is almost certainly a bug at the call site.
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (number of layers 1..k), got {k!r}")
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"scheme must be one of {WEIGHT_SCHEMES}, got {scheme!r}")
    # Build in float64 so the weights are exact to fp32 precision after the cast.
    layers = torch.arange(1, k + 1, dtype=torch.float64)
    if scheme == "inc":
        raw = layers**2
    elif scheme == "dec":
        raw = (k - layers + 1) ** 2
    else:
        raw = torch.ones(k, dtype=torch.float64)
    return (raw / raw.sum()).to(device=device, dtype=torch.float32)


def supervisory_target(
    layer_states: torch.Tensor | Sequence[torch.Tensor], scheme: str = "inc"
) -> torch.Tensor:
    """V̂ = Σ_{l=1..k} w_l Ṽ_l (eq. 4), in float32 and detached.

    Args:
        layer_states: the refined visual embeddings of layers 1..k, in layer order, either stacked
            as ``[k, B, m, d]`` or as a sequence of k tensors ``[B, m, d]`` (any float dtype).
        scheme: the layer weighting, see :func:`layer_weights`.

    Returns:
        ``[B, m, d]`` float32 tensor that does not require grad.
    """
    if isinstance(layer_states, torch.Tensor):
        if layer_states.dim() != 4:
            raise ValueError(f"layer_states must be [k, B, m, d], got shape {tuple(layer_states.shape)}")
        states: Sequence[torch.Tensor] = list(layer_states.unbind(0))
    else:
        states = list(layer_states)
        if not states:
            raise ValueError("layer_states must hold at least one layer")
        if any(s.shape != states[0].shape or s.dim() != 3 for s in states):
            raise ValueError("layer_states must be k tensors of the same shape [B, m, d]")
    # Python floats (from a CPU tensor): no device sync per layer.
    weights = layer_weights(len(states), scheme).tolist()
    with torch.no_grad():
        # Accumulate layer by layer instead of stacking + einsum: stacking would materialise an
        # fp32 copy of all k layers at once (k·B·m·d floats), here only one extra [B, m, d] lives.
        target = torch.zeros(states[0].shape, dtype=torch.float32, device=states[0].device)
        for w, s in zip(weights, states):
            target.add_(s.detach().float(), alpha=w)
    return target
