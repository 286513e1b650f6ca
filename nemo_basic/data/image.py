"""Images: validation when shards are written, LLaVA-1.5 preprocessing when they are read.

Writing (`load_image_blob`): the file is read once, fully decoded with Pillow (a truncated JPEG
fails here, not during training) and stored as its original bytes when it is a JPEG or PNG; any
other format Pillow reads (GIF, BMP, TIFF, WebP, ...) is re-encoded losslessly as PNG so that
every reader (webdataset's decoders, Energon) handles it.

Reading (`preprocess_image`): LLaVA-1.5's ``image_aspect_ratio="pad"``: the image is padded to a
square with the processor's mean colour (``round(mean * 255)`` per channel; LLaVA and NeMo
truncate with ``int()``, which differs by at most one grey level on the padding pixels) and then
given to the Hugging Face image processor of the vision tower (CLIPImageProcessor for CLIP,
BitImageProcessor for DINOv2, SiglipImageProcessor, ...) for its own resize, crop and
normalisation. The result is a float32 tensor ``[3, H, W]``.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from nemo_basic.data.llava_json import R_IMAGE_CORRUPT, R_IMAGE_MISSING, R_IMAGE_UNREADABLE

# Formats kept byte for byte; everything else becomes PNG.
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png"}


class ImageError(Exception):
    def __init__(self, reason: str, message: str):
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


@dataclasses.dataclass
class ImageBlob:
    data: bytes
    ext: str  # "jpg" or "png"
    width: int
    height: int


def resolve_image_path(image_dir: str | os.PathLike, rel: str) -> str:
    """Join ``rel`` (as written in the LLaVA JSON) to the image folder, refusing paths that leave it."""
    root = os.path.abspath(os.fspath(image_dir))
    full = os.path.abspath(os.path.join(root, rel))
    if os.path.commonpath([root, full]) != root:
        raise ImageError(R_IMAGE_MISSING, f"{rel!r} points outside the image folder {root}")
    return full


def decode_image_bytes(data: bytes) -> Image.Image:
    """Fully decode ``data`` (raises on truncation) and return it as an RGB image."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB view of any Pillow image; transparency is composited on white."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def load_image_blob(image_dir: str | os.PathLike, rel: str) -> ImageBlob:
    """Read and validate one image; raise `ImageError` (missing, unreadable or corrupt)."""
    path = resolve_image_path(image_dir, rel)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(R_IMAGE_MISSING, f"{path} does not exist") from None
    except IsADirectoryError:
        raise ImageError(R_IMAGE_MISSING, f"{path} is a directory") from None
    except OSError as e:
        raise ImageError(R_IMAGE_UNREADABLE, f"{path}: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()  # full decode: catches truncated and corrupt data
            width, height = im.size
            if width < 1 or height < 1:
                raise ImageError(R_IMAGE_CORRUPT, f"{path}: empty image {width}x{height}")
            if fmt in _KEEP_FORMATS:
                return ImageBlob(data=data, ext=_KEEP_FORMATS[fmt], width=width, height=height)
            out = io.BytesIO()
            rgb = to_rgb(im)
            rgb.save(out, format="PNG")
            return ImageBlob(data=out.getvalue(), ext="png", width=width, height=height)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(R_IMAGE_CORRUPT, f"{path}: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Training-time preprocessing


def unwrap_image_processor(processor: Any) -> Any:
    """Accept an HF image processor, an HF ``ProcessorMixin`` holding one, or a local path."""
    if isinstance(processor, (str, os.PathLike)):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(os.fspath(processor), local_files_only=True)
    inner = getattr(processor, "image_processor", None)
    if inner is not None and callable(getattr(inner, "preprocess", None)):
        return inner
    if not callable(getattr(processor, "preprocess", None)):
        raise TypeError(f"expected a Hugging Face image processor, got {type(processor).__name__}")
    return processor


def pad_color(processor: Any) -> tuple[int, int, int]:
    """The processor's mean colour as 8-bit RGB, ``round(mean * 255)``."""
    mean = getattr(processor, "image_mean", None)
    if mean is None:
        return (0, 0, 0)
    mean = list(mean) if not np.isscalar(mean) else [mean] * 3
    return tuple(int(round(float(m) * 255)) for m in mean[:3])


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Pad to a square, image centred (LLaVA's ``expand2square``)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), color)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess_image(image: Image.Image, processor: Any, mode: str = "pad") -> torch.Tensor:
    """One RGB PIL image -> ``[3, H, W]`` float32, as LLaVA-1.5 (``mode="pad"``) or the processor
    alone (``mode="resize"``, e.g. for processors that already keep the whole image)."""
    if mode == "pad":
        image = expand_to_square(image, pad_color(processor))
    elif mode != "resize":
        raise ValueError(f"image process mode must be 'pad' or 'resize', got {mode!r}")
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    return torch.as_tensor(pixel_values[0], dtype=torch.float32)


def processed_image_shape(processor: Any) -> tuple[int, int, int]:
    """``(3, H, W)`` that `preprocess_image` produces with this processor (by running it once)."""
    probe = Image.new("RGB", (32, 24), (0, 0, 0))
    return tuple(preprocess_image(probe, processor).shape)
