"""Decoder LLMs between Hugging Face and Megatron-core: Llama (Vicuna, SmolLM2, Llama-3.x), Mistral,
Qwen2/2.5, Gemma, Phi-3 (per-family differences: ``nemo_basic.convert.families``).

Megatron-core's GPT layout differs from Hugging Face's in four ways, all handled here:

* attention: HF keeps ``q_proj`` / ``k_proj`` / ``v_proj``; Megatron packs them into one
  ``linear_qkv`` whose rows are grouped by query group: for group g, the q rows of its
  ``heads // groups`` heads, then the k rows, then the v rows (``SelfAttention.
  get_query_key_value_tensors`` splits it that way);
* the SwiGLU MLP: HF's ``gate_proj`` and ``up_proj`` are stacked into ``linear_fc1`` ([gate; up]);
* norms: the *local* spec has ``input_layernorm`` / ``pre_mlp_layernorm`` modules, the Transformer
  Engine spec fuses them into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``
  (the mapping in ``get_gpt_layer_local_spec``'s ``sharded_state_dict_keys_map``). Loading one
  naming into the other model silently drops the two norms, so both are supported explicitly;
* vocabulary: Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by`` x TP.
  Import adds zero rows, export strips them.

The state-dict functions are plain torch and accept any config object with the Megatron
``TransformerConfig`` attribute names, so they serve NeMo 2 and a bare Megatron-core front end
alike. Only :func:`hf_llama_config_to_nemo` imports NeMo.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from nemo_basic.convert.families import family_of_config

logger = logging.getLogger(__name__)

SPECS = ("local", "te")
# (pre-attention norm, pre-MLP norm) relative to "decoder.layers.{i}." for each layer spec
NORM_KEYS = {
    "local": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
    "te": ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"),
}
_HF_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")   # buffers some older checkpoints saved
_MCORE_IGNORABLE = re.compile(r"(^|\.)_extra_state$")         # TE / Megatron module metadata, not weights


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                      tensor_model_parallel_size: int = 1) -> int:
    """Megatron's padded vocabulary: the next multiple of ``divisible_by x TP`` (as
    ``nemo.lightning.base.get_vocab_size`` and Megatron-LM's ``_vocab_size_with_padding``)."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def _hf_config_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, Mapping):
        cfg = dict(hf_config)
    elif hasattr(hf_config, "to_dict"):
        cfg = hf_config.to_dict()
    else:
        raise TypeError(f"expected a transformers PretrainedConfig or a dict, got {type(hf_config).__name__}")
    if "text_config" in cfg and "hidden_size" not in cfg:  # a LLaVA config: its language model
        text = cfg["text_config"]
        cfg = text if isinstance(text, dict) else text.to_dict()
    return cfg


def llama_config_kwargs(hf_config: Any, **overrides: Any) -> dict:
    """The Megatron / NeMo ``GPTConfig`` fields of a Hugging Face LLM config (any family of
    ``nemo_basic.convert.families``), plus ``hf_model_type`` and the family's extras.

    ``overrides`` win over the mapped values (e.g. ``seq_length``, ``tensor_model_parallel_size``,
    ``make_vocab_size_divisible_by``, ``params_dtype``). ``vocab_size`` is the padded size unless
    given explicitly; ``hf_vocab_size`` records the unpadded one. Raises ``ValueError`` naming the
    field for what the Megatron model would compute differently (an activation or bias the family
    does not have, RoPE scaling other than Llama-3's, partial rotary, a sliding window shorter
    than ``seq_length``).
    """
    from nemo_basic.compat import cpu_backend_needed
    from nemo_basic.compat.kernels import available_fusions, have_transformer_engine
    from nemo_basic.convert.families import family_config_kwargs, family_of_model_type

    cfg = _hf_config_dict(hf_config)
    family = family_of_model_type(cfg.get("model_type", "llama"))
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if cfg.get(k) is None]
    if missing:
        raise ValueError(f"Hugging Face config lacks {missing}")
    seq_length = overrides.get("seq_length", cfg.get("max_position_embeddings", 4096))
    family_kw = family_config_kwargs(cfg, family, seq_length)

    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    theta = float(cfg.get("rope_theta", 10000.0))
    kw = dict(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        position_embedding_type="rope",
        rotary_base=int(theta) if theta.is_integer() else theta,
        rotary_percent=1.0,
        seq_length=cfg.get("max_position_embeddings", 4096),
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
        init_method_std=cfg.get("initializer_range", 0.02),
        hidden_dropout=0.0,
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        make_vocab_size_divisible_by=128,
        params_dtype=torch.float32,
    )
    kw.update(family_kw)
    # Each fusion only where its kernel imports (TE, apex), not wherever CUDA is: NeMo's family
    # configs turn them all on (nemo_basic.compat.kernels says what fails otherwise).
    kw.update({flag: False for flag, ok in available_fusions().items() if not ok})
    if cpu_backend_needed():
        kw["use_cpu_initialization"] = True
    if family.name == "gemma" and not have_transformer_engine():
        # NeMo's GemmaConfig asks TE for flash attention; Megatron's own attention here
        from megatron.core.transformer.enums import AttnBackend

        kw["attention_backend"] = AttnBackend.auto
    kw.update(overrides)
    hf_vocab = cfg["vocab_size"]
    if "vocab_size" not in overrides:
        kw["vocab_size"] = padded_vocab_size(hf_vocab, kw["make_vocab_size_divisible_by"],
                                             kw.get("tensor_model_parallel_size", 1))
    elif kw["vocab_size"] < hf_vocab:
        raise ValueError(f"vocab_size={kw['vocab_size']} is smaller than the checkpoint's {hf_vocab}")
    kw["hf_vocab_size"] = hf_vocab
    return kw


def hf_llama_config_to_nemo(hf_config: Any, **overrides: Any):
    """A ``nemo.collections.llm.LlamaConfig`` equal to the Hugging Face model's architecture.

    The class is the family's NeMo config (``LlamaConfig``, ``Llama31Config``, ``Qwen2Config``,
    ``GemmaConfig``, ``Phi3Config``) subclassed in ``nemo_basic.convert.nemo_configs``.
    ``config.vocab_size`` is the padded vocabulary (what ``configure_model`` builds); the
    unpadded size is the field ``config.hf_vocab_size`` (export, padding-logit mask). Fusion
    flags that need CUDA are off when the CPU backend is active. Call
    ``nemo_basic.compat.apply_nemo()`` before importing NeMo (done here).
    """
    import nemo_basic.compat as compat

    compat.apply_nemo()
    from nemo.collections import llm

    from nemo_basic.convert.families import family_of_model_type
    from nemo_basic.convert.nemo_configs import nemo_config_class

    kw = llama_config_kwargs(hf_config, **overrides)
    family = family_of_model_type(kw["hf_model_type"])
    llama3 = kw.get("rope_llama3")
    if llama3:  # NeMo's Llama31Config applies the scaling in configure_model
        kw.update(scale_factor=llama3["factor"], low_freq_factor=llama3["low_freq_factor"],
                  high_freq_factor=llama3["high_freq_factor"],
                  old_context_len=llama3["original_max_position_embeddings"])
    return nemo_config_class(family, llama3=bool(llama3))(**kw)


def hf_llama_config_to_mcore(hf_config: Any, **overrides: Any):
    """The same mapping as :func:`hf_llama_config_to_nemo` without NeMo: a ``MegatronLlamaConfig``
    (Megatron ``TransformerConfig`` plus vocab / RoPE / tying fields) for :func:`build_gpt_model`."""
    from nemo_basic.convert.megatron import MegatronLlamaConfig

    return MegatronLlamaConfig(**llama_config_kwargs(hf_config, **overrides))


def nemo_llama_config_to_hf(config: Any, vocab_size: Optional[int] = None, **overrides: Any):
    """The ``transformers`` config of the family (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``,
    ``GemmaConfig``, ``Phi3Config``) for a Megatron / NeMo config made by this converter (the export
    direction; configs without ``hf_model_type`` are Llama).

    ``vocab_size`` defaults to ``config.hf_vocab_size`` when present, else ``config.vocab_size``.
    """
    import transformers

    from nemo_basic.convert.families import family_of_config

    family = family_of_config(config)
    if getattr(config, "normalization", "RMSNorm") != "RMSNorm" or not getattr(config, "gated_linear_unit", True):
        raise ValueError(f"only RMSNorm + gated-MLP configs map to a Hugging Face {family.hf_config}")
    heads = config.num_attention_heads
    head_dim = config.kv_channels or config.hidden_size // heads
    kw = dict(
        vocab_size=_export_vocab_size(config, vocab_size),
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=config.num_query_groups or heads,
        head_dim=head_dim,
        max_position_embeddings=config.seq_length,
        rms_norm_eps=config.layernorm_epsilon,
        rope_theta=float(config.rotary_base),
        tie_word_embeddings=bool(config.share_embeddings_and_output_weights),
        initializer_range=config.init_method_std,
        hidden_act=("gelu" if config.activation_func is F.gelu else "gelu_pytorch_tanh") if family.gelu else "silu",
        architectures=[family.hf_causal_lm],
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # the tokenizer's, passed by the caller
    )
    window = getattr(config, "hf_sliding_window", None)
    if family.name in ("llama", "gemma"):
        kw.update(attention_bias=False)
    if family.name == "llama":
        kw.update(mlp_bias=False)
        llama3 = getattr(config, "rope_llama3", None)
        if llama3:
            kw["rope_scaling"] = dict(rope_type="llama3", **llama3)
    if family.name == "mistral":
        kw["sliding_window"] = window
    if family.name == "qwen2":
        kw.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=config.num_layers)
    if family.name == "phi3":
        kw.update(sliding_window=window, original_max_position_embeddings=config.seq_length)
        longrope = getattr(config, "rope_longrope", None)
        if longrope:  # HF's max / original lengths set its attention factor and its factor switch
            from nemo_basic.convert.families import longrope_hf_fields

            kw.update(longrope_hf_fields(longrope))
    if family.name in ("qwen2", "phi3") and head_dim * heads != config.hidden_size:
        raise ValueError(f"{family.hf_config} has head_dim = hidden_size / heads; this model has kv_channels="
                         f"{head_dim} with hidden {config.hidden_size} and {heads} heads")
    kw.update(overrides)
    return getattr(transformers, family.hf_config)(**kw)


# --------------------------------------------------------------------------------------------
# state dicts
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Shape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int           # padded (Megatron) vocabulary
    tied: bool
    gated: bool

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups


def _shape(config: Any) -> _Shape:
    heads = config.num_attention_heads
    groups = getattr(config, "num_query_groups", None) or heads
    if heads % groups:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}")
    if getattr(config, "vocab_size", None) is None:
        raise ValueError("config.vocab_size is None: set the (padded) Megatron vocabulary size")
    return _Shape(
        layers=config.num_layers,
        hidden=config.hidden_size,
        ffn=config.ffn_hidden_size,
        heads=heads,
        groups=groups,
        head_dim=getattr(config, "kv_channels", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        tied=bool(config.share_embeddings_and_output_weights),
        gated=bool(getattr(config, "gated_linear_unit", True)),
    )


def _check_spec(spec: str) -> None:
    if spec not in SPECS:
        raise ValueError(f"spec must be one of {SPECS}, got {spec!r}")


def _export_vocab_size(config: Any, vocab_size: Optional[int]) -> int:
    if vocab_size is None:
        vocab_size = getattr(config, "hf_vocab_size", None) or config.vocab_size
    if vocab_size > config.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} exceeds the Megatron vocabulary {config.vocab_size}")
    return vocab_size


class _Source:
    """Reads tensors from a state dict by key, remembering which keys were used."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], what: str):
        self.sd, self.what, self.used = state_dict, what, set()

    def __call__(self, key: str, shape: Optional[tuple] = None) -> torch.Tensor:
        if key not in self.sd:
            raise KeyError(f"{self.what} state dict has no key {key!r}")
        t = self.sd[key]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.what} tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        self.used.add(key)
        return t

    def check_all_used(self, prefix: str, ignorable: re.Pattern, roots: tuple[str, ...]) -> None:
        left = sorted(k for k in self.sd if k.startswith(prefix) and k not in self.used
                      and k[len(prefix):].startswith(roots) and not ignorable.search(k))
        if left:
            raise ValueError(f"{self.what} state dict has keys this converter does not map (an unsupported "
                             f"architecture feature?): {left[:8]}{' ...' if len(left) > 8 else ''}")


def _detect_hf_prefix(hf_sd: Mapping[str, Any]) -> tuple[str, Optional[str]]:
    emb = [k for k in hf_sd if k.endswith("embed_tokens.weight")]
    if len(emb) != 1:
        raise KeyError(f"cannot locate the language model in the Hugging Face state dict: "
                       f"{len(emb)} keys end with 'embed_tokens.weight' ({emb[:4]}); pass hf_prefix=")
    heads = [k for k in hf_sd if k == "lm_head.weight" or k.endswith(".lm_head.weight")]
    if len(heads) > 1:
        raise KeyError(f"several lm_head weights in the Hugging Face state dict: {heads}")
    return emb[0][: -len("embed_tokens.weight")], (heads[0] if heads else None)


def _pad_rows(t: torch.Tensor, rows: int, key: str) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ValueError(f"{key} has {t.shape[0]} rows, more than the Megatron vocabulary {rows} "
                         f"(config.vocab_size); raise vocab_size or make_vocab_size_divisible_by")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """[q; k; v] (HF layout, rows by head) -> Megatron ``linear_qkv`` (rows by query group:
    the group's q heads, then its k head, then its v head). Works for weights and biases."""
    hpg = heads // groups
    head_dim = q.shape[0] // heads
    rest = tuple(q.shape[1:])
    qkv = torch.cat([q.reshape(groups, hpg * head_dim, *rest),
                     k.reshape(groups, head_dim, *rest),
                     v.reshape(groups, head_dim, *rest)], dim=1)
    return qkv.reshape(groups * (hpg + 2) * head_dim, *rest)


def unpack_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Inverse of :func:`pack_qkv`: Megatron ``linear_qkv`` -> (q, k, v) in HF layout."""
    hpg = heads // groups
    rest = tuple(qkv.shape[1:])
    g = qkv.reshape(groups, (hpg + 2) * head_dim, *rest)
    q, k, v = torch.split(g, [hpg * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(heads * head_dim, *rest).contiguous(), k.reshape(groups * head_dim, *rest).contiguous(),
            v.reshape(groups * head_dim, *rest).contiguous())


def hf_llama_to_mcore(hf_state_dict: Mapping[str, torch.Tensor], config: Any, spec: str = "local",
                      prefix: str = "", hf_prefix: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Convert a Hugging Face Llama-family state dict to Megatron-core GPT names and layout.

    Args:
        hf_state_dict: e.g. ``LlamaForCausalLM.state_dict()`` or a LLaVA state dict (only the
            language-model keys are read).
        config: Megatron/NeMo config (``num_layers``, ``num_attention_heads``, ``num_query_groups``,
            ``kv_channels``, ``vocab_size`` = padded size, ``share_embeddings_and_output_weights``).
        spec: ``"local"`` or ``"te"`` layernorm naming.
        prefix: prepended to every Megatron key (``"language_model."`` for ``LLaVAModel``).
        hf_prefix: the HF language-model base (``"model."``); found from ``embed_tokens.weight``
            when omitted. The output head is the (single) key ending in ``lm_head.weight``.

    Returns a new dict (weights only: no ``_extra_state`` entries). Embedding and output rows are
    zero-padded to ``config.vocab_size``. Raises ``KeyError`` / ``ValueError`` naming the key for a
    missing, misshapen or unmapped tensor.
    """
    _check_spec(spec)
    s = _shape(config)
    if hf_prefix is None:
        hf_prefix, head_key = _detect_hf_prefix(hf_state_dict)
    else:
        head_key = next((k for k in hf_state_dict if k == "lm_head.weight" or k.endswith(".lm_head.weight")), None)
    get = _Source(hf_state_dict, "Hugging Face")
    fam = family_of_config(config)
    P, Q = hf_prefix, prefix
    H, hd = s.hidden, s.head_dim
    out: dict[str, torch.Tensor] = {}

    emb = get(P + "embed_tokens.weight")
    if emb.ndim != 2 or emb.shape[1] != H:
        raise ValueError(f"{P}embed_tokens.weight has shape {tuple(emb.shape)}, expected [vocab, {H}]")
    out[Q + "embedding.word_embeddings.weight"] = _pad_rows(emb, s.vocab, P + "embed_tokens.weight")
    in_norm, mlp_norm = NORM_KEYS[spec]
    for i in range(s.layers):
        a, m = f"{P}layers.{i}.", f"{Q}decoder.layers.{i}."
        if fam.fused_qkv:  # Phi-3: qkv_proj = [q; k; v]
            fused = get(a + "self_attn.qkv_proj.weight", ((s.heads + 2 * s.groups) * hd, H))
            q, k, v = torch.split(fused, [s.heads * hd, s.groups * hd, s.groups * hd], dim=0)
        else:
            q = get(a + "self_attn.q_proj.weight", (s.heads * hd, H))
            k = get(a + "self_attn.k_proj.weight", (s.groups * hd, H))
            v = get(a + "self_attn.v_proj.weight", (s.groups * hd, H))
        out[m + "self_attention.linear_qkv.weight"] = pack_qkv(q, k, v, s.heads, s.groups)
        if fam.qkv_bias:  # Qwen2
            out[m + "self_attention.linear_qkv.bias"] = pack_qkv(
                get(a + "self_attn.q_proj.bias", (s.heads * hd,)), get(a + "self_attn.k_proj.bias", (s.groups * hd,)),
                get(a + "self_attn.v_proj.bias", (s.groups * hd,)), s.heads, s.groups)
        out[m + "self_attention.linear_proj.weight"] = get(a + "self_attn.o_proj.weight", (H, s.heads * hd))
        if fam.fused_gate_up:  # Phi-3: gate_up_proj = [gate; up], Megatron's fc1 layout already
            out[m + "mlp.linear_fc1.weight"] = get(a + "mlp.gate_up_proj.weight", (2 * s.ffn, H))
        else:
            gate = get(a + "mlp.gate_proj.weight", (s.ffn, H))
            up = get(a + "mlp.up_proj.weight", (s.ffn, H))
            out[m + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        out[m + "mlp.linear_fc2.weight"] = get(a + "mlp.down_proj.weight", (H, s.ffn))
        out[m + in_norm] = get(a + "input_layernorm.weight", (H,))
        out[m + mlp_norm] = get(a + "post_attention_layernorm.weight", (H,))
    out[Q + "decoder.final_layernorm.weight"] = get(P + "norm.weight", (H,))

    if s.tied:
        if head_key is not None:  # HF state_dict() lists the tied head too: it must be the embedding
            head = get(head_key)
            if head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb):
                raise ValueError(f"config ties embeddings but {head_key!r} differs from {P}embed_tokens.weight")
    else:
        if head_key is None:
            raise KeyError("Hugging Face state dict has no 'lm_head.weight' but the config does not tie "
                           "embeddings (share_embeddings_and_output_weights=False)")
        out[Q + "output_layer.weight"] = _pad_rows(get(head_key, (emb.shape[0], H)), s.vocab, head_key)
    get.check_all_used(P, _HF_IGNORABLE, ("embed_tokens.", "layers.", "norm."))
    return out


def mcore_to_hf_llama(mcore_state_dict: Mapping[str, torch.Tensor], config: Any, spec: str = "local",
                      prefix: str = "", vocab_size: Optional[int] = None, hf_prefix: str = "model.",
                      lm_head_key: str = "lm_head.weight") -> dict[str, torch.Tensor]:
    """Convert a Megatron-core GPT (Llama) state dict back to Hugging Face ``LlamaForCausalLM`` names.

    ``vocab_size`` is the number of embedding rows to keep (the tokenizer's size); it defaults to
    ``config.hf_vocab_size`` when the config has it (set by the import functions), else to
    ``config.vocab_size``. With tied embeddings ``lm_head.weight`` is the embedding tensor itself,
    so ``LlamaForCausalLM.load_state_dict(strict=True)`` accepts the result.
    """
    _check_spec(spec)
    s = _shape(config)
    keep = _export_vocab_size(config, vocab_size)
    get = _Source(mcore_state_dict, "Megatron")
    fam = family_of_config(config)
    P, Q = hf_prefix, prefix
    H, hd = s.hidden, s.head_dim
    qkv_rows = (s.heads + 2 * s.groups) * hd
    out: dict[str, torch.Tensor] = {}

    emb = get(Q + "embedding.word_embeddings.weight", (s.vocab, H))
    out[P + "embed_tokens.weight"] = emb[:keep]
    in_norm, mlp_norm = NORM_KEYS[spec]
    for i in range(s.layers):
        a, m = f"{P}layers.{i}.", f"{Q}decoder.layers.{i}."
        q, k, v = unpack_qkv(get(m + "self_attention.linear_qkv.weight", (qkv_rows, H)), s.heads, s.groups, hd)
        if fam.fused_qkv:
            out[a + "self_attn.qkv_proj.weight"] = torch.cat([q, k, v], dim=0)
        else:
            out[a + "self_attn.q_proj.weight"], out[a + "self_attn.k_proj.weight"] = q, k
            out[a + "self_attn.v_proj.weight"] = v
        if fam.qkv_bias:
            qb, kb, vb = unpack_qkv(get(m + "self_attention.linear_qkv.bias", (qkv_rows,)), s.heads, s.groups, hd)
            out[a + "self_attn.q_proj.bias"], out[a + "self_attn.k_proj.bias"] = qb, kb
            out[a + "self_attn.v_proj.bias"] = vb
        out[a + "self_attn.o_proj.weight"] = get(m + "self_attention.linear_proj.weight", (H, s.heads * hd))
        fc1 = get(m + "mlp.linear_fc1.weight", (2 * s.ffn, H))
        if fam.fused_gate_up:
            out[a + "mlp.gate_up_proj.weight"] = fc1
        else:
            gate, up = torch.split(fc1, s.ffn, dim=0)
            out[a + "mlp.gate_proj.weight"], out[a + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
        out[a + "mlp.down_proj.weight"] = get(m + "mlp.linear_fc2.weight", (H, s.ffn))
        out[a + "input_layernorm.weight"] = get(m + in_norm, (H,))
        out[a + "post_attention_layernorm.weight"] = get(m + mlp_norm, (H,))
    out[P + "norm.weight"] = get(Q + "decoder.final_layernorm.weight", (H,))
    if s.tied:
        out[lm_head_key] = out[P + "embed_tokens.weight"]
    else:
        out[lm_head_key] = get(Q + "output_layer.weight", (s.vocab, H))[:keep]
    get.check_all_used(Q, _MCORE_IGNORABLE, ("embedding.", "decoder.", "output_layer."))
    return out


def convert_mcore_spec(mcore_state_dict: Mapping[str, Any], src: str, dst: str) -> dict[str, Any]:
    """Rename the layernorm keys between the local and the Transformer Engine layer specs
    (any prefix). Other keys, including ``_extra_state``, pass through unchanged."""
    _check_spec(src)
    _check_spec(dst)
    if src == dst:
        return dict(mcore_state_dict)
    pairs = [(re.compile(r"(\.layers\.\d+\.)" + re.escape(a) + "$"), b) for a, b in zip(NORM_KEYS[src], NORM_KEYS[dst])]
    out = {}
    for key, value in mcore_state_dict.items():
        new = key
        for pattern, repl in pairs:
            new = pattern.sub(lambda mt: mt.group(1) + repl, new)
        if new in out:
            raise ValueError(f"renaming {key!r} to {new!r} collides with an existing key")
        out[new] = value
    return out
