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
    """Identity on `output` (a copy of it); backward also sends `scale` as the gradient of `aux_loss`."""

    main_loss_backward_scale: Optional[torch.Tensor] = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor):
        ctx.save_for_backward(aux_loss)
        # A copy, not `output` itself: autograd would hand back a view of it, and the result is a
        # pipeline stage's output, which Megatron frees in place once sent
        # (schedules.deallocate_output_tensor asserts `out._base is None` when
        # config.deallocate_pipeline_outputs is set). One [S, B, h] copy per micro-batch with images.
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        scale = AuxLossAutoScaler.main_loss_backward_scale
        if scale is None:
            scale = torch.ones_like(aux_loss)
        elif isinstance(scale, torch.Tensor):
            scale = scale.to(aux_loss).reshape(aux_loss.shape)  # set on the loss's device: no copy
        else:
            scale = torch.full_like(aux_loss, scale)  # a Python number: a fill, no host transfer
        return grad_output, scale

    @staticmethod
    def set_loss_scale(scale: torch.Tensor | float) -> None:
        """The factor the schedule applies to the LM loss (1/num_microbatches × grad scale): a
        Python number, or a one-element tensor on the model's device (a CPU tensor would be
        copied to the GPU in every backward, a host synchronisation)."""
        AuxLossAutoScaler.main_loss_backward_scale = scale


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation recomputation)."""
    return torch._C._current_graph_task_id() != -1


_NATIVE_GQA = {"cuda": True, "cpu": True}  # whether the fused kernel took grouped K/V as they are


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _flash_kernel(q, k, v, dropout_p: float, scale: float):
    """torch's fused causal flash attention with its log-sum-exp: (out, lse, ...)."""
    if q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, True, False, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, True, scale=scale)


# What a flash kernel without grouped-head support says when K/V have fewer heads than Q (FA2's
# "We do not support MQA/GQA yet", head-count checks such as "Number of heads in key/value must
# divide ..."). Nothing else a kernel raises may switch the fallback on.
_GROUPED_HEADS_REJECTION = ("mqa", "gqa", "heads")


def _rejects_grouped_heads(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError) or type(error).__name__ == "AcceleratorError":
        return False  # out of memory, or an (asynchronous) CUDA error: not about the head layout
    message = str(error).lower()
    return not message.startswith("cuda error") and any(word in message for word in _GROUPED_HEADS_REJECTION)


def sdpa_with_lse(q, k, v, scale: float, dropout_p: float = 0.0):
    """Causal attention over [B, H, S, D] that also returns the row log-sum-exp [B, H, S].

    torch's fused flash kernels return it as their second output (CPU and CUDA alike). Grouped
    K/V ([B, Hkv, S, D], Hkv dividing H) go in as they are: both kernels pair query head h with
    key head h // (H / Hkv), as Megatron does. Should a build reject that (its head-count error,
    nothing else: out of memory and CUDA errors propagate), K/V are expanded once and the
    fallback is remembered."""
    device = q.device.type
    if k.shape[1] != q.shape[1] and not _NATIVE_GQA.get(device, False):
        k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
    try:
        out = _flash_kernel(q, k, v, dropout_p, scale)
    except RuntimeError as error:
        if k.shape[1] == q.shape[1] or not _rejects_grouped_heads(error):
            raise
        _NATIVE_GQA[device] = False
        return sdpa_with_lse(q, k, v, scale, dropout_p)
    return out[0], out[1]


def softmax_scale_of(core_attention: torch.nn.Module, head_dim: int) -> float:
    """The softmax scale the module applies. Megatron's local DotProductAttention keeps it as
    `softmax_scale`, which `apply_query_key_layer_scaling` divides by the layer number while its
    `scale_mask_softmax` multiplies the scores back by that number before the softmax
    (megatron/core/transformer/dot_product_attention.py): the product is the scale. TE's
    DotProductAttention does not keep it (a local of its __init__; its own layer scaling leaves
    the product unchanged), so the config's `softmax_scale` (None: 1/√D) is what it used."""
    scale = getattr(core_attention, "softmax_scale", None)
    if scale is not None:
        coeff = getattr(getattr(core_attention, "scale_mask_softmax", None), "scale", None)
        return float(scale) * (float(coeff) if coeff is not None else 1.0)
    scale = getattr(getattr(core_attention, "config", None), "softmax_scale", None)
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def fused_unsupported(core_attention: torch.nn.Module, layer_number: int) -> Optional[str]:
    """Why this layer's attention must run through its own module (None: the fused causal
    softmax kernel computes exactly what the module would)."""
    config = getattr(core_attention, "config", None)
    dropout = getattr(core_attention, "attention_dropout", None)
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) else dropout
    if p is None:
        p = getattr(config, "attention_dropout", 0.0)
    if p and core_attention.training:
        return f"attention dropout {p}"  # its RNG must stay Megatron's (tensor-parallel tracker)
    if getattr(config, "window_size", None) is not None:
        from megatron.core.transformer.utils import is_layer_window_attention

        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            return f"sliding window {config.window_size}"
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        return f"softmax_type {config.softmax_type}"
    if getattr(config, "fp8_dot_product_attention", False) or getattr(config, "fp8_multi_head_attention", False):
        return "FP8 attention"
    return None


def attach_lse_attention(core_attention: torch.nn.Module, capture: "SupervisionCapture", layer_number: int) -> None:
    """Make layer `layer_number`'s core attention also feed the text→image attention mass.

    While the capture wants this layer's attention it runs the same causal softmax attention
    through a fused kernel that yields the log-sum-exp, so the mass needs only the [text × image]
    block (no S×S matrix). Where the fused kernel would not compute what the module does
    (`fused_unsupported`: dropout, sliding window, another softmax, FP8 attention; or explicit
    masks, packed sequences, fp32 on CUDA), the original module runs and, if wanted, the text
    rows' log-sum-exp is recomputed in chunks. The module itself is kept (its parameters and
    `_extra_state` stay where checkpoints expect them); only its forward is wrapped.
    """
    original = core_attention.forward
    # Under activation recomputation the layer's forward runs again in backward, under 1F1B
    # possibly after the next micro-batch began (the capture then describes that one): the choice
    # of kernel may then depend only on settings, never on the micro-batch, so that a recomputed
    # forward runs the kernel its first forward ran.
    recomputed = getattr(getattr(core_attention, "config", None), "recompute_granularity", None) is not None

    def forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):  # Megatron's interface; tensors [s, b, heads, dim]
        wanted = capture.wants_attention(layer_number)
        # The lse kernel only where the attention mass is wanted: with basic.degree = equal, and
        # in micro-batches without images, the module runs its own attention (TE's cuDNN kernel).
        if not capture.uses_attention_mass(layer_number, per_micro_batch=not recomputed):
            return original(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                            attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)
        scale = softmax_scale_of(core_attention, query.shape[-1])
        fused_ok = (capture.active and fused_unsupported(core_attention, layer_number) is None and attention_mask is None and attention_bias is None
                    and packed_seq_params is None and not kwargs
                    and (not query.is_cuda or query.dtype in (torch.float16, torch.bfloat16)))
        if not fused_ok:
            out = original(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                           attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)
            if wanted:
                capture.record_attention(layer_number, query, key, lse=None, scale=scale)
            return out
        sq, b, heads, dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out, lse = sdpa_with_lse(q, k, v, scale)
        if wanted:
            capture.record_attention(layer_number, query, key, lse=lse, scale=scale)
        # [B, H, S, D] → Megatron's [S, B, H·D]; a view when the kernel's output is laid out
        # sequence-first, a copy otherwise.
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    core_attention.forward = forward


def _accumulate(total: Optional[torch.Tensor], rows: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """total + weight·rows in fp32, in place: no new [B, W, h] buffer per layer. The running sums
    (target, mass) are constants of the losses (they read them detached), so a sum received from
    the previous pipeline stage (pipeline.unpack: part of the received tensor's graph) is detached
    into a buffer of its own by its first addition, and added into in place from then on."""
    if total is None:
        return rows.float() * weight if weight != 1.0 else rows.float()
    if total.requires_grad:
        return total.detach() + rows.float() * weight
    return total.add_(rows, alpha=weight)  # rows may be 16-bit: added in fp32, no fp32 copy


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
        self.layout: Optional[S.RowLayout] = None  # padded image/text row indices of the micro-batch
        self.projected = None            # V rows [B, W, d] (with grad; padded slots 0)
        self.target = None               # Σ w_l h_l[image] rows [B, W, d] fp32
        self.mass = None                 # Σ_l mass_l [B, S] fp32
        self._shard = None               # this rank's sequence shard of the layout (sequence parallel)
        self._sharded_target = False     # target holds only this rank's rows until layer k
        self.layers_seen: set[int] = set()
        self.attention_seen: set[int] = set()
        self.done = False
        self.pending = None              # λ1·L_das + λ2·L_sds, waiting for the block output

    def begin(self, image_mask: torch.Tensor, text_mask: torch.Tensor) -> None:
        """Start a micro-batch. Its one host synchronisation happens here (RowLayout reads the
        row counts); everything after it, in every layer, runs on shapes the host knows."""
        self.reset()
        self.image_mask, self.text_mask = image_mask, text_mask
        self.layout = S.RowLayout.from_masks(image_mask, text_mask)

    @property
    def active(self) -> bool:
        """A micro-batch is being captured (set by `begin`; off for inference calls)."""
        return self.image_mask is not None

    @property
    def has_images(self) -> bool:
        return self.layout is not None and self.layout.has_images

    def set_projected(self, combined_embeddings: torch.Tensor) -> None:
        """combined_embeddings: the decoder input [S, B, h]; V = its rows at the image positions."""
        if self.has_images:
            self.projected = self.layout.gather(combined_embeddings)

    # -- called from the decoder -----------------------------------------------------------------
    def wants_attention(self, layer_number: int) -> bool:
        return (self.uses_attention_mass(layer_number) and layer_number not in self.attention_seen
                and not in_backward())

    def uses_attention_mass(self, layer_number: int, per_micro_batch: bool = True) -> bool:
        """Whether layer `layer_number`'s attention feeds eq. 5's mass: degree = attention, the
        layer ≤ k, a training micro-batch being captured and (per_micro_batch) with images."""
        return (self.basic.degree == "attention" and layer_number <= self.k and self.active
                and (self.has_images or not per_micro_batch))

    def record_attention(self, layer_number, query, key, lse, scale) -> None:
        self.attention_seen.add(layer_number)  # activation recomputation must not count twice
        tp = ps.get_tensor_model_parallel_world_size()
        q = query.detach().permute(1, 2, 0, 3)
        k = key.detach().permute(1, 2, 0, 3)
        mass = S.text_to_image_attention(
            q, k, lse=None if lse is None else lse.detach(), scale=scale, layout=self.layout,
            tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None)
        self.mass = _accumulate(self.mass, mass)

    def after_layer(self, layer_number: int, hidden: torch.Tensor) -> None:
        """Forward hook of decoder layer `layer_number` (global, 1-based); hidden [S(/TP), B, h].

        Eq. 4's running sum Σ_l w_l·h_l[image] is added in place into one fp32 [B, W, h] buffer.
        Under sequence parallelism each tensor-parallel rank holds S/TP consecutive positions: it
        adds the image rows of its own shard (zeros for the others) and the ranks sum their
        buffers once, at layer k (one all-reduce of the [B, W, h] fp32 rows per micro-batch,
        instead of an all-gather of the whole [S, B, h] hidden state in every layer 1..k)."""
        if layer_number > self.k or not self.has_images or in_backward():
            return
        if layer_number not in self.layers_seen:
            self.layers_seen.add(layer_number)
            full = hidden.detach()
            weight = self.weights[layer_number - 1]
            if ps.get_tensor_model_parallel_world_size() > 1 and full.shape[0] != self.image_mask.shape[1]:
                if self._shard is None:  # once per micro-batch: this rank's rows of the layout
                    start = ps.get_tensor_model_parallel_rank() * full.shape[0]
                    self._shard = self.layout.shard_rows(start, full.shape[0])
                rows = self.layout.gather_shard(full, self._shard)
                self._sharded_target = True
            else:
                rows = self.layout.gather(full)
            self.target = _accumulate(self.target, rows, weight)  # eq. 4, running sum
        if layer_number == self.k and not self.done:
            if self._sharded_target:
                # Each image row was added on exactly one rank (zeros elsewhere): the sum is exact.
                torch.distributed.all_reduce(self.target, group=ps.get_tensor_model_parallel_group())
                self._sharded_target = False
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
        v, v_hat = self.projected, self.target  # [B, W, d], padded slots 0
        # eq. 5 from the running sum over layers 1..k (the 1/(k·n) factor cancels in the
        # normalisation); the `equal` ablation ignores the masses.
        masses = self.mass.unsqueeze(0) if self.basic.degree == "attention" else None
        degree = S.supervision_degree(masses, self.image_mask, mode=self.basic.degree)
        a = self.layout.image_values(degree)
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
