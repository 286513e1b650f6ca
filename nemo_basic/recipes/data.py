"""The data step of a recipe: prepared shards, the embedded data set (made once, cached), or the
tiny model's synthetic stream."""
from __future__ import annotations

import json
import math
import os
import time
from typing import List, Optional

from nemo_basic.console import say
from nemo_basic.recipes.schema import EMBEDDED_SCHEME, RecipeConfig, Runtime, bad_value

EMBEDDED_SPLITS = {"stage1": ("captions.json", "plain"), "stage2": ("instruct.json", "vicuna_v1")}
EMBEDDED_DATA_VERSION = 1


def embedded_data_root(cfg: RecipeConfig) -> str:
    from nemo_basic.pretrained.cache import cache_root

    return str(cache_root() / f"embedded-data-v{EMBEDDED_DATA_VERSION}-n{cfg.data.embedded_num_synthetic}")


def prepare_embedded(cfg: RecipeConfig, split: str) -> str:
    """The shard folder of ``embedded://<split>``: generated (images + LLaVA JSON) and converted
    with the real converter on first use, under the cache root; reused afterwards."""
    from nemo_basic.pretrained.cache import _locked

    root = embedded_data_root(cfg)
    shards = os.path.join(root, "shards", split)
    done = os.path.join(shards, ".nemo_basic_done")
    if os.path.isfile(done):
        return shards
    os.makedirs(root, exist_ok=True)
    with _locked(_lock_path(root), "the embedded data set"):
        if os.path.isfile(done):
            return shards
        from nemo_basic.data.embedded import make_embedded_data
        from nemo_basic.data.shards import prepare_llava_data

        t0 = time.time()
        raw = os.path.join(root, "raw")
        if not os.path.isfile(os.path.join(raw, ".nemo_basic_done")):
            say(f"generating the embedded data set in {raw} (one-time)")
            make_embedded_data(raw, seed=0, num_synthetic=cfg.data.embedded_num_synthetic, progress=False)
            open(os.path.join(raw, ".nemo_basic_done"), "w").close()
        json_name, template = EMBEDDED_SPLITS[split]
        say(f"converting {json_name} to shards in {shards} (one-time)")
        summary = prepare_llava_data(os.path.join(raw, json_name), os.path.join(raw, "images"), shards,
                                     template=template, overwrite=True, progress=False, workers=2)
        with open(done, "w") as f:
            json.dump({"records": getattr(summary, "written", None)}, f, default=str)
        say(f"embedded {split} data ready in {time.time() - t0:.1f} s")
    return shards


def _lock_path(root: str):
    from pathlib import Path

    return Path(os.path.dirname(root)) / f".{os.path.basename(root)}.lock"


def _data_path(cfg: RecipeConfig, p: str, prepare: bool) -> str:
    """One ``data.path`` entry checked (cheaply); with ``prepare``, the embedded split made on first use."""
    shards = "prepared shard folders (scripts/prepare_llava_data.py)"
    if p.startswith(EMBEDDED_SCHEME):
        split = p[len(EMBEDDED_SCHEME):]
        if split not in EMBEDDED_SPLITS:
            raise bad_value("data.path", p, " | ".join(EMBEDDED_SCHEME + s for s in EMBEDDED_SPLITS) + " or " + shards)
        return prepare_embedded(cfg, split) if prepare else p
    path = os.path.abspath(os.path.expanduser(p))
    if not os.path.isdir(path):
        raise bad_value("data.path", p, shards, f"{path} is not a folder")
    from nemo_basic.data.shards import check_prepared

    why = check_prepared(path)
    if why is not None:
        raise bad_value("data.path", p, shards, why)
    return path


def resolve_data_paths(cfg: RecipeConfig) -> List[str]:
    return [_data_path(cfg, p, prepare=True) for p in cfg.data.path]


def check_data_paths(cfg: RecipeConfig) -> None:
    """Cheap checks before anything heavy runs."""
    if cfg.model.type != "tiny":
        for p in cfg.data.path:
            _data_path(cfg, p, prepare=False)


def num_records(paths: List[str]) -> int:
    from nemo_basic.data.reader import PreparedShards

    return len(PreparedShards(paths))


def steps_for(cfg: RecipeConfig, records: Optional[int]) -> int:
    """``trainer.max_steps`` or ``epochs`` passes over ``records`` samples."""
    if cfg.trainer.max_steps is not None:
        return cfg.trainer.max_steps
    if records is None:  # synthetic stream: no epoch
        raise bad_value("trainer.max_steps", None, "an integer >= 1", "the synthetic data has no epoch length")
    return max(1, math.ceil(cfg.trainer.epochs * records / cfg.data.global_batch_size))


def build_data(cfg: RecipeConfig, runtime: Runtime, tokenizer=None, image_processor=None, img_seq_len: int = 0,
               paths: Optional[List[str]] = None, max_steps: Optional[int] = None):
    d = cfg.data
    if cfg.model.type == "tiny":
        return synthetic_data_module(d.micro_batch_size, d.global_batch_size, cfg.model.seq_length)
    from nemo_basic.data.datamodule import LlavaDataModule

    pad = d.pad_to_seq_length if d.pad_to_seq_length is not None else cfg.parallel.pipeline > 1
    return LlavaDataModule(
        paths or resolve_data_paths(cfg), tokenizer, image_processor, template=cfg.template,
        seq_length=cfg.model.seq_length, num_image_embeddings_per_tile=img_seq_len,
        micro_batch_size=d.micro_batch_size, global_batch_size=d.global_batch_size,
        num_train_samples=(max_steps * d.global_batch_size) if max_steps else None, seed=cfg.run.seed,
        shuffle=d.shuffle, pad_to_seq_length=pad, image_process_mode=d.image_process_mode,
        num_workers=d.num_workers, max_bad_sample_share=d.max_bad_sample_share)


def synthetic_data_module(micro_batch_size: int, global_batch_size: int, seq_length: int):
    """The tiny model's synthetic stream, resumable (`nemo_basic.data.synthetic`)."""
    from nemo_basic.data import synthetic
    from nemo_basic.models import tiny

    return synthetic.synthetic_data_module(synthetic.SyntheticNevaData(tiny.VOCAB, tiny.IMG, tiny.TEXT_LEN),
                                           micro_batch_size, global_batch_size, seq_length)
