"""The parts of an HF export that serving engines read besides the weights: the training-time image
processor, a chat template that reproduces the training prompt format, the LLM's context length,
file layout (shards, modes). Light imports (transformers / torch inside the functions)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from nemo_basic.export.checkpoint import say

CHAT_TEMPLATES = ("plain", "vicuna_v1", "tokenizer")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # as transformers' save_pretrained ("5GB") and llava-hf's repos
FILE_MODE = 0o644


# ---------------------------------------------------------------------------------------------
# what training recorded (nemo_basic.export.record.ServingRecord in weights/common.pt)
# ---------------------------------------------------------------------------------------------
def read_serving_record(ckpt: str | os.PathLike) -> dict:
    """The :class:`~nemo_basic.export.record.ServingRecord` state saved with a training checkpoint,
    or ``{}`` (an imported checkpoint, or one written before the record existed)."""
    from nemo_basic.export.record import FORMAT

    common = Path(ckpt) / "weights" / "common.pt"
    if not common.is_file():
        return {}
    import torch

    state = torch.load(common, map_location="cpu", weights_only=False)
    for key, value in (state.get("callbacks") or {}).items():
        if str(key).startswith("ServingRecord") and isinstance(value, dict) and value.get("format") == FORMAT:
            return value
    return {}


# ---------------------------------------------------------------------------------------------
# image processor
# ---------------------------------------------------------------------------------------------
def export_image_processor(vision: Any, record: dict, directory: Optional[str | os.PathLike] = None) -> Any:
    """The image processor to ship: ``directory``'s if given, else the one training recorded, else
    the checkpoint config's when it matches the tower's input size, else (older checkpoints) that
    one resized to the input size, as the recipes did at training time — said on stderr."""
    from nemo_basic.models.vision import (default_image_processor, image_processor_from_dict,
                                          load_image_processor, processor_at_size, processor_image_size)

    n = vision.image_size
    if directory is not None:
        proc, where = load_image_processor(directory), f"{directory}/preprocessor_config.json"
    elif record.get("image_processor"):
        proc, where = image_processor_from_dict(record["image_processor"]), "the checkpoint's training record"
    else:
        stored = image_processor_from_dict(vision.image_processor) if vision.image_processor else None
        if stored is not None and processor_image_size(stored) == n:
            return stored
        base = stored if stored is not None else default_image_processor(vision)
        got = processor_image_size(base)
        say(f"the checkpoint has no training-time image processor (written before nemo_basic recorded it); "
            f"using the vision config's {type(base).__name__} ({got} px) resized to the tower's input of {n} px, "
            "as the recipes' data pipeline does (pass --image-processor DIR to ship another)")
        return processor_at_size(base, n)
    size = processor_image_size(proc)
    if size is not None and size != n:
        raise ValueError(f"the image processor from {where} produces {size} px images but the checkpoint's vision "
                         f"tower takes {n} px (vision_config.image_size); pass a matching --image-processor")
    return proc


_PIPELINE_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                  "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def padding_image_processor(processor: Any) -> Any:
    """``transformers.LlavaImageProcessor`` with ``do_pad=True`` and ``processor``'s resize, crop and
    normalisation: LLaVA-1.5's pad-to-square preprocessing, which the training data pipeline
    (`nemo_basic.data.image.preprocess_image`, mode ``pad``) applies before the tower's processor.
    It pads with ``int(mean * 255)`` where the pipeline rounds: at most one grey level, on padding
    pixels only."""
    from transformers import LlavaImageProcessor

    d = processor.to_dict()
    kwargs = {k: d[k] for k in _PIPELINE_KEYS if k in d and d[k] is not None}
    if processor.__class__.__name__ == "SiglipImageProcessor":
        kwargs.setdefault("do_center_crop", False)  # SigLIP resizes to the square, no crop
    return LlavaImageProcessor(do_pad=True, **kwargs)


def serving_image_processor(vision: Any, record: dict, directory: Optional[str | os.PathLike] = None) -> Any:
    """:func:`export_image_processor`, as the HF processor a server runs: with LLaVA-1.5's padding
    when training padded (the recipes' default, ``data.image_process_mode=pad``; older checkpoints
    without a record were trained so too), else as it is. A ``directory`` is shipped as it is."""
    proc = export_image_processor(vision, record, directory)
    if directory is not None or record.get("image_process_mode", "pad") != "pad":
        return proc
    if getattr(proc, "do_pad", False):
        return proc
    return padding_image_processor(proc)


# ---------------------------------------------------------------------------------------------
# chat templates (nemo_basic/data/templates.py, written as Jinja for HF / vLLM)
# ---------------------------------------------------------------------------------------------
def _jinja_str(text: str) -> str:
    """A Jinja string literal for ``text``."""
    import json

    return json.dumps(text)


def _content_macro(image_token: str, images_only: bool) -> str:
    """A macro rendering a message's content: a string as it is; a list of parts with each image
    part as the image token (LLaVA's ``<image>\\n`` before the text in the chat template)."""
    image = _jinja_str(image_token if images_only else image_token + "\n")
    text = "" if images_only else "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    return ("{%- macro content(c) -%}"
            + ("{%- if c is string -%}{{ " + image + " * c.count(" + image + ") }}" if images_only
               else "{%- if c is string -%}{{ c }}") +
            "{%- else -%}{%- for part in c -%}"
            "{%- if part['type'] in ('image', 'image_url', 'image_pil') -%}{{ " + image + " }}"
            + text +
            "{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{%- endmacro -%}")


def chat_template(template: str, image_token: str, eos_token: Optional[str], bos_token: Optional[str]) -> str:
    """The Jinja chat template reproducing our training template ``template``
    (:func:`nemo_basic.data.templates.render`), with image parts.

    ``plain``: the image token per image of the user turns (their text is not part of the
    format), each assistant turn followed by a newline; generation continues after the image.
    ``vicuna_v1``: ``{system} USER: {user} ASSISTANT: {answer}{eos}USER: ...`` with LLaVA-1.5's
    system sentence unless the conversation starts with a system message; ``add_generation_prompt``
    ends the prompt with `` ASSISTANT:``. ``bos_token``: written first (when the tokenizer itself
    adds BOS to an encode, as training did)."""
    from nemo_basic.data.templates import VICUNA_V1_SYSTEM

    bos = "{{ " + _jinja_str(bos_token) + " }}" if bos_token else ""
    if template == "plain":
        return (_content_macro(image_token, images_only=True) + bos +
                "{%- for m in messages -%}"
                "{%- if m['role'] == 'user' -%}{{ content(m['content']) }}"
                "{%- elif m['role'] == 'assistant' -%}{{ m['content'] if m['content'] is string else "
                "m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') }}{{ '\\n' }}"
                "{%- endif -%}{%- endfor -%}")
    if template == "vicuna_v1":
        if not eos_token:
            raise ValueError("the vicuna_v1 chat template needs the tokenizer's eos_token")
        return (_content_macro(image_token, images_only=False) + bos +
                "{%- if messages and messages[0]['role'] == 'system' -%}"
                "{{ content(messages[0]['content']) }}{%- set rest = messages[1:] -%}"
                "{%- else -%}{{ " + _jinja_str(VICUNA_V1_SYSTEM) + " }}{%- set rest = messages -%}{%- endif -%}"
                "{{ ' ' }}"
                "{%- for m in rest -%}"
                "{%- if m['role'] == 'user' -%}{{ 'USER: ' }}{{ content(m['content']) }}"
                "{%- if not loop.last or add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
                "{%- elif m['role'] == 'assistant' -%}{{ ' ' }}{{ content(m['content']) }}{{ "
                + _jinja_str(eos_token) + " }}"
                "{%- endif -%}{%- endfor -%}")
    raise ValueError(f"chat template {template!r}: choose one of {CHAT_TEMPLATES}")


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a plain encode (as our data pipeline then does)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def write_safetensors(state: dict, out: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
    (transformers' layout) when the tensors exceed ``max_shard_bytes``. Returns the file names."""
    import json

    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards, current, size = [], {}, 0
    for key, value in sorted(state.items()):
        n = value.numel() * value.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = value
        size += n
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    weight_map, total, names = {}, 0, []
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        names.append(name)
        for key, value in shard.items():
            weight_map[key] = name
            total += value.numel() * value.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count → bytes (decimal and binary units)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)].strip()
            break
    else:
        number, factor = s, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"size {text!r}: expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


def normal_file_modes(out: Path) -> None:
    """Every exported file ``rw-r--r--`` and directory ``rwxr-xr-x`` (safetensors writes 0600)."""
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else FILE_MODE)


__all__ = [
    "CHAT_TEMPLATES",
    "DEFAULT_MAX_SHARD_BYTES",
    "adds_bos",
    "chat_template",
    "export_image_processor",
    "normal_file_modes",
    "padding_image_processor",
    "parse_size",
    "read_serving_record",
    "serving_image_processor",
    "write_safetensors",
]
