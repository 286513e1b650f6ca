"""Which fused kernels this machine can run, each decided by what its kernel imports.

Megatron's kernel fusions are config flags, and NeMo's Llama-family configs turn them all on
(`nemo/collections/llm/gpt/model/llama.py`, LlamaConfig). Each one needs a specific module at run
time, and on a CUDA machine without Transformer Engine or NVIDIA apex (a pip-installed stack, an
air-gapped node) a flag that is on fails, one after the other:

- `apply_rope_fusion`: `TransformerConfig.__post_init__` raises "apply_rope_fusion is not
  available. Please install TE >= 1.4." (the kernel is TE's `fused_apply_rotary_pos_emb`).
- `persist_layer_norm`: the local spec's RMSNorm is `WrappedTorchNorm`, which asserts it off
  (`megatron/core/transformer/torch_norm.py`); only TE's norm (or apex's layer norm) takes it.
- `masked_softmax_fusion`: the local `DotProductAttention`'s `FusedScaleMaskSoftmax` imports
  `scaled_masked_softmax_cuda` (apex's Megatron kernels, not on PyPI) at the first bf16 batch
  whose length the kernel accepts. Under the TE spec the flag is unused.
- `gradient_accumulation_fusion`: the local linear layers import `fused_weight_gradient_mlp_cuda`
  (apex); TE's linear layers fuse it themselves.
- `bias_activation_fusion`, `bias_dropout_fusion`, `cross_entropy_loss_fusion`: Megatron's own
  functions, `torch.compile`d (`megatron/core/jit.py`): on CUDA that is Triton, which builds its
  kernel launcher with the machine's C compiler and Python headers at the first call.

So each flag is keyed on what is importable, not on whether CUDA is present. Without CUDA (the
CPU backend) every fusion is off.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sysconfig

import torch

# flag -> the modules that provide its kernel when Transformer Engine's layers are not used
APEX_KERNELS = {
    "masked_softmax_fusion": ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                              "scaled_softmax_cuda"),
    "gradient_accumulation_fusion": ("fused_weight_gradient_mlp_cuda",),
}
TE_ONLY = ("apply_rope_fusion", "persist_layer_norm")
COMPILED = ("bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion")
FUSION_FLAGS = TE_ONLY + tuple(APEX_KERNELS) + COMPILED


def importable(name: str) -> bool:
    """Whether a top-level module can be found, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def have_transformer_engine() -> bool:
    """CUDA is present and Transformer Engine's PyTorch layers import. (The core wheel alone can be
    installed without its torch binding; then `transformer_engine.pytorch` raises on import.)"""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001  (ImportError, or OSError / FileNotFoundError for a missing .so)
        return False
    return True


def torch_compile_can_build() -> bool:
    """Triton is installed, and a C compiler and Python's headers are there: Triton builds its
    kernel launcher (a C extension) on the first compiled call, which is what `torch.compile`
    needs on CUDA."""
    compilers = (os.environ.get("CC"), "cc", "gcc", "clang")
    headers = os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    return importable("triton") and headers and any(shutil.which(c) for c in compilers if c)


def fusion_flags(gpu_backend: bool, transformer_engine: bool, torch_compile: bool) -> dict[str, bool]:
    """The value each of Megatron's fusion flags may take here: False where its kernel is missing.

    gpu_backend: the GPU path is in use (not the CPU backend of `nemo_basic.compat`);
    transformer_engine: the model is built with Transformer Engine's layer specs;
    torch_compile: `torch.compile` can build CUDA kernels here."""
    if not gpu_backend:
        return dict.fromkeys(FUSION_FLAGS, False)
    flags = dict.fromkeys(TE_ONLY, transformer_engine)
    for flag, modules in APEX_KERNELS.items():
        flags[flag] = transformer_engine or all(importable(m) for m in modules)
    flags.update(dict.fromkeys(COMPILED, torch_compile))
    return flags


def available_fusions() -> dict[str, bool]:
    """`fusion_flags` for this process (the CPU backend's decision, what is installed)."""
    from nemo_basic.compat import cpu_backend_needed

    gpu = not cpu_backend_needed()
    return fusion_flags(gpu_backend=gpu, transformer_engine=have_transformer_engine(),
                        torch_compile=gpu and torch_compile_can_build())
