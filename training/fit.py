"""Fine-tune the classifier on a prepared run, one shard (super-batch) per Keras epoch.

The seed paper's recipe is the default: Adam with ExponentialDecay(1e-4, 100000, 0.96), batch
80, the best model on validation accuracy kept, early stopping on validation accuracy, a CSV
log. After every shard the model and optimizer are saved with the loop's state, so a run that
is killed resumes at the next shard with the same learning-rate schedule.

Files in ``RUN/fit/``: ``options.json``, ``state.json``, ``last.keras`` (resume point),
``best.keras`` (best validation accuracy), ``history.csv`` (one row per shard, with the
running training ``seconds``), ``fit.json``
(the summary, written when the run ends).

With a frozen pretrained base (``freeze_base``) the fit can go on in a second stage, as the
seed paper and the Keras transfer-learning guide describe: the best head-stage model gets its
backbone's top ``fine_tune_blocks`` blocks unfrozen (batch norm stays frozen) and trains for
``fine_tune_epochs`` more passes at ``fine_tune_lr``. Epoch numbers, ``history.csv``,
``best.keras`` and early stopping carry on across the stages; a killed run resumes in the
stage it was in.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from node import atomic
from training.batches import train_batches, validation_data
from training.devices import Devices, resolve_devices
from training.feature_cache import restore_optimizer, save_optimizer
from training.model import HEAD_FILE
from training.options import FitOptions
from training.shards import PreparedRun

log = logging.getLogger(__name__)

FIT_DIR = "fit"
HEAD_STAGE, FINE_TUNE_STAGE = "head", "fine-tune"
OPTIONS_FILE, STATE_FILE, SUMMARY_FILE = "options.json", "state.json", "fit.json"
LAST_MODEL, BEST_MODEL, HISTORY_FILE = "last.keras", "best.keras", "history.csv"
OPTIMIZER_FILE = "last-optimizer.npz"  # a cached stage's optimizer, beside last.keras
BACKBONE_WEIGHTS = "backbone.weights.h5"  # extracted when fine-tuning from a trained model
# Keras' 0.99 leaves a from-scratch model's moving statistics near their initial values after
# a few hundred steps, so inference (which uses them) collapses to one class.
FROM_SCRATCH_BATCHNORM_MOMENTUM = 0.9


class FitError(RuntimeError):
    """The run cannot be fitted (inconsistent resume, no training data …)."""


def fit(
    run_folder: str | os.PathLike,
    options: FitOptions,
    restart: bool = False,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict:
    """Train on the run's shards (resuming when a previous fit stopped); return the summary.

    ``callbacks`` are added to Keras' own (a time budget, say: one that sets
    ``model.stop_training`` ends the current stage after its shard, checkpointed).
    """
    run = PreparedRun.open(run_folder)
    folder = run.folder / FIT_DIR
    state = _start_state(folder, options, restart)
    devices = resolve_devices(options.mixed_precision, options.strategy)
    for note in devices.notes:
        log.warning("%s", note)
    keras.utils.set_random_seed(options.seed)
    keras.mixed_precision.set_global_policy(devices.policy)
    from training.model import weights_origin

    weights = _weights_file(options, folder)  # resolved once: a bundle's backbone is extracted
    origin = weights_origin(options.backbone, weights)
    try:
        with devices.strategy.scope():
            model, notes = _model(folder, options, state, weights, origin)
        base = {"devices": devices.describe(), "notes": notes, "weights": origin}
        return _loop(run, folder, options, state, model, devices, base, list(callbacks))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _start_state(folder: Path, options: FitOptions, restart: bool) -> dict:
    """The loop state to start from: fresh, or the saved one when resuming."""
    if restart and folder.exists():
        made = (STATE_FILE, LAST_MODEL, BEST_MODEL, HISTORY_FILE, SUMMARY_FILE, OPTIONS_FILE)
        made += (OPTIMIZER_FILE,)
        for name in (*made, BACKBONE_WEIGHTS, HEAD_FILE):  # and what the start model gave
            (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / STATE_FILE).exists() and (folder / LAST_MODEL).exists():
        saved = json.loads((folder / OPTIONS_FILE).read_text(encoding="utf-8"))
        changed = sorted(k for k, v in options.resume_key().items() if saved.get(k) != v)
        if changed:
            raise FitError(
                f"{folder}: a fit with other options ({', '.join(changed)}) is there; "
                "pass --restart to start over"
            )
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        log.info("resuming after shard %d (best val_accuracy %s)", state["epoch"], state["best"])
        return state
    _write_json(folder / OPTIONS_FILE, asdict(options))
    return {
        "stage": HEAD_STAGE,
        "epoch": 0,
        "best": None,
        "wait": 0,
        "best_epoch": None,
        "seconds": 0.0,
        "images_seen": 0,
    }


def _model(folder: Path, options: FitOptions, state: dict, weights, origin: dict):
    """The model to train: the resume point, or a new compiled one; and the run's notes."""
    from node.analysis.result import CLASSES
    from training.model import make_model, resolve_weights, set_batchnorm_momentum, start_head_from

    notes = []
    pretrained = resolve_weights(options.backbone, weights) is not None
    if not pretrained:
        notes.append(
            "no pretrained weights: the whole EfficientNet is trained from random "
            "initialisation (a frozen random base would learn nothing)"
        )
    else:
        notes.append(f"backbone initialised from {origin['origin']}")
        if options.freeze_base:
            notes.append("the head trains on the frozen pretrained backbone")
        if options.fine_tune_blocks:
            notes.append(
                f"then the backbone's top {options.fine_tune_blocks} block(s) train on at "
                f"{options.fine_tune_lr:g} for up to {options.fine_tune_epochs} pass(es), "
                "batch norm kept frozen"
            )
    notes.append(cache_note(options))
    if state["epoch"] > 0:
        # a cached stage compiles its own trainer (its optimizer is saved beside last.keras)
        model = keras.models.load_model(folder / LAST_MODEL, compile=not cache_applies(options))
        return model, notes + state.get("head", [])
    model = make_model(
        options.backbone,
        input_size=options.input_size,
        weights=weights,
        freeze_base=options.freeze_base,
    )
    if weights == folder / BACKBONE_WEIGHTS:  # continuing from a trained model
        state["head"] = [
            "the classifier starts fresh (--fresh-head)"
            if options.fresh_head
            else start_head_from(model, folder / HEAD_FILE, CLASSES)
        ]
        notes += state["head"]
    momentum = options.batchnorm_momentum
    if momentum is None and not pretrained:
        momentum = FROM_SCRATCH_BATCHNORM_MOMENTUM
    if momentum is not None:
        set_batchnorm_momentum(model, momentum)
    if not cache_applies(options):  # else the stage compiles its trainer (_cached_trainer)
        _compile(model, options.learning_rate, options)
    return model, notes


def _weights_file(options: FitOptions, folder: Path):
    """The weights make_model gets: the option as given, or a trained model's backbone."""
    from training.model import backbone_weights

    if options.weights is None or options.weights == "random":
        return options.weights
    target = folder / BACKBONE_WEIGHTS
    if target.exists() and Path(options.weights).suffix != ".h5":
        return target  # extracted when this fit started
    return backbone_weights(options.weights, options.backbone, target)


def _loop(run, folder, options, state, model, devices: Devices, base: dict, extra) -> dict:
    """The head stage (or the whole fit), then the fine-tuning stage when one is asked for."""
    shards = len(run.shard_files("train"))
    summary_base = {**base, "shards": shards}
    if state.get("stage", HEAD_STAGE) == HEAD_STAGE:
        if state["epoch"] < options.epochs * shards and not state.get("stopped"):
            _fit_stage(run, folder, options, state, model, options.epochs * shards, extra, devices)
        if options.fine_tune_blocks:
            with devices.strategy.scope():
                model = _start_fine_tuning(folder, options, state)
    if state.get("stage") == FINE_TUNE_STAGE:
        end = state["fine_tune"]["from_epoch"] + options.fine_tune_epochs * shards
        if state["epoch"] < end and not state.get("stopped"):
            _fit_stage(run, folder, options, state, model, end, extra, devices)
    return _finish(folder, options, state, summary_base, run)


def _start_fine_tuning(folder: Path, options: FitOptions, state: dict) -> keras.Model:
    """The best head-stage model with its top blocks unfrozen, compiled at the lower rate.

    Only the loop state in memory changes: the first fine-tuning checkpoint persists it, so a
    run killed before that starts the stage over from the same best model.
    """
    from training.model import unfreeze_top_blocks

    start = folder / (BEST_MODEL if (folder / BEST_MODEL).exists() else LAST_MODEL)
    model = keras.models.load_model(start, compile=False)
    blocks = unfreeze_top_blocks(model, options.fine_tune_blocks)
    if not cache_applies(options):
        _compile(model, options.fine_tune_lr, options)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    log.info(
        "fine-tuning %s and the layers after them (%d weights) at %g from %s",
        ", ".join(blocks), trainable, options.fine_tune_lr, start.name,
    )  # fmt: skip
    head_stopped_early = bool(state.get("stopped"))
    state.update(
        stage=FINE_TUNE_STAGE,
        stopped=False,
        wait=0,
        fine_tune={
            "from_epoch": state["epoch"],
            "from_checkpoint": start.name,
            "head_stopped_early": head_stopped_early,
            "blocks": blocks,
            "trainable_weights": trainable,
            "learning_rate": options.fine_tune_lr,
        },
    )
    return model


def _compile(model: keras.Model, learning_rate: float, options: FitOptions) -> None:
    """Adam with the seed's exponential decay from ``learning_rate``."""
    schedule = keras.optimizers.schedules.ExponentialDecay(
        learning_rate, decay_steps=options.decay_steps, decay_rate=options.decay_rate
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def cache_applies(options: FitOptions) -> bool:
    """Whether a stage trains on cached activations of its frozen part: a frozen base, and
    training copies made offline (online augmentation changes every image every pass)."""
    return options.freeze_base and options.feature_cache and not options.online_augment


def cache_note(options: FitOptions) -> str:
    """What the run's notes say about the feature cache."""
    if cache_applies(options):
        return (
            "the frozen layers run once per training and validation image; each stage trains "
            "on their cached output (shards/cache/, float16)"
        )
    if not options.freeze_base:
        return "no feature cache: the whole backbone trains, so its output changes every step"
    if options.online_augment:
        return "no feature cache: online augmentation changes every image on every pass"
    return "no feature cache (--no-feature-cache)"


def _cached_trainer(run, folder: Path, options: FitOptions, state: dict, model):
    """The stage's trainer on the cached frozen part, compiled, its optimizer restored when
    the stage resumes; and the cache (computed once, or read back)."""
    from training.feature_cache import open_or_build, split_model

    fine_tuning = state.get("stage") == FINE_TUNE_STAGE
    split = split_model(model, options.fine_tune_blocks if fine_tuning else 0)
    quiet = not sys.stdout.isatty()
    with tqdm(desc=f"caching {split.cut}", unit="img", disable=quiet) as bar:
        source, spent = None, 0.0
        if options.fine_tune_blocks and not fine_tuning:
            # the fine-tuning stage will read the activations at its cut: cache them now and
            # pool them for this stage, so the frozen part runs once for both stages
            lower = split_model(model, options.fine_tune_blocks)
            lower_cache, lower_summary = open_or_build(run, lower, options.batch_size, bar.update)
            source, spent = (lower_cache, lower.top), lower_summary["build_seconds"]
            if lower_summary["reused"]:
                spent = 0.0
        cache, summary = open_or_build(run, split, options.batch_size, bar.update, source)
    if not summary["reused"]:
        summary["build_seconds"] = round(summary["build_seconds"] + spent, 2)
        state["seconds"] += summary["build_seconds"]
    state.setdefault("feature_cache", {})[state.get("stage", HEAD_STAGE)] = summary
    trainer = split.trainer
    rate = options.fine_tune_lr if fine_tuning else options.learning_rate
    _compile(trainer, rate, options)
    stage_start = state["fine_tune"]["from_epoch"] if fine_tuning else 0
    if state["epoch"] > stage_start:
        restore_optimizer(trainer, folder / OPTIMIZER_FILE, state["epoch"])
    return trainer, cache


def _fit_stage(run, folder, options, state, model, end_epoch: int, extra: list, devices) -> None:
    """Keras ``fit`` from the state's epoch to ``end_epoch``, one shard per epoch; on the
    cached activations of the frozen part when the stage allows it (:func:`cache_applies`)."""
    _truncate_history(folder / HISTORY_FILE, state["epoch"])
    trainer, cache = model, None
    if cache_applies(options):
        with devices.strategy.scope():  # the trainer's optimizer variables, as the model's
            trainer, cache = _cached_trainer(run, folder, options, state, model)
    train, steps = train_batches(
        run, options.batch_size, state["epoch"], options.seed, options.online_augment, cache
    )
    val = validation_data(run, "val", options.batch_size, cache)
    largest = max(shard["images"] for shard in run.info["shards"]["train"])
    early = ResumableEarlyStopping(
        state, monitor="val_accuracy", mode="max", patience=options.patience
    )
    callbacks = [
        TrainingClock(state),
        keras.callbacks.CSVLogger(str(folder / HISTORY_FILE), append=True),
        BestModelCheckpoint(
            model,
            str(folder / BEST_MODEL),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            initial_value_threshold=state["best"],
        ),
        early,
        *extra,
        RunCheckpoint(folder, state, early, largest, model if cache is not None else None),
    ]
    trainer.fit(
        train,
        steps_per_epoch=steps,
        validation_data=val,
        epochs=end_epoch,
        initial_epoch=state["epoch"],
        callbacks=callbacks,
        shuffle=False,  # the batches come shuffled per shard (train_batches)
        verbose=1 if sys.stdout.isatty() else 2,  # a progress bar for people, lines for logs
    )
    state["stopped"] = early.stopped_epoch > 0
    _write_json(folder / STATE_FILE, state)


def _finish(folder, options, state, summary_base, run) -> dict:
    summary = {
        **summary_base,
        "epochs_run": state["epoch"],
        "best_val_accuracy": state["best"],
        "best_epoch": state["best_epoch"],
        "stopped_early": bool(state.get("stopped")),
        "fine_tune": state.get("fine_tune"),
        "feature_cache": state.get("feature_cache", {}),
        "train_images": run.images("train"),
        "seconds": round(state["seconds"], 1),
        "images_per_second": round(state.get("images_seen", 0) / max(state["seconds"], 1e-9), 2),
        "options": asdict(options),
    }
    _write_json(folder / SUMMARY_FILE, summary)
    return summary


def _truncate_history(path: Path, epochs: int) -> None:
    """Drop log rows of shards after the resume point (a crash can log a shard twice)."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < epochs]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(kept)


def _write_json(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=2) + "\n")


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping that starts from the saved wait count and best value."""

    def __init__(self, state: dict, **kwargs) -> None:
        super().__init__(**kwargs)
        self._state = state

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.wait = self._state["wait"]
        self.best = self._state["best"]
        self.best_epoch = self._state["best_epoch"] or 0


class TrainingClock(keras.callbacks.Callback):
    """Adds each shard's time (training and validation) to the state and logs the running
    total as the ``seconds`` column of ``history.csv``; runs before the other callbacks."""

    def __init__(self, state: dict):
        super().__init__()
        self._state = state
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self._state["seconds"] += time.perf_counter() - self._started
        if logs is not None:
            logs["seconds"] = round(self._state["seconds"], 2)


class BestModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras' ModelCheckpoint that saves the whole classifier, also while a stage trains only
    its top on cached activations (a trainer that shares the classifier's layers)."""

    def __init__(self, classifier: keras.Model, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._classifier = classifier

    def set_model(self, model):
        super().set_model(self._classifier)


class RunCheckpoint(keras.callbacks.Callback):
    """After every shard: save the model with its optimizer, then the loop state.

    With a ``classifier`` (a cached stage: the trained model is its top) the whole classifier
    is saved, and the trainer's optimizer beside it (:data:`OPTIMIZER_FILE`)."""

    def __init__(
        self,
        folder: Path,
        state: dict,
        early: ResumableEarlyStopping,
        images: int,
        classifier: keras.Model | None = None,
    ):
        super().__init__()
        self._folder, self._state, self._early, self._images = folder, state, early, images
        self._classifier = classifier

    def on_epoch_end(self, epoch, logs=None):
        state = self._state
        state["images_seen"] = state.get("images_seen", 0) + self._images
        if self._classifier is None:
            atomic.write_with(self._folder / LAST_MODEL, self.model.save)  # keeps ".keras"
        else:
            save_optimizer(self.model, self._folder / OPTIMIZER_FILE, epoch + 1)
            atomic.write_with(self._folder / LAST_MODEL, self._classifier.save)
        value = (logs or {}).get("val_accuracy")
        if value is not None and (state["best"] is None or value > state["best"]):
            state["best"], state["best_epoch"] = float(value), epoch
        state["epoch"], state["wait"] = epoch + 1, self._early.wait
        _write_json(self._folder / STATE_FILE, state)
