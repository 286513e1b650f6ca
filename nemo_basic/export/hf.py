"""Import Hugging Face LLaVA (or an HF LLM + an HF vision encoder) into our checkpoint, load our
checkpoint into a model in one process, and export it back to a Hugging Face LLaVA directory."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_basic import compat

compat.apply_nemo()

from nemo_basic.convert import convert_mcore_spec, load_mcore_state_dict  # noqa: E402
from nemo_basic.export import serving  # noqa: E402
from nemo_basic.export.checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint_context,
    load_checkpoint_weights,
    read_metadata,
    save_neva_checkpoint,
    say,
)
from nemo_basic.export.llava import (  # noqa: E402
    ConversionError,
    hf_llava_config,
    hf_llava_to_mcore,
    mcore_to_hf_llava,
)
from nemo_basic.models.basic_config import BasicConfig  # noqa: E402
from nemo_basic.models.builder import (  # noqa: E402
    assemble_basic_neva_config,
    basic_neva_config_from_hf,
    image_seq_length,
    language_config_from_hf,
    layer_spec_of,
    load_hf_weights,
    mcore_neva_module,
    projector_config,
    read_hf_config,
    read_hf_state_dict,
    stage_state_dict,
    tokenizer_from_hf,
)
from nemo_basic.models.neva import BasicNevaConfig, BasicNevaModel  # noqa: E402
from nemo_basic.models.vision import (  # noqa: E402
    HFVisionEncoderConfig,
    default_image_processor,
    image_processor_dict,
    load_image_processor,
)

DEFAULT_IMAGE_TOKEN = "<image>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# HF LLaVA -> config
# ---------------------------------------------------------------------------------------------
def neva_config_from_hf_llava(hf_dir: str | os.PathLike, basic: Optional[BasicConfig] = None,
                              seq_length: Optional[int] = None, tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1, **overrides: Any
                              ) -> tuple[BasicNevaConfig, dict]:
    """The ``BasicNevaConfig`` of an HF LLaVA directory, and facts the export needs back
    (``hf_text_vocab_size``, ``image_token_index``). ``overrides`` go to the ``BasicNevaConfig``
    (defaults: vision frozen, language model trainable)."""
    from transformers import LlavaConfig

    hf_dir = Path(hf_dir)
    raw = read_hf_config(hf_dir)
    if raw.get("model_type") != "llava":
        raise ConversionError(f"{hf_dir}/config.json has model_type={raw.get('model_type')!r}, expected 'llava' "
                              "(LlavaForConditionalGeneration)")
    cfg = LlavaConfig.from_pretrained(str(hf_dir), local_files_only=True)
    if not isinstance(cfg.vision_feature_layer, int):
        raise ConversionError(f"vision_feature_layer={cfg.vision_feature_layer!r}: only one layer is supported")
    if cfg.projector_hidden_act != "gelu" or not getattr(cfg, "multimodal_projector_bias", True):
        raise ConversionError(f"projector_hidden_act={cfg.projector_hidden_act!r}, multimodal_projector_bias="
                              f"{getattr(cfg, 'multimodal_projector_bias', True)}: only the GELU projector with "
                              "biases ('mlp2x_gelu') is supported")
    text = cfg.text_config.to_dict()
    if seq_length is None:
        seq_length = min(int(text.get("max_position_embeddings") or 2048), 4096)
    lm_kw = dict(tensor_model_parallel_size=tensor_model_parallel_size,
                 pipeline_model_parallel_size=pipeline_model_parallel_size)
    if pipeline_model_parallel_size > 1:
        lm_kw["pipeline_dtype"] = torch.float32
    language = language_config_from_hf(text, seq_length, **lm_kw)
    proc = load_image_processor(hf_dir, required=False)
    vision_cfg = cfg.vision_config.to_dict()
    image_size = None
    if proc is not None:
        from nemo_basic.models.vision import processor_image_size

        image_size = processor_image_size(proc)
    vision = HFVisionEncoderConfig(hf_config=vision_cfg, image_size=image_size,
                                   image_processor=None if proc is None else image_processor_dict(proc))
    if vision.image_processor is None:
        vision = HFVisionEncoderConfig(hf_config=vision_cfg, image_size=vision.image_size,
                                       image_processor=image_processor_dict(default_image_processor(vision)))
    strategy = cfg.vision_feature_select_strategy
    if strategy == "default":
        if vision.class_token_len != 1:
            raise ConversionError(f"vision_feature_select_strategy='default' drops one token but the "
                                  f"{vision.model_type} encoder has {vision.class_token_len} leading tokens")
        drop = True
    elif strategy == "full":
        drop = False
    else:
        raise ConversionError(f"vision_feature_select_strategy={strategy!r} is not supported")
    config = assemble_basic_neva_config(
        language, vision, projector_config("mlp2x_gelu", vision.hidden_size, language.hidden_size), basic,
        vision_feature_layer=cfg.vision_feature_layer, drop_vision_class_token=drop, seq_length=seq_length,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        **{"freeze_language_model": False, **overrides})
    facts = {"hf_text_vocab_size": int(text["vocab_size"]), "image_token_index": int(cfg.image_token_index),
             "hf_max_position_embeddings": text.get("max_position_embeddings")}
    return config, facts


def _load_full_state(mcore: torch.nn.Module, full: dict, what: str) -> None:
    """Load a full (TP=1, all layers) NeVA state dict into this rank's module (TP slice, PP stage)."""
    spec = layer_spec_of(mcore.state_dict())
    src_spec = layer_spec_of(full)
    if src_spec != spec:
        full = convert_mcore_spec(full, src_spec, spec)
    own = {k for k in mcore.state_dict() if not k.endswith("_extra_state")}
    if mcore.language_model is not None:
        lm_full = {k[len("language_model."):]: v for k, v in full.items() if k.startswith("language_model.")}
        lm = stage_state_dict(lm_full, mcore.language_model, mcore.config.language_transformer_config, what)
        load_mcore_state_dict(mcore.language_model, lm)
    rest = {k: v for k, v in full.items() if not k.startswith("language_model.")}
    rest_own = {k for k in own if not k.startswith("language_model.")}
    missing = sorted(rest_own - set(rest))
    if missing:
        raise KeyError(f"{what} has no tensors for {missing[:8]}")
    if mcore.add_encoder:
        unexpected = sorted(set(rest) - rest_own)
        if unexpected:
            raise KeyError(f"{what} has tensors the model does not: {unexpected[:8]}")
    if rest_own:
        mcore.load_state_dict({k: rest[k] for k in rest_own}, strict=False)


def load_hf_llava_weights(model: torch.nn.Module, hf_dir: str | os.PathLike) -> None:
    """Load an HF LLaVA directory into this rank's NeVA module (any TP / PP)."""
    mcore = mcore_neva_module(model)
    full = hf_llava_to_mcore(read_hf_state_dict(hf_dir), mcore.config, spec="local")
    _load_full_state(mcore, full, f"Hugging Face LLaVA {hf_dir}")


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------
def _image_token(tokenizer, index: Optional[int]) -> Optional[str]:
    hf_tok = getattr(tokenizer, "tokenizer", tokenizer)
    if index is None or index >= len(hf_tok):
        return None
    return hf_tok.convert_ids_to_tokens(index)


def import_hf_llava(hf_dir: str | os.PathLike, out: str | os.PathLike, basic: Optional[BasicConfig] = None,
                    seq_length: Optional[int] = None, overwrite: bool = False, **overrides: Any) -> Path:
    """HF ``LlavaForConditionalGeneration`` directory → our NeMo 2 checkpoint at ``out``."""
    hf_dir = Path(hf_dir)
    say(f"reading {hf_dir}/config.json")
    config, facts = neva_config_from_hf_llava(hf_dir, basic=basic, seq_length=seq_length, **overrides)
    tokenizer = tokenizer_from_hf(hf_dir)
    say(f"reading weights from {hf_dir}")
    full = hf_llava_to_mcore(read_hf_state_dict(hf_dir), config, spec="local")
    meta = {"source": {"kind": "hf-llava", "path": str(hf_dir.resolve())},
            "hf_text_vocab_size": facts["hf_text_vocab_size"],
            "hf_max_position_embeddings": facts["hf_max_position_embeddings"],
            "image_token_index": facts["image_token_index"],
            "image_token": _image_token(tokenizer, facts["image_token_index"])}

    def fill(mcore):
        _load_full_state(mcore, full, f"Hugging Face LLaVA {hf_dir}")

    model = BasicNevaModel(config, tokenizer=tokenizer)
    save_neva_checkpoint(model, out, fill, meta, overwrite=overwrite)
    say(f"done: {out}")
    return Path(out)


def init_from_hf(llm_dir: str | os.PathLike, vision_dir: str | os.PathLike, out: str | os.PathLike,
                 basic: Optional[BasicConfig] = None, overwrite: bool = False, seed: int = 1234,
                 **builder_kwargs: Any) -> Path:
    """HF LLM + HF vision encoder (+ a fresh projector, seeded) → the stage-1 NeMo 2 checkpoint.

    The stored config does not point at ``vision_dir``: all weights live in the checkpoint, so it
    stays usable where the HF directories are not."""
    from nemo_basic.models.vision import vision_config_from_hf

    vision = vision_config_from_hf(vision_dir, image_size=builder_kwargs.pop("image_size", None),
                                   load_weights=False)
    if vision.image_processor is not None:  # store the processor at the input size the model takes
        from nemo_basic.models.vision import image_processor_from_dict, processor_at_size

        resized = processor_at_size(image_processor_from_dict(vision.image_processor), vision.image_size)
        vision = HFVisionEncoderConfig(hf_config=vision.hf_config, image_size=vision.image_size,
                                       image_processor=image_processor_dict(resized),
                                       attn_implementation=vision.attn_implementation)
    config = basic_neva_config_from_hf(llm_dir, vision, basic=basic, **builder_kwargs)
    tokenizer = tokenizer_from_hf(llm_dir)
    hf_vocab = read_hf_config(llm_dir)["vocab_size"]
    meta = {"source": {"kind": "hf-parts", "llm": str(Path(llm_dir).resolve()),
                       "vision": str(Path(vision_dir).resolve())},
            "hf_text_vocab_size": hf_vocab,
            "hf_max_position_embeddings": read_hf_config(llm_dir).get("max_position_embeddings")}

    def fill(mcore):
        torch.manual_seed(seed)
        for module in mcore.vision_projection.modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()
        say(f"reading weights from {vision_dir}")
        loaded = HFVisionEncoderConfig(hf_config=vision.hf_config, pretrained_model_name_or_path=str(vision_dir),
                                       image_size=vision.image_size).configure_model()
        mcore.vision_model.load_state_dict(loaded.state_dict(), strict=True)
        say(f"reading weights from {llm_dir}")
        load_hf_weights(mcore, llm_dir)

    model = BasicNevaModel(config, tokenizer=tokenizer)
    save_neva_checkpoint(model, out, fill, meta, overwrite=overwrite)
    say(f"done: {out}")
    return Path(out)


# ---------------------------------------------------------------------------------------------
# our checkpoint -> a model in this process
# ---------------------------------------------------------------------------------------------
def ensure_microbatch_calculator(micro_batch_size: int = 1) -> None:
    """One micro-batch per step unless a launcher set Megatron's calculator up (BASIC scales its
    losses by 1 / num_microbatches, read from it)."""
    from megatron.core import num_microbatches_calculator as nmc

    if nmc._GLOBAL_NUM_MICROBATCHES_CALCULATOR is None:
        from megatron.core import parallel_state as ps

        dp = ps.get_data_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        nmc.init_num_microbatches_calculator(0, None, micro_batch_size * dp, micro_batch_size, dp)


def load_neva_from_checkpoint(ckpt: str | os.PathLike, config_overrides: Optional[dict] = None):
    """Build the checkpoint's NeVA (Megatron module) on this rank and load its weights.

    Megatron's parallel state must be initialised (``nemo_basic.convert.ensure_model_parallel`` in
    one process, or your launcher's); the module gets this rank's TP slice / PP stage.
    ``config_overrides`` are set on the ``BasicNevaConfig`` first (e.g. ``basic=BasicConfig(...)``).
    Returns ``(mcore_module, nemo_model)`` (the NeMo model carries ``config`` and ``tokenizer``)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("Megatron's parallel state is not initialised (call "
                           "nemo_basic.convert.ensure_model_parallel() in a single process)")
    model = load_checkpoint_context(ckpt)
    config = model.config
    config.tensor_model_parallel_size = ps.get_tensor_model_parallel_world_size()
    config.pipeline_model_parallel_size = ps.get_pipeline_model_parallel_world_size()
    config.language_transformer_config.tensor_model_parallel_size = config.tensor_model_parallel_size
    config.language_transformer_config.pipeline_model_parallel_size = config.pipeline_model_parallel_size
    if config.pipeline_model_parallel_size > 1 and config.language_transformer_config.pipeline_dtype is None:
        config.language_transformer_config.pipeline_dtype = config.language_transformer_config.params_dtype
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    ensure_microbatch_calculator()
    mcore = config.configure_model(model.tokenizer)
    _load_full_state(mcore, load_checkpoint_weights(ckpt), f"checkpoint {ckpt}")
    return mcore, model


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def export_hf_llava(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                    tokenizer_dir: Optional[str | os.PathLike] = None,
                    image_processor_dir: Optional[str | os.PathLike] = None, image_token: Optional[str] = None,
                    overwrite: bool = False, chat_template: Optional[str] = None,
                    max_shard_size: int | str = serving.DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Our checkpoint → an HF ``LlavaForConditionalGeneration`` directory (safetensors, config,
    generation config, tokenizer with the image token, image processor, LLaVA processor with a chat
    template) that transformers and vLLM load as it is.

    What training recorded with the checkpoint (:mod:`nemo_basic.export.record`) fills in the image
    processor, the chat template (``plain`` / ``vicuna_v1``, the training data's) and the LLM's
    ``max_position_embeddings``; arguments override it (``chat_template="tokenizer"`` keeps the
    LLM tokenizer's own template). Weights in ``dtype`` (the CLI's default is bfloat16, as llava-hf
    ships; this function's stays float32 for in-process callers that compare numbers), sharded above
    ``max_shard_size`` bytes (or "5GB"-style), files mode 0644.

    The image token: ``image_token`` if given, else the one recorded at import, else ``<image>``;
    added to the tokenizer when missing (embedding row zero; LLaVA replaces that row's input by
    image features). The text vocabulary written is the larger of the imported HF size (else
    the tokenizer's length) and the image token id + 1."""
    import shutil

    from transformers import GenerationConfig, LlavaProcessor

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    ckpt, out = Path(ckpt), Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    max_shard_bytes = serving.parse_size(max_shard_size)
    if chat_template is not None and chat_template not in serving.CHAT_TEMPLATES:
        raise ValueError(f"chat template {chat_template!r}: choose one of {serving.CHAT_TEMPLATES}")
    meta = read_metadata(ckpt)
    say(f"reading {ckpt}/context")
    model = load_checkpoint_context(ckpt)
    config = model.config
    record = serving.read_serving_record(ckpt)
    if not record and (meta.get("source") or {}).get("kind") == "hf-llava":
        # An imported HF LLaVA not trained since: serve it with the processor it came with (its
        # own preprocessing, which our pad-to-square default would change).
        record = {"image_process_mode": "as-imported"}
    if tokenizer_dir is not None:
        tokenizer = tokenizer_from_hf(tokenizer_dir).tokenizer
    else:
        tokenizer = getattr(model.tokenizer, "tokenizer", model.tokenizer)
        if tokenizer is None:
            raise CheckpointError(f"{ckpt}/context has no tokenizer; pass tokenizer_dir (--tokenizer)")
        source = getattr(tokenizer, "name_or_path", None)
        if source and Path(source).is_dir():  # a fresh copy: NeMo's wrapper sets cls/sep tokens on its own
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, local_files_only=True)
    base_vocab = len(tokenizer)
    token = image_token or meta.get("image_token") or DEFAULT_IMAGE_TOKEN
    if token not in tokenizer.get_vocab():
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
        say(f"added the image token {token!r} to the tokenizer (id {tokenizer.convert_tokens_to_ids(token)})")
    image_id = tokenizer.convert_tokens_to_ids(token)
    rows = max(int(meta.get("hf_text_vocab_size") or base_vocab), image_id + 1)

    say(f"reading {ckpt}/weights")
    full = load_checkpoint_weights(ckpt)
    spec = layer_spec_of(full)
    hf_state = mcore_to_hf_llava(full, config, spec, rows, dtype=dtype)
    pad_id = tokenizer.pad_token_id
    text_overrides = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    context = _source_max_position_embeddings(model, meta, record, tokenizer)
    if context is None:
        say(f"the source LLM's max_position_embeddings is not known (no training record, no import metadata, "
            f"no LLM config.json found); writing the training seq_length {config.language_transformer_config.seq_length}")
    else:
        text_overrides["max_position_embeddings"] = context
    hf_config = hf_llava_config(config, rows, image_id, dtype, pad_token_id=pad_id, **text_overrides)

    vision = config.vision_transformer_config
    processor_img = serving.serving_image_processor(vision, record, image_processor_dir)
    template = chat_template or record.get("template")
    if template is None:
        template = "vicuna_v1"
        say("the checkpoint records no training template; writing the vicuna_v1 chat template "
            "(LLaVA-1.5's; --chat-template plain|vicuna_v1|tokenizer to choose)")
    if template == "tokenizer":
        jinja = getattr(tokenizer, "chat_template", None)
    else:
        jinja = serving.chat_template(template, token, tokenizer.eos_token,
                                      tokenizer.bos_token if serving.adds_bos(tokenizer) else None)
        tokenizer.chat_template = jinja
    say(f"writing {out}")
    out.mkdir(parents=True)
    hf_config.save_pretrained(str(out))
    serving.write_safetensors(hf_state, out, max_shard_bytes)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=pad_id).save_pretrained(str(out))
    processor = LlavaProcessor(image_processor=processor_img, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
                               image_token=token, num_additional_image_tokens=vision.class_token_len,
                               chat_template=jinja)
    processor.save_pretrained(str(out))
    serving.normal_file_modes(out)
    say(f"done: {out} ({len(hf_state)} tensors, {dtype}, image token {token!r} = {image_id}, "
        f"{image_seq_length(config)} image tokens per image, chat template {template}, "
        f"context {hf_config.text_config.max_position_embeddings})")
    return out


def _source_max_position_embeddings(model, meta: dict, record: dict, tokenizer) -> Optional[int]:
    """The source LLM's context length: recorded at training, else at import, else the LLM
    directory the run loaded (when it still exists)."""
    from nemo_basic.export.record import llm_max_position_embeddings

    for value in (record.get("max_position_embeddings"), meta.get("hf_max_position_embeddings")):
        if value:
            return int(value)
    for directory in ((getattr(model, "pretrained", None) or {}).get("llm_dir"),
                      getattr(tokenizer, "name_or_path", None)):
        if directory and Path(directory).is_dir():
            value = llm_max_position_embeddings(directory)
            if value:
                return value
    return None


__all__ = [
    "DEFAULT_IMAGE_TOKEN",
    "DTYPES",
    "ensure_microbatch_calculator",
    "export_hf_llava",
    "import_hf_llava",
    "init_from_hf",
    "load_hf_llava_weights",
    "load_neva_from_checkpoint",
    "neva_config_from_hf_llava",
]
