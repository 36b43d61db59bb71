"""``osad collect`` as a command: the /proc fallback, --require-ebpf, file outputs, and Samples
read back from the real embedded broker."""

from __future__ import annotations

import os
import subprocess

import pytest

from osad.collector.procfs import FALLBACK_COUNTERS, FALLBACK_GAUGES, PROCESS_GAUGES
from osad.collector.sinks import read_csv
from conftest import osad_cmd
from osad.schemas import SAMPLES, Sample, decode
from test_collector_workload import build_workload

NO_EBPF = {"OSAD_COLLECTOR_FORCE_NO_EBPF": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(build_workload(tmp_path_factory.mktemp("work")))


def collect(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(osad_cmd("collect", *args), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def jsonl(path) -> list[Sample]:
    return [decode(line.encode(), Sample) for line in path.read_text().splitlines() if line.strip()]


def test_fallback_says_why_in_one_line_and_samples_proc(tmp_path, work):
    out = tmp_path / "s.jsonl"
    r = collect("--command", f"{work} burn 400", "--interval", "0.1", "--output", f"jsonl:{out}", env=NO_EBPF)
    assert r.returncode == 0, r.stderr
    why = [ln for ln in r.stderr.splitlines() if "eBPF unavailable" in ln]
    assert len(why) == 1, r.stderr
    assert "OSAD_COLLECTOR_FORCE_NO_EBPF=1" in why[0] and "falling back to /proc" in why[0]
    samples = jsonl(out)
    assert samples, r.stderr
    assert [s.seq for s in samples] == list(range(len(samples)))
    allowed = set(FALLBACK_COUNTERS) | set(FALLBACK_GAUGES) | set(PROCESS_GAUGES)
    for s in samples:
        assert set(s.metrics) <= allowed, set(s.metrics) - allowed
        assert set(PROCESS_GAUGES) <= set(s.metrics)  # the /proc gauges are there in the fallback too
        assert "syscalls" not in s.metrics  # /proc cannot count them: absent, not zero
    # the last partial interval is lost in /proc sampling; the rest of the 400 ms is there
    cpu_ms = sum(s.metrics["on_cpu_ns"] for s in samples) / 1e6
    assert 150 <= cpu_ms <= 440, cpu_ms
    assert samples[0].metrics["threads"] == 1 and samples[0].metrics["rss_anon_bytes"] > 0


def test_require_ebpf_fails_with_the_reason(work):
    r = collect("--command", f"{work} burn 10", "--require-ebpf", "--output", "jsonl:-", env=NO_EBPF, timeout=60)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "eBPF unavailable" in lines[0] and "--require-ebpf" in lines[0], r.stderr
    assert r.stdout == ""


def test_target_options_are_checked():
    r = collect("--pid", "1", "--all", "--output", "jsonl:-", timeout=60)
    assert r.returncode == 2 and "exactly one of --pid, --command, --comm or --all" in r.stderr
    r = collect("--pid", "999999999", "--output", "jsonl:-", timeout=60)
    assert r.returncode == 2 and "no such process" in r.stderr
    r = collect("--all", "--output", "parquet:x", timeout=60)
    assert r.returncode == 2 and "jsonl:PATH or csv:PATH" in r.stderr
    r = collect("--all", "--probe", "nocolon", timeout=60)
    assert r.returncode == 2 and "BINARY:FUNCTION" in r.stderr


def test_help_describes_every_option():
    r = subprocess.run(osad_cmd("collect", "--help"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for opt in ("--pid", "--command", "--comm", "--all", "--follow-children", "--threads", "--probe", "--interval",
                "--max-processes", "--output", "--require-ebpf", "--duration", "--bootstrap"):
        assert opt in r.stdout


def test_csv_recording(tmp_path, work):
    out = tmp_path / "s.csv"
    r = collect("--command", f"{work} sleep 20", "--interval", "0.5", "--output", f"csv:{out}")
    assert r.returncode == 0, r.stderr
    rows = read_csv(out.read_text())
    assert rows and rows[0]["comm"] in ("work", "sh")
    assert "on_cpu_ns" in rows[0] and "rss_anon_bytes" in rows[0]
    assert [int(r["seq"]) for r in rows] == list(range(len(rows)))


@pytest.mark.broker
def test_samples_reach_the_samples_topic(broker, topic_prefix, work):
    """The collector publishes to the real broker; Samples decode with schemas.decode, keyed by entity."""
    from kafkautil import TopicReader

    r = collect("--command", f"{work} burn 300", "--interval", "0.2", "--bootstrap", broker.bootstrap)
    assert r.returncode == 0, r.stderr
    ebpf = "eBPF unavailable" not in r.stderr
    reader = TopicReader(broker.bootstrap, SAMPLES, prefix=topic_prefix)
    try:
        summary = [ln for ln in r.stderr.splitlines() if "collector stopped" in ln]
        n = int(summary[-1].split(" samples")[0].rsplit(" ", 1)[1])
        assert n >= 1, r.stderr
        recs = reader.read_until(lambda rs: len(rs) >= n, timeout_s=60, what=f"{n} samples")
        samples = [decode(m.value, Sample) for m in recs]
        assert all(m.key.decode() == s.entity_id for m, s in zip(recs, samples))
        ids = {s.entity_id for s in samples}
        assert len(ids) == 1
        assert sorted(s.seq for s in samples) == list(range(len(samples)))
        cpu_ms = sum(s.metrics["on_cpu_ns"] for s in samples) / 1e6
        if ebpf:  # every interval, the last one included, is counted
            assert abs(cpu_ms - 300) <= 30, cpu_ms
            first = min(samples, key=lambda s: s.seq)
            assert first.metrics["execs"] == 1.0, [(s.seq, s.metrics["execs"]) for s in samples]
    finally:
        reader.close()
