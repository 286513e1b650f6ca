"""Rank functions for the recipe tests (spawned processes; Megatron's parallel state per process)."""
from __future__ import annotations

import json
import os
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Tok:
    def __init__(self, vocab_size):
        self.vocab_size = vocab_size


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _config_dirs(arch, root: str):
    """Folders holding only the config.json of the LLM and the vision tower (the architecture the
    recipe's check read: the checkpoint's or the preset's), to build a configuration without weights."""
    dirs = []
    for kind, fields in (("llm", arch.llm), ("vision", arch.vision)):
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        with open(os.path.join(root, kind, "config.json"), "w") as f:
            json.dump({k: v for k, v in fields.items() if k != "class_token"}, f)
        dirs.append(os.path.join(root, kind))
    return dirs


def _cpu_layer_weights() -> None:
    """BASIC's layer weights are computed as a tensor and read back with ``.tolist()`` when the
    capture is built: keep that one small computation on the CPU under ``torch.device("meta")``."""
    from nemo_basic import supervision as S

    original = S.layer_weights
    if getattr(original, "_on_cpu", False):
        return

    def layer_weights(*args, **kwargs):
        with torch.device("cpu"):
            return original(*args, **kwargs)

    layer_weights._on_cpu = True
    S.layer_weights = layer_weights


def meta_build(rank: int, world: int, configs: list) -> list:
    """Build each (config, stage, overrides) on the meta device with TP = world (no weights):
    the NeVA config's settings and the parameter counts of this rank, by component."""
    from megatron.core import parallel_state as ps

    from nemo_basic.models import builder
    from nemo_basic.recipes import model as M
    from nemo_basic.recipes.schema import load_config, resolve_runtime

    ps.initialize_model_parallel(world, 1)
    _cpu_layer_weights()
    out = []
    for path, stage, overrides in configs:
        cfg = load_config(os.path.join(REPO, path), overrides, stage=stage)
        gpu = cfg.trainer.accelerator == "gpu"  # check a GPU config for the GPUs it is written for
        runtime = resolve_runtime(cfg, cuda=gpu, gpus_per_node=8 if gpu else 0)
        arch = M.check_model(cfg)
        llm_dir, vision_dir = _config_dirs(arch, tempfile.mkdtemp(prefix="nemo_basic_arch_"))
        config = M.build_model_config(cfg, runtime, llm_dir, vision_dir, load_vision_weights=False)
        lm = config.language_transformer_config
        info = dict(path=path, tp=config.tensor_model_parallel_size, pp=config.pipeline_model_parallel_size,
                    sp=config.sequence_parallel, num_layers=lm.num_layers, k=config.validate_basic(),
                    freeze_lm=config.freeze_language_model, freeze_vision=config.freeze_vision_model,
                    img_seq_len=builder.image_seq_length(config), padded_vocab=lm.vocab_size, arch=arch)
        config.tensor_model_parallel_size = world
        config.sequence_parallel = False  # needs Transformer Engine (GPU); the shapes do not change
        lm.sequence_parallel = False
        with torch.device("meta"):
            model = config.configure_model(_Tok(arch.llm["vocab_size"]))
        info.update(device={p.device.type for p in model.parameters()}, llm=_count(model.language_model),
                    vision=_count(model.vision_model), projector=_count(model.vision_projection),
                    total=_count(model), capture_k=model.capture.k if model.capture is not None else 0)
        out.append(info)
    return out
