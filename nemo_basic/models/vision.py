"""NeVA vision encoders that wrap Hugging Face vision towers (CLIP, SigLIP, DINOv2), frozen.

`HFVisionEncoderConfig` is what NeVA's `MCoreNevaModel` expects of a vision config:

* ``image_size`` — its presence selects NeVA's Hugging Face path (``vision_model_from_hf =
  hasattr(config, "image_size")``): the model is called as ``vision_model(images,
  output_hidden_states=True)`` and the features are ``output[-1][vision_feature_layer]``, i.e. the
  hidden state *after* that encoder layer (index 0 = the patch embeddings, -1 = the last layer
  before any final norm, -2 = the one before: LLaVA's choice);
* ``num_image_embeddings_per_tile`` — patches + class tokens of one image, ``add_class_token`` and
  ``class_token_len``: NeVA's image sequence length is ``num_image_embeddings_per_tile −
  class_token_len`` when ``drop_vision_class_token`` is set;
* ``configure_model()`` — builds the HF module. NeVA drops ``vision_model.class_token_len`` leading
  tokens (it reads the attribute from the *module*, default 1), so the module carries it: 1 for CLIP
  and DINOv2, 1 + registers for DINOv2-with-registers, 0 for SigLIP (no class token).

``image_size`` is the pixel size the encoder *sees*, i.e. the image processor's crop: DINOv2's
config says 518 (its pre-training size) but its processor crops 224 and the HF module
interpolates the position embeddings, so 224 px → 16 × 16 = 256 patches.

The config is plain data (the HF config as a dict plus a few numbers), so NeMo's ``io`` layer can
store it in a checkpoint's ``context/`` and rebuild it; with ``pretrained_model_name_or_path`` the
weights are read from that local directory when the model is built, without it they start random
(and are expected from a checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_basic import compat

compat.apply_nemo()

from nemo.lightning import io  # noqa: E402


@dataclasses.dataclass(frozen=True)
class VisionFamily:
    """What differs between the supported HF vision towers."""

    name: str                # canonical model_type of the vision-only config
    model_class: str         # transformers class of the vision-only module
    config_class: str        # transformers config class of the vision-only module
    parent_types: tuple      # model_types of full (two-tower) configs holding a `vision_config`
    class_tokens: Any        # hf_config dict -> number of leading non-patch tokens
    llava_strategy: str      # HF LLaVA `vision_feature_select_strategy` that drops those tokens

    def transformers_class(self, which: str = "model"):
        import transformers

        return getattr(transformers, self.model_class if which == "model" else self.config_class)


FAMILIES = {
    "clip_vision_model": VisionFamily("clip_vision_model", "CLIPVisionModel", "CLIPVisionConfig", ("clip",),
                                      lambda cfg: 1, "default"),
    "siglip_vision_model": VisionFamily("siglip_vision_model", "SiglipVisionModel", "SiglipVisionConfig",
                                        ("siglip",), lambda cfg: 0, "full"),
    "dinov2": VisionFamily("dinov2", "Dinov2Model", "Dinov2Config", (), lambda cfg: 1, "default"),
    "dinov2_with_registers": VisionFamily("dinov2_with_registers", "Dinov2WithRegistersModel",
                                          "Dinov2WithRegistersConfig", (),
                                          lambda cfg: 1 + int(cfg.get("num_register_tokens", 4)), "default"),
}
_PARENT = {p: fam for fam in FAMILIES.values() for p in fam.parent_types}
_DROP_KEYS = ("id2label", "label2id", "transformers_version", "architectures", "_name_or_path", "torch_dtype",
              "dtype", "_attn_implementation_autoset", "out_features", "out_indices", "stage_names")


def family_of(model_type: str) -> VisionFamily:
    fam = FAMILIES.get(model_type) or _PARENT.get(model_type)
    if fam is None:
        supported = sorted(FAMILIES) + sorted(_PARENT)
        raise ValueError(f"unsupported vision model_type {model_type!r}; supported: {supported}")
    return fam


def _clean(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in _DROP_KEYS}


def hf_vision_config_dict(source: Any) -> dict:
    """The vision-only HF config as a plain dict, from a local directory, a ``PretrainedConfig``
    (vision-only, a two-tower CLIP/SigLIP config or a LLaVA config) or a dict."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"vision encoder directory {source} has no config.json")
        cfg = json.loads(path.read_text())
    elif isinstance(source, dict):
        cfg = dict(source)
    elif hasattr(source, "to_dict"):
        cfg = source.to_dict()
    else:
        raise TypeError(f"expected a directory, a dict or a transformers config, got {type(source).__name__}")
    if "vision_config" in cfg and cfg.get("model_type") not in FAMILIES:  # LLaVA or two-tower config
        cfg = cfg["vision_config"]
        cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
    model_type = cfg.get("model_type")
    if model_type is None:
        raise KeyError("vision config has no 'model_type'")
    fam = family_of(model_type)
    # Normalise through the transformers config class: fills defaults, checks the fields.
    config = fam.transformers_class("config")(**_clean(cfg))
    out = _clean(config.to_diff_dict())  # only what differs from the defaults: compact in checkpoints
    out["model_type"] = fam.name
    return out


def processor_image_size(processor: Any) -> Optional[int]:
    """The square pixel size an HF image processor produces (its crop, else its resize), or None."""
    if processor is None:
        return None
    size = None
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        size = processor.crop_size
    elif getattr(processor, "size", None):
        size = processor.size
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise ValueError(f"non-square processor output {size} is not supported")
            return int(size["height"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
        return None
    return int(size) if isinstance(size, int) else None


@dataclasses.dataclass
class HFVisionEncoderConfig(io.IOMixin):
    """A frozen Hugging Face vision tower for NeVA (see the module docstring).

    Args:
        hf_config: the vision-only HF config as a dict (see :func:`hf_vision_config_dict`); read
            from ``pretrained_model_name_or_path`` when omitted.
        pretrained_model_name_or_path: local directory to load the weights from in
            ``configure_model`` (a vision model, or a two-tower CLIP/SigLIP model); ``None``: random
            weights (a checkpoint provides them).
        image_size: input pixels (square); default: the directory's image-processor crop, else
            the config's ``image_size``.
        image_processor: the HF image processor as a dict (``to_dict()``), kept with the config so
            that data modules and the HF export find it after the encoder directory is gone;
            default: the directory's ``preprocessor_config.json`` if any.
        attn_implementation: HF attention backend ("sdpa", "eager"); None = transformers' default.

    Pass ``image_size`` and ``image_processor`` explicitly (as :func:`vision_config_from_hf`
    does) when the config is to be stored in a checkpoint: NeMo stores the constructor arguments.
    """

    hf_config: Optional[dict] = None
    pretrained_model_name_or_path: Optional[str] = None
    image_size: Optional[int] = None
    image_processor: Optional[dict] = None
    attn_implementation: Optional[str] = None

    def __post_init__(self) -> None:
        if self.hf_config is None:
            if self.pretrained_model_name_or_path is None:
                raise ValueError("HFVisionEncoderConfig needs hf_config or pretrained_model_name_or_path")
            self.hf_config = hf_vision_config_dict(self.pretrained_model_name_or_path)
        else:
            self.hf_config = hf_vision_config_dict(self.hf_config)
        self.family = family_of(self.hf_config["model_type"])
        if self.image_processor is None and self.pretrained_model_name_or_path is not None:
            proc = load_image_processor(self.pretrained_model_name_or_path, required=False)
            self.image_processor = None if proc is None else image_processor_dict(proc)
        if self.image_size is None and self.image_processor is not None:
            self.image_size = processor_image_size(image_processor_from_dict(self.image_processor))
        if self.image_size is None:
            self.image_size = int(self.hf_config["image_size"])
        self.model_type = self.family.name
        self.patch_size = int(self.hf_config["patch_size"])
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.hidden_size = int(self.hf_config["hidden_size"])
        self.num_hidden_layers = int(self.hf_config["num_hidden_layers"])
        self.class_token_len = int(self.family.class_tokens(self.hf_config))
        self.add_class_token = self.class_token_len > 0
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_image_embeddings_per_tile = self.num_patches + self.class_token_len
        self.tensor_model_parallel_size = 1     # NevaConfig.configure_model sets these; the tower
        self.pipeline_model_parallel_size = 1   # is replicated on the TP ranks of the first stage

    def transformers_config(self):
        config = self.family.transformers_class("config")(**self.hf_config)
        if self.attn_implementation is not None:
            config._attn_implementation = self.attn_implementation
        return config

    def configure_model(self) -> torch.nn.Module:
        cls = self.family.transformers_class("model")
        config = self.transformers_config()
        if self.pretrained_model_name_or_path is not None:
            path = self.pretrained_model_name_or_path
            if not Path(path).is_dir():
                raise FileNotFoundError(f"vision encoder directory {path} does not exist")
            kwargs = {} if self.attn_implementation is None else {"attn_implementation": self.attn_implementation}
            model = cls.from_pretrained(path, config=config, dtype=torch.float32, local_files_only=True,
                                        **kwargs)
        else:
            model = cls(config)
        model.class_token_len = self.class_token_len       # NeVA drops this many leading tokens
        model.tensor_parallel_grad_reduce = True             # replicated on TP ranks (as NeMo's CLIP)
        model.set_input_tensor = types.MethodType(_set_input_tensor, model)  # pipeline API, unused
        model.requires_grad_(False)                          # frozen (NeVA's freeze_vision_model too)
        return model.eval()

    def feature_dim(self) -> int:
        return self.hidden_size


def _set_input_tensor(self, tensor) -> None:  # the encoder is the first module: nothing to take
    return None


def vision_config_from_hf(vision_dir: str | os.PathLike, image_size: Optional[int] = None,
                          load_weights: bool = True, attn_implementation: Optional[str] = None
                          ) -> HFVisionEncoderConfig:
    """The NeVA vision config of a local HF CLIP / SigLIP / DINOv2 directory."""
    vision_dir = os.fspath(vision_dir)
    proc = load_image_processor(vision_dir, required=False)
    if image_size is None:
        image_size = processor_image_size(proc)
    return HFVisionEncoderConfig(hf_config=hf_vision_config_dict(vision_dir),
                                 pretrained_model_name_or_path=vision_dir if load_weights else None,
                                 image_size=image_size, image_processor=None if proc is None else image_processor_dict(proc),
                                 attn_implementation=attn_implementation)


def image_processor_dict(processor: Any) -> dict:
    """An HF image processor as a plain dict (``to_dict()`` with its class name)."""
    d = processor.to_dict()
    d["image_processor_type"] = type(processor).__name__
    return {k: v for k, v in d.items() if not k.startswith("_")}


def image_processor_from_dict(d: dict):
    """Rebuild an HF image processor from :func:`image_processor_dict`'s output."""
    import transformers

    name = d.get("image_processor_type")
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ValueError(f"unknown image processor class {name!r}")
    return cls.from_dict({k: v for k, v in d.items() if k != "image_processor_type"})


def load_image_processor(directory: str | os.PathLike, required: bool = True):
    """The HF image processor saved in ``directory`` (``preprocessor_config.json``), or None."""
    path = Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{directory} has no preprocessor_config.json (the image processor)")
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(os.fspath(directory), local_files_only=True)


def default_image_processor(config: HFVisionEncoderConfig):
    """An image processor for a tower without a saved one: the family's processor at ``image_size``
    (CLIP: CLIP mean/std, SigLIP: 0.5/0.5, DINOv2: ImageNet), resize + centre crop."""
    from transformers import BitImageProcessor, CLIPImageProcessor, SiglipImageProcessor

    n = config.image_size
    if config.model_type == "clip_vision_model":
        return CLIPImageProcessor(size={"shortest_edge": n}, crop_size={"height": n, "width": n})
    if config.model_type == "siglip_vision_model":
        return SiglipImageProcessor(size={"height": n, "width": n})
    return BitImageProcessor(size={"shortest_edge": n}, crop_size={"height": n, "width": n}, do_center_crop=True,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3)


def processor_at_size(processor: Any, size: int) -> Any:
    """``processor`` changed to produce ``size`` px squares, as the recipes' data pipeline does for
    ``model.image_size`` (resize the shortest edge / both sides, centre crop to the same side)."""
    if processor_image_size(processor) == size:
        return processor
    current = getattr(processor, "size", None) or {}
    processor.size = {"shortest_edge": size} if "shortest_edge" in current else {"height": size, "width": size}
    if getattr(processor, "crop_size", None) is not None:
        processor.crop_size = {"height": size, "width": size}
    if processor_image_size(processor) != size:
        raise ValueError(f"cannot make the {type(processor).__name__} produce {size} px images")
    return processor


def image_processor_for(vision: HFVisionEncoderConfig | str | os.PathLike):
    """The image processor for the data module. For a tower config: its own processor (else the
    family default) set to the tower's input size, resizing the square-padded image whole to that
    side (no border crop), as ``model.image_size`` asks. For a directory: its own, else the family
    default."""
    if isinstance(vision, HFVisionEncoderConfig):
        proc = image_processor_from_dict(vision.image_processor) if vision.image_processor else None
        if proc is None:
            return default_image_processor(vision)
        try:
            return processor_at_size(proc, vision.image_size)
        except ValueError as e:
            raise ValueError(f"model.image_size = {vision.image_size}: {e}") from None
    proc = load_image_processor(vision, required=False)
    return proc if proc is not None else default_image_processor(vision_config_from_hf(vision, load_weights=False))


__all__ = [
    "FAMILIES",
    "HFVisionEncoderConfig",
    "VisionFamily",
    "default_image_processor",
    "family_of",
    "hf_vision_config_dict",
    "image_processor_dict",
    "image_processor_for",
    "image_processor_from_dict",
    "load_image_processor",
    "processor_at_size",
    "processor_image_size",
    "vision_config_from_hf",
]
