"""Rank functions for the foundation parity tests (imported by spawned processes)."""
from __future__ import annotations

from functools import partial

import torch

import nemo_basic  # noqa: F401  (CPU backend)
from nemo_basic.testing import tiny

NUM_MICROBATCHES = 4
MICRO_BATCH = 2


def _forward_step(data_iterator, model):
    b = next(data_iterator)
    out, mask = model(images=b.images, input_ids=b.input_ids, position_ids=None, attention_mask=None,
                      labels=b.labels, loss_mask=b.loss_mask, num_image_tiles=b.num_image_tiles)

    def loss_func(output_tensor):
        loss = tiny.lm_loss(output_tensor, mask)
        return loss, {"lm loss": loss.detach().clone()}

    return out, loss_func


def run_tiny_llava(rank: int, world: int, tp: int, pp: int, reference_path: str | None,
                   save_path: str | None) -> dict:
    """One training forward/backward of the tiny LLaVA over 4 micro-batches through Megatron's
    schedule for this (TP, PP); returns the mean LM loss, the global grad norm and, on rank 0,
    the projector gradients (which must match across layouts)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tiny.init_parallel(tp, pp)
    model = tiny.tiny_llava(tp=tp, pp=pp)
    if save_path is not None:
        torch.save(model.state_dict(), save_path)
    if reference_path is not None and pp > 1:
        full = torch.load(reference_path)
        stage = ps.get_pipeline_model_parallel_rank()
        model.load_state_dict(tiny.remap_pipeline_state_dict(full, model, 4 // pp, stage), strict=True)
    if reference_path is not None and tp > 1:
        # Megatron's CPU initialisation draws the full master weight and keeps this rank's slice,
        # so TP=2 starts from the TP=1 weights; check that instead of assuming it.
        full = torch.load(reference_path)
        for name, p in model.named_parameters():
            ref = full[name]
            if getattr(p, "tensor_model_parallel", False):
                ref = ref.chunk(tp, dim=p.partition_dim)[ps.get_tensor_model_parallel_rank()]
            assert torch.equal(p.detach(), ref), f"{name} differs from the reference weights"

    batches = iter([tiny.tiny_batch(seed=i, batch_size=MICRO_BATCH) for i in range(NUM_MICROBATCHES)])
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=batches, model=[model],
        num_microbatches=NUM_MICROBATCHES, seq_length=tiny.LM_SEQ, micro_batch_size=MICRO_BATCH,
        forward_only=False)
    result = {"grad_norm": tiny.tp_grad_norm(model).item()}
    if ps.is_pipeline_last_stage():
        result["loss"] = torch.stack([x["lm loss"] for x in losses]).mean().item()
    if ps.is_pipeline_first_stage() and ps.get_tensor_model_parallel_rank() == 0 and tp == 1:
        result["projector_grads"] = {n: p.grad.clone() for n, p in model.vision_projection.named_parameters()}
    ps.destroy_model_parallel()
    return result


def vision_attention_is_bidirectional(rank: int, world: int) -> float:
    """Change only the last image patch: with a non-causal ViT the first patch's output moves."""
    tiny.init_parallel(1, 1)
    model = tiny.tiny_llava().vision_model.eval()
    torch.manual_seed(0)
    images = torch.randn(1, 3, tiny.IMG, tiny.IMG)
    changed = images.clone()
    changed[:, :, -tiny.PATCH:, -tiny.PATCH:] += 1.0  # the last patch only
    with torch.no_grad():
        a, b = model(images), model(changed)  # [1, 1 + patches, h] (class token first)
    return (a[0, 1] - b[0, 1]).abs().max().item()
