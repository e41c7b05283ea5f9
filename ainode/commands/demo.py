"""``ainode demo``: watch phantom chest CT studies go from C-STORE to SR on a running node,
without a PACS at hand.

The demo plays the PACS. It makes a few phantom studies (COVID-19, pneumonia, normal; new
UIDs each run), sends them to the node over DICOM with pynetdicom from AE ``AINODE_DEMO``,
and receives the node's SRs on its own pynetdicom Storage SCP (``demo_port``) — unless the
node reports to a real PACS, which ``--pacs`` then checks with a C-FIND. It follows each
study in the node's database and prints its result and web UI link as it lands; it ends
with one line, and leaves nothing running. The node must accept the stand-in PACS:
``ainode serve --demo`` (``./setup.sh run --demo``) adds it as a peer.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import select
from tqdm import tqdm

from node import phantom
from node.dicom.network import NAGLE_OFF, associate, make_ae, peer_label
from node.records.db import ReportStatus, Study, StudyStatus, make_engine, make_session_factory
from node.records.results import latest_analysis, latest_report
from node.runtime import wait_for_schema
from node.settings import DEMO_AE_TITLE, DEMO_PEER_NAME, Peer, Settings

# (phantom finding, the class a good model answers, what the patient is called)
CASES = (
    ("covid", "Covid_19", "DEMO^COVID"),
    ("pneumonia", "Pneumonia", "DEMO^PNEUMONIA"),
    ("normal", "Normal", "DEMO^NORMAL"),
)
# an SR the C-STORE SCP does not hold yet: the node retries, nothing is lost
_REFUSED = 0xA700
_POLL_SECONDS = 0.5
_FIRST_SEED = 7000


def register(sub) -> dict:
    """Add the ``demo`` command."""
    demo = sub.add_parser(
        "demo",
        help="send phantom studies to the running node (`ainode serve --demo`) and watch "
        "each one become a result and an SR",
    )
    demo.add_argument(
        "--studies", type=int, default=3, help="phantom studies: COVID-19, pneumonia, normal, …"
    )
    demo.add_argument("--slices", type=int, default=40, help="axial slices per study")
    demo.add_argument(
        "--pacs",
        metavar="PEER",
        help="the SRs go to this configured PACS (the node's report destination), "
        "checked there with a C-FIND, instead of to the demo's stand-in",
    )
    demo.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for every result"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    return {"demo": cmd_demo}


@dataclass
class DemoStudy:
    """One phantom study: what was sent, and what the node made of it."""

    finding: str
    expected: str
    patient_name: str
    study_uid: str = field(default_factory=lambda: f"2.25.{uuid.uuid4().int}")
    files: int = 0
    shown: str = ""  # the last status line printed for it
    result: str = ""  # "Covid_19 0.97"
    link: str = ""
    done: bool = False
    failed: str = ""


class SRReceiver:
    """The stand-in PACS's Storage SCP: keeps the SRs the node sends, by study."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.folder = folder
        self.received: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self.ae = AE(ae_title=DEMO_AE_TITLE)
        self.ae.supported_contexts = StoragePresentationContexts
        self.port = settings.demo_port
        self.server = None

    def start(self) -> SRReceiver:
        handlers = [(evt.EVT_C_STORE, self._store), NAGLE_OFF]
        try:
            self.server = self.ae.start_server(
                ("127.0.0.1", self.port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            raise RuntimeError(
                f"the demo's stand-in PACS cannot listen on 127.0.0.1:{self.port} ({exc}); "
                "is another `ainode demo` running? (demo_port sets the port)"
            ) from exc
        return self

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        except OSError:
            return _REFUSED
        with self._lock:
            self.received.setdefault(str(ds.StudyInstanceUID), []).append(ds.SOPInstanceUID)
        return 0x0000

    def has(self, study_uid: str) -> bool:
        with self._lock:
            return bool(self.received.get(study_uid))

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def node_peer(settings: Settings) -> Peer:
    """The running node as the demo reaches it: its AE title on this machine."""
    if settings.tls_certificate is not None:
        raise ValueError(
            "the node's SCP requires DICOM TLS (tls_certificate); the demo sends without TLS"
        )
    host = "127.0.0.1" if settings.dicom_host in ("0.0.0.0", "::", "") else settings.dicom_host
    return Peer(name="node", ae_title=settings.ae_title, host=host, port=settings.dicom_port)


def web_url(settings: Settings) -> str | None:
    if not settings.web_port:
        return None
    host = "127.0.0.1" if settings.web_host in ("0.0.0.0", "::", "") else settings.web_host
    return f"http://{host}:{settings.web_port}"


def sr_destination(settings: Settings, pacs: str | None) -> Peer | None:
    """Where the node will send the demo's SRs (None: nowhere, it has no destination)."""
    destination = settings.report_destination
    if pacs is None:
        return destination
    wanted = settings.peer(pacs)
    if destination is None or destination.name != wanted.name:
        where = destination.name if destination is not None else "none"
        raise ValueError(
            f"--pacs {pacs}: the node sends its SRs to {where}; set report_peer = "
            f'"{wanted.name}" in its settings and restart it'
        )
    return wanted


def make_studies(count: int, slices: int) -> list[DemoStudy]:
    if count < 1 or slices < 8:
        raise ValueError("--studies must be at least 1 and --slices at least 8")
    return [DemoStudy(*CASES[i % len(CASES)]) for i in range(count)]


def send(settings: Settings, study: DemoStudy, slices: int, seed: int, quiet: bool) -> None:
    """Make the phantom and C-STORE it to the node from AE ``AINODE_DEMO``."""
    spec = phantom.PhantomSpec(
        finding=study.finding,
        slices=slices,
        seed=seed,
        patient_name=study.patient_name,
        patient_id=f"DEMO{seed:05d}",
        accession_number=f"DEMO{seed:05d}",
        study_instance_uid=study.study_uid,
        study_date=time.strftime("%Y%m%d"),
        study_time=time.strftime("%H%M%S"),
    )
    datasets = phantom.generate_series(spec)
    ae = make_ae(settings)
    ae.ae_title = DEMO_AE_TITLE
    ae.add_requested_context(CTImageStorage)
    node = node_peer(settings)
    assoc = associate(ae, settings, node)
    if not assoc.is_established:
        raise RuntimeError(_not_accepted(settings, node, assoc))
    bar = tqdm(datasets, desc=f"send {study.finding:<9}", unit="slice", disable=quiet,
               file=sys.stderr, leave=False)  # fmt: skip
    try:
        for ds in bar:
            status = assoc.send_c_store(ds)
            if not status or status.Status != 0x0000:
                code = f"0x{status.Status:04X}" if status else "no answer"
                raise RuntimeError(f"the node refused a slice of the {study.finding} study: {code}")
            study.files += 1
    finally:
        bar.close()
        if assoc.is_established:
            assoc.release()


def _not_accepted(settings: Settings, node: Peer, assoc) -> str:
    if assoc.is_rejected:
        return (
            f"the node at {peer_label(node)} rejected AE {DEMO_AE_TITLE}: start it with "
            "`ainode serve --demo` (./setup.sh run --demo), which accepts the demo"
        )
    return (
        f"no node answers at {peer_label(node)}: start it first with `ainode serve --demo` "
        "(./setup.sh run --demo)"
    )


def follow(settings, studies, receiver, pacs, args) -> None:
    """Print each study's result as it lands; wait for its SR; until ``--timeout``."""
    engine = make_engine(settings.resolved_database_url)
    sessions = make_session_factory(engine)
    web = web_url(settings)
    bar = tqdm(total=len(studies), desc="results", unit="study", disable=args.no_progress,
               file=sys.stderr)  # fmt: skip
    deadline = time.monotonic() + args.timeout
    try:
        while not all(s.done or s.failed for s in studies):
            if time.monotonic() > deadline:
                break
            with sessions() as session:
                for study in studies:
                    if not (study.done or study.failed):
                        _look(session, study, receiver, pacs, settings, web, bar)
            time.sleep(_POLL_SECONDS)
    finally:
        bar.close()
        engine.dispose()


def _look(session, study: DemoStudy, receiver, pacs, settings, web, bar) -> None:
    row = session.scalar(select(Study).where(Study.study_instance_uid == study.study_uid))
    if row is None:
        return
    analysis = latest_analysis(session, row.id, done=True)
    if row.status in (StudyStatus.FAILED, StudyStatus.IGNORED):
        study.failed = f"{row.status}: {row.status_reason or 'no reason recorded'}"
        _say(bar, f"{study.patient_name}: {study.failed}")
        bar.update()
        return
    if analysis is None:
        return
    if not study.result:
        probability = analysis.probabilities[analysis.predicted_class]
        study.result = f"{analysis.predicted_class} {probability:.2f}"
        study.link = f"{web}/studies/{row.id}" if web else ""
        mark = "as expected" if analysis.predicted_class == study.expected else "UNEXPECTED"
        _say(
            bar,
            f"{study.patient_name:<15} {study.result:<15} ({mark}; phantom {study.finding})"
            + (f"  {study.link}" if study.link else ""),
        )
    report = latest_report(session, analysis)
    destination = settings.report_destination
    if destination is None:
        study.done = True  # the node has nowhere to send an SR: the result is the end
    elif receiver is not None:
        study.done = receiver.has(study.study_uid)
    elif report is not None and report.status == ReportStatus.SENT:
        study.done = _pacs_has_sr(settings, pacs, study.study_uid)
    if report is not None and report.status == ReportStatus.FAILED:
        study.failed = f"SR not delivered: {report.last_error}"
        _say(bar, f"{study.patient_name}: {study.failed}")
    if study.done or study.failed:
        bar.update()


def _say(bar: tqdm, line: str) -> None:
    bar.write(line, file=sys.stdout)
    sys.stdout.flush()


def _pacs_has_sr(settings: Settings, pacs: Peer, study_uid: str) -> bool:
    """Whether the PACS answers a C-FIND for an SR series of the study."""
    ae = make_ae(settings)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(ae, settings, pacs)
    if not assoc.is_established:
        return False
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.Modality = "SR"
    query.SeriesInstanceUID = ""
    try:
        found = [
            identifier
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            )
            if status and status.Status in (0xFF00, 0xFF01) and identifier is not None
        ]
    finally:
        assoc.release()
    return any(getattr(i, "Modality", "") == "SR" for i in found)


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Run the demo once; 0 when every study was analysed and its SR arrived."""
    started = time.monotonic()
    studies = make_studies(args.studies, args.slices)
    destination = sr_destination(settings, args.pacs)
    own = destination is not None and destination.name == DEMO_PEER_NAME
    receiver = SRReceiver(settings, settings.data_dir / "demo-srs").start() if own else None
    try:
        print(
            f"demo: {len(studies)} phantom {'study' if len(studies) == 1 else 'studies'} of "
            f"{args.slices} slices → node "
            f"{settings.ae_title} at 127.0.0.1:{settings.dicom_port}; SRs → "
            + (
                f"this demo (127.0.0.1:{settings.demo_port})"
                if own
                else destination.name
                if destination
                else "nowhere (the node has no report destination)"
            ),
            flush=True,
        )
        seed = _FIRST_SEED  # the same phantoms (and answers) every run; new UIDs each time
        for i, study in enumerate(studies):
            send(settings, study, args.slices, seed + i, args.no_progress)
        print(
            f"sent {sum(s.files for s in studies)} slices; the node analyses a study once "
            f"no slice has come for {settings.study_stable_seconds:g} s",
            flush=True,
        )
        wait_for_schema(settings)  # the node that took the slices has its database ready
        follow(settings, studies, receiver, destination if not own else None, args)
    finally:
        if receiver is not None:
            receiver.stop()
    return _summary(settings, studies, receiver, destination, time.monotonic() - started)


def _summary(settings, studies, receiver, destination, seconds: float) -> int:
    analysed = sum(1 for s in studies if s.result)
    done = sum(1 for s in studies if s.done)
    expected = sum(1 for s in studies if s.result.split(" ")[0] == s.expected)
    if destination is None:
        srs = "no SR (the node has no report destination)"
    elif receiver is not None:
        srs = f"{done} {_srs(done)} received (in {receiver.folder})"
    else:
        srs = f"{done} {_srs(done)} found at {destination.name}"
    web = web_url(settings)
    ok = done == len(studies)
    for study in studies:
        if not (study.done or study.failed):
            state = "analysed, SR not arrived" if study.result else "no result yet"
            print(f"{study.patient_name}: {state} (study {study.study_uid})")
    print(
        f"demo {'finished' if ok else 'INCOMPLETE'}: {analysed}/{len(studies)} studies "
        f"analysed ({expected} as the phantom's finding), {srs}, in {seconds:.0f} s"
        + (f". Review them at {web}/" if web else ""),
        flush=True,
    )
    return 0 if ok else 1


def _srs(count: int) -> str:
    return "SR" if count == 1 else "SRs"
