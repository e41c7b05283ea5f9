"""Training labels and the de-identified export bundle: real phantoms, real databases."""

from __future__ import annotations

import csv
import json
import os
import struct
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from sqlalchemy import select

from ainode.cli import main
from node import __version__, phantom
from node.analysis import imaging
from node.analysis.analyze import AnalysisOptions, eligible_series, windowed_lung_slices
from node.ingest.ingestor import Ingestor
from node.ingest.store import InstanceStore
from node.records import schema
from node.records.db import Label, make_engine, make_session_factory
from node.records.export import MANIFEST_COLUMNS, Pseudonymizer, export_bundle, export_salt
from node.records.labels import (
    LabelConflict,
    add_label,
    class_for,
    find_study,
    labels_of,
    remove_label,
)
from node.runtime import build_node

ROWS = COLUMNS = 128
SLICES = 24
# Distinctive identifiers (no hex-only strings), so a leak is found byte for byte.
PATIENTS = {
    "P1": {"patient_name": "QZWXVO^JOHANNA", "patient_id": "PIDQZX771", "birth": "19470312"},
    "P2": {"patient_name": "YKRMPL^TEODORO", "patient_id": "PIDYKR442", "birth": "19550817"},
}
STUDIES = {  # name: (finding, patient, accession, study date, keyword)
    "covid": ("covid", "P1", "ACCQZW901", "20240229", "COVID"),
    "normal": ("normal", "P2", "ACCYKR902", "20231107", "Normal"),
    "pneumonia": ("pneumonia", "P1", "ACCQZW903", "20250521", "Pneumonia"),
}
EXPECTED_CLASS = {"covid": "Covid_19", "normal": "Normal", "pneumonia": "Pneumonia"}


def _spec(name: str, **overrides) -> phantom.PhantomSpec:
    finding, patient, accession, study_date, _ = STUDIES[name]
    who = PATIENTS[patient]
    values = {
        "finding": finding,
        "slices": SLICES,
        "rows": ROWS,
        "columns": COLUMNS,
        "seed": len(name),
        "patient_name": who["patient_name"],
        "patient_id": who["patient_id"],
        "patient_birth_date": who["birth"],
        "accession_number": accession,
        "study_date": study_date,
    }
    return phantom.PhantomSpec(**{**values, **overrides})


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, list[Path]]:
    """Three small studies (two patients) and a second, smaller series of the Normal one."""
    root = tmp_path_factory.mktemp("export-phantoms")
    files = {name: phantom.write_series(_spec(name), root / name) for name in STUDIES}
    normal_study = str(dcmread(files["normal"][0], stop_before_pixels=True).StudyInstanceUID)
    extra = _spec("normal", slices=8, study_instance_uid=normal_study, series_description="x")
    files["normal-extra"] = phantom.write_series(extra, root / "normal-extra")
    return files


def uids(paths: list[Path]) -> tuple[str, str, list[str]]:
    """Study and series UID of a phantom series, and its SOP Instance UIDs."""
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    return (
        str(headers[0].StudyInstanceUID),
        str(headers[0].SeriesInstanceUID),
        [str(h.SOPInstanceUID) for h in headers],
    )


def ingest_all(ingestor: Ingestor, paths: list[Path]) -> None:
    for path in paths:
        ingestor.ingest_part10(path.read_bytes(), "TESTSCU")


# --------------------------------------------------------------------------- labels


@pytest.fixture
def session(database_url, tmp_path, phantoms):
    """A session on a migrated database holding the Normal study (two series)."""
    engine = make_engine(database_url)
    schema.upgrade(engine)
    factory = make_session_factory(engine)
    ingestor = Ingestor(InstanceStore(tmp_path / "store"), factory)
    ingest_all(ingestor, phantoms["normal"][:2] + phantoms["normal-extra"][:2])
    with factory() as opened:
        yield opened
    engine.dispose()


def test_add_label_is_idempotent_and_case_insensitive(session, phantoms):
    study_uid, _, _ = uids(phantoms["normal"])
    classes = {"COVID": "Covid_19", "Normal": "Normal", "Exclude": None}
    first = add_label(session, study_uid, "covid", "dr.house", keyword_classes=classes)
    again = add_label(session, study_uid, " COVID ", "dr.other", keyword_classes=classes)
    add_label(session, study_uid, '<b>"teaching"</b>', "dr.house")
    session.commit()
    assert again.id == first.id and first.keyword == "COVID"
    listed = labels_of(session, find_study(session, study_uid).id)
    assert [(x.keyword, x.series_instance_uid, x.created_by) for x in listed] == [
        ('<b>"teaching"</b>', None, "dr.house"),
        ("COVID", None, "dr.house"),
    ]
    assert listed[0].created_at.tzinfo is not None


def test_series_label_is_kept_apart_and_removed(session, phantoms):
    study_uid, series_uid, _ = uids(phantoms["normal"])
    add_label(session, study_uid, "Normal", "dr.house")
    add_label(session, study_uid, "COVID", "dr.house", series_uid=series_uid)
    session.commit()
    listed = labels_of(session, find_study(session, study_uid).id)
    assert [(x.keyword, x.series_instance_uid) for x in listed] == [
        ("Normal", None),
        ("COVID", series_uid),
    ]
    assert remove_label(session, study_uid, "covid", series_uid=series_uid) is True
    assert remove_label(session, study_uid, "COVID", series_uid=series_uid) is False
    session.commit()
    assert [x.keyword for x in labels_of(session, find_study(session, study_uid).id)] == ["Normal"]


def test_unknown_study_or_series_is_named(session, phantoms):
    study_uid, _, _ = uids(phantoms["normal"])
    with pytest.raises(LookupError, match=r"study 1\.2\.3\.4 is not on this node"):
        add_label(session, "1.2.3.4", "COVID", "dr.house")
    with pytest.raises(LookupError, match=rf"series 1\.2\.3\.5 is not in study {study_uid}"):
        add_label(session, study_uid, "COVID", "dr.house", series_uid="1.2.3.5")
    assert session.scalars(select(Label)).all() == []


@pytest.mark.parametrize(
    ("keywords", "expected"),
    [
        (["COVID"], "Covid_19"),
        (["  covid "], "Covid_19"),
        (["pneumonia", "teaching file"], "Pneumonia"),
        (["Normal", "NORMAL"], "Normal"),
        (["Exclude", "COVID"], None),
        (["teaching file"], None),
        ([], None),
    ],
)
def test_keywords_give_a_class(keywords, expected, settings):
    assert class_for(keywords, settings.keyword_classes) == expected


def test_keywords_of_two_classes_conflict(settings):
    with pytest.raises(LabelConflict, match=r"conflicting labels \(Covid_19, Pneumonia\)"):
        class_for(["COVID", "Pneumonia", "teaching"], settings.keyword_classes)


# --------------------------------------------------------------------------- export


@pytest.fixture
def labelled(node, phantoms):
    """The node holding the three studies, each labelled with its own class keyword."""
    for paths in phantoms.values():
        ingest_all(node.ingestor, paths)
    with node.session_factory() as session, session.begin():
        for name, (*_, keyword) in STUDIES.items():
            add_label(session, uids(phantoms[name])[0], keyword, "dr.house")
    return node


def expected_slices(settings, paths: list[Path]) -> tuple[list, np.ndarray, list]:
    """What inference evaluates for a series: (dataset, frame), windowed pixels, headers."""
    datasets, _ = eligible_series(paths)
    frames, pixels = windowed_lung_slices(datasets, AnalysisOptions.from_settings(settings))
    return frames, pixels, datasets


def read_manifest(bundle: Path) -> list[dict]:
    with (bundle / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        return list(reader)


def png_chunks(data: bytes) -> list[bytes]:
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        chunks.append(data[offset + 4 : offset + 8])
        offset += length + 12
    return chunks


def test_export_writes_the_inference_slices_per_class(labelled, phantoms, tmp_path):
    settings = labelled.settings
    summary = export_bundle(labelled, tmp_path / "bundle")
    bundle = tmp_path / "bundle"
    keys = Pseudonymizer(export_salt(settings))
    rows = {row["instance"]: row for row in read_manifest(bundle)}
    for name, class_name in EXPECTED_CLASS.items():
        frames, pixels, datasets = expected_slices(settings, phantoms[name])
        assert summary.images[class_name] == len(frames) > 0
        assert len(list((bundle / "images" / class_name).glob("*.png"))) == len(frames)
        for (ds, _frame), expected in zip(frames, pixels, strict=True):
            row = rows[keys.key(str(ds.SOPInstanceUID))]
            assert row["path"] == f"images/{class_name}/{row['instance']}.png"
            assert (row["label"], row["keyword"], row["source"]) == (
                class_name,
                STUDIES[name][4],
                "ainode-export",
            )
            assert int(row["slice_index"]) == datasets.index(ds)
            assert (row["window_center"], row["window_width"]) == ("-600", "1500")
            data = (bundle / row["path"]).read_bytes()
            assert png_chunks(data) == [b"IHDR", b"IDAT", b"IEND"]  # no text chunks
            with Image.open(bundle / row["path"]) as image:
                assert (image.mode, image.size) == ("L", (COLUMNS, ROWS))
                np.testing.assert_array_equal(np.asarray(image), expected)
    assert summary.studies == {"Covid_19": 1, "Normal": 1, "Pneumonia": 1}
    assert summary.patients == 2 and summary.skipped == []
    assert len(rows) == sum(summary.images.values())


def test_export_json_describes_the_bundle(labelled, tmp_path):
    summary = export_bundle(labelled, tmp_path / "bundle")
    info = json.loads((tmp_path / "bundle" / "export.json").read_text(encoding="utf-8"))
    assert info["format"] == "ainode-export/1"
    assert info["created_at"].endswith("+00:00")
    assert (info["node_version"], info["preprocessing_version"]) == (
        __version__,
        imaging.PREPROCESSING_VERSION,
    )
    assert info["keywords"] is None and info["since"] is None
    assert info["keyword_classes"] == labelled.settings.keyword_classes
    assert info["window"] == {"center": -600.0, "width": 1500.0}
    assert info["counts"] == {
        "images": summary.images,
        "studies": {"Covid_19": 1, "Normal": 1, "Pneumonia": 1},
        "patients": 2,
    }
    assert info["skipped"] == []


def test_export_carries_no_phi(labelled, phantoms, tmp_path):
    export_bundle(labelled, tmp_path / "bundle")
    secrets_ = {export_salt(labelled.settings).decode()}
    for name, (_, patient, accession, study_date, _) in STUDIES.items():
        who = PATIENTS[patient]
        study_uid, series_uid, sop_uids = uids(phantoms[name])
        secrets_ |= {accession, study_date, study_uid, series_uid, *sop_uids}
        secrets_ |= {who["patient_id"], who["birth"], *who["patient_name"].split("^")}
    files = [p for p in (tmp_path / "bundle").rglob("*") if p.is_file()]
    assert len(files) > 3
    for path in files:
        data = path.read_bytes()
        for secret in secrets_:
            assert secret not in path.name
            assert secret.encode() not in data, f"{secret} in {path.name}"


def test_same_patient_same_key_across_exports_and_salts_differ(labelled, make_settings, tmp_path):
    export_bundle(labelled, tmp_path / "first")
    export_bundle(labelled, tmp_path / "second", keywords=["pneumonia"])
    first, second = read_manifest(tmp_path / "first"), read_manifest(tmp_path / "second")
    patient_of = {row["label"]: row["patient"] for row in first}
    assert patient_of["Covid_19"] == patient_of["Pneumonia"] != patient_of["Normal"]
    assert {row["patient"] for row in second} == {patient_of["Pneumonia"]}
    salt_file = labelled.settings.data_dir / "export_salt"
    assert salt_file.stat().st_mode & 0o777 == 0o600

    salted = build_node(make_settings(export_salt="another-salt-of-this-site"))
    try:
        export_bundle(salted, tmp_path / "third")
    finally:
        salted.close()
    third = read_manifest(tmp_path / "third")
    assert len(third) == len(first)
    assert {row["patient"] for row in third}.isdisjoint(patient_of.values())
    assert {row["instance"] for row in third}.isdisjoint(row["instance"] for row in first)


def test_series_label_overrides_the_study_label(labelled, phantoms, tmp_path):
    study_uid, series_uid, _ = uids(phantoms["normal"])
    with labelled.session_factory() as session, session.begin():
        add_label(session, study_uid, "COVID", "dr.house", series_uid=series_uid)
    summary = export_bundle(labelled, tmp_path / "bundle")
    assert summary.studies == {"Covid_19": 2, "Normal": 0, "Pneumonia": 1}
    exported = {row["series"] for row in read_manifest(tmp_path / "bundle")}
    keys = Pseudonymizer(export_salt(labelled.settings))
    assert keys.key(series_uid) in exported  # the largest series, the one inference reads
    assert keys.key(uids(phantoms["normal-extra"])[1]) not in exported


def test_conflicting_and_excluded_studies_are_skipped(labelled, phantoms, tmp_path):
    with labelled.session_factory() as session, session.begin():
        add_label(session, uids(phantoms["normal"])[0], "Exclude", "dr.house")
        add_label(session, uids(phantoms["pneumonia"])[0], "COVID", "dr.house")
    summary = export_bundle(labelled, tmp_path / "bundle")
    keys = Pseudonymizer(export_salt(labelled.settings))
    assert summary.studies == {"Covid_19": 1, "Normal": 0, "Pneumonia": 0}
    assert summary.skipped == [
        {"study": keys.key(uids(phantoms["normal"])[0]), "reason": "excluded from training"},
        {
            "study": keys.key(uids(phantoms["pneumonia"])[0]),
            "reason": "conflicting labels (Covid_19, Pneumonia)",
        },
    ]
    info = json.loads((tmp_path / "bundle" / "export.json").read_text(encoding="utf-8"))
    assert info["skipped"] == summary.skipped
    assert not (tmp_path / "bundle" / "images" / "Normal").exists()


def test_keywords_and_since_select_studies(labelled, tmp_path):
    summary = export_bundle(labelled, tmp_path / "covid", keywords=["covid", "Normal"])
    assert summary.studies == {"Covid_19": 1, "Normal": 1, "Pneumonia": 0}
    future = export_bundle(labelled, tmp_path / "future", since=date(2999, 1, 1))
    assert sum(future.images.values()) == 0
    assert read_manifest(tmp_path / "future") == []
    past = export_bundle(labelled, tmp_path / "past", since=date(2020, 1, 1))
    assert past.studies == {"Covid_19": 1, "Normal": 1, "Pneumonia": 1}
    info = json.loads((tmp_path / "past" / "export.json").read_text(encoding="utf-8"))
    assert info["since"] == "2020-01-01"


def test_a_non_empty_folder_is_refused_and_a_failure_leaves_nothing(
    labelled, tmp_path, monkeypatch
):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_bundle(labelled, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    def disk_full(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("node.records.export._write_manifest", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_bundle(labelled, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "data"]

    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    assert sum(export_bundle(labelled, tmp_path / "empty").images.values()) > 0


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_env(node, monkeypatch):
    """``ainode`` reads the test node's settings from the environment."""
    monkeypatch.delenv("AINODE_CONFIG", raising=False)
    monkeypatch.delenv("AINODE_EXPORT_SALT", raising=False)
    monkeypatch.setenv("AINODE_DATA_DIR", str(node.settings.data_dir))
    return node


def test_cli_labels_a_study_and_lists_it(cli_env, phantoms, capsys):
    ingest_all(cli_env.ingestor, phantoms["covid"][:3])
    study_uid, series_uid, _ = uids(phantoms["covid"])
    assert main(["label", study_uid, "covid", "--by", "dr.house"]) == 0
    assert main(["label", study_uid, "Exclude", "--series", series_uid, "--by", "dr.w"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"study {study_uid}: labelled 'COVID'",
        f"series {series_uid}: labelled 'Exclude'",
    ]
    assert main(["labels", study_uid]) == 0
    out = capsys.readouterr().out
    assert "COVID" in out and "dr.house" in out and series_uid in out
    assert out.splitlines()[-1] == "class: Covid_19"
    assert main(["label", study_uid, "COVID", "--remove"]) == 0
    assert capsys.readouterr().out == f"study {study_uid}: removed label 'COVID'\n"
    assert main(["labels", study_uid, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [x["keyword"] for x in listed["labels"]] == ["Exclude"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["label", "1.2.3.4", "COVID"], "ainode: study 1.2.3.4 is not on this node"),
        (["labels", "1.2.3.4"], "ainode: study 1.2.3.4 is not on this node"),
        (["label", "1.2.3.4", "  "], "ainode: keyword must be 1-64 characters, got '  '"),
        (["label", "1.2.3.4", "x" * 65], "ainode: keyword must be 1-64 characters"),
        (
            ["label", "1.2.3.4", "a\nb"],
            "ainode: keyword must not contain control characters or line breaks, got 'a\\nb'",
        ),
        (["label", "1.2.3.4", "a\x00b"], "ainode: keyword must not contain control characters"),
        (["export", "--out", "x", "--since", "1.1.2024"], "ainode: --since must be a date"),
        (["export", "--out", "x", "--keywords", "\t"], "ainode: keyword must be 1-64"),
    ],
)
def test_cli_bad_input_is_one_clear_line(cli_env, argv, message, capsys, tmp_path):
    argv = [str(tmp_path / a) if a == "x" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_export_prints_counts_and_where(cli_env, phantoms, capsys, tmp_path):
    ingest_all(cli_env.ingestor, phantoms["covid"])
    study_uid = uids(phantoms["covid"])[0]
    assert main(["label", study_uid, "COVID"]) == 0
    out_dir = tmp_path / "bundle"
    assert main(["export", "--out", str(out_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    images = len(list((out_dir / "images" / "Covid_19").glob("*.png")))
    assert out[-4] == f"exported {images} images of 1 patients to {out_dir}"
    assert out[-3].split() == ["Covid_19", str(images), "images", "1", "studies"]
    assert main(["export", "--out", str(out_dir), "--json"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path / "again"), "--json", "--no-progress"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["images"]["Covid_19"] == images and counts["patients"] == 1
    assert os.listdir(tmp_path / "again" / "images") == ["Covid_19"]
