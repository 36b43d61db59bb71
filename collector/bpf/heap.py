"""Family "heap" (heap.c, opt-in with --heap): libc malloc/calloc/realloc/free, aggregated in kernel.

Counters ``heap_allocs``, ``heap_alloc_bytes``, ``heap_frees``, ``heap_free_bytes``; the collector loop adds
the gauge ``heap_outstanding_bytes`` (allocated minus freed since the process was first watched). Uprobes on
libc fire in every process that calls them, watched or not, so the cost is paid host-wide: see
docs/benchmarks.md before turning it on for ``--all``.
"""

from __future__ import annotations

import logging

from .family import Family, FamilyLoadError

log = logging.getLogger("osad.collector")

#: outstanding allocations the kernel map can hold (each 24 bytes of key and value)
HEAP_MAX = 1 << 20
#: (libc function, BPF program at entry, BPF program at return or None)
_PROBES = (("malloc", "heap_malloc", "heap_allocated"), ("calloc", "heap_calloc", "heap_allocated"),
           ("realloc", "heap_realloc", "heap_allocated"), ("free", "heap_free", None))


class Heap(Family):
    name = "heap"
    c_file = "heap.c"
    counters = ("heap_allocs", "heap_alloc_bytes", "heap_frees", "heap_free_bytes")

    def extra_defines(self) -> dict[str, str]:
        return {"OSAD_HEAP_MAX": str(HEAP_MAX)}

    def attach(self) -> None:
        for fn, enter, ret in _PROBES:
            try:
                self.bpf.attach_uprobe(name=b"c", sym=fn.encode(), fn_name=enter.encode())
                if ret:
                    self.bpf.attach_uretprobe(name=b"c", sym=fn.encode(), fn_name=ret.encode())
            except Exception as e:  # bcc raises plain Exception
                raise FamilyLoadError(f"cannot attach to libc {fn}: {e}") from None

    def read_live(self):
        full = int(self.bpf[b"live_full"][0].value)
        if full and not getattr(self, "_said_full", False):
            self._said_full = True
            log.warning("--heap: the kernel map of outstanding allocations is full (%d entries); frees of newer "
                        "allocations are not counted, so heap_outstanding_bytes overstates", HEAP_MAX)
        return super().read_live()
