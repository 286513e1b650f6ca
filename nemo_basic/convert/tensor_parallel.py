"""Split a full Megatron GPT state dict into tensor-parallel shards, and join shards back.

Megatron's tensor-parallel layers own these slices on rank r of TP ranks:

* column-parallel (output rows): ``linear_qkv`` by query groups (each group's [q..., k, v] rows
  stay together), ``linear_fc1`` with the gate and the up halves sharded separately and then
  stacked per rank ([gate_r; up_r]), and the vocabulary-parallel ``word_embeddings`` and
  ``output_layer`` by vocabulary rows;
* row-parallel (input columns): ``linear_proj`` and ``linear_fc2``; their biases are not split;
* everything else (norms) is replicated; ``_extra_state`` metadata is copied to every rank and
  taken from rank 0 on gather.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch

from nemo_basic.convert.llama import _shape

_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"(^|\.)_extra_state$"), "extra"),
    (re.compile(r"(^|\.)embedding\.word_embeddings\.weight$"), "vocab"),
    (re.compile(r"(^|\.)output_layer\.weight$"), "vocab"),
    (re.compile(r"\.self_attention\.linear_qkv\.(weight|bias)$"), "qkv"),
    (re.compile(r"\.mlp\.linear_fc1\.(weight|bias)$"), "fc1"),
    (re.compile(r"\.self_attention\.linear_proj\.weight$"), "columns"),
    (re.compile(r"\.mlp\.linear_fc2\.weight$"), "columns"),
    (re.compile(r"\.(linear_proj|linear_fc2)\.bias$"), "replicated"),
    (re.compile(r"(layernorm|layer_norm)[^.]*\.(weight|bias)$|layer_norm_(weight|bias)$"), "replicated"),
]


def _kind(key: str) -> str:
    for pattern, kind in _RULES:
        if pattern.search(key):
            return kind
    raise KeyError(f"no tensor-parallel rule for {key!r} (this helper handles Megatron GPT/Llama weights)")


def _check_divisible(config: Any, tp_size: int) -> None:
    s = _shape(config)
    for name, value in (("num_query_groups", s.groups), ("ffn_hidden_size", s.ffn),
                        ("vocab_size (padded)", s.vocab), ("num_attention_heads", s.heads)):
        if value % tp_size:
            raise ValueError(f"{name}={value} is not divisible by tensor_model_parallel_size={tp_size}")


def _split(kind: str, t: torch.Tensor, tp: int, groups: int, gated: bool) -> list[torch.Tensor]:
    if kind == "vocab":
        return list(torch.chunk(t, tp, dim=0))
    if kind == "qkv":  # [groups * rows_per_group, ...]: whole groups per rank
        g = t.reshape(groups, -1, *t.shape[1:])
        return [c.reshape(-1, *t.shape[1:]) for c in torch.chunk(g, tp, dim=0)]
    if kind == "fc1":
        if not gated:
            return list(torch.chunk(t, tp, dim=0))
        gate, up = torch.chunk(t, 2, dim=0)
        return [torch.cat([a, b], dim=0) for a, b in zip(torch.chunk(gate, tp, dim=0), torch.chunk(up, tp, dim=0))]
    if kind == "columns":
        return list(torch.chunk(t, tp, dim=1))
    raise AssertionError(kind)


def _join(kind: str, parts: Sequence[torch.Tensor], gated: bool) -> torch.Tensor:
    if kind in ("vocab", "qkv"):
        return torch.cat(list(parts), dim=0)
    if kind == "fc1":
        if not gated:
            return torch.cat(list(parts), dim=0)
        halves = [torch.chunk(p, 2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if kind == "columns":
        return torch.cat(list(parts), dim=1)
    raise AssertionError(kind)


def shard_for_tp(mcore_sd: Mapping[str, Any], tp_size: int, rank: int, config: Any) -> dict[str, Any]:
    """The slice of a full (TP=1) Megatron GPT state dict that tensor-parallel rank ``rank`` holds.

    ``config`` gives the query groups and whether ``linear_fc1`` is gated; keys may carry any
    prefix. Split tensors are contiguous copies; replicated ones are shared with the input.
    """
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank={rank} outside tensor_model_parallel_size={tp_size}")
    _check_divisible(config, tp_size)
    s = _shape(config)
    out = {}
    for key, value in mcore_sd.items():
        kind = _kind(key)
        if kind in ("replicated", "extra") or tp_size == 1:
            out[key] = value
        else:
            out[key] = _split(kind, value, tp_size, s.groups, s.gated)[rank].contiguous()
    return out


def gather_tp(shards: Sequence[Mapping[str, Any]], config: Any) -> dict[str, Any]:
    """Join the state dicts of all tensor-parallel ranks (in rank order) into the TP=1 state dict.

    Replicated tensors must agree across ranks (checked: a mismatch means the shards did not come
    from one model).
    """
    if not shards:
        raise ValueError("gather_tp needs at least one shard")
    tp = len(shards)
    _check_divisible(config, tp)
    s = _shape(config)
    keys = list(shards[0])
    for r, sd in enumerate(shards[1:], start=1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))
            raise KeyError(f"shard {r} has different keys from shard 0: {diff[:8]}")
    out = {}
    for key in keys:
        kind = _kind(key)
        parts = [sd[key] for sd in shards]
        if kind == "extra":  # module metadata (e.g. Transformer Engine FP8 state): rank 0's
            out[key] = parts[0]
        elif kind == "replicated":
            first = parts[0]
            if isinstance(first, torch.Tensor):
                for r, p in enumerate(parts[1:], start=1):
                    if not torch.equal(first, p):
                        raise ValueError(f"replicated tensor {key!r} differs between rank 0 and rank {r}")
            out[key] = first
        else:
            out[key] = _join(kind, parts, s.gated)
    return out
