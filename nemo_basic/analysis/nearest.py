"""Nearest vocabulary tokens by cosine (METHOD.md eq. 2): the arithmetic of the visual logit lens.

For hidden vectors ``H`` [m, d] and the LLM's input embedding table ``E`` [N, d], the nearest token
of row i is ``argmax_j cos(H_i, E_j)`` over the *true* vocabulary only (rows a caller marks
invalid -- Megatron's padding rows, the image placeholder -- never win).

Memory is O(chunk x N): the rows of ``H`` are scored ``chunk`` at a time against the whole table
(one [chunk, N] score block, no [m, N] matrix is kept); the table's row norms are computed once.
Scores are computed in the table's float32 copy; the ``refine`` best candidates of each row are
then re-scored in float64, so the returned order and cosines are float64 exact unless the float64
winner lies outside the float32 top ``refine`` (float32 errors are ~1e-6 relative, the gaps between
candidates of a real model orders of magnitude larger).

Plain torch: no NeMo / Megatron import. The tensor-parallel combination of per-shard results
(:func:`merge_topk`) is used by the training callback on a vocab-sharded table.
"""
from __future__ import annotations

from typing import Optional

import torch


def valid_rows(num_rows: int, vocab_size: Optional[int] = None, exclude=()) -> torch.Tensor:
    """Bool [num_rows]: rows of ``E`` that are real vocabulary entries (ids < ``vocab_size``, not in
    ``exclude``)."""
    mask = torch.ones(num_rows, dtype=torch.bool)
    if vocab_size is not None:
        mask[int(vocab_size):] = False
    for i in exclude:
        if i is not None and 0 <= int(i) < num_rows:
            mask[int(i)] = False
    if not bool(mask.any()):
        raise ValueError(f"no valid vocabulary row among {num_rows} (vocab_size={vocab_size}, exclude={list(exclude)})")
    return mask


class TokenTable:
    """The embedding table prepared once for repeated nearest-token queries (several layers, images).

    ``table``: [N, d] (any float dtype, any device); ``valid``: bool [N] or None (all rows);
    ``offset``: the global id of row 0 (a vocab-parallel shard)."""

    def __init__(self, table: torch.Tensor, valid: Optional[torch.Tensor] = None, offset: int = 0,
                 chunk: int = 256, refine: int = 8):
        if table.dim() != 2:
            raise ValueError(f"the embedding table must be [N, d], got shape {tuple(table.shape)}")
        self.table = table.detach()
        self.t32 = self.table if self.table.dtype == torch.float32 else self.table.float()
        norms = self.t32.norm(dim=-1)
        self.inv_norm = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))
        # columns that can never win: invalid rows, and all-zero rows (no direction)
        bad = norms == 0
        if valid is not None:
            if valid.shape != (table.shape[0],):
                raise ValueError(f"valid mask of shape {tuple(valid.shape)} for a table of {table.shape[0]} rows")
            bad = bad | ~valid.to(bad.device)
        self.bad = bad
        self.num_valid = int((~bad).sum())
        self.offset, self.chunk, self.refine = int(offset), int(chunk), int(refine)

    @property
    def hidden_size(self) -> int:
        return self.table.shape[1]

    def topk(self, hidden: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [m, k] int64 global ids, cosines [m, k] float64), best first, for ``hidden`` [m, d].

        Rows of ``hidden`` that are all zero get cosine 0 for every token (ids of the lowest valid rows).
        When the table has fewer valid rows than ``k``, the missing slots get id -1 and cosine -inf."""
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"hidden states of shape {tuple(hidden.shape)} for a table of width {self.hidden_size}")
        hidden = hidden.detach().to(self.t32.device)
        m = hidden.shape[0]
        kk = min(max(k, self.refine), self.num_valid)
        ids_out = torch.full((m, k), -1, dtype=torch.long)
        cos_out = torch.full((m, k), float("-inf"), dtype=torch.float64)
        for start in range(0, m, self.chunk):
            h = hidden[start:start + self.chunk]
            scores = (h.float() @ self.t32.T) * self.inv_norm            # [chunk, N]: cos up to |h|
            scores.masked_fill_(self.bad, float("-inf"))
            cand = scores.topk(kk, dim=-1).indices                        # [chunk, kk]
            del scores
            h64 = h.double()
            rows = self.table[cand.reshape(-1)].double().reshape(cand.shape[0], kk, -1)
            hn = h64.norm(dim=-1, keepdim=True)
            cos = (rows @ h64.unsqueeze(-1)).squeeze(-1) / (rows.norm(dim=-1) * hn).clamp_min(1e-300)
            cos = torch.where(hn > 0, cos, torch.zeros_like(cos))
            # ties in float64: the lower id first (stable sort on candidates ordered by id)
            order_id = cand.argsort(dim=-1)
            cand, cos = cand.gather(-1, order_id), cos.gather(-1, order_id)
            order = torch.sort(cos, dim=-1, descending=True, stable=True).indices[:, :k]
            n = min(k, kk)
            ids_out[start:start + h.shape[0], :n] = (cand.gather(-1, order) + self.offset).cpu()[:, :n]
            cos_out[start:start + h.shape[0], :n] = cos.gather(-1, order).cpu()[:, :n]
        return ids_out, cos_out

    def nearest(self, hidden: torch.Tensor) -> torch.Tensor:
        """ids [m]: the nearest valid token of each row."""
        return self.topk(hidden, 1)[0][:, 0]


def merge_topk(ids: torch.Tensor, cos: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-shard top-k lists [shards, m, k'] into the global top-k [m, k] (ties: lower id)."""
    s, m, kp = ids.shape
    ids = ids.permute(1, 0, 2).reshape(m, s * kp)
    cos = cos.permute(1, 0, 2).reshape(m, s * kp)
    by_id = ids.argsort(dim=-1)
    ids, cos = ids.gather(-1, by_id), cos.gather(-1, by_id)
    order = torch.sort(cos, dim=-1, descending=True, stable=True).indices[:, :k]
    return ids.gather(-1, order), cos.gather(-1, order)


__all__ = ["TokenTable", "merge_topk", "valid_rows"]
