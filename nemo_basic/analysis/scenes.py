"""Fresh labelled synthetic scenes for the lens, from the embedded-data generator
(:func:`nemo_basic.data.embedded.make_scene`), drawn at the model's image size with per-patch labels
on the model's own patch grid.

Seeds: the embedded data set draws its scenes from ``numpy.random.default_rng([seed, 0])`` (and
streams ``[seed, 1]``, ``[seed, 2]`` for digits and text); analysis scenes come from the stream
``[seed, ANALYSIS_STREAM]``, which training never uses, so they are new images for any ``seed``.

A patch's label is the list of words that name it: ``[colour, shape]`` for a patch mostly covered by
an object, ``[background colour, "background"]`` otherwise (the generator's majority rule).
"""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

ANALYSIS_STREAM = 7919


def scene_patch_labels(scene: dict) -> List[list]:
    """Row-major per-patch label words of a scene description (``make_scene``'s second result)."""
    out = []
    for row in scene["patch_labels"]:
        for k in row:
            if k == 0:
                out.append([scene["background"], "background"])
            else:
                obj = scene["objects"][k - 1]
                out.append([obj["color"], obj["shape"]])
    return out


def make_scenes(n: int, image_size: int, grid: int, seed: int = 0, out_dir: Optional[str] = None) -> list:
    """``n`` scenes: ``[{"image": PIL image, "path": file or None, "labels": [...], "scene": dict}]``.

    ``grid``: patches per side of the model (the image is ``image_size`` px, patches of
    ``image_size // grid`` px). With ``out_dir`` the images are written there as PNG."""
    from nemo_basic.data.embedded import make_scene

    if grid < 1 or image_size % grid:
        raise ValueError(f"image size {image_size} px is not a whole number of {grid} patches per side; "
                         "pass --images instead of --scenes for this model")
    patch = image_size // grid
    rng = np.random.default_rng([seed, ANALYSIS_STREAM])
    scenes = []
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    for i in range(n):
        img, scene = make_scene(rng, image_size, patch)
        path = None
        if out_dir is not None:
            path = os.path.join(out_dir, f"scene_{i:04d}.png")
            img.save(path)
        scenes.append({"image": img, "path": path, "labels": scene_patch_labels(scene), "scene": scene})
    return scenes


__all__ = ["ANALYSIS_STREAM", "make_scenes", "scene_patch_labels"]
