"""Reliability under faults: studies pushed over several associations while the worker is
SIGKILLed and the broker (Redis) restarted at random points; every round counts what was
stored, analysed and reported, and what the PACS received.

One run: a private Redis, `ainode serve --no-worker --no-web` (SCP + sweeper), one
`ainode worker` that the fault thread kills (and starts again), and a pynetdicom SCP in
this process standing in for the PACS that receives the SRs (it counts every C-STORE, so
a doubled delivery shows). Each round pushes ``--associations`` phantom studies of
``--instances`` slices at once with DCMTK storescu (one association per study).

Counted per round (expected: every study's instances stored once, one analysis done, one
report sent, one SR instance at the PACS):
- instances acknowledged by storescu vs rows and files in the node;
- analyses done per study, and abandoned runs (a kill that landed mid-analysis);
- reports sent per study, SR instances received per study, and C-STOREs of an SR the
  PACS already had (at-least-once delivery: a worker killed after the C-STORE and before
  its commit sends the same SR instance again; a PACS keeps one copy).

Run: ``TCP_NODELAY=1 .venv/bin/python -m bench.reliability [--rounds 10]``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage
from sqlalchemy import func, select

from node import phantom
from node.records.db import Analysis, AnalysisStatus, Instance, Report, ReportStatus, Series, Study
from node.runtime import build_node
from node.settings import Peer, Settings
from tests.config import write_config
from tests.peers import free_port, start_redis, storescu, wait_for_port
from tests.test_analysis_e2e import NodeProcesses

FINDINGS = ("covid", "pneumonia", "normal")


@dataclass
class PACS:
    """A pynetdicom Storage SCP that counts the SRs it receives."""

    port: int = field(default_factory=free_port)
    stores: Counter = field(default_factory=Counter)  # SR SOP Instance UID -> C-STOREs
    study_of: dict = field(default_factory=dict)  # SR SOP Instance UID -> study UID
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        ae = AE(ae_title="PACS")
        ae.add_supported_context(Comprehensive3DSRStorage)  # what the node sends
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event) -> int:
        ds = event.dataset
        with self.lock:
            self.stores[str(ds.SOPInstanceUID)] += 1
            self.study_of[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)
        return 0x0000

    def srs_per_study(self) -> tuple[Counter, int]:
        """SR instances held per study, and C-STOREs of an instance already held."""
        with self.lock:
            held = Counter(self.study_of.values())
            again = sum(n - 1 for n in self.stores.values())
        return held, again

    def stop(self) -> None:
        self.server.shutdown()


class Faults(threading.Thread):
    """Kill the worker or restart Redis at random moments until stopped; counts each.

    A worker that exits on its own (Celery's consumer can die when Redis goes away under
    it) is started again, as `ainode serve`'s supervisor or a restart policy would, and
    counted apart.
    """

    def __init__(self, procs: NodeProcesses, redis, rng: random.Random, mean_gap: float) -> None:
        super().__init__(daemon=True)
        self.procs, self.redis, self.rng, self.mean_gap = procs, redis, rng, mean_gap
        self.stop_event = threading.Event()
        self.worker_kills = self.redis_restarts = self.worker_exits = 0

    def keep_worker_up(self) -> None:
        worker = self.procs.procs.get("worker")
        if worker is None or worker.poll() is not None:
            self.worker_exits += worker is not None
            self.procs.procs.pop("worker", None)
            self.procs.start("worker", "worker")

    def run(self) -> None:
        deadline = time.monotonic() + self.rng.expovariate(1 / self.mean_gap)
        while not self.stop_event.wait(0.5):
            self.keep_worker_up()
            if time.monotonic() < deadline:
                continue
            deadline = time.monotonic() + self.rng.expovariate(1 / self.mean_gap)
            if self.rng.random() < 0.5:
                self.procs.kill("worker")
                self.worker_kills += 1
                time.sleep(self.rng.uniform(0.2, 2.0))
                self.procs.start("worker", "worker")
            else:
                self.redis.stop()
                self.redis_restarts += 1
                time.sleep(self.rng.uniform(0.2, 2.0))
                self.redis.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def make_studies(root: Path, round_no: int, count: int, instances: int) -> list[tuple[str, Path]]:
    studies = []
    for index in range(count):
        seed = round_no * 100 + index
        spec = phantom.PhantomSpec(
            finding=FINDINGS[index % len(FINDINGS)],
            slices=instances,
            seed=seed,
            patient_id=f"R{seed}",
            rows=128,
            columns=128,
        )
        files = phantom.write_series(spec, root / f"round{round_no}" / f"study{index}")
        studies.append((str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files))
    return studies


def node_counts(node, study_uids: list[str]) -> dict[str, dict[str, int]]:
    counts = {}
    with node.session_factory() as session:
        for uid in study_uids:
            study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).first()
            if study is None:
                counts[uid] = {"rows": 0, "files": 0, "done": 0, "abandoned": 0, "sent": 0}
                continue
            keys = session.scalars(
                select(Instance.store_key).join(Series).where(Series.study_id == study.id)
            ).all()

            def analyses(status, study_id=study.id):
                return session.scalar(
                    select(func.count())
                    .select_from(Analysis)
                    .where(Analysis.study_id == study_id, Analysis.status == status)
                )

            sent = session.scalar(
                select(func.count())
                .select_from(Report)
                .join(Analysis)
                .where(Analysis.study_id == study.id, Report.status == ReportStatus.SENT)
            )
            counts[uid] = {
                "rows": len(keys),
                "files": sum(node.store.exists(key) for key in keys),
                "done": analyses(AnalysisStatus.DONE),
                "abandoned": analyses(AnalysisStatus.ABANDONED),
                "sent": sent,
                "status": study.status,
            }
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--mean-fault-gap", type=float, default=4.0, help="seconds")
    parser.add_argument("--round-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="ainode-reliability-") as tmp:
        root = args.keep or Path(tmp)
        pacs = PACS()
        pacs.start()
        redis = start_redis(root / "redis")
        settings = Settings(
            data_dir=root / "data",
            dicom_host="127.0.0.1",
            dicom_port=free_port(),
            web_port=0,
            accept_any_calling_ae=True,
            peers=[Peer(name="pacs", ae_title="PACS", port=pacs.port)],
            report_peer="pacs",
            broker_url=redis.url,
            study_stable_seconds=2,
            requeue_after_seconds=5,
            analysis_timeout_seconds=30,
            report_retry_seconds=1,
            report_lease_seconds=20,
            min_free_disk_mb=0,
        )
        procs = NodeProcesses(write_config(settings, root / "ainode.toml"), root)
        totals: Counter = Counter()
        problems: list[str] = []
        try:
            procs.start("serve", "serve", "--no-worker", "--no-web")
            procs.start("worker", "worker")
            wait_for_port("127.0.0.1", settings.dicom_port, 120)
            node = build_node(settings)
            print(
                f"{'round':>5} {'acked':>6} {'rows':>6} {'files':>6} {'done':>5} "
                f"{'aband.':>6} {'sent':>5} {'SRs':>4} {'again':>5} {'kills':>5} "
                f"{'redis':>5} {'exits':>5} {'sec':>6}"
            )
            for round_no in range(1, args.rounds + 1):
                studies = make_studies(root, round_no, args.associations, args.instances)
                uids = [uid for uid, _ in studies]
                faults = Faults(procs, redis, rng, args.mean_fault_gap)
                start = time.monotonic()
                faults.start()
                with ThreadPoolExecutor(len(studies)) as pool:
                    pushed = list(
                        pool.map(
                            lambda item: storescu(
                                "127.0.0.1",
                                settings.dicom_port,
                                item[1],
                                called_ae=settings.ae_title,
                                keep_syntax=False,
                                timeout=300,
                            ),
                            studies,
                        )
                    )
                acked = sum(
                    len(files)
                    for (_, files), r in zip(studies, pushed, strict=True)
                    if r.returncode == 0
                )
                deadline = time.monotonic() + args.round_timeout
                while time.monotonic() < deadline:  # (checked below: a late round is reported)
                    held, _ = pacs.srs_per_study()
                    if all(held[uid] >= 1 for uid in uids):
                        break
                    time.sleep(0.5)
                faults.stop()
                if redis.process is None:
                    redis.start()
                faults.keep_worker_up()
                time.sleep(3)  # let a delivery in flight at the deadline land (counted)
                seconds = time.monotonic() - start
                counts = node_counts(node, uids)
                held, again_total = pacs.srs_per_study()
                again = again_total - totals["again"]
                row = Counter()
                for uid in uids:
                    row.update({k: v for k, v in counts[uid].items() if k != "status"})
                    row["srs"] += held[uid]
                    if (
                        counts[uid]["rows"] != args.instances
                        or counts[uid]["files"] != args.instances
                        or counts[uid]["done"] != 1
                        or counts[uid]["sent"] != 1
                        or held[uid] != 1
                    ):
                        problems.append(
                            f"round {round_no} study {uid}: {counts[uid]}, SRs {held[uid]}"
                        )
                row.update(
                    acked=acked,
                    again=again,
                    kills=faults.worker_kills,
                    redis=faults.redis_restarts,
                    exits=faults.worker_exits,
                )
                totals.update(row)
                print(
                    f"{round_no:>5} {row['acked']:>6} {row['rows']:>6} {row['files']:>6} "
                    f"{row['done']:>5} {row['abandoned']:>6} {row['sent']:>5} {row['srs']:>4} "
                    f"{row['again']:>5} {row['kills']:>5} {row['redis']:>5} {row['exits']:>5} "
                    f"{seconds:>6.1f}"
                )
            node.close()
        finally:
            procs.stop_all()
            redis.stop()
            pacs.stop()
        studies_total = args.rounds * args.associations
        print(
            f"\n{studies_total} studies, {totals['acked']} instances acknowledged: "
            f"{totals['rows']} stored ({totals['files']} files), {totals['done']} analyses done "
            f"({totals['abandoned']} run(s) abandoned by a kill), {totals['sent']} reports sent, "
            f"{totals['srs']} SR instances at the PACS ({totals['again']} re-sent copies of an SR "
            f"it already held); faults: {totals['kills']} worker kills, {totals['redis']} Redis "
            f"restarts, {totals['exits']} worker exits on its own (started again)"
        )
        if problems:
            print("\nNOT as expected:\n" + "\n".join(problems))
            raise SystemExit(1)
        print("every study: instances stored once, analysed once, one SR at the PACS")


if __name__ == "__main__":
    main()
