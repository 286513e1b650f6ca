"""Keep the console of a recipe readable: known harmless upstream messages (pynvml, Transformer
Engine / Apex absent on CPU, zarr, decord, NeMo's deploy/evaluate imports, NeMo logger notices the
recipe makes moot) are not printed; they go to ``<run_dir>/recipe/console-filtered-rank<R>.txt``
instead, once the run folder is known. ``NEMO_BASIC_CONSOLE=all`` prints everything.

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
)]


class FilteredStream:
    """A text stream that drops writes matching `HARMLESS` (kept in `kept`, and in a file once
    `keep_in` names one) and passes everything else through."""

    def __init__(self, stream, name: str):
        self._stream, self._name = stream, name
        self.kept: List[str] = []
        self._file: Optional[str] = None
        self._dropped_partial = False

    def write(self, s):
        if self._dropped_partial and s == "\n":  # print() writes its end separately
            self._dropped_partial = False
            self._keep("\n")
            return len(s)
        if isinstance(s, str) and s and any(p.search(s) for p in HARMLESS):
            self._dropped_partial = not s.endswith("\n")
            self._keep(s)
            return len(s)
        self._dropped_partial = False
        return self._stream.write(s)

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
    rank = os.environ.get("RANK", "0")
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if hasattr(stream, "keep_in") and type(stream).__name__ == "FilteredStream":
            os.makedirs(folder, exist_ok=True)
            stream.keep_in(os.path.join(folder, f"console-filtered-rank{rank}.txt"))
