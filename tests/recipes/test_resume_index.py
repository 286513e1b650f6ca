"""resume.problem reads a distributed checkpoint's index (``weights/.metadata``) without Megatron:
torch's classes as they are, Megatron's subclasses as field holders, nothing else the pickle names
called. Checkpoints written here by torch.distributed.checkpoint itself (one process)."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys
import types
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

from nemo_basic.recipes import resume

MEGATRON = "megatron.core.dist_checkpointing.strategies.torch"


def _checkpoint(root) -> str:
    """A NeMo-shaped checkpoint folder: weights/ by torch.distributed.checkpoint, metadata.json, common.pt."""
    ckpt = os.path.join(str(root), "step=3-consumed_samples=12.0")
    weights = os.path.join(ckpt, "weights")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"w": torch.arange(1000.0), "b": torch.ones(3, 4)}, checkpoint_id=weights)
    with open(os.path.join(weights, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist"}, f)
    torch.save({"step": 3}, os.path.join(weights, "common.pt"))
    return ckpt


def _as_megatron(weights: str, monkeypatch) -> None:
    """Rewrite .metadata as Megatron writes it: its own dataclass over torch's Metadata, from a module
    that is gone when the index is read (as on a login node without Megatron)."""
    path = os.path.join(weights, ".metadata")
    with open(path, "rb") as f:
        md = pickle.load(f)
    names = MEGATRON.split(".")
    mods = {".".join(names[:i]): types.ModuleType(".".join(names[:i])) for i in range(1, len(names) + 1)}
    cls = dataclasses.make_dataclass("MCoreMetadata", [("mcore_data", dict, dataclasses.field(default=None))],
                                     bases=(Metadata,))
    cls.__module__ = MEGATRON
    mods[MEGATRON].MCoreMetadata = cls
    with monkeypatch.context() as m:  # the real Megatron, if this process imported it, comes back after
        for name, module in mods.items():
            m.setitem(sys.modules, name, module)
        data = pickle.dumps(cls(**vars(md), mcore_data={"singleton_local_shards": False}))
    assert MEGATRON.encode() in data
    with open(path, "wb") as f:
        f.write(data)


def test_a_megatron_index_is_read_without_megatron(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path)
    weights = os.path.join(ckpt, "weights")
    _as_megatron(weights, monkeypatch)
    names = MEGATRON.split(".")
    prefixes = {".".join(names[:i]) for i in range(1, len(names) + 1)}
    for name in {m for m in sys.modules if m.split(".")[0] == "megatron"} | prefixes:
        monkeypatch.setitem(sys.modules, name, None)  # any import of Megatron now fails, loaded before or not
    assert resume.problem(ckpt) is None
    shard = os.path.join(weights, "__0_0.distcp")
    size = os.path.getsize(shard)
    os.truncate(shard, size - 1)
    assert resume.problem(ckpt) == f"weights/__0_0.distcp is truncated: {size - 1} bytes, weights/.metadata " \
                                   f"lists {size}"
    os.remove(shard)
    assert resume.problem(ckpt) == "weights/__0_0.distcp is missing (listed in weights/.metadata)"


class _Calls:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_an_index_never_calls_what_it_names(tmp_path):
    """Neither a function outside torch (os.system) nor one of torch's own (torch.save) runs."""
    ckpt = _checkpoint(tmp_path)
    ran, saved = tmp_path / "ran", tmp_path / "saved.pt"
    with open(os.path.join(ckpt, "weights", ".metadata"), "wb") as f:
        pickle.dump({"a": _Calls(os.system, f"touch {ran}"), "b": _Calls(torch.save, 1, str(saved))}, f)
    assert resume.problem(ckpt) == ("weights/.metadata is truncated or damaged (ValueError: it lists no storage "
                                    "entries)")
    assert not ran.exists() and not saved.exists()
