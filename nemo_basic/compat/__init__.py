"""Platform compatibility: one code path on GPUs (NCCL, Transformer Engine) and CPUs (gloo, torch).

`apply()` runs when `nemo_basic` is imported. On a machine with CUDA it changes nothing. Without
CUDA it applies the named megatron-core patches in `megatron_cpu`; `apply_nemo()` (called by the
NeMo front end before it imports NeMo) adds `nemo_cpu` and the NeMo/megatron-core version shims.
`describe()` lists every patch with the upstream call it answers.

`import nemo_basic` itself does not import megatron-core (~9 s): when megatron is not imported
yet, `apply(defer_megatron=True)` leaves a one-shot import hook that applies the megatron patches
right after `megatron.core` has been imported, by whoever imports it first. So a recipe whose
configuration is wrong fails in a second, and every path that uses Megatron still runs patched
(the patches themselves import the modules they patch, so the order is the same as before).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

import torch

from nemo_basic.compat import torchvision_shim

_FORCE_ENV = "NEMO_BASIC_CPU_BACKEND"  # "1" forces the CPU patches, "0" disables them


def cpu_backend_needed() -> bool:
    forced = os.environ.get(_FORCE_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return not torch.cuda.is_available()


def _apply_megatron() -> list[str]:
    from nemo_basic.compat import megatron_cpu

    return megatron_cpu.PATCHES.apply()


class _AfterMegatronImport(importlib.abc.MetaPathFinder):
    """One-shot: wraps the loader of `megatron.core` so the CPU patches follow its import."""

    def __init__(self, applied: list):
        self.applied = applied  # extended in place (nemo_basic.ACTIVE_PATCHES)

    def find_spec(self, name, path=None, target=None):
        if name != "megatron.core":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.applied += [p for p in _apply_megatron() if p not in self.applied]

        spec.loader.exec_module = exec_module
        return spec


def apply(defer_megatron: bool = False) -> list[str]:
    """Apply what this machine needs; return the names of the patches now active (a list that a
    deferred megatron patch set extends when it lands)."""
    applied = []
    if torchvision_shim.apply() or torchvision_shim.active():
        applied.append("torchvision_shim")
    if not torch.cuda.is_available():  # whatever the backend: these fail for want of a device
        from nemo_basic.compat import no_gpu

        applied += no_gpu.PATCHES.apply()
    if cpu_backend_needed():
        if defer_megatron and "megatron.core" not in sys.modules:
            if not any(isinstance(f, _AfterMegatronImport) for f in sys.meta_path):
                sys.meta_path.insert(0, _AfterMegatronImport(applied))
        else:
            applied += _apply_megatron()
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
    from nemo_basic.compat import megatron_cpu, nemo_cpu, no_gpu, versions

    lines = []
    for patch_set in (no_gpu.PATCHES, megatron_cpu.PATCHES, nemo_cpu.PATCHES, versions.PATCHES):
        lines.append(f"{patch_set.title}:")
        lines += [f"  {p.name}: {p.upstream}\n      prevents: {p.why}" for p in patch_set.patches]
    return "\n".join(lines)
