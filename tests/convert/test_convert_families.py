"""Qwen2, Llama-3.x, Mistral, Gemma and Phi-3 between Hugging Face and Megatron-core, and the LM loss
over a padded vocabulary, against the Hugging Face models (tiny, random, fp32, eager attention):

* text logits of the converted GPT equal HF's (1e-4); TP=2 equals TP=1;
* HF -> Megatron -> HF gives back the same tensors bit for bit (and the family's HF config);
* an HF LLaVA on each family (with a CLIP and with a SigLIP tower) imported into our NeVA
  gives HF LLaVA's logits, and, with the vocabulary 500 padded to 512, HF's LM loss (1e-5) at
  TP=1 and TP=2: the padding logits never enter the softmax;
* features the Megatron model would not reproduce are rejected naming the field.
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
from nemo_basic.testing import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _family_workers as W  # noqa: E402

# the Hugging Face path under the transformers the GPU machine's wheel kit carries (scripts/check_gpu_machine_stack.sh)
pytestmark = pytest.mark.gpu_path

FAMILIES = W.FAMILIES
LLAVA_CASES = [(f, t) for f in W.FAMILIES for t in ("clip", "siglip")]


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    started = ensure_model_parallel(1)
    yield
    if started:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def text_ids():
    return torch.randint(0, W.VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_models():
    return {f: W.tiny_hf_lm(f, seed=i) for i, f in enumerate(FAMILIES)}


def our_logits(config, sd, ids):
    model = build_gpt_model(config).eval()
    load_mcore_state_dict(model, sd)
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), None)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_logits_equal_hf_and_round_trip_is_exact(family, hf_models, text_ids):
    hf = hf_models[family]
    config = hf_llama_config_to_mcore(hf.config)
    assert (config.vocab_size, config.hf_vocab_size, config.hf_model_type) == (512, W.VOCAB, family.rstrip("3")
                                                                               if family == "llama3" else family)
    sd = hf_llama_to_mcore(hf.state_dict(), config)
    with torch.no_grad():
        ref = hf(text_ids).logits
    logits = our_logits(config, sd, text_ids)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(logits[..., :W.VOCAB], ref, rtol=0, atol=1e-4)
    assert torch.all(logits[..., W.VOCAB:] == float("-inf"))
    back = mcore_to_hf_llama(sd, config)
    hf_sd = hf.state_dict()
    assert set(back) == set(hf_sd)
    for key, value in hf_sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    hc = nemo_llama_config_to_hf(config)
    assert type(hc) is type(hf.config)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "rope_scaling",
                  "hidden_act", "sliding_window"):
        if hasattr(hf.config, field):
            assert getattr(hc, field) == getattr(hf.config, field), field
    fresh = type(hf)(hc)
    fresh.load_state_dict(back, strict=True)


def test_llama3_rope_scaling_matters(hf_models, text_ids):
    """The llama3 frequencies change the logits (so the equality above checks them)."""
    hf = hf_models["llama3"]
    config = hf_llama_config_to_mcore(hf.config)
    plain = hf_llama_config_to_mcore({**hf.config.to_dict(), "rope_scaling": None})
    sd = hf_llama_to_mcore(hf.state_dict(), config)
    assert (our_logits(config, sd, text_ids) - our_logits(plain, sd, text_ids))[..., :W.VOCAB].abs().max() > 1e-2


def test_gemma_exact_gelu_checkpoints(text_ids):
    """gemma-2b's config.json says hidden_act="gelu" (transformers' GemmaMLP uses it: the erf GELU)."""
    from transformers import GemmaForCausalLM

    torch.manual_seed(5)
    hf = W.randomise(GemmaForCausalLM(W.hf_text_config("gemma").__class__(
        **{**W.hf_text_config("gemma").to_dict(), "hidden_act": "gelu"})), 5).eval()
    config = hf_llama_config_to_mcore(hf.config)
    assert config.activation_func is torch.nn.functional.gelu
    with torch.no_grad():
        ref = hf(text_ids).logits
    logits = our_logits(config, hf_llama_to_mcore(hf.state_dict(), config), text_ids)
    torch.testing.assert_close(logits[..., :W.VOCAB], ref, rtol=0, atol=1e-4)
    assert nemo_llama_config_to_hf(config).hidden_act == "gelu"


def test_rejected_features_are_named():
    phi = W.hf_text_config("phi3").to_dict()
    with pytest.raises(ValueError, match="rope_scaling.*dynamic"):  # longrope: test_convert_phi3_longrope.py
        llama_config_kwargs({**phi, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    mistral = W.hf_text_config("mistral").to_dict()
    with pytest.raises(ValueError, match="sliding_window=256 is smaller than seq_length=300"):
        llama_config_kwargs(mistral, seq_length=300)
    assert llama_config_kwargs(mistral)["hf_sliding_window"] == 256
    qwen = W.hf_text_config("qwen2").to_dict()
    with pytest.raises(ValueError, match="sliding_window"):
        llama_config_kwargs({**qwen, "use_sliding_window": True, "sliding_window": 64}, seq_length=128)
    gemma = W.hf_text_config("gemma").to_dict()
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        llama_config_kwargs({**gemma, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        llama_config_kwargs({**gemma, "model_type": "gpt2"})


# -- LLaVA on each family, and the LM loss with the padded vocabulary ----------------------------
@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return {(f, t): W.make_hf_llava(root / f"{f}-{t}", f, t, seed=3) for f, t in LLAVA_CASES}


@pytest.fixture(scope="module")
def inputs():
    return W.llava_inputs()


def hf_llava_logits_and_loss(hf_dir, inputs, trains_first: bool):
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    labels = inputs["hf_labels"] if trains_first else inputs["hf_labels_neva"]
    with torch.no_grad():
        out = hf(input_ids=inputs["hf_ids"], pixel_values=inputs["pixels"], labels=labels)
    return out.logits, out.loss


@pytest.mark.parametrize("family,tower", LLAVA_CASES)
def test_llava_logits_and_lm_loss_equal_hf(family, tower, llava_dirs, inputs):
    model = W.neva_from_hf_llava(str(llava_dirs[family, tower]))
    logits, loss, trains_first = W.neva_logits_and_loss(model, inputs)
    ref_logits, ref_loss = hf_llava_logits_and_loss(llava_dirs[family, tower], inputs, trains_first)
    if (family, tower) == ("qwen2", "clip"):  # without the mask the 12 zero padding logits enter the softmax
        mask = model.language_model.padded_vocab_mask
        mask.true_vocab = mask.padded_vocab
        _, unmasked, _ = W.neva_logits_and_loss(model, inputs)
        mask.true_vocab = W.VOCAB
        assert abs(float(unmasked) - float(ref_loss)) > 1e-3
    ref_logits = ref_logits[:, :-1]  # NeVA's input is T[:-1] (its labels T[1:])
    assert logits.shape[:2] == ref_logits.shape[:2]  # NeVA expands the one placeholder into M positions
    torch.testing.assert_close(logits[..., :W.VOCAB], ref_logits, atol=1e-4, rtol=0)
    assert ref_logits.abs().max() > 0.5
    torch.testing.assert_close(loss.double(), ref_loss.double(), atol=1e-5, rtol=0)


def test_tp2_equals_tp1_and_padded_lm_loss_at_tp2(hf_models, text_ids, llava_dirs, inputs):
    """One spawned pair of ranks: every family's TP=2 text logits equal TP=1's; the vocab-500 Qwen2
    LLaVA's TP=2 LM loss equals HF's (its padding rows 500..511 all sit on TP rank 1)."""
    cases, ref = {}, {}
    for family in FAMILIES:
        # Gemma-2B is multi-query; Megatron splits KV heads over TP ranks, so TP=2 needs 2 of them
        hf = W.tiny_hf_lm(family, kv_heads=2 if family == "gemma" else None, seed=7)
        config = hf_llama_config_to_mcore(hf.config)
        sd = hf_llama_to_mcore(hf.state_dict(), config)
        cases[family] = (hf.config.to_dict(), sd, text_ids)
        ref[family] = our_logits(config, sd, text_ids)
    llava = llava_dirs["qwen2", "clip"]
    out = run_distributed(W.tp2_worker, 2, cases, str(llava), inputs)
    for family in FAMILIES:
        torch.testing.assert_close(out[0][family][..., :W.VOCAB], ref[family][..., :W.VOCAB], atol=1e-5, rtol=0)
        assert torch.all(out[0][family][..., W.VOCAB:] == float("-inf"))
    ref_logits, ref_loss = hf_llava_logits_and_loss(llava, inputs, out[0]["trains_first"])
    torch.testing.assert_close(out[0]["llava_logits"][..., :W.VOCAB], ref_logits[:, :-1], atol=1e-4, rtol=0)
    for rank in (0, 1):
        torch.testing.assert_close(out[rank]["llava_loss"].double(), ref_loss.double(), atol=1e-5, rtol=0)


def test_mask_is_not_installed_without_padding():
    """A vocabulary that is already a multiple of 128: no hook, the model is upstream's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64))
    model = build_gpt_model(hf_llama_config_to_mcore(hf.config))
    assert not model.output_layer._forward_hooks and not hasattr(model, "padded_vocab_mask")


@pytest.mark.parametrize("family,tower", [("gemma", "siglip"), ("phi3", "clip")])
def test_llava_import_export_round_trip_is_exact(family, tower, llava_dirs, tmp_path):
    """HF LLaVA -> our checkpoint -> HF LLaVA (fp32): the same tensors, and the family's text config."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from nemo_basic.export.hf import export_hf_llava, import_hf_llava

    src = llava_dirs[family, tower]
    ckpt = import_hf_llava(src, tmp_path / "ckpt", seq_length=64)
    out = export_hf_llava(ckpt, tmp_path / "hf", dtype=torch.float32)
    from nemo_basic.models.builder import read_hf_state_dict
    from nemo_basic.export.llava import HF_LLAVA_RENAME

    a, b = read_hf_state_dict(src, rename=HF_LLAVA_RENAME), {}  # transformers writes the legacy names
    for f in sorted(out.glob("*.safetensors")):
        b.update(load_file(str(f)))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    text_src, text_out = AutoConfig.from_pretrained(str(src)).text_config, AutoConfig.from_pretrained(str(out)).text_config
    assert type(text_out) is type(text_src)
    for field in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
                  "tie_word_embeddings", "rope_theta"):
        if hasattr(text_src, field):
            assert getattr(text_out, field) == getattr(text_src, field), field
