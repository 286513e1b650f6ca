"""Count the operations that make the host wait for a GPU, on any device (CPU included).

On CUDA the host blocks whenever it needs a value or a size only the device knows. On a CPU
nothing blocks, but the same operators run, so counting them at the dispatcher shows on a CPU
machine how many synchronisations a code path would cost on a GPU:
  * `aten._local_scalar_dense`: `.item()`, `int()`, `float()`, `bool()` of a tensor;
  * `tolist()` (counted through a wrapper: it bypasses the dispatcher);
  * output sizes that depend on values: `nonzero` (also behind single-argument `torch.where`),
    `masked_select`, `unique*`, `repeat_interleave` with tensor repeats, and indexing or
    index_put with a boolean mask.
  * blocking copies of a host (CPU) tensor to another device: `aten._to_copy` (`.to(device)`,
    `.cuda()`) or `aten.copy_` from a CPU source into a non-CPU destination without
    `non_blocking=True`. CUDA runs those as copy-and-synchronise-the-stream (torch's
    `memcpy_and_sync`). Counted as `h2d_copy`. On a CPU-only machine a code path shows them when
    its device is a stand-in such as `meta` (e.g. the data step's target device); a non-blocking
    copy is not counted (on CUDA it needs page-locked memory to stay asynchronous, which a CPU
    machine cannot check).
Not seen: host↔device copies that never reach the dispatcher with a non-CPU destination (all of
them, when everything runs on the CPU); the GPU self-test (scripts/gpu_selftest.py) counts those
with the profiler.
"""
from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALWAYS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique",
           "_unique2", "unique_dim", "unique_consecutive", "is_nonzero", "equal", "allclose"}
_BOOL_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else None
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _device_type(device) -> str:
    return torch.device(device).type if device is not None else "cpu"


def _blocking_host_to_device(name: str, args, kwargs) -> bool:
    """A copy of a CPU tensor to a non-CPU device that the host waits for."""
    if name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
        return (args[0].device.type == "cpu" and _device_type(kwargs.get("device", args[0].device)) != "cpu"
                and not kwargs.get("non_blocking", False))
    if name == "copy_" and len(args) > 1 and isinstance(args[0], torch.Tensor) and isinstance(args[1], torch.Tensor):
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return args[1].device.type == "cpu" and args[0].device.type != "cpu" and not non_blocking
    return False


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in _ALWAYS or (name in _BOOL_INDEXED and _has_bool_index(args)) or (
                name == "repeat_interleave" and args and isinstance(args[0], torch.Tensor)
                and len(args) > 1 and isinstance(args[1], torch.Tensor)):
            self.counts[name] += 1
        elif _blocking_host_to_device(name, args, kwargs or {}):
            self.counts["h2d_copy"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def count_host_syncs():
    """`with count_host_syncs() as counter:` … `counter.total`, `counter.counts`."""
    counter = SyncCounter()
    original = torch.Tensor.tolist

    depth = [0]

    def tolist(self):
        # A torch-function mode (the CPU backend has one) calls the method again from inside:
        # count the outermost call only.
        depth[0] += 1
        try:
            if depth[0] == 1:
                counter.counts["tolist"] += 1
            return original(self)
        finally:
            depth[0] -= 1

    torch.Tensor.tolist = tolist
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = original
