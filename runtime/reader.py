"""Reading topics without a consumer group: every partition assigned, from the beginning or from now.

What ``osad tail``, ``osad report``, ``osad up``'s live view, ``osad agreement``, the benchmarks and
the tests do to *look at* a topic (the services themselves consume in groups, runtime/service.py):

* every partition of one or more topics is assigned to one consumer (no group, nothing committed),
  each topic from its beginning or from now; a topic that does not exist yet is waited for
  (:meth:`TopicReader.assign` says False and refreshes the metadata) or left out (``skip_missing``);
* "from now" is the end offset resolved at assignment *and* the record time: a record stamped before
  the assignment is dropped (a broker may report an end offset short of a batch's last record);
* :meth:`TopicReader.poll` gives raw records (the caller may filter by key before decoding),
  :meth:`TopicReader.poll_messages` decoded messages, undecodable ones skipped and counted;
* :meth:`TopicReader.mark_end` notes the end offsets; :meth:`TopicReader.caught_up` is True once every
  partition has reached them and a poll brought nothing; :meth:`TopicReader.read_until_idle` reads
  until then, or until nothing arrived for a while.

kafka-python is imported only when a reader is made (``osad --help`` stays fast).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from osad.schemas import Topic, WireError, decode

from .kafka import make_consumer


def assign_partitions(consumer, names: Iterable[str], *, from_beginning: bool = True,
                      keep: bool = False) -> list | None:
    """Assign every partition of the topics ``names`` to a group-less ``consumer``, from their beginning or
    their end (resolved now). ``keep``: add them to what it is assigned already. None while one of the topics
    does not exist yet (asking for its partitions refreshed the metadata for the next try)."""
    from kafka import TopicPartition

    tps = []
    for name in names:
        parts = consumer.partitions_for_topic(name)
        if not parts:
            return None
        tps += [TopicPartition(name, p) for p in sorted(parts)]
    current = set(consumer.assignment()) if keep else set()
    consumer.assign(sorted(current | set(tps)))
    if from_beginning:
        consumer.seek_to_beginning(*tps)
    else:
        consumer.seek_to_end(*tps)
        for tp in tps:
            consumer.position(tp)  # resolve "the end" now, not at the first poll
    return tps


class TopicReader:
    """One group-less consumer of ``topics`` (Topic objects, named with ``prefix``, or full names as str).

    ``from_beginning``: every record the topics hold, else those that arrive from now on. ``consumer``:
    use this one (else one is made with :func:`osad.runtime.kafka.make_consumer`, which raises
    ``BrokerUnavailable`` when no broker answers; ``security`` (TLS, SASL: a ``KafkaSecurity`` or the
    ``KafkaConfig`` holding it) and ``consumer_kw`` go to it). ``skip_missing``: topics that
    do not exist when :meth:`assign` is called are left out (listed in ``missing``) instead of waited for.

    >>> # r = TopicReader("127.0.0.1:9092", ANOMALIES, prefix="t1."); r.mark_end()
    >>> # r.read_until_idle(1500, lambda rec: print(r.decode(rec)))
    """

    def __init__(self, bootstrap: str, topics: Topic | str | Sequence[Topic | str], *, prefix: str = "",
                 from_beginning: bool = True, skip_missing: bool = False, client_id: str = "osad-reader",
                 consumer=None, security=None, **consumer_kw):
        if isinstance(topics, (Topic, str)):
            topics = [topics]
        self.topics: dict[str, Topic | None] = {}  # full name -> its Topic (None: named by a string)
        for t in topics:
            self.topics[t if isinstance(t, str) else t.full_name(prefix)] = None if isinstance(t, str) else t
        self.prefix, self.from_beginning, self.skip_missing = prefix, from_beginning, skip_missing
        if consumer is None:
            consumer = make_consumer(bootstrap, client_id, None, auto_offset_reset="earliest" if from_beginning else "latest",
                                     security=security, **consumer_kw)
        self.consumer = consumer
        self.partitions: list = []
        self.missing: list[str] = []  # with skip_missing: the topics that did not exist
        self.assigned = False
        self.skipped = 0  # undecodable messages
        self.end: dict | None = None
        self._since_ms: dict[str, int] = {}  # topic read from now -> records stamped before this are dropped
        self._last_count = -1  # records the last poll brought (before the time filter)

    # -- assignment ------------------------------------------------------------------------------
    def assign(self) -> bool:
        """Assign the topics; False (and nothing assigned) while one does not exist, unless ``skip_missing``."""
        if self.assigned:
            return True
        names = list(self.topics)
        if self.skip_missing:
            self.missing = [n for n in names if not self.consumer.partitions_for_topic(n)]
            names = [n for n in names if n not in self.missing]
            if not names:
                self.assigned = True
                return True
        tps = assign_partitions(self.consumer, names, from_beginning=self.from_beginning)
        if tps is None:
            return False
        self._assigned(names, tps, self.from_beginning)
        return True

    def wait_assigned(self, timeout_s: float, every_s: float = 0.5) -> bool:
        """:meth:`assign`, retried until it succeeds or ``timeout_s`` have passed."""
        deadline = time.monotonic() + timeout_s
        while not self.assign():
            if time.monotonic() >= deadline:
                return False
            time.sleep(every_s)
        return True

    def add(self, topic: Topic | str, from_beginning: bool = False) -> bool:
        """Read ``topic`` too (from now, unless ``from_beginning``); False while it does not exist."""
        name = topic if isinstance(topic, str) else topic.full_name(self.prefix)
        tps = assign_partitions(self.consumer, [name], from_beginning=from_beginning, keep=True)
        if tps is None:
            return False
        self.topics[name] = None if isinstance(topic, str) else topic
        self._assigned([name], tps, from_beginning)
        return True

    def remove(self, topic: Topic | str) -> None:
        """Stop reading ``topic``."""
        name = topic if isinstance(topic, str) else topic.full_name(self.prefix)
        self.partitions = [tp for tp in self.partitions if tp.topic != name]
        self.consumer.assign([tp for tp in self.consumer.assignment() if tp.topic != name])
        self._since_ms.pop(name, None)

    def _assigned(self, names: list[str], tps: list, from_beginning: bool) -> None:
        self.partitions = sorted(set(self.partitions) | set(tps))
        self.assigned = True
        if not from_beginning:
            now_ms = int(time.time() * 1000)
            for n in names:
                self._since_ms[n] = now_ms

    # -- reading ---------------------------------------------------------------------------------
    def poll(self, timeout_ms: int = 200) -> list:
        """The records one poll brings, in partition order (those stamped before a from-now topic was
        assigned left out). While the topics are not assigned yet: tries to, else waits ``timeout_ms``."""
        if not self.assigned and not self.assign():
            time.sleep(timeout_ms / 1000)
            return []
        if not self.partitions:
            self._last_count = 0
            time.sleep(timeout_ms / 1000)
            return []
        out, count = [], 0
        for _tp, records in self.consumer.poll(timeout_ms=timeout_ms).items():
            for r in records:
                count += 1
                since = self._since_ms.get(r.topic)
                if since is not None and r.timestamp is not None and 0 <= r.timestamp < since:
                    continue
                out.append(r)
        self._last_count = count
        return out

    def topic_of(self, record) -> Topic | None:
        return self.topics.get(record.topic)

    def decode(self, record):
        """The record's message (by its topic's type; raw bytes for a topic without one, e.g. dead letters),
        or None when it does not decode (counted in ``skipped``)."""
        t = self.topics.get(record.topic)
        if t is None or t.model is None:
            return record.value
        try:
            return decode(record.value, t.model)
        except WireError:
            self.skipped += 1
            return None

    def poll_messages(self, timeout_ms: int = 200) -> list:
        """The decoded messages one poll brings; undecodable ones skipped (and counted)."""
        return [m for m in (self.decode(r) for r in self.poll(timeout_ms)) if m is not None]

    def seek_to_time(self, ts: float) -> None:
        """Move every assigned partition to its first record stamped at or after ``ts`` (Unix seconds); a
        partition with none goes to its end."""
        if not self.partitions:
            return
        found = self.consumer.offsets_for_times({tp: max(0, int(ts * 1000)) for tp in self.partitions})
        for tp in self.partitions:
            ot = found.get(tp)
            if ot is None or (ot.timestamp is not None and ot.timestamp < 0):  # none (Tansu: offset 0, time -1)
                self.consumer.seek_to_end(tp)
                self.consumer.position(tp)
            else:
                self.consumer.seek(tp, ot.offset)

    # -- the end -----------------------------------------------------------------------------------
    def mark_end(self) -> dict:
        """Note the end offset of every assigned partition: what :meth:`caught_up` compares with."""
        self.end = self.consumer.end_offsets(self.partitions) if self.partitions else {}
        return self.end

    def caught_up(self) -> bool:
        """Every partition at the end offsets :meth:`mark_end` noted (or at the high watermark its fetches reported,
        when that is further: Tansu 0.6.0 answers a "latest" ListOffsets with its last batch's base offset + 1, short
        of a batch of several records, while fetch responses carry the true high watermark), and the last poll
        brought nothing."""
        if self.end is None:
            return False
        return self._last_count == 0 and all(
            self.consumer.position(tp) >= max(self.end[tp], self.consumer.highwater(tp) or 0) for tp in self.partitions)

    def read_until_idle(self, idle_ms: int, on_record: Callable, poll_ms: int = 200) -> None:
        """Give ``on_record`` every record up to the end offsets of now; done once caught up, or when
        nothing arrived for ``idle_ms`` (at once when no topic could be assigned)."""
        if not self.assign() or not self.partitions:
            return
        self.mark_end()
        last = time.monotonic()
        while True:
            for r in self.poll(min(poll_ms, idle_ms)):
                on_record(r)
            now = time.monotonic()
            if self._last_count:
                last = now
            elif now - last >= idle_ms / 1000 or self.caught_up():
                return

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> "TopicReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
