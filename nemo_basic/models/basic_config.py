"""`BasicConfig`: the switches of BASIC (METHOD.md), validated when the model is configured.

Each switch is declared once below: its type, allowed values and meaning in the annotation. Plain
Python (``BasicConfig(layers=3)``) checks them in `validate`; the recipe schema
(`nemo_basic.recipes.schema`) validates its ``basic:`` section against the same annotations, and
`expected` phrases any annotated field's allowed values for the messages of both.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated, Literal, Optional

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

Weighting = Literal["inc", "const", "dec"]
Degree = Literal["attention", "equal"]
WEIGHTINGS = typing.get_args(Weighting)
DEGREES = typing.get_args(Degree)


class BasicConfigError(ValueError):
    """A BASIC setting is invalid; the message names the key (e.g. `basic.layers`)."""


def _knob(doc: str, null: Optional[str] = None, **constraints) -> FieldInfo:
    """Strict type + constraints + description (``null``: what null means, for the messages)."""
    return Field(strict=True, description=doc, json_schema_extra={"null": null} if null else None, **constraints)


@dataclasses.dataclass
class BasicConfig:
    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)  # the recipe's basic: section

    enabled: Annotated[bool, _knob("BASIC on (false: exactly NeVA / LLaVA)")] = True
    layers: Annotated[Optional[int], _knob("k: supervise from layers 1..k (eq. 4)", null="num_layers // 2",
                                           ge=1)] = None
    weighting: Annotated[Weighting, Field(description="eq. 4 layer weights")] = "inc"
    degree: Annotated[Degree, Field(description="eq. 5 supervision degree")] = "attention"
    das: Annotated[bool, _knob("eq. 6 directional alignment loss")] = True
    sds: Annotated[bool, _knob("eq. 7 semantic distribution loss")] = True
    lambda_das: Annotated[float, _knob("λ1 of eq. 8", ge=0)] = 1.0
    lambda_sds: Annotated[float, _knob("λ2 of eq. 8", ge=0)] = 0.01
    kl_chunk_size: Annotated[Optional[int], _knob("rows per chunk of the vocab-parallel KL (null: automatic)",
                                                  ge=1)] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, num_layers: Optional[int] = None, prefix: str = "basic") -> "BasicConfig":
        for name, info in field_infos(type(self)).items():
            value = getattr(self, name)
            bad = not _accepts(type(self), name, value)
            if name == "layers" and not bad and value is not None and num_layers is not None:
                bad = value > num_layers
            if bad:
                upper = num_layers if num_layers is not None else "num_layers"
                allowed = expected(info) if name != "layers" else f"null (num_layers // 2) or an integer in 1..{upper}"
                raise BasicConfigError(f"{prefix}.{name} = {value!r} is invalid: expected {allowed}")
        return self

    def num_supervision_layers(self, num_layers: int) -> int:
        """k for a decoder of `num_layers` layers (default L // 2, at least 1)."""
        self.validate(num_layers)
        return self.layers if self.layers is not None else max(1, num_layers // 2)

    @property
    def active(self) -> bool:
        """BASIC changes training only when enabled with at least one loss at a nonzero weight."""
        return self.enabled and ((self.das and self.lambda_das > 0) or (self.sds and self.lambda_sds > 0))


# -- annotated fields → checks and the allowed values in words -----------------------------------------
@functools.lru_cache(maxsize=None)
def field_infos(cls) -> dict:
    """{name: pydantic FieldInfo} of a pydantic model or an annotated dataclass."""
    if hasattr(cls, "model_fields"):
        return dict(cls.model_fields)
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: FieldInfo.from_annotated_attribute(hints[f.name], f.default) for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def _adapter(cls, name: str) -> TypeAdapter:
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    return TypeAdapter(hint, config=getattr(cls, "__pydantic_config__", None))


def _accepts(cls, name: str, value) -> bool:
    try:
        _adapter(cls, name).validate_python(value)
        return True
    except ValidationError:
        return False


def unwrap(annotation, metadata=()):
    """(inner type, constraint objects, nullable) of ``Optional[Annotated[T, ...]]`` and the like."""
    metadata, nullable = list(metadata), False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        nullable = True
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is Annotated:
        metadata += [m for m in annotation.__metadata__ for m in (getattr(m, "metadata", None) or [m])]
        annotation = typing.get_args(annotation)[0]
    return annotation, metadata, nullable


def expected(info: FieldInfo) -> str:
    """The allowed values of a field in words: ``null (epochs over the data) or an integer >= 1``."""
    kind, metadata, nullable = unwrap(info.annotation, info.metadata)
    bound = {k: getattr(m, k) for m in metadata for k in ("ge", "gt", "le", "lt", "min_length")
             if getattr(m, k, None) is not None}
    if typing.get_origin(kind) is Literal:
        return "one of " + " | ".join((["null"] if nullable else []) + [str(v) for v in typing.get_args(kind)])
    if kind is bool:
        text = "true or false"
    elif kind is int and "ge" in bound and "le" in bound:
        text = f"an integer in {bound['ge']}..{bound['le']}"
    elif kind in (int, float):
        ops = [f"{op} {bound[k]:g}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in bound]
        text = ("an integer" if kind is int else "a number") + "".join(" " + o for o in ops[:1]) + "".join(
            " and " + o for o in ops[1:])
    elif kind is str:
        text = "a non-empty string" if bound.get("min_length") else "a string"
    elif typing.get_origin(kind) is list:
        text = ("a non-empty list" if bound.get("min_length") else "a list") + " of strings"
    elif isinstance(kind, type) and (hasattr(kind, "model_fields") or dataclasses.is_dataclass(kind)):
        text = "a section (mapping of keys)"
    else:
        text = str(kind)
    if nullable:
        null = (info.json_schema_extra or {}).get("null") if isinstance(info.json_schema_extra, dict) else None
        text = f"null{f' ({null})' if null else ''}{',' if kind is bool else ' or'} {text}"
    return text
