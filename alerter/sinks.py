"""Where anomalies go besides the topic and the store: webhooks and a JSONL file.

Both derive from :class:`osad.runtime.sinks.Sink`. A sink's ``send(anomaly)`` never blocks the pipeline.
:class:`WebhookSink` posts the anomaly's JSON (the same bytes as on the topic) from a background
thread with retries and exponential backoff; its queue is bounded, and when it is full the oldest
waiting anomaly is dropped and counted. :class:`AlertmanagerWebhookSink` delivers the same way but posts
Alertmanager's webhook payload (version 4, :func:`alertmanager_payload`), so anything that receives
Alertmanager's webhooks receives osad's anomalies (``--webhook-format alertmanager``). :class:`JsonlSink`
appends one anomaly per line (``--jsonl``).

Counters (``counts``): ``sent`` (2xx answer), ``retried`` (attempts that failed and were retried),
``failed`` (given up: a 4xx answer other than 408/429, or every attempt failed), ``dropped``
(queue full).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from urllib.parse import quote, urlsplit

from osad.runtime import sinks as runtime_sinks
from osad.runtime.sinks import Sink, SinkError
from osad.schemas import Anomaly, encode

__all__ = ["AlertmanagerWebhookSink", "JsonlSink", "Sink", "SinkError", "WebhookSink", "alertmanager_payload"]

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

    def body(self, anomaly: Anomaly) -> bytes:
        """What is posted for ``anomaly``: its JSON, the same bytes as on the topic."""
        return encode(anomaly)

    def send(self, anomaly: Anomaly) -> None:
        body = self.body(anomaly)
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


# -- Alertmanager's webhook payload --------------------------------------------------------------

#: the alert name of every anomaly posted in Alertmanager's format
ALERTNAME = "OsadAnomaly"
#: Alertmanager's endsAt of an alert that is still firing (Go's zero time)
ZERO_TIME = "0001-01-01T00:00:00Z"


def rfc3339(ts: float) -> str:
    """Unix seconds as an RFC 3339 time in UTC, to the millisecond.

    >>> rfc3339(1767228890.0), rfc3339(0.25)
    ('2026-01-01T00:54:50.000Z', '1970-01-01T00:00:00.250Z')
    """
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _link(template: str | None, a: Anomaly) -> str:
    if not template:
        return ""
    return template.format_map({k: quote(str(v), safe="") for k, v in
                                (("entity", a.entity_id), ("host", a.host), ("anomaly_id", a.anomaly_id))})


def alertmanager_payload(a: Anomaly, receiver: str = "osad", link: str | None = None) -> dict:
    """Alertmanager's webhook payload (version 4) for one published state of an incident: one alert, firing
    while the incident is open (``open``, ``update``), resolved with ``endsAt`` once it is ``closed``.

    * labels: ``alertname`` (``OsadAnomaly``), ``anomaly_id``, ``entity``, ``host``, ``severity``, ``scope``
      and, when known, ``comm``, ``pid``, ``container_id``, ``cgroup``. Severity only grows during an incident.
    * annotations: ``summary``, ``description``, ``top_features`` (``feature share%``, by share), ``models``
      (families), ``max_ratio``, ``score``, ``threshold``, ``revision``, ``osad_status`` (open, update, closed),
      ``members`` (a host-wide event's processes).
    * ``startsAt``: the incident's start; ``endsAt``: its end when closed (``end_ts``, else ``last_ts``), else
      Alertmanager's zero time; both RFC 3339 in UTC. ``fingerprint``: the first 16 hex digits of the
      anomaly id, and ``groupKey`` names the anomaly id: both stay the same from open to closed, so a receiver
      that deduplicates on either resolves the alert it opened.
    * ``generatorURL``: ``link`` with ``{entity}``, ``{host}`` and ``{anomaly_id}`` replaced (URL-encoded), e.g. a
      Grafana dashboard; ``externalURL``: its scheme and host. Both empty without ``link``.
    * one alert per payload: ``commonLabels`` and ``commonAnnotations`` are its own, ``truncatedAlerts`` 0.
    """
    status = "resolved" if a.status == "closed" else "firing"
    labels = {"alertname": ALERTNAME, "anomaly_id": a.anomaly_id, "entity": a.entity_id, "host": a.host,
              "severity": a.severity, "scope": a.scope}
    for k in ("comm", "pid", "container_id", "cgroup"):
        v = getattr(a, k)
        if v is not None and v != "":
            labels[k] = str(v)
    top = ", ".join(f"{r.feature} {r.contribution:.1%}" for r in a.root_causes)
    families = ", ".join(dict.fromkeys(m.split(":", 1)[0] for m in a.models))
    ratio = a.max_ratio if a.max_ratio is not None else (a.score / a.threshold if a.threshold else 0.0)
    if a.scope == "host":
        who = f"host {a.host} ({len(a.members)} processes together)"
    else:
        who = (f"{a.comm} (pid {a.pid})" if a.comm and a.pid is not None else (a.comm or a.entity_id)) + f" on {a.host}"
    desc = (f"{who}: {families or 'a model'} over threshold"
            f"{f' in {a.windows_over} window(s)' if a.windows_over is not None else ''}, max {ratio:.2f}x threshold "
            f"(score {a.score:.4g}, threshold {a.threshold:.4g}); severity {a.severity}")
    if top:
        desc += f"; top features: {top}"
    desc += f"; osad anomaly {a.anomaly_id} revision {a.revision} ({a.status})"
    annotations = {"summary": a.summary or desc.split(";")[0], "description": desc, "top_features": top,
                   "models": families, "max_ratio": f"{ratio:.4g}", "score": f"{a.score:.6g}",
                   "threshold": f"{a.threshold:.6g}", "revision": str(a.revision), "osad_status": a.status}
    if a.members:
        annotations["members"] = ", ".join(a.members)
    annotations = {k: v for k, v in annotations.items() if v != ""}
    generator = _link(link, a)
    parts = urlsplit(generator)
    alert = {
        "status": status, "labels": labels, "annotations": annotations,
        "startsAt": rfc3339(a.start_ts),
        "endsAt": rfc3339(a.end_ts if a.end_ts is not None else a.last_ts) if status == "resolved" else ZERO_TIME,
        "generatorURL": generator, "fingerprint": a.anomaly_id[:16],
    }
    group = {"alertname": ALERTNAME, "anomaly_id": a.anomaly_id}
    return {
        "version": "4",
        "groupKey": "{}:{" + ", ".join(f'{k}="{v}"' for k, v in sorted(group.items())) + "}",
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": group,
        "commonLabels": dict(labels),
        "commonAnnotations": dict(annotations),
        "externalURL": f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "",
        "alerts": [alert],
    }


class AlertmanagerWebhookSink(WebhookSink):
    """``--webhook-format alertmanager``: posts :func:`alertmanager_payload` of each anomaly state, delivered as
    :class:`WebhookSink` delivers (background thread, retries, bounded queue). ``link``: the generatorURL
    template."""

    def __init__(self, url: str, *, receiver: str = "osad", link: str | None = None, **kw):
        if link:
            try:
                _link(link, Anomaly(entity_id="e", host="h", anomaly_id="0", status="open", severity="low",
                                    start_ts=0.0, last_ts=0.0, score=0.0, threshold=1.0, models=[]))
            except (KeyError, ValueError, IndexError) as e:
                raise SinkError(f"--webhook-link {link!r}: use only {{entity}}, {{host}} and {{anomaly_id}} "
                                f"({type(e).__name__}: {e})") from None
        super().__init__(url, **kw)
        self.receiver, self.link = receiver, link

    def body(self, anomaly: Anomaly) -> bytes:
        return json.dumps(alertmanager_payload(anomaly, self.receiver, self.link)).encode()
