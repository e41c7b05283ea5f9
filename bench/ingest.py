"""Ingest benchmark: push and C-GET one phantom study through the node and its peers.

One run; every path is measured beside the node, ``--repeat`` times, and medians are reported:

- push with DCMTK storescu (TCP_NODELAY=1) over 1, 2 and 4 concurrent associations
  (``--concurrency``): the study's files are split into N parts (every instance UID distinct,
  so nothing is a duplicate) and N storescu processes send them at once, to: the node
  (``ainode scp`` in its own process, durable: fsync + SQL commit before each success),
  DCMTK storescp (``--fork``: one process per association, no fsync), Orthanc, and a bare
  pynetdicom SCP that writes ``event.encoded_dataset()`` without fsync or database (the
  naive approach). Every receiver starts empty for every measurement;
- C-GET the study from Orthanc over one association with: the node (durable), a bare
  pynetdicom C-GET writing files without fsync or database, and DCMTK getscu.

Run (as root, TCP_NODELAY=1 in the environment for the DCMTK tools and Orthanc; the helpers
in tests.peers set it for the processes they start):
``TCP_NODELAY=1 .venv/bin/python -m bench.ingest [--slices 200] [--repeat 3]
[--concurrency 1,2,4]``. Prints every run, then a Markdown summary (medians, the node's
ratios; targets: push node/Orthanc >= 0.8, C-GET node/bare pynetdicom >= 0.8).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet
from sqlalchemy import create_engine, func, select

from node import phantom
from node.dicom.network import handle_conn_open
from node.dicom.pull import DimsePuller
from node.records.db import Instance
from node.runtime import build_node
from node.settings import Peer, Settings
from tests.config import write_config
from tests.peers import (
    OrthancServer,
    free_port,
    getscu,
    start_orthanc,
    stop_process,
    storescp,
    storescu,
    wait_for_port,
)

NODE = "node (durable)"
STORESCP = "DCMTK storescp"
ORTHANC = "Orthanc"
BARE = "bare pynetdicom"
GETSCU = "DCMTK getscu"
RECEIVERS = (NODE, STORESCP, ORTHANC, BARE)
GET_CLIENTS = (NODE, BARE, GETSCU)
PUSH_TARGET = ORTHANC  # node / Orthanc >= 0.8
GET_TARGET = BARE  # node / bare pynetdicom >= 0.8
TARGET = 0.8
TIMEOUT = 600  # seconds for one storescu or getscu run


def check(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        raise SystemExit(
            f"{what} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
        )


def expect(received: int, count: int, what: str) -> None:
    if received != count:
        raise SystemExit(f"{what}: {received} of {count} instances received")


def split(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """``parts`` disjoint shares of ``files`` (round robin: every part spans the study)."""
    return [list(files[i::parts]) for i in range(parts)]


def push(port: int, called_ae: str, files: Sequence[Path], concurrency: int, what: str) -> float:
    """Send ``files`` with ``concurrency`` storescu processes at once; return inst/s."""
    parts = split(files, concurrency)

    def send(part: list[Path]) -> subprocess.CompletedProcess:
        # the phantom is Explicit VR Little Endian: storescu's default proposal carries it,
        # so skip the helper's per-file header read (it would be timed)
        return storescu(
            "127.0.0.1", port, part, called_ae=called_ae, keep_syntax=False, timeout=TIMEOUT
        )

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(send, parts))
        elapsed = time.perf_counter() - start
    for result in results:
        check(result, what)
    return len(files) / elapsed


def node_settings(workdir: Path, port: int, **extra) -> Settings:
    return Settings(
        data_dir=workdir,
        dicom_host="127.0.0.1",
        dicom_port=port,
        accept_any_calling_ae=True,
        min_free_disk_mb=0,
        **extra,
    )


def stored_in_node(settings: Settings) -> int:
    engine = create_engine(settings.resolved_database_url)
    try:
        with engine.connect() as connection:
            return connection.scalar(select(func.count()).select_from(Instance))
    finally:
        engine.dispose()


def push_to_node(files: list[Path], workdir: Path, concurrency: int) -> float:
    """The node as deployed: ``ainode scp`` in its own process."""
    workdir.mkdir(parents=True)
    port = free_port()
    settings = node_settings(workdir, port)
    config = write_config(settings, workdir.with_suffix(".toml"))
    log = open(workdir.with_suffix(".log"), "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "ainode.cli", "--config", str(config), "scp"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    failure = None
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        rate = push(port, settings.ae_title, files, concurrency, "push to node")
    except SystemExit as exc:
        failure = exc
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    if failure is not None:
        tail = "\n".join(workdir.with_suffix(".log").read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{failure}\n--- node log (last 40 lines) ---\n{tail}")
    expect(stored_in_node(settings), len(files), "push to node")
    return rate


def push_to_storescp(files: list[Path], workdir: Path, concurrency: int) -> float:
    port = free_port()
    proc = storescp(port, workdir, extra=["--fork"])
    try:
        rate = push(port, "STORESCP", files, concurrency, "push to storescp")
    finally:
        stop_process(proc)
    expect(len(list(workdir.iterdir())), len(files), "push to storescp")
    return rate


def empty_orthanc(orthanc: OrthancServer) -> None:
    for study in orthanc.studies():
        orthanc.delete(f"/studies/{study}")


def push_to_orthanc(files: list[Path], orthanc: OrthancServer, concurrency: int) -> float:
    """Orthanc starts empty; the study stays there afterwards (the C-GETs read it)."""
    empty_orthanc(orthanc)
    rate = push(orthanc.dicom_port, orthanc.aet, files, concurrency, "push to Orthanc")
    expect(orthanc.get("/statistics")["CountInstances"], len(files), "push to Orthanc")
    return rate


def push_to_bare_pynetdicom(files: list[Path], workdir: Path, concurrency: int) -> float:
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
        rate = push(port, "BARE", files, concurrency, "push to bare pynetdicom")
    finally:
        server.shutdown()
    expect(len(list(workdir.iterdir())), len(files), "push to bare pynetdicom")
    return rate


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


def timed(action: Callable[[], None], instances: int) -> float:
    """Run ``action`` and return instances per second."""
    start = time.perf_counter()
    action()
    return instances / (time.perf_counter() - start)


def get_with_node(orthanc: OrthancServer, study_uid: str, workdir: Path, count: int) -> float:
    settings = node_settings(
        workdir,
        free_port(),
        peers=[Peer(name="pacs", ae_title=orthanc.aet, port=orthanc.dicom_port)],
    )
    orthanc.add_modality("AINODE", settings.ae_title, "127.0.0.1", settings.dicom_port)
    node = build_node(settings, migrate=True)
    try:
        puller = DimsePuller(settings, node.ingestor, settings.peers[0])
        rate = timed(lambda: puller.get_study(study_uid, lambda: None), count)
    finally:
        node.close()
    expect(stored_in_node(settings), count, "node C-GET")
    return rate


def get_with_getscu(orthanc: OrthancServer, study_uid: str, workdir: Path, count: int) -> float:
    orthanc.add_modality("GETSCU", "GETSCU", "127.0.0.1", free_port())
    rate = timed(
        lambda: check(
            getscu(
                "127.0.0.1",
                orthanc.dicom_port,
                calling_ae="GETSCU",
                called_ae=orthanc.aet,
                study_instance_uid=study_uid,
                out_dir=workdir,
                timeout=TIMEOUT,
            ),
            "getscu",
        ),
        count,
    )
    expect(len(list(workdir.iterdir())), count, "getscu")
    return rate


def get_with_bare_pynetdicom(
    orthanc: OrthancServer, study_uid: str, workdir: Path, count: int
) -> float:
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
        if not assoc.is_established:
            raise SystemExit("bare pynetdicom C-GET: association to Orthanc failed")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        for _status, _identifier in assoc.send_c_get(
            query, StudyRootQueryRetrieveInformationModelGet
        ):
            pass
        assoc.release()

    rate = timed(run, count)
    expect(len(list(workdir.iterdir())), count, "bare pynetdicom C-GET")
    return rate


Results = dict[tuple[str, str, int], list[float]]  # (push|C-GET, path, concurrency) -> inst/s


def one_repetition(
    files: list[Path],
    orthanc: OrthancServer,
    study_uid: str,
    rep_dir: Path,
    concurrency: Sequence[int],
    failures: list[str],
) -> Iterator[tuple[tuple[str, str, int], float]]:
    """Yield ((kind, path, concurrency), inst/s) for every path, once.

    The receivers take turns at each concurrency, so a disturbance on the machine
    falls on all of them rather than on one.
    """
    n = len(files)
    for c in concurrency:
        for name, run in (
            (NODE, lambda d, c=c: push_to_node(files, rep_dir / f"node-{c}{d}", c)),
            (STORESCP, lambda d, c=c: push_to_storescp(files, rep_dir / f"storescp-{c}{d}", c)),
            (BARE, lambda d, c=c: push_to_bare_pynetdicom(files, rep_dir / f"bare-{c}{d}", c)),
            (ORTHANC, lambda _d, c=c: push_to_orthanc(files, orthanc, c)),
        ):
            yield ("push", name, c), with_retry(f"push to {name} x{c}", run, failures)
    # Orthanc now holds the whole study (its last push), which the C-GETs read
    for name, run in (
        (NODE, lambda d: get_with_node(orthanc, study_uid, rep_dir / f"node-get{d}", n)),
        (BARE, lambda d: get_with_bare_pynetdicom(orthanc, study_uid, rep_dir / f"bare-get{d}", n)),
        (GETSCU, lambda d: get_with_getscu(orthanc, study_uid, rep_dir / f"getscu{d}", n)),
    ):
        yield ("C-GET", name, 1), with_retry(f"C-GET with {name}", run, failures)


def with_retry(label: str, run: Callable[[str], float], failures: list[str]) -> float:
    """``run`` (given a suffix for a fresh work folder); once more if it fails, noting why.

    A failed attempt is not measured, but it is reported under the summary: a receiver
    that drops associations must not look fine.
    """
    for attempt in (1, 2):
        try:
            return run("" if attempt == 1 else f"-retry{attempt}")
        except SystemExit as exc:
            print(f"  FAILED: {label} (attempt {attempt}):\n{exc}", flush=True)
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            failures.append(f"{label}, attempt {attempt}: {' / '.join(lines[:2])}")
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def parse_concurrency(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrency must be integers >= 1: {text}")
    return sorted(set(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--concurrency",
        type=parse_concurrency,
        default=[1, 2, 4],
        help="concurrent push associations, comma-separated (default 1,2,4)",
    )
    args = parser.parse_args()
    if max(args.concurrency) > args.slices:
        parser.error("--concurrency cannot exceed --slices")
    if os.environ.get("TCP_NODELAY") != "1":
        print("note: TCP_NODELAY=1 is not set here (tests.peers sets it for DCMTK and Orthanc)")

    with tempfile.TemporaryDirectory(prefix="ainode-bench-") as tmp:
        root = Path(tmp)
        spec = phantom.PhantomSpec(finding="covid", slices=args.slices, seed=1)
        files = phantom.write_series(spec, root / "study")
        study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        header = (
            f"{len(files)}-slice phantom CT ({size_mb:.0f} MB), median of {args.repeat} runs, "
            f"{os.cpu_count()} CPUs"
        )
        print(f"{header}; concurrency {', '.join(map(str, args.concurrency))}", flush=True)
        orthanc = start_orthanc(root / "orthanc", aet="ORTHANC", stable_age=60)
        results: Results = {}
        failures: list[str] = []
        try:
            for rep in range(args.repeat):
                for key, rate in one_repetition(
                    files, orthanc, study_uid, root / f"rep{rep}", args.concurrency, failures
                ):
                    results.setdefault(key, []).append(rate)
                    kind, name, c = key
                    print(f"  run {rep + 1}: {kind} {name} x{c}: {rate:.0f} inst/s", flush=True)
        finally:
            orthanc.stop(kill=True)
    print()
    print(markdown(results, args.concurrency, header, failures))


def markdown(
    results: Results, concurrency: Sequence[int], header: str, failures: Sequence[str] = ()
) -> str:
    """The summary as Markdown: medians, then the node's ratios (targets marked)."""
    median = {key: statistics.median(values) for key, values in results.items()}
    runs = {key: "/".join(f"{v:.0f}" for v in values) for key, values in results.items()}
    lines = [f"**Ingest benchmark**: {header}; inst/s (runs in parentheses).", ""]

    columns = [f"{c} assoc." for c in concurrency]
    lines += [
        "| push (storescu) to | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name in RECEIVERS:
        cells = [f"{median['push', name, c]:.0f} ({runs['push', name, c]})" for c in concurrency]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name in (PUSH_TARGET, *(r for r in RECEIVERS if r not in (NODE, PUSH_TARGET))):
        ratios = [median["push", NODE, c] / median["push", name, c] for c in concurrency]
        target = f" (target ≥ {TARGET})" if name == PUSH_TARGET else ""
        cells = [ratio_cell(r, name == PUSH_TARGET) for r in ratios]
        lines.append(f"| node / {name}{target} | " + " | ".join(cells) + " |")

    lines += ["", "| C-GET from Orthanc (1 assoc.) | inst/s | node / it |", "|---|---:|---:|"]
    node_get = median["C-GET", NODE, 1]
    for name in GET_CLIENTS:
        value = median["C-GET", name, 1]
        if name == NODE:
            ratio = "–"
        else:
            ratio = ratio_cell(node_get / value, name == GET_TARGET)
            if name == GET_TARGET:
                ratio += f" (target ≥ {TARGET})"
        lines.append(f"| {name} | {value:.0f} ({runs['C-GET', name, 1]}) | {ratio} |")
    if failures:
        lines += ["", f"Failed attempts (retried once, not counted): {len(failures)}", ""]
        lines += [f"- {failure}" for failure in failures]
    return "\n".join(lines)


def ratio_cell(ratio: float, targeted: bool) -> str:
    if not targeted:
        return f"{ratio:.2f}"
    return f"**{ratio:.2f}**" + ("" if ratio >= TARGET else " ✗")


if __name__ == "__main__":
    main()
