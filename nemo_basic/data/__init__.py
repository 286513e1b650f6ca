"""Data for LLaVA-style training: LLaVA JSON -> webdataset/Energon shards -> NeVA batches.

- `llava_json`: stream-read and validate LLaVA's conversation JSON (``blip_laion_cc_sbu_558k.json``,
  ``llava_v1_5_mix665k.json``, or JSON Lines).
- `shards`: the converter (``scripts/prepare_llava_data.py``), atomic shard writing, Energon metadata.
- `reader`: random access to prepared shards through Energon's index.
- `templates`: ``plain`` and ``vicuna_v1`` prompts, tokenisation with exact supervision masks.
- `image`: image validation and LLaVA-1.5 pad-to-square preprocessing.
- `datamodule`: the NeMo 2 data module (`LlavaDataModule`) and its batch format.
- `embedded`: the small offline data set (``scripts/make_embedded_data.py``).

Names are imported lazily, so the converter does not pull in Lightning or NeMo.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "iter_json_records": "llava_json",
    "validate_record": "llava_json",
    "RecordError": "llava_json",
    "LlavaRecord": "llava_json",
    "prepare_llava_data": "shards",
    "PrepareSummary": "shards",
    "OutputExistsError": "shards",
    "AtomicShardWriter": "shards",
    "PreparedShards": "reader",
    "tokenize_conversation": "templates",
    "shift_and_truncate": "templates",
    "IMAGE_TOKEN_INDEX": "templates",
    "IGNORE_INDEX": "templates",
    "VICUNA_V1_SYSTEM": "templates",
    "preprocess_image": "image",
    "expand_to_square": "image",
    "SampleEncoder": "datamodule",
    "LlavaShardDataset": "datamodule",
    "LlavaDataModule": "datamodule",
    "collate_batch": "datamodule",
    "make_embedded_data": "embedded",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nemo_basic.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nemo_basic.data.{module}"), name)
