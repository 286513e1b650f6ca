"""Which checkpoint a run resumes from, checked before anything is loaded.

A run folder's ``checkpoints/`` holds NeMo distributed checkpoints (``step=N-consumed_samples=M``,
with ``weights/`` written by ``torch.distributed.checkpoint``) and a ``…-last`` link. NeMo's own
``AutoResume`` only looks at ``-last`` and loads it blindly; here every checkpoint is checked against
its own index, cheaply and without importing Megatron:

* ``weights/metadata.json`` parses, ``weights/common.pt`` is a whole zip archive;
* ``weights/.metadata`` (the pickled ``torch.distributed.checkpoint`` ``Metadata``) is read into
  torch's own classes, Megatron's subclasses as plain field holders, and every storage entry it lists
  (``relative_path``, ``offset``, ``length``) must lie inside a file that is there.

`choose` returns the newest checkpoint that passes, and the reason for each one it passed over.
`set_aside` moves the ones that would get in the way of the resumed run (broken, unfinished, or newer
than the one resumed from) into ``<run_dir>/checkpoints_set_aside/``: nothing is deleted, and the
resumed run writes one checkpoint name per step (no ``-v1`` copies next to a broken one).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

SET_ASIDE_DIR = "checkpoints_set_aside"
UNFINISHED = "-unfinished"
_STEP = re.compile(r"(?:^|-)step=(\d+)")


# -- reading .metadata without importing Megatron -------------------------------------------------------------
_SAFE = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes",
                                    "bool", "complex", "slice", "range", "object", "bytearray")}
_SAFE |= {("collections", "OrderedDict"), ("collections", "defaultdict"), ("copyreg", "_reconstructor")}


class _IndexUnpickler(pickle.Unpickler):
    """torch's own classes (``torch.distributed.checkpoint``'s metadata, dtypes, sizes); any other class,
    such as Megatron's ``MCoreMetadata`` / ``MCoreSavePlan`` (dataclasses over torch's) or a path,
    becomes a plain holder of the fields pickle sets, so that checking an index neither imports
    Megatron (6.6 s, and missing on a login node) nor calls anything the pickle names outside torch."""

    def find_class(self, module, name):
        import torch

        if (module, name) in _SAFE or (module, name) == ("torch.serialization", "_get_layout") \
                or module.startswith("torch.distributed.checkpoint."):
            return super().find_class(module, name)
        found = getattr(torch, name, None) if module == "torch" else None  # torch.Size, torch.float32, ...
        if isinstance(found, (type, torch.dtype, torch.layout, torch.memory_format)):
            return found
        return type(name, (), {"__init__": lambda self, *args, **kwargs: None, "__module__": "unread." + module})


def _storage_extents(metadata_file: str) -> Dict[str, int]:
    """{relative file name: bytes the index says it holds} from a ``.metadata`` file."""
    with open(metadata_file, "rb") as f:
        md = _IndexUnpickler(f).load()
    storage = getattr(md, "storage_data", None)
    if not isinstance(storage, dict) or not storage:
        raise ValueError("it lists no storage entries")
    ends: Dict[str, int] = {}
    for info in storage.values():
        rel, off, length = getattr(info, "relative_path", None), getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(rel, str) or not isinstance(off, int) or not isinstance(length, int):
            raise ValueError("a storage entry has no file, offset or length")
        ends[rel] = max(ends.get(rel, 0), off + length)
    return ends


def problem(ckpt: str) -> Optional[str]:
    """Why ``ckpt`` cannot be resumed from (naming the file), or None when it is complete."""
    if os.path.exists(ckpt.rstrip("/") + UNFINISHED):
        return f"unfinished (NeMo's marker {os.path.basename(ckpt)}{UNFINISHED} is there: the save was cut short)"
    weights = os.path.join(ckpt, "weights")
    if not os.path.isdir(weights):
        return "weights/ is missing"
    mj = os.path.join(weights, "metadata.json")
    try:
        with open(mj) as f:
            json.load(f)
    except FileNotFoundError:
        return "weights/metadata.json is missing"
    except (OSError, ValueError) as e:
        return f"weights/metadata.json is unreadable ({type(e).__name__})"
    common = os.path.join(weights, "common.pt")
    if not os.path.isfile(common):
        return "weights/common.pt is missing"
    try:
        with zipfile.ZipFile(common) as z:
            size = os.path.getsize(common)
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"weights/common.pt is truncated ({size} bytes)"
    except (zipfile.BadZipFile, OSError) as e:
        return f"weights/common.pt is truncated or damaged ({e})"
    md = os.path.join(weights, ".metadata")
    if not os.path.isfile(md):
        return "weights/.metadata (the index of the distributed checkpoint) is missing"
    try:
        extents = _storage_extents(md)
    except Exception as e:  # a truncated pickle: EOFError, UnpicklingError, ...
        return f"weights/.metadata is truncated or damaged ({type(e).__name__}: {e})"
    for rel, need in sorted(extents.items()):
        path = os.path.join(weights, rel)
        if not os.path.isfile(path):
            return f"weights/{rel} is missing (listed in weights/.metadata)"
        have = os.path.getsize(path)
        if have < need:
            return f"weights/{rel} is truncated: {have} bytes, weights/.metadata lists {need}"
    return None


# -- choosing ---------------------------------------------------------------------------------------------------
def step_of(name: str) -> Optional[int]:
    m = _STEP.search(os.path.basename(name.rstrip("/")))
    return int(m.group(1)) if m else None


@dataclass
class Choice:
    chosen: Optional[str] = None          # the path to resume from (the "-last" link when one points at it)
    chosen_dir: Optional[str] = None      # the checkpoint folder itself
    skipped: List[Tuple[str, str]] = field(default_factory=list)   # (folder, why), newest first
    newer_unusable: List[str] = field(default_factory=list)        # folders newer than `chosen_dir`

    @property
    def step(self) -> Optional[int]:
        return step_of(self.chosen_dir) if self.chosen_dir else None


def _candidates(ckpt_dir: str) -> Tuple[List[str], Dict[str, List[str]]]:
    """Checkpoint folders (real paths, newest first) and the ``-last`` links pointing at each."""
    dirs, links = set(), {}
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if name.endswith(UNFINISHED) and not os.path.isdir(path):
            base = path[: -len(UNFINISHED)]
            if os.path.isdir(base):
                dirs.add(os.path.realpath(base))
            continue
        if os.path.islink(path):
            if os.path.isdir(path):
                links.setdefault(os.path.realpath(path), []).append(path)
            continue
        if os.path.isdir(path):
            dirs.add(os.path.realpath(path))

    def key(p):
        s = step_of(p)
        return (s if s is not None else -1, os.path.getmtime(p), p.endswith("-last"))

    return sorted(dirs, key=key, reverse=True), links


def checkpoints(run_dir: str) -> List[str]:
    """The checkpoint folders of a run, finished or not, newest first."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    return _candidates(ckpt_dir)[0] if os.path.isdir(ckpt_dir) else []


def choose(run_dir: str) -> Choice:
    """The newest complete checkpoint of ``run_dir`` and why each newer one was passed over."""
    out = Choice()
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return out
    dirs, links = _candidates(ckpt_dir)
    for d in dirs:
        why = problem(d)
        if why is None and out.chosen_dir is None:
            out.chosen_dir = d
            last = [p for p in links.get(d, []) if p.endswith("-last")]
            out.chosen = sorted(last)[-1] if last else d
        elif why is not None:
            out.skipped.append((d, why))
            if out.chosen_dir is None:
                out.newer_unusable.append(d)
    return out


def set_aside(run_dir: str, choice: Choice) -> List[Tuple[str, str]]:
    """Move every broken or unfinished checkpoint (and its marker) to ``<run_dir>/checkpoints_set_aside/``
    and drop ``-last`` links that no longer point at a checkpoint in ``checkpoints/``. Returns
    (old path, new path) of what moved. Rank 0 only."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    moved = []
    if not choice.skipped:
        return moved
    dest_root = os.path.join(run_dir, SET_ASIDE_DIR)
    os.makedirs(dest_root, exist_ok=True)
    for d, _why in choice.skipped:
        for src in (d, d + UNFINISHED):
            if not os.path.lexists(src):
                continue
            dst = os.path.join(dest_root, os.path.basename(src))
            n = 1
            while os.path.lexists(dst):
                dst = os.path.join(dest_root, f"{os.path.basename(src)}.{n}")
                n += 1
            shutil.move(src, dst)
            moved.append((src, dst))
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if os.path.islink(path) and not os.path.exists(path):  # a "-last" link to what moved
            os.unlink(path)
    return moved


def describe(choice: Choice, run_dir: str) -> List[str]:
    """The console lines: which checkpoint, and why any newer one was not used."""
    lines = []
    for d, why in choice.skipped:
        rel = os.path.relpath(d, run_dir)
        newer = d in choice.newer_unusable
        lines.append(f"checkpoint {rel} is not usable: {why}; moved to {SET_ASIDE_DIR}/"
                     + (" (newer than the one resumed from)" if newer and choice.chosen else "")
                     + ("" if choice.chosen else " (no other checkpoint to fall back to)"))
    if choice.chosen:
        what = f"resuming from {os.path.relpath(choice.chosen_dir, run_dir)}"
        if choice.newer_unusable:
            what += f" (the newest complete checkpoint: {len(choice.newer_unusable)} newer one(s) set aside)"
        lines.append(what)
    elif choice.skipped:
        lines.append("no complete checkpoint left: training starts from step 0")
    return lines
