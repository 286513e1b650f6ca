"""Our checkpoint: a NeMo 2 checkpoint directory, plus one small JSON file.

Layout (what ``import-hf`` / ``init-from-hf`` write, and what NeMo's ``ModelCheckpoint`` writes
during training, minus ``nemo_basic.json``)::

    CKPT/
      weights/            Megatron distributed checkpoint (torch_dist): every tensor under
                          "module.<NeVA state-dict key>", stored with its global (TP=1) shape and
                          re-sharded on load to any TP/PP; decoder layers stacked on a leading
                          axis ("module.language_model.decoder.layers.<param>" [L, ...]); layernorms
                          under Transformer Engine names whatever spec saved them (Megatron's
                          local spec maps its names on save)
      context/            NeMo's io context: io.json + model.yaml (the BasicNevaModel with its
                          BasicNevaConfig, vision config, projector config and tokenizer) and the
                          tokenizer files (an artifact directory)
      nemo_basic.json     {"format": "nemo_basic.neva", "version": 1, "hf_text_vocab_size": ...,
                          "image_token": "<image>", "image_token_index": ..., "source": ...}
                          (optional: export falls back to the tokenizer when it is absent)

NeMo resumes from it (``AutoResume(restore_config=RestoreConfig(path=CKPT))`` or
``resume_from_path``), and ``nemo.lightning.io.load_context(CKPT/context, subpath="model")``
rebuilds the model. Export reads the weights without building the model
(:func:`load_checkpoint_weights`), so any TP/PP layout that saved them reads the same.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from nemo_basic import console

META_FILE = "nemo_basic.json"
FORMAT = "nemo_basic.neva"
VERSION = 1
_STACKED = re.compile(r"^(language_model\.decoder\.layers\.)(?!\d+\.)(.+)$")



def say(msg: str) -> None:
    """A progress line on stderr (`nemo_basic.console.say`)."""
    console.say(msg, "nemo_basic.export", file=sys.stderr)


class CheckpointError(FileNotFoundError):
    """A checkpoint directory is incomplete; the message names the missing file or key."""


def check_checkpoint_dir(ckpt: str | os.PathLike) -> Path:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt} does not exist")
    weights = ckpt / "weights"
    if not weights.is_dir():
        raise CheckpointError(f"{ckpt} is not a NeMo 2 checkpoint: no weights/ directory")
    if not (weights / "metadata.json").is_file():
        raise CheckpointError(f"{weights} is not a Megatron distributed checkpoint: no metadata.json")
    if not (ckpt / "context" / "io.json").is_file():
        raise CheckpointError(f"{ckpt} has no context/io.json (NeMo's model context); it is needed for the config")
    return ckpt


def read_metadata(ckpt: str | os.PathLike) -> dict:
    path = Path(ckpt) / META_FILE
    if not path.is_file():
        return {}
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} metadata file (format={meta.get('format')!r})")
    return meta


def load_checkpoint_context(ckpt: str | os.PathLike):
    """The checkpoint's ``NevaModel`` (not configured: ``.config``, ``.tokenizer``)."""
    import nemo_basic.compat as compat

    compat.apply_nemo()
    from nemo.lightning.io.api import load_context

    ckpt = check_checkpoint_dir(ckpt)
    model = load_context(ckpt / "context", subpath="model")
    if not hasattr(model, "config") or not hasattr(model.config, "language_transformer_config"):
        raise CheckpointError(f"{ckpt}/context holds a {type(model).__name__}, not a NeVA model")
    return model


def _ensure_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


_MODEL_PREFIX = re.compile(r"^((?:module\.)+)(language_model|vision_model|vision_projection)\.")


def load_checkpoint_weights(ckpt: str | os.PathLike, prefix: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The model tensors of a NeMo 2 checkpoint as one full (TP=1, all stages) state dict.

    Optimizer states are skipped; stacked decoder layers are split into
    ``language_model.decoder.layers.<i>.<param>``. Any TP/PP layout reads the same. ``prefix``:
    the model's key prefix, found when None ("module." from importers, "module.module." from a
    checkpoint saved while Megatron's DDP wrapper was on)."""
    from megatron.core import dist_checkpointing

    ckpt = check_checkpoint_dir(ckpt)
    _ensure_process_group()
    weights = ckpt / "weights"
    meta = dist_checkpointing.load_tensors_metadata(str(weights))
    if prefix is None:
        found = {m.group(1) for m in map(_MODEL_PREFIX.match, meta) if m}
        if len(found) > 1:
            raise CheckpointError(f"{weights} holds several models (key prefixes {sorted(found)}); "
                                  "virtual-pipeline checkpoints are not supported")
        prefix = found.pop() if found else "module."
    wanted = {k: v for k, v in meta.items() if k.startswith(prefix)}
    if not wanted:
        roots = sorted({k.split(".")[0] for k in meta})
        raise CheckpointError(f"{weights} has no tensors under {prefix!r} (found {roots}); virtual-pipeline "
                              "checkpoints (model0., model1., ...) are not supported")
    loaded = dist_checkpointing.load(wanted, str(weights), validate_access_integrity=False)
    out: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if key not in wanted or not isinstance(value, torch.Tensor):  # the common (non-tensor) state
            continue
        key = key[len(prefix):]
        m = _STACKED.match(key)
        if m:
            for i, layer in enumerate(value.unbind(0)):
                out[f"{m.group(1)}{i}.{m.group(2)}"] = layer.clone()
        else:
            out[key] = value
    return out


def saving_trainer():
    """A one-process CPU NeMo trainer that can save a checkpoint (as NeMo's HF importers use)."""
    from lightning.pytorch.trainer.states import TrainerFn
    from nemo import lightning as nl

    trainer = nl.Trainer(devices=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False,
                         strategy=nl.MegatronStrategy(ckpt_save_optimizer=False, always_save_context=True,
                                                      ckpt_async_save=False, setup_optimizers=False))
    trainer.state.fn = TrainerFn.FITTING  # NeMo saves the model state only when fitting
    return trainer


def save_neva_checkpoint(model, out: str | os.PathLike, fill: Callable[[torch.nn.Module], None],
                         metadata: Optional[dict] = None, overwrite: bool = False) -> Path:
    """Configure ``model`` (a NeMo ``NevaModel``, not yet configured) on one CPU process, let
    ``fill(mcore_module)`` set its weights, and save it as a NeMo 2 checkpoint at ``out``.

    Runs on one process: the trainer starts a one-rank group, or uses the caller's one-rank group."""
    from nemo.lightning.ckpt_utils import ckpt_to_context_subdir
    from nemo.lightning.io.pl import TrainerContext

    from nemo_basic.models.builder import mcore_neva_module

    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    import torch.distributed as dist

    if dist.is_initialized():  # a caller's group (tests, notebooks): one rank, TP = PP = 1
        if dist.get_world_size() != 1:
            raise RuntimeError("save_neva_checkpoint runs in a single process (world size 1), "
                               f"this one has {dist.get_world_size()} ranks")
        from nemo_basic.convert import ensure_model_parallel

        ensure_model_parallel(1, 1)
    trainer = saving_trainer()
    trainer.strategy.connect(model)
    trainer.strategy.setup_environment()
    say("building the model")
    model.configure_model()
    fill(mcore_neva_module(model))
    trainer.strategy._setup_optimizers = False
    trainer.strategy._init_model_parallel = False
    trainer.strategy.setup(trainer)
    say(f"writing {out}/weights")
    out.mkdir(parents=True)
    trainer.save_checkpoint(out)
    say(f"writing {out}/context")
    TrainerContext.from_trainer(trainer).io_dump(ckpt_to_context_subdir(out), yaml_attrs=["model"])
    meta = {"format": FORMAT, "version": VERSION, **(metadata or {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


__all__ = [
    "CheckpointError",
    "FORMAT",
    "META_FILE",
    "check_checkpoint_dir",
    "load_checkpoint_context",
    "load_checkpoint_weights",
    "read_metadata",
    "save_neva_checkpoint",
    "saving_trainer",
]
