"""/proc readers: process identity for the eBPF path, and the whole collection when eBPF is
unavailable (the fallback), with the same metric names where /proc has the same quantity.

Fallback metrics and where they come from (all per interval, deltas of /proc's cumulative values):

=========================  ================================================================
on_cpu_ns, runq_wait_ns    /proc/<pid>/schedstat fields 1 and 2 (utime+stime if it is absent)
ctx_switches_*             /proc/<pid>/status voluntary_/nonvoluntary_ctxt_switches
page_faults_user           /proc/<pid>/stat minflt + majflt (faults the kernel charged to it)
read_bytes, write_bytes    /proc/<pid>/io rchar, wchar
rss_*_bytes, threads       /proc/<pid>/status RssFile, RssAnon, VmSwap, RssShmem; stat num_threads
vm_*, page_tables, ...     /proc/<pid>/status VmSize, VmData, VmStk, VmPTE, HugetlbPages; /proc/<pid>/fd
=========================  ================================================================

What /proc cannot give per process (syscall counts and time, socket bytes, forks, execs,
signals, user probes) is absent in the fallback. A process's last partial interval is lost
(it cannot be read after it exits).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
NS_PER_TICK = 1_000_000_000 // CLK_TCK
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_CONTAINER_RE = re.compile(r"([0-9a-f]{64})")


@dataclass(frozen=True)
class ProcStat:
    """Fields of /proc/<pid>[/task/<tid>]/stat."""

    comm: str
    state: str
    ppid: int
    minflt: int
    majflt: int
    utime: int      # ticks
    stime: int      # ticks
    num_threads: int
    start_ticks: int  # field 22: start time after boot, in clock ticks


def _base(pid: int, tid: int | None) -> str:
    return f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None


def parse_stat(text: str) -> ProcStat | None:
    """Parse a stat line; the comm (field 2) may itself hold spaces and parentheses."""
    try:
        lp, rp = text.index("("), text.rindex(")")
        comm = text[lp + 1:rp]
        f = text[rp + 2:].split()
        # f[0] is field 3 (state); field n is f[n - 3]
        return ProcStat(comm=comm, state=f[0], ppid=int(f[1]), minflt=int(f[7]), majflt=int(f[9]),
                        utime=int(f[11]), stime=int(f[12]), num_threads=int(f[17]), start_ticks=int(f[19]))
    except (ValueError, IndexError):
        return None


def read_stat(pid: int, tid: int | None = None) -> ProcStat | None:
    t = _read(_base(pid, tid) + "/stat")
    return parse_stat(t) if t else None


def read_comm(pid: int, tid: int | None = None) -> str | None:
    t = _read(_base(pid, tid) + "/comm")
    return t.rstrip("\n") if t is not None else None


_STATUS_KEYS = {
    "RssAnon": "rss_anon_bytes", "RssFile": "rss_file_bytes", "RssShmem": "rss_shmem_bytes",
    "VmSwap": "rss_swap_bytes",
}


def read_status(pid: int, tid: int | None = None) -> dict[str, int] | None:
    """RSS by kind in bytes (process only) and context-switch counts from status."""
    t = _read(_base(pid, tid) + "/status")
    if t is None:
        return None
    out: dict[str, int] = {}
    for line in t.splitlines():
        k, _, v = line.partition(":")
        if k in _STATUS_KEYS:
            out[_STATUS_KEYS[k]] = int(v.split()[0]) * 1024
        elif k == "voluntary_ctxt_switches":
            out["ctx_switches_voluntary"] = int(v)
        elif k == "nonvoluntary_ctxt_switches":
            out["ctx_switches_involuntary"] = int(v)
    return out


#: /proc/<pid>/status lines of the memory picture every process reports (kB in the file, bytes here), besides RSS
_VM_KEYS = {"VmSize": "vm_size_bytes", "VmData": "vm_data_bytes", "VmStk": "vm_stack_bytes",
            "VmPTE": "page_tables_bytes", "HugetlbPages": "huge_pages_bytes"}
#: the gauges :func:`read_process_gauges` gives, in this order (collector/metrics.py documents them)
PROCESS_GAUGES = (*_VM_KEYS.values(), "open_fds")


def read_process_gauges(pid: int) -> dict[str, int] | None:
    """Virtual size, data segment, stack, page tables and hugetlb pages (bytes, /proc/<pid>/status) and open
    file descriptors (entries of /proc/<pid>/fd) of a process; None when it is gone. A kernel thread, which has
    no memory map, reads 0. One read and one directory listing: cheap enough for every watched process every
    interval (the kernel has no tracepoint for these sizes)."""
    t = _read(f"/proc/{pid}/status")
    if t is None:
        return None
    out = dict.fromkeys(PROCESS_GAUGES, 0)
    for line in t.splitlines():
        k, _, v = line.partition(":")
        if k in _VM_KEYS:
            out[_VM_KEYS[k]] = int(v.split()[0]) * 1024
    try:
        out["open_fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return None
    except OSError:  # not allowed to look (not root, another user's process): say nothing rather than 0
        out.pop("open_fds")
    return out


def read_rss(pid: int) -> dict[str, int]:
    st = read_status(pid) or {}
    return {k: v for k, v in st.items() if k.startswith("rss_")}


def read_schedstat(pid: int, tid: int | None = None) -> tuple[int, int] | None:
    """(on-CPU ns, run-queue wait ns)."""
    t = _read(_base(pid, tid) + "/schedstat")
    if not t:
        return None
    try:
        a = t.split()
        return int(a[0]), int(a[1])
    except (ValueError, IndexError):
        return None


def read_io(pid: int, tid: int | None = None) -> tuple[int, int] | None:
    """(rchar, wchar): bytes read and written by read/write-family syscalls."""
    t = _read(_base(pid, tid) + "/io")
    if not t:
        return None
    vals = dict(line.split(":", 1) for line in t.splitlines() if ":" in line)
    try:
        return int(vals["rchar"]), int(vals["wchar"])
    except (KeyError, ValueError):
        return None


def read_cgroup(pid: int) -> tuple[str | None, str | None]:
    """(cgroup path, container id if the path names one)."""
    t = _read(f"/proc/{pid}/cgroup")
    if not t:
        return None, None
    path = None
    for line in t.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[0] == "0" or path is None):
            path = parts[2]
    if path is None:
        return None, None
    m = _CONTAINER_RE.search(path)
    return path[:1024], (m.group(1) if m else None)


def list_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def list_tids(pid: int) -> list[int]:
    try:
        return [int(d) for d in os.listdir(f"/proc/{pid}/task") if d.isdigit()]
    except OSError:
        return []


def children() -> dict[int, list[int]]:
    """Every living process's children, by parent pid (from /proc parent links)."""
    out: dict[int, list[int]] = {}
    for p in list_pids():
        st = read_stat(p)
        if st is not None:
            out.setdefault(st.ppid, []).append(p)
    return out


def descendants(pids) -> list[int]:
    """Every living descendant of ``pids`` (children first, then theirs)."""
    kids = children()
    out, todo = [], list(pids)
    while todo:
        for c in kids.get(todo.pop(), ()):
            if c not in out:
                out.append(c)
                todo.append(c)
    return out


def host_name() -> str:
    """The machine's name. In a container that shares the host's pid namespace (docker-compose.yml),
    /proc/1 is the host's init, so its root's /etc/hostname names the host rather than the container."""
    try:
        if os.stat("/proc/1/ns/uts").st_ino != os.stat("/proc/self/ns/uts").st_ino:
            name = Path("/proc/1/root/etc/hostname").read_text().strip()
            if name:
                return name
    except OSError:
        pass
    return socket.gethostname()


class ProcReader:
    """The /proc access the tracker needs (a test can pass a fake one)."""

    def stat(self, pid: int, tid: int | None = None) -> ProcStat | None:
        return read_stat(pid, tid)

    def comm(self, pid: int, tid: int | None = None) -> str | None:
        return read_comm(pid, tid)

    def cgroup(self, pid: int) -> tuple[str | None, str | None]:
        return read_cgroup(pid)

    def rss(self, pid: int) -> dict[str, int]:
        return read_rss(pid)


# --------------------------------------------------------------------------------------------
# The fallback: every metric from /proc.

FALLBACK_COUNTERS = ("on_cpu_ns", "runq_wait_ns", "ctx_switches_voluntary", "ctx_switches_involuntary",
                     "page_faults_user", "read_bytes", "write_bytes")
FALLBACK_GAUGES = ("rss_file_bytes", "rss_anon_bytes", "rss_swap_bytes", "rss_shmem_bytes", "threads")


def read_counters(pid: int, tid: int | None = None, st: ProcStat | None = None,
                  status: dict | None = None) -> dict[str, int] | None:
    """Cumulative counters of one process (or thread) from /proc; None if it is gone.
    ``st`` and ``status`` may be passed when the caller has read them already."""
    st = st or read_stat(pid, tid)
    if st is None:
        return None
    out: dict[str, int] = {"page_faults_user": st.minflt + st.majflt}
    ss = read_schedstat(pid, tid)
    if ss:
        out["on_cpu_ns"], out["runq_wait_ns"] = ss
    else:
        out["on_cpu_ns"] = (st.utime + st.stime) * NS_PER_TICK
    if status is None:
        status = read_status(pid, tid) or {}
    for k in ("ctx_switches_voluntary", "ctx_switches_involuntary"):
        if k in status:
            out[k] = status[k]
    io = read_io(pid, tid)
    if io:
        out["read_bytes"], out["write_bytes"] = io
    return out
