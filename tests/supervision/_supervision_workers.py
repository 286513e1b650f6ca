"""Per-rank bodies of the distributed supervision tests (spawned by nemo_basic.testing.run_distributed).

Kept in a module of their own with a unique name: spawned interpreters re-import the function by
module path, and the test folder is put on sys.path by the test modules.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_basic.supervision import semantic_distribution_loss, text_to_image_attention


def attention_mass_tp_worker(rank: int, world_size: int, query, key, text_mask, image_mask, lse) -> dict:
    """Each rank holds a contiguous block of H/TP query heads and Hkv/TP key heads, as Megatron does."""
    heads, kv_heads = query.shape[1], key.shape[1]
    hq, hk = heads // world_size, kv_heads // world_size
    q = query[:, rank * hq:(rank + 1) * hq]
    k = key[:, rank * hk:(rank + 1) * hk]
    out = {
        "with_lse": text_to_image_attention(q, k, text_mask, image_mask, lse=lse[:, rank * hq:(rank + 1) * hq],
                                            tp_group=dist.group.WORLD),
        "without_lse": text_to_image_attention(q, k, text_mask, image_mask, tp_group=dist.group.WORLD,
                                               num_heads_total=heads, chunk_rows=3),
    }
    return out


def vocab_parallel_kl_worker(rank: int, world_size: int, v, v_hat, embedding, a, vocab_sizes) -> list:
    """Split the (padded) embedding by rows in equal shards; return the loss and grad for each case.

    The default chunk size is exercised with a tiny chunk budget, chosen so that sizing chunks from
    a shard's *unpadded* rows would give the two ranks different chunk counts (and hang).
    """
    from nemo_basic.supervision import losses

    rows = embedding.shape[0] // world_size
    shard = embedding[rank * rows:(rank + 1) * rows]
    default_budget = losses._CHUNK_BYTES
    losses._CHUNK_BYTES = 4 * 17 * 4  # 20 rows/shard -> 3-row chunks; 17 real rows would give 4
    results = []
    try:
        for vocab_size in vocab_sizes:
            for reduction, chunk_size in (("mean", 3), ("none", 3), ("mean", None)):
                x = v.clone().requires_grad_(True)
                loss = semantic_distribution_loss(x, v_hat, shard, a, reduction=reduction, chunk_size=chunk_size,
                                                  tp_group=dist.group.WORLD, vocab_size=vocab_size,
                                                  vocab_start_index=rank * rows)
                loss.sum().backward()
                results.append((vocab_size, reduction, loss.detach(), x.grad))
    finally:  # the ranks are shared (tests/supervision/conftest.py): later calls get the default
        losses._CHUNK_BYTES = default_budget
    return results
