"""The venv's start-up hook (nemo_basic/export/torchvision_hook.py, installed by scripts/install.sh):
a fresh Python process of the venv that never imports nemo_basic loads transformers' LLaVA and
image-processor classes; the hook costs nothing at start-up and is what makes the import work."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SITE = Path(sysconfig.get_paths()["purelib"])

IMPORTS = """
import sys
from transformers import (AutoImageProcessor, AutoProcessor, BitImageProcessor, CLIPImageProcessor,
                          LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessor)
import torchvision.transforms
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('nemo_basic', 'megatron', 'nemo'))
assert loaded == ['nemo_basic.compat.torchvision_shim'], loaded
print('IMPORTED', LlavaForConditionalGeneration.__name__)
"""


def fresh_python(code: str, **env) -> subprocess.CompletedProcess:
    """The venv's interpreter in a directory outside the repository, with no PYTHONPATH."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NEMO_BASIC_TORCHVISION_HOOK")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd="/", env={**clean, "HF_HUB_OFFLINE": "1", **env})


def test_hook_is_installed_as_in_the_repository():
    from nemo_basic.export import torchvision_hook as hook

    installed = SITE / f"{hook.INSTALLED_NAME}.py"
    pth = SITE / "nemo_basic_torchvision_hook.pth"
    assert installed.is_file() and pth.is_file(), "run scripts/install.sh"
    assert installed.read_text() == (REPO / "nemo_basic/export/torchvision_hook.py").read_text(), \
        "the venv's hook is stale: run scripts/install.sh again"
    assert pth.read_text() == hook.PTH_LINE
    for path in (installed, pth):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_fresh_process_imports_llava_without_nemo_basic():
    proc = fresh_python(IMPORTS)
    assert proc.returncode == 0 and "IMPORTED LlavaForConditionalGeneration" in proc.stdout, proc.stderr[-3000:]


def test_without_the_hook_the_import_fails():
    """The negative control: the hook is what makes the import above work (PyPI's torchvision 0.28
    _C needs the CUDA torch libraries). Skipped where torchvision's own extension loads."""
    probe = fresh_python("import torch, importlib.util as u, os\n"
                         "p = os.path.join(os.path.dirname(u.find_spec('torchvision').origin), '_C.so')\n"
                         "torch.ops.load_library(p)", NEMO_BASIC_TORCHVISION_HOOK="0")
    if probe.returncode == 0:
        pytest.skip("torchvision's own extension loads here: the hook has nothing to do")
    proc = fresh_python(IMPORTS, NEMO_BASIC_TORCHVISION_HOOK="0")
    assert proc.returncode != 0 and "torchvision::nms" in proc.stderr, proc.stdout + proc.stderr[-3000:]


def test_start_up_imports_nothing_heavy():
    proc = fresh_python("import sys; print(sorted(m for m in ('torch', 'nemo_basic', 'transformers', "
                        "'nemo_basic.compat.torchvision_shim') if m in sys.modules)); "
                        "print(any(type(f).__name__ == 'TorchvisionShimFinder' for f in sys.meta_path))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "True"]
