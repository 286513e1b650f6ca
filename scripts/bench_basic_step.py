#!/usr/bin/env python
"""Step time and peak memory of one NeVA training step (forward + backward) with BASIC on vs off.

  python scripts/bench_basic_step.py            # 7B-shaped CPU proxy, stage 1 and stage 2 freezing
  python scripts/bench_basic_step.py --quick    # small sizes, a smoke run of a minute or two
  python scripts/bench_basic_step.py --stages 1 # one freezing regime only
  python scripts/bench_basic_step.py --flops-only  # the FLOP counts only (no timing: a shared machine)
  python scripts/bench_basic_step.py --model 7b # LLaVA-1.5-7B FLOP / collective-byte model, no weights
                                                # (scripts/flops_7b.py), old vs new (issue 25)

The proxy keeps the ratios that set BASIC's cost (METHOD.md, "Expected cost"). For Vicuna-7B,
L_sds costs 3·m·d·N multiply-adds against a step of ≈ 3·L·12·S·d², i.e. ∝ N / (L·d):
32000 / (32·4096) = 0.244; here 2000 / (8·1024) = 0.244. Also kept: m = 576 image tokens, 64
text tokens (8 before the image, 56 after: S = 640), k = L/2 = 4, 16 heads of 64, a Llama-style
decoder (RMSNorm, SwiGLU with ffn = 2.6875·d as Llama's 11008 for 4096, no biases, RoPE, untied
output head), micro-batch 1, fp32. The vision encoder is a cheap 2-layer ViT (hidden 64) on 96×96
images with 4×4 patches (576 patches, class token dropped), identical in every variant; the
projector is mlp2x_gelu 64 → 1024 → 1024. The LM loss covers the 56 caption tokens.

Variants (the same weights in all; a "step" is forward + backward of the loss, no optimizer):
  off        BasicConfig(enabled=False): exactly NeVA.
  on         BasicConfig(layers=k): L_das + L_sds, attention supervision degree.
  equal      on, degree=equal: no attention mass.
  equal_das  on, degree=equal, sds off: target capture + L_das only.
  off_lse    off, but layers 1..k run the log-sum-exp core attention that BASIC installs
             (capture.attach_lse_attention, the mass discarded): isolates the change of attention
             kernel from BASIC's own work. On this CPU proxy the model's own core attention is
             Megatron's local (eager S×S softmax) one, so `off` and `on` differ by a kernel too;
             on/off_lse is BASIC's own cost. (The report says which variants ran the lse kernel.)
Stage 1 freezes the vision encoder and the LLM (only the projector trains, so the LLM's weight
gradients are never computed); stage 2 freezes only the vision encoder.

Measurement (the helpers of scripts/bench_supervision.py): time = best of N alternating runs of
all variants in one process after warm-up (best_times), with each run's process CPU time and the
median wall time beside it (CPU time does not grow while a run waits for a shared core), and the
ratio on/off_lse taken within each alternation round (median and quartiles over the rounds: the
machine's drift cancels between neighbours in time, and the spread shows the noise); memory =
the step's own peak working memory (VmHWM − VmRSS before the step, after malloc_trim and a reset
of the peak counter) in a fresh process per variant, gradients of a previous step dropped first
(so in stage 2 the parameter gradients count in the peak). Then, in another process: BASIC's
pieces timed in place inside `on` steps (timers wrapped around its functions, best of a few
steps), and torch.profiler op tables (grouped by op and input shapes, min self CPU time over the
profiled steps): the ops `on` runs more often than `off_lse` are BASIC's own, attributed by exact
call counts rather than by differences of noisy times; off vs off_lse shows the kernel swap.
FLOPs: torch.utils.flop_counter over one `off_lse` and one `on` step (the proxy runs fp32, where
L_sds is three plain products), and L_sds's GEMMs with a bf16 V and table (bf16 training) counted
on meta tensors for the old hi/lo-split operands and the new 16-bit ones (issue 25), giving BASIC's
FLOP share of the step old vs new.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_supervision import best_times, peak_memory_mb  # noqa: E402

SIZES = {
    "full": dict(hidden=1024, layers=8, heads=16, ffn=2752, vocab=2000, img=96, patch=4, vit_hidden=64,
                 vit_layers=2, prompt=8, text=56, k=4, mbs=1, reps=10, profile_steps=2, component_steps=3),
    "quick": dict(hidden=256, layers=4, heads=4, ffn=688, vocab=500, img=32, patch=4, vit_hidden=32,
                  vit_layers=2, prompt=4, text=20, k=2, mbs=1, reps=3, profile_steps=2, component_steps=2),
}
VARIANTS = ("off", "on", "equal", "equal_das", "off_lse")


# ---- model and batch -------------------------------------------------------------------------

class _Tokenizer:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


def basic_config(variant: str, k: int):
    from nemo_basic.models.basic_config import BasicConfig

    return {
        "off": BasicConfig(enabled=False),
        "off_lse": BasicConfig(enabled=False),
        "on": BasicConfig(layers=k),
        "equal": BasicConfig(layers=k, degree="equal"),
        "equal_das": BasicConfig(layers=k, degree="equal", sds=False),
    }[variant]


def neva_config(s: dict, basic, stage: int):
    """The proxy's BasicNevaConfig, built as nemo_basic.testing.tiny_neva builds the tiny one."""
    import torch.nn.functional as F
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig
    from nemo.collections import llm
    from nemo.collections.vlm.vision.base import CLIPViTConfig, MultimodalProjectorConfig

    from nemo_basic.models.neva import BasicNevaConfig
    from nemo_basic.models.specs import language_layer_spec, vision_layer_spec
    from nemo_basic.testing.tiny_neva import _CPU_FRIENDLY

    image_tokens = (s["img"] // s["patch"]) ** 2
    seq = s["prompt"] + image_tokens + s["text"]
    language = llm.GPTConfig(
        num_layers=s["layers"], hidden_size=s["hidden"], ffn_hidden_size=s["ffn"],
        num_attention_heads=s["heads"], kv_channels=s["hidden"] // s["heads"], seq_length=seq,
        vocab_size=s["vocab"], make_vocab_size_divisible_by=128, position_embedding_type="rope",
        apply_rope_fusion=False, share_embeddings_and_output_weights=False, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        transformer_layer_spec=language_layer_spec(normalization="RMSNorm"), **_CPU_FRIENDLY)
    vision = CLIPViTConfig(
        num_layers=s["vit_layers"], hidden_size=s["vit_hidden"], ffn_hidden_size=4 * s["vit_hidden"],
        num_attention_heads=2, kv_channels=s["vit_hidden"] // 2, num_query_groups=2, img_h=s["img"],
        img_w=s["img"], patch_dim=s["patch"], ln_pre_impl=WrappedTorchNorm, ln_post_impl=WrappedTorchNorm,
        transformer_layer_spec=vision_layer_spec(), **_CPU_FRIENDLY)
    TransformerConfig.__post_init__(vision)  # as tiny_neva: CLIPViTConfig skips the base initialiser
    projector = MultimodalProjectorConfig(projector_type="mlp2x_gelu", input_size=s["vit_hidden"],
                                          hidden_size=s["hidden"], ffn_hidden_size=s["hidden"])
    config = BasicNevaConfig(
        language_transformer_config=language, vision_transformer_config=vision,
        vision_projection_config=projector, vision_feature_layer=-1, batch_p2p_sync=False,
        freeze_vision_model=True, freeze_language_model=(stage == 1), basic=basic)
    return config


def build(s: dict, variant: str, stage: int, seed: int = 1234):
    from nemo_basic.models.capture import attach_lse_attention
    from nemo_basic.testing import tiny

    torch.manual_seed(seed)
    tiny.init_parallel(1, 1, seed)  # re-seeds Megatron's RNG tracker: the same weights every build
    model = neva_config(s, basic_config(variant, s["k"]), stage).configure_model(_Tokenizer(s["vocab"]))
    if variant == "off_lse":
        for layer in model.language_model.decoder.layers:
            if layer.layer_number <= s["k"]:
                attach_lse_attention(layer.self_attention.core_attention, _KernelOnly(), layer.layer_number)
    return model


class _KernelOnly:
    """A capture stand-in: asks for the log-sum-exp attention of every layer and drops the mass."""

    active = True

    def wants_attention(self, layer_number: int) -> bool:
        return True

    def uses_attention_mass(self, layer_number: int, **kwargs) -> bool:  # run the lse kernel here
        return True

    def record_attention(self, *args, **kwargs) -> None:
        pass


def make_batch(s: dict, seed: int = 0) -> dict:
    """One image placeholder after a short prompt, caption text after it; LM loss on the caption."""
    g = torch.Generator().manual_seed(seed)
    b, t = s["mbs"], s["prompt"] + 1 + s["text"]
    ids = torch.randint(1, s["vocab"], (b, t), generator=g)
    ids[:, s["prompt"]] = -200
    loss_mask = torch.zeros(b, t)
    loss_mask[:, s["prompt"] + 1:] = 1.0
    return dict(input_ids=ids, position_ids=None, loss_mask=loss_mask,
                labels=torch.randint(1, s["vocab"], (b, t), generator=g),
                images=torch.randn(b, 3, s["img"], s["img"], generator=g),
                num_image_tiles=torch.ones(b, dtype=torch.int))


def train_step(model, batch: dict) -> None:
    for p in model.parameters():
        p.grad = None
    out, mask = model(**batch)
    ((out * mask).sum() / mask.sum()).backward()


def setup(size: str) -> dict:
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator, init_num_microbatches_calculator)

    from nemo_basic.testing import tiny_neva  # noqa: F401  (applies the NeMo CPU backend first)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    s = SIZES[size]
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(0, None, s["mbs"], s["mbs"], 1)  # one micro-batch per step
    return s


def _free_port() -> int:
    from nemo_basic.testing import free_port

    return free_port()


def build_all(s: dict, stage: int, variants) -> dict:
    from megatron.core import parallel_state as ps

    models, state = {}, None
    for v in variants:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        model = build(s, v, stage)
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state, strict=True)  # same weights, whatever the init order
        models[v] = model
    return models


# ---- workers (one per subprocess) -----------------------------------------------------------------

def worker_memory(size: str, stage: int, variant: str) -> dict:
    s = setup(size)
    model = build(s, variant, stage)
    batch = make_batch(s)
    train_step(model, batch)  # warm-up: lazily built buffers (rope cache, masks) are not the step's
    for p in model.parameters():
        p.grad = None
    peak = peak_memory_mb(lambda: train_step(model, batch))
    return {variant: peak}


def worker_time(size: str, stage: int, reps: int) -> dict:
    s = setup(size)
    models = build_all(s, stage, VARIANTS)
    batch = make_batch(s)
    # Besides wall time (best_times), each run's process CPU time: with other jobs on the cores a
    # run waits for a core without accruing CPU time, so its minimum is steadier than the wall
    # time's (both reported; the OpenMP workers of libgomp stop spinning when oversubscribed).
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def step_fn(v):
        def run():
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(models[v], batch)
            cpu[v].append(time.process_time() - start_cpu)
            wall[v].append(time.perf_counter() - start)
        return run

    fns = {v: step_fn(v) for v in VARIANTS}
    # Which variants run BASIC's log-sum-exp attention kernel (counted in one extra step each).
    from nemo_basic.models import capture as capture_mod

    calls = defaultdict(int)
    original = capture_mod.sdpa_with_lse

    def counted(*args, **kwargs):
        calls[current] += 1
        return original(*args, **kwargs)

    capture_mod.sdpa_with_lse = counted
    for current in VARIANTS:
        fns[current]()
    capture_mod.sdpa_with_lse = original
    for v in VARIANTS:
        cpu[v].clear()
        wall[v].clear()
    best = best_times(fns, reps)

    def paired(num: str, den: str) -> list[float]:
        # Ratio of the two variants' runs within each alternation round (run 0 is the warm-up):
        # neighbours in time share the machine's state, so its drift cancels in each ratio.
        ratios = sorted(n / d for n, d in zip(wall[num][1:], wall[den][1:]))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        return [quartiles[0], statistics.median(ratios), quartiles[-1]]

    return {"time": best, "cpu": {v: min(cpu[v]) for v in VARIANTS},
            "median": {v: statistics.median(wall[v][1:]) for v in VARIANTS},
            "paired": {"on/off": paired("on", "off"), "on/off_lse": paired("on", "off_lse")},
            "lse_kernel_layers": {v: calls[v] for v in VARIANTS}, "load": os.getloadavg()}


def _wrap_timer(owner, name: str, totals: dict, label: str) -> None:
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    setattr(owner, name, timed)


def worker_breakdown(size: str, stage: int) -> dict:
    """Direct timing of BASIC's pieces inside `on` steps, and a profiler diff of on vs off."""
    from torch.profiler import ProfilerActivity, profile

    from nemo_basic import supervision
    from nemo_basic.models import capture as capture_mod
    from nemo_basic.models import neva as neva_mod

    s = setup(size)
    models = build_all(s, stage, ("off", "off_lse", "on"))
    batch = make_batch(s)
    for _ in range(2):  # the first steps of a process pay one-time costs (oneDNN primitives, caches)
        for m in models.values():
            train_step(m, batch)

    # (1) BASIC's own forward-side pieces, timed in place. Layer k's hook includes the losses, so
    # "target capture" is the hook time minus the loss time. L_sds's backward is computed inside
    # its forward (the chunked KL keeps grad (q − p)E), so its row here is forward + backward.
    totals: dict[str, float] = defaultdict(float)
    _wrap_timer(neva_mod.BasicMCoreNevaModel, "placement_masks", totals, "placement masks (vectorised from the token ids)")
    _wrap_timer(supervision, "text_to_image_attention", totals, "attention mass [text x image] (eq. 5), k layers")
    _wrap_timer(supervision, "supervision_degree", totals, "supervision degree normalisation")
    _wrap_timer(supervision, "directional_alignment_loss", totals, "L_das forward (eq. 6)")
    _wrap_timer(supervision, "semantic_distribution_loss", totals, "L_sds forward+grad (eq. 7, chunked KL)")
    _wrap_timer(capture_mod.SupervisionCapture, "after_layer", totals, "_hooks")
    _wrap_timer(capture_mod, "sdpa_with_lse", totals, "lse attention kernel, layers 1..k (fwd)")
    per_step: list[dict] = []
    step_times = []
    for _ in range(s["component_steps"]):
        totals.clear()
        start = time.perf_counter()
        train_step(models["on"], batch)
        step_times.append(time.perf_counter() - start)
        per_step.append(dict(totals))
    components = {key: min(d.get(key, 0.0) for d in per_step) for key in per_step[0]}
    hooks = components.pop("_hooks")
    losses = sum(v for k_, v in components.items() if k_.startswith(("L_das", "L_sds", "supervision degree")))
    components["target capture (layer hooks, eq. 4)"] = max(hooks - losses, 0.0)

    # (2) torch.profiler, ops grouped by name and input shapes, minimum self CPU time over the
    # profiled steps. Ops BASIC adds are those with more calls in `on` than in `off_lse` (the same
    # attention kernels): counts are exact, so this attribution does not rest on differences of
    # noisy times. Likewise off vs off_lse shows what the attention-kernel swap adds and removes.
    def profile_ops(model) -> dict:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            train_step(model, batch)
        return {f"{e.key} {_shapes(e.input_shapes)}": (e.count, e.self_cpu_time_total / 1e6)
                for e in prof.key_averages(group_by_input_shape=True)}

    with profile(activities=[ProfilerActivity.CPU]):  # the profiler's own first-use cost
        train_step(models["off"], batch)
    ops: dict[str, dict] = {v: {} for v in models}
    for _ in range(s["profile_steps"]):
        for v, model in models.items():
            for key, (count, sec) in profile_ops(model).items():
                prev = ops[v].get(key)
                ops[v][key] = (count, sec if prev is None else min(prev[1], sec))
    return {"components": components, "on_step": min(step_times),
            "basic_ops": _extra_ops(ops["on"], ops["off_lse"]),
            "swap_added": _extra_ops(ops["off_lse"], ops["off"]),
            "swap_removed": _extra_ops(ops["off"], ops["off_lse"]),
            "profile_total": {v: sum(sec for _, sec in o.values()) for v, o in ops.items()},
            "load": os.getloadavg()}


def worker_flops(size: str, stage: int) -> dict:
    """FLOPs of one step (torch.utils.flop_counter) of `off_lse` and `on`, and L_sds's GEMM FLOPs
    for the proxy's shapes with a bf16 V and table, old (hi/lo operands) and new, on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench_supervision import sds_gemm_flops

    s = setup(size)
    models = build_all(s, stage, ("off_lse", "on"))
    batch = make_batch(s)
    totals = {}
    for v, model in models.items():
        with FlopCounterMode(display=False) as counter:
            train_step(model, batch)
        totals[v] = counter.get_total_flops()
    shape = dict(batch=s["mbs"], m=(s["img"] // s["patch"]) ** 2, d=s["hidden"], vocab=s["vocab"])
    return {"step": totals, "sds_old_bf16": sds_gemm_flops(shape, old=True),
            "sds_new_bf16": sds_gemm_flops(shape, old=False),
            "sds_floor": 3 * 2 * shape["batch"] * shape["m"] * shape["d"] * shape["vocab"]}


def _shapes(shapes) -> str:
    return ",".join("x".join(map(str, s)) for s in shapes if s)


def _extra_ops(a: dict, b: dict) -> list:
    """(seconds, extra calls, key) of the ops that run more often in profile a than in b."""
    out = []
    for key, (count, sec) in a.items():
        extra = count - b.get(key, (0, 0.0))[0]
        if extra > 0:
            out.append((sec * extra / count, extra, key))
    return sorted(out, reverse=True)


def run_worker(task: str, size: str, stage: int) -> None:
    kind, _, variant = task.partition(":")
    if kind == "memory":
        out = worker_memory(size, stage, variant)
    elif kind == "time":
        out = worker_time(size, stage, int(variant))
    elif kind == "flops":
        out = worker_flops(size, stage)
    else:
        out = worker_breakdown(size, stage)
    print("RESULT " + json.dumps(out))


def run_worker_process(task: str, size: str, stage: int) -> dict:
    # As bench_supervision: a fixed mmap threshold makes resident memory follow the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, __file__, "--worker", task, "--size", size, "--stage", str(stage)],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"worker {task} (stage {stage}) failed with code {proc.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


# ---- report ---------------------------------------------------------------------------------------

def flops_estimate(s: dict, stage: int) -> dict:
    """Multiply-add FLOPs (×2) of the step and of BASIC's extra work, per METHOD.md's model."""
    d, L, N, k = s["hidden"], s["layers"], s["vocab"], s["k"]
    m = (s["img"] // s["patch"]) ** 2
    S = s["prompt"] + m + s["text"]
    n_after = s["text"]  # text rows that see the image
    dense = 2 * S * (4 * d * d + 3 * d * s["ffn"])        # qkv + out proj + SwiGLU, per layer
    attn = 2 * 2 * S * S * d / 2                           # causal QKᵀ and PV (half the square)
    head = 2 * S * d * N
    fwd = L * (dense + attn) + head
    # Stage 1: no weight gradients in the LLM (input gradients only: ~1× forward in backward).
    step = fwd * (3 if stage == 2 else 2)
    sds = 3 * 2 * m * d * N                                # Q and P logits, (q − p)E
    mass = k * 2 * n_after * m * d                         # [text × image] scores, all heads
    return {"step": step, "sds": sds, "mass": mass, "S": S, "m": m}


def report_stage(size: str, stage: int, reps: int, flops_only: bool = False) -> None:
    s = SIZES[size]
    f = flops_estimate(s, stage)
    print(f"\n=== stage {stage}: " + ("vision encoder + LLM frozen (projector trains)" if stage == 1
                                      else "vision encoder frozen (projector + LLM train)") + " ===")
    print(f"S = {f['S']} ({f['m']} image + {s['prompt'] + s['text']} text), k = {s['k']}, micro-batch {s['mbs']}; "
          f"model FLOPs: step {f['step'] / 1e9:.0f} G, L_sds {f['sds'] / 1e9:.2f} G "
          f"({100 * f['sds'] / f['step']:.2f} %), attention mass {f['mass'] / 1e9:.2f} G "
          f"({100 * f['mass'] / f['step']:.2f} %)")
    fl = run_worker_process("flops", size, stage)
    base, on = fl["step"]["off_lse"], fl["step"]["on"]
    basic_new = on - base  # fp32 proxy: L_sds at three products, as the new bf16 code
    basic_old = basic_new + fl["sds_old_bf16"] - fl["sds_new_bf16"]
    print(f"FLOPs (flop_counter, one step): off_lse {base / 1e9:.1f} G, on {on / 1e9:.1f} G: BASIC {basic_new / 1e9:.2f} G "
          f"= {100 * basic_new / base:.2f} % of the step")
    print(f"  L_sds GEMMs with a bf16 V and table (meta tensors): old hi/lo {fl['sds_old_bf16'] / 1e9:.2f} G "
          f"(x{fl['sds_old_bf16'] / fl['sds_floor']:.3f} the floor), new {fl['sds_new_bf16'] / 1e9:.2f} G "
          f"(x{fl['sds_new_bf16'] / fl['sds_floor']:.3f}); BASIC's share of the step in bf16: old "
          f"{100 * basic_old / base:.2f} % -> new {100 * basic_new / base:.2f} % (new/old x{basic_new / basic_old:.3f})")
    if flops_only:
        return
    peak = {}
    for v in VARIANTS:
        peak.update(run_worker_process(f"memory:{v}", size, stage))
    timing = run_worker_process(f"time:{reps}", size, stage)
    t, c, lse, med = timing["time"], timing["cpu"], timing["lse_kernel_layers"], timing["median"]
    print(f"time: best of {reps} alternating runs after warm-up (wall; process CPU time), median wall; "
          "memory: the step's working set, fresh process per variant")
    labels = {"off": "off (NeVA)", "on": "on (BASIC, k=%d)" % s["k"], "equal": "on, degree=equal",
              "equal_das": "on, degree=equal, sds off", "off_lse": "off + lse kernel in 1..k"}
    for v in VARIANTS:
        print(f"  {labels[v]:26s}: wall {t[v]:6.3f} s x{t[v] / t['off']:.3f} | cpu {c[v]:6.3f} s "
              f"x{c[v] / c['off']:.3f} | median {med[v]:6.3f} s x{med[v] / med['off']:.3f} | "
              f"peak {peak[v]:6.1f} MB x{peak[v] / peak['off']:.3f}")
    print(f"  => BASIC on/off: time x{t['on'] / t['off']:.3f} wall, x{c['on'] / c['off']:.3f} cpu, "
          f"x{med['on'] / med['off']:.3f} median (floor ~1.02, goal <= 1.05); "
          f"peak memory x{peak['on'] / peak['off']:.3f}")
    print(f"     same attention kernels (on/off_lse): time x{t['on'] / t['off_lse']:.3f} wall, "
          f"x{c['on'] / c['off_lse']:.3f} cpu, x{med['on'] / med['off_lse']:.3f} median; "
          f"peak memory x{peak['on'] / peak['off_lse']:.3f}"
          f"   [load avg after timing: {', '.join(f'{x:.1f}' for x in timing['load'])}]")
    pr = timing["paired"]
    print("     paired per round (median [quartiles] of the rounds' wall-time ratios): "
          + "; ".join(f"{k} x{v[1]:.3f} [{v[0]:.3f}, {v[2]:.3f}]" for k, v in pr.items()))
    print("     (on this CPU proxy `off` runs Megatron's eager S x S core attention and BASIC's layers 1..k a "
          "fused flash kernel, so on/off mixes BASIC's cost with a kernel change; on/off_lse is BASIC's own)")
    print("  layers on BASIC's log-sum-exp attention kernel per step: "
          + ", ".join(f"{v} {lse[v]}" for v in VARIANTS))
    swap_eq = lse["equal"] == 0  # older capture: `equal` kept the model's own attention kernel
    rows = [
        ("attention-kernel swap in 1..k (off_lse - off)", "off_lse", "off", None),
        ("BASIC's own work, same kernels (on - off_lse)", "on", "off_lse", None),
        ("  attention mass (on - equal" + (" - swap)" if swap_eq else ")"), "on", "equal", swap_eq),
        ("  L_sds (equal - equal_das)", "equal", "equal_das", None),
        ("  target + L_das + masks (equal_das - off_lse)" if lse["equal_das"] else
         "  target + L_das + masks (equal_das - off)", "equal_das", "off_lse" if lse["equal_das"] else "off", None),
    ]
    print("  split by differences of best-of-N step times (noisy when the cores are shared):")
    for label, a, b_, minus_swap in rows:
        dt, dc = t[a] - t[b_], c[a] - c[b_]
        if minus_swap:
            dt, dc = dt - (t["off_lse"] - t["off"]), dc - (c["off_lse"] - c["off"])
        print(f"    {label:50s}: wall {dt:+7.3f} s ({100 * dt / t['off']:+5.1f} %)  "
              f"cpu {dc:+7.3f} s ({100 * dc / c['off']:+5.1f} %)")

    b = run_worker_process("breakdown", size, stage)
    print(f"  BASIC's pieces timed in place (wall, best of {s['component_steps']} `on` steps; "
          f"% of the off step's best wall time):")
    for name, sec in sorted(b["components"].items(), key=lambda kv: -kv[1]):
        print(f"    {name:50s}: {1e3 * sec:7.1f} ms  ({100 * sec / t['off']:5.2f} %)")
    print(f"    {'sum':50s}: {1e3 * sum(b['components'].values()):7.1f} ms  "
          f"({100 * sum(b['components'].values()) / t['off']:5.2f} %)")
    _print_ops("  torch.profiler: ops that `on` runs more often than `off_lse` (BASIC's own ops; self "
               f"CPU time, min over {s['profile_steps']} steps)", b["basic_ops"], t["off"])
    _print_ops("  torch.profiler: the attention-kernel swap, ops off_lse adds", b["swap_added"], t["off"], 4)
    _print_ops("  ... and ops it removes", b["swap_removed"], t["off"], 6)


def _print_ops(title: str, ops: list, off_step: float, top: int = 10) -> None:
    total = sum(sec for sec, _, _ in ops)
    print(f"{title}: {1e3 * total:.1f} ms in all ({100 * total / off_step:.2f} % of the off step)")
    for sec, extra, key in ops[:top]:
        print(f"    {1e3 * sec:7.1f} ms  x{extra:<3d} {key[:96]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast smoke run")
    parser.add_argument("--stages", help="freezing regimes to run: 1, 2 or 1,2 (default 1,2; --quick: 1)")
    parser.add_argument("--reps", type=int, help="timed runs per variant (default: full 10, quick 3)")
    parser.add_argument("--flops-only", action="store_true",
                        help="the proxy's FLOP counts only (a minute per stage), no timing or memory runs")
    parser.add_argument("--model", choices=("proxy", "7b"), default="proxy",
                        help="proxy: time the CPU proxy (default); 7b: print the LLaVA-1.5-7B FLOP / byte model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.size, args.stage)
        return
    if args.model == "7b":
        from flops_7b import report as report_7b

        report_7b()
        return
    size = "quick" if args.quick else "full"
    s = SIZES[size]
    if args.reps:
        s["reps"] = args.reps
    stages = args.stages or ("1" if args.quick else "1,2")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, sizes: {size} {s}")
    print("decoder: Llama-style (RMSNorm, SwiGLU, no biases, RoPE, untied head), Megatron local spec "
          "(its core attention is the eager S x S softmax)")
    print(f"load average at start: {os.getloadavg()}")
    for stage in (int(x) for x in stages.split(",")):
        start = time.perf_counter()
        report_stage(size, stage, s["reps"], args.flops_only)
        print(f"  (stage {stage} took {time.perf_counter() - start:.0f} s)")
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
