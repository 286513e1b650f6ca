"""Start-up hook of the project's venv: ``import torchvision`` works without ``import nemo_basic``.

Why: PyPI's only torchvision build for torch 2.13 on Linux x86-64 (0.28.0) links its ``_C``
extension against the CUDA torch libraries (``libtorch_cuda.so``, ``libc10_cuda.so``,
``libcudart.so.13``); beside the CPU torch wheel it does not load, and ``import torchvision`` dies
in ``torchvision/_meta_registrations.py`` ("operator torchvision::nms does not exist"). PyTorch's
CPU builds live only on download.pytorch.org, not on PyPI. transformers imports torchvision for
its image processors, so ``from transformers import LlavaForConditionalGeneration`` failed in a
plain Python process of the venv — i.e. for anyone loading an exported model.

What: ``scripts/install.sh`` copies this file into the venv's site-packages as
``_nemo_basic_torchvision_hook.py`` and writes ``nemo_basic_torchvision_hook.pth`` (one line:
``import _nemo_basic_torchvision_hook``). At interpreter start-up that only appends a finder to
``sys.meta_path`` (no torch, no nemo_basic import: well under a millisecond). The first time
anything looks ``torchvision`` up (an import, or transformers' ``find_spec`` availability check),
the finder removes itself and calls ``nemo_basic.compat.torchvision_shim.apply()``, which defines
the two op schemas only when torchvision's own extension cannot be loaded, and is a no-op where
it loads (a matching CUDA or CPU build: the NGC container, a GPU machine). The shim's file is
executed on its own, under its own module name, so neither ``nemo_basic/__init__`` (the CPU
backend) nor Megatron / NeMo is imported. Set ``NEMO_BASIC_TORCHVISION_HOOK=0`` to switch it off.

The installed copy must equal this file (``tests/export/test_torchvision_hook.py`` checks it; run
``scripts/install.sh`` again after changing it).
"""
import os
import sys

ENV = "NEMO_BASIC_TORCHVISION_HOOK"
SHIM = "nemo_basic.compat.torchvision_shim"
INSTALLED_NAME = "_nemo_basic_torchvision_hook"
PTH_LINE = f"import {INSTALLED_NAME}\n"


def _load_shim():
    """The shim module, without importing its parent packages (``nemo_basic`` applies the CPU
    backend when imported; the shim needs only torch)."""
    import importlib.util

    spec = importlib.util.find_spec("nemo_basic")  # locates the package; does not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "compat", "torchvision_shim.py")
    if not os.path.isfile(path):
        return None
    shim_spec = importlib.util.spec_from_file_location(SHIM, path)
    module = importlib.util.module_from_spec(shim_spec)
    # Registered under its real name, so that a later `import nemo_basic` shares this module
    # (and its one torch.library registration) instead of executing the file a second time.
    sys.modules[SHIM] = module
    try:
        shim_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[SHIM]
        raise
    return module


class TorchvisionShimFinder:
    """A meta-path finder that finds nothing: it only runs the shim before torchvision is found."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        remove()
        if SHIM in sys.modules:
            # nemo_basic imported the shim and applies it itself (compat.apply() at import); this
            # lookup may be the shim's own find_spec inside that apply(): calling it here would
            # re-enter it.
            return None
        try:
            shim = _load_shim()
            if shim is not None:
                shim.apply()
        except Exception as exc:  # never break the import itself; say why torchvision may fail next
            import warnings

            warnings.warn(f"{__name__}: nemo_basic's torchvision shim was not applied: {exc!r}", RuntimeWarning,
                          stacklevel=2)
        return None  # the normal finders find torchvision


def remove() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TorchvisionShimFinder)]


def install() -> bool:
    """Add the finder (once); False when switched off or torchvision is already imported."""
    if os.environ.get(ENV, "1") == "0" or "torchvision" in sys.modules:
        return False
    if not any(isinstance(f, TorchvisionShimFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionShimFinder())  # before the path finder that finds it
    return True


if __name__ == INSTALLED_NAME:  # the copy in site-packages, imported by the .pth line
    install()
