"""Scoped workaround: NeVA builds its Megatron module through a module-level name.

Upstream: ``NevaConfig.configure_model`` (nemo/collections/vlm/neva/model/base.py, NeMo 2.7.3)
adjusts the sub-configs and then calls ``MCoreNevaModel(...)``, the name bound in that module, so a
`NevaConfig` subclass cannot choose the class it builds. `builds(cls)` rebinds that name for one
call and restores it, so the upstream construction logic is reused as it is and plain NeVA models
built elsewhere in the process are untouched. If a NeMo release stops looking the name up there,
the check fails with this module's name instead of silently building NeVA's own class.
"""
from __future__ import annotations

import contextlib

NAME = "MCoreNevaModel"


@contextlib.contextmanager
def builds(cls, module=None):
    """While active, ``NevaConfig.configure_model`` constructs ``cls`` (a MCoreNevaModel subclass)."""
    if module is None:
        from nemo.collections.vlm.neva.model import base as module
    if NAME not in module.NevaConfig.configure_model.__code__.co_names or not hasattr(module, NAME):
        raise RuntimeError(f"nemo_basic.compat.neva_class: {module.__name__}.NevaConfig.configure_model no longer "
                           f"builds its model through the module-level name {NAME}; this NeMo version is not "
                           "supported by nemo_basic's NeVA subclass")
    original = getattr(module, NAME)
    setattr(module, NAME, cls)
    try:
        yield
    finally:
        setattr(module, NAME, original)
