"""``model.json``: what a bundle says about its model, validated before any weights load.

:class:`ModelInfo` refuses a bundle whose classes, preprocessing or input size the node does
not know; :class:`BundleError` is how every part of a bundle that cannot be served is refused,
naming the file and the field.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from node import atomic
from node.analysis.bundle_format import (
    BUNDLE_FORMAT,
    INFO_FILE,
    INPUT_SIZE_RANGE,
    PREPROCESSING_VERSIONS,
)
from node.analysis.result import CLASSES, ModelIdentity


class BundleError(ValueError):
    """A model bundle that cannot be served; the message names the file and the field."""


def _node_classes(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or tuple(value) != CLASSES:
        raise ValueError("not the node's classes")
    return CLASSES


def _known_preprocessing(value: str) -> str:
    if value not in PREPROCESSING_VERSIONS:
        raise ValueError("unknown preprocessing")
    return value


def _aware_time(value: str) -> str:
    if datetime.datetime.fromisoformat(value).tzinfo is None:  # ValueError when not ISO 8601
        raise ValueError("no UTC offset")
    return value


def _json_copy(value: dict[str, Any]) -> dict[str, Any]:
    """A private, JSON-clean copy (no NaN, no objects JSON cannot hold)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except TypeError as exc:  # pydantic reports ValueError only
        raise ValueError(str(exc)) from exc


def _has_versions(value: dict[str, Any]) -> dict[str, Any]:
    for key in ("tensorflow", "keras"):
        if not isinstance(value.get(key), str) or not value[key].strip():
            raise ValueError(f"no {key} version")
    return value


# Each field's description is the rule it follows: an error reads "<field> must be <rule>".
_Text = Annotated[str, StringConstraints(pattern=r"\S"), Field(description="a non-empty string")]
_JsonObject = Annotated[
    dict[str, Any],
    AfterValidator(_json_copy),
    Field(description="a JSON object (string keys; numbers, strings, lists, objects)"),
]


class ModelInfo(BaseModel):
    """What ``model.json`` says about a model; every field is validated on construction.

    Construction raises :class:`BundleError` naming each bad field, its rule and the value
    given. The instance is frozen: :meth:`replace` makes a changed, validated copy.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    name: _Text
    version: _Text
    classes: Annotated[tuple[str, ...], BeforeValidator(_node_classes)] = Field(
        description=f"{list(CLASSES)} in this output order"
    )
    input_size: int = Field(
        ge=INPUT_SIZE_RANGE[0],
        le=INPUT_SIZE_RANGE[1],
        description="an integer in {}..{}".format(*INPUT_SIZE_RANGE),
    )
    window_center: float = Field(description="a finite number")
    window_width: float = Field(gt=0, description="greater than 0 HU and finite")
    preprocessing_version: Annotated[str, AfterValidator(_known_preprocessing)] = Field(
        description=f"a version this node knows ({', '.join(sorted(PREPROCESSING_VERSIONS))})"
    )
    backbone: _Text
    dataset_manifest_hash: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="64 lowercase hex digits (SHA-256)"
    )
    metrics: _JsonObject
    framework: Annotated[
        dict[str, Any], AfterValidator(_json_copy), AfterValidator(_has_versions)
    ] = Field(description="a JSON object with non-empty 'tensorflow' and 'keras' strings")
    created_at: Annotated[str, AfterValidator(_aware_time)] = Field(
        description="an ISO 8601 time with a UTC offset"
    )
    demo: bool = Field(default=False, description="true or false")
    description: str = Field(default="", description="a string")
    weights: _JsonObject = Field(default_factory=dict)  # origin and SHA-256 of the start
    format_version: int = Field(
        default=1, ge=1, le=BUNDLE_FORMAT, description=f"an integer in 1..{BUNDLE_FORMAT}"
    )
    # format 2 (each validated by the module that applies it; empty: not fitted)
    calibration: _JsonObject = Field(default_factory=dict)  # node.analysis.calibration
    operating_point: _JsonObject = Field(default_factory=dict)  # node.analysis.calibration
    ood: _JsonObject = Field(default_factory=dict)  # node.analysis.ood
    # optional in format 2: the slices faster runtimes are gated on (node.analysis.gate_data);
    # empty: served by Keras or ONNX Runtime FP32 as before, never INT8
    gate: _JsonObject = Field(default_factory=dict)

    def __init__(self, /, **fields: Any) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise BundleError(_explain(exc, fields)) from exc

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelInfo:
        """Read and validate ``model.json``; errors name the file and the field."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise BundleError(f"{path}: no {INFO_FILE} (is this a model bundle?)") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path}: not readable JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise BundleError(f"{path}: must hold a JSON object")
        try:
            return cls(**data)
        except BundleError as exc:
            raise BundleError(f"{path}: {exc}") from exc

    def to_json(self, path: str | os.PathLike) -> None:
        """Write ``model.json`` atomically (temp file, fsync, rename)."""
        text = json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
        atomic.write_bytes(path, text.encode("utf-8"), mode=0o644)

    def replace(self, **changes: Any) -> ModelInfo:
        """A copy with ``changes``, validated again (``model_copy`` would not check them)."""
        return type(self)(**{**self.model_dump(), **changes})

    def identity(self) -> ModelIdentity:
        """The identity that travels with every result and every SR."""
        return ModelIdentity(name=self.name, version=self.version, demo=self.demo)


def _explain(error: ValidationError, given: dict[str, Any]) -> str:
    """Unknown and missing fields, then each field that breaks its rule, in field order."""
    fields = ModelInfo.model_fields
    bad = {e["loc"][0] for e in error.errors() if e["loc"]}
    unknown = sorted(str(name) for name in bad if name not in fields)
    missing = sorted(name for name in fields if name in bad and name not in given)
    parts = [f"unknown fields {unknown}"] if unknown else []
    parts += [f"missing fields {missing}"] if missing else []
    for name, field in fields.items():
        if name in bad and name in given:
            shown = repr(given[name])
            shown = shown if len(shown) <= 200 else f"{shown[:200]}..."
            parts.append(f"{name} must be {field.description}, got {shown}")
    return "; ".join(parts)
