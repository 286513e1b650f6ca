"""Make PyPI's torchvision importable beside a CPU-only torch build — and only there.

Upstream: `torchvision/_meta_registrations.py` calls `register_fake("torchvision::nms")` (and
`qnms`) unguarded at import. PyPI's torchvision wheels link their `_C` extension against the CUDA
torch build; beside the CPU build `torchvision/extension.py`'s `torch.ops.load_library` of `_C`
fails, those ops are never defined, and `import torchvision` dies with "operator torchvision::nms
does not exist". NeMo needs torchvision at import time (`nemo.collections.vlm` → clip
augmentations use `InterpolationMode` in a default argument), so defining the two schemas first
makes the pure-Python parts (transforms, InterpolationMode) usable.

Where the extension *does* load (a matching torchvision, as in the NGC container) the shim must
stay away: `_C`'s static initialiser runs `TORCH_LIBRARY_FRAGMENT(torchvision, m) {m.def("nms…")}`,
and if Python has already defined that schema the process aborts ("Tried to register an operator
… multiple times", SIGABRT) — nothing in Python can catch it. So the decision is made by trying
the real thing first: `needed()` loads torchvision's own `_C` (exactly as torchvision itself
would, moments later) and only a failed load makes the shim define the schemas.
"""
from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
import sys
from typing import Optional

import torch

_LIBRARY = None  # keeps the schema registration alive for the life of the process
_DECISION: Optional[bool] = None  # needed(), decided once per process
_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _ops_defined() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return True
    except RuntimeError:
        return False


def extension_path(package: str = "torchvision") -> Optional[str]:
    """Path of the package's `_C` extension, found without importing the package (None: absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            found = glob.glob(os.path.join(folder, "_C" + suffix))
            if found:
                return found[0]
    return None


def extension_loads(path: str) -> bool:
    """Load the extension as torchvision does (`torch.ops.load_library`); True if it loaded.

    A library whose symbols do not resolve against this torch fails in dlopen before any static
    initialiser runs, so a failed attempt registers nothing; a successful one registers the real
    ops (torchvision's own later load of the same file is then a no-op)."""
    try:
        torch.ops.load_library(path)
        return True
    except (OSError, ImportError, RuntimeError):
        return False


def needed() -> bool:
    """True only when the package is installed, its ops are not defined and its `_C` cannot load."""
    global _DECISION
    if _DECISION is None:
        if _ops_defined() or "torchvision" in sys.modules:
            _DECISION = False  # the real ops are there, or torchvision already decided for itself
        else:
            path = extension_path("torchvision")
            _DECISION = path is not None and not extension_loads(path)
    return _DECISION


def apply() -> bool:
    """Define the missing op schemas where torchvision's extension cannot load; True if it did."""
    global _LIBRARY
    # needed() looks torchvision up, which can re-enter apply() through the venv's start-up hook
    # (nemo_basic/export/torchvision_hook.py): decide first, then check again.
    if _LIBRARY is not None or not needed() or _LIBRARY is not None:
        return False
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _LIBRARY.define(schema)
    return True


def active() -> bool:
    return _LIBRARY is not None
