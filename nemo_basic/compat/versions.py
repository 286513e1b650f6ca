"""Shims between NeMo 2.7.3 and the installed megatron-core, active only where the versions differ.

The pinned pair (NeMo 2.7.3 + megatron-core 0.15.3, as in the NGC NeMo 25.11 container) needs
none; megatron-core 0.16 removed an argument NeMo still passes, answered here so that 0.16 also works.
"""
from __future__ import annotations

import inspect

from nemo_basic.compat.registry import PatchSet

PATCHES = PatchSet("NeMo 2.7.3 vs megatron-core")


def optimizer_kwargs_needed() -> bool:
    import megatron.core.optimizer as mopt

    return "no_weight_decay_cond" not in inspect.signature(mopt.get_megatron_optimizer).parameters


def apply() -> list[str]:
    if optimizer_kwargs_needed():
        PATCHES.apply()
    return list(PATCHES.applied)


@PATCHES.register(
    "optimizer_kwargs",
    "nemo.lightning._strategy_lib.setup_megatron_optimizer → megatron.core.optimizer."
    "get_megatron_optimizer(no_weight_decay_cond=, scale_lr_cond=, lr_mult=) (removed in 0.16)",
    "TypeError: unexpected keyword argument 'no_weight_decay_cond'",
)
def _optimizer_kwargs() -> None:
    import megatron.core.optimizer as mopt

    original = mopt.get_megatron_optimizer

    def get_megatron_optimizer(*args, no_weight_decay_cond=None, scale_lr_cond=None, lr_mult=1.0, **kwargs):
        if no_weight_decay_cond is not None or scale_lr_cond is not None or lr_mult != 1.0:
            raise ValueError("megatron-core>=0.16 takes these through OptimizerConfig overrides")
        return original(*args, **kwargs)

    mopt.get_megatron_optimizer = get_megatron_optimizer
