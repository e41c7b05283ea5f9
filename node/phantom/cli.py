"""The ``ainode phantom`` command: its options and what running it does."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from node.phantom.spec import _CHARSETS, CLASSES, PhantomSpec
from node.phantom.transfer import TRANSFER_SYNTAXES, _syntax_name, write_series

_CHARSET_ALIASES = {
    "latin1": "ISO_IR 100",
    "latin-1": "ISO_IR 100",
    "iso_ir 100": "ISO_IR 100",
    "utf8": "ISO_IR 192",
    "utf-8": "ISO_IR 192",
    "iso_ir 192": "ISO_IR 192",
}


def _charset_argument(value: str) -> str:
    return _CHARSET_ALIASES.get(value.lower(), value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``phantom`` options to an argument parser (see :func:`run`)."""
    parser.add_argument("--class", dest="finding", choices=CLASSES, default="normal")
    parser.add_argument("--slices", type=int, default=60, help="number of axial slices")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .dcm files")
    parser.add_argument("--seed", type=int, default=0, help="anatomy, finding and noise seed")
    parser.add_argument(
        "--transfer-syntax",
        default="explicit",
        help=f"one of {', '.join(TRANSFER_SYNTAXES)} or a UID (default explicit)",
    )
    parser.add_argument(
        "--charset",
        type=_charset_argument,
        choices=_CHARSETS,
        default="ISO_IR 192",
        help="ISO_IR 100 (latin1) or ISO_IR 192 (utf8, default)",
    )
    parser.add_argument("--patient-name")
    parser.add_argument("--patient-id")
    parser.add_argument("--study-description")
    parser.add_argument("--study-uid", dest="study_instance_uid")
    parser.add_argument("--series-uid", dest="series_instance_uid")


def run(args: argparse.Namespace) -> int:
    """Write the series described by parsed :func:`add_arguments` options.

    Prints one summary line and returns 0; on a bad option or a missing tool prints the
    reason to stderr and returns 2 or 1.
    """
    fields = {"finding": args.finding, "slices": args.slices, "seed": args.seed}
    fields["charset"] = args.charset
    for name in ("patient_name", "patient_id", "study_description"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    for name in ("study_instance_uid", "series_instance_uid"):
        fields[name] = getattr(args, name)
    try:
        spec = PhantomSpec(**fields)
        name = _syntax_name(args.transfer_syntax)
        paths = write_series(spec, args.out, name)
    except ValueError as exc:
        print(f"ainode phantom: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"ainode phantom: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} CT slices ({spec.finding}, {name}) to {args.out}")
    return 0
