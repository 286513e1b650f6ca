"""Eq. 5: text→image attention mass and supervision degree, against a full S×S float64 softmax."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from nemo_basic.supervision import supervision_degree, text_to_image_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned ranks import the worker module
import _supervision_workers as workers  # noqa: E402
from _gemms import GemmRecorder, cuda_gemm_path  # noqa: E402

# One character per position: T text, I image, P padding (neither).
LAYOUTS = [
    "TTTIIIITTTPP",  # system prompt, image, question, right padding
    "IIIITTTTTTTT",  # image first
    "TTIITTIIITTP",  # two images in one sample
    "TTTTTTTTTTPP",  # text only: no image
    "TTTIIIIIIIII",  # image at the end: no text attends to it
    "TIITIIIITTTT",
]


def masks_from_layouts(layouts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.tensor([[c == "T" for c in s] for s in layouts])
    image = torch.tensor([[c == "I" for c in s] for s in layouts])
    return text, image


def reference_mass(query, key, text_mask, image_mask, scale=None) -> torch.Tensor:
    """Naive: full causal softmax in float64, head mean, then loops over text rows and image columns."""
    q, k = query.double(), key.double()
    batch, heads, seq, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    k = k.repeat_interleave(heads // k.shape[1], dim=1)  # query head h uses key head h // G
    scores = q @ k.transpose(-1, -2) * scale
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1).mean(1)  # [B, S, S]
    out = torch.zeros(batch, seq, dtype=torch.float64)
    for b in range(batch):
        for i in range(seq):
            if image_mask[b, i]:
                out[b, i] = sum(probs[b, j, i] for j in range(seq) if text_mask[b, j])
    return out


def fused_lse(query, key, scale) -> torch.Tensor:
    """Row log-sum-exp as torch's fused CPU flash attention returns it (its second output)."""
    k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, k, torch.randn_like(k), dropout_p=0.0, is_causal=True, scale=scale)
    return lse


def make_qk(batch, heads, kv_heads, seq, dim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=g) * 1.5
    k = torch.randn(batch, kv_heads, seq, dim, generator=g) * 1.5
    return q.to(dtype), k.to(dtype)


def test_fused_op_lse_convention() -> None:
    """The fused op's 2nd output is [B, H, S], natural log, of the *scaled* causal scores."""
    q, k = make_qk(2, 3, 3, 9, 8)
    lse = fused_lse(q, k, 0.37)
    assert lse.shape == (2, 3, 9)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.37
    expected = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("use_lse", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 1, 4])
def test_mass_matches_full_softmax(heads: int, kv_heads: int, use_lse: bool, chunk_rows) -> None:
    text, image = masks_from_layouts(LAYOUTS)
    q, k = make_qk(len(LAYOUTS), heads, kv_heads, text.shape[1], 16, seed=heads + kv_heads)
    scale = 0.3 if heads == 6 else None
    lse = fused_lse(q, k, scale if scale is not None else 1 / math.sqrt(16)) if use_lse else None
    out = text_to_image_attention(q, k, text, image, lse=lse, scale=scale, chunk_rows=chunk_rows)
    assert out.dtype == torch.float32 and out.shape == text.shape and not out.requires_grad
    torch.testing.assert_close(out.double(), reference_mass(q, k, text, image, scale), rtol=1e-5, atol=1e-6)
    assert bool((out[~image] == 0).all())
    # Text-only sample and image-at-the-end sample: no mass anywhere.
    assert float(out[3].abs().sum()) == 0.0 and float(out[4].abs().sum()) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_mass_random_layouts_longer_sequence(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    batch, seq = 3, 40
    kinds = torch.randint(0, 3, (batch, seq), generator=g)  # 0 text, 1 image, 2 padding
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    kinds[torch.arange(seq)[None, :] >= lengths[:, None]] = 2  # right padding
    text, image = kinds == 0, kinds == 1
    q, k = make_qk(batch, 4, 2, seq, 8, seed=seed)
    expected = reference_mass(q, k, text, image)
    lse = fused_lse(q, k, 1 / math.sqrt(8))
    for out in (text_to_image_attention(q, k, text, image, lse=lse),
                text_to_image_attention(q, k, text, image, chunk_rows=5)):
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_mass_bf16_inputs() -> None:
    text, image = masks_from_layouts(LAYOUTS[:3])
    q, k = make_qk(3, 4, 2, text.shape[1], 16, dtype=torch.bfloat16)
    out = text_to_image_attention(q, k, text, image)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), reference_mass(q, k, text, image), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_lse", [True, False])
def test_mass_16bit_inputs_use_16bit_score_gemms(dtype, use_lse) -> None:
    """16-bit q and k are multiplied as they are, with fp32 output (CUDA: bmm(out_dtype=float32);
    the flash kernel that returned the lse multiplies them so), not upcast to fp32 first: every
    score GEMM of the CUDA branch takes 16-bit operands and writes fp32. Its numbers are the CPU
    emulation's, and both are within the bf16-input bound above of float64 on the same values."""
    text, image = masks_from_layouts(LAYOUTS)
    q, k = make_qk(len(LAYOUTS), 8, 2, text.shape[1], 16, seed=13, dtype=dtype)
    lse = fused_lse(q.float(), k.float(), 1 / math.sqrt(16)) if use_lse else None
    expected = reference_mass(q, k, text, image)
    with GemmRecorder() as cpu_gemms:
        out = text_to_image_attention(q, k, text, image, lse=lse, chunk_rows=4)
    with cuda_gemm_path() as gemms:
        cuda_out = text_to_image_attention(q, k, text, image, lse=lse, chunk_rows=4)
    assert gemms.gemms and all(g.op == "aten.bmm.dtype" and g.a_dtype == g.b_dtype == dtype
                               and g.out_dtype == torch.float32 for g in gemms.gemms), gemms.gemms
    # The CPU path multiplies the same 16-bit values, upcast once (exact), with the same FLOPs;
    # the sums may run in another order (fp32 rounding only).
    assert sum(g.flops for g in cpu_gemms.gemms) == sum(g.flops for g in gemms.gemms)
    torch.testing.assert_close(cuda_out, out, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    assert bool((out[~image] == 0).all())


def test_mass_rejects_bad_inputs() -> None:
    text, image = masks_from_layouts(LAYOUTS[:2])
    q, k = make_qk(2, 4, 3, text.shape[1], 8)
    with pytest.raises(ValueError, match="divide"):
        text_to_image_attention(q, k, text, image)
    q, k = make_qk(2, 4, 2, text.shape[1], 8)
    with pytest.raises(ValueError, match="text_mask"):
        text_to_image_attention(q, k, text.long(), image)
    with pytest.raises(ValueError, match="lse"):
        text_to_image_attention(q, k, text, image, lse=torch.zeros(2, 4, 3))


def test_mass_tensor_parallel_two_ranks(spawn) -> None:
    """2 gloo ranks, heads split in halves: every rank gets the single-process head average."""
    text, image = masks_from_layouts(LAYOUTS)
    q, k = make_qk(len(LAYOUTS), 8, 2, text.shape[1], 16, seed=7)
    lse = fused_lse(q, k, 1 / math.sqrt(16))
    expected = reference_mass(q, k, text, image)
    results = spawn(workers.attention_mass_tp_worker, 2, q, k, text, image, lse, timeout=180)
    for rank_result in results:
        for out in rank_result.values():
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


# ---- supervision degree (eq. 5) --------------------------------------------------------------

def reference_degree(masses: list[torch.Tensor], text_mask, image_mask, mode: str) -> torch.Tensor:
    """Literal eq. 5: a_i = (1/(k·n)) Σ_l Σ_j A_l[j, i], then a_i / Σ_i a_i; equal mode 1/m."""
    batch, seq = image_mask.shape
    out = torch.zeros(batch, seq, dtype=torch.float64)
    for b in range(batch):
        img = [i for i in range(seq) if image_mask[b, i]]
        n = max(int(text_mask[b].sum()), 1)
        if not img:
            continue
        if mode == "equal":
            for i in img:
                out[b, i] = 1.0 / len(img)
            continue
        raw = {i: sum(float(m[b, i]) for m in masses) / (len(masses) * n) for i in img}
        total = sum(raw.values())
        for i in img:
            out[b, i] = raw[i] / total if total > 0 else 0.0
    return out


def test_supervision_degree_from_attention() -> None:
    text, image = masks_from_layouts(LAYOUTS)
    masses = []
    for layer in range(3):
        q, k = make_qk(len(LAYOUTS), 4, 2, text.shape[1], 8, seed=layer)
        masses.append(text_to_image_attention(q, k, text, image))
    expected = reference_degree(masses, text, image, "attention")
    for given in (masses, torch.stack(masses)):
        a = supervision_degree(given, image, "attention")
        assert a.dtype == torch.float32 and not a.requires_grad
        torch.testing.assert_close(a.double(), expected, rtol=1e-5, atol=1e-7)
    a = supervision_degree(masses, image)
    sums = a.double().sum(1)
    for b in (0, 1, 2, 5):  # image-bearing samples with text after the image
        assert abs(float(sums[b]) - 1.0) < 1e-5
    assert float(a[3].abs().sum()) == 0.0  # no image
    assert float(a[4].abs().sum()) == 0.0  # image without any text attending to it
    assert bool(torch.isfinite(a).all())


def test_supervision_degree_equal_mode() -> None:
    text, image = masks_from_layouts(LAYOUTS)
    a = supervision_degree(None, image, mode="equal")
    torch.testing.assert_close(a.double(), reference_degree([], text, image, "equal"))
    assert float(a[3].abs().sum()) == 0.0 and bool(torch.isfinite(a).all())


def test_supervision_degree_detaches_and_validates() -> None:
    _, image = masks_from_layouts(LAYOUTS[:2])
    masses = torch.rand(2, 2, image.shape[1], requires_grad=True)
    assert not supervision_degree(masses, image).requires_grad
    with pytest.raises(ValueError, match="mode.*attention.*equal"):
        supervision_degree(masses, image, mode="uniform")
    with pytest.raises(ValueError, match="masses"):
        supervision_degree(torch.rand(2, 3, 5), image)


def test_mass_accepts_megatron_layout_views() -> None:
    """Megatron hands [S, B, H, D]; a permuted (non-contiguous) view must give the same result."""
    text, image = masks_from_layouts(LAYOUTS[:3])
    q, k = make_qk(3, 4, 2, text.shape[1], 8, seed=21)
    q_view = q.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    k_view = k.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    lse = fused_lse(q, k, 1 / math.sqrt(8)).transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_view.is_contiguous() and not lse.is_contiguous()
    expected = reference_mass(q, k, text, image)
    for out in (text_to_image_attention(q_view, k_view, text, image, lse=lse),
                text_to_image_attention(q_view, k_view, text, image)):
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
