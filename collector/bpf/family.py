"""What every metric family's loader shares: building the C text, compiling it with bcc, and
reading its maps.

A family is one BPF program (a C file in this folder) plus the Python module beside it that
loads it and turns its map values into plain dicts. bcc is imported only here, and only when a
family is loaded, so nothing else in osad needs it.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


class FamilyLoadError(RuntimeError):
    """A family's BPF program did not compile, load or attach; the text is one line saying why."""


@dataclass
class BpfSettings:
    """Compile-time choices shared by every family (they become -D defines)."""

    filter: bool = False           # aggregate only tgids in `targets` (False: every process)
    follow: bool = False           # add children of targets to `targets` in kernel
    per_thread: bool = False       # key counters by tid instead of tgid
    self_tgid: int = 0             # never count this process (the collector itself)
    tick_hz: int = 49              # per-CPU clock crediting on-CPU time of running tasks
    max_keys: int = 32768          # entities (processes, or threads with per_thread)
    max_threads: int = 65536       # per-thread scratch entries (syscall in flight, wakeups)
    max_dead: int = 16384          # exits between two drains
    max_targets: int = 16384
    have_group_dead: bool = True   # sched_process_exit's raw tracepoint has a group_dead argument
    probes: list = field(default_factory=list)  # [ProbeSpec] for the uprobes family
    heap: bool = False             # load the heap family (libc allocator uprobes)
    traces: list = field(default_factory=list)  # [TraceSpec] for the traces family
    trace_rate: int = 100          # trace messages per process per second, at most

    def defines(self) -> dict[str, str]:
        return {
            "OSAD_FILTER": str(int(self.filter)),
            "OSAD_FOLLOW": str(int(self.follow)),
            "OSAD_PER_THREAD": str(int(self.per_thread)),
            "OSAD_SELF_TGID": str(int(self.self_tgid)),
            "OSAD_HAVE_GROUP_DEAD": str(int(self.have_group_dead)),
            "OSAD_MAX_KEYS": str(self.max_keys),
            "OSAD_MAX_THREADS": str(self.max_threads),
            "OSAD_MAX_DEAD": str(self.max_dead),
            "OSAD_MAX_TARGETS": str(self.max_targets),
        }


@contextmanager
def _captured_stderr():
    """bcc/clang print compile errors straight to fd 2; catch them to report one line."""
    buf = tempfile.TemporaryFile(mode="w+b")
    saved = os.dup(2)
    try:
        os.dup2(buf.fileno(), 2)
        yield buf
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error:" in line:
            return re.sub(r"^.*?error:\s*", "", line).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


class Family:
    """Base class: subclasses set ``name``, ``c_file``, ``counters`` (the stats value's counter
    fields, which are also the metric names) and may add attach steps or extra readers."""

    name = ""
    c_file = ""
    counters: tuple[str, ...] = ()

    def __init__(self, settings: BpfSettings):
        self.settings = settings
        self.bpf = None
        self._events_seen = 0

    # ---- building and loading -------------------------------------------------------------
    def extra_defines(self) -> dict[str, str]:
        return {}

    def extra_source(self) -> str:
        return ""

    def source(self) -> str:
        defs = {**self.settings.defines(), **self.extra_defines()}
        head = "".join(f"#define {k} {v}\n" for k, v in defs.items())
        body = (HERE / self.c_file).read_text()
        common = (HERE / "common.h").read_text()
        body = body.replace('#include "common.h"', common)
        return head + body + self.extra_source()

    def load(self) -> None:
        from bcc import BPF  # lazily: only the eBPF path needs bcc

        text = self.source()
        with _captured_stderr() as err:
            try:
                self.bpf = BPF(text=text.encode())
                self.attach()
            except Exception as e:  # bcc raises plain Exception
                err.seek(0)
                detail = _first_error(err.read().decode(errors="replace")) or _one_line(e)
                if self.bpf is not None:
                    try:
                        self.bpf.cleanup()
                    except Exception:
                        pass
                    self.bpf = None
                raise FamilyLoadError(f"{_one_line(e)}: {detail}" if detail not in str(e) else detail) from None

    def attach(self) -> None:
        """Attach what bcc does not attach by itself (tracepoints it does)."""

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    # ---- targets -------------------------------------------------------------------------
    def add_target(self, tgid: int) -> None:
        if self.settings.filter:
            t = self.bpf[b"targets"]
            t[t.Key(tgid)] = t.Leaf(1)

    def targets(self) -> set[int]:
        if not self.settings.filter:
            return set()
        return {int(k) for k, _ in read_map(self.bpf[b"targets"])}

    # ---- reading -------------------------------------------------------------------------
    def events_since_last(self) -> int:
        total = sum(int(v) for v in self.bpf[b"nevents"].getvalue(0))
        d, self._events_seen = total - self._events_seen, total
        return d

    def derive(self, m: dict[str, float]) -> None:
        """Add metrics computed from this family's per-interval deltas (in place)."""

    def counters_of(self, v) -> dict[str, int]:
        return {name: int(getattr(v, name)) for name in self.counters}

    def read_dead(self) -> list[tuple[int, int, int, dict[str, int]]]:
        """[(key, exit_ts_boot_ns, tgid, final cumulative counters)] of entities that exited,
        removed from the map as they are read."""
        out = []
        for k, v in read_map(self.bpf[b"dead"], delete=True):
            out.append((int(k.id), int(k.ts), int(v.tgid), self.counters_of(v)))
        return out

    def read_live(self) -> dict[int, tuple[int, dict[str, int]]]:
        """{key: (tgid, cumulative counters)} of entities alive with counters."""
        return {int(k): (int(v.tgid), self.counters_of(v)) for k, v in read_map(self.bpf[b"stats"])}

    def delete_keys(self, keys) -> None:
        delete_map_keys(self.bpf[b"stats"], keys)


def delete_map_keys(table, keys) -> None:
    """Delete ``keys`` from a BPF hash map; keys already gone are fine."""
    for k in keys:
        try:
            del table[table.Key(k)]
        except KeyError:
            pass


_BATCH_OK: dict[int, bool] = {}


def _copy(obj):
    """A ctypes value that owns its memory (array elements share the batch buffer)."""
    if isinstance(obj, (int, float)):
        return obj
    return type(obj).from_buffer_copy(obj)


def read_map(table, delete: bool = False, chunk: int = 1024):
    """Every (key, value) of a hash map, with the kernel's batch operations where it has them
    (one syscall per ``chunk`` entries), else key by key. With ``delete`` each entry read is removed."""
    from bcc.libbcc import lib

    fd = table.map_fd
    if _BATCH_OK.get(fd, True):
        try:
            return _read_batch(lib, table, delete, chunk)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, 524):  # 524: ENOTSUPP
                raise
            _BATCH_OK[fd] = False
    out = []
    for k, v in table.items():
        out.append((_unwrap(k), v))
        if delete:
            try:
                del table[k]
            except KeyError:
                pass
    return out


def _unwrap(k):
    return k.value if hasattr(k, "value") and not hasattr(k, "_fields_") else k


def _read_batch(lib, table, delete: bool, chunk: int):
    fn = lib.bpf_lookup_and_delete_batch if delete else lib.bpf_lookup_batch
    keys = (table.Key * chunk)()
    vals = (table.Leaf * chunk)()
    in_tok, out_tok = ct.c_uint32(0), ct.c_uint32(0)
    count = ct.c_uint32(0)
    out = []
    first = True
    while True:
        count.value = chunk
        res = fn(table.map_fd, None if first else ct.byref(in_tok), ct.byref(out_tok),
                 ct.cast(keys, ct.c_void_p), ct.cast(vals, ct.c_void_p), ct.byref(count))
        err = (ct.get_errno() or -res) if res != 0 else 0
        if res != 0 and err == errno.ENOSPC and count.value == 0:
            # one hash bucket holds more entries than the buffer: grow it and start again
            return _read_batch(lib, table, delete, chunk * 4) if not delete else out + _read_batch(
                lib, table, delete, chunk * 4)
        for i in range(count.value):
            out.append((_unwrap(_copy(keys[i])), _copy(vals[i])))
        if res != 0:
            if err == errno.ENOENT:
                return out
            raise OSError(err, os.strerror(err))
        in_tok.value = out_tok.value
        first = False
