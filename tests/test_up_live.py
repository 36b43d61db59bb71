"""`osad up`'s live view (pure parts, drawn without a terminal) and `osad up --demo` on the real broker."""

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from osad.live import (ENTITY_COLUMNS, IN, OUT, SERVICE_COLUMNS, LiveView, Probe, Watched, entity_rows, error_lines,
                       headline, parse_metrics, service_row)
from osad.up import DEMO_CALIBRATION_SCORES, DEMO_CS_CALIBRATE, DEMO_LEAD_ROWS, label_segments, plan_demo
from osad.runtime.config import ConfigError
from osad.schemas import Anomaly, Sample, Score, encode
from tests.conftest import ROOT, wait_until


# -- metrics text -> rows ------------------------------------------------------------------------

def _exposition(n_in: int, n_out: int, lag: int = 0, errors: int = 0) -> str:
    """What a service's /metrics serves, from the runtime's own registry."""
    from prometheus_client import generate_latest

    from osad.runtime.metrics import ServiceMetrics

    m = ServiceMetrics("featurizer")
    m.messages_in.inc(n_in)
    m.messages_out.labels("osad.signatures").inc(n_out - 1)
    m.messages_out.labels("osad.deadletter").inc(1)
    m.lag.labels("0").set(lag)
    m.lag.labels("1").set(lag)
    if errors:
        m.errors.labels("decode").inc(errors)
    return generate_latest(m.registry).decode()


def test_metrics_text_becomes_totals_rates_and_a_service_row():
    first = parse_metrics(_exposition(100, 10))
    assert first[IN] == 100 and first[OUT] == 10  # summed over the topic label
    assert not any(k.endswith("_created") for k in first)
    second = parse_metrics(_exposition(400, 40, lag=3, errors=2))
    assert second["osad_consumer_lag"] == 6  # two partitions
    row = service_row("featurizer", 4242, "up", Probe(12.0, second, {"status": "ok"}), Probe(10.0, first, None))
    assert len(row) == len(SERVICE_COLUMNS)
    assert dict(zip(SERVICE_COLUMNS, row)) == {
        "SERVICE": "featurizer", "PID": "4242", "STATE": "up", "HEALTH": "ok", "IN/s": "150", "OUT/s": "15",
        "IN total": "400", "OUT total": "40", "LAG": "6", "ERRORS": "2", "DEAD LETTERS": "0"}


def test_service_rows_without_answers_or_history():
    # one poll only: totals, no rates; a service that does not answer yet; a one-shot without endpoint
    row = dict(zip(SERVICE_COLUMNS, service_row("d", 1, "up", Probe(1.0, {IN: 5.0}, None), None)))
    assert (row["IN/s"], row["IN total"], row["HEALTH"]) == ("-", "5", "?")
    assert service_row("d", 1, "up", Probe(1.0, None, None), None)[3] == "no answer"
    assert service_row("replay", 7, "done", None, None, has_endpoint=False)[2:4] == ("done", "")
    assert service_row("alerter", None, "exited 1", None, None)[1:4] == ("-", "exited 1", "-")
    # a service whose counters restarted (a new process) does not show a negative rate
    assert service_row("d", 1, "up", Probe(2.0, {IN: 1.0}, {}), Probe(1.0, {IN: 50.0}, {}))[4] == "0"


def test_collector_row_shows_samples_made_as_output():
    text = "# TYPE osad_collector_samples_total counter\nosad_collector_samples_total{service=\"collector\"} 30\n"
    old = parse_metrics(text.replace(" 30", " 10"))
    row = dict(zip(SERVICE_COLUMNS, service_row("collector", 3, "up", Probe(2.0, parse_metrics(text), {"status": "ok"}),
                                                Probe(1.0, old, None))))
    assert (row["IN/s"], row["OUT/s"], row["OUT total"]) == ("-", "20", "30")


# -- messages -> entity rows ---------------------------------------------------------------------

def _sample(eid: str, seq: int, **metrics) -> bytes:
    return encode(Sample(entity_id=eid, host="h", pid=1, comm="python3", ts=1_700_000_000.0 + seq, interval_s=1.0,
                         seq=seq, metrics=metrics or {"on_cpu_ns": 2.5e8, "rss_anon_bytes": 2**21, "syscalls": 7.0}))


def _score(eid: str, score: float, model: str = "cs-calibrated:h=10") -> bytes:
    return encode(Score(entity_id=eid, host="h", window_end_ts=1.0, window_end_seq=9, interval_s=1.0, gap=10,
                        model_id=model, score=score, features=["a"], contributions=[1.0]))


def test_latest_messages_become_entity_rows_highest_score_first():
    samples = {"h/1@1": (_sample("h/1@1", 41), 99.0), "h/2@2": (_sample("h/2@2", 5), 95.0),
               "h/3@3": (_sample("h/3@3", 8), 50.0),  # not seen for 50 s: left out
               "h/4@4": (b"{not json", 99.5)}
    scores = {"h/1@1": _score("h/1@1", 0.5), "h/2@2": _score("h/2@2", 7.25, "mscred:abc")}
    rows, total = entity_rows(samples, scores, now=100.0, window_s=30.0)
    assert total == 3
    assert [r[0] for r in rows] == ["h/2@2 (python3)", "h/1@1 (python3)", "h/4@4"]
    top = dict(zip(ENTITY_COLUMNS, rows[0]))
    assert top == {"ENTITY": "h/2@2 (python3)", "LAST SAMPLE (UTC)": "2023-11-14 22:13:25", "SEQ": "5", "AGE": "5s",
                   "METRICS": "cpu 25% rss 2 MiB sys 7/s", "SCORE": "7.25", "MODEL": "mscred"}
    assert rows[2][4].startswith("undecodable") and rows[2][5] == "-"
    rows, total = entity_rows(samples, scores, now=100.0, window_s=30.0, limit=1)
    assert total == 3 and len(rows) == 1


def test_headline_of_a_replayed_entity_names_its_first_features():
    assert headline({"f10": 3.0, "f02": 0.125, "f01": 1.0}, 60.0) == "f01=1 f02=0.125"
    assert headline({"rss_file_bytes": 2**30}, 1.0) == "rss 1024 MiB"


def test_error_lines_of_a_log():
    log = "\n".join(["2025 INFO osad.runtime: started", "2025 ERROR osad.detector: skipping checkpoint x: bad",
                     "2025 INFO osad.runtime: ok", "Traceback (most recent call last):", '  File "x", line 1',
                     "ValueError: boom"])
    assert error_lines(log) == ["Traceback (most recent call last):", '  File "x", line 1', "ValueError: boom"]
    assert error_lines(log.rsplit("\nTraceback", 1)[0], n=1) == ["2025 ERROR osad.detector: skipping checkpoint x: bad"]
    assert error_lines("osad featurizer: configuration error: --gap must be > 0") != []
    assert error_lines("2025 INFO all fine\n2025 WARNING slow\n") == []


def test_the_view_draws_services_entities_anomalies_and_errors_without_a_terminal(tmp_path):
    from rich.console import Console

    log = tmp_path / "detector.log"
    log.write_text("2025 INFO fine\n2025 ERROR osad.detector: checkpoint broken\n")
    watched = [Watched("detector", lambda: 11, lambda: "up", 9401, log), Watched("replay", lambda: None, lambda: "waiting")]
    v = LiveView("127.0.0.1:9092", watched, title="osad up --demo", notes=["demo: a note"])
    v.shared.probes["detector"] = [Probe(1.0, {IN: 10.0, OUT: 10.0}, {"status": "ok"}),
                                   Probe(2.0, {IN: 30.0, OUT: 20.0}, {"status": "ok"})]
    v.shared.errors["detector"] = error_lines(log.read_text())
    v.shared.samples["SMD/machine-1-6"] = (_sample("SMD/machine-1-6", 3, f01=0.5, f02=0.25), time.monotonic())
    v.shared.scores["SMD/machine-1-6"] = _score("SMD/machine-1-6", 42.0)
    v.anomalies.add(Anomaly(entity_id="SMD/machine-1-6", host="replay", anomaly_id="a" * 32, revision=0,
                            status="open", severity="high", start_ts=1.0, last_ts=2.0, score=4.0, threshold=1.0,
                            models=["cs-calibrated:h=10"], root_causes=[], summary="s"))
    out = io.StringIO()
    Console(file=out, width=220).print(v.render())
    text = out.getvalue()
    for want in ("osad up --demo", "demo: a note", "detector", "20", "waiting", "SMD/machine-1-6", "f01=0.5", "42",
                 "anomalies: 1 open, 1 seen", "high", "detector reports an error", "checkpoint broken"):
        assert want in text, (want, text)


def test_a_frame_that_cannot_be_drawn_says_so():
    v = LiveView("x:1", [Watched("bad", lambda: 1 / 0, lambda: "up")])
    assert "could not draw" in str(v.render())


# -- the demo's plan and options -----------------------------------------------------------------

def test_label_segments_and_the_demo_plan():
    labels = [0] * 1000
    labels[400:406] = [1] * 6
    labels[700:730] = [1] * 30
    assert label_segments(labels) == [(400, 405), (700, 729)]
    p = plan_demo("D", "m", 5000, labels, rate=20.0)
    need_train = 100 + 10 * (DEMO_CS_CALIBRATE + DEMO_CALIBRATION_SCORES + 5)
    assert p.train_skip == 5000 - need_train
    assert p.test_skip == 400 - 100 - DEMO_LEAD_ROWS  # a window span and a lead before the anomaly
    assert p.segments[0] == (400, 405)
    assert p.due_s(700) > p.due_s(400)
    lines = "\n".join(p.describe("var"))
    assert "anomaly labelled at rows 400..405" in lines and "expect an incident in ~" in lines
    assert "collector is not started" in lines
    early = [0] * 1000
    early[50] = 1
    assert plan_demo("D", "m", 5000, early, 20.0).test_skip == 0  # train and test rows then follow each other
    with pytest.raises(ConfigError, match="train rows"):
        plan_demo("D", "m", 300, labels, 20.0)
    with pytest.raises(ConfigError, match="no anomaly"):
        plan_demo("D", "m", 5000, [0] * 10, 20.0)


def test_bad_options_are_named(tmp_path, capsys):
    from osad.cli import main

    base = ["up", "--log-dir", str(tmp_path / "logs"), "--state-dir", str(tmp_path / "state")]
    assert main(base + ["--demo", "--demo-dataset", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--demo-dataset" in err and "no such folder" in err
    assert main(base + ["--only", "featurizer,nosuch"]) == 2
    assert "--only: no service nosuch" in capsys.readouterr().err
    assert main(base + ["--demo", "--replay", str(tmp_path)]) == 2
    assert "--demo replays its own data set" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--demo-rate", "0"])
    assert "--demo-rate" in capsys.readouterr().err


def test_the_demo_data_is_the_repository_slice_and_an_install_without_it_says_what_to_pass(tmp_path):
    from osad.up import DEMO_DATASET_IN_REPO, demo_dataset

    assert demo_dataset() == ROOT / DEMO_DATASET_IN_REPO  # beside the package's source folder (editable install)
    with pytest.raises(ConfigError, match="--demo-dataset DIR") as e:
        demo_dataset(tmp_path / "site-packages" / "osad")  # a wheel install: no tests/ around it
    assert "not in the package" in str(e.value)


def test_demo_entity_must_exist(tmp_path, capsys, datasets_dir):
    from osad.cli import main

    assert main(["up", "--demo", "--demo-dataset", str(datasets_dir / "SMD"), "--demo-entity", "machine-9-9",
                 "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--demo-entity machine-9-9" in err and "machine-1-6" in err


# -- the demo, for real --------------------------------------------------------------------------

@pytest.mark.broker
@pytest.mark.slow
def test_demo_shows_an_anomaly_of_the_replayed_entity_within_two_minutes(tmp_path, monkeypatch):
    from osad.alerter.store import StoreError, open_store
    from osad.runtime.broker import free_port

    monkeypatch.delenv("OSAD_TOPIC_PREFIX", raising=False)
    bport, mport = free_port(), free_port()
    state = tmp_path / "state"
    out = open(tmp_path / "up.log", "wb")
    p = subprocess.Popen(
        [sys.executable, "-m", "osad", "up", "--demo", "--no-view", "--run-for-s", "600",  # its default data
         "--broker-port", str(bport), "--metrics-base-port", str(mport),
         "--log-dir", str(tmp_path / "logs"), "--state-dir", str(state)],
        stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def anomalies():
        assert p.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        try:
            st = open_store(f"sqlite:///{state}/demo/anomalies.db", readonly=True)
        except StoreError:
            return None  # the alerter has not created it yet
        try:
            return st.list(entity="SMD/machine-1-6")
        finally:
            st.close()

    try:
        found = wait_until(anomalies, 120, every_s=0.5, what="an anomaly of SMD/machine-1-6 in the demo's store")
        assert found[0].entity_id == "SMD/machine-1-6"
        text = (tmp_path / "up.log").read_text()
        assert "anomaly labelled at rows" in text and "collector is not started" in text
        assert "from " + str(ROOT / "tests" / "data" / "datasets" / "SMD") in text  # the repository's slice
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(60)
        out.close()
    assert rc == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert "osad up: stopped" in (tmp_path / "up.log").read_text()
