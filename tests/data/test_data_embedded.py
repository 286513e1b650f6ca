"""The embedded data set: deterministic, labelled, and accepted by the real converter."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from nemo_basic.data.embedded import make_embedded_data
from nemo_basic.data.shards import prepare_llava_data


def tree(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_same_seed_same_bytes_and_labels_match_pixels(tmp_path):
    kw = dict(num_synthetic=12, num_digits=3, num_text_only=4, progress=False)
    make_embedded_data(tmp_path / "a", seed=3, **kw)
    make_embedded_data(tmp_path / "b", seed=3, **kw)
    make_embedded_data(tmp_path / "c", seed=4, **kw)
    a, b, c = tree(tmp_path / "a"), tree(tmp_path / "b"), tree(tmp_path / "c")
    assert a == b
    assert a["instruct.json"] != c["instruct.json"] and a["labels.json"] != c["labels.json"]

    labels = json.loads(a["labels.json"])
    assert labels["grid"] == [16, 16] and labels["patch_size"] == 14 and len(labels["scenes"]) == 12
    for rel, scene in labels["scenes"].items():
        pix = np.asarray(Image.open(tmp_path / "a" / "images" / rel).convert("RGB"))
        assert pix.shape == (224, 224, 3)
        assert 1 <= len(scene["objects"]) <= 3
        grid = np.asarray(scene["patch_labels"])
        assert grid.shape == (16, 16) and set(np.unique(grid)) <= set(range(len(scene["objects"]) + 1))
        # every patch's label names the colour that covers most of its pixels (a tie goes to the background)
        for r in range(16):
            for col in range(16):
                k = grid[r, col]
                patch = pix[r * 14:(r + 1) * 14, col * 14:(col + 1) * 14].reshape(-1, 3)
                colours, counts = np.unique(patch, axis=0, return_counts=True)
                want = (labels["backgrounds"][scene["background"]] if k == 0
                        else labels["colors"][scene["objects"][k - 1]["color"]])
                n_want = int((patch == np.asarray(want)).all(axis=1).sum())
                assert n_want == counts.max(), (rel, r, col)
        assert all(any(grid.ravel() == k) for k in range(1, len(scene["objects"]) + 1)), "an object has no patch"

    captions = json.loads(a["captions.json"])
    instruct = json.loads(a["instruct.json"])
    real = [r for r in captions if not r["id"].startswith("syn-")]
    assert any(r["id"] == "skimage-astronaut" for r in real)
    assert any(r["id"] == "matplotlib-grace_hopper" for r in real)
    assert sum(r["id"].startswith("digits-") for r in real) == 3
    assert sum("image" not in r for r in instruct) == 4  # text-only
    assert any(len(r["conversations"]) >= 4 for r in instruct)  # multi-turn


def test_converter_accepts_embedded_data(tmp_path):
    make_embedded_data(tmp_path / "emb", seed=0, num_synthetic=6, num_digits=2, num_text_only=2, progress=False)
    emb = tmp_path / "emb"
    s1 = prepare_llava_data(emb / "captions.json", emb / "images", tmp_path / "s1", template="plain", progress=False)
    s2 = prepare_llava_data(emb / "instruct.json", emb / "images", tmp_path / "s2", template="vicuna_v1",
                            progress=False)
    n_caps = len(json.loads((emb / "captions.json").read_text()))
    n_inst = len(json.loads((emb / "instruct.json").read_text()))
    assert (s1.written, s1.skipped) == (n_caps, 0)
    assert (s2.written, s2.skipped, s2.text_only) == (n_inst, 0, 2)
