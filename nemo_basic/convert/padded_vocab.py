"""The LM loss over the true vocabulary when Megatron pads it (installed on every GPT model the
converter's families build: :func:`nemo_basic.convert.families.finish_gpt_model`).

Megatron pads the embedding and the output layer to a multiple of ``make_vocab_size_divisible_by``
(x TP) rows. The padding rows of the output layer are zero, so their logits are 0 and enter the
LM softmax: the loss is not the Hugging Face model's (log Σ over V_padded instead of V). Here a
forward hook on the output layer overwrites the padding columns of its output with -inf, in
place: exp(-inf) = 0, so the cross-entropy (Megatron's vocab-parallel one, fused or not) and any
softmax over the logits equal the unpadded model's, and no gradient reaches the padding rows.

Under tensor parallelism the output layer is vocabulary-parallel (rank r holds rows
[r·V/TP, (r+1)·V/TP)), so the padding columns lie on the last rank(s); the hook finds this
rank's slice from the output's width (local shard, or all V when the output is gathered). The
column range is plain Python arithmetic on shapes: no host synchronisation, no mask tensor,
and the write touches only the padding columns. Nothing is installed when nothing is padded.
"""
from __future__ import annotations

from typing import Optional

import torch


class PaddedVocabMask:
    """Forward hook for a (vocabulary-parallel) output layer: logits of rows >= ``true_vocab`` := -inf."""

    def __init__(self, true_vocab: int, padded_vocab: int, tp_rank: int, tp_size: int):
        if not 0 < true_vocab <= padded_vocab:
            raise ValueError(f"true vocabulary {true_vocab} must be in (0, padded vocabulary {padded_vocab}]")
        if padded_vocab % tp_size:
            raise ValueError(f"padded vocabulary {padded_vocab} is not divisible by TP={tp_size}")
        self.true_vocab, self.padded_vocab = true_vocab, padded_vocab
        self.tp_rank, self.tp_size = tp_rank, tp_size

    def first_padding_column(self, width: int) -> int:
        """Index of the first padding column in an output of ``width`` columns (== width: none)."""
        if width == self.padded_vocab:        # gathered over TP (or TP = 1)
            return self.true_vocab
        local = self.padded_vocab // self.tp_size
        if width != local:
            raise ValueError(f"output layer gives {width} columns; expected the padded vocabulary "
                             f"{self.padded_vocab} or its TP shard {local}")
        return min(max(self.true_vocab - self.tp_rank * local, 0), local)

    def __call__(self, module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        start = self.first_padding_column(logits.shape[-1])
        if start < logits.shape[-1]:
            logits[..., start:] = float("-inf")
        return None  # modified in place


def install_padded_vocab_mask(gpt_model: torch.nn.Module, true_vocab: Optional[int]):
    """Mask the padding logits of a Megatron ``GPTModel``'s output layer (see the module docstring).

    ``true_vocab``: rows of the unpadded (Hugging Face) vocabulary; ``None`` or not smaller than the
    padded vocabulary: nothing to do. Returns the hook handle, or ``None`` when nothing was
    installed (no output layer on this pipeline stage, or no padding)."""
    from megatron.core import parallel_state as ps

    layer = getattr(gpt_model, "output_layer", None)
    padded = getattr(gpt_model, "vocab_size", None)
    if layer is None or true_vocab is None or padded is None or true_vocab >= padded:
        return None
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    hook = PaddedVocabMask(int(true_vocab), int(padded), rank, tp)
    gpt_model.padded_vocab_mask = hook
    return layer.register_forward_hook(hook)


__all__ = ["PaddedVocabMask", "install_padded_vocab_mask"]
