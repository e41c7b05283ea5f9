"""Ingest benchmark: push and C-GET one 200-slice phantom study through the node and its peers.

One run, three repetitions each, every peer measured beside the node:

- push with DCMTK storescu (TCP_NODELAY=1) to: the node (`ainode serve`, durable: fsync + SQL
  commit before each success), DCMTK storescp, Orthanc, and a bare pynetdicom SCP that writes
  ``event.encoded_dataset()`` without fsync or database (the naive approach);
- C-GET the study from Orthanc with: the node (durable), DCMTK getscu, and a bare pynetdicom
  C-GET writing files without fsync or database.

Run: ``.venv/bin/python -m bench.ingest [--slices 200] [--repeat 3]``. Prints inst/s (median)
and the node's ratio to each peer.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

from node import phantom
from node.pull import DimsePuller
from node.network import handle_conn_open
from node.service import build_node
from node.settings import Peer, Settings
from tests.config import write_config
from tests.peers import (
    free_port,
    getscu,
    start_orthanc,
    stop_process,
    storescp,
    storescu,
    wait_for_port,
)


def timed(action: Callable[[], None], instances: int) -> float:
    """Run ``action`` and return instances per second."""
    start = time.perf_counter()
    action()
    return instances / (time.perf_counter() - start)


def check(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stdout}\n{result.stderr}")


def node_settings(workdir: Path, port: int, **extra) -> Settings:
    return Settings(
        data_dir=workdir,
        dicom_host="127.0.0.1",
        dicom_port=port,
        accept_any_calling_ae=True,
        min_free_disk_mb=0,
        **extra,
    )


def push_to_node(files: list[Path], workdir: Path) -> float:
    workdir.mkdir(parents=True)
    port = free_port()
    config = write_config(node_settings(workdir, port), workdir.with_suffix(".toml"))
    log = open(workdir.with_suffix(".log"), "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--config", str(config), "scp"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        rate = timed(lambda: check(storescu("127.0.0.1", port, files), "push to node"), len(files))
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    return rate


def push_to_storescp(files: list[Path], workdir: Path) -> float:
    port = free_port()
    proc = storescp(port, workdir)
    try:
        return timed(
            lambda: check(
                storescu("127.0.0.1", port, files, called_ae="STORESCP"), "push to storescp"
            ),
            len(files),
        )
    finally:
        stop_process(proc)


def push_to_orthanc(files: list[Path], orthanc) -> float:
    for study in orthanc.studies():
        orthanc.delete(f"/studies/{study}")
    return timed(
        lambda: check(
            storescu("127.0.0.1", orthanc.dicom_port, files, called_ae=orthanc.aet),
            "push to Orthanc",
        ),
        len(files),
    )


def push_to_bare_pynetdicom(files: list[Path], workdir: Path) -> float:
    """The naive SCP: write the encoded dataset, no fsync, no database."""
    handle_store = naive_store_handler(workdir)
    ae = AE("BARE")
    ae.maximum_pdu_size = 0
    for context in phantom_contexts():
        ae.add_supported_context(*context)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, handle_store), (evt.EVT_CONN_OPEN, handle_conn_open)],
    )
    try:
        return timed(
            lambda: check(
                storescu("127.0.0.1", port, files, called_ae="BARE"), "push to bare pynetdicom"
            ),
            len(files),
        )
    finally:
        server.shutdown()


def naive_store_handler(workdir: Path):
    """A C-STORE handler that writes what arrives, nothing more (the naive baseline)."""
    workdir.mkdir(parents=True, exist_ok=True)

    def handle_store(event):
        path = workdir / f"{event.request.AffectedSOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        return 0

    return handle_store


def phantom_contexts() -> list[tuple[str, list[str]]]:
    return [(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])]


def get_with_node(orthanc, study_uid: str, workdir: Path, count: int) -> float:
    settings = node_settings(
        workdir,
        free_port(),
        peers=[Peer(name="pacs", ae_title=orthanc.aet, port=orthanc.dicom_port)],
    )
    orthanc.add_modality("AINODE", "AINODE", "127.0.0.1", settings.dicom_port)
    node = build_node(settings, migrate=True)
    try:
        puller = DimsePuller(settings, node.ingestor, settings.peers[0])
        rate = timed(lambda: puller.get_study(study_uid, lambda: None), count)
        with node.session_factory() as session:
            from sqlalchemy import func, select

            from node.db import Instance

            stored = session.scalar(select(func.count()).select_from(Instance))
        if stored != count:
            raise SystemExit(f"node C-GET stored {stored} of {count}")
        return rate
    finally:
        node.close()


def get_with_getscu(orthanc, study_uid: str, workdir: Path, count: int) -> float:
    orthanc.add_modality("GETSCU", "GETSCU", "127.0.0.1", free_port())
    return timed(
        lambda: check(
            getscu(
                "127.0.0.1",
                orthanc.dicom_port,
                calling_ae="GETSCU",
                called_ae=orthanc.aet,
                study_instance_uid=study_uid,
                out_dir=workdir,
            ),
            "getscu",
        ),
        count,
    )


def get_with_bare_pynetdicom(orthanc, study_uid: str, workdir: Path, count: int) -> float:
    """The naive C-GET: write each encoded dataset, no fsync, no database."""
    orthanc.add_modality("BAREGET", "BAREGET", "127.0.0.1", free_port())
    handle_store = naive_store_handler(workdir)

    def run() -> None:
        ae = AE("BAREGET")
        ae.maximum_pdu_size = 0
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate(
            "127.0.0.1",
            orthanc.dicom_port,
            ae_title=orthanc.aet,
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, handle_store), (evt.EVT_CONN_OPEN, handle_conn_open)],
        )
        from pydicom.dataset import Dataset

        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        for _status, _identifier in assoc.send_c_get(
            query, StudyRootQueryRetrieveInformationModelGet
        ):
            pass
        assoc.release()

    rate = timed(run, count)
    if len(list(workdir.iterdir())) != count:
        raise SystemExit("bare pynetdicom C-GET did not receive every instance")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ainode-bench-") as tmp:
        root = Path(tmp)
        spec = phantom.PhantomSpec(finding="covid", slices=args.slices, seed=1)
        files = phantom.write_series(spec, root / "study")
        study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        print(f"phantom: {len(files)} slices, {size_mb:.0f} MB, {args.repeat} repetitions")
        orthanc = start_orthanc(root / "orthanc", aet="ORTHANC", stable_age=60)
        results: dict[str, list[float]] = {}
        try:
            for rep in range(args.repeat):
                for name, rate in one_repetition(files, orthanc, study_uid, root / f"rep{rep}"):
                    results.setdefault(name, []).append(rate)
        finally:
            orthanc.stop(kill=True)
    report(results)


def one_repetition(files, orthanc, study_uid: str, rep_dir: Path):
    """Yield (path name, inst/s) for every path, once."""
    n = len(files)
    yield "push: node (durable)", push_to_node(files, rep_dir / "node")
    yield "push: DCMTK storescp", push_to_storescp(files, rep_dir / "storescp")
    yield "push: Orthanc", push_to_orthanc(files, orthanc)
    yield "push: bare pynetdicom SCP", push_to_bare_pynetdicom(files, rep_dir / "bare")
    yield "C-GET: node (durable)", get_with_node(orthanc, study_uid, rep_dir / "node-get", n)
    yield "C-GET: DCMTK getscu", get_with_getscu(orthanc, study_uid, rep_dir / "getscu", n)
    yield (
        "C-GET: bare pynetdicom",
        get_with_bare_pynetdicom(orthanc, study_uid, rep_dir / "bare-get", n),
    )


def report(results: dict[str, list[float]]) -> None:
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"\n{'path':<30} {'inst/s (median)':>16} {'runs':>26}")
    for name, value in medians.items():
        runs = ", ".join(f"{v:.0f}" for v in results[name])
        print(f"{name:<30} {value:>16.0f} {runs:>26}")
    print()
    for kind in ("push", "C-GET"):
        node = medians[f"{kind}: node (durable)"]
        for name, value in medians.items():
            if name.startswith(kind) and "node" not in name:
                print(f"{kind}: node / {name.split(': ', 1)[1]:<22} = {node / value:.2f}")


if __name__ == "__main__":
    main()
