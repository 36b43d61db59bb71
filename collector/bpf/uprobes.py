"""Family "uprobes" (uprobes.c): calls and latency of user functions named with --probe."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .family import Family, FamilyLoadError, read_map


@dataclass(frozen=True)
class ProbeSpec:
    binary: str     # path, or a library name bcc resolves (e.g. "c" for libc)
    function: str
    label: str      # used in metric names: uprobe_<label>_calls, ...

    @staticmethod
    def parse(text: str) -> "ProbeSpec":
        """``/path/to/binary:function`` (or ``lib:function``, e.g. ``c:malloc``). The ValueError says
        what is wrong with ``text`` (argparse and the config name the flag or variable around it)."""
        binary, sep, function = text.rpartition(":")
        if not sep or not binary or not function:
            raise ValueError("write BINARY:FUNCTION, e.g. /usr/bin/myapp:handle_request "
                             "or c:malloc")
        if not re.fullmatch(r"[A-Za-z_.$@][\w.$@]*", function):
            raise ValueError(f"{function!r} is not a function symbol name")
        if "/" in binary and not os.path.exists(binary):
            raise ValueError(f"{binary} does not exist")
        label = re.sub(r"[^0-9a-zA-Z]+", "_", function).strip("_").lower() or "fn"
        return ProbeSpec(binary, function, label)

    def metric_names(self) -> tuple[str, str]:
        """Counters kept in kernel: calls (at entry) and total time inside (at return)."""
        return (f"uprobe_{self.label}_calls", f"uprobe_{self.label}_time_ns")

    def mean_name(self) -> str:
        return f"uprobe_{self.label}_latency_mean_ns"


def unique_labels(specs: list[ProbeSpec]) -> list[ProbeSpec]:
    """Give probes of the same function in different binaries distinct labels."""
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        label = s.label
        if label in seen:
            base = re.sub(r"[^0-9a-zA-Z]+", "_", os.path.basename(s.binary)).strip("_").lower()
            label = f"{base}_{s.label}"
            n = 2
            while label in seen:
                label, n = f"{base}_{s.label}_{n}", n + 1
        seen[label] = 1
        out.append(ProbeSpec(s.binary, s.function, label))
    return out


class Uprobes(Family):
    name = "uprobes"
    c_file = "uprobes.c"

    def __init__(self, settings):
        super().__init__(settings)
        self.probes: list[ProbeSpec] = unique_labels(list(settings.probes))
        self.counters = tuple(n for p in self.probes for n in p.metric_names())

    def extra_defines(self) -> dict[str, str]:
        return {"OSAD_NPROBES": str(len(self.probes))}

    def extra_source(self) -> str:
        return "".join(f"OSAD_PROBE({i})\n" for i in range(len(self.probes)))

    def attach(self) -> None:
        for i, p in enumerate(self.probes):
            try:
                self.bpf.attach_uprobe(name=p.binary.encode(), sym=p.function.encode(),
                                       fn_name=f"osad_uprobe_{i}".encode())
                self.bpf.attach_uretprobe(name=p.binary.encode(), sym=p.function.encode(),
                                          fn_name=f"osad_uretprobe_{i}".encode())
            except Exception as e:
                raise FamilyLoadError(f"could not attach --probe {p.binary}:{p.function} ({e}); check that the "
                                      "binary exists and exports that symbol (nm -D / nm)") from None

    def _vals(self, probe: int, v) -> dict[str, int]:
        calls, time_ns = self.probes[probe].metric_names()
        return {calls: int(v.calls), time_ns: int(v.time_ns)}

    def derive(self, m: dict[str, float]) -> None:
        """Mean latency of the interval's calls; absent in an interval without calls."""
        for p in self.probes:
            calls, time_ns = p.metric_names()
            if m.get(calls, 0) > 0 and time_ns in m:
                m[p.mean_name()] = m[time_ns] / m[calls]

    def read_live(self):
        out: dict[int, tuple[int, dict[str, int]]] = {}
        for k, v in read_map(self.bpf[b"stats"]):
            key = int(k.id)
            tgid, vals = out.setdefault(key, (int(v.tgid), {}))
            vals.update(self._vals(int(k.probe), v))
        return out

    def read_dead(self):
        grouped: dict[tuple[int, int], tuple[int, dict[str, int]]] = {}
        for k, v in read_map(self.bpf[b"dead"], delete=True):
            tgid, vals = grouped.setdefault((int(k.id), int(k.ts)), (int(v.tgid), {}))
            vals.update(self._vals(int(k.probe), v))
        return [(key, ts, tgid, vals) for (key, ts), (tgid, vals) in grouped.items()]

    def delete_keys(self, keys) -> None:
        t = self.bpf[b"stats"]
        for key in keys:
            for i in range(len(self.probes)):
                k = t.Key()
                k.id, k.probe = key, i
                try:
                    del t[k]
                except KeyError:
                    pass
