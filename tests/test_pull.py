"""Pulling "Tórax Simple" studies from a real Orthanc: C-FIND + C-GET, C-MOVE, QIDO/WADO."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from sqlalchemy import select

from ainode.cli import main
from node import phantom
from node.dicom.pull import description_matches, fold
from node.ingest.part10 import split_part10
from node.records.db import Instance, Study
from tests.config import write_config
from tests.conftest import orthanc_peer

DATES = "--from", "20260101", "--to", "20260131"
# (description, charset, date): four spellings of the chest protocol and one other study.
CATALOGUE = [
    ("TORAX SIMPLE", "ISO_IR 100", "20260110"),
    ("Tórax Simple", "ISO_IR 100", "20260111"),
    ("Tórax Simple", "ISO_IR 192", "20260112"),
    ("tórax simple", "ISO_IR 192", "20260113"),
    ("ABDOMEN", "ISO_IR 192", "20260114"),
    ("Tórax Simple", "ISO_IR 192", "20251231"),  # outside the date range
]


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("TORAX SIMPLE", True),
        ("Tórax Simple", True),
        ("tórax  simple", True),
        ("TÓRAX SIMPLE", True),
        ("Torax Simple con contraste", False),
        ("ABDOMEN", False),
        ("", False),
        (None, False),
    ],
)
def test_description_matching_folds_case_and_accents(description, expected):
    assert description_matches(description, ["Tórax Simple"]) is expected


def test_patterns_take_wildcards():
    assert description_matches("TORAX SIMPLE (ADULTO)", ["tórax simple*"])
    assert fold("  Tórax\tSIMPLE ") == "torax simple"


@pytest.fixture
def pacs(orthanc, tmp_path):
    """Orthanc holding the catalogue; returns (orthanc, {description+date: study uid})."""
    uids = {}
    for index, (description, charset, date) in enumerate(CATALOGUE):
        spec = phantom.PhantomSpec(
            finding="normal",
            slices=3,
            seed=100 + index,
            patient_id=f"PULL{index}",
            study_description=description,
            charset=charset,
            study_date=date,
        )
        files = phantom.write_series(spec, tmp_path / f"study{index}")
        orthanc.upload_dir(files[0].parent)
        uids[(description, charset, date)] = dcmread(files[0]).StudyInstanceUID
    return orthanc, uids


@pytest.fixture
def pull_config(make_settings, pacs, tmp_path):
    """A config file for a node whose AE Orthanc knows, with Orthanc as its peer."""
    orthanc, _uids = pacs
    settings = make_settings(peers=[orthanc_peer(orthanc)])
    orthanc.add_modality("AINODE", settings.ae_title, "127.0.0.1", settings.dicom_port)
    return settings, write_config(settings, tmp_path / "ainode.toml")


def stored_studies(settings) -> dict[str, int]:
    from node.runtime import build_node

    node = build_node(settings)
    try:
        with node.session_factory() as session:
            return {s.study_description: s.instance_count for s in session.scalars(select(Study))}
    finally:
        node.close()


CHEST = {
    ("TORAX SIMPLE", "ISO_IR 100", "20260110"),
    ("Tórax Simple", "ISO_IR 100", "20260111"),
    ("Tórax Simple", "ISO_IR 192", "20260112"),
    ("tórax simple", "ISO_IR 192", "20260113"),
}


def stored_uids(settings) -> set[str]:
    from node.runtime import build_node

    node = build_node(settings)
    try:
        with node.session_factory() as session:
            return set(session.scalars(select(Study.study_instance_uid)))
    finally:
        node.close()


@pytest.mark.parametrize(
    "method_args",
    [["--method", "get"], ["--method", "move"], ["--source", "dicomweb"]],
    ids=["c-get", "c-move", "dicomweb"],
)
def test_pull_fetches_exactly_the_chest_studies(pacs, pull_config, capsys, method_args):
    _orthanc, uids = pacs
    settings, config = pull_config
    code = main(["--config", str(config), "pull", *DATES, "--no-progress", *method_args])
    out = capsys.readouterr().out
    assert code == 0, out
    assert stored_uids(settings) == {uids[key] for key in CHEST}
    assert "5 CT studies found, 4 matched, 12 instances fetched, 0 already stored" in out

    # A second pull finds everything already there and fetches nothing.
    code = main(["--config", str(config), "pull", *DATES, "--no-progress", *method_args])
    assert code == 0
    assert "4 matched, 0 instances fetched, 12 already stored" in capsys.readouterr().out


def test_dicomweb_pull_keeps_the_pacs_files_byte_for_byte(pacs, pull_config, capsys):
    orthanc, _uids = pacs
    settings, config = pull_config
    assert (
        main(["--config", str(config), "pull", *DATES, "--source", "dicomweb", "--no-progress"])
        == 0
    )
    from node.runtime import build_node

    node = build_node(settings)
    with node.session_factory() as session:
        rows = session.scalars(select(Instance)).all()
    assert len(rows) == 12
    for row in rows:
        orthanc_id = orthanc.post("/tools/lookup", raw=row.sop_instance_uid.encode())[0]["ID"]
        assert node.store.read(row.store_key) == orthanc.get(f"/instances/{orthanc_id}/file")
    node.close()


def test_cget_keeps_the_dataset_bytes(pacs, pull_config):
    orthanc, _uids = pacs
    settings, config = pull_config
    assert main(["--config", str(config), "pull", *DATES, "--no-progress"]) == 0
    from node.runtime import build_node

    node = build_node(settings)
    with node.session_factory() as session:
        rows = session.scalars(select(Instance)).all()
    for row in rows:
        assert row.source_ae == "ORTHANC"
        orthanc_id = orthanc.post("/tools/lookup", raw=row.sop_instance_uid.encode())[0]["ID"]
        original = split_part10(orthanc.get(f"/instances/{orthanc_id}/file"))[1]
        assert split_part10(node.store.read(row.store_key))[1] == original
    node.close()


def test_pull_names_the_failure_when_the_pacs_does_not_know_the_node(
    make_settings, pacs, tmp_path, capsys
):
    orthanc, _uids = pacs
    settings = make_settings(peers=[orthanc_peer(orthanc)], ae_title="STRANGER")
    config = write_config(settings, tmp_path / "stranger.toml")
    code = main(["--config", str(config), "pull", *DATES, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "ORTHANC aborted the C-FIND" in err
    assert "registered in the PACS's modalities" in err


def test_pull_reports_an_unreachable_pacs(make_settings, tmp_path, capsys):
    from node.settings import Peer
    from tests.peers import free_port

    settings = make_settings(peers=[Peer(name="gone", ae_title="GONE", port=free_port())])
    config = write_config(settings, tmp_path / "gone.toml")
    assert main(["--config", str(config), "pull", "--all-dates", "--no-progress"]) == 2
    assert "association to GONE@127.0.0.1" in capsys.readouterr().err


def test_cget_from_a_pacs_that_does_not_know_the_node_says_so(make_settings, pacs):
    """Orthanc accepts the association, then aborts the C-GET of an unregistered AE."""
    from node.dicom.pull import DimsePuller, PullError
    from node.runtime import build_node

    orthanc, uids = pacs
    settings = make_settings(peers=[orthanc_peer(orthanc)], ae_title="STRANGER")
    node = build_node(settings, migrate=True)
    try:
        puller = DimsePuller(settings, node.ingestor, settings.peers[0])
        with pytest.raises(PullError, match="ORTHANC aborted the C-GET .*registered"):
            puller.get_study(uids[("TORAX SIMPLE", "ISO_IR 100", "20260110")], lambda: None)
    finally:
        node.close()


def test_cget_into_a_full_store_reports_the_failed_suboperations(make_settings, pacs, tmp_path):
    """Each C-STORE the node cannot keep is answered 0xA700; the pull names the failures."""
    from node.dicom.pull import DimsePuller, PullError
    from node.runtime import build_node
    from tests.peers import fill_tmpfs, tmpfs

    orthanc, uids = pacs
    with tmpfs(tmp_path / "full-store") as store:
        settings = make_settings(peers=[orthanc_peer(orthanc)], store_url=store.as_uri())
        orthanc.add_modality("AINODE", settings.ae_title, "127.0.0.1", settings.dicom_port)
        node = build_node(settings, migrate=True)
        node.store.prepare()
        fill_tmpfs(store)
        try:
            puller = DimsePuller(settings, node.ingestor, settings.peers[0])
            with pytest.raises(PullError, match="3 sub-operations failed"):
                puller.get_study(uids[("TORAX SIMPLE", "ISO_IR 100", "20260110")], lambda: None)
            with node.session_factory() as session:
                assert session.scalars(select(Instance)).all() == []
        finally:
            node.close()


def test_cget_from_a_pacs_that_freezes_mid_study_times_out_and_keeps_what_came(make_settings, pacs):
    """Orthanc stopped (SIGSTOP) after the first instance: the pull gives up after
    network_timeout with a clear error; the instance that arrived is kept."""
    import signal

    from node.dicom.pull import DimsePuller, PullError
    from node.runtime import build_node

    orthanc, uids = pacs
    settings = make_settings(peers=[orthanc_peer(orthanc)], network_timeout=1, dimse_timeout=1)
    orthanc.add_modality("AINODE", settings.ae_title, "127.0.0.1", settings.dicom_port)
    node = build_node(settings, migrate=True)
    arrived = []

    def freeze_pacs() -> None:
        arrived.append(1)
        if len(arrived) == 1:
            orthanc.process.send_signal(signal.SIGSTOP)

    try:
        puller = DimsePuller(settings, node.ingestor, settings.peers[0])
        with pytest.raises(PullError, match="ORTHANC said nothing for 1 s"):
            puller.get_study(uids[("TORAX SIMPLE", "ISO_IR 100", "20260110")], freeze_pacs)
        with node.session_factory() as session:
            assert len(session.scalars(select(Instance)).all()) == 1
    finally:
        orthanc.process.send_signal(signal.SIGCONT)
        node.close()


def test_ctrl_c_during_cget_cancels_and_keeps_what_came(make_settings, pacs, caplog):
    """Ctrl-C mid-study: the PACS is sent C-CANCEL, the association aborted, and what was
    stored before the interrupt stays stored."""
    import logging

    from node.dicom.pull import DimsePuller
    from node.runtime import build_node

    caplog.set_level(logging.WARNING, logger="node.dicom.pull")
    orthanc, uids = pacs
    settings = make_settings(peers=[orthanc_peer(orthanc)])
    orthanc.add_modality("AINODE", settings.ae_title, "127.0.0.1", settings.dicom_port)
    node = build_node(settings, migrate=True)

    def interrupt() -> None:
        raise KeyboardInterrupt

    try:
        puller = DimsePuller(settings, node.ingestor, settings.peers[0])
        with pytest.raises(KeyboardInterrupt):
            puller.get_study(uids[("TORAX SIMPLE", "ISO_IR 100", "20260110")], interrupt)
        with node.session_factory() as session:
            assert len(session.scalars(select(Instance)).all()) == 1
    finally:
        node.close()
    assert any("sending C-CANCEL" in r.getMessage() for r in caplog.records)


def test_cget_reports_the_pacs_pending_counts(make_settings, pacs):
    """The PACS's pending responses (sub-operations remaining) reach the progress bar."""
    from node.dicom.pull import DimsePuller
    from node.runtime import build_node

    orthanc, uids = pacs
    settings = make_settings(peers=[orthanc_peer(orthanc)])
    orthanc.add_modality("AINODE", settings.ae_title, "127.0.0.1", settings.dicom_port)
    node = build_node(settings, migrate=True)
    stored, remaining = [], []
    try:
        puller = DimsePuller(settings, node.ingestor, settings.peers[0])
        uid = uids[("TORAX SIMPLE", "ISO_IR 100", "20260110")]
        puller.get_study(uid, lambda: stored.append(1), remaining.append)
    finally:
        node.close()
    assert len(stored) == 3
    assert remaining == sorted(remaining, reverse=True) and remaining[0] == 2
