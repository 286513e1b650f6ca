"""The torchvision shim defines its op schemas only where torchvision's own extension cannot load.

Where the extension loads (a matching build, as in the NGC container), a schema defined from
Python first makes the extension's static initialiser abort the process. These tests build a
stand-in `torchvision` package whose `_C` registers `torchvision::nms` exactly as the real one
does (`TORCH_LIBRARY_FRAGMENT`), show that the old order (Python DEF, then load) aborts, and
that `import nemo_basic` then `import torchvision` survives with the real extension, while a
package whose `_C` cannot load still gets the shim.
"""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

_FRAGMENT = textwrap.dedent("""
    #include <torch/library.h>
    TORCH_LIBRARY_FRAGMENT(torchvision, m) {
      m.def("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor");
      m.def("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor");
    }
""")

# What torchvision's __init__ does that matters here: load `_C` the way extension.py does, then
# require the op (torchvision/_meta_registrations.py registers a fake kernel for it).
_INIT = textwrap.dedent("""
    import os, torch
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(__file__), "_C.so"))
    except OSError:
        pass
    torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
""")


def _build(root, loadable: bool):
    import torch.utils.cpp_extension as ce

    pkg = root / "torchvision"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(_INIT)
    if not loadable:  # a library that dlopen rejects, like the CUDA-linked wheel beside CPU torch
        (pkg / "_C.so").write_bytes(b"\x7fELF not a real library")
        return root
    src = root / "frag.cpp"
    src.write_text(_FRAGMENT)
    cmd = ["g++", "-O0", "-shared", "-fPIC", "-std=c++17", "-w",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cmd += [f"-I{p}" for p in ce.include_paths()]
    cmd += [str(src)] + [f"-L{p}" for p in ce.library_paths()] + [f"-Wl,-rpath,{p}" for p in ce.library_paths()]
    cmd += ["-lc10", "-ltorch_cpu", "-o", str(pkg / "_C.so")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return root


@pytest.fixture(scope="module")
def loadable_tv(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("tv_loadable"), loadable=True)


@pytest.fixture(scope="module")
def broken_tv(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("tv_broken"), loadable=False)


def _python(code: str, path_first=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, NEMO_BASIC_TORCHVISION_HOOK="0")  # the venv's start-up hook stays out
    if path_first is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path_first), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_defining_the_schema_first_aborts_a_loadable_extension(loadable_tv):
    # The failure the shim must never cause: uncatchable, the process dies with SIGABRT.
    out = _python("""
        import torch
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
        print("survived")
    """, loadable_tv)
    assert out.returncode == -signal.SIGABRT, (out.returncode, out.stderr[-1500:])
    assert "survived" not in out.stdout


def test_shim_stays_out_where_the_extension_loads(loadable_tv):
    out = _python("""
        import nemo_basic, torchvision, torch
        from nemo_basic.compat import torchvision_shim as shim
        print(shim.active(), "torchvision_shim" in nemo_basic.ACTIVE_PATCHES, torchvision.__file__)
    """, loadable_tv)
    assert out.returncode == 0, out.stderr[-2000:]
    active, listed, where = out.stdout.split()[-3:]
    assert (active, listed) == ("False", "False")
    assert where.startswith(str(loadable_tv))


def test_shim_applies_where_the_extension_cannot_load(broken_tv):
    out = _python("""
        import nemo_basic, torchvision
        from nemo_basic.compat import torchvision_shim as shim
        print(shim.active(), "torchvision_shim" in nemo_basic.ACTIVE_PATCHES)
    """, broken_tv)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["True", "True"]


def test_real_torchvision_of_this_venv_needs_the_shim():
    # PyPI's torchvision here links CUDA torch: its `_C` does not load beside CPU torch.
    out = _python("""
        from nemo_basic.compat import torchvision_shim as shim
        import torchvision.transforms
        print(shim.active())
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == ("False" if torch.cuda.is_available() else "True")
