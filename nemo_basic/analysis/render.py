"""Pictures of the lens: one PNG per image (the image under its patch grid, each patch's nearest
token written on it, one panel per layer, grounded patches outlined in green) and an ``index.html``
that shows them all with the per-layer metrics."""
from __future__ import annotations

import html
import os
import warnings
from typing import Optional, Sequence

METRIC_KEYS = ("meaningful", "grounded", "grounded_top5", "distinct_per_image", "top_token_share")


def _short(text: str, n: int = 8) -> str:
    t = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    t = "".join(c if c.isprintable() else "?" for c in t)
    return t if len(t) <= n else t[: n - 1] + "\u2026"


def render_image(image, entry: dict, layers: Sequence[int], path: str, title: Optional[str] = None) -> str:
    """Write the lens picture of one image (``entry``: one item of ``lens.json["images"]``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    rows, cols = entry["grid"]
    panel = max(3.5, 0.32 * max(rows, cols))
    fig, axes = plt.subplots(1, len(layers), figsize=(panel * len(layers), panel + 0.6), squeeze=False)
    from PIL import Image

    size = (cols * 32, rows * 32)
    up = size[0] >= image.size[0]
    arr = np.asarray(image.convert("RGB").resize(size, Image.NEAREST if up else Image.LANCZOS))
    font = max(3.0, min(9.0, panel * 72 / max(cols, 1) / 5.0))
    for ax, layer in zip(axes[0], layers):
        key = str(layer)
        ax.imshow(arr, extent=(0, cols, rows, 0), alpha=0.55)
        for x in range(cols + 1):
            ax.axvline(x, color="k", lw=0.3, alpha=0.5)
        for y in range(rows + 1):
            ax.axhline(y, color="k", lw=0.3, alpha=0.5)
        tokens = entry["tokens"][key]
        grounded = entry.get("grounded_patches", {}).get(key) or [False] * len(tokens)
        for i, (tok, g) in enumerate(zip(tokens, grounded)):
            r, c = divmod(i, cols)
            if g:
                ax.add_patch(Rectangle((c + 0.04, r + 0.04), 0.92, 0.92, fill=False, ec="#00c000", lw=1.2))
            t = ax.text(c + 0.5, r + 0.5, _short(tok), ha="center", va="center", fontsize=font, color="black",
                        bbox=dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.6))
            t.set_parse_math(False)
        labelled = sum(lab is not None for lab in entry.get("labels") or [])
        share = sum(grounded) / labelled if labelled else None
        name = "layer 0 (projector output)" if layer == 0 else f"after layer {layer}"
        ax.set_title(name + (f" - grounded {share:.2f}" if share is not None else ""), fontsize=9)
        ax.set_xlim(0, cols)
        ax.set_ylim(rows, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs missing from the font
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def write_index(result: dict, pngs: Sequence[str], out_dir: str) -> str:
    """``out_dir/index.html``: the metrics table and every picture."""
    layers = result["layers"]
    rows = "".join(
        "<tr><td>" + ("0 (V)" if l == 0 else str(l)) + "</td>"
        + "".join(f"<td>{_fmt(result['metrics'][str(l)].get(k))}</td>" for k in METRIC_KEYS) + "</tr>"
        for l in layers)
    head = "".join(f"<th>{k}</th>" for k in METRIC_KEYS)
    figs = "".join(
        f"<figure><img src=\"{html.escape(os.path.relpath(p, out_dir))}\" style=\"max-width:100%\">"
        f"<figcaption>{html.escape(str(e.get('image')))}</figcaption></figure>\n"
        for p, e in zip(pngs, result["images"]))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>nemo_basic visual logit lens</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #aaa;padding:2px 8px;text-align:right}} figure{{margin:1em 0}}</style></head>
<body><h1>Visual logit lens</h1>
<p>Model: {html.escape(str(result.get('model', '')))}; prompt: <code>{html.escape(repr(result.get('prompt', '')))}</code>;
{len(result['images'])} images. Each patch shows the vocabulary token nearest by cosine to its visual embedding
(layer 0: the projector output; layer l: after decoder layer l); green boxes: the token names the patch's label.</p>
<table><tr><th>layer</th>{head}</tr>{rows}</table>
{figs}</body></html>
"""
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


__all__ = ["render_image", "write_index"]
