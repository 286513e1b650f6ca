"""A named registry of upstream workarounds.

Every patch records the upstream call it answers, so `nemo_basic.compat.describe()` (and the
README) can list exactly what is changed, and tests can check that nothing is changed where it is
not needed (on a CUDA machine the CPU patches must be inert).
"""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Patch:
    name: str            # short identifier, e.g. "causal_mask"
    upstream: str        # the upstream function / line it works around
    why: str             # the failure it prevents, as upstream raises it
    fn: Callable[[], None]


class PatchSet:
    """An ordered set of patches applied at most once per process."""

    def __init__(self, title: str):
        self.title = title
        self.patches: list[Patch] = []
        self.applied: list[str] = []

    def register(self, name: str, upstream: str, why: str):
        def deco(fn: Callable[[], None]) -> Callable[[], None]:
            self.patches.append(Patch(name, upstream, why, fn))
            return fn
        return deco

    def apply(self) -> list[str]:
        for patch in self.patches:
            if patch.name not in self.applied:
                patch.fn()
                self.applied.append(patch.name)
        return list(self.applied)
