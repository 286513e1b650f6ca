"""The 7B and 13B recipes build their NeVA configuration and model on the meta device (no weights):
layer counts, k, parallel sizes and parameter counts, checked against independent references."""
from __future__ import annotations

import pytest

from nemo_basic.recipes import presets
from nemo_basic.testing import run_distributed
from recipes_workers import meta_build

# Hugging Face parameter counts of the LLMs (as published for the checkpoints)
VICUNA_7B = 6_738_415_616
VICUNA_13B = 13_015_864_320
CLIP_L_336 = 303_507_456


def test_analytic_counts_match_hugging_face_modules_on_meta():
    """presets.*_parameters against the transformers modules themselves, built on `meta`."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig
    from transformers import SiglipVisionModel

    for name in ("vicuna-7b-v1.5", "vicuna-13b-v1.5", "mistral-7b-instruct-v0.2"):
        c = presets.LLM_PRESETS[name]
        with torch.device("meta"):
            hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in c.items() if k != "model_type"}))
        assert presets.llm_parameters(c) == sum(p.numel() for p in hf.parameters()), name
    for name, (cfg_cls, model_cls) in {"clip-vit-large-patch14-336": (CLIPVisionConfig, CLIPVisionModel),
                                       "siglip-so400m-patch14-384": (SiglipVisionConfig, SiglipVisionModel)}.items():
        c = presets.VISION_PRESETS[name]
        with torch.device("meta"):
            hf = model_cls(cfg_cls(**{k: v for k, v in c.items() if k not in ("model_type", "class_token")}))
        assert presets.vision_parameters(c) == sum(p.numel() for p in hf.parameters()), name
    assert presets.llm_parameters(presets.LLM_PRESETS["vicuna-7b-v1.5"]) == VICUNA_7B
    assert presets.llm_parameters(presets.LLM_PRESETS["vicuna-13b-v1.5"]) == VICUNA_13B


@pytest.mark.slow
def test_7b_and_13b_build_on_meta():
    (results,) = run_distributed(meta_build, 1, [
        ("conf/llava15_7b_stage1.yaml", 1, []), ("conf/llava15_7b_stage2.yaml", 2, []),
        ("conf/llava15_13b_stage1.yaml", 1, []), ("conf/llava15_13b_stage2.yaml", 2, []),
        ("conf/siglip_vicuna7b_stage1.yaml", 1, []), ("conf/embedded_stage1.yaml", 1, []),
    ], timeout=900)
    by = {r["path"].split("/")[-1]: r for r in results}
    expect = {  # tp, pp, sp, layers, k, freeze LM, image tokens
        "llava15_7b_stage1.yaml": (1, 1, False, 32, 16, True, 576),
        "llava15_7b_stage2.yaml": (2, 1, True, 32, 16, False, 576),
        "llava15_13b_stage1.yaml": (1, 1, False, 40, 20, True, 576),
        "llava15_13b_stage2.yaml": (4, 1, True, 40, 20, False, 576),
        "siglip_vicuna7b_stage1.yaml": (1, 1, False, 32, 16, True, 729),
        "embedded_stage1.yaml": (1, 1, False, 30, 15, True, 64),
    }
    for name, want in expect.items():
        r = by[name]
        assert (r["tp"], r["pp"], r["sp"], r["num_layers"], r["k"], r["freeze_lm"], r["img_seq_len"]) == want, name
        assert r["freeze_vision"] and r["capture_k"] == r["k"] and r["device"] == {"meta"}, name
        arch = r["arch"]  # the counts computed from the configuration alone equal the built model's
        assert (r["llm"], r["vision"], r["projector"], r["total"]) == (
            arch.llm_params, arch.vision_params, arch.projector_params, arch.total_params), name
    b7, b13 = by["llava15_7b_stage1.yaml"], by["llava15_13b_stage1.yaml"]
    assert b7["llm"] == VICUNA_7B and b13["llm"] == VICUNA_13B
    assert b7["vision"] == b13["vision"] == CLIP_L_336
    assert b7["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert b13["projector"] == 1024 * 5120 + 5120 + 5120 * 5120 + 5120
    assert b7["total"] == 7_062_902_784 and abs(b7["total"] / 7.0e9 - 1) < 0.03
    assert b13["total"] == 13_350_839_296 and abs(b13["total"] / 13.0e9 - 1) < 0.03
    assert by["llava15_7b_stage2.yaml"]["total"] == b7["total"]


@pytest.mark.slow
def test_7b_stage2_tensor_parallel_shards_on_meta():
    """TP=2 (the 7B stage-2 setting) on two ranks: each holds half of every split matrix and the
    whole of the replicated norms (vocabulary 32000 = 125 x 256, no padding)."""
    results = run_distributed(meta_build, 2, [("conf/llava15_7b_stage2.yaml", 2, [])], timeout=900)
    layers, hidden = 32, 4096
    replicated = layers * 2 * hidden + hidden  # RMSNorm weights
    for (r,) in results:
        assert r["tp"] == 2 and r["llm"] == (VICUNA_7B - replicated) // 2 + replicated
        assert r["vision"] == CLIP_L_336  # the HF tower is replicated on the TP ranks
