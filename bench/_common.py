"""What the benchmarks that run osad services as processes share: start and stop a service, read its
metrics and health, read a topic without a consumer group (runtime/reader.py).

The scripts set ``sys.path[0]`` to the repository root, so this module is imported as ``bench._common``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from osad.runtime.procs import start_logged, stop_all  # noqa: E402 (the scripts put the root on sys.path first)
from osad.runtime.reader import assign_partitions  # noqa: E402


def osad_process(args: list[str], log: Path, env: dict | None = None, wrap: list[str] | tuple = ()) -> subprocess.Popen:
    """``python -m osad ARGS`` as its own process, output to ``log``. It runs in a session of its own:
    a Ctrl-C in the terminal reaches only the benchmark, which then stops it (:func:`stop_processes`)."""
    return start_logged([*wrap, sys.executable, "-m", "osad", *args], log, cwd=ROOT,
                        env=dict(os.environ if env is None else env, PYTHONUNBUFFERED="1"))


def stop_processes(procs: list[subprocess.Popen], timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """``sig`` to every process still running (in the order given), then SIGKILL after ``timeout_s``."""
    stop_all(procs, timeout_s, sig)


def http_text(port: int, path: str, timeout_s: float = 5.0) -> str | None:
    """The body of GET http://127.0.0.1:PORT/PATH (also of a 503), or None when nothing answers."""
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s).read().decode()
    except urllib.error.HTTPError as e:
        return e.read().decode()
    except OSError:
        return None


def health(port: int) -> dict | None:
    text = http_text(port, "/healthz")
    return json.loads(text) if text else None


_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(text: str | None, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in Prometheus text whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for line in (text or "").splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def assign_all(consumer, topic: str, at_end: bool = False) -> bool:
    """Assign every partition of ``topic`` to a group-less consumer besides what it has, from its beginning
    (or its current end, resolved now). False while the topic's metadata is not there yet. (New code: a
    :class:`osad.runtime.reader.TopicReader`.)"""
    return assign_partitions(consumer, [topic], from_beginning=not at_end, keep=True) is not None


def wait_for(cond, timeout_s: float, what: str, every_s: float = 0.1):
    """Poll ``cond`` until it returns a truthy value (returned); RuntimeError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (v := cond()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)
    return v
