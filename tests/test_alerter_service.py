"""The alerter service: the Transform with a real store (no Kafka), then as processes on the real broker."""

import json
import math

import pytest

from osad.alerter.core import AlerterConfig
from osad.alerter.service import Alerter
from osad.alerter.sinks import JsonlSink
from osad.alerter.store import StoreError, open_store
from osad.runtime.service import InputMeta
from osad.schemas import ANOMALIES, SCORES, Anomaly, Score, decode, encode
from tests.conftest import wait_until

FEATS = ["on_cpu_ns", "rss_anon_bytes", "net_tx_bytes", "syscalls"]
ENTITY = "host/42@1234"



def ack(al):
    """What the runner does before committing: outputs acknowledged, then ask what is retained."""
    al.acknowledged()
    return al.retained()

def score(i, value, model="cs-jumpstarter:v1", hot=1):
    """Window i of ENTITY; feature ``hot`` carries most of the contribution."""
    contrib = [0.1, 0.1, 0.1, 0.1]
    contrib[hot] = 1.0
    seq = 100 + 10 * i
    return Score(entity_id=ENTITY, host="host", pid=42, comm="worker", window_end_ts=1.7e9 + seq,
                 window_end_seq=seq, interval_s=1.0, gap=10, model_id=model, score=float(value), features=FEATS,
                 contributions=contrib)


def normal(n):
    return [score(i, 1.0 + 0.05 * math.sin(i)) for i in range(n)]


def run(alerter, scores, offset0=0, partition=3):
    out = []
    for k, s in enumerate(scores):
        out += alerter.process(s, InputMeta(SCORES.name, partition, offset0 + k))
    return [o.msg for o in out]


def test_state_is_persisted_after_acknowledgement_and_a_restart_resumes_it(tmp_path):
    url = f"sqlite:///{tmp_path}/a.db"
    cfg = AlerterConfig(calibration_scores=30)
    al = Alerter(cfg, open_store(url), [JsonlSink(str(tmp_path / "a.jsonl"))])
    assert run(al, normal(30)) == []
    thr = al.engine.entities[ENTITY].streams["cs-jumpstarter:v1"].threshold
    opened = run(al, [score(30, 4 * thr), score(31, 4 * thr)], offset0=30)
    assert [a.status for a in opened] == ["open"]
    store = open_store(url, readonly=True)
    assert store.count() == 0  # nothing is written before the runner says the outputs are acknowledged
    assert ack(al) == {}  # the runner's hooks: persist, then retain nothing
    assert store.get(opened[0].anomaly_id).status == "open"
    assert store.load_state(ENTITY)["incident"]["anomaly_id"] == opened[0].anomaly_id
    al.shutdown()
    assert decode((tmp_path / "a.jsonl").read_bytes().splitlines()[0], Anomaly) == opened[0]

    # restart: the Scores after the last commit come again, then new ones
    al2 = Alerter(cfg, open_store(url))
    out = run(al2, [score(31, 4 * thr), score(32, 40 * thr)] + [score(i, 0.5) for i in (33, 34, 35)], offset0=31)
    assert [a.status for a in out] == ["update", "closed"]
    assert {a.anomaly_id for a in out} == {opened[0].anomaly_id} and [a.revision for a in out] == [1, 2]
    assert al2.engine.counters["calibrated"] == 0 and al2.engine.counters["duplicate"] == 1
    assert out[-1].root_causes[0].feature == "rss_anon_bytes"
    ack(al2)
    assert store.get(opened[0].anomaly_id).revision == 2 and store.count() == 1
    al2.shutdown()
    store.close()


def test_anomalies_published_before_a_crash_are_not_published_again(tmp_path):
    """The alerter published an incident's revisions and died before its checkpoint: the restarted one reads the
    same Scores again and makes the same revisions. Those already on the topic (the lookup says which) are kept
    in the store but published, and handed to the sinks, no more; the next revision is."""
    url = f"sqlite:///{tmp_path}/r.db"
    cfg = AlerterConfig(calibration_scores=30)
    al = Alerter(cfg, open_store(url))
    run(al, normal(30))
    ack(al)  # the last checkpoint: calibration done, nothing open
    thr = al.engine.entities[ENTITY].streams["cs-jumpstarter:v1"].threshold
    hot = [score(30, 4 * thr), score(31, 4 * thr), score(32, 40 * thr)]
    first = run(al, hot, offset0=30)
    assert [(a.status, a.revision) for a in first] == [("open", 0), ("update", 1)]
    # SIGKILL here: both revisions are on the topic, the store has neither
    asked = []

    def lookup(since):
        asked.append(since)
        return {(a.anomaly_id, a.revision) for a in first}

    al2 = Alerter(cfg, open_store(url), [JsonlSink(str(tmp_path / "s.jsonl"))], published=lookup)
    al2.assigned({3})
    again = run(al2, hot + [score(i, 0.5) for i in (33, 34, 35)], offset0=30)
    assert [(a.status, a.revision) for a in again] == [("closed", 2)]  # open and update: not a second time
    assert len(asked) == 1 and asked[0] <= al.store.last_saved_at()  # since the last checkpoint, once
    assert al2.engine.counters["republish_skipped"] == 2
    ack(al2)
    stored = al2.store.get(first[0].anomaly_id)
    assert stored.revision == 2 and stored.status == "closed"
    assert [decode(line, Anomaly).revision for line in (tmp_path / "s.jsonl").read_bytes().splitlines()] == [2]
    al2.shutdown()
    al.shutdown()


@pytest.mark.broker
def test_published_since_reads_the_anomalies_topic_from_a_time(broker, topic_prefix):
    import time

    from osad.alerter.cli import published_since
    from osad.runtime.config import KafkaConfig
    from osad.runtime.kafka import Publisher, ensure_topics
    from tests.test_alerter_store import anomaly

    ensure_topics(broker.bootstrap, prefix=topic_prefix)
    lookup = published_since(KafkaConfig(bootstrap=broker.bootstrap, topic_prefix=topic_prefix))
    assert lookup(0) == set()
    pub = Publisher(broker.bootstrap, "test", prefix=topic_prefix)
    pub.publish(ANOMALIES, anomaly("a" * 32, 0), key="h/1@5")
    pub.flush()
    t_mid = time.time() + 0.2  # after the first record's stamp (the broker stamped it by now)
    wait_until(lambda: time.time() > t_mid + 0.2, 5, what="a later time")
    pub.publish(ANOMALIES, anomaly("a" * 32, 1), key="h/1@5")
    pub.flush()
    pub.close()
    assert lookup(0) == {("a" * 32, 0), ("a" * 32, 1)}
    assert lookup(t_mid) == {("a" * 32, 1)}
    assert lookup(time.time() + 3600) == set()


class FlakyStore:
    def __init__(self, inner):
        self.inner, self.down = inner, True

    def save(self, *a, **kw):
        if self.down:
            raise StoreError("PostgreSQL store postgresql://x:***@db/osad: server closed the connection")
        return self.inner.save(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_failed_store_write_retains_offsets_and_is_retried(tmp_path):
    store = FlakyStore(open_store(f"sqlite:///{tmp_path}/f.db"))
    al = Alerter(AlerterConfig(calibration_scores=30), store)
    run(al, normal(10), offset0=500, partition=1)
    assert ack(al) == {1: 500}  # the runner must not commit past unsaved state
    run(al, normal(20)[10:], offset0=510, partition=1)
    assert ack(al) == {1: 500}
    store.down = False
    assert ack(al) == {}
    assert len(store.inner.load_state(ENTITY)["streams"]["cs-jumpstarter:v1"]["tracker"]["calib"]) == 20


def test_revoked_partitions_drop_their_entities_after_saving_them(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/r.db")
    al = Alerter(AlerterConfig(calibration_scores=30), store)
    run(al, normal(12), partition=5)
    al.revoke({5})
    assert ENTITY not in al.engine.entities
    ack(al)
    assert len(store.load_state(ENTITY)["streams"]["cs-jumpstarter:v1"]["tracker"]["calib"]) == 12


# -- on the real broker -------------------------------------------------------------------------


def alerter_proc(tmp_path, broker, name, store, *extra):
    from osad.runtime.broker import free_port
    from tests.kafkautil import Proc

    port = free_port()
    p = Proc(["alert", "--bootstrap", broker.bootstrap, "--metrics-port", str(port), "--store", store,
              "--calibration-scores", "30", "--jsonl", str(tmp_path / "anomalies.jsonl"), *extra],
             tmp_path / f"{name}.log")
    return p, port


def produce(broker, scores, topic_prefix):
    from kafka import KafkaProducer

    prod = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
    for s in scores:
        prod.send(SCORES.full_name(topic_prefix), key=s.entity_id.encode(), value=encode(s))
    prod.flush()
    prod.close()


@pytest.mark.broker
@pytest.mark.slow
def test_alerter_on_the_broker_redelivery_and_restart(broker, topic_prefix, tmp_path):
    """Calibrate, one incident (open/update/closed), the same Scores again (no duplicate in topic or
    store), a second incident open across a restart (same id, no re-calibration), CLI reads the store."""
    from tests.kafkautil import Proc, TopicReader, health, metric

    db = f"sqlite:///{tmp_path}/anomalies.db"
    a, port = alerter_proc(tmp_path, broker, "a1", db)
    reader = TopicReader(broker.bootstrap, ANOMALIES, prefix=topic_prefix)

    def states():
        return [(x.anomaly_id, x.revision, x.status) for x in reader.messages()]
    try:
        wait_until(lambda: (health(port) or {}).get("status") == "ok", 90, what="the alerter to be healthy")
        first = normal(30) + [score(30 + i, v) for i, v in enumerate([8, 9, 40, 41, 0.5, 0.5, 0.5, 0.5])]
        produce(broker, first, topic_prefix)
        reader.read_until(lambda r: any(s == "closed" for *_, s in states()), 120, "the first incident to close")
        one = states()
        assert [s for *_, s in one] == ["open", "update", "closed"] and len({i for i, *_ in one}) == 1
        assert [r for _, r, _ in one] == [0, 1, 2]
        assert all(m.key == ENTITY.encode() for m in reader.records)

        produce(broker, first, topic_prefix)  # delivered twice (e.g. a detector restarted)
        wait_until(lambda: (metric(port, "osad_alerter_events_total", event="duplicate") or 0) >= len(first), 120,
                   what="the re-delivered Scores to be recognised as duplicates")
        # then an incident opens; the alerter restarts in the middle of it
        produce(broker, [score(40, 6), score(41, 7)], topic_prefix)
        reader.read_until(lambda r: len(states()) == 4, 120, "the second incident to open")
        second = states()[3]
        assert second[2] == "open" and second[0] != one[0][0]
        assert states()[:3] == one  # the re-delivered Scores published nothing
    finally:
        assert a.terminate() == 0

    b, port = alerter_proc(tmp_path, broker, "a2", db)
    try:
        produce(broker, [score(42, 60), score(43, 0.4), score(44, 0.4), score(45, 0.4)], topic_prefix)
        reader.read_until(lambda r: len(states()) >= 6, 120, "the second incident's update and close")
        after = states()[4:]
        assert [(i, s) for i, _, s in after] == [(second[0], "update"), (second[0], "closed")]
        assert [r for _, r, _ in after] == [1, 2]
        assert (metric(port, "osad_alerter_events_total", event="calibrated") or 0) == 0
        assert metric(port, "osad_alerter_events_total", event="loaded") == 1
    finally:
        assert b.terminate() == 0
    reader.close()
    assert len(states()) == len(set(states())) == 6  # no (id, revision) twice in the topic

    store = open_store(db, readonly=True)
    rows = store.list()
    store.close()
    assert [(x.anomaly_id, x.revision, x.status) for x in rows] == [(second[0], 2, "closed"), (one[0][0], 2, "closed")]
    assert rows[1].root_causes[0].feature == "rss_anon_bytes" and rows[1].severity in ("high", "critical")
    lines = (tmp_path / "anomalies.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[-1])["status"] == "closed"

    out = Proc(["anomalies", "list", "--store", db, "--json"], tmp_path / "list.log")
    out.run_to_end(60)
    listed = json.loads(out.text())
    assert [x["anomaly_id"] for x in listed] == [second[0], one[0][0]]


def test_an_adapting_threshold_continues_where_it_was_after_a_restart(tmp_path):
    """--adapt: the drift-aware threshold a stream learnt is in the store; a restarted alerter (a new process on
    the same SQLite file) judges the next Scores by exactly the thresholds the first would have."""
    url = f"sqlite:///{tmp_path}/a.db"
    cfg = AlerterConfig(calibration_scores=60, adapt=True)
    rising = [score(i, (1.0 + 0.05 * math.sin(i)) * (1 + i / 400)) for i in range(300)]
    ref = Alerter(cfg, open_store(f"sqlite:///{tmp_path}/ref.db"))
    first = Alerter(cfg, open_store(url))
    run(ref, rising[:200])
    run(first, rising[:200])
    ack(first)
    first.shutdown()
    st = first.engine.entities[ENTITY].streams["cs-jumpstarter:v1"]
    assert st.method == "dspot" and open_store(url, readonly=True).load_state(ENTITY)["streams"][
        "cs-jumpstarter:v1"]["tracker"]["dspot"]["learned"] > 100
    second = Alerter(cfg, open_store(url))
    t_ref, t_second = [], []
    for k, s in enumerate(rising[200:]):
        run(ref, [s], offset0=200 + k)
        run(second, [s], offset0=200 + k)
        t_ref.append(ref.engine.entities[ENTITY].streams["cs-jumpstarter:v1"].threshold)
        t_second.append(second.engine.entities[ENTITY].streams["cs-jumpstarter:v1"].threshold)
    assert t_second == t_ref and t_ref[-1] > t_ref[0]  # it went on adapting, identically
    second.shutdown()
    ref.shutdown()
