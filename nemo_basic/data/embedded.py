"""The embedded default data set: made offline, in LLaVA's own JSON + image-folder format.

It is converted by the same `scripts/prepare_llava_data.py` as the real data, so the default run
exercises the real pipeline. Contents (all deterministic for a seed: same seed -> byte-identical
JSON and images, given the same Pillow/zlib):

- Synthetic scenes (``images/synthetic/scene_NNNN.png``): a plain background and 1-3 shapes
  (circle, square, triangle) of distinct colour/shape, drawn without anti-aliasing so that the
  per-patch labels in ``labels.json`` are exact: for a ``patch_size`` grid (14 px -> 16x16 at 224)
  each patch gets the index of the object covering most of its pixels (0 = background), with
  the object list (shape, colour, bounding box, centre, position word). This makes the alignment
  of visual tokens measurable per patch (colour and shape words are the concept vocabulary).
- Real images that ship inside installed packages, with human captions: scikit-image's
  ``skimage.data`` images that load offline (caption = first line of the loader's docstring),
  scikit-learn's ``load_digits`` (8x8, upscaled; "a handwritten digit N") and
  ``load_sample_images`` (china, flower), matplotlib's ``grace_hopper.jpg``.

Files written under ``OUT``::

    images/...            the images (image folder for --image-dir)
    captions.json         stage 1 (template plain): one human/gpt pair per image
    instruct.json         stage 2 (template vicuna_v1): multi-turn questions on the scenes
                          (colour, shape, position, count, presence, background), descriptions of
                          the real images, and text-only conversations
    labels.json           per-patch labels of the scenes, metadata of the real images
"""
from __future__ import annotations

import io
import json
import os
import shutil
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# scikit-image loaders used (those that ship in the wheel; the loader's docstring gives the caption).
# Left out: binary_blobs (random each call), chelsea (same picture as cat), lfw_subset (25x25 faces),
# stereo_motorcycle (a pair), and the loaders that need a download.
SKIMAGE_IMAGES = (
    "astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
    "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text",
)
MAX_REAL_SIDE = 512
OWNED = ("images", "captions.json", "instruct.json", "labels.json")


# ---------------------------------------------------------------------------------------------
# synthetic scenes


def _position_word(cx: float, cy: float, size: int) -> str:
    col = ("left", "center", "right")[min(2, int(3 * cx / size))]
    row = ("top", "middle", "bottom")[min(2, int(3 * cy / size))]
    if row == "middle":
        return "center" if col == "center" else col
    return row if col == "center" else f"{row} {col}"


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
    else:  # pragma: no cover
        raise ValueError(shape)


def make_scene(rng: np.random.Generator, size: int, patch_size: int, side: tuple[float, float] = (0.18, 0.32),
               max_objects: int = 3) -> tuple[Image.Image, dict]:
    """One scene and its labels (objects and per-patch majority labels). ``side``: the range of an
    object's side as a fraction of the image side; ``max_objects``: 1..max_objects objects."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    n_obj = int(rng.integers(1, max_objects + 1))
    combos = [(c, s) for c in COLORS for s in SHAPES]
    picks = rng.choice(len(combos), size=n_obj, replace=False)
    objects: list[dict] = []
    boxes: list[tuple[int, int, int, int]] = []
    for p in picks:
        color, shape = combos[int(p)]
        for _ in range(200):
            s = int(rng.integers(int(side[0] * size), int(side[1] * size) + 1))
            x0 = int(rng.integers(2, size - s - 2))
            y0 = int(rng.integers(2, size - s - 2))
            box = (x0, y0, x0 + s - 1, y0 + s - 1)
            if all(box[2] + 4 < b[0] or b[2] + 4 < box[0] or box[3] + 4 < b[1] or b[3] + 4 < box[1] for b in boxes):
                break
        else:
            continue  # no room left: fewer objects
        boxes.append(box)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        objects.append({"shape": shape, "color": color, "bbox": list(box), "center": [cx, cy],
                        "position": _position_word(cx, cy, size)})
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    lab = Image.new("L", (size, size), 0)
    d_img, d_lab = ImageDraw.Draw(img), ImageDraw.Draw(lab)
    for k, (obj, box) in enumerate(zip(objects, boxes), start=1):
        _draw(d_img, obj["shape"], box, COLORS[obj["color"]])
        _draw(d_lab, obj["shape"], box, k)
    grid = size // patch_size
    arr = np.asarray(lab).reshape(grid, patch_size, grid, patch_size)
    counts = np.stack([(arr == k).sum(axis=(1, 3)) for k in range(len(objects) + 1)])  # [K+1, g, g]
    patch_labels = counts.argmax(axis=0)  # ties -> the lower index (background first)
    return img, {"background": background, "objects": objects, "patch_labels": patch_labels.tolist()}


def _where(position: str) -> str:
    if position == "center":
        return "in the center of the image"
    if position in ("left", "right"):
        return f"on the {position} side of the image"
    return f"at the {position} of the image"


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(scene: dict) -> str:
    objs = sorted(scene["objects"], key=lambda o: (o["center"][0], o["center"][1]))
    names = [f"{_a(o['color'])} {o['color']} {o['shape']}" for o in objs]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} on {_a(scene['background'])} {scene['background']} background."


def _questions(rng: np.random.Generator, scene: dict) -> list[tuple[str, str]]:
    objs = scene["objects"]
    qa: list[tuple[str, str]] = []
    n = len(objs)
    qa.append(("How many shapes are in the image?",
               f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} shape{'s' if n != 1 else ''}."))
    qa.append(("What color is the background?", f"The background is {scene['background']}."))
    for o in objs:
        if sum(p["shape"] == o["shape"] for p in objs) == 1:
            qa.append((f"What color is the {o['shape']}?", f"The {o['shape']} is {o['color']}."))
        if sum(p["color"] == o["color"] for p in objs) == 1:
            qa.append((f"Which shape is {o['color']}?", f"The {o['color']} shape is {_a(o['shape'])} {o['shape']}."))
        name = f"{o['color']} {o['shape']}"
        qa.append((f"Where is the {name}?", f"The {name} is {_where(o['position'])}."))
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    present = any(o["color"] == color and o["shape"] == shape for o in objs)
    qa.append((f"Is there {_a(color)} {color} {shape} in the image?",
               "Yes." if present else f"No, there is no {color} {shape}."))
    cap = _caption(scene)
    qa.append(("Describe the image briefly.", "The image shows " + cap))
    order = rng.permutation(len(qa))
    k = int(rng.integers(2, 4))
    return [qa[int(i)] for i in order[:k]]


# ---------------------------------------------------------------------------------------------
# real images


def _to_uint8_rgb(a: np.ndarray) -> Image.Image:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        lo, hi = float(a.min()), float(a.max())
        a = np.round((a - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = a.astype(np.uint8)
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.shape[2] == 4:
        rgba = Image.fromarray(a, "RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return Image.fromarray(a[:, :, :3], "RGB")


def _limit(img: Image.Image) -> Image.Image:
    w, h = img.size
    s = max(w, h)
    if s <= MAX_REAL_SIDE:
        return img
    return img.resize((max(1, round(w * MAX_REAL_SIDE / s)), max(1, round(h * MAX_REAL_SIDE / s))), Image.BICUBIC)


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def real_images(num_digits: int, seed: int) -> list[dict]:
    """``[{"rel", "bytes", "caption", "source", "kind", ...}]``: only what loads offline."""
    items: list[dict] = []
    try:
        import skimage.data as skd
    except ImportError:  # pragma: no cover
        skd = None
    if skd is not None:
        for name in SKIMAGE_IMAGES:
            fn = getattr(skd, name, None)
            if fn is None:
                continue
            try:
                arr = fn()
            except Exception:  # needs a download (pooch) in this version: leave it out
                continue
            caption = (fn.__doc__ or "").strip().splitlines()[0].strip()
            items.append({"rel": f"skimage/{name}.png", "bytes": _png(_limit(_to_uint8_rgb(arr))),
                          "caption": caption, "source": f"skimage.data.{name}", "kind": "photo"})
    try:
        from sklearn.datasets import load_digits, load_sample_images
    except ImportError:  # pragma: no cover
        load_digits = load_sample_images = None
    if load_sample_images is not None:
        sample = load_sample_images()
        captions = {"china.jpg": "A Chinese temple with a pagoda roof among trees.",
                    "flower.jpg": "A close-up of a pink flower."}
        for fname, arr in zip(sample.filenames, sample.images):
            base = os.path.basename(fname)
            items.append({"rel": f"sklearn/{base}", "bytes": _jpeg(_limit(_to_uint8_rgb(arr))),
                          "caption": captions.get(base, f"The scikit-learn sample image {base}."),
                          "source": f"sklearn.datasets.load_sample_images:{base}", "kind": "photo"})
    if load_digits is not None and num_digits > 0:
        digits = load_digits()
        rng = np.random.default_rng([seed, 1])
        idx = np.sort(rng.choice(len(digits.target), size=min(num_digits, len(digits.target)), replace=False))
        for i in idx:
            ink = digits.images[i] / 16.0  # 0..1, 1 = ink
            a = np.round(255 * (1.0 - ink)).astype(np.uint8)  # dark digit on white
            img = Image.fromarray(a, "L").resize((112, 112), Image.NEAREST).convert("RGB")
            d = int(digits.target[i])
            items.append({"rel": f"digits/digit_{int(i):04d}.png", "bytes": _png(img),
                          "caption": f"a handwritten digit {d}", "source": f"sklearn.datasets.load_digits[{int(i)}]",
                          "kind": "digit", "digit": d})
    try:
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            data = f.read()
        items.append({"rel": "matplotlib/grace_hopper.jpg", "bytes": data,
                      "caption": "A portrait of Rear Admiral Grace Hopper in her navy uniform.",
                      "source": "matplotlib sample data grace_hopper.jpg", "kind": "photo"})
    except Exception:  # pragma: no cover
        pass
    return items


TEXT_ONLY_FACTS = (
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a square have?", "A square has four sides."),
    ("Does a circle have corners?", "No, a circle has no corners."),
    ("What color do you get when you mix red and yellow?", "Mixing red and yellow gives orange."),
    ("What color do you get when you mix blue and yellow?", "Mixing blue and yellow gives green."),
    ("What color do you get when you mix red and blue?", "Mixing red and blue gives purple."),
    ("What is the color of a clear daytime sky?", "A clear daytime sky is blue."),
    ("Which shape has three corners?", "A triangle has three corners."),
)


def _text_only(rng: np.random.Generator, n: int) -> list[list[tuple[str, str]]]:
    convs = []
    for k in range(n):
        if k % 2 == 0:
            a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
            turns = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")]
            turns.append((f"And {a} times {b}?", f"{a} times {b} is {a * b}."))
        else:
            i, j = rng.choice(len(TEXT_ONLY_FACTS), size=2, replace=False)
            turns = [TEXT_ONLY_FACTS[int(i)], TEXT_ONLY_FACTS[int(j)]]
        convs.append(turns)
    return convs


# ---------------------------------------------------------------------------------------------


def _conv(turns: list[tuple[str, str]], with_image: bool) -> list[dict]:
    out = []
    for j, (q, a) in enumerate(turns):
        out.append({"from": "human", "value": ("<image>\n" + q) if (with_image and j == 0) else q})
        out.append({"from": "gpt", "value": a})
    return out


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _dump_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def make_embedded_data(out_dir: str, *, seed: int = 0, num_synthetic: int = 400, image_size: int = 224,
                       patch_size: int = 14, num_digits: int = 40, num_text_only: int = 16,
                       real: bool = True, progress: bool = True) -> dict:
    """Write the embedded data set to ``out_dir`` (replacing files this function owns there)."""
    from tqdm.auto import tqdm

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for name in OWNED:
        p = os.path.join(out_dir, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    img_dir = os.path.join(out_dir, "images")
    rng = np.random.default_rng([seed, 0])
    captions: list[dict] = []
    instruct: list[dict] = []
    grid = image_size // patch_size
    labels: dict = {
        "image_size": image_size, "patch_size": patch_size, "grid": [grid, grid],
        "colors": {k: list(v) for k, v in COLORS.items()}, "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()},
        "shapes": list(SHAPES),
        "patch_label_meaning": "1-based index into the scene's objects, 0 = background: whichever covers "
                               "most of the patch's pixels (a tie goes to the lower index)",
        "scenes": {}, "real": {},
    }
    for k in tqdm(range(num_synthetic), desc="synthetic scenes", disable=not progress):
        img, scene = make_scene(rng, image_size, patch_size)
        rel = f"synthetic/scene_{k:04d}.png"
        _write(os.path.join(img_dir, rel), _png(img))
        labels["scenes"][rel] = scene
        cap = _caption(scene)
        captions.append({"id": f"syn-{k:04d}", "image": rel,
                         "conversations": _conv([("Describe the image.", cap[0].upper() + cap[1:])], True)})
        instruct.append({"id": f"syn-{k:04d}-qa", "image": rel, "conversations": _conv(_questions(rng, scene), True)})
    if real:
        for item in real_images(num_digits, seed):
            _write(os.path.join(img_dir, item["rel"]), item["bytes"])
            rid = item["rel"].rsplit(".", 1)[0].replace("/", "-")
            labels["real"][item["rel"]] = {k: v for k, v in item.items() if k not in ("rel", "bytes")}
            captions.append({"id": rid, "image": item["rel"],
                             "conversations": _conv([("Describe the image.", item["caption"])], True)})
            if item["kind"] == "digit":
                turns = [("What digit is shown in the image?", f"The digit {item['digit']}."),
                         ("Is it handwritten or printed?", "It is handwritten.")]
            else:
                turns = [("Describe this image.", item["caption"])]
            instruct.append({"id": rid + "-qa", "image": item["rel"], "conversations": _conv(turns, True)})
    for k, turns in enumerate(_text_only(np.random.default_rng([seed, 2]), num_text_only)):
        instruct.append({"id": f"text-{k:04d}", "conversations": _conv(turns, False)})
    _dump_json(os.path.join(out_dir, "captions.json"), captions)
    _dump_json(os.path.join(out_dir, "instruct.json"), instruct)
    _dump_json(os.path.join(out_dir, "labels.json"), labels)
    return {"out_dir": out_dir, "captions": len(captions), "instruct": len(instruct),
            "synthetic": num_synthetic, "real": len(labels["real"]), "text_only": num_text_only}


def main_summary(summary: dict, out_dir: Optional[str] = None) -> str:
    d = summary["out_dir"] if out_dir is None else out_dir
    return (f"wrote {summary['captions']} caption records and {summary['instruct']} instruction records "
            f"({summary['synthetic']} synthetic scenes, {summary['real']} real images, {summary['text_only']} "
            f"text-only) to {d}\n"
            f"next: scripts/prepare_llava_data.py --json {d}/captions.json --image-dir {d}/images "
            f"--out {d}/shards/stage1 --template plain\n"
            f"      scripts/prepare_llava_data.py --json {d}/instruct.json --image-dir {d}/images "
            f"--out {d}/shards/stage2 --template vicuna_v1")
