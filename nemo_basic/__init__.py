"""nemo_basic: BASIC direct visual supervision for LLaVA-style training on NeMo 2 / Megatron-core.

Importing the package selects the backend: on a machine without CUDA the named CPU patches in
`nemo_basic.compat` are applied so that the same Megatron-core code path runs on gloo.
"""
from nemo_basic import compat as _compat

__version__ = "0.1.0"

# Megatron-core is imported (and patched) when something first needs it, not here: see compat.
ACTIVE_PATCHES = _compat.apply(defer_megatron=True)
