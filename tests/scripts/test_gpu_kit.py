"""scripts/gpu_kit.py without the network: slimming a synthetic wheel with the real rule code (the result is
a valid wheel that pip installs and whose kept module imports), rules that no longer fit their wheel fail
naming both, the checkout + kit size check against a tiny git repository, the pins parser, and `install`'s
version check."""
import base64
import csv
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_kit", REPO / "scripts" / "gpu_kit.py")
gpu_kit = importlib.util.module_from_spec(_spec)
sys.modules["gpu_kit"] = gpu_kit
_spec.loader.exec_module(gpu_kit)

MIB = 1024 * 1024


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(folder: Path, dist: str, version: str, files: dict) -> Path:
    """A wheel built by hand: files {path: bytes} plus METADATA, WHEEL and a correct RECORD."""
    di = f"{dist}-{version}.dist-info"
    files = dict(files)
    files[f"{di}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n\n".encode()
    files[f"{di}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    rows = [(p, _hash(d), str(len(d))) for p, d in files.items()] + [(f"{di}/RECORD", "", "")]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    files[f"{di}/RECORD"] = buf.getvalue().encode()
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for p, d in files.items():
            z.writestr(p, d)
    return path


def read_record(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        files = {n: z.read(n) for n in z.namelist() if not n.endswith("/")}
    record_name = next(n for n in files if n.endswith(".dist-info/RECORD"))
    rows = list(csv.reader(io.StringIO(files[record_name].decode())))
    return files, record_name, rows


def pip_target(wheel: Path, target: Path):
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=120)


DEMO_FILES = {
    "demo_pkg/__init__.py": b"VALUE = 42\n",
    "demo_pkg/keep.py": b"def answer():\n    return 'kept'\n",
    "demo_pkg/heavy/__init__.py": b"",
    "demo_pkg/heavy/blob.bin": os.urandom(4096),
    "demo_pkg/heavy/sub/more.bin": b"x" * 1000,
    "tests/test_demo.py": b"def test():\n    pass\n",
}


def test_slimmed_wheel_is_valid_installs_and_imports(tmp_path):
    src = make_wheel(tmp_path, "demo_pkg", "1.0", DEMO_FILES)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / src.name
    rule = gpu_kit.SlimRule(label="demo", why="test", drop=("demo_pkg/heavy/", "tests/"),
                            must_keep=("demo_pkg/keep.py",))
    counts = gpu_kit.slim_wheel(src, dst, rule)

    files, record_name, rows = read_record(dst)
    expected_kept = {"demo_pkg/__init__.py", "demo_pkg/keep.py", "demo_pkg-1.0.dist-info/METADATA",
                     "demo_pkg-1.0.dist-info/WHEEL", record_name}
    assert set(files) == expected_kept
    assert counts == {"files_kept": 4, "files_dropped": 4, "bytes_dropped": 4096 + 1000 + len(DEMO_FILES["tests/test_demo.py"])}
    # RECORD lists exactly the remaining files, each with its real sha256 and size, RECORD itself last and unhashed
    assert {r[0] for r in rows} == expected_kept
    assert rows[-1] == [record_name, "", ""]
    for path, digest, size in rows[:-1]:
        assert digest == _hash(files[path]) and int(size) == len(files[path]), path
    gpu_kit.verify_record(dst)   # the module's own checker agrees

    target = tmp_path / "site"
    proc = pip_target(dst, target)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (target / "demo_pkg" / "heavy").exists() and not (target / "tests").exists()
    imp = subprocess.run([sys.executable, "-c", "import demo_pkg, demo_pkg.keep; print(demo_pkg.VALUE, demo_pkg.keep.answer())"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(target)), cwd=str(tmp_path))
    assert imp.stdout.split() == ["42", "kept"], imp.stderr
    assert gpu_kit.installed_versions(target)["demo-pkg"] == "1.0"


def test_verify_record_catches_a_stale_record(tmp_path):
    src = make_wheel(tmp_path, "demo_pkg", "1.0", DEMO_FILES)
    bad = tmp_path / "bad" / src.name
    bad.parent.mkdir()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:   # drop a file, keep the old RECORD
        for n in zin.namelist():
            if n != "demo_pkg/keep.py":
                zout.writestr(n, zin.read(n))
    with pytest.raises(gpu_kit.KitError, match="RECORD and contents differ.*demo_pkg/keep.py"):
        gpu_kit.verify_record(bad)


def botocore_files(services=("s3", "sts", "ec2", "lambda")):
    files = {"botocore/__init__.py": b"__version__ = '1.0'\n", "botocore/session.py": b"S = 1\n"}
    for top in ("endpoints.json", "_retry.json", "sdk-default-configuration.json", "partitions.json"):
        files[f"botocore/data/{top}"] = b"{}"
    for svc in services:
        files[f"botocore/data/{svc}/2006-03-01/service-2.json.gz"] = os.urandom(512)
        files[f"botocore/data/{svc}/2006-03-01/paginators-1.json"] = b"{}"
    return files


def test_botocore_rule_keeps_s3_sts_and_the_top_level_data(tmp_path):
    src = make_wheel(tmp_path, "botocore", "1.0", botocore_files())
    dst = tmp_path / "slim" / src.name
    dst.parent.mkdir()
    gpu_kit.slim_wheel(src, dst, gpu_kit.SLIM_RULES["botocore"])
    files, _, _ = read_record(dst)
    data = sorted(n[len("botocore/data/"):] for n in files if n.startswith("botocore/data/"))
    assert data == ["_retry.json", "endpoints.json", "partitions.json",
                    "s3/2006-03-01/paginators-1.json", "s3/2006-03-01/service-2.json.gz",
                    "sdk-default-configuration.json",
                    "sts/2006-03-01/paginators-1.json", "sts/2006-03-01/service-2.json.gz"]
    assert "botocore/session.py" in files
    gpu_kit.verify_record(dst)


def test_rule_whose_paths_are_gone_fails_naming_wheel_and_rule(tmp_path):
    src = make_wheel(tmp_path, "demo_pkg", "1.0", DEMO_FILES)
    dst = tmp_path / "x.whl"
    with pytest.raises(gpu_kit.KitError) as e:
        gpu_kit.slim_wheel(src, dst, gpu_kit.SLIM_RULES["nemo-toolkit"])
    msg = str(e.value)
    assert "'nemo-toolkit'" in msg and src.name in msg
    assert "'scripts/' is not in the wheel" in msg and "'nemo/collections/asr/' is not in the wheel" in msg
    assert "'tests/' is not in the wheel" not in msg          # that one does match
    assert not dst.exists() and not dst.with_name(dst.name + ".part").exists()
    # botocore without its sts model: the kept folder is named
    src2 = make_wheel(tmp_path, "botocore", "1.0", botocore_files(services=("s3", "ec2")))
    with pytest.raises(gpu_kit.KitError, match=r"'botocore' does not fit botocore-1\.0-py3-none-any\.whl: "
                                               r"'botocore/data/sts/' \(kept\) is not in the wheel"):
        gpu_kit.slim_wheel(src2, tmp_path / "y.whl", gpu_kit.SLIM_RULES["botocore"])


def test_every_rule_is_keyed_by_canonical_name_and_pinned():
    pins = {p.key for p in gpu_kit.parse_pins(gpu_kit.DEFAULT_PINS)}
    assert set(gpu_kit.SLIM_RULES) == {"nemo-toolkit", "pulp", "botocore", "leptonai", "ledoc-ui"}
    assert set(gpu_kit.SLIM_RULES) <= pins
    assert gpu_kit.SDIST_ONLY <= pins
    assert {"transformers", "tokenizers", "huggingface-hub"} <= pins


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_size_check_counts_tracked_and_untracked_not_ignored(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_bytes(b"/.kit/\n*.log\n")            # 13 bytes, untracked, not ignored
    (repo / "pkg" / "a.py").write_bytes(b"a" * 1000)                # tracked
    _git(repo, "add", "pkg/a.py")
    (repo / "pkg" / "new.txt").write_bytes(b"n" * 500)              # untracked, not ignored
    (repo / "big.log").write_bytes(b"l" * 10_000)                   # ignored: does not travel
    (repo / "pkg" / "gone.py").write_bytes(b"g" * 300)              # tracked, then deleted from the work tree
    _git(repo, "add", "pkg/gone.py")
    (repo / "pkg" / "gone.py").unlink()
    kit = repo / ".kit"
    kit.mkdir()
    (kit / "a.whl").write_bytes(b"w" * 2000)
    (kit / "kit.json").write_bytes(b"{}" * 50)                      # 100 bytes

    assert gpu_kit.checkout_bytes(repo) == (1513, 3)
    ok = gpu_kit.size_check(repo, kit, limit_mib=1.0)
    assert (ok["checkout_bytes"], ok["kit_bytes"], ok["total_bytes"], ok["limit_bytes"]) == (1513, 2100, 3613, MIB)
    assert "size check OK" in ok["message"]

    limit_mib = 3000 / MIB                                          # 3,000 bytes < 3,613
    with pytest.raises(gpu_kit.KitError) as e:
        gpu_kit.size_check(repo, kit, limit_mib=limit_mib)
    msg = str(e.value)
    assert msg.startswith("SIZE CHECK FAILED")
    assert "checkout 1,513 B" in msg and "kit 2,100 B" in msg and "3,613 B" in msg and "(3,000 B)" in msg

    # a kit folder that is NOT ignored travels as part of the checkout: counted once, not twice
    (repo / ".gitignore").write_bytes(b"*.log\n")                  # 6 bytes now
    res = gpu_kit.size_check(repo, kit, limit_mib=1.0)
    assert (res["checkout_bytes"], res["kit_bytes"]) == (1506, 2100)


def test_build_cli_reports_the_size_failure(tmp_path):
    """`build` end to end with a pre-filled cache (no network): exit 1 and the message on an over-limit kit."""
    cache = tmp_path / "cache"
    cache.mkdir()
    make_wheel(cache, "demo_pkg", "1.0", DEMO_FILES)
    pins = tmp_path / "pins.txt"
    pins.write_text("# a comment\ndemo-pkg==1.0  # trailing comment\n")
    out = tmp_path / "kit"
    args = [sys.executable, str(REPO / "scripts" / "gpu_kit.py"), "build", "--out", str(out), "--pins", str(pins),
            "--cache", str(cache)]
    ok = subprocess.run(args + ["--limit-mib", "200"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "[ 1/1] demo-pkg==1.0" in ok.stdout and "size check OK" in ok.stdout
    manifest = json.loads((out / "kit.json").read_text())
    (w,) = manifest["wheels"]
    assert (w["name"], w["version"], w["rule"], manifest["count"]) == ("demo-pkg", "1.0", None, 1)
    assert w["bytes"] == (out / w["file"]).stat().st_size == manifest["total_bytes"]
    assert w["sha256"] == hashlib.sha256((out / w["file"]).read_bytes()).hexdigest()
    again = subprocess.run(args + ["--limit-mib", "200"], capture_output=True, text=True, timeout=60)
    assert "reused" in again.stdout                                      # idempotent: nothing fetched again
    over = subprocess.run(args + ["--limit-mib", "0.001"], capture_output=True, text=True, timeout=60)
    assert over.returncode == 1
    assert "SIZE CHECK FAILED" in over.stderr and "limit 0.001 MiB (1,048 B)" in over.stderr


def test_pins_parser(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# header\n\nPuLP==3.3.2\nnv-one-logger-core==2.3.1   # why\nopentelemetry-semantic-conventions==0.66b2\n")
    pins = gpu_kit.parse_pins(good)
    assert [(p.name, p.version, p.line, p.key) for p in pins] == [
        ("PuLP", "3.3.2", 3, "pulp"), ("nv-one-logger-core", "2.3.1", 4, "nv-one-logger-core"),
        ("opentelemetry-semantic-conventions", "0.66b2", 5, "opentelemetry-semantic-conventions")]
    for bad_line in ("requests>=2.0", "requests", "torch==2.11.*", "foo[bar]==1.0", "x==1.0; python_version<'3.13'"):
        bad = tmp_path / "bad.txt"
        bad.write_text(f"# header\nfiddle==0.3.1\n{bad_line}\n")
        with pytest.raises(gpu_kit.KitError, match=rf"^{bad}:3: not an exact pin"):
            gpu_kit.parse_pins(bad)
    dup = tmp_path / "dup.txt"
    dup.write_text("Pulp==3.3.2\npulp==3.3.2\n")
    with pytest.raises(gpu_kit.KitError, match=rf"{dup}:2: pulp is pinned twice \(first at line 1\)"):
        gpu_kit.parse_pins(dup)
    # the project's own pins file parses, with the counts the kit expects
    assert len(gpu_kit.parse_pins(gpu_kit.DEFAULT_PINS)) == 71


def test_install_verifies_versions(tmp_path):
    kit = tmp_path / "kit"
    kit.mkdir()
    make_wheel(kit, "demo_pkg", "1.0", DEMO_FILES)
    (kit / "kit.json").write_text(json.dumps({"wheels": [{"name": "demo-pkg", "version": "1.0"}]}))
    pins = tmp_path / "pins.txt"
    pins.write_text("demo-pkg==1.0\n")
    site = gpu_kit.install(kit, tmp_path / "site", pins)
    assert (site / "demo_pkg" / "heavy" / "blob.bin").stat().st_size == 4096
    pins.write_text("demo-pkg==2.0\n")
    with pytest.raises(gpu_kit.KitError, match=r"built from other pins"):
        gpu_kit.install(kit, tmp_path / "site2", pins)
    (kit / "kit.json").write_text(json.dumps({"wheels": [{"name": "demo-pkg", "version": "2.0"}]}))
    with pytest.raises(gpu_kit.KitError, match=r"demo-pkg: 1\.0 installed, 2\.0 pinned"):
        gpu_kit.install(kit, tmp_path / "site3", pins)
