"""What the collector's sampling loop asks of a source of per-process metrics.

Two backends implement :class:`Backend`: the eBPF metric families (``ebpf_backend.py``: counters
aggregated in kernel maps) and the /proc fallback (``procfs_backend.py``: cumulative counters read
from /proc every interval). The loop (``loop.py``) knows only this protocol: it adds targets, polls
once per interval for the interval's :class:`~osad.collector.core.Report` of every entity, asks
for an entity's description (comm, cgroup) before publishing it, and closes the backend at the end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from .core import Entity, Report


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the text says why, in one line, and what to do about it."""


class Backend(ABC):
    """A source of per-process (and per-thread) metrics, drained once per interval."""

    #: short name (``ebpf``, ``procfs``): the health endpoint's ``backend`` and the log
    name: str = ""
    #: every metric name a Sample from this backend may carry (the CSV output's columns)
    metric_names: list[str]
    #: one-line notes from starting (e.g. a metric family that did not load), logged by the loop
    warnings: list[str]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run on this machine (one line), or None if it may."""
        return None

    @abstractmethod
    def describe(self) -> str:
        """What collects, for the log line at start (e.g. ``eBPF (sched, syscalls, ...)``)."""

    @abstractmethod
    def add_target(self, pid: int) -> Entity | None:
        """Watch process ``pid`` from now on; its entity, or None if it is gone already."""

    @abstractmethod
    def poll(self) -> list[Report]:
        """End the current interval: one report per entity with something to report."""

    def events_since_last(self) -> int:
        """Kernel events handled since the previous call (0 where nothing is counted in kernel)."""
        return 0

    @abstractmethod
    def watching(self) -> bool:
        """Target mode: some watched process is still alive."""

    def describe_entity(self, r: Report) -> None:
        """Fill in what a Sample names (comm, cgroup, ...) before ``r`` is published."""
        r.entity.described = True

    def close(self) -> None:
        """Release what the backend holds (kernel programs and maps)."""
