#!/usr/bin/env python
"""Launch BASIC stage 1 / stage 2 with NeMo-Run, on Slurm or locally (logic: nemo_basic/recipes/launch.py).

    python scripts/launch.py slurm --stage 1 --config conf/llava15_7b_stage1.yaml --nodes 2 \\
        --gpus-per-node 8 --account ACCT --partition batch --container nvcr.io/nvidia/nemo:25.11 \\
        --mount /lustre/models:/models --mount /lustre/data:/data --results /lustre/results --dry-run \\
        model.llm_path=/models/vicuna-7b-v1.5 model.vision_path=/models/clip-vit-large-patch14-336 \\
        data.path=/data/llava_stage1_shards
    python scripts/launch.py local --stage both --config conf/embedded_stage1.yaml --gpus-per-node 1
    python scripts/launch.py slurm --stage both --config conf/llava15_7b_stage1.yaml --account ACCT ... \
        model.llm_path=/models/vicuna-7b-v1.5 \
        --stage1 data.path=/data/llava_stage1_shards --stage2 data.path=/data/llava_stage2_shards
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from nemo_basic.recipes.launch import main

    sys.exit(main())
