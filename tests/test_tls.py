"""DICOM TLS (PS3.15 B.1/B.2): the node's SCP behind TLS, and the node as a TLS client.

Certificates come from a throw-away CA (trustme), RSA as most PACS use, written as the PEM
files an administrator would put on the node.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from node.dicom.network import client_tls_args
from node.dicom.scp import start_scp
from node.records.db import Instance
from node.runtime import build_node
from node.settings import Peer
from tests.config import write_config
from tests.peers import LOOPBACK, free_port, start_orthanc, storescu


@dataclass(frozen=True)
class Pki:
    """PEM files: a hospital CA, what it signed, and a CA nobody here trusts."""

    ca: Path  # the CA certificate that signs the node's and the peers' certificates
    node_cert: Path  # the node's (or a test SCP's) certificate, for 127.0.0.1 and localhost
    node_key: Path
    client_cert: Path  # a sending PACS's certificate
    client_key: Path
    stranger_ca: Path  # another CA
    stranger_cert: Path  # a client certificate the other CA signed
    stranger_key: Path
    other_host_cert: Path  # signed by the CA, for pacs.example only (not 127.0.0.1)
    other_host_key: Path


def _write_leaf(cert: trustme.LeafCert, folder: Path, name: str) -> tuple[Path, Path]:
    crt, key = folder / f"{name}.crt", folder / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(crt))
    cert.private_key_pem.write_to_path(str(key))
    return crt, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    rsa = trustme.KeyType.RSA
    ca = trustme.CA(organization_name="Hospital PACS CA", key_type=rsa)
    stranger = trustme.CA(organization_name="Somebody Else's CA", key_type=rsa)
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    stranger.cert_pem.write_to_path(str(folder / "stranger-ca.pem"))
    node_cert, node_key = _write_leaf(
        ca.issue_cert(LOOPBACK, "localhost", key_type=rsa), folder, "node"
    )
    client_cert, client_key = _write_leaf(
        ca.issue_cert("storescu.test", key_type=rsa), folder, "client"
    )
    stranger_cert, stranger_key = _write_leaf(
        stranger.issue_cert("storescu.test", key_type=rsa), folder, "stranger"
    )
    other_host_cert, other_host_key = _write_leaf(
        ca.issue_cert("pacs.example", key_type=rsa), folder, "other-host"
    )
    return Pki(
        ca=folder / "ca.pem",
        node_cert=node_cert,
        node_key=node_key,
        client_cert=client_cert,
        client_key=client_key,
        stranger_ca=folder / "stranger-ca.pem",
        stranger_cert=stranger_cert,
        stranger_key=stranger_key,
        other_host_cert=other_host_cert,
        other_host_key=other_host_key,
    )


def tls_settings(make_settings, pki, **overrides):
    """Node settings for an SCP on DICOM TLS that requires a client certificate from the CA.

    acse_timeout is short because a connection whose TLS handshake fails lingers in the
    node's SCP until acse_timeout (see test_failed_handshakes_do_not_hold_pending_slots)
    and shutdown waits up to 5 s for it.
    """
    values = {
        "tls_certificate": pki.node_cert,
        "tls_private_key": pki.node_key,
        "tls_ca_bundle": pki.ca,
        "tls_require_client_certificate": True,
        "acse_timeout": 1,
    }
    return make_settings(**{**values, **overrides})


@contextlib.contextmanager
def running_scp(settings) -> Iterator:
    node = build_node(settings, migrate=True)
    server = start_scp(settings, node.ingestor)
    try:
        yield node
    finally:
        server.shutdown()
        node.close()


@pytest.fixture
def tls_scp(make_settings, pki) -> Iterator:
    """The node's SCP on DICOM TLS, requiring a client certificate signed by the CA."""
    with running_scp(tls_settings(make_settings, pki)) as node:
        yield node


def stored_uids(node) -> set[str]:
    with node.session_factory() as session:
        return set(session.scalars(select(Instance.sop_instance_uid)))


def uids(files: list[Path]) -> set[str]:
    return {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}


def client_context(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A pynetdicom SCU's TLS context trusting the CA, presenting ``cert`` if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def echo_association(port: int, context: ssl.SSLContext):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    return ae.associate(LOOPBACK, port, ae_title="AINODE", tls_args=(context, LOOPBACK))


# --------------------------------------------------------------------------------------------
# The node's SCP on TLS
# --------------------------------------------------------------------------------------------


def test_dcmtk_tls_push_with_client_certificate_is_stored(tls_scp, pki, chest_series):
    files = chest_series[1][:3]
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    result = storescu(LOOPBACK, tls_scp.settings.dicom_port, files, extra=tls, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert stored_uids(tls_scp) == uids(files)
    with tls_scp.session_factory() as session:
        assert {i.source_ae for i in session.scalars(select(Instance))} == {"STORESCU"}


def test_pynetdicom_echo_with_client_certificate(tls_scp, pki):
    context = client_context(pki, pki.client_cert, pki.client_key)
    assoc = echo_association(tls_scp.settings.dicom_port, context)
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000


def test_node_own_client_tls_args_reach_its_tls_scp(tls_scp, pki):
    """client_tls_args (what pull, report and echo use) presents the node's certificate."""
    peer = Peer(name="self", ae_title="AINODE", port=tls_scp.settings.dicom_port, tls=True)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        LOOPBACK,
        peer.port,
        ae_title=peer.ae_title,
        tls_args=client_tls_args(tls_scp.settings, peer),
    )
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


@pytest.mark.parametrize("client", ["no-certificate", "other-ca"])
def test_client_without_a_trusted_certificate_is_refused(tls_scp, pki, caplog, client):
    """What the sender sees: its TLS handshake seems to succeed (TLS 1.3 checks the client
    certificate after it), then the node's alert "certificate required" / "unknown ca"
    aborts the association before any A-ASSOCIATE-AC: pynetdicom logs
    ``[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]`` (or ``TLSV1_ALERT_UNKNOWN_CA``) and
    "Association Aborted"; ``assoc.is_established`` is False."""
    cert, key = {
        "no-certificate": (None, None),
        "other-ca": (pki.stranger_cert, pki.stranger_key),
    }[client]
    assoc = echo_association(tls_scp.settings.dicom_port, client_context(pki, cert, key))
    assert not assoc.is_established
    assert assoc.is_aborted
    alert = {
        "no-certificate": "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "other-ca": "TLSV1_ALERT_UNKNOWN_CA",
    }[client]
    seen = [r.getMessage() for r in caplog.records if r.name.startswith("pynetdicom")]
    assert any(alert in line for line in seen), seen


def test_dcmtk_without_certificate_and_plain_tcp_are_refused_and_store_nothing(
    tls_scp, pki, chest_series
):
    """DCMTK says "Association Request Failed: 0006:0317 Peer aborted Association (or never
    connected)" for both a plain TCP push to the TLS port and an anonymous TLS one (+tla)."""
    files = chest_series[1][:3]
    port = tls_scp.settings.dicom_port
    plain = storescu(LOOPBACK, port, files, timeout=30)
    anonymous = storescu(LOOPBACK, port, files, extra=["+tla", "+cf", str(pki.ca)], timeout=30)
    for result in (plain, anonymous):
        assert result.returncode != 0
        assert "Association Request Failed" in result.stdout + result.stderr
    assert stored_uids(tls_scp) == set()
    assert not [p for p in tls_scp.store.root.rglob("*") if p.is_file()]


def test_dcmtk_rejects_a_node_certificate_it_does_not_trust(tls_scp, pki, chest_series):
    """The sender checks the node too: a CA that did not sign the node's certificate fails."""
    files = chest_series[1][:1]
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.stranger_ca)]
    result = storescu(LOOPBACK, tls_scp.settings.dicom_port, files, extra=tls, timeout=30)
    assert result.returncode != 0
    assert stored_uids(tls_scp) == set()


def test_failed_handshakes_do_not_hold_pending_slots(make_settings, pki):
    """Two refused clients must not lock a PACS with a good certificate out of a node
    allowing two connections that have not yet associated."""
    settings = tls_settings(make_settings, pki, max_pending_connections=2, acse_timeout=3)
    with running_scp(settings) as node:
        port = node.settings.dicom_port
        for _ in range(2):
            assert not echo_association(port, client_context(pki, None, None)).is_established
        time.sleep(0.5)  # the node has seen both connections close
        good = client_context(pki, pki.client_cert, pki.client_key)
        assoc = echo_association(port, good)
        established = assoc.is_established
        if established:
            assoc.release()
    assert established


# --------------------------------------------------------------------------------------------
# The node as TLS client: `ainode echo`
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tls_pacs(pki, cert: Path, key: Path) -> Iterator[int]:
    """A pynetdicom Verification SCP on DICOM TLS that requires a client certificate
    signed by the CA; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(cert, key)
    ae = AE(ae_title="TLSPACS")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server((LOOPBACK, port), block=False, ssl_context=context)
    try:
        yield port
    finally:
        server.shutdown()


def echo_config(make_settings, pki, tmp_path, port: int, *, peer_ca, node_ca=None) -> Path:
    """The node's TOML: its own certificate (the PACS requires one) and the PACS as a TLS
    peer whose certificate ``peer_ca`` (else the node's ``tls_ca_bundle``) must have signed."""
    settings = make_settings(
        tls_certificate=pki.client_cert,
        tls_private_key=pki.client_key,
        tls_ca_bundle=node_ca,
        peers=[
            Peer(
                name="pacs",
                ae_title="TLSPACS",
                host=LOOPBACK,
                port=port,
                tls=True,
                tls_ca_bundle=peer_ca,
            )
        ],
    )
    return write_config(settings, tmp_path / "ainode.toml")


@pytest.mark.parametrize("bundle", ["peer", "node"])
def test_node_echo_over_tls(make_settings, pki, tmp_path, capsys, bundle):
    """The PACS's CA comes from the peer's tls_ca_bundle, else from the node's."""
    from ainode.cli import main

    cas = {"peer": {"peer_ca": pki.ca}, "node": {"peer_ca": None, "node_ca": pki.ca}}[bundle]
    with tls_pacs(pki, pki.node_cert, pki.node_key) as port:
        config = echo_config(make_settings, pki, tmp_path, port, **cas)
        assert main(["--config", str(config), "echo"]) == 0
    assert f"C-ECHO TLSPACS@127.0.0.1:{port}: success" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("pacs", "reason"),
    [
        ("signed-by-another-ca", "certificate verify failed"),
        ("issued-for-another-host", "IP address mismatch"),
    ],
)
def test_node_echo_to_an_untrusted_pacs_fails(
    make_settings, pki, tmp_path, capsys, caplog, pacs, reason
):
    """Exit code 2; stderr ends ``ainode: association to TLSPACS@127.0.0.1:PORT failed``
    and, above it, pynetdicom's ERROR lines give the reason (``TCP Initialisation Error:
    [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ...``, then a traceback).
    Here they go to caplog, as pytest owns the root logger."""
    from ainode.cli import main

    if pacs == "signed-by-another-ca":
        cert, key, peer_ca = pki.node_cert, pki.node_key, pki.stranger_ca
    else:  # the peer's host (127.0.0.1) is not in the certificate
        cert, key, peer_ca = pki.other_host_cert, pki.other_host_key, pki.ca
    with tls_pacs(pki, cert, key) as port:
        config = echo_config(make_settings, pki, tmp_path, port, peer_ca=peer_ca)
        assert main(["--config", str(config), "echo"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"ainode: association to TLSPACS@127.0.0.1:{port} failed\n"
    errors = [r.getMessage() for r in caplog.records if r.name == "pynetdicom.transport"]
    assert any("CERTIFICATE_VERIFY_FAILED" in e and reason in e for e in errors), errors


# --------------------------------------------------------------------------------------------
# Orthanc, both ways, with the settings the README gives
# --------------------------------------------------------------------------------------------


def test_orthanc_tls_push_to_the_node_and_node_echo_to_orthanc(
    make_settings, pki, tmp_path, chest_series, capsys
):
    from ainode.cli import main

    orthanc = start_orthanc(
        tmp_path / "orthanc",
        aet="ORTHANC",
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.node_cert),  # any CA-signed cert for 127.0.0.1
            "DicomTlsPrivateKey": str(pki.node_key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    try:
        peer = Peer(name="pacs", ae_title="ORTHANC", port=orthanc.dicom_port, tls=True)
        settings = tls_settings(make_settings, pki, peers=[peer])
        with running_scp(settings) as node:
            files = chest_series[1][:3]
            for path in files:
                orthanc.upload(path)
            orthanc.put(
                "/modalities/AINODE",
                {
                    "AET": "AINODE",
                    "Host": LOOPBACK,
                    "Port": settings.dicom_port,
                    "UseDicomTls": True,
                },
            )
            orthanc.store_to_modality("AINODE", orthanc.studies())
            assert stored_uids(node) == uids(files)

            config = write_config(settings, tmp_path / "ainode.toml")
            assert main(["--config", str(config), "echo"]) == 0
    finally:
        orthanc.stop(kill=True)
    assert f"C-ECHO ORTHANC@127.0.0.1:{orthanc.dicom_port}: success" in capsys.readouterr().out
