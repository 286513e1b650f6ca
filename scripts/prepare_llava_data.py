#!/usr/bin/env python
"""Convert LLaVA conversation JSON + an image folder into webdataset shards with Energon metadata.

    python scripts/prepare_llava_data.py --json blip_laion_cc_sbu_558k.json --image-dir LLaVA-Pretrain/images \
        --out data/stage1 --template plain --shard-size 1000 --workers 8
    python scripts/prepare_llava_data.py --json llava_v1_5_mix665k.json --image-dir playground/data \
        --out data/stage2 --template vicuna_v1 --workers 8

Unusable records are skipped, counted by reason and listed in OUT/skipped.jsonl (index, line, id,
reason); --strict stops at the first one instead, naming its file, line, index and id. The output
folder must not hold a prepared set unless --overwrite is given; a killed conversion is continued with
--resume (the set is marked complete only at the very end). See nemo_basic/data/shards.py.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="LLaVA JSON array (or JSON Lines) of records")
    p.add_argument("--image-dir", required=True, help="folder the records' 'image' paths are relative to")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--template", choices=("plain", "vicuna_v1"), default=None,
                   help="check records for this template (plain: one image and one human/gpt pair)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--workers", type=int, default=4, help="threads reading and validating images (default 4)")
    p.add_argument("--strict", action="store_true", help="stop at the first unusable record")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared set already in --out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted conversion into --out (same "
                   "input and settings) without redoing its finished shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from nemo_basic.data.llava_json import RecordError
    from nemo_basic.data.shards import OutputExistsError, prepare_llava_data

    try:
        summary = prepare_llava_data(
            args.json, args.image_dir, args.out, template=args.template, shard_size=args.shard_size,
            workers=args.workers, strict=args.strict, overwrite=args.overwrite, progress=not args.no_progress,
            resume=args.resume,
        )
    except (OutputExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RecordError as e:
        print(f"error (--strict): {e}", file=sys.stderr)
        return 1
    print(summary.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
