"""The visual logit lens, its metrics and the replacement probe, checked by numbers:

* ``lens --hf`` on a tiny random HF LLaVA gives, for layers 0, 1 and L, the token ids of an
  independent recomputation with transformers in float64 (``output_hidden_states``; layer L before
  the final norm; cosine argmax over the true vocabulary), and the same through one of our
  checkpoints re-saved under TP=2, where the training callback's vocab-sharded layer-0 tokens of
  its probe scenes also equal the recomputation;
* a projector set so that every patch's V is a chosen token's embedding (scaled) makes the lens
  return exactly those tokens, and ``grounded`` = 1.0 for labels that name them;
* the metrics on a hand-made grid equal hand-computed values;
* the probe's two captions equal HF ``generate`` on the image and on the nearest tokens' ids;
* clear errors for a model without a vision tower, a label count mismatch, a layer beyond the depth.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import _analysis_workers as W
from nemo_basic.analysis import metrics as M

PROMPT = "the red <image> and"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return W.make_llava(tmp_path_factory.mktemp("hf") / "llava")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, shape in enumerate(((40, 52, 3), (30, 30, 3))):
        path = d / f"img{i}.png"
        Image.fromarray((np.random.default_rng(i).random(shape) * 255).astype("uint8")).save(path)
        paths.append(str(path))
    return paths


def _ref_ids_and_pixels(llava_dir, image_path):
    """The HF input ids of PROMPT built from the vocabulary itself, and HF's pixel values."""
    from transformers import AutoImageProcessor

    vocab = W.vocabulary()
    ids = [vocab["the"], vocab["red"]] + [W.IMAGE_TOKEN_ID] * W.M + [vocab["and"]]
    proc = AutoImageProcessor.from_pretrained(str(llava_dir))
    pixels = proc(images=Image.open(image_path).convert("RGB"), return_tensors="pt")["pixel_values"]
    return torch.tensor([ids]), pixels, 2


def reference_nearest(llava_dir, image_path, layers):
    """Independent float64 recomputation: {layer: nearest ids}, and V (layer 0) itself."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(llava_dir), attn_implementation="eager").double().eval()
    ids, pixels, start = _ref_ids_and_pixels(llava_dir, image_path)
    captured = {}
    handle = model.model.language_model.norm.register_forward_pre_hook(
        lambda mod, args: captured.__setitem__("pre_norm", args[0]))
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels.double(), output_hidden_states=True)
    handle.remove()
    L = model.config.text_config.num_hidden_layers
    E = model.get_input_embeddings().weight[:W.TOKENS].double()   # true vocabulary: the 250 words
    result = {}
    for l in layers:
        h = captured["pre_norm"][0] if l == L else out.hidden_states[l][0]
        h = h[start:start + W.M]
        cos = (h @ E.T) / (h.norm(dim=-1, keepdim=True) * E.norm(dim=-1))
        top2 = cos.topk(2, dim=-1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-7  # no float ties: the argmax is well defined
        result[l] = cos.argmax(-1).tolist()
    return result, out.hidden_states[0][0, start:start + W.M]


def _run_cli(*args):
    from nemo_basic.analysis.__main__ import main

    return main([*args, "--no-progress"])


def _check_lens(result, images, reference, layers):
    assert result["layers"] == layers
    assert len(result["images"]) == len(images)
    words = {i: w for w, i in W.vocabulary().items()}
    for entry, path in zip(result["images"], images):
        assert entry["image"] == path and entry["grid"] == [4, 4] and entry["labels"] == [None] * W.M
        assert set(entry["token_ids"]) == set(entry["tokens"]) == {str(l) for l in layers}
        for l in layers:
            assert entry["token_ids"][str(l)] == reference[path][l], (path, l)
            assert entry["tokens"][str(l)] == [words[i] for i in reference[path][l]]
    for l in layers:
        m = result["metrics"][str(l)]
        assert {"meaningful", "grounded", "distinct_per_image", "top_token_share"} <= set(m)
        assert m["grounded"] is None  # no labels
        expect = M.layer_metrics([[words[i] for i in reference[p][l]] for p in images])
        assert m["meaningful"] == pytest.approx(expect["meaningful"])
        distinct = np.mean([len(set(reference[p][l])) for p in images])
        top = np.mean([max(reference[p][l].count(t) for t in reference[p][l]) / W.M for p in images])
        assert m["distinct_per_image"] == pytest.approx(distinct) and m["top_token_share"] == pytest.approx(top)


def test_lens_hf_equals_float64_transformers(llava_dir, images, tmp_path):
    layers = [0, 1, W.LAYERS]
    out = tmp_path / "out"
    assert _run_cli("lens", "--hf", str(llava_dir), "--images", *images, "--layers", "0,1,4", "--prompt", PROMPT,
                    "--out", str(out)) == 0
    result = json.loads((out / "lens.json").read_text())
    reference = {p: reference_nearest(llava_dir, p, layers)[0] for p in images}
    _check_lens(result, images, reference, layers)
    # the deep layers differ from layer 0 (the test sees more than V)
    assert any(reference[p][W.LAYERS] != reference[p][0] for p in images)
    pngs = sorted((out / "pictures").glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size[0] > 2 * Image.open(p).size[1] for p in pngs)  # 3 panels
    page = (out / "index.html").read_text()
    assert all(f"pictures/{p.name}" in page for p in pngs)


@pytest.mark.slow
def test_lens_through_tp2_saved_checkpoint(llava_dir, images, tmp_path):
    """Our checkpoint, re-saved by two TP ranks (the embedding table and QKV sharded), through the CLI."""
    from nemo_basic.convert import ensure_model_parallel
    from nemo_basic.export.hf import import_hf_llava
    from nemo_basic.testing import run_distributed

    ensure_model_parallel()
    ckpt = import_hf_llava(llava_dir, tmp_path / "ckpt", seq_length=128)
    got = run_distributed(W.resave_tp2, 2, str(ckpt), str(tmp_path / "tp2"), 3)
    layers = [0, 1, W.LAYERS]
    out = tmp_path / "out"
    assert _run_cli("lens", "--checkpoint", str(tmp_path / "tp2"), "--images", *images, "--layers", "0,1,4",
                    "--prompt", PROMPT, "--out", str(out), "--no-pictures") == 0
    result = json.loads((out / "lens.json").read_text())
    reference = {p: reference_nearest(llava_dir, p, layers)[0] for p in images}
    _check_lens(result, images, reference, layers)

    # the training callback's layer-0 tokens under TP=2 (vocab shards merged; padding rows and the
    # image token excluded) equal the float64 recomputation on its probe scenes
    from nemo_basic.analysis.scenes import make_scenes

    scenes = make_scenes(3, W.IMG, 4, seed=0, out_dir=str(tmp_path / "scenes"))
    want = [reference_nearest(llava_dir, s["path"], [0])[0][0] for s in scenes]
    for rank in range(2):
        assert [[row[0] for row in img] for img in got[rank]] == want


def _constructed(llava_dir, chosen, scale=3.0):
    """An HFLlava whose projector maps each patch of ``image`` to scale * E[chosen[p]] (least squares
    on the vision features: exact, 16 patches < 64 hidden units)."""
    from nemo_basic.analysis.lens import HFLlava

    model = HFLlava.load(llava_dir)
    image = Image.fromarray((np.random.default_rng(7).random((28, 28, 3)) * 255).astype("uint8"))
    hf = model.model
    with torch.no_grad():
        feats = hf.model.vision_tower(model.pixels(image), output_hidden_states=True).hidden_states[-2][0, 1:]
        proj = hf.model.multi_modal_projector
        g = proj.act(proj.linear_1(feats)).double()                     # [16, 64]
        E = hf.get_input_embeddings().weight.double()
        target = scale * E[torch.tensor(chosen)]                         # [16, 64]
        w = torch.linalg.lstsq(g, target).solution                       # g @ w = target
        proj.linear_2.weight.copy_(w.T.float())
        proj.linear_2.bias.zero_()
        v = model.visual_embeddings(model.pixels(image)).double()
    cos = torch.nn.functional.cosine_similarity(v, target, dim=-1)
    assert float(cos.min()) > 1 - 1e-5  # the construction holds
    return model, image


def test_constructed_projector_gives_the_chosen_tokens(llava_dir):
    from nemo_basic.analysis.lens import run_lens

    vocab = W.vocabulary()
    names = ["red", "green", "blue", "white", "gray", "circle", "square", "triangle",
             "the", "and", "with", "ab", "x1", "w40", "w41", "background"]
    chosen = [vocab[n] for n in names]
    model, image = _constructed(llava_dir, chosen)
    labels = [[n] for n in names]
    labels[4] = ["grey"]                       # a synonym names gray
    labels[5] = ["round"]                      # a synonym names circle
    result = run_lens(model, [{"image": image, "path": "constructed", "labels": labels}], [0], progress=False)
    entry = result["images"][0]
    assert entry["token_ids"]["0"] == chosen
    assert entry["tokens"]["0"] == names
    m = result["metrics"]["0"]
    assert m["grounded"] == 1.0 and m["grounded_top5"] == 1.0
    assert m["meaningful"] == 9 / 16          # 8 colour/shape words + "background"; not stop words, "ab", "x1", w40
    assert m["distinct_per_image"] == 16 and m["top_token_share"] == 1 / 16
    # half the labels wrong: grounded 0.5; unlabelled patches do not count
    wrong = [lab if i % 2 else ["yellow"] for i, lab in enumerate(labels)]
    wrong[1] = None
    result = run_lens(model, [{"image": image, "path": "constructed", "labels": wrong}], [0], progress=False)
    assert result["metrics"]["0"]["grounded"] == 7 / 15


def test_metrics_on_a_hand_made_grid():
    # two images: 2 x 3 and 2 x 2 patches
    a = ["\u0120red", "the", "\u2581circle", "red", "ab", "x1"]
    a_labels = [["red", "circle"], ["red", "circle"], ["red", "circle"], None, ["blue", "square"], ["gray"]]
    a_top5 = [["red"], ["w1", "circle"], ["circle"], ["red"], ["w1"], ["w2", "grey"]]
    b = ["Green", "green", "green", "squares"]
    b_labels = [["green", "background"], ["white"], None, ["square"]]
    b_top5 = [["green"], ["green"], ["green"], ["squares"]]
    m = M.layer_metrics([a, b], [a_labels, b_labels], [a_top5, b_top5])
    # meaningful: a: red, circle, red (3 of 6); b: all 4 ("Green" -> green, "squares" alphabetic)
    assert m["meaningful"] == pytest.approx(7 / 10)
    # grounded: a labelled 5 patches: red ok, the no, circle ok, ab no, x1 no -> 2; b labelled 3: green ok,
    # green vs white no, squares vs square (plural) ok -> 2; 4 / 8
    assert m["grounded"] == pytest.approx(4 / 8)
    # top-5: a: red, circle (w1 circle), circle, -, -, grey (gray synonym) -> 4; b: green, -, squares -> 2
    assert m["grounded_top5"] == pytest.approx(6 / 8)
    # texts: a has 6 distinct ("Ġred" and "red" differ as texts), b has 3 ("Green" vs "green")
    assert m["distinct_per_image"] == pytest.approx((6 + 3) / 2)
    assert m["top_token_share"] == pytest.approx((1 / 6 + 2 / 4) / 2)
    assert m["distinct_share"] == pytest.approx((6 / 6 + 3 / 4) / 2)
    assert M.layer_metrics([["w1", "w2"]])["grounded"] is None
    assert [M.is_meaningful(t) for t in ("\u0120the", "\u0120Blue", "##ing", "abc1", "\u0120  ")] == \
        [False, True, True, False, False]


def test_nearest_is_exact_and_chunked():
    """TokenTable against a float64 full-matrix argmax, with invalid rows, chunking and a shard offset."""
    from nemo_basic.analysis.nearest import TokenTable, merge_topk, valid_rows

    g = torch.Generator().manual_seed(0)
    E = torch.randn(300, 24, generator=g)
    H = torch.randn(37, 24, generator=g)
    E[5] = 40 * H[3]                                   # row 5 is exactly H[3]'s direction...
    valid = valid_rows(300, 290, exclude=[5])          # ...but excluded; rows >= 290 are padding
    ids, cos = TokenTable(E, valid, chunk=8).topk(H, 5)
    ref = (H.double() @ E.double().T) / (H.double().norm(dim=-1, keepdim=True) * E.double().norm(dim=-1))
    ref[:, ~valid] = -float("inf")
    rv, ri = ref.topk(5, dim=-1)
    assert torch.equal(ids, ri) and torch.allclose(cos, rv, atol=1e-12, rtol=0)
    assert 5 not in ids and int(ids.max()) < 290
    # two vocab shards, merged, equal the whole table
    halves = [TokenTable(E[:150], valid[:150], offset=0), TokenTable(E[150:], valid[150:], offset=150)]
    parts = [t.topk(H, 5) for t in halves]
    mi, mc = merge_topk(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), 5)
    assert torch.equal(mi, ri) and torch.allclose(mc, rv, atol=1e-12, rtol=0)


def test_probe_equals_hf_generate(llava_dir, images, tmp_path):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    out = tmp_path / "probe"
    assert _run_cli("probe", "--hf", str(llava_dir), "--images", *images, "--prompt", PROMPT, "--out", str(out),
                    "--max-new-tokens", "6") == 0
    result = json.loads((out / "probe.json").read_text())
    model = LlavaForConditionalGeneration.from_pretrained(str(llava_dir)).eval()
    proc = AutoImageProcessor.from_pretrained(str(llava_dir))
    vocab = W.vocabulary()
    for row, path in zip(result["images"], images):
        ref, _ = reference_nearest(llava_dir, path, [0])
        assert row["nearest_ids"] == ref[0]
        pixels = proc(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        pre, post = [vocab["the"], vocab["red"]], [vocab["and"]]
        real_ids = torch.tensor([pre + [W.IMAGE_TOKEN_ID] * W.M + post])
        text_ids = torch.tensor([pre + ref[0] + post])  # the nearest tokens as ordinary text tokens
        with torch.no_grad():
            real = model.generate(input_ids=real_ids, pixel_values=pixels, max_new_tokens=6, do_sample=False)
            repl = model.generate(input_ids=text_ids, max_new_tokens=6, do_sample=False)
        assert row["real_ids"] == real[0, real_ids.shape[1]:].tolist()
        assert row["replaced_ids"] == repl[0, text_ids.shape[1]:].tolist()
        assert len(row["real_ids"]) == 6 and row["real"]


def test_scenes_on_the_model_grid(llava_dir, tmp_path):
    out = tmp_path / "scenes"
    assert _run_cli("lens", "--hf", str(llava_dir), "--scenes", "3", "--layers", "0", "--out", str(out),
                    "--no-pictures") == 0
    result = json.loads((out / "lens.json").read_text())
    from nemo_basic.data.embedded import COLORS

    for entry in result["images"]:
        assert entry["grid"] == [4, 4] and len(entry["labels"]) == 16
        img = np.asarray(Image.open(entry["image"]).convert("RGB"))
        assert img.shape == (28, 28, 3)
        for i, lab in enumerate(entry["labels"]):  # a patch named by a colour holds mostly that colour
            r, c = divmod(i, 4)
            if lab[1] != "background":
                patch = img[7 * r:7 * r + 7, 7 * c:7 * c + 7].reshape(-1, 3)
                share = (patch == np.array(COLORS[lab[0]])).all(-1).mean()
                assert share >= 0.5, (entry["image"], i, lab, share)
    m = result["metrics"]["0"]
    assert m["grounded"] is not None and m["labelled_patches"] == 48


def test_clear_errors(llava_dir, images, tmp_path, capsys):
    assert _run_cli("lens", "--hf", str(llava_dir), "--images", *images, "--layers", "0,5", "--out",
                    str(tmp_path / "o")) == 2
    assert "layer 5 is beyond the model's depth" in capsys.readouterr().err
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([[None] * 16]))
    assert _run_cli("lens", "--hf", str(llava_dir), "--images", *images, "--labels", str(labels), "--out",
                    str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "labels.json has 1 entries but 2 images" in err
    labels.write_text(json.dumps([[None] * 9, None]))
    assert _run_cli("lens", "--hf", str(llava_dir), "--images", *images, "--labels", str(labels), "--out",
                    str(tmp_path / "o")) == 2
    assert "have 9 patches but the model sees 16" in capsys.readouterr().err
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert _run_cli("lens", "--hf", str(llm), "--images", *images, "--out", str(tmp_path / "o")) == 2
    assert "has no vision tower" in capsys.readouterr().err
    assert _run_cli("lens", "--hf", str(llava_dir), "--images", str(tmp_path / "missing.png"), "--out",
                    str(tmp_path / "o")) == 2
    assert "missing.png does not exist" in capsys.readouterr().err


def test_labels_file_formats(tmp_path):
    from nemo_basic.analysis.lens import AnalysisError, load_labels
    from nemo_basic.analysis.scenes import scene_patch_labels

    images = [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "y.png")]
    path = tmp_path / "labels.json"
    path.write_text(json.dumps([["red"] * 4, None]))
    assert load_labels(path, images) == [["red"] * 4, None]
    path.write_text(json.dumps({"images": {"y.png": [["blue"]] * 4}}))
    assert load_labels(path, images) == [None, [["blue"]] * 4]
    scene = {"background": "white", "objects": [{"color": "red", "shape": "circle"}],
             "patch_labels": [[0, 1], [1, 0]]}
    path.write_text(json.dumps({"scenes": {"a/x.png": scene}}))
    expect = [["white", "background"], ["red", "circle"], ["red", "circle"], ["white", "background"]]
    assert scene_patch_labels(scene) == expect
    assert load_labels(path, images) == [expect, None]
    path.write_text(json.dumps({"scenes": {"synthetic/z.png": scene}}))
    with pytest.raises(AnalysisError, match="has labels for none of the 2 images"):
        load_labels(path, images)
    path.write_text("{not json")
    with pytest.raises(AnalysisError, match="is not valid JSON"):
        load_labels(path, images)


def test_checkpoint_without_vision_tower_is_named(tmp_path, monkeypatch, capsys, images):
    """A NeMo checkpoint that holds a plain LLM (what load_checkpoint_context reports for one)."""
    import nemo_basic.export.checkpoint as ckpt_mod

    def llm_only(path):
        raise ckpt_mod.CheckpointError(f"{path}/context holds a GPTModel, not a NeVA model")

    monkeypatch.setattr(ckpt_mod, "load_checkpoint_context", llm_only)
    assert _run_cli("lens", "--checkpoint", str(tmp_path / "gpt"), "--images", *images, "--out",
                    str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "gpt has no vision tower" in err and "GPTModel" in err
