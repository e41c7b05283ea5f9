"""Fixtures: node settings on free ports, a running node SCP, Orthanc, PostgreSQL, phantoms."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from node import phantom
from node.dicom.scp import start_scp
from node.runtime import Node, build_node
from node.settings import Peer, Settings
from tests.peers import OrthancServer, PostgresServer, free_port, start_orthanc, start_postgres

pytest_plugins = ["tests.webui"]  # web UI app and signed-in client fixtures

TEST_CALLING_AES = ["STORESCU", "TESTSCU", "ECHOSCU", "ORTHANC"]


@pytest.fixture(autouse=True)
def _default_data_dir(tmp_path, monkeypatch) -> Path:
    """The default data folder (commands run without settings) is the test's own, never the
    home folder's: a database left there by one test (or by the user) changes what another
    sees."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.delenv("AINODE_DATA_DIR", raising=False)
    return tmp_path / "xdg-data" / "ainode"


@pytest.fixture(scope="session")
def postgres(tmp_path_factory) -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the whole session."""
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> Iterator[str]:
    """Each database test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ainode.db'}"
        return
    server = request.getfixturevalue("postgres")
    name = f"ainode_{request.node.name}".lower()
    name = "".join(ch if ch.isalnum() else "_" for ch in name)[:60]
    yield server.create_database(name)
    server.drop_database(name)


@pytest.fixture
def make_settings(tmp_path):
    """Build node settings on a free loopback port in a fresh data folder."""

    def build(**overrides) -> Settings:
        values = {
            "data_dir": tmp_path / "data",
            "dicom_host": "127.0.0.1",
            "dicom_port": free_port(),
            "allowed_calling_aes": TEST_CALLING_AES,
            "min_free_disk_mb": 0,
            "study_stable_seconds": 2,
            "web_port": 0,  # the web UI tests choose their own port
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
def make_node(make_settings):
    """Build nodes (migrated) from ``make_settings(**overrides)``; closed after the test."""
    built = []

    def make(**overrides) -> Node:
        node = build_node(make_settings(**overrides), migrate=True)
        built.append(node)
        return node

    yield make
    for node in built:
        node.close()


@pytest.fixture
def settings(make_settings) -> Settings:
    """Default node settings for a test."""
    return make_settings()


@pytest.fixture
def node(settings) -> Iterator[Node]:
    """A migrated node (database and store), not listening."""
    built = build_node(settings, migrate=True)
    yield built
    built.close()


@pytest.fixture
def scp(node) -> Iterator[Node]:
    """The node with its storage SCP listening on ``node.settings.dicom_port``."""
    server = start_scp(node.settings, node.ingestor)
    yield node
    server.shutdown()


@pytest.fixture
def orthanc(tmp_path) -> Iterator[OrthancServer]:
    """A fresh Orthanc PACS (with DICOMweb) for one test."""
    server = start_orthanc(tmp_path / "orthanc", aet="ORTHANC")
    yield server
    server.stop(kill=True)


def orthanc_peer(server: OrthancServer) -> Peer:
    """The node's peer entry for an Orthanc server."""
    return Peer(
        name="pacs",
        ae_title=server.aet,
        host="127.0.0.1",
        port=server.dicom_port,
        dicomweb_url=server.dicomweb_url,
    )


@pytest.fixture(scope="session")
def chest_series(tmp_path_factory) -> tuple[phantom.PhantomSpec, list[Path]]:
    """A 60-slice COVID phantom study, written once per session."""
    spec = phantom.PhantomSpec(finding="covid", slices=60, seed=7)
    folder = tmp_path_factory.mktemp("chest60")
    return spec, phantom.write_series(spec, folder)


@pytest.fixture(scope="session")
def format1_bundle_dir(tmp_path_factory) -> Path:
    """The shipped demo bundle as a bundle of format 1 (made before calibration, operating
    point, OOD statistics and gate data existed): the same model, model.json without them."""
    import json
    import shutil

    from node.settings import DEMO_MODEL_DIR

    folder = tmp_path_factory.mktemp("format1") / "bundle"
    folder.mkdir()
    shutil.copy2(DEMO_MODEL_DIR / "model.keras", folder / "model.keras")
    info = json.loads((DEMO_MODEL_DIR / "model.json").read_text(encoding="utf-8"))
    for key in ("format_version", "calibration", "operating_point", "ood", "gate"):
        info.pop(key, None)
    (folder / "model.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def _quiet_pynetdicom():
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
