"""The two BASIC losses (METHOD.md, eq. 6 and eq. 7).

Both compare the initial visual embeddings V (the projector output, the only thing they train)
with the detached supervisory target V̂ (eq. 4), weighted per patch by the supervision degree a
(eq. 5). Both are computed in fp32 (fp64 if given fp64) whatever the input dtype, and reduce to
the mean over the samples that carry supervision, i.e. whose a has any nonzero weight (eq. 8).

L_sds needs softmax over the whole vocabulary for every patch. Materialising [B·m, N] logits in
autograd costs several of those tensors (~300 MB each for B·m = 2304, N = 32000); the custom
autograd function below works on row chunks, folds the backward into the forward (the gradient
a_i (q_i − p_i) E is cheap to finish while the chunk's probabilities are at hand), and supports a
vocab-sharded E under tensor parallelism.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

REDUCTIONS: tuple[str, ...] = ("mean", "none")

# Bytes one [chunk, N_local] fp32 logits tensor may take; a chunk holds ~4 of them at once.
_CHUNK_BYTES = 32 * 2**20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16/fp32 -> fp32, fp64 -> fp64 (the latter so gradcheck can run in double).
    return torch.promote_types(dtype, torch.float32)


def _check_inputs(v: torch.Tensor, v_hat: torch.Tensor, a: torch.Tensor, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if v.dim() != 3 or v_hat.shape != v.shape:
        raise ValueError(f"v and v_hat must both be [B, m, d], got {tuple(v.shape)} and {tuple(v_hat.shape)}")
    if a.shape != v.shape[:2]:
        raise ValueError(f"a must be [B, m] = {tuple(v.shape[:2])}, got {tuple(a.shape)}")


def _reduce(per_sample: torch.Tensor, a: torch.Tensor, reduction: str) -> torch.Tensor:
    """Mean over samples with any supervision weight (eq. 8), or the per-sample values.

    Written without a data-dependent branch: with no supervised sample it returns a 0 that is
    still part of v's graph (backward gives zero gradients, not an error), and it never syncs.
    """
    if reduction == "none":
        return per_sample
    supervised = (a != 0).any(dim=1).to(per_sample.dtype)
    return (per_sample * supervised).sum() / supervised.sum().clamp_min(1.0)


def directional_alignment_loss(
    v: torch.Tensor, v_hat: torch.Tensor, a: torch.Tensor, reduction: str = "mean", eps: float = 1e-6
) -> torch.Tensor:
    """L_das of eq. 6: Σ_i a_i ‖v_i/‖v_i‖ − v̂_i/‖v̂_i‖‖² per sample (= Σ_i a_i (2 − 2 cos θ_i)).

    Args:
        v: ``[B, m, d]`` initial visual embeddings (gets the gradient).
        v_hat: ``[B, m, d]`` supervisory target, treated as a constant.
        a: ``[B, m]`` supervision degree, treated as a constant (padding patches: 0).
        reduction: ``mean`` (over samples whose a is not all zero; 0 if none) or ``none`` (``[B]``).
        eps: lower bound on the norms, so a zero vector gives a finite loss and gradient.
    """
    _check_inputs(v, v_hat, a, reduction)
    dtype = _compute_dtype(v.dtype)
    unit_v = torch.nn.functional.normalize(v.to(dtype), dim=-1, eps=eps)
    unit_t = torch.nn.functional.normalize(v_hat.detach().to(dtype), dim=-1, eps=eps)
    weight = a.detach().to(dtype)
    per_sample = ((unit_v - unit_t).pow(2).sum(-1) * weight).sum(-1)
    return _reduce(per_sample, weight, reduction)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


_LOW_PRECISION = (torch.float16, torch.bfloat16)
_OUT_DTYPE: dict = {}  # (device type, op) -> whether torch.<op>(..., out_dtype=torch.float32) runs there


def _out_dtype_supported(device: torch.device, op: str = "mm") -> bool:
    """torch.mm / torch.bmm with 16-bit inputs and an fp32 result (cuBLAS accumulates in fp32
    anyway); CUDA builds of torch >= 2.8 have them, CPU builds do not. Probed once per device type
    and op (no synchronisation: only the dtype of the result is looked at)."""
    key = (device.type, op)
    if key not in _OUT_DTYPE:
        try:
            a = torch.ones(*((2, 2) if op == "mm" else (1, 2, 2)), dtype=torch.bfloat16, device=device)
            _OUT_DTYPE[key] = getattr(torch, op)(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE[key] = False
    return _OUT_DTYPE[key]


def matmul_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D: mm, 3-D: bmm) of two 16-bit operands with an fp32 result.

    On CUDA this is one 16-bit tensor-core GEMM writing fp32 (``out_dtype``), no fp32 copy of
    either operand. Where ``out_dtype`` is missing (CPU builds) the same arithmetic is emulated:
    a product of two 16-bit numbers is exact in fp32, so upcasting the operands and multiplying in
    fp32 gives what the 16-bit GEMM with fp32 accumulation gives (up to the order of the sums).
    Keeping both paths on the same operands is what lets the CPU tests vouch for the GPU's numbers.
    """
    op = "mm" if a.dim() == 2 else "bmm"
    if _out_dtype_supported(a.device, op):
        return getattr(torch, op)(a, b, out_dtype=torch.float32)
    return getattr(torch, op)(a.float(), b.float())


def _split(x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """fp32 x → [hi, lo] in a 16-bit dtype with hi + lo = x to ~16 mantissa bits (x already in
    that dtype: [x], exact)."""
    if x.dtype == dtype:
        return [x]
    hi = x.to(dtype)
    return [hi, (x - hi.float()).to(dtype)]


def _products(parts: list[list[torch.Tensor]], table: torch.Tensor, transpose: bool) -> list[torch.Tensor]:
    """Σ of each group of parts times the table (`@ table.T` or `@ table`), in fp32, as ONE GEMM.

    For a 16-bit table (the model's own bf16 weights: no fp32 copy of E per micro-batch) the parts
    are 16-bit and the GEMM writes fp32 (:func:`matmul_fp32_out`); a group of several parts (an
    fp32 operand split into hi + lo) costs one product per part. For an fp32/fp64 table the groups
    hold one part each and this is a plain matmul."""
    sizes = [len(group) for group in parts]
    rows = [p.shape[0] for group in parts for p in group]
    stacked = torch.cat([p for group in parts for p in group])
    other = table.T if transpose else table
    if table.dtype in _LOW_PRECISION:
        z = matmul_fp32_out(stacked, other)
    else:  # 16-bit parts against a table the caller upcast once (the emulation), or plain fp32/fp64
        z = stacked.to(table.dtype) @ other
    pieces, out, i = z.split(rows), [], 0
    for n in sizes:
        total = pieces[i]
        for extra in pieces[i + 1:i + n]:
            total = total + extra
        out.append(total)
        i += n
    return out


def _operands(lowp: bool, table_dtype: torch.dtype, dtype: torch.dtype):
    """(parts of x, parts of t − x and of q − p): the GEMM operands of `_ChunkedVocabParallelKL`
    (why these, in its forward). A function of its own so that scripts/bench_supervision.py can
    put back the hi/lo-split operands of before issue 25 for its old-vs-new comparison."""
    if lowp:
        return (lambda y: _split(y, table_dtype)), (lambda y: [y.to(table_dtype)])
    return (lambda y: [y.to(dtype)]), (lambda y: [y])


def _kl_from_logit_difference(expect_delta: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) from the logit difference δ = s_p − s_q (shifted by a per-row constant c).

    Since log p − log q = δ − log Σ_v q_v e^{δ_v} and a constant shift of δ cancels,
        KL = Σ_v p_v (δ_v − c) − log1p(Σ_v q_v (e^{δ_v − c} − 1)).
    The textbook Σ p (log p − log q) subtracts log-probabilities of size ~log N and loses a small
    KL (nearby distributions, i.e. V close to its target) to fp32 rounding; this form does not.
    """
    return (expect_delta - torch.log1p(moment)).clamp_min_(0.0)


class _ChunkedVocabParallelKL(torch.autograd.Function):
    """Row-wise KL(p_r ‖ q_r), p_r = softmax(t_r Eᵀ), q_r = softmax(x_r Eᵀ) (eq. 7), grad w.r.t. x.

    Rows are processed in chunks so only [chunk, N_local] logits exist at a time. Under tensor
    parallelism E is split by vocabulary rows; the softmax max, the sum-exp and the KL sum are
    all-reduced over the group, as Megatron's vocab-parallel cross entropy does for its softmax.

    The gradient of KL_r w.r.t. x_r is (q_r − p_r) E. It is computed in the forward pass, chunk by
    chunk, while p and q are at hand, and saved as a [R, d] tensor (as large as x itself). Backward
    then only scales it by the incoming per-row gradient: no logits are kept or recomputed, and the
    whole thing costs the same three [R × d × N] matmuls as plain autograd. Under TP each rank's
    (q − p) E covers its vocab shard only, so the partial gradients are all-reduced (sum) here in
    the forward, which also keeps collectives out of the backward pass.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        t: torch.Tensor,
        embedding: torch.Tensor,
        chunk_size: int,
        group: dist.ProcessGroup | None,
        with_grad: bool,
    ) -> torch.Tensor:
        dtype = _compute_dtype(x.dtype)
        rows = x.shape[0]
        # A 16-bit table (bf16 training) is used as it is, through 16-bit GEMMs with fp32 results
        # (`_products`); otherwise the compute dtype (fp32 / fp64, no copy). The three products
        # are the floor (logits of V, logit difference, gradient), one 16-bit operand each:
        #   x       as it is when already 16-bit (V in bf16 training: exact); an fp32 x is split
        #           into hi + lo (rounding it would move both distributions by ~u of the logits
        #           themselves, not of their difference: one extra product, 4/3 of the floor);
        #   t − x   formed in fp32, then rounded once to 16 bits: the logit difference δ keeps a
        #           relative error ≤ u (bf16: u = 2^-8) per component of V̂ − V, however close V
        #           is to its target, so the KL is computed from δ with a relative error of that
        #           order at every scale (it is a smooth function of δ, quadratic near 0);
        #   q − p   rounded once to 16 bits: the gradient then has ~u relative error, what bf16
        #           itself gives it when it is handed back in V's dtype.
        lowp = embedding.dtype in _LOW_PRECISION and dtype == torch.float32
        table = embedding.detach() if lowp else embedding.detach().to(dtype)
        operands = _operands(lowp, table.dtype, dtype)
        if lowp and not _out_dtype_supported(x.device, "mm"):
            # No mm(out_dtype) here (CPU builds): E upcast once, exactly, instead of in every GEMM
            # call; the operands stay the same 16-bit values, so the arithmetic is the CUDA path's.
            table = table.float()
        # needs_input_grad stays True under torch.no_grad(), so the caller says whether a backward
        # can follow; without one (evaluation) the (q − p) E matmul is skipped.
        need_grad = with_grad and ctx.needs_input_grad[0]
        # KL_r = Σ_v p_v δ_v − log Σ_v q_v e^{δ_v} with δ = t·E − x·E (the logit difference); see
        # _kl_from_logit_difference. The two sums are gathered per row and combined at the end.
        expect_delta = torch.zeros(rows, dtype=dtype, device=x.device)  # Σ_v p_v (δ_v − c)
        moments = torch.zeros(rows, dtype=dtype, device=x.device)       # Σ_v q_v (e^{δ_v − c} − 1)
        grad_x = torch.zeros(rows, x.shape[1], dtype=dtype, device=x.device) if need_grad else None
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            c = stop - start
            # One matmul for the logits of V and the logit difference δ = (V̂ − V)Eᵀ (one larger
            # GEMM runs faster than two): z[:c] → Q, z[c:] = δ, [2c, N_local]. δ taken from
            # V̂ − V directly keeps its full relative precision when V is close to its target.
            xc = x[start:stop]
            logits, delta = _products([operands[0](xc), operands[1](t[start:stop].to(dtype) - xc.to(dtype))],
                                      table, transpose=True)
            # Global row maxima over all vocab shards (a shard may hold no real token: -inf):
            # of the logits (softmax shift) and of δ (bounds the shift below), in one collective.
            if table.shape[0] > 0:
                maxima = torch.cat([logits.amax(-1), delta.amax(-1)])
            else:
                maxima = torch.full((2 * c,), float("-inf"), dtype=dtype, device=x.device)
            maxima = _all_reduce(maxima, dist.ReduceOp.MAX, group)
            q = logits.sub_(maxima[:c, None]).exp_()
            q.div_(_all_reduce(q.sum(-1), dist.ReduceOp.SUM, group)[:, None])
            # KL is unchanged by a constant shift of δ; centring it on c = E_q[δ] keeps both terms
            # of E_p[δ−c] − log E_q[e^{δ−c}] of the size of the KL itself (no cancellation), and
            # c ≥ max δ − 60 keeps e^{δ−c} finite when the two distributions are far apart.
            centre = _all_reduce(torch.bmm(q.unsqueeze(1), delta.unsqueeze(2)).view(-1), dist.ReduceOp.SUM, group)
            centre = torch.maximum(centre, maxima[c:] - 60.0)
            delta.sub_(centre[:, None])
            tilt = torch.expm1(delta)  # e^{δ−c} − 1, exact for small δ − c
            moment = _all_reduce(torch.bmm(q.unsqueeze(1), tilt.unsqueeze(2)).view(-1), dist.ReduceOp.SUM, group)
            p = tilt.add_(1.0).mul_(q).div_((1.0 + moment)[:, None])  # p = q e^{δ} / Σ q e^{δ}
            expect_delta[start:stop] = torch.bmm(p.unsqueeze(1), delta.unsqueeze(2)).view(-1)
            moments[start:stop] = moment
            if grad_x is not None:
                grad_x[start:stop] = _products([operands[1](q.sub_(p))], table, transpose=False)[0]  # (q − p) E
            del logits, delta, q, p, tilt
        # No rows (no supervised patch anywhere): skip the collectives; by contract every rank of
        # the group has the same rows, so all of them skip together.
        if rows > 0:
            _all_reduce(expect_delta, dist.ReduceOp.SUM, group)
        if grad_x is not None and rows > 0:
            _all_reduce(grad_x, dist.ReduceOp.SUM, group)
        kl = _kl_from_logit_difference(expect_delta, moments)
        ctx.save_for_backward(grad_x)
        ctx.x_dtype = x.dtype
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl: torch.Tensor):  # type: ignore[override]
        (grad_x,) = ctx.saved_tensors
        if grad_x is None:  # forward ran without grad mode: there is nothing to give back
            return None, None, None, None, None, None
        grad = (grad_x * grad_kl.to(grad_x.dtype)[:, None]).to(ctx.x_dtype)
        return grad, None, None, None, None, None


def semantic_distribution_loss(
    v: torch.Tensor,
    v_hat: torch.Tensor,
    embedding: torch.Tensor,
    a: torch.Tensor,
    reduction: str = "mean",
    chunk_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    vocab_start_index: int = 0,
) -> torch.Tensor:
    """L_sds of eq. 7: Σ_i a_i KL(p_i ‖ q_i) per sample, P = softmax(V̂ Eᵀ), Q = softmax(V Eᵀ).

    No temperature. Never materialises the whole [B·m, N] logits: rows are chunked. A bf16/fp16
    embedding is multiplied as it is (16-bit GEMMs with fp32 results, fp32 softmax/KL arithmetic),
    so no fp32 copy of E is made; with a 16-bit V (bf16 training) that is exactly three
    [B·m × d × N] products, the floor. Precision then is that of bf16 training: the logit
    difference (V̂ − V)Eᵀ and the gradient carry a relative error of order bf16's unit roundoff
    (2^-8), at every size of the KL (see `_ChunkedVocabParallelKL.forward`).

    Args:
        v: ``[B, m, d]`` initial visual embeddings (gets the gradient, returned in v's dtype).
        v_hat: ``[B, m, d]`` supervisory target (constant).
        embedding: the LLM's input word embeddings, ``[N, d]`` or this rank's vocab shard
            ``[N/TP, d]`` (constant: it receives no gradient from this loss).
        a: ``[B, m]`` supervision degree (constant).
        reduction: ``mean`` (over samples whose a is not all zero; 0 if none) or ``none`` (``[B]``).
        chunk_size: rows per chunk; default sized so one chunk's logits take ~32 MB.
        tp_group: tensor-parallel group over which ``embedding`` is vocab-sharded. v, v_hat and a
            must be identical on every rank of the group (same rows, same chunks: the collectives
            must match).
        vocab_size: true vocabulary size N; global rows ≥ N are Megatron padding and excluded.
        vocab_start_index: global index of this shard's first row.
    """
    _check_inputs(v, v_hat, a, reduction)
    if embedding.dim() != 2 or embedding.shape[1] != v.shape[2]:
        raise ValueError(f"embedding must be [N, d] with d = {v.shape[2]}, got {tuple(embedding.shape)}")
    local_rows = embedding.shape[0]
    if vocab_size is not None:
        # Keep only this shard's real tokens: global rows [start, min(start + local, vocab_size)).
        valid = min(max(vocab_size - vocab_start_index, 0), local_rows)
        embedding = embedding[:valid]
    dtype = _compute_dtype(v.dtype)
    weight = a.detach().to(dtype)
    batch, m, d = v.shape

    # Every row goes through, rows with a_i = 0 (padding, text-only samples) as zeros, so whatever
    # they held contributes nothing and gets exactly zero gradient. Selecting only the weighted
    # rows would ask the host how many there are: a device synchronisation per call.
    used = (weight != 0).reshape(-1, 1)
    x = torch.where(used, v.reshape(-1, d), 0)
    t = torch.where(used, v_hat.detach().reshape(-1, d), 0)
    if chunk_size is None:
        # Sized from the shard's full row count, not its unpadded part: every rank of the group
        # must cut the same chunks, or their collectives would not pair up.
        chunk_size = max(1, _CHUNK_BYTES // (4 * max(local_rows, 1)))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with_grad = torch.is_grad_enabled() and v.requires_grad
    kl = _ChunkedVocabParallelKL.apply(x, t, embedding, chunk_size, tp_group, with_grad)

    per_sample = (kl.to(dtype).view(batch, m) * weight).sum(-1)
    return _reduce(per_sample, weight, reduction)
