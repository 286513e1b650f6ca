"""Tiny Megatron-core LLaVA models and batches, for tests and parity scripts (CPU, fp32).

Shapes: a 2-layer CLIP-style ViT (hidden 32, non-causal) on 16×16 images with 4×4 patches
(16 patches, class token dropped), an MLP projector, a 4-layer GPT decoder with RoPE (hidden 64,
4 heads) over a vocabulary of 1024.
"""
from __future__ import annotations

import dataclasses

import torch

from nemo_basic.models.tiny import IMG, PATCH, VOCAB  # noqa: E402  (one home for the tiny shapes)
IMG_SEQ_LEN = (IMG // PATCH) ** 2
LM_SEQ = 64

_CPU_FRIENDLY = dict(
    use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
    bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
    bias_dropout_fusion=False, gradient_accumulation_fusion=False,
)


def language_config(tp: int = 1, pp: int = 1, num_layers: int = 4, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(_CPU_FRIENDLY, num_layers=num_layers, hidden_size=64, ffn_hidden_size=256,
                  num_attention_heads=4, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                  apply_rope_fusion=False, pipeline_dtype=torch.float32 if pp > 1 else None,
                  batch_p2p_sync=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def vision_config(tp: int = 1):
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(**_CPU_FRIENDLY, num_layers=2, hidden_size=32, ffn_hidden_size=64,
                            num_attention_heads=2, tensor_model_parallel_size=tp)
    cfg.vision_model_type = "clip"
    return cfg


def projector_config(tp: int = 1):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(**_CPU_FRIENDLY, num_layers=1, hidden_size=64, ffn_hidden_size=64,
                             num_attention_heads=2, tensor_model_parallel_size=tp)


def tiny_llava(tp: int = 1, pp: int = 1, num_layers: int = 4, **lm_overrides):
    """Build the tiny LLaVAModel for this rank's pipeline stage (parallel state must be initialised)."""
    from megatron.core import parallel_state as ps
    from megatron.core.enums import ModelType
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    from nemo_basic.models.specs import language_layer_spec, projector_spec, vision_layer_spec

    first = ps.is_pipeline_first_stage()
    last = ps.is_pipeline_last_stage()
    model = LLaVAModel(
        language_transformer_config=language_config(tp, pp, num_layers, **lm_overrides),
        language_transformer_layer_spec=language_layer_spec(use_te=False),
        language_vocab_size=VOCAB,
        language_max_sequence_length=LM_SEQ,
        vision_transformer_config=vision_config(tp),
        vision_transformer_layer_spec=vision_layer_spec(use_te=False),
        drop_vision_class_token=True,
        vision_projection_config=projector_config(tp),
        vision_projection_layer_spec=projector_spec(use_te=False),
        vision_projection_type="mlp",
        parallel_output=True,
        language_position_embedding_type="rope",
        pre_process=first, post_process=last, add_encoder=first, add_decoder=True,
        img_h=IMG, img_w=IMG, patch_dim=PATCH,
    )
    # The pipeline schedules read model_type (Megatron-LM's get_model() sets it; LLaVAModel does not).
    model.model_type = ModelType.encoder_or_decoder
    return model


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor     # [B, T] with -200 image placeholders
    labels: torch.Tensor        # [B, T]
    loss_mask: torch.Tensor     # [B, T]
    images: torch.Tensor        # [num_images, 3, IMG, IMG]
    num_image_tiles: torch.Tensor  # [num_images]
    text_lengths: torch.Tensor | None = None  # [B] unpadded lengths (None: no padding)


def tiny_batch(seed: int, batch_size: int = 2, text_len: int = 20, image_at: int = 3) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch_size, text_len), generator=g)
    ids[:, image_at] = -200
    return Batch(input_ids=ids, labels=torch.randint(1, VOCAB, (batch_size, text_len), generator=g),
                 loss_mask=torch.ones(batch_size, text_len),
                 images=torch.randn(batch_size, 3, IMG, IMG, generator=g),
                 num_image_tiles=torch.ones(batch_size, dtype=torch.int))


def lm_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return (per_token_loss * loss_mask).sum() / loss_mask.sum()


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """Initialise Megatron's parallel state on an already-initialised torch.distributed group."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def remap_pipeline_state_dict(full: dict, model: torch.nn.Module, layers_per_stage: int, stage: int) -> dict:
    """Pick this stage's tensors from a single-stage state dict (decoder layer indices are local)."""
    out = {}
    for key in model.state_dict():
        src = key
        if key.startswith("language_model.decoder.layers."):
            rest = key[len("language_model.decoder.layers."):]
            idx, tail = rest.split(".", 1)
            src = f"language_model.decoder.layers.{int(idx) + stage * layers_per_stage}.{tail}"
        out[key] = full[src]
    return out


def tp_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """Global L2 norm of the gradients over the TP and PP groups, each parameter counted once."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.double().pow(2).sum()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(sq, group=ps.get_model_parallel_group())
    return sq.sqrt()
