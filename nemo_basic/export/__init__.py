"""Checkpoints between Hugging Face LLaVA and our NeMo 2 NeVA checkpoint.

* ``python -m nemo_basic.export import-hf --hf DIR --out CKPT``: HF ``LlavaForConditionalGeneration``
  directory → our checkpoint;
* ``python -m nemo_basic.export init-from-hf --llm DIR --vision DIR --out CKPT``: HF Llama-family
  LLM + HF CLIP / SigLIP / DINOv2 encoder + a fresh projector → the stage-1 starting checkpoint;
* ``python -m nemo_basic.export export-hf --checkpoint CKPT --out DIR``: our checkpoint (any TP/PP
  layout it was saved with) → an HF LLaVA directory that ``transformers`` (and vLLM for CLIP /
  SigLIP towers) loads offline.

"Our checkpoint" is a NeMo 2 checkpoint directory (Megatron distributed checkpoint + NeMo context)
plus ``nemo_basic.json``; see :mod:`nemo_basic.export.checkpoint` for the layout.
The submodules import NeMo; this package's ``__init__`` stays light (lazy attributes).
"""
from __future__ import annotations

import importlib

_API = {
    "import_hf_llava": "nemo_basic.export.hf",
    "init_from_hf": "nemo_basic.export.hf",
    "export_hf_llava": "nemo_basic.export.hf",
    "load_neva_from_checkpoint": "nemo_basic.export.hf",
    "load_hf_llava_weights": "nemo_basic.export.hf",
    "neva_config_from_hf_llava": "nemo_basic.export.hf",
    "load_checkpoint_weights": "nemo_basic.export.checkpoint",
    "load_checkpoint_context": "nemo_basic.export.checkpoint",
    "read_metadata": "nemo_basic.export.checkpoint",
    "save_neva_checkpoint": "nemo_basic.export.checkpoint",
    "CheckpointError": "nemo_basic.export.checkpoint",
    "ConversionError": "nemo_basic.export.llava",
    "hf_llava_to_mcore": "nemo_basic.export.llava",
    "mcore_to_hf_llava": "nemo_basic.export.llava",
    "hf_llava_config": "nemo_basic.export.llava",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'nemo_basic.export' has no attribute {name!r}")
