"""Thin helpers over kafka-python: producers, consumers and topic creation, configured one way.

Everything that talks to Kafka goes through here, so client settings live in one place: each helper
takes ``security`` (a :class:`~osad.runtime.config.KafkaSecurity`, or a :class:`KafkaConfig`, whose
``security`` is used; None: plaintext), and :func:`client_options` turns it into the keyword arguments
every kafka-python client osad makes is given (TLS, SASL).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pydantic import BaseModel

from osad.schemas import ALL_TOPICS, Topic, encode
from osad.schemas.wire import MAX_MESSAGE_BYTES  # noqa: F401  (re-exported: the clients' limit)

from .config import ConfigError, KafkaConfig, KafkaSecurity, read_secret

log = logging.getLogger("osad.kafka")

# Largest message we produce (a SignatureWindow of ~150 features is ~1 MB).


class BrokerUnavailable(RuntimeError):
    """No Kafka broker answered at the bootstrap address."""


def _bootstrap_list(bootstrap: str) -> list[str]:
    return [b.strip() for b in bootstrap.split(",") if b.strip()]


def client_options(security: KafkaSecurity | KafkaConfig | None) -> dict[str, Any]:
    """The kafka-python keyword arguments (``security_protocol``, ``ssl_*``, ``sasl_*``) for ``security``;
    every client osad makes gets them. Passwords named by a file are read from it now.

    >>> client_options(None)
    {'security_protocol': 'PLAINTEXT'}
    >>> client_options(KafkaSecurity(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
    ...                              sasl_username="osad", sasl_password="pw"))  # doctest: +NORMALIZE_WHITESPACE
    {'security_protocol': 'SASL_PLAINTEXT', 'sasl_mechanism': 'SCRAM-SHA-512', 'sasl_plain_username': 'osad',
     'sasl_plain_password': 'pw'}
    """
    if isinstance(security, KafkaConfig):
        security = security.security
    if security is None:
        security = KafkaSecurity()
    out: dict[str, Any] = {"security_protocol": security.security_protocol}
    if security.uses_tls:
        out["ssl_check_hostname"] = security.ssl_check_hostname
        if security.ssl_ca_file:
            out["ssl_cafile"] = security.ssl_ca_file
        if security.ssl_cert_file:
            out["ssl_certfile"] = security.ssl_cert_file
            out["ssl_keyfile"] = security.ssl_key_file
        password = _secret(security, "ssl_key_password")
        if password:
            out["ssl_password"] = password
    if security.uses_sasl:
        out["sasl_mechanism"] = security.sasl_mechanism
        out["sasl_plain_username"] = security.sasl_username
        out["sasl_plain_password"] = _secret(security, "sasl_password")
    return out


def _secret(security: KafkaSecurity, name: str) -> str:
    path = getattr(security, name + "_file")
    if not path:
        return getattr(security, name)
    try:
        return read_secret(path)
    except OSError as e:
        raise ConfigError(f"{security._where(name + '_file')} = {path!r}: cannot read it: {e.strerror}") from None


def _connect(make, bootstrap: str, timeout_s: float, options: dict[str, Any] | None = None):
    """Create a client; kafka-python waits up to ``bootstrap_timeout_ms`` for a broker to answer."""
    from kafka.errors import KafkaTimeoutError

    protocol = (options or {}).get("security_protocol", "PLAINTEXT")
    try:
        return make(int(timeout_s * 1000))
    except KafkaTimeoutError:
        hint = ("; a broker that wants TLS or SASL does not answer a plaintext client: see --security-protocol"
                if protocol == "PLAINTEXT" else
                f"; with --security-protocol {protocol} check the CA, the client certificate and the SASL "
                "credentials too (a failed TLS handshake or login looks the same)")
        raise BrokerUnavailable(
            f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f} s; start one "
            f"(`osad broker`, or `docker compose up kafka`) or set --bootstrap / OSAD_BOOTSTRAP{hint}"
        ) from None


#: how long a produced message may wait for the broker (an outage) before its send fails: long enough for a
#: broker restart or a network cut of minutes; a service whose outputs fail restarts from its committed offsets
DELIVERY_TIMEOUT_S = 600.0


def make_producer(bootstrap: str, client_id: str, *, linger_ms: int = 5, connect_timeout_s: float = 30.0,
                  security: KafkaSecurity | KafkaConfig | None = None, delivery_timeout_s: float = DELIVERY_TIMEOUT_S,
                  max_block_s: float = 60.0):
    """A producer that keeps per-key order and retries through broker outages (up to ``delivery_timeout_s``).

    Idempotence is off on purpose: an idempotent producer whose broker restarted without its state (the
    embedded memory-only broker) gets a fatal ``UnknownProducerIdError`` and never sends again; osad's outputs
    carry ids that make a repeat harmless, and one request in flight per connection keeps the order."""
    from kafka import KafkaProducer

    opts = client_options(security)
    return _connect(
        lambda t: KafkaProducer(
            bootstrap_servers=_bootstrap_list(bootstrap),
            client_id=client_id,
            acks="all",
            linger_ms=linger_ms,
            retries=2**31 - 1,  # retry until delivery_timeout_ms
            enable_idempotence=False,
            delivery_timeout_ms=int(delivery_timeout_s * 1000),
            request_timeout_ms=30_000,
            max_block_ms=int(max_block_s * 1000),
            reconnect_backoff_max_ms=2_000,  # notice a broker that is back within 2 s
            max_in_flight_requests_per_connection=1,  # keep per-key order across retries
            max_request_size=MAX_MESSAGE_BYTES,
            batch_size=256 * 1024,
            bootstrap_timeout_ms=t,
            **opts,
        ),
        bootstrap, connect_timeout_s, opts,
    )


def make_consumer(bootstrap: str, client_id: str, group_id: str | None, *, max_poll_records: int = 500,
                  max_poll_interval_ms: int = 60_000, session_timeout_ms: int = 10_000,
                  connect_timeout_s: float = 30.0, auto_offset_reset: str = "earliest",
                  security: KafkaSecurity | KafkaConfig | None = None):
    from kafka import KafkaConsumer

    opts = client_options(security)
    return _connect(
        lambda t: KafkaConsumer(
            bootstrap_servers=_bootstrap_list(bootstrap),
            client_id=client_id,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            max_poll_records=max_poll_records,
            max_poll_interval_ms=max_poll_interval_ms,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=min(3000, session_timeout_ms // 3),
            fetch_max_bytes=64 * 1024 * 1024,
            reconnect_backoff_max_ms=2_000,
            max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
            bootstrap_timeout_ms=t,
            **opts,
        ),
        bootstrap, connect_timeout_s, opts,
    )


def ensure_topics(bootstrap: str, topics: tuple[Topic, ...] = ALL_TOPICS, partitions: dict[str, int] | None = None,
                  connect_timeout_s: float = 30.0, prefix: str = "",
                  security: KafkaSecurity | KafkaConfig | None = None) -> list[str]:
    """Create the topics that do not exist yet (idempotent). Returns the names created."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    opts = client_options(security)
    admin = _connect(lambda t: KafkaAdminClient(bootstrap_servers=_bootstrap_list(bootstrap), client_id="osad-admin",
                                                bootstrap_timeout_ms=t, **opts), bootstrap, connect_timeout_s, opts)
    try:
        existing = set(admin.list_topics())
        new = []
        for t in topics:
            name = t.full_name(prefix)
            if name in existing:
                continue
            n = (partitions or {}).get(t.name, t.default_partitions)
            new.append(NewTopic(name, num_partitions=n, replication_factor=1))
        created = []
        for nt in new:
            try:
                admin.create_topics([nt])
                created.append(nt.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics: %s", ", ".join(created))
        return created
    finally:
        admin.close()


class PublishError(RuntimeError):
    """A produced message was not acknowledged by the broker."""


class Publisher:
    """Publishes osad messages, keyed by entity id, with at-least-once acknowledgement.

    >>> # pub = Publisher("127.0.0.1:9092", "collector"); pub.publish(SAMPLES, sample); pub.flush()
    """

    def __init__(self, bootstrap: str, client_id: str, producer=None, prefix: str = "",
                 security: KafkaSecurity | KafkaConfig | None = None):
        self.producer = producer or make_producer(bootstrap, client_id, security=security)
        self.prefix = prefix  # the topic prefix of this installation
        self.sent = 0
        self._pending: list = []

    def publish(self, topic: Topic, msg: BaseModel, key: str | None = None, headers=None):
        k = key if key is not None else getattr(msg, "entity_id", None)
        fut = self.producer.send(topic.full_name(self.prefix), key=k.encode() if k else None, value=encode(msg),
                                 headers=headers)
        self.sent += 1
        self._pending.append(fut)
        return fut

    def publish_raw(self, topic_name: str, key: bytes | None, value: bytes | None, headers=None):
        fut = self.producer.send(topic_name, key=key, value=value, headers=headers)
        self._pending.append(fut)
        return fut

    def flush(self, timeout_s: float | None = 60.0) -> None:
        """Wait until every message sent so far is acknowledged; raise if any was not."""
        self.producer.flush(timeout=timeout_s)
        pending, self._pending = self._pending, []
        for fut in pending:
            if fut.failed():
                raise PublishError(f"the broker did not accept a message: {fut.exception!r}")

    def try_flush(self, timeout_s: float) -> bool:
        """Like :meth:`flush`, but a broker that does not acknowledge within ``timeout_s`` (an outage) is not an
        error: False, and the messages stay queued in the producer (it retries them until their delivery
        timeout). Raises :class:`PublishError` if a message failed."""
        from kafka.errors import KafkaTimeoutError

        try:
            self.flush(timeout_s)
        except KafkaTimeoutError:
            self._pending = [f for f in self._pending if not f.succeeded()]
            for fut in self._pending:
                if fut.failed():
                    raise PublishError(f"the broker did not accept a message: {fut.exception!r}") from None
            return False
        return True

    @property
    def unacknowledged(self) -> int:
        """Messages sent since the last flush that the broker has not acknowledged yet (an upper bound)."""
        return len(self._pending)

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout_s``) and close. Messages the broker has not acknowledged by then
        are abandoned with a warning: their inputs were not committed, so they are made again after a restart."""
        from kafka.errors import KafkaTimeoutError

        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaTimeoutError:
            log.warning("the broker did not acknowledge %d messages within %.0f s of stopping; abandoning them (their "
                        "inputs are not committed and will be processed again)", self.unacknowledged, timeout_s)
        finally:
            self.producer.close(timeout=timeout_s)


class BufferedSender:
    """Publishes to one topic from a thread of its own, so that its caller never waits for Kafka: the
    collector's way to survive broker outages without losing Samples.

    :meth:`send` appends an encoded message to an in-memory queue and returns at once. The thread hands
    queued messages to a producer in order, at most ``max_in_flight`` unacknowledged at a time, and the
    producer retries them until the broker takes them; no send ever times out, so nothing is reordered
    (a consumer that drops late messages, as the featurizer does, would otherwise lose them). While the
    broker is unreachable the queue grows, up to ``buffer_bytes``; past that, the oldest messages not yet
    handed to the producer are dropped and counted (``counts["dropped_buffer_full"]``). The producer is
    made by the thread, so the owner may start while the broker is down (it is retried every few seconds).

    ``counts``: ``sent`` (acknowledged), ``dropped_buffer_full``, ``dropped_rejected`` (the broker refused a
    message for good), ``dropped_at_exit`` (still queued when :meth:`close` gave up); :attr:`buffered`,
    :attr:`buffered_bytes`, :attr:`outage_s` (seconds the oldest message has waited without an
    acknowledgement once that exceeds ``outage_after_s``; 0 otherwise).
    """

    def __init__(self, bootstrap: str, client_id: str, topic: str, *, security=None, buffer_bytes: int = 64 << 20,
                 max_in_flight: int = 2000, outage_after_s: float = 5.0, make=None, ensure=None,
                 warn_every_s: float = 30.0, clock=time.monotonic):
        import collections

        self.bootstrap, self.client_id, self.topic, self.security = bootstrap, client_id, topic, security
        self.buffer_bytes, self.max_in_flight = int(buffer_bytes), int(max_in_flight)
        self.outage_after_s, self.warn_every_s, self.clock = outage_after_s, warn_every_s, clock
        self._make = make or (lambda: make_producer(bootstrap, client_id, security=security, connect_timeout_s=5.0,
                                                    max_block_s=2.0, delivery_timeout_s=365 * 86400.0))
        self._ensure = ensure  # called (no arguments) before the first send and when the broker seems back
        self.counts: collections.Counter = collections.Counter()
        self._queue: collections.deque = collections.deque()  # (key, value, size, queued at) not yet handed over
        self._flight: collections.deque = collections.deque()  # (future, size, queued at) handed to the producer
        self._bytes = 0
        self._cv = threading.Condition()
        self._closing = False
        self._producer = None
        self._down_since: float | None = None
        self._last_warn = 0.0
        self._thread = threading.Thread(target=self._run, name=f"osad-sender-{topic}", daemon=True)
        self._thread.start()

    # -- caller side -----------------------------------------------------------------------
    def send(self, key: bytes | None, value: bytes) -> None:
        size = len(value) + (len(key) if key else 0) + 64
        with self._cv:
            if self._closing:
                self.counts["dropped_at_exit"] += 1
                return
            self._queue.append((key, value, size, self.clock()))
            self._bytes += size
            while self._bytes > self.buffer_bytes and self._queue:
                _, _, n, _ = self._queue.popleft()
                self._bytes -= n
                self.counts["dropped_buffer_full"] += 1
            self._cv.notify()

    @property
    def buffered(self) -> int:
        with self._cv:
            return len(self._queue) + len(self._flight)

    @property
    def buffered_bytes(self) -> int:
        with self._cv:
            return self._bytes

    @property
    def outage_s(self) -> float:
        with self._cv:
            oldest = self._oldest()
        age = self.clock() - oldest if oldest is not None else 0.0
        return age if age >= self.outage_after_s else 0.0

    def wait_empty(self, timeout_s: float) -> bool:
        """Wait until everything sent so far is acknowledged (or dropped); False on timeout."""
        deadline = self.clock() + timeout_s
        with self._cv:
            while self._queue or self._flight:
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (waiting up to ``timeout_s``), then stop; what is left is counted and logged."""
        self.wait_empty(timeout_s)
        with self._cv:
            self._closing = True
            left = len(self._queue) + len(self._flight)
            self._cv.notify_all()
        self._thread.join(timeout_s)
        if left:
            self.counts["dropped_at_exit"] += left
            log.error("%s: %d messages for %s were still waiting for the broker at %s when the sender stopped; "
                      "they are lost", self.client_id, left, self.topic, self.bootstrap)
        if self._producer is not None:
            try:
                self._producer.close(timeout=1.0)
            except Exception:  # noqa: BLE001 - a broker gone at shutdown
                pass

    # -- the thread ------------------------------------------------------------------------
    def _oldest(self) -> float | None:
        if self._flight:
            return self._flight[0][2]
        if self._queue:
            return self._queue[0][3]
        return None

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cv:
                while not self._closing and not self._queue and not self._flight:
                    self._cv.wait(1.0)
                if self._closing:
                    return
            if self._producer is None and not self._connect():
                self._note_outage()
                self._pause(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.5
            self._hand_over()
            self._collect(wait_s=0.2)
            self._note_outage()

    def _pause(self, s: float) -> None:
        with self._cv:
            if not self._closing:
                self._cv.wait(s)

    def _connect(self) -> bool:
        try:
            if self._ensure is not None:
                self._ensure()
            self._producer = self._make()
            return True
        except Exception as e:  # noqa: BLE001 - BrokerUnavailable, or a broker that is half up
            if not self.counts["connect_failed"]:
                log.warning("%s: %s; buffering messages for %s (up to %.0f MiB) and retrying every few seconds",
                            self.client_id, e, self.topic, self.buffer_bytes / 2**20)
            self.counts["connect_failed"] += 1
            return False

    def _hand_over(self) -> None:
        from kafka.errors import KafkaTimeoutError

        while True:
            with self._cv:
                if not self._queue or len(self._flight) >= self.max_in_flight or self._closing:
                    return
                key, value, size, t = self._queue[0]
            try:
                fut = self._producer.send(self.topic, key=key, value=value)
            except KafkaTimeoutError:  # no metadata for the topic (the broker is away): try again later
                return
            with self._cv:
                if self._queue and self._queue[0][3] == t and self._queue[0][1] is value:
                    self._queue.popleft()
                self._flight.append((fut, size, t))

    def _collect(self, wait_s: float) -> None:
        from kafka.errors import KafkaTimeoutError

        with self._cv:
            head = self._flight[0][0] if self._flight else None
        if head is None:
            return
        if not head.is_done:
            try:
                self._producer.flush(timeout=wait_s)
            except KafkaTimeoutError:
                pass
        with self._cv:
            while self._flight and self._flight[0][0].is_done:
                fut, size, _ = self._flight.popleft()
                self._bytes -= size
                if fut.exception is None:
                    self.counts["sent"] += 1
                else:
                    self.counts["dropped_rejected"] += 1
                    log.error("%s: the broker refused a message for %s for good: %r", self.client_id, self.topic,
                              fut.exception)
            self._cv.notify_all()

    def _note_outage(self) -> None:
        now = self.clock()
        with self._cv:
            oldest = self._oldest()
            waiting, nbytes = len(self._queue) + len(self._flight), self._bytes
        down = oldest is not None and now - oldest >= self.outage_after_s
        if down and self._down_since is None:
            self._down_since = oldest
            self._last_warn = now
            log.warning("%s: the broker at %s has not acknowledged for %.0f s; buffering (%d messages, %.1f of "
                        "%.0f MiB)", self.client_id, self.bootstrap, now - oldest, waiting, nbytes / 2**20,
                        self.buffer_bytes / 2**20)
        elif down and now - self._last_warn >= self.warn_every_s:
            self._last_warn = now
            log.warning("%s: still no broker at %s after %.0f s; %d messages buffered (%.1f of %.0f MiB), %d dropped "
                        "so far because the buffer was full", self.client_id, self.bootstrap, now - self._down_since,
                        waiting, nbytes / 2**20, self.buffer_bytes / 2**20, self.counts["dropped_buffer_full"])
        elif not down and self._down_since is not None:
            log.warning("%s: the broker at %s is back after %.0f s; buffered messages delivered (%d dropped because "
                        "the buffer was full)", self.client_id, self.bootstrap, now - self._down_since,
                        self.counts["dropped_buffer_full"])
            self._down_since = None
