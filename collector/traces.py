"""Where --trace messages go: one JSON object per line (collector/bpf/traces.py makes the events).

Each line: ``ts`` (Unix seconds), ``host``, ``pid``, ``tid``, ``comm``, ``trace`` (BINARY:FUNCTION), ``event``
(``entry`` or ``return``) and ``text`` (the trace's format filled in). The kernel stamps events on the monotonic
clock; they are put on the wall clock here. What the per-process rate limit dropped, or the perf buffer lost,
is counted and said once per change, and at the end.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from .procfs import read_comm

log = logging.getLogger("osad.collector")


class TraceWriter:
    def __init__(self, path: str, specs, host: str):
        self.specs, self.host = list(specs), host
        if path == "-":
            self.fh, self._own = sys.stdout, False
        else:
            try:
                self.fh, self._own = open(path, "a", encoding="utf-8"), True
            except OSError as e:
                from .sinks import SinkError

                raise SinkError(f"--trace-output jsonl:{path}: cannot open for writing: {e}") from None
        self.written = 0
        self.dropped = self.lost = 0
        self._comm: dict[int, str] = {}

    def write(self, events, dropped: int = 0, lost: int = 0) -> None:
        if events:
            offset = time.time() - time.monotonic_ns() / 1e9  # kernel monotonic ns -> Unix seconds
            lines = []
            for ts, tgid, tid, probe, kind, args in events:
                spec = self.specs[probe]
                text = spec.text(kind, args, tgid, tid)
                if text is None:
                    continue
                comm = self._comm.get(tid) or self._comm.setdefault(tid, read_comm(tgid, tid) or "")
                lines.append(json.dumps({"ts": round(ts / 1e9 + offset, 6), "host": self.host, "pid": tgid,
                                         "tid": tid, "comm": comm, "trace": f"{spec.binary}:{spec.function}",
                                         "event": "entry" if kind == 0 else "return", "text": text}))
            if lines:
                self.fh.write("\n".join(lines) + "\n")
                self.fh.flush()
                self.written += len(lines)
            if len(self._comm) > 10000:
                self._comm.clear()
        if (dropped, lost) != (self.dropped, self.lost):
            log.warning("--trace: %d messages dropped by --trace-rate, %d lost by a full perf buffer so far",
                        dropped, lost)
            self.dropped, self.lost = dropped, lost

    def close(self) -> None:
        log.info("--trace: %d messages written; %d dropped by --trace-rate, %d lost", self.written, self.dropped,
                 self.lost)
        if self._own:
            self.fh.close()
