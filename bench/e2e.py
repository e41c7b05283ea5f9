"""End-to-end latency: a 300-slice 512 x 512 study pushed by DCMTK until its SR is in Orthanc.

One run: Orthanc (where the SR goes), a private Redis, ``ainode serve --no-worker`` and one
``ainode worker`` serving the EfficientNetB7 @512 bench bundle (:mod:`bench.b7_bundle`,
built once in ``--work`` and reused; or ``--bundle``) on this host's cores, warmed up with a
first study; then the measured study, pushed by DCMTK ``storescu`` (``--pusher dcmtk``, a
CT scanner's way) or by Orthanc C-STORE (``--pusher orthanc``, a PACS forwarding).

Printed: the per-stage breakdown from the node's own records (receive: first → last
instance stored; stable wait: quiet period + queue; decode + window, model and aggregation:
the analysis' timings; heatmaps and recording: the rest of the analysis; SR build and SR
send: the worker's own ``send_report`` task time from its log, split by building the same SR
again here), the end-to-end time against the 60 s target, and the runtime the worker served
(its log). The quiet period is ``--stable-seconds`` (2 s, as the tests use; a site's default
is 30 s). The seed's one-predict-per-slice path is timed by ``bench.inference``, not here.

Run: ``.venv/bin/python -m bench.e2e [--slices 300] [--pusher dcmtk|orthanc] [--work DIR |
--bundle FOLDER] [--runtime auto] [--threads N]``. Needs Orthanc, DCMTK and redis-server
(``setup.sh``).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from node import phantom
from node.records.db import Analysis, Report, Study
from node.runtime import build_node
from node.settings import Peer, Settings
from tests.config import write_config
from tests.peers import free_port, start_orthanc, start_redis, storescu, wait_for_port
from tests.test_analysis_e2e import NodeProcesses, sr_in_orthanc, wait_until

TARGET_S = 60.0
CALLING_AE = "CTSCANNER"
# Celery's own line when a task ends: "Task node.tasks.send_report[<id>] succeeded in 0.81s"
TASK_DONE = re.compile(r"Task (node\.tasks\.\w+)\[[^\]]+\] succeeded in ([0-9.]+)s")


def write_study(root: Path, seed: int, slices: int) -> tuple[str, list[Path]]:
    """A COVID-19 phantom study of ``slices`` 512 x 512 slices; its UID and files."""
    spec = phantom.PhantomSpec(finding="covid", slices=slices, seed=seed, patient_id=f"B{seed}")
    files = phantom.write_series(spec, root / f"study{seed}")
    return dcmread(files[0], stop_before_pixels=True).StudyInstanceUID, files


def push(pusher: str, orthanc, settings: Settings, files: list[Path]) -> None:
    """Send a study's files to the node: DCMTK storescu, or Orthanc's C-STORE."""
    if pusher == "dcmtk":
        done = storescu(
            "127.0.0.1", settings.dicom_port, files[0].parent,
            calling_ae=CALLING_AE, called_ae=settings.ae_title, timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-2000:]}")
        return
    orthanc.upload_dir(files[0].parent)
    uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    orthanc.store_to_modality("AINODE", [orthanc.find_study(uid)], timeout=600)


def node_settings(root: Path, orthanc, redis, bundle: Path, args) -> Settings:
    """The node under test: the bundle, the runtime, Orthanc as the report peer."""
    extra = {}
    if args.runtime is not None:
        extra["model_runtime"] = args.runtime
    if args.threads is not None:
        extra["model_threads"] = args.threads
    return Settings(
        data_dir=root / "data",
        dicom_host="127.0.0.1",
        dicom_port=free_port(),
        peers=[Peer(name="pacs", ae_title=orthanc.aet, port=orthanc.dicom_port)],
        report_peer="pacs",
        allowed_calling_aes=[CALLING_AE],
        broker_url=redis.url,
        study_stable_seconds=args.stable_seconds,
        min_free_disk_mb=0,
        model_dir=bundle,
        web_port=0,
        **extra,
    )


def node_records(settings: Settings, study_uid: str) -> tuple[Study, Analysis, Report]:
    node = build_node(settings)
    with node.session_factory() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        analysis = session.scalars(select(Analysis).where(Analysis.study_id == study.id)).one()
        report = session.scalars(select(Report).where(Report.analysis_id == analysis.id)).one()
    node.close()
    return study, analysis, report


def sr_build_seconds(settings: Settings, analysis_id: int, report: Report) -> float:
    """Build the study's SR (and its heatmap images) again as the worker did, timed."""
    from node.reporting import delivery
    from node.reporting.sr import build_sr
    from node.workflow.tasks import observer

    node = build_node(settings)
    try:
        times = []
        for _ in range(2):  # the first pays for imports and fonts, which the worker had warm
            started = time.perf_counter()
            result, headers, _study, _ = delivery.study_result(node, analysis_id)
            device = observer(node)
            build_sr(
                headers, result, device,
                sop_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
            )  # fmt: skip
            delivery._heatmap_images(node, report, result, device)  # the delivery's own step
            times.append(time.perf_counter() - started)
        return times[-1]
    finally:
        node.close()


def task_seconds(log: str, task: str) -> list[float]:
    """Durations Celery logged for ``task`` (in order)."""
    return [float(s) for name, s in TASK_DONE.findall(log) if name == task]


def served_runtime(log: str) -> str:
    """What the worker's model loading logged (the runtime chosen, its gate), last lines."""
    lines = [line.strip()[:300] for line in log.splitlines() if " node.analysis." in line]
    return "\n    ".join(lines[-8:]) or "(nothing logged by node.analysis)"


def run_once(root: Path, bundle: Path, args) -> dict:
    """Start the peers and the node, warm it up, push the measured study; the marks."""
    warm_uid, warm_files = write_study(root, 1, 20)
    uid, files = write_study(root, 2, args.slices)
    orthanc = start_orthanc(root / "orthanc", stable_age=60)
    redis = start_redis(root / "redis")
    settings = node_settings(root, orthanc, redis, bundle, args)
    orthanc.add_modality("AINODE", settings.ae_title, "127.0.0.1", settings.dicom_port)
    procs = NodeProcesses(write_config(settings, root / "ainode.toml"), root)
    try:
        procs.start("serve", "serve", "--no-worker")
        procs.start("worker", "worker")
        wait_for_port("127.0.0.1", settings.dicom_port, 60)
        began = time.time()
        push(args.pusher, orthanc, settings, warm_files)  # the worker loads the model first
        wait_until(lambda: sr_in_orthanc(orthanc, warm_uid), 1800, "warm-up SR", procs.logs)
        print(f"warm-up study reported in {time.time() - began:.0f} s (model loaded)", flush=True)
        t0 = time.time()
        push(args.pusher, orthanc, settings, files)
        t_pushed = time.time()
        wait_until(lambda: sr_in_orthanc(orthanc, uid), 900, "SR", procs.logs, every=0.2)
        t_sr = time.time()
        log = procs.log("worker")
    finally:
        procs.stop_all()
        redis.stop()
        orthanc.stop(kill=True)
    return {"settings": settings, "uid": uid, "t0": t0, "pushed": t_pushed, "sr": t_sr, "log": log}


def report_stages(marks: dict, args) -> float:
    """Print the per-stage breakdown from the node's records and the worker's log; the total."""
    settings = marks["settings"]
    study, analysis, report = node_records(settings, marks["uid"])
    started, finished = analysis.started_at.timestamp(), analysis.finished_at.timestamp()
    timings = analysis.timings
    sends = task_seconds(marks["log"], "node.tasks.send_report")
    delivery = sends[-1] if len(sends) >= 2 else None  # the warm-up study's comes first
    build = sr_build_seconds(settings, analysis.id, report)
    total = marks["sr"] - marks["t0"]
    received = study.last_received_at.timestamp()
    rows = [
        (f"push ({args.pusher}, wall clock)", marks["pushed"] - marks["t0"]),
        ("receive (node: first -> last instance stored)",
         received - study.first_received_at.timestamp()),
        (f"stable wait ({settings.study_stable_seconds:g} s quiet + queue)", started - received),
        ("decode + window (load, preprocess)",
         timings.get("load", 0.0) + timings.get("preprocess", 0.0)),
        (f"model ({analysis.slices_evaluated} slices)", timings.get("inference", 0.0)),
        ("calibration + OOD (aggregate)", timings.get("aggregate", 0.0)),
        ("heatmaps (Grad-CAM) + recording",
         finished - started - sum(timings.values())),
        ("analysis -> SR sent (queue + SR build + send)", report.sent_at.timestamp() - finished),
        ("  worker's send_report task (its log)", delivery),
        ("  SR build (built again here, same code)", build),
        ("  SR send (worker's send_report - build)",
         None if delivery is None else max(delivery - build, 0.0)),
        ("SR sent -> seen in Orthanc (QIDO poll)", marks["sr"] - report.sent_at.timestamp()),
    ]  # fmt: skip
    print(f"\n{args.slices}-slice 512 x 512 study, {args.pusher} push, bundle {args.bundle}")
    for name, seconds in rows:
        print(f"  {name:<52} {'n/a' if seconds is None else f'{seconds:8.2f} s'}")
    per_slice = timings.get("inference", 0.0) / max(analysis.slices_evaluated, 1)
    print(f"  model s/slice {per_slice:.3f}; worker runtime:\n    {served_runtime(marks['log'])}")
    verdict = "MET" if total <= TARGET_S else "NOT MET"
    print(f"end to end (push start -> SR in Orthanc) {total:.1f} s: target <= {TARGET_S:g} s "
          f"{verdict}")  # fmt: skip
    return total


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--pusher", choices=["dcmtk", "orthanc"], default="dcmtk")
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: the B7 one)")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ainode-bench-b7",
        help="keeps the B7 bundle between runs (default: ainode-bench-b7 in the temp folder)",
    )
    parser.add_argument("--runtime", help="the node's model_runtime (default: its own, auto)")
    parser.add_argument("--threads", type=int, help="the node's model_threads (default: its own)")
    parser.add_argument("--stable-seconds", type=float, default=2.0, help="quiet period")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.bundle is None:
        from bench.b7_bundle import build

        args.bundle = build(args.work)
    with tempfile.TemporaryDirectory(prefix="ainode-e2e-") as tmp:
        marks = run_once(Path(tmp), args.bundle, args)
        report_stages(marks, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
