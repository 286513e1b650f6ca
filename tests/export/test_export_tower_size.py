"""``export-hf`` declares the image size the tower is fed, not its pre-training size (issue 24).

A tower trained at a size other than its config's ``image_size`` (the embedded default's DINOv2 is
fed 112 px on a 518 px table; here: 28 px on a 56 px table) is exported with
``vision_config.image_size`` = the processor's size and its position table resampled to that grid,
so an engine that counts image tokens from the config (vLLM) counts them right, and transformers
computes the same numbers without interpolating:

* per tower (CLIP, SigLIP, DINOv2), in float64: the exported tower at 28 px equals the original
  tower interpolating its 56 px table at run time (CLIP and SigLIP with ``interpolate_pos_encoding``);
* per LLaVA (DINOv2, CLIP), ``import-hf`` then ``export-hf --dtype float32``: the export's config says
  28 px and 16 image tokens, and its logits equal the original HF LLaVA's on the same pixels
  (DINOv2: transformers interpolates; CLIP: with ``interpolate_pos_encoding``): bit for bit in
  float32; in float64 to 1e-10 (DINOv2) and 1e-6 (CLIP, whose float64 reference interpolates the
  table in float64 where the export did it in float32, the checkpoint's dtype).
"""
from __future__ import annotations

import json

import pytest
import torch

import _export_workers as W

pytestmark = pytest.mark.gpu_path

NATIVE, FED = 56, W.IMG  # 8 x 8 position grid, fed 4 x 4 patches
assert FED == 28


def _tower(kind: str):
    from transformers import (CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, SiglipVisionConfig,
                              SiglipVisionModel)

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=NATIVE, patch_size=W.PATCH)
    if kind == "clip":
        return CLIPVisionModel, CLIPVisionConfig(intermediate_size=64, **common)
    if kind == "siglip":
        return SiglipVisionModel, SiglipVisionConfig(intermediate_size=64, **common)
    return Dinov2Model, Dinov2Config(mlp_ratio=2, **common)


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_resampled_tower_equals_runtime_interpolation(kind):
    from nemo_basic.export.llava import position_table_at_input_size
    from nemo_basic.models.vision import HFVisionEncoderConfig

    cls, cfg = _tower(kind)
    torch.manual_seed(0)
    original = cls(cfg).double().eval()
    with torch.no_grad():  # a position table far from its init, so that a wrong resampling shows
        for name, p in original.named_parameters():
            if "position_embedding" in name:
                p.normal_(0.0, 1.0)
    vision = HFVisionEncoderConfig(hf_config=cfg.to_dict(), image_size=FED)
    state = original.state_dict()
    changed = position_table_at_input_size(state, vision)
    assert len([k for k in changed if "position_ids" not in k]) == 1
    fed_cfg = type(cfg)(**{**cfg.to_dict(), "image_size": FED})
    exported = cls(fed_cfg).double().eval()
    exported.load_state_dict({**state, **changed})
    grid = (FED // W.PATCH) ** 2
    table = next(v for k, v in changed.items() if "position_ids" not in k)
    assert table.reshape(-1, 32).shape[0] == grid + (0 if kind == "siglip" else 1)

    pixels = torch.randn(2, 3, FED, FED, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = {} if kind == "dinov2" else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        ref = original(pixels, output_hidden_states=True, **kw).hidden_states
        got = exported(pixels, output_hidden_states=True).hidden_states
        if kind != "dinov2":  # without interpolation the original cannot take 28 px at all
            with pytest.raises((ValueError, RuntimeError)):
                original(pixels)
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-12, float((a - b).abs().max())
    assert float(ref[-1].abs().max()) > 0.1


def _llava(path, kind: str):
    """A tiny HF LLaVA whose tower declares 56 px and whose processor gives 28 px."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    _, tower = _tower(kind)
    proc = W.clip_processor(FED) if kind == "clip" else W.dinov2_processor(FED)
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=tower.to_dict(), text_config=W.llama_config(layers=2).to_dict(),
                      image_token_index=W.IMAGE_TOKEN_ID, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=W.M)
    model = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.5)
        for name, p in model.named_parameters():
            if "position_embedding" in name:
                p.normal_(0.0, 1.0)
    model.save_pretrained(str(path))
    W.tiny_tokenizer(image_token=True).save_pretrained(str(path))
    proc.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_export_declares_fed_size_with_equal_logits(kind, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from nemo_basic.convert import ensure_model_parallel
    from nemo_basic.export.hf import export_hf_llava, import_hf_llava

    src = _llava(tmp_path / "src", kind)
    ensure_model_parallel()
    ckpt = import_hf_llava(src, tmp_path / "ckpt", seq_length=64)
    ensure_model_parallel()
    out = export_hf_llava(ckpt, tmp_path / "hf", dtype="float32")

    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["image_size"] == FED and config["vision_config"]["patch_size"] == W.PATCH
    assert config["image_seq_length"] == W.M == (FED // W.PATCH) ** 2
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": FED, "width": FED}
    assert json.loads((src / "config.json").read_text())["vision_config"]["image_size"] == NATIVE

    hf_ids, _, pixels = W.neva_inputs()

    def logits(directory, dtype, interpolate=False, image=pixels):
        model = LlavaForConditionalGeneration.from_pretrained(str(directory), attn_implementation="eager",
                                                              dtype=dtype).eval()
        if interpolate:  # transformers' LLaVA does not pass interpolate_pos_encoding to its tower
            tower = model.model.vision_tower
            plain = tower.forward
            tower.forward = lambda *a, **k: plain(*a, interpolate_pos_encoding=True, **k)
        with torch.no_grad():
            return model(input_ids=hf_ids, pixel_values=image.to(dtype)).logits

    # float32, as trained and served: the same numbers bit for bit (the table was resampled by the
    # very operation transformers runs on the float32 table)
    ref32, got32 = logits(src, torch.float32, kind == "clip"), logits(out, torch.float32)
    assert ref32.shape == got32.shape and torch.equal(ref32, got32), float((ref32 - got32).abs().max())
    # float64: DINOv2 interpolates in float32 whatever the dtype (equal to 1e-10); CLIP in the
    # model's dtype, so the float64 reference differs by the float32 rounding of the table only
    ref64, got64 = logits(src, torch.float64, kind == "clip"), logits(out, torch.float64)
    diff = float((ref64 - got64).abs().max())
    assert diff <= (1e-10 if kind == "dinov2" else 1e-6), diff
    assert float(ref64.abs().max()) > 0.1
    # the image part matters: other pixels give other logits
    other = logits(out, torch.float64, image=torch.zeros_like(pixels))
    assert float((other - got64).abs().max()) > 1e-4
