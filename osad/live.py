"""The live terminal view of ``osad up``: services, watched entities, anomalies, errors.

Refreshed about once a second (rich's Live). Everything slow happens in two background threads,
so drawing never waits:

* a **Kafka reader** (runtime/reader.py: no group, from now) of the samples, scores and anomalies
  topics. Samples and scores are kept raw, the latest per entity (the record key); only that one
  is decoded, when a screen is drawn. Anomalies go into ``osad tail``'s view (alerter/tail.py);
* a **poller** of each service's ``/metrics`` and ``/healthz`` and of the tails of their logs.

The pure parts (metrics text -> numbers -> rows, latest messages -> entity rows, a log -> its error
lines) are plain functions. Nothing here may stop the pipeline: every failure is caught and shown.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from osad.alerter.tail import View
from osad.runtime.reader import TopicReader
from osad.schemas import ANOMALIES, SAMPLES, SCORES, Sample, Score, WireError, decode

# -- metrics text -> numbers -------------------------------------------------------------------

# runtime/metrics.py: counters are exposed with a _total suffix
IN, OUT, ERRORS, DEAD, LAG = ("osad_messages_in_total", "osad_messages_out_total", "osad_errors_total",
                              "osad_dead_letters_total", "osad_consumer_lag")
COLLECTED = "osad_collector_samples_total"  # the collector reads no topic: its output is its throughput


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus exposition text -> {sample name: sum over its label sets} (``_created`` left out).

    >>> parse_metrics('osad_messages_out_total{service="d",topic="a"} 2.0\\n'
    ...               'osad_messages_out_total{service="d",topic="b"} 3.0\\n# HELP x y\\n')
    {'osad_messages_out_total': 5.0}
    """
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


@dataclass
class Probe:
    """One poll of a service's endpoint: when, its metrics (None: no answer) and its health."""

    t: float
    metrics: dict[str, float] | None
    health: dict | None


def _rate(name: str, cur: Probe | None, prev: Probe | None) -> float | None:
    if not (cur and prev and cur.metrics and prev.metrics and name in cur.metrics and cur.t > prev.t):
        return None
    return max(0.0, cur.metrics[name] - prev.metrics.get(name, 0.0)) / (cur.t - prev.t)


def _num(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


SERVICE_COLUMNS = ("SERVICE", "PID", "STATE", "HEALTH", "IN/s", "OUT/s", "IN total", "OUT total", "LAG",
                   "ERRORS", "DEAD LETTERS")


def service_row(name: str, pid: int | None, state: str, cur: Probe | None, prev: Probe | None,
                has_endpoint: bool = True) -> tuple[str, ...]:
    """One row of the services table (see SERVICE_COLUMNS) from the last two polls.

    >>> a = Probe(10.0, {IN: 100.0, OUT: 10.0}, {"status": "ok"})
    >>> b = Probe(12.0, {IN: 300.0, OUT: 30.0, LAG: 4.0}, {"status": "ok"})
    >>> service_row("featurizer", 42, "up", b, a)
    ('featurizer', '42', 'up', 'ok', '100', '10', '300', '30', '4', '0', '0')
    """
    m = (cur.metrics if cur else None) or {}
    if not has_endpoint:
        health = ""
    elif cur is None or (cur.metrics is None and cur.health is None):
        health = "no answer" if state == "up" else "-"
    else:
        health = str((cur.health or {}).get("status", "?"))
    in_name = IN if IN in m or COLLECTED not in m else COLLECTED
    out_name = OUT if OUT in m or COLLECTED not in m else COLLECTED
    if in_name == COLLECTED:  # the collector: samples made, nothing read from Kafka
        in_rate, in_total = None, None
    else:
        in_rate, in_total = _rate(in_name, cur, prev), m.get(in_name)
    return (name, str(pid) if pid else "-", state, health, _num(in_rate), _num(_rate(out_name, cur, prev)),
            _num(in_total), _num(m.get(out_name)), _num(m.get(LAG)),
            _num(m.get(ERRORS, 0.0) if m else None), _num(m.get(DEAD, 0.0) if m else None))


# -- latest messages per entity -> rows --------------------------------------------------------

ENTITY_COLUMNS = ("ENTITY", "LAST SAMPLE (UTC)", "SEQ", "AGE", "METRICS", "SCORE", "MODEL")


def headline(metrics: dict[str, float], interval_s: float) -> str:
    """A couple of headline numbers of a Sample: CPU, memory and system calls of a watched process
    (docs/metrics.md), else the first two metrics by name (e.g. a replayed data set's f01, f02).

    >>> headline({"on_cpu_ns": 5e8, "rss_anon_bytes": 3 * 2**20, "syscalls": 40.0}, 1.0)
    'cpu 50% rss 3 MiB sys 40/s'
    >>> headline({"f02": 0.5, "f01": 0.25, "f03": 1.0}, 60.0)
    'f01=0.25 f02=0.5'
    """
    parts = []
    if "on_cpu_ns" in metrics:
        parts.append(f"cpu {100 * metrics['on_cpu_ns'] / (interval_s * 1e9):.0f}%")
    rss = [metrics[k] for k in ("rss_anon_bytes", "rss_file_bytes", "rss_shmem_bytes") if k in metrics]
    if rss:
        parts.append(f"rss {sum(rss) / 2**20:.0f} MiB")
    if "syscalls" in metrics:
        parts.append(f"sys {metrics['syscalls'] / interval_s:.0f}/s")
    if parts:
        return " ".join(parts)
    return " ".join(f"{k}={metrics[k]:.3g}" for k in sorted(metrics)[:2])


def entity_rows(samples: dict[str, tuple[bytes, float]], scores: dict[str, bytes], now: float, window_s: float,
                limit: int = 12) -> tuple[list[tuple[str, ...]], int]:
    """Rows of the entities whose latest sample arrived within ``window_s`` of ``now``.

    ``samples``: entity id -> (the latest Sample's raw value, when it arrived, on ``now``'s clock);
    ``scores``: entity id -> the latest Score's raw value. Only those are decoded. Rows are sorted by
    score (highest first, unscored last), at most ``limit``; also returns how many entities qualified.
    """
    rows = []
    for eid, (raw, seen) in samples.items():
        if now - seen > window_s:
            continue
        age = f"{now - seen:.0f}s"
        try:
            s = decode(raw, Sample)
        except WireError as e:
            rows.append((None, (eid, "-", "-", age, f"undecodable: {e}"[:60], "-", "-")))
            continue
        score, model = None, "-"
        if eid in scores:
            try:
                sc = decode(scores[eid], Score)
                score, model = sc.score, sc.model_id.split(":", 1)[0]
            except WireError:
                model = "undecodable"
        name = eid + (f" ({s.comm})" if s.comm and s.comm not in eid else "")
        rows.append((score, (name, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.ts)), str(s.seq), age,
                             headline(s.metrics, s.interval_s), "-" if score is None else f"{score:.3g}", model)))
    rows.sort(key=lambda r: (r[0] is None, -(r[0] or 0.0), r[1][0]))
    return [r for _, r in rows[:limit]], len(rows)


# -- logs --------------------------------------------------------------------------------------

_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback \(most recent call last\)|\berror:", re.IGNORECASE)


def error_lines(text: str, n: int = 4) -> list[str]:
    """The last lines of a log from its last line that reports an error (at most ``n``); [] when none does.

    >>> error_lines("a INFO ok\\nb ERROR osad.x: broken\\n  detail\\nc INFO fine\\n", n=2)
    ['b ERROR osad.x: broken', '  detail']
    """
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if _ERROR.search(lines[i]):
            # a traceback's first line reports it; show from there
            return lines[i: i + n]
    return []


def read_tail(path: Path, nbytes: int = 32 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def state_style(state: str) -> str | None:
    """How a service's state is drawn: plain when all is well, yellow while it is (or was) being restarted,
    red when it is down for good.

    >>> state_style("up"), state_style("up (restarted 1x)"), state_style("killed by SIGKILL; restart in 2s")
    (None, 'yellow', 'yellow')
    >>> state_style("failed: exited with code 1")
    'red'
    """
    if state in ("up", "done", "waiting"):
        return None
    return "yellow" if state.startswith("up") or "restart in" in state else "red"


# -- what the view watches -----------------------------------------------------------------------

@dataclass
class Watched:
    """A process ``osad up`` started (or the broker): how to describe it on screen."""

    name: str
    pid: Callable[[], int | None]
    state: Callable[[], str]
    port: int | None = None  # its /metrics and /healthz
    log: Path | None = None


@dataclass
class _Shared:
    """What the background threads found, read by the drawing code under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    probes: dict[str, list[Probe]] = field(default_factory=dict)  # name -> [previous, latest]
    errors: dict[str, list[str]] = field(default_factory=dict)  # name -> error lines of its log
    samples: dict[str, tuple[bytes, float]] = field(default_factory=dict)
    scores: dict[str, bytes] = field(default_factory=dict)
    kafka_error: str = ""
    records: int = 0


def _get(url: str, timeout_s: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:  # /healthz answers 503 when unhealthy, with its JSON
        return e.code, e.read()


def probe(port: int, timeout_s: float = 0.5, clock=time.monotonic) -> Probe:
    """Poll one service's /metrics and /healthz (None where it did not answer)."""
    t = clock()
    metrics = health = None
    try:
        code, body = _get(f"http://127.0.0.1:{port}/metrics", timeout_s)
        if code == 200:
            metrics = parse_metrics(body.decode(errors="replace"))
    except (OSError, ValueError):
        pass
    try:
        code, body = _get(f"http://127.0.0.1:{port}/healthz", timeout_s)
        if code in (200, 503):
            health = json.loads(body)
    except (OSError, ValueError):
        pass
    return Probe(t, metrics, health)


class LiveView:
    """The screen. ``start()`` it once the services run; ``stop()`` it before they are stopped."""

    def __init__(self, bootstrap: str, watched: list[Watched], title: str = "", notes: list[str] | None = None,
                 window_s: float = 30.0, rows: int = 12, console=None, prefix: str = "",
                 events: Callable[[], list[str]] | None = None, security=None):
        self.bootstrap, self.watched, self.title, self.prefix = bootstrap, watched, title, prefix
        self.security = security  # the Kafka connection's TLS / SASL (a KafkaSecurity; None: plaintext)
        self.events = events  # what the supervisor did (a service exited, restarted, given up on), latest last
        self.notes = list(notes or [])
        self.window_s, self.rows = window_s, rows
        self.anomalies = View(rows=rows)
        self.shared = _Shared()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._live = None
        self._console = console
        self._t0 = time.monotonic()

    # -- threads ---------------------------------------------------------------------------
    def start(self) -> "LiveView":
        import logging

        from rich.console import Console
        from rich.live import Live

        # the view's own Kafka client must not print over the screen: its failures are shown in the view
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
        for target, name in ((self._read_kafka, "osad-view-kafka"), (self._poll, "osad-view-poll")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._live = Live(get_renderable=self.render, console=self._console or Console(), refresh_per_second=1,
                          vertical_overflow="crop")
        self._live.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._live is not None:
            try:
                self._live.stop()
            except Exception:  # noqa: BLE001 - the terminal is going away; the pipeline must still stop
                pass
            self._live = None
        for t in self._threads:
            t.join(timeout=2)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for w in self.watched:
                try:
                    p = probe(w.port) if w.port else None
                    errs = error_lines(read_tail(w.log)) if w.log else []
                except Exception as e:  # noqa: BLE001 - shown, never raised
                    p, errs = None, [f"(view: cannot read {w.name}: {e})"]
                with self.shared.lock:
                    if p is not None:
                        self.shared.probes[w.name] = (self.shared.probes.get(w.name, [])[-1:] + [p])
                    self.shared.errors[w.name] = errs
            self._stop.wait(1.0)

    def _read_kafka(self) -> None:
        while not self._stop.is_set():
            reader = None
            try:
                reader = self._connect()
                if reader is not None:
                    self._consume(reader)
            except Exception as e:  # noqa: BLE001 - shown on screen; try again
                with self.shared.lock:
                    self.shared.kafka_error = f"{type(e).__name__}: {e}"
            finally:
                if reader is not None:
                    try:
                        reader.close()
                    except Exception:  # noqa: BLE001
                        pass
            self._stop.wait(2.0)

    def _connect(self):
        """A reader of the samples, scores and anomalies topics from now, once they exist (None: stopped)."""
        reader = TopicReader(self.bootstrap, (SAMPLES, SCORES, ANOMALIES), prefix=self.prefix, from_beginning=False,
                             client_id="osad-up-view", connect_timeout_s=10.0, security=self.security)
        while not self._stop.is_set():
            if reader.assign():
                with self.shared.lock:
                    self.shared.kafka_error = ""
                return reader
            with self.shared.lock:
                self.shared.kafka_error = f"waiting for the topics {', '.join(reader.topics)}"
            self._stop.wait(1.0)
        reader.close()
        return None

    def _consume(self, reader) -> None:
        samples, anomalies = SAMPLES.full_name(self.prefix), ANOMALIES.full_name(self.prefix)
        last_prune = time.monotonic()
        while not self._stop.is_set():
            records = reader.poll(200)
            now = time.monotonic()
            with self.shared.lock:
                for m in records:
                    self.shared.records += 1
                    key = m.key.decode(errors="replace") if m.key else "?"
                    if m.topic == samples:
                        self.shared.samples[key] = (m.value, now)
                    elif m.topic == anomalies:
                        a = reader.decode(m)
                        if a is not None:
                            self.anomalies.add(a)
                    else:
                        self.shared.scores[key] = m.value
                if now - last_prune > 10:  # forget entities long gone (processes come and go)
                    last_prune = now
                    old = [k for k, (_, t) in self.shared.samples.items() if now - t > 2 * self.window_s]
                    for k in old:
                        del self.shared.samples[k]
                        self.shared.scores.pop(k, None)

    # -- drawing ---------------------------------------------------------------------------
    def render(self):
        try:
            return self._render()
        except Exception as e:  # noqa: BLE001 - a broken frame must not end the screen or the pipeline
            from rich.text import Text

            return Text(f"osad up: the view could not draw ({type(e).__name__}: {e}); the pipeline runs on")

    def _render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        now = time.monotonic()
        with self.shared.lock:
            probes = {k: list(v) for k, v in self.shared.probes.items()}
            errors = {k: list(v) for k, v in self.shared.errors.items() if v}
            samples, scores = dict(self.shared.samples), dict(self.shared.scores)
            kafka_error = self.shared.kafka_error
            n_open = sum(1 for a in self.anomalies.latest.values() if a.status != "closed")
            anomalies_table = self.anomalies.table(f"anomalies: {n_open} open, {len(self.anomalies.latest)} seen")
        up = time.strftime("%H:%M:%S", time.gmtime(now - self._t0))
        parts = [Text.from_markup(f"[bold]{self.title or 'osad up'}[/]   Kafka {self.bootstrap}   up {up}"
                                  "   Ctrl-C stops everything")]
        parts += [Text(n, style="dim") for n in self.notes]

        st = Table(title="services", title_justify="left", expand=False)
        for c in SERVICE_COLUMNS:
            st.add_column(c, no_wrap=True, justify="left" if c in ("SERVICE", "STATE", "HEALTH") else "right")
        for w in self.watched:
            pr = probes.get(w.name, [])
            cur, prev = (pr[-1] if pr else None), (pr[-2] if len(pr) > 1 else None)
            state = w.state()
            row = service_row(w.name, w.pid(), state, cur, prev, has_endpoint=w.port is not None)
            st.add_row(*row, style=state_style(state))
        parts.append(st)
        events = self.events() if self.events else []
        if events:
            parts.append(Text("supervision (latest last):", style="bold yellow"))
            parts += [Text("  " + e, style="yellow") for e in events[-5:]]

        rows, total = entity_rows(samples, scores, now, self.window_s, self.rows)
        et = Table(title=f"entities seen in the last {self.window_s:.0f} s: {total}"
                   + (f" (showing {len(rows)}, highest score first)" if total > len(rows) else ""),
                   title_justify="left", expand=False)
        for c in ENTITY_COLUMNS:
            et.add_column(c, no_wrap=True)
        for r in rows:
            et.add_row(*r)
        if kafka_error:
            et.caption = f"Kafka: {kafka_error}"
        parts.append(et)

        parts.append(anomalies_table)

        for name, lines in errors.items():
            parts.append(Text(f"{name} reports an error (its log):", style="bold red"))
            parts += [Text("  " + ln, style="red") for ln in lines]
        return Group(*parts)
