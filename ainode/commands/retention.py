"""``ainode retention [--dry-run]``: remove the pixel data the retention policy takes, now.

``--dry-run`` lists what would go (study UID, study date, when reported, size, why) and the
total; without it the run is the lifecycle's own (``node.workflow.retention``), audited as
``cli:<system user>`` for each study.
"""

from __future__ import annotations

import argparse

from node.records import audit
from node.runtime import build_node
from node.workflow import retention


def register(sub) -> dict:
    """Add the ``retention`` command."""
    command = sub.add_parser(
        "retention", help="remove the pixel data of old reported studies (the retention policy)"
    )
    command.add_argument(
        "--dry-run", action="store_true", help="list what would go, and the total; remove nothing"
    )
    return {"retention": cmd_retention}


def size(value: int) -> str:
    """Bytes as a person reads them (binary units)."""
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


def cmd_retention(settings, args: argparse.Namespace) -> int:
    """Run (or with ``--dry-run`` list) retention once."""
    node = build_node(settings)
    try:
        done = retention.run_retention(node, dry_run=args.dry_run, actor=audit.command_line_user())
    finally:
        node.close()
    if not retention.active(settings):
        print(
            "retention policy off (set retention_days and/or retention_min_free_disk_mb): "
            "no study is taken"
        )
    elif done.studies:
        print(
            f"{'STUDY INSTANCE UID':<64}  {'STUDY DATE':<10}  {'REPORTED':<10}  {'SIZE':>10}  WHY"
        )
        for study in done.studies:
            print(
                f"{study.study_instance_uid:<64}  {_dicom_date(study.study_date):<10}  "
                f"{study.reported_at:%Y-%m-%d}  {size(study.size_bytes):>10}  {study.why}"
            )
    verb = "would go" if done.dry_run else "removed"
    print(
        f"total: {len(done.studies)} studies' pixel data {verb} "
        f"({size(done.freed_bytes)}{' stored' if done.dry_run else ' freed'}); "
        f"{done.orphans} orphan temporary files {verb} ({size(done.orphan_bytes)})"
    )
    return 0


def _dicom_date(value: str | None) -> str:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or "-"
