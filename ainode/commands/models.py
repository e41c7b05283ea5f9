"""``ainode models list|activate``: the model registry from the command line."""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from node.settings import Settings


def register(subparsers) -> dict:
    """Add ``models`` to the ``ainode`` subcommands."""
    models = subparsers.add_parser("models", help="list the model bundles, choose the active one")
    actions = models.add_subparsers(dest="models_action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="registered bundles, the built-in demo, the active")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    activate = actions.add_parser("activate", help="serve NAME:VERSION from the next analysis on")
    activate.add_argument("model", metavar="NAME:VERSION")
    activate.add_argument("--by", default=None, help="who activates it (default: your login)")
    return {"models": cmd_models}


def cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``models list`` or ``models activate``; an unknown model is one line on stderr."""
    try:
        if args.models_action == "list":
            return _list(settings, args)
        return _activate(settings, args)
    except LookupError as exc:
        print(f"ainode: {exc.args[0]}", file=sys.stderr)  # str(KeyError) would add quotes
        return 2


def _row(model) -> dict:
    info = model.info
    return {
        "name": model.name,
        "version": model.version,
        "folder": str(model.folder),
        "active": model.active,
        "pinned": model.pinned,
        "builtin": model.builtin,
        "demo": info.demo if info else None,
        "backbone": info.backbone if info else None,
        "input_size": info.input_size if info else None,
        "test_accuracy": info.metrics.get("test_accuracy") if info else None,
        "created_at": info.created_at if info else None,
        "description": info.description if info else None,
        "error": model.error,
    }


def _list(settings: Settings, args: argparse.Namespace) -> int:
    from node.records.registry import list_models, registry_session

    with registry_session(settings) as session:
        rows = [_row(model) for model in list_models(settings, session)]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    print(f"  {'MODEL':<40} {'BACKBONE':<16} {'INPUT':>5} {'TEST ACC':>8}  {'CREATED':<10}  NOTES")
    for row in rows:
        mark = "*" if row["active"] else " "
        model = f"{row['name']}:{row['version']}"
        if row["error"]:
            print(f"{mark} {model:<40} error: {row['error']}")
            continue
        accuracy = row["test_accuracy"]
        accuracy = f"{accuracy:.3f}" if isinstance(accuracy, int | float) else "-"
        notes = [
            note
            for note, present in (
                ("built in", row["builtin"]),
                ("DEMO", row["demo"]),
                ("pinned by model_dir", row["pinned"]),
            )
            if present
        ]
        print(
            f"{mark} {model:<40} {row['backbone'][:16]:<16} {row['input_size']:>5} "
            f"{accuracy:>8}  {row['created_at'][:10]:<10}  {', '.join(notes)}"
        )
    return 0


def _login() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container user with no passwd entry and no $USER
        return "unknown"


def _activate(settings: Settings, args: argparse.Namespace) -> int:
    from node.records.registry import activate, registry_session

    with registry_session(settings) as session:
        if session is None:
            raise RuntimeError("the node has no database yet: run `ainode db upgrade` first")
        with session.begin():
            model = activate(settings, session, args.model, args.by or _login(), progress=True)
    print(f"activated {model.ref} ({model.folder})")
    _print_runtime(model.loaded, settings.model_runtime)
    if settings.model_dir is not None:
        print(
            f"warning: model_dir is set ({settings.model_dir}): it pins the served model, so "
            f"{model.ref} is served only once model_dir is removed from the settings",
            file=sys.stderr,
        )
    else:
        print("workers serve it from their next analysis on")
    return 0


def _print_runtime(bundle, asked: str) -> None:
    """The runtime the workers will serve with, and the agreement gate's figures."""
    from node.analysis import gate

    options = bundle.session_options
    threads = f" on {options.intra_op_num_threads} threads" if options is not None else ""
    print(f"runtime: {bundle.runtime} (model_runtime {asked}), batch {bundle.batch_size}{threads}")
    for runtime, result in bundle.gate.items():
        verdict = "passes" if result["passed"] else f"fails ({result['reason']})"
        figures = gate.describe(result)
        speed = (
            f", {result['seconds_per_slice']:.4f} s/slice at batch {result['batch_size']}"
            if "seconds_per_slice" in result
            else ""
        )
        print(f"  {runtime} {verdict}" + (f": {figures}{speed}" if figures else ""))
    if not bundle.gate and bundle.runtime != "keras":
        print("  no agreement gate: the bundle has no gate data (FP32 only)")
