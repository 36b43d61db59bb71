"""Where anomalies go besides the topic and the store: webhooks and a JSONL file.

Both derive from :class:`osad.runtime.sinks.Sink`. A sink's ``send(anomaly)`` never blocks the pipeline.
:class:`WebhookSink` posts the anomaly's JSON (the same bytes as on the topic) from a background
thread with retries and exponential backoff; its queue is bounded, and when it is full the oldest
waiting anomaly is dropped and counted. :class:`JsonlSink` appends one anomaly per line (``--jsonl``).

Counters (``counts``): ``sent`` (2xx answer), ``retried`` (attempts that failed and were retried),
``failed`` (given up: a 4xx answer other than 408/429, or every attempt failed), ``dropped``
(queue full).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from osad.runtime import sinks as runtime_sinks
from osad.runtime.sinks import Sink, SinkError
from osad.schemas import Anomaly, encode

__all__ = ["JsonlSink", "Sink", "SinkError", "WebhookSink"]

log = logging.getLogger("osad.alerter.sinks")


class JsonlSink(runtime_sinks.JsonlSink):
    """``--jsonl``: appends one JSON anomaly per line to ``path`` (never truncates), flushed after each."""

    def __init__(self, path: str):
        super().__init__(path, append=True, flush_each=True, what="--jsonl")


class WebhookSink(Sink):
    """HTTP POST of each anomaly's JSON to ``url``, from a background thread.

    ``retries`` attempts after the first, waiting ``backoff_s`` * 2**k (at most ``max_backoff_s``)
    between them; at most ``queue_size`` anomalies wait (the oldest is dropped beyond that).
    """

    def __init__(self, url: str, queue_size: int = 1000, retries: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, timeout_s: float = 5.0):
        super().__init__()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SinkError(f"--webhook {url!r} is not an http:// or https:// URL")
        if queue_size < 1 or retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise SinkError("webhook queue size must be >= 1, retries >= 0, backoff >= 0 and timeout > 0")
        self.url, self.name = url, f"webhook:{parts.scheme}://{parts.netloc}"
        self.retries, self.backoff_s, self.max_backoff_s, self.timeout_s = retries, backoff_s, max_backoff_s, timeout_s
        self.queue: collections.deque = collections.deque()
        self.queue_size = queue_size
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=f"osad-{self.name}", daemon=True)
        self._thread.start()

    def send(self, anomaly: Anomaly) -> None:
        body = encode(anomaly)
        with self._cv:
            if len(self.queue) >= self.queue_size:
                self.queue.popleft()
                self.counts["dropped"] += 1
            self.queue.append(body)
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self.queue) + (1 if self._busy else 0)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self.queue and not self._stop.is_set():
                    self._cv.wait()
                if not self.queue:
                    return  # stopped and drained
                body = self.queue.popleft()
                self._busy = True
            try:
                self._deliver(body)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _deliver(self, body: bytes) -> None:
        for attempt in range(self.retries + 1):
            ok, permanent, why = self._post(body)
            if ok:
                self.counts["sent"] += 1
                return
            if permanent or attempt == self.retries or self._stop.is_set():
                self.counts["failed"] += 1
                log.warning("%s: giving up on an anomaly after %d attempt(s): %s", self.name, attempt + 1, why)
                return
            self.counts["retried"] += 1
            self._stop.wait(min(self.max_backoff_s, self.backoff_s * (2 ** attempt)))

    def _post(self, body: bytes) -> tuple[bool, bool, str]:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "osad-alerter"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                r.read()
                return 200 <= r.status < 300, False, f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            permanent = 400 <= e.code < 500 and e.code not in (408, 429)
            return False, permanent, f"HTTP {e.code}"
        except (OSError, ValueError) as e:  # refused, timeout, DNS, TLS
            return False, False, str(getattr(e, "reason", e))

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued for up to ``timeout_s``, then stop (what is left is counted as dropped)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self.queue or self._busy) and time.monotonic() < deadline:
                self._cv.wait(max(0.01, deadline - time.monotonic()))
            left = len(self.queue)
            self.queue.clear()
            self._stop.set()
            self._cv.notify_all()
        if left:
            self.counts["dropped"] += left
            log.warning("%s: %d anomalies not delivered before stopping", self.name, left)
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()) + self.timeout_s)
