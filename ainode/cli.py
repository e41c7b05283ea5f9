"""The ``ainode`` command line: wires settings to the node's parts; one clear line on error."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from datetime import date, timedelta
from importlib.metadata import entry_points
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from tqdm import tqdm

from node import __version__, logs, phantom
from node.dicom.pull import PullError
from node.records import schema
from node.records.db import Study, make_engine
from node.settings import Settings, load_settings

log = logging.getLogger("ainode")


def _setup_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ainode", description="AI node for chest CT beside a PACS"
    )
    parser.add_argument("--version", action="version", version=f"ainode {__version__}")
    parser.add_argument("-c", "--config", type=Path, help="TOML settings file ($AINODE_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the node: SCP, lifecycle, analysis dispatch")
    serve.add_argument(
        "--worker",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run a worker process (default: yes on the embedded broker)",
    )
    serve.add_argument(
        "--web",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also serve the web UI on web_port (default: yes; --no-web when `ainode web` "
        "runs it as its own process)",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="try the node without a PACS: accept the demo's stand-in PACS (AE AINODE_DEMO) "
        "and run `ainode demo` once it listens; creates an admin account if there is none",
    )
    serve.add_argument(
        "--bootstrap-admin",
        metavar="NAME",
        help="when no web UI account exists, create admin NAME with a generated password, "
        "shown once on the console",
    )
    sub.add_parser("scp", help="run only the storage SCP and the study lifecycle")
    sub.add_parser("web", help="run only the web UI (waitress, web_threads threads)")
    worker = sub.add_parser("worker", help="run an analysis/report worker (Celery)")
    worker.add_argument(
        "--queues",
        help="comma-separated queues to consume: analysis, exports, reports, uploads "
        "(default: all of them)",
    )
    # set by `ainode serve` for its embedded workers: end with that process
    worker.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    # set by `ainode serve --demo` for its embedded workers: they report to the demo too
    worker.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)

    classify = sub.add_parser("classify", help="classify PNG/JPG slices or DICOM files/folders")
    classify.add_argument("paths", nargs="+", type=Path)
    classify.add_argument("--json", action="store_true", help="machine-readable output")

    reanalyze = sub.add_parser("reanalyze", help="analyse a study again (a new SR follows)")
    reanalyze.add_argument("study", help="StudyInstanceUID")

    db = sub.add_parser("db", help="database schema")
    db.add_argument("action", choices=["upgrade", "current"])

    studies = sub.add_parser("studies", help="list received studies")
    studies.add_argument("--json", action="store_true", help="machine-readable output")
    studies.add_argument("--status", help="only studies in this lifecycle status")

    pull = sub.add_parser("pull", help='fetch "Tórax Simple" CT studies from a PACS')
    pull.add_argument("--peer", help="peer name or AE title (default: the only peer)")
    pull.add_argument("--method", choices=["get", "move"], default="get")
    pull.add_argument("--source", choices=["dimse", "dicomweb"], default="dimse")
    pull.add_argument("--from", dest="date_from", help="first study date YYYYMMDD")
    pull.add_argument("--to", dest="date_to", help="last study date YYYYMMDD (default today)")
    pull.add_argument("--days", type=int, default=7, help="without --from: the last N days")
    pull.add_argument("--all-dates", action="store_true", help="no date restriction")
    pull.add_argument("--no-progress", action="store_true", help="no progress bar")

    echo = sub.add_parser("echo", help="C-ECHO a peer")
    echo.add_argument("--peer", help="peer name or AE title (default: the only peer)")

    ph = sub.add_parser("phantom", help="write a synthetic chest CT series")
    phantom.add_arguments(ph)
    for register in _command_groups():
        COMMANDS.update(register(sub))
    return parser


def _command_groups() -> list:
    """``register(subparsers) -> {name: handler}`` of the node's command modules and of the
    installed ``ainode.commands`` entry points (``ainode train`` comes from ``training``)."""
    from ainode.commands import GROUPS

    groups = list(GROUPS)
    for entry_point in entry_points(group="ainode.commands"):
        try:
            groups.append(entry_point.load())
        except ImportError as exc:  # a plug-in whose extra is not installed: say so on use
            log.debug("command %s unavailable: %s", entry_point.name, exc)
    return groups


def _date_range(args: argparse.Namespace) -> str | None:
    if args.all_dates:
        return None
    for value, name in ((args.date_from, "--from"), (args.date_to, "--to")):
        if value and not (len(value) == 8 and value.isdigit()):
            raise ValueError(f"{name} must be YYYYMMDD, got {value!r}")
    until = args.date_to or date.today().strftime("%Y%m%d")
    since = args.date_from or (date.today() - timedelta(days=args.days)).strftime("%Y%m%d")
    return f"{since}-{until}"


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from node.runtime import build_node
    from node.workflow.queue import make_celery
    from node.workflow.sweeper import Dispatcher

    node = build_node(settings, migrate=True)
    node.store.prepare()  # refuse to start on a store that cannot be written
    analysis = args.command == "serve"
    with_worker = analysis and (args.worker if args.worker is not None else not settings.broker_url)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"ainode {__version__}: AE {settings.ae_title} on port {settings.dicom_port}, "
        f"database {node.engine.url.render_as_string(hide_password=True)}, "
        f"store {settings.store_path}"
        + (f", broker {_redacted(settings.resolved_broker_url)}" if analysis else ""),
        flush=True,
    )
    demo = analysis and args.demo
    if analysis:
        bootstrap = args.bootstrap_admin or ("admin" if demo else None)
        first_account(node, bootstrap, _ainode_command(args), explicit=bool(args.bootstrap_admin))
    workers = _start_workers(args) if with_worker else None
    wants_web = analysis and args.web and settings.web_port
    web = _start_web(settings, node) if wants_web else None
    demo_run: list[subprocess.Popen] = []
    try:
        dispatch = Dispatcher(node, make_celery(settings)) if analysis else None
        on_listening = (lambda: demo_run.append(_start_demo(args))) if demo else None
        _receive_and_sweep(node, stop, dispatch, on_listening)
    finally:
        for process in demo_run:
            if process.poll() is None:
                process.terminate()
                process.wait(30)
        if web is not None:
            web.stop()
        if workers is not None:
            workers.stop()
        node.close()
    return 0


def first_account(node, bootstrap: str | None, command: str, explicit: bool = True) -> None:
    """With no web UI account, say once on the console (stdout, never a log) how to make the
    first administrator — or make ``bootstrap`` one, with a generated password shown once."""
    from node.records import audit, users
    from node.records.db import User, UserRole

    with node.session_factory() as session:
        if session.scalar(select(func.count()).select_from(User)):
            if bootstrap and session.scalar(select(User).where(User.username == bootstrap)):
                return  # made on an earlier start: its password was shown then
            if bootstrap and explicit:
                print(f"--bootstrap-admin {bootstrap}: web UI accounts exist; none created")
            return
        if bootstrap is None:
            print(
                "no web UI account yet; create the first administrator with\n"
                f"    {command} user add NAME --role admin\n"
                f"or start the node with `{command} serve --bootstrap-admin NAME`",
                flush=True,
            )
            return
        password = secrets.token_urlsafe(12)
        users.add_user(session, bootstrap, password, UserRole.ADMIN, "Administrator")
        audit.record(session, audit.command_line_user(), "user_add", user=bootstrap, role="admin")
        session.commit()
    print(
        f"web UI account created: {bootstrap} (admin), password {password}\n"
        f"    shown only now; change it with `{command} user password {bootstrap}`",
        flush=True,
    )


def _ainode_command(args: argparse.Namespace) -> str:
    """How the person who started this process runs ``ainode`` again, with the same
    settings: ``ainode`` when it is on the PATH, else the venv's script (``.venv/bin/ainode``
    from a clone)."""
    script = Path(sys.executable).parent / "ainode"
    on_path = shutil.which("ainode")
    if on_path and Path(on_path).resolve() == script.resolve():
        command = "ainode"
    else:
        try:
            command = str(script.relative_to(Path.cwd()))
        except ValueError:
            command = str(script)
    if args.config:
        command += f" --config {args.config}"
    return command


def _start_demo(args: argparse.Namespace) -> subprocess.Popen:
    """``ainode demo`` beside this node, its output on this console."""
    command = [sys.executable, "-m", "ainode.cli"]
    if args.config:
        command += ["--config", str(args.config)]
    return subprocess.Popen([*command, "demo"])


def _receive_and_sweep(node, stop: threading.Event, dispatch, on_listening=None) -> None:
    """The storage SCP, and the sweeper (with ``dispatch`` after each pass) until ``stop``."""
    from node.dicom.scp import start_scp
    from node.workflow import sweeper

    if node.settings.calling_ae_allow_list == set():
        log.warning(
            "no calling AE is allowed: every association will be rejected. Set "
            "AINODE_ALLOWED_CALLING_AES='[\"YOURPACS\"]' or configure peers (to try the node "
            "without a PACS: `ainode serve --demo`)"
        )
    server = start_scp(node.settings, node.ingestor)
    if on_listening is not None:
        on_listening()
    try:
        sweeper.run(node, stop, dispatch=dispatch)
    finally:
        server.shutdown()
        log.info("storage SCP stopped")


def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    """The web UI in its own process: its requests share neither the SCP's GIL nor its
    memory (``ainode serve --no-web`` runs the rest)."""
    from node.runtime import build_node, wait_for_schema

    if not settings.web_port:
        raise ValueError("web_port is 0: the web UI is turned off in the settings")
    wait_for_schema(settings)  # `ainode serve` / `ainode db upgrade` migrate; the web UI never
    node = build_node(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    web = _start_web(settings, node)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        web.stop()
        node.close()
    return 0


def _start_web(settings: Settings, node):
    """The web UI beside the SCP (``web_port = 0`` turns it off)."""
    from webui.server import WebServer

    web = WebServer(settings, node).start()
    print(f"web UI: http://{settings.web_host}:{web.port}/", flush=True)
    return web


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not URL-shaped at all: show what follows any credentials
        return url.split("@")[-1]


def _start_workers(args: argparse.Namespace):
    """The embedded workers, supervised: analysis (and exports) in one process, what a
    person waits for (reports, uploads) in another, so neither waits behind the other."""
    from ainode.supervisor import Supervisor
    from node.workflow.queue import WORKER_GROUPS

    command = [sys.executable, "-m", "ainode.cli"]
    if args.config:
        command += ["--config", str(args.config)]
    if args.verbose:
        command.append("--verbose")
    demo = ["--demo"] if args.demo else []
    commands = {
        ",".join(queues): [
            *command, "worker", f"--queues={','.join(queues)}", f"--parent-pid={os.getpid()}",
            *demo,
        ]
        for queues in WORKER_GROUPS
    }  # fmt: skip
    return Supervisor(commands).start()


def _queues(option: str | None) -> list[str]:
    from node.workflow.queue import QUEUES

    if not option:
        return list(QUEUES)
    queues = [name.strip() for name in option.split(",") if name.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown or not queues:
        raise ValueError(f"--queues: unknown queue {', '.join(unknown)}; choose from {QUEUES}")
    return queues


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from node.runtime import wait_for_schema
    from node.workflow import tasks
    from node.workflow.queue import make_celery

    if args.parent_pid is not None:
        from ainode.supervisor import die_with_parent

        die_with_parent(args.parent_pid)
    queues = _queues(args.queues)
    wait_for_schema(settings)  # `ainode serve` / `ainode db upgrade` migrate; workers never do
    tasks.use_settings(settings)  # its own configuration; the Celery conf holds no secret
    app = make_celery(settings)
    app.worker_main(
        [
            *(["--quiet"] if args.parent_pid is not None else []),  # no banner inside serve
            "worker",
            f"--queues={','.join(queues)}",
            "--pool=solo",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            f"--hostname=ainode-{os.getpid()}@%h",
        ]
    )
    return 0


def cmd_classify(settings: Settings, args: argparse.Namespace) -> int:
    from node.analysis import calibration
    from node.analysis.analyze import AnalysisOptions
    from node.analysis.bundle import ModelBundle
    from node.analysis.classify import classify_paths
    from node.records.registry import active_model_dir, registry_session

    with registry_session(settings) as session:
        folder = active_model_dir(settings, session)
    bundle = ModelBundle.load(folder, runtime=settings.model_runtime)
    found = classify_paths(args.paths, bundle, AnalysisOptions.from_settings(settings))
    if args.json:
        print(
            json.dumps(
                {
                    "model": bundle.info.identity().label,
                    "predicted_class": found.predicted_class,
                    "probabilities": dict(zip(found.classes, found.probabilities, strict=True)),
                    "slices": [
                        {"slice": name, "probabilities": dict(zip(found.classes, p, strict=True))}
                        for name, p in found.slices
                    ],
                    "skipped": found.skipped,
                    "decision": found.decision,
                },
                indent=2,
            )
        )
        return 0
    print(f"model: {bundle.info.identity().label}")
    print(f"{'slice':<40} " + " ".join(f"{c:>10}" for c in found.classes))
    for name, probabilities in found.slices:
        print(f"{name[-40:]:<40} " + " ".join(f"{p:>10.3f}" for p in probabilities))
    for uid, reason in found.skipped.items():
        print(f"skipped {uid}: {reason}")
    study = ", ".join(
        f"{c} {p:.3f}" for c, p in zip(found.classes, found.probabilities, strict=False)
    )
    print(f"result: {found.predicted_class} ({study})")
    if found.decision:
        print(f"decided by: {calibration.describe(found.decision)}")
    return 0


def cmd_reanalyze(settings: Settings, args: argparse.Namespace) -> int:
    from node.records import lifecycle
    from node.records.db import StudyStatus as S
    from node.runtime import build_node

    node = build_node(settings)
    try:
        with node.session_factory() as session, session.begin():
            study = session.scalars(
                select(Study).where(Study.study_instance_uid == args.study)
            ).one_or_none()
            if study is None:
                raise ValueError(f"study {args.study} is not on this node")
            if study.pixels_removed_at is not None:
                from node.workflow.retention import removed_reason

                reason = removed_reason(study.pixels_removed_at)
                raise ValueError(f"study {args.study} cannot be analysed again: {reason}")
            allowed = {S.ANALYZED, S.REPORTED, S.FAILED, S.STABLE}
            if not lifecycle.move_where(session, study.id, allowed, S.QUEUED, reason="reanalyze"):
                raise ValueError(f"study {args.study} is {study.status}; wait until it is done")
    finally:
        node.close()
    print(f"study {args.study} queued for analysis")
    return 0


def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    engine = make_engine(settings.resolved_database_url)
    try:
        if args.action == "upgrade":
            schema.upgrade(engine)
        current, head = schema.current_revision(engine), schema.head_revision()
        print(f"database at revision {current} (head {head})")
    finally:
        engine.dispose()
    return 0


def cmd_studies(settings: Settings, args: argparse.Namespace) -> int:
    from node.runtime import build_node

    node = build_node(settings)
    try:
        with node.session_factory() as session:
            query = select(Study).order_by(Study.last_received_at.desc())
            if args.status:
                query = query.where(Study.status == args.status)
            rows = [_study_row(study) for study in session.scalars(query)]
            _add_results(session, rows)
    finally:
        node.close()
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    print(
        f"{'STATUS':<10} {'MOD':<6} {'SERIES':>6} {'INST':>6}  {'RECEIVED':<19}  DESCRIPTION / UID"
    )
    for row in rows:
        result = row.get("result") or {}
        answer = f"{result['predicted_class']} {result['probability']:.2f}" if result else "-"
        print(
            f"{row['status']:<10} {row['modalities']:<6} {row['series_count']:>6} "
            f"{row['instance_count']:>6}  {row['last_received_at'][:19]:<19}  "
            f"{row['study_description'] or '-'}  {row['study_instance_uid']}  {answer}"
            + (f"  SR {row['report']['status']}" if row.get("report") else "")
        )
    return 0


def _add_results(session, rows: list[dict]) -> None:
    """Attach each study's latest finished analysis and report (what a user wants to see)."""
    from node.records.results import latest_analysis, latest_report

    for row in rows:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == row["study_instance_uid"])
        ).one()
        analysis = latest_analysis(session, study.id, done=True)
        if analysis is None:
            continue
        row["result"] = {
            "predicted_class": analysis.predicted_class,
            "probability": analysis.probabilities[analysis.predicted_class],
            "probabilities": analysis.probabilities,
            "model": f"{analysis.model_name} {analysis.model_version}",
            "slices_evaluated": analysis.slices_evaluated,
        }
        report = latest_report(session, analysis)
        if report is not None:
            row["report"] = {
                "status": report.status,
                "retries": report.retries,
                "last_error": report.last_error,
                "destination": report.destination,
                "sop_instance_uid": report.sop_instance_uid,
            }


def _study_row(study: Study) -> dict:
    return {
        "study_instance_uid": study.study_instance_uid,
        "status": study.status,
        "status_reason": study.status_reason,
        "modalities": study.modalities,
        "study_description": study.study_description,
        "study_date": study.study_date,
        "patient_id": study.patient_id,
        "series_count": study.series_count,
        "instance_count": study.instance_count,
        "first_received_at": study.first_received_at.isoformat(),
        "last_received_at": study.last_received_at.isoformat(),
    }


def cmd_pull(settings: Settings, args: argparse.Namespace) -> int:
    from node.dicom.dicomweb import pull_dicomweb
    from node.dicom.pull import pull_dimse
    from node.runtime import build_node

    peer = settings.peer(args.peer)
    date_range = _date_range(args)
    node = build_node(settings, migrate=True)
    bars: list[tqdm] = []

    def progress(study, total):
        bar = tqdm(
            total=total,
            unit="inst",
            desc=study.study_description[:24] or "study",
            disable=args.no_progress,
            file=sys.stderr,
        )
        bars.append(bar)
        return _Progress(bar)

    try:
        if args.source == "dicomweb":
            report = pull_dicomweb(settings, node.ingestor, peer, date_range, progress)
        else:
            report = pull_dimse(settings, node.ingestor, peer, date_range, args.method, progress)
    finally:
        for bar in bars:
            bar.close()
        node.close()
    print(report.summary())
    return 0 if report.ok else 1


class _Progress:
    """One study's progress bar: a tick per instance; the PACS's pending C-GET responses
    (sub-operations remaining) set its total."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def __call__(self) -> None:
        self.bar.update()

    def remaining(self, count: int) -> None:
        self.bar.total = self.bar.n + count
        self.bar.refresh()


def cmd_echo(settings: Settings, args: argparse.Namespace) -> int:
    from pynetdicom.sop_class import Verification

    from node.dicom.network import associate, make_ae, peer_label

    peer = settings.peer(args.peer)
    ae = make_ae(settings)
    ae.add_requested_context(Verification)
    assoc = associate(ae, settings, peer)
    if not assoc.is_established:
        raise PullError(f"association to {peer_label(peer)} failed")
    status = assoc.send_c_echo()
    assoc.release()
    if not status or status.Status != 0:
        raise PullError(f"C-ECHO to {peer.ae_title} failed")
    print(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: success")
    return 0


COMMANDS = {
    "serve": cmd_serve,
    "scp": cmd_serve,
    "worker": cmd_worker,
    "web": cmd_web,
    "classify": cmd_classify,
    "reanalyze": cmd_reanalyze,
    "db": cmd_db,
    "studies": cmd_studies,
    "pull": cmd_pull,
    "echo": cmd_echo,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ainode`` console script."""
    args = _setup_argparser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("pynetdicom", "highdicom"):  # one line per PDU / per copied module
        logging.getLogger(chatty).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if args.command == "phantom":
        return phantom.run(args)
    try:
        demo = args.command == "demo" or getattr(args, "demo", False)
        settings = load_settings(args.config, **({"demo": True} if demo else {}))
        logs.configure(settings.log_format)
        return COMMANDS[args.command](settings, args)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        print(f"ainode: invalid setting {where}: {first['msg']}", file=sys.stderr)
    except (ValueError, FileNotFoundError, RuntimeError, OSError, SQLAlchemyError) as exc:
        print(f"ainode: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
