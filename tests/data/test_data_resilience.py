"""Damaged and half-written shard sets: the start-up check names a truncated shard, a corrupt image
inside a good shard is skipped at read time (reported with its key and shard) up to a share of the
set, and an interrupted conversion is refused for training and continued by ``resume=True`` into
the very bytes an uninterrupted conversion writes."""
from __future__ import annotations

import json
import os
import shutil
import tarfile

import pytest

from nemo_basic.data import shards as S
from nemo_basic.data.shards import check_prepared, prepare_llava_data


def turns(*values):
    return [{"from": "human" if j % 2 == 0 else "gpt", "value": v} for j, v in enumerate(values)]


def make_input(root):
    from PIL import Image

    (root / "images").mkdir()
    records = []
    for i in range(12):
        Image.new("RGB", (30 + i, 20), (10 * i, 100, 200)).save(root / "images" / f"{i}.png")
        records.append({"id": f"img{i}", "image": f"{i}.png",
                        "conversations": turns("<image>\nWhat color is the square?", f"colour {i}.")})
        if i in (2, 9):  # unusable records (missing image): listed in skipped.jsonl
            records.append({"id": f"gone{i}", "image": f"missing{i}.png",
                            "conversations": turns("<image>\nWhat is it?", "nothing.")})
    (root / "recs.json").write_text(json.dumps(records))
    return root / "recs.json", root / "images"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("resilience")
    js, images = make_input(root)
    prepare_llava_data(js, images, root / "shards", shard_size=4, progress=False, workers=1)
    return root


def copy_set(prepared, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(prepared / "shards", dst)
    return dst


def test_startup_check_names_the_truncated_shard(prepared, tmp_path):
    d = copy_set(prepared, tmp_path)
    assert check_prepared(str(d)) is None
    tar = d / "shard-000001.tar"
    os.truncate(tar, os.path.getsize(tar) // 2)
    why = check_prepared(str(d))
    assert why.startswith(f"shard {tar} is truncated: {os.path.getsize(tar)} bytes"), why
    # the recipe refuses it at start-up, in its own one-line style
    from nemo_basic.recipes import data as data_mod
    from nemo_basic.recipes.schema import RecipeConfigError, load_config

    cfg = load_config(os.path.join(data_mod.__file__.rsplit("/nemo_basic/", 1)[0], "conf", "embedded_stage1.yaml"),
                      [f"data.path=[{d}]"], stage=1)
    with pytest.raises(RecipeConfigError) as e:
        data_mod.check_data_paths(cfg)
    assert str(e.value).startswith(f"data.path = '{d}' is invalid") and "shard-000001.tar is truncated" in str(e.value)
    # an empty shard, a missing index
    tar.write_bytes(b"")
    assert "is truncated: 0 bytes" in check_prepared(str(d))
    os.remove(d / "shard-000000.tar.idx")
    assert check_prepared(str(d)).startswith(f"shard index {d / 'shard-000000.tar.idx'} is missing")


def _corrupt_member(tar_path, suffix):
    """Overwrite the data of the first member whose name ends with ``suffix`` with zeros, in place
    (the tar structure stays intact). Returns the sample key."""
    with tarfile.open(tar_path) as t:
        m = next(m for m in t.getmembers() if m.name.endswith(suffix))
    with open(tar_path, "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"\0" * m.size)
    return m.name.split(".")[0]


@pytest.fixture
def single_rank(monkeypatch):
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda *a, **k: 0)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda *a, **k: 1)


def _dataset(d, tok, proc, share):
    from nemo_basic.data.datamodule import LlavaDataModule

    dm = LlavaDataModule(str(d), tok, proc, template="vicuna_v1", seq_length=80, num_image_embeddings_per_tile=4,
                         micro_batch_size=2, global_batch_size=4, num_workers=0, shuffle=False,
                         num_train_samples=12, max_bad_sample_share=share)
    dm.setup("fit")
    return dm._train_ds


def test_corrupt_image_is_skipped_and_reported(prepared, tmp_path, tiny_tokenizer, clip_processor, single_rank,
                                               capfd):
    d = copy_set(prepared, tmp_path)
    key = _corrupt_member(d / "shard-000002.tar", ".png")  # records img8..img11
    assert check_prepared(str(d)) is None  # sizes intact: only reading finds it
    ds = _dataset(d, tiny_tokenizer, clip_processor, share=0.1)
    ids = [ds[i]["id"] for i in range(len(ds))]
    bad = json.loads((prepared / "recs.json").read_text())[int(key)]["id"]  # keys are input positions
    assert bad == "img8"
    # the corrupt record is replaced by the next one of the set, every other sample is itself
    expected = [f"img{i}" for i in range(12)]
    expected[expected.index(bad)] = f"img{int(bad[3:]) + 1}" if bad != "img11" else "img0"
    assert ids == expected
    err = capfd.readouterr().err
    assert f"skipped a corrupt sample: key {key} in shard-000002.tar" in err
    assert len(ds.bad) == 1 and ds.bad[0][1:3] == ("shard-000002.tar", key)
    # past the allowed share (default 0.1 %: not one in 12) the run stops, naming the share and the sample
    strict = _dataset(d, tiny_tokenizer, clip_processor, share=0.001)
    with pytest.raises(RuntimeError) as e:
        [strict[i] for i in range(len(strict))]
    assert "data.max_bad_sample_share = 0.001" in str(e.value) and f"key {key} in shard-000002.tar" in str(e.value)


def test_interrupted_conversion_is_refused_and_resumed(prepared, tmp_path, monkeypatch):
    js, images = prepared / "recs.json", prepared / "images"
    out = tmp_path / "out"
    calls = []
    original = S._write_marker

    def killed_after_two_shards(path, state):  # a kill right after shard-000001.tar is in place
        original(path, state)
        calls.append(len(state["shards"]))
        if len(state["shards"]) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(S, "_write_marker", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        prepare_llava_data(js, images, out, shard_size=4, progress=False, workers=1)
    monkeypatch.setattr(S, "_write_marker", original)
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == ["shard-000000.tar", "shard-000001.tar"]
    why = check_prepared(str(out))
    assert why.startswith("interrupted conversion") and "rerun scripts/prepare_llava_data.py with --overwrite " \
        "(or --resume)" in why
    from nemo_basic.data.reader import PreparedShards

    with pytest.raises(FileNotFoundError, match="interrupted conversion"):
        PreparedShards(str(out))
    with pytest.raises(S.OutputExistsError, match=r"interrupted conversion .*--overwrite \(or --resume"):
        prepare_llava_data(js, images, out, shard_size=4, progress=False, workers=1)
    with pytest.raises(S.OutputExistsError, match="used shard_size = 4, not 3"):
        prepare_llava_data(js, images, out, shard_size=3, progress=False, workers=1, resume=True)
    kept = {n: os.stat(out / n).st_mtime_ns for n in ("shard-000000.tar", "shard-000001.tar")}
    summary = prepare_llava_data(js, images, out, shard_size=4, progress=False, workers=1, resume=True)
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept  # finished shards not redone
    assert check_prepared(str(out)) is None and not os.path.exists(out / S.CONVERTING)
    # the same bytes, counts and skip list as the uninterrupted conversion
    ref = prepared / "shards"
    for name in sorted(os.listdir(ref)):
        if name.startswith("shard-"):
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert (out / S.SKIPPED_FILE).read_text() == (ref / S.SKIPPED_FILE).read_text()
    with open(ref / S.SUMMARY_FILE) as f:
        want = json.load(f)
    got = json.loads(json.dumps(summary.__dict__))
    for key in ("records_read", "written", "skipped", "skipped_by_reason", "shards", "images_written"):
        assert got[key] == want[key], key
    assert want["records_read"] == 14 and want["skipped"] == 2 and len(want["shards"]) == 3
    assert len(PreparedShards(str(out))) == 12
