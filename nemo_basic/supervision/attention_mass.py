"""Attention-based supervision degree of BASIC (METHOD.md, eq. 5).

For every image position i, a_i measures how much the text tokens attend to it, summed over the
shallow layers 1..k and averaged over heads, then normalised over the sample's image positions.

The full [S × S] attention matrix is never built. Fused attention kernels already return the row
log-sum-exp (lse) of the scaled causal scores, so a single probability is
    A[j, i] = exp(q_j · k_i · scale − lse_j),
and the text→image mass needs only the [text × image] block: O(n·m) per head. Without an lse we
recompute it for the text rows, chunked over rows, in O(chunk · S) memory per head.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from nemo_basic.supervision.layout import RowLayout
from nemo_basic.supervision.losses import _out_dtype_supported, matmul_fp32_out

DEGREE_MODES: tuple[str, ...] = ("attention", "equal")

# Bytes of fp32 scores one row chunk may hold ([heads, rows, keys]); bounds the working memory.
_CHUNK_BYTES = 64 * 2**20


def _rows_per_chunk(heads: int, cols: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return chunk_rows
    return max(1, _CHUNK_BYTES // (4 * heads * max(cols, 1)))


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _operand(x: torch.Tensor) -> torch.Tensor:
    """The dtype the score GEMMs take: 16-bit stays 16-bit where the device multiplies it with an
    fp32 output (CUDA: as the flash kernel that produced the lse multiplies it); anything else
    becomes fp32, once: where ``out_dtype`` is missing (CPU builds) that upcast is exact and is
    what `matmul_fp32_out` would do in every chunk's GEMM, so the arithmetic is the same."""
    if x.dtype in _LOW_PRECISION and _out_dtype_supported(x.device, "bmm"):
        return x
    return x.float()


def _grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled fp32 scores of query heads against their shared (grouped-query) key heads.

    q: [B, H, r, D], k: [B, Hkv, c, D] -> [B, H, r, c]. Query head h reads key head h // (H / Hkv):
    viewing q as [B, Hkv, H/Hkv, r, D] puts head h at (h // G, h % G), so a broadcast matmul pairs
    them without copying k G times.

    16-bit q and k (bf16 / fp16 training) go to one batched 16-bit GEMM with fp32 output
    (`matmul_fp32_out`: ``bmm(out_dtype=float32)`` on CUDA, its exact emulation elsewhere): the G
    query heads of a key head are stacked as rows, [B·Hkv, G·r, D] × [B·Hkv, D, c]. That is the
    flash kernel's arithmetic (16-bit products, fp32 sums, the scale applied in fp32), so
    exp(score − lse) is consistent with the lse it returned, and no fp32 copy of q or k is made.
    """
    batch, heads, rows, dim = q.shape
    kv_heads, cols = k.shape[1], k.shape[2]
    if q.dtype in _LOW_PRECISION and k.dtype == q.dtype:
        group = heads // kv_heads
        scores = matmul_fp32_out(q.reshape(batch * kv_heads, group * rows, dim),
                                 k.reshape(batch * kv_heads, cols, dim).transpose(1, 2))
        return scores.view(batch, heads, rows, cols).mul_(scale)
    scores = torch.matmul(q.reshape(batch, kv_heads, heads // kv_heads, rows, dim), k.unsqueeze(2).transpose(-1, -2))
    return scores.view(batch, heads, rows, cols).mul_(scale)


def _rows(x: torch.Tensor, layout: RowLayout, rows: str) -> torch.Tensor:
    """The image or text rows of [B, H, S, D] as [B, H, W, D] in the GEMM's dtype (`_operand`).

    Megatron hands attention its tensors as [S, B, H, D]; the [B, H, S, D] argument is a permuted
    view of that memory, so going back to [S, B, H, D] is free and the gather reads only the
    wanted rows (no copy of the whole tensor). Made contiguous once here, so the per-chunk GEMMs
    take [B·H, W, D] views of it without copying it again."""
    return _operand(layout.gather(x.permute(2, 0, 1, 3), rows)).transpose(1, 2).contiguous()


def _text_rows_lse(q_text: torch.Tensor, key: torch.Tensor, layout: RowLayout, scale: float,
                   chunk_rows: int | None) -> torch.Tensor:
    """Natural-log log-sum-exp of the causal scaled scores of the text rows: [B, H, T].

    The fallback when the attention kernel did not hand us its lse: chunks of text rows against
    all keys, so at most [B, H, chunk, S] scores live at once.
    """
    batch, heads, width, _ = q_text.shape
    keys = _operand(key).contiguous()  # once: each chunk's GEMM then views it
    key_pos = torch.arange(keys.shape[2], device=key.device)
    step = _rows_per_chunk(batch * heads, keys.shape[2], chunk_rows)
    out = []
    for start in range(0, width, step):
        pos = layout.text_index[:, start:start + step]                 # [B, c]
        scores = _grouped_scores(q_text[:, :, start:start + step], keys, scale)
        future = key_pos[None, None, :] > pos[:, :, None]              # causal: row j sees keys <= j
        out.append(torch.logsumexp(scores.masked_fill_(future[:, None], float("-inf")), dim=-1))
    return torch.cat(out, dim=2) if out else q_text.new_zeros(batch, heads, 0)


def text_to_image_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    layout: RowLayout | None = None,
    tp_group: dist.ProcessGroup | None = None,
    num_heads_total: int | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """One layer's text→image attention mass: Σ_{j∈text} mean_h A_h[j, i] for every key position i.

    This is the inner double sum of eq. 5 for one layer, before the 1/(k·n) factor and the
    normalisation (see :func:`supervision_degree`).

    Args:
        query: ``[B, H, S, D]`` queries after RoPE (H = local heads under tensor parallelism).
        key: ``[B, Hkv, S, D]`` keys after RoPE; Hkv divides H (grouped-query attention).
        text_mask: ``[B, S]`` bool, True on text rows (not image, not padding).
        image_mask: ``[B, S]`` bool, True on image positions.
        lse: optional ``[B, H, S]`` natural-log row log-sum-exp of the scaled causal scores, as
            returned by fused attention kernels. With it only the [text × image] block is computed;
            it must come from the same attention (same mask and scale) as the probabilities wanted.
            Without it, the text rows' lse is recomputed under a plain causal mask.
        scale: softmax scale, default ``1/sqrt(D)``.
        layout: the micro-batch's :class:`RowLayout` (instead of the two masks): built once per
            micro-batch, it spares the host synchronisation that building it costs.
        tp_group: tensor-parallel group when each rank holds H/TP of the heads. The local head sum
            is divided by the total head count and all-reduced (sum), so every rank returns the
            global head average. Every rank of the group must call this (same masks).
        num_heads_total: total heads across the group; default ``H · group size``.
        chunk_rows: text rows per chunk (default: sized for ~64 MB of fp32 scores).

    Returns:
        ``[B, S]`` float32, detached; zero wherever ``image_mask`` is False.
    """
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be [B, H, S, D], got {tuple(query.shape)} and {tuple(key.shape)}")
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    if key.shape[0] != batch or key.shape[2] != seq or key.shape[3] != dim:
        raise ValueError(f"key shape {tuple(key.shape)} does not match query shape {tuple(query.shape)}")
    if heads % kv_heads != 0:
        raise ValueError(f"key heads ({kv_heads}) must divide query heads ({heads})")
    if layout is None:
        for name, mask in (("text_mask", text_mask), ("image_mask", image_mask)):
            if mask is None or mask.shape != (batch, seq) or mask.dtype != torch.bool:
                got = None if mask is None else f"{mask.dtype} {tuple(mask.shape)}"
                raise ValueError(f"{name} must be a bool tensor of shape {(batch, seq)}, got {got}")
        layout = RowLayout.from_masks(image_mask, text_mask)
    elif (layout.batch, layout.seq) != (batch, seq):
        raise ValueError(f"layout is for [B, S] = {(layout.batch, layout.seq)}, the query for {(batch, seq)}")
    if lse is not None:
        if lse.dim() == 4 and lse.shape[-1] == 1:  # some kernels keep a trailing singleton
            lse = lse.squeeze(-1)
        if lse.shape != (batch, heads, seq):
            raise ValueError(f"lse must be [B, H, S] = {(batch, heads, seq)}, got {tuple(lse.shape)}")
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    if tp_group is not None and num_heads_total is None:
        num_heads_total = heads * dist.get_world_size(tp_group)
    head_norm = float(num_heads_total if num_heads_total is not None else heads)

    mass = torch.zeros(batch, seq, dtype=torch.float32, device=query.device)
    with torch.no_grad():
        width, text_width = layout.width, layout.text_index.shape[1]
        if width and text_width:
            # The whole batch at once, on padded rows: [B, H, text × image] blocks, chunked over
            # text rows. Everything below has shapes the host knows: no synchronisation.
            k_img = _rows(key, layout, "image")                                    # [B, Hkv, W, D]
            q_txt = _rows(query, layout, "text")                                   # [B, H, T, D]
            if lse is None:
                row_lse = _text_rows_lse(q_txt, key, layout, scale, chunk_rows)
            else:
                row_lse = lse.gather(2, layout.text_index[:, None, :].expand(batch, heads, text_width)).float()
            col_mass = torch.zeros(batch, width, dtype=torch.float32, device=query.device)
            # Causal (a text row sees only earlier image keys), padded text rows and padded image
            # slots: [B, T, W], built once per micro-batch (RowLayout caches it for the k layers).
            blocked = layout.blocked_pairs
            step = _rows_per_chunk(batch * heads, width, chunk_rows)
            for start in range(0, text_width, step):
                stop = min(start + step, text_width)
                scores = _grouped_scores(q_txt[:, :, start:stop], k_img, scale)   # [B, H, c, W]
                scores.sub_(row_lse[:, :, start:stop, None])
                # -inf *before* exp (exp of a masked score could overflow).
                hidden = blocked[:, start:stop]                                    # [B, c, W]
                col_mass += scores.masked_fill_(hidden[:, None], float("-inf")).exp_().sum(dim=(1, 2))
            # Padded slots point at non-image positions and carry exactly 0.
            mass.scatter_add_(1, layout.image_index, col_mass / head_norm)
        if tp_group is not None:
            # Each rank summed its own heads; the sum over ranks is the global head average.
            dist.all_reduce(mass, op=dist.ReduceOp.SUM, group=tp_group)
    return mass


def supervision_degree(
    masses: torch.Tensor | Sequence[torch.Tensor] | None,
    image_mask: torch.Tensor,
    mode: str = "attention",
) -> torch.Tensor:
    """Supervision degree a of eq. 5 for every position: ``[B, S]`` float32, detached.

    Args:
        masses: the k per-layer outputs of :func:`text_to_image_attention` (layers 1..k), as a
            sequence of ``[B, S]`` or stacked ``[k, B, S]``. Ignored (may be None) for ``equal``.
        image_mask: ``[B, S]`` bool, True on image positions.
        mode: ``attention`` (eq. 5) or ``equal`` (ablation: a_i = 1/m on the m image positions).

    Returns:
        a with Σ_i a_i = 1 over each sample's image positions and 0 elsewhere. A sample without
        image positions, or whose image receives no text attention at all (no text after it),
        gets all zeros: it carries no BASIC supervision.
    """
    if mode not in DEGREE_MODES:
        raise ValueError(f"mode must be one of {DEGREE_MODES}, got {mode!r}")
    if image_mask.dim() != 2 or image_mask.dtype != torch.bool:
        raise ValueError(f"image_mask must be a bool tensor [B, S], got {image_mask.dtype} {tuple(image_mask.shape)}")
    img = image_mask.float()
    with torch.no_grad():
        if mode == "equal":
            raw = img
        else:
            if masses is None:
                raise ValueError("masses is required for mode='attention'")
            stacked = masses if isinstance(masses, torch.Tensor) else torch.stack(list(masses))
            if stacked.dim() == 2:
                stacked = stacked.unsqueeze(0)
            if stacked.shape[1:] != image_mask.shape:
                raise ValueError(f"masses must be [k, B, S] with [B, S] = {tuple(image_mask.shape)}, got {tuple(stacked.shape)}")
            # Eq. 5's 1/(k·n) is one positive constant per sample, so it cancels in the
            # normalisation below: the plain sum over layers is enough.
            raw = stacked.detach().float().sum(0) * img
        total = raw.sum(dim=1, keepdim=True)
        # where() instead of a division guard: zero-mass samples give zeros, never 0/0 = NaN.
        return torch.where(total > 0, raw / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(raw))
