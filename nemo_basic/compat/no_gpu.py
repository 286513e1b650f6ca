"""Where no GPU is visible (a CPU machine, or `--cpu` runs on a GPU machine with the device
hidden): what megatron-core does at import time that can only fail there. Applied by
`nemo_basic.compat.apply()` before megatron-core is imported, whichever backend is selected.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from nemo_basic.compat.registry import PatchSet

PATCHES = PatchSet("megatron-core import without a visible GPU")

UNIFIED_MEMORY = "megatron.core.inference.unified_memory"


class _UnifiedMemoryWithoutGPU(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Loads `megatron.core.inference.unified_memory` as it ends where its CUDA build fails:
    `has_unified_memory = False`, and `create_unified_mempool` asserts as upstream's does."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == UNIFIED_MEMORY else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.has_unified_memory = False
        module._alloc = None
        module._has_mem_pool = False

        def create_unified_mempool():
            """Unified memory needs a CUDA device (none is visible in this process)."""
            assert module.has_unified_memory, "unified memory needs a visible CUDA device"

        module.create_unified_mempool = create_unified_mempool


@PATCHES.register(
    "unified_memory_build",
    "megatron/core/inference/unified_memory.py: torch.utils.cpp_extension.load_inline(..., with_cuda=True) "
    "at import (reached by `import megatron.core`)",
    "with a CUDA torch and no visible GPU, torch 2.11's _get_cuda_arch_flags raises IndexError (uncaught) "
    "unless TORCH_CUDA_ARCH_LIST is set; otherwise a CUDA compile that can only fail, 3-20 s per process",
)
def _unified_memory_build() -> None:
    if UNIFIED_MEMORY not in sys.modules and not any(isinstance(f, _UnifiedMemoryWithoutGPU) for f in sys.meta_path):
        sys.meta_path.insert(0, _UnifiedMemoryWithoutGPU())
