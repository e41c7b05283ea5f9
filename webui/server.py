"""The web UI's production WSGI server (waitress), run beside the SCP by ``ainode serve``."""

from __future__ import annotations

import logging
import threading

from waitress.server import create_server

from node.runtime import Node
from node.settings import Settings

log = logging.getLogger(__name__)


class WebServer:
    """Waitress serving the web UI in a background thread."""

    def __init__(self, settings: Settings, node: Node) -> None:
        from webui import create_app

        self.app = create_app(settings, node=node)
        self._server = create_server(
            self.app,
            host=settings.web_host,
            port=settings.web_port,
            threads=settings.web_threads,
            ident="ainode",
            **proxy_options(settings),
        )
        self.port = self._server.effective_port
        self._thread = threading.Thread(target=self._server.run, name="web-ui", daemon=True)

    def start(self) -> WebServer:
        self._thread.start()
        log.info("web UI on http://%s:%s/", self._server.effective_host, self.port)
        return self

    def stop(self) -> None:
        self._server.close()
        self._thread.join(10)


def proxy_options(settings: Settings) -> dict:
    """Waitress's proxy settings: X-Forwarded-For is believed only from
    ``web_trusted_proxy`` (then ``request.remote_addr`` is the client behind it, as audited
    and throttled); from anyone else waitress drops it."""
    if not settings.web_trusted_proxy:
        return {"clear_untrusted_proxy_headers": True}
    return {
        "trusted_proxy": settings.web_trusted_proxy,
        "trusted_proxy_count": 1,
        "trusted_proxy_headers": {"x-forwarded-for", "x-forwarded-proto"},
        "clear_untrusted_proxy_headers": True,
    }
