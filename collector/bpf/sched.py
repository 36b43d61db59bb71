"""Family "sched" (sched.c): on-CPU time, run-queue wait, voluntary and involuntary switches."""

from __future__ import annotations

import platform
import re

from .family import Family


def kernel_at_least(major: int, minor: int, release: str | None = None) -> bool:
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (major, minor)


class Sched(Family):
    name = "sched"
    c_file = "sched.c"
    counters = ("on_cpu_ns", "runq_wait_ns", "ctx_switches_voluntary", "ctx_switches_involuntary")

    def extra_defines(self) -> dict[str, str]:
        # sched_switch's raw tracepoint has prev_state as its 4th argument since 5.18
        return {"OSAD_TICK_HZ": str(self.settings.tick_hz), "OSAD_RAW_SWITCH": str(int(kernel_at_least(5, 18)))}

    def attach(self) -> None:
        from bcc import PerfSWConfig, PerfType

        # A per-CPU clock credits a running task's time so far (a task that never switches out
        # is still counted in the interval in which it runs).
        self.bpf.attach_perf_event(ev_type=PerfType.SOFTWARE, ev_config=PerfSWConfig.CPU_CLOCK,
                                   fn_name=b"osad_tick", sample_freq=self.settings.tick_hz)
