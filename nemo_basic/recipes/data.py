"""The data step of a recipe: prepared shards, the embedded data set (made once, cached), or the
tiny model's synthetic stream."""
from __future__ import annotations

import math
import os
from typing import List, Optional

from nemo_basic.recipes.schema import EMBEDDED_SCHEME, RecipeConfig, Runtime, bad_value

EMBEDDED_SPLITS = {"stage1": ("captions.json", "plain"), "stage2": ("instruct.json", "vicuna_v1")}
EMBEDDED_DATA_VERSION = 2  # 2: cache entries of nemo_basic.pretrained.cache


def prepare_embedded(cfg: RecipeConfig, split: str) -> str:
    """The shard folder of ``embedded://<split>``: the generated images and LLaVA JSON, then their
    shards by the real converter, each made once in the cache (`nemo_basic.pretrained.cache.cached_entry`:
    built aside and renamed when complete, checked against its manifest, rebuilt when damaged)."""
    from nemo_basic.data.embedded import make_embedded_data
    from nemo_basic.data.shards import prepare_llava_data
    from nemo_basic.pretrained.cache import cached_entry

    n = cfg.data.embedded_num_synthetic
    header = {"data_version": EMBEDDED_DATA_VERSION, "num_synthetic": n}
    json_name, template = EMBEDDED_SPLITS[split]

    def generate(out) -> dict:
        made = make_embedded_data(str(out), seed=0, num_synthetic=n, progress=False)
        return {k: v for k, v in made.items() if k != "out_dir"}  # the counts, for the manifest

    def convert(out) -> dict:
        raw = cached_entry(f"embedded-data-n{n}", header, generate)
        done = prepare_llava_data(str(raw / json_name), str(raw / "images"), str(out), template=template,
                                  overwrite=True, progress=False, workers=2)
        return {"records": done.written}

    return str(cached_entry(f"embedded-data-n{n}-{split}", header, convert))


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
