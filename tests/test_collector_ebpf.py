"""The eBPF collector on the real kernel: known workloads, measured values within tolerance.

Each test starts a workload program (tests/test_collector_workload.py) through the collector,
drains right before and right after the work (no sleeps, no wall-clock assertions) and compares
that interval's values with what the program did. Skipped only where BPF cannot load.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from osad.collector.bpf import unavailable_reason
from osad.collector.config import CollectorConfig
from osad.collector.ebpf_backend import EbpfUnavailable
from osad.collector.loop import Collector
from osad.collector.procfs import read_status
from osad.collector.targets import TargetSpec
from test_collector_workload import build_workload

pytestmark = pytest.mark.ebpf

MiB = 1 << 20


def _collector(**kw) -> Collector:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"eBPF cannot load here: {reason}")
    targets = kw.pop("targets", None) or TargetSpec(only_added=True, follow_children=kw.pop("follow", False))
    try:
        return Collector(CollectorConfig(require_ebpf=True, **kw), targets).start()
    except EbpfUnavailable as e:
        pytest.skip(f"eBPF cannot load here: {e}")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(build_workload(tmp_path_factory.mktemp("work")))


@pytest.fixture(scope="module")
def col():
    """Watches only the processes the tests start (kernel filter on)."""
    c = _collector()
    yield c
    c.close()


def of(samples, pid: int, threads: bool = False):
    return [s for s in samples if s.pid == pid and ("/t" in s.entity_id) == threads]


class Phased:
    """Run ``work MODE N phased``: drain before and after the work; ``.work`` is that interval's Sample."""

    def __init__(self, c: Collector, work: str, mode: str, n: int):
        self.c = c
        self.p = c.spawn([work, mode, str(n), "phased"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.samples = []      # the process's Samples
        self.all_samples = []  # with its threads' (--threads)
        assert self.p.stdout.readline() == b"ready\n"
        self.before = self._drain()
        self.status_before = read_status(self.p.pid)
        self._say()
        assert self.p.stdout.readline() == b"done\n"
        self.status_after = read_status(self.p.pid)
        self.work = self._drain()
        self._say()
        assert self.p.wait(60) == 0
        last = self.c.collect_once()
        self.all_samples += [s for s in last if s.pid == self.p.pid]
        self.after_exit = of(last, self.p.pid)
        self.samples += self.after_exit

    def _say(self):
        self.p.stdin.write(b"go\n")
        self.p.stdin.flush()

    def _drain(self):
        out = self.c.collect_once()
        self.all_samples += [s for s in out if s.pid == self.p.pid]
        got = of(out, self.p.pid)
        assert len(got) == 1, got
        self.samples += got
        return got[0]


def test_cpu_burn_on_cpu_time(col, work):
    """A child that burns 300 ms of CPU: on_cpu_ns within 10% of it and of its rusage."""
    p = col.spawn([work, "burn", "300"])
    _, status, ru = os.wait4(p.pid, 0)
    assert status == 0
    p.returncode = 0
    samples = of(col.collect_once(), p.pid)
    assert samples, "the exited process was not reported"
    on_cpu_ms = sum(s.metrics["on_cpu_ns"] for s in samples) / 1e6
    rusage_ms = (ru.ru_utime + ru.ru_stime) * 1e3
    assert abs(on_cpu_ms - 300) <= 30, (on_cpu_ms, rusage_ms)
    assert abs(on_cpu_ms - rusage_ms) <= 0.1 * rusage_ms, (on_cpu_ms, rusage_ms)
    # it exited: reported, then evicted
    assert of(col.collect_once(), p.pid) == []
    assert all(e.pid != p.pid for e in col.backend.tracker.alive())


def test_syscalls_counted(col, work):
    """20,000 getppid + 5,000 failing close(-1): counts within 2%."""
    ph = Phased(col, work, "syscalls", 20000)
    m = ph.work.metrics
    assert abs(m["syscalls"] - 25000) <= 0.02 * 25000, m
    assert abs(m["syscalls_failed"] - 5000) <= 0.02 * 5000, m
    assert m["syscall_time_ns"] > 0
    assert m["on_cpu_ns"] >= m["syscall_time_ns"] * 0.5  # getppid never blocks: mostly on CPU


def test_fresh_memory_grows_rss_anon(col, work):
    """Touching 64 MiB of fresh anonymous memory grows rss_anon_bytes by 64 MiB (within 10%)."""
    ph = Phased(col, work, "touch", 64)
    grown = ph.work.metrics["rss_anon_bytes"] - ph.before.metrics["rss_anon_bytes"]
    assert abs(grown - 64 * MiB) <= 0.1 * 64 * MiB, grown
    assert ph.work.metrics["page_faults_user"] >= 64 * MiB / (2 * MiB)  # one per page, or per huge page
    # /proc agrees with the gauge
    proc_grown = ph.status_after["rss_anon_bytes"] - ph.status_before["rss_anon_bytes"]
    assert abs(grown - proc_grown) <= 0.05 * 64 * MiB, (grown, proc_grown)
    for kind in ("rss_file_bytes", "rss_shmem_bytes", "rss_swap_bytes"):
        assert kind in ph.work.metrics
    # the mapping itself: virtual size and the data segment (a private writable mapping) grow by exactly it
    for gauge in ("vm_size_bytes", "vm_data_bytes"):
        g = ph.work.metrics[gauge] - ph.before.metrics[gauge]
        assert abs(g - 64 * MiB) <= 0.01 * 64 * MiB, (gauge, g)
    assert ph.work.metrics["page_tables_bytes"] > ph.before.metrics["page_tables_bytes"]  # 16,384 more PTEs
    assert ph.work.metrics["huge_pages_bytes"] == 0 and ph.work.metrics["vm_stack_bytes"] > 0


@pytest.mark.parametrize("mode,cls,calls", [("futex", "sync", 10000), ("mmap", "mmap", 20000),
                                            ("openclose", "fd", 20000)])
def test_system_calls_land_in_their_class(col, work, mode, cls, calls):
    """10,000 futex waits, 10,000 mmap/munmap pairs, 10,000 open/close pairs: each in its own class (within 2%),
    the other classes nearly empty, and the classes add up to all system calls."""
    from osad.collector.bpf.syscalls import CLASS_COUNTERS

    ph = Phased(col, work, mode, 10000)
    m = ph.work.metrics
    assert calls <= m[f"syscalls_{cls}"] <= 1.02 * calls, {k: m[k] for k in CLASS_COUNTERS}
    others = sum(m[k] for k in CLASS_COUNTERS if k != f"syscalls_{cls}")
    assert others <= 0.02 * calls, {k: m[k] for k in CLASS_COUNTERS}
    assert sum(m[k] for k in CLASS_COUNTERS) == m["syscalls"]


def test_direct_writes_count_as_block_bytes(col, work):
    """8 MiB written with O_DIRECT (and fsync'd) reach the block device: block_write_bytes of at least 8 MiB."""
    ph = Phased(col, work, "dwrite", 8)
    m = ph.work.metrics
    assert 8 * MiB <= m["block_write_bytes"] <= 8 * MiB + 1 * MiB, m["block_write_bytes"]  # plus metadata
    assert m["write_bytes"] >= 8 * MiB


def test_open_descriptors_gauge(col, work):
    """A process that opens 100 descriptors shows open_fds up by exactly 100."""
    ph = Phased(col, work, "fds", 100)
    assert ph.work.metrics["open_fds"] - ph.before.metrics["open_fds"] == 100, (ph.before.metrics, ph.work.metrics)
    assert ph.before.metrics["open_fds"] >= 3  # stdin, stdout, stderr


def test_loopback_tcp_bytes(col, work):
    """Sending 4 MiB over loopback TCP (and receiving it): net bytes within 5%."""
    ph = Phased(col, work, "tcp", 4 * MiB)
    m = ph.work.metrics
    assert abs(m["net_tx_bytes"] - 4 * MiB) <= 0.05 * 4 * MiB, m
    assert abs(m["net_rx_bytes"] - 4 * MiB) <= 0.05 * 4 * MiB, m
    assert m["unix_tx_bytes"] == 0


def test_sleep_loop_voluntary_switches(col, work):
    """50 sleeps of 1 ms: at least 50 voluntary switches, and the kernel's own count agrees."""
    ph = Phased(col, work, "sleep", 50)
    vol = ph.work.metrics["ctx_switches_voluntary"]
    assert vol >= 50
    proc_vol = ph.status_after["ctx_switches_voluntary"] - ph.status_before["ctx_switches_voluntary"]
    assert abs(vol - proc_vol) <= 2, (vol, proc_vol)
    assert ph.work.metrics["syscall_time_ns"] >= 50 * 1_000_000  # 50 nanosleeps of >= 1 ms


def test_samples_are_numbered_and_exit_evicts(col, work):
    ph = Phased(col, work, "sleep", 1)
    assert [s.seq for s in ph.samples] == list(range(len(ph.samples)))
    assert len({s.entity_id for s in ph.samples}) == 1
    st = ph.samples[0]
    assert st.entity_id.startswith(f"{col.host}/{ph.p.pid}@")
    assert st.comm == "work"
    assert all(s.interval_s > 0 for s in ph.samples)
    assert of(col.collect_once(), ph.p.pid) == []


def test_pid_reuse_never_merges(col, work):
    """A pid reused by a second process before the collector drains: two entities, counts apart."""
    a = col.spawn([work, "burn", "100"])
    assert a.wait(60) == 0
    pid = a.pid
    b = None
    for _ in range(30):  # ask the kernel for the same pid again (ns_last_pid); others may fork first
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError as e:
            pytest.skip(f"cannot steer pid allocation to force a reuse: {e}")
        cand = col.spawn([work, "burn", "20"])
        if cand.pid == pid:
            b = cand
            break
        cand.wait(60)
    if b is None:
        pytest.skip("could not get the same pid twice (other processes kept taking it)")
    assert b.wait(60) == 0
    got = of(col.collect_once(), pid)  # both exited since the last drain
    ids = {s.entity_id for s in got}
    assert len(ids) == 2, got
    cpu = {s.entity_id: s.metrics["on_cpu_ns"] / 1e6 for s in got}
    first, second = sorted(cpu, key=lambda e: int(e.rsplit("@", 1)[1]))
    assert abs(cpu[first] - 100) <= 10 and abs(cpu[second] - 20) <= 5, cpu


def test_forks_and_short_lived_children(work):
    """--follow-children: children that start and exit between two drains are reported, then evicted."""
    c = _collector(follow=True)
    try:
        p = c.spawn([work, "fork", "5"])
        assert p.wait(60) == 0
        got = c.collect_once()
        parent = of(got, p.pid)
        assert len(parent) == 1 and parent[0].metrics["forks"] == 5
        kids = [s for s in got if s.pid != p.pid]
        assert len(kids) == 5, [(s.entity_id, s.comm) for s in got]
        for s in kids:
            assert 3 <= s.metrics["on_cpu_ns"] / 1e6 <= 8, s.metrics["on_cpu_ns"]  # each burns 5 ms
        assert c.collect_once() == []
        assert c.done()
    finally:
        c.close()


def test_threads_mode(work):
    """--threads: one Sample per thread with its own counters; they add up to the process's."""
    c = _collector(per_thread=True)
    try:
        ph = Phased(c, work, "threads", 2)
        tids = {s.entity_id for s in ph.all_samples if "/t" in s.entity_id}
        assert len(tids) >= 3  # main thread + 2 workers
        total = sum(s.metrics["on_cpu_ns"] for s in ph.samples)
        per_thread = sum(s.metrics["on_cpu_ns"] for s in ph.all_samples if "/t" in s.entity_id)
        assert abs(total - per_thread) <= 0.01 * total + 1e6, (total, per_thread)
        assert total / 1e6 >= 2 * 150 * 0.9
        assert ph.before.metrics["threads"] == 3
        assert all(re.fullmatch(rf".+/{ph.p.pid}@\d+/t\d+", e) for e in tids)
    finally:
        c.close()


def test_heap_outstanding_bytes(work):
    """--heap: 1,000 mallocs of 4 KiB that are never freed show about 4 MiB outstanding, and the 10 malloc/free
    pairs after them are counted as allocated and freed."""
    if unavailable_reason():
        pytest.skip(f"eBPF cannot load here: {unavailable_reason()}")
    c = Collector(CollectorConfig(require_ebpf=True, heap=True), TargetSpec(only_added=True)).start()  # fails loud
    try:
        ph = Phased(c, work, "malloc", 1000)
        m, before = ph.work.metrics, ph.before.metrics
        assert 1010 <= m["heap_allocs"] <= 1010 + 20, m  # stdio may allocate a little around the work
        assert 10 <= m["heap_frees"] <= 10 + 20, m
        grown = m["heap_outstanding_bytes"] - before["heap_outstanding_bytes"]
        assert abs(grown - 1000 * 4096) <= 0.01 * 1000 * 4096, grown
        assert m["heap_alloc_bytes"] - m["heap_free_bytes"] == grown
    finally:
        c.close()


def test_function_trace_messages(work, tmp_path):
    """--trace: a traced function called 10 times with n = 0..9 gives exactly those 10 formatted entry messages and
    10 return messages (its return value is the running sum), in order, from that process."""
    import json

    from osad.collector.bpf.traces import TraceSpec

    if unavailable_reason():
        pytest.skip(f"eBPF cannot load here: {unavailable_reason()}")
    out = tmp_path / "traces.jsonl"
    spec = TraceSpec.parse(f"{work}:osad_probe_target|Enter search, n={{arg1_32}}|search returned {{retval_32}}")
    c = Collector(CollectorConfig(require_ebpf=True, traces=[spec], trace_output=f"jsonl:{out}"),
                  TargetSpec(only_added=True)).start()
    try:
        ph = Phased(c, work, "probe", 10)
    finally:
        c.close()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["text"] for x in lines if x["event"] == "entry"] == [f"Enter search, n={i}" for i in range(10)]
    assert [x["text"] for x in lines if x["event"] == "return"] == \
        [f"search returned {sum(range(i + 1))}" for i in range(10)]
    assert len(lines) == 20 and all(x["pid"] == ph.p.pid and x["trace"].endswith(":osad_probe_target") for x in lines)
    assert [x["event"] for x in lines[:4]] == ["entry", "return", "entry", "return"]
    assert all(x["ts"] > 1.6e9 for x in lines) and lines == sorted(lines, key=lambda x: x["ts"])


def test_trace_specs_are_checked():
    from osad.collector.bpf.traces import TraceSpec

    t = TraceSpec.parse("c:malloc|malloc({arg1})|-")
    assert (t.binary, t.function, t.entry, t.ret) == ("c", "malloc", "malloc({arg1})", "")
    assert t.text(0, [4096, 0, 0, 0, 0, 0], 1, 1) == "malloc(4096)" and t.text(1, [7] + [0] * 5, 1, 1) is None
    assert TraceSpec.parse("c:f|x|r={retval_32}").text(1, [2**32 - 1, 0, 0, 0, 0, 0], 1, 1) == "r=-1"
    for bad, msg in (("c:f|{argz}", "unknown field 'argz'"), ("c:f|{arg1", "bad format"), ("f", "BINARY:FUNCTION"),
                     ("c:f|a|b|c", "at most two")):
        with pytest.raises(ValueError, match=msg):
            TraceSpec.parse(bad)
    with pytest.raises(Exception, match="--trace needs --trace-output"):
        CollectorConfig(traces=[t])


def test_user_function_probe(work):
    """--probe BINARY:FUNCTION: a function called 1,000 times is counted 1,000 times."""
    from osad.collector.bpf.uprobes import ProbeSpec

    c = _collector(probes=[ProbeSpec.parse(f"{work}:osad_probe_target")])
    try:
        ph = Phased(c, work, "probe", 1000)
        m = ph.work.metrics
        assert m["uprobe_osad_probe_target_calls"] == 1000
        assert m["uprobe_osad_probe_target_time_ns"] > 0
        assert 0 < m["uprobe_osad_probe_target_latency_mean_ns"] < 1e6
        assert ph.before.metrics["uprobe_osad_probe_target_calls"] == 0
        assert "uprobe_osad_probe_target_latency_mean_ns" not in ph.before.metrics
    finally:
        c.close()


def test_all_processes_capped_top_by_cpu(work):
    """--all: every process is watched in kernel, but at most --max-processes are reported, top CPU first."""
    c = _collector(targets=TargetSpec(all=True), max_processes=3)
    try:
        p = c.spawn([work, "burn", "200"])
        assert p.wait(60) == 0
        got = c.collect_once()
        procs = [s for s in got if "/t" not in s.entity_id]
        assert 1 <= len(procs) <= 3
        assert all(s.pid != os.getpid() for s in got)  # never itself
        cpus = [s.metrics["on_cpu_ns"] for s in procs]
        assert cpus == sorted(cpus, reverse=True)
        later = c.collect_once()
        assert len([s for s in later if "/t" not in s.entity_id]) <= 3
        assert c.events_total > 0
        # without a cap, the on-CPU time of all processes fits in the CPUs' time
        # (a slice is credited when it ends or at the next 49 Hz tick: one tick of slack per CPU and end)
        c.cfg = c.cfg.replace(max_processes=None)
        c.collect_once()
        time.sleep(1.0)  # a real interval
        got = c.collect_once()
        total = sum(s.metrics["on_cpu_ns"] for s in got if "/t" not in s.entity_id)
        bound = os.cpu_count() * (got[0].interval_s + 2 / 49) * 1e9
        assert 0 < total <= bound * 1.01, (total, bound)
        # --comm: every process is watched in kernel, only matching ones are reported
        c.targets.comm = re.compile(r"^work$")
        p = c.spawn([work, "burn", "50"])
        assert p.wait(60) == 0
        got = c.collect_once()
        assert got and {s.comm for s in got} == {"work"} and any(s.pid == p.pid for s in got)
    finally:
        c.close()
