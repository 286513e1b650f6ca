#!/usr/bin/env python3
"""The wheel kit that travels with the checkout to the bare GPU machine (stdlib only).

The machine has Python 3.12, torch 2.11.0+cu130, torchvision 0.26.0, transformers 5.17.0,
pytorch-lightning 2.6.6 and numpy, but no megatron-core, NeMo, Transformer Engine or apex, and no
network: everything arrives with the checkout in one transfer of at most 64 MiB. The kit is the
wheels in requirements/gpu-kit.txt (see shared/reference/gpu-machine-kit-2026-12.md), some of them
slimmed, in a git-ignored folder (default .kit/) carried explicitly.

Here (network, any Python >= 3.9 with pip):

    python3 scripts/gpu_kit.py build --out .kit          # download, slim, write .kit/kit.json, size check

On the GPU machine (no network, nothing installed; the one documented command):

    python3 scripts/gpu_kit.py selftest --kit .kit -- --out OUTDIR/gpu_selftest.json

which is `install` (pip install --no-index --no-deps --target SITE .kit/*.whl, then a check that
every pinned distribution is in SITE at its pinned version) followed by
`scripts/gpu_selftest.py ARGS` with PYTHONPATH=SITE:REPO and PYTHONUNBUFFERED=1.
"""
from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PINS = REPO / "requirements" / "gpu-kit.txt"
DEFAULT_KIT = REPO / ".kit"
DEFAULT_SITE = Path(tempfile.gettempdir()) / "nemo_basic_gpu_kit_site"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nemo_basic" / "gpu-kit-downloads"
DEFAULT_LIMIT_MIB = 54.0     # of the 64 MiB transfer: room left for OUT files, git metadata and surprises
MIB = 1024 * 1024

# The machine's interpreter and platform: CPython 3.12 on x86_64 glibc (manylinux_2_31 and older).
PYTHON_VERSION = "3.12"
ABI = "cp312"
PLATFORMS = ("manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64", "any")
# Only an sdist on PyPI: built here with `pip wheel --no-deps` (the result must be pure Python).
SDIST_ONLY = frozenset({"antlr4-python3-runtime", "wget"})


class KitError(Exception):
    """A failure the user must act on; the message says what and where."""


def canonical(name: str) -> str:
    """PEP 503 name normalisation (PuLP, pulp and Pu_LP are the same distribution)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def same_version(a: str, b: str) -> bool:
    return a.strip().lower().lstrip("v") == b.strip().lower().lstrip("v")


# ---- pins -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pin:
    name: str       # as written in the file
    version: str
    line: int

    @property
    def key(self) -> str:
        return canonical(self.name)

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


_PIN_RE = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)$")


def parse_pins(path: Path) -> List[Pin]:
    """One exact pin (name==version) a line; '#' starts a comment. Anything else is an error naming file:line."""
    pins: List[Pin] = []
    seen: Dict[str, int] = {}
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN_RE.match(line.replace(" ", ""))
        if not m:
            raise KitError(f"{path}:{n}: not an exact pin (name==version, no ranges, extras or markers): {raw.strip()!r}")
        pin = Pin(m.group(1), m.group(2), n)
        if pin.key in seen:
            raise KitError(f"{path}:{n}: {pin.name} is pinned twice (first at line {seen[pin.key]})")
        seen[pin.key] = n
        pins.append(pin)
    if not pins:
        raise KitError(f"{path}: no pins")
    return pins


# ---- wheels ---------------------------------------------------------------------------------------------

def wheel_name_version(filename: str) -> Tuple[str, str]:
    """(canonical name, version) from a wheel's file name {dist}-{version}(-{build})?-{py}-{abi}-{plat}.whl."""
    parts = Path(filename).name[:-len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise KitError(f"not a wheel file name: {filename}")
    return canonical(parts[0]), parts[1]


def find_wheel(folder: Path, pin: Pin) -> Optional[Path]:
    if not folder.is_dir():
        return None
    for p in sorted(folder.glob("*.whl")):
        try:
            name, version = wheel_name_version(p.name)
        except KitError:
            continue
        if name == pin.key and same_version(version, pin.version):
            return p
    return None


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dist_info_dir(names: Iterable[str], wheel: str) -> str:
    dirs = {n.split("/", 1)[0] for n in names if n.count("/") == 1 and n.endswith(".dist-info/RECORD")}
    if len(dirs) != 1:
        raise KitError(f"{wheel}: expected exactly one *.dist-info/RECORD, found {sorted(dirs) or 'none'}")
    return dirs.pop()


# ---- slimming -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SlimRule:
    """What a slimmed wheel leaves out. Every path named here must be in the wheel, or slimming fails:
    a version bump cannot silently change what is dropped.

    drop:               path prefixes ('dir/' or a file); each must match at least one file.
    drop_children_of:   a folder whose sub-folders are all dropped except keep_children; its own files stay.
    keep_children:      the sub-folders of drop_children_of that stay (each must exist).
    must_keep:          files that must still be there afterwards.
    """
    label: str
    why: str
    drop: Tuple[str, ...] = ()
    drop_children_of: Optional[str] = None
    keep_children: Tuple[str, ...] = ()
    must_keep: Tuple[str, ...] = ()


_NEMO_COLLECTIONS = ("asr", "tts", "audio", "diffusion", "speechlm", "speechlm2", "avlm", "multimodal_autoregressive")

SLIM_RULES: Dict[str, SlimRule] = {
    "nemo-toolkit": SlimRule(
        label="nemo-toolkit",
        why="top-level tests/ and scripts/ shadow the repo's on PYTHONPATH; collections never imported by the GPU path",
        drop=("tests/", "scripts/") + tuple(f"nemo/collections/{c}/" for c in _NEMO_COLLECTIONS) + ("nemo/agents/",),
        must_keep=("nemo/collections/vlm/__init__.py", "nemo/collections/llm/__init__.py",
                   "nemo/collections/multimodal/data/common/webdataset.py"),
    ),
    "pulp": SlimRule(
        label="PuLP",
        why="pulp/solverdir holds the CBC solver binaries (~35 MB unpacked); modelopt only imports pulp",
        drop=("pulp/solverdir/",),
        must_keep=("pulp/__init__.py",),
    ),
    "botocore": SlimRule(
        label="botocore",
        why="service models are read only when a client for that service is created; boto3 is imported, s3/sts kept",
        drop_children_of="botocore/data/",
        keep_children=("s3", "sts"),
        must_keep=("botocore/data/endpoints.json", "botocore/data/_retry.json",
                   "botocore/data/sdk-default-configuration.json", "botocore/data/partitions.json"),
    ),
    "leptonai": SlimRule(
        label="leptonai",
        why="leptonai/templates holds pictures and project templates; nemo_run only imports the SDK",
        drop=("leptonai/templates/",),
        must_keep=("leptonai/__init__.py",),
    ),
    "ledoc-ui": SlimRule(
        label="ledoc-ui",
        why="ledoc_ui/static is the web UI's bundle",
        drop=("ledoc_ui/static/",),
    ),
}


def _dropped(names: Sequence[str], rule: SlimRule, wheel: str) -> set:
    files = [n for n in names if not n.endswith("/")]
    dropped: set = set()
    problems = []
    for prefix in rule.drop:
        hit = {n for n in files if (n.startswith(prefix) if prefix.endswith("/") else n == prefix)}
        if not hit:
            problems.append(f"'{prefix}' is not in the wheel")
        dropped |= hit
    if rule.drop_children_of:
        base = rule.drop_children_of
        children = {n[len(base):].split("/", 1)[0] for n in files if n.startswith(base) and "/" in n[len(base):]}
        if not children:
            problems.append(f"'{base}' has no sub-folders in the wheel")
        for keep in rule.keep_children:
            if keep not in children:
                problems.append(f"'{base}{keep}/' (kept) is not in the wheel")
        gone = children - set(rule.keep_children)
        if children and not gone:
            problems.append(f"'{base}' has no sub-folders to drop besides {list(rule.keep_children)}")
        dropped |= {n for n in files if n.startswith(base) and n[len(base):].split("/", 1)[0] in gone
                    and "/" in n[len(base):]}
    for keep in rule.must_keep:
        if keep not in files:
            problems.append(f"'{keep}' (must stay) is not in the wheel")
        elif keep in dropped:
            problems.append(f"'{keep}' (must stay) would be dropped")
    if problems:
        raise KitError(f"slimming rule '{rule.label}' does not fit {wheel}: " + "; ".join(problems)
                       + ". The wheel's layout changed: check what the rule should drop now and update SLIM_RULES"
                         " in scripts/gpu_kit.py.")
    return dropped


def slim_wheel(src: Path, dst: Path, rule: SlimRule) -> Dict[str, int]:
    """Write a copy of wheel src without the rule's paths to dst, with a RECORD that lists exactly the files
    that remain (sha256 and size). Returns counts: files_kept, files_dropped, bytes_dropped (uncompressed)."""
    src, dst = Path(src), Path(dst)
    with zipfile.ZipFile(src) as zin:
        infos = zin.infolist()
        names = [i.filename for i in infos]
        dist_info = dist_info_dir(names, src.name)
        record = f"{dist_info}/RECORD"
        dropped = _dropped(names, rule, src.name)
        # signatures of the old RECORD would be wrong now
        skip = dropped | {record, f"{dist_info}/RECORD.jws", f"{dist_info}/RECORD.p7s"}
        kept_dirs = {k[:i + 1] for k in names if not k.endswith("/") and k not in skip
                     for i, ch in enumerate(k) if ch == "/"}
        rows: List[Tuple[str, str, str]] = []
        bytes_dropped = sum(i.file_size for i in infos if i.filename in dropped)
        tmp = dst.with_name(dst.name + ".part")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for info in infos:
                n = info.filename
                if n in skip:
                    continue
                if n.endswith("/"):   # directory entries (rare in wheels): only of folders that still have files
                    if n in kept_dirs:
                        zout.writestr(info, b"")
                    continue
                data = zin.read(info)
                out = zipfile.ZipInfo(n, date_time=info.date_time)
                out.external_attr = info.external_attr
                out.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(out, data, compresslevel=9)
                rows.append((n, record_hash(data), str(len(data))))
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerows(rows)
            w.writerow((record, "", ""))
            rec = zipfile.ZipInfo(record, date_time=(1980, 1, 1, 0, 0, 0))
            rec.external_attr = 0o644 << 16
            rec.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(rec, buf.getvalue().encode())
        os.replace(tmp, dst)
    return {"files_kept": len(rows), "files_dropped": len(dropped), "bytes_dropped": bytes_dropped}


def verify_record(wheel: Path) -> None:
    """RECORD lists exactly the files in the wheel, each with a matching sha256 and size."""
    with zipfile.ZipFile(wheel) as z:
        files = {n for n in z.namelist() if not n.endswith("/")}
        record = f"{dist_info_dir(files, wheel.name)}/RECORD"
        listed = {}
        for row in csv.reader(io.StringIO(z.read(record).decode())):
            if row:
                listed[row[0]] = row
        if set(listed) != files:
            raise KitError(f"{wheel.name}: RECORD and contents differ: only in RECORD {sorted(set(listed) - files)[:5]},"
                           f" only in the wheel {sorted(files - set(listed))[:5]}")
        for n, row in listed.items():
            if n == record or n.endswith((".jws", ".p7s")) and n.startswith(record):
                continue
            data = z.read(n)
            if row[1] != record_hash(data) or row[2] != str(len(data)):
                raise KitError(f"{wheel.name}: RECORD entry for {n} does not match its contents")


# ---- download -------------------------------------------------------------------------------------------

def _pip(args: List[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stdout.strip().splitlines()[-15:])
        raise KitError(f"{what} failed (rc {r.returncode}): {' '.join(cmd)}\n{tail}")


def fetch_wheel(pin: Pin, cache: Path) -> Tuple[Path, str]:
    """The wheel for pin in cache, downloaded (or for SDIST_ONLY built) if not there. Returns (path, source)."""
    cache.mkdir(parents=True, exist_ok=True)
    have = find_wheel(cache, pin)
    if have is not None:
        return have, "cached"
    if pin.key in SDIST_ONLY:
        _pip(["wheel", "--no-deps", "--no-cache-dir", "-q", "-w", str(cache), str(pin)], f"building {pin} from its sdist")
        source = "built from sdist"
    else:
        args = ["download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
                "--implementation", "cp", "--abi", ABI, "-q", "-d", str(cache)]
        for plat in PLATFORMS:
            args += ["--platform", plat]
        _pip(args + [str(pin)], f"downloading {pin}")
        source = "downloaded"
    got = find_wheel(cache, pin)
    if got is None:
        raise KitError(f"pip reported success for {pin} but no matching wheel is in {cache}")
    if pin.key in SDIST_ONLY and not re.search(r"-py[23.py]*-none-any\.whl$", got.name):
        raise KitError(f"{got.name}: a wheel built from an sdist must be pure Python (py3-none-any)")
    return got, source


# ---- size check -----------------------------------------------------------------------------------------

def _git_paths(repo: Path, *args: str) -> List[str]:
    r = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", *args], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise KitError(f"git ls-files {' '.join(args)} failed in {repo}: {r.stderr.decode().strip()}")
    return [p for p in r.stdout.decode("utf-8", "surrogateescape").split("\0") if p]


def checkout_bytes(repo: Path, exclude: Optional[Path] = None) -> Tuple[int, int]:
    """(bytes, files) of what travels as the checkout: the files git tracks plus untracked files that are not
    ignored (and shared/ where the checkout has one). exclude: a folder not to count (the kit, if inside)."""
    repo = Path(repo).resolve()
    paths = set(_git_paths(repo)) | set(_git_paths(repo, "--others", "--exclude-standard"))
    total = count = 0
    ex = Path(exclude).resolve() if exclude else None
    for rel in paths:
        p = repo / rel
        if ex is not None and (p == ex or ex in p.parents):
            continue
        try:
            st = p.lstat()
        except FileNotFoundError:     # tracked but deleted in the work tree: it does not travel
            continue
        if p.is_symlink() or p.is_file():
            total += st.st_size
            count += 1
    shared = repo / "shared"
    if shared.is_dir() and not any(r == "shared" or r.startswith("shared/") for r in paths):
        for p in shared.rglob("*"):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
                count += 1
    return total, count


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def size_check(repo: Path, kit_dir: Path, limit_mib: float) -> Dict[str, float]:
    """checkout + kit must be <= limit_mib MiB; raises KitError naming both sizes and the limit."""
    kit_dir = Path(kit_dir).resolve()
    repo_b, nfiles = checkout_bytes(repo, exclude=kit_dir)
    kit_b = folder_bytes(kit_dir)
    total, limit = repo_b + kit_b, int(limit_mib * MIB)
    res = {"checkout_bytes": repo_b, "checkout_files": nfiles, "kit_bytes": kit_b, "total_bytes": total,
           "limit_bytes": limit, "limit_mib": limit_mib}
    msg = (f"checkout {repo_b:,} B ({repo_b / MIB:.2f} MiB, {nfiles} files) + kit {kit_b:,} B ({kit_b / MIB:.2f} MiB)"
           f" = {total:,} B ({total / MIB:.2f} MiB); limit {limit_mib:g} MiB ({limit:,} B)")
    if total > limit:
        raise KitError(f"SIZE CHECK FAILED: {msg}: over by {(total - limit) / MIB:.2f} MiB")
    res["message"] = f"size check OK: {msg}, {(limit - total) / MIB:.2f} MiB to spare"
    return res


def _git_ignored(repo: Path, path: Path) -> Optional[bool]:
    try:
        rel = Path(path).resolve().relative_to(Path(repo).resolve())
    except ValueError:
        return None   # outside the repository
    r = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", str(rel) + "/"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


# ---- build ----------------------------------------------------------------------------------------------

def build(pins_path: Path, out: Path, cache: Path, limit_mib: float, repo: Path = REPO) -> Dict:
    pins = parse_pins(pins_path)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "kit.json"
    old = {}
    if manifest_path.exists():
        try:
            old = {w["file"]: w for w in json.loads(manifest_path.read_text()).get("wheels", [])}
        except (ValueError, KeyError, TypeError):
            old = {}
    t0 = time.time()
    wheels, keep_files = [], set()
    for i, pin in enumerate(pins, 1):
        rule = SLIM_RULES.get(pin.key)
        final = find_wheel(out, pin)
        reuse = final is not None and (
            (rule is None and final.name not in old)   # a plain wheel put there by hand or an older run
            or (final.name in old and old[final.name].get("sha256") == file_sha256(final)
                and old[final.name].get("rule") == (rule.label if rule else None)))
        if reuse:
            entry = dict(old.get(final.name) or {})
            entry.setdefault("pypi_bytes", final.stat().st_size)
            entry.setdefault("source", "reused")
            entry.update(name=pin.name, version=pin.version, file=final.name, bytes=final.stat().st_size,
                         sha256=file_sha256(final), rule=rule.label if rule else None)
            status = "reused"
        else:
            src, source = fetch_wheel(pin, cache)
            dst = out / src.name
            pypi_bytes = src.stat().st_size if source != "built from sdist" else None
            if final is not None and final != dst:
                final.unlink()
            if rule is not None:
                counts = slim_wheel(src, dst, rule)
                verify_record(dst)
            else:
                shutil.copyfile(src, dst)
                counts = None
            entry = {"name": pin.name, "version": pin.version, "file": dst.name, "bytes": dst.stat().st_size,
                     "sha256": file_sha256(dst), "pypi_bytes": pypi_bytes, "source": source,
                     "rule": rule.label if rule else None}
            if counts:
                entry["slimmed"] = counts
            status = source
        wheels.append(entry)
        keep_files.add(entry["file"])
        extra = ""
        if entry["rule"]:
            extra = f"  slimmed from {entry['pypi_bytes']:,} B by rule '{entry['rule']}'"
        print(f"[{i:2d}/{len(pins)}] {str(pin):50s} {entry['bytes']:>11,} B  {status}{extra}", flush=True)
    for p in sorted(out.glob("*.whl")):
        if p.name not in keep_files:
            print(f"removing {p.name} (not in {pins_path.name})")
            p.unlink()
    total = sum(w["bytes"] for w in wheels)
    pypi_total = sum(w["pypi_bytes"] or w["bytes"] for w in wheels)
    manifest = {
        "pins": str(Path(pins_path).resolve().relative_to(repo) if Path(pins_path).resolve().is_relative_to(repo)
                    else pins_path),
        "pins_sha256": file_sha256(Path(pins_path)),
        "python": PYTHON_VERSION, "abi": ABI, "platforms": list(PLATFORMS),
        "wheels": wheels, "count": len(wheels), "total_bytes": total, "total_pypi_bytes": pypi_total,
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"kit: {len(wheels)} wheels, {total:,} B ({total / MIB:.2f} MiB; {pypi_total:,} B before slimming)"
          f" in {out} [{time.time() - t0:.1f} s]; manifest {manifest_path.name}")
    ignored = _git_ignored(repo, out)
    if ignored is False:
        print(f"warning: {out} is inside the repository but not git-ignored: it travels as part of the checkout"
              " (counted once below); the kit is meant to be ignored and carried explicitly")
    res = size_check(repo, out, limit_mib)
    print(res["message"])
    return manifest


# ---- install / selftest --------------------------------------------------------------------------------

def installed_versions(site: Path) -> Dict[str, str]:
    found = {}
    for meta in list(Path(site).glob("*.dist-info/METADATA")):
        name = version = None
        with open(meta, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Name:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("Version:"):
                    version = line.split(":", 1)[1].strip()
                elif not line.strip():
                    break
        if name and version:
            found[canonical(name)] = version
    return found


def install(kit: Path, site: Path, pins_path: Optional[Path] = None) -> Path:
    kit, site = Path(kit).resolve(), Path(site).resolve()
    wheels = sorted(kit.glob("*.whl"))
    if not wheels:
        raise KitError(f"no wheels in {kit}: build the kit first (python3 scripts/gpu_kit.py build --out {kit})")
    manifest = kit / "kit.json"
    expected: Dict[str, Tuple[str, str]] = {}
    if manifest.exists():
        for w in json.loads(manifest.read_text())["wheels"]:
            expected[canonical(w["name"])] = (w["name"], w["version"])
    pins_path = pins_path or DEFAULT_PINS
    if Path(pins_path).exists():
        pins = {p.key: (p.name, p.version) for p in parse_pins(pins_path)}
        if expected and {k: v[1] for k, v in pins.items()} != {k: v[1] for k, v in expected.items()}:
            diff = sorted(set(pins.items()) ^ set(expected.items()))
            raise KitError(f"{kit} was built from other pins than {pins_path} (differences: {diff[:6]}): rebuild it")
        expected = expected or pins
    if not expected:
        raise KitError(f"neither {manifest} nor {pins_path} exists: nothing to verify the install against")
    site.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
    print(f"installing {len(wheels)} wheels from {kit} into {site}", flush=True)
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise KitError(f"pip install of the kit failed (rc {r.returncode}): {' '.join(cmd[:14])} ...")
    have = installed_versions(site)
    bad = []
    for key, (name, version) in sorted(expected.items()):
        got = have.get(key)
        if got is None:
            bad.append(f"{name}: missing")
        elif not same_version(got, version):
            bad.append(f"{name}: {got} installed, {version} pinned")
    if bad:
        raise KitError(f"after installing the kit into {site}: " + "; ".join(bad))
    print(f"installed and verified {len(expected)} distributions at their pinned versions in {time.time() - t0:.1f} s")
    print(f"export PYTHONPATH={site}:{REPO}")
    return site


def selftest(kit: Path, site: Path, args: List[str], pins_path: Optional[Path] = None) -> None:
    site = install(kit, site, pins_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["NEMO_BASIC_KIT"] = str(kit.resolve())  # the self-test reports the kit it ran on (kit.json's hash)
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_selftest.py"), *args]
    print(f"PYTHONPATH={env['PYTHONPATH']} {' '.join(cmd)}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


# ---- command line ---------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download and slim the wheels into DIR, write DIR/kit.json, size check")
    b.add_argument("--out", type=Path, default=DEFAULT_KIT, help="kit folder (default .kit/, git-ignored)")
    b.add_argument("--pins", type=Path, default=DEFAULT_PINS)
    b.add_argument("--limit-mib", type=float, default=DEFAULT_LIMIT_MIB,
                   help=f"checkout + kit must fit this (default {DEFAULT_LIMIT_MIB:g} MiB of the 64 MiB transfer)")
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"downloaded wheels (default {DEFAULT_CACHE})")
    for name, help_ in (("install", "pip install the kit into SITE (no network) and verify the versions"),
                        ("selftest", "install, then run scripts/gpu_selftest.py [-- ARGS] with PYTHONPATH=SITE:REPO")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--kit", type=Path, default=DEFAULT_KIT)
        s.add_argument("--site", type=Path, default=DEFAULT_SITE, help=f"default {DEFAULT_SITE}")
        s.add_argument("--pins", type=Path, default=DEFAULT_PINS)
    a = p.parse_args(argv)
    if passthrough and a.cmd != "selftest":
        p.error("arguments after '--' are only for selftest")
    try:
        if a.cmd == "build":
            build(a.pins, a.out, a.cache, a.limit_mib)
        elif a.cmd == "install":
            install(a.kit, a.site, a.pins)
        else:
            selftest(a.kit, a.site, passthrough, a.pins)
    except KitError as e:
        print(f"gpu_kit {a.cmd}: ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
