"""Test-suite set-up: offline, deterministic, CPU backend selected before anything imports Megatron."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import nemo_basic  # noqa: E402,F401  (applies the CPU backend where CUDA is absent)
