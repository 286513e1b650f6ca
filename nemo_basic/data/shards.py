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
and renamed; a crash leaves at most a ``.tmp`` file, never a truncated ``.tar``. The set as a whole
is marked complete only at the very end: ``OUT/.nemo_basic_converting`` exists from the start until
the summary is written, and records after each finished shard how far the conversion got, so that
``resume=True`` (``--resume``) continues a killed conversion without redoing finished shards.
`check_prepared` (used by the recipes at start-up) refuses such a folder, and checks each ``.tar``
against its Energon index (``.tar.idx``: one byte offset per sample plus the end offset).
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
CONVERTING = ".nemo_basic_converting"
TAR_END_BLOCKS = 1024  # a tar archive ends with two 512-byte zero blocks after its last member
DATASET_YAML = "__module__: megatron.energon\n__class__: CrudeWebdataset\n"
TAR_MTIME = 0.0  # fixed member timestamps: the same input gives byte-identical shards


class OutputExistsError(FileExistsError):
    pass


def shard_name(k: int) -> str:
    return f"{SHARD_PREFIX}{k:06d}.tar"


class AtomicShardWriter:
    """Numbered webdataset shards of at most ``shard_size`` samples, each renamed into place only
    once complete and fsynced."""

    def __init__(self, out_dir: str, shard_size: int, done: Optional[list] = None, on_shard=None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.shards: list[str] = list(done or [])
        self.on_shard = on_shard  # called after each shard is in place
        self._k = len(self.shards)
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
        if self.on_shard is not None:
            self.on_shard(self.shards)

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
        elif name in (SUMMARY_FILE, SKIPPED_FILE, ENERGON_DIR, CONVERTING):
            owned.append(name)
    return owned


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    existing = prepared_files(out_dir)
    if existing:
        if not overwrite:
            if CONVERTING in existing:
                raise OutputExistsError(
                    f"{out_dir} holds an interrupted conversion ({CONVERTING} is there): rerun with --overwrite "
                    "(or --resume to continue it)")
            raise OutputExistsError(
                f"{out_dir} already holds a prepared data set ({', '.join(existing[:3])}"
                f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace it"
            )
        for name in existing:
            p = os.path.join(out_dir, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.makedirs(out_dir, exist_ok=True)


def check_prepared(root: str) -> Optional[str]:
    """What is wrong with the prepared folder ``root`` (naming the file), or None. Cheap: reads
    ``.nv-meta/.info.yaml``, the size of each shard and the size and last entry of its ``.tar.idx``."""
    import struct

    import yaml

    if os.path.exists(os.path.join(root, CONVERTING)):
        return (f"interrupted conversion: {root} was being converted ({CONVERTING} is there); rerun "
                "scripts/prepare_llava_data.py with --overwrite (or --resume)")
    info = os.path.join(root, ENERGON_DIR, ".info.yaml")
    if not os.path.isfile(info):
        if any(n.startswith(SHARD_PREFIX) for n in os.listdir(root)):
            return (f"interrupted conversion: {root} has shards but no {ENERGON_DIR}/ metadata; rerun "
                    "scripts/prepare_llava_data.py with --overwrite (or --resume)")
        return (f"{root} has no {ENERGON_DIR}/ metadata: prepare it with scripts/prepare_llava_data.py "
                "(or `energon prepare`)")
    try:
        with open(info) as f:
            counts = (yaml.safe_load(f) or {}).get("shard_counts") or {}
    except (OSError, yaml.YAMLError) as e:
        return f"{info} is unreadable ({type(e).__name__})"
    if not counts:
        return f"{info} lists no shards"
    for name, count in counts.items():
        tar = os.path.join(root, name)
        idx = tar + ".idx"
        if not os.path.isfile(tar):
            return f"shard {tar} is missing (listed in {ENERGON_DIR}/.info.yaml)"
        if not os.path.isfile(idx):
            return f"shard index {idx} is missing: rebuild the metadata (`energon prepare {root}`) or reconvert"
        n = os.path.getsize(idx) // 8
        if n != int(count) + 1:
            return (f"shard index {idx} has {n - 1} samples, {ENERGON_DIR}/.info.yaml says {count}: rebuild "
                    "the metadata or reconvert")
        with open(idx, "rb") as f:
            f.seek((n - 1) * 8)
            (end,) = struct.unpack("<Q", f.read(8))
        size = os.path.getsize(tar)
        if size < end + TAR_END_BLOCKS:
            return (f"shard {tar} is truncated: {size} bytes, its index {os.path.basename(idx)} says its "
                    f"{count} samples end at byte {end}; reconvert it (scripts/prepare_llava_data.py "
                    "--overwrite) or restore it")
    return None


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
    resume: bool = False,
) -> PrepareSummary:
    """Convert one LLaVA JSON file and its image folder into shards (see the module docstring).

    Non-strict (default): every unusable record is skipped, counted by reason and listed in
    ``skipped.jsonl`` (index, line, id, reason, message); the run goes on. ``strict=True``: the
    first unusable record raises `RecordError` naming the file, line, record index and id (the
    shard being written is discarded; completed shards stay, so rerun with ``overwrite``).
    ``template="plain"`` additionally requires caption records (one image, one pair of turns).
    ``resume=True`` continues a conversion of the same input that was killed (its progress is in
    ``OUT/.nemo_basic_converting``): finished shards are kept, the records after them are converted.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    json_path, image_dir, out_dir = os.fspath(json_path), os.fspath(image_dir), os.fspath(out_dir)
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"--json {json_path} does not exist")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"--image-dir {image_dir} is not a folder")
    marker = os.path.join(out_dir, CONVERTING)
    state = _resume_state(out_dir, json_path, image_dir, template, shard_size) if resume else None
    if state is None:
        _prepare_out_dir(out_dir, overwrite)
    summary = PrepareSummary(json_path=json_path, image_dir=image_dir, out_dir=out_dir, template=template)
    reasons: collections.Counter = collections.Counter()
    start_after = -1
    if state is not None:
        for key in ("records_read", "written", "with_images", "text_only", "images_written", "skipped"):
            setattr(summary, key, state["counts"][key])
        reasons.update(state["reasons"])
        start_after = state["last_index"]
        _keep_skipped_until(os.path.join(out_dir, SKIPPED_FILE), start_after)
    progress_at_shard = {}

    def on_shard(shards):  # the marker says how far the finished shards go
        _write_marker(marker, dict(json=os.path.abspath(json_path), image_dir=os.path.abspath(image_dir),
                                   template=template, shard_size=shard_size, shards=list(shards),
                                   **progress_at_shard))

    writer = AtomicShardWriter(out_dir, shard_size, done=state["shards"] if state else None, on_shard=on_shard)
    if state is None:
        on_shard(writer.shards)  # in progress from here on
    skipped_f = open(os.path.join(out_dir, SKIPPED_FILE), "a" if state else "w", encoding="utf-8")

    def validated() -> Iterator:
        for raw in iter_json_records(json_path):
            if raw.index <= start_after:
                continue
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
                summary.written += 1
                summary.images_written += len(blobs)
                if blobs:
                    summary.with_images += 1
                else:
                    summary.text_only += 1
                skipped_f.flush()
                progress_at_shard.update(last_index=rec.index, reasons=dict(reasons), counts={
                    k: getattr(summary, k) for k in ("records_read", "written", "with_images", "text_only",
                                                     "images_written", "skipped")})
                writer.write(sample)
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
    os.remove(marker)  # complete only now
    _fsync_dir(out_dir)
    return summary


def _write_marker(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _resume_state(out_dir: str, json_path: str, image_dir: str, template, shard_size: int) -> Optional[dict]:
    """The progress of the interrupted conversion in ``out_dir`` (None: nothing to resume)."""
    marker = os.path.join(out_dir, CONVERTING)
    if not os.path.isfile(marker):
        if prepared_files(out_dir):
            raise OutputExistsError(f"--resume: {out_dir} holds no interrupted conversion ({CONVERTING} is "
                                    "missing: it is complete, or not ours); use --overwrite to replace it")
        return None
    with open(marker, encoding="utf-8") as f:
        state = json.load(f)
    same = dict(json=os.path.abspath(json_path), image_dir=os.path.abspath(image_dir), template=template,
                shard_size=shard_size)
    for key, value in same.items():
        if state.get(key) != value:
            raise OutputExistsError(f"--resume: the interrupted conversion in {out_dir} used {key} = "
                                    f"{state.get(key)!r}, not {value!r}; use --overwrite to start over")
    if not state.get("shards"):
        state.update(last_index=-1, reasons={}, counts=dict.fromkeys(
            ("records_read", "written", "with_images", "text_only", "images_written", "skipped"), 0))
    for name in os.listdir(out_dir):  # the shard being written when it was killed
        if name.endswith(".tmp") or (name.startswith(SHARD_PREFIX) and name.endswith(".tar")
                                     and name not in state["shards"]):
            os.remove(os.path.join(out_dir, name))
    for name in state["shards"]:
        if not os.path.isfile(os.path.join(out_dir, name)):
            raise OutputExistsError(f"--resume: finished shard {name} of {out_dir} is missing; use --overwrite")
    return state


def _keep_skipped_until(path: str, last_index: int) -> None:
    """Drop the lines of ``skipped.jsonl`` after the last finished shard (they are redone)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["index"] <= last_index]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
