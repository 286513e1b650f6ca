"""Checkpoint conversion between Hugging Face and Megatron-core for decoder LLMs: Llama (Vicuna, SmolLM2,
Llama-3.x), Mistral, Qwen2/2.5, Gemma, Phi-3 (one table per family: ``nemo_basic.convert.families``).

* configs: :func:`hf_llama_config_to_nemo` (the family's NeMo config), :func:`hf_llama_config_to_mcore`
  (NeMo-free ``MegatronLlamaConfig``), :func:`nemo_llama_config_to_hf` (export);
* weights: :func:`hf_llama_to_mcore`, :func:`mcore_to_hf_llama` (local or Transformer Engine
  layernorm naming, vocabulary padding), :func:`convert_mcore_spec`;
* tensor parallelism: :func:`shard_for_tp`, :func:`gather_tp`;
* Megatron model: :func:`build_gpt_model`, :func:`load_mcore_state_dict`, :func:`ensure_model_parallel`.
"""
from nemo_basic.convert.families import FAMILIES, SUPPORTED_MODEL_TYPES, Family
from nemo_basic.convert.llama import (
    NORM_KEYS,
    SPECS,
    convert_mcore_spec,
    hf_llama_config_to_mcore,
    hf_llama_config_to_nemo,
    hf_llama_to_mcore,
    llama_config_kwargs,
    mcore_to_hf_llama,
    nemo_llama_config_to_hf,
    pack_qkv,
    padded_vocab_size,
    unpack_qkv,
)
from nemo_basic.convert.megatron import (
    MegatronLlamaConfig,
    build_gpt_model,
    ensure_model_parallel,
    load_mcore_state_dict,
)
from nemo_basic.convert.tensor_parallel import gather_tp, shard_for_tp

__all__ = [
    "FAMILIES",
    "Family",
    "SUPPORTED_MODEL_TYPES",
    "NORM_KEYS",
    "SPECS",
    "MegatronLlamaConfig",
    "build_gpt_model",
    "convert_mcore_spec",
    "ensure_model_parallel",
    "gather_tp",
    "hf_llama_config_to_mcore",
    "hf_llama_config_to_nemo",
    "hf_llama_to_mcore",
    "llama_config_kwargs",
    "load_mcore_state_dict",
    "mcore_to_hf_llama",
    "nemo_llama_config_to_hf",
    "pack_qkv",
    "padded_vocab_size",
    "shard_for_tp",
    "unpack_qkv",
]
