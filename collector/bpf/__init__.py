"""The collector's eBPF programs: one per metric family, each C file next to the module loading it.

==========  ==========================================================================
sched       on-CPU time, run-queue wait, voluntary/involuntary context switches
syscalls    syscalls, failed syscalls, time in syscalls, bytes read/written
mem         user page faults, RSS by kind (file, anon, swap, shmem)
net         bytes sent/received on internet and Unix-domain sockets
uprobes     calls and time in user functions (--probe BINARY:FUNCTION)
proc        forks, execs, signals, thread count, birth and exit records (loaded last)
==========  ==========================================================================

Only tracepoints, raw tracepoints, a per-CPU software clock and uprobes are used (no kprobes,
no fentry), and only tracepoint arguments and BPF helpers are read: never a kernel struct.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from .family import BpfSettings, Family, FamilyLoadError

FORCE_NO_EBPF_ENV = "OSAD_COLLECTOR_FORCE_NO_EBPF"

_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39


def tracefs_dir() -> Path | None:
    for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.isdir(os.path.join(d, "events", "sched")):
            return Path(d)
    return None


def missing_capabilities(caps: int) -> list[str]:
    """The capabilities loading osad's BPF programs needs that the effective set ``caps`` lacks: CAP_SYS_ADMIN,
    or both CAP_BPF and CAP_PERFMON (kernels >= 5.8). Empty when it may load.

    >>> missing_capabilities(1 << 21), missing_capabilities((1 << 38) | (1 << 39)), missing_capabilities(1 << 39)
    ([], [], ['CAP_SYS_ADMIN (or CAP_BPF+CAP_PERFMON)'])
    """
    if caps >> _CAP_SYS_ADMIN & 1 or (caps >> _CAP_BPF & 1 and caps >> _CAP_PERFMON & 1):
        return []
    return ["CAP_SYS_ADMIN (or CAP_BPF+CAP_PERFMON)"]


def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def unavailable_reason() -> str | None:
    """Why eBPF collection cannot work here (one line, saying what to do), or None if it may."""
    if os.environ.get(FORCE_NO_EBPF_ENV, "") not in ("", "0"):
        return f"disabled by {FORCE_NO_EBPF_ENV}={os.environ[FORCE_NO_EBPF_ENV]}"
    if not sys.platform.startswith("linux"):
        return f"eBPF needs Linux (this is {sys.platform})"
    missing = missing_capabilities(_effective_caps())
    if missing:
        if os.geteuid() != 0:
            return (f"not root and missing {' and '.join(missing)} (run as root, e.g. `sudo osad collect ...`, "
                    "or grant CAP_BPF+CAP_PERFMON)")
        return (f"root, but without {' and '.join(missing)} (a container? give it the capabilities by name: "
                "compose `cap_add: [SYS_ADMIN, SYS_PTRACE]`, docker run `--cap-add SYS_ADMIN --cap-add SYS_PTRACE`, "
                "Kubernetes securityContext.capabilities.add; see docs/deploy.md)")
    try:
        import bcc  # noqa: F401
    except ImportError:
        return ("the bcc Python module is not importable (install python3-bpfcc, or run scripts/setup.sh, "
                "which also makes it visible to the virtual environment)")
    rel = platform.release()
    if not (os.path.isdir(f"/lib/modules/{rel}/build/include") or os.path.exists("/sys/kernel/kheaders.tar.xz")):
        return (f"no kernel headers for {rel} at /lib/modules/{rel}/build (install linux-headers-{rel}, "
                "or run scripts/setup.sh, which links a compatible set)")
    if tracefs_dir() is None:
        return "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)"
    return None


def has_group_dead() -> bool:
    """Whether sched_process_exit carries group_dead (then its raw tracepoint has it as args[1])."""
    d = tracefs_dir()
    try:
        return "group_dead" in (d / "events/sched/sched_process_exit/format").read_text() if d else False
    except OSError:
        return False


def family_classes(with_probes: bool, with_heap: bool = False, with_traces: bool = False) -> list[type[Family]]:
    """Families in load order. proc must be last: its exit record then follows every other
    family's exit handling (raw tracepoint programs run in the order they were attached)."""
    from .block import Block
    from .heap import Heap
    from .traces import Traces
    from .mem import Mem
    from .net import Net
    from .proc import Proc
    from .sched import Sched
    from .syscalls import Syscalls
    from .uprobes import Uprobes

    out: list[type[Family]] = [Sched, Syscalls, Mem, Net, Block]
    if with_probes:
        out.append(Uprobes)
    if with_heap:
        out.append(Heap)
    if with_traces:
        out.append(Traces)
    out.append(Proc)
    return out


def load_families(settings: BpfSettings) -> tuple[list[Family], list[str]]:
    """Load every family that this kernel supports. Returns (loaded families, one-line warnings
    for those that did not load, whose metrics are then absent). Raises FamilyLoadError if the
    proc family (lifecycle) or every counter family fails, or if a --probe cannot be attached."""
    loaded: list[Family] = []
    warnings: list[str] = []
    for cls in family_classes(bool(settings.probes), settings.heap, bool(settings.traces)):
        fam = cls(settings)
        try:
            fam.load()
        except FamilyLoadError as e:
            if cls.name in ("proc", "uprobes", "heap", "traces"):  # asked for by name: an error, not a warning
                for f in loaded:
                    f.close()
                raise FamilyLoadError(f"family {cls.name}: {e}") from None
            warnings.append(f"metric family {cls.name!r} did not load ({e}); its metrics "
                            f"({', '.join(fam.counters)}) are absent")
            continue
        loaded.append(fam)
    if len(loaded) < 2:  # proc alone
        for f in loaded:
            f.close()
        raise FamilyLoadError("no metric family loaded: " + "; ".join(warnings))
    return loaded, warnings


__all__ = ["BpfSettings", "Family", "FamilyLoadError", "FORCE_NO_EBPF_ENV", "has_group_dead",
           "load_families", "unavailable_reason", "tracefs_dir"]
