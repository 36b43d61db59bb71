"""runtime/reader.py: group-less reading of topics on the real broker (from the beginning, from now, the end)."""

from __future__ import annotations

import time

import pytest

from osad.runtime.kafka import ensure_topics, make_producer
from osad.runtime.reader import TopicReader
from osad.schemas import ANOMALIES, SCORES, Score, encode

pytestmark = pytest.mark.broker


def _score(eid: str, seq: int) -> bytes:
    return encode(Score(entity_id=eid, host="h", window_end_ts=1.0 + seq, window_end_seq=seq, interval_s=1.0, gap=10,
                        model_id="cs-calibrated:h=10", score=0.5, features=["a"], contributions=[1.0]))


def _send(bootstrap: str, topic: str, values: list[tuple[bytes, bytes]]) -> None:
    p = make_producer(bootstrap, "test-reader")
    for key, value in values:
        p.send(topic, key=key, value=value)
    p.flush()
    p.close()


def test_from_the_beginning_from_now_and_the_end(broker, topic_prefix):
    name = SCORES.full_name(topic_prefix)
    missing = TopicReader(broker.bootstrap, SCORES, prefix=topic_prefix)
    assert not missing.assign() and missing.poll(50) == []  # the topic does not exist yet: waited for
    missing.close()
    ensure_topics(broker.bootstrap, (SCORES,), prefix=topic_prefix)
    _send(broker.bootstrap, name, [(f"e{k}".encode(), _score(f"e{k}", k)) for k in range(20)] + [(b"e0", b"nope")])

    with TopicReader(broker.bootstrap, SCORES, prefix=topic_prefix) as r:
        got = []
        r.read_until_idle(3000, got.append)
        assert len(got) == 21 and r.caught_up()
        msgs = [m for m in (r.decode(x) for x in got) if m is not None]
        assert sorted(m.window_end_seq for m in msgs) == list(range(20)) and r.skipped == 1

    late = TopicReader(broker.bootstrap, SCORES, prefix=topic_prefix, from_beginning=False)
    assert late.wait_assigned(30)
    time.sleep(0.05)
    _send(broker.bootstrap, name, [(b"e99", _score("e99", 99))])
    deadline, new = time.monotonic() + 30, []
    while not new and time.monotonic() < deadline:
        new = late.poll_messages(200)
    assert [m.window_end_seq for m in new] == [99]  # only what came after it was assigned
    late.close()


def test_topics_that_do_not_exist_are_left_out_when_asked(broker, topic_prefix):
    ensure_topics(broker.bootstrap, (SCORES,), prefix=topic_prefix)
    with TopicReader(broker.bootstrap, (SCORES, ANOMALIES), prefix=topic_prefix, skip_missing=True) as r:
        assert r.assign() and r.missing == [ANOMALIES.full_name(topic_prefix)]
        assert {tp.topic for tp in r.partitions} == {SCORES.full_name(topic_prefix)}
        t0 = time.monotonic()
        r.read_until_idle(5000, lambda rec: None)  # empty: caught up at once, no idle wait
        assert time.monotonic() - t0 < 4
    with TopicReader(broker.bootstrap, ANOMALIES, prefix=topic_prefix, skip_missing=True) as r:
        r.read_until_idle(5000, lambda rec: None)  # nothing to assign: returns at once
        assert r.partitions == []
