"""The tiny NeVA, a model type of the recipes (``model.type: tiny``): ViT 16×16/4 → MLP projector →
4-layer GPT (hidden 64), vocabulary 1024, trained on synthetic data (`nemo_basic.data.synthetic`) in
seconds per step on a CPU. For trying options and for the tests; built through NeMo's own config
classes so that `nemo.lightning` trains it.

Its random weights do not depend on the parallel layout (`layout_free_init`): a TP/PP run and the
single process start from the same model, so their losses can be compared step for step.

Importing this module imports nothing heavy; the config builders import NeMo when called.
"""
from __future__ import annotations

import re
import zlib

import torch

VOCAB = 1024
IMG, PATCH = 16, 4
TEXT_LEN = 20   # tokens of a synthetic sample
SEQ = 64        # default sequence length


def architecture(num_layers: int = 4) -> tuple[dict, dict]:
    """(LLM, vision tower) shapes in Hugging Face config terms, for the recipe's checks (no NeMo)."""
    llm = dict(model_type="tiny", hidden_size=64, intermediate_size=256, num_hidden_layers=num_layers,
               num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB, tie_word_embeddings=False)
    vision = dict(model_type="tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=IMG, patch_size=PATCH, class_token=True)
    return llm, vision


def _cpu_backend() -> bool:
    from nemo_basic import compat

    return compat.cpu_backend_needed()


_CPU_FRIENDLY = dict(
    # on the CPU backend only: TE builds FP8 primary weights (fp8_param) by quantising on the GPU
    use_cpu_initialization=_cpu_backend(), params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
    bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
    bias_dropout_fusion=False, gradient_accumulation_fusion=False,
)


def _language_fusions() -> dict:
    """On a GPU, the LLM's kernel fusions that this machine's kernels allow (nemo_basic.compat.kernels),
    so the GPU self-test's tiny runs train with them; on the CPU backend, the flags above."""
    if _cpu_backend():
        return dict(_CPU_FRIENDLY, apply_rope_fusion=False)
    from nemo_basic.compat import kernels

    # What the local spec accepts (the self-test builds this model with the local spec, and with the
    # TE spec where TE imports), plus TE's rope kernel, which both specs call where it imports.
    flags = kernels.fusion_flags(gpu_backend=True, transformer_engine=False,
                                 torch_compile=kernels.torch_compile_can_build())
    # gradient-accumulation fusion writes into Megatron DDP's `main_grad`, which the test-suite's
    # and the self-test's plain forward/backward calls do not create
    flags.update(apply_rope_fusion=kernels.have_transformer_engine(), gradient_accumulation_fusion=False)
    return dict(_CPU_FRIENDLY, **flags)


def _nemo():
    from nemo_basic import compat

    compat.apply_nemo()  # before any nemo import: torchvision shim + CPU patches


def tiny_language_config(num_layers: int = 4, init_method_std: float = 0.02):
    _nemo()
    from nemo.collections import llm

    from nemo_basic.models.specs import language_layer_spec

    return llm.GPTConfig(num_layers=num_layers, init_method_std=init_method_std, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                         seq_length=SEQ, vocab_size=VOCAB, make_vocab_size_divisible_by=128,
                         position_embedding_type="rope", share_embeddings_and_output_weights=False,
                         transformer_layer_spec=language_layer_spec(), **_language_fusions())


def tiny_vision_config():
    _nemo()
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig
    from nemo.collections.vlm.vision.base import CLIPViTConfig

    from nemo_basic.models.specs import vision_layer_spec

    cfg = CLIPViTConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                        kv_channels=16, num_query_groups=2, img_h=IMG, img_w=IMG, patch_dim=PATCH,
                        ln_pre_impl=WrappedTorchNorm, ln_post_impl=WrappedTorchNorm,
                        transformer_layer_spec=vision_layer_spec(), **_CPU_FRIENDLY)
    # Upstream: CLIPViTConfig.__post_init__ overrides TransformerConfig.__post_init__ without
    # calling it, so init_method and friends stay unset; run the base initialiser as well.
    TransformerConfig.__post_init__(cfg)
    return cfg


def tiny_neva_config(config_cls=None, num_layers: int = 4, init_method_std: float = 0.02, **kwargs):
    _nemo()
    from nemo.collections import vlm
    from nemo.collections.vlm.vision.base import MultimodalProjectorConfig

    config_cls = config_cls or vlm.NevaConfig
    projector = MultimodalProjectorConfig(projector_type="mlp2x_gelu", input_size=32, hidden_size=64,
                                          ffn_hidden_size=64)
    kwargs = dict(dict(vision_feature_layer=-1, freeze_language_model=False, freeze_vision_model=False,
                       batch_p2p_sync=False), **kwargs)
    return config_cls(language_transformer_config=tiny_language_config(num_layers, init_method_std),
                      vision_transformer_config=tiny_vision_config(), vision_projection_config=projector,
                      **kwargs)


class TinyTokenizer:
    """NevaModel only stores the tokenizer and reads its vocabulary size."""

    vocab_size = VOCAB




# -- weights that do not depend on the parallel layout ----------------------------------------------------
_LAYER = re.compile(r"(decoder\.layers\.)(\d+)(\.)")


def _global_names(module: torch.nn.Module) -> dict:
    """{parameter: its name in the single-process model}: a pipeline stage numbers its decoder
    layers from 0, Megatron's `layer_number` is the global (1-based) one."""
    out = {}
    for prefix, sub in module.named_modules():
        layers = getattr(sub, "layers", None)
        if not (prefix.endswith("decoder") and isinstance(layers, torch.nn.ModuleList)):
            continue
        for i, layer in enumerate(layers):
            number = getattr(layer, "layer_number", i + 1)
            for name, p in layer.named_parameters():
                out[p] = f"{prefix}.layers.{number - 1}.{name}"
    for name, p in module.named_parameters():
        out.setdefault(p, name)
    return out


def layout_free_init(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Redraw every matrix (≥ 2-D parameter) of the tiny model from N(0, std²), each from its own
    generator seeded by (seed, its single-process name), drawn whole and sliced to this rank's
    tensor-parallel shard; biases 0, norm scales 1 (NeVA's projector is torch.nn.Linear, whose
    bias torch draws at random). Megatron seeds each pipeline stage differently and draws layer
    after layer, so without this a 2-stage run would start from other weights than the single
    process."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    names = _global_names(module)
    with torch.no_grad():
        for p, name in names.items():
            if p.dim() < 2:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            name = re.sub(r"^(module\.)+", "", name)
            shape = list(p.shape)
            dim = getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1
            if dim >= 0:
                shape[dim] *= tp
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            full = torch.randn(shape, generator=g, dtype=torch.float32) * std
            if dim >= 0:
                full = full.chunk(tp, dim=dim)[rank]
            p.copy_(full.to(device=p.device, dtype=p.dtype))
