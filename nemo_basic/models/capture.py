"""Megatron plumbing for BASIC: gather the supervision while the decoder runs its normal forward.

For one micro-batch, `SupervisionCapture` holds
  * the image / text masks of the combined sequence (from NeVA's own placement bookkeeping),
  * V, the projector output at the image positions (first pipeline stage, carries the gradient),
  * the running target Σ_l w_l·h_l[image] in fp32 (eq. 4; a running sum, not k copies),
  * the running text→image attention mass Σ_l mass_l (eq. 5, before normalisation),
and when layer k has run it computes L_das and L_sds (nemo_basic.supervision); the decoder block's
output then carries λ1·L_das + λ2·L_sds through `AuxLossAutoScaler`: the forward value is unchanged
and backward injects the loss's gradient, so the pipeline schedule's own backward pass carries it
to the projector (the pattern of Megatron's MoEAuxLossAutoScaler). Attaching at the block output,
not inside layer k, keeps this outside activation recomputation: a recomputed layer (full or
selective recompute re-runs forwards inside backward, possibly after the next micro-batch began)
records nothing, so nothing is counted twice and no state of another micro-batch is touched. The target, the degree and the
embedding table are constants; only V has a gradient path, so the aux losses train the projector.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import parallel_state as ps

from nemo_basic import supervision as S
from nemo_basic.models.basic_config import BasicConfig


class AuxLossAutoScaler(torch.autograd.Function):
    """Identity on `output`; backward also sends `scale` as the gradient of `aux_loss`."""

    main_loss_backward_scale: Optional[torch.Tensor] = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor):
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        scale = AuxLossAutoScaler.main_loss_backward_scale
        scale = torch.ones_like(aux_loss) if scale is None else scale.to(aux_loss)
        return grad_output, scale * torch.ones_like(aux_loss)

    @staticmethod
    def set_loss_scale(scale: torch.Tensor | float) -> None:
        """The factor the schedule applies to the LM loss (1/num_microbatches × grad scale)."""
        AuxLossAutoScaler.main_loss_backward_scale = torch.as_tensor(scale, dtype=torch.float32)


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation recomputation)."""
    return torch._C._current_graph_task_id() != -1


def pad_rows(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[M, ...] rows grouped by sample (counts [B], Σ = M) → [B, max(counts), ...], zero padded."""
    batch = counts.numel()
    width = int(counts.max()) if batch else 0
    out = rows.new_zeros((batch, width) + tuple(rows.shape[1:]))
    slot = torch.arange(width, device=rows.device).expand(batch, width) < counts[:, None]
    out[slot] = rows
    return out


def sdpa_with_lse(q, k, v, scale: float, dropout_p: float = 0.0):
    """Causal attention over [B, H, S, D] that also returns the row log-sum-exp [B, H, S].

    torch's fused flash kernels return it as their second output (CPU and CUDA alike)."""
    if q.is_cuda:
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, True, False, scale=scale)
        return out[0], out[1]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, True, scale=scale)


def attach_lse_attention(core_attention: torch.nn.Module, capture: "SupervisionCapture", layer_number: int) -> None:
    """Make layer `layer_number`'s core attention also feed the text→image attention mass.

    While the capture wants this layer's attention it runs the same causal softmax attention
    through a fused kernel that yields the log-sum-exp, so the mass needs only the [text × image]
    block (no S×S matrix); otherwise (or where the fused path does not apply: explicit masks,
    packed sequences, fp32 on CUDA) it runs the original module and, if wanted, recomputes the text
    rows' log-sum-exp in chunks. The module itself is kept (its parameters and `_extra_state`
    stay where checkpoints expect them); only its forward is wrapped.
    """
    original = core_attention.forward

    def scale_of(query) -> float:
        scale = getattr(core_attention, "softmax_scale", None)
        return scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])

    def forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):  # Megatron's interface; tensors [s, b, heads, dim]
        wanted = capture.wants_attention(layer_number)
        fused_ok = (capture.active and attention_mask is None and attention_bias is None and packed_seq_params is None
                    and not kwargs and (not query.is_cuda or query.dtype in (torch.float16, torch.bfloat16)))
        if not fused_ok:
            out = original(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                           attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)
            if wanted:
                capture.record_attention(layer_number, query, key, lse=None, scale=scale_of(query))
            return out
        sq, b, heads, dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.shape[1] != heads:  # grouped-query attention: each query head uses its group's key
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        dropout = getattr(core_attention, "attention_dropout", None)
        p = dropout.p if core_attention.training and isinstance(dropout, torch.nn.Dropout) else 0.0
        out, lse = sdpa_with_lse(q, k, v, scale_of(query), p)
        if wanted:
            capture.record_attention(layer_number, query, key, lse=lse, scale=scale_of(query))
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    core_attention.forward = forward


class SupervisionCapture:
    """Per-micro-batch state of the BASIC supervision (see the module docstring)."""

    def __init__(self, basic: BasicConfig, num_layers: int, vocab_size: int):
        self.basic = basic
        self.k = basic.num_supervision_layers(num_layers)
        self.weights = S.layer_weights(self.k, basic.weighting).tolist()
        self.vocab_size = vocab_size
        self.embedding: Optional[torch.Tensor] = None  # [N/TP (padded), d], set by the model
        self.logs: list[dict] = []                     # detached losses of each micro-batch
        self.reset()

    # -- per micro-batch -------------------------------------------------------------------------
    def reset(self) -> None:
        self.image_mask = self.text_mask = None
        self.projected = None            # V rows [M, d] (with grad)
        self.target = None               # Σ w_l h_l[image] rows [M, d] fp32
        self.mass = None                 # Σ_l mass_l [B, S] fp32
        self.layers_seen: set[int] = set()
        self.attention_seen: set[int] = set()
        self.done = False
        self.pending = None              # λ1·L_das + λ2·L_sds, waiting for the block output

    def begin(self, image_mask: torch.Tensor, text_mask: torch.Tensor) -> None:
        self.reset()
        self.image_mask, self.text_mask = image_mask, text_mask

    @property
    def active(self) -> bool:
        """A micro-batch is being captured (set by `begin`; off for inference calls)."""
        return self.image_mask is not None

    @property
    def has_images(self) -> bool:
        return self.image_mask is not None and bool(self.image_mask.any())

    def set_projected(self, combined_embeddings: torch.Tensor) -> None:
        """combined_embeddings: the decoder input [S, B, h]; V = its rows at the image positions."""
        if self.has_images:
            self.projected = combined_embeddings.transpose(0, 1)[self.image_mask]

    # -- called from the decoder -----------------------------------------------------------------
    def wants_attention(self, layer_number: int) -> bool:
        return (self.basic.degree == "attention" and self.has_images and layer_number <= self.k
                and layer_number not in self.attention_seen and not in_backward())

    def record_attention(self, layer_number, query, key, lse, scale) -> None:
        self.attention_seen.add(layer_number)  # activation recomputation must not count twice
        tp = ps.get_tensor_model_parallel_world_size()
        q = query.detach().permute(1, 2, 0, 3)
        k = key.detach().permute(1, 2, 0, 3)
        mass = S.text_to_image_attention(
            q, k, self.text_mask, self.image_mask, lse=None if lse is None else lse.detach(), scale=scale,
            tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None)
        self.mass = mass if self.mass is None else self.mass + mass

    def after_layer(self, layer_number: int, hidden: torch.Tensor) -> None:
        """Forward hook of decoder layer `layer_number` (global, 1-based); hidden [S(/TP), B, h]."""
        if layer_number > self.k or not self.has_images or in_backward():
            return
        if layer_number not in self.layers_seen:
            self.layers_seen.add(layer_number)
            full = hidden.detach()
            if ps.get_tensor_model_parallel_world_size() > 1 and full.shape[0] != self.image_mask.shape[1]:
                from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

                full = gather_from_sequence_parallel_region(full, tensor_parallel_output_grad=False)
            rows = full.transpose(0, 1)[self.image_mask].float() * self.weights[layer_number - 1]
            self.target = rows if self.target is None else self.target + rows  # eq. 4, running sum
        if layer_number == self.k and not self.done:
            self._compute_losses()

    def after_block(self, hidden: torch.Tensor) -> torch.Tensor:
        """Forward hook of the decoder block: the output carries the pending aux loss."""
        if self.pending is None or in_backward():
            return hidden
        total, self.pending = self.pending, None
        return AuxLossAutoScaler.apply(hidden, total)

    # -- the losses (eq. 5-8) ----------------------------------------------------------------------
    def losses(self) -> dict:
        """L_das and L_sds of this micro-batch from the captured state (differentiable in V)."""
        counts = self.image_mask.sum(dim=1)
        v = pad_rows(self.projected, counts)
        v_hat = pad_rows(self.target, counts)
        # eq. 5 from the running sum over layers 1..k (the 1/(k·n) factor cancels in the
        # normalisation); the `equal` ablation ignores the masses.
        masses = (self.mass if self.basic.degree == "attention" else
                  torch.zeros(self.image_mask.shape, device=self.image_mask.device)).unsqueeze(0)
        degree = S.supervision_degree(masses, self.image_mask, mode=self.basic.degree)
        a = pad_rows(degree[self.image_mask], counts)
        out = {}
        if self.basic.das:
            out["das"] = S.directional_alignment_loss(v, v_hat, a)
        if self.basic.sds:
            tp = ps.get_tensor_model_parallel_world_size()
            rank = ps.get_tensor_model_parallel_rank()
            emb = self.embedding.detach()
            out["sds"] = S.semantic_distribution_loss(
                v, v_hat, emb, a, chunk_size=self.basic.kl_chunk_size,
                tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None,
                vocab_size=self.vocab_size, vocab_start_index=rank * emb.shape[0])
        return out

    def _compute_losses(self) -> None:
        if self.projected is None or self.target is None or self.embedding is None:
            raise RuntimeError(
                f"BASIC: layer k={self.k} ran without the projector output or the embedding on this "
                "pipeline stage (is the model's pipeline wiring in nemo_basic.models.pipeline active?)")
        self.done = True
        # Under full recomputation the layers' first forward runs without grad; V's graph (built
        # outside the recomputed region) still takes the losses' gradient.
        with torch.enable_grad():
            losses = self.losses()
            total = self.projected.new_zeros((), dtype=torch.float32)
            if "das" in losses:
                total = total + self.basic.lambda_das * losses["das"]
            if "sds" in losses:
                total = total + self.basic.lambda_sds * losses["sds"]
        self.logs.append({name: value.detach() for name, value in losses.items()})
        if total.requires_grad:
            self.pending = total

    def pop_logs(self) -> dict:
        """Mean of each loss over this step's micro-batches that had images (count included)."""
        logs, self.logs = self.logs, []
        out = {}
        for name in ("das", "sds"):
            values = [entry[name] for entry in logs if name in entry]
            if values:
                out[name] = (torch.stack(values).sum(), len(values))
        return out
