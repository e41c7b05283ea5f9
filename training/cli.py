"""``ainode train prepare|fit|evaluate|register``: the training pipeline from the command line.

Registered through the ``ainode.commands`` entry point, so the node itself never imports
training code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

log = logging.getLogger("ainode.train")


def register(sub) -> dict:
    """Add ``train`` and its steps to the ``ainode`` parser."""
    train = sub.add_parser("train", help="prepare data, fit, evaluate and register a model")
    steps = train.add_subparsers(dest="step", required=True, metavar="STEP")
    _prepare_arguments(steps.add_parser("prepare", help="samples → balanced shards"))
    _fit_arguments(steps.add_parser("fit", help="fine-tune on a prepared run (resumes)"))
    evaluate = steps.add_parser("evaluate", help="metrics and plots on the test split")
    evaluate.add_argument("run", type=Path)
    evaluate.add_argument("--checkpoint", choices=["best", "last"], default="best")
    evaluate.add_argument("--rule", choices=["top-mean", "mean"], default="top-mean")
    evaluate.add_argument("--split", choices=["test", "val"], default="test")
    evaluate.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.95,
        help="COVID-19 sensitivity the operating point is chosen for, on the validation split",
    )
    reg = steps.add_parser("register", help="write the model bundle into the node's registry")
    reg.add_argument("run", type=Path)
    reg.add_argument("--name", required=True)
    reg.add_argument("--version", required=True)
    reg.add_argument("--demo", action="store_true", help="mark it as a demo, not for clinical use")
    reg.add_argument("--description", default="")
    reg.add_argument("--checkpoint", choices=["best", "last"], default="best")
    reg.add_argument("--activate", action="store_true", help="also make it the active model")
    reg.add_argument("--out", type=Path, help="write the bundle here instead of the registry")
    return {"train": cmd_train}


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="new run folder")
    parser.add_argument("--export", type=Path, action="append", default=[], help="node export")
    parser.add_argument("--folders", type=Path, action="append", default=[], help="class folders")
    parser.add_argument(
        "--covidx", type=Path, action="append", default=[], help="COVIDx CT-2A or CT-3A folder"
    )
    parser.add_argument(
        "--covidx-variant",
        choices=["auto", "2A", "3A"],
        default="auto",
        help="COVIDx release; auto: from the split files in the folder",
    )
    parser.add_argument("--patient-pattern", help="regex whose group is the patient in a file name")
    parser.add_argument(
        "--exclude-patients",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="text file of patient keys (one per line) kept out of every split",
    )
    parser.add_argument(
        "--exclude-export",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="node export whose patients are kept out of every split",
    )
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=2000, help="images per super-batch")
    parser.add_argument("--val", type=float, default=0.15, help="validation share of patients")
    parser.add_argument("--test", type=float, default=0.15, help="test share of patients")
    parser.add_argument("--no-balance", action="store_true", help="no augmented copies")
    parser.add_argument("--no-crop", action="store_true", help="ignore COVIDx lung boxes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    from training.options import FitOptions

    d = FitOptions()
    parser.add_argument("run", type=Path)
    parser.add_argument("--backbone", default=d.backbone)
    parser.add_argument("--input-size", type=int, default=d.input_size)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--epochs", type=int, default=d.epochs, help="passes over all shards")
    parser.add_argument("--patience", type=int, default=d.patience, help="shards, early stop")
    parser.add_argument("--lr", type=float, default=d.learning_rate, help="initial rate")
    parser.add_argument("--decay-steps", type=int, default=d.decay_steps)
    parser.add_argument("--decay-rate", type=float, default=d.decay_rate)
    parser.add_argument(
        "--weights",
        help="local pretrained weights file (include_top=False), or a model bundle or .keras "
        "file to continue from (its classifier too, unless --fresh-head)",
    )
    parser.add_argument(
        "--fresh-head", action="store_true", help="start the classifier anew from --weights"
    )
    parser.add_argument("--freeze-base", action="store_true", help="train only the head")
    parser.add_argument(
        "--fine-tune-blocks",
        type=int,
        default=d.fine_tune_blocks,
        help="after the head stage, also train the backbone's top N blocks",
    )
    parser.add_argument("--fine-tune-epochs", type=int, default=d.fine_tune_epochs)
    parser.add_argument("--fine-tune-lr", type=float, default=d.fine_tune_lr)
    parser.add_argument(
        "--online-augment", action="store_true", help="also perturb every training batch"
    )
    parser.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="recompute the frozen backbone every pass instead of caching its output",
    )
    parser.add_argument("--batchnorm-momentum", type=float)
    parser.add_argument("--mixed-precision", choices=["auto", "on", "off"], default="auto")
    parser.add_argument(
        "--strategy", choices=["auto", "default", "mirrored", "multiworker"], default="auto"
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--restart", action="store_true", help="discard an unfinished fit")


def run(settings, argv: list[str]) -> int:
    """``ainode train ARGV...`` without the ``ainode`` command line (the demo's trainer)."""
    parser = argparse.ArgumentParser(prog="ainode")
    handlers = register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    return handlers[args.command](settings, args)


def cmd_train(settings, args: argparse.Namespace) -> int:
    """Run one training step."""
    return {"prepare": _prepare, "fit": _fit, "evaluate": _evaluate, "register": _register}[
        args.step
    ](settings, args)


def _samples(args: argparse.Namespace) -> tuple[list, list[dict]]:
    """Every source's samples and what the run records about the sources."""
    from training import covidx, datasets

    samples, sources = [], []
    for folder in args.export:
        found = datasets.read_export(folder)
        meta = json.loads((folder / "export.json").read_text(encoding="utf-8"))
        sources.append(
            {
                "kind": "export",
                "name": folder.name,
                "images": len(found),
                "window": meta.get("window"),
            }
        )
        samples += found
    for folder in args.folders:
        found = datasets.read_class_folders(folder, patient_pattern=args.patient_pattern)
        sources.append({"kind": "class-folders", "name": folder.name, "images": len(found)})
        samples += found
    for folder in args.covidx:
        variant = covidx.covidx_variant(folder, args.covidx_variant)
        found = covidx.read_covidx(folder, use_box=not args.no_crop, variant=variant)
        kind = f"covidx-ct-{variant.lower()}"
        sources.append({"kind": kind, "name": folder.name, "images": len(found)})
        samples += found
    if not samples:
        raise ValueError("no images: give at least one --export, --folders or --covidx")
    if args.exclude_patients or args.exclude_export:
        samples, excluded = _exclude(args, samples)
        sources.append(excluded)
    return samples, sources


def _exclude(args: argparse.Namespace, samples: list) -> tuple[list, dict]:
    """The samples without the patients of ``--exclude-patients`` / ``--exclude-export``, and
    what the run records about them."""
    from training import datasets
    from training.samples import sha256_of
    from training.splits import exclude_patients

    keys: set[str] = set()
    for path in args.exclude_patients:
        keys |= datasets.read_patient_keys(path)
    for folder in args.exclude_export:
        keys |= {s.patient for s in datasets.read_export(folder)}
    kept, excluded = exclude_patients(samples, keys)
    patients = {s.patient for s in excluded}
    record = {
        "kind": "excluded-patients",
        "files": [{"name": p.name, "sha256": sha256_of(p)} for p in args.exclude_patients],
        "exports": [folder.name for folder in args.exclude_export],
        "keys": len(keys),
        "patients": len(patients),
        "images": len(excluded),
    }
    print(
        f"excluded {len(excluded)} image(s) of {len(patients)} patient(s); "
        f"{len(keys - patients)} of {len(keys)} listed key(s) matched no image"
    )
    return kept, record


def _prepare(settings, args: argparse.Namespace) -> int:
    from training.shards import PrepareOptions, prepare
    from training.splits import split_by_patient, split_counts

    samples, sources = _samples(args)
    samples = split_by_patient(samples, val=args.val, test=args.test, seed=args.seed)
    options = PrepareOptions(
        image_size=args.image_size,
        shard_size=args.shard_size,
        balance=not args.no_balance,
        crop=not args.no_crop,
        seed=args.seed,
    )
    for split, counts in split_counts(samples).items():
        print(f"{split}: {counts}")
    with tqdm(total=None, unit="img", disable=args.no_progress, desc="shards") as bar:
        info = prepare(samples, args.out, options, sources, progress=bar.update)
    for split, shards in info["shards"].items():
        images = sum(s["images"] for s in shards)
        augmented = sum(s["augmented"] for s in shards)
        print(f"{split}: {images} images ({augmented} augmented) in {len(shards)} shard(s)")
    print(f"prepared run: {args.out}")
    return 0


def _fit(settings, args: argparse.Namespace) -> int:
    from training.fit import fit
    from training.options import FitOptions

    options = FitOptions(
        backbone=args.backbone,
        input_size=args.input_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        patience=args.patience,
        learning_rate=args.lr,
        decay_steps=args.decay_steps,
        decay_rate=args.decay_rate,
        weights=args.weights,
        fresh_head=args.fresh_head,
        freeze_base=args.freeze_base,
        fine_tune_blocks=args.fine_tune_blocks,
        fine_tune_epochs=args.fine_tune_epochs,
        fine_tune_lr=args.fine_tune_lr,
        online_augment=args.online_augment,
        feature_cache=not args.no_feature_cache,
        batchnorm_momentum=args.batchnorm_momentum,
        mixed_precision=args.mixed_precision,
        strategy=args.strategy,
        seed=args.seed,
    )
    summary = fit(args.run, options, restart=args.restart)
    for note in summary["notes"]:
        print(f"note: {note}")
    print(
        f"fitted {summary['epochs_run']} shard(s) in {summary['seconds']:.0f} s "
        f"({summary['images_per_second']} img/s on {summary['devices']['strategy']}/"
        f"{summary['devices']['policy']}); best val_accuracy {summary['best_val_accuracy']}"
        + (" (stopped early)" if summary["stopped_early"] else "")
    )
    for stage, cache in summary["feature_cache"].items():
        how = "read back" if cache["reused"] else f"built in {cache['build_seconds']:.0f} s"
        print(f"{stage} stage: {cache['images']} images' {cache['cut']} activations cached ({how})")
    if summary["fine_tune"]:
        tuned = summary["fine_tune"]
        print(
            f"fine-tuned {', '.join(tuned['blocks'])} from shard {tuned['from_epoch']} "
            f"at {tuned['learning_rate']:g} ({tuned['trainable_weights']} weights)"
        )
    return 0


def _evaluate(settings, args: argparse.Namespace) -> int:
    from training.evaluation_report import summary_text
    from training.scoring import evaluate_run

    with tqdm(unit="img", disable=False, desc="evaluate") as bar:
        result, files = evaluate_run(
            args.run,
            args.checkpoint,
            args.rule,
            args.split,
            bar.update,
            target_sensitivity=args.target_sensitivity,
        )
    print(summary_text(result))
    for path in files:
        print(f"wrote {path}")
    return 0


def _register(settings, args: argparse.Namespace) -> int:
    from training.register import register_run

    folder = register_run(
        args.run,
        settings.resolved_models_dir,
        args.name,
        args.version,
        demo=args.demo,
        description=args.description,
        checkpoint=args.checkpoint,
        out=args.out,
    )
    print(f"registered {args.name}:{args.version} at {folder}")
    if args.out is not None:
        return 0
    if args.activate:
        from node.records import registry
        from node.runtime import build_node

        node = build_node(settings)
        with node.session_factory() as session:
            registry.activate(settings, session, f"{args.name}:{args.version}", by="ainode train")
            session.commit()
        print(f"active model: {args.name}:{args.version}")
    else:
        print(f"activate it with: ainode models activate {args.name}:{args.version}")
    return 0
