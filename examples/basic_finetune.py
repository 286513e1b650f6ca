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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under runpy / another cwd
from _entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(2, __doc__))
