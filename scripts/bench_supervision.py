#!/usr/bin/env python
"""Benchmark of the BASIC supervision kernels against naive full-matrix versions (CPU or GPU-less).

  python scripts/bench_supervision.py           # paper sizes: m=576, d=4096, N=32000, batch 4; S=2048, H=32
  python scripts/bench_supervision.py --small   # a quick run with small sizes

(1) L_sds (eq. 7), forward + backward: the chunked vocab-parallel KL of nemo_basic.supervision vs
    plain autograd over the full [B·m, N] logits.
(2) Text→image attention mass (eq. 5), one layer: from the fused kernel's lse, and with the lse
    recomputed, vs an eager [B, H, S, S] softmax.
(3) Old vs new (issue 25) in bf16 (a bf16 V and table, as bf16 training has them):
    L_sds with the hi/lo-split operands of before (kept here, `old_sds()`, only for this
    comparison) vs the three 16-bit products of now: GEMM FLOPs counted by torch.utils.flop_counter
    on meta tensors (the CUDA branch, mm(out_dtype=float32)), CPU time (the CPU emulation: the same
    operands upcast, fp32 GEMMs), peak memory, and how far the new loss and gradient are from the
    old ones (which are float64-exact to ~1e-6). The attention mass with q, k upcast to fp32 before
    the score GEMMs (old) vs 16-bit operands with fp32 output (new): the same FLOPs, half the operand
    bytes; on this CPU the emulation runs the same fp32 arithmetic, so only a GPU shows the gain.

How memory is measured: torch's CPU allocator keeps no peak statistics and tracemalloc does not see
it, so every variant runs in a fresh subprocess that (1) builds its inputs, (2) hands freed heap
pages back to the OS (malloc_trim) and resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs), (3) records VmRSS, runs the variant once and reads VmHWM. VmHWM − VmRSS is
the variant's own peak working memory on top of its inputs, as the kernel counts resident pages.

How time is measured: the variants being compared run in one subprocess, alternately (A B A B ...)
after one warm-up each, and each reports its best run. Alternating and taking the minimum keeps
the ratio fair when other processes share the cores (the load average is printed alongside).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    "full": dict(batch=4, m=576, d=4096, vocab=32000, seq=2048, heads=32, head_dim=128, prompt=35, reps=3),
    "small": dict(batch=2, m=144, d=1024, vocab=8000, seq=512, heads=8, head_dim=64, prompt=10, reps=5),
}


# ---- memory probes (Linux) -------------------------------------------------------------------

def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1024


def _reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages so VmRSS is the live set
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def peak_memory_mb(fn: Callable[[], None]) -> float:
    """Resident memory the first call of fn needs on top of what is live before it."""
    _reset_peak()
    base = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - base


def best_times(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Best wall time of each fn over reps runs, the fns alternating, after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


# ---- variants --------------------------------------------------------------------------------

def kl_inputs(s: dict):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(s["batch"], s["m"], s["d"], generator=g)
    v_hat = torch.randn(s["batch"], s["m"], s["d"], generator=g)
    embedding = torch.randn(s["vocab"], s["d"], generator=g).mul_(0.02)
    a = torch.rand(s["batch"], s["m"], generator=g)
    a /= a.sum(1, keepdim=True)
    return v, v_hat, embedding, a


def naive_kl_step(v, v_hat, embedding, a) -> None:
    """The straightforward autograd version: full [B·m, N] logits for V and V̂."""
    x = v.detach().requires_grad_(True)
    log_q = torch.log_softmax(x @ embedding.T, dim=-1)
    log_p = torch.log_softmax(v_hat @ embedding.T, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    (kl * a).sum(-1).mean().backward()


def fused_kl_step(v, v_hat, embedding, a) -> None:
    from nemo_basic.supervision import semantic_distribution_loss

    x = v.detach().requires_grad_(True)
    semantic_distribution_loss(x, v_hat, embedding, a).backward()


@contextlib.contextmanager
def old_sds():
    """L_sds as before issue 25: with a 16-bit table every fp32 operand split into 16-bit hi + lo
    parts (forward x, t − x; backward q − p), 5 [R × d × N] products for a bf16 V, 6 for fp32.
    For the comparison only; the library computes the three products of the floor."""
    from nemo_basic.supervision import losses

    def hi_lo(lowp, table_dtype, dtype):
        split = (lambda y: losses._split(y, table_dtype)) if lowp else (lambda y: [y.to(dtype)])
        return split, split

    new = losses._operands
    losses._operands = hi_lo
    try:
        yield
    finally:
        losses._operands = new


@contextlib.contextmanager
def old_mass():
    """The attention mass as before issue 25: q and k upcast to fp32 before the score GEMMs."""
    from nemo_basic.supervision import attention_mass

    new = attention_mass._operand
    attention_mass._operand = lambda x: x.float()
    try:
        yield
    finally:
        attention_mass._operand = new


def kl_bf16_inputs(s: dict):
    v, v_hat, embedding, a = kl_inputs(s)
    return v.bfloat16(), v_hat, embedding.bfloat16(), a  # V̂ stays fp32, as eq. 4 builds it


def kl_bf16_old_step(*inputs) -> None:
    with old_sds():
        fused_kl_step(*inputs)


def sds_gemm_flops(s: dict, old: bool) -> int:
    """GEMM FLOPs of one L_sds forward + backward with a bf16 V and table, counted by
    torch.utils.flop_counter on meta tensors (no data: the CUDA branch's mm(out_dtype=float32))."""
    from torch.utils.flop_counter import FlopCounterMode

    from nemo_basic.supervision import semantic_distribution_loss

    meta = torch.device("meta")
    v = torch.empty(s["batch"], s["m"], s["d"], device=meta, dtype=torch.bfloat16, requires_grad=True)
    v_hat = torch.empty(s["batch"], s["m"], s["d"], device=meta)
    embedding = torch.empty(s["vocab"], s["d"], device=meta, dtype=torch.bfloat16)
    a = torch.empty(s["batch"], s["m"], device=meta)
    from nemo_basic.supervision.losses import _out_dtype_supported

    _out_dtype_supported(meta, "mm")  # its one-off probe (a 2 x 2 product) stays out of the count
    with (old_sds() if old else contextlib.nullcontext()), FlopCounterMode(display=False) as counter:
        semantic_distribution_loss(v, v_hat, embedding, a).backward()
    return counter.get_flop_counts()["Global"].get(torch.ops.aten.mm, 0)


def sds_old_vs_new(s: dict, device: str = "cpu") -> dict:
    """New L_sds's loss and gradient against the old one's (float64-exact to ~1e-6) on one input."""
    from nemo_basic.supervision import semantic_distribution_loss

    v, v_hat, embedding, a = (t.to(device) for t in kl_bf16_inputs(s))
    out = {}
    for name, ctx in (("old", old_sds), ("new", contextlib.nullcontext)):
        x = v.detach().clone().requires_grad_(True)
        with ctx():
            loss = semantic_distribution_loss(x, v_hat, embedding, a)
        loss.backward()
        out[name] = (loss.detach().double(), x.grad.double())
    (lo, go), (ln, gn) = out["old"], out["new"]
    return {"loss_rel": float((ln - lo).abs() / lo.abs()), "grad_rel_norm": float((gn - go).norm() / go.norm())}


def old_vs_new_timed(shape: dict, device: str, timer: Callable[[Callable[[], None]], float]) -> dict:
    """On `device` (the GPU self-test's proxy check): L_sds forward + backward with a bf16 V and
    table, and one layer's attention mass from the lse with bf16 q, k (bench sizes "full": S = 2048,
    H = 32, D = 128), old vs new, timed by `timer` (seconds of one call); and new vs old accuracy."""
    kl = [t.to(device) for t in kl_bf16_inputs(shape)]
    attn = [t.to(device) for t in attention_bf16_inputs(SIZES["full"])]
    out = {key: timer(lambda fn=fn, args=args: fn(*args)) for key, fn, args in (
        ("sds_old_s", kl_bf16_old_step, kl), ("sds_new_s", fused_kl_step, kl),
        ("mass_old_s", lse_mass_old, attn), ("mass_new_s", lse_mass, attn))}
    out["sds_new_over_old"] = out["sds_new_s"] / out["sds_old_s"]
    out["mass_new_over_old"] = out["mass_new_s"] / out["mass_old_s"]
    out.update(sds_old_vs_new(shape, device))
    return out


def attention_inputs(s: dict):
    """One sample: a system prompt, the m image patches, then text to the end of the sequence."""
    g = torch.Generator().manual_seed(1)
    seq, heads, dim = s["seq"], s["heads"], s["head_dim"]
    q = torch.randn(1, heads, seq, dim, generator=g)
    k = torch.randn(1, heads, seq, dim, generator=g)
    image = torch.zeros(1, seq, dtype=torch.bool)
    image[0, s["prompt"]:s["prompt"] + s["m"]] = True
    text = ~image
    # The lse comes for free with the model's own fused attention; it is not part of the timing.
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, torch.randn_like(k), dropout_p=0.0, is_causal=True, scale=1 / math.sqrt(dim))
    return q, k, text, image, lse


def eager_mass(q, k, text, image, lse) -> None:
    """Full [B, H, S, S] causal softmax, head mean, sum of the text rows, image columns kept."""
    seq = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores.masked_fill_(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.softmax(-1).mean(1)
    (probs * text[:, :, None]).sum(1) * image


def lse_mass(q, k, text, image, lse) -> None:
    from nemo_basic.supervision import text_to_image_attention

    text_to_image_attention(q, k, text, image, lse=lse)


def recompute_mass(q, k, text, image, lse) -> None:
    from nemo_basic.supervision import text_to_image_attention

    text_to_image_attention(q, k, text, image)


def attention_bf16_inputs(s: dict):
    q, k, text, image, lse = attention_inputs(s)
    return q.bfloat16(), k.bfloat16(), text, image, lse


def lse_mass_old(*inputs) -> None:
    with old_mass():
        lse_mass(*inputs)


VARIANTS = {
    "kl_naive": (kl_inputs, naive_kl_step),
    "kl_fused": (kl_inputs, fused_kl_step),
    "mass_eager": (attention_inputs, eager_mass),
    "mass_lse": (attention_inputs, lse_mass),
    "mass_recompute": (attention_inputs, recompute_mass),
    "kl_bf16_old": (kl_bf16_inputs, kl_bf16_old_step),
    "kl_bf16_new": (kl_bf16_inputs, fused_kl_step),
    "mass_bf16_old": (attention_bf16_inputs, lse_mass_old),
    "mass_bf16_new": (attention_bf16_inputs, lse_mass),
}
GROUPS = {"kl": ["kl_naive", "kl_fused"], "mass": ["mass_eager", "mass_lse", "mass_recompute"],
          "kl_bf16": ["kl_bf16_old", "kl_bf16_new"], "mass_bf16": ["mass_bf16_old", "mass_bf16_new"]}


def run_worker(task: str, size: str) -> None:
    """``memory:<variant>`` or ``time:<group>``; prints one JSON line."""
    import nemo_basic.supervision  # noqa: F401  (import cost stays out of the measurement)

    s = SIZES[size]
    kind, name = task.split(":")
    if kind == "accuracy":
        print(json.dumps(sds_old_vs_new(s)))
        return
    if kind == "memory":
        make, step = VARIANTS[name]
        inputs = make(s)
        print(json.dumps({name: peak_memory_mb(lambda: step(*inputs))}))
        return
    inputs = VARIANTS[GROUPS[name][0]][0](s)  # the variants of a group share their inputs
    fns = {v: (lambda step=VARIANTS[v][1]: step(*inputs)) for v in GROUPS[name]}
    print(json.dumps(best_times(fns, s["reps"])))


def run_worker_process(task: str, size: str) -> dict:
    # A fixed mmap threshold turns off glibc's adaptive one: every block above 128 KiB is mmapped
    # and unmapped on free, so resident memory follows the live tensors instead of depending on
    # which freed blocks malloc happened to keep (which made repeated runs differ by ~50 %).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, __file__, "--worker", task, "--size", size],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_group(group: str, size: str) -> dict[str, dict[str, float]]:
    peak: dict[str, float] = {}
    for variant in GROUPS[group]:
        peak.update(run_worker_process(f"memory:{variant}", size))
    best = run_worker_process(f"time:{group}", size)
    return {v: {"time_s": best[v], "peak_mb": peak[v]} for v in GROUPS[group]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small sizes for a quick run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.size)
        return
    size = "small" if args.small else "full"
    s = SIZES[size]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sizes: {size} {s}")
    print(f"load average at start: {os.getloadavg()}")

    kl = measure_group("kl", size)
    naive, fused = kl["kl_naive"], kl["kl_fused"]
    rows = s["batch"] * s["m"]
    print(f"\n(1) L_sds forward+backward, B·m={rows}, d={s['d']}, N={s['vocab']} (fp32)")
    print(f"  naive full logits : {naive['time_s']:8.3f} s  peak {naive['peak_mb']:8.1f} MB")
    print(f"  chunked fused KL  : {fused['time_s']:8.3f} s  peak {fused['peak_mb']:8.1f} MB")
    print(f"  fused/naive       : time x{fused['time_s'] / naive['time_s']:.2f}  "
          f"peak memory x{fused['peak_mb'] / naive['peak_mb']:.3f}  (goal: time <= 1.2, memory <= 0.25)")

    mass = measure_group("mass", size)
    eager, with_lse, recompute = mass["mass_eager"], mass["mass_lse"], mass["mass_recompute"]
    print(f"\n(2) text->image attention mass, one layer, S={s['seq']}, H={s['heads']}, D={s['head_dim']}, "
          f"m={s['m']} image positions, {s['seq'] - s['m']} text")
    for label, r in (("eager S x S softmax", eager), ("from kernel lse", with_lse), ("lse recomputed", recompute)):
        print(f"  {label:20s}: {r['time_s']:8.3f} s  peak {r['peak_mb']:8.1f} MB"
              f"  (x{r['time_s'] / eager['time_s']:.3f} time, x{r['peak_mb'] / eager['peak_mb']:.3f} memory)")
    print(f"\n(3) old vs new (issue 25), bf16 V and table (V̂ fp32), B·m={rows}, d={s['d']}, N={s['vocab']}")
    flops = {old: sds_gemm_flops(s, old) for old in (True, False)}
    floor = 3 * 2 * rows * s["d"] * s["vocab"]
    kl16 = measure_group("kl_bf16", size)
    acc = run_worker_process("accuracy:kl_bf16", size)
    old, new = kl16["kl_bf16_old"], kl16["kl_bf16_new"]
    print(f"  L_sds GEMM FLOPs (flop_counter): old {flops[True] / 1e12:.3f} T (x{flops[True] / floor:.3f} the floor "
          f"of three products), new {flops[False] / 1e12:.3f} T (x{flops[False] / floor:.3f}); new/old "
          f"x{flops[False] / flops[True]:.3f}")
    print(f"  L_sds CPU time (emulated 16-bit GEMMs): old {old['time_s']:.3f} s, new {new['time_s']:.3f} s, new/old "
          f"x{new['time_s'] / old['time_s']:.3f}; peak old {old['peak_mb']:.1f} MB, new {new['peak_mb']:.1f} MB "
          f"(x{new['peak_mb'] / old['peak_mb']:.3f})")
    print(f"  new vs old (float64-exact to ~1e-6): loss {acc['loss_rel']:.2e} relative, gradient "
          f"{acc['grad_rel_norm']:.2e} of its norm (bf16 unit roundoff 3.9e-3)")
    m16 = measure_group("mass_bf16", size)
    mo, mn = m16["mass_bf16_old"], m16["mass_bf16_new"]
    print(f"  attention mass from the lse, bf16 q, k: old (fp32 copies) {mo['time_s']:.3f} s, new (16-bit operands, "
          f"fp32 output) {mn['time_s']:.3f} s, new/old x{mn['time_s'] / mo['time_s']:.3f} on this CPU (same "
          f"emulated arithmetic); peak x{mn['peak_mb'] / mo['peak_mb']:.3f}; GEMM operand bytes x0.5 on a GPU")
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
