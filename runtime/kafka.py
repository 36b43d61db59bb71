"""Thin helpers over kafka-python: producers, consumers and topic creation, configured one way.

Everything that talks to Kafka goes through here, so client settings live in one place: each helper
takes ``security`` (a :class:`~osad.runtime.config.KafkaSecurity`, or a :class:`KafkaConfig`, whose
``security`` is used; None: plaintext), and :func:`client_options` turns it into the keyword arguments
every kafka-python client osad makes is given (TLS, SASL).
"""

from __future__ import annotations

import logging
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


def make_producer(bootstrap: str, client_id: str, *, linger_ms: int = 5, connect_timeout_s: float = 30.0,
                  security: KafkaSecurity | KafkaConfig | None = None):
    from kafka import KafkaProducer

    opts = client_options(security)
    return _connect(
        lambda t: KafkaProducer(
            bootstrap_servers=_bootstrap_list(bootstrap),
            client_id=client_id,
            acks="all",
            linger_ms=linger_ms,
            retries=10,
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

    def close(self, timeout_s: float = 10.0) -> None:
        try:
            self.producer.flush(timeout=timeout_s)
        finally:
            self.producer.close(timeout=timeout_s)
