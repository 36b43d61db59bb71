"""How much the eBPF collector slows a scheduler- and syscall-heavy workload down.

The workload (C, built here with gcc): PAIRS pairs of processes ping-pong one byte over pipes
(each message: a write, a read, a wake-up and a context switch on each side), doing WORK loop
iterations of computation and SYSCALLS cheap system calls (getppid) per message. It is run
ROUNDS times without and ROUNDS times with the collector watching every process (``--all``
mode: every process is aggregated in kernel, the top 100 by CPU are reported every second to a
JSONL file), in the same run, alternating A B B A ... so drift on a shared machine hits both sides.

Reported (medians over the rounds):
  * slowdown ratio: workload wall time with / without the collector, and the same for the
    workload's own CPU time (user + system of its processes, from rusage; eBPF programs run in
    the context of the task that hits the tracepoint, so their cost shows up here);
  * the event rate the collector handled: BPF program runs counted in its kernel maps
    (every tracepoint hit, on every CPU, all processes) per second of workload;
  * the collector's own CPU use (its drains, Sample building and output), in % of one CPU;
  * in one extra round (where /proc/sys/kernel/bpf_stats_enabled can be written): the kernel's own
    accounting of the BPF programs' run time, as a share of the workload's CPU time: the in-kernel
    cost without the rounds' noise (it leaves out the tracepoints' dispatch and cache effects).

Run as root (bcc needs it):  .venv/bin/python bench/collector_overhead.py --nice -10
(--work 3000 --messages 30000 gives a much denser event stream, near 1M events/s.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKLOAD_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile unsigned long sink;

static long nmalloc;

static void work(long iters, long nsys)
{
    for (long i = 0; i < iters; i++)
        sink += i * i;
    for (long i = 0; i < nsys; i++)
        syscall(SYS_getppid);
    for (long i = 0; i < nmalloc; i++) {
        void *volatile p = malloc(64 + (i & 255));
        free(p);
    }
}

/* usage: pingpong PAIRS MESSAGES WORK SYSCALLS [MALLOCS] */
int main(int argc, char **argv)
{
    if (argc != 5 && argc != 6)
        return 2;
    int pairs = atoi(argv[1]);
    long msgs = atol(argv[2]), iters = atol(argv[3]), nsys = atol(argv[4]);
    nmalloc = argc == 6 ? atol(argv[5]) : 0;
    for (int p = 0; p < pairs; p++) {
        int ab[2], ba[2];
        if (pipe(ab) || pipe(ba))
            return 3;
        if (fork() == 0) {                       /* ponger */
            char c;
            for (long i = 0; i < msgs; i++) {
                if (read(ab[0], &c, 1) != 1)
                    _exit(4);
                work(iters, nsys);
                if (write(ba[1], &c, 1) != 1)
                    _exit(5);
            }
            _exit(0);
        }
        if (fork() == 0) {                       /* pinger */
            char c = 'x';
            for (long i = 0; i < msgs; i++) {
                work(iters, nsys);
                if (write(ab[1], &c, 1) != 1 || read(ba[0], &c, 1) != 1)
                    _exit(6);
            }
            _exit(0);
        }
        close(ab[0]); close(ab[1]); close(ba[0]); close(ba[1]);
    }
    int status, bad = 0;
    while (wait(&status) > 0)
        bad |= !WIFEXITED(status) || WEXITSTATUS(status);
    return bad;
}
"""


def build(tmp: Path) -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("needs gcc to build the workload (apt-get install gcc)")
    (tmp / "pingpong.c").write_text(WORKLOAD_C)
    subprocess.run([cc, "-O1", "-o", str(tmp / "pingpong"), str(tmp / "pingpong.c")], check=True)
    return str(tmp / "pingpong")


def run_workload(binary: str, a, collector=None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the workload's processes). With ``collector``, drain it every
    second while the workload runs, as `osad collect` does."""
    done = threading.Event()
    out = {}

    def wait(p):
        _, out["status"], out["ru"] = os.wait4(p.pid, 0)
        out["t1"] = time.monotonic()
        p.returncode = out["status"]
        done.set()

    t0 = time.monotonic()
    nice = (lambda: os.nice(a.nice)) if a.nice else None
    p = subprocess.Popen([binary, str(a.pairs), str(a.messages), str(a.work), str(a.syscalls), str(a.mallocs)],
                         preexec_fn=nice)
    threading.Thread(target=wait, args=(p,), daemon=True).start()
    next_t = t0 + 1.0
    while not done.wait(max(0.0, next_t - time.monotonic()) if collector else None):
        collector.collect_once()
        next_t += 1.0
    if out["status"] != 0:
        sys.exit(f"workload failed (status {out['status']})")
    return out["t1"] - t0, out["ru"].ru_utime + out["ru"].ru_stime


BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def bpf_run_time(col) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over every BPF program the collector loaded, from the kernel's own
    accounting (/proc/self/fdinfo of each program; counts only while bpf_stats_enabled is 1)."""
    ns = cnt = 0
    for fam in getattr(col.backend, "families", []):
        for fn in fam.bpf.funcs.values():
            info = dict(ln.split(":", 1) for ln in Path(f"/proc/self/fdinfo/{fn.fd}").read_text().splitlines()
                        if ":" in ln)
            ns += int(info.get("run_time_ns", 0))
            cnt += int(info.get("run_cnt", 0))
    return ns, cnt


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9, help="rounds with and without the collector (each)")
    ap.add_argument("--pairs", type=int, default=4, help="ping-pong process pairs")
    ap.add_argument("--messages", type=int, default=3000, help="messages per pair")
    ap.add_argument("--work", type=int, default=80000, help="loop iterations of computation per message")
    ap.add_argument("--syscalls", type=int, default=4, help="extra cheap syscalls (getppid) per message")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds to wait before each timed run, in both modes (after loading the collector, "
                    "whose compilation is a CPU burst)")
    ap.add_argument("--heap", action="store_true", help="the collector with --heap (libc allocator uprobes)")
    ap.add_argument("--mallocs", type=int, default=0,
                    help="malloc/free pairs per message in the workload (what --heap's probes cost grows with)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run the workload at this nice value (e.g. -10 on a shared machine, so that other "
                    "load disturbs its wall time less; the same in both modes)")
    a = ap.parse_args()

    from osad.collector.bpf import unavailable_reason
    from osad.collector.config import CollectorConfig
    from osad.collector.loop import Collector
    from osad.collector.sinks import JsonlSink
    from osad.collector.targets import TargetSpec

    reason = unavailable_reason()
    if reason:
        sys.exit(f"eBPF unavailable: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix="osad-bench-"))
    binary = build(tmp)
    run_workload(binary, a)  # warm caches
    load0 = f"{os.getloadavg()[0]:.2f}"

    base_wall, base_cpu, with_wall, with_cpu, rates, own = [], [], [], [], [], []
    order = []
    for r in range(a.rounds):
        order += ["off", "on"] if r % 2 == 0 else ["on", "off"]
    for i, mode in enumerate(order):
        if mode == "off":
            time.sleep(a.settle)
            w, c = run_workload(binary, a)
            base_wall.append(w)
            base_cpu.append(c)
        else:
            col = Collector(CollectorConfig(max_processes=100, require_ebpf=True, heap=a.heap), TargetSpec(all=True),
                            sink=JsonlSink(str(tmp / f"samples{i}.jsonl"))).start()
            try:
                time.sleep(a.settle)
                col.collect_once()  # the window starts now
                ev0, cpu0 = col.events_total, own_cpu()
                w, c = run_workload(binary, a, col)
                col.collect_once()  # and ends now
                ev1, cpu1 = col.events_total, own_cpu()
            finally:
                col.close()
            with_wall.append(w)
            with_cpu.append(c)
            rates.append((ev1 - ev0) / w)
            own.append((cpu1 - cpu0) / w)
        print(f"round {i // 2 + 1} {mode:3s}: wall {w:.3f} s, workload CPU {c:.3f} s"
              + (f", {rates[-1]:,.0f} events/s, collector CPU {100 * own[-1]:.2f}%" if mode == "on" else ""),
              file=sys.stderr)
    # one more round, not timed against the baseline: the kernel's accounting of the BPF programs' own run time
    # (bpf_stats adds two clock reads per run, so this slightly overstates it)
    bpf = None
    if BPF_STATS.exists() and os.access(BPF_STATS, os.W_OK):
        col = Collector(CollectorConfig(max_processes=100, require_ebpf=True, heap=a.heap), TargetSpec(all=True),
                        sink=JsonlSink(str(tmp / "samples-stats.jsonl"))).start()
        before = BPF_STATS.read_text().strip()
        try:
            BPF_STATS.write_text("1")
            col.collect_once()
            ns0, n0 = bpf_run_time(col)
            w, c = run_workload(binary, a, col)
            ns1, n1 = bpf_run_time(col)
        finally:
            BPF_STATS.write_text(before)
            col.close()
        bpf = (ns1 - ns0, n1 - n0, c)
    med = statistics.median
    print(f"workload: {a.pairs} ping-pong pairs x {a.messages} messages, {a.work} work iterations and "
          f"{a.syscalls} getppid and {a.mallocs} malloc/free per message, nice {a.nice}; collector "
          f"{'with --heap' if a.heap else 'default families'}; {a.rounds} rounds each, alternating; "
          f"{os.cpu_count()} CPUs, load average before/after {load0} / {os.getloadavg()[0]:.2f}")
    print(f"wall time   without {med(base_wall):.3f} s, with {med(with_wall):.3f} s: "
          f"slowdown ratio {med(with_wall) / med(base_wall):.4f} (medians); "
          f"{min(with_wall) / min(base_wall):.4f} (fastest rounds)")
    print(f"CPU time    without {med(base_cpu):.3f} s, with {med(with_cpu):.3f} s: "
          f"slowdown ratio {med(with_cpu) / med(base_cpu):.4f} (medians)")
    print(f"event rate  {med(rates):,.0f} events/s handled in kernel maps (median over rounds)")
    print(f"collector   {100 * med(own):.2f}% of one CPU (drains every 1 s, --all, top 100 to JSONL)")
    if bpf:
        ns, n, c = bpf
        print(f"BPF time    {ns / 1e6:.1f} ms in {n:,} program runs ({ns / max(n, 1):.0f} ns each) = "
              f"{100 * ns / 1e9 / c:.2f}% of the workload's CPU time (kernel bpf_stats, one extra round)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
