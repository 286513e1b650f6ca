"""``AlignmentMonitor``: watch alignment form during training, beside the losses.

Every ``every_n_steps`` optimizer steps (and at the last step) the callback runs the vision tower
and the projector of the model being trained on a fixed probe set of fresh labelled synthetic
scenes (:mod:`nemo_basic.analysis.scenes`, made once at the start at the model's image size and
patch grid), maps each patch's V to its nearest tokens in the model's own (vocab-parallel)
embedding table over the true vocabulary, and logs the layer-0 metrics
(:mod:`nemo_basic.analysis.metrics`) as ``analysis/layer0/<metric>`` to the trainer's loggers
(TensorBoard), as a row ``{"step", "analysis": {...}}`` in ``<run_dir>/recipe/metrics.jsonl`` and on
the console, and writes ``<run_dir>/recipe/analysis/step<N>.json`` (the probe set's token ids and
texts) and, with ``pictures``, the lens picture of the first scene (``step<N>.png``, also sent to
TensorBoard as an image).

Parallelism: the ranks that hold the vision tower (the first pipeline stage) compute; under tensor
parallelism each rank scores its vocabulary shard and the per-shard top-k lists are all-gathered
and merged (:func:`nemo_basic.analysis.nearest.merge_topk`), so every TP layout gives the same
tokens. Rank 0 writes and logs. Constructor arguments are plain values (NeMo records the trainer).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from nemo_basic.analysis import metrics as M
from nemo_basic.analysis.nearest import TokenTable, merge_topk

TOP_K = 5
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def visual_embeddings(mcore, pixels: torch.Tensor) -> torch.Tensor:
    """V [m, n_images, h] of a Megatron NeVA module for ``pixels`` [n, 3, H, W]: the vision tower's
    selected hidden state, class token dropped, through the projector (as NeVA's forward does)."""
    config = mcore.config
    param = next(mcore.vision_model.parameters())
    images = pixels.to(device=param.device, dtype=param.dtype)
    if getattr(mcore, "vision_model_from_hf", False):
        emb = mcore.vision_model(images, output_hidden_states=True)[-1][config.vision_feature_layer]
    else:
        emb = mcore.vision_model(images, num_unused_layers=-config.vision_feature_layer - 1)
    if getattr(mcore, "_drop_vision_class_token", False):
        emb = emb[:, getattr(mcore.vision_model, "class_token_len", 1):, :]
    return mcore.vision_projection(emb.permute(1, 0, 2).contiguous())


def _hf_tokenizer(tokenizer):
    inner = getattr(tokenizer, "tokenizer", None)
    return inner if inner is not None and hasattr(inner, "decode") else (tokenizer if hasattr(tokenizer, "decode")
                                                                          else None)


def _base():
    import lightning.pytorch as pl

    return pl.Callback


class AlignmentMonitor(_base()):
    """See the module docstring. ``max_steps``: the run's last step (always analysed)."""

    def __init__(self, every_n_steps: int, max_steps: int, run_dir: str, scenes: int = 8, seed: int = 0,
                 pictures: bool = True, stage: int = 1):
        super().__init__()
        if every_n_steps is None or every_n_steps < 1:
            raise ValueError(f"analysis.every_n_steps = {every_n_steps!r}: expected an integer >= 1")
        self.every, self.max_steps, self.run_dir = int(every_n_steps), int(max_steps), run_dir
        self.num_scenes, self.seed, self.pictures, self.stage = int(scenes), int(seed), bool(pictures), stage
        self.history: list = []
        self._ready = False
        self._active = False
        self._done = set()

    # -- set-up -----------------------------------------------------------------------------------
    def _processor(self, pl_module):
        vision = pl_module.config.vision_transformer_config
        if hasattr(vision, "image_size") and hasattr(vision, "image_processor"):  # HF tower
            from nemo_basic.models.vision import image_processor_for, processor_image_size

            proc = image_processor_for(vision)
            return proc, int(processor_image_size(proc) or vision.image_size)
        return None, int(getattr(vision, "img_h"))

    def _pixels(self, images) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        import numpy as np

        x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]))
        x = x.permute(0, 3, 1, 2)
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def setup_probe(self, pl_module) -> None:
        from megatron.core import parallel_state as ps

        from nemo_basic.analysis.scenes import make_scenes
        from nemo_basic.models.builder import mcore_neva_module

        self._ready = True
        mcore = mcore_neva_module(pl_module)
        self.mcore = mcore
        self._active = bool(getattr(mcore, "add_encoder", False)) and mcore.vision_model is not None \
            and getattr(mcore, "pre_process", True)
        if not self._active:
            return
        self.processor, self.image_size = self._processor(pl_module)
        m = int(getattr(mcore, "_img_seq_len", 0))
        side = int(round(m ** 0.5))
        if side * side != m:
            raise ValueError(f"analysis: the model sees {m} patches per image, not a square grid")
        self.grid = side
        self.scenes = make_scenes(self.num_scenes, self.image_size, side, seed=self.seed)
        self.pixel_values = self._pixels([s["image"] for s in self.scenes])
        tok = pl_module.tokenizer
        self.tokenizer = _hf_tokenizer(tok)
        self.vocab_size = int(getattr(tok, "vocab_size", None) or len(self.tokenizer))
        self.exclude = []
        if self.tokenizer is not None:
            image_id = self.tokenizer.get_vocab().get("<image>") if hasattr(self.tokenizer, "get_vocab") else None
            if image_id is not None:
                self.exclude.append(int(image_id))
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self._texts = {}

    def text(self, i: int) -> str:
        t = self._texts.get(i)
        if t is None:
            t = self.tokenizer.decode([i]) if self.tokenizer is not None else f"<{i}>"
            self._texts[i] = t
        return t

    # -- the analysis -----------------------------------------------------------------------------
    def nearest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, cos) [n_scenes, m, k] of the probe set's V (all TP ranks of the first stage call it)."""
        mcore = self.mcore
        was = {mod: mod.training for mod in (mcore.vision_model, mcore.vision_projection)}
        try:
            for mod in was:
                mod.eval()
            with torch.no_grad():
                v = visual_embeddings(mcore, self.pixel_values)             # [m, n, h]
        finally:
            for mod, flag in was.items():
                mod.train(flag)
        weight = mcore.language_model.embedding.word_embeddings.weight     # this rank's vocabulary rows
        rows = weight.shape[0]
        offset = self.tp_rank * rows
        ids_global = torch.arange(offset, offset + rows)
        valid = ids_global < self.vocab_size
        for i in self.exclude:
            valid &= ids_global != i
        out_ids, out_cos = [], []
        if bool(valid.any()):
            table = TokenTable(weight, valid, offset=offset)
        for j in range(v.shape[1]):
            if bool(valid.any()):
                ids, cos = table.topk(v[:, j], TOP_K)
            else:  # a shard with padding rows only
                ids = torch.full((v.shape[0], TOP_K), -1, dtype=torch.long)
                cos = torch.full((v.shape[0], TOP_K), float("-inf"), dtype=torch.float64)
            out_ids.append(ids)
            out_cos.append(cos)
        ids, cos = torch.stack(out_ids), torch.stack(out_cos)                 # [n, m, k]
        if self.tp > 1:
            from megatron.core import parallel_state as ps

            group = ps.get_tensor_model_parallel_group()
            dev = weight.device
            all_ids = [torch.empty_like(ids, device=dev) for _ in range(self.tp)]
            all_cos = [torch.empty_like(cos, device=dev) for _ in range(self.tp)]
            torch.distributed.all_gather(all_ids, ids.to(dev), group=group)
            torch.distributed.all_gather(all_cos, cos.to(dev), group=group)
            merged = [merge_topk(torch.stack([a[j].cpu() for a in all_ids]), torch.stack([c[j].cpu() for c in all_cos]),
                                 TOP_K) for j in range(ids.shape[0])]
            ids = torch.stack([m[0] for m in merged])
            cos = torch.stack([m[1] for m in merged])
        return ids, cos

    def analyse(self, step: int, trainer=None) -> Optional[dict]:
        ids, cos = self.nearest()
        rank0 = trainer is None or trainer.global_rank == 0
        if not rank0:
            return None
        per_image, images = [], []
        for j, scene in enumerate(self.scenes):
            top = ids[j].tolist()
            first = [row[0] for row in top]
            texts = [self.text(i) for i in first]
            top5 = [[self.text(i) for i in row] for row in top]
            per_image.append(M.image_metrics(texts, scene["labels"], top5, ids=first))
            images.append({"grid": [self.grid, self.grid], "token_ids": {"0": first}, "tokens": {"0": texts},
                           "top5_ids": {"0": top}, "labels": scene["labels"],
                           "grounded_patches": {"0": [M.names(t, lab) for t, lab in zip(texts, scene["labels"])]}})
        metrics = M.combine(per_image)
        out_dir = os.path.join(self.run_dir, "recipe", "analysis")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"step{step}.json"), "w", encoding="utf-8") as f:
            json.dump({"step": step, "layers": [0], "images": images, "metrics": {"0": metrics},
                       "scenes": {"num": self.num_scenes, "seed": self.seed, "image_size": self.image_size}}, f,
                      ensure_ascii=False)
        picture = None
        if self.pictures:
            from nemo_basic.analysis.render import render_image

            picture = render_image(self.scenes[0]["image"], images[0], [0], os.path.join(out_dir, f"step{step}.png"),
                                   title=f"step {step}: probe scene 0")
        scalars = {f"analysis/layer0/{k}": float(metrics[k]) for k in
                   ("meaningful", "grounded", "grounded_top5", "distinct_per_image", "top_token_share")
                   if metrics.get(k) is not None}
        row = {"step": step, "analysis": {"layer": 0, **{k.rsplit("/", 1)[1]: v for k, v in scalars.items()}}}
        self.history.append(row)
        with open(os.path.join(self.run_dir, "recipe", "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if trainer is not None:
            for logger in getattr(trainer, "loggers", []) or []:
                try:
                    logger.log_metrics(scalars, step=step)
                    exp = getattr(logger, "experiment", None)
                    if picture is not None and hasattr(exp, "add_image"):
                        import numpy as np
                        from PIL import Image

                        exp.add_image("analysis/lens_scene0", np.asarray(Image.open(picture).convert("RGB")), step,
                                      dataformats="HWC")
                except Exception as e:  # noqa: BLE001 - a logger's failure must not stop training
                    print(f"[nemo_basic] analysis: logging to {type(logger).__name__} failed: {e}", flush=True)
        g = metrics["grounded"]
        line = (f"[stage {self.stage}] analysis step {step}: layer 0 meaningful {metrics['meaningful']:.3f}, grounded "
                f"{'-' if g is None else f'{g:.3f}'}, distinct/image {metrics['distinct_per_image']:.1f}, "
                f"top-token share {metrics['top_token_share']:.3f}")
        print(line, flush=True)
        return row

    # -- Lightning hooks --------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        if not self._ready:
            self.setup_probe(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in self._done or not (step % self.every == 0 or step == self.max_steps):
            return
        self._done.add(step)
        if not self._ready:
            self.setup_probe(pl_module)
        if self._active:
            self.analyse(step, trainer)


__all__ = ["AlignmentMonitor", "visual_embeddings"]
