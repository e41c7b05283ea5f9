"""Web UI benchmark: worklist response times on 10,000 studies, and slice PNGs per second.

One run, on a fresh SQLite node in a temporary folder:

- worklist: ``--studies`` studies bulk-inserted (an analysis for most, a re-analysis for
  some, labels on some), then ``--requests`` requests per page through the Flask test client
  as a signed-in radiologist, p50/p95 in milliseconds: the default page, a filtered page, a
  page sorted by probability, a deep page and the JSON refresh. The same pages come from a
  naive view in the same app (every study, analysis and label loaded as ORM objects, then
  filtered, sorted and sliced in Python, rendered by the same template) for the ratio.
- slices: a phantom series ingested into the node; lung-windowed PNGs of every slice from
  the instance store with :func:`node.analysis.imaging.windowed_slices` and
  :func:`node.analysis.imaging.to_png_bytes`, against pydicom ``pixel_array`` + modality LUT in
  float64 + Pillow's PNG encoder, and through ``/studies/<id>/slices/<n>.png`` when the app
  has it.

Run: ``.venv/bin/python -m bench.webui [--studies 10000] [--requests 200]``.
"""

from __future__ import annotations

import argparse
import io
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from flask import request
from flask_login import login_required
from PIL import Image
from pydicom import dcmread
from pydicom.pixels import apply_modality_lut
from sqlalchemy import insert, select

from node import phantom
from node.analysis import imaging
from node.analysis.result import CLASSES
from node.records import users
from node.records.db import Analysis, Instance, Label, Series, Study
from node.runtime import build_node
from node.settings import Settings
from webui import create_app, session, worklist
from webui.worklist_query import (
    WorklistPage,
    WorklistQuery,
    WorklistRow,
    fetch_page,
    known_keywords,
    parse_query,
)

STATUSES = ["analyzed"] * 6 + ["reported"] * 2 + ["receiving", "stable", "queued", "failed"]
KEYWORDS = ["COVID", "Normal", "Pneumonia", "teaching", "follow-up", "Exclude"]
DESCRIPTIONS = ["CT TORAX SIMPLE", "TÓRAX SIMPLE", "CHEST CT LOW DOSE", "CT CHEST W/O", None]
NOW = datetime(2024, 6, 1, tzinfo=UTC)
PAGES = {
    "default (newest first)": "",
    "filtered (status+class+label+dates+description)": (
        "status=analyzed&class=Covid_19&label=covid&from=2024-01-01&description=torax"
    ),
    "sorted by probability": "sort=probability",
    "deep page (page 150, by study date)": "sort=study_date&page=150",
}
USERNAME, PASSWORD = "bench.rad", "bench-password-1"


def fill(node, count: int, seed: int = 1) -> None:
    """``count`` studies with one series each, analyses for most, labels on some (bulk)."""
    rng = random.Random(seed)
    studies, series, analyses, labels = [], [], [], []
    for i in range(1, count + 1):
        received = NOW - timedelta(minutes=37 * (count - i))
        status = rng.choice(STATUSES)
        studies.append(
            {
                "id": i,
                "study_instance_uid": f"2.25.{10**12 + i}",
                "patient_id": f"PID{rng.randrange(10**6):06d}",
                "patient_name": f"PATIENT{i % 3000}^GIVEN{i % 17}",
                "study_date": (received - timedelta(days=rng.randrange(3))).strftime("%Y%m%d"),
                "study_description": rng.choice(DESCRIPTIONS),
                "modalities": "CT",
                "status": status,
                "status_reason": "no CT images" if status == "failed" else None,
                "retries": 0,
                "series_count": 1,
                "instance_count": rng.randrange(40, 400),
                "first_received_at": received,
                "last_received_at": received + timedelta(seconds=90),
                "status_changed_at": received + timedelta(minutes=3),
            }
        )
        series.append({"id": i, "study_id": i, "series_instance_uid": f"2.25.{2 * 10**12 + i}"})
        if status in ("analyzed", "reported"):
            for _ in range(1 if rng.random() > 0.1 else 2):  # some were analysed twice
                analyses.append(_analysis(rng, i, received))
        if rng.random() < 0.25:
            for keyword in rng.sample(KEYWORDS, rng.randrange(1, 3)):
                labels.append(
                    {"study_id": i, "keyword": keyword, "created_by": "dr.bench",
                     "created_at": received}
                )  # fmt: skip
    with node.session_factory() as db, db.begin():
        for table, rows in ((Study, studies), (Series, series), (Analysis, analyses)):
            db.execute(insert(table), rows)
        db.execute(insert(Label), labels)
        users.add_user(db, USERNAME, PASSWORD, "radiologist", full_name="Bench")
    print(
        f"filled: {len(studies)} studies, {len(analyses)} analyses, {len(labels)} labels",
        flush=True,
    )


def _analysis(rng: random.Random, study_id: int, received: datetime) -> dict:
    weights = np.array([rng.random() ** 3 for _ in CLASSES])
    probabilities = weights / weights.sum()
    predicted = CLASSES[int(probabilities.argmax())]
    return {
        "study_id": study_id,
        "model_name": "effnet-b0-covidx",
        "model_version": "3",
        "model_demo": False,
        "status": "done",
        "started_at": received + timedelta(minutes=2),
        "finished_at": received + timedelta(minutes=3),
        "timings": {},
        "rule": "top-mean",
        "predicted_class": predicted,
        "probabilities": dict(zip(CLASSES, map(float, probabilities), strict=True)),
        "slices_evaluated": 60,
        "instances_skipped": {},
    }


def naive_page(query: WorklistQuery) -> WorklistPage:
    """The worklist page done the easy way: load everything, filter, sort and slice in Python."""
    db = session()
    studies = db.scalars(select(Study)).all()
    latest: dict[int, Analysis] = {}
    for analysis in db.scalars(select(Analysis).where(Analysis.status == "done")):
        if analysis.study_id not in latest or analysis.id > latest[analysis.study_id].id:
            latest[analysis.study_id] = analysis
    keywords: dict[int, set[str]] = {}
    for label in db.scalars(select(Label)):
        keywords.setdefault(label.study_id, set()).add(label.keyword)
    rows = [
        worklist_row(s, latest.get(s.id), keywords.get(s.id, set()))
        for s in studies
        if _naive_match(s, latest.get(s.id), keywords.get(s.id, set()), query)
    ]
    sort = {
        "received": lambda r: r.received_at.timestamp(),
        "study_date": lambda r: int(r.study_date or 0),
        "probability": lambda r: r.probability if r.probability is not None else -1.0,
    }[query.sort]
    rows.sort(key=lambda r: (sort(r), r.id), reverse=query.order == "desc")
    pages = max(1, -(-len(rows) // query.per_page))
    query = query.with_page(min(query.page, pages))
    start = (query.page - 1) * query.per_page
    return WorklistPage(query, rows[start : start + query.per_page], len(rows))


def _naive_match(study: Study, analysis: Analysis | None, keywords: set, q: WorklistQuery) -> bool:
    if q.status and study.status != q.status:
        return False
    if q.predicted_class and (analysis is None or analysis.predicted_class != q.predicted_class):
        return False
    if q.label and q.label.casefold() not in {k.casefold() for k in keywords}:
        return False
    if q.date_from and study.first_received_at.date() < q.date_from:
        return False
    description = (study.study_description or "").casefold()
    return not (q.description and q.description.casefold() not in description)


def worklist_row(study: Study, analysis: Analysis | None, keywords: set[str]) -> WorklistRow:
    probability = analysis.probabilities[analysis.predicted_class] if analysis else None
    return WorklistRow(
        study.id, study.study_instance_uid, study.status, study.status_reason,
        study.patient_name, study.patient_id, study.study_date, study.study_description,
        study.first_received_at, study.series_count, study.instance_count,
        analysis.predicted_class if analysis else None, probability,
        analysis.model_name if analysis else None, analysis.model_version if analysis else None,
        bool(analysis and analysis.model_demo), tuple(sorted(keywords, key=str.casefold)),
    )  # fmt: skip


@login_required
def naive_view():
    query = parse_query(request.args)
    return worklist.render_page(naive_page(query), known_keywords(session()))


def signed_in_client(app):
    client = app.test_client()
    page = client.get("/login").text
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)
    answer = client.post(
        "/login", data={"csrf_token": token, "username": USERNAME, "password": PASSWORD}
    )
    assert answer.status_code == 302, "sign-in failed"
    return client


def timings(client, url: str, count: int) -> tuple[float, float]:
    """p50 and p95 in milliseconds of ``count`` GETs of ``url`` (after 3 warm-ups)."""
    spent = []
    for i in range(count + 3):
        start = time.perf_counter()
        answer = client.get(url)
        elapsed = time.perf_counter() - start
        if answer.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {answer.status_code}")
        if i >= 3:
            spent.append(1000 * elapsed)
    p95 = statistics.quantiles(spent, n=20)[-1] if len(spent) > 1 else spent[0]
    return statistics.median(spent), p95


def bench_worklist(app, requests: int, naive_requests: int) -> None:
    client = signed_in_client(app)
    with app.app_context():
        for name, args in PAGES.items():  # the same rows, both ways
            query = parse_query(dict(a.split("=") for a in args.split("&") if a))
            ours = fetch_page(session(), query, known_keywords(session()))
            naive = naive_page(query)
            if [r.id for r in ours.rows] != [r.id for r in naive.rows] or ours.total != naive.total:
                raise RuntimeError(f"{name}: the naive view lists different studies")
    print(f"\nworklist, ms per request ({requests} requests; naive {naive_requests})")
    print(f"{'page':<50}{'p50':>8}{'p95':>8}{'naive p50':>11}{'p95':>8}{'ratio':>8}")
    for name, args in PAGES.items():
        p50, p95 = timings(client, f"/?{args}", requests)
        n50, n95 = timings(client, f"/naive?{args}", naive_requests)
        print(f"{name:<50}{p50:>8.1f}{p95:>8.1f}{n50:>11.1f}{n95:>8.1f}{n50 / p50:>7.0f}x")
    p50, p95 = timings(client, "/worklist.json", requests)
    print(f"{'JSON refresh (/worklist.json)':<50}{p50:>8.1f}{p95:>8.1f}")
    p50, p95 = timings(client, "/worklist.json?status=analyzing", requests)
    print(f"{'JSON refresh, status=analyzing (few rows)':<50}{p50:>8.1f}{p95:>8.1f}")


def ingest_phantom(node, slices: int, folder: Path) -> tuple[int, list[Path]]:
    spec = phantom.PhantomSpec(finding="covid", slices=slices, seed=5)
    for path in phantom.write_series(spec, folder):
        node.ingestor.ingest_part10(path.read_bytes(), "BENCH")
    with node.session_factory() as db:  # the bulk studies have no instances: these are all
        query = select(Instance.store_key, Series.study_id).join(Series)
        rows = db.execute(query.order_by(Instance.instance_number)).all()
    return rows[0][1], [node.store.path(key) for key, _ in rows]


def ainode_png(path: Path) -> bytes:
    return imaging.to_png_bytes(imaging.windowed_slices(dcmread(path), imaging.LUNG)[0])


def naive_png(path: Path) -> bytes:
    ds = dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    low, high = imaging.LUNG.low, imaging.LUNG.high
    image = ((np.clip(hu, low, high) - low) / (high - low) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


def slice_rate(render: Callable[[Path], bytes], paths: list[Path], repeat: int) -> tuple:
    """Best slices per second over ``repeat`` passes, and the mean PNG size in KiB."""
    best, size = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        size = sum(len(render(path)) for path in paths)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best, size / len(paths) / 1024


def stage_times(paths: list[Path]) -> str:
    """Milliseconds per slice of each stage of the ainode path (one pass)."""
    spent = {"read": 0.0, "decode+HU+window": 0.0, "PNG": 0.0}
    for path in paths:
        marks = [time.perf_counter()]
        ds = dcmread(path)
        marks.append(time.perf_counter())
        image = imaging.windowed_slices(ds, imaging.LUNG)[0]
        marks.append(time.perf_counter())
        imaging.to_png_bytes(image)
        marks.append(time.perf_counter())
        for stage, start, end in zip(spent, marks, marks[1:], strict=False):
            spent[stage] += end - start
    return ", ".join(f"{stage} {1000 * s / len(paths):.2f}" for stage, s in spent.items())


def bench_slices(app, node, slices: int, repeat: int, folder: Path) -> None:
    study_id, paths = ingest_phantom(node, slices, folder)
    print(f"\nslice PNGs, lung window, {len(paths)} slices of 512x512 (best of {repeat})")
    print(f"{'path':<50}{'slices/s':>10}{'KiB/PNG':>10}")
    ours, size = slice_rate(ainode_png, paths, repeat)
    print(f"{'node.analysis.imaging windowed_slices + to_png_bytes':<50}{ours:>10.0f}{size:>10.0f}")
    naive, size = slice_rate(naive_png, paths, repeat)
    print(f"{'naive: pixel_array + float64 LUT + Pillow PNG':<50}{naive:>10.0f}{size:>10.0f}")
    print(f"ratio: {ours / naive:.1f}x; ainode ms/slice: {stage_times(paths)}")
    rules = [r.rule for r in app.url_map.iter_rules() if "/slices/" in r.rule]
    if not rules:
        print("GET /studies/<id>/slices/<n>.png: not in this app yet")
        return
    client = signed_in_client(app)
    first = 0 if client.get(f"/studies/{study_id}/slices/0.png").status_code == 200 else 1
    urls = [f"/studies/{study_id}/slices/{n}.png" for n in range(first, first + len(paths))]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for url in urls:
            if client.get(url).status_code != 200:
                raise RuntimeError(f"{url}: not served")
        best = min(best, time.perf_counter() - start)
    print(f"{'GET ' + rules[0] + ' (test client)':<50}{len(urls) / best:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200, help="requests per page")
    parser.add_argument("--naive-requests", type=int, default=20)
    parser.add_argument("--slices", type=int, default=60, help="phantom slices")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-webui-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", web_secure_cookies=False)
        node = build_node(settings, migrate=True)
        try:
            fill(node, args.studies)
            app = create_app(settings, {"TESTING": True}, node=node)
            app.add_url_rule("/naive", "naive", naive_view)
            bench_worklist(app, args.requests, args.naive_requests)
            bench_slices(app, node, args.slices, args.repeat, Path(tmp) / "phantom")
        finally:
            node.close()


if __name__ == "__main__":
    main()
