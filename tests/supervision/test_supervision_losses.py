"""Eq. 6 and eq. 7: the two BASIC losses against naive float64 references (full matrices, loops)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nemo_basic.supervision import directional_alignment_loss, semantic_distribution_loss
from nemo_basic.supervision.losses import _ChunkedVocabParallelKL

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned ranks import the worker module
import _supervision_workers as workers  # noqa: E402
from _gemms import GemmRecorder, cuda_gemm_path  # noqa: E402

# L_sds with a 16-bit table (bf16 training) against float64 on the same (rounded) inputs.
# bf16's unit roundoff is u = 2^-8: every activation, V itself and the gradient handed back to a
# bf16 V are stored with a relative error up to u, so digits beyond that are rounded away before
# the optimiser sees them. The loss may therefore be off by u of its value (it rounds the logit
# difference (V̂ − V)Eᵀ once to bf16, a relative error ≤ u per component of V̂ − V whatever the
# size of the KL; measured ≤ 0.3 u), and the gradient by 2u of its norm: the rounding of that
# difference and of q − p, ~u together (measured ≤ 1.1 u over 12 seeds and KLs from 1e-6 to 1),
# next to which the final rounding to bf16 (≤ u per element) is of the same size. Tighter would
# only hold with hi/lo-split operands, 5/3 to 2x the three products' FLOPs (issue 25).
BF16_U = 2.0 ** -8
SDS_BF16_LOSS_RTOL = BF16_U
SDS_BF16_GRAD_NORM_RTOL = 2 * BF16_U


def assert_sds_bf16_close(loss, grad, ref_loss, ref_grad) -> None:
    loss_err = float((loss.double() - ref_loss).abs().max()) / float(ref_loss.abs().max())
    grad_err = float((grad.double() - ref_grad).norm() / ref_grad.norm())
    assert loss_err <= SDS_BF16_LOSS_RTOL, f"loss off by {loss_err:.2e} of its value (bound {SDS_BF16_LOSS_RTOL:.2e})"
    assert grad_err <= SDS_BF16_GRAD_NORM_RTOL, \
        f"gradient off by {grad_err:.2e} of its norm (bound {SDS_BF16_GRAD_NORM_RTOL:.2e})"


def reference_das(v, v_hat, a) -> torch.Tensor:
    """Per-sample Σ_i a_i ‖v_i/‖v_i‖ − v̂_i/‖v̂_i‖‖² in float64, one patch at a time."""
    v, v_hat, a = v.double(), v_hat.double(), a.double()
    out = torch.zeros(v.shape[0], dtype=torch.float64)
    for b in range(v.shape[0]):
        for i in range(v.shape[1]):
            u = v[b, i] / v[b, i].norm()
            w = v_hat[b, i] / v_hat[b, i].norm()
            out[b] = out[b] + a[b, i] * ((u - w) ** 2).sum()
    return out


def reference_sds(v, v_hat, embedding, a, vocab_size=None) -> torch.Tensor:
    """Per-sample Σ_i a_i KL(p_i‖q_i) with full float64 [m, N] softmaxes, padding rows dropped."""
    e = embedding.double()[: vocab_size if vocab_size is not None else embedding.shape[0]]
    out = torch.zeros(v.shape[0], dtype=torch.float64)
    for b in range(v.shape[0]):
        p = torch.softmax(v_hat[b].double() @ e.T, dim=-1)
        q = torch.softmax(v[b].double() @ e.T, dim=-1)
        kl = (p * (p.log() - q.log())).sum(-1)
        out[b] = (a[b].double() * kl).sum()
    return out


def reduce_mean(per_sample, a) -> torch.Tensor:
    keep = [b for b in range(a.shape[0]) if bool((a[b] != 0).any())]
    return sum(per_sample[b] for b in keep) / len(keep) if keep else per_sample.sum() * 0


def make_inputs(batch, m, d, n_vocab, seed=0, zero_rows=True):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, m, d, generator=g)
    v_hat = v + 0.7 * torch.randn(batch, m, d, generator=g)  # a target near v, as after training
    embedding = torch.randn(n_vocab, d, generator=g) / d**0.25
    a = torch.rand(batch, m, generator=g)
    if zero_rows:
        a[:, -1] = 0.0  # padding patches
        a[0] = 0.0  # a sample without an image
    a = a / a.sum(1, keepdim=True).clamp_min(1e-12)
    return v, v_hat, embedding, a


def grad_of(fn, v, *args, **kwargs):
    x = v.clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    out.sum().backward()
    return out.detach(), x.grad


def reference_grad(fn, v, *args, reduction="mean"):
    x = v.double().clone().requires_grad_(True)
    per_sample = fn(x, *args)
    out = reduce_mean(per_sample, args[-1]) if reduction == "mean" else per_sample
    out.sum().backward()
    return out.detach(), x.grad


# ---- L_das (eq. 6) ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 5, 8), (3, 17, 32)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_das_matches_reference(shape, reduction) -> None:
    v, v_hat, _, a = make_inputs(*shape, n_vocab=4, seed=sum(shape), zero_rows=shape[0] > 1)
    loss, grad = grad_of(directional_alignment_loss, v, v_hat, a, reduction=reduction)
    ref_loss, ref_grad = reference_grad(reference_das, v, v_hat, a, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == (() if reduction == "mean" else (shape[0],))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_das_equals_two_minus_two_cos() -> None:
    v, v_hat, _, a = make_inputs(2, 6, 8, n_vocab=4, seed=3, zero_rows=False)
    cos = torch.nn.functional.cosine_similarity(v.double(), v_hat.double(), dim=-1)
    expected = (a.double() * (2 - 2 * cos)).sum(-1)
    torch.testing.assert_close(directional_alignment_loss(v, v_hat, a, reduction="none").double(), expected,
                               rtol=1e-5, atol=1e-6)


def test_das_gradcheck_float64() -> None:
    v, v_hat, _, a = make_inputs(2, 3, 4, n_vocab=4, seed=1)
    x = v.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: directional_alignment_loss(x, v_hat.double(), a.double()), (x,))


def test_das_zero_vectors_and_no_supervision_are_finite() -> None:
    v, v_hat, _, a = make_inputs(2, 4, 8, n_vocab=4, seed=2, zero_rows=False)
    v[1, 0] = 0.0
    v_hat[1, 1] = 0.0
    loss, grad = grad_of(directional_alignment_loss, v, v_hat, a)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
    zero_a = torch.zeros_like(a)
    loss, grad = grad_of(directional_alignment_loss, v, v_hat, zero_a)
    assert float(loss) == 0.0 and bool((grad == 0).all())


# ---- L_sds (eq. 7) ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (2, 5, 8, 33), (3, 17, 16, 101)])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sds_matches_reference(shape, chunk_size, reduction) -> None:
    batch, m, d, n_vocab = shape
    v, v_hat, embedding, a = make_inputs(batch, m, d, n_vocab, seed=sum(shape), zero_rows=batch > 1)
    loss, grad = grad_of(semantic_distribution_loss, v, v_hat, embedding, a, reduction=reduction,
                         chunk_size=chunk_size)
    ref_loss, ref_grad = reference_grad(reference_sds, v, v_hat, embedding, a, reduction=reduction)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_sds_excludes_vocab_padding_rows() -> None:
    v, v_hat, embedding, a = make_inputs(2, 6, 8, 40, seed=5)
    embedding[37:] = 50.0  # padding rows that would dominate the softmax if they were counted
    loss, grad = grad_of(semantic_distribution_loss, v, v_hat, embedding, a, vocab_size=37, chunk_size=4)
    ref_loss, ref_grad = reference_grad(lambda x, *r: reference_sds(x, *r[:3], vocab_size=37),
                                        v, v_hat, embedding, a)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_sds_target_and_embedding_get_no_gradient() -> None:
    v, v_hat, embedding, a = make_inputs(2, 4, 8, 11, seed=6)
    v_hat.requires_grad_(True)
    embedding.requires_grad_(True)
    x = v.clone().requires_grad_(True)
    semantic_distribution_loss(x, v_hat, embedding, a).backward()
    assert x.grad is not None and v_hat.grad is None and embedding.grad is None


def test_sds_gradcheck_float64() -> None:
    v, v_hat, embedding, a = make_inputs(2, 3, 4, 7, seed=8)
    x = v.double().requires_grad_(True)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x: semantic_distribution_loss(x, v_hat.double(), embedding.double(), a.double(),
                                                 reduction=reduction, chunk_size=2), (x,))
    # The autograd function alone: row KLs, no weighting, every row.
    rows = x.reshape(-1, 4).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda r: _ChunkedVocabParallelKL.apply(r, v_hat.double().reshape(-1, 4), embedding.double(), 4, None, True),
        (rows,))


def test_sds_no_grad_evaluation_matches() -> None:
    v, v_hat, embedding, a = make_inputs(2, 4, 8, 11, seed=12)
    x = v.clone().requires_grad_(True)
    with torch.no_grad():
        evaluated = semantic_distribution_loss(x, v_hat, embedding, a)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, semantic_distribution_loss(x, v_hat, embedding, a).detach())


def test_sds_skips_zero_weight_rows() -> None:
    """Rows with a_i = 0 contribute nothing, whatever they hold, and get exactly zero gradient."""
    v, v_hat, embedding, a = make_inputs(3, 5, 8, 13, seed=9)
    v[0] = float("nan")  # a sample without image: its rows must not even be read
    loss, grad = grad_of(semantic_distribution_loss, v, v_hat, embedding, a)
    assert bool(torch.isfinite(loss)) and bool((grad[0] == 0).all()) and bool((grad[:, -1] == 0).all())


def test_sds_all_zero_weights_and_bf16() -> None:
    v, v_hat, embedding, a = make_inputs(2, 4, 8, 13, seed=10, zero_rows=False)
    for loss_fn in (semantic_distribution_loss, directional_alignment_loss):
        extra = (embedding,) if loss_fn is semantic_distribution_loss else ()
        # all-zero a: a 0.0 connected to v's graph
        loss, grad = grad_of(loss_fn, v, v_hat, *extra, torch.zeros_like(a))
        assert loss.dtype == torch.float32 and float(loss) == 0.0 and bool((grad == 0).all())
        # bf16 in: fp32 loss, bf16 gradient, close to the fp64 reference on the rounded inputs
        vb, tb = v.bfloat16(), v_hat.bfloat16()
        extra_b = tuple(e.bfloat16() for e in extra)
        loss, grad = grad_of(loss_fn, vb, tb, *extra_b, a)
        assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad.float()).all())
        ref = reference_sds if loss_fn is semantic_distribution_loss else reference_das
        ref_loss, ref_grad = reference_grad(ref, vb.double(), tb.double(), *(e.double() for e in extra_b), a)
        if loss_fn is semantic_distribution_loss:  # bf16 table: bf16 training's precision (see top)
            assert_sds_bf16_close(loss, grad, ref_loss, ref_grad)
        else:
            torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=1e-4)  # bf16 rounding of grad


def test_sds_vocab_parallel_two_ranks(spawn) -> None:
    """2 gloo ranks, E split in halves of a padded 40-row table: same loss and grad as one process."""
    v, v_hat, embedding, a = make_inputs(3, 5, 8, 40, seed=11)
    # 37: rank 1 holds 17 real rows + 3 padding; 20: rank 1 holds only padding (an empty shard).
    vocab_sizes = [40, 37, 20]
    results = spawn(workers.vocab_parallel_kl_worker, 2, v, v_hat, embedding, a, vocab_sizes, timeout=180)
    for rank_results in results:
        for vocab_size, reduction, loss, grad in rank_results:
            ref_loss, ref_grad = reference_grad(lambda x, *r: reference_sds(x, *r[:3], vocab_size=vocab_size),
                                                v, v_hat, embedding, a, reduction=reduction)
            torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
            single = semantic_distribution_loss(v, v_hat, embedding, a, reduction=reduction, vocab_size=vocab_size)
            torch.testing.assert_close(loss, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise", [1e-2, 1e-3, 1e-4])
def test_sds_accurate_for_nearby_distributions(noise) -> None:
    """As V approaches its target the KL becomes tiny (~noise²); fp32 must still give its value,
    not rounding noise (a log p − log q formulation is off by ~100% at KL ~ 1e-7)."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 16, 64, generator=g)
    v_hat = v + noise * torch.randn(2, 16, 64, generator=g)
    embedding = torch.randn(3000, 64, generator=g)
    a = torch.rand(2, 16, generator=g)
    a = a / a.sum(-1, keepdim=True)
    got = semantic_distribution_loss(v, v_hat, embedding, a)
    want = reduce_mean(reference_sds(v.double(), v_hat.double(), embedding.double(), a.double()), a.double())
    assert want > 0
    assert got.item() == pytest.approx(want.item(), rel=2e-3)


def _bf16_table_inputs(v_dtype, noise, seed=21, batch=2, m=6, d=64, n_vocab=500):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, m, d, generator=g).to(v_dtype)
    v_hat = v.float() + noise * torch.randn(batch, m, d, generator=g)  # fp32 target, as eq. 4 builds it
    embedding = (torch.randn(n_vocab, d, generator=g) / d**0.25).bfloat16()
    a = torch.rand(batch, m, generator=g)
    return v, v_hat, embedding, a / a.sum(1, keepdim=True)


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noise", [0.5, 0.05, 1e-3])
def test_sds_bf16_table_within_bf16_precision(v_dtype, noise) -> None:
    """A bf16 E (bf16 training) is multiplied as it is, by 16-bit products with fp32 results:
    against float64 on the same values, loss and gradient are within bf16 training's precision
    (SDS_BF16_*), also for a target close to V (tiny KL, where rounding would show first); the
    CUDA branch (`out_dtype`) gives the CPU emulation's numbers, its GEMMs on bf16 operands."""
    for seed in range(21, 25):
        v, v_hat, embedding, a = _bf16_table_inputs(v_dtype, noise, seed)
        loss, grad = grad_of(semantic_distribution_loss, v, v_hat, embedding, a, chunk_size=5)
        ref_loss, ref_grad = reference_grad(reference_sds, v.double(), v_hat.double(), embedding.double(), a)
        assert grad.dtype == v_dtype and loss.dtype == torch.float32
        assert_sds_bf16_close(loss, grad, ref_loss, ref_grad)
        with cuda_gemm_path() as gemms:
            cuda_loss, cuda_grad = grad_of(semantic_distribution_loss, v, v_hat, embedding, a, chunk_size=5)
        with_table = [g for g in gemms.gemms if g.op.startswith("aten.mm")]  # bmm: per-row dot products
        assert with_table and all(g.op == "aten.mm.dtype" and g.a_dtype == g.b_dtype == torch.bfloat16
                                  and g.out_dtype == torch.float32 for g in with_table), with_table
        assert torch.equal(cuda_loss, loss) and torch.equal(cuda_grad, grad)
        if seed == 21 and noise == 0.05:  # the same values in an fp32 table: fp32 accuracy (unchanged bound)
            fp32_loss, fp32_grad = grad_of(semantic_distribution_loss, v.float(), v_hat, embedding.float(), a,
                                           chunk_size=5)
            torch.testing.assert_close(fp32_loss.double(), ref_loss, rtol=1e-5, atol=0)
            torch.testing.assert_close(fp32_grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("v_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cuda_path", [False, True])
def test_sds_gemm_flops_bf16_table(v_dtype, cuda_path) -> None:
    """L_sds needs three [R × d × N] products (logits of V, the logit difference to V̂, and
    (q − p)E for the gradient): 3 · 2·R·d·N FLOPs. Counted by torch.utils.flop_counter with a
    bf16 table, forward + backward, they stay within 4/3 of that (issue 25; the hi/lo-split
    operands cost 5/3 with a bf16 V, 2x with an fp32 one), and a bf16 V (bf16 training) costs
    exactly the floor. Only products with E are GEMMs here (aten.mm); the per-row dot products
    (aten.bmm [1 × N]·[N × 1], 1/d of a GEMM) are counted apart."""
    batch, m, d, n_vocab = 3, 8, 64, 500
    v, v_hat, embedding, a = _bf16_table_inputs(v_dtype, 0.05, batch=batch, m=m, d=d, n_vocab=n_vocab)
    rows = batch * m  # every row goes through (zero-weight rows as zeros: no host sync)
    floor = 3 * 2 * rows * d * n_vocab
    x = v.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        with (cuda_gemm_path() if cuda_path else contextlib.nullcontext()):
            semantic_distribution_loss(x, v_hat, embedding, a, chunk_size=7).backward()
    counts = counter.get_flop_counts()["Global"]
    gemm_flops = counts.get(torch.ops.aten.mm, 0)
    assert gemm_flops <= floor * 4 / 3, f"L_sds GEMMs cost {gemm_flops / floor:.3f}x the floor of three products"
    if v_dtype == torch.bfloat16:
        assert gemm_flops == floor
    assert counts.get(torch.ops.aten.bmm, 0) <= 3 * 2 * rows * n_vocab
    assert set(counts) <= {torch.ops.aten.mm, torch.ops.aten.bmm}, counts
    assert x.grad is not None and x.grad.dtype == v_dtype
