"""LLaVA-1.5 image preprocessing against a reference made here with PIL and the HF processors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nemo_basic.data.image import preprocess_image, processed_image_shape

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGENET_MEAN = (0.485, 0.456, 0.406)


def noisy(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def reference(image, processor, mean):
    """Pad to a square with round(mean * 255), image centred, then the HF processor."""
    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(round(m * 255) for m in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return processor(images=canvas, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("size", [(40, 24), (23, 41)])
def test_clip_pad_to_square_matches_reference(clip_processor, size):
    image = noisy(*size)
    got = preprocess_image(image, clip_processor)
    want = reference(image, clip_processor, CLIP_MEAN)
    assert got.shape == (3, 28, 28) and got.dtype == torch.float32
    assert torch.equal(got, torch.as_tensor(want))


def test_pad_colour_is_the_processor_mean(clip_processor):
    # a wide black image: the top rows of the square are padding, i.e. the mean colour, which
    # CLIP normalisation maps to (round(255 m) / 255 - m) / std, about 0 (within 1/255 / std)
    got = preprocess_image(Image.new("RGB", (56, 14), (0, 0, 0)), clip_processor)
    assert torch.all(got[:, 0, :].abs() < (0.5 / 255) / 0.26)
    clip_std = (0.26862954, 0.26130258, 0.27577711)
    black = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, clip_std)])
    assert torch.allclose(got[:, 14, :], black[:, None].expand(3, 28), atol=1e-3)  # the black band in the middle


def test_dinov2_bit_processor(clip_processor):
    from transformers import BitImageProcessor

    proc = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                             image_mean=list(IMAGENET_MEAN), image_std=[0.229, 0.224, 0.225],
                             do_convert_rgb=True)
    image = noisy(50, 30, seed=1)
    got = preprocess_image(image, proc)
    assert torch.equal(got, torch.as_tensor(reference(image, proc, IMAGENET_MEAN)))
    assert processed_image_shape(proc) == (3, 28, 28)
