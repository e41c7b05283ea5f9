"""Turn an evaluated run into a versioned model bundle in the node's registry."""

from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from node.analysis import imaging
from node.analysis.bundle import write_bundle
from node.analysis.bundle_format import BUNDLE_FORMAT
from node.analysis.gate_data import GATE_FILE, write_gate_data
from node.analysis.model_info import ModelInfo
from node.analysis.result import CLASSES
from training.fit import FIT_DIR, OPTIONS_FILE, SUMMARY_FILE
from training.scoring import EVALUATION_DIR, checkpoint_path, read_evaluation
from training.shards import PreparedRun

_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
# the bundle's gate data (node.analysis.gate_data): validation slices for the INT8
# calibration and, of other patients, the agreement hold-out; whole test studies
# (a min/max calibration settles within a few dozen slices; the demo bundle stays small)
CALIBRATION_SLICES, HOLDOUT_SLICES = 64, 256
TEST_STUDIES, TEST_SLICES = 9, 400


def check_component(kind: str, value: str) -> str:
    """A model name or version that is safe as one folder name."""
    if not _COMPONENT.match(value or "") or ".." in value:
        raise ValueError(
            f"model {kind} {value!r}: use 1-64 letters, digits, '.', '_', '+', '-' "
            "(not starting with a dot or a dash)"
        )
    return value


def summary_metrics(evaluation: dict, fit_summary: dict) -> dict:
    """The figures ``model.json`` carries: test metrics at slice and study level."""
    slice_, study = evaluation["slice"], evaluation["study"]
    return {
        "test_split": evaluation.get("split", "test"),
        "test_accuracy": slice_["accuracy"],
        "test_slices": slice_["n"],
        "study_accuracy": study["accuracy"],
        "test_studies": study["n"],
        "test_patients": evaluation.get("patients"),
        "covid_sensitivity": slice_["covid_sensitivity"],
        "covid_ppv": slice_["covid_ppv"],
        "macro_auc": slice_["macro_auc"],
        "per_class": slice_["per_class"],
        "confusion_matrix": slice_["confusion_matrix"],
        "aggregation_rule": evaluation.get("rule"),
        "best_val_accuracy": fit_summary.get("best_val_accuracy"),
        "train_images": fit_summary.get("train_images"),
        "training_seconds": fit_summary.get("seconds"),
    }


def run_window(run: PreparedRun) -> imaging.Window:
    """The window the run's images were made with (node exports say; else the lung preset)."""
    windows = {
        (source["window"]["center"], source["window"]["width"])
        for source in run.info.get("sources", [])
        if source.get("window")
    }
    if len(windows) > 1:
        raise ValueError(f"{run.folder}: sources were windowed differently: {sorted(windows)}")
    if windows:
        center, width = windows.pop()
        return imaging.Window(center, width)
    return imaging.LUNG


def _evenly(indices: list[int], count: int) -> list[int]:
    """At most ``count`` of ``indices``, spread evenly over them."""
    if len(indices) <= count:
        return indices
    return [indices[i] for i in np.linspace(0, len(indices) - 1, count).round().astype(int)]


def _split_rows(run: PreparedRun, split: str) -> list[int]:
    """The samples.csv row of each image of ``split``'s shards, in shard order."""
    rows: list[int] = []
    for path in run.shard_files(split):
        with np.load(path) as shard:
            rows += shard["rows"].tolist()
    return rows


def _split_images(run: PreparedRun, split: str, chosen: list[int]) -> np.ndarray:
    """The images at positions ``chosen`` of ``split``'s shards, ``(N, H, W)`` uint8, one
    shard in memory at a time."""
    wanted, found, start = set(chosen), {}, 0
    for path in run.shard_files(split):
        with np.load(path) as shard:
            count = len(shard["rows"])
            if wanted & set(range(start, start + count)):
                images = shard["images"]
                found.update(
                    {i: images[i - start, ..., 0] for i in wanted if 0 <= i - start < count}
                )
        start += count
    return np.stack([found[i] for i in chosen])


def _test_studies(keys: list[str], labels: list[str]) -> list[str]:
    """Up to :data:`TEST_STUDIES` studies, the classes in turn, at most :data:`TEST_SLICES`
    slices in all (the first study whatever its size)."""
    by_class: dict[str, list[str]] = {}
    for key, label in sorted(set(zip(keys, labels, strict=True))):
        by_class.setdefault(label, []).append(key)
    sizes = {key: keys.count(key) for key in set(keys)}
    queue = [key for turn in zip(*by_class.values(), strict=False) for key in turn]
    queue += [k for members in by_class.values() for k in members if k not in queue]
    chosen: list[str] = []
    for key in queue:
        total = sum(sizes[k] for k in chosen)
        if len(chosen) < TEST_STUDIES and (not chosen or total + sizes[key] <= TEST_SLICES):
            chosen.append(key)
    return chosen


def write_run_gate_data(run: PreparedRun, path: str | os.PathLike) -> dict:
    """Write the run's gate data to ``path`` and return model.json's ``gate`` for it.

    Validation patients (in key order) go to the INT8 calibration until it holds a third of
    the validation slices (at most :data:`CALIBRATION_SLICES`), the others to the hold-out
    (at most :data:`HOLDOUT_SLICES`); a single validation patient is split slice by slice.
    Test studies are whole (from the hold-out patients when the run has no test split).
    """
    samples = run.samples()
    val_rows = _split_rows(run, "val")
    patients = [samples[row].patient for row in val_rows]
    target = max(1, min(CALIBRATION_SLICES, len(val_rows) // 3))
    first: set[str] = set()
    for patient in sorted(set(patients)):
        if sum(p in first for p in patients) >= target:
            break
        first.add(patient)
    positions = range(len(val_rows))
    if len(first) == len(set(patients)):  # one patient: every third slice calibrates
        calibration = [i for i in positions if i % 3 == 0]
    else:
        calibration = [i for i in positions if patients[i] in first]
    calibrating = set(calibration)
    holdout = [i for i in positions if i not in calibrating]
    test_split = "test" if run.images("test") else "val"
    test_rows = _split_rows(run, test_split)
    test_positions = range(len(test_rows)) if test_split == "test" else holdout
    keys = [samples[test_rows[i]].study for i in test_positions]
    labels = [samples[test_rows[i]].label for i in test_positions]
    studies = set(_test_studies(keys, labels))
    test = [i for i, key in zip(test_positions, keys, strict=True) if key in studies]
    return write_gate_data(
        path,
        _split_images(run, "val", _evenly(calibration, CALIBRATION_SLICES)),
        _split_images(run, "val", _evenly(holdout, HOLDOUT_SLICES)),
        _split_images(run, test_split, test),
        np.array([samples[test_rows[i]].study for i in test]),
        source=(
            f"validation patients apart for calibration and hold-out, whole {test_split} "
            f"studies (prepared run {run.folder.name!r})"
        ),
    )


def register_run(
    folder: str | os.PathLike,
    models_dir: str | os.PathLike,
    name: str,
    version: str,
    demo: bool = False,
    description: str = "",
    checkpoint: str = "best",
    out: str | os.PathLike | None = None,
) -> Path:
    """Write the run's model as ``models_dir/NAME/VERSION`` (model.keras + model.json), or
    into ``out`` (replacing a bundle there) when given."""
    import keras
    import tensorflow as tf

    check_component("name", name)
    check_component("version", version)
    run = PreparedRun.open(folder)
    evaluation = read_evaluation(run.folder)
    fit_dir = run.folder / FIT_DIR
    options = json.loads((fit_dir / OPTIONS_FILE).read_text(encoding="utf-8"))
    fit_summary = json.loads((fit_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    model_file = checkpoint_path(run, checkpoint)
    if evaluation.get("model_file") != model_file.name:
        raise ValueError(
            f"{run.folder}: the evaluation is of {evaluation.get('model_file')}, not "
            f"{model_file.name}; evaluate that checkpoint first"
        )
    window = run_window(run)
    # what makes answers checkable (fitted at evaluate; empty: not fitted) and, below, the
    # slices that gate faster runtimes: format 2
    trust = {key: evaluation.get(key) or {} for key in ("calibration", "operating_point", "ood")}
    weights = (
        "random initialisation" if options["weights"] is None else Path(options["weights"]).name
    )
    info = ModelInfo(
        name=name,
        version=version,
        classes=CLASSES,
        input_size=options["input_size"],
        window_center=window.center,
        window_width=window.width,
        preprocessing_version=imaging.PREPROCESSING_VERSION,
        backbone=options["backbone"],
        dataset_manifest_hash=run.info["manifest_sha256"],
        metrics=summary_metrics(evaluation, fit_summary),
        framework={"tensorflow": tf.__version__, "keras": keras.__version__},
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        demo=demo,
        description=description or f"{options['backbone']} from {weights}, run {run.folder.name}",
        weights=fit_summary.get("weights", {}),
        format_version=BUNDLE_FORMAT,
        **trust,
    )
    extra = [run.folder / EVALUATION_DIR / name for name in evaluation.get("bundle_files", [])]
    model = keras.models.load_model(model_file, compile=False)
    target, overwrite = (
        (out, True) if out is not None else (Path(models_dir) / name / version, False)
    )
    with tempfile.TemporaryDirectory(prefix="ainode-register-") as work:
        info = info.replace(gate=write_run_gate_data(run, Path(work) / GATE_FILE))
        extra.append(Path(work) / GATE_FILE)
        return write_bundle(model, info, target, overwrite=overwrite, extra_files=extra)
