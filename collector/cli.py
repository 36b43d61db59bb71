"""Subcommands of the collector package: ``osad replay`` (benchmark data) and ``osad collect`` (eBPF)."""

from __future__ import annotations


def register(sub) -> None:
    from .replay import register_replay

    register_replay(sub)
    try:
        from .main import register_collect  # the eBPF collector (collector/main.py)
    except ModuleNotFoundError as e:
        if e.name != "osad.collector.main":
            raise
    else:
        register_collect(sub)
