"""Test helpers that read topics of the real broker and run osad services as processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kafka import KafkaProducer

from osad.runtime.reader import TopicReader as Reader
from osad.schemas import Topic, decode


class TopicReader:
    """Every record of one topic from the beginning, without a consumer group (runtime/reader.py), kept in
    ``records``; ``messages()`` decodes them all (``model``: another type than the topic's)."""

    def __init__(self, bootstrap: str, topic: Topic | str, model=None, prefix: str = ""):
        self.reader = Reader(bootstrap, topic, prefix=prefix, client_id="osad-test-reader")
        self.name = next(iter(self.reader.topics))
        self.model = model if model is not None else (None if isinstance(topic, str) else topic.model)
        self.records: list = []

    def poll(self, timeout_ms: int = 200) -> list:
        new = self.reader.poll(timeout_ms)
        self.records += new
        return new

    def messages(self):
        return [decode(m.value, self.model) for m in self.records]

    def read_until(self, cond, timeout_s: float = 90.0, what: str = "messages"):
        deadline = time.monotonic() + timeout_s
        while not cond(self.records):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; have {len(self.records)}")
            self.poll()
        return self.records

    def close(self):
        self.reader.close()


def produce_raw(bootstrap: str, topic: str, key: bytes | None, value: bytes) -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    p.send(topic, key=key, value=value).get(30)
    p.close()


class Proc:
    """An osad subcommand run as its own OS process, output to a log file."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log = log
        self.fh = open(log, "ab")
        self.p = subprocess.Popen([sys.executable, "-m", "osad", *args], stdout=self.fh, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise AssertionError(f"process did not stop within {timeout_s} s after SIGTERM:\n{self.text()[-3000:]}")
        finally:
            self.fh.close()

    def run_to_end(self, timeout_s: float = 120.0) -> int:
        try:
            rc = self.p.wait(timeout_s)
        finally:
            self.fh.close()
        assert rc == 0, f"exit code {rc}:\n{self.text()[-3000:]}"
        return rc


def http_get(port: int, path: str) -> tuple[int, str]:
    import http.client
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (OSError, http.client.HTTPException):  # not listening yet, or not speaking HTTP
        return 0, ""


def metric(port: int, name: str, **labels) -> float | None:
    """Sum of a Prometheus metric's samples (matching ``labels``) from a service's /metrics."""
    code, text = http_get(port, "/metrics")
    if code != 200:
        return None
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


def health(port: int) -> dict | None:
    import json

    code, text = http_get(port, "/healthz")
    return json.loads(text) if code in (200, 503) and text else None


def replicas_split(ports: list[int], n_partitions: int) -> bool:
    """True once every replica (by its /healthz) owns partitions, none twice, all covered."""
    owned = []
    for port in ports:
        h = health(port)
        if not h or not h["assigned_partitions"]:
            return False
        owned.append(set(h["assigned_partitions"]))
    union = set().union(*owned)
    return sum(len(o) for o in owned) == len(union) == n_partitions
