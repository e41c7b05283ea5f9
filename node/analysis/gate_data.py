"""The slices a bundle carries to prove a faster runtime answers as its Keras model does.

``gate.npz`` (named by ``model.json``'s ``gate``, SHA-256 checked like the out-of-distribution
statistics) holds windowed uint8 slices at the model's input size, from the training run's
splits, never its training images:

- ``calibration``: validation slices the INT8 conversion measures activation ranges on;
- ``holdout``: validation slices of other patients, where a runtime's slice answers are
  compared with Keras FP32 (:mod:`node.analysis.gate`);
- ``test_slices`` and ``test_studies`` (one study key per slice): whole test studies, whose
  study answers must not change.

A bundle without the file is served as before (Keras, or ONNX Runtime FP32), never INT8.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node import atomic
from node.analysis.ood import sha256_of

GATE_FILE = "gate.npz"
_ARRAYS = ("calibration", "holdout", "test_slices", "test_studies")


class GateDataError(ValueError):
    """Gate data that cannot be used (a missing or altered file, a bad ``gate`` entry)."""


@dataclass(frozen=True)
class GateData:
    """``gate.npz`` of a bundle, its SHA-256 checked; the arrays are read on first use."""

    path: Path
    sha256: str
    summary: Mapping = field(repr=False)

    @functools.cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in _ARRAYS}
        except (OSError, KeyError, ValueError) as exc:
            raise GateDataError(f"{self.path}: not readable gate data ({exc})") from exc
        check_arrays(arrays, self.path)
        return arrays

    @property
    def calibration(self) -> np.ndarray:
        """uint8 ``(N, H, W)`` slices the INT8 conversion is calibrated on."""
        return self._arrays["calibration"]

    @property
    def holdout(self) -> np.ndarray:
        """uint8 ``(N, H, W)`` slices of other patients, where slice answers are compared."""
        return self._arrays["holdout"]

    @property
    def test_slices(self) -> np.ndarray:
        """uint8 ``(N, H, W)`` slices of whole test studies."""
        return self._arrays["test_slices"]

    @property
    def test_studies(self) -> np.ndarray:
        """The study key of each test slice, ``(N,)`` strings."""
        return self._arrays["test_studies"]


def check_arrays(arrays: Mapping[str, np.ndarray], where: object) -> None:
    """Refuse arrays that are not windowed slices of one size (GateDataError naming them)."""
    sizes = set()
    for name in ("calibration", "holdout", "test_slices"):
        value = arrays[name]
        if value.dtype != np.uint8 or value.ndim != 3 or len(value) == 0:
            raise GateDataError(
                f"{where}: {name} must be non-empty uint8 (N, H, W) slices, "
                f"got {value.dtype} {value.shape}"
            )
        sizes.add(value.shape[1:])
    if len(sizes) != 1:
        raise GateDataError(f"{where}: slices of different sizes {sorted(sizes)}")
    studies = arrays["test_studies"]
    if studies.dtype.kind != "U" or studies.shape != (len(arrays["test_slices"]),):
        raise GateDataError(
            f"{where}: test_studies must be one study key (a string) per test slice, "
            f"got {studies.dtype} {studies.shape}"
        )


def read_gate_data(folder: str | os.PathLike, summary: Mapping) -> GateData | None:
    """The gate data ``summary`` (model.json's ``gate``) names in ``folder``; None when the
    bundle has none. Raises :class:`GateDataError` naming what is wrong."""
    if not summary:
        return None
    name = summary.get("file")
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise GateDataError(f"gate.file must be a file name in the bundle, got {name!r}")
    path = Path(folder) / name
    if not path.is_file():
        raise GateDataError(f"{path}: missing (model.json's gate names it)")
    digest = sha256_of(path)
    if digest != summary.get("sha256"):
        raise GateDataError(f"{path}: SHA-256 differs from model.json's gate.sha256 (altered?)")
    return GateData(path, digest, dict(summary))


def write_gate_data(
    path: str | os.PathLike,
    calibration: np.ndarray,
    holdout: np.ndarray,
    test_slices: np.ndarray,
    test_studies: np.ndarray,
    source: str = "",
) -> dict:
    """Write ``gate.npz`` atomically (compressed) and return model.json's ``gate`` for it."""
    arrays = {
        "calibration": np.asarray(calibration),
        "holdout": np.asarray(holdout),
        "test_slices": np.asarray(test_slices),
        "test_studies": np.asarray(test_studies, dtype=str),
    }
    for name in ("calibration", "holdout", "test_slices"):
        if arrays[name].ndim == 4 and arrays[name].shape[-1] == 1:
            arrays[name] = arrays[name][..., 0]  # shards keep a channel axis
    check_arrays(arrays, path)
    path = Path(path)
    with atomic.atomic_open(path) as handle:
        np.savez_compressed(handle, **arrays)
    return {
        "file": path.name,
        "sha256": sha256_of(path),
        "image_size": int(arrays["holdout"].shape[1]),
        "calibration_slices": len(arrays["calibration"]),
        "holdout_slices": len(arrays["holdout"]),
        "test_slices": len(arrays["test_slices"]),
        "test_studies": len(set(arrays["test_studies"].tolist())),
        "source": source,
    }
