#!/usr/bin/env python
"""BASIC's share of a LLaVA-1.5-7B training step in FLOPs and collective bytes: plain arithmetic
from the model's shapes, no weights (``python scripts/bench_basic_step.py --model 7b``, or this file).

Shapes: Vicuna-7B (h = 4096, 32 layers, 32 heads of 128, no grouped K/V, SwiGLU FFN 11008, vocab
32000, untied head); CLIP ViT-L/14-336 (24 layers, width 1024, FFN 4096, 577 tokens, 576 patches
kept); mlp2x_gelu projector 1024 → 4096 → 4096. BASIC: k = L/2 = 16 (METHOD.md), λ's irrelevant.
Recipes (conf/llava15_7b_stage{1,2}.yaml, 8 GPUs): stage 1 micro-batch 16, global 256, S ≈ 640
(576 image + ~64 caption tokens), only the projector trains; stage 2 micro-batch 4, global 128,
S = 2048 (the padded sequence length; ~35 prompt tokens before the image, the rest text), LLM and
projector train. TP = 1, 2, 4 (DP = 8 / TP), sequence parallelism on / off (on needs TP > 1).

Counting (per GPU, per micro-batch, forward + backward):
- FLOPs are 2 × multiply-adds of the matrix products; element-wise work is left out (it is memory
  bound, and small next to the GEMMs for both the model and BASIC). The backward of a trained
  layer costs 2 × its forward (input and weight gradients), of a frozen layer that must pass a
  gradient to its input 1 × (stage 1's LLM), of a frozen layer with nothing to pass to 0 (the
  vision tower). Causal attention counts half the S × S square. The vision tower and projector are
  replicated on every TP rank (model.type=hf), everything in the LLM is split by TP.
- Collective bytes are what one rank sends with ring algorithms: all-reduce 2(n−1)/n × size,
  all-gather / reduce-scatter (n−1)/n × size of the full tensor. NeVA per micro-batch: 2 forward and
  2 backward all-reduces of [S, B, h] bf16 per layer (under SP each an all-gather + reduce-scatter
  pair, the same bytes, plus in stage 2 the re-gather of the two column-parallel inputs for the
  weight gradients), the vocab-parallel embedding and head (one all-reduce each) and cross entropy
  ([S, B] fp32 × 3). Per optimizer step, amortised over its micro-batches: the data-parallel
  gradient reduce-scatter and parameter all-gather of the distributed optimizer (bf16) for the
  trained parameters.
- BASIC "old" is the code before issue 25: L_sds with hi/lo-split 16-bit operands (5 [R × d × N]
  products for a bf16 V), the attention-mass score GEMMs on fp32 copies of q and k (no tensor cores:
  their FLOPs are shown also weighted by H100's bf16-dense / fp32 peak ratio, 989 / 67), and under
  SP an all-gather of the full [S, B, h] hidden state in each layer 1..k. "new": L_sds at 3
  products (bf16 V and table), 16-bit score GEMMs with fp32 output, and (ASSUMED, the fix of issue 25
  item 4 by another change) under SP one all-reduce of the [B, 576, h] fp32 image rows at layer k.
  BASIC's other collectives: the attention mass, [B, S] fp32 all-reduced in each layer 1..k, and
  L_sds's vocab-parallel reductions (~6 floats per row) and its [R, d] fp32 gradient all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass

# LLaVA-1.5-7B
HIDDEN, LAYERS, HEADS, FFN, VOCAB = 4096, 32, 32, 11008, 32000
VIT_LAYERS, VIT_HIDDEN, VIT_FFN, VIT_TOKENS = 24, 1024, 4096, 577
PATCHES = 576
K = LAYERS // 2
GPUS = 8
H100_BF16_OVER_FP32 = 989 / 67  # dense peak TFLOP/s: bf16 tensor cores / fp32 without TF32 (SXM)


@dataclass(frozen=True)
class Stage:
    number: int
    micro_batch: int
    global_batch: int
    seq: int
    prompt: int            # text tokens before the image (they see no image: no mass rows)
    llm_trains: bool


STAGES = {
    1: Stage(1, micro_batch=16, global_batch=256, seq=640, prompt=1, llm_trains=False),
    2: Stage(2, micro_batch=4, global_batch=128, seq=2048, prompt=35, llm_trains=True),
}


def _ring(kind: str, nbytes: float, n: int) -> float:
    if n <= 1:
        return 0.0
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n * nbytes


def neva_step(stage: Stage, tp: int, sp: bool) -> dict:
    """NeVA's own FLOPs and collective bytes, per GPU and micro-batch."""
    b, s, h = stage.micro_batch, stage.seq, HIDDEN
    dense = 2 * s * b * (4 * h * h + 3 * h * FFN)                 # q, k, v, o + SwiGLU
    attn = 2 * 2 * s * s * h * b / 2                               # QKᵀ and PV, causal half
    head = 2 * s * b * h * VOCAB
    bwd = 2.0 if stage.llm_trains else 1.0
    llm = (LAYERS * (dense + attn) + head) * (1 + bwd) / tp
    vit_layer = 2 * VIT_TOKENS * (4 * VIT_HIDDEN ** 2 + 2 * VIT_HIDDEN * VIT_FFN) + 2 * VIT_TOKENS ** 2 * VIT_HIDDEN
    vision = VIT_LAYERS * vit_layer * b                            # frozen, nothing to pass back
    projector = 2 * PATCHES * (VIT_HIDDEN * h + h * h) * b * 2     # forward + weight gradients
    flops = llm + vision + projector

    act = s * b * h * 2                                            # [S, B, h] bf16
    per_layer = 4 * _ring("all_reduce", act, tp)
    if sp and stage.llm_trains:
        per_layer += 2 * _ring("all_gather", act, tp)              # wgrad re-gathers (QKV, FC1)
    tp_bytes = LAYERS * per_layer + 2 * _ring("all_reduce", act, tp) + 3 * _ring("all_reduce", 4 * s * b, tp)
    dp = GPUS // tp
    micro_batches = stage.global_batch // (stage.micro_batch * dp)
    proj_params = VIT_HIDDEN * h + h + h * h + h
    llm_params = (LAYERS * (4 * h * h + 3 * h * FFN + 2 * h) + 2 * VOCAB * h + h) if stage.llm_trains else 0
    trained = proj_params + llm_params / tp
    dp_bytes = (_ring("all_gather", 2 * trained, dp) * 2) / micro_batches  # reduce-scatter + all-gather
    return {"flops": flops, "tp_bytes": tp_bytes, "dp_bytes": dp_bytes, "bytes": tp_bytes + dp_bytes,
            "micro_batches": micro_batches, "dp": dp}


def basic_cost(stage: Stage, tp: int, sp: bool, new: bool) -> dict:
    """BASIC's added FLOPs and collective bytes, per GPU and micro-batch (old or new code)."""
    b, s, h = stage.micro_batch, stage.seq, HIDDEN
    rows = b * PATCHES                                             # every row goes through L_sds
    sds = (3 if new else 5) * 2 * rows * h * VOCAB / tp            # vocab-parallel: N / TP per rank
    text_after = s - stage.prompt - PATCHES                        # text rows that see the image
    mass = K * 2 * b * text_after * PATCHES * h / tp               # [text × image] scores, local heads
    mass_weighted = mass if new else mass * H100_BF16_OVER_FP32
    flops = sds + mass
    mass_bytes = K * _ring("all_reduce", 4 * b * s, tp)
    sds_bytes = _ring("all_reduce", 4 * rows * (6 + h), tp)
    if sp and tp > 1:
        sp_bytes = (_ring("all_reduce", 4 * rows * h, tp) if new
                    else K * _ring("all_gather", s * b * h * 2, tp))
    else:
        sp_bytes = 0.0
    return {"flops": flops, "sds_flops": sds, "mass_flops": mass, "weighted_flops": sds + mass_weighted,
            "bytes": mass_bytes + sds_bytes + sp_bytes, "sp_bytes": sp_bytes,
            "mass_bytes": mass_bytes, "sds_bytes": sds_bytes}


def rows() -> list[dict]:
    out = []
    for number, stage in STAGES.items():
        for tp in (1, 2, 4):
            for sp in ((False,) if tp == 1 else (False, True)):
                base = neva_step(stage, tp, sp)
                old, new = basic_cost(stage, tp, sp, new=False), basic_cost(stage, tp, sp, new=True)
                out.append({"stage": number, "tp": tp, "sp": sp, "neva": base, "old": old, "new": new})
    return out


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:6.2f} %" if whole else "     - "


def report() -> None:
    print("7B FLOP / byte model (LLaVA-1.5-7B shapes, no weights; per GPU and micro-batch, fwd + bwd; "
          "8 GPUs, DP = 8/TP)")
    for number, stage in STAGES.items():
        print(f"  stage {number}: S = {stage.seq}, micro-batch {stage.micro_batch}, global batch {stage.global_batch}, "
              f"{'LLM + projector train' if stage.llm_trains else 'projector trains, LLM frozen'}; k = {K}, "
              f"{PATCHES} image rows, {stage.seq - stage.prompt - PATCHES} text rows after the image")
    print("  ASSUMED (issue 25 item 4, another change): under SP BASIC gathers only the image rows, once, at "
          "layer k (one all-reduce of [B, 576, h] fp32); 'old' is the all-gather of [S, B, h] bf16 in each "
          "layer 1..k.")
    print("  BASIC share = BASIC / NeVA step (FLOPs: GEMMs only; bytes: collectives the rank sends, DP gradient "
          "traffic amortised over the step's micro-batches)")
    header = (f"  {'stage':>5} {'TP':>2} {'SP':>3} | {'NeVA TFLOP':>10} {'old':>8} {'new':>8} {'new/old':>7} "
              f"{'old*':>8} {'new*':>8} | {'NeVA GB':>8} {'old':>8} {'new':>8} {'new/old':>7}")
    print(header)
    for r in rows():
        n, o, w = r["neva"], r["old"], r["new"]
        ratio_b = f"{w['bytes'] / o['bytes']:7.3f}" if o["bytes"] else "      -"
        print(f"  {r['stage']:>5} {r['tp']:>2} {'on' if r['sp'] else 'off':>3} | {n['flops'] / 1e12:10.1f} "
              f"{_pct(o['flops'], n['flops']):>8} {_pct(w['flops'], n['flops']):>8} {w['flops'] / o['flops']:7.3f} "
              f"{_pct(o['weighted_flops'], n['flops']):>8} {_pct(w['weighted_flops'], n['flops']):>8} | "
              f"{n['bytes'] / 1e9:8.2f} {_pct(o['bytes'], n['bytes']):>8} {_pct(w['bytes'], n['bytes']):>8} {ratio_b}")
    print("  (* FLOPs with the attention-mass GEMMs weighted by their speed: fp32 without tensor cores counts "
          f"x{H100_BF16_OVER_FP32:.1f}, H100 bf16 dense / fp32 peak; a time proxy, not a measurement)")
    s1, s2 = STAGES[1], STAGES[2]
    for stage in (s1, s2):
        o, w = basic_cost(stage, 1, False, False), basic_cost(stage, 1, False, True)
        print(f"  stage {stage.number}, TP=1: L_sds {o['sds_flops'] / 1e12:.2f} -> {w['sds_flops'] / 1e12:.2f} TFLOP "
              f"(x{w['sds_flops'] / o['sds_flops']:.2f}), attention mass {w['mass_flops'] / 1e12:.3f} TFLOP "
              f"(fp32 before, 16-bit now)")


if __name__ == "__main__":
    report()
