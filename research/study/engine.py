"""The study's training engine: the recipe's model (``RecipeNevaModel`` built from the embedded
recipe configuration, its real forward pass and BASIC losses), trained in one process for every
arm and seed.

Why not the recipe's NeMo trainer: one trainer start (imports, model build, HF weight load) and
the checkpoints it writes cost about a minute per stage on two CPU cores, which the study would
pay 2 x arms x seeds times. Here the model is built once; each run restores the LLM's pretrained
weights and a seeded projector initialisation from memory, then trains with AdamW under the
recipe's schedule (linear warm-up, cosine decay, gradient clipping at 1.0, as
``recipes.train.build_optim``). Forward, loss masks, the first-token fix and the auxiliary
gradients (``capture.AuxLossAutoScaler``) are the model's own code, unchanged.

Precision: bfloat16 weights and activations (as the paper's GPUs run), float32 master weights
and optimizer state for what trains (as Megatron's mixed-precision optimizer keeps them). bf16
matrix products are fast only where PyTorch's oneDNN takes them (AVX-512 BF16 or AMX); on an
AVX2-only CPU (``torch.backends.cpu.get_cpu_capability() == "AVX2"``) they take a slow fallback: the
engine test's 12 steps (tests/study/_engine_rerun.py, one core) took 866 s in bf16, 88 s in float32.
``build(dtype=torch.float32)`` runs the same code at the recipe's CPU precision.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch

from nemo_basic import compat

compat.apply_nemo()

from nemo_basic.models.basic_config import BasicConfig  # noqa: E402


def recipe_config(image_size: int, seq_length: int, overrides: Iterable[str] = ()):
    """The embedded stage-1 recipe configuration at this image size (validated as the recipe does)."""
    from nemo_basic.recipes.cli import default_config
    from nemo_basic.recipes.schema import load_config

    return load_config(default_config(1), [f"model.image_size={image_size}", f"model.seq_length={seq_length}",
                                           *overrides], stage=1)


@dataclass
class Built:
    model: torch.nn.Module          # the RecipeNevaModel (Lightning module)
    mcore: torch.nn.Module          # its BasicMCoreNevaModel
    tokenizer: object               # the NeMo tokenizer wrapper
    processor: object               # the image processor at model.image_size
    llm_dir: str
    vision_dir: str
    img_seq_len: int
    pretrained: Dict[str, torch.Tensor]  # the LLM's weights after the HF load (bf16, CPU)
    dtype: torch.dtype


def build(image_size: int, seq_length: int, dtype: torch.dtype = torch.bfloat16) -> Built:
    from nemo_basic.convert import ensure_model_parallel
    from nemo_basic.export.hf import ensure_microbatch_calculator
    from nemo_basic.recipes import model as model_mod
    from nemo_basic.recipes.train import resolve_runtime

    cfg = recipe_config(image_size, seq_length)
    ensure_model_parallel()
    ensure_microbatch_calculator(1)
    llm_dir = model_mod.resolve_model_path(cfg.model.llm_path, "model.llm_path", "llm")
    vision_dir = model_mod.resolve_model_path(cfg.model.vision_path, "model.vision_path", "vision")
    runtime = resolve_runtime(cfg, False, 0)
    model, tokenizer, processor = model_mod.build_model(cfg, runtime, None, llm_dir, vision_dir)
    model.configure_model()
    mcore = model.module
    mcore.to(dtype)
    pretrained = {k: v.detach().clone() for k, v in mcore.state_dict().items()
                  if k.startswith("language_model.") and torch.is_tensor(v)}
    return Built(model, mcore, tokenizer, processor, llm_dir, vision_dir, model.img_seq_len, pretrained, dtype)


def set_basic(built: Built, basic: BasicConfig) -> None:
    """Switch BASIC's settings between runs. The capture hooks stay attached to layers 1..k (built
    with BASIC on); BASIC off detaches the capture from the model, whose forward is then NeVA's
    (the hooked layers see an inactive capture and run their original attention)."""
    from nemo_basic import supervision as S

    m = built.mcore
    if not hasattr(built, "capture"):
        built.capture = m.capture
    capture = built.capture
    if capture is None:
        raise RuntimeError("the study's model must be built with BASIC on (the capture hooks are attached then)")
    if not basic.active:
        m.capture = None
        return
    k = basic.num_supervision_layers(m.config.language_transformer_config.num_layers)
    if k != capture.k:
        raise ValueError(f"basic.layers: the study's model supervises layers 1..{capture.k}; got k = {k}")
    capture.basic = basic
    capture.weights = S.layer_weights(k, basic.weighting).tolist()
    m.basic = basic
    m.capture = capture


def jitter_(w: torch.Tensor, rel: float, generator: torch.Generator) -> torch.Tensor:
    """w *= 1 + rel * z, z ~ N(0, 1) from its own generator, in place (float32, before the cast to
    the model's dtype): the noise floor's near-null perturbation (protocol.INIT_JITTER)."""
    z = torch.empty(w.shape, dtype=w.dtype).normal_(0.0, 1.0, generator=generator)
    return w.mul_(z.mul_(rel).add_(1.0))


def reset(built: Built, seed: int, jitter: float = 0.0) -> None:
    """The LLM's pretrained weights and a fresh, seeded projector (Megatron's initialisation).
    ``jitter`` > 0 moves each initial weight by that relative amount (its own seed stream, so the
    draw underneath is the unperturbed run's)."""
    m = built.mcore
    with torch.no_grad():
        sd = m.state_dict()
        for k, v in built.pretrained.items():
            sd[k].copy_(v)
        g = torch.Generator().manual_seed(10_000 + seed)
        gj = torch.Generator().manual_seed(20_000 + seed)
        std = m.config.vision_projection_config.init_method_std if hasattr(
            m.config.vision_projection_config, "init_method_std") else 0.02
        for name, p in m.vision_projection.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                w = torch.empty(p.shape).normal_(0.0, std, generator=g)
                if jitter:
                    jitter_(w, jitter, gj)
                p.copy_(w.to(p.dtype))


def trainable(built: Built, stage: int) -> List[torch.nn.Parameter]:
    m = built.mcore
    for p in m.parameters():
        p.requires_grad_(False)
    parts = [m.vision_projection] + ([m.language_model] if stage == 2 else [])
    out = []
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(True)
            out.append(p)
    return out


class MixedAdamW:
    """AdamW on float32 master copies of bf16 parameters (Megatron's mixed-precision optimizer)."""

    def __init__(self, params: List[torch.nn.Parameter], lr: float, weight_decay: float, clip: float = 1.0):
        self.params = params
        self.master = [p.detach().float().clone().requires_grad_(True) for p in params]
        self.opt = torch.optim.AdamW(self.master, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        self.clip = clip

    def step(self, lr: float) -> float:
        for m, p in zip(self.master, self.params):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        norm = torch.nn.utils.clip_grad_norm_([m for m in self.master if m.grad is not None], self.clip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                p.copy_(m)
        return float(norm)


def lr_at(step: int, total: int, lr: float, warmup: int, min_lr: float = 0.0) -> float:
    """Linear warm-up then cosine to min_lr (Megatron's OptimizerParamScheduler, 'cosine')."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def forward_loss(built: Built, batch: dict):
    """(L_lm, BASIC loss values) of one micro-batch: the model's forward, NeVA's masked token mean."""
    from nemo_basic.models.neva import basic_neva_forward_step

    b = dict(batch)
    b["media"] = b["media"].to(built.dtype)
    out = basic_neva_forward_step(built.model, b)
    per_token, mask = out if isinstance(out, tuple) else (out, None)
    mask = mask if mask is not None else b["loss_mask"]
    lm = (per_token.float() * mask.float()).sum() / mask.float().sum().clamp(min=1.0)
    return lm


def train_stage(built: Built, stage: int, batches: Callable[[int], dict], steps: int, lr: float,
                warmup: int, log: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Train ``steps`` steps (``batches(i)`` gives step i's batch, the same for every arm)."""
    params = trainable(built, stage)
    opt = MixedAdamW(params, lr=lr, weight_decay=0.0)
    built.model.train()
    rows = []
    for i in range(steps):
        t0 = time.perf_counter()
        batch = batches(i)
        lm = forward_loss(built, batch)
        lm.backward()
        aux = built.model.basic_losses()
        norm = opt.step(lr_at(i, steps, lr, warmup))
        row = {"step": i + 1, "lm": float(lm), "das": aux.get("das"), "sds": aux.get("sds"),
               "grad_norm": norm, "seconds": time.perf_counter() - t0}
        rows.append(row)
        if log is not None:
            log(row)
    for p in params:
        p.requires_grad_(False)
    built.model.eval()
    return rows
