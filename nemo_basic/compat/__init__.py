"""Platform compatibility: one code path on GPUs (NCCL, Transformer Engine) and CPUs (gloo, torch).

`apply()` runs when `nemo_basic` is imported. On a machine with CUDA it changes nothing. Without
CUDA it applies the named megatron-core patches in `megatron_cpu`; `apply_nemo()` (called by the
NeMo front end before it imports NeMo) adds `nemo_cpu` and the NeMo/megatron-core version shims.
`describe()` lists every patch with the upstream call it answers.
"""
from __future__ import annotations

import os

import torch

from nemo_basic.compat import torchvision_shim

_FORCE_ENV = "NEMO_BASIC_CPU_BACKEND"  # "1" forces the CPU patches, "0" disables them


def cpu_backend_needed() -> bool:
    forced = os.environ.get(_FORCE_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return not torch.cuda.is_available()


def apply() -> list[str]:
    """Apply what this machine needs; return the names of the patches now active."""
    applied = []
    if torchvision_shim.apply() or torchvision_shim.active():
        applied.append("torchvision_shim")
    if cpu_backend_needed():
        from nemo_basic.compat import megatron_cpu

        applied += megatron_cpu.PATCHES.apply()
    return applied


def apply_nemo() -> list[str]:
    """Everything `apply()` does, plus what NeMo 2's lightning loop needs here. Call before
    importing `nemo.collections.vlm` (the torchvision shim must precede that import)."""
    applied = apply()
    from nemo_basic.compat import versions

    applied += versions.apply()
    if cpu_backend_needed():
        from nemo_basic.compat import nemo_cpu

        applied += nemo_cpu.PATCHES.apply()
    return applied


def describe() -> str:
    from nemo_basic.compat import megatron_cpu, nemo_cpu, versions

    lines = []
    for patch_set in (megatron_cpu.PATCHES, nemo_cpu.PATCHES, versions.PATCHES):
        lines.append(f"{patch_set.title}:")
        lines += [f"  {p.name}: {p.upstream}\n      prevents: {p.why}" for p in patch_set.patches]
    return "\n".join(lines)
