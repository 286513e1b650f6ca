"""NeMo 2 language-model configs for converted Hugging Face checkpoints (imports NeMo).

Each class is NeMo's own config for the family (fields, layer spec, ``configure_model``) plus
the Hugging Face facts that must survive a NeMo checkpoint (they are dataclass fields, so NeMo's
``io`` serialises them): the unpadded vocabulary ``hf_vocab_size`` (export, and the padded-vocab
logit mask), ``hf_model_type``, ``hf_sliding_window``, Llama-3's ``rope_llama3`` and Phi-3's
``rope_longrope``. After NeMo builds the Megatron ``GPTModel``, :func:`nemo_basic.convert.families.finish_gpt_model`
adds what a Megatron config cannot say (Gemma's input scaling and, on the local spec, its
zero-centred norms; Phi-3's LongRoPE frequencies; the padding-logit mask).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import nemo_basic.compat as _compat

_compat.apply_nemo()

from nemo.collections import llm  # noqa: E402
from nemo.collections.llm.gpt.model.llama import Llama31Config  # noqa: E402

from nemo_basic.convert.families import Family, finish_gpt_model, local_norms_zero_centered  # noqa: E402


class _FromHF:
    """``configure_model`` of NeMo's config, then :func:`finish_gpt_model`."""

    def configure_model(self, tokenizer, pre_process=None, post_process=None, vp_stage=None):
        zero_centered_local = local_norms_zero_centered(self)
        if zero_centered_local:  # Megatron's WrappedTorchNorm asserts on the flag; restored below
            self.layernorm_zero_centered_gamma = False
        try:
            model = super().configure_model(tokenizer, pre_process=pre_process, post_process=post_process,
                                            vp_stage=vp_stage)
        finally:
            if zero_centered_local:
                self.layernorm_zero_centered_gamma = True
        return finish_gpt_model(model, self, zero_centered_local)


@dataclasses.dataclass
class HFLlamaConfig(_FromHF, llm.LlamaConfig):
    hf_vocab_size: Optional[int] = None
    hf_model_type: str = "llama"
    hf_sliding_window: Optional[int] = None
    rope_llama3: Optional[dict] = None


@dataclasses.dataclass
class HFLlamaLlama3Config(_FromHF, Llama31Config):
    """Llama-3.x: NeMo's ``Llama31Config`` rescales the RoPE frequencies in ``configure_model``
    (``scale_factor``, ``low_freq_factor``, ``high_freq_factor``, ``old_context_len``)."""

    _nemo_applies_rope_scaling = True
    hf_vocab_size: Optional[int] = None
    hf_model_type: str = "llama"
    hf_sliding_window: Optional[int] = None
    rope_llama3: Optional[dict] = None


@dataclasses.dataclass
class HFMistralConfig(_FromHF, llm.LlamaConfig):
    hf_vocab_size: Optional[int] = None
    hf_model_type: str = "mistral"
    hf_sliding_window: Optional[int] = None
    rope_llama3: Optional[dict] = None


@dataclasses.dataclass
class HFQwen2Config(_FromHF, llm.Qwen2Config):
    hf_vocab_size: Optional[int] = None
    hf_model_type: str = "qwen2"
    hf_sliding_window: Optional[int] = None
    rope_llama3: Optional[dict] = None


@dataclasses.dataclass
class HFGemmaConfig(_FromHF, llm.GemmaConfig):
    hf_vocab_size: Optional[int] = None
    hf_model_type: str = "gemma"
    hf_sliding_window: Optional[int] = None
    rope_llama3: Optional[dict] = None


@dataclasses.dataclass
class HFPhi3Config(_FromHF, llm.Phi3Config):
    hf_vocab_size: Optional[int] = None
    hf_model_type: str = "phi3"
    hf_sliding_window: Optional[int] = None
    rope_llama3: Optional[dict] = None
    rope_longrope: Optional[dict] = None  # Phi-3 LongRoPE (families.longrope_fields), with softmax_scale


def nemo_config_class(family: Family, llama3: bool = False):
    """Our subclass of NeMo's config for ``family``: NeMo's fields and ``configure_model`` plus the
    Hugging Face facts (unpadded vocabulary, model type, sliding window) and :func:`finish_gpt_model`."""
    base_name = "Llama31Config" if llama3 else family.nemo_config
    cls = globals()[f"HF{family.name.capitalize()}{'Llama3' if llama3 else ''}Config"]
    assert issubclass(cls, Llama31Config if llama3 else getattr(llm, base_name)), (cls, base_name)
    return cls


__all__ = ["HFGemmaConfig", "HFLlamaConfig", "HFLlamaLlama3Config", "HFMistralConfig", "HFPhi3Config",
           "HFQwen2Config", "nemo_config_class"]
