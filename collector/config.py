"""The settings of ``osad collect``, declared once: its flags, ``OSAD_*`` variables, checks and
--help come from :class:`CollectorConfig`, and the sampling loop (``loop.py``) reads the same object.

Example::

    >>> cfg = CollectorConfig(targets=TargetConfig(all=True), interval_s=0.5)
    >>> cfg.targets.spec().describe(), cfg.interval_s, cfg.max_processes
    ('all processes', 0.5, 100)
"""

from __future__ import annotations

from dataclasses import dataclass

from osad.runtime.config import Config, KafkaConfig, ServiceConfig, non_negative, positive, section, setting

from .bpf.traces import TraceSpec
from .bpf.uprobes import ProbeSpec
from .targets import TargetSpec, build

WHAT = "what to watch (exactly one)"


@dataclass(frozen=True)
class TargetConfig(Config):
    """What to watch, as given: exactly one of --pid, --command, --comm and --all (:meth:`spec` checks)."""

    pids: list[str] = setting([], flag="--pid", group=WHAT, metavar="PID[,PID...]", repeat=",",
                              help="watch these running processes (comma-separate several)")
    command: str | None = setting(None, group=WHAT, metavar='"PROG ARGS"',
                                  help="start this command and watch it from its first instruction; stop when it "
                                  "(and, with --follow-children, its descendants) has exited")
    comm: str | None = setting(None, group=WHAT, metavar="REGEX",
                               help="watch every process whose command name (comm) matches REGEX")
    all: bool = setting(False, group=WHAT,
                        help="watch every process; each interval reports the --max-processes with most on-CPU time")
    follow_children: bool = setting(False,
                                    help="with --pid/--command: also watch processes they start, and theirs")

    def spec(self) -> TargetSpec:
        """The checked targets (raises ``TargetError`` saying which option is wrong)."""
        return build(pids=self.pids, command=self.command, comm=self.comm, all_=self.all,
                     follow_children=self.follow_children)


@dataclass(frozen=True)
class CollectorConfig(Config):
    """watch processes with eBPF and publish per-process Samples

    Watch processes with eBPF (tracepoints and uprobes, aggregated in kernel maps, drained every interval) and
    publish one Sample per process per interval to the samples topic, or record them to a file. Without eBPF
    (not root, no bcc, no kernel headers) it samples /proc instead.
    """

    targets: TargetConfig = section(TargetConfig)
    per_thread: bool = setting(False, flag="--threads", env="OSAD_COLLECT_THREADS",  # OSAD_THREADS: the detector's
                               help="also report each thread (entity id .../t<tid>) with its own counters")
    probes: list[ProbeSpec] = setting([], flag="--probe", parse=ProbeSpec.parse, repeat=",",
                                      metavar="BINARY:FUNCTION",
                                      help="count calls of FUNCTION in BINARY (a path, or a library name such as c) "
                                      "and time inside it, per process (uprobe + uretprobe)")
    traces: list[TraceSpec] = setting([], flag="--trace", parse=TraceSpec.parse, repeat="\n",
                                      metavar="BINARY:FUNCTION|ENTRY|RETURN",
                                      help="a message per call of FUNCTION in BINARY, formatted with Python's "
                                      "str.format from {arg1}..{arg6} (64-bit) or {arg1_32}..{arg6_32} (32-bit "
                                      "signed) at entry and {retval} / {retval_32} at return, also {pid}, {tid}, "
                                      "{function}; e.g. '/usr/bin/app:search|Enter search, n={arg1_32}|search "
                                      "returned {retval_32}' (a RETURN of - traces entries only); to "
                                      "--trace-output; eBPF only")
    trace_output: str = setting("", metavar="jsonl:PATH",
                                help="where --trace messages go: jsonl:PATH (- for standard output), one JSON "
                                "object per line: ts, host, pid, tid, comm, trace, event (entry/return), text")
    trace_rate: int = setting(100, check=positive, help="at most this many --trace messages per process per "
                              "second (in kernel); the rest are counted and said at exit")
    heap: bool = setting(False, help="also follow the heap: libc malloc, calloc, realloc and free (uprobes, "
                         "aggregated in kernel): allocations and bytes allocated and freed per interval, and "
                         "outstanding bytes. The probes fire in every process that calls libc, watched or not, "
                         "so the cost is host-wide (docs/benchmarks.md); eBPF only")
    interval_s: float = setting(1.0, flag="--interval", metavar="INTERVAL", check=positive, help="seconds per Sample")
    max_processes: int | None = setting(100, check=positive,
                                        help="at most this many processes per interval (those with most on-CPU time "
                                        "first); with --threads, at most this many thread Samples too")
    output: str = setting("kafka", help="where Samples go: kafka (the samples topic), jsonl:PATH or csv:PATH "
                          "(PATH - for stdout)")
    duration_s: float = setting(0.0, flag="--duration", metavar="DURATION", check=non_negative,
                                help="stop after this many seconds (0: until interrupted, or until the watched "
                                "command exits); a --command still running then is terminated")
    buffer_mb: float = setting(64.0, check=positive, metavar="MIB",
                               help="with --output kafka: memory for Samples the broker has not acknowledged yet "
                               "(an outage, or no broker yet); when it is full the oldest are dropped and counted "
                               "(osad_collector_samples_dropped_total). 64 MiB hold about 49,000 Samples of the "
                               "36 standard metrics (1.4 kB each): 16 minutes of 50 processes at 1 s")
    host: str = setting("", help="host name used in entity ids (empty: this host's name; in a container with the "
                        "host's pid namespace, the host's, not the container's)")
    require_ebpf: bool = setting(False,
                                 help="fail instead of falling back to /proc sampling when eBPF cannot be used")
    kafka: KafkaConfig = section(KafkaConfig)
    service: ServiceConfig = section(ServiceConfig)  # no --group: the collector consumes no topic

    def validate(self) -> str | None:
        if self.traces and not self.trace_output:
            return "--trace needs --trace-output jsonl:PATH (where its messages go; - for standard output)"
        if self.trace_output and not self.trace_output.startswith("jsonl:"):
            return f"--trace-output {self.trace_output!r}: write jsonl:PATH (- for standard output)"
        return None
