"""`RecipeNevaModel`: the Lightning module the recipes train (a module-level class, so that NeMo
can record it in a checkpoint's ``context/`` and rebuild it from there)."""
from __future__ import annotations

from typing import Optional

import torch

from nemo_basic import compat

compat.apply_nemo()

from nemo_basic.models.neva import BasicNevaModel  # noqa: E402


class RecipeNevaModel(BasicNevaModel):
    """`BasicNevaModel` that

    1. loads the pretrained Hugging Face LLM into the freshly built Megatron modules (the vision
       tower loads itself; the projector starts fresh) — skipped when a checkpoint is resumed or a
       stage-2 run starts from a stage-1 checkpoint, which overwrite the weights anyway;
    2. counts the tokens it is fed (text + image embeddings), for the throughput log.

    Args beyond NeVA's: ``pretrained`` = ``{"llm_dir": ...}`` (None: nothing to load, e.g. the
    tiny model), ``img_seq_len`` = image embeddings per image, ``init_seed`` = the tiny model's
    seed of `nemo_basic.models.tiny.layout_free_init` (None: Megatron's own initialisation).
    """

    def __init__(self, config, optim=None, tokenizer=None, model_transform=None,
                 pretrained: Optional[dict] = None, img_seq_len: int = 0, init_seed: Optional[int] = None):
        super().__init__(config, optim=optim, tokenizer=tokenizer, model_transform=model_transform)
        self.pretrained = pretrained
        self.img_seq_len = img_seq_len
        self.init_seed = init_seed
        self.tokens_seen = 0
        self.samples_seen = 0

    def configure_model(self, vp_stage: Optional[int] = None) -> None:
        fresh = not hasattr(self, "module")
        super().configure_model(vp_stage=vp_stage)
        if fresh and self.init_seed is not None:  # resuming or restoring overwrites these weights after
            from nemo_basic.models.tiny import layout_free_init

            layout_free_init(self.module, self.init_seed)
        if fresh and self.pretrained and self.pretrained.get("llm_dir"):
            trainer = getattr(self, "_trainer", None)
            resuming = trainer is not None and bool(getattr(trainer, "ckpt_path", None))
            restoring = trainer is not None and getattr(trainer.strategy, "restore_config", None) is not None
            if not (resuming or restoring):
                from nemo_basic.models import builder

                builder.load_hf_weights(self.module, self.pretrained["llm_dir"])

    def data_step(self, dataloader_iter):
        batch = next(dataloader_iter)
        b = batch[0] if isinstance(batch, tuple) and len(batch) == 3 else batch
        if isinstance(b, dict) and torch.is_tensor(b.get("tokens")):
            lengths = b.get("text_lengths")
            text = int(lengths.sum()) if torch.is_tensor(lengths) else b["tokens"].numel()
            media = b.get("media")
            images = int(media.shape[0]) if torch.is_tensor(media) else 0
            self.tokens_seen += text + images * max(0, self.img_seq_len - 1)
            self.samples_seen += int(b["tokens"].shape[0])
        return self.config.data_step_fn(iter([batch]))
