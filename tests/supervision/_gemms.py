"""The GEMMs of the supervision code as the dispatcher sees them, and its CUDA GEMM path on a CPU.

`GemmRecorder` records every matrix product (op overload, operand dtypes and shapes, FLOPs).
`cuda_gemm_path()` makes `nemo_basic.supervision.losses.matmul_fp32_out` take the branch it takes on
CUDA (``torch.mm`` / ``torch.bmm`` with ``out_dtype=torch.float32`` on the 16-bit operands), which a
CPU build cannot run: the recorder answers those ``.dtype`` overloads itself, with the 16-bit
operands' exact fp32 products summed in fp32 (what cuBLAS does, up to the order of the sums).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nemo_basic.supervision import losses

aten = torch.ops.aten
_PRODUCTS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2)}  # op -> operand positions
_OUT_DTYPE_OPS = {aten.mm.dtype: aten.mm.default, aten.bmm.dtype: aten.bmm.default}


@dataclass
class Gemm:
    op: str
    a_dtype: torch.dtype
    b_dtype: torch.dtype
    out_dtype: torch.dtype
    flops: int


class GemmRecorder(TorchDispatchMode):
    def __init__(self, answer_out_dtype: bool = False):
        super().__init__()
        self.gemms: list[Gemm] = []
        self.answer_out_dtype = answer_out_dtype

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if name in _PRODUCTS:
            i, j = _PRODUCTS[name]
            a, b = args[i], args[j]
            flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            if func in _OUT_DTYPE_OPS and self.answer_out_dtype:
                out_dtype = args[2] if len(args) > 2 else kwargs["out_dtype"]
                self.gemms.append(Gemm(str(func), a.dtype, b.dtype, out_dtype, flops))
                return _OUT_DTYPE_OPS[func](a.to(out_dtype), b.to(out_dtype))
            out = func(*args, **kwargs)
            self.gemms.append(Gemm(str(func), a.dtype, b.dtype, out.dtype, flops))
            return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_gemm_path():
    """Inside: the supervision GEMMs take their CUDA branch on CPU tensors; yields the recorder."""
    probed = getattr(losses, "_OUT_DTYPE", {})  # (device type, op) -> out_dtype supported
    saved = dict(probed)
    for op in ("mm", "bmm"):
        probed[("cpu", op)] = True
    try:
        with GemmRecorder(answer_out_dtype=True) as recorder:
            yield recorder
    finally:
        probed.clear()
        probed.update(saved)
