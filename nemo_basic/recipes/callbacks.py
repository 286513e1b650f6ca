"""Lightning callbacks of the recipes: progress (console line, ``metrics.jsonl``, throughput in
TensorBoard, a checkpoint at the end of every job) and the per-job step limit.

Module-level classes with plain constructor arguments, so that NeMo can record the trainer in a
checkpoint's ``context/``. Imports Lightning: `nemo_basic.recipes.train` imports it when a run starts.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict

import lightning.pytorch as pl

from nemo_basic.console import say
from nemo_basic.recipes.records import METRICS_FILE, RECORDS_DIR

LOSS_KEYS = {"lm loss": "lm_loss", "basic das loss": "basic_das_loss", "basic sds loss": "basic_sds_loss"}


PARTS = {"projector": "vision_projection.", "language_model": "language_model.", "vision_model": "vision_model."}


def _parts(module):
    """(part index, parameter) of this rank's projector, language model and vision tower."""
    for name, p in module.named_parameters():
        for i, key in enumerate(PARTS.values()):
            if key in name:
                yield i, p


def weight_digest(module) -> Dict[str, float]:
    """Sum of |w| (float64) of this rank's projector, language model and vision tower: a cheap
    fingerprint showing which parts a stage changed and what a stage started from.

    Summed on the parameters' device, in float64, a bounded slice at a time (no float64 copy of
    a whole parameter: the 7B embedding alone would be 1 GB); the host reads the three sums in
    one transfer per device (one in a Megatron rank), not one per parameter."""
    import torch

    chunk = 1 << 24  # elements per float64 slice: 128 MiB at most
    totals: Dict[torch.device, list] = {}  # device → [sum per part], float64 0-d tensors
    with torch.no_grad():
        for i, p in _parts(module):
            flat = p.detach().reshape(-1)
            sums = totals.setdefault(flat.device, [torch.zeros((), dtype=torch.float64, device=flat.device)] * 3)
            for piece in flat.split(chunk):
                sums[i] = sums[i] + piece.double().abs().sum()
    out = dict.fromkeys(PARTS, 0.0)
    for sums in totals.values():
        for part, value in zip(PARTS, torch.stack(sums).tolist()):
            out[part] += value
    return out


def parameter_counts(module) -> Dict[str, Dict[str, int]]:
    """{part: {"total": n, "trainable": n}} for the projector, language model and vision tower."""
    out = {part: {"total": 0, "trainable": 0} for part in PARTS}
    for i, p in _parts(module):
        counts = out[list(PARTS)[i]]
        counts["total"] += p.numel()
        counts["trainable"] += p.numel() if p.requires_grad else 0
    return out


def _scalar(v):
    import torch

    if v is None:
        return None
    return float(v.detach().float().cpu()) if torch.is_tensor(v) else float(v)


class RecipeProgress(pl.Callback):
    """Step time, samples/s and tokens/s (logged to TensorBoard), a console line and a line in
    ``<run_dir>/recipe/metrics.jsonl`` per logged step; makes sure every job ends with a checkpoint.

    The module logs its losses in its own ``on_train_batch_end``, which Lightning calls after the
    callbacks' ones: a step's line is written at the start of the next step (or at the end).
    ``history`` (the rows) and ``params`` (trainable/total counts, weight digests) are read by
    `nemo_basic.recipes.train.run` for the summary."""

    def __init__(self, stage: int, max_steps: int, run_dir: str, log_every_n_steps: int = 1,
                 global_batch_size: int = 1, data_parallel: int = 1, config_yaml: str = ""):
        super().__init__()
        self.stage, self.max_steps, self.run_dir = stage, max_steps, run_dir
        self.every, self.gbs, self.dp = log_every_n_steps, global_batch_size, data_parallel
        self.config_yaml = config_yaml
        self.history: list = []
        self.params: dict = {}
        self.t0 = None
        self.tokens0 = 0
        self.start_step = 0
        self.train_started = False
        self.started = time.time()
        self.pending = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        self.train_started = True
        self.started = time.time()
        self.params["trainable"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self.params["total"] = sum(p.numel() for p in pl_module.parameters())
        self.params["digest_start"] = weight_digest(pl_module)
        self.params["by_part"] = parameter_counts(pl_module)
        if trainer.global_rank == 0:
            os.makedirs(os.path.join(self.run_dir, RECORDS_DIR), exist_ok=True)
            with open(os.path.join(self.run_dir, RECORDS_DIR, f"config-stage{self.stage}.yaml"), "w") as f:
                f.write(self.config_yaml)
        if self.start_step:
            say(f"stage {self.stage}: resumed at step {self.start_step} of {self.max_steps}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.flush(trainer)
        self.t0 = time.perf_counter()
        self.tokens0 = getattr(pl_module, "tokens_seen", 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dt = time.perf_counter() - (self.t0 or time.perf_counter())
        tokens = (getattr(pl_module, "tokens_seen", 0) - self.tokens0) * self.dp
        sps = self.gbs / dt if dt > 0 else float("nan")
        tps = tokens / dt if dt > 0 else float("nan")
        pl_module.log("throughput/samples_per_s", sps, batch_size=1, rank_zero_only=True)
        pl_module.log("throughput/tokens_per_s", tps, batch_size=1, rank_zero_only=True)
        pl_module.log("throughput/step_time_s", dt, batch_size=1, rank_zero_only=True)
        self.pending = (trainer.global_step, dt, sps, tps)

    def on_exception(self, trainer, pl_module, exception):
        self.flush(trainer)  # the last step's line (a stop by a signal)

    def on_train_end(self, trainer, pl_module):
        self.flush(trainer)
        self.params["digest_end"] = weight_digest(pl_module)
        if trainer.global_step > self.start_step:  # NeMo's own on_train_end skips some steps
            save_now(trainer)

    def flush(self, trainer):
        if self.pending is None:
            return
        step, dt, sps, tps = self.pending
        self.pending = None
        if trainer.global_rank != 0 or (step % self.every and step != self.max_steps and not trainer.should_stop):
            return
        m = trainer.callback_metrics
        row = {"step": step, "lm_loss": _scalar(m.get("lm loss", m.get("reduced_train_loss")))}
        for key, name in LOSS_KEYS.items():
            if key != "lm loss":
                row[name] = _scalar(m.get(key))
        row.update(lr=_scalar(m.get("lr")), step_time_s=dt, samples_per_s=sps, tokens_per_s=tps, time=time.time())
        self.history.append(row)
        with open(os.path.join(self.run_dir, METRICS_FILE), "a") as f:
            f.write(json.dumps(row) + "\n")
        done = step - self.start_step
        eta = (time.time() - self.started) / max(done, 1) * (self.max_steps - step)
        parts = [f"step {step}/{self.max_steps}", f"lm loss {row['lm_loss']:.4f}"]
        if row.get("basic_das_loss") is not None:
            parts.append(f"das {row['basic_das_loss']:.4g}")
        if row.get("basic_sds_loss") is not None:
            parts.append(f"sds {row['basic_sds_loss']:.4g}")
        if row["lr"] is not None:
            parts.append(f"lr {row['lr']:.2e}")
        parts.append(f"{dt:.1f} s/step, {sps:.2f} samples/s, {tps:.0f} tokens/s, eta {eta / 60:.1f} min")
        line = f"[stage {self.stage}] " + " | ".join(parts)
        try:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stdout)
        except Exception:  # pragma: no cover
            print(line, flush=True)


def save_now(trainer) -> None:
    """A checkpoint of the current step (top-k name and "-last" link), unless one was saved at this
    step. Lightning's "-last" alone would only link the previous save when ``every_n_steps`` does
    not divide the step, and name it after the current one."""
    cb = trainer.checkpoint_callback
    if cb is None:
        return
    candidates = cb._monitor_candidates(trainer)
    if getattr(cb, "_last_global_step_saved", None) != trainer.global_step:
        cb._save_topk_checkpoint(trainer, candidates)
    if cb.last_model_path != cb.format_checkpoint_name(candidates, cb.CHECKPOINT_NAME_LAST):
        cb._save_last_checkpoint(trainer, candidates)
    io = getattr(trainer.strategy, "checkpoint_io", None)
    if hasattr(io, "maybe_finalize_save_checkpoint"):  # an asynchronous save: wait for it
        io.maybe_finalize_save_checkpoint(blocking=True)


class Preemption(pl.Callback):
    """SIGTERM / SIGUSR1 (Slurm's preemption, ``scancel``, a time limit with ``--signal``): finish the
    step, save a checkpoint, stop; `nemo_basic.recipes.train.run` then exits non-zero so that the job
    is requeued (NeMo-Run and sbatch wrappers requeue on a non-zero exit). SIGINT (Ctrl-C) keeps
    Lightning's immediate stop and says which step was reached and where a rerun resumes.

    A replacement of NeMo's ``PreemptionCallback``, which reads ``torch.cuda.current_device()`` (no
    CPU runs) and ends with ``sys.exit(0)`` (no requeue). Every rank records the signal; the flag is
    combined over ranks at each step boundary, so all ranks stop at the same step."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, stage: int, run_dir: str):
        super().__init__()
        self.stage, self.run_dir = stage, run_dir
        self.received = None  # name of the first signal seen
        self.preempted = None  # name of the signal that stopped the run (after the save)
        self.saved = None
        self._previous = {}

    def _handler(self, signum, frame):
        import signal

        if self.received is None:
            self.received = signal.Signals(signum).name

    def _install(self):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                old = signal.signal(sig, self._handler)
                self._previous.setdefault(sig, old)

    def setup(self, trainer, pl_module, stage=None):
        # before Lightning registers its own: it then leaves SIGUSR1 alone (its Slurm handler would requeue
        # by itself and save elsewhere)
        self._install()

    def on_train_start(self, trainer, pl_module):
        # Lightning's SIGTERM handler (installed after `setup`) would end the loop with SystemExit(0)
        # before the save: ours alone from here on
        self._install()

    def teardown(self, trainer, pl_module, stage=None):
        import signal

        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}

    def _any_rank(self, trainer) -> bool:
        import torch

        flag = self.received is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = "cpu"
            if torch.distributed.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.preempted or not self._any_rank(trainer):
            return
        self.preempted = self.received or "SIGTERM"
        say(f"stage {self.stage}: {self.preempted} received: saving a checkpoint at step {trainer.global_step}")
        save_now(trainer)
        self.saved = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
        trainer.should_stop = True

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt):
            from nemo_basic.recipes import resume as resume_mod

            choice = resume_mod.choose(self.run_dir)
            where = (f"a rerun resumes after step {choice.step + 1}, from {choice.chosen}"
                     if choice.chosen and choice.step is not None
                     else f"a rerun resumes from {choice.chosen}" if choice.chosen
                     else "no checkpoint yet: a rerun starts from step 0")
            say(f"stage {self.stage}: interrupted (Ctrl-C) at step {trainer.global_step}; nothing was saved "
                f"now; {where}")


class StopAfterSteps(pl.Callback):
    """Stop after ``steps`` steps of this job; the last checkpoint is written at the end and the next
    launch resumes from it. For Slurm job chains with a time limit (and for the resume tests)."""

    def __init__(self, stage: int, steps: int, max_steps: int):
        super().__init__()
        self.stage, self.steps, self.max_steps = stage, steps, max_steps
        self.start = 0
        self.stopped = False

    def on_train_start(self, trainer, pl_module):
        self.start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - self.start >= self.steps and trainer.global_step < self.max_steps:
            trainer.should_stop = True
            self.stopped = True

    def on_train_end(self, trainer, pl_module):
        if self.stopped:
            say(f"stage {self.stage}: stopped after {self.steps} steps of this job (trainer.stop_after_steps) at "
                f"step {trainer.global_step} of {self.max_steps}; launch again to resume")
