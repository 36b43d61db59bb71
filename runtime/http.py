"""One small HTTP endpoint per service: ``/metrics`` (Prometheus) and ``/healthz`` (JSON, 200 or 503)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("osad.http")


class StatusServer:
    def __init__(self, port: int, metrics, health: Callable[[], tuple[bool, dict]], host: str = "0.0.0.0"):
        self.port, self.host, self.metrics, self.health = port, host, metrics, health
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

        try:
            self.httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as e:
            raise OSError(f"cannot serve metrics on port {self.port}: {e}; choose another with --metrics-port") from None
        threading.Thread(target=self.httpd.serve_forever, name="osad-status", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", self.host, self.port)
        return self

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
