"""The consume -> transform -> produce loop every service runs.

A service is a :class:`Transform`: a pure object that turns one input message into zero or
more output messages. :class:`ServiceRunner` wires it between an input topic and output topics:

* **At-least-once**: input offsets are committed only after every output produced so far is
  acknowledged by the broker. A stateful transform reports, per partition, the oldest input
  offset its state still depends on (:meth:`Transform.retained`); the runner never commits past
  it, so after a crash or restart the state is rebuilt by re-reading those messages (outputs may
  then repeat; they carry ids that make them idempotent downstream).
* **Dead letters**: a message that fails to decode or validate, or whose processing raises, is
  published to the dead-letter topic with its original key and bytes and headers saying why;
  the service goes on.
* **Graceful stop**: SIGTERM/SIGINT finish the batch in hand, flush, commit and close.
* **Observability**: Prometheus metrics (messages in/out, errors, processing latency, consumer
  lag) and a health endpoint, on ``--metrics-port``.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable

from pydantic import BaseModel

from osad.schemas import DEADLETTER, Topic, WireError, decode, encode

from .config import KafkaConfig, KafkaSecurity, ServiceConfig, setup_logging
from .http import StatusServer
from .kafka import Publisher, ensure_topics, make_consumer
from .metrics import ServiceMetrics

log = logging.getLogger("osad.runtime")


@dataclass(frozen=True)
class Output:
    """A message a transform publishes. With ``dead`` = (where it came from, why), ``msg`` is an input the
    transform could not handle after all (e.g. a window that failed in a batch scored from ``tick``): the
    runner dead-letters it, its JSON as the value, with the usual headers (``topic`` is then unused)."""

    topic: Topic
    msg: BaseModel
    key: str | None = None
    dead: "tuple[InputMeta, str] | None" = None


@dataclass(frozen=True)
class InputMeta:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None


class Transform(ABC):
    """A service's logic. Pure apart from its own in-memory state; knows nothing of Kafka."""

    #: name used for the consumer group, metrics and dead-letter headers
    name: str = "service"
    #: the topic it consumes
    input: Topic

    @abstractmethod
    def process(self, msg: BaseModel, meta: InputMeta) -> Iterable[Output]:
        """Handle one decoded input message."""

    def process_batch(self, batch: list[tuple[BaseModel, InputMeta]]) -> Iterable[Output]:
        """Handle the decoded messages of one poll, in order. Override to vectorise; if it raises, the
        runner retries the messages one by one through :meth:`process` (so a transform must tolerate
        seeing a message again: e.g. drop what it already has)."""
        out: list[Output] = []
        for msg, meta in batch:
            out.extend(self.process(msg, meta))
        return out

    def tick(self, now: float) -> Iterable[Output]:
        """Called after each poll (also when idle): flush batches, evict idle state."""
        return ()

    def next_deadline(self) -> float | None:
        """Seconds until :meth:`tick` has something due (e.g. a batch's wait ends), or None. The runner
        polls no longer than that, so a deadline is kept to within a millisecond, not a poll timeout."""
        return None

    def acknowledged(self) -> None:
        """Every output so far is acknowledged by the broker and input offsets are about to be
        committed: persist state that must survive a restart here (then :meth:`retained`)."""

    def retained(self) -> dict[int, int]:
        """Per input partition, the oldest offset the in-memory state still needs (re-read it after a
        restart). Stateless transforms keep nothing."""
        return {}

    def assigned(self, partitions: set[int]) -> None:
        """The partitions this replica now owns (at start, and after each rebalance): their uncommitted input is
        about to be read again, after a crash of this process or of their previous owner. Called on the
        consumer's IO thread: note it, and act in :meth:`process`."""

    def revoke(self, partitions: set[int]) -> Iterable[Output]:
        """The partitions moved to another replica: drop their state (it will rebuild from the
        committed offsets there). May return final outputs."""
        return ()

    def close(self) -> Iterable[Output]:
        """The service is stopping: return anything that must still be published."""
        return ()

    def bind_metrics(self, metrics: ServiceMetrics) -> None:
        """Register the transform's own metrics (optional)."""

    def health(self) -> dict:
        """Extra entries for ``/healthz`` (called on the status server's thread: take no lock a slow write may
        hold). An entry that is a dict with ``"ok": False`` (e.g. ``{"store": {"ok": False, "error": ...}}``)
        makes the status ``degraded``; the answer stays HTTP 200, since a restart cannot cure what such an
        entry reports (a full disk), so a liveness probe must not restart the service for it."""
        return {}


#: a dead letter too large to publish whole (its original near or over the producer's size limit) keeps this much
DEAD_LETTER_KEEP_BYTES = 1024 * 1024


def check_key(key: bytes | None, msg: BaseModel) -> None:
    """Every topic is keyed by the entity id (so one entity stays on one partition, with its state and offsets):
    raise :class:`WireError` for a message whose key is missing or another.

    >>> from osad.schemas import Sample
    >>> s = Sample(entity_id="h/1@2", host="h", ts=1.0, interval_s=1.0, seq=0, metrics={})
    >>> check_key(b"h/1@2", s)
    >>> check_key(None, s)
    Traceback (most recent call last):
    ...
    osad.schemas.wire.WireError: message key None is not its entity_id 'h/1@2' (every topic is keyed by entity id)
    """
    eid = getattr(msg, "entity_id", None)
    if eid is not None and key != eid.encode():
        shown = key if key is None or len(key) <= 80 else key[:80] + b"..."
        raise WireError(f"message key {shown!r} is not its entity_id {eid[:80]!r} (every topic is keyed by entity id)")


def poll_timeout_ms(longest_ms: int, deadline_s: float | None) -> int:
    """How long one poll may wait: ``longest_ms``, or less when the transform has a deadline sooner
    (rounded up to whole milliseconds, so the tick after the poll finds it due).

    >>> poll_timeout_ms(200, None), poll_timeout_ms(200, 0.0123), poll_timeout_ms(200, -1.0), poll_timeout_ms(200, 5.0)
    (200, 13, 0, 200)
    """
    if deadline_s is None:
        return longest_ms
    return max(0, min(longest_ms, math.ceil(deadline_s * 1000.0)))


@dataclass
class RunnerConfig:
    bootstrap: str
    group: str
    client_id: str = ""
    security: KafkaSecurity | None = None  # TLS / SASL of every client the runner makes (None: plaintext)
    topic_prefix: str = ""
    metrics_port: int = 0
    metrics_port_span: int = 1
    metrics_port_file: str = ""
    poll_timeout_ms: int = 200
    max_poll_records: int = 500
    commit_interval_s: float = 1.0
    max_poll_interval_ms: int = 60_000
    session_timeout_ms: int = 10_000
    health_stale_s: float = 60.0
    connect_timeout_s: float = 30.0  # one attempt to reach the broker at start (then retried until stopped)
    flush_timeout_s: float = 5.0  # a commit waits this long for its outputs' acknowledgement, then tries later
    create_topics: bool = True
    extra: dict = field(default_factory=dict)


class ServiceRunner:
    def __init__(self, transform: Transform, cfg: RunnerConfig, install_signals: bool = True):
        self.t = transform
        self.cfg = cfg
        self.metrics = ServiceMetrics(transform.name)
        transform.bind_metrics(self.metrics)
        self._stop = threading.Event()
        self._install_signals = install_signals
        self._processed: dict = {}  # TopicPartition -> next offset after the last processed message
        self._committed: dict = {}  # TopicPartition -> committed offset
        self._last_poll = time.monotonic()
        self._assigned: set = set()
        self._down_since: float | None = None  # the broker stopped acknowledging outputs (monotonic time)
        self._paused: list = []
        self.consumer = None
        self.publisher: Publisher | None = None
        self.status: StatusServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self, *_a) -> None:
        if not self._stop.is_set():
            log.info("%s: stop requested; finishing the batch in hand, then commit and close", self.t.name)
        self._stop.set()

    def run(self) -> int:
        if self._install_signals:
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        if not self._connect():
            self._shutdown()
            return 0  # stopped while waiting for a broker
        if self.cfg.metrics_port:
            self.status = StatusServer(self.cfg.metrics_port, self.metrics, self.health, span=self.cfg.metrics_port_span,
                                       port_file=self.cfg.metrics_port_file or None).start()
        self.consumer.subscribe([self.t.input.full_name(self.cfg.topic_prefix)], listener=_Rebalance(self))
        log.info("%s: consuming %s as group %s from %s", self.t.name, self.t.input.full_name(self.cfg.topic_prefix), self.cfg.group,
                 self.cfg.bootstrap)
        try:
            last_commit = time.monotonic()
            while not self._stop.is_set():
                records = self.consumer.poll(timeout_ms=poll_timeout_ms(self.cfg.poll_timeout_ms,
                                                                        self.t.next_deadline()),
                                             max_records=self.cfg.max_poll_records)
                self._last_poll = time.monotonic()
                if records:
                    self._handle_batch(records)
                self._emit(self.t.tick(time.time()))
                self._update_lag()
                if time.monotonic() - last_commit >= self.cfg.commit_interval_s:
                    self._commit()
                    last_commit = time.monotonic()
            self._emit(self.t.close())
            self._commit()
        finally:
            self._shutdown()
        log.info("%s: stopped cleanly", self.t.name)
        return 0

    def _connect(self) -> bool:
        """Create the topics (unless told not to), the producer and the consumer. A broker that does not answer
        is waited for, retrying with backoff up to 30 s and saying so, until it answers or the service is
        stopped (False); configuration errors (a bad certificate path, say) are raised at once."""
        from .kafka import BrokerUnavailable

        cid = self.cfg.client_id or f"osad-{self.t.name}"
        backoff, since = 1.0, time.monotonic()
        while True:
            try:
                if self.cfg.create_topics:  # idempotent; a production cluster may have them already
                    ensure_topics(self.cfg.bootstrap, prefix=self.cfg.topic_prefix, security=self.cfg.security,
                                  connect_timeout_s=self.cfg.connect_timeout_s)
                if self.publisher is None:
                    self.publisher = Publisher(self.cfg.bootstrap, cid, prefix=self.cfg.topic_prefix,
                                               security=self.cfg.security)
                self.consumer = make_consumer(
                    self.cfg.bootstrap, cid, self.cfg.group, max_poll_records=self.cfg.max_poll_records,
                    max_poll_interval_ms=self.cfg.max_poll_interval_ms, session_timeout_ms=self.cfg.session_timeout_ms,
                    connect_timeout_s=self.cfg.connect_timeout_s, security=self.cfg.security,
                )
                if time.monotonic() - since > self.cfg.connect_timeout_s:
                    log.info("%s: connected to %s after %.0f s", self.t.name, self.cfg.bootstrap,
                             time.monotonic() - since)
                return True
            except BrokerUnavailable as e:
                self.metrics.errors.labels(kind="broker_unreachable").inc()
                log.warning("%s: %s; retrying in %.0f s (waiting %.0f s so far)", self.t.name, e, backoff,
                            time.monotonic() - since)
            if self._stop.wait(backoff):
                return False
            backoff = min(backoff * 2, 30.0)

    def _shutdown(self) -> None:
        try:
            if self.consumer is not None:
                self.consumer.close(autocommit=False, timeout_ms=5000)
        finally:
            if self.publisher is not None:
                self.publisher.close(timeout_s=self.cfg.flush_timeout_s)
            if self.status is not None:
                self.status.stop()

    # -- per poll --------------------------------------------------------------------------
    def _handle_batch(self, records: dict) -> None:
        t0 = time.perf_counter()
        good, raw = [], []
        n = 0
        for tp, msgs in records.items():
            for m in msgs:
                n += 1
                try:
                    msg = decode(m.value, self.t.input.model)
                    check_key(m.key, msg)
                except WireError as e:
                    self.metrics.errors.labels(kind="decode").inc()
                    self._dead_letter(tp, m, str(e))
                else:
                    good.append((msg, InputMeta(tp.topic, tp.partition, m.offset, m.timestamp)))
                    raw.append((tp, m))
        self.metrics.messages_in.inc(n)
        try:
            outs = list(self.t.process_batch(good))
        except Exception:
            log.warning("%s: a batch of %d failed; retrying its messages one by one", self.t.name, len(good),
                        exc_info=True)
            for (msg, meta), (tp, m) in zip(good, raw):
                try:
                    self._emit(list(self.t.process(msg, meta)))
                except Exception as e:  # a bug or an input the transform cannot handle: keep going
                    log.exception("%s: processing %s[%d]@%d failed", self.t.name, tp.topic, tp.partition, m.offset)
                    self.metrics.errors.labels(kind="process").inc()
                    self._dead_letter(tp, m, f"processing failed: {type(e).__name__}: {e}")
        else:
            self._emit(outs)
        for tp, msgs in records.items():
            self._processed[tp] = msgs[-1].offset + 1
        if n:
            self.metrics.latency.observe((time.perf_counter() - t0) / n)

    def _emit(self, outs: Iterable[Output]) -> None:
        for o in outs:
            if o.dead is not None:
                meta, reason = o.dead
                self.metrics.errors.labels(kind="process").inc()
                self._dead_letter_raw(meta.topic, meta.partition, meta.offset, o.key.encode() if o.key else None,
                                      encode(o.msg), reason)
                continue
            self.publisher.publish(o.topic, o.msg, key=o.key)
            self.metrics.messages_out.labels(topic=o.topic.name).inc()

    def _dead_letter(self, tp, m, reason: str) -> None:
        self._dead_letter_raw(tp.topic, tp.partition, m.offset, m.key, m.value, reason)

    def _dead_letter_raw(self, topic_name: str, partition: int, offset: int, key, value: bytes, reason: str) -> None:
        """Publish ``value`` (what came from ``topic_name[partition]@offset``) to the dead-letter topic."""
        log.warning("%s: dead-lettering %s[%d]@%d: %s", self.t.name, topic_name, partition, offset, reason)
        headers = [
            ("osad.reason", reason.encode()[:4096]),
            ("osad.source_topic", topic_name.encode()),
            ("osad.source_partition", str(partition).encode()),
            ("osad.source_offset", str(offset).encode()),
            ("osad.service", self.t.name.encode()),
        ]
        topic = DEADLETTER.full_name(self.cfg.topic_prefix)
        from kafka.errors import MessageSizeTooLargeError

        try:
            self.publisher.publish_raw(topic, key, value, headers=headers)
        except MessageSizeTooLargeError:
            # the original (near or over the size limit) does not fit beside the headers: keep its start and say so
            log.warning("%s: %s[%d]@%d is too large to dead-letter whole (%d bytes); keeping its first %d bytes",
                        self.t.name, topic_name, partition, offset, len(value), DEAD_LETTER_KEEP_BYTES)
            headers.append(("osad.truncated_from", str(len(value)).encode()))
            self.publisher.publish_raw(topic, key, value[:DEAD_LETTER_KEEP_BYTES], headers=headers)
        self.metrics.dead_letters.inc()

    # -- offsets -----------------------------------------------------------------------------
    def _offsets_to_commit(self, only: set | None = None) -> dict:
        """Flush outputs, then the offsets that may be committed (never past what state retains). Nothing while
        the broker does not acknowledge the outputs (an outage: see :meth:`_outage`)."""
        from kafka.structs import OffsetAndMetadata

        if not self._processed:
            return {}
        # raises if the broker refused an output for good: then nothing is committed and the service restarts
        if not self.publisher.try_flush(self.cfg.flush_timeout_s):
            self._outage(True)
            return {}
        self._outage(False)
        self.t.acknowledged()
        retained = self.t.retained()
        offsets = {}
        for tp, nxt in self._processed.items():
            if only is not None and tp not in only:
                continue
            r = retained.get(tp.partition)
            off = min(nxt, r) if r is not None else nxt
            if off > self._committed.get(tp, -1):
                offsets[tp] = OffsetAndMetadata(off, "", -1)
        return offsets

    def _committed_now(self, offsets: dict) -> None:
        for tp, om in offsets.items():
            self._committed[tp] = om.offset
        self.metrics.commits.inc()

    def _commit(self) -> None:
        offsets = self._offsets_to_commit()
        if not offsets:
            return
        from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError

        try:
            self.consumer.commit(offsets, timeout_ms=int(self.cfg.flush_timeout_s * 1000))
        except (CommitFailedError, RebalanceInProgressError) as e:
            # The group moved on without us (e.g. one batch outlasted max_poll_interval_ms on a busy
            # machine). Nothing is lost: the next poll rejoins, revocation hands state back, and
            # whoever owns the partitions re-reads from the last commit (outputs may repeat).
            self.metrics.errors.labels(kind="commit").inc()
            log.warning("%s: offset commit refused (%s); rejoining the group, uncommitted input will be re-read",
                        self.t.name, type(e).__name__)
            return
        except KafkaError as e:  # the coordinator is away (an outage): commit these offsets, or later ones, next time
            self.metrics.errors.labels(kind="commit").inc()
            log.warning("%s: offset commit failed (%s: %s); retrying at the next commit", self.t.name,
                        type(e).__name__, e)
            return
        self._committed_now(offsets)

    def _outage(self, down: bool) -> None:
        """The broker does not acknowledge outputs (``down``), or does again. While it does not, consumption is
        paused (outputs would only pile up in the producer), polling goes on (it keeps the group membership and
        notices the broker's return), and nothing is committed; the producer retries the outputs it holds."""
        now = time.monotonic()
        if down and self._down_since is None:
            self._down_since = now
            self._paused = list(self._assigned)
            if self._paused:
                self.consumer.pause(*self._paused)
            self.metrics.errors.labels(kind="broker_unreachable").inc()
            log.warning("%s: the broker at %s has not acknowledged %d outputs within %.0f s; pausing input until it "
                        "does (nothing is committed meanwhile)", self.t.name, self.cfg.bootstrap,
                        self.publisher.unacknowledged, self.cfg.flush_timeout_s)
        elif not down and self._down_since is not None:
            log.warning("%s: the broker at %s acknowledges again after %.0f s; resuming input", self.t.name,
                        self.cfg.bootstrap, now - self._down_since)
            self._down_since = None
            paused, self._paused = self._paused, []
            still = [tp for tp in paused if tp in self._assigned]
            if still:
                self.consumer.resume(*still)

    def _update_lag(self) -> None:
        for tp in self._assigned:
            hw = self.consumer.highwater(tp)
            if hw is None:
                continue
            pos = self._processed.get(tp)
            if pos is None:
                continue
            self.metrics.lag.labels(partition=str(tp.partition)).set(max(0, hw - pos))

    # -- rebalance ---------------------------------------------------------------------------
    async def _on_revoked(self, revoked) -> None:
        """Runs on the consumer's IO loop (kafka-python 3): commit with the awaitable async commit."""
        revoked = set(revoked)
        if not revoked:
            return
        try:
            # offsets first, while the state still says what it retains; then let the transform drop it
            offsets = self._offsets_to_commit(only=revoked)
            if offsets:
                await self.consumer.commit_async(offsets)
                self._committed_now(offsets)
        except Exception:
            log.exception("%s: commit on revocation failed; the next owner re-reads from the last commit", self.t.name)
        try:
            self._emit(self.t.revoke({tp.partition for tp in revoked}))
        except Exception:
            log.exception("%s: dropping the state of revoked partitions failed", self.t.name)
        for tp in revoked:
            self._processed.pop(tp, None)
            self._committed.pop(tp, None)
            self.metrics.lag.remove_if_present(str(tp.partition))
        self._assigned -= revoked
        log.info("%s: partitions revoked: %s", self.t.name, sorted(tp.partition for tp in revoked))

    def _on_assigned(self, assigned) -> None:
        self._assigned = set(assigned)
        if self._down_since is not None and self._assigned:  # still no acknowledgement: keep input paused
            self.consumer.pause(*self._assigned)
            self._paused = list(self._assigned)
        self.metrics.assigned.set(len(self._assigned))
        try:
            self.t.assigned({tp.partition for tp in assigned})
        except Exception:
            log.exception("%s: handling the assignment failed", self.t.name)
        log.info("%s: partitions assigned: %s", self.t.name, sorted(tp.partition for tp in assigned))

    # -- health ------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        age = time.monotonic() - self._last_poll
        ok = (not self._stop.is_set()) and age < self.cfg.health_stale_s
        try:
            extra = dict(self.t.health() or {})
        except Exception as e:  # a fault in the transform's report must not take /healthz down
            extra = {"transform_health": {"ok": False, "error": f"{type(e).__name__}: {e}"}}
        degraded = sorted(k for k, v in extra.items() if isinstance(v, dict) and v.get("ok") is False)
        status = "ok" if ok else ("stopping" if self._stop.is_set() else "stalled")
        return ok, {
            **extra,
            "service": self.t.name,
            "status": "degraded" if ok and degraded else status,
            **({"degraded": degraded} if degraded else {}),
            "last_poll_age_s": round(age, 3),
            "assigned_partitions": sorted(tp.partition for tp in self._assigned),
            "broker_outage_s": round(time.monotonic() - self._down_since, 1) if self._down_since is not None else 0.0,
            "input_topic": self.t.input.full_name(self.cfg.topic_prefix),
        }


def _Rebalance(runner: ServiceRunner):
    from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener

    class Listener(AsyncConsumerRebalanceListener):
        async def on_partitions_revoked(self, revoked):
            await runner._on_revoked(revoked)

        async def on_partitions_assigned(self, assigned):
            runner._on_assigned(assigned)

    return Listener()


def run_transform(transform: Transform, kafka: KafkaConfig, service: ServiceConfig, group: str | None = None) -> int:
    """Run ``transform`` as a service: ``kafka`` says where the broker is and how topics are named,
    ``service`` its consumer group (default ``osad-<name>``), metrics port and log level."""
    setup_logging(service.log_level)
    prefix = kafka.topic_prefix
    group = group or service.group or f"osad-{transform.name}"
    if prefix and not group.startswith(prefix):
        group = prefix + group  # installations that share a cluster share no consumer group either
    cfg = RunnerConfig(bootstrap=kafka.bootstrap, group=group, topic_prefix=prefix, security=kafka.security,
                       metrics_port=service.metrics_port,
                       metrics_port_span=service.metrics_port_span, metrics_port_file=service.metrics_port_file)
    return ServiceRunner(transform, cfg).run()
