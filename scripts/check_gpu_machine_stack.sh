#!/usr/bin/env bash
# The repeatable gate before any run on the bare GPU machine. NOT part of CI: it downloads several GB
# (torch 2.11.0+cu130 and the machine's ~150 packages) and takes tens of minutes on a cold cache.
#
# It rebuilds the GPU machine's Python stack on this CPU machine (Python 3.12, torch 2.11.0,
# torchvision 0.26.0, transformers 5.17.0, ... and NO megatron-core / NeMo / Transformer Engine), builds
# the wheel kit that travels with the checkout (scripts/gpu_kit.py), then, with NO network, installs the
# kit into a fresh site dir and runs the self-test and the gpu_path tests exactly as the machine would:
# PYTHONPATH=SITE:REPO, the repository NOT installed.
#
#   bash scripts/check_gpu_machine_stack.sh               # all steps; log in docs/benchmarks/
#   bash scripts/check_gpu_machine_stack.sh --stack-only  # step (a) only (build/reuse the venv), no log file
#
# Environment: STACK_DIR (default ~/.cache/nemo_basic/gpu-machine-stack: venv/, site/, out/),
# PY312 (a Python 3.12 interpreter; default pyenv's 3.12.x, else python3.12), KIT_DIR (default REPO/.kit),
# OUT (default $STACK_DIR/out). Exit status: non-zero if any step failed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
STACK_DIR=${STACK_DIR:-$HOME/.cache/nemo_basic/gpu-machine-stack}
VENV=$STACK_DIR/venv
SITE=$STACK_DIR/site
OUT=${OUT:-$STACK_DIR/out}
KIT_DIR=${KIT_DIR:-$REPO/.kit}
REQ=$REPO/requirements/gpu-machine
# torch first, pinned: PyPI's torch 2.11.0 is the machine's build (2.11.0+cu130). numpy 2.5.2 (the
# machine's) is not on PyPI: 2.4.6 is the newest there.
BASE_PINS="torch==2.11.0 torchvision==0.26.0 numpy==2.4.6"
# Pulled in by today's resolution of packages.txt (typer, python-dateutil, pytest-benchmark...) but NOT in
# the machine's package list: removed so that the kit cannot lean on them.
NOT_ON_DEVICE="pydantic pydantic-core annotated-types typing-inspection tzdata py-cpuinfo2"
# On the machine but outside packages.txt (its nvidia-* filter): installed without dependencies.
NO_DEPS_EXTRA="nvidia-ml-py cuda-core"
RELEVANT="torch torchvision transformers tokenizers huggingface-hub lightning pytorch-lightning numpy megatron-core nemo-toolkit"

STACK_ONLY=0
case "${1:-}" in
  --stack-only) STACK_ONLY=1 ;;
  "") ;;
  -h|--help) sed -n 2,17p "$0"; exit 0 ;;
  *) echo "unknown argument: $1 (use --stack-only or nothing)" >&2; exit 2 ;;
esac

if [ "$STACK_ONLY" = 0 ]; then
  LOG=$REPO/docs/benchmarks/$(date +%F)-cpu-gpu_machine_stack.txt
  mkdir -p "$(dirname "$LOG")"
  : > "$LOG"
  exec > >(tee -a "$LOG") 2>&1
  TEE_PID=$!
fi

declare -a SUMMARY=()
FAILED=0
step_result() {  # name rc seconds
  local s="PASS"; [ "$2" -ne 0 ] && { s="FAIL (rc $2)"; FAILED=1; }
  SUMMARY+=("$(printf '%-34s %-12s %6ss' "$1" "$s" "$3")")
  echo "== $1: $s in $3 s"
}
now() { date +%s; }

echo "== check_gpu_machine_stack: $(date -Is) on $(hostname), repo $REPO @ $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (+uncommitted changes)')"
echo "== STACK_DIR=$STACK_DIR KIT_DIR=$KIT_DIR OUT=$OUT"

# ---- (a) the machine's stack: a Python 3.12 venv ---------------------------------------------------------
if [ -z "${PY312:-}" ]; then
  if command -v pyenv >/dev/null && ls -d "$(pyenv root)"/versions/3.12.* >/dev/null 2>&1; then
    PY312=$(ls -d "$(pyenv root)"/versions/3.12.* | sort -V | tail -1)/bin/python
  else
    PY312=$(command -v python3.12 || true)
  fi
fi
if [ -z "$PY312" ] || ! "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  echo "ERROR: no Python 3.12 interpreter (set PY312=/path/to/python3.12)"; exit 1
fi
PY=$VENV/bin/python
STAMP=$VENV/.gpu-machine-stack.stamp
WANT=$( { echo "$BASE_PINS|$NOT_ON_DEVICE|$NO_DEPS_EXTRA|$("$PY312" -V 2>&1)"; cat "$REQ/packages.txt" "$REQ/constraints.txt"; } | sha256sum | cut -d' ' -f1)
t0=$(now)
if [ -x "$PY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  echo "== (a) venv $VENV: the stamp matches the lists, install steps skipped"
  rc=0
else
  echo "== (a) building the machine's stack in $VENV with $PY312 ($("$PY312" -V 2>&1))"
  rm -f "$STAMP"
  (
    set -e
    [ -x "$PY" ] || "$PY312" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    "$PY" -m pip install $BASE_PINS
    "$PY" -m pip install -c "$REQ/constraints.txt" -r "$REQ/packages.txt"
    # shellcheck disable=SC2086
    "$PY" -m pip install --no-deps $NO_DEPS_EXTRA
    # shellcheck disable=SC2086
    "$PY" -m pip uninstall -y $NOT_ON_DEVICE
  )
  rc=$?
  [ "$rc" = 0 ] && echo "$WANT" > "$STAMP"
fi
step_result "(a) stack venv" "$rc" "$(( $(now) - t0 ))"
[ "$rc" = 0 ] || { echo "ERROR: the stack venv could not be built"; exit 1; }

print_versions() {  # the distributions in RELEVANT as the interpreter sees them with PYTHONPATH=$1
  (cd / && env PYTHONPATH="$1" "$PY" -s - $RELEVANT <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
for name in sys.argv[1:]:
    try:
        v = version(name)
    except PackageNotFoundError:
        v = "(absent)"
    print(f"   {name:20s} {v}")
EOF
  )
}
echo "== versions in the stack venv (megatron-core and nemo-toolkit must be absent):"
print_versions ""
# what the venv has that the machine's lists do not name (torch's own dependencies aside): a hint for
# NOT_ON_DEVICE when a list or an upstream dependency changes
"$PY" -I - "$REQ/packages.txt" "$REQ/constraints.txt" $NO_DEPS_EXTRA <<'EOF'
import re, sys
from importlib.metadata import distributions, requires
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
listed = set()
for f in sys.argv[1:3]:
    for line in open(f):
        line = line.split("#")[0].strip()
        if line:
            listed.add(norm(re.split(r"[<>=!~\[; ]", line)[0]))
listed |= {norm(n) for n in sys.argv[3:]} | {"pip"}
torch_deps = {norm(re.split(r"[<>=!~\[; ()]", r)[0]) for r in (requires("torch") or []) if "extra ==" not in r}
extra = sorted({norm(d.metadata["Name"]) for d in distributions()} - listed - torch_deps)
extra = [n for n in extra if not n.startswith(("nvidia-", "cuda-"))]
print("== installed but not named by the machine's lists (dependencies resolved today):", len(extra))
print("   " + " ".join(extra))
EOF
if [ "$STACK_ONLY" = 1 ]; then exit 0; fi

# ---- (b) the kit ---------------------------------------------------------------------------------------
t0=$(now)
echo "== (b) $PY scripts/gpu_kit.py build --out $KIT_DIR"
"$PY" scripts/gpu_kit.py build --out "$KIT_DIR"
rc=$?
step_result "(b) kit build + size check" "$rc" "$(( $(now) - t0 ))"
[ "$rc" = 0 ] || { echo "ERROR: the kit build or its size check failed"; }

# ---- (c) with no network: kit install, self-test, gpu_path tests ----------------------------------------
if [ "$rc" = 0 ]; then
  mkdir -p "$OUT"
  rm -rf "$SITE"
  if unshare -n true 2>/dev/null; then
    NONET=(unshare -n sh -c 'ip link set lo up && exec "$@"' sh)
    echo "== (c) running with NO network (unshare -n, loopback up)"
  else
    NONET=()
    echo "== (c) WARNING: 'unshare -n' is not permitted here (needs root or user namespaces):" \
         "running WITH the network; a hidden download would go unnoticed"
  fi
  # the repository must not be installed in the stack venv: the machine imports it from PYTHONPATH
  if "$PY" -I -m pip show -q nemo_basic >/dev/null 2>&1; then
    echo "ERROR: nemo_basic is installed in $VENV; the machine only has it on PYTHONPATH"; FAILED=1
  fi

  t0=$(now)
  "${NONET[@]}" "$PY" scripts/gpu_kit.py install --kit "$KIT_DIR" --site "$SITE"
  rc=$?
  step_result "(c1) kit install (no network)" "$rc" "$(( $(now) - t0 ))"
  echo "== versions with PYTHONPATH=$SITE:$REPO (the kit's in front of the machine's):"
  print_versions "$SITE:$REPO"

  if [ "$rc" = 0 ]; then
    t0=$(now)
    # the machine's one documented command: gpu_kit.py selftest = install (again, a few seconds) + exec
    # scripts/gpu_selftest.py with PYTHONPATH=SITE:REPO and PYTHONUNBUFFERED=1
    echo "== (c2) scripts/gpu_kit.py selftest --kit $KIT_DIR --site $SITE -- --cpu --out $OUT/gpu_selftest.json"
    "${NONET[@]}" "$PY" scripts/gpu_kit.py selftest --kit "$KIT_DIR" --site "$SITE" -- --cpu --out "$OUT/gpu_selftest.json"
    rc=$?
    step_result "(c2) gpu_selftest.py --cpu" "$rc" "$(( $(now) - t0 ))"

    t0=$(now)
    # No TORCH_CUDA_ARCH_LIST: with no GPU visible, nemo_basic.compat skips megatron-core's import-time
    # CUDA build (which raises IndexError in torch 2.11 without it); this step shows that it does.
    echo "== (c3) python -m pytest -q -m gpu_path -p no:cacheprovider (same environment)"
    env -u TORCH_CUDA_ARCH_LIST PYTHONPATH="$SITE:$REPO" PYTHONUNBUFFERED=1 \
      "${NONET[@]}" "$PY" -m pytest -q -m gpu_path -p no:cacheprovider ${PYTEST_ARGS:-}
    rc=$?
    step_result "(c3) pytest -m gpu_path" "$rc" "$(( $(now) - t0 ))"
  fi
fi

# ---- (d) summary -----------------------------------------------------------------------------------------
echo
echo "== summary ($(date -Is))"
for line in "${SUMMARY[@]}"; do echo "   $line"; done
[ -f "$OUT/gpu_selftest.json" ] && echo "   self-test report: $OUT/gpu_selftest.json"
[ -f "$KIT_DIR/kit.json" ] && echo "   kit manifest:     $KIT_DIR/kit.json"
echo "   log:              ${LOG#$REPO/}"
echo "== overall: $([ "$FAILED" = 0 ] && echo PASS || echo FAIL)"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit "$FAILED"
