"""Phi-3 LongRoPE (``rope_scaling`` type longrope, as Phi-3-mini-128k and Phi-3.5-mini) between Hugging
Face and Megatron-core, against the HF model (tiny, random, fp32, eager attention):

* our GPT's logits equal HF's (1e-4) on a sequence past ``original_max_position_embeddings`` (HF's
  long factors) and on one within it (short factors), with one converted model;
* the factors and the attention factor matter (removing either moves the logits by > 1e-2);
* export gives HF's tensors and a Phi3Config whose HF model gives the original's logits.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from nemo_basic.convert import (
    build_gpt_model,
    ensure_model_parallel,
    hf_llama_config_to_mcore,
    hf_llama_to_mcore,
    llama_config_kwargs,
    load_mcore_state_dict,
    mcore_to_hf_llama,
    nemo_llama_config_to_hf,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _family_workers as W  # noqa: E402

ORIGINAL = 32


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    started = ensure_model_parallel(1)
    yield
    if started:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def phi3_longrope_config(**changes):
    from transformers import Phi3Config

    head_dim = W.HIDDEN // W.HEADS
    g = torch.Generator().manual_seed(11)
    short = (1.0 + 2.0 * torch.rand(head_dim // 2, generator=g)).tolist()   # in [1, 3]
    long = (2.0 + 6.0 * torch.rand(head_dim // 2, generator=g)).tolist()    # in [2, 8]
    cfg = {**W.hf_text_config("phi3").to_dict(), "original_max_position_embeddings": ORIGINAL,
           "max_position_embeddings": 256, "attn_implementation": "eager",
           "rope_scaling": {"type": "longrope", "short_factor": short, "long_factor": long}}
    cfg.update(changes)
    return Phi3Config(**cfg)


def hf_phi3(config, state_dict=None, seed: int = 4):
    from transformers import Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    if state_dict is None:
        W.randomise(model, seed)
    else:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def our_logits(config, sd, ids):
    model = build_gpt_model(config).eval()
    load_mcore_state_dict(model, sd)
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), None)[..., :W.VOCAB]


def test_longrope_logits_equal_hf_and_export_reproduces_it():
    hf = hf_phi3(phi3_longrope_config())
    ids = torch.randint(0, W.VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    config = hf_llama_config_to_mcore(hf.config, seq_length=64)
    assert config.rope_longrope["original_max_position_embeddings"] == ORIGINAL
    sd = hf_llama_to_mcore(hf.state_dict(), config)
    model_long, model_short = logits_of(hf, ids), logits_of(hf, ids[:, :20])
    assert model_long.abs().max() > 1.0
    # one Megatron model: 40 > 32 positions take HF's long factors, 20 its short ones
    torch.testing.assert_close(our_logits(config, sd, ids), model_long, rtol=0, atol=1e-4)
    torch.testing.assert_close(our_logits(config, sd, ids[:, :20]), model_short, rtol=0, atol=1e-4)
    # HF's switch is real: the same 20 prefix positions differ between the two regimes
    assert (model_long[:, :20] - model_short).abs().max() > 1e-2

    # the factors matter (HF without rope_scaling), and so does the attention factor (softmax_scale)
    plain = hf_phi3(phi3_longrope_config(rope_scaling=None), hf.state_dict())
    assert (logits_of(plain, ids) - model_long).abs().max() > 1e-2
    unscaled = hf_llama_config_to_mcore(hf.config, seq_length=64)
    assert unscaled.softmax_scale > (W.HIDDEN // W.HEADS) ** -0.5 * 1.5  # s² = 1 + ln 8 / ln 32 = 1.6
    unscaled.softmax_scale = None
    assert (our_logits(unscaled, sd, ids) - model_long).abs().max() > 1e-2

    # export: the same tensors, and a config that makes HF compute the same model
    back = mcore_to_hf_llama(sd, config)
    hf_sd = hf.state_dict()
    assert set(back) == set(hf_sd)
    for key, value in hf_sd.items():
        assert torch.equal(back[key], value), key
    hc = nemo_llama_config_to_hf(config)
    for field in ("rope_scaling", "max_position_embeddings", "original_max_position_embeddings", "rope_theta"):
        assert getattr(hc, field) == getattr(hf.config, field), field
    fresh = hf_phi3(type(hf.config)(**{**hc.to_dict(), "attn_implementation": "eager"}), back)
    torch.testing.assert_close(logits_of(fresh, ids), model_long, rtol=0, atol=0)
    torch.testing.assert_close(logits_of(fresh, ids[:, :20]), model_short, rtol=0, atol=0)


def test_longrope_config_checks():
    cfg = phi3_longrope_config().to_dict()
    kw = llama_config_kwargs({**cfg, "rope_scaling": {**cfg["rope_scaling"], "type": "su"}})
    assert kw["rope_longrope"]["short_factor"] == cfg["rope_scaling"]["short_factor"]
    given = llama_config_kwargs({**cfg, "rope_scaling": {**cfg["rope_scaling"], "attention_factor": 2.0}})
    assert given["softmax_scale"] == pytest.approx(4.0 / 4.0)  # 2² / √16
    with pytest.raises(ValueError, match=r"rope_scaling\['long_factor'\] must be a list of head_dim / 2 = 8"):
        llama_config_kwargs({**cfg, "rope_scaling": {**cfg["rope_scaling"], "long_factor": [1.0] * 4}})
