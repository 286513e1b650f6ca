"""Shared pieces of the conversion tests: the tiny Hugging Face reference models and the per-rank
body of the tensor-parallel test (spawned by nemo_basic.testing.run_distributed, which re-imports
it by module path; the test modules put this folder on sys.path)."""
from __future__ import annotations

import nemo_basic  # noqa: F401  (first: CPU backend patches before Megatron is used)

import torch
import torch.distributed as dist

from nemo_basic.convert import (
    build_gpt_model,
    ensure_model_parallel,
    hf_llama_config_to_mcore,
    load_mcore_state_dict,
    shard_for_tp,
)

VOCAB = 250  # not a multiple of 128: Megatron pads it to 256


def tiny_hf_config(tied: bool, kv_heads: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=kv_heads, rope_theta=50000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=128, tie_word_embeddings=tied, attn_implementation="eager")


def tiny_hf_llama(tied: bool, seed: int = 0, kv_heads: int = 2):
    """A random HF Llama with grouped-query attention whose norms are not 1 and whose weights are
    large enough that a wrong mapping moves the logits by O(1)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(tied, kv_heads)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    return model


def positions(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)


def tp_logits_worker(rank: int, world_size: int, hf_config: dict, full_mcore_sd: dict, input_ids) -> torch.Tensor:
    """Build the TP=world_size model, load this rank's shard, return the vocab-gathered logits."""
    from megatron.core import parallel_state as ps

    ensure_model_parallel(world_size)
    config = hf_llama_config_to_mcore(hf_config, tensor_model_parallel_size=world_size)
    model = build_gpt_model(config, parallel_output=True).eval()
    load_mcore_state_dict(model, shard_for_tp(full_mcore_sd, world_size, rank, config))
    with torch.no_grad():
        local = model(input_ids, positions(input_ids), None)  # [b, s, vocab / TP]
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)
