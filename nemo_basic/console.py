"""The console: who prints (`rank`, `say`) and what reaches the screen.

* `say(msg)` prints a ``[nemo_basic]`` line on the first rank only (the one home of that rule).
* `install()` filters stdout/stderr. Known harmless upstream messages (pynvml, Transformer Engine
  / Apex absent on CPU, zarr, decord, NeMo's deploy/evaluate imports, logger notices the recipe
  makes moot) never reach the screen. At the default verbosity the set-up chatter of NeMo,
  Megatron and Lightning (process-group listings, DDP buckets, optimizer settings, the model
  table, checkpoint notices) and everything other ranks print to stdout are kept off too, so the
  console shows the run folder, the model, the data, the resume decision and one line per step.
  What is dropped goes to ``<run_dir>/recipe/console-filtered-rank<R>.txt`` once the run folder
  is known; NeMo also keeps its full log there. ``run.verbose=true`` (`set_verbose`) or
  ``NEMO_BASIC_CONSOLE=all`` prints everything; errors, warnings of our own and tracebacks always
  pass.

Standalone on purpose (standard library only, no package imports): the examples load it from its
file before ``import nemo_basic`` (as ``_nemo_basic_console``), so that the warnings printed while
Megatron and NeMo are imported are caught too.
"""
from __future__ import annotations

import os
import re
import sys
from typing import List, Optional

HARMLESS = [re.compile(p) for p in (
    r"The pynvml package is deprecated",
    r"Transformer Engine and Apex are not installed",
    r"transformer_engine not installed",
    r"Failed to create unified memory mempool",
    r"Cannot import zarr",
    r"package `decord` was not installed",
    r"The (deploy|evaluate) module could not be imported",
    r"fused_indices_to_multihot has reached end of life",
    r"OneLogger: Setting error_handling_strategy",
    r"No exporters were provided\. This means that no telemetry",
    r"Implicit initialization of Rerun State Machine",
    r"RerunStateMachine initialized in mode",
    r"NeMoLogger is logging to .*, but it already exists",
    r"nemo logger received explicit_log_dir",
    r"The Trainer already contains a ModelCheckpoint callback",
    r"You defined a `validation_step` but have no `val_dataloader`",
    r"Using a slow image processor as `use_fast` is unset",  # transformers: the saved processor is the slow one
)]


# Set-up chatter: kept off the console unless verbose (a write matching one is dropped whole: a
# logging record with its continuation lines is one write).
CHATTER = [re.compile(p) for p in (
    r"^\[NeMo [IW] ",                                   # NeMo's info and warning records
    r"^(GPU|TPU|HPU) available: ",                       # Lightning's accelerator report
    r"^(\[rank: \d+\] )?Seed set to ",
    r"^-{20,}\s*$", r"^distributed_backend=", r"^All distributed processes registered",
    r"\|\s*Name\s*\|\s*Type\s*\|",                       # Lightning's model table
    r"^\s*[\d.]+ [KMGT]?\s+(Trainable|Non-trainable|Total) params", r"Total estimated model params size",
    r"Modules in (train|eval) mode",
    r"global step \d+: '\w+' reached",                   # ModelCheckpoint's notices
    r"^`Trainer\.fit` stopped: ",
    r"^Training epoch \d+, iteration \d+",               # NeMo's progress printer (ours is [stage N])
    r"^LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",
    r"^Initializing distributed: GLOBAL_RANK",
)]
CHATTER = [re.compile(p.pattern, re.MULTILINE) for p in CHATTER]  # a write may hold several lines


def verbose() -> bool:
    # an environment variable, not module state: the examples load this file under another module
    # name before the package exists, and Lightning's rank processes inherit it
    return os.environ.get("NEMO_BASIC_CONSOLE", "").lower() in ("all", "verbose")


def rank() -> int:
    """This process's global rank: torch.distributed's once it is up, else the launcher's
    variables (torchrun/Slurm set RANK / SLURM_PROCID; Lightning's own launcher sets LOCAL_RANK)."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def say(msg: str, prefix: str = "nemo_basic", file=None) -> None:
    """A line for the user, printed once per run (by rank 0)."""
    if rank() == 0:
        print(f"[{prefix}] {msg}" if prefix else msg, file=file or sys.stdout, flush=True)


def set_verbose(on: bool) -> None:
    """Print everything from now on (``run.verbose``); the harmless messages stay filtered."""
    if on and not verbose():
        os.environ["NEMO_BASIC_CONSOLE"] = "verbose"


class FilteredStream:
    """A text stream that drops writes matching `HARMLESS` (kept in `kept`, and in a file once
    `keep_in` names one) and passes everything else through."""

    def __init__(self, stream, name: str):
        self._stream, self._name = stream, name
        self.kept: List[str] = []
        self._file: Optional[str] = None
        self._dropped_partial = False
        self._dropped_last = False

    def write(self, s):
        if self._dropped_partial and s == "\n":  # print() writes its end separately
            self._dropped_partial = False
            self._keep("\n")
            return len(s)
        if isinstance(s, str) and s and self._drop(s):
            self._dropped_partial = not s.endswith("\n")
            self._dropped_last = True
            self._keep(s)
            return len(s)
        self._dropped_partial = False
        self._dropped_last = False
        return self._stream.write(s)

    def _drop(self, s: str) -> bool:
        if any(p.search(s) for p in HARMLESS):
            return True
        if verbose():
            return False
        if self._name == "stdout" and rank() != 0:
            return True
        if s.strip() == "" and self._dropped_last:  # the blank line after a dropped record
            return True
        return any(p.search(s) for p in CHATTER)

    def _keep(self, s: str) -> None:
        self.kept.append(s)
        if self._file:
            try:
                with open(self._file, "a") as f:
                    f.write(s)
            except OSError:
                pass

    def keep_in(self, path: str) -> None:
        self._file = path
        with open(path, "a") as f:
            f.writelines(self.kept)

    def __getattr__(self, name):
        return getattr(self._stream, name)


# The same warnings in helper processes started with "spawn" (Megatron's checkpoint writer): they do
# not inherit the filter, only the environment. (action:message start:category, as for python -W)
CHILD_WARNINGS = ("ignore:The pynvml package is deprecated:FutureWarning",
                  "ignore:Transformer Engine and Apex are not installed:UserWarning",
                  "ignore:Failed to create unified memory mempool:UserWarning")


def install() -> None:
    if os.environ.get("NEMO_BASIC_CONSOLE", "").lower() == "all":
        return
    current = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    os.environ["PYTHONWARNINGS"] = ",".join(current + [w for w in CHILD_WARNINGS if w not in current])
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, FilteredStream) and type(stream).__name__ != "FilteredStream":
            setattr(sys, name, FilteredStream(stream, name))


def keep_in(folder: str) -> None:
    """From now on (and for what was dropped so far) write the dropped messages under ``folder``."""
    me = rank()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if hasattr(stream, "keep_in") and type(stream).__name__ == "FilteredStream":
            os.makedirs(folder, exist_ok=True)
            stream.keep_in(os.path.join(folder, f"console-filtered-rank{me}.txt"))
