"""End-to-end latency: a 100-slice study pushed by Orthanc until its SR is stored in Orthanc.

One run: Orthanc, a private Redis, `ainode serve --no-worker` and one `ainode worker`
(warmed up with a first study), then the measured study. Prints the per-stage
breakdown from the node's own records, and, for the analysis stage, the node's
batched pipeline against the naive path (one `model.predict` per slice, as the seed
paper's app does) on the same slices.

Run: ``.venv/bin/python -m bench.e2e [--slices 100]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from sqlalchemy import select

from node import phantom
from node.analysis import imaging
from node.analysis.analyze import AnalysisOptions, analyze_instances
from node.analysis.bundle import ModelBundle
from node.records.db import Analysis, Report, Study
from node.runtime import build_node
from node.settings import Peer, Settings
from tests.config import write_config
from tests.peers import free_port, start_orthanc, start_redis, wait_for_port
from tests.test_analysis_e2e import NodeProcesses, sr_in_orthanc, wait_until


def push(orthanc, root: Path, seed: int, slices: int) -> tuple[str, list[Path]]:
    spec = phantom.PhantomSpec(finding="covid", slices=slices, seed=seed, patient_id=f"B{seed}")
    files = phantom.write_series(spec, root / f"study{seed}")
    orthanc.upload_dir(files[0].parent)
    uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    orthanc.store_to_modality("AINODE", [orthanc.find_study(uid)])
    return uid, files


def node_records(settings: Settings, study_uid: str) -> tuple[Study, Analysis, Report]:
    node = build_node(settings)
    with node.session_factory() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        analysis = session.scalars(select(Analysis).where(Analysis.study_id == study.id)).one()
        report = session.scalars(select(Report).where(Report.analysis_id == analysis.id)).one()
    node.close()
    return study, analysis, report


def naive_vs_batched(files: list[Path], settings: Settings) -> tuple[float, float]:
    """Seconds for the inference stage: one predict per slice vs the node's batched path."""
    bundle = ModelBundle.load(settings.resolved_model_dir)
    outcome = analyze_instances(files, bundle, AnalysisOptions())
    batch = np.concatenate([imaging.windowed_slices(dcmread(f)) for f in files])
    start = time.perf_counter()
    for image in batch:
        bundle.model.predict(image[np.newaxis], verbose=0)
    naive = time.perf_counter() - start
    start = time.perf_counter()
    bundle.predict(batch)
    batched = time.perf_counter() - start
    assert outcome.result.slices
    return naive, batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ainode-e2e-") as tmp:
        root = Path(tmp)
        orthanc = start_orthanc(root / "orthanc", stable_age=60)
        redis = start_redis(root / "redis")
        settings = Settings(
            data_dir=root / "data",
            dicom_host="127.0.0.1",
            dicom_port=free_port(),
            peers=[Peer(name="pacs", ae_title=orthanc.aet, port=orthanc.dicom_port)],
            broker_url=redis.url,
            study_stable_seconds=2,
            min_free_disk_mb=0,
        )
        orthanc.add_modality("AINODE", "AINODE", "127.0.0.1", settings.dicom_port)
        procs = NodeProcesses(write_config(settings, root / "ainode.toml"), root)
        try:
            procs.start("serve", "serve", "--no-worker")
            procs.start("worker", "worker")
            wait_for_port("127.0.0.1", settings.dicom_port, 60)
            warm_uid, _ = push(orthanc, root, 1, 20)  # loads the model in the worker
            wait_until(lambda: sr_in_orthanc(orthanc, warm_uid), 300, "warm-up SR", procs.logs)
            t0 = time.time()
            uid, files = push(orthanc, root, 2, args.slices)
            t_pushed = time.time()
            wait_until(lambda: sr_in_orthanc(orthanc, uid), 600, "SR", procs.logs)
            t_sr = time.time()
        finally:
            procs.stop_all()
            redis.stop()
            orthanc.stop(kill=True)
        study, analysis, report = node_records(settings, uid)
        report_stage(args.slices, t0, t_pushed, t_sr, study, analysis, report, settings)
        naive, batched = naive_vs_batched(files, settings)
        print(
            f"\ninference of {args.slices} slices: one predict per slice {naive:.2f} s, "
            f"batched {batched:.2f} s, ratio {naive / batched:.1f}x"
        )


def report_stage(slices, t0, t_pushed, t_sr, study, analysis, report, settings) -> None:
    """Print the per-stage breakdown from wall-clock marks and the node's own records."""
    started, finished = analysis.started_at.timestamp(), analysis.finished_at.timestamp()
    rows = [
        ("push (Orthanc C-STORE to node)", t_pushed - t0),
        ("quiet period + queue (pushed -> worker starts)", started - t_pushed),
        *((f"analysis: {stage}", seconds) for stage, seconds in analysis.timings.items()),
        ("analysis total", finished - started),
        ("report (SR build + C-STORE)", report.sent_at.timestamp() - finished),
        ("end to end (push start -> SR in Orthanc)", t_sr - t0),
    ]
    print(f"{slices}-slice study, stable after {settings.study_stable_seconds:.0f} s quiet\n")
    for name, seconds in rows:
        print(f"{name:<48} {seconds:8.2f} s")


if __name__ == "__main__":
    main()
