"""The command line shared by ``examples/basic_pretrain.py`` and ``examples/basic_finetune.py``.

    python examples/basic_pretrain.py [--config conf/X.yaml] [key=value ...] [--print-config] [--check]

``key=value`` overrides use omegaconf's dotlist syntax (``trainer.max_steps=2``,
``basic.weighting=const``, ``data.path=[/a,/b]``). The whole configuration is validated before
anything heavy happens; a bad key or value ends the program with exit code 2 and a message naming it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIGS = {1: "conf/embedded_stage1.yaml", 2: "conf/embedded_stage2.yaml"}


def default_config(stage: int) -> str:
    return os.path.join(REPO, DEFAULT_CONFIGS[stage])


def parser(stage: int, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: key=value in omegaconf dotlist syntax, e.g. trainer.max_steps=2 basic.das=false "
               "model.llm_path=/models/vicuna-7b-v1.5 (--help-config lists every key)")
    p.add_argument("--config", default=None,
                   help=f"recipe YAML (default: {DEFAULT_CONFIGS[stage]}, the embedded CPU run)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--help-config", action="store_true",
                   help="list every configuration key with its allowed values, default and meaning, and exit")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration against the model's shape and this machine, print the "
                        "architecture and parameter counts, and exit without training")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(stage: int, argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser(stage, description).parse_args(argv)
    from nemo_basic import console
    from nemo_basic.console import say
    from nemo_basic.recipes.schema import RecipeConfigError, describe_keys, load_config, to_yaml

    if args.help_config:
        print(describe_keys())
        return 0

    config_path = args.config or default_config(stage)
    if not os.path.isfile(config_path) and os.path.isfile(os.path.join(REPO, config_path)):
        config_path = os.path.join(REPO, config_path)  # conf/X.yaml from any working directory
    try:
        cfg = load_config(config_path, args.overrides, stage=stage)
        console.set_verbose(cfg.run.verbose)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from nemo_basic.recipes import train

        if args.check:
            runtime = train.preflight(cfg, require_files=False, assume_target=True)
            print(f"configuration OK: {config_path}")
            print(runtime.arch.summary())
            keys = ("accelerator", "devices", "precision", "distributed_optimizer", "data_parallel",
                    "grad_accumulation", "init_from")
            print("runtime: " + ", ".join(f"{k} {getattr(runtime, k)}" for k in keys))
            for note in runtime.notes:
                print(f"note: {note}")
            for reason in runtime.blockers:
                print(f"cannot train yet: {reason}")
            return 0
        summary = train.run(cfg)
    except RecipeConfigError as e:
        say(f"error: {e}", prefix="", file=sys.stderr)  # the same on every rank: said once
        return 2
    say(train.format_summary(summary), prefix="")
    if summary.get("preempted"):
        return train.preempted_exit_code(summary)  # non-zero: Slurm / NeMo-Run requeue the job
    return 0
