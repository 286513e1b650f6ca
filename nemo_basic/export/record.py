"""What a served model needs from training, saved inside every training checkpoint.

A Lightning callback whose state (``state_dict()``) NeMo's checkpointing stores with each
checkpoint (Megatron distributed checkpoint, ``weights/common.pt`` → ``callbacks``), so
``export-hf`` finds it without flags:

* ``image_processor``: the image processor the data pipeline used (its class name and
  ``to_dict()``), e.g. DINOv2's processor resized to ``model.image_size`` = 112 px in the embedded
  default, where the tower's own directory holds the stock 224 px one;
* ``image_process_mode``: ``pad`` (LLaVA-1.5: pad to a square first) or ``crop``;
* ``template``: the prompt template of the training data (``plain`` / ``vicuna_v1``);
* ``max_position_embeddings``: the source LLM's context length (the training ``seq_length`` is
  only what training used).

The recipes add it in `nemo_basic.recipes.train.run` (one line: :func:`serving_callbacks`).
Imports Lightning: import it only where a run starts.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import lightning.pytorch as pl

FORMAT = "nemo_basic.serving"
VERSION = 1


class ServingRecord(pl.Callback):
    """Carries the serving facts into each checkpoint (plain constructor arguments, so NeMo can
    record the trainer in a checkpoint's ``context/``)."""

    def __init__(self, image_processor: Optional[dict] = None, template: Optional[str] = None,
                 max_position_embeddings: Optional[int] = None, image_process_mode: Optional[str] = None):
        super().__init__()
        self.image_process_mode = image_process_mode
        self.image_processor = image_processor
        self.template = template
        self.max_position_embeddings = max_position_embeddings

    def state_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "image_processor": self.image_processor,
                "template": self.template, "max_position_embeddings": self.max_position_embeddings,
                "image_process_mode": self.image_process_mode}

    def load_state_dict(self, state_dict: dict) -> None:
        """On resume the run's own settings stay (they are what the next checkpoints must carry)."""


def llm_max_position_embeddings(llm_dir: Optional[str]) -> Optional[int]:
    """``max_position_embeddings`` of an HF LLM directory's ``config.json`` (None if absent)."""
    if not llm_dir:
        return None
    path = os.path.join(os.fspath(llm_dir), "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    value = cfg.get("max_position_embeddings") or cfg.get("text_config", {}).get("max_position_embeddings")
    return int(value) if value else None


def serving_callbacks(cfg: Any, image_processor: Any, llm_dir: Optional[str]) -> list:
    """``[ServingRecord(...)]`` for a recipe run with an HF model; ``[]`` for the tiny model (no
    image processor, no HF export)."""
    if image_processor is None:
        return []
    from nemo_basic.models.vision import image_processor_dict

    return [ServingRecord(image_processor=image_processor_dict(image_processor), template=cfg.template,
                          max_position_embeddings=llm_max_position_embeddings(llm_dir),
                          image_process_mode=getattr(cfg.data, "image_process_mode", None))]


__all__ = ["FORMAT", "ServingRecord", "VERSION", "llm_max_position_embeddings", "serving_callbacks"]
