#!/usr/bin/env python
"""Self-test of nemo_basic's GPU path: one command, a few minutes on one H100/H200.

    python scripts/gpu_selftest.py                  # any CUDA machine: with TE (NGC) or without
    python scripts/gpu_selftest.py --budget 450     # stop starting checks after 450 s
    python scripts/gpu_selftest.py --cpu            # every check that can run without CUDA
    python scripts/gpu_selftest.py --only lse_attention,recipe --out report.json

Two machines are supported. The NGC NeMo container (Transformer Engine, apex): from a checkout,
``docker run --gpus 1 -v $PWD:/w -w /w nvcr.io/nvidia/nemo:25.11 python scripts/gpu_selftest.py``
after ``pip install --no-deps -e .``. A bare CUDA machine with torch but no Megatron, NeMo or TE
and no network: carry the wheel kit (``scripts/gpu_kit.py build --out .kit`` on a machine with
network) beside the checkout and run ``python3 scripts/gpu_kit.py selftest --kit .kit -- --budget
450``, which installs it offline and runs this script (README, "A GPU machine without network or
Transformer Engine"). It runs from a checkout without installing the package (check 3 imports the
test-suite's helpers from tests/, which needs pytest). Without TE the TE spec and FP8 parts SKIP
with the reason, and the local spec runs in bf16 on CUDA.

It prints the versions first, then one PASS / FAIL / SKIP line per check, writes a JSON report
(``--out``, default ./gpu_selftest.json: per-check status, numbers, error text, and the
environment) after every check, and exits 1 if any check failed. The checks run in this order, the
ones that settle the most first, so that a short budget still answers the main questions:
 1 imports            ``import nemo_basic; import torchvision; import nemo.collections.vlm`` in a
                      fresh process (an abort there, rc 134, is the old torchvision shim).
 2 lse_attention      capture.sdpa_with_lse (bf16) against a float64 eager causal softmax: output,
                      log-sum-exp and gradients, D = 64/128/256, V a view of a fused QKV, and
                      grouped K/V with 8 KV heads passed natively ("gqa_native").
 3 basic_losses       L_das / L_sds of the tiny BASIC NeVA against the test-suite's float64
                      recomputation, with the local spec in bf16 and, where TE imports, the TE spec
                      (CPU: local, fp32); the lse wrapper's layer output against the module's own.
 4 config_rejections  BASIC with context parallelism, interleaved pipeline stages, FP8 attention:
                      a BasicConfigError naming the key.
 5 recipe             3 steps of conf/tiny.yaml through the recipe on 1 GPU in bf16, then, where TE
                      imports, with trainer.fp8=hybrid: FP8 active in the decoder layers, nonzero
                      amax (CPU: fp32).
 6 proxy              a 7B-shaped proxy (hidden 4096, 32 heads, ffn 11008, 4 layers, k = 2, vocab
                      32000, 576 image + 64 text tokens): step time and peak memory with BASIC on /
                      off, device→host syncs per step (torch.profiler, and the syncing operators
                      counted by nemo_basic.testing.syncs), the L_sds GEMMs with TF32 off / on.

Design: the checks are functions in a small registry. Checks that run in this interpreter's
children run in worker subprocesses (a CUDA fault or an abort there cannot take the report with
it; a dead worker is restarted for the checks after the one it died in); the recipe runs in its
own subprocesses. Each check has a time budget (SIGALRM in the worker, a kill from the parent),
and on a GPU the run stops starting checks when --budget is spent (on a CPU, --cpu, the recipe
runs beside the worker and only per-check budgets apply).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout: nemo_basic need not be installed
    sys.path.insert(0, str(REPO))
DEFAULT_BUDGET_S = 570        # GPU run: stop starting checks after this (10 minutes, with margin)
WORKER_START_S = 120          # allowance for a worker's interpreter start (NeMo's import)

# Budgets (seconds) per check are in the @check lines: GPU ones sized for one H100/H200, CPU ones
# generous (a shared 2-core machine): in --cpu mode they only stop a hang.
# Pass criteria (numbers are in the report whatever the status).
LSE_OUT_FACTOR, LSE_GRAD_FACTOR = 2.0, 3.0   # kernel error ≤ factor × eager error in the kernel's dtype + atol
LSE_ATOL = {"bf16": 2e-3, "fp32": 1e-5}
LSE_LSE_ATOL = {"bf16": 2e-3, "fp32": 1e-5}  # the log-sum-exp is accumulated in fp32 either way
LOSS_RTOL = {"bf16": 2e-2, "fp32": 1e-5}     # BASIC losses vs the float64 recomputation
WRAPPER_RTOL = {"bf16": 2e-2, "fp32": 1e-5}  # layer-1 output, lse wrapper vs the module's own
MAX_EXTRA_SYNCS = 8                          # host syncs per step BASIC may add (GPU proxy, profiler)


# ---- registry and results -------------------------------------------------------------------------

class Skip(Exception):
    """Raised by a check that does not apply here (the reason goes into the report)."""


class CheckTimeout(Exception):
    pass


@dataclasses.dataclass
class Check:
    number: int
    name: str
    fn: Callable
    budget_gpu: int
    budget_cpu: int
    where: str       # "worker" (in the worker subprocess) or "parent" (runs its own subprocesses)
    doc: str


REGISTRY: dict[str, Check] = {}


def check(number: int, name: str, budget_gpu: int, budget_cpu: int, where: str = "worker"):
    def register(fn):
        REGISTRY[name] = Check(number, name, fn, budget_gpu, budget_cpu, where, (fn.__doc__ or "").strip())
        return fn
    return register


class Outcome:
    """What a check function fills in: numbers for the report and the criteria that failed."""

    def __init__(self):
        self.numbers: dict = {}
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.skipped: list[dict] = []  # parts that need what this machine lacks, with the reason
        self.summary = ""

    def skip(self, part: str, reason: str) -> None:
        self.skipped.append({"part": part, "reason": reason})

    def expect(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return ok


@dataclasses.dataclass
class Ctx:
    cpu: bool
    tmp: str

    @property
    def device(self):
        import torch
        return torch.device("cpu" if self.cpu else "cuda")

    @property
    def dtype(self):
        import torch
        return torch.float32 if self.cpu else torch.bfloat16

    @property
    def precision(self) -> str:
        return "fp32" if self.cpu else "bf16"


def run_check(c: Check, ctx: Ctx) -> dict:
    """Run one check function in this process with its time budget; always returns a result."""
    budget = c.budget_cpu if ctx.cpu else c.budget_gpu
    out = Outcome()
    start = time.monotonic()
    result = {"number": c.number, "name": c.name, "status": "FAIL", "budget_s": budget}

    def alarm(signum, frame):
        raise CheckTimeout(f"{c.name} exceeded its budget of {budget} s")

    use_alarm = hasattr(signal, "SIGALRM") and c.where == "worker"
    if use_alarm:
        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(budget)
    try:
        c.fn(ctx, out)
        result["status"] = "FAIL" if out.failures else "PASS"
    except Skip as e:
        result["status"] = "SKIP"
        result["reason"] = str(e)
    except BaseException as e:  # noqa: BLE001  (the report carries every failure)
        if isinstance(e, KeyboardInterrupt):
            raise
        out.failures.append(f"{type(e).__name__}: {e}")
        result["traceback"] = traceback.format_exc()[-6000:]
    finally:
        if use_alarm:
            signal.alarm(0)
    result.update(seconds=round(time.monotonic() - start, 2), summary=out.summary, numbers=out.numbers,
                  failures=out.failures, notes=out.notes, skipped_parts=out.skipped)
    return result


# ---- helpers shared by the worker checks ---------------------------------------------------------------

def load_file_module(name: str, path: Path):
    """Import a file that is not part of a package (scripts/, tests/) under `name`."""
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(path.parent))  # its own sibling imports (bench_supervision, basic_workers)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def suite_helpers():
    """(tests/models/basic_workers.py, tests/models/test_basic_neva.py): the tiny-NeVA builder and
    the float64 recomputation of the BASIC losses, exactly as the CPU test-suite uses them."""
    folder = REPO / "tests" / "models"
    if not (folder / "basic_workers.py").is_file():
        raise RuntimeError(f"{folder} not found: run the self-test from a checkout of the repository "
                           "(the Docker image does not copy tests/)")
    workers = load_file_module("basic_workers", folder / "basic_workers.py")
    reference = load_file_module("test_basic_neva", folder / "test_basic_neva.py")  # needs pytest
    return workers, reference


def bench_module():
    return load_file_module("bench_basic_step", REPO / "scripts" / "bench_basic_step.py")


def ensure_process_group(ctx: Ctx) -> None:
    """One rank on this machine: NCCL on a GPU (what training uses), gloo on a CPU."""
    import torch

    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if ctx.cpu:
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    else:
        torch.cuda.set_device(0)
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)


def reset_parallel_state() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def require_cuda(ctx: Ctx, what: str) -> None:
    import torch

    if ctx.cpu:
        raise Skip(f"{what} needs CUDA (--cpu mode)")
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available; run with --cpu for the CPU-runnable checks")


def to_cpu(obj):
    import torch

    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def max_abs(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def cuda_time(fn, reps: int, warmup: int = 2) -> list[float]:
    """Wall times (s) of `fn` with the device synchronised around each call."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


# ---- 1 imports ------------------------------------------------------------------------------------------

@check(1, "imports", budget_gpu=240, budget_cpu=300)
def check_imports(ctx: Ctx, out: Outcome) -> None:
    """import nemo_basic, torchvision and nemo.collections.vlm in a fresh process; torchvision's
    own ops must work where its extension loads (GPU)."""
    # This is the worker's first act: nothing of nemo_basic, torchvision or NeMo is imported yet.
    # If the process aborts here (rc 134) the parent records it for this check.
    fresh = not any(m in sys.modules for m in ("nemo_basic", "torchvision", "nemo"))
    start = time.monotonic()
    import nemo_basic  # noqa: F401
    import torchvision
    import nemo.collections.vlm  # noqa: F401
    from nemo_basic.compat import torchvision_shim

    out.numbers.update(import_s=round(time.monotonic() - start, 2), rc=0, fresh_process=fresh,
                       torchvision_shim_active=torchvision_shim.active())
    out.expect(fresh, "the imports did not run in a fresh interpreter")
    import torch

    if ctx.cpu:
        out.skip("torchvision.ops.nms", "needs torchvision's own extension, which loads beside a CUDA torch")
    else:
        out.expect(not torchvision_shim.active(), "the torchvision shim is active on a CUDA machine")
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0]])
        scores = torch.tensor([0.9, 0.8, 0.7])
        for device in ("cpu", "cuda"):
            keep = torchvision.ops.nms(boxes.to(device), scores.to(device), 0.5).cpu().tolist()
            out.numbers[f"nms_{device}"] = keep
            out.expect(keep == [0, 2], f"torchvision.ops.nms on {device} kept {keep}, expected [0, 2]")
    out.summary = (f"imported in {out.numbers['import_s']} s, torchvision shim "
                   f"{'active' if out.numbers['torchvision_shim_active'] else 'inactive'}")


# ---- 2 lse_attention -------------------------------------------------------------------------------------

def eager_attention(q, k, v, scale):
    """Causal softmax attention written out, K/V heads repeated for grouped queries: (out, lse)."""
    import torch

    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    n = scores.shape[-1]
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.softmax(-1) @ v, torch.logsumexp(scores, dim=-1)


def _lse_case(ctx: Ctx, shape, kv_heads: int, fused_view: bool, native_gqa: bool, seed: int) -> dict:
    """One configuration: errors of the kernel and of the eager math in the kernel's dtype, both
    measured against float64 eager on the same (rounded) inputs."""
    import torch
    from nemo_basic.models.capture import sdpa_with_lse

    B, H, S, D = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev, dt = ctx.device, ctx.dtype
    if fused_view:  # Megatron's layout: [S, B, H, 3·D] split into views, permuted to [B, H, S, D]
        qkv = torch.randn(S, B, H, 3 * D, generator=g).to(dev, dt)
        q0, k0, v0 = (t.permute(1, 2, 0, 3) for t in qkv.split(D, dim=-1))
        leaves = [t.detach().requires_grad_() for t in (q0, k0, v0)]  # .detach() keeps the strides
    else:
        leaves = [torch.randn(B, heads, S, D, generator=g).to(dev, dt).requires_grad_()
                  for heads in (H, kv_heads, kv_heads)]
    dout = torch.randn(B, H, S, D, generator=g).to(dev, dt)
    scale = 1.0 / math.sqrt(D)
    q, k, v = leaves
    if kv_heads != H and not native_gqa:
        k, v = k.repeat_interleave(H // kv_heads, dim=1), v.repeat_interleave(H // kv_heads, dim=1)
    kernel_out, kernel_lse = sdpa_with_lse(q, k, v, scale)
    row = {"shape": list(shape), "kv_heads": kv_heads, "strides_q": list(q.stride()),
           "out_shape": list(kernel_out.shape), "lse_shape": list(kernel_lse.shape),
           "lse_dtype": str(kernel_lse.dtype)}
    kernel_out.backward(dout)
    kernel_grads = [t.grad.detach().clone() for t in leaves]

    def eager_in(dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in leaves]
        o, lse = eager_attention(*xs, scale)
        o.backward(dout.to(dtype))
        return o.detach(), lse.detach(), [x.grad for x in xs]

    ref_out, ref_lse, ref_grads = eager_in(torch.float64)
    low_out, _, low_grads = eager_in(dt)
    row["shapes_ok"] = (list(kernel_out.shape) == [B, H, S, D] and list(kernel_lse.shape) == [B, H, S])
    row["err_out"] = max_abs(kernel_out, ref_out)
    row["err_out_eager"] = max_abs(low_out, ref_out)
    row["err_lse"] = max_abs(kernel_lse.float(), ref_lse) if row["shapes_ok"] else float("nan")
    for name, kg, lg, rg in zip(("dq", "dk", "dv"), kernel_grads, low_grads, ref_grads):
        row[f"err_{name}"] = max_abs(kg, rg)
        row[f"err_{name}_eager"] = max_abs(lg, rg)
    return row


def _lse_verdict(row: dict, precision: str) -> list[str]:
    bad = []
    if not row["shapes_ok"]:
        bad.append(f"out {row['out_shape']} / lse {row['lse_shape']}, expected [B,H,S,D] / [B,H,S]")
        return bad
    atol = LSE_ATOL[precision]
    if not row["err_out"] <= LSE_OUT_FACTOR * row["err_out_eager"] + atol:
        bad.append(f"out error {row['err_out']:.3g} > {LSE_OUT_FACTOR}x eager {row['err_out_eager']:.3g} + {atol}")
    if not row["err_lse"] <= LSE_LSE_ATOL[precision]:
        bad.append(f"lse error {row['err_lse']:.3g} > {LSE_LSE_ATOL[precision]}")
    for name in ("dq", "dk", "dv"):
        e, ee = row[f"err_{name}"], row[f"err_{name}_eager"]
        if not e <= LSE_GRAD_FACTOR * ee + atol:
            bad.append(f"{name} error {e:.3g} > {LSE_GRAD_FACTOR}x eager {ee:.3g} + {atol}")
    return bad


@check(2, "lse_attention", budget_gpu=120, budget_cpu=120)
def check_lse_attention(ctx: Ctx, out: Outcome) -> None:
    """capture.sdpa_with_lse against float64 eager causal attention (output, lse, gradients)."""
    if ctx.cpu:  # the same code path on the CPU flash kernel, fp32, small shapes
        out.skip("CUDA flash kernel, bf16, [2,32,1024,D]", "needs CUDA (the CPU flash kernel ran instead, fp32)")
        B, H, S = 1, 4, 128
        cases = {"d64": ((B, H, S, 64), H, False), "d32": ((B, H, S, 32), H, False),
                 "qkv_view_d64": ((B, H, S, 64), H, True), "gqa2_d64": ((B, H, S, 64), 2, False)}
    else:
        require_cuda(ctx, "the CUDA flash kernel")
        B, H, S = 2, 32, 1024
        cases = {"d128": ((B, H, S, 128), H, False), "d64": ((B, H, S, 64), H, False),
                 "d256": ((B, 16, S, 256), 16, False), "qkv_view_d128": ((B, H, S, 128), H, True),
                 "gqa8_d128": ((B, H, S, 128), 8, False)}
    from nemo_basic.models import capture

    rows = {}
    for i, (label, (shape, kv_heads, fused)) in enumerate(cases.items()):
        gqa = kv_heads != shape[1]
        try:
            rows[label] = _lse_case(ctx, shape, kv_heads, fused, native_gqa=gqa, seed=i)
        except Exception as e:  # noqa: BLE001
            if not gqa:
                raise
            # grouped K/V rejected: report that, and still measure the kernel on repeated heads
            out.numbers["gqa_native"] = "FAIL"
            out.failures.append(f"gqa_native: sdpa_with_lse rejected {kv_heads} KV heads for "
                                f"{shape[1]} query heads: {type(e).__name__}: {str(e)[:300]}")
            rows[label + "_repeated"] = _lse_case(ctx, shape, kv_heads, fused, native_gqa=False, seed=i)
            continue
        if gqa:  # sdpa_with_lse falls back to repeated K/V (and remembers it) if the kernel refuses
            native = getattr(capture, "_NATIVE_GQA", {}).get(ctx.device.type, True)
            out.numbers["gqa_native"] = "PASS" if native else "FAIL"
            out.expect(native, f"gqa_native: the {ctx.device.type} kernel refused {kv_heads} KV heads for "
                       f"{shape[1]} query heads; sdpa_with_lse fell back to repeating them")
    for label, row in rows.items():
        for problem in _lse_verdict(row, ctx.precision):
            out.failures.append(f"{label}: {problem}")
    out.numbers["cases"] = rows
    worst = max(rows.values(), key=lambda r: r["err_out"])
    out.summary = (f"{len(rows)} cases ({ctx.precision}), max |Δout| {worst['err_out']:.2e} "
                   f"(eager {worst['err_out_eager']:.2e}), max |Δlse| "
                   f"{max(r['err_lse'] for r in rows.values()):.2e}, gqa_native {out.numbers.get('gqa_native')}")


# ---- 3 basic_losses ---------------------------------------------------------------------------------------

def _capture_run(ctx: Ctx, workers, basic, spec: Optional[str], state=None):
    """Build the test-suite's tiny NeVA (workers.build) with the given spec, on this device and
    dtype, run one micro-batch forward + backward, and return what the float64 recomputation of
    test_basic_neva.reference_losses reads (the keys of basic_workers.capture_internals), plus
    layer 1's output. The softmax scale comes from the model's config, not from the attention
    module (TE's DotProductAttention keeps none)."""
    import functools
    from unittest import mock

    import torch
    from nemo_basic.models import specs
    from nemo_basic.testing import tiny

    reset_parallel_state()
    patch = contextlib.nullcontext()
    if spec is not None:  # the tiny models look specs.language_layer_spec up when they build their GPT layers
        chosen, use_te = specs.language_layer_spec, spec == "te"  # over the caller's own use_te
        patch = mock.patch.object(specs, "language_layer_spec", lambda *a, **k: chosen(*a, **{**k, "use_te": use_te}))
    with patch:
        model = workers.build(basic, micro_batch_size=2, init_method_std=0.3)
    if state is not None:
        model.load_state_dict(state, strict=True)
    state = {k_: (v.detach().clone() if torch.is_tensor(v) else v) for k_, v in model.state_dict().items()}
    model = model.to(ctx.device)
    if not ctx.cpu:
        model = model.bfloat16()  # as Megatron's Float16Module does
    layers = model.language_model.decoder.layers
    seen = {"hidden": {}, "q": {}, "k": {}}

    def pre_decoder(module, args, kwargs):
        seen["input"] = kwargs.get("hidden_states", args[0] if args else None).detach().clone()

    handles = [layers[0].register_forward_pre_hook(pre_decoder, with_kwargs=True)]
    for layer in layers:
        n = layer.layer_number
        handles.append(layer.register_forward_hook(
            lambda m, a, o, n=n: seen["hidden"].__setitem__(n, o[0].detach().clone())))
        handles.append(layer.self_attention.core_attention.register_forward_pre_hook(
            functools.partial(workers._keep_qk, seen, n)))
    b = workers.batches("simple")[0]
    b = tiny.Batch(**{f.name: (getattr(b, f.name).to(ctx.device) if torch.is_tensor(getattr(b, f.name)) else None)
                      for f in dataclasses.fields(b)})
    b.images = b.images.to(ctx.dtype)
    per_token, mask = workers._call(model, b)
    lm = tiny.lm_loss(per_token.float(), mask)
    lm.backward()
    for h in handles:
        h.remove()
    lm_cfg = model.language_model.config
    r = {"input": seen["input"], "hidden": seen["hidden"], "q": seen["q"], "k": seen["k"],
         "embedding": model.language_model.embedding.word_embeddings.weight.detach(),
         "input_ids": b.input_ids, "text_lengths": b.text_lengths, "lm": float(lm),
         "scale": lm_cfg.softmax_scale or 1.0 / math.sqrt(lm_cfg.kv_channels),
         "core_attention": type(layers[0].self_attention.core_attention).__name__,
         "core_attention_module": type(layers[0].self_attention.core_attention).__module__}
    if model.capture is not None:
        r.update(image_mask=model.capture.image_mask, text_mask=model.capture.text_mask,
                 logs=model.capture.logs[-1] if model.capture.logs else {})
    return to_cpu(r), state


@check(3, "basic_losses", budget_gpu=150, budget_cpu=240)
def check_basic_losses(ctx: Ctx, out: Outcome) -> None:
    """BASIC losses of the tiny NeVA (TE and local spec, bf16; CPU: local, fp32) against the
    test-suite's float64 recomputation; the lse wrapper's layer output against BASIC off."""
    ensure_process_group(ctx)
    workers, reference = suite_helpers()
    from nemo_basic.models.basic_config import BasicConfig

    from nemo_basic.models.specs import have_transformer_engine

    k = 3
    if ctx.cpu:
        specs_to_run = ["local"]
        out.skip("Transformer Engine spec, bf16", "needs CUDA and Transformer Engine (the local spec ran, fp32)")
    elif have_transformer_engine():
        specs_to_run = ["te", "local"]
    else:  # a CUDA machine without TE trains on the local spec: that is what runs here
        specs_to_run = ["local"]
        out.skip("Transformer Engine spec, bf16", "Transformer Engine is not importable here (the local spec "
                 "ran, bf16)")
    rtol, wtol = LOSS_RTOL[ctx.precision], WRAPPER_RTOL[ctx.precision]
    for spec in specs_to_run:
        r, state = _capture_run(ctx, workers, BasicConfig(layers=k), spec if not ctx.cpu else None)
        off, _ = _capture_run(ctx, workers, BasicConfig(enabled=False), spec if not ctx.cpu else None, state)
        das, sds = reference.reference_losses(r, k)
        row = {"core_attention": f"{r['core_attention_module']}.{r['core_attention']}",
               "das": float(r["logs"]["das"]), "das_float64": float(das),
               "sds": float(r["logs"]["sds"]), "sds_float64": float(sds),
               "lm_on": r["lm"], "lm_off": off["lm"]}
        row["das_rel_err"] = rel_err(row["das"], row["das_float64"])
        row["sds_rel_err"] = rel_err(row["sds"], row["sds_float64"])
        h_on, h_off = r["hidden"][1].double(), off["hidden"][1].double()
        row["layer1_rel_err"] = float((h_on - h_off).abs().max() / h_off.abs().max())
        row["lm_rel_err"] = rel_err(row["lm_on"], row["lm_off"])
        out.numbers[spec] = row
        want = "TEDotProductAttention" if spec == "te" else "DotProductAttention"
        out.expect(r["core_attention"] == want, f"{spec}: core attention is {row['core_attention']}, expected {want}")
        out.expect(das > 0 and sds > 0, f"{spec}: the float64 losses are not positive ({das}, {sds})")
        out.expect(row["das_rel_err"] <= rtol, f"{spec}: L_das {row['das']:.6g} vs float64 {row['das_float64']:.6g} "
                   f"(rel {row['das_rel_err']:.2e} > {rtol})")
        out.expect(row["sds_rel_err"] <= rtol, f"{spec}: L_sds {row['sds']:.6g} vs float64 {row['sds_float64']:.6g} "
                   f"(rel {row['sds_rel_err']:.2e} > {rtol})")
        out.expect(row["layer1_rel_err"] <= wtol, f"{spec}: layer-1 output with the lse wrapper differs from the "
                   f"module's own by {row['layer1_rel_err']:.2e} (> {wtol})")
        out.expect(row["lm_rel_err"] <= wtol, f"{spec}: LM loss BASIC on {row['lm_on']:.6g} vs off {row['lm_off']:.6g}")
    reset_parallel_state()
    out.summary = "; ".join(f"{s}: das rel {row['das_rel_err']:.1e}, sds rel {row['sds_rel_err']:.1e}, "
                            f"layer-1 rel {row['layer1_rel_err']:.1e}" for s, row in out.numbers.items())


# ---- 4 config_rejections ------------------------------------------------------------------------------------

REJECTED = {  # what MegatronStrategy / the precision plugin would set on the top-level NeVA config
    "context_parallel": ({"context_parallel_size": 2}, "context_parallel_size"),
    "virtual_pipeline": ({"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
                         "virtual_pipeline_model_parallel_size"),
    "fp8_dot_product_attention": ({"fp8": "hybrid", "fp8_dot_product_attention": True}, "fp8_dot_product_attention"),
    "fp8_multi_head_attention": ({"fp8": "hybrid", "fp8_multi_head_attention": True}, "fp8_multi_head_attention"),
}


@check(4, "config_rejections", budget_gpu=60, budget_cpu=120)
def check_config_rejections(ctx: Ctx, out: Outcome) -> None:
    """Unsupported layouts with BASIC on → BasicConfigError naming the key; BASIC off → accepted."""
    from nemo_basic.models.basic_config import BasicConfig, BasicConfigError
    from nemo_basic.models.neva import BasicNevaConfig
    from nemo_basic.testing import tiny_neva

    for label, (settings, key) in REJECTED.items():
        row = {}
        for enabled in (True, False):
            config = tiny_neva.tiny_neva_config(BasicNevaConfig, basic=BasicConfig(layers=2, enabled=enabled))
            for attr, value in settings.items():
                setattr(config, attr, value)
            try:
                config.validate_basic()
                got = None
            except BasicConfigError as e:
                got = f"BasicConfigError: {e}"
            except Exception as e:  # noqa: BLE001  (a different error is a failure, reported)
                got = f"{type(e).__name__}: {e}"
            row["basic_on" if enabled else "basic_off"] = got or "accepted"
            if enabled:
                out.expect(got is not None and got.startswith("BasicConfigError") and key in got,
                           f"{label}: expected a BasicConfigError naming {key}, got {got or 'no error'}")
            else:
                out.expect(got is None, f"{label}: rejected with BASIC off: {got}")
        out.numbers[label] = row
    rejected = sum(v["basic_on"].startswith("BasicConfigError") for v in out.numbers.values())
    out.summary = f"{rejected} of {len(REJECTED)} unsupported configurations rejected with BasicConfigError"


# ---- 5 recipe ---------------------------------------------------------------------------------------------

def _recipe_overrides(ctx: Ctx, log_dir: str, name: str) -> list[str]:
    common = [f"run.log_dir={log_dir}", f"run.name={name}", "trainer.max_steps=3", "checkpoint.every_n_steps=null",
              "trainer.devices=1", "data.num_workers=0"]
    if ctx.cpu:  # the fewest micro-batches tiny.yaml allows: one per step
        return common + ["trainer.accelerator=cpu", "data.global_batch_size=2"]
    return common + ["trainer.accelerator=gpu"]


def _run_recipe_child(ctx: Ctx, label: str, extra: list[str], budget: int) -> dict:
    result_path = os.path.join(ctx.tmp, f"recipe_{label}.json")
    overrides = _recipe_overrides(ctx, os.path.join(ctx.tmp, "runs"), f"selftest_{label}") + extra
    env = child_env(ctx)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--recipe-child", result_path, *overrides]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, env=env, cwd=str(REPO))
        rc, tail = proc.returncode, (proc.stdout[-1500:] + proc.stderr[-3000:])
    except subprocess.TimeoutExpired as e:  # its captured output comes as bytes

        def text(b):
            return (b or b"").decode(errors="replace") if isinstance(b, bytes) else str(b or "")

        rc, tail = f"timeout after {budget} s", text(e.stdout)[-1500:] + text(e.stderr)[-3000:]
    got = {}
    if os.path.isfile(result_path):
        with open(result_path) as f:
            got = json.load(f)
    got.update(rc=rc, overrides=overrides)
    if rc != 0:
        got["output_tail"] = tail
    return got


def _losses_finite(run: dict, out: Outcome, label: str) -> None:
    rows = run.get("rows") or []
    out.expect([r.get("step") for r in rows] == [1, 2, 3], f"{label}: logged steps {[r.get('step') for r in rows]}, "
               "expected [1, 2, 3]")
    for r in rows:
        for key in ("lm_loss", "basic_das_loss", "basic_sds_loss"):
            v = r.get(key)
            out.expect(isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
                       f"{label}: step {r.get('step')} {key} = {v}")


@check(5, "recipe", budget_gpu=300, budget_cpu=480, where="parent")
def check_recipe(ctx: Ctx, out: Outcome) -> None:
    """conf/tiny.yaml, 3 steps through the recipe (subprocess), bf16 then trainer.fp8=hybrid."""
    from nemo_basic.models.specs import have_transformer_engine

    runs = [("bf16" if not ctx.cpu else "fp32", [])]
    if ctx.cpu:
        out.skip("trainer.fp8=hybrid", "FP8 needs Transformer Engine on an H100-class GPU")
    elif not have_transformer_engine():
        out.skip("trainer.fp8=hybrid", "Transformer Engine is not importable here (FP8 needs it)")
    else:
        runs.append(("fp8", ["trainer.fp8=hybrid"]))
    budget = REGISTRY["recipe"].budget_cpu if ctx.cpu else min(REGISTRY["recipe"].budget_gpu, ctx_budget_left(ctx))
    for i, (label, extra) in enumerate(runs):
        share = max(60, int(budget / (len(runs) - i)) - 5)
        start = time.monotonic()
        run = _run_recipe_child(ctx, label, extra, share)
        budget -= time.monotonic() - start
        summary = run.get("summary") or {}
        out.numbers[label] = {"rc": run["rc"], "rows": run.get("rows"), "probe": run.get("probe"),
                              "steps_done": summary.get("steps_done"), "seconds": summary.get("seconds"),
                              "overrides": run["overrides"]}
        if run["rc"] != 0 or run.get("error"):
            out.failures.append(f"{label}: the recipe failed (rc {run['rc']}): "
                                f"{(run.get('error') or run.get('output_tail') or '')[-1500:]}")
            out.numbers[label]["error"] = run.get("error") or run.get("output_tail")
            continue
        out.expect(summary.get("steps_done") == 3, f"{label}: steps_done = {summary.get('steps_done')}, expected 3")
        _losses_finite(run, out, label)
        probe = run.get("probe") or {}
        calls = probe.get("calls") or []
        out.expect(bool(calls), f"{label}: the probe saw no decoder-layer call")
        if label == "fp8":
            off = [c for c in calls if not (c["fp8_enabled"] and c["config_fp8"] == "hybrid")]
            out.expect(not off, f"fp8: {len(off)} of {len(calls)} decoder-layer calls ran without FP8 "
                       f"(first: {off[:1]})")
            amax = probe.get("amax") or {}
            out.expect(amax.get("modules", 0) > 0, "fp8: no Transformer Engine module with FP8 metadata in the decoder")
            out.expect(amax.get("nonzero", 0) > 0, f"fp8: every amax history in the decoder is zero ({amax})")
        else:
            on = [c for c in calls if c["fp8_enabled"]]
            out.expect(not on, f"{label}: FP8 was enabled in {len(on)} decoder-layer calls without trainer.fp8")
    parts = []
    for label, n in out.numbers.items():
        rows = n.get("rows") or []
        if rows:
            parts.append(f"{label}: lm {rows[0]['lm_loss']:.3f}->{rows[-1]['lm_loss']:.3f}")
        probe = n.get("probe") or {}
        if label == "fp8" and probe:
            parts.append(f"fp8 calls {sum(bool(c['fp8_enabled']) for c in probe.get('calls', []))}/"
                         f"{len(probe.get('calls', []))}, amax nonzero {probe.get('amax', {}).get('nonzero')}")
    out.summary = "; ".join(parts)


def recipe_child(result_path: str, overrides: list[str]) -> int:
    """In a subprocess: the recipe on conf/tiny.yaml with a probe callback added to its trainer."""
    result: dict = {}
    try:
        from nemo_basic.recipes import schema, train
        import lightning.pytorch as pl

        cfg = schema.load_config(str(REPO / "conf" / "tiny.yaml"), overrides, stage=1)
        probe = _make_probe(pl.Callback)()
        build_trainer = train.build_trainer

        def with_probe(*args, **kwargs):  # the recipe's own trainer, plus an observer
            trainer = build_trainer(*args, **kwargs)
            trainer.callbacks.append(probe)
            return trainer

        train.build_trainer = with_probe
        summary = train.run(cfg)
        metrics = os.path.join(cfg.run_dir, getattr(train, "METRICS_FILE", os.path.join("recipe", "metrics.jsonl")))
        rows = []
        if os.path.isfile(metrics):
            with open(metrics) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        result.update(summary=summary, rows=rows, probe=probe.report())
        rc = 0
    except BaseException:  # noqa: BLE001
        result["error"] = traceback.format_exc()[-6000:]
        rc = 1
    with open(result_path, "w") as f:
        json.dump(result, f, default=str)
    return rc


def _make_probe(base):
    class Fp8Probe(base):
        """Records, for every decoder-layer call of the language model, whether Transformer
        Engine's FP8 autocast is on and the layer's config.fp8; after training, the amax
        histories of the decoder's TE modules."""

        def __init__(self):
            super().__init__()
            self.calls: list = []
            self.amax: dict = {}
            self.handles: list = []

        def _decoder_layers(self, module):
            return [(n, m) for n, m in module.named_modules()
                    if "language_model.decoder.layers." in n and n.rsplit(".", 1)[-1].isdigit()]

        def on_train_start(self, trainer, pl_module):
            try:
                from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
                enabled = FP8GlobalStateManager.is_fp8_enabled
            except ImportError:  # CPU: no Transformer Engine, so no FP8 either
                def enabled():
                    return False

            def hook(name, module, args):
                if len(self.calls) < 64:
                    self.calls.append({"layer": name, "fp8_enabled": bool(enabled()),
                                       "config_fp8": getattr(module.config, "fp8", None)})

            for name, layer in self._decoder_layers(pl_module):
                self.handles.append(layer.register_forward_pre_hook(lambda m, a, name=name: hook(name, m, a)))

        def on_train_end(self, trainer, pl_module):
            for h in self.handles:
                h.remove()
            modules = nonzero = 0
            largest = 0.0
            for name, m in pl_module.named_modules():
                meta = getattr(m, "fp8_meta", None)
                if "language_model.decoder." not in name or not isinstance(meta, dict):
                    continue
                scaling = meta.get("scaling_fwd")
                history = getattr(scaling, "amax_history", None)
                if history is None:
                    continue
                modules += 1
                peak = float(history.detach().abs().max()) if history.numel() else 0.0
                nonzero += peak > 0
                largest = max(largest, peak)
            self.amax = {"modules": modules, "nonzero": nonzero, "max": largest}

        def report(self) -> dict:
            return {"calls": self.calls, "amax": self.amax}

    return Fp8Probe


# ---- 6 proxy ----------------------------------------------------------------------------------------------

SYNC_RUNTIME_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def _proxy_sizes(ctx: Ctx, bench) -> dict:
    if ctx.cpu:  # small: step time and the dispatch counts only
        return dict(bench.SIZES["quick"], hidden=256, layers=2, heads=4, ffn=688, k=1, mbs=1)
    # 7B-shaped: Vicuna-7B's width, heads, ffn and vocabulary; 4 layers; 576 image + 64 text tokens
    return dict(hidden=4096, layers=4, heads=32, ffn=11008, vocab=32000, img=96, patch=4, vit_hidden=64,
                vit_layers=2, prompt=8, text=56, k=2, mbs=4)


def _build_proxy(ctx: Ctx, bench, s: dict, variant: str):
    """bench_basic_step's proxy; on a GPU its config initialised on the device in bf16."""
    import torch
    from nemo_basic.models.capture import attach_lse_attention
    from nemo_basic.testing import tiny

    reset_parallel_state()
    if ctx.cpu:
        return bench.build(s, variant, stage=1)
    torch.manual_seed(1234)
    tiny.init_parallel(1, 1, 1234)
    config = bench.neva_config(s, bench.basic_config(variant, s["k"]), stage=1)
    for c in (config, config.language_transformer_config, config.vision_transformer_config,
              config.vision_projection_config):
        c.use_cpu_initialization, c.params_dtype, c.bf16 = False, torch.bfloat16, True
    model = config.configure_model(bench._Tokenizer(s["vocab"])).cuda().bfloat16()
    if variant == "off_lse":  # as bench_basic_step.build: BASIC's attention kernel, mass discarded
        for layer in model.language_model.decoder.layers:
            if layer.layer_number <= s["k"]:
                attach_lse_attention(layer.self_attention.core_attention, bench._KernelOnly(), layer.layer_number)
    return model


def _profile_syncs(step) -> dict:
    import collections

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    names = collections.Counter(e.name for e in prof.events())
    return {"sync_calls": sum(names[n] for n in SYNC_RUNTIME_CALLS),
            "memcpy_dtoh": sum(c for n, c in names.items() if n.startswith("Memcpy DtoH")),
            "memcpy_htod_pageable": sum(c for n, c in names.items() if n.startswith("Memcpy HtoD (Pageable")),
            "by_call": {n: names[n] for n in SYNC_RUNTIME_CALLS if names[n]}}


def _sds_gemm_timing(ctx: Ctx, s: dict) -> dict:
    """The three [R × d × N] products of L_sds (R = the micro-batch's image rows) in fp32 with
    TF32 off / on and in bf16, and the library's L_sds forward + backward with TF32 off / on."""
    import torch
    from nemo_basic import supervision as S

    R, d, N = s["mbs"] * (s["img"] // s["patch"]) ** 2, s["hidden"], s["vocab"]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(R, d, device="cuda", generator=g)
    t = x + 0.1 * torch.randn(R, d, device="cuda", generator=g)
    table = (0.02 * torch.randn(N, d, device="cuda", generator=g)).bfloat16()
    flops = 3 * 2 * R * d * N

    def gemms(dtype):
        def run():
            e = table.to(dtype)
            xs, ts = x.to(dtype), t.to(dtype)
            z = torch.cat([xs, ts - xs]) @ e.T
            (z[:R] - z[R:]) @ e
        return run

    v = x.view(s["mbs"], -1, d).bfloat16().requires_grad_()
    v_hat = t.view(s["mbs"], -1, d)
    a = torch.full(v.shape[:2], 1.0 / v.shape[1], device="cuda")

    def library():
        v.grad = None
        S.semantic_distribution_loss(v, v_hat, table, a, vocab_size=N).backward()

    before = torch.backends.cuda.matmul.allow_tf32
    out = {"rows": R, "d": d, "N": N, "gflop": flops / 1e9}
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            key = "tf32" if tf32 else "fp32"
            out[f"gemms_{key}_ms"] = 1e3 * statistics.median(cuda_time(gemms(torch.float32), 5))
            out[f"library_{key}_ms"] = 1e3 * statistics.median(cuda_time(library, 5))
        out["gemms_bf16_ms"] = 1e3 * statistics.median(cuda_time(gemms(torch.bfloat16), 5))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    for key in ("fp32", "tf32", "bf16"):
        out[f"gemms_{key}_tflops"] = flops / (out[f"gemms_{key}_ms"] / 1e3) / 1e12
    return out


@check(6, "proxy", budget_gpu=240, budget_cpu=240)
def check_proxy(ctx: Ctx, out: Outcome) -> None:
    """7B-shaped proxy step with BASIC on / off: time, peak memory, host syncs; L_sds GEMMs."""
    import torch

    ensure_process_group(ctx)
    bench = bench_module()
    from nemo_basic.testing.syncs import count_host_syncs  # the counter the CPU sync test uses
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator, init_num_microbatches_calculator)

    s = _proxy_sizes(ctx, bench)
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(0, None, s["mbs"], s["mbs"], 1)
    variants = ("off", "on") if ctx.cpu else ("off", "off_lse", "on")
    models, state = {}, None
    for v in variants:
        models[v] = _build_proxy(ctx, bench, s, v)
        if state is None:
            state = models[v].state_dict()
        else:
            models[v].load_state_dict(state, strict=True)
    del state
    batch = bench.make_batch(s)
    batch = {k_: (t.to(ctx.device) if torch.is_tensor(t) else t) for k_, t in batch.items()}
    batch["images"] = batch["images"].to(ctx.dtype)
    out.numbers["sizes"] = s
    out.numbers["seq_length"] = s["prompt"] + (s["img"] // s["patch"]) ** 2 + s["text"]

    def step(v):
        return lambda: bench.train_step(models[v], batch)

    # operators that make the host wait for the device, per step (both modes), after a warm-up step each
    for v in variants:
        step(v)()
    ops = {}
    for v in variants:
        with count_host_syncs() as counter:
            step(v)()
        ops[v] = dict(counter.counts)
    out.numbers["sync_ops"] = ops
    out.numbers["sync_ops_total"] = {v: sum(c.values()) for v, c in ops.items()}
    reps = 3 if ctx.cpu else 10
    times = {v: [] for v in variants}
    for _ in range(reps):  # alternate the variants, so drift affects all alike
        for v in variants:
            if ctx.cpu:
                start = time.perf_counter()
                step(v)()
                times[v].append(time.perf_counter() - start)
            else:
                times[v] += cuda_time(step(v), 1, warmup=0)
    med = {v: statistics.median(t) for v, t in times.items()}
    out.numbers["step_ms_median"] = {v: 1e3 * t for v, t in med.items()}
    out.numbers["step_ms_min"] = {v: 1e3 * min(t) for v, t in times.items()}
    out.numbers["on_over_off"] = med["on"] / med["off"]
    if "off_lse" in med:
        out.numbers["on_over_off_lse"] = med["on"] / med["off_lse"]
    for v, values in times.items():
        out.expect(all(math.isfinite(x) and x > 0 for x in values), f"{v}: bad step times {values}")
    summary = (f"S={out.numbers['seq_length']} B={s['mbs']} step on/off {out.numbers['on_over_off']:.3f} "
               f"({1e3 * med['on']:.1f} / {1e3 * med['off']:.1f} ms); sync ops on {out.numbers['sync_ops_total']['on']}"
               f", off {out.numbers['sync_ops_total']['off']}")
    # L_sds and the attention mass before issue 25 (hi/lo-split operands; fp32 copies of q, k) vs
    # now, bf16 operands: L_sds's GEMM FLOPs counted on meta tensors (the ratio that
    # scripts/bench_supervision.py prints), on a GPU also both times and new-vs-old accuracy.
    import bench_supervision as sup  # loaded by bench_basic_step

    shape = dict(batch=s["mbs"], m=(s["img"] // s["patch"]) ** 2, d=s["hidden"], vocab=s["vocab"])
    old_f, new_f = sup.sds_gemm_flops(shape, old=True), sup.sds_gemm_flops(shape, old=False)
    old_vs_new = {"sds_gemm_gflop_old": old_f / 1e9, "sds_gemm_gflop_new": new_f / 1e9,
                  "sds_flops_new_over_old": new_f / old_f}
    out.numbers["old_vs_new"] = old_vs_new
    out.expect(new_f <= 4 / 3 * 3 * 2 * shape["batch"] * shape["m"] * shape["d"] * shape["vocab"],
               f"L_sds GEMMs {new_f / 1e9:.1f} GFLOP exceed 4/3 of the three products")
    summary += f"; L_sds GEMM FLOPs new/old {new_f / old_f:.3f}"
    if not ctx.cpu:
        old_vs_new.update(sup.old_vs_new_timed(shape, "cuda", lambda fn: statistics.median(cuda_time(fn, 5))))
        summary += (f", time new/old {old_vs_new['sds_new_over_old']:.3f}; attention mass (bf16, S=2048) "
                    f"new/old {old_vs_new['mass_new_over_old']:.3f}")
        torch.cuda.empty_cache()
    if not ctx.cpu:
        memory, syncs = {}, {}
        for v in variants:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(v)()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            memory[v] = {"peak_gib": peak / 2**30, "step_peak_gib": (peak - base) / 2**30}
            syncs[v] = _profile_syncs(step(v))
        out.numbers["memory"] = memory
        out.numbers["profiler_syncs"] = syncs
        extra = syncs["on"]["sync_calls"] - syncs["off"]["sync_calls"]
        out.numbers["extra_sync_calls"] = extra
        out.expect(extra <= MAX_EXTRA_SYNCS, f"BASIC adds {extra} host syncs per step (> {MAX_EXTRA_SYNCS}): "
                   f"on {syncs['on']['by_call']}, off {syncs['off']['by_call']}")
        del models
        torch.cuda.empty_cache()
        out.numbers["sds_gemms"] = _sds_gemm_timing(ctx, s)
        g = out.numbers["sds_gemms"]
        summary += (f"; step peak {memory['on']['step_peak_gib']:.2f} / {memory['off']['step_peak_gib']:.2f} GiB; "
                    f"host syncs +{extra}; L_sds GEMMs fp32 {g['gemms_fp32_ms']:.1f} ms, tf32 {g['gemms_tf32_ms']:.1f},"
                    f" bf16 {g['gemms_bf16_ms']:.1f}")
    else:
        out.skip("7B-shaped proxy, peak memory, profiler host syncs, L_sds GEMMs TF32 on/off",
                 "needs CUDA (a small proxy ran for step time and the syncing-op counts, no threshold)")
    reset_parallel_state()
    out.summary = summary


# ---- environment ------------------------------------------------------------------------------------------

DISTRIBUTIONS = {"torch": ("torch",), "torchvision": ("torchvision",),
                 "transformer_engine": ("transformer_engine", "transformer-engine", "transformer_engine_torch"),
                 "megatron_core": ("megatron-core", "megatron_core"), "nemo": ("nemo_toolkit", "nemo-toolkit"),
                 "lightning": ("lightning",), "pytorch_lightning": ("pytorch-lightning", "pytorch_lightning"),
                 "transformers": ("transformers",), "tokenizers": ("tokenizers",),
                 "huggingface_hub": ("huggingface-hub", "huggingface_hub"), "numpy": ("numpy",),
                 "nemo_basic": ("nemo_basic",)}
KIT_ENV = "NEMO_BASIC_KIT"  # set by scripts/gpu_kit.py selftest: the wheel kit's folder


def kit_summary() -> Optional[dict]:
    """The wheel kit this run was installed from (scripts/gpu_kit.py's kit.json), if any."""
    import hashlib

    folder = os.environ.get(KIT_ENV)
    path = Path(folder) / "kit.json" if folder else None
    if path is None or not path.is_file():
        return None
    data = path.read_bytes()
    try:
        kit = json.loads(data)
    except ValueError:
        kit = {}
    wheels = kit.get("wheels") if isinstance(kit, dict) else None
    return {"folder": str(Path(folder).resolve()), "kit_json_sha256": hashlib.sha256(data).hexdigest(),
            "wheels": len(wheels) if isinstance(wheels, list) else None,
            "bytes": kit.get("total_bytes") if isinstance(kit, dict) else None}


def parent_environment() -> dict:
    from importlib import metadata

    versions = {}
    for key, names in DISTRIBUTIONS.items():
        versions[key] = None
        for n in names:
            try:
                versions[key] = metadata.version(n)
                break
            except metadata.PackageNotFoundError:
                continue
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    env_keys = ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE", "CUDA_VISIBLE_DEVICES",
                "NEMO_BASIC_CPU_BACKEND", "NVIDIA_PYTORCH_VERSION", "NVIDIA_NEMO_VERSION", "NEMO_VERSION",
                "CUDA_VERSION", "NCCL_VERSION", "TORCH_CUDA_ARCH_LIST", "PYTHONPATH", KIT_ENV)
    gpus = None
    if shutil.which("nvidia-smi"):  # the parent creates no CUDA context: ask the driver's tool
        try:
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                   "--format=csv,noheader"], capture_output=True, text=True,
                                  timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    import torch

    return {"versions": versions, "git_commit": commit, "python": platform.python_version(),
            "platform": platform.platform(), "hostname": socket.gethostname(), "cpus": os.cpu_count(),
            "torch_cuda": torch.version.cuda, "nvidia_smi": gpus,
            "env": {k: os.environ.get(k) for k in env_keys}, "kit": kit_summary()}


def print_versions(environment: dict) -> None:
    """The first lines of every run: what this machine has (None: not installed)."""
    v = environment["versions"]
    print(f"python {environment['python']} on {environment['platform']}, {environment['cpus']} CPUs, "
          f"commit {(environment['git_commit'] or 'unknown')[:12]}", flush=True)
    print("versions: " + ", ".join(f"{k} {v[k]}" for k in DISTRIBUTIONS), flush=True)
    print(f"torch CUDA build: {environment['torch_cuda']}; GPUs (nvidia-smi): {environment['nvidia_smi']}", flush=True)
    kit = environment.get("kit")
    if kit:
        print(f"wheel kit: {kit['folder']} ({kit['wheels']} wheels, {kit['bytes']} bytes, kit.json sha256 "
              f"{kit['kit_json_sha256'][:16]})", flush=True)


def worker_environment(ctx: Ctx, modules: bool) -> dict:
    """torch, CUDA and GPU facts (at the worker's start: torch only, nothing of nemo_basic or NeMo
    imported yet); with `modules`, the versions the imported packages report (at its end)."""
    import torch

    if modules:
        env = {}
        for key, module in (("transformer_engine_module", "transformer_engine"),
                            ("megatron_core_module", "megatron.core"), ("nemo_module", "nemo"),
                            ("nemo_basic_module", "nemo_basic")):
            try:
                env[key] = getattr(importlib.import_module(module), "__version__", None)
            except Exception as e:  # noqa: BLE001  (absent on a CPU machine: Transformer Engine)
                env[key] = f"not importable: {type(e).__name__}: {str(e)[:200]}"
        return env

    env = {"torch_module": torch.__version__, "cuda_runtime": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(),
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if torch.cuda.is_available() and not ctx.cpu:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   gpu_count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
    return env


# ---- worker and parent --------------------------------------------------------------------------------------

def child_env(ctx: Ctx) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if ctx.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --cpu on a GPU machine: the CPU backend, as on a laptop
    return env


def worker_main(names: list[str], results_path: str, cpu: bool, tmp: str) -> int:
    ctx = Ctx(cpu=cpu, tmp=tmp)

    def emit(record: dict) -> None:
        with open(results_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    emit({"event": "environment", "environment": worker_environment(ctx, modules=False)})
    for name in names:
        emit({"event": "start", "name": name})
        result = run_check(REGISTRY[name], ctx)
        emit({"event": "result", "result": result})
    emit({"event": "environment", "environment": worker_environment(ctx, modules=True)})
    return 0


_DEADLINE = [float("inf")]


def ctx_budget_left(ctx: Ctx) -> float:
    return max(0.0, _DEADLINE[0] - time.monotonic())


def run_worker_group(names: list[str], ctx: Ctx, on_result: Callable[[dict], None], environment: dict) -> None:
    """Run `names` in worker subprocesses; a worker that dies fails the check it was in, and a new
    worker takes the checks after it."""
    pending = list(names)
    while pending:
        left = ctx_budget_left(ctx)
        budget = sum(REGISTRY[n].budget_cpu if ctx.cpu else REGISTRY[n].budget_gpu for n in pending)
        timeout = min(budget + WORKER_START_S, left) if math.isfinite(left) else budget + WORKER_START_S
        if timeout < 20:
            for n in pending:
                on_result(skipped(n, "out of the run's budget (--budget)"))
            return
        results_path = os.path.join(ctx.tmp, f"worker_{len(os.listdir(ctx.tmp))}.jsonl")
        stderr_path = results_path + ".stderr"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(pending),
               "--results", results_path, "--tmp", ctx.tmp] + (["--cpu"] if ctx.cpu else [])
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=child_env(ctx), cwd=str(REPO))
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = "killed after %d s" % timeout
        records = []
        if os.path.isfile(results_path):
            with open(results_path) as f:
                records = [json.loads(line) for line in f if line.strip()]
        running = None
        for rec in records:
            if rec["event"] == "start":
                running = rec["name"]
            elif rec["event"] == "result":
                pending.remove(rec["result"]["name"])
                on_result(rec["result"])
                running = None
            elif rec["event"] == "environment":
                environment.update(rec["environment"])
        if running is None and pending and rc == 0:
            raise RuntimeError(f"worker ended without running {pending}")
        if pending:
            dead = running or pending[0]
            with open(stderr_path, errors="replace") as f:
                tail = f.read()[-4000:]
            what = "aborted (SIGABRT)" if rc in (134, -6) else f"exited with {rc}"
            on_result({"number": REGISTRY[dead].number, "name": dead, "status": "FAIL", "seconds": None,
                       "summary": f"the worker process {what} during this check", "numbers": {"rc": rc},
                       "failures": [f"worker process {what} during {dead}"], "stderr_tail": tail, "notes": [],
                       "skipped_parts": []})
            pending.remove(dead)
            if dead == "imports":  # every later worker would die in the same imports
                for n in list(pending):
                    on_result(dict(skipped(n, ""), status="FAIL", failures=["not run: the imports failed"],
                                   summary="not run: the imports failed"))
                pending.clear()


def skipped(name: str, reason: str) -> dict:
    return {"number": REGISTRY[name].number, "name": name, "status": "SKIP", "reason": reason, "seconds": 0,
            "summary": "", "numbers": {}, "failures": [], "notes": [], "skipped_parts": []}


def print_line(r: dict) -> None:
    secs = f"{r['seconds']:6.1f}s" if isinstance(r.get("seconds"), (int, float)) else "     -"
    text = r.get("reason") if r["status"] == "SKIP" else r.get("summary", "")
    print(f"{r['status']:4s}  {r['number']} {r['name']:18s} {secs}  {text}", flush=True)
    if r["status"] == "FAIL":
        for f in r.get("failures", [])[:8]:
            print(f"        - {str(f).splitlines()[0][:300] if str(f) else f}", flush=True)
    for part in r.get("skipped_parts") or []:
        print(f"SKIP     {r['name']}: {part['part']} ({part['reason']})", flush=True)


def parent_main(args) -> int:
    started = time.monotonic()
    if not args.cpu:
        import torch  # no CUDA context is created by this question

        if not torch.cuda.is_available():
            print("error: no CUDA device is visible here; run with --cpu for the checks that need none",
                  file=sys.stderr)
            return 2
    ctx = Ctx(cpu=args.cpu, tmp=tempfile.mkdtemp(prefix="gpu_selftest_"))
    if not args.cpu:
        _DEADLINE[0] = started + args.budget
    order = sorted(REGISTRY.values(), key=lambda c: c.number)
    wanted = [c.name for c in order]
    if args.only:
        unknown = set(args.only) - set(wanted)
        if unknown:
            print(f"error: unknown check(s) {sorted(unknown)}; checks: {', '.join(wanted)}", file=sys.stderr)
            return 2
        wanted = [n for n in wanted if n in args.only]
    report = {"schema": 1, "script": "scripts/gpu_selftest.py", "mode": "cpu" if args.cpu else "gpu",
              "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "budget_s": None if args.cpu else args.budget, "environment": parent_environment(), "checks": []}
    results: dict[str, dict] = {}

    def write_report() -> None:
        report["checks"] = [results[n] for n in (c.name for c in order) if n in results]
        report["counts"] = {s: sum(r["status"] == s for r in report["checks"]) for s in ("PASS", "FAIL", "SKIP")}
        report["seconds"] = round(time.monotonic() - started, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)

    lock = threading.Lock()

    def on_result(r: dict) -> None:
        with lock:
            results[r["name"]] = r
            print_line(r)
            write_report()

    print(f"nemo_basic GPU self-test ({report['mode']} mode"
          f"{'' if args.cpu else f', budget {args.budget} s'}), report: {os.path.abspath(args.out)}", flush=True)
    print_versions(report["environment"])
    write_report()

    def run_parent_check(name: str) -> None:
        if ctx_budget_left(ctx) < 60:
            on_result(skipped(name, f"out of the {args.budget} s budget"))
        else:
            on_result(run_check(REGISTRY[name], ctx))

    if ctx.cpu:
        # On a CPU the recipe's processes run beside the worker: two busy processes, half the wall time.
        parent_names = [n for n in wanted if REGISTRY[n].where == "parent"]
        beside = threading.Thread(target=lambda: [run_parent_check(n) for n in parent_names])
        beside.start()
        run_worker_group([n for n in wanted if REGISTRY[n].where == "worker"], ctx, on_result, report["environment"])
        beside.join()
    else:
        # On a GPU one check after the other, in the registry's order (the proxy's timings must not
        # share the device): consecutive worker checks share one worker process.
        group: list[str] = []
        for name in wanted + [None]:
            if name is not None and REGISTRY[name].where == "worker":
                group.append(name)
                continue
            if group:
                run_worker_group(group, ctx, on_result, report["environment"])
                group = []
            if name is not None:
                run_parent_check(name)
    if args.keep_tmp:
        report["tmp"] = ctx.tmp  # the recipe runs, worker logs and results
    else:
        shutil.rmtree(ctx.tmp, ignore_errors=True)
    report["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    failed = [r["name"] for r in results.values() if r["status"] == "FAIL"]
    report["exit_code"] = 1 if failed else 0
    write_report()
    print(f"{report['counts']['PASS']} passed, {report['counts']['FAIL']} failed, {report['counts']['SKIP']} skipped "
          f"in {report['seconds']:.0f} s; report {os.path.abspath(args.out)}", flush=True)
    return report["exit_code"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="checks: " + ", ".join(c.name for c in sorted(REGISTRY.values(),
                                                                                      key=lambda c: c.number)))
    p.add_argument("--cpu", action="store_true", help="run what runs without CUDA; CUDA-only parts are SKIPPED")
    p.add_argument("--out", default="gpu_selftest.json", help="JSON report (default ./gpu_selftest.json)")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], help="comma-separated checks to run")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (recipe runs, worker logs)")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                   help=f"GPU run: start no check after this many seconds (default {DEFAULT_BUDGET_S}: one 10-minute "
                        "command, with margin)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--recipe-child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.recipe_child is not None:
        return recipe_child(args.recipe_child[0], args.recipe_child[1:])
    if args.worker:
        return worker_main(args.worker.split(","), args.results, args.cpu, args.tmp)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
