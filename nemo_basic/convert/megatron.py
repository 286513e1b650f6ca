"""Megatron-core side of the conversion: a NeMo-free Llama config, the GPT model built from it with
the local (or Transformer Engine) layer spec, a strict state-dict loader, and a one-process
model-parallel set-up for scripts and tests.

``build_gpt_model`` accepts NeMo's ``llm.LlamaConfig`` as well (it is a ``TransformerConfig`` with
the same extra fields), so a converted checkpoint can be checked without NeMo's trainer.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

_EXTRA_STATE = re.compile(r"(^|\.)_extra_state$")


@dataclasses.dataclass
class MegatronLlamaConfig(TransformerConfig):
    """Megatron ``TransformerConfig`` plus the GPT-level fields NeMo's ``GPTConfig`` carries.

    ``vocab_size`` is the padded Megatron vocabulary (the embedding's rows), ``hf_vocab_size`` the
    tokenizer's (rows kept on export). Made by ``hf_llama_config_to_mcore``.
    """

    vocab_size: Optional[int] = None
    hf_vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 4096
    position_embedding_type: str = "rope"
    rotary_base: float = 10000
    rotary_percent: float = 1.0
    share_embeddings_and_output_weights: bool = False
    hf_model_type: str = "llama"
    hf_sliding_window: Optional[int] = None
    rope_llama3: Optional[dict] = None
    rope_longrope: Optional[dict] = None


def build_gpt_model(config: Any, spec: str = "local", pre_process: bool = True, post_process: bool = True,
                    parallel_output: bool = True):
    """A Megatron-core ``GPTModel`` for ``config`` (``MegatronLlamaConfig`` or NeMo ``GPTConfig``),
    finished for its family (``nemo_basic.convert.families.finish_gpt_model``: Gemma's input scaling
    and local zero-centred norms, Llama-3 RoPE frequencies, the padding-logit mask).

    Needs Megatron's parallel state (see :func:`ensure_model_parallel`). ``spec="local"`` uses
    Megatron's own modules (CPU and GPU); ``spec="te"`` the Transformer Engine modules (GPU).
    With ``parallel_output=True`` the logits stay split over the vocabulary across TP ranks.
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    qk_norm = bool(getattr(config, "qk_layernorm", False))
    if spec == "local":
        layer_spec = get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization=config.normalization)
    elif spec == "te":
        layer_spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    else:
        raise ValueError(f"spec must be 'local' or 'te', got {spec!r}")
    if config.vocab_size is None:
        raise ValueError("config.vocab_size is None: set the padded vocabulary size")
    from nemo_basic.convert.families import finish_gpt_model

    zero_centered_local = spec == "local" and bool(getattr(config, "layernorm_zero_centered_gamma", False))
    if zero_centered_local:  # WrappedTorchNorm asserts on the flag; finish_gpt_model makes the norms (1 + w)
        config.layernorm_zero_centered_gamma = False
    try:
        model = _gpt_model(config, layer_spec, pre_process, post_process, parallel_output)
    finally:
        if zero_centered_local:
            config.layernorm_zero_centered_gamma = True
    return finish_gpt_model(model, config, zero_centered_local)


def _gpt_model(config, layer_spec, pre_process, post_process, parallel_output):
    from megatron.core.models.gpt.gpt_model import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=config.vocab_size,
        max_sequence_length=config.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        rotary_percent=config.rotary_percent,
        rotary_base=config.rotary_base,
    )


def load_mcore_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load converted weights into a Megatron module, strictly by name and shape.

    Every parameter and persistent buffer of ``model`` must be present and nothing else may be;
    only ``_extra_state`` entries (module metadata that converters do not produce) are exempt.
    Raises ``KeyError`` listing missing and unexpected keys: a spec mismatch (``input_layernorm``
    vs ``linear_qkv.layer_norm_weight``) fails here instead of silently leaving norms at 1.
    """
    own = {k for k in model.state_dict() if not _EXTRA_STATE.search(k)}
    given = {k for k in state_dict if not _EXTRA_STATE.search(k)}
    missing, unexpected = sorted(own - given), sorted(given - own)
    if missing or unexpected:
        hint = ""
        if any("layer_norm_weight" in k for k in missing + unexpected):
            hint = " (layernorm names differ between the 'local' and 'te' specs: convert with the model's spec)"
        raise KeyError(f"state dict does not match {type(model).__name__}: missing {missing[:8]}, "
                       f"unexpected {unexpected[:8]}{hint}")
    model.load_state_dict({k: state_dict[k] for k in given}, strict=False)


def ensure_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                          seed: int = 0) -> bool:
    """Make Megatron's parallel state usable in this process.

    Starts a one-rank process group (gloo on the CPU backend, NCCL otherwise) when none exists,
    (re)initialises model parallelism with the requested sizes, and seeds Megatron's RNG tracker.
    Under torchrun or ``nemo_basic.testing.run_distributed`` the existing group is used. Returns
    True when it started the process group (the caller may then destroy it when done).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_basic.compat import cpu_backend_needed

    started = not dist.is_initialized()
    if started:  # one rank: an in-process store, no rendezvous port
        dist.init_process_group("gloo" if cpu_backend_needed() else "nccl", store=dist.HashStore(),
                                rank=0, world_size=1)
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size() != tensor_model_parallel_size
                or ps.get_pipeline_model_parallel_world_size() != pipeline_model_parallel_size):
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size, pipeline_model_parallel_size)
    model_parallel_cuda_manual_seed(seed)
    return started
