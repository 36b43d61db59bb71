"""Shared fixtures: one real embedded broker per test session, unique topic prefixes per test."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("OSAD_DATASETS", ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def broker():
    """A real Kafka-protocol broker (Tansu) on loopback for the whole test session."""
    from osad.runtime.broker import EmbeddedBroker

    b = EmbeddedBroker().start()
    yield b
    b.stop()


@pytest.fixture
def topic_prefix(monkeypatch):
    """Isolate a test's topics on the shared broker: every topic name gets a unique prefix."""
    prefix = f"t{uuid.uuid4().hex[:8]}."
    monkeypatch.setenv("OSAD_TOPIC_PREFIX", prefix)
    return prefix


def wait_until(cond, timeout_s: float = 60.0, every_s: float = 0.05, what: str = "condition"):
    """Poll ``cond`` until it returns a truthy value; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


def osad_cmd(*args: str) -> list[str]:
    """Command line that runs the osad CLI with this interpreter."""
    return [sys.executable, "-m", "osad", *args]


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not (DATASETS / "SMD").is_dir():
        pytest.skip(f"benchmark data sets not found at {DATASETS} (set OSAD_DATASETS)")
    return DATASETS


@pytest.fixture
def one_torch_thread():
    """The test machine is small and shared: one solver thread avoids oversubscription stalls (use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
