"""The converter: LLaVA JSON + images -> shards; bad inputs, strict mode, overwrite, atomic shards."""
from __future__ import annotations

import importlib.util
import json
import os
import tarfile

import pytest

from nemo_basic.data.llava_json import RecordError, iter_json_records
from nemo_basic.data.reader import PreparedShards
from nemo_basic.data.shards import AtomicShardWriter, OutputExistsError, prepare_llava_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_one_record_per_line(path, records):
    """A JSON array with record i on line i + 2 (line 1 is '[')."""
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    return path


def turns(*values):
    return [{"from": "human" if j % 2 == 0 else "gpt", "value": v} for j, v in enumerate(values)]


@pytest.fixture
def source(tmp_path, img):
    """Image folder with good, missing, corrupt and truncated images, and records that use them."""
    images = tmp_path / "images"
    img(images / "coco" / "good.jpg", size=(40, 24), fmt="JPEG")
    img(images / "gqa" / "second.png", size=(16, 32), color=(0, 90, 200), fmt="PNG")
    img(images / "other" / "pic.bmp", size=(20, 20), color=(10, 200, 10), fmt="BMP")
    (images / "coco" / "garbage.jpg").write_bytes(b"this is not an image at all")
    whole = (images / "coco" / "good.jpg").read_bytes()
    (images / "coco" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    records = [
        {"id": "good", "image": "coco/good.jpg",
         "conversations": turns("<image>\nDescribe the image.", "a red circle.")},
        {"id": "text", "conversations": turns("What is 2 plus 3?", "5.")},
        {"id": "missing", "image": "coco/nope.jpg", "conversations": turns("<image>\nq", "a")},
        {"id": "corrupt", "image": "coco/garbage.jpg", "conversations": turns("<image>\nq", "a")},
        {"id": "truncated", "image": "coco/truncated.jpg", "conversations": turns("<image>\nq", "a")},
        {"id": "noconv", "image": "coco/good.jpg"},
        {"id": "markers", "image": "coco/good.jpg", "conversations": turns("<image>\n<image>\nq", "a")},
        {"id": "multi", "image": ["coco/good.jpg", "gqa/second.png"],
         "conversations": turns("<image> and <image>: what color is the square?", "blue.", "Is it a circle?", "no.")},
        {"id": "bmp", "image": "other/pic.bmp", "conversations": turns("What color is this? <image>", "green.")},
        {"id": "roles", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
    ]
    return tmp_path, images, write_one_record_per_line(tmp_path / "recs.json", records)


def test_round_trip_and_skip_report(source, load_jsonl):
    tmp, images, js = source
    out = tmp / "out"
    s = prepare_llava_data(js, images, out, shard_size=2, workers=2, progress=False)
    assert (s.records_read, s.written, s.skipped) == (10, 4, 6)
    assert (s.with_images, s.text_only, s.images_written) == (3, 1, 4)
    assert s.skipped_by_reason == {"image_missing": 1, "image_corrupt": 2, "missing_conversations": 1,
                                   "too_many_image_markers": 1, "bad_roles": 1}
    assert s.shards == ["shard-000000.tar", "shard-000001.tar"]
    skipped = load_jsonl(out / "skipped.jsonl")
    # record i is on line i + 2
    assert [(e["index"], e["line"], e["id"], e["reason"]) for e in skipped] == [
        (2, 4, "missing", "image_missing"),
        (3, 5, "corrupt", "image_corrupt"),
        (4, 6, "truncated", "image_corrupt"),
        (5, 7, "noconv", "missing_conversations"),
        (6, 8, "markers", "too_many_image_markers"),
        (9, 11, "roles", "bad_roles"),
    ]
    assert json.loads((out / "prepare_summary.json").read_text())["written"] == 4
    for f in (".nv-meta/.info.yaml", ".nv-meta/split.yaml", ".nv-meta/dataset.yaml", "shard-000000.tar.idx"):
        assert (out / f).is_file(), f

    samples = PreparedShards(out)
    assert len(samples) == 4
    got = [samples[i] for i in range(4)]
    assert [g["meta"]["id"] for g in got] == ["good", "text", "multi", "bmp"]
    assert [g["key"] for g in got] == ["000000000", "000000001", "000000007", "000000008"]
    assert got[0]["meta"]["conversations"] == turns("<image>\nDescribe the image.", "a red circle.")
    assert got[0]["images"] == [(images / "coco" / "good.jpg").read_bytes()]  # JPEG kept byte for byte
    assert got[0]["meta"]["image_sizes"] == [[40, 24]]
    assert got[1]["images"] == [] and got[1]["meta"]["conversations"] == turns("What is 2 plus 3?", "5.")
    # two images, markers kept in place, order kept
    assert got[2]["meta"]["images"] == ["img0.jpg", "img1.png"]
    assert got[2]["images"][1] == (images / "gqa" / "second.png").read_bytes()
    assert got[2]["meta"]["conversations"][0]["value"] == "<image> and <image>: what color is the square?"
    # one image: the marker moves to the front of its turn (LLaVA-1.5), BMP becomes PNG
    assert got[3]["meta"]["conversations"][0]["value"] == "<image>\nWhat color is this?"
    assert got[3]["meta"]["images"] == ["img0.png"] and got[3]["images"][0][:8] == b"\x89PNG\r\n\x1a\n"


def test_template_plain_rejects_non_caption_records(source):
    tmp, images, js = source
    s = prepare_llava_data(js, images, tmp / "out", template="plain", workers=1, progress=False)
    assert s.written == 2  # "good" and "bmp"; "text" (no image) and "multi" (2 images, 4 turns) do not fit
    assert s.skipped_by_reason["template_mismatch"] == 2


def test_strict_names_file_line_and_record(source):
    tmp, images, js = source
    with pytest.raises(RecordError) as e:
        prepare_llava_data(js, images, tmp / "out", strict=True, workers=2, progress=False)
    msg = str(e.value)
    assert "recs.json:4" in msg and "record #2" in msg and "id='missing'" in msg and "image_missing" in msg
    assert not list((tmp / "out").glob("*.tar.tmp"))


def test_bad_json_is_skipped_with_its_line_and_reading_resumes(tmp_path, img, load_jsonl):
    img(tmp_path / "images" / "a.png", fmt="PNG")
    def good(i):
        return json.dumps({"id": f"r{i}", "image": "a.png", "conversations": turns("<image>\nq", "a")})

    text = "[\n" + ",\n".join([good(0), good(1), '{"id": "broken", "conversations": [{"from": "human" "value": "q"}]}',
                               good(3), good(4)]) + "\n]\n"
    js = tmp_path / "bad.json"
    js.write_text(text)
    s = prepare_llava_data(js, tmp_path / "images", tmp_path / "out", workers=1, progress=False)
    assert (s.written, s.skipped, s.skipped_by_reason) == (4, 1, {"json_syntax": 1})
    (entry,) = load_jsonl(tmp_path / "out" / "skipped.jsonl")
    assert (entry["index"], entry["line"], entry["reason"]) == (2, 4, "json_syntax")
    assert [PreparedShards(tmp_path / "out")[i]["meta"]["id"] for i in range(4)] == ["r0", "r1", "r3", "r4"]
    with pytest.raises(RecordError, match=r"bad.json:4.*record #2.*json_syntax"):
        prepare_llava_data(js, tmp_path / "images", tmp_path / "out2", strict=True, progress=False)


def test_stream_reader_lines_with_tiny_chunks_and_jsonl(tmp_path):
    recs = [{"id": str(i), "conversations": turns("q", "a")} for i in range(6)]
    p = tmp_path / "r.json"
    p.write_text(json.dumps(recs, indent=2))  # each record spans 13 lines, the first starts on line 2
    got = list(iter_json_records(p, chunk_chars=7))
    assert [(e.index, e.line, e.value["id"]) for e in got] == [(i, 2 + 13 * i, str(i)) for i in range(6)]
    j = tmp_path / "r.jsonl"
    j.write_text(json.dumps(recs[0]) + "\n\n{not json}\n" + json.dumps(recs[1]) + "\n")
    got = list(iter_json_records(j))
    assert [(e.index, e.line, e.error is None) for e in got] == [(0, 1, True), (1, 3, False), (2, 4, True)]


def test_existing_output_needs_overwrite(source, capsys):
    tmp, images, js = source
    out = tmp / "out"
    prepare_llava_data(js, images, out, progress=False)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_llava_data(js, images, out, progress=False)
    s = prepare_llava_data(js, images, out, overwrite=True, progress=False)
    assert s.written == 4 and sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]
    # the CLI says so and exits with 2
    spec = importlib.util.spec_from_file_location("prepare_cli", os.path.join(REPO, "scripts", "prepare_llava_data.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main(["--json", str(js), "--image-dir", str(images), "--out", str(out), "--no-progress"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_workers_keep_order_and_bytes(source):
    tmp, images, js = source
    a = prepare_llava_data(js, images, tmp / "a", shard_size=3, workers=1, progress=False)
    b = prepare_llava_data(js, images, tmp / "b", shard_size=3, workers=4, progress=False)
    assert a.shards == b.shards
    for name in a.shards:
        assert (tmp / "a" / name).read_bytes() == (tmp / "b" / name).read_bytes()


def _members(path):
    with tarfile.open(path) as t:
        return [m.name for m in t.getmembers()]


def test_crash_mid_shard_leaves_no_partial_final_shard(source, monkeypatch):
    import webdataset

    tmp, images, js = source
    calls = {"n": 0}
    real_write = webdataset.TarWriter.write

    def failing_write(self, obj):
        calls["n"] += 1
        if calls["n"] == 3:  # first sample of the second shard has been written, now "crash"
            raise RuntimeError("disk on fire")
        return real_write(self, obj)

    monkeypatch.setattr(webdataset.TarWriter, "write", failing_write)
    out = tmp / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_llava_data(js, images, out, shard_size=2, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir() if "shard" in p.name) == ["shard-000000.tar"]
    assert _members(out / "shard-000000.tar") == ["000000000.img0.jpg", "000000000.json", "000000001.json"]

    # a hard crash (no clean-up at all) leaves only the temporary name behind
    calls["n"] = 0
    monkeypatch.setattr(AtomicShardWriter, "abort", lambda self: None)
    with pytest.raises(RuntimeError):
        prepare_llava_data(js, images, out, shard_size=2, workers=1, progress=False, overwrite=True)
    names = sorted(p.name for p in out.iterdir() if "shard" in p.name)
    assert names == ["shard-000000.tar", "shard-000001.tar.tmp"]
    with pytest.raises(OutputExistsError):  # leftovers are recognised as a previous run's
        prepare_llava_data(js, images, out, progress=False)


def test_atomic_writer_renames_only_complete_shards(tmp_path):
    w = AtomicShardWriter(str(tmp_path), shard_size=2)
    w.write({"__key__": "a", "json": b"{}"})
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar.tmp"]
    w.write({"__key__": "b", "json": b"{}"})
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar"]
    w.write({"__key__": "c", "json": b"{}"})
    assert w.close() == ["shard-000000.tar", "shard-000001.tar"]
    with tarfile.open(tmp_path / "shard-000001.tar") as t:
        assert [m.name for m in t] == ["c.json"]
        assert t.extractfile("c.json").read() == b"{}"


def _validate(value, template=None):
    from nemo_basic.data.llava_json import RawElement, validate_record

    return validate_record(RawElement(index=7, line=9, value=value), template=template, source="x.json")


@pytest.mark.parametrize("value, reason", [
    ([1, 2], "not_an_object"),
    ({"id": "a", "conversations": "hi"}, "bad_conversations"),
    ({"id": "a", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, "bad_conversations"),
    ({"id": "a", "conversations": turns("q", "a", "q2") + [{"from": "human", "value": "x"}]}, "bad_roles"),
    ({"id": "a", "image": "x.jpg", "conversations": turns("<image>\nq", "see <image>")}, "image_marker_in_answer"),
    ({"id": "a", "image": ["x.jpg", "y.jpg"], "conversations": turns("<image>\nq", "a")}, "too_few_image_markers"),
    ({"id": "a", "image": [], "conversations": turns("q", "a")}, "bad_image_field"),
])
def test_validate_rejects(value, reason):
    with pytest.raises(RecordError) as e:
        _validate(value)
    assert e.value.reason == reason
    assert str(e.value).startswith("x.json:9, record #7")


def test_validate_normalises_like_llava():
    r = _validate({"id": 5, "image": "x.jpg", "conversations": [
        {"from": "gpt", "value": "hello"}, {"from": "human", "value": "What is this? <image>"},
        {"from": "gpt", "value": "A cat."}, {"from": "human", "value": "unanswered"}]})
    assert r.id == "5" and r.images == ["x.jpg"]
    assert r.conversations == turns("<image>\nWhat is this?", "A cat.")  # leading gpt, trailing human dropped
    r = _validate({"id": "b", "image": "x.jpg", "conversations": turns("Describe.", "A dog.")})
    assert r.conversations == turns("<image>\nDescribe.", "A dog.")  # one image, no marker: marker added
