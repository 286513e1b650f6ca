"""Make PyPI's torchvision importable beside a CPU-only torch build.

Upstream: `torchvision/_meta_registrations.py` calls `register_fake("torchvision::nms")` (and
`qnms`) unguarded at import. PyPI's torchvision wheels link their `_C` extension against the CUDA
torch build; beside the CPU build it does not load, so those ops are never defined and
`import torchvision` dies with "operator torchvision::nms does not exist".

NeMo needs torchvision at import time (`nemo.collections.vlm` → clip augmentations use
`InterpolationMode` in a default argument), so defining the two schemas first makes the
pure-Python parts (transforms, InterpolationMode) usable. Inert when the real ops exist (a
matching torchvision build, as in the NGC container).
"""
from __future__ import annotations

import torch

_LIBRARY = None  # keeps the schema registration alive for the life of the process


def needed() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return False
    except RuntimeError:
        return True


def apply() -> bool:
    """Define the missing op schemas if torchvision's extension did not; True if it did anything."""
    global _LIBRARY
    if _LIBRARY is not None or not needed():
        return False
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True
