"""Turn an evaluated run into a versioned model bundle in the node's registry."""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path

from node.analysis import imaging
from node.analysis.bundle import BUNDLE_FORMAT, ModelInfo, write_bundle
from node.analysis.result import CLASSES
from training.fit import FIT_DIR, OPTIONS_FILE, SUMMARY_FILE
from training.scoring import EVALUATION_DIR, checkpoint_path, read_evaluation
from training.shards import PreparedRun

_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


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
    # what makes answers checkable (fitted at evaluate): a bundle with any of it is format 2
    trust = {key: evaluation.get(key) or {} for key in ("calibration", "operating_point", "ood")}
    trust["format_version"] = BUNDLE_FORMAT if any(trust.values()) else 1
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
        **trust,
    )
    extra = [run.folder / EVALUATION_DIR / name for name in evaluation.get("bundle_files", [])]
    model = keras.models.load_model(model_file, compile=False)
    if out is not None:
        return write_bundle(model, info, out, overwrite=True, extra_files=extra)
    return write_bundle(model, info, Path(models_dir) / name / version, extra_files=extra)
