"""Architectures of the paper's models, as the fields of their Hugging Face ``config.json``.

They let a recipe be checked (layer counts, k, parallel sizes, parameter count) while the
checkpoint paths in ``conf/*.yaml`` are still placeholders, and let the tests build the 7B and 13B
configurations without any download. When ``model.llm_path`` / ``model.vision_path`` exist, the
checkpoint's own ``config.json`` is used and must agree with the named preset on the fields below
(a wrong path is caught before hours of queueing).

Values are those of the public ``config.json`` files of the named Hugging Face repositories.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

from nemo_basic.recipes.schema import RecipeConfigError

LLM_PRESETS = {
    # lmsys/vicuna-7b-v1.5 (Llama-2 7B architecture)
    "vicuna-7b-v1.5": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                           max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                           tie_word_embeddings=False, hidden_act="silu"),
    # lmsys/vicuna-13b-v1.5 (Llama-2 13B architecture)
    "vicuna-13b-v1.5": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                            num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                            max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                            tie_word_embeddings=False, hidden_act="silu"),
    # google/gemma-2b: multi-query attention (1 KV head), head_dim 256, GeGLU, tied embeddings
    "gemma-2b": dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                     num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=256000,
                     max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
                     tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh"),
    # microsoft/Phi-3-mini-4k-instruct (3.8B)
    "phi-3-mini-4k-instruct": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192,
                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                   vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                   rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu"),
    # mistralai/Mistral-7B-Instruct-v0.2: grouped-query attention (8 KV heads)
    "mistral-7b-instruct-v0.2": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                                     rope_theta=1000000.0, tie_word_embeddings=False, hidden_act="silu"),
    # HuggingFaceTB/SmolLM2-135M-Instruct: the embedded LLM (nemo_basic.pretrained.smollm2_dir)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, hidden_act="silu"),
}

VISION_PRESETS = {
    # openai/clip-vit-large-patch14-336 (vision_config): 24 layers, 577 positions (class + 24x24)
    "clip-vit-large-patch14-336": dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                                       num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                                       hidden_act="quick_gelu", layer_norm_eps=1e-5, class_token=True),
    # google/siglip-so400m-patch14-384 (vision_config): no class token, 27x27 patches, attention-pool head
    "siglip-so400m-patch14-384": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                                      num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14,
                                      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, class_token=False),
    # facebook/dinov2-small (also what nemo_basic.pretrained.dinov2_small_dir converts)
    "dinov2-small": dict(model_type="dinov2", hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                         num_attention_heads=6, image_size=518, patch_size=14, hidden_act="gelu",
                         layer_norm_eps=1e-6, class_token=True),
}

# fields compared between a checkpoint's config.json and the named preset
_COMPARED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "vocab_size", "patch_size")


class ArchitectureError(RecipeConfigError):
    pass


def read_hf_config(path: str) -> dict:
    """The fields of ``path/config.json`` (the ``vision_config`` / ``text_config`` part of a
    multi-modal config when the top level has none)."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if "hidden_size" not in cfg:
        for sub in ("vision_config", "text_config"):
            if isinstance(cfg.get(sub), dict) and "hidden_size" in cfg[sub]:
                return dict(cfg[sub])
    return cfg


def _vision_fields(cfg: dict) -> dict:
    out = dict(cfg)
    mt = out.get("model_type", "")
    out.setdefault("class_token", not mt.startswith("siglip"))
    if "intermediate_size" not in out and "mlp_ratio" in out:  # DINOv2
        out["intermediate_size"] = int(out["hidden_size"] * out["mlp_ratio"])
    return out


def resolve(kind: str, path: Optional[str], preset: Optional[str], key_path: str, key_preset: str) -> dict:
    """The architecture of the LLM (``kind="llm"``) or vision tower (``"vision"``): from the
    checkpoint folder if it exists (checked against ``preset`` when both are given), else from the
    preset. Raises ArchitectureError naming the keys when neither is usable."""
    table = LLM_PRESETS if kind == "llm" else VISION_PRESETS
    if preset is not None and preset not in table:
        raise ArchitectureError(f"{key_preset} = {preset!r} is invalid: expected one of {' | '.join(table)}")
    from_file = None
    if path and os.path.isfile(os.path.join(path, "config.json")):
        from_file = read_hf_config(path)
        if kind == "vision":
            from_file = _vision_fields(from_file)
    if from_file is not None:
        if preset is not None:
            want = table[preset]
            diff = {k: (from_file.get(k), want[k]) for k in _COMPARED
                    if k in want and from_file.get(k, want[k]) != want[k]}
            if diff:
                raise ArchitectureError(
                    f"{key_path} = {path!r} does not hold {key_preset} = {preset!r}: "
                    + ", ".join(f"{k} is {a} (expected {b})" for k, (a, b) in diff.items()))
        return from_file
    if preset is not None:
        return dict(table[preset])
    raise ArchitectureError(f"{key_path} = {path!r} has no config.json and {key_preset} is null: give the "
                            f"checkpoint folder or a preset ({' | '.join(table)})")


# -- parameter counts (Hugging Face's modules; Megatron adds vocabulary padding) -------------------------
@functools.lru_cache(maxsize=None)
def _count(kind: str, fields: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    fields = json.loads(fields)
    try:
        config = AutoConfig.for_model(**fields)
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            module = (AutoModelForCausalLM if kind == "llm" else AutoModel).from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise ArchitectureError(f"the {kind} architecture (model_type {fields.get('model_type')!r}) is not one "
                                f"transformers can build: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return sum(p.numel() for p in module.parameters())


def hf_parameters(kind: str, arch: dict) -> int:
    """Parameters of the module an architecture describes, counted by transformers itself on the
    ``meta`` device: the LLM with its head (``kind="llm"``), or the vision module LLaVA wraps,
    including what LLaVA leaves unused (SigLIP's attention-pool head, DINOv2's mask token). Each
    family's extras (Qwen2's q/k/v biases, tied embeddings) count as the checkpoint has them."""
    fields = {k: v for k, v in arch.items() if k != "class_token"}
    fields.setdefault("model_type", "llama" if kind == "llm" else None)
    return _count(kind, json.dumps(fields, sort_keys=True))


def projector_parameters(kind: str, vision_hidden: int, llm_hidden: int) -> int:
    if kind == "linear":
        return vision_hidden * llm_hidden + llm_hidden
    return vision_hidden * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden
