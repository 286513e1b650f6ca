"""CLI: ``python -m nemo_basic.analysis {lens,probe} (--checkpoint CKPT | --hf DIR) (--images PATH... |
--scenes N) [--labels labels.json] [--layers 0,1,8,16] [--prompt TEXT] [--out DIR]`` (see ``--help``).

``--checkpoint``: our NeMo 2 checkpoint (any TP/PP layout that saved it); it is exported to a
temporary Hugging Face LLaVA directory (:func:`nemo_basic.export.hf.export_hf_llava`, which
gathers the shards) and analysed there, so both sources run the same code.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

from nemo_basic import console

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def say(msg: str) -> None:
    console.say(msg, "nemo_basic.analysis", file=sys.stderr)


def _layers(text: str) -> list:
    try:
        out = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: expected comma-separated integers, e.g. 0,1,8,16")
    if not out:
        raise argparse.ArgumentTypeError("--layers is empty")
    return out


def _common(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="our NeMo 2 checkpoint directory (TP/PP-sharded ones included)")
    src.add_argument("--hf", help="a local Hugging Face LlavaForConditionalGeneration directory")
    imgs = p.add_mutually_exclusive_group(required=True)
    imgs.add_argument("--images", nargs="+", help="image files")
    imgs.add_argument("--scenes", type=int, help="N fresh labelled synthetic scenes at the model's image size")
    p.add_argument("--labels", help="per-patch labels (JSON; see nemo_basic.analysis.lens.load_labels)")
    p.add_argument("--seed", type=int, default=0, help="seed of --scenes (a stream training never uses)")
    p.add_argument("--prompt", default=None, help="text around the image, with one '<image>' marker "
                                                 "(default '<image>': the stage-1 caption prompt)")
    p.add_argument("--out", default="analysis", help="output directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"),
                   help="dtype the model runs in")
    p.add_argument("--device", default="cpu", help="device the model runs on (cpu, cuda, cuda:1, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nemo_basic.analysis",
                                     description="Visual logit lens, alignment metrics and the replacement probe.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lens", help="nearest tokens of the visual embeddings per layer: lens.json, PNGs, index.html")
    _common(p)
    p.add_argument("--layers", type=_layers, default=None, help="layers (default 0,1,L/4,L/2,L)")
    p.add_argument("--no-pictures", action="store_true", help="write lens.json only")
    p = sub.add_parser("probe", help="captions from the real and from the nearest-token embeddings")
    _common(p)
    p.add_argument("--max-new-tokens", type=int, default=24)
    return parser


@contextlib.contextmanager
def open_model(args):
    """The HF LLaVA of ``--hf``, or of ``--checkpoint`` through a temporary HF export."""
    import torch

    import nemo_basic  # noqa: F401  (CPU backend, torchvision shim before transformers' vision imports)
    from nemo_basic.analysis.lens import AnalysisError, HFLlava

    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[args.dtype]
    if args.hf:
        yield HFLlava.load(args.hf, dtype, args.device)
        return
    from nemo_basic.export.checkpoint import CheckpointError, load_checkpoint_context

    try:
        model = load_checkpoint_context(args.checkpoint)
    except CheckpointError as e:
        if "not a NeVA model" in str(e):
            raise AnalysisError(f"{args.checkpoint} has no vision tower ({e}); the lens needs a NeVA / LLaVA "
                                "checkpoint (vision encoder + projector + LLM)") from None
        raise
    if getattr(model.config, "vision_transformer_config", None) is None:
        raise AnalysisError(f"{args.checkpoint} has no vision tower (vision_transformer_config is None); the lens "
                            "needs a NeVA / LLaVA checkpoint (vision encoder + projector + LLM)")
    from nemo_basic.export.hf import export_hf_llava

    with tempfile.TemporaryDirectory(prefix="nemo_basic_lens_") as tmp:
        say(f"exporting {args.checkpoint} to a temporary Hugging Face directory")
        hf = export_hf_llava(args.checkpoint, os.path.join(tmp, "hf"))
        wrapped = HFLlava.load(hf, dtype, args.device)
        wrapped.source = os.path.abspath(args.checkpoint)
        yield wrapped


def _items(args, model) -> list:
    from PIL import Image

    from nemo_basic.analysis.lens import AnalysisError, load_labels

    if args.scenes is not None:
        from nemo_basic.analysis.scenes import make_scenes

        if args.scenes < 1:
            raise AnalysisError(f"--scenes {args.scenes}: expected at least 1")
        if args.labels:
            raise AnalysisError("--labels goes with --images; --scenes makes its own labels")
        v = model.visual_embeddings(model.pixels(Image.new("RGB", (model.image_size, model.image_size))))
        side = int(round(v.shape[0] ** 0.5))
        if side * side != v.shape[0]:
            raise AnalysisError(f"the model sees {v.shape[0]} patches, not a square grid; use --images")
        scenes = make_scenes(args.scenes, model.image_size, side, seed=args.seed,
                             out_dir=os.path.join(args.out, "scenes"))
        return [{"image": s["image"], "path": s["path"], "labels": s["labels"]} for s in scenes]
    items = []
    for path in args.images:
        if not os.path.isfile(path):
            raise AnalysisError(f"--images: {path} does not exist")
        try:
            img = Image.open(path)
            img.load()
        except Exception as e:  # noqa: BLE001 - name the file
            raise AnalysisError(f"--images: cannot read {path} as an image ({e})") from None
        items.append({"image": img.convert("RGB"), "path": path, "labels": None})
    if args.labels:
        for item, lab in zip(items, load_labels(args.labels, args.images)):
            item["labels"] = lab
    return items


def _default_layers(depth: int) -> list:
    out = []
    for l in (0, 1, depth // 4, depth // 2, depth):
        if l not in out:
            out.append(l)
    return out


def cmd_lens(args) -> int:
    from nemo_basic.analysis.lens import DEFAULT_PROMPT, run_lens
    from nemo_basic.analysis.render import render_image, write_index

    os.makedirs(args.out, exist_ok=True)
    with open_model(args) as model:
        layers = model.check_layers(args.layers if args.layers is not None else _default_layers(model.depth))
        items = _items(args, model)
        t0 = time.perf_counter()
        result = run_lens(model, items, layers, prompt=args.prompt or DEFAULT_PROMPT, progress=not args.no_progress)
        say(f"lens of {len(items)} images x {len(layers)} layers in {time.perf_counter() - t0:.1f} s")
    path = os.path.join(args.out, "lens.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False)
    pngs = []
    if not args.no_pictures:
        from tqdm.auto import tqdm

        pics = os.path.join(args.out, "pictures")
        for i, (item, entry) in enumerate(tqdm(list(zip(items, result["images"])), desc="pictures",
                                               disable=args.no_progress)):
            name = os.path.splitext(os.path.basename(item["path"] or f"image_{i:04d}"))[0]
            pngs.append(render_image(item["image"], entry, layers, os.path.join(pics, f"{i:04d}_{name}.png"),
                                     title=str(item["path"])))
        write_index(result, pngs, args.out)
    for l in layers:
        m = result["metrics"][str(l)]
        g = "-" if m["grounded"] is None else f"{m['grounded']:.3f}"
        say(f"layer {l:>3}: meaningful {m['meaningful']:.3f}  grounded {g}  distinct/image "
            f"{m['distinct_per_image']:.1f}  top-token share {m['top_token_share']:.3f}")
    say(f"wrote {path}" + (f", {len(pngs)} pictures and {os.path.join(args.out, 'index.html')}" if pngs else ""))
    return 0


def cmd_probe(args) -> int:
    from nemo_basic.analysis.lens import DEFAULT_PROMPT
    from nemo_basic.analysis.probe import run_probe

    os.makedirs(args.out, exist_ok=True)
    with open_model(args) as model:
        items = _items(args, model)
        result = run_probe(model, items, prompt=args.prompt or DEFAULT_PROMPT, max_new_tokens=args.max_new_tokens,
                           progress=not args.no_progress, say=lambda s: print(s, flush=True))
    path = os.path.join(args.out, "probe.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    say(f"wrote {path} (real and nearest-token captions agree on {result['agreement']:.2f} of the images)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nemo_basic.analysis.lens import AnalysisError

    try:
        return {"lens": cmd_lens, "probe": cmd_probe}[args.command](args)
    except (AnalysisError, FileNotFoundError, FileExistsError) as e:
        say(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
