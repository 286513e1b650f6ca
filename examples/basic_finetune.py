#!/usr/bin/env python
"""BASIC stage 2 (instruction tuning): the projector and the LLM train, starting from a stage-1
checkpoint, with the LM loss on the answers and BASIC's direct visual supervision.

With no arguments it continues the embedded default of examples/basic_pretrain.py (the stage-1
checkpoint in runs/embedded/stage1/) on the embedded instruction data, on the CPU. The paper's
recipes:

    python examples/basic_finetune.py --config conf/llava15_7b_stage2.yaml \\
        model.llm_path=/models/vicuna-7b-v1.5 model.vision_path=/models/clip-vit-large-patch14-336 \\
        data.path=/data/llava665k_shards

``checkpoint.init_from`` picks the stage-1 checkpoint (auto: the same run's stage1 folder).
Run again after an interruption and it resumes from the last stage-2 checkpoint.
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

    return cli_main(2, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    _quiet_console()
    sys.exit(main())
