#!/usr/bin/env python
"""How large BASIC's auxiliary gradients are next to the LM gradient, at the vision projector.

  python scripts/grad_ratio.py            # both settings, 12 training steps: ~10 min on 2 loaded cores
  python scripts/grad_ratio.py --quick    # 2 samples each, no training, 2-layer proxy (~6 min)
  # the 2026-12-02 record: --small-samples 3 --train-steps 0 --proxy-layers 4 --proxy-samples 3 (368 s)
  python scripts/grad_ratio.py --out docs/benchmarks/2026-12-02-cpu-grad_ratio.txt

For each sample: g_lm = ∇_P L_lm, g_das = ∇_P(λ1·L_das), g_sds = ∇_P(λ2·L_sds), P = every
parameter of the vision projector (flattened together), λ1 = 1, λ2 = 0.01 (BasicConfig's defaults,
the paper's values for Vicuna-7B). Reported: ‖g_aux‖/‖g_lm‖ and cos(g_aux, g_lm)
  * per sample (micro-batch of one), mean and range over the samples,
  * for the gradient of the N-sample mean loss (the mean of the per-sample gradients; the LM
    loss is then a mean over samples, not over tokens),
  * extrapolated to a batch of 256 (the paper's stage-1 global batch): per-sample gradients are
    a mean plus noise, E‖ḡ_B‖² = ‖μ‖² + (E‖g‖² − ‖μ‖²)/B, with ‖μ‖² estimated without bias from
    the N samples, (N‖ḡ_N‖² − mean‖g_i‖²)/(N − 1) (clamped at 0). Noise in the LM gradient that
    averages out over a large batch would otherwise make the LM side look larger than training
    sees it.

How the three gradients are separated (one forward per sample, BASIC on with both losses):
  * g_lm: backward of L_lm with AuxLossAutoScaler's scale set to 0 after forward. Its backward
    returns that scale as the aux loss's gradient whatever gradient arrives from above (read in
    nemo_basic/models/capture.py), so at 0 nothing of the aux losses enters.
  * g_das, g_sds: autograd of λ1·L_das·scale and λ2·L_sds·scale (the differentiable losses, kept
    by wrapping the capture's `losses`) to the projector; only V = projector(features) carries a
    gradient in them (target, degree and E are detached), so this is the short graph through the
    projector, no LLM backward.
  * checks on the first sample of each setting: backward of 0·L_lm at the forward's scale (the
    model's own injection path with the LM carrying zeros) equals g_das + g_sds, and g_lm from
    a BASIC-off forward (NeVA's own attention kernel, no capture) matches the scale-0 g_lm.
    Relative differences reported (bf16 gradients: ~1e-2 is rounding).

Settings
  (1) small, real weights: the study's model (research/study/engine.py: SmolLM2-135M, 30 layers,
      d = 576, vocab 49152, + DINOv2-small at 224 px, 256 patches, k = 15, bf16), embedded
      synthetic scenes with their captions (plain template, as stage 1). Measured at a fresh
      seeded projector (the start of stage 1) and after stage-1 training with BASIC on; and once
      more with the LLM's weights replaced by Megatron's random init (same shape), so that the
      real-vs-random effect at this scale can be told apart from the shape effect in (2).
  (2) paper-shaped proxy, random weights (Megatron init, std 0.02, output projections
      std 0.02/sqrt(2L)), bf16: kept from Vicuna-7B + CLIP ViT-L/14-336: hidden 4096, 32 heads of
      128, SwiGLU ffn 11008, RMSNorm, RoPE, no biases, untied head, vocab 32000, m = 576 image
      tokens, vision feature width 1024, mlp2x_gelu projector 1024 → 4096 → 4096, k = L/2.
      Not kept: depth (L = 4, k = 2 by default instead of 32 / 16: 32 layers of 4096 do not fit
      2 cores and 24 GB in minutes), the vision tower (a random 2-layer ViT of width 1024 on 336 px
      noise images, patch 14, class token dropped, last layer's features, instead of CLIP's 24
      trained layers), the text (a short random-token prompt and a caption of random tokens, LM
      loss on the caption). Random weights are not Vicuna's: this shows how the ratio moves with
      the shape, not Vicuna's value.
"""
from __future__ import annotations

import argparse
import gc
import io
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "research"))  # the A/B study's package `study` (not installed)

PAPER_BATCH = 256
QUICK = False  # --quick: the BASIC-off forward check is skipped
T0 = time.perf_counter()


def log(*args):
    print(f"[{time.perf_counter() - T0:6.0f}s]", *args, flush=True)


# ---- gradient bookkeeping ------------------------------------------------------------------------

def flat_grad(loss: torch.Tensor, params, retain: bool) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=retain)
    return torch.cat([g.detach().float().reshape(-1) for g in grads])


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()).clamp(min=1e-300))


class LossTap:
    """Keeps the differentiable L_das / L_sds of the last forward: wraps the capture's `losses`
    (an instance attribute shadows the method that `_compute_losses` calls), values unchanged."""

    def __init__(self, capture):
        self.capture, self.last = capture, None
        original = type(capture).losses

        def losses():
            self.last = original(capture)
            return self.last

        capture.losses = losses


def separated_grads(forward, set_mode, tap: LossTap, params, check: bool, check_off: bool = True) -> dict:
    """g_lm, g_das, g_sds of one sample, from one forward with both losses on.

    g_lm: backward of L_lm with the aux scale set to 0 after forward (AuxLossAutoScaler injects
    `scale` as the aux loss's gradient, so nothing of the aux losses enters). g_das, g_sds:
    autograd of λ1·L_das and λ2·L_sds themselves (the tapped tensors) to the projector, through
    V's short graph. Check (first sample): backward of 0·L_lm at the forward's scale, i.e. what
    the model's own injection path delivers when the LM carries zeros, equals g_das + g_sds; and
    g_lm from the BASIC-off forward (NeVA's attention kernel) matches the scale-0 one."""
    from nemo_basic.models.capture import AuxLossAutoScaler

    out = {}
    set_mode("on")
    lm, values = forward()
    losses, basic = tap.last, tap.capture.basic
    scale = AuxLossAutoScaler.main_loss_backward_scale  # what forward set (1/num_microbatches)
    out["das"] = flat_grad(basic.lambda_das * losses["das"] * scale, params, retain=True)
    out["sds"] = flat_grad(basic.lambda_sds * losses["sds"] * scale, params, retain=True)
    AuxLossAutoScaler.set_loss_scale(0.0)
    out["lm"] = flat_grad(lm, params, retain=False)
    AuxLossAutoScaler.set_loss_scale(scale)
    out["lm_value"], out["das_value"], out["sds_value"] = float(lm), values.get("das"), values.get("sds")
    if check:
        # A second forward: Megatron's vocab-parallel cross entropy overwrites its saved softmax
        # in backward, so the LM graph cannot be run backward twice.
        lm2, _ = forward()
        injected = flat_grad(lm2 * 0.0, params, retain=False)
        ref = out["das"] + out["sds"]
        out["check_injected"] = float((injected - ref).norm() / ref.norm())
    if check and check_off:
        set_mode("off")
        lm3, _ = forward()
        off = flat_grad(lm3, params, retain=False)
        out["check_off_cos"] = cos(off, out["lm"])
        out["check_off_rel"] = float((off - out["lm"]).norm() / off.norm())
        set_mode("on")
    return out


def summarise(per_sample: list) -> dict:
    """Ratios and cosines per sample, of the N-sample mean, and extrapolated to a batch of 256."""
    n = len(per_sample)
    res = {"n": n}
    mean = {k: torch.stack([s[k] for s in per_sample]).mean(0) for k in ("lm", "das", "sds")}
    sq = {k: sum(float(s[k].double().norm() ** 2) for s in per_sample) / n for k in ("lm", "das", "sds")}

    def at_batch(k, b):
        if n < 2:
            return float("nan")
        mu2 = max(0.0, (n * float(mean[k].double().norm() ** 2) - sq[k]) / (n - 1))
        return math.sqrt(mu2 + (sq[k] - mu2) / b)

    for k in ("das", "sds"):
        r = [float(s[k].norm() / s["lm"].norm()) for s in per_sample]
        c = [cos(s[k], s["lm"]) for s in per_sample]
        res[f"{k}_ratio"] = sum(r) / n
        res[f"{k}_ratio_min"], res[f"{k}_ratio_max"] = min(r), max(r)
        res[f"{k}_cos"] = sum(c) / n
        res[f"{k}_ratio_meanN"] = float(mean[k].norm() / mean["lm"].norm())
        res[f"{k}_cos_meanN"] = cos(mean[k], mean["lm"])
        res[f"{k}_ratio_B256"] = at_batch(k, PAPER_BATCH) / at_batch("lm", PAPER_BATCH)
    res["lm_norm"] = sum(float(s["lm"].norm()) for s in per_sample) / n
    res["das_norm"] = sum(float(s["das"].norm()) for s in per_sample) / n
    res["sds_norm"] = sum(float(s["sds"].norm()) for s in per_sample) / n
    # The share of the per-sample LM gradient that is common to all samples (1: no noise).
    res["lm_coherence"] = (at_batch("lm", 1e12) / math.sqrt(sq["lm"])) if n > 1 else float("nan")
    for k in ("lm_value", "das_value", "sds_value"):
        vals = [s[k] for s in per_sample if s.get(k) is not None]
        res[k] = sum(vals) / len(vals) if vals else float("nan")
    for k in ("check_injected", "check_off_cos", "check_off_rel"):
        if k in per_sample[0]:
            res[k] = per_sample[0][k]
    return res


# ---- (1) the study's model ---------------------------------------------------------------------

def small_samples(built, n: int, seed: int) -> list:
    """n embedded synthetic scenes with their captions, one per micro-batch (as /tmp timing runs)."""
    import numpy as np

    from nemo_basic.data.datamodule import SampleEncoder, collate_batch
    from nemo_basic.data.embedded import _caption, _conv, make_scene

    enc = SampleEncoder(built.tokenizer, built.processor, template="plain", seq_length=320,
                        img_seq_len=built.img_seq_len)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img, scene = make_scene(rng, 224, 14)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rec = {"meta": {"id": i, "conversations": _conv([("", _caption(scene))], True)}, "images": [buf.getvalue()]}
        out.append(collate_batch([enc(rec)], image_shape=enc.image_shape))
    return out


def small_measure(built, samples, label: str) -> dict:
    from nemo_basic.models.basic_config import BasicConfig
    from study import engine as E

    modes = {"on": BasicConfig(), "off": BasicConfig(enabled=False)}
    params = E.trainable(built, 1)  # the projector only, as in stage 1
    built.model.train()

    def forward():
        lm = E.forward_loss(built, batch)
        return lm, {}

    per = []
    for i, batch in enumerate(samples):
        t = time.perf_counter()
        built.model.basic_losses()  # drop stale logs
        vals = {}

        def fwd():
            lm, _ = forward()
            vals.update(built.model.basic_losses())
            return lm, dict(vals)

        per.append(separated_grads(fwd, lambda m: E.set_basic(built, modes[m]), built.tap, params,
                                   check=(i == 0), check_off=not QUICK))
        log(f"  {label} sample {i + 1}/{len(samples)}: {time.perf_counter() - t:.1f} s")
    for p in params:
        p.requires_grad_(False)
    built.model.eval()
    E.set_basic(built, BasicConfig())
    return summarise(per)


def megatron_random_init(module: torch.nn.Module, std: float, num_layers: int, seed: int) -> None:
    """Megatron's default initialisation (init_method_normal / scaled_init_method_normal): weights
    N(0, std), the two output projections of each layer N(0, std/sqrt(2L)), norms 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2.0 * num_layers)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in leaf or "layer_norm" in name.rsplit(".", 1)[-1] or name.endswith("final_layernorm.weight"):
                p.fill_(1.0 if leaf.endswith("weight") else 0.0)
            elif leaf.endswith("bias"):
                p.zero_()
            elif name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
                p.copy_(torch.empty(p.shape).normal_(0.0, out_std, generator=g).to(p.dtype))
            else:
                p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=g).to(p.dtype))


def run_small(args) -> list:
    from nemo_basic.models.basic_config import BasicConfig
    from study import engine as E

    t = time.perf_counter()
    built = E.build(image_size=224, seq_length=320, dtype=torch.bfloat16)
    E.set_basic(built, BasicConfig())
    built.tap = LossTap(built.capture)
    lm_cfg = built.mcore.config.language_transformer_config
    k = built.mcore.capture.k
    log(f"(1) built in {time.perf_counter() - t:.0f} s: L = {lm_cfg.num_layers}, d = {lm_cfg.hidden_size}, "
        f"m = {built.img_seq_len}, k = {k}")
    samples = small_samples(built, args.small_samples, seed=1)
    shape = dict(L=lm_cfg.num_layers, d=lm_cfg.hidden_size, N=built.mcore.capture.vocab_size, m=built.img_seq_len, k=k,
                 S=int(samples[0]["tokens"].shape[1]) + built.img_seq_len - 1,
                 text=int(samples[0]["loss_mask"].sum()))
    rows = []
    E.reset(built, args.seed)
    rows.append(("(1) SmolLM2-135M real, init projector", shape, small_measure(built, samples, "init")))
    if args.train_steps > 0:
        train = small_samples(built, args.train_batch * args.train_steps, seed=2)
        from nemo_basic.data.datamodule import collate_batch

        def batch_of(i):
            parts = train[i * args.train_batch:(i + 1) * args.train_batch]
            return collate_batch([_row(p) for p in parts], image_shape=tuple(parts[0]["media"].shape[-3:]))

        t = time.perf_counter()
        E.reset(built, args.seed)
        E.set_basic(built, BasicConfig())
        hist = E.train_stage(built, 1, batch_of, args.train_steps, 1e-3, max(1, round(0.03 * args.train_steps)))
        log(f"(1) trained {args.train_steps} stage-1 steps (batch {args.train_batch}, lr 1e-3, BASIC on) in "
            f"{time.perf_counter() - t:.0f} s: lm {hist[0]['lm']:.3f} -> {hist[-1]['lm']:.3f}, das "
            f"{hist[0]['das']:.3f} -> {hist[-1]['das']:.3f}, sds {hist[0]['sds']:.3f} -> {hist[-1]['sds']:.3f}")
        rows.append((f"(1) SmolLM2-135M real, after {args.train_steps} stage-1 steps", shape,
                     small_measure(built, samples, "trained")))
    if args.small_random:
        E.reset(built, args.seed)
        megatron_random_init(built.mcore.language_model, lm_cfg.init_method_std, lm_cfg.num_layers, args.seed)
        rows.append(("(1r) SmolLM2-135M shape, random LLM, init proj", shape,
                     small_measure(built, samples, "random")))
        E.reset(built, args.seed)
    del built
    gc.collect()
    return rows


def _row(collated: dict) -> dict:
    """Un-collate a one-sample batch (for re-collating several into a training batch)."""
    return {"tokens": collated["tokens"][0], "labels": collated["labels"][0], "loss_mask": collated["loss_mask"][0],
            "media": collated["media"][:1].reshape(-1, *collated["media"].shape[-3:]), "id": "x", "truncated": False}


# ---- (2) the paper-shaped proxy ------------------------------------------------------------------

class _Tokenizer:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


def proxy_config(L: int, k: int, seq: int, vocab: int = 32000):
    import torch.nn.functional as F
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig
    from nemo.collections import llm
    from nemo.collections.vlm.vision.base import CLIPViTConfig, MultimodalProjectorConfig

    from nemo_basic.models.basic_config import BasicConfig
    from nemo_basic.models.neva import BasicNevaConfig
    from nemo_basic.models.specs import language_layer_spec, vision_layer_spec
    from nemo_basic.testing.tiny_neva import _CPU_FRIENDLY

    cpu = dict(_CPU_FRIENDLY)
    language = llm.GPTConfig(
        num_layers=L, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, kv_channels=128,
        seq_length=seq, vocab_size=vocab, make_vocab_size_divisible_by=128, position_embedding_type="rope",
        apply_rope_fusion=False, share_embeddings_and_output_weights=False, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, init_method_std=0.02,
        transformer_layer_spec=language_layer_spec(normalization="RMSNorm"), **cpu)
    vision = CLIPViTConfig(
        num_layers=2, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16, kv_channels=64,
        num_query_groups=16, img_h=336, img_w=336, patch_dim=14, ln_pre_impl=WrappedTorchNorm,
        ln_post_impl=WrappedTorchNorm, transformer_layer_spec=vision_layer_spec(), **cpu)
    TransformerConfig.__post_init__(vision)  # as tiny_neva: CLIPViTConfig skips the base initialiser
    projector = MultimodalProjectorConfig(projector_type="mlp2x_gelu", input_size=1024, hidden_size=4096,
                                          ffn_hidden_size=4096)
    return BasicNevaConfig(
        language_transformer_config=language, vision_transformer_config=vision,
        vision_projection_config=projector, vision_feature_layer=-1, batch_p2p_sync=False,
        freeze_vision_model=True, freeze_language_model=True, basic=BasicConfig(layers=k))


def run_proxy(args) -> list:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_basic.convert import ensure_model_parallel
    from nemo_basic.export.hf import ensure_microbatch_calculator
    from nemo_basic.models.basic_config import BasicConfig

    L, k, m, prompt, text = args.proxy_layers, args.proxy_layers // 2, 576, 4, args.proxy_text
    seq = prompt + m + text
    ensure_model_parallel()
    ensure_microbatch_calculator(1)
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    t = time.perf_counter()
    model = proxy_config(L, k, seq).configure_model(_Tokenizer(32000))
    model.to(torch.bfloat16)
    gc.collect()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"(2) proxy built in {time.perf_counter() - t:.0f} s: {n_params / 1e9:.2f} B parameters, L = {L}, k = {k}")
    capture = model.capture
    modes = {"on": BasicConfig(layers=k), "off": BasicConfig(layers=k, enabled=False)}
    tap = LossTap(capture)

    def set_mode(name):
        cfg = modes[name]
        if not cfg.active:
            model.capture = None
            return
        capture.basic = cfg
        model.basic = cfg
        model.capture = capture

    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.vision_projection.parameters())
    for p in params:
        p.requires_grad_(True)
    model.train()
    g = torch.Generator().manual_seed(args.seed + 7)
    per = []
    for i in range(args.proxy_samples):
        ids = torch.randint(1, 32000, (1, prompt + 1 + text), generator=g)
        ids[:, prompt] = -200
        loss_mask = torch.zeros(1, prompt + 1 + text)
        loss_mask[:, prompt + 1:] = 1.0
        labels = torch.roll(ids, -1, 1).clamp(min=1)
        batch = dict(input_ids=ids, position_ids=None, loss_mask=loss_mask, labels=labels,
                     images=torch.randn(1, 3, 336, 336, generator=g).to(torch.bfloat16),
                     num_image_tiles=torch.ones(1, dtype=torch.int))

        def forward():
            capture.pop_logs()
            out, mask = model(**batch)
            lm = (out.float() * mask.float()).sum() / mask.float().sum()
            logs = capture.pop_logs()
            return lm, {name: float(total) / count for name, (total, count) in logs.items()}

        t = time.perf_counter()
        per.append(separated_grads(forward, set_mode, tap, params, check=(i == 0), check_off=not QUICK))
        log(f"  proxy sample {i + 1}/{args.proxy_samples}: {time.perf_counter() - t:.1f} s")
    shape = dict(L=L, d=4096, N=32000, m=m, k=k, S=seq, text=text)
    row = (f"(2) 7B-shaped proxy, random, L={L}", shape, summarise(per))
    del model, capture
    gc.collect()
    return [row]


# ---- report ------------------------------------------------------------------------------------

def fmt(x, w=8, p=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a".rjust(w)
    if x != 0 and (abs(x) < 10 ** -p or abs(x) >= 10 ** (w - p - 2)):
        return f"{x:{w}.2e}"
    return f"{x:{w}.{p}f}"


def report(rows: list, args) -> str:
    lines = []
    lines.append("BASIC auxiliary vs LM gradient at the vision projector (scripts/grad_ratio.py "
                 + " ".join(sys.argv[1:]) + ")")
    lines.append(f"host {platform.node()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
                 f"bf16, lambda1 = 1, lambda2 = 0.01 (gradients below include the lambdas)")
    lines.append("das = |grad(l1*L_das)| / |grad L_lm|, sds = |grad(l2*L_sds)| / |grad L_lm|, cos = cosine to grad L_lm;")
    lines.append("per-sample: mean [min..max] over N one-sample micro-batches; meanN: gradient of the N-sample mean;")
    lines.append(f"B{PAPER_BATCH}: extrapolated to a batch of {PAPER_BATCH} (noise/B model, see the script's docstring);"
                 " coh = |E g_lm| / rms |g_lm| (1: no sample noise)")
    lines.append("")
    for name, shape, r in rows:
        lines.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in shape.items()) + f", N = {r['n']} samples")
        lines.append(f"  losses: L_lm {fmt(r['lm_value'])}  L_das {fmt(r['das_value'])}  L_sds {fmt(r['sds_value'])}"
                     f"   |g_lm| {fmt(r['lm_norm'], 9, 4)}  |g_das| {fmt(r['das_norm'], 9, 4)}  "
                     f"|g_sds| {fmt(r['sds_norm'], 9, 4)}  coh {fmt(r['lm_coherence'], 6, 2)}")
        for k in ("das", "sds"):
            lines.append(f"  {k}: per-sample ratio {fmt(r[f'{k}_ratio'])} [{fmt(r[f'{k}_ratio_min'], 7)}..{fmt(r[f'{k}_ratio_max'], 7)}]"
                         f" cos {fmt(r[f'{k}_cos'], 7)} | meanN ratio {fmt(r[f'{k}_ratio_meanN'])} cos "
                         f"{fmt(r[f'{k}_cos_meanN'], 7)} | B{PAPER_BATCH} ratio {fmt(r[f'{k}_ratio_B256'])}")
        if "check_injected" in r:
            chk = (f"  checks (sample 1): injected path (backward of 0*L_lm) vs g_das + g_sds: rel diff "
                   f"{r['check_injected']:.2e}")
            if "check_off_cos" in r:
                chk += (f"; g_lm from BASIC-off forward vs scale-0: cos {r['check_off_cos']:.5f}, "
                        f"rel diff {r['check_off_rel']:.2e}")
            lines.append(chk)
        lines.append("")
    # The headline table and the λ that would match the proxy's ratio at our scale.
    lines.append(f"{'setting':48s} {'das':>9s} {'das B256':>9s} {'cos':>7s} {'sds':>9s} {'sds B256':>9s} {'cos':>7s}")
    for name, _, r in rows:
        lines.append(f"{name[:48]:48s} {fmt(r['das_ratio'], 9)} {fmt(r['das_ratio_B256'], 9)} {fmt(r['das_cos'], 7)} "
                     f"{fmt(r['sds_ratio'], 9)} {fmt(r['sds_ratio_B256'], 9)} {fmt(r['sds_cos'], 7)}")
    proxy = [r for n, _, r in rows if n.startswith("(2)")]
    small = [(n, r) for n, _, r in rows if n.startswith("(1")]
    if proxy and small:
        p = proxy[0]
        lines.append("")
        lines.append("lambda at our scale that gives the proxy's aux/LM ratio (gradient is linear in lambda):")
        for n, r in small:
            for key, lam0, nm in (("das", 1.0, "lambda1"), ("sds", 0.01, "lambda2")):
                per = lam0 * p[f"{key}_ratio"] / r[f"{key}_ratio"]
                big = lam0 * p[f"{key}_ratio_B256"] / r[f"{key}_ratio_B256"] if r[f"{key}_ratio_B256"] > 0 else float("nan")
                lines.append(f"  {n[:48]:48s} {nm} = {fmt(per, 10, 4)} (per-sample), {fmt(big, 10, 4)} (B256)")
    lines.append("")
    lines.append(f"total wall time {time.perf_counter() - T0:.0f} s")
    return "\n".join(lines)


def chunked_frozen_dgrad(chunk: int = 8192) -> None:
    """Speed only, same math: Megatron's LinearWithFrozenWeight.backward computes
    grad_output @ weight, for the LM head a product with a reduction over the whole vocabulary
    (32000 or 49152). On this CPU torch sends a bf16 product with so long a reduction to its
    reference gemm (cpublas_gemm_impl, seen with py-spy): [613 x 32000] @ [32000 x 4096] took
    19 s, against 0.3 s per 11008-wide slice. So the reduction is split into slices of `chunk`,
    summed in fp32."""
    from megatron.core.tensor_parallel import layers

    original = layers.LinearWithFrozenWeight.backward
    if getattr(original, "_chunked", False):
        return

    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        K = weight.shape[0]
        if K <= chunk or ctx.allreduce_dgrad:
            return original(ctx, grad_output)
        g = grad_output.reshape(-1, K)
        acc = None
        for s in range(0, K, chunk):
            part = (g[:, s:s + chunk].contiguous() @ weight[s:s + chunk]).float()
            acc = part if acc is None else acc + part
        return acc.to(grad_output.dtype).reshape(*grad_output.shape[:-1], weight.shape[1]), None, None, None, None

    backward._chunked = True
    layers.LinearWithFrozenWeight.backward = staticmethod(backward)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few samples, no training, 2-layer proxy")
    ap.add_argument("--out", default=None, help="also write the report here")
    ap.add_argument("--settings", default="small,proxy", help="comma list: small, proxy")
    ap.add_argument("--small-samples", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--no-small-random", dest="small_random", action="store_false")
    ap.add_argument("--proxy-layers", type=int, default=None)
    ap.add_argument("--proxy-samples", type=int, default=None)
    ap.add_argument("--proxy-text", type=int, default=32, help="caption tokens of the proxy's samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-patch", action="store_true", help="leave Megatron's frozen-weight backward as it is (slow)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    q = args.quick
    global QUICK
    QUICK = q
    args.small_samples = args.small_samples or (2 if q else 4)
    args.train_steps = args.train_steps if args.train_steps is not None else (0 if q else 12)
    args.proxy_layers = args.proxy_layers or (2 if q else 4)
    args.proxy_samples = args.proxy_samples or (2 if q else 3)
    if q:
        args.small_random = False
    torch.set_num_threads(args.threads)
    from nemo_basic import compat

    compat.apply_nemo()
    if not args.no_patch:
        chunked_frozen_dgrad()
    rows = []
    settings = args.settings.split(",")
    if "small" in settings:
        rows += run_small(args)
    if "proxy" in settings:
        rows += run_proxy(args)
    text = report(rows, args)
    print(text, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
