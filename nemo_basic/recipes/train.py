"""Trainer assembly and the training run of a recipe (NeMo 2: `nl.Trainer` + `nl.MegatronStrategy`).

`run(cfg)` does, in this order:
1. light checks: machine (`schema.resolve_runtime`), model shape (`model.check_model`), data
   paths, the stage-2 starting checkpoint — all before anything heavy is imported or built;
2. preparation: the embedded models / data on first use (cached), steps from the data size;
3. NeMo: model, data module, optimizer (AdamW, warm-up + cosine), strategy, trainer, logger
   (TensorBoard + ``metrics.jsonl`` + console), checkpointing and automatic resume;
4. a summary (losses at the start and end, where the checkpoint is), returned and printed.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Optional

from nemo_basic.console import rank, say
from nemo_basic.recipes import resume as resume_mod
from nemo_basic.recipes.records import METRICS_FILE, RECORDS_DIR, SUMMARY_FILE
from nemo_basic.recipes.schema import RecipeConfig, RecipeConfigError, Runtime, bad_value, resolve_runtime, to_yaml


# -- checkpoints ---------------------------------------------------------------------------------------------
def latest_checkpoint(path: str) -> Optional[str]:
    """``path`` itself if it is a checkpoint, else the newest complete checkpoint of the run folder
    ``path`` (its "-last" link when one points at it), checked against its index (`resume.problem`)."""
    path = os.path.abspath(os.path.expanduser(path))
    return path if os.path.isdir(os.path.join(path, "weights")) else resume_mod.choose(path).chosen


def resolve_init_from(cfg: RecipeConfig) -> Optional[str]:
    if cfg.run.stage != 2 or cfg.checkpoint.init_from is None:
        return None
    where = cfg.checkpoint.init_from
    if where == "auto":
        where = os.path.join(cfg.run_root, "stage1")
    ckpt = latest_checkpoint(where) if os.path.isdir(os.path.expanduser(where)) else None
    if ckpt is None:
        raise bad_value("checkpoint.init_from", cfg.checkpoint.init_from, "a stage-1 run folder or checkpoint",
                        f"no finished checkpoint in {os.path.abspath(os.path.expanduser(where))}; run stage 1 "
                        "first (examples/basic_pretrain.py with the same run.name and run.log_dir), or set "
                        "checkpoint.init_from=null to start from the pretrained LLM with a fresh projector")
    why = resume_mod.problem(os.path.realpath(ckpt))
    if why is not None:
        raise bad_value("checkpoint.init_from", cfg.checkpoint.init_from, "a complete stage-1 checkpoint",
                        f"{os.path.realpath(ckpt)}: {why}")
    return os.path.realpath(ckpt)  # "-last" is a link that moves if stage 1 runs on


def choose_resume(cfg: RecipeConfig, run_dir: str):
    """The checkpoint this job resumes from (`resume.choose`), said once with the reason for each one
    passed over; rank 0 moves those aside (nothing is deleted). Returns (choice, [(from, to)])."""
    if not os.path.isdir(run_dir):
        return resume_mod.Choice(), []
    if not cfg.checkpoint.resume:
        found = resume_mod.checkpoints(run_dir)
        if found:  # a fresh start would write over them, step by step, under the same names
            raise bad_value("checkpoint.resume", False, "true, or a run folder without checkpoints",
                            f"{os.path.join(run_dir, 'checkpoints')} holds {len(found)} checkpoint(s) that a fresh "
                            "start would overwrite; set run.name=... (a new run folder) or move them away")
        return resume_mod.Choice(), []
    choice = resume_mod.choose(run_dir)
    moved = []
    if rank() == 0:
        for line in resume_mod.describe(choice, run_dir):
            say(line)
        moved = resume_mod.set_aside(run_dir, choice)
    return choice, moved


def _load_failure(run_dir: str, ckpt: str, e: BaseException) -> str:
    import traceback

    log = os.path.join(run_dir, RECORDS_DIR, "load-error.txt")
    try:
        with open(log, "w") as f:
            traceback.print_exception(type(e), e, e.__traceback__, file=f)
    except OSError:
        log = "(not written)"
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return (f"checkpoint {ckpt} could not be loaded ({type(e).__name__}: {first}) although its index is "
            f"complete; nothing was changed. Move it out of {os.path.dirname(ckpt)}/ and launch again to "
            f"resume from the one before it (traceback in {log})")


# -- NeMo objects ---------------------------------------------------------------------------------------------
def build_optim(cfg: RecipeConfig, runtime: Runtime, max_steps: int):
    import torch
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl

    o = cfg.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else math.ceil(o.warmup_ratio * max_steps)
    warmup = min(warmup, max(0, max_steps - 1))
    opt = OptimizerConfig(
        optimizer="adam",  # Megatron's "adam" is AdamW (decoupled weight decay)
        lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=runtime.dtype == torch.bfloat16,
        fp16=runtime.dtype == torch.float16, params_dtype=runtime.dtype,
        use_distributed_optimizer=runtime.distributed_optimizer)
    sched = nl.lr_scheduler.CosineAnnealingScheduler(max_steps=max_steps, warmup_steps=warmup, constant_steps=0,
                                                     min_lr=o.min_lr)
    return nl.MegatronOptimizerModule(config=opt, lr_scheduler=sched), warmup


def precision_plugin(cfg: RecipeConfig, runtime: Runtime):
    """NeMo's MegatronMixedPrecision for the run: fp32, bf16-mixed, 16-mixed, or bf16 with FP8 GEMMs."""
    from nemo import lightning as nl

    t = cfg.trainer
    if runtime.precision == "32":
        return nl.MegatronMixedPrecision(precision="32")
    kw = dict(precision=runtime.precision, params_dtype=runtime.dtype, pipeline_dtype=runtime.dtype,
              autocast_enabled=False, grad_reduce_in_fp32=True)
    if t.fp8 is not None:  # as NeMo's bf16_with_fp8_mixed recipe, but FP8 weights only when asked:
        # NeMo turns fp8_param_gather into fp8_param (FP8 primary weights), which NeVA never ran
        kw.update(fp8=t.fp8, fp8_recipe=t.fp8_recipe, fp8_margin=0, fp8_amax_history_len=1024,
                  fp8_amax_compute_algo="max", fp8_param_gather=t.fp8_param)
    return nl.MegatronMixedPrecision(**kw)


def ddp_settings(cfg: RecipeConfig, runtime: Runtime) -> Dict[str, Any]:
    """Megatron DDP's settings on GPUs. The overlapped parameter all-gather of the distributed
    optimizer is turned off when layers 1..k span pipeline stages while the LLM trains: the stage
    that completes L_sds copies E from the first stage at the start of each step
    (`nemo_basic.models.pipeline.EmbeddingSync`), and with the overlap E's update of the last step
    is gathered only during this step's forward, so the copy would lag one step."""
    p = cfg.parallel
    arch = runtime.arch
    lagging_copy = bool(arch is not None and arch.spans_stages and not cfg.freeze_language_model)
    return dict(check_for_nan_in_grad=True, grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
                overlap_param_gather=p.overlap_param_gather and runtime.distributed_optimizer and not lagging_copy,
                average_in_collective=True, use_distributed_optimizer=runtime.distributed_optimizer)


def build_trainer(cfg: RecipeConfig, runtime: Runtime, max_steps: int, callbacks: list):
    from nemo import lightning as nl

    p, t = cfg.parallel, cfg.trainer
    strategy_kw: Dict[str, Any] = dict(
        tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline,
        sequence_parallel=p.sequence_parallel, pipeline_dtype=runtime.dtype, ckpt_async_save=cfg.checkpoint.async_save,
        ckpt_load_strictness=None)
    if p.num_layers_in_first_pipeline_stage is not None:
        strategy_kw["num_layers_in_first_pipeline_stage"] = p.num_layers_in_first_pipeline_stage
    if runtime.on_gpu:
        from megatron.core.distributed import DistributedDataParallelConfig

        strategy_kw["ddp"] = DistributedDataParallelConfig(**ddp_settings(cfg, runtime))
    strategy = nl.MegatronStrategy(**strategy_kw)
    plugin = precision_plugin(cfg, runtime)
    return nl.Trainer(
        accelerator=runtime.accelerator, devices=runtime.devices, num_nodes=t.num_nodes, max_steps=max_steps,
        strategy=strategy, plugins=plugin, callbacks=callbacks, log_every_n_steps=t.log_every_n_steps,
        limit_val_batches=0, num_sanity_val_steps=0,
        enable_progress_bar=t.progress_bar, use_distributed_sampler=False)


def build_logger(cfg: RecipeConfig, max_steps: int):
    from lightning.pytorch.loggers import TensorBoardLogger
    from nemo import lightning as nl

    c = cfg.checkpoint
    ckpt = nl.ModelCheckpoint(
        save_last="link", save_top_k=c.keep, monitor="step", mode="max", filename="{step}-{consumed_samples}",
        every_n_train_steps=c.every_n_steps or max_steps, save_optim_on_train_end=True,
        always_save_context=False, save_context_on_train_end=True,
        enable_version_counter=False)  # one name per step: never a "-v1" copy next to an older save
    tb = TensorBoardLogger(save_dir=cfg.run_dir, name="tb_logs", version="")
    return nl.NeMoLogger(explicit_log_dir=cfg.run_dir, name=cfg.run.name, use_datetime_version=False,
                         ckpt=ckpt, tensorboard=tb, update_logger_directory=False)


# -- the run ---------------------------------------------------------------------------------------------------
def preflight(cfg: RecipeConfig, require_files: bool = True, assume_target: bool = False) -> Runtime:
    """Every check that needs neither weights nor data loading: returns the run's facts.

    ``require_files=False`` (``--check``) skips the checks of checkpoint and data paths (placeholders
    in the paper's configs) and of the stage-1 checkpoint; ``assume_target=True`` checks a GPU
    config as on its GPUs (``trainer.devices`` per node) on a machine without them."""
    import torch

    from nemo_basic.recipes import data as data_mod
    from nemo_basic.recipes import model as model_mod

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count()
    notes = []
    if assume_target and not cuda and cfg.trainer.accelerator == "gpu":
        cuda, gpus = True, cfg.trainer.devices or 8
        notes.append(f"checked as on GPUs ({gpus} per node): this machine has no CUDA")
    model_mod.check_model(cfg)  # the configuration's own errors first, then this machine's
    runtime = resolve_runtime(cfg, cuda, gpus)
    arch = model_mod.check_model(cfg, runtime if not notes else None)
    if cfg.model.type == "hf":
        for key in ("llm_path", "vision_path"):
            path = getattr(cfg.model, key)
            if not model_mod.is_embedded(path) and not os.path.isdir(os.path.expanduser(path)):
                if require_files:
                    raise bad_value(f"model.{key}", path, "a Hugging Face checkpoint folder",
                                    f"{os.path.abspath(os.path.expanduser(path))} does not exist")
                notes.append(f"model.{key} = {path!r} does not exist here (architecture from the preset)")
    try:
        data_mod.check_data_paths(cfg)
        runtime.init_from = resolve_init_from(cfg)
    except RecipeConfigError as e:
        if require_files:
            raise
        notes.append(str(e))
    runtime.arch = arch
    runtime.blockers = model_mod.training_blockers(cfg, arch)
    runtime.notes = notes
    return runtime


def run(cfg: RecipeConfig) -> dict:
    """Train the recipe; returns the summary (also written to ``<run_dir>/summary.json``)."""
    t_start = time.time()
    runtime = preflight(cfg)
    if runtime.blockers:
        raise RecipeConfigError("; ".join(runtime.blockers))
    arch = runtime.arch
    run_dir = cfg.run_dir
    say(f"stage {cfg.run.stage} '{cfg.run.name}' on {runtime.world_size} x {runtime.accelerator} "
        f"(TP {cfg.parallel.tensor}, PP {cfg.parallel.pipeline}, DP {runtime.data_parallel}; "
        f"{runtime.precision}{', fp8 ' + cfg.trainer.fp8 if cfg.trainer.fp8 else ''}"
        f"{', distributed optimizer' if runtime.distributed_optimizer else ''}); run folder {run_dir}")
    say(arch.summary())
    choice, set_aside = choose_resume(cfg, run_dir)  # before anything heavy: which checkpoint, and why

    from nemo_basic import compat

    compat.apply_nemo()
    from nemo.collections import llm
    from nemo import lightning as nl

    from nemo_basic.recipes import data as data_mod
    from nemo_basic.recipes import model as model_mod

    llm_dir = vision_dir = None
    if cfg.model.type == "hf":
        llm_dir = model_mod.resolve_model_path(cfg.model.llm_path, "model.llm_path", "llm")
        vision_dir = model_mod.resolve_model_path(cfg.model.vision_path, "model.vision_path", "vision")
        paths = data_mod.resolve_data_paths(cfg)
        records = data_mod.num_records(paths)
    else:
        paths, records = None, None
    max_steps = data_mod.steps_for(cfg, records)
    optim, warmup = build_optim(cfg, runtime, max_steps)
    model, tokenizer, processor = model_mod.build_model(cfg, runtime, optim, llm_dir, vision_dir)
    datamodule = data_mod.build_data(cfg, runtime, tokenizer, processor, arch.img_seq_len, paths, max_steps)
    say(f"{max_steps} steps of {cfg.data.global_batch_size} samples"
        + (f" ({records} records, {cfg.trainer.epochs:g} epoch(s))" if records and cfg.trainer.max_steps is None
           else "") + f", warm-up {warmup}, lr {cfg.optim.lr:g} cosine to {cfg.optim.min_lr:g}; "
        f"trainable: projector{'' if cfg.freeze_language_model else ' + LLM'}"
        f"{'' if cfg.model.freeze_vision_model else ' + vision tower'}; "
        + (f"BASIC on (k = {arch.k}, {cfg.basic.weighting}, {cfg.basic.degree})" if cfg.basic.active
           else "BASIC off"))

    os.makedirs(os.path.join(run_dir, RECORDS_DIR), exist_ok=True)
    from nemo_basic import console

    console.keep_in(os.path.join(run_dir, RECORDS_DIR))  # the upstream messages kept off the console
    from nemo.utils.exp_manager import TimingCallback

    from nemo_basic.recipes.callbacks import Preemption, RecipeProgress, StopAfterSteps

    progress = RecipeProgress(stage=cfg.run.stage, max_steps=max_steps, run_dir=run_dir,
                              log_every_n_steps=cfg.trainer.log_every_n_steps,
                              global_batch_size=cfg.data.global_batch_size, data_parallel=runtime.data_parallel,
                              config_yaml=to_yaml(cfg))
    preemption = Preemption(stage=cfg.run.stage, run_dir=run_dir)
    callbacks = [progress, TimingCallback(), preemption]
    if cfg.trainer.stop_after_steps is not None:
        callbacks.append(StopAfterSteps(stage=cfg.run.stage, steps=cfg.trainer.stop_after_steps, max_steps=max_steps))
    from nemo_basic.export.record import serving_callbacks  # image processor, template, LLM context: for export-hf
    callbacks += serving_callbacks(cfg, processor, llm_dir)
    if cfg.analysis.every_n_steps:  # issue 12: layer-0 lens metrics of a probe set, beside the losses
        from nemo_basic.analysis.callback import AlignmentMonitor

        callbacks.append(AlignmentMonitor(every_n_steps=cfg.analysis.every_n_steps, max_steps=max_steps,
                                          run_dir=run_dir, scenes=cfg.analysis.scenes, seed=cfg.analysis.seed,
                                          pictures=cfg.analysis.pictures, stage=cfg.run.stage))
    trainer = build_trainer(cfg, runtime, max_steps, callbacks)
    history, params = progress.history, progress.params
    logger = build_logger(cfg, max_steps)
    restore = None
    if runtime.init_from:
        from nemo.lightning.pytorch.strategies.utils import RestoreConfig

        restore = RestoreConfig(path=runtime.init_from, load_model_state=True, load_optim_state=False,
                                load_artifacts=False)
        if not choice.chosen:
            say(f"stage 2 starts from the stage-1 checkpoint {runtime.init_from}")
    resume = nl.AutoResume(resume_if_exists=cfg.checkpoint.resume, resume_ignore_no_checkpoint=True,
                           restore_config=restore, resume_from_path=choice.chosen)
    if choice.chosen:
        from nemo.utils.app_state import AppState

        AppState().restore = True  # NeMo sets it only when it searches itself: top-k then counts the old saves
    from lightning.pytorch import seed_everything

    seed_everything(cfg.run.seed, workers=True)
    try:
        llm.train(model, datamodule, trainer, log=logger, resume=resume, tokenizer=None)
    except SystemExit:  # Lightning's SIGTERMException: a signal before the first step of this job
        if preemption.received is None:
            raise
        preemption.preempted = preemption.received
        say(f"stage {cfg.run.stage}: {preemption.received} received before the first step of this job: "
            "nothing new to save")
    except Exception as e:
        if choice.chosen and not progress.train_started:
            raise RecipeConfigError(_load_failure(run_dir, choice.chosen, e)) from e
        raise
    before = choice.chosen if progress.start_step > 0 else None

    ckpt = latest_checkpoint(run_dir)
    summary = {
        "stage": cfg.run.stage, "run_dir": run_dir, "steps_done": trainer.global_step, "max_steps": max_steps,
        "steps_this_job": len(history) and (history[-1]["step"] - (history[0]["step"] - 1)),
        "resumed_from": before, "init_from": runtime.init_from, "checkpoint": ckpt,
        "set_aside": set_aside, "preempted": preemption.preempted,
        "first": history[0] if history else None, "last": history[-1] if history else None,
        "seconds": time.time() - t_start, "tensorboard": os.path.join(run_dir, "tb_logs"),
        "metrics": os.path.join(run_dir, METRICS_FILE), "parameters": params,
    }
    if rank() == 0:
        with open(os.path.join(run_dir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return summary


def preempted_exit_code(s: dict) -> int:
    """128 + the signal number (143 for SIGTERM), as a shell reports a process killed by it."""
    import signal

    return 128 + int(getattr(signal, s["preempted"], signal.SIGTERM))


def format_summary(s: dict) -> str:
    def losses(row):
        if not row:
            return "-"
        parts = [f"lm {row['lm_loss']:.4f}"]
        for k, short in (("basic_das_loss", "das"), ("basic_sds_loss", "sds")):
            if row.get(k) is not None:
                parts.append(f"{short} {row[k]:.4g}")
        return ", ".join(parts)

    lines = [f"stage {s['stage']} summary"]
    if not s["first"]:
        lines.append(f"  nothing to train: the run is at step {s['steps_done']} of {s['max_steps']} "
                     f"(remove {s['run_dir']} or set run.name=... to start over)")
    else:
        lines.append(f"  steps {s['first']['step']}..{s['last']['step']} of {s['max_steps']} in {s['seconds']:.0f} s"
                     + (f" (resumed from {s['resumed_from']})" if s["resumed_from"] else ""))
        lines.append(f"  losses at step {s['first']['step']}: {losses(s['first'])}")
        if s["last"]["step"] != s["first"]["step"]:
            lines.append(f"  losses at step {s['last']['step']}: {losses(s['last'])}")
    if s.get("init_from"):
        lines.append(f"  started from      {s['init_from']}")
    for src, dst in s.get("set_aside") or ():
        lines.append(f"  set aside         {os.path.basename(src)} (not usable) -> {dst}")
    lines.append(f"  checkpoint        {s['checkpoint']}")
    if s.get("preempted"):
        lines.append(f"  stopped by {s['preempted']} at step {s['steps_done']} of {s['max_steps']}: the checkpoint "
                     f"above is this step; exit code {preempted_exit_code(s)} so that the job is requeued")
    lines.append(f"  TensorBoard       tensorboard --logdir {s['tensorboard']}")
    lines.append(f"  per-step metrics  {s['metrics']}")
    return "\n".join(lines)
