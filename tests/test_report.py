"""`osad report`: the figure builder on synthetic data, the writers, JSONL and the real broker, bad input."""

from __future__ import annotations

import math
import struct
import sys

import pytest

from osad.alerter.report import (DPI, Collected, build_figure, choose_features, figure_size, load_kafka, load_store,
                            resolve_thresholds, stored_thresholds, write_report)
from osad.alerter.store import open_store
from osad.cli import main
from osad.schemas import SAMPLES, SCORES, Anomaly, RootCause, Sample, Score, encode
from tests.conftest import wait_until

T0 = 1_700_000_000.0
A, B = "h/7@100", "h/8@200"
MODEL = "cs-jumpstarter:v1"


def samples(entity: str = A, n: int = 120) -> list[Sample]:
    """One sample a second; minor_faults barely moves except a small bump at 60..80 s (the anomaly)."""
    out = []
    for i in range(n):
        out.append(Sample(entity_id=entity, host="h", pid=7, comm="worker", ts=T0 + i, interval_s=1.0, seq=i,
                          metrics={"on_cpu_ns": 1e8 * (1 + math.sin(i / 5)), "rss_anon_bytes": 1e9 + 1e8 * (i % 7),
                                   "syscalls": 1000.0 + 900 * (i % 2), "threads": 4.0,
                                   "minor_faults": 1000.0 + (30.0 if 60 <= i < 80 else 0.0)}))
    return out


def scores(entity: str = A, n: int = 12, threshold: float | None = None) -> list[Score]:
    return [Score(entity_id=entity, host="h", pid=7, comm="worker", window_end_ts=T0 + 10 * (k + 1),
                  window_end_seq=10 * (k + 1), interval_s=1.0, gap=10, model_id=MODEL,
                  score=3.0 if 6 <= k < 8 else 0.2, threshold=threshold, features=["minor_faults"],
                  contributions=[1.0]) for k in range(n)]


def anomaly(entity: str = A, aid: str = "ab" * 16, status: str = "closed") -> Anomaly:
    return Anomaly(entity_id=entity, host="h", pid=7, comm="worker", anomaly_id=aid, revision=2, status=status,
                   severity="high", start_ts=T0 + 60, last_ts=T0 + 80, end_ts=T0 + 80 if status == "closed" else None,
                   score=3.0, threshold=0.9, models=[MODEL],
                   root_causes=[RootCause(feature="minor_faults", contribution=0.8),
                                RootCause(feature="syscalls", contribution=0.2)],
                   summary="worker: over threshold", max_ratio=3.3, first_window_seq=70, windows_over=2)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# -- pure part -----------------------------------------------------------------------------------

def test_features_put_root_causes_first_then_the_most_variable():
    s = samples()
    # minor_faults is the least variable metric, but the anomaly names it first (then syscalls)
    assert choose_features(s, [anomaly()], limit=3) == ["minor_faults", "syscalls", "on_cpu_ns"]
    assert "threads" not in choose_features(s, [], limit=10)  # constant: nothing to see
    assert choose_features(s, [], limit=2) == ["on_cpu_ns", "syscalls"]  # by coefficient of variation
    assert choose_features(s, [anomaly()], override=["threads"]) == ["threads"]


def test_thresholds_override_then_alerter_state_then_score():
    sc = scores(threshold=0.7)
    assert resolve_thresholds(sc)[MODEL].value == 0.7
    assert resolve_thresholds(sc, {MODEL: 0.5})[MODEL].source == "alerter state"
    t = resolve_thresholds(sc, {MODEL: 0.5}, {"cs-jumpstarter": 2.0})[MODEL]
    assert (t.value, t.source) == (2.0, "--threshold")
    assert resolve_thresholds(scores()) == {}
    assert stored_thresholds({"streams": {MODEL: {"judged_threshold": None, "threshold": 0.4}}}) == {MODEL: 0.4}


def test_png_and_html_from_the_figure_builder(tmp_path):
    an = [anomaly(), anomaly(aid="cd" * 16, status="update")]
    fig = build_figure(A, samples(), scores(), an, thresholds={MODEL: 0.9}, max_features=4)
    png = write_report(fig, tmp_path / "r.png", A, an)
    w, h = figure_size(4, 1)
    assert png.is_file() and png_size(png.read_bytes()) == (round(w * DPI), round(h * DPI))
    page = write_report(fig, tmp_path / "sub" / "r.html", A, an).read_text()
    assert "data:image/png;base64," in page and "ab" * 16 in page and "cd" * 16 in page
    assert "minor_faults (80%)" in page and "open (last 2023-11-14 22:14:40)" in page


def test_the_html_report_lists_the_trace_lines_around_each_anomaly(tmp_path, capsys):
    """--traces FILE (the collector's --trace-output): the lines of the anomaly's process from 30 s before it to 30 s
    after it, in time order; other processes' and other times' lines left out."""
    import json

    from osad.alerter.report import load_traces, traces_around

    f = tmp_path / "traces.jsonl"
    rows = [{"ts": T0 + 70, "pid": 7, "tid": 7, "event": "entry", "text": "Enter search, n=<3>"},
            {"ts": T0 + 35, "pid": 7, "tid": 8, "event": "return", "text": "search returned 2"},
            {"ts": T0 + 10, "pid": 7, "tid": 7, "event": "entry", "text": "too early"},
            {"ts": T0 + 70, "pid": 9, "tid": 9, "event": "entry", "text": "another process"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    an = [anomaly()]
    around = traces_around(load_traces(str(f)), an)
    assert [t["text"] for t in around[an[0].anomaly_id]] == ["search returned 2", "Enter search, n=<3>"]
    fig = build_figure(A, samples(), scores(), an, max_features=2)
    page = write_report(fig, tmp_path / "r.html", A, an, around).read_text()
    assert "Trace lines around each anomaly" in page and "Enter search, n=&lt;3&gt;" in page  # escaped
    assert "too early" not in page and "another process" not in page


def test_figure_without_samples_or_scores_still_draws(tmp_path):
    fig = build_figure(A, [], [], [anomaly()])
    assert png_size(write_report(fig, tmp_path / "a.png", A).read_bytes()) == tuple(
        round(x * DPI) for x in figure_size(0, 0))


def test_time_bounds_keep_overlapping_anomalies():
    c = Collected(A, since=T0 + 70, until=T0 + 100)
    for m in samples() + scores() + [anomaly()]:
        c.add(m)
    assert [s.seq for s in c.samples] == list(range(70, 101))
    assert [s.window_end_seq for s in c.scores] == [70, 80, 90, 100] and list(c.anomalies) == ["ab" * 16]
    c = Collected(A, since=T0 + 81)
    c.add(anomaly())
    assert not c.anomalies


# -- the command ---------------------------------------------------------------------------------

def test_report_from_jsonl_files(tmp_path, capsys):
    f = tmp_path / "run.jsonl"
    lines = [encode(m) for m in samples() + samples(B) + scores() + [anomaly(), anomaly(B, "ef" * 16)]]
    f.write_bytes(b"\n".join(lines + [b"{not json", b'{"kind": "sample", "entity_id": "h/7@100"}']) + b"\n")
    out = tmp_path / "r.html"
    assert main(["report", A, "--from-jsonl", str(f), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "read 241 samples, 12 scores and 2 anomaly states of 2 entities" in err
    assert "skipped 2 malformed messages" in err
    page = out.read_text()
    assert "ab" * 16 in page and "ef" * 16 not in page and "data:image/png;base64," in page


def test_bad_input_exits_with_a_message(tmp_path, capsys):
    f = tmp_path / "run.jsonl"
    f.write_bytes(b"\n".join(encode(m) for m in samples()[:5] + samples(B)[:3]) + b"\n")
    assert main(["report", A, "--from-jsonl", str(f), "--out", str(tmp_path / "r.pdf")]) == 2
    assert "must end in .png" in capsys.readouterr().err
    assert main(["report", A, "--from-jsonl", str(f)]) == 2
    assert "--out report.png" in capsys.readouterr().err
    assert main(["report", "nobody", "--from-jsonl", str(f), "--out", str(tmp_path / "r.png")]) == 1
    err = capsys.readouterr().err
    assert "no samples, scores or anomalies of 'nobody'" in err and A in err and B in err
    assert not (tmp_path / "r.png").exists()
    assert main(["report", A, "--from-jsonl", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r.png")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_matplotlib_missing_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["report", A, "--from-jsonl", str(tmp_path), "--out", str(tmp_path / "r.png")]) == 2
    assert "pip install 'osad[detector]'" in capsys.readouterr().err


def test_broker_unreachable(tmp_path, capsys):
    from osad.runtime.broker import free_port

    rc = main(["report", A, "--out", str(tmp_path / "r.png"), "--bootstrap", f"127.0.0.1:{free_port()}",
               "--connect-timeout-s", "1", "--store", f"sqlite:///{tmp_path}/none.db"])
    assert rc == 1 and "no Kafka broker answered" in capsys.readouterr().err


@pytest.mark.broker
def test_report_from_the_broker_and_the_store(broker, topic_prefix, tmp_path, capsys):
    from osad.runtime.kafka import ensure_topics, make_producer

    ensure_topics(broker.bootstrap, (SAMPLES, SCORES), prefix=topic_prefix)
    prod = make_producer(broker.bootstrap, "test-report")
    for topic, msgs in ((SAMPLES, samples() + samples(B, 30)), (SCORES, scores() + scores(B, 3))):
        for m in msgs:
            prod.send(topic.full_name(topic_prefix), key=m.entity_id.encode(), value=encode(m))
    prod.send(SAMPLES.full_name(topic_prefix), key=A.encode(), value=b"not a sample")
    prod.flush()
    prod.close()
    url = f"sqlite:///{tmp_path}/anomalies.db"
    store = open_store(url)
    store.save([anomaly(), anomaly(B, "ef" * 16)], {A: {"streams": {MODEL: {"judged_threshold": 0.9}}}})
    store.close()
    store = open_store(url, readonly=True)
    assert load_store(store, Collected(A)) == {MODEL: 0.9}  # the threshold the alerter judged with
    store.close()

    def load() -> Collected | None:
        c = Collected(A)
        load_kafka(broker.bootstrap, c, prefix=topic_prefix, idle_ms=500)
        return c if len(c.samples) == 120 and len(c.scores) == 12 else None
    got = wait_until(load, timeout_s=60, what="the entity's samples and scores on the topics")
    assert {m.entity_id for m in got.samples + got.scores} == {A}  # B's messages dropped by key
    assert got.counts[B]["sample"] == 30 and got.counts[B]["score"] == 3 and got.skipped == 1

    common = ["--bootstrap", broker.bootstrap, "--store", url, "--idle-ms", "500"]
    out = tmp_path / "r.html"
    assert main(["report", A, "--out", str(out), *common]) == 0
    err = capsys.readouterr().err
    assert "read 151 samples, 15 scores and 1 anomaly state of 2 entities" in err, err
    assert "skipped 1 malformed message" in err and f"{A}: 120 samples, 12 scores, 1 anomaly" in err
    page = out.read_text()
    assert "ab" * 16 in page and "ef" * 16 not in page

    assert main(["report", *common]) == 2
    err = capsys.readouterr().err
    assert A in err and B in err and "give one: osad report ENTITY" in err
    assert main(["report", "nobody", "--out", str(tmp_path / "n.png"), *common]) == 1
    err = capsys.readouterr().err
    assert "of 'nobody'" in err and f"topic {topic_prefix}osad.samples" in err and B in err


def test_docstring_examples_run():
    import doctest

    from osad.alerter import report
    r = doctest.testmod(report)
    assert r.attempted > 0 and r.failed == 0
