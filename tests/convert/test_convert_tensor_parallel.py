"""Tensor-parallel shards of a converted Llama: layout against the HF tensors, exact shard/gather
round trip, and a real 2-process TP=2 forward pass equal to TP=1."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from nemo_basic.convert import (
    build_gpt_model,
    ensure_model_parallel,
    gather_tp,
    hf_llama_config_to_mcore,
    hf_llama_to_mcore,
    load_mcore_state_dict,
    shard_for_tp,
)
from nemo_basic.testing import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned ranks import the worker module
import _convert_workers as workers  # noqa: E402


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("prefix", ["", "language_model."])
def test_shard_then_gather_is_identity(tied, tp, prefix):
    hf = workers.tiny_hf_llama(tied, kv_heads=tp)  # at least one KV head per rank
    config = hf_llama_config_to_mcore(hf.config)
    full = hf_llama_to_mcore(hf.state_dict(), config, prefix=prefix)
    shards = [shard_for_tp(full, tp, r, config) for r in range(tp)]
    emb = prefix + "embedding.word_embeddings.weight"
    assert all(s[emb].shape == (256 // tp, 64) for s in shards)
    back = gather_tp(shards, config)
    assert set(back) == set(full)
    for key, value in full.items():
        assert torch.equal(back[key], value), key


def test_shard_layout_matches_megatron_ownership():
    """Rank r holds query groups r*G/TP.., gate rows and up rows r*F/TP.., input columns r*D/TP.."""
    hf = workers.tiny_hf_llama(False)
    config = hf_llama_config_to_mcore(hf.config)
    sd = hf.state_dict()
    full = hf_llama_to_mcore(sd, config)
    hd, F = 16, 96
    for rank in range(2):
        shard = shard_for_tp(full, 2, rank, config)
        L = "decoder.layers.1."
        # qkv: this rank's single group = query heads 2r, 2r+1 then kv head r
        q = sd["model.layers.1.self_attn.q_proj.weight"][2 * rank * hd:(2 * rank + 2) * hd]
        k = sd["model.layers.1.self_attn.k_proj.weight"][rank * hd:(rank + 1) * hd]
        v = sd["model.layers.1.self_attn.v_proj.weight"][rank * hd:(rank + 1) * hd]
        assert torch.equal(shard[L + "self_attention.linear_qkv.weight"], torch.cat([q, k, v]))
        half = slice(rank * F // 2, (rank + 1) * F // 2)
        gate, up = sd["model.layers.1.mlp.gate_proj.weight"][half], sd["model.layers.1.mlp.up_proj.weight"][half]
        assert torch.equal(shard[L + "mlp.linear_fc1.weight"], torch.cat([gate, up]))
        assert torch.equal(shard[L + "mlp.linear_fc2.weight"], sd["model.layers.1.mlp.down_proj.weight"][:, half])
        cols = slice(rank * 32, (rank + 1) * 32)
        assert torch.equal(shard[L + "self_attention.linear_proj.weight"], sd["model.layers.1.self_attn.o_proj.weight"][:, cols])
        assert torch.equal(shard[L + "input_layernorm.weight"], sd["model.layers.1.input_layernorm.weight"])
        rows = full["output_layer.weight"][rank * 128:(rank + 1) * 128]
        assert torch.equal(shard["output_layer.weight"], rows)


def test_shard_errors():
    hf = workers.tiny_hf_llama(False)
    config = hf_llama_config_to_mcore(hf.config)
    full = hf_llama_to_mcore(hf.state_dict(), config)
    with pytest.raises(ValueError, match="num_query_groups=2"):
        shard_for_tp(full, 4, 0, config)  # 2 KV heads cannot be split over 4 ranks
    with pytest.raises(KeyError, match="vision_model"):
        shard_for_tp({**full, "vision_model.conv1.weight": torch.zeros(1)}, 2, 0, config)
    shards = [shard_for_tp(full, 2, r, config) for r in range(2)]
    shards[1] = {**shards[1], "decoder.final_layernorm.weight": shards[1]["decoder.final_layernorm.weight"] + 1}
    with pytest.raises(ValueError, match="final_layernorm"):
        gather_tp(shards, config)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tp2_logits_equal_tp1(tied):
    hf = workers.tiny_hf_llama(tied, seed=5)
    config = hf_llama_config_to_mcore(hf.config)
    full = hf_llama_to_mcore(hf.state_dict(), config)
    ids = torch.randint(0, workers.VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))
    started = ensure_model_parallel(1)
    try:
        model = build_gpt_model(config).eval()
        load_mcore_state_dict(model, full)
        with torch.no_grad():
            ref = model(ids, workers.positions(ids), None)
    finally:
        if started:
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
            torch.distributed.destroy_process_group()
    results = run_distributed(workers.tp_logits_worker, 2, hf.config.to_dict(), full, ids)
    for logits in results:
        assert logits.shape == ref.shape == (2, 13, 256)
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
