"""Model bundles (training → node): ``model.json`` checked first, then the model, then inference.

A bundle is a folder with ``model.keras`` and ``model.json``. The node refuses a bundle whose
preprocessing, classes or input size it does not know before it loads any weights
(:mod:`node.analysis.model_info`). TensorFlow, tf2onnx and onnxruntime are imported only when a
bundle is loaded (:mod:`node.analysis.keras_model`, :mod:`node.analysis.runtimes`), so the rest
of the node (web UI, DIMSE services) runs without them.

Beside them the node caches what it derives on this host (never shipped, made again when
``model.keras`` changes): ``model.onnx`` (the ONNX export), ``model.int8.onnx`` (its INT8
quantisation, :mod:`node.analysis.quantize`) and ``runtimes.json`` (the agreement gate's
figures and the timings, :mod:`node.analysis.runtimes`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from node.analysis import calibration, gate_data, ood
from node.analysis.bundle_format import (
    BUNDLE_FORMAT,
    CACHE_FILES,
    INFO_FILE,
    INPUT_SIZE_RANGE,
    MODEL_FILE,
    ONNX_FILE,
    PREPROCESSING_VERSIONS,
    RUNTIMES,
)
from node.analysis.keras_model import (
    KerasRunner,
    check_model,
    feature_model,
    load_keras,
    onnx_model,
    policy_copy,
)
from node.analysis.model_info import BundleError, ModelInfo

if TYPE_CHECKING:
    from node.analysis.runtimes import OnnxRunner

# what other modules import from here (the names live in bundle_format, model_info, keras_model)
__all__ = [
    "BUNDLE_FORMAT",
    "CACHE_FILES",
    "INFO_FILE",
    "INPUT_SIZE_RANGE",
    "MODEL_FILE",
    "ONNX_FILE",
    "PREPROCESSING_VERSIONS",
    "RUNTIMES",
    "BundleError",
    "ModelBundle",
    "ModelInfo",
    "feature_model",
    "write_bundle",
]

log = logging.getLogger(__name__)

_KERAS_LOCK = threading.Lock()  # one on-demand Keras model per bundle, however many threads ask


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _auto_runtime(gpu: bool) -> str:
    """What ``auto`` serves with: Keras on a GPU, else ONNX Runtime when it can be used (FP32
    or INT8, as the agreement gate allows: :mod:`node.analysis.runtimes`)."""
    if gpu:
        return "keras"
    needed = ("onnxruntime", "tf2onnx", "onnx")
    return "onnx" if all(importlib.util.find_spec(name) for name in needed) else "keras"


class ModelBundle:
    """A loaded model bundle: its :class:`ModelInfo` and batched inference."""

    def __init__(
        self,
        info: ModelInfo,
        runner: KerasRunner | OnnxRunner,
        folder: Path,
        ood_statistics: ood.OodStatistics | None = None,
        gate: dict[str, dict] | None = None,
        batch_size: int | None = None,
    ) -> None:
        if not isinstance(info, ModelInfo):
            raise TypeError(f"info must be a ModelInfo, got {type(info).__name__}")
        self.info = info
        self.folder = Path(folder)
        self._runner = runner
        # the out-of-distribution statistics model.json names (None: the bundle cannot warn)
        self.ood_statistics = ood_statistics
        # per ONNX Runtime candidate, the agreement gate's figures and its timing on this host
        # (runtimes.json); empty when no gate ran (Keras asked for, or no gate data)
        self.gate = dict(gate or {})
        # slices per forward pass: the fastest measured for the runtime on this host, else 16
        self.batch_size = batch_size or 16
        _check_batch_size(self.batch_size)

    @property
    def runtime(self) -> str:
        """``keras``, ``onnx`` or ``onnx-int8`` (what ``auto`` chose, for a bundle loaded
        with it)."""
        return self._runner.runtime

    @property
    def session_options(self):
        """The ONNX Runtime session options in use (threads), None on the Keras runtime."""
        session = getattr(self._runner, "session", None)
        return session.get_session_options() if session is not None else None

    @property
    def model(self):
        """The Keras model served (the ``keras`` runtime only)."""
        if not isinstance(self._runner, KerasRunner):
            raise AttributeError("an onnx-runtime bundle has no Keras model")
        return self._runner.model

    def keras_model(self):
        """The bundle's Keras model: the one served, or where ONNX Runtime serves, ``model.keras``
        loaded on the first call and kept (Grad-CAM needs TensorFlow's gradients)."""
        if isinstance(self._runner, KerasRunner):
            return self._runner.model
        with _KERAS_LOCK:
            if getattr(self, "_keras", None) is None:
                self._keras = load_keras(self.folder / MODEL_FILE, self.info)
            return self._keras

    def gradcam(self):
        """The :class:`node.analysis.gradcam.GradCam` of :meth:`keras_model` (built once)."""
        from node.analysis.gradcam import GradCam

        model = self.keras_model()
        with _KERAS_LOCK:
            if getattr(self, "_gradcam", None) is None:
                self._gradcam = GradCam(model)
            return self._gradcam

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        runtime: str = "keras",
        mixed_precision: bool = False,
        threads: int = 0,
        progress: bool = False,
    ) -> ModelBundle:
        """Validate ``model.json``, then load ``model.keras`` (or its cached ONNX export).

        Parameters
        ----------
        path
            The bundle folder.
        runtime
            ``keras`` (TensorFlow), ``onnx`` (ONNX Runtime FP32; ``model.onnx`` is exported
            from ``model.keras`` on first use and cached beside it), ``onnx-int8`` (ONNX
            Runtime INT8, made from the export with the bundle's calibration slices and
            cached as ``model.int8.onnx``), ``openvino`` / ``openvino-bf16`` (the ONNX export
            on OpenVINO's CPU plugin, FP32 / BF16) or ``auto``: Keras where a GPU is visible, else
            the fastest ONNX candidate that passes the agreement gate
            (:mod:`node.analysis.runtimes`), Keras when none does, when onnxruntime or tf2onnx
            is missing or when the export fails (logged). A bundle without gate data is served
            by ONNX Runtime FP32 under ``auto`` and cannot be served by ``onnx-int8``. An ONNX
            runtime asked for by name that fails the gate is refused (:class:`BundleError`
            with the figures).
        mixed_precision
            Compute in float16 where a GPU is visible; on a CPU this is logged and ignored.
        threads
            ONNX Runtime intra-op threads; 0: this host's CPUs shared among its
            model-serving workers (:func:`node.analysis.threads.intra_op_threads`).
        progress
            Show the conversion, the gate and the timing as a progress bar on stderr.
        """
        if runtime not in RUNTIMES:
            raise BundleError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        folder = Path(path)
        if not folder.is_dir():
            raise BundleError(f"{folder}: no such model bundle folder")
        info = ModelInfo.from_json(folder / INFO_FILE)
        calibration.check(info)  # a bad calibration is refused now, not at the first answer
        model_file = folder / MODEL_FILE
        if not model_file.is_file():
            raise BundleError(f"{model_file}: missing (the bundle has no model)")
        try:
            statistics = ood.read_statistics(folder, info.ood)
        except (ood.OodError, OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{folder / INFO_FILE}: ood: {exc}") from exc
        try:
            gating = gate_data.read_gate_data(folder, info.gate)
        except (gate_data.GateDataError, OSError) as exc:
            raise BundleError(f"{folder / INFO_FILE}: gate: {exc}") from exc
        gpu = _gpu_visible() if mixed_precision or runtime == "auto" else False
        if mixed_precision and not gpu:
            log.warning("mixed_precision asked for but no GPU is visible: running in float32")
            mixed_precision = False
        chosen = _auto_runtime(gpu) if runtime == "auto" else runtime
        if chosen != "keras":
            if mixed_precision:
                log.warning("mixed_precision applies to the keras runtime only: ignored")
            try:
                return cls._load_onnx(folder, info, statistics, gating, runtime, threads, progress)
            except Exception as exc:  # auto falls back; an explicit onnx says why it cannot
                if runtime != "auto":
                    raise
                log.warning("ONNX Runtime cannot serve this bundle, using Keras: %s", exc)
        runner = KerasRunner(load_keras(model_file, info), mixed_precision)
        return cls(info, runner, folder, statistics)

    @classmethod
    def _load_onnx(cls, folder, info, statistics, gating, runtime, threads, progress):
        """The bundle on ONNX Runtime: gated when it has gate data (Keras when ``auto`` finds
        no candidate that passes), else FP32 as asked."""
        from node.analysis import runtimes
        from node.analysis.threads import intra_op_threads

        model_file = folder / MODEL_FILE
        threads = intra_op_threads(threads)
        if gating is None:
            if runtime == "onnx-int8":
                raise BundleError(
                    f"{folder / INFO_FILE}: no gate data (model.json's gate): onnx-int8 needs "
                    "the bundle's calibration slices and its agreement gate"
                )
            if runtime == "auto":
                log.info("%s: no gate data in the bundle: serving ONNX Runtime FP32", folder)
            runner = runtimes.OnnxRunner(onnx_model(model_file, info), "onnx", threads)
            return cls(info, runner, folder, statistics)
        choice = runtimes.choose_runtime(
            folder,
            info,
            gating,
            runtime,
            model_sha256=ood.sha256_of(model_file),
            threads=threads,
            float_model=lambda: onnx_model(model_file, info),
            keras_runner=lambda: KerasRunner(load_keras(model_file, info)),
            statistics=statistics,
            progress=progress,
        )
        runner = choice.runner or KerasRunner(load_keras(model_file, info))
        return cls(info, runner, folder, statistics, choice.results, choice.batch_size)

    def predict_with_features(
        self, slices: np.ndarray, batch_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities (as :meth:`predict`) and the penultimate-layer features the
        out-of-distribution score is computed on, float32 ``(N, features)``, from the same
        forward pass (every runtime gives them)."""
        batch = _check_slices(slices)
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_batch_size(batch_size)
        outputs = [
            self._runner(batch[start : start + batch_size])
            for start in range(0, len(batch), batch_size)
        ]
        if not outputs:
            classes = len(self.info.classes)
            return np.zeros((0, classes), np.float32), None
        probabilities = np.concatenate([p for p, _ in outputs]).astype(np.float32, copy=False)
        features = np.concatenate([f for _, f in outputs]).astype(np.float32, copy=False)
        return probabilities, features

    def predict(self, slices: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities of windowed slices.

        Parameters
        ----------
        slices
            uint8 ``(N, H, W)`` or ``(N, H, W, 1)`` windowed slices at any size.
        batch_size
            Slices per forward pass (None: :attr:`batch_size`, the runtime's fastest).

        Returns
        -------
        numpy.ndarray
            float32 ``(N, classes)``, rows in ``info.classes`` order.
        """
        batch = _check_slices(slices)
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_batch_size(batch_size)
        outputs = [
            self._runner(batch[start : start + batch_size])[0]
            for start in range(0, len(batch), batch_size)
        ]
        if not outputs:
            return np.zeros((0, len(self.info.classes)), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32, copy=False)


def _check_batch_size(batch_size: object) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _check_slices(slices: object) -> np.ndarray:
    """``(N, H, W, 1)`` uint8 from ``(N, H, W)`` or ``(N, H, W, 1)`` uint8; errors name it."""
    if not isinstance(slices, np.ndarray) or slices.dtype != np.uint8:
        kind = getattr(slices, "dtype", type(slices).__name__)
        raise ValueError(f"slices must be a uint8 numpy array of windowed pixels, got {kind}")
    if slices.ndim == 3:
        slices = slices[..., np.newaxis]
    if slices.ndim != 4 or slices.shape[-1] != 1 or 0 in slices.shape[1:3]:
        raise ValueError(f"slices must have shape (N, H, W) or (N, H, W, 1), got {slices.shape}")
    return np.ascontiguousarray(slices)


def write_bundle(
    model,
    info: ModelInfo,
    folder: str | os.PathLike,
    overwrite: bool = False,
    extra_files: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write ``model.keras`` and ``model.json`` (and ``extra_files``, copied beside them: the
    statistics ``model.json`` refers to) into ``folder`` atomically and read them back.

    The bundle is built in a temporary folder beside ``folder``, loaded back and checked, then
    renamed into place, so a reader sees the old bundle or the new one, never half of one. The
    model is saved in float32 without its optimizer state.
    """
    if not isinstance(info, ModelInfo):
        raise TypeError(f"info must be a ModelInfo, got {type(info).__name__}")
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise BundleError(f"{folder}: already exists (pass overwrite=True to replace it)")
    check_model(model, info, "model")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        temp.chmod(0o755)
        # No optimizer, no compile state, and float32 whatever the model was trained in (a
        # mixed-precision run on GPUs): the node chooses its own precision when it loads.
        policy_copy(model, "float32").save(temp / MODEL_FILE)
        info.to_json(temp / INFO_FILE)
        for extra in map(Path, extra_files):
            shutil.copy2(extra, temp / extra.name)
        ModelBundle.load(temp)  # proves the written files are a valid bundle
        _keep_other_files(folder, temp)
        old = folder.with_name(f".{folder.name}.old") if folder.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(temp, folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return folder


def _keep_other_files(old: Path, new: Path) -> None:
    """Carry files kept beside a model (notes, ignore rules) over; never a stale cache."""
    if not old.is_dir():
        return
    for path in old.iterdir():
        own = path.name in (MODEL_FILE, INFO_FILE, *CACHE_FILES) or (new / path.name).exists()
        if path.is_file() and not own:  # the new bundle's own statistics win
            shutil.copy2(path, new / path.name)
