"""One small HTTP endpoint per service: ``/metrics`` (Prometheus) and ``/healthz`` (JSON, 200 or 503)."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("osad.http")


class StatusServer:
    """Serve ``/metrics`` and ``/healthz`` on ``port``, or, when it is taken, on the first free one of the
    ``span`` ports from it upward (replicas that share one host network: compose ``network_mode: host``).
    The port actually served is ``self.port``, and is written to ``port_file`` when one is given (the
    images' healthcheck reads it, so a replica checks itself, not a neighbour on the next port)."""

    def __init__(self, port: int, metrics, health: Callable[[], tuple[bool, dict]], host: str = "0.0.0.0",
                 span: int = 1, port_file: str | None = None):
        self.port, self.host, self.metrics, self.health = port, host, metrics, health
        self.span, self.port_file = max(1, span), port_file
        self.httpd: ThreadingHTTPServer | None = None

    def start(self) -> "StatusServer":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path.startswith("/metrics"):
                    body, ctype, code = generate_latest(outer.metrics.registry), CONTENT_TYPE_LATEST, 200
                elif self.path.startswith("/healthz"):
                    ok, info = outer.health()
                    body, ctype, code = json.dumps(info).encode(), "application/json", 200 if ok else 503
                else:
                    body, ctype, code = b"osad: try /metrics or /healthz\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        first, err = self.port, None
        for port in range(first, first + self.span):
            try:
                self.httpd = ThreadingHTTPServer((self.host, port), Handler)
                self.port = port
                break
            except OSError as e:
                err = e
        if self.httpd is None:
            where = f"port {first}" if self.span == 1 else f"ports {first}-{first + self.span - 1}"
            raise OSError(f"cannot serve metrics on {where}: {err}; choose another with --metrics-port "
                          "(or allow more with --metrics-port-span)") from None
        if self.port_file:
            Path(self.port_file).write_text(f"{self.port}\n")
        threading.Thread(target=self.httpd.serve_forever, name="osad-status", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", self.host, self.port)
        return self

    def stop(self) -> None:
        if self.port_file:
            Path(self.port_file).unlink(missing_ok=True)
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
