"""LLaVA JSON + image folder -> webdataset tar shards that Megatron-Energon can also read.

Layout of an output folder::

    OUT/shard-000000.tar, shard-000001.tar, ...   webdataset shards (written by webdataset.TarWriter)
    OUT/shard-000000.tar.idx, ...                  Energon's per-shard sample index
    OUT/.nv-meta/.info.yaml, split.yaml, dataset.yaml   Energon metadata (split "train" = all shards)
    OUT/prepare_summary.json                       counts, skip reasons, settings
    OUT/skipped.jsonl                              one line per skipped record: index, line, id, reason, message

One sample per usable record, key ``{index:09d}`` (the record's position in the input; keys hold no
dots, as webdataset and Energon split the part name at the first dot)::

    000000042.json     {"id", "conversations", "images": ["img0.jpg", ...], "image_paths",
                        "image_sizes": [[w, h], ...], "source_index", "source_line"}
    000000042.img0.jpg the image bytes (JPEG/PNG as found; other formats re-encoded to PNG)

The conversations are stored normalised (see `llava_json.validate_record`) but not tokenised, so
one prepared set serves any LLM and template.

Energon: the ``.nv-meta`` files are written with Energon's own API
(``BaseWebdatasetFactory.prepare_dataset``, what ``energon prepare`` runs) and ``dataset.yaml``
declares a ``CrudeWebdataset`` (plain dicts for a cooker). To rebuild the metadata by hand::

    energon prepare OUT --split-parts 'train:shard-.*\\.tar$' --num-workers 4
    # then answer the prompts: create dataset.yaml interactively? y; sample type: the number of
    # "Crude sample (plain dict for cooking)"

Writing is atomic per shard: each shard is written to ``shard-NNNNNN.tar.tmp``, flushed, fsynced
and renamed; a crash leaves at most a ``.tmp`` file, never a truncated ``.tar``.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import os
import shutil
import time
from typing import Iterable, Iterator, Optional

from nemo_basic.data.image import ImageBlob, ImageError, load_image_blob
from nemo_basic.data.llava_json import (
    LlavaRecord,
    RawElement,
    RecordError,
    iter_json_records,
    validate_record,
)

SHARD_PREFIX = "shard-"
SUMMARY_FILE = "prepare_summary.json"
SKIPPED_FILE = "skipped.jsonl"
ENERGON_DIR = ".nv-meta"
DATASET_YAML = "__module__: megatron.energon\n__class__: CrudeWebdataset\n"
TAR_MTIME = 0.0  # fixed member timestamps: the same input gives byte-identical shards


class OutputExistsError(FileExistsError):
    pass


def shard_name(k: int) -> str:
    return f"{SHARD_PREFIX}{k:06d}.tar"


class AtomicShardWriter:
    """Numbered webdataset shards of at most ``shard_size`` samples, each renamed into place only
    once complete and fsynced."""

    def __init__(self, out_dir: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.shards: list[str] = []
        self._k = 0
        self._count = 0
        self._file = None
        self._tar = None
        self._tmp = None

    def _open(self) -> None:
        import webdataset as wds

        name = shard_name(self._k)
        self._tmp = os.path.join(self.out_dir, name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME)
        self._count = 0

    def write(self, sample: dict) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        if self._count >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks; our file object stays open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = os.path.join(self.out_dir, shard_name(self._k))
        os.replace(self._tmp, final)
        _fsync_dir(self.out_dir)
        self.shards.append(os.path.basename(final))
        self._k += 1
        self._tar = self._file = self._tmp = None

    def close(self) -> list[str]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (completed shards stay)."""
        if self._file is not None:
            try:
                self._file.close()
            finally:
                if self._tmp and os.path.exists(self._tmp):
                    os.remove(self._tmp)
        self._tar = self._file = self._tmp = None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prepared_files(out_dir: str) -> list[str]:
    """Files in ``out_dir`` that a previous run of the converter owns."""
    if not os.path.isdir(out_dir):
        return []
    owned = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith(SHARD_PREFIX) and (name.endswith(".tar") or name.endswith(".tar.idx")
                                              or name.endswith(".tar.tmp") or name.endswith(".tar.idx.tmp")):
            owned.append(name)
        elif name in (SUMMARY_FILE, SKIPPED_FILE, ENERGON_DIR):
            owned.append(name)
    return owned


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    existing = prepared_files(out_dir)
    if existing:
        if not overwrite:
            raise OutputExistsError(
                f"{out_dir} already holds a prepared data set ({', '.join(existing[:3])}"
                f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace it"
            )
        for name in existing:
            p = os.path.join(out_dir, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.makedirs(out_dir, exist_ok=True)


@dataclasses.dataclass
class PrepareSummary:
    json_path: str
    image_dir: str
    out_dir: str
    template: Optional[str]
    records_read: int = 0
    written: int = 0
    with_images: int = 0
    text_only: int = 0
    images_written: int = 0
    skipped: int = 0
    skipped_by_reason: dict = dataclasses.field(default_factory=dict)
    shards: list = dataclasses.field(default_factory=list)
    energon_metadata: bool = False
    seconds: float = 0.0

    def report(self) -> str:
        lines = [
            f"records read: {self.records_read}",
            f"written: {self.written} ({self.with_images} with images, {self.text_only} text-only; "
            f"{self.images_written} images) in {len(self.shards)} shard(s) under {self.out_dir}",
            f"skipped: {self.skipped}"
            + (f" -> see {os.path.join(self.out_dir, SKIPPED_FILE)}" if self.skipped else ""),
        ]
        for reason, n in sorted(self.skipped_by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason}: {n}")
        lines.append(f"energon metadata: {'written' if self.energon_metadata else 'not written'}; "
                     f"time {self.seconds:.1f} s")
        return "\n".join(lines)


def _load_images(image_dir: str, rec: LlavaRecord) -> list[ImageBlob]:
    return [load_image_blob(image_dir, rel) for rel in rec.images]


def _ordered_image_loads(items: Iterable, image_dir: str, workers: int) -> Iterator:
    """Yield ``(item, blobs_or_ImageError)`` in input order; images are read by ``workers`` threads
    with a bounded look-ahead (memory stays flat). ``item`` is ``(raw, record_or_RecordError)``."""
    if workers <= 1:
        for raw, rec in items:
            if isinstance(rec, LlavaRecord):
                try:
                    yield (raw, rec), _load_images(image_dir, rec)
                except ImageError as e:
                    yield (raw, rec), e
            else:
                yield (raw, rec), None
        return

    def job(rec):
        try:
            return _load_images(image_dir, rec)
        except ImageError as e:
            return e

    window: collections.deque = collections.deque()
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare-img") as pool:
        try:
            for raw, rec in items:
                fut = pool.submit(job, rec) if isinstance(rec, LlavaRecord) else None
                window.append(((raw, rec), fut))
                if len(window) >= 4 * workers:
                    item, f = window.popleft()
                    yield item, (f.result() if f is not None else None)
            while window:
                item, f = window.popleft()
                yield item, (f.result() if f is not None else None)
        finally:
            for _, f in window:
                if f is not None:
                    f.cancel()


def _sample(rec: LlavaRecord, blobs: list[ImageBlob]) -> dict:
    parts = [f"img{k}.{b.ext}" for k, b in enumerate(blobs)]
    meta = {
        "id": rec.id,
        "conversations": rec.conversations,
        "images": parts,
        "image_paths": rec.images,
        "image_sizes": [[b.width, b.height] for b in blobs],
        "source_index": rec.index,
        "source_line": rec.line,
    }
    sample = {"__key__": f"{rec.index:09d}", "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    for part, b in zip(parts, blobs):
        sample[part] = b.data
    return sample


def write_energon_metadata(out_dir: str, shards: list[str], workers: int = 1) -> None:
    """Energon's ``.nv-meta`` (shard counts, the ``train`` split, per-shard ``.tar.idx`` sample
    offsets) through its own API, plus a ``dataset.yaml`` for a ``CrudeWebdataset``."""
    from megatron.energon.flavors.webdataset.base_webdataset import BaseWebdatasetFactory

    BaseWebdatasetFactory.prepare_dataset(
        os.path.abspath(out_dir),
        list(shards),
        split_parts_patterns=[("train", r"shard-.*\.tar$")],
        workers=max(1, min(workers, len(shards))),
        shuffle_seed=None,
    )
    with open(os.path.join(out_dir, ENERGON_DIR, "dataset.yaml"), "w") as f:
        f.write(DATASET_YAML)


def prepare_llava_data(
    json_path: str,
    image_dir: str,
    out_dir: str,
    *,
    template: Optional[str] = None,
    shard_size: int = 1000,
    workers: int = 4,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    energon_metadata: bool = True,
) -> PrepareSummary:
    """Convert one LLaVA JSON file and its image folder into shards (see the module docstring).

    Non-strict (default): every unusable record is skipped, counted by reason and listed in
    ``skipped.jsonl`` (index, line, id, reason, message); the run goes on. ``strict=True``: the
    first unusable record raises `RecordError` naming the file, line, record index and id (the
    shard being written is discarded; completed shards stay, so rerun with ``overwrite``).
    ``template="plain"`` additionally requires caption records (one image, one pair of turns).
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    json_path, image_dir, out_dir = os.fspath(json_path), os.fspath(image_dir), os.fspath(out_dir)
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"--json {json_path} does not exist")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"--image-dir {image_dir} is not a folder")
    _prepare_out_dir(out_dir, overwrite)
    summary = PrepareSummary(json_path=json_path, image_dir=image_dir, out_dir=out_dir, template=template)
    reasons: collections.Counter = collections.Counter()
    writer = AtomicShardWriter(out_dir, shard_size)
    skipped_f = open(os.path.join(out_dir, SKIPPED_FILE), "w", encoding="utf-8")

    def validated() -> Iterator:
        for raw in iter_json_records(json_path):
            try:
                yield raw, validate_record(raw, template=template, source=json_path)
            except RecordError as e:
                yield raw, e

    bar = tqdm(desc=f"prepare {os.path.basename(json_path)}", unit="rec", disable=not progress, dynamic_ncols=True)
    try:
        for (raw, rec), blobs in _ordered_image_loads(validated(), image_dir, workers):
            summary.records_read += 1
            bar.update(1)
            if isinstance(rec, LlavaRecord) and isinstance(blobs, ImageError):
                rec = RecordError(blobs.reason, blobs.message, index=raw.index, line=raw.line,
                                  record_id=rec.id, source=json_path)
            if isinstance(rec, RecordError):
                if strict:
                    raise rec
                reasons[rec.reason] += 1
                entry = {"index": rec.index, "line": rec.line, "id": rec.record_id, "reason": rec.reason,
                         "message": rec.message}
                if isinstance(raw, RawElement) and raw.end_line is not None and raw.end_line != raw.line:
                    entry["skipped_to_line"] = raw.end_line
                skipped_f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                summary.skipped += 1
            else:
                sample = _sample(rec, blobs)
                writer.write(sample)
                summary.written += 1
                summary.images_written += len(blobs)
                if blobs:
                    summary.with_images += 1
                else:
                    summary.text_only += 1
            if summary.records_read % 256 == 0:
                bar.set_postfix(written=summary.written, skipped=summary.skipped, refresh=False)
        bar.set_postfix(written=summary.written, skipped=summary.skipped)
        summary.shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        skipped_f.close()

    summary.skipped_by_reason = dict(sorted(reasons.items()))
    if energon_metadata and summary.shards:
        write_energon_metadata(out_dir, summary.shards, workers=workers)
        summary.energon_metadata = True
    summary.seconds = time.time() - t0
    with open(os.path.join(out_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(summary), f, indent=2)
        f.write("\n")
    return summary
