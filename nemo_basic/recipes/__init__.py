"""The two-stage BASIC recipes: configuration schema, model/data/trainer assembly, NeMo-Run launcher.

* `schema` — YAML layers and overrides (omegaconf) validated by one pydantic model, errors by key;
* `presets` — architectures of the paper's models; parameter counts by transformers on `meta`;
* `model`, `data`, `train` — the steps of a run (`train.run(cfg)`); `resume` picks the checkpoint;
* `cli` — the command line of ``examples/basic_pretrain.py`` / ``examples/basic_finetune.py``;
* `launch` — Slurm / local submission with NeMo-Run (``scripts/launch.py``).

Importing this package is light: NeMo is imported only when a run starts.
"""
from nemo_basic.recipes.schema import RecipeConfig, RecipeConfigError, load_config

__all__ = ["RecipeConfig", "RecipeConfigError", "load_config"]
