"""HF Llama <-> Megatron-core GPT: logits against the Hugging Face model, exact round trips, both
layernorm namings, vocabulary padding, and loud failures."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from nemo_basic.convert import (
    build_gpt_model,
    convert_mcore_spec,
    ensure_model_parallel,
    hf_llama_config_to_mcore,
    hf_llama_to_mcore,
    llama_config_kwargs,
    load_mcore_state_dict,
    mcore_to_hf_llama,
    nemo_llama_config_to_hf,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _convert_workers import VOCAB, positions, tiny_hf_config, tiny_hf_llama  # noqa: E402

# the Hugging Face path under the transformers the GPU machine's wheel kit carries (scripts/check_gpu_machine_stack.sh)
pytestmark = pytest.mark.gpu_path

TIED = [pytest.param(False, id="untied"), pytest.param(True, id="tied")]


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    started = ensure_model_parallel(1)
    yield
    if started:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))


def mcore_logits(config, state_dict, input_ids):
    model = build_gpt_model(config).eval()
    load_mcore_state_dict(model, state_dict)
    with torch.no_grad():
        return model(input_ids, positions(input_ids), None)


@pytest.mark.parametrize("tied", TIED)
def test_megatron_logits_equal_hf(tied, input_ids):
    hf = tiny_hf_llama(tied)
    config = hf_llama_config_to_mcore(hf.config)
    assert (config.vocab_size, config.hf_vocab_size) == (256, VOCAB)
    with torch.no_grad():
        ref = hf(input_ids).logits
    logits = mcore_logits(config, hf_llama_to_mcore(hf.state_dict(), config), input_ids)
    assert logits.shape == (2, 19, 256)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(logits[..., :VOCAB], ref, rtol=0, atol=1e-4)
    assert torch.all(logits[..., VOCAB:] == float("-inf"))  # padding logits never enter a softmax


@pytest.mark.parametrize("tied", TIED)
def test_round_trip_is_bit_identical(tied):
    hf = tiny_hf_llama(tied)
    config = hf_llama_config_to_mcore(hf.config)
    hf_sd = hf.state_dict()
    mcore_sd = hf_llama_to_mcore(hf_sd, config)
    assert mcore_sd["embedding.word_embeddings.weight"].shape == (256, 64)
    assert ("output_layer.weight" in mcore_sd) is (not tied)
    back = mcore_to_hf_llama(mcore_sd, config)
    assert set(back) == set(hf_sd)
    for key, value in hf_sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    fresh = type(hf)(hf.config)
    fresh.load_state_dict(back, strict=True)  # the export is a loadable HF state dict


def test_te_naming_round_trip():
    hf = tiny_hf_llama(False)
    config = hf_llama_config_to_mcore(hf.config)
    local = hf_llama_to_mcore(hf.state_dict(), config, spec="local")
    te = convert_mcore_spec(local, "local", "te")
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in te)
    assert "decoder.final_layernorm.weight" in te
    direct = hf_llama_to_mcore(hf.state_dict(), config, spec="te")
    assert set(direct) == set(te) and all(torch.equal(direct[k], te[k]) for k in te)
    back = convert_mcore_spec(te, "te", "local")
    assert set(back) == set(local) and all(torch.equal(back[k], local[k]) for k in local)
    hf_back = mcore_to_hf_llama(te, config, spec="te")
    assert all(torch.equal(hf_back[k], v) for k, v in hf.state_dict().items())


def test_spec_mismatch_fails_loudly():
    hf = tiny_hf_llama(False)
    config = hf_llama_config_to_mcore(hf.config)
    te = hf_llama_to_mcore(hf.state_dict(), config, spec="te")
    model = build_gpt_model(config)
    with pytest.raises(KeyError, match="input_layernorm"):
        load_mcore_state_dict(model, te)


def test_prefix_and_llava_style_hf_keys(input_ids):
    """LLaVA checkpoints nest the language model; Megatron's LLaVAModel prefixes 'language_model.'."""
    hf = tiny_hf_llama(False)
    config = hf_llama_config_to_mcore(hf.config)
    nested = {("lm_head.weight" if k == "lm_head.weight" else "model.language_model." + k[len("model."):]): v
              for k, v in hf.state_dict().items()}
    nested["model.vision_tower.some.weight"] = torch.zeros(3)  # other components are left alone
    sd = hf_llama_to_mcore(nested, config, prefix="language_model.")
    assert all(k.startswith("language_model.") for k in sd)
    plain = hf_llama_to_mcore(hf.state_dict(), config)
    assert all(torch.equal(sd["language_model." + k], v) for k, v in plain.items())
    back = mcore_to_hf_llama(sd, config, prefix="language_model.", hf_prefix="model.language_model.")
    assert set(back) == set(nested) - {"model.vision_tower.some.weight"}


def test_config_mapping():
    hc = tiny_hf_config(tied=True)
    kw = llama_config_kwargs(hc, seq_length=64)
    assert kw["num_query_groups"] == 2 and kw["kv_channels"] == 16 and kw["num_attention_heads"] == 4
    assert kw["rotary_base"] == 50000 and kw["layernorm_epsilon"] == 1e-5 and kw["seq_length"] == 64
    assert kw["normalization"] == "RMSNorm" and kw["gated_linear_unit"] and not kw["add_bias_linear"]
    assert kw["activation_func"] is torch.nn.functional.silu
    assert kw["share_embeddings_and_output_weights"] and kw["position_embedding_type"] == "rope"
    assert kw["vocab_size"] == 256 and kw["hf_vocab_size"] == VOCAB
    if not torch.cuda.is_available():
        for flag in ("bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm", "bias_dropout_fusion",
                     "gradient_accumulation_fusion", "apply_rope_fusion"):
            assert kw[flag] is False, flag
    # the padded size follows divisible_by x TP; an explicit vocab_size wins
    assert llama_config_kwargs(hc, make_vocab_size_divisible_by=64, tensor_model_parallel_size=8)["vocab_size"] == 512
    assert llama_config_kwargs(hc, vocab_size=250)["vocab_size"] == 250
    # the inverse mapping reproduces the HF architecture fields
    back = nemo_llama_config_to_hf(hf_llama_config_to_mcore(hc))
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                  "max_position_embeddings"):
        assert getattr(back, field) == getattr(hc, field), field


def test_unsupported_and_malformed_inputs_are_named():
    hc = tiny_hf_config(tied=False)
    with pytest.raises(ValueError, match="attention_bias"):
        llama_config_kwargs({**hc.to_dict(), "attention_bias": True})
    with pytest.raises(ValueError, match="hidden_act"):
        llama_config_kwargs({**hc.to_dict(), "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope_scaling"):
        llama_config_kwargs({**hc.to_dict(), "rope_scaling": {"rope_type": "yarn", "factor": 8.0}})
    hf = tiny_hf_llama(False)
    config = hf_llama_config_to_mcore(hf.config)
    sd = dict(hf.state_dict())
    del sd["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        hf_llama_to_mcore(sd, config)
    sd = dict(hf.state_dict())
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(64, 64\)"):
        hf_llama_to_mcore(sd, config)
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        hf_llama_to_mcore(sd, config)
    sd = dict(hf.state_dict())
    del sd["lm_head.weight"]
    with pytest.raises(KeyError, match="lm_head"):
        hf_llama_to_mcore(sd, config)


def test_nemo_config_builds_the_same_model(input_ids):
    """NeMo's LlamaConfig.configure_model builds the local-spec GPTModel the converted weights fit."""
    from nemo_basic.convert import hf_llama_config_to_nemo

    hf = tiny_hf_llama(True, seed=3)
    config = hf_llama_config_to_nemo(hf.config, seq_length=64)
    from nemo.collections import llm

    assert isinstance(config, llm.LlamaConfig)
    assert (config.vocab_size, config.hf_vocab_size, config.num_query_groups, config.kv_channels) == (256, 250, 2, 16)
    assert config.rotary_base == 50000 and config.share_embeddings_and_output_weights
    model = config.configure_model(None).eval()  # vocab_size is set: no tokenizer needed
    load_mcore_state_dict(model, hf_llama_to_mcore(hf.state_dict(), config))
    with torch.no_grad():
        logits = model(input_ids, positions(input_ids), None)
        ref = hf(input_ids).logits
    torch.testing.assert_close(logits[..., :VOCAB], ref, rtol=0, atol=1e-4)
