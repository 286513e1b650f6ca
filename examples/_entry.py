"""What both example scripts do: the console filter first (loaded from its file, before the package
and its imports of torch, Megatron and NeMo print anything), then the recipe command line."""
from __future__ import annotations

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install_console() -> None:
    spec = importlib.util.spec_from_file_location("_nemo_basic_console", os.path.join(REPO, "nemo_basic", "console.py"))
    console = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = console
    spec.loader.exec_module(console)
    console.install()


def run(stage: int, doc: str, argv=None, console: bool = True) -> int:
    """The recipe command line of ``stage`` (``doc``: the script's docstring, for --help)."""
    if console:
        install_console()
    sys.path.insert(0, REPO)
    from nemo_basic.recipes.cli import main

    return main(stage, argv, description=doc.split("\n\n")[0])
