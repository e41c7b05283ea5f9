"""``ainode label``, ``ainode labels`` and ``ainode export``: training labels and the bundle."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from datetime import date
from pathlib import Path

from tqdm import tqdm

from node.settings import Settings


def register(subparsers) -> dict:
    """Add the label and export commands; return their handlers by name."""
    label = subparsers.add_parser("label", help="put a keyword (training label) on a study")
    label.add_argument("study", metavar="STUDY_UID", help="StudyInstanceUID")
    label.add_argument("keyword", metavar="KEYWORD", help="e.g. COVID, Normal, Pneumonia, Exclude")
    label.add_argument("--series", metavar="SERIES_UID", help="label only this series")
    label.add_argument("--remove", action="store_true", help="take the keyword off instead")
    label.add_argument("--by", default=None, help="who labels (default: the OS user)")

    labels = subparsers.add_parser("labels", help="list the labels of a study")
    labels.add_argument("study", metavar="STUDY_UID", help="StudyInstanceUID")
    labels.add_argument("--json", action="store_true", help="machine-readable output")

    export = subparsers.add_parser("export", help="write a de-identified training bundle")
    export.add_argument("--out", required=True, type=Path, help="new (or empty) folder")
    export.add_argument("--keywords", nargs="+", metavar="K", help="only studies with these")
    export.add_argument("--since", help="only studies labelled on or after YYYY-MM-DD")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    export.add_argument("--json", action="store_true", help="machine-readable output")
    return {"label": cmd_label, "labels": cmd_labels, "export": cmd_export}


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        return os.environ.get("USER") or "unknown"


def cmd_label(settings: Settings, args: argparse.Namespace) -> int:
    from node.records.labels import add_label, remove_label
    from node.runtime import build_node

    node = build_node(settings)
    where = f"series {args.series}" if args.series else f"study {args.study}"
    try:
        with node.session_factory() as session, session.begin():
            if args.remove:
                removed = remove_label(session, args.study, args.keyword, args.series)
                message = f"{where}: {'removed' if removed else 'had no'} label {args.keyword!r}"
            else:
                by = args.by if args.by is not None else _os_user()
                made = add_label(
                    session, args.study, args.keyword, by, args.series, settings.keyword_classes
                )
                message = f"{where}: labelled {made.keyword!r}"
    except LookupError as exc:
        return _fail(exc)
    finally:
        node.close()
    print(message)
    return 0


def cmd_labels(settings: Settings, args: argparse.Namespace) -> int:
    from node.records.labels import LabelConflict, class_for, find_study, labels_of
    from node.runtime import build_node

    node = build_node(settings)
    try:
        with node.session_factory() as session:
            found = labels_of(session, find_study(session, args.study).id)
    except LookupError as exc:
        return _fail(exc)
    finally:
        node.close()
    try:
        study_class = class_for(
            [x.keyword for x in found if x.series_instance_uid is None], settings.keyword_classes
        )
    except LabelConflict as conflict:
        study_class = str(conflict)
    if args.json:
        rows = [
            {
                "keyword": x.keyword,
                "series_instance_uid": x.series_instance_uid,
                "created_by": x.created_by,
                "created_at": x.created_at.isoformat(),
                "class": settings.keyword_classes.get(x.keyword),
            }
            for x in found
        ]
        print(json.dumps({"study_class": study_class, "labels": rows}, indent=2))
        return 0
    for x in found:
        print(
            f"{x.keyword:<24} {x.series_instance_uid or 'study':<20} "
            f"{x.created_by:<16} {x.created_at.isoformat(timespec='seconds')}"
        )
    print(f"class: {study_class or '-'}" if found else f"study {args.study} has no labels")
    return 0


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    from node.records.export import export_bundle
    from node.records.labels import check_keyword
    from node.runtime import build_node

    since = _since(args.since)
    keywords = None if args.keywords is None else [check_keyword(k) for k in args.keywords]
    node = build_node(settings)
    bars: list[tqdm] = []

    def progress(done: int, total: int) -> None:
        if not bars:  # made on the first study, so an export refused at once draws no bar
            bars.append(tqdm(total=total, unit="study", disable=args.no_progress, file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        summary = export_bundle(node, args.out, keywords, since, progress)
    finally:
        for bar in bars:
            bar.close()
        node.close()
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
        return 0
    total = sum(summary.images.values())
    print(f"exported {total} images of {summary.patients} patients to {summary.out_dir}")
    for class_name, images in summary.images.items():
        print(f"  {class_name:<12} {images:>6} images  {summary.studies[class_name]:>4} studies")
    for skipped in summary.skipped:
        print(f"  skipped study {skipped['study']}: {skipped['reason']}")
    return 0


def _since(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        if len(value) != 10:
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--since must be a date YYYY-MM-DD, got {value!r}") from None


def _fail(exc: Exception) -> int:
    """One clear line and exit status 2, as ``ainode`` reports any error."""
    print(f"ainode: {exc}", file=sys.stderr)
    return 2
