"""The Hugging Face decoder families this converter maps to Megatron-core's GPT, one table each.

Every family is Megatron's GPT block (RMSNorm, RoPE, gated MLP, grouped-query attention); a
``Family`` row says where its Hugging Face checkpoint and config differ from Llama's, and which
NeMo 2 config class it becomes. The weight layout is handled by ``nemo_basic.convert.llama``
(which reads these rows), the model-level extras (Gemma's √d input scaling and zero-centred
norms on the local spec) by :func:`finish_gpt_model`.

=========  ==================  =====================================================================
family     NeMo config         differences from Llama
=========  ==================  =====================================================================
llama      ``LlamaConfig`` /   Llama-3.x ``rope_scaling`` of type ``llama3``: ``Llama31Config``
           ``Llama31Config``   (NeMo rescales ``inv_freq`` in ``configure_model``)
mistral    ``LlamaConfig``     ``sliding_window``: accepted only when ``seq_length`` <= the window
                               (then it never masks anything); otherwise a ``ValueError``
qwen2      ``Qwen2Config``     q/k/v biases (``add_qkv_bias``); the small ones tie embeddings
gemma      ``GemmaConfig``     norms scale by (1 + w) (``layernorm_zero_centered_gamma``), decoder
                               input × √hidden, tanh-GELU gate (GeGLU), head_dim 256, multi-query,
                               tied embeddings
phi3       ``Phi3Config``      fused ``qkv_proj`` ([q; k; v]) and ``gate_up_proj`` ([gate; up]);
                               ``rope_scaling`` of type ``longrope`` (``su`` / ``yarn``, as HF
                               reads them): ``rope_longrope``, see :func:`longrope_fields`
=========  ==================  =====================================================================
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    nemo_config: str                 # class in nemo.collections.llm
    hf_config: str                   # transformers config class (export)
    hf_causal_lm: str                # transformers model class (export)
    activations: tuple[str, ...]     # accepted HF hidden_act values
    gelu: bool = False               # gated GELU (tanh) instead of SwiGLU
    qkv_bias: bool = False           # q_proj / k_proj / v_proj carry biases
    fused_qkv: bool = False          # HF self_attn.qkv_proj = [q; k; v]
    fused_gate_up: bool = False      # HF mlp.gate_up_proj = [gate; up]
    zero_centered_norm: bool = False  # HF norms compute x̂ · (1 + w)
    scale_embedding: bool = False    # HF multiplies the decoder input by √hidden
    rope_types: tuple[str, ...] = ("default",)
    always_tied: bool = False


FAMILIES = {f.name: f for f in (
    Family("llama", ("llama",), "LlamaConfig", "LlamaConfig", "LlamaForCausalLM", ("silu", "swish"),
           rope_types=("default", "llama3")),
    Family("mistral", ("mistral",), "LlamaConfig", "MistralConfig", "MistralForCausalLM", ("silu", "swish")),
    Family("qwen2", ("qwen2",), "Qwen2Config", "Qwen2Config", "Qwen2ForCausalLM", ("silu", "swish"), qkv_bias=True),
    Family("gemma", ("gemma",), "GemmaConfig", "GemmaConfig", "GemmaForCausalLM",
           ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu"), gelu=True, zero_centered_norm=True,
           scale_embedding=True, always_tied=True),
    Family("phi3", ("phi3",), "Phi3Config", "Phi3Config", "Phi3ForCausalLM", ("silu", "swish"),
           fused_qkv=True, fused_gate_up=True, rope_types=("default", "longrope")),
)}
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES.values() for t in f.model_types)


def family_of_model_type(model_type: Optional[str]) -> Family:
    for f in FAMILIES.values():
        if (model_type or "llama") in f.model_types:
            return f
    raise ValueError(f"unsupported model_type {model_type!r}: this converter handles {SUPPORTED_MODEL_TYPES}")


def family_of_config(config: Any) -> Family:
    """The family of a Megatron / NeMo config made by this converter (older ones: Llama)."""
    return family_of_model_type(getattr(config, "hf_model_type", None) or "llama")


# -- the config checks and fields that differ per family --------------------------------------
def sliding_window_of(cfg: dict, family: Family) -> Optional[int]:
    """The attention window of an HF config, ``None`` when it attends to everything (Qwen2 keeps a
    ``sliding_window`` value but uses it only with ``use_sliding_window``). Also read by the recipe's
    configuration check (``model.seq_length``), before anything is built."""
    window = cfg.get("sliding_window")
    if family.name == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    return None if window is None else int(window)


def family_config_kwargs(cfg: dict, family: Family, seq_length: int) -> dict:
    """Megatron config fields for ``family`` beyond the Llama ones, after checking the HF config
    for features the Megatron model would not reproduce (``ValueError`` naming the field)."""
    mt = cfg.get("model_type")
    # transformers' GemmaMLP applies ``hidden_act`` (its config calls ``hidden_activation`` the override,
    # but the model does not read it): follow the model, which is the reference the tests compare to.
    act = cfg.get("hidden_act", family.activations[0])
    if act not in family.activations:
        raise ValueError(f"{mt}: hidden_act={act!r} is not supported (expected one of {family.activations})")
    for flag in ("mlp_bias",) + (() if family.qkv_bias else ("attention_bias",)):
        if cfg.get(flag):
            raise ValueError(f"{mt}: {flag}=True is not supported (Megatron config uses add_bias_linear=False)")
    partial = cfg.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0):
        raise ValueError(f"{mt}: partial_rotary_factor={partial} is not supported (rotary over the whole head only)")
    kw: dict = {"hf_model_type": family.name}

    scaling = cfg.get("rope_scaling") or None
    rope_type = "default" if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if family.name == "phi3" and rope_type in ("su", "yarn"):  # Phi3Config's own aliases of longrope
        rope_type = "longrope"
    if rope_type not in family.rope_types:
        raise ValueError(f"{mt}: rope_scaling={scaling} is not supported: this converter reproduces "
                         f"{family.rope_types} RoPE for {family.name} (Megatron would compute different "
                         "positions); use a checkpoint without it")
    if rope_type == "llama3":
        kw["rope_llama3"] = dict(factor=float(scaling["factor"]),
                                 low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                                 high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                                 original_max_position_embeddings=int(scaling.get(
                                     "original_max_position_embeddings", 8192)))
    if rope_type == "longrope":
        kw.update(longrope_fields(cfg, scaling))

    window = sliding_window_of(cfg, family)
    if window is not None:
        if seq_length > window:
            raise ValueError(f"{mt}: sliding_window={window} is smaller than seq_length={seq_length}: Megatron's "
                             "attention here is full causal and would differ from the Hugging Face model; use "
                             f"model.seq_length <= {window}")
        kw["hf_sliding_window"] = int(window)

    if family.qkv_bias:
        kw["add_qkv_bias"] = True
    if family.gelu:  # "gelu": the exact erf form; the others: the tanh approximation
        kw["activation_func"] = torch.nn.functional.gelu if act == "gelu" else _tanh_gelu()
    if family.zero_centered_norm:
        kw["layernorm_zero_centered_gamma"] = True
    if family.always_tied:
        kw["share_embeddings_and_output_weights"] = True
    return kw


def longrope_fields(cfg: dict, scaling: dict) -> dict:
    """Phi-3's LongRoPE (Phi-3-mini-128k, Phi-3.5-mini) as Megatron config fields.

    transformers (``_compute_longrope_parameters`` with Phi-3's rotary embedding) divides each RoPE
    frequency by a per-frequency factor: ``long_factor`` in a forward whose positions reach past
    ``original_max_position_embeddings`` (max(position_ids) + 1 > it), ``short_factor`` otherwise,
    and multiplies cos and sin by ``attention_factor`` (given, or √(1 + ln f / ln original) with
    f = max_position_embeddings / original; 1 when f <= 1), in both regimes.

    * cos and sin both scaled by s scale every rotated q·k by s², which is attention with the
      softmax scale s² / √head_dim: ``softmax_scale`` (RoPE rotates all of q and k, as checked
      by ``partial_rotary_factor`` above);
    * the factor set is chosen per forward from the sequence length Megatron's rotary embedding
      is called with, as HF chooses it (:func:`finish_gpt_model`): a fixed choice from
      ``model.seq_length`` would differ from HF on every batch shorter than the original context
      (batches are padded to their longest row) whenever ``model.seq_length`` exceeds it.

    ``rope_longrope`` keeps what export needs to write the same HF config back."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    short, long = scaling.get("short_factor"), scaling.get("long_factor")
    for key, factors in (("short_factor", short), ("long_factor", long)):
        if not isinstance(factors, (list, tuple)) or len(factors) != head_dim // 2:
            raise ValueError(f"{cfg.get('model_type')}: rope_scaling[{key!r}] must be a list of head_dim / 2 = "
                             f"{head_dim // 2} numbers, got {factors!r}")
    # HF reads Phi3Config's own field (default 4096), not a key of rope_scaling (Phi3Config allows none)
    original = int(cfg.get("original_max_position_embeddings") or 4096)
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    given = scaling.get("attention_factor")
    if given is not None:
        attention_factor = float(given)
    else:
        f = max_pos / original
        attention_factor = 1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(original))
    longrope = dict(short_factor=[float(x) for x in short], long_factor=[float(x) for x in long],
                    original_max_position_embeddings=original, max_position_embeddings=max_pos,
                    attention_factor=None if given is None else float(given))
    return {"rope_longrope": longrope, "softmax_scale": attention_factor ** 2 / math.sqrt(head_dim)}


def longrope_hf_fields(longrope: dict) -> dict:
    """The HF Phi-3 config fields that reproduce ``rope_longrope`` (export)."""
    scaling = {"type": "longrope", "short_factor": list(longrope["short_factor"]),
               "long_factor": list(longrope["long_factor"])}
    if longrope.get("attention_factor") is not None:
        scaling["attention_factor"] = longrope["attention_factor"]
    return dict(rope_scaling=scaling, max_position_embeddings=longrope["max_position_embeddings"],
                original_max_position_embeddings=longrope["original_max_position_embeddings"])


class LongRopeSwitch:
    """Forward pre-hook of Megatron's ``RotaryEmbedding``: its ``inv_freq`` divided by ``long_factor``
    when the rotary sequence length (its first argument; the longest packed sequence with packed
    inputs) exceeds ``original_max_position_embeddings``, by ``short_factor`` otherwise, as HF's
    Phi-3 chooses per forward. ``forward`` is ``lru_cache``d on that length, which fixes the choice,
    so the cache stays consistent. Not covered: inference with a KV cache (Megatron then asks for the
    context's maximum length; HF switches when generation crosses the original length)."""

    def __init__(self, inv_freq: torch.Tensor, short_factor, long_factor, original_max_position_embeddings: int,
                 **_: Any):
        self.original = int(original_max_position_embeddings)
        self.short = inv_freq / torch.tensor(short_factor, dtype=inv_freq.dtype, device=inv_freq.device)
        self.long = inv_freq / torch.tensor(long_factor, dtype=inv_freq.dtype, device=inv_freq.device)

    def __call__(self, module, args, kwargs):
        seq_len = args[0] if args else kwargs["max_seq_len"]
        key = "long" if int(seq_len) > self.original else "short"
        chosen = getattr(self, key)
        if chosen.device != module.inv_freq.device:  # Megatron moves inv_freq to the GPU on first use
            chosen = chosen.to(module.inv_freq.device)
            setattr(self, key, chosen)
        module.inv_freq = chosen
        return None


def _tanh_gelu():
    """NeMo's tanh-approximated GELU (what Gemma's ``gelu_pytorch_tanh`` computes); a plain torch
    function when NeMo is not importable."""
    try:
        from nemo.collections.llm.fn.activation import openai_gelu

        return openai_gelu
    except ImportError:
        return _gelu_tanh


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


# -- what a Megatron config cannot say: finish_gpt_model (called by nemo_configs and megatron) --
def local_norms_zero_centered(config: Any) -> bool:
    """Gemma on Megatron's local spec: ``WrappedTorchNorm`` rejects ``layernorm_zero_centered_gamma``,
    so the model is built without it and :func:`finish_gpt_model` makes its norms compute (1 + w).
    With Transformer Engine (the GPU spec) the flag is honoured by TE's norms."""
    if not getattr(config, "layernorm_zero_centered_gamma", False):
        return False
    try:
        from nemo.collections.llm.gpt.model.base import HAVE_TE, default_layer_spec
    except ImportError:
        return True
    return not (HAVE_TE and getattr(config, "transformer_layer_spec", default_layer_spec) is default_layer_spec)


class ZeroCenteredRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` whose weight is stored zero-centred: y = x̂ · (1 + w), as HF Gemma
    (the normalisation in fp32, cast back, as ``GemmaRMSNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.rms_norm(x.float(), self.normalized_shape, None, self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def finish_gpt_model(model: torch.nn.Module, config: Any, zero_centered_local: bool) -> torch.nn.Module:
    """The model-level parts of a family that a Megatron config cannot express.

    * Gemma on the local spec: every ``torch.nn.RMSNorm`` becomes :class:`ZeroCenteredRMSNorm`
      (same parameter, same state-dict key);
    * Gemma: the decoder input (text embeddings and, in LLaVA, the projected image features, as HF
      LLaVA feeds both through ``GemmaModel``) is multiplied by √hidden on the first stage;
    * Phi-3 LongRoPE: the rotary embedding's frequencies switch between the short and long factor
      sets with the sequence length, as HF's (:class:`LongRopeSwitch`);
    * a padded vocabulary: the padding logits are masked out of the LM softmax
      (:mod:`nemo_basic.convert.padded_vocab`)."""
    family = family_of_config(config)
    if zero_centered_local:
        for m in model.modules():
            if type(m) is torch.nn.RMSNorm:
                m.__class__ = ZeroCenteredRMSNorm
    if family.scale_embedding and getattr(model, "pre_process", False):
        model.decoder.register_forward_pre_hook(_EmbeddingScale(config.hidden_size), with_kwargs=True)
    if getattr(config, "rope_llama3", None) and getattr(model, "rotary_pos_emb", None) is not None \
            and not getattr(config, "_nemo_applies_rope_scaling", False):
        model.rotary_pos_emb.inv_freq = llama3_inv_freq(model.rotary_pos_emb.inv_freq, **config.rope_llama3)
    if getattr(config, "rope_longrope", None) and getattr(model, "rotary_pos_emb", None) is not None:
        switch = LongRopeSwitch(model.rotary_pos_emb.inv_freq, **config.rope_longrope)
        model.rotary_pos_emb.inv_freq = switch.short
        model.rotary_pos_emb.register_forward_pre_hook(switch, with_kwargs=True)
    from nemo_basic.convert.padded_vocab import install_padded_vocab_mask

    install_padded_vocab_mask(model, getattr(config, "hf_vocab_size", None))
    return model


class _EmbeddingScale:
    def __init__(self, hidden: int):
        self.scale = hidden ** 0.5

    def __call__(self, module, args, kwargs):
        x = kwargs.get("hidden_states") if "hidden_states" in kwargs else (args[0] if args else None)
        if x is None or not module.pre_process:
            return None
        x = x * torch.tensor(self.scale, dtype=x.dtype, device=x.device)  # HF: the normalizer in the input dtype
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = x
            return args, kwargs
        return (x, *args[1:]), kwargs


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> torch.Tensor:
    """Llama-3.x RoPE frequencies: wavelengths beyond the original context are stretched by
    ``factor``, short ones kept, and the band between interpolated linearly in 1 / wavelength."""
    wavelength = 2 * torch.pi / inv_freq
    long_edge = original_max_position_embeddings / low_freq_factor
    short_edge = original_max_position_embeddings / high_freq_factor
    t = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - t) * inv_freq / factor + t * inv_freq
    out = torch.where(wavelength > long_edge, inv_freq / factor, inv_freq)
    middle = (wavelength >= short_edge) & (wavelength <= long_edge)
    return torch.where(middle, blended, out)
