"""Run a study protocol: every arm x seed, stage 1 then stage 2, held-out evaluation after each,
one JSON per finished run (a rerun continues where it stopped), then the report."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import List, Optional, Sequence

from study.protocol import PRESETS, Protocol, arm_basic, arm_init_jitter


def say(msg: str) -> None:
    print(f"[ab_study] {msg}", flush=True)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # a killed run leaves no half-written result


def check_protocol(out: str, protocol: Protocol) -> None:
    """A results folder belongs to one protocol: refuse to mix runs of two. The arms, seeds and
    preset name may differ (a run is defined by the settings, so the `full` preset's llava and
    basic runs are runs of the `ablations` preset too); every other setting must be equal."""
    path = os.path.join(out, "protocol.json")
    mine = protocol.to_dict()
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        theirs.pop("measured", None)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and k not in ("name", "arms", "seeds"))
        if diff:
            raise SystemExit(f"error: {path} was written by another protocol (differs in {', '.join(diff)}); "
                             f"use another --out or delete the folder")


def run_study(protocol: Protocol, out: str, report: bool = True) -> str:
    import torch

    from nemo_basic.data.datamodule import SampleEncoder
    from study import engine as E
    from study.data import StudyData
    from study.evaluate import Evaluator

    protocol.validate()
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    check_protocol(out, protocol)
    todo = [(arm, seed) for seed in protocol.seeds for arm in protocol.arms
            if not os.path.exists(os.path.join(out, "runs", f"{arm}-seed{seed}.json"))]
    say(f"protocol {protocol.name}: arms {protocol.arms}, seeds {protocol.seeds}; {len(todo)} run(s) to do, "
        f"results in {out}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    built = E.build(protocol.image_size, protocol.seq_length)
    k = built.mcore.capture.k
    enc = {1: SampleEncoder(built.tokenizer, built.processor, template="plain", seq_length=protocol.seq_length,
                            img_seq_len=built.img_seq_len),
           2: SampleEncoder(built.tokenizer, built.processor, template="vicuna_v1", seq_length=protocol.seq_length,
                            img_seq_len=built.img_seq_len)}
    data = StudyData(protocol, enc)
    items = data.eval_items()
    share = data.object_patch_share()
    meta = dict(protocol.to_dict(), measured={
        "k": k, "img_seq_len": built.img_seq_len, "object_patch_share_mean": share,
        "held_out_questions": {kind: sum(kind in it["questions"] for it in items)
                               for kind in ("color", "shape", "count", "position")},
        "torch_threads": torch.get_num_threads(), "build_seconds": time.time() - t0})
    _write_json(os.path.join(out, "protocol.json"), meta)
    say(f"model built in {time.time() - t0:.0f} s (k = {k}, {built.img_seq_len} image tokens); an object covers "
        f"{100 * share:.1f} % of an image's patches on average")
    evaluator = Evaluator(built, items, protocol)
    done_times: List[float] = []
    for n, (arm, seed) in enumerate(todo, start=1):
        t_run = time.time()
        E.set_basic(built, arm_basic(arm))
        E.reset(built, seed, jitter=arm_init_jitter(arm))
        torch.manual_seed(seed)
        tag = f"{arm}-seed{seed}"
        result = {"arm": arm, "seed": seed, "curves": {}, "metrics": {}, "lens_pictures": {}, "qa_answers": None}
        for stage, steps, lr in ((1, protocol.stage1_steps, protocol.stage1_lr),
                                 (2, protocol.stage2_steps, protocol.stage2_lr)):
            warmup = math.ceil(protocol.warmup_ratio * steps)

            def log(row, stage=stage, steps=steps):
                aux = "" if row["das"] is None and row["sds"] is None else \
                    f" das {row['das'] if row['das'] is not None else float('nan'):.4f} " \
                    f"sds {row['sds'] if row['sds'] is not None else float('nan'):.4f}"
                say(f"{tag} stage {stage} step {row['step']}/{steps}: lm {row['lm']:.4f}{aux} "
                    f"({row['seconds']:.1f} s)")

            result["curves"][f"stage{stage}"] = E.train_stage(built, stage, data.batches(seed, stage, steps), steps,
                                                              lr, warmup, log=log)
            t_eval = time.time()
            metrics = evaluator.run(stage, k, os.path.join(out, "pictures"), tag)
            result["lens_pictures"][f"stage{stage}"] = [os.path.relpath(p, out) for p in metrics.pop("_pictures")]
            answers = metrics.pop("_answers", None)
            if answers is not None:
                result["qa_answers"] = answers
            result["metrics"][f"stage{stage}"] = metrics
            qa = metrics.get("qa", {}).get("all")
            say(f"{tag} stage {stage} held-out: caption CE {metrics['caption_ce']:.4f}, cos(V, V̂) "
                f"{metrics['cos_v_vhat']:.3f}, grounded@0 {metrics['lens']['0']['grounded']}"
                + (f", QA {qa:.3f}" if qa is not None else "") + f" ({time.time() - t_eval:.0f} s)")
        result["seconds"] = time.time() - t_run
        _write_json(os.path.join(out, "runs", f"{tag}.json"), result)
        done_times.append(result["seconds"])
        left = (len(todo) - n) * sum(done_times) / len(done_times)
        say(f"run {n}/{len(todo)} ({tag}) done in {result['seconds'] / 60:.1f} min; about {left / 60:.0f} min left")
    say(f"all runs done in {(time.time() - t0) / 60:.1f} min")
    if not report:
        return out
    from study.report import write_report

    path = write_report(out)
    say(f"report: {path}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="The A/B study of BASIC against LLaVA (docs/ab_study.md).")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick preset (<= 10 min on 2 cores: 1 seed, 2 arms)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="full", help="the protocol preset (default: full)")
    ap.add_argument("--out", default=None, help="results folder (default: ab_study/<preset>)")
    ap.add_argument("--arms", default=None, help="comma-separated arms (default: the preset's)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    ap.add_argument("--report-only", action="store_true", help="only (re)write the report of --out")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else args.preset
    protocol = dataclasses.replace(PRESETS[name])
    try:
        if args.arms:
            protocol.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        if args.seeds:
            protocol.seeds = [int(s) for s in args.seeds.split(",")]
        protocol.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("ab_study", name)
    if args.report_only:
        from study.report import main as report_main

        return report_main([out])
    run_study(protocol, out)
    return 0
