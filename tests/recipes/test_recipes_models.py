"""The 7B and 13B recipes build their NeVA configuration and model on the meta device (no weights):
layer counts, k, parallel sizes and parameter counts, checked against independent references."""
from __future__ import annotations

import pytest

from nemo_basic.recipes import presets
from nemo_basic.testing import run_distributed
from recipes_workers import meta_build

# parameter counts as published for the checkpoints (their safetensors index / model cards)
VICUNA_7B = 6_738_415_616
VICUNA_13B = 13_015_864_320
MISTRAL_7B = 7_241_732_096
CLIP_L_336 = 303_507_456
# Qwen/Qwen2.5-0.5B: 494,032,768, and by hand: embeddings 151936 x 896 (tied) + 24 layers x (q 896^2 + 896,
# k and v 896 x 128 + 128 each, o 896^2, MLP 3 x 896 x 4864, 2 norms x 896) + the final norm 896
QWEN25_05B = 151936 * 896 + 24 * (896 * 896 + 896 + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896) + 896
QWEN25_05B_FIELDS = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)


def test_parameter_counts_equal_the_published_ones():
    """The counts `--check` prints come from transformers' own modules on `meta`; they equal the
    published totals, q/k/v biases (Qwen2) included, and need no weights."""
    assert QWEN25_05B == 494_032_768
    assert presets.hf_parameters("llm", presets.LLM_PRESETS["vicuna-7b-v1.5"]) == VICUNA_7B
    assert presets.hf_parameters("llm", presets.LLM_PRESETS["vicuna-13b-v1.5"]) == VICUNA_13B
    assert presets.hf_parameters("llm", presets.LLM_PRESETS["mistral-7b-instruct-v0.2"]) == MISTRAL_7B
    assert presets.hf_parameters("llm", QWEN25_05B_FIELDS) == QWEN25_05B
    assert presets.hf_parameters("vision", presets.VISION_PRESETS["clip-vit-large-patch14-336"]) == CLIP_L_336


def test_an_architecture_transformers_cannot_build_is_named():
    with pytest.raises(presets.ArchitectureError, match="the llm architecture \\(model_type 'no-such-model'\\) "
                                                        "is not one transformers can build"):
        presets.hf_parameters("llm", dict(presets.LLM_PRESETS["vicuna-7b-v1.5"], model_type="no-such-model"))


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
