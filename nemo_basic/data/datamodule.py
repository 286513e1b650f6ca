"""Training-time reader: prepared shards -> NeVA batches, as a NeMo 2 data module.

The batch (what ``nemo.collections.vlm.neva.model.base.neva_data_step`` / ``neva_forward_step``
consume; B = micro-batch size, T = padded text length, N = images in the micro-batch)::

    tokens          int64   [B, T]  text ids; each image is ONE id -200 (IMAGE_TOKEN_INDEX),
                                    padding id ``pad_token_id`` (0, as NeVA)
    labels          int64   [B, T]  next-token targets (labels[i] = id at i+1), -100 where unsupervised
    loss_mask       float32 [B, T]  1.0 where labels are supervised, else 0.0
    position_ids    int64   [B, T]  0..T-1 per row
    attention_mask  None            the LLM applies its causal mask (as NeVA's mock data)
    media           float32 [N, 3, H, W]  the micro-batch's images in sample order, then placeholder
                                    order; N = number of -200 in ``tokens``; text-only samples add none
                                    (N may be 0: shape [0, 3, H, W])
    num_media_tiles int32   [N]     1 per image (no tiling)
    text_lengths    int64   [B]     unpadded length of each row of ``tokens`` (not used by NeVA;
                                    BASIC's text rows exclude padding)
    sample_ids      list[str]       the records' ids (not used by NeVA)

NeVA's own model contract, which this honours: every -200 in ``tokens`` has exactly one image in
``media`` (``_preprocess_data`` splits ``num_image_tiles`` by the placeholder count), and the
combined length ``T_real + images * (img_seq_len - 1)`` of each row fits ``seq_length`` (the
text is cut on the RIGHT, see `templates.shift_and_truncate`). An all-zero image for text-only
samples, as LLaVA's original trainer feeds, would break that contract, so none is added.

Order and resume: the data set maps sample ``i`` to record ``perm_e[i mod n]`` with
``perm_e`` a permutation drawn from ``numpy.random.default_rng([seed, e])`` for epoch
``e = i // n``; NeMo's ``MegatronDataSampler`` (type ``single``) walks ``i`` from the number of
consumed samples, which the data module saves in checkpoints (``state_dict``) and restores
(``load_state_dict``), so a resumed run sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import functools
import logging
import tarfile
from typing import Any, Dict, List, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from nemo_basic.data.image import (
    decode_image_bytes,
    preprocess_image,
    processed_image_shape,
    unwrap_image_processor,
)
from nemo_basic.data.reader import PreparedShards
from nemo_basic.data.templates import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    shift_and_truncate,
    tokenize_conversation,
    unwrap_tokenizer,
)

log = logging.getLogger(__name__)

# What a damaged shard raises when a sample is read or decoded: tarfile's TarError / ReadError, PIL's
# UnidentifiedImageError and truncated images (OSError), broken JSON (ValueError), missing parts (KeyError).
CORRUPT_SAMPLE_ERRORS = (OSError, EOFError, ValueError, KeyError, SyntaxError, tarfile.TarError)


class SampleEncoder:
    """One prepared sample -> ``{"tokens", "labels", "loss_mask", "media", "id", "truncated"}``."""

    def __init__(self, tokenizer: Any, image_processor: Any, *, template: str, seq_length: int,
                 img_seq_len: int = 576, image_process_mode: str = "pad"):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
        if seq_length <= img_seq_len:
            raise ValueError(f"seq_length ({seq_length}) must exceed the image sequence length ({img_seq_len})")
        self.tokenizer = unwrap_tokenizer(tokenizer)
        self.image_processor = unwrap_image_processor(image_processor)
        self.template = template
        self.seq_length = seq_length
        self.img_seq_len = img_seq_len
        self.image_process_mode = image_process_mode
        self.image_shape = processed_image_shape(self.image_processor)

    def __call__(self, raw: dict) -> dict:
        meta = raw["meta"]
        where = f"sample id={meta.get('id')!r} ({raw.get('shard')}, key {raw.get('key')})"
        try:
            tok = tokenize_conversation(meta["conversations"], self.template, self.tokenizer)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if tok.num_images != len(raw["images"]):
            raise ValueError(f"{where}: {tok.num_images} image placeholder(s) but {len(raw['images'])} image(s)")
        sh = shift_and_truncate(tok, self.seq_length, self.img_seq_len)
        if sh.num_images:
            media = torch.stack([
                preprocess_image(decode_image_bytes(b), self.image_processor, self.image_process_mode)
                for b in raw["images"][: sh.num_images]
            ])
        else:
            media = torch.zeros((0, *self.image_shape), dtype=torch.float32)
        labels = torch.tensor(sh.labels, dtype=torch.long)
        return {
            "tokens": torch.tensor(sh.tokens, dtype=torch.long),
            "labels": labels,
            "loss_mask": (labels != IGNORE_INDEX).to(torch.float32),
            "media": media,
            "id": str(meta.get("id")),
            "truncated": sh.truncated,
        }


def collate_batch(instances: Sequence[dict], *, image_shape: Sequence[int], pad_to: Optional[int] = None,
                  pad_token_id: int = 0) -> Dict[str, Any]:
    """Pad to the longest row (or to ``pad_to``, e.g. ``seq_length`` under pipeline parallelism)."""
    lengths = [int(x["tokens"].shape[0]) for x in instances]
    width = max(lengths)
    if pad_to is not None:
        if width > pad_to:
            raise ValueError(f"a row has {width} tokens, more than pad_to={pad_to}")
        width = pad_to
    b = len(instances)
    tokens = torch.full((b, width), pad_token_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    loss_mask = torch.zeros((b, width), dtype=torch.float32)
    for r, (x, n) in enumerate(zip(instances, lengths)):
        tokens[r, :n] = x["tokens"]
        labels[r, :n] = x["labels"]
        loss_mask[r, :n] = x["loss_mask"]
    media = [x["media"] for x in instances if x["media"].shape[0] > 0]
    media = torch.cat(media, dim=0) if media else torch.zeros((0, *image_shape), dtype=torch.float32)
    n_placeholders = int((tokens == IMAGE_TOKEN_INDEX).sum())
    if n_placeholders != media.shape[0]:
        raise AssertionError(f"{n_placeholders} image placeholders but {media.shape[0]} images in the batch")
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": torch.arange(width, dtype=torch.long).unsqueeze(0).expand(b, width).contiguous(),
        "attention_mask": None,
        "media": media,
        "num_media_tiles": torch.ones(media.shape[0], dtype=torch.int32),
        "text_lengths": torch.tensor(lengths, dtype=torch.long),
        "sample_ids": [x["id"] for x in instances],
    }


class LlavaShardDataset(Dataset):
    """Map-style data set over prepared shards: ``len`` = ``num_samples`` (default one epoch);
    sample ``i`` is record ``perm_{i // n}[i % n]`` (seeded per-epoch permutations) or ``i % n``
    without shuffling."""

    def __init__(self, samples: PreparedShards, encoder: SampleEncoder, *, num_samples: Optional[int] = None,
                 seed: int = 1234, shuffle: bool = True, pad_to: Optional[int] = None, pad_token_id: int = 0,
                 max_bad_share: float = 0.001):
        self.samples = samples
        self.max_bad_share = max_bad_share
        self.bad: list = []  # (record, shard, key, reason) met by this process
        self.encoder = encoder
        self.n = len(samples)
        self.num_samples = self.n if num_samples is None else int(num_samples)
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}
        self.collate_fn = functools.partial(collate_batch, image_shape=encoder.image_shape, pad_to=pad_to,
                                            pad_token_id=pad_token_id)

    def __len__(self) -> int:
        return self.num_samples

    def _perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            if len(self._perms) > 2:
                self._perms.clear()
            p = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perms[epoch] = p
        return p

    def record_index(self, i: int) -> int:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range (0..{self.num_samples - 1})")
        epoch, pos = divmod(int(i), self.n)
        return int(self._perm(epoch)[pos]) if self.shuffle else pos

    def __getitem__(self, i: int) -> dict:
        """Sample ``i``; a corrupt record (unreadable tar member, undecodable image, broken JSON) is
        skipped, reported with its key and shard, and replaced by the next record of the set (the
        same replacement in every run, so resuming stays exact). More corrupt records than
        ``max_bad_share`` of the set, met by one process, stop the run."""
        first = self.record_index(i)
        for step in range(self.n):
            j = (first + step) % self.n
            raw = None
            try:
                raw = self.samples[j]
                return self.encoder(raw)
            except CORRUPT_SAMPLE_ERRORS as e:
                self._skip(j, raw, e)
        raise RuntimeError(f"every record of {self.samples.paths} is corrupt")

    def _skip(self, j: int, raw: Optional[dict], e: BaseException) -> None:
        import os
        import sys

        k, pos = self.samples.locate(j)
        shard = raw["shard"] if raw else os.path.basename(self.samples.shard_paths[k])
        key = raw["key"] if raw else f"sample {pos} of the shard"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        self.bad.append((j, shard, key, reason))
        print(f"[nemo_basic.data] skipped a corrupt sample: key {key} in {shard} "
              f"({os.path.dirname(self.samples.shard_paths[k])}): {reason} "
              f"[{len(self.bad)} skipped by this data process]", file=sys.stderr, flush=True)
        if len(self.bad) > self.max_bad_share * self.n:
            raise RuntimeError(
                f"{len(self.bad)} corrupt samples out of {self.n} records (more than data.max_bad_sample_share = "
                f"{self.max_bad_share:g}); the last: key {key} in {shard}: {reason}. Check the shards "
                f"(or reconvert with scripts/prepare_llava_data.py --overwrite)")


class LlavaDataModule(pl.LightningDataModule):
    """NeMo 2 data module over shards written by ``scripts/prepare_llava_data.py``.

    Args:
        paths: prepared folder(s) (their ``train`` splits are concatenated).
        tokenizer: the LLM's fast HF tokenizer (or NeMo's AutoTokenizer wrapping one).
        image_processor: the vision tower's HF image processor (or a processor holding one, or a
            local path for ``AutoImageProcessor``).
        template: ``plain`` (stage 1) or ``vicuna_v1`` (stage 2).
        seq_length: the LLM's sequence length (text + image embeddings).
        num_image_embeddings_per_tile: embeddings per image after the projector (576 for
            CLIP ViT-L/14-336 without the class token); must equal the model's ``img_seq_len``.
        pad_to_seq_length: pad every micro-batch to ``seq_length`` text tokens (fixed shapes for
            pipeline parallelism; the model pads/cuts its combined sequence to ``seq_length``
            itself) instead of to the longest row.
        num_train_samples: length of the training stream; default: ``trainer.max_steps * gbs``
            when a trainer with ``max_steps > 0`` is attached (epochs repeat with fresh
            permutations), else one epoch.
        val_paths: folder(s) for validation (unshuffled); default: the training folders.
    """

    def __init__(
        self,
        paths: str | Sequence[str],
        tokenizer: Any,
        image_processor: Any,
        *,
        template: str = "plain",
        seq_length: int = 2048,
        decoder_seq_length: Optional[int] = None,
        num_image_embeddings_per_tile: int = 576,
        micro_batch_size: int = 4,
        global_batch_size: int = 8,
        rampup_batch_size: Optional[List[int]] = None,
        num_train_samples: Optional[int] = None,
        val_paths: Optional[str | Sequence[str]] = None,
        num_val_samples: Optional[int] = None,
        seed: int = 1234,
        shuffle: bool = True,
        pad_to_seq_length: bool = False,
        pad_token_id: int = 0,
        image_process_mode: str = "pad",
        num_workers: int = 2,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = False,
        max_bad_sample_share: float = 0.001,
    ):
        super().__init__()
        import nemo_basic

        nemo_basic.compat.apply_nemo()
        from nemo.lightning.pytorch.plugins import MegatronDataSampler

        as_list = lambda p: [p] if isinstance(p, str) else list(p)  # noqa: E731
        self.paths = as_list(paths)
        self.val_paths = self.paths if val_paths is None else as_list(val_paths)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.seq_length = seq_length
        self.decoder_seq_length = decoder_seq_length
        self.num_image_embeddings_per_tile = num_image_embeddings_per_tile
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.num_train_samples = num_train_samples
        self.num_val_samples = num_val_samples
        self.seed = seed
        self.shuffle = shuffle
        self.pad_to_seq_length = pad_to_seq_length
        self.pad_token_id = pad_token_id
        self.image_process_mode = image_process_mode
        self.num_workers = num_workers
        self.max_bad_sample_share = max_bad_sample_share
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.init_global_step = 0
        self.data_sampler = MegatronDataSampler(
            seq_len=seq_length,
            decoder_seq_len=decoder_seq_length,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            rampup_batch_size=rampup_batch_size,
            dataloader_type="single",  # order comes from the data set's seeded permutation
        )
        self._train_ds = self._validation_ds = None

    # -- data sets ---------------------------------------------------------------------------

    def _encoder(self) -> SampleEncoder:
        return SampleEncoder(self.tokenizer, self.image_processor, template=self.template,
                             seq_length=self.seq_length, img_seq_len=self.num_image_embeddings_per_tile,
                             image_process_mode=self.image_process_mode)

    def _default_train_samples(self, n: int) -> int:
        trainer = getattr(self, "trainer", None)
        max_steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
        if max_steps is not None and max_steps > 0:
            return max(n, max_steps * self.global_batch_size)
        return n

    def setup(self, stage: str = "") -> None:
        if self._train_ds is not None:
            return
        encoder = self._encoder()
        pad_to = self.seq_length if self.pad_to_seq_length else None
        train = PreparedShards(self.paths)
        num_train = self.num_train_samples or self._default_train_samples(len(train))
        self._train_ds = LlavaShardDataset(train, encoder, num_samples=num_train, seed=self.seed,
                                           shuffle=self.shuffle, pad_to=pad_to, pad_token_id=self.pad_token_id,
                                           max_bad_share=self.max_bad_sample_share)
        val = train if self.val_paths == self.paths else PreparedShards(self.val_paths)
        self._validation_ds = LlavaShardDataset(val, encoder, num_samples=self.num_val_samples, seed=self.seed,
                                                shuffle=False, pad_to=pad_to, pad_token_id=self.pad_token_id,
                                                max_bad_share=self.max_bad_sample_share)
        log.info("LlavaDataModule: %d training samples over %d records, %d validation samples",
                 len(self._train_ds), len(train), len(self._validation_ds))

    def _create_dataloader(self, dataset: LlavaShardDataset, mode: str):
        from nemo.lightning.data import WrappedDataLoader

        trainer = getattr(self, "trainer", None)
        if trainer is not None and mode == "train":
            self.init_global_step = trainer.global_step
            self.data_sampler.init_global_step = self.init_global_step
        return WrappedDataLoader(
            mode=mode,
            dataset=dataset,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=dataset.collate_fn,
        )

    def train_dataloader(self):
        self.setup()
        return self._create_dataloader(self._train_ds, "train")

    def val_dataloader(self):
        self.setup()
        return self._create_dataloader(self._validation_ds, "validation")

    # -- checkpointed position (as NeMo's NevaPreloadedDataModule) ---------------------------

    def state_dict(self) -> Dict[str, Any]:
        consumed = self.data_sampler.compute_consumed_samples(self.trainer.global_step - self.init_global_step)
        return {"consumed_samples": consumed}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        from megatron.core import num_microbatches_calculator as nmc

        consumed = int(state_dict["consumed_samples"])
        self.data_sampler.init_consumed_samples = consumed
        self.data_sampler.prev_consumed_samples = consumed
        self.data_sampler.if_first_step = 1
        calculator = nmc._GLOBAL_NUM_MICROBATCHES_CALCULATOR  # set once a Megatron run has started
        if calculator is not None:
            calculator.update(consumed_samples=consumed, consistency_check=False)
