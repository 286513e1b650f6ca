"""BASIC as plain torch: supervisory target (eq. 4), supervision degree (eq. 5), L_das (eq. 6), L_sds (eq. 7).

No NeMo or Megatron import here; torch.distributed process groups appear only where a collective
is needed (tensor-parallel heads for the attention mass, a vocab-sharded embedding for L_sds).
"""
from nemo_basic.supervision.attention_mass import DEGREE_MODES, supervision_degree, text_to_image_attention
from nemo_basic.supervision.layout import RowLayout
from nemo_basic.supervision.losses import REDUCTIONS, directional_alignment_loss, semantic_distribution_loss
from nemo_basic.supervision.target import WEIGHT_SCHEMES, layer_weights, supervisory_target

__all__ = [
    "DEGREE_MODES",
    "REDUCTIONS",
    "RowLayout",
    "WEIGHT_SCHEMES",
    "directional_alignment_loss",
    "layer_weights",
    "semantic_distribution_loss",
    "supervision_degree",
    "supervisory_target",
    "text_to_image_attention",
]
