"""Pipeline parallelism for BASIC when layers 1..k span several stages.

Design (DESIGN.md "Parallelism", option a): the supervision travels *inside the pipeline's own
activation tensor*, so it uses the schedule's p2p (no side channel, no ordering deadlock) and the
normal backward brings the aux-loss gradient back to the projector. Every stage sends

    [ hidden (S rows) | V plane (S) | target planes (S each) | mass planes (r each) ]   × [B, h]

along the sequence dimension: V (projector output) at the image positions with its autograd
history, the running target Σ_{l ≤ layers so far} w_l h_l (fp32, sent as hi+lo halves when the
pipeline dtype is 16-bit so it keeps ~16 mantissa bits) and the running attention mass [B, S]
folded into r = ceil(S/h) rows. The stage holding layer k completes the target and attaches the
losses there; later stages send zero planes (the p2p shape is uniform). The schedule's
`seq_length` must be `carrier_rows(S, h, dtype)` rows instead of S.

The stage holding layer k needs the input embedding E for L_sds; it keeps a non-persistent copy
that `EmbeddingSync` refreshes from the first stage once per step, outside the schedule (a
collective inside a forward would deadlock with the p2p of the pipeline).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def target_planes(dtype: torch.dtype) -> int:
    return 2 if dtype in (torch.float16, torch.bfloat16) else 1


def carrier_rows(seq: int, hidden: int, dtype: torch.dtype) -> int:
    """Rows of the activation a stage sends when the supervision is carried (schedule seq_length)."""
    planes = target_planes(dtype)
    return seq * (2 + planes) + planes * math.ceil(seq / hidden)


def _split(x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """fp32 → [hi] or [hi, lo] in `dtype` such that hi + lo ≈ x to ~2× the mantissa bits."""
    hi = x.to(dtype)
    if target_planes(dtype) == 1:
        return [hi]
    return [hi, (x - hi.float()).to(dtype)]


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    out = parts[0].float()
    for p in parts[1:]:
        out = out + p.float()
    return out


def pack(hidden: torch.Tensor, layout, projected: Optional[torch.Tensor], target: Optional[torch.Tensor],
         mass: Optional[torch.Tensor]) -> torch.Tensor:
    """Append the carrier planes to a stage's output hidden state [S, B, h]. `layout` is the
    micro-batch's `RowLayout` (None: nothing live, zero planes); V and the target are its padded
    [B, W, h] rows. Index scatters only: no host synchronisation."""
    seq, batch, width = hidden.shape
    dtype = hidden.dtype
    live = layout is not None
    # V keeps its gradient path through the scatter (index_add is differentiable in its source).
    v_plane = layout.scatter(projected.to(dtype)) if live and projected is not None else hidden.new_zeros(seq, batch, width)
    if live and target is not None:
        t_full = layout.scatter(target.detach().float())
    else:
        t_full = torch.zeros(seq, batch, width, dtype=torch.float32, device=hidden.device)
    rows = math.ceil(seq / width)
    m_full = torch.zeros(batch, rows * width, dtype=torch.float32, device=hidden.device)
    if mass is not None:
        m_full[:, :seq] = mass.detach().float()
    m_planes = [p.transpose(0, 1) for p in _split(m_full.view(batch, rows, width), dtype)]
    return torch.cat([hidden, v_plane] + _split(t_full, dtype) + m_planes, dim=0)


def unpack(received: torch.Tensor, seq: int, layout):
    """Inverse of `pack` on the carrier part (rows after the hidden state): returns V rows
    [B, W, h] (with the gradient path into `received`), the fp32 target rows [B, W, h] and the
    fp32 mass [B, S]."""
    width = received.shape[-1]
    dtype = received.dtype
    n = target_planes(dtype)
    rows = math.ceil(seq / width)
    v_plane = received[:seq]                                            # [S, B, h]
    t_parts = [received[seq * (1 + i): seq * (2 + i)] for i in range(n)]
    start = seq * (1 + n)
    m_parts = [received[start + i * rows: start + (i + 1) * rows].transpose(0, 1) for i in range(n)]
    target = _join([layout.gather(p) for p in t_parts])
    mass = _join([p.reshape(p.shape[0], -1)[:, :seq] for p in m_parts])
    return layout.gather(v_plane), target, mass


class EmbeddingSync:
    """Copies the input embedding (this TP rank's vocab shard) from pipeline stage 0 to the stage
    that completes the target. Every rank must call `__call__` at the same point (once per step)."""

    def __init__(self, target_stage: int):
        from megatron.core import parallel_state as ps

        self.target_stage = target_stage
        self.group = None
        self.src = None
        world = torch.distributed.get_world_size()
        mine = torch.distributed.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        every = [None] * world
        torch.distributed.all_gather_object(every, mine)
        me = torch.distributed.get_rank()
        for ranks in sorted({tuple(r) for r in every}):  # the same order on every rank
            pair = [ranks[0], ranks[target_stage]]
            group = torch.distributed.new_group(pair)
            if me in pair:
                self.group, self.src = group, ranks[0]

    def __call__(self, tensor: Optional[torch.Tensor]) -> None:
        if self.group is not None and tensor is not None:
            with torch.no_grad():
                torch.distributed.broadcast(tensor, src=self.src, group=self.group)
