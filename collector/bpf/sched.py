"""Family "sched" (sched.c): on-CPU time, run-queue wait, voluntary and involuntary switches."""

from __future__ import annotations

from .family import Family


class Sched(Family):
    name = "sched"
    c_file = "sched.c"
    counters = ("on_cpu_ns", "runq_wait_ns", "ctx_switches_voluntary", "ctx_switches_involuntary")

    def extra_defines(self) -> dict[str, str]:
        return {"OSAD_TICK_HZ": str(self.settings.tick_hz)}

    def attach(self) -> None:
        from bcc import PerfSWConfig, PerfType

        # A per-CPU clock credits a running task's time so far (a task that never switches out
        # is still counted in the interval in which it runs).
        self.bpf.attach_perf_event(ev_type=PerfType.SOFTWARE, ev_config=PerfSWConfig.CPU_CLOCK,
                                   fn_name=b"osad_tick", sample_freq=self.settings.tick_hz)
