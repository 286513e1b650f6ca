"""Random access to prepared shards, through Energon's metadata and per-shard sample index.

`PreparedShards` lists the shards of a split from ``.nv-meta/split.yaml`` and their sample counts
from ``.nv-meta/.info.yaml`` (Energon's ``WebdatasetMeta``), and finds sample ``i`` of a shard with
Energon's ``.tar.idx`` (byte offset of each sample's first tar member, plus the end offset), then
reads the members between two offsets with ``tarfile``, exactly as Energon's own
``open_itar``/``SingleShardReader`` do. File handles are opened lazily per process, so the object
can be handed to DataLoader workers.
"""
from __future__ import annotations

import bisect
import io
import json
import os
import tarfile
from typing import Sequence

from nemo_basic.data.shards import CONVERTING, ENERGON_DIR, check_prepared


class PreparedShards(Sequence):
    """``samples[i]`` -> ``{"key", "shard", "meta": dict, "images": [bytes, ...]}``."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], split_part: str = "train"):
        from megatron.energon.epathlib import EPath
        from megatron.energon.flavors.webdataset.metadata import WebdatasetMeta

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.path.abspath(os.fspath(p)) for p in paths]
        self.split_part = split_part
        self.shard_paths: list[str] = []
        counts: list[int] = []
        for root in self.paths:
            if os.path.exists(os.path.join(root, CONVERTING)) or not os.path.isdir(os.path.join(root, ENERGON_DIR)):
                why = check_prepared(root)
                if why and why.startswith("interrupted conversion"):
                    raise FileNotFoundError(why)
            if not os.path.isdir(os.path.join(root, ENERGON_DIR)):
                raise FileNotFoundError(
                    f"{root} has no {ENERGON_DIR}/ metadata: prepare it with scripts/prepare_llava_data.py "
                    "(or `energon prepare`)")
            meta = WebdatasetMeta.from_config(EPath(root), split_part=split_part)
            for shard in meta.shards:
                self.shard_paths.append(os.path.join(root, shard.name))
                counts.append(shard.count)
        self.cum = [0]
        for c in counts:
            self.cum.append(self.cum[-1] + c)
        if self.cum[-1] == 0:
            raise ValueError(f"no samples in split {split_part!r} of {self.paths}")
        self._handles: dict = {}
        self._pid = None

    def __len__(self) -> int:
        return self.cum[-1]

    def _files(self, k: int):
        if self._pid != os.getpid():  # a forked DataLoader worker: never share file offsets
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(k)
        if h is None:
            from megatron.energon.flavors.webdataset.itar import TarIndexReader

            path = self.shard_paths[k]
            h = (open(path, "rb"), TarIndexReader(path))
            self._handles[k] = h
        return h

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range (0..{len(self) - 1})")
        k = bisect.bisect_right(self.cum, i) - 1
        return k, i - self.cum[k]

    def __getitem__(self, i: int) -> dict:
        k, j = self.locate(int(i))
        f, index = self._files(k)
        start, end = index[j], index[j + 1]
        f.seek(start)
        chunk = f.read(end - start)
        parts: dict[str, bytes] = {}
        key = None
        with tarfile.open(fileobj=io.BytesIO(chunk), mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                base, _, ext = member.name.partition(".")
                key = key or base
                if base != key:
                    raise ValueError(f"{self.shard_paths[k]} sample {j}: members of two samples ({key}, {base}) "
                                     "between consecutive index offsets; is the .tar.idx stale?")
                parts[ext] = tar.extractfile(member).read()
        if "json" not in parts:
            raise KeyError(f"{self.shard_paths[k]} sample {j} (key {key}): no .json part")
        meta = json.loads(parts["json"])
        try:
            images = [parts[name] for name in meta.get("images", [])]
        except KeyError as e:
            raise KeyError(f"{self.shard_paths[k]} sample {j} (key {key}): image part {e} listed in its json "
                           "is missing") from None
        return {"key": key, "shard": os.path.basename(self.shard_paths[k]), "meta": meta, "images": images}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state
