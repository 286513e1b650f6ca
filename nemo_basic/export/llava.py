"""Hugging Face ``LlavaForConditionalGeneration`` ↔ our NeVA (Megatron LLaVA) state dicts and configs.

Names (HF as transformers ≥ 4.52 names them in memory; older checkpoints on disk use
``language_model.model.*`` / ``language_model.lm_head`` / ``vision_tower.*`` /
``multi_modal_projector.*`` and are renamed on read):

=====================================================  ==============================================
HF LLaVA                                               NeVA (``MCoreNevaModel.state_dict()``)
=====================================================  ==============================================
``model.language_model.*``, ``lm_head.weight``         ``language_model.*`` (Megatron GPT, via
                                                       ``nemo_basic.convert``: fused QKV, [gate; up]
                                                       fc1, local or TE layernorm names, padded vocab)
``model.vision_tower.<X>``                             ``vision_model.<X>`` (the same HF module)
``model.multi_modal_projector.linear_1.{weight,bias}`` ``vision_projection.0.{weight,bias}``
``model.multi_modal_projector.linear_2.{weight,bias}`` ``vision_projection.2.{weight,bias}``
=====================================================  ==============================================

The feature selection maps as: HF ``vision_feature_layer`` = NeVA ``vision_feature_layer`` (both
index the encoder's ``hidden_states``); HF ``vision_feature_select_strategy="default"`` (drop one
leading token) = NeVA ``drop_vision_class_token=True`` with a one-token class prefix (CLIP,
DINOv2); ``"full"`` = keep every token (SigLIP, or CLIP with ``drop_vision_class_token=False``).
DINOv2 with registers has no HF LLaVA equivalent (HF would drop only the class token).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch

from nemo_basic.convert import hf_llama_to_mcore, mcore_to_hf_llama

HF_LLAVA_RENAME = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
)
HF_LM = "model.language_model."
HF_VISION = "model.vision_tower."
HF_PROJ = "model.multi_modal_projector."
PROJECTOR_KEYS = {  # HF LLaVA -> NeMo mlp2x_gelu (torch.nn.Sequential: Linear, GELU, Linear)
    HF_PROJ + "linear_1.weight": "vision_projection.0.weight",
    HF_PROJ + "linear_1.bias": "vision_projection.0.bias",
    HF_PROJ + "linear_2.weight": "vision_projection.2.weight",
    HF_PROJ + "linear_2.bias": "vision_projection.2.bias",
}


class ConversionError(ValueError):
    """A checkpoint or config cannot be mapped; the message names the key or field."""


def select_strategy(config: Any) -> str:
    """HF LLaVA ``vision_feature_select_strategy`` equal to the NeVA config's token dropping."""
    vision = config.vision_transformer_config
    drops = vision.class_token_len if config.drop_vision_class_token and vision.add_class_token else 0
    if drops == 0:
        return "full"
    if drops == 1:
        return "default"
    raise ConversionError(f"the vision encoder drops {drops} leading tokens ({vision.model_type}: class + "
                          "register tokens); Hugging Face LLaVA can drop only one ('default') or none ('full')")


def hf_llava_to_mcore(hf_sd: Mapping[str, torch.Tensor], config: Any, spec: str = "local",
                      dtype: Optional[torch.dtype] = torch.float32) -> dict[str, torch.Tensor]:
    """HF LLaVA tensors (new or legacy names) → the NeVA module's full (TP=1) state dict."""
    sd = {}
    for key, value in hf_sd.items():
        for pattern, repl in HF_LLAVA_RENAME:
            key = re.sub(pattern, repl, key)
        sd[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    lm_part = {k: v for k, v in sd.items() if k.startswith(HF_LM) or k == "lm_head.weight"}
    if HF_LM + "embed_tokens.weight" not in lm_part:
        raise ConversionError(f"Hugging Face LLaVA state dict has no {HF_LM}embed_tokens.weight "
                              f"(keys start with {sorted({k.split('.')[0] for k in sd})})")
    out = hf_llama_to_mcore(lm_part, config.language_transformer_config, spec=spec, prefix="language_model.",
                            hf_prefix=HF_LM)
    used = set(lm_part)
    for key, value in sd.items():
        if key.startswith(HF_VISION):
            out["vision_model." + key[len(HF_VISION):]] = value
            used.add(key)
    if not any(k.startswith("vision_model.") for k in out):
        raise ConversionError(f"Hugging Face LLaVA state dict has no vision tower weights ({HF_VISION}*)")
    for src, dst in PROJECTOR_KEYS.items():
        if src not in sd:
            raise ConversionError(f"Hugging Face LLaVA state dict has no {src!r} (only the 2-layer "
                                  "'mlp2x_gelu' projector with biases is supported)")
        out[dst] = sd[src]
        used.add(src)
    left = sorted(set(sd) - used)
    if left:
        raise ConversionError(f"Hugging Face LLaVA state dict has keys this converter does not map: {left[:8]}")
    return out


# position tables of the HF vision towers: key under the tower, leading non-patch rows, whether the
# table is [1, n, d] (else [n, d]), and the dtype transformers interpolates in (None: the table's)
_POSITION_TABLES = {
    "clip_vision_model": ("vision_model.embeddings.position_embedding.weight", 1, False, None),
    "siglip_vision_model": ("vision_model.embeddings.position_embedding.weight", 0, False, None),
    "dinov2": ("embeddings.position_embeddings", 1, True, torch.float32),
    "dinov2_with_registers": ("embeddings.position_embeddings", 1, True, torch.float32),
}


def position_table_at_input_size(state: Mapping[str, torch.Tensor], vision: Any, prefix: str = ""
                                 ) -> dict[str, torch.Tensor]:
    """The tower's learned position table resampled from its pre-training grid
    (``hf_config["image_size"] // patch``) to the grid it is fed (``vision.image_size // patch``),
    exactly as transformers interpolates it at run time for such inputs (bicubic,
    ``align_corners=False``, in float32 for DINOv2 and in the table's dtype for CLIP and SigLIP; the
    class-token row kept), so that a config declaring the
    input size gives the same numbers without interpolating. ``{}`` when the grids agree.

    DINOv2 interpolates at every call (its embedded default is fed 112 px on a 518 px table); CLIP and
    SigLIP interpolate only with ``interpolate_pos_encoding=True``. Engines that count image tokens
    from ``vision_config.image_size`` (vLLM) need the table and the config to say the input size."""
    family = vision.family.name if hasattr(vision, "family") else vision.hf_config["model_type"]
    native, patch, fed = int(vision.hf_config["image_size"]), int(vision.hf_config["patch_size"]), int(vision.image_size)
    if native == fed:
        return {}
    if family not in _POSITION_TABLES:
        raise ConversionError(f"vision tower {family!r} is fed {fed} px but declares image_size {native}: "
                              "no rule to resample its position table for the export")
    name, lead, batched, work_dtype = _POSITION_TABLES[family]
    key = prefix + name
    if key not in state:
        raise ConversionError(f"vision tower {family!r}: no position table {key!r} in the checkpoint")
    table = state[key]
    rows = table[0] if batched else table
    old_side, new_side = native // patch, fed // patch
    if rows.shape[0] != lead + old_side * old_side:
        raise ConversionError(f"{key}: {rows.shape[0]} rows, expected {lead} + {old_side}x{old_side} for "
                              f"image_size {native} / patch {patch}")
    grid = rows[lead:].reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid.to(work_dtype or rows.dtype), size=(new_side, new_side),
                                           mode="bicubic", align_corners=False).to(rows.dtype)
    new_rows = torch.cat([rows[:lead], grid.permute(0, 2, 3, 1).reshape(new_side * new_side, -1)])
    out = {key: new_rows[None] if batched else new_rows}
    ids_key = prefix + name.rsplit(".", 2)[0] + ".position_ids"  # CLIP / SigLIP buffer, when saved
    if not batched and ids_key in state:
        out[ids_key] = torch.arange(new_rows.shape[0], dtype=state[ids_key].dtype)[None]
    return out


def mcore_to_hf_llava(sd: Mapping[str, torch.Tensor], config: Any, spec: str, text_vocab_size: int,
                      dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The NeVA module's full (TP=1) state dict → HF LLaVA tensors (transformers' in-memory names).

    ``text_vocab_size``: embedding rows to write (the tokenizer's, incl. the image token); rows
    beyond the Megatron table are zero. With tied embeddings ``lm_head.weight`` is left out (HF
    ties it on load)."""
    lm_config = config.language_transformer_config
    padded = lm_config.vocab_size
    keep = min(text_vocab_size, padded)
    lm_sd = {k: v for k, v in sd.items() if k.startswith("language_model.")}
    out = mcore_to_hf_llama(lm_sd, lm_config, spec=spec, prefix="language_model.", vocab_size=keep,
                            hf_prefix=HF_LM, lm_head_key="lm_head.weight")
    if text_vocab_size > padded:
        extra = text_vocab_size - padded
        for key in (HF_LM + "embed_tokens.weight", "lm_head.weight"):
            if key in out and not (key == "lm_head.weight" and lm_config.share_embeddings_and_output_weights):
                out[key] = torch.cat([out[key], out[key].new_zeros(extra, out[key].shape[1])])
    if lm_config.share_embeddings_and_output_weights:
        out.pop("lm_head.weight", None)
    vision = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    if not vision:
        raise ConversionError("checkpoint has no vision_model.* tensors")
    for key, value in vision.items():
        out[HF_VISION + key[len("vision_model."):]] = value
    out.update(position_table_at_input_size(out, config.vision_transformer_config, prefix=HF_VISION))
    inverse = {v: k for k, v in PROJECTOR_KEYS.items()}
    proj = {k for k in sd if k.startswith("vision_projection.")}
    if proj != set(inverse):
        raise ConversionError(f"projector tensors {sorted(proj)} are not the 2-layer mlp2x_gelu projector "
                              f"{sorted(inverse)} that Hugging Face LLaVA has")
    for key in proj:
        out[inverse[key]] = sd[key]
    left = sorted(k for k in sd if not k.startswith(("language_model.", "vision_model.", "vision_projection."))
                  and not k.endswith("_extra_state"))
    if left:
        raise ConversionError(f"checkpoint has tensors the Hugging Face LLaVA export does not map: {left[:8]}")
    if dtype is not None:
        out = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}


def hf_llava_config(config: Any, text_vocab_size: int, image_token_index: int, dtype: torch.dtype,
                    pad_token_id: Optional[int] = None, **text_overrides: Any):
    """``transformers.LlavaConfig`` for a NeVA config with an HF vision tower and mlp2x_gelu projector."""
    from transformers import LlavaConfig

    from nemo_basic.convert import nemo_llama_config_to_hf
    from nemo_basic.models.vision import HFVisionEncoderConfig

    vision = config.vision_transformer_config
    if not isinstance(vision, HFVisionEncoderConfig):
        raise ConversionError(f"vision encoder {type(vision).__name__} is not a Hugging Face tower "
                              "(HFVisionEncoderConfig); only those export to Hugging Face LLaVA")
    proj = config.vision_projection_config
    if getattr(proj, "projector_type", None) != "mlp2x_gelu":
        raise ConversionError(f"projector_type {getattr(proj, 'projector_type', None)!r}: Hugging Face LLaVA "
                              "has the 2-layer 'mlp2x_gelu' projector only")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ConversionError(f"vision_feature_layer={layer!r}: only a single layer index is supported")
    lm = config.language_transformer_config
    text = nemo_llama_config_to_hf(lm, vocab_size=min(text_vocab_size, lm.vocab_size), **text_overrides)
    text.vocab_size = text_vocab_size
    if pad_token_id is not None:
        text.pad_token_id = pad_token_id
    vision_hf = vision.transformers_config()
    # The size the tower is fed (the processor's), not its pre-training size: engines count image
    # tokens and build the position table from it (mcore_to_hf_llava resamples the table to match).
    vision_hf.image_size = vision.image_size
    from nemo_basic.models.builder import image_seq_length

    out = LlavaConfig(vision_config=vision_hf.to_dict(), text_config=text.to_dict(),
                      image_token_index=image_token_index, projector_hidden_act="gelu",
                      vision_feature_select_strategy=select_strategy(config), vision_feature_layer=layer,
                      image_seq_length=image_seq_length(config), multimodal_projector_bias=True,
                      tie_word_embeddings=bool(lm.share_embeddings_and_output_weights))
    out.torch_dtype = dtype
    out.architectures = ["LlavaForConditionalGeneration"]
    return out


__all__ = [
    "ConversionError",
    "HF_LLAVA_RENAME",
    "position_table_at_input_size",
    "PROJECTOR_KEYS",
    "hf_llava_config",
    "hf_llava_to_mcore",
    "mcore_to_hf_llava",
    "select_strategy",
]
