"""Thin helpers over kafka-python: producers, consumers and topic creation, configured one way.

Everything that talks to Kafka goes through here, so client settings live in one place.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

from osad.schemas import ALL_TOPICS, Topic, encode

log = logging.getLogger("osad.kafka")

# Largest message we produce (a SignatureWindow of ~150 features is ~1 MB).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class BrokerUnavailable(RuntimeError):
    """No Kafka broker answered at the bootstrap address."""


def _bootstrap_list(bootstrap: str) -> list[str]:
    return [b.strip() for b in bootstrap.split(",") if b.strip()]


def _connect(make, bootstrap: str, timeout_s: float):
    """Create a client; kafka-python waits up to ``bootstrap_timeout_ms`` for a broker to answer."""
    from kafka.errors import KafkaTimeoutError

    try:
        return make(int(timeout_s * 1000))
    except KafkaTimeoutError:
        raise BrokerUnavailable(
            f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f} s; start one "
            "(`osad broker`, or `docker compose up kafka`) or set --bootstrap / OSAD_BOOTSTRAP"
        ) from None


def make_producer(bootstrap: str, client_id: str, *, linger_ms: int = 5, connect_timeout_s: float = 30.0):
    from kafka import KafkaProducer

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
        ),
        bootstrap, connect_timeout_s,
    )


def make_consumer(bootstrap: str, client_id: str, group_id: str | None, *, max_poll_records: int = 500,
                  max_poll_interval_ms: int = 60_000, session_timeout_ms: int = 10_000,
                  connect_timeout_s: float = 30.0, auto_offset_reset: str = "earliest"):
    from kafka import KafkaConsumer

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
        ),
        bootstrap, connect_timeout_s,
    )


def ensure_topics(bootstrap: str, topics: tuple[Topic, ...] = ALL_TOPICS, partitions: dict[str, int] | None = None,
                  connect_timeout_s: float = 30.0, prefix: str = "") -> list[str]:
    """Create the topics that do not exist yet (idempotent). Returns the names created."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = _connect(lambda t: KafkaAdminClient(bootstrap_servers=_bootstrap_list(bootstrap), client_id="osad-admin",
                                                bootstrap_timeout_ms=t), bootstrap, connect_timeout_s)
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

    def __init__(self, bootstrap: str, client_id: str, producer=None, prefix: str = ""):
        self.producer = producer or make_producer(bootstrap, client_id)
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
