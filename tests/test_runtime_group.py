"""The service loop survives being dropped from its consumer group (a batch that outlasts
max_poll_interval_ms on a busy machine): it rejoins, processes everything, and commits."""

import threading

import pytest

from osad.runtime.service import Output, RunnerConfig, ServiceRunner, Transform
from osad.schemas import SAMPLES, SCORES, Sample
from tests.conftest import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class SlowFirst(Transform):
    """Echo nothing; the first batch takes longer than the group allows."""

    name = "slow-first"
    input = SAMPLES

    def __init__(self, hold_s: float):
        self.hold_s, self.seen, self.slowed = hold_s, [], False

    def process(self, msg, meta):
        if not self.slowed:
            self.slowed = True
            threading.Event().wait(self.hold_s)  # a slow batch (not synchronisation)
        self.seen.append(msg.seq)
        return []


def test_runner_rejoins_after_the_group_dropped_it_and_commits_everything(broker, topic_prefix):
    from kafka import KafkaConsumer, TopicPartition
    from osad.runtime.kafka import Publisher, ensure_topics

    ensure_topics(broker.bootstrap, prefix=topic_prefix)
    pub = Publisher(broker.bootstrap, "t", prefix=topic_prefix)
    for i in range(20):
        pub.publish(SAMPLES, Sample(entity_id="e", host="h", ts=1.0 + i, interval_s=1.0, seq=i, metrics={"m": 1.0}))
    pub.flush()
    t = SlowFirst(hold_s=8.0)
    cfg = RunnerConfig(bootstrap=broker.bootstrap, group=f"{topic_prefix}slow", topic_prefix=topic_prefix, max_poll_interval_ms=2000,
                       session_timeout_ms=6000, commit_interval_s=0.2, max_poll_records=1)
    runner = ServiceRunner(t, cfg, install_signals=False)
    th = threading.Thread(target=runner.run, daemon=True)
    th.start()
    try:
        wait_until(lambda: len(set(t.seen)) == 20, 120, what="every message processed after the slow batch")
        c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=f"{topic_prefix}slow", enable_auto_commit=False)
        tps = [TopicPartition(SAMPLES.full_name(topic_prefix), p) for p in c.partitions_for_topic(SAMPLES.full_name(topic_prefix))]

        def committed_all():
            return sum((c.committed(tp) or 0) for tp in tps) >= 20
        wait_until(committed_all, 60, every_s=0.5, what="offsets of all 20 messages committed")
        c.close()
        assert th.is_alive(), "the service loop must keep running"
        refused = runner.metrics.registry.get_sample_value("osad_errors_total", {"service": "slow-first", "kind": "commit"})
        assert refused and refused >= 1, "the slow batch should have cost the group membership once"
    finally:
        runner._stop.set()
        th.join(30)
    assert not th.is_alive()


def test_a_window_the_detector_cannot_score_goes_to_the_dead_letter_topic_and_the_service_goes_on(broker,
                                                                                                  topic_prefix):
    """The runner publishes a transform's dead-letter outputs (here: a window whose scoring fails in a batch
    scored from tick) with the usual headers, and keeps running; the other windows are scored."""
    import numpy as np

    from osad.detector.cs import CSScorer
    from osad.detector.engine import Engine, EngineConfig
    from osad.detector.service import BatchConfig, Detector
    from osad.runtime.kafka import Publisher, ensure_topics
    from osad.schemas import DEADLETTER, SIGNATURES, SignatureWindow
    from tests.kafkautil import TopicReader
    from tests.test_detector_core import _failing_for, windows

    ensure_topics(broker.bootstrap, prefix=topic_prefix)
    rng = np.random.default_rng(4)
    good = windows(0.5 + 0.1 * rng.normal(size=(90, 4)), entity="good")
    bad = windows(0.5 + 0.1 * rng.normal(size=(70, 4)), entity="bad")[:1]
    pub = Publisher(broker.bootstrap, "t", prefix=topic_prefix)
    for w in good[:3] + bad + good[3:]:
        pub.publish(SIGNATURES, w, key=w.entity_id)
    pub.flush()
    det = Detector(Engine(CSScorer(gap=5, max_iter=50), EngineConfig(cs_calibrate=0)),
                   BatchConfig(max_batch=64, max_wait_ms=50.0))
    _failing_for(det, "bad")
    cfg = RunnerConfig(bootstrap=broker.bootstrap, group=f"{topic_prefix}det", topic_prefix=topic_prefix,
                       commit_interval_s=0.2)
    runner = ServiceRunner(det, cfg, install_signals=False)
    th = threading.Thread(target=runner.run, daemon=True)
    th.start()
    try:
        scores = TopicReader(broker.bootstrap, SCORES, prefix=topic_prefix)
        scores.read_until(lambda r: len(r) >= len(good), 120, "the good windows' scores")
        assert sorted(s.window_end_seq for s in scores.messages()) == sorted(w.window_end_seq for w in good)
        dl = TopicReader(broker.bootstrap, DEADLETTER, prefix=topic_prefix, model=None)
        dl.read_until(lambda r: len(r) >= 1, 60, "the failed window on the dead-letter topic")
        rec = dl.records[0]
        headers = dict(rec.headers)
        assert headers["osad.reason"] == b"scoring failed: FloatingPointError: cannot score bad"
        assert headers["osad.source_topic"].decode() == SIGNATURES.full_name(topic_prefix)
        assert headers["osad.service"] == b"detector" and rec.key == b"bad"
        from osad.schemas import decode
        assert decode(rec.value, SignatureWindow).entity_id == "bad"
        assert th.is_alive(), "the service loop must keep running"
    finally:
        runner._stop.set()
        th.join(30)
    assert not th.is_alive()
