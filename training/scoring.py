"""Score a prepared run's test split with a fitted model and write the evaluation report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from node.analysis.result import CLASSES
from training.calibration import fit_on_validation
from training.evaluate import evaluate_predictions
from training.evaluation_report import write_report
from training.fit import BEST_MODEL, FIT_DIR, HISTORY_FILE, LAST_MODEL
from training.ood import fit_ood
from training.samples import Sample
from training.shards import PreparedRun

EVALUATION_DIR = "evaluation"
CHECKPOINTS = {"best": BEST_MODEL, "last": LAST_MODEL}


def checkpoint_path(run: PreparedRun, checkpoint: str = "best") -> Path:
    """The fitted model file of ``run`` (``best`` falls back to ``last`` when no validation
    accuracy was ever recorded)."""
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    folder = run.folder / FIT_DIR
    path = folder / CHECKPOINTS[checkpoint]
    if not path.exists() and checkpoint == "best":
        path = folder / LAST_MODEL
    if not path.exists():
        raise FileNotFoundError(f"{run.folder}: no fitted model (run `ainode train fit` first)")
    return path


def predict_split(model, run: PreparedRun, split: str, batch_size: int = 32, progress=None):
    """Probabilities, true labels and samples.csv rows of ``split``, one shard at a time."""
    probs, labels, rows = [], [], []
    for shard in run.read_shards(split):
        probs.append(model.predict(shard["images"], batch_size=batch_size, verbose=0))
        labels.append(shard["labels"])
        rows.append(shard["rows"])
        if progress is not None:
            progress(len(shard["labels"]))
    if not probs:
        raise ValueError(f"{run.folder}: the {split} split is empty")
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(rows)


def split_unit(samples: list[Sample]) -> str:
    """``"image"`` when every image of the run is its own patient (the data had no patient
    keys, so the split was by image), else ``"patient"``."""
    return "image" if len({s.patient for s in samples}) == len(samples) else "patient"


def evaluate_run(
    folder: str | os.PathLike,
    checkpoint: str = "best",
    rule: str = "top-mean",
    split: str = "test",
    progress=None,
    target_sensitivity: float = 0.95,
) -> tuple[dict, list[Path]]:
    """Evaluate the fitted model on ``split`` at slice, study and patient level, with 95 %
    intervals by bootstrap over the split's patients (over images when the run's data had
    no patient keys: :func:`split_unit`); write the report into ``RUN/evaluation`` and
    return the result and the files written.

    On the test split it also fits, on the validation split (and the training images for the
    out-of-distribution statistics), what makes the node's answers checkable: calibration,
    the COVID-19 operating point for ``target_sensitivity``, OOD statistics
    (:mod:`training.calibration`, :mod:`training.ood`); ``register`` puts them in the bundle.
    """
    import keras

    run = PreparedRun.open(folder)
    model_file = checkpoint_path(run, checkpoint)
    model = keras.models.load_model(model_file, compile=False)
    probs, labels, rows = predict_split(model, run, split, progress=progress)
    samples = run.samples()
    studies = [samples[row].study for row in rows]
    patients = [samples[row].patient for row in rows]
    result = evaluate_predictions(
        labels, probs, studies, CLASSES, rule, patients, split_by=split_unit(samples)
    )
    result.update(
        {
            "split": split,
            "model_file": model_file.name,
            "manifest_sha256": run.info["manifest_sha256"],
            "patients": len(set(patients)),
        }
    )
    out = run.folder / EVALUATION_DIR
    out.mkdir(exist_ok=True)
    fitted: list[Path] = []
    if split == "test":
        calibration, operating_point, calibration_report, files = fit_on_validation(
            model, run, rule, target_sensitivity, out, progress, test=(probs, labels, rows)
        )
        ood, ood_report, ood_files = fit_ood(model, run, out, progress)
        result.update(
            {
                "calibration": calibration,
                "operating_point": operating_point,
                "ood": ood,
                "trust_report": {"calibration": calibration_report, "ood": ood_report},
                # files of out/ that register puts in the bundle beside model.json
                "bundle_files": [path.name for path in ood_files],
            }
        )
        fitted = files + ood_files
    history = run.folder / FIT_DIR / HISTORY_FILE
    files = write_report(
        result,
        out,
        history_csv=history if history.exists() else None,
        title=f"Evaluation of {run.folder.name} ({split} split)",
    )
    return result, files + fitted


def read_evaluation(folder: str | os.PathLike) -> dict:
    """The evaluation written by :func:`evaluate_run`."""
    path = Path(folder) / EVALUATION_DIR / "evaluation.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{folder}: not evaluated yet (run `ainode train evaluate` first)"
        ) from exc
