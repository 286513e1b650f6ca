"""`BasicConfig`: the switches of BASIC (METHOD.md), validated when the model is configured."""
from __future__ import annotations

import dataclasses
from typing import Optional

WEIGHTINGS = ("inc", "const", "dec")
DEGREES = ("attention", "equal")


class BasicConfigError(ValueError):
    """A BASIC setting is invalid; the message names the key (e.g. `basic.layers`)."""


@dataclasses.dataclass
class BasicConfig:
    enabled: bool = True
    layers: Optional[int] = None     # k: supervise from layers 1..k; None → num_layers // 2 (eq. 4)
    weighting: str = "inc"           # eq. 4 layer weights: inc | const | dec
    degree: str = "attention"        # eq. 5 supervision degree: attention | equal
    das: bool = True                 # eq. 6 directional alignment loss
    sds: bool = True                 # eq. 7 semantic distribution loss
    lambda_das: float = 1.0          # λ1 of eq. 8
    lambda_sds: float = 0.01         # λ2 of eq. 8
    kl_chunk_size: Optional[int] = None  # rows per chunk of the vocab-parallel KL (None: automatic)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, num_layers: Optional[int] = None, prefix: str = "basic") -> "BasicConfig":
        def bad(key, value, allowed):
            raise BasicConfigError(f"{prefix}.{key} = {value!r} is invalid: expected {allowed}")

        for key in ("enabled", "das", "sds"):
            if not isinstance(getattr(self, key), bool):
                bad(key, getattr(self, key), "true or false")
        if self.weighting not in WEIGHTINGS:
            bad("weighting", self.weighting, " | ".join(WEIGHTINGS))
        if self.degree not in DEGREES:
            bad("degree", self.degree, " | ".join(DEGREES))
        for key in ("lambda_das", "lambda_sds"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                bad(key, value, "a number >= 0")
        if self.kl_chunk_size is not None and (not isinstance(self.kl_chunk_size, int) or self.kl_chunk_size < 1):
            bad("kl_chunk_size", self.kl_chunk_size, "null or an integer >= 1")
        if self.layers is not None:
            upper = num_layers if num_layers is not None else "num_layers"
            if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1 or (
                    num_layers is not None and self.layers > num_layers):
                bad("layers", self.layers, f"null (num_layers // 2) or an integer in 1..{upper}")
        return self

    def num_supervision_layers(self, num_layers: int) -> int:
        """k for a decoder of `num_layers` layers (default L // 2, at least 1)."""
        self.validate(num_layers)
        return self.layers if self.layers is not None else max(1, num_layers // 2)

    @property
    def active(self) -> bool:
        """BASIC changes training only when enabled with at least one loss at a nonzero weight."""
        return self.enabled and ((self.das and self.lambda_das > 0) or (self.sds and self.lambda_sds > 0))
