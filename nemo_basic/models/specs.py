"""Layer specs, selected by backend: Transformer Engine on GPUs, Megatron's local modules on CPUs."""
from __future__ import annotations

import copy

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from nemo_basic.compat.kernels import have_transformer_engine  # noqa: F401  (re-exported: the spec choice)


def vision_layer_spec(use_te: bool | None = None) -> ModuleSpec:
    """ViT layer spec with a bidirectional (non-causal) self-attention.

    Upstream: megatron.core.models.vision.vit_layer_specs.get_vit_layer_with_local_spec sets
    `attn_mask_type=AttnMaskType.causal` (the TE spec uses `no_mask`), so a ViT built from the local
    spec silently masks patches from attending to later patches. We take the local spec and set
    `no_mask`, which is what CLIP/SigLIP/DINOv2 compute.
    """
    from megatron.core.models.vision import vit_layer_specs

    if use_te is None:
        use_te = have_transformer_engine()
    if use_te:
        return vit_layer_specs.get_vit_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(vit_layer_specs.get_vit_layer_with_local_spec())
    spec.submodules.self_attention.params = dict(spec.submodules.self_attention.params or {},
                                                 attn_mask_type=AttnMaskType.no_mask)
    return spec


def language_layer_spec(use_te: bool | None = None, normalization: str = "LayerNorm") -> ModuleSpec:
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = have_transformer_engine()
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization)


def projector_spec(use_te: bool | None = None) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec

    if use_te is None:
        use_te = have_transformer_engine()
    return get_mlp_module_spec(use_te=use_te).submodules
