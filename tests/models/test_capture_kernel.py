"""The lse kernel's grouped-K/V fallback (only a head-count rejection switches it on) and where the
kernel runs at all (only where the attention mass is wanted)."""
import pytest
import torch

import capture_workers as CW
from nemo_basic.models import capture as C


def _grouped():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 8, 6, 16, generator=g), torch.randn(2, 2, 6, 16, generator=g),
            torch.randn(2, 2, 6, 16, generator=g))


def _stand_in(error, calls):
    """A flash kernel that raises `error` for grouped K/V and computes plain ones."""
    real = C._flash_kernel

    def kernel(q, k, v, dropout_p, scale):
        calls.append(k.shape[1])
        if k.shape[1] != q.shape[1]:
            raise error
        return real(q, k, v, dropout_p, scale)
    return kernel


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered (heads 0..7)"),
    torch.AcceleratorError("CUDA error: unspecified launch failure"),
], ids=["oom", "cuda-error", "cuda-error-naming-heads", "accelerator-error"])
def test_out_of_memory_and_cuda_errors_propagate_and_keep_grouped_kv(monkeypatch, error):
    monkeypatch.setitem(C._NATIVE_GQA, "cpu", True)
    calls = []
    monkeypatch.setattr(C, "_flash_kernel", _stand_in(error, calls))
    with pytest.raises(type(error)):
        C.sdpa_with_lse(*_grouped(), scale=0.25)
    assert C._NATIVE_GQA["cpu"] is True  # no switch to expanded K/V for the rest of the process
    assert calls == [2]                   # and no retry with them


@pytest.mark.parametrize("message", ["We do not support MQA/GQA yet",
                                     "Number of heads in key/value must divide number of heads in query"])
def test_a_grouped_heads_rejection_falls_back_to_expanded_kv(monkeypatch, message):
    monkeypatch.setitem(C._NATIVE_GQA, "cpu", True)
    calls = []
    monkeypatch.setattr(C, "_flash_kernel", _stand_in(RuntimeError(message), calls))
    q, k, v = _grouped()
    out, lse = C.sdpa_with_lse(q, k, v, scale=0.25)
    assert calls == [2, 8] and C._NATIVE_GQA["cpu"] is False
    # expanded K/V: head h reads K/V head h // 4, against a float64 reference
    kk, vv = (t.double().repeat_interleave(4, dim=1) for t in (k, v))
    scores = (q.double() @ kk.transpose(-1, -2) * 0.25).masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(out.double(), scores.softmax(-1) @ vv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
    calls.clear()
    C.sdpa_with_lse(q, k, v, scale=0.25)  # remembered: expanded from the start
    assert calls == [8]


def test_kernel_runs_only_where_the_attention_mass_is_wanted(spawn):
    """basic.degree = equal and image-free micro-batches keep the module's own attention; with
    activation recomputation the choice follows the settings only (a recomputed forward must run
    the kernel its first forward ran, whatever micro-batch the capture holds by then)."""
    (r,) = spawn(CW.lse_kernel_calls, 1)
    k = 2
    assert r["attention", "mixed", None] == k
    assert r["attention", "textonly", None] == 0
    assert r["equal", "mixed", None] == 0
    assert r["equal", "textonly", None] == 0
    assert r["attention", "textonly", "selective"] == k   # forward; the recompute runs it again
    assert r["equal", "mixed", "selective"] == 0
