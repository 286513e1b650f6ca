"""Checkpoint conversion between Hugging Face and Megatron-core for decoder LLMs: Llama (Vicuna, SmolLM2,
Llama-3.x), Mistral, Qwen2/2.5, Gemma, Phi-3 (one table per family: ``nemo_basic.convert.families``).

* configs: :func:`hf_llama_config_to_nemo` (the family's NeMo config), :func:`hf_llama_config_to_mcore`
  (NeMo-free ``MegatronLlamaConfig``), :func:`nemo_llama_config_to_hf` (export);
* weights: :func:`hf_llama_to_mcore`, :func:`mcore_to_hf_llama` (local or Transformer Engine
  layernorm naming, vocabulary padding), :func:`convert_mcore_spec`;
* tensor parallelism: :func:`shard_for_tp`, :func:`gather_tp`;
* Megatron model: :func:`build_gpt_model`, :func:`load_mcore_state_dict`, :func:`ensure_model_parallel`.
"""
import importlib

# Loaded on first use (PEP 562): `nemo_basic.convert.families` is read by the recipes' start-up
# checks, which must not pay for importing megatron-core (convert.megatron does).
_MODULES = {
    "nemo_basic.convert.families": ("FAMILIES", "SUPPORTED_MODEL_TYPES", "Family"),
    "nemo_basic.convert.llama": ("NORM_KEYS", "SPECS", "convert_mcore_spec", "hf_llama_config_to_mcore",
                                 "hf_llama_config_to_nemo", "hf_llama_to_mcore", "llama_config_kwargs",
                                 "mcore_to_hf_llama", "nemo_llama_config_to_hf", "pack_qkv",
                                 "padded_vocab_size", "unpack_qkv"),
    "nemo_basic.convert.megatron": ("MegatronLlamaConfig", "build_gpt_model", "ensure_model_parallel",
                                    "load_mcore_state_dict"),
    "nemo_basic.convert.tensor_parallel": ("gather_tp", "shard_for_tp"),
}
_API = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'nemo_basic.convert' has no attribute {name!r}")
