"""`vision_feature_layer`: which layer output of the vision tower feeds the projector.

The one rule that the recipe checks before anything is built (`nemo_basic.recipes.model`) and the
model builder applies (`nemo_basic.models.builder`). It is Python indexing of the tower's hidden
states as Hugging Face returns them, the patch embeddings first and then the L layer outputs:
1..L, or -1 (the last layer) .. -L. Index 0, the embeddings, is not a layer output. Imports nothing.
"""
from __future__ import annotations

from typing import Optional


def problem(index, num_layers: int) -> Optional[str]:
    """What a valid value would be, when ``index`` is not one (None when it is)."""
    if isinstance(index, bool) or not isinstance(index, int) or index == 0 or not -num_layers <= index <= num_layers:
        return f"an index into the {num_layers} vision layers (-1: last, -2: second to last)"
    return None
