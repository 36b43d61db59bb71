"""Family "traces" (traces.c): a message per call of a user function named with --trace, formatted from its
arguments at entry and its return value at return (what OSdetector's function traces gave)."""

from __future__ import annotations

import ctypes as ct
import logging
import string
from dataclasses import dataclass

from .family import Family, FamilyLoadError
from .uprobes import ProbeSpec

log = logging.getLogger("osad.collector")

#: the fields a --trace format may use: the arguments as 64-bit and as 32-bit signed integers, the return value
FIELDS = tuple([f"arg{i}" for i in range(1, 7)] + [f"arg{i}_32" for i in range(1, 7)]
               + ["retval", "retval_32", "pid", "tid", "function"])


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


@dataclass(frozen=True)
class TraceSpec:
    """``BINARY:FUNCTION[|ENTRY FORMAT[|RETURN FORMAT]]``: formats are Python ``str.format`` templates over
    :data:`FIELDS`, e.g. ``/usr/bin/app:search|Enter search, n={arg1_32}|search returned {retval_32}``. An empty
    format sends no message for that side (a return format of ``-``: no uretprobe at all)."""

    binary: str
    function: str
    entry: str
    ret: str

    @staticmethod
    def parse(text: str) -> "TraceSpec":
        where, *formats = text.split("|")
        if len(formats) > 2:
            raise ValueError("write BINARY:FUNCTION|ENTRY FORMAT|RETURN FORMAT (at most two | in it)")
        p = ProbeSpec.parse(where)  # the same checks as --probe
        entry = formats[0] if formats else f"{p.function}({{arg1}}, {{arg2}}, {{arg3}})"
        ret = formats[1] if len(formats) > 1 else f"{p.function} returned {{retval}}"
        for fmt in (entry, ret):
            try:
                names = {f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None}
            except ValueError as e:
                raise ValueError(f"bad format {fmt!r}: {e}") from None
            unknown = names - set(FIELDS)
            if unknown:
                raise ValueError(f"unknown field {sorted(unknown)[0]!r} in {fmt!r}; use {', '.join(FIELDS)}")
            try:
                fmt.format(**dict.fromkeys(FIELDS, 0))
            except (ValueError, IndexError, KeyError) as e:
                raise ValueError(f"bad format {fmt!r}: {e}") from None
        return TraceSpec(p.binary, p.function, entry, "" if ret == "-" else ret)

    def text(self, kind: int, args, pid: int, tid: int) -> str | None:
        """The message of one event (kind 0: entry, 1: return), or None when that side has no format."""
        fmt = self.entry if kind == 0 else self.ret
        if not fmt:
            return None
        vals = {"pid": pid, "tid": tid, "function": self.function}
        if kind == 0:
            for i, v in enumerate(args, 1):
                vals[f"arg{i}"], vals[f"arg{i}_32"] = int(v), _s32(int(v))
            vals.update(retval=0, retval_32=0)
        else:
            vals.update({f"arg{i}": 0 for i in range(1, 7)}, **{f"arg{i}_32": 0 for i in range(1, 7)})
            vals["retval"], vals["retval_32"] = int(args[0]), _s32(int(args[0]))
        return fmt.format(**vals)


class Traces(Family):
    name = "traces"
    c_file = "traces.c"
    counters = ()

    def __init__(self, settings):
        super().__init__(settings)
        self.specs: list[TraceSpec] = list(settings.traces)
        self._events: list[tuple] = []
        self._lost = 0

    def extra_defines(self) -> dict[str, str]:
        return {"OSAD_TRACE_RATE": str(int(self.settings.trace_rate))}

    def extra_source(self) -> str:
        return "".join(f"OSAD_TRACE({i})\n" for i in range(len(self.specs)))

    def attach(self) -> None:
        for i, t in enumerate(self.specs):
            try:
                self.bpf.attach_uprobe(name=t.binary.encode(), sym=t.function.encode(),
                                       fn_name=f"osad_trace_enter_{i}".encode())
                if t.ret:
                    self.bpf.attach_uretprobe(name=t.binary.encode(), sym=t.function.encode(),
                                              fn_name=f"osad_trace_return_{i}".encode())
            except Exception as e:  # bcc raises plain Exception
                raise FamilyLoadError(f"could not attach --trace {t.binary}:{t.function} ({e}); check that the "
                                      "binary exists and exports that symbol (nm -D / nm)") from None
        self.bpf[b"trace_events"].open_perf_buffer(self._on_event, page_cnt=64, lost_cb=self._on_lost)

    def _on_event(self, cpu, data, size) -> None:
        ev = ct.cast(data, ct.POINTER(_Event)).contents
        self._events.append((int(ev.ts), int(ev.tgid), int(ev.tid), int(ev.probe), int(ev.kind),
                             [int(ev.args[i]) for i in range(6)]))

    def _on_lost(self, n) -> None:
        self._lost += int(n)

    def drain(self) -> tuple[list[tuple], int, int]:
        """The events since the last drain (ts_ns monotonic, tgid, tid, trace index, kind, args), and how many
        were lost so far: dropped by the per-process rate limit, and lost by the perf buffer (it was full)."""
        self.bpf.perf_buffer_poll(timeout=0)
        out, self._events = self._events, []
        dropped = int(self.bpf[b"trace_dropped"][0].value)
        return out, dropped, self._lost

    # no counters: nothing for the tracker
    def read_live(self):
        return {}

    def read_dead(self):
        return []

    def delete_keys(self, keys) -> None:
        pass


class _Event(ct.Structure):
    _fields_ = [("ts", ct.c_uint64), ("tgid", ct.c_uint32), ("tid", ct.c_uint32), ("probe", ct.c_uint32),
                ("kind", ct.c_uint32), ("args", ct.c_int64 * 6)]
