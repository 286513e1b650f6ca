"""Build a BASIC NeVA from Hugging Face parts: an LLM directory (Llama / Llama-3.x, Mistral, Qwen2,
Gemma, Phi-3: ``nemo_basic.convert.families``) and a vision-encoder
directory (CLIP, SigLIP, DINOv2), with a fresh projector: the stage-1 starting point.

    config = basic_neva_config_from_hf(llm_dir, vision_dir, basic=BasicConfig(...))
    tokenizer = tokenizer_from_hf(llm_dir)
    model = config.configure_model(tokenizer)     # on each rank, after Megatron's parallel init
    load_hf_weights(model, llm_dir)               # this rank's TP shard / PP stage of the LLM

Weights, who loads what:

* the vision tower loads itself in ``configure_model`` from ``vision_dir`` (``from_pretrained``,
  replicated on the first pipeline stage's TP ranks, frozen);
* the projector starts fresh (``torch.nn.Linear`` initialisation, as NeMo's ``mlp2x_gelu``);
* the LLM: :func:`load_hf_weights` converts the HF state dict to Megatron names
  (``nemo_basic.convert``), takes the rank's tensor-parallel slice (``shard_for_tp``) and, under
  pipeline parallelism, the rank's decoder layers (by each layer's global ``layer_number``), and
  loads them strictly (a missing or unexpected key raises). With tied embeddings the last
  pipeline stage's ``output_layer`` receives the embedding shard (Megatron ties them across stages
  by initial value and a gradient all-reduce).

For NeMo training, do this once and save a NeMo 2 checkpoint
(``python -m nemo_basic.export init-from-hf --llm DIR --vision DIR --out CKPT``, or
``nemo_basic.export.init_from_hf``), then start training from it
(``AutoResume(restore_config=RestoreConfig(path=CKPT))``): Megatron's distributed checkpoint is
re-sharded to any TP/PP on load, and the stored config needs neither HF directory again.

Vocabulary: Megatron pads the embedding to a multiple of 128 rows (TP-independent, so one
checkpoint loads at any TP that divides 128); the true vocabulary stays available as
``tokenizer.vocab_size`` (NeMo's ``AutoTokenizer``: ``len(tokenizer)``), which BASIC's L_sds
uses, and as ``language_transformer_config.hf_vocab_size`` (the HF embedding rows).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from nemo_basic import compat

compat.apply_nemo()

from nemo.collections.vlm.vision.base import MultimodalProjectorConfig  # noqa: E402

from nemo_basic.convert import (  # noqa: E402
    hf_llama_config_to_nemo,
    hf_llama_to_mcore,
    load_mcore_state_dict,
    padded_vocab_size,
    shard_for_tp,
)
from nemo_basic.models import feature_layer  # noqa: E402
from nemo_basic.models.basic_config import BasicConfig  # noqa: E402
from nemo_basic.models.neva import BasicNevaConfig  # noqa: E402
from nemo_basic.models.vision import HFVisionEncoderConfig, vision_config_from_hf  # noqa: E402

VOCAB_MULTIPLE = 128
_PROJECTOR = re.compile(r"^mlp(\d+)x_gelu$")


# ---------------------------------------------------------------------------------------------
# reading HF checkpoints
# ---------------------------------------------------------------------------------------------
def hf_weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of an HF model directory (safetensors preferred, sharded or not)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {d} does not exist")
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = d / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (d / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists weight files that are missing: {missing[:4]}")
            return [d / f for f in files]
        if (d / single).is_file():
            return [d / single]
    raise FileNotFoundError(f"{d} has no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                            "or pytorch_model.bin.index.json")


def read_hf_state_dict(directory: str | os.PathLike, rename: Optional[Iterable[tuple[str, str]]] = None
                       ) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory, keys optionally renamed by (regex, replacement)."""
    rules = [(re.compile(p), r) for p, r in (rename or ())]
    out: dict[str, torch.Tensor] = {}
    for f in hf_weight_files(directory):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            part = load_file(str(f))
        else:
            part = torch.load(str(f), map_location="cpu", weights_only=True)
        for key, value in part.items():
            for pattern, repl in rules:
                key = pattern.sub(repl, key)
            out[key] = value
    return out


def read_hf_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"Hugging Face model directory {directory} has no config.json")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
def tokenizer_from_hf(directory: str | os.PathLike):
    """NeMo's ``AutoTokenizer`` (fast HF tokenizer inside) for the directory: what ``NevaModel``
    stores and what NeMo checkpoints copy into ``context/``. ``.vocab_size`` = ``len(tokenizer)``
    (added tokens included), ``.tokenizer`` is the HF tokenizer the data module uses."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    return AutoTokenizer(tokenizer_only_dir(directory), use_fast=True)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack", ".ckpt", ".npz")


def tokenizer_only_dir(directory: str | os.PathLike) -> str:
    """``directory`` itself if it holds no weight files, else a cached copy of its small files.

    NeMo stores the tokenizer's directory in every checkpoint's ``context/`` (an artifact copy):
    pointing it at a full model directory would copy the model weights into each checkpoint.
    The copy lives under ``nemo_basic.pretrained.cache_root()/tokenizers/<name>-<sha256[:12]>``."""
    import hashlib
    import shutil
    import tempfile

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"tokenizer directory {d} does not exist")
    files = sorted(p for p in d.iterdir() if p.is_file())
    weights = [p for p in files if p.name.endswith(_WEIGHT_SUFFIXES) or re.search(r"\.(safetensors|bin)\.index\.json$", p.name)]
    if not weights:
        return os.fspath(d)
    small = [p for p in files if p not in weights]
    if not any(p.name.startswith("tokenizer") or p.name in ("vocab.json", "spiece.model") for p in small):
        raise FileNotFoundError(f"{d} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    digest = hashlib.sha256()
    for p in small:
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    from nemo_basic.pretrained import cache_root

    target = cache_root() / "tokenizers" / f"{d.name}-{digest.hexdigest()[:12]}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=target.parent))
        for p in small:
            shutil.copy2(p, tmp / p.name)
        try:
            os.rename(tmp, target)
        except OSError:  # another process made it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return os.fspath(target)


def language_config_from_hf(hf_text_config: Any, seq_length: int, **overrides: Any):
    """The family's NeMo config (``nemo_basic.convert.nemo_configs``) for an HF LLM config, with a
    TP-independent padded vocabulary (its padding logits are masked out of the LM softmax)."""
    from nemo_basic.convert.llama import _hf_config_dict

    cfg = _hf_config_dict(hf_text_config)
    kw = dict(seq_length=seq_length,
              vocab_size=padded_vocab_size(cfg["vocab_size"], VOCAB_MULTIPLE, 1))
    kw.update(overrides)
    return hf_llama_config_to_nemo(cfg, **kw)


def projector_config(projector: str, input_size: int, hidden_size: int, **overrides: Any
                     ) -> MultimodalProjectorConfig:
    """NeMo's ``mlpNx_gelu`` projector (``torch.nn.Sequential`` of Linear/GELU, biases on)."""
    if not _PROJECTOR.match(projector):
        raise ValueError(f"projector {projector!r} is not supported: use 'mlp2x_gelu' (LLaVA-1.5) or 'mlpNx_gelu'")
    return MultimodalProjectorConfig(projector_type=projector, input_size=input_size, hidden_size=hidden_size,
                                     ffn_hidden_size=hidden_size, **overrides)


def basic_neva_config_from_hf(
    llm_dir: str | os.PathLike,
    vision_dir: str | os.PathLike | HFVisionEncoderConfig,
    basic: Optional[BasicConfig] = None,
    vision_feature_layer: int = -2,
    projector: str = "mlp2x_gelu",
    seq_length: int = 2048,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    image_size: Optional[int] = None,
    drop_vision_class_token: bool = True,
    language_overrides: Optional[Mapping[str, Any]] = None,
    load_vision_weights: bool = True,
    **overrides: Any,
) -> BasicNevaConfig:
    """A ``BasicNevaConfig`` for an HF LLM (any family of ``nemo_basic.convert.families``) and an HF
    vision encoder.

    Args:
        llm_dir: HF causal-LM directory (Llama, Vicuna, SmolLM2, Llama-3.x, Mistral, Qwen2, Gemma,
            Phi-3; GQA and tied embeddings supported). Only its config is read here; see
            :func:`load_hf_weights`.
        vision_dir: HF CLIP / SigLIP / DINOv2 directory (weights load in ``configure_model``), or a
            ready :class:`HFVisionEncoderConfig`.
        basic: the BASIC switches (default ``BasicConfig()``: on, k = L // 2).
        vision_feature_layer: hidden state of the vision encoder fed to the projector (-2: LLaVA).
        projector: ``mlp2x_gelu`` (LLaVA-1.5) or another ``mlpNx_gelu``.
        seq_length: maximum combined sequence (text + image tokens).
        image_size: input pixels; default: the vision directory's image processor crop.
        drop_vision_class_token: drop the class (and register) tokens of CLIP / DINOv2.
        language_overrides: fields of the family's NeMo config (e.g. ``params_dtype``).
        load_vision_weights: the vision config points at ``vision_dir`` and ``configure_model``
            loads its weights; NeMo stores that path in every checkpoint's context and re-reads it
            on resume (the checkpoint's weights then win). ``False``: random until loaded.
        **overrides: fields of the ``BasicNevaConfig`` (defaults here: ``freeze_vision_model=True``,
            ``freeze_language_model=True`` — stage 1 trains the projector only; pass ``False`` for
            stage 2).
    """
    hf_text = read_hf_config(llm_dir)
    lm_kw = dict(tensor_model_parallel_size=tensor_model_parallel_size,
                 pipeline_model_parallel_size=pipeline_model_parallel_size)
    if pipeline_model_parallel_size > 1:
        lm_kw["pipeline_dtype"] = (language_overrides or {}).get("params_dtype", torch.float32)
    lm_kw.update(language_overrides or {})
    language = language_config_from_hf(hf_text, seq_length, **lm_kw)
    if isinstance(vision_dir, HFVisionEncoderConfig):
        vision = vision_dir
    else:
        vision = vision_config_from_hf(vision_dir, image_size=image_size, load_weights=load_vision_weights)
    why = feature_layer.problem(vision_feature_layer, vision.num_hidden_layers)
    if why:
        raise ValueError(f"vision_feature_layer = {vision_feature_layer!r} is invalid: expected {why}")
    proj = projector_config(projector, vision.hidden_size, language.hidden_size)
    return assemble_basic_neva_config(
        language, vision, proj, basic, vision_feature_layer=vision_feature_layer,
        drop_vision_class_token=drop_vision_class_token, seq_length=seq_length,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        **{"freeze_language_model": True, **overrides})


def assemble_basic_neva_config(language, vision, projector, basic: Optional[BasicConfig], *,
                               vision_feature_layer: int, drop_vision_class_token: bool, seq_length: int,
                               tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                               **overrides: Any) -> BasicNevaConfig:
    """The validated ``BasicNevaConfig`` around ready language / vision / projector configs.

    The vision encoder is frozen unless ``overrides`` say otherwise; under pipeline parallelism
    the exchanged activations take the language model's ``pipeline_dtype``."""
    kw = dict(freeze_vision_model=True, seq_length=seq_length,
              tensor_model_parallel_size=tensor_model_parallel_size,
              pipeline_model_parallel_size=pipeline_model_parallel_size)
    if pipeline_model_parallel_size > 1:
        kw["pipeline_dtype"] = language.pipeline_dtype
    kw.update(overrides)
    config = BasicNevaConfig(language_transformer_config=language, vision_transformer_config=vision,
                             vision_projection_config=projector, vision_feature_layer=vision_feature_layer,
                             drop_vision_class_token=drop_vision_class_token,
                             basic=basic if basic is not None else BasicConfig(), **kw)
    config.validate_basic()
    return config


def image_seq_length(config) -> int:
    """Image tokens per image in the combined sequence (NeVA's ``_img_seq_len``)."""
    vision = config.vision_transformer_config
    n = vision.num_image_embeddings_per_tile
    if config.drop_vision_class_token and vision.add_class_token:
        n -= vision.class_token_len
    return n


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def mcore_neva_module(model: torch.nn.Module) -> torch.nn.Module:
    """The Megatron LLaVA module inside a NeMo ``NevaModel`` / DDP / Float16 wrapper."""
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    seen = model
    for _ in range(8):
        if isinstance(seen, LLaVAModel):
            return seen
        inner = getattr(seen, "module", None)
        if inner is None:
            break
        seen = inner
    for m in model.modules():
        if isinstance(m, LLaVAModel):
            return m
    raise TypeError(f"{type(model).__name__} holds no Megatron LLaVA model (configure the model first)")


def layer_spec_of(state_keys: Iterable[str]) -> str:
    """'te' when the decoder layers use Transformer Engine's fused layernorm names, else 'local'."""
    return "te" if any(k.endswith("self_attention.linear_qkv.layer_norm_weight") for k in state_keys) else "local"


def stage_state_dict(full: Mapping[str, torch.Tensor], module: torch.nn.Module, config: Any,
                     what: str = "language model") -> dict[str, torch.Tensor]:
    """This rank's tensors for a Megatron GPT ``module`` from the full (TP=1, all layers) state dict:
    tensor-parallel slice, decoder layers by their global ``layer_number``, and for tied
    embeddings the embedding shard as the last stage's ``output_layer``."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    sharded = shard_for_tp(full, tp, rank, config)
    layer_of = {i: layer.layer_number - 1 for i, layer in enumerate(module.decoder.layers)}
    out = {}
    for key in module.state_dict():
        if key.endswith("_extra_state"):
            continue
        src = key
        m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", key)
        if m:
            src = f"decoder.layers.{layer_of[int(m.group(1))]}.{m.group(2)}"
        if src not in sharded and src == "output_layer.weight" and config.share_embeddings_and_output_weights:
            src = "embedding.word_embeddings.weight"
        if src not in sharded:
            raise KeyError(f"{what}: the converted checkpoint has no tensor for {key!r} (looked for {src!r})")
        out[key] = sharded[src]
    return out


def load_hf_weights(model: torch.nn.Module, llm_dir: str | os.PathLike) -> None:
    """Load an HF LLM (any supported family) into the language model of this rank's NeVA module.

    Works under TP and PP (each rank takes its slice / stage, see the module docstring). The
    vision tower and projector are untouched. Raises naming the key on any mismatch."""
    mcore = mcore_neva_module(model)
    lm = mcore.language_model
    if lm is None:  # an encoder-only pipeline stage
        return
    config = mcore.config.language_transformer_config
    spec = layer_spec_of(lm.state_dict())
    hf_sd = read_hf_state_dict(llm_dir)
    hf_vocab = read_hf_config(llm_dir)["vocab_size"]
    full = hf_llama_to_mcore(hf_sd, config, spec=spec)
    del hf_sd
    load_mcore_state_dict(lm, stage_state_dict(full, lm, config))
    if getattr(config, "hf_vocab_size", None) is None:
        config.hf_vocab_size = hf_vocab


__all__ = [
    "VOCAB_MULTIPLE",
    "basic_neva_config_from_hf",
    "hf_weight_files",
    "image_seq_length",
    "language_config_from_hf",
    "layer_spec_of",
    "load_hf_weights",
    "mcore_neva_module",
    "projector_config",
    "read_hf_config",
    "read_hf_state_dict",
    "stage_state_dict",
    "tokenizer_from_hf",
    "tokenizer_only_dir",
]
