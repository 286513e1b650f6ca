#!/usr/bin/env python
"""Generate the embedded default data set (offline) in LLaVA's JSON + image-folder format.

    python scripts/make_embedded_data.py --out data/embedded --seed 0 --num-synthetic 400
    python scripts/prepare_llava_data.py --json data/embedded/captions.json \
        --image-dir data/embedded/images --out data/embedded/shards/stage1 --template plain

Synthetic shape scenes with per-patch labels (labels.json) plus real captioned images that ship in
scikit-image, scikit-learn and matplotlib; captions.json (stage 1) and instruct.json (stage 2,
multi-turn, with text-only samples). Same seed -> byte-identical files. See nemo_basic/data/embedded.py.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-synthetic", type=int, default=400, help="synthetic scenes (default 400)")
    p.add_argument("--image-size", type=int, default=224, help="scene canvas side in pixels (default 224)")
    p.add_argument("--patch-size", type=int, default=14, help="patch side for the per-patch labels (default 14)")
    p.add_argument("--num-digits", type=int, default=40, help="scikit-learn digits to include (default 40)")
    p.add_argument("--num-text-only", type=int, default=16, help="text-only instruction samples (default 16)")
    p.add_argument("--no-real", action="store_true", help="synthetic scenes only")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from nemo_basic.data.embedded import main_summary, make_embedded_data

    summary = make_embedded_data(
        args.out, seed=args.seed, num_synthetic=args.num_synthetic, image_size=args.image_size,
        patch_size=args.patch_size, num_digits=args.num_digits, num_text_only=args.num_text_only,
        real=not args.no_real, progress=not args.no_progress,
    )
    print(main_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
