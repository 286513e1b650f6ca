"""NeMo 2 NeVA with BASIC: `BasicNevaConfig` → `BasicMCoreNevaModel` → `BasicNevaModel`.

The Megatron-core model is NeVA's, plus a `SupervisionCapture` wired into decoder layers 1..k
(forward hooks for the hidden states, a log-sum-exp core attention for the attention mass) and
into `_preprocess_data` (the projector output V at the image positions). With BASIC disabled no
hook is installed and the model is exactly NeVA.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import torch

from nemo_basic import compat

compat.apply_nemo()

from megatron.core import parallel_state as ps  # noqa: E402
from nemo.collections.vlm.neva.data.multimodal_tokens import IGNORE_INDEX  # noqa: E402
from nemo.collections.vlm.neva.model import base as neva_base  # noqa: E402
from nemo.collections.vlm.neva.model.base import MCoreNevaModel, NevaConfig, NevaModel  # noqa: E402

from nemo_basic.compat import neva_class  # noqa: E402
from nemo_basic.models.basic_config import BasicConfig, BasicConfigError  # noqa: E402
from nemo_basic.models import pipeline  # noqa: E402
from nemo_basic.models.capture import AuxLossAutoScaler, SupervisionCapture, attach_lse_attention  # noqa: E402

IMAGE_TOKEN_INDEX = -200


def _num_microbatches() -> int:
    try:
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        return get_num_microbatches()
    except (AssertionError, AttributeError, RuntimeError, ImportError):  # calculator not set up: one micro-batch
        return 1


class BasicMCoreNevaModel(MCoreNevaModel):
    def __init__(self, config: "BasicNevaConfig", tokenizer=None, *args, **kwargs):
        super().__init__(config, tokenizer, *args, **kwargs)
        self.basic: BasicConfig = config.basic
        self.capture: Optional[SupervisionCapture] = None
        self.carry = False  # supervision carried between pipeline stages (k beyond stage 0)
        self._received: Optional[torch.Tensor] = None
        self._placement_args = None  # (input_ids, num_image_tiles, text_lengths, image token) of this forward
        self._embedding_sync = None
        if not self.basic.active or not self.add_decoder:
            return
        lm_config = config.language_transformer_config
        vocab_size = getattr(tokenizer, "vocab_size", None) or lm_config.vocab_size
        self.capture = SupervisionCapture(self.basic, lm_config.num_layers, vocab_size)
        # Whether this pipeline stage holds a decoder layer ≤ k (stage 0 always does).
        self._supervising_stage = any(layer.layer_number <= self.capture.k
                                      for layer in self.language_model.decoder.layers)
        if self.pre_process:
            self.capture.embedding = self.language_model.embedding.word_embeddings.weight
        pp = ps.get_pipeline_model_parallel_world_size()
        self.completing_stage = stage_of_layer(lm_config, pp, self.capture.k)
        self.carry = self.completing_stage > 0
        if self.carry and ps.get_pipeline_model_parallel_rank() == self.completing_stage:
            # L_sds needs E here: a copy refreshed from stage 0 each step (sync_supervision_embedding).
            rows = self.language_model.vocab_size // ps.get_tensor_model_parallel_world_size()
            self.register_buffer("basic_embedding", torch.zeros(rows, lm_config.hidden_size,
                                                                dtype=lm_config.params_dtype), persistent=False)
            self.capture.embedding = self.basic_embedding
        for layer in self.language_model.decoder.layers:
            if layer.layer_number <= self.capture.k:  # global, 1-based
                attach_lse_attention(layer.self_attention.core_attention, self.capture, layer.layer_number)
                layer.register_forward_hook(functools.partial(_after_layer, self.capture, layer.layer_number))
        self.language_model.decoder.register_forward_hook(functools.partial(_after_block, self.capture))

    # -- image / text positions of the combined sequence ------------------------------------------
    def placement_masks(self, input_ids, num_image_tiles, seq_len: int, text_lengths=None,
                        image_token_index=IMAGE_TOKEN_INDEX):
        """Bool [B, S] masks of the image and text positions of the combined sequence (S = seq_len,
        the decoder's sequence length); see the module function `placement_masks`."""
        return placement_masks(input_ids, num_image_tiles, self._img_seq_len, seq_len, text_lengths,
                               image_token_index)

    def _begin_capture(self, seq_len: int) -> None:
        if not self._supervising_stage:
            return  # no layer ≤ k here: no masks, no layout (whose row counts cost a host sync)
        input_ids, num_image_tiles, text_lengths, image_token_index = self._placement_args
        image_mask, text_mask = self.placement_masks(input_ids, num_image_tiles, seq_len, text_lengths,
                                                     image_token_index)
        self.capture.begin(image_mask, text_mask)
        if self.carry and not self.pre_process and self._received is not None and self.capture.has_images:
            v, target, mass = pipeline.unpack(self._received, seq_len, self.capture.layout)
            self.capture.projected, self.capture.target = v, target
            self.capture.mass = mass if self.basic.degree == "attention" else None

    def forward(self, input_ids, position_ids, loss_mask=None, attention_mask=None, images=None,
                labels=None, inference_params=None, num_image_tiles=None, image_token_index=IMAGE_TOKEN_INDEX,
                runtime_gather_output=None, image_token_mask=None, packed_seq_params=None, text_lengths=None):
        """NeVA's forward; `text_lengths` [B] (unpadded token counts) lets BASIC exclude the
        tokenizer's right padding from the text rows of eq. 5."""
        if self.capture is not None and inference_params is not None:
            self.capture.reset()  # generation: no supervision, and no stale state from training
        if self.capture is not None and inference_params is None:
            if num_image_tiles is None:
                n = 0 if images is None else images.shape[0]
                num_image_tiles = torch.ones(n, dtype=torch.int, device=input_ids.device)
            elif isinstance(num_image_tiles, list):
                num_image_tiles = torch.tensor(num_image_tiles, dtype=torch.int, device=input_ids.device)
            if packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", None) == "thd":
                raise BasicConfigError(
                    "packed (THD) sequences are not supported with BASIC: its supervision needs each "
                    "sample's image and text positions; turn sequence packing off in the data "
                    "settings, or set basic.enabled = false")
            self.capture.reset()
            # The masks are built in _preprocess_data, where the combined length is known.
            self._placement_args = (input_ids, num_image_tiles, text_lengths, image_token_index)
            scale = 1.0 / _num_microbatches()
            if self.config.grad_scale_func is not None:
                # On the model's device, as Megatron's schedule does for its own aux losses: a
                # CPU tensor here would meet the optimizer's CUDA loss scale, and float() of the
                # product would synchronise the host every micro-batch.
                scale = self.config.grad_scale_func(torch.ones(1, device=input_ids.device)) * scale
            AuxLossAutoScaler.set_loss_scale(scale)
        out = super().forward(input_ids, position_ids, loss_mask=loss_mask, attention_mask=attention_mask,
                              images=images, labels=labels, inference_params=inference_params,
                              num_image_tiles=num_image_tiles, image_token_index=image_token_index,
                              runtime_gather_output=runtime_gather_output, image_token_mask=image_token_mask,
                              packed_seq_params=packed_seq_params)
        if self.carry and not self.post_process:
            out = (self._pack(out[0]), *out[1:]) if isinstance(out, tuple) else self._pack(out)
        return out

    # -- pipeline parallelism with layers 1..k over several stages (nemo_basic.models.pipeline) -----
    def _pack(self, hidden: torch.Tensor) -> torch.Tensor:
        c = self.capture
        live = c.has_images and not c.done  # after layer k the planes are zeros
        return pipeline.pack(hidden, c.layout if live else None, c.projected if live else None,
                             c.target if live else None, c.mass if live else None)

    def set_input_tensor(self, input_tensor) -> None:
        if self.carry and not self.pre_process:
            tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
            self._received = None
            if tensor is not None:
                seq = self._language_max_sequence_length
                self._received = tensor[seq:]  # views: gradients flow back into the received tensor
                input_tensor = [tensor[:seq]]
        super().set_input_tensor(input_tensor)

    def pipeline_seq_length(self) -> int:
        """Rows of the activation exchanged between stages: the schedule's `seq_length`."""
        seq = self._language_max_sequence_length
        if not self.carry:
            return seq
        lm = self.config.language_transformer_config
        return pipeline.carrier_rows(seq, lm.hidden_size, self.config.pipeline_dtype or lm.params_dtype)

    def sync_supervision_embedding(self) -> None:
        """Refresh the completing stage's copy of E from stage 0. Call on every rank, once per step,
        outside the pipeline schedule (BasicNevaModel does it at the start of each step)."""
        if not self.carry:
            return
        if self._embedding_sync is None:
            self._embedding_sync = pipeline.EmbeddingSync(self.completing_stage)
        if self.pre_process:
            self._embedding_sync(self.language_model.embedding.word_embeddings.weight.data)
        else:
            self._embedding_sync(getattr(self, "basic_embedding", None))

    def _supervise_first_token_after_image(self, final_labels, final_loss_mask, input_ids, loss_mask,
                                           num_image_tiles, image_token_index):
        """NeVA zeroes the loss mask at every image position, including each image's last one, whose
        label is the token after the image (the first caption token in stage 1): LLaVA trains that
        prediction, NeVA never does. Give that position the text-level loss mask of its placeholder
        (which is the mask of the same label), where a label is there (not after another image)."""
        is_image, _, end = token_spans(input_ids, num_image_tiles, self._img_seq_len, image_token_index)
        seq_len = final_loss_mask.shape[1]
        last = torch.where(is_image & (end <= seq_len), end - 1, seq_len)  # seq_len: a spill column
        widened = torch.cat([final_loss_mask, final_loss_mask.new_zeros(final_loss_mask.shape[0], 1)], dim=1)
        widened.scatter_(1, last, torch.where(is_image, loss_mask.to(widened.dtype), widened.gather(1, last)))
        out = widened[:, :seq_len]
        return torch.where(final_labels == IGNORE_INDEX, torch.zeros_like(out), out)

    def _get_shard_factor(self, packed_seq_params):
        """NeVA pads the combined sequence to a multiple of this (for SP/CP). With FP8, TE's FP8
        GEMMs need their token count divisible by 16 (8 for some shapes) and NeVA's captions give
        any length: pad to a multiple of 16 tokens per rank too. Padded positions carry no label."""
        factor, seq_dim = super()._get_shard_factor(packed_seq_params)
        lm = self.language_model.config if self.add_decoder else None
        if lm is not None and getattr(lm, "fp8", None) and self.context_parallel_lm <= 1:
            factor = math.lcm(factor, 16 * (self.tensor_model_parallel_size_lm if self.sequence_parallel_lm else 1))
        return factor, seq_dim

    def _preprocess_data(self, image_embeddings, language_embeddings, input_ids, loss_mask, labels,
                         use_inference_kv_cache, image_token_index, num_image_tiles, attention_mask=None,
                         packed_seq_params=None):
        out = super()._preprocess_data(image_embeddings, language_embeddings, input_ids, loss_mask, labels,
                                       use_inference_kv_cache, image_token_index, num_image_tiles,
                                       attention_mask, packed_seq_params)
        if (getattr(self.config, "train_first_token_after_image", True) and labels is not None and loss_mask is not None
                and (self.pre_process or self.post_process) and not use_inference_kv_cache):
            out = (out[0], out[1], self._supervise_first_token_after_image(
                out[1], out[2], input_ids, loss_mask, num_image_tiles, image_token_index), *out[3:])
        if self.capture is not None and self._placement_args is not None:
            # The combined length: the decoder input's on the first stage; under pipeline
            # parallelism NeVA pads and truncates every micro-batch to the fixed maximum length.
            seq_len = out[0].shape[0] if self.pre_process else self._language_max_sequence_length
            self._begin_capture(seq_len)
            self._placement_args = None
            if self.pre_process:
                self.capture.set_projected(out[0])  # decoder input [S, B, h]; V = its image rows
        return out


def token_spans(input_ids: torch.Tensor, num_image_tiles: torch.Tensor, img_seq_len: int,
                image_token_index: int = IMAGE_TOKEN_INDEX):
    """(is_image [B, T], start [B, T], end [B, T]): where each token of the text sequence lands in
    NeVA's combined sequence, positions [start, end). The i-th placeholder (row-major over the
    batch) spans img_seq_len × num_image_tiles[i] positions, every other token one."""
    batch, tokens = input_ids.shape
    is_image = input_ids == image_token_index
    span = torch.ones(batch, tokens, dtype=torch.long, device=input_ids.device)
    if num_image_tiles.numel():
        order = (torch.cumsum(is_image.reshape(-1).long(), 0) - 1).clamp(0, num_image_tiles.numel() - 1)
        tiles = num_image_tiles.to(device=input_ids.device, dtype=torch.long)[order].view(batch, tokens)
        span = torch.where(is_image, tiles * img_seq_len, span)
    end = torch.cumsum(span, dim=1)
    return is_image, end - span, end


def placement_masks(input_ids: torch.Tensor, num_image_tiles: torch.Tensor, img_seq_len: int, seq_len: int,
                    text_lengths: Optional[torch.Tensor] = None, image_token_index: int = IMAGE_TOKEN_INDEX):
    """Bool [B, S] image and text masks of NeVA's combined sequence, vectorised (no host sync).

    NeVA's `_preprocess_data` replaces the i-th placeholder token (row-major over the batch) by
    img_seq_len × num_image_tiles[i] image positions and keeps every other token as one text
    position, in order; positions at or beyond S are truncated. The same rule, as cumulative
    spans: token t of sample b ends at position cumsum(span)[b, t] − 1. Tokens at or beyond
    `text_lengths[b]` are the tokenizer's right padding: neither image nor text."""
    batch, tokens = input_ids.shape
    device = input_ids.device
    is_image, start, end = token_spans(input_ids, num_image_tiles, img_seq_len, image_token_index)
    spill = seq_len                            # a column for everything truncated or not wanted
    is_text = ~is_image
    if text_lengths is not None:
        # Already on the device after the data step; a host tensor passed directly is copied
        # without making the host wait for the stream.
        lengths = text_lengths.to(device, non_blocking=True)
        is_text &= torch.arange(tokens, device=device)[None, :] < lengths[:, None]
    text = torch.zeros(batch, seq_len + 1, dtype=torch.bool, device=device)
    text.scatter_(1, torch.where(is_text, start.clamp(max=spill), spill), True)
    # Image spans as +1 at their start and −1 one past their end, summed along the sequence.
    edges = torch.zeros(batch, seq_len + 1, dtype=torch.int32, device=device)
    ones = is_image.to(torch.int32)
    edges.scatter_add_(1, torch.where(is_image, start.clamp(max=spill), spill), ones)
    edges.scatter_add_(1, torch.where(is_image, end.clamp(max=spill), spill), -ones)
    image = torch.cumsum(edges, dim=1)[:, :seq_len] > 0
    return image, text[:, :seq_len]


def stage_of_layer(lm_config, pp: int, layer: int) -> int:
    """The pipeline stage holding decoder layer `layer` (1-based), for Megatron's layer split: an
    even split, or explicit first/last stage sizes with the rest split evenly."""
    if pp <= 1:
        return 0
    first = getattr(lm_config, "num_layers_in_first_pipeline_stage", None)
    last = getattr(lm_config, "num_layers_in_last_pipeline_stage", None)
    middle_stages = pp - (first is not None) - (last is not None)
    rest = lm_config.num_layers - (first or 0) - (last or 0)
    per = rest // middle_stages if middle_stages else 0
    sizes = [per] * pp
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    upto = 0
    for stage, size in enumerate(sizes):
        upto += size
        if layer <= upto:
            return stage
    return pp - 1


def basic_neva_data_step(dataloader_iter) -> dict:
    """NeVA's data step, keeping `text_lengths` (NeVA's own drops keys it does not know)."""
    batch = next(dataloader_iter)
    raw = batch[0] if isinstance(batch, tuple) and len(batch) == 3 else batch
    lengths = raw.get("text_lengths") if isinstance(raw, dict) else None
    out = neva_base.neva_data_step(iter([batch]))
    if lengths is not None:
        out["text_lengths"] = lengths if out.get("tokens") is None else _to_device(lengths, out["tokens"].device)
    return out


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor of the batch onto the model's device without making the host wait: a
    blocking host→device copy (`.to(device)`) synchronises the stream on CUDA. Non-blocking from
    page-locked memory (the data loader pins batches on GPUs; pinned here otherwise), as NeVA's
    data step moves the other keys."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()  # a pageable source would let the driver synchronise the copy
    return t.to(device, non_blocking=True)


def basic_neva_forward_step(model, batch) -> torch.Tensor:
    """NeVA's forward step plus `text_lengths` for BASIC's text rows."""
    return model(images=batch["media"], input_ids=batch["tokens"], position_ids=batch["position_ids"],
                 attention_mask=batch.get("attention_mask"), loss_mask=batch.get("loss_mask"),
                 labels=batch.get("labels"), num_image_tiles=batch.get("num_media_tiles"),
                 image_token_mask=batch.get("image_token_mask"),
                 packed_seq_params=batch.get("packed_seq_params"), text_lengths=batch.get("text_lengths"))


def _after_layer(capture: SupervisionCapture, layer_number: int, module, args, output):
    capture.after_layer(layer_number, output[0])  # TransformerLayer returns (hidden, context)


def _after_block(capture: SupervisionCapture, module, args, output):
    if isinstance(output, tuple):
        return (capture.after_block(output[0]), *output[1:])
    return capture.after_block(output)


@dataclasses.dataclass
class BasicNevaConfig(NevaConfig):
    basic: BasicConfig = dataclasses.field(default_factory=BasicConfig)
    # Train the prediction of the first token after each image (LLaVA does; NeVA masks it out).
    train_first_token_after_image: bool = True
    forward_step_fn: Callable = basic_neva_forward_step
    data_step_fn: Callable = basic_neva_data_step

    def validate_basic(self) -> int:
        """Check the BASIC settings against this model; returns k."""
        lm = self.language_transformer_config
        k = self.basic.num_supervision_layers(lm.num_layers)
        pp = self.pipeline_model_parallel_size
        if self.basic.active and pp > 1 and self.sequence_parallel and stage_of_layer(lm, pp, k) > 0:
            raise BasicConfigError(
                f"basic.layers = {k} spans pipeline stages, which is not supported together with "
                "sequence_parallel yet: lower basic.layers to the first stage's layers or turn "
                "sequence_parallel off")
        if self.basic.active:
            self._reject_unsupported_layouts(k)
        if self.basic.active and (self.calculate_per_token_loss or lm.calculate_per_token_loss):
            # Megatron then skips the 1/num_microbatches of each loss and divides all gradients by
            # the step's token count in finalize_model_grads; the aux losses, scaled per
            # micro-batch at their attachment (capture.AuxLossAutoScaler), would silently shrink
            # by that count.
            raise BasicConfigError(
                "calculate_per_token_loss = True is not supported with BASIC: its losses are "
                "averaged per micro-batch; set calculate_per_token_loss = False or basic.enabled = False")
        return k

    def _reject_unsupported_layouts(self, k: int) -> None:
        """Settings under which BASIC's supervision would be wrong or crash: refuse them by name."""
        lm = self.language_transformer_config
        enabled = "or set basic.enabled = false"
        if max(self.context_parallel_size or 1, lm.context_parallel_size or 1) > 1:
            raise BasicConfigError(
                f"context_parallel_size = {max(self.context_parallel_size, lm.context_parallel_size)} is not "
                "supported with BASIC: each rank would hold a slice of the sequence, while the target and "
                f"the attention mass need every image and text position; set context_parallel_size = 1 {enabled}")
        vpp = getattr(self, "virtual_pipeline_model_parallel_size", None) or getattr(
            lm, "virtual_pipeline_model_parallel_size", None)
        if vpp is not None and vpp > 1:
            raise BasicConfigError(
                f"virtual_pipeline_model_parallel_size = {vpp} (interleaved pipeline) is not supported "
                f"with BASIC: set it to null {enabled}")
        for key in ("fp8_dot_product_attention", "fp8_multi_head_attention"):
            if getattr(self, key, False) or getattr(lm, key, False):
                raise BasicConfigError(
                    f"{key} = True is not supported with BASIC: layers 1..{k} run their core attention "
                    f"through a kernel that also returns the log-sum-exp and takes bf16/fp16 q, k, v; "
                    f"set {key} = False (FP8 linear layers, fp8 = hybrid, are fine) {enabled}")
        if self.basic.degree == "attention":
            window = getattr(lm, "window_size", None)
            if window is not None and window[0] is not None and 0 <= window[0] < self._sequence_length():
                raise BasicConfigError(
                    f"window_size = {tuple(window)} (sliding-window attention) is not supported with "
                    "basic.degree = attention: eq. 5's attention mass assumes full causal attention; use "
                    f"basic.degree = equal or a window of at least the sequence length {enabled}")
            softmax = getattr(lm, "softmax_type", "vanilla")
            if softmax != "vanilla":
                raise BasicConfigError(
                    f"softmax_type = {softmax!r} is not supported with basic.degree = attention (eq. 5 "
                    f"needs the plain softmax); use basic.degree = equal {enabled}")

    def _sequence_length(self) -> int:
        return int(getattr(self, "seq_length", None) or getattr(self.language_transformer_config, "seq_length", None)
                   or 2 ** 31)

    # Set on the top-level config by NeMo's MegatronMixedPrecision (MegatronStrategy applies it to
    # `model.config` only); the decoder reads them from the language config, which NeVA's
    # configure_model does not update (NeMo's Qwen2-VL config copies them the same way).
    PRECISION_ATTRS = ("fp16", "bf16", "params_dtype")
    FP8_ATTRS = ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo",
                 "fp8_wgrad", "fp8_param", "fp8_dot_product_attention", "fp8_multi_head_attention",
                 "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")

    def propagate_precision(self) -> None:
        """Copy mixed-precision settings that were set on the top-level config into the
        sub-configs: fp16/bf16/params_dtype into all three, FP8 into the language model only (the
        frozen vision tower stays in bf16). Unset ones (fp32, fp8 None) never overwrite a
        sub-config's own choice."""
        subs = [c for c in (self.language_transformer_config, self.vision_transformer_config,
                            self.vision_projection_config) if c is not None]
        if getattr(self, "bf16", False) or getattr(self, "fp16", False):
            for sub in subs:
                for attr in self.PRECISION_ATTRS:
                    setattr(sub, attr, getattr(self, attr))
        if getattr(self, "fp8", None) is not None:
            for attr in self.FP8_ATTRS:
                if hasattr(self, attr):
                    setattr(self.language_transformer_config, attr, getattr(self, attr))

    def configure_model(self, tokenizer, vp_stage: Optional[int] = None) -> BasicMCoreNevaModel:
        self.propagate_precision()
        self.validate_basic()
        with neva_class.builds(BasicMCoreNevaModel, neva_base):  # upstream builds a module-level name
            return super().configure_model(tokenizer, vp_stage=vp_stage)


class BasicNevaModel(NevaModel):
    """NeVA's LightningModule; logs `basic das loss` and `basic sds loss` beside the LM loss
    (`reduced_train_loss`, also logged as `lm loss`). The aux losses enter the gradient inside
    the model (see nemo_basic.models.capture), so the LM loss reduction is NeVA's own."""

    def forward(self, input_ids, position_ids, loss_mask=None, attention_mask=None, images=None, labels=None,
                inference_params=None, num_image_tiles=None, image_token_index=IMAGE_TOKEN_INDEX,
                runtime_gather_output=None, image_token_mask=None, packed_seq_params=None, text_lengths=None):
        return self.module(images=images, input_ids=input_ids, position_ids=position_ids, loss_mask=loss_mask,
                           attention_mask=attention_mask, labels=labels, inference_params=inference_params,
                           num_image_tiles=num_image_tiles, image_token_index=image_token_index,
                           runtime_gather_output=runtime_gather_output, image_token_mask=image_token_mask,
                           packed_seq_params=packed_seq_params, text_lengths=text_lengths)

    def _captures(self):
        return [m.capture for m in self.modules() if isinstance(m, BasicMCoreNevaModel) and m.capture is not None]

    def loss_sums(self) -> torch.Tensor:
        """[das sum, das count, sds sum, sds count] of this step, summed over the pipeline and
        data-parallel ranks; pops the captured values. The tensor lives on the model's device:
        those groups are NCCL on GPUs, which takes no CPU tensor (float64 is fine for NCCL)."""
        device = next(self.parameters()).device
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for capture in self._captures():
            logs = capture.pop_logs()
            for i, name in enumerate(("das", "sds")):
                if name in logs:
                    total, count = logs[name]
                    sums[2 * i] += total.to(device=device, dtype=torch.float64)  # stays on the device
                    sums[2 * i + 1] += count
        if torch.distributed.is_initialized() and ps.model_parallel_is_initialized():
            # Only the stage holding layer k has values; then average over data-parallel ranks.
            torch.distributed.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
            torch.distributed.all_reduce(sums, group=ps.get_data_parallel_group())
        return sums

    def basic_losses(self) -> dict:
        """This step's BASIC losses, averaged over micro-batches with images and over the
        pipeline and data-parallel ranks (as the LM loss is); pops the captured values. One host
        transfer per step, for the logger."""
        das, das_n, sds, sds_n = self.loss_sums().tolist()
        return {name: total / count for name, total, count in (("das", das, das_n), ("sds", sds, sds_n))
                if count > 0}

    def on_fit_start(self):
        # With layers 1..k spanning pipeline stages, the activation exchanged between stages has
        # the supervision rows appended (nemo_basic.models.pipeline): the schedule's seq_length,
        # which NeMo takes from the data sampler, must count them.
        models = [m for m in self.modules() if isinstance(m, BasicMCoreNevaModel) and m.carry]
        sampler = getattr(getattr(self.trainer, "datamodule", None), "data_sampler", None)
        if models and sampler is not None:
            sampler.seq_len = models[0].pipeline_seq_length()

    def on_train_batch_start(self, batch, batch_idx):
        for m in self.modules():
            if isinstance(m, BasicMCoreNevaModel):
                m.sync_supervision_embedding()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        for name, value in self.basic_losses().items():
            self.log(f"basic {name} loss", value, prog_bar=True, batch_size=1, rank_zero_only=True)
        # NeMo's strategy has logged L_lm (reduced over micro-batches and data-parallel ranks) as
        # reduced_train_loss; the aux losses are not part of it. Log it under its BASIC name too.
        lm = self.trainer.callback_metrics.get("reduced_train_loss")
        if lm is not None:
            self.log("lm loss", float(lm), batch_size=1, rank_zero_only=True)
