"""The node's pynetdicom Application Entities: one identity, its timeouts, PDU size and TLS.

Every AE the node runs (the Storage SCP, C-FIND, C-GET, C-MOVE, the SR C-STORE,
C-ECHO) is made by :func:`make_ae`, so a PACS sees one implementation class UID
and version name whichever service it talks to, and every association disables
Nagle (DIMSE is request/response: Nagle stalls each message ~40 ms).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from pynetdicom import AE, evt

from node import __version__
from node.settings import Peer, Settings

IMPLEMENTATION_CLASS_UID = (
    "2.25.147690549933150919621629165827312306498"  # a UUID-derived UID (2.25), fixed for ainode
)
IMPLEMENTATION_VERSION_NAME = f"AINODE_{__version__}"[:16]


def make_ae(settings: Settings) -> AE:
    """An AE titled ``settings.ae_title`` with the node's identity, timeouts and PDU size."""
    ae = AE(ae_title=settings.ae_title)
    configure_ae(ae, settings)
    return ae


def configure_ae(ae: AE, settings: Settings) -> None:
    """Give ``ae`` the node's identity, timeouts and maximum PDU size."""
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.connection_timeout = settings.acse_timeout


def handle_conn_open(event: evt.Event) -> None:
    """Disable Nagle on a pynetdicom connection (DIMSE is request/response: Nagle stalls it)."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NAGLE_OFF = (evt.EVT_CONN_OPEN, handle_conn_open)


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The SCP's TLS context (PS3.15 B.1/B.2: TLS 1.2 or newer), or None without a certificate."""
    if settings.tls_certificate is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    if settings.tls_ca_bundle is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca_bundle))
    context.verify_mode = (
        ssl.CERT_REQUIRED if settings.tls_require_client_certificate else ssl.CERT_OPTIONAL
    )
    if settings.tls_ca_bundle is None:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_tls_args(settings: Settings, peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for ``AE.associate`` to ``peer``: None unless the peer is set to TLS.

    The peer's certificate is checked against ``peer.tls_ca_bundle`` (or the node's
    ``tls_ca_bundle``) and its host name; the node presents its own certificate
    when it has one (PACS that require client certificates).
    """
    if not peer.tls:
        return None
    ca_bundle = peer.tls_ca_bundle or settings.tls_ca_bundle
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_bundle) if ca_bundle else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_certificate is not None:
        context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    return context, peer.host


def associate(ae: AE, settings: Settings, peer: Peer, handlers=(), roles=()):
    """Associate ``ae`` with ``peer``: Nagle off, TLS when the peer asks for it."""
    return ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        ext_neg=list(roles) or None,
        evt_handlers=[NAGLE_OFF, *handlers],
        tls_args=client_tls_args(settings, peer),
    )


def peer_label(peer: Peer) -> str:
    """``AE@host:port`` for log lines and errors."""
    return f"{peer.ae_title}@{peer.host}:{peer.port}"


def check_tls_files(settings: Settings) -> None:
    """Raise FileNotFoundError naming a TLS file the settings point to that does not exist."""
    for name in ("tls_certificate", "tls_private_key", "tls_ca_bundle"):
        path: Path | None = getattr(settings, name)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{name} {path} does not exist")
