"""The two-stage BASIC recipes: configuration schema, model/data/trainer assembly, NeMo-Run launcher.

* `schema` — the YAML/override schema (dataclasses → omegaconf), validation with named keys;
* `presets` — architectures of the paper's models, parameter counts without weights;
* `model`, `data`, `train` — the steps of a run (`train.run(cfg)`);
* `cli` — the command line of ``examples/basic_pretrain.py`` / ``examples/basic_finetune.py``;
* `launch` — Slurm / local submission with NeMo-Run (``scripts/launch.py``).

Importing this package is light: NeMo is imported only when a run starts.
"""
from nemo_basic.recipes.schema import RecipeConfig, RecipeConfigError, load_config

__all__ = ["RecipeConfig", "RecipeConfigError", "load_config"]
