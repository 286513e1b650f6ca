"""embedded://stage1: generated and converted once into the cache, every caption record a shard
sample; a damaged shard is found by the cache's manifest and the split made again, with a message."""
from __future__ import annotations

import json
import os

from nemo_basic.recipes import data as data_mod
from nemo_basic.recipes.schema import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_embedded_split_made_once_and_remade_when_damaged(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEMO_BASIC_CACHE", str(tmp_path))
    cfg = load_config(os.path.join(REPO, "conf", "embedded_stage1.yaml"), ["data.embedded_num_synthetic=6"],
                      stage=1)
    shards = data_mod.prepare_embedded(cfg, "stage1")
    with open(tmp_path / "embedded-data-n6" / "captions.json") as f:
        captions = json.load(f)
    assert data_mod.num_records([shards]) == len(captions) > 6
    made = capsys.readouterr().err
    assert made.count("one-time conversion") == 2, made  # the generated set, then its stage-1 shards
    assert data_mod.prepare_embedded(cfg, "stage1") == shards and "one-time" not in capsys.readouterr().err
    tar = os.path.join(shards, "shard-000000.tar")
    size = os.path.getsize(tar)
    os.truncate(tar, size // 2)
    assert data_mod.prepare_embedded(cfg, "stage1") == shards
    assert (f"cache entry {shards} is unusable (file shard-000000.tar has size {size // 2}, manifest says {size}); "
            "rebuilding it") in capsys.readouterr().err
    assert os.path.getsize(tar) == size and data_mod.num_records([shards]) == len(captions)
