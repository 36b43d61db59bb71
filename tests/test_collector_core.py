"""The collector's functional core, without BPF: made-up map readings in, per-entity metrics out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from osad.collector.bpf.uprobes import ProbeSpec, unique_labels
from osad.collector.core import Birth, Entity, ExitRecord, Report, Snapshot, Tracker, select
from osad.collector.metrics import HEAP_METRICS, METRICS, PROBE_METRICS
from osad.collector.procfs import FALLBACK_COUNTERS, FALLBACK_GAUGES, NS_PER_TICK, ProcStat, parse_stat
from osad.collector.sinks import CsvSink, JsonlSink, parse_output, read_csv, SinkError
from osad.collector.targets import TargetError, build
from osad.schemas import Sample, decode

ROOT = Path(__file__).resolve().parent.parent
COUNTERS = ("on_cpu_ns", "syscalls")


class FakeProc:
    """What /proc would say: {(pid, tid): ProcStat}."""

    def __init__(self):
        self.tasks: dict[tuple[int, int | None], ProcStat] = {}

    def add(self, pid, start_ticks, comm="app", tid=None, state="S", threads=1):
        self.tasks[(pid, tid)] = ProcStat(comm, state, 1, 0, 0, 0, 0, threads, start_ticks)

    def remove(self, pid, tid=None):
        self.tasks.pop((pid, tid), None)

    def stat(self, pid, tid=None):
        return self.tasks.get((pid, tid))

    def comm(self, pid, tid=None):
        st = self.tasks.get((pid, tid))
        return st.comm if st else None

    def cgroup(self, pid):
        return None, None

    def rss(self, pid):
        return {}


def tracker(proc, **kw) -> Tracker:
    return Tracker("h", counter_names=COUNTERS, reader=proc, **kw)


def live(**entries):
    """live(sched={key: (tgid, {...})})"""
    return entries


def by_id(reports):
    return {r.entity.entity_id: r for r in reports}


def test_counters_become_interval_deltas():
    proc = FakeProc()
    proc.add(100, 5000)
    t = tracker(proc)
    r1, _, _ = t.ingest(Snapshot(live={"sched": {100: (100, {"on_cpu_ns": 100})}}))
    r2, _, _ = t.ingest(Snapshot(live={"sched": {100: (100, {"on_cpu_ns": 250})}}))
    r3, _, _ = t.ingest(Snapshot(live={"sched": {100: (100, {"on_cpu_ns": 250})}}))
    assert [r.metrics["on_cpu_ns"] for r in (r1[0], r2[0], r3[0])] == [100, 150, 0]
    assert r1[0].metrics["syscalls"] == 0  # a watched family with no event: a real zero
    assert r1[0].entity.entity_id == "h/100@5000"
    assert not r1[0].final


def test_gauges_are_latest_values_and_only_on_processes():
    proc = FakeProc()
    proc.add(7, 10)
    t = tracker(proc)
    r, _, _ = t.ingest(Snapshot(live={"sched": {7: (7, {"on_cpu_ns": 1})}}, rss={7: {"rss_anon_bytes": 4096}},
                                threads={7: 3}))
    assert r[0].metrics["rss_anon_bytes"] == 4096 and r[0].metrics["threads"] == 3
    r, _, _ = t.ingest(Snapshot(live={"sched": {7: (7, {"on_cpu_ns": 1})}}, rss={7: {"rss_anon_bytes": 8192}}))
    assert r[0].metrics["rss_anon_bytes"] == 8192 and r[0].metrics["threads"] == 3
    assert "rss_file_bytes" not in r[0].metrics  # never reported: absent, not zero


def test_exit_reports_final_then_evicts():
    proc = FakeProc()
    proc.add(50, 900)
    t = tracker(proc)
    t.ingest(Snapshot(live={"sched": {50: (50, {"on_cpu_ns": 10})}}))
    proc.remove(50)
    r, _, _ = t.ingest(Snapshot(exits=[ExitRecord(50, 10**9, 50, True, 0, "app")],
                                dead={"sched": [(50, 10**9, 50, {"on_cpu_ns": 40})]}))
    assert len(r) == 1 and r[0].final and r[0].metrics["on_cpu_ns"] == 30
    r, _, _ = t.ingest(Snapshot())
    assert r == [] and t.alive() == []


def test_pid_reuse_within_one_interval_keeps_entities_apart():
    """Old process P exits and a new one gets pid P before the next drain."""
    proc = FakeProc()
    proc.add(42, 1000)
    t = tracker(proc)
    t.ingest(Snapshot(live={"sched": {42: (42, {"on_cpu_ns": 5})}}))
    new_birth = 2000 * NS_PER_TICK + 123
    proc.add(42, 2000)  # /proc now shows the new process
    r, _, _ = t.ingest(Snapshot(
        exits=[ExitRecord(42, new_birth - 10, 42, True, 0, "old")],
        births={42: Birth(new_birth, 1)},
        dead={"sched": [(42, new_birth - 10, 42, {"on_cpu_ns": 105})]},
        live={"sched": {42: (42, {"on_cpu_ns": 7})}}))
    got = by_id(r)
    assert set(got) == {"h/42@1000", "h/42@2000"}
    assert got["h/42@1000"].metrics["on_cpu_ns"] == 100 and got["h/42@1000"].final
    assert got["h/42@2000"].metrics["on_cpu_ns"] == 7 and not got["h/42@2000"].final
    r, _, _ = t.ingest(Snapshot(births={42: Birth(new_birth, 1)}, live={"sched": {42: (42, {"on_cpu_ns": 9})}}))
    assert [(x.entity.entity_id, x.metrics["on_cpu_ns"]) for x in r] == [("h/42@2000", 2)]


def test_pid_reused_twice_before_a_drain_by_registered_processes():
    """Two processes started (registered) one after the other with the same pid, both exited."""
    proc = FakeProc()
    proc.add(9, 100)
    t = tracker(proc, report_idle=True)
    t.register(9)
    proc.add(9, 150)
    t.register(9)  # same pid, later start time: a second process
    proc.remove(9)
    r, _, _ = t.ingest(Snapshot(
        exits=[ExitRecord(9, 1000, 9, True, 0), ExitRecord(9, 2000, 9, True, 0)],
        dead={"sched": [(9, 2000, 9, {"on_cpu_ns": 20}), (9, 1000, 9, {"on_cpu_ns": 100})]}))
    got = {x.entity.entity_id: x.metrics["on_cpu_ns"] for x in r}
    assert got == {"h/9@100": 100, "h/9@150": 20}
    assert all(x.final for x in r)


def test_process_born_and_dead_between_drains_is_identified_by_its_birth():
    proc = FakeProc()
    t = tracker(proc)
    birth = 777 * NS_PER_TICK + 5
    r, _, _ = t.ingest(Snapshot(exits=[ExitRecord(300, birth + 10**6, 300, True, birth, "short")],
                                dead={"sched": [(300, birth + 10**6, 300, {"on_cpu_ns": 3})]}))
    assert [(x.entity.entity_id, x.entity.comm, x.final) for x in r] == [("h/300@777", "short", True)]


def test_counts_written_after_an_exit_are_orphans():
    proc = FakeProc()
    proc.add(60, 1)
    t = tracker(proc)
    t.ingest(Snapshot(live={"sched": {60: (60, {"on_cpu_ns": 1})}}))
    proc.add(60, 1, state="Z")
    r, orphans, _ = t.ingest(Snapshot(exits=[ExitRecord(60, 5, 60, True, 0)],
                                      dead={"sched": [(60, 5, 60, {"on_cpu_ns": 2})]},
                                      live={"sched": {60: (60, {"on_cpu_ns": 1})}}))  # written after the move
    assert len(r) == 1 and r[0].metrics["on_cpu_ns"] == 1 and orphans == {}
    r, orphans, _ = t.ingest(Snapshot(live={"sched": {60: (60, {"on_cpu_ns": 1})}}))
    assert r == [] and orphans == {"sched": [60]}  # unchanged for an interval: delete it


def test_threads_add_up_to_their_process():
    proc = FakeProc()
    proc.add(10, 500, threads=2)
    proc.add(10, 500, tid=10)
    proc.add(10, 501, tid=11)
    t = tracker(proc, per_thread=True)
    r, _, _ = t.ingest(Snapshot(live={"sched": {10: (10, {"on_cpu_ns": 3}), 11: (10, {"on_cpu_ns": 4})}}))
    got = by_id(r)
    assert got["h/10@500"].metrics["on_cpu_ns"] == 7
    assert got["h/10@500/t10"].metrics["on_cpu_ns"] == 3 and got["h/10@500/t11"].metrics["on_cpu_ns"] == 4
    # thread 11 exits, then the whole process
    r, _, _ = t.ingest(Snapshot(exits=[ExitRecord(11, 9, 10, False, 0)], dead={"sched": [(11, 9, 10, {"on_cpu_ns": 6})]},
                                live={"sched": {10: (10, {"on_cpu_ns": 3})}}))
    got = by_id(r)
    assert got["h/10@500/t11"].final and got["h/10@500/t11"].metrics["on_cpu_ns"] == 2
    assert not got["h/10@500"].final and got["h/10@500"].metrics["on_cpu_ns"] == 2
    r, _, _ = t.ingest(Snapshot(exits=[ExitRecord(10, 20, 10, True, 0)], dead={"sched": [(10, 20, 10, {"on_cpu_ns": 5})]}))
    got = by_id(r)
    assert got["h/10@500"].final and got["h/10@500/t10"].final and got["h/10@500"].metrics["on_cpu_ns"] == 2
    assert t.alive() == []


def _rep(pid, cpu, comm="x", tid=None, parent=None):
    e = Entity("h", pid, 1, tid=tid, parent=parent, comm=comm)
    return Report(e, {"on_cpu_ns": cpu}, False)


def test_select_caps_by_cpu_and_filters_by_comm():
    reps = [_rep(i, cpu, comm=f"c{i}") for i, cpu in enumerate([5, 50, 1, 40, 30])]
    thread = _rep(1, 9, tid=77, parent=reps[1].entity)
    out = select(reps + [thread], max_entities=2, comm_filter=None)
    assert [r.entity.pid for r in out if r.entity.tid is None] == [1, 3]
    assert thread in out
    threads = [_rep(1, c, tid=100 + c, parent=reps[1].entity) for c in (1, 7, 3)]
    out = select(reps + threads, max_entities=2, comm_filter=None)
    assert [r.entity.tid for r in out if r.entity.tid is not None] == [107, 103]  # threads capped too
    out = select(reps, max_entities=10, comm_filter=re.compile(r"^c[02]$"))
    assert sorted(r.entity.pid for r in out) == [0, 2]


def test_parse_stat_with_odd_comm():
    text = "123 (a (b) c) S 1 123 123 0 -1 4194560 10 0 2 0 7 3 0 0 20 0 4 0 98765 1000 100 " + "0 " * 30
    st = parse_stat(text)
    assert st.comm == "a (b) c" and st.ppid == 1 and st.minflt == 10 and st.majflt == 2
    assert st.utime == 7 and st.stime == 3 and st.num_threads == 4 and st.start_ticks == 98765


def test_own_stat_is_read():
    from osad.collector.procfs import read_stat

    st = read_stat(os.getpid())
    assert st is not None and st.start_ticks > 0 and st.num_threads >= 1


def _sample(seq, metrics):
    return Sample(entity_id="h/1@2", host="h", pid=1, comm="c", ts=1.5, interval_s=1.0, seq=seq, metrics=metrics)


def test_jsonl_and_csv_outputs(tmp_path):
    j = JsonlSink(str(tmp_path / "a.jsonl"))
    j.write([_sample(0, {"on_cpu_ns": 5.0}), _sample(1, {"on_cpu_ns": 2.5})])
    j.close()
    back = [decode(line.encode(), Sample) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [s.seq for s in back] == [0, 1] and back[1].metrics == {"on_cpu_ns": 2.5}
    c = CsvSink(str(tmp_path / "a.csv"), ["on_cpu_ns", "rss_anon_bytes"])
    c.write([_sample(0, {"on_cpu_ns": 5.0}), _sample(1, {"on_cpu_ns": 2.5, "rss_anon_bytes": 4096.0})])
    c.close()
    rows = read_csv((tmp_path / "a.csv").read_text())
    assert rows[0]["on_cpu_ns"] == "5" and rows[0]["rss_anon_bytes"] == "" and rows[1]["rss_anon_bytes"] == "4096"
    assert parse_output("kafka") == ("kafka", None) and parse_output("csv:-") == ("csv", "-")
    with pytest.raises(SinkError):
        parse_output("jsonl")


def test_metrics_are_documented():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for m in METRICS + PROBE_METRICS + HEAP_METRICS:
        assert f"`{m.name}`" in doc, f"{m.name} is not documented in docs/metrics.md"
    names = {m.name for m in METRICS}
    assert set(FALLBACK_COUNTERS) | set(FALLBACK_GAUGES) <= names  # the fallback uses the same names
    for m in METRICS:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", m.name)


def test_metric_catalogue_matches_the_families():
    from osad.collector.bpf.block import Block
    from osad.collector.bpf.mem import RSS_KINDS, Mem
    from osad.collector.bpf.net import Net
    from osad.collector.bpf.proc import Proc
    from osad.collector.bpf.sched import Sched
    from osad.collector.bpf.syscalls import Syscalls

    counters = {n for cls in (Sched, Net, Proc, Mem, Block) for n in cls.counters}
    from osad.collector.bpf.syscalls import CLASS_COUNTERS

    counters |= {"syscalls", "syscalls_failed", "syscall_time_ns", "read_bytes", "write_bytes", *CLASS_COUNTERS}
    from osad.collector.procfs import PROCESS_GAUGES

    assert counters | set(RSS_KINDS) | {"threads"} | set(PROCESS_GAUGES) == {m.name for m in METRICS}
    assert {m.name for m in METRICS if m.family == "procfs"} == set(PROCESS_GAUGES)
    assert Syscalls.name == "syscalls"


def test_probe_specs():
    p = ProbeSpec.parse("c:malloc")
    assert (p.binary, p.function, p.label) == ("c", "malloc", "malloc")
    assert p.metric_names() == ("uprobe_malloc_calls", "uprobe_malloc_time_ns")
    for bad in ("malloc", ":f", "/no/such/binary:f", "c:not a symbol"):
        with pytest.raises(ValueError):
            ProbeSpec.parse(bad)
    a, b = unique_labels([ProbeSpec("c", "read", "read"), ProbeSpec("/usr/lib/libz.so", "read", "read")])
    assert a.label == "read" and b.label == "libz_so_read"


def test_target_options():
    with pytest.raises(TargetError, match="exactly one"):
        build()
    with pytest.raises(TargetError, match="exactly one"):
        build(pids=["1"], all_=True)
    with pytest.raises(TargetError, match="not a process id"):
        build(pids=["abc"])
    with pytest.raises(TargetError, match="regular expression"):
        build(comm="(")
    spec = build(pids=[f"{os.getpid()},1"], follow_children=True)
    assert spec.pids == [os.getpid(), 1] and spec.kernel_filter
    assert not build(comm="^py").kernel_filter and build(command="sleep 1").command == ["sleep", "1"]


def test_cli_help_is_fast_and_needs_no_bcc():
    code = ("import sys, time; t = time.time(); from osad.cli import build_parser; build_parser(); "
            "assert 'bcc' not in sys.modules, 'bcc imported by --help'; print(time.time() - t)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr


def test_not_root_falls_back_with_the_reason():
    """A user without privileges gets /proc samples and a one-line reason."""
    import shutil
    import tempfile

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to start a process as another user")
    tmp_path = Path(tempfile.mkdtemp(prefix="osad-nonroot-"))  # pytest's tmp_path is private to root
    os.chmod(tmp_path, 0o777)
    out = tmp_path / "s.jsonl"
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "osad",
                        "collect", "--command", "sleep 0.3", "--interval", "0.1", "--output", f"jsonl:{out}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    if r.returncode != 0 and ("Permission denied" in r.stderr or "No module named" in r.stderr):
        pytest.skip("the virtual environment is not readable by an unprivileged user here")
    assert r.returncode == 0, r.stderr
    why = [ln for ln in r.stderr.splitlines() if "eBPF unavailable" in ln]
    assert len(why) == 1 and "not root" in why[0] and "CAP_BPF" in why[0]
    assert out.read_text().strip()
    shutil.rmtree(tmp_path, ignore_errors=True)
