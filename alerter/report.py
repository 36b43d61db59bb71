"""``osad report``: one entity's metrics, scores, thresholds and anomalies as a PNG, or as HTML with a table.

Three parts:

* **loading** (:func:`load_kafka`, :func:`load_jsonl`, :func:`load_store`): Samples, Scores and Anomalies of one
  entity into a :class:`Collected`, counting what every other entity has (to list them) and skipping malformed
  messages (counted, never fatal). Kafka topics are read by a group-less reader (runtime/reader.py, no commits)
  from the beginning of every partition; records of other entities are dropped by their key, before decoding.
* **the figure** (:func:`build_figure`, pure: lists of pydantic messages in, a matplotlib Figure out): the
  entity's most relevant metrics (min-max normalised, one above the other), one panel per model with its score
  over time and its threshold (dashed), every anomaly shaded across all panels and labelled with its severity
  and top root-cause feature.
* **writers** (:func:`write_report`): ``.png``, or ``.html`` (the PNG embedded as base64 plus a table of the
  anomalies), by the output file's suffix.

matplotlib (the ``detector`` extra) is imported only when a figure is drawn, with the Agg backend.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from osad.runtime.reader import TopicReader
from osad.schemas import ANOMALIES, SAMPLES, SCORES, Anomaly, Sample, Score, Topic, WireError, decode

from .display import utc_ts
from .store import DEFAULT_STORE

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

SUFFIXES = (".png", ".html")
DPI = 100
WIDTH_IN = 13.0
_KINDS: dict[str, type] = {"sample": Sample, "score": Score, "anomaly": Anomaly}
_SEVERITY_COLOR = {"low": "#e6c229", "medium": "#f17105", "high": "#d11149", "critical": "#6a0136"}


class ReportError(RuntimeError):
    """The report cannot be made; ``code`` is the exit status (1: no data or no broker, 2: bad usage)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# -- what was read --------------------------------------------------------------------------------

@dataclass
class Collected:
    """One entity's messages within [since, until], plus message counts of every entity seen.

    ``entity`` None collects nothing and only counts (to list the entities).
    """

    entity: str | None
    since: float | None = None
    until: float | None = None
    samples: list[Sample] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)
    anomalies: dict[str, Anomaly] = field(default_factory=dict)  # anomaly_id -> highest revision
    counts: dict[str, Counter] = field(default_factory=dict)  # entity_id -> Counter(kind -> messages)
    skipped: int = 0
    sources: list[str] = field(default_factory=list)

    def wants(self, entity_id: str, kind: str) -> bool:
        """Count a message of ``entity_id``; True when it is of the entity being collected."""
        self.counts.setdefault(entity_id, Counter())[kind] += 1
        return self.entity is not None and entity_id == self.entity

    def add(self, msg: Sample | Score | Anomaly) -> None:
        """Keep ``msg`` when it falls within the time bounds (an anomaly: when it overlaps them)."""
        if isinstance(msg, Sample):
            if self._within(msg.ts, msg.ts):
                self.samples.append(msg)
        elif isinstance(msg, Score):
            if self._within(msg.window_end_ts, msg.window_end_ts):
                self.scores.append(msg)
        elif self._within(msg.start_ts, anomaly_end(msg)):
            cur = self.anomalies.get(msg.anomaly_id)
            if cur is None or msg.revision > cur.revision:
                self.anomalies[msg.anomaly_id] = msg

    def _within(self, start: float, end: float) -> bool:
        return (self.since is None or end >= self.since) and (self.until is None or start <= self.until)

    def total(self, kind: str) -> int:
        return sum(c[kind] for c in self.counts.values())

    def empty(self) -> bool:
        return not (self.samples or self.scores or self.anomalies)

    def sorted(self) -> None:
        """Put samples and scores in time order (partitions and files may interleave them)."""
        self.samples.sort(key=lambda s: (s.ts, s.seq))
        self.scores.sort(key=lambda s: (s.window_end_ts, s.window_end_seq))


def anomaly_end(a: Anomaly) -> float:
    """End of an anomaly's interval: ``end_ts`` when closed, else ``last_ts``."""
    return a.end_ts if a.end_ts is not None else a.last_ts


def _decode_into(out: Collected, data: bytes, kind: str) -> None:
    try:
        out.add(decode(data, _KINDS[kind]))
    except WireError:
        out.skipped += 1


# -- JSONL files ---------------------------------------------------------------------------------

def load_jsonl(paths: Iterable[str], out: Collected) -> None:
    """Samples, Scores and Anomalies from JSONL files (``osad collect --output jsonl:``, ``osad alert --jsonl``)."""
    for path in paths:
        try:
            with open(path, "rb") as fh:
                for line in fh:
                    _jsonl_line(line.strip(), out)
        except OSError as e:
            raise ReportError(f"--from-jsonl {path}: cannot read: {e}", code=2) from None
        out.sources.append(f"file {path}")


def _jsonl_line(line: bytes, out: Collected) -> None:
    if not line:
        return
    try:
        d = json.loads(line)
        kind, eid = d.get("kind"), d.get("entity_id")
    except (ValueError, AttributeError):
        out.skipped += 1
        return
    if kind not in _KINDS or not isinstance(eid, str):
        out.skipped += 1
    elif out.wants(eid, kind):
        _decode_into(out, line, kind)


# -- Kafka ---------------------------------------------------------------------------------------

def load_kafka(bootstrap: str, out: Collected, topics: Sequence[Topic] = (SAMPLES, SCORES), *,
               prefix: str | None = None, idle_ms: int = 1500, connect_timeout_s: float = 10.0,
               security=None) -> None:
    """Read ``topics`` from the beginning of every partition to its end into ``out``.

    A group-less reader (runtime/reader.py), nothing committed; topics that do not exist are noted in
    ``out.sources`` and left out. Done when every partition's position has reached the end offset asked for
    at the start and a poll brought nothing (that end may be short of the last records of a batch on some
    brokers, so an empty poll is awaited too), or when nothing arrived for ``idle_ms``. Records of other
    entities are only counted, by their key, not decoded. Raises :class:`runtime.kafka.BrokerUnavailable`
    when no broker answers.
    """
    reader = TopicReader(bootstrap, topics, prefix=prefix or "", skip_missing=True, client_id="osad-report",
                         max_poll_records=5000, connect_timeout_s=connect_timeout_s, security=security)
    try:
        reader.assign()
        for name in reader.topics:
            out.sources.append(f"topic {name}" + (" (does not exist)" if name in reader.missing else ""))
        kinds = {name: t.model.model_fields["kind"].default for name, t in reader.topics.items()}
        key = out.entity.encode() if out.entity is not None else None

        def take(m) -> None:
            kind = kinds[m.topic]
            eid = m.key.decode(errors="replace") if m.key is not None else ""
            if out.wants(eid, kind) and m.key == key:
                _decode_into(out, m.value, kind)

        reader.read_until_idle(idle_ms, take)
    finally:
        reader.close()


# -- the store -----------------------------------------------------------------------------------

def load_store(store, out: Collected) -> dict[str, float]:
    """Anomalies from an open (read-only) store into ``out``; returns the entity's stored thresholds per model."""
    rows = store.list(entity=out.entity if out.entity and not out.entity.endswith("*") else None,
                      limit=10_000_000)
    for a in rows:
        if out.wants(a.entity_id, "anomaly"):
            out.add(a)
    out.sources.append(store.description)
    return stored_thresholds(store.load_state(out.entity)) if out.entity else {}


def stored_thresholds(state: dict | None) -> dict[str, float]:
    """Per model_id, the threshold the alerter judged with (or calibrated), from its persisted entity state.

    >>> stored_thresholds({"streams": {"cs": {"judged_threshold": 0.8, "threshold": 0.7}, "m": {"threshold": None}}})
    {'cs': 0.8}
    """
    out = {}
    for model_id, st in ((state or {}).get("streams") or {}).items():
        v = st.get("judged_threshold") if st.get("judged_threshold") is not None else st.get("threshold")
        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
            out[model_id] = float(v)
    return out


def sqlite_missing(url: str) -> bool:
    """True when ``url`` names an SQLite file that does not exist (nothing to read there)."""
    if not url.startswith("sqlite:///"):
        return False
    path = url[len("sqlite:///"):]
    return path != ":memory:" and not Path(path).is_file()


# -- thresholds and features ---------------------------------------------------------------------

@dataclass(frozen=True)
class Threshold:
    value: float
    source: str  # "--threshold", "alerter state" or "score"


def resolve_thresholds(scores: Sequence[Score], stored: Mapping[str, float] | None = None,
                       overrides: Mapping[str, float] | None = None) -> dict[str, Threshold]:
    """The threshold to draw per model_id: an override (exact model_id or family before ':') wins, then the
    alerter's stored state, then the newest positive ``Score.threshold``; models with none are left out."""
    from .core import model_family

    overrides, stored = overrides or {}, stored or {}
    out: dict[str, Threshold] = {}
    for s in scores:  # time order: the newest model threshold stays
        if s.threshold is not None and math.isfinite(s.threshold) and s.threshold > 0:
            out[s.model_id] = Threshold(float(s.threshold), "score")
    for model_id in {s.model_id for s in scores} | set(stored):
        if model_id in stored:
            out[model_id] = Threshold(stored[model_id], "alerter state")
        v = overrides.get(model_id, overrides.get(model_family(model_id)))
        if v is not None:
            out[model_id] = Threshold(float(v), "--threshold")
    return out


def root_cause_ranking(anomalies: Iterable[Anomaly]) -> list[str]:
    """Root-cause features of the anomalies, by their summed share, largest first."""
    total: Counter = Counter()
    for a in anomalies:
        for r in a.root_causes:
            total[r.feature] += r.contribution
    return [f for f, _ in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))]


def choose_features(samples: Sequence[Sample], anomalies: Iterable[Anomaly] = (), limit: int = 8,
                    override: Sequence[str] | None = None) -> list[str]:
    """The metrics to plot: ``override`` as given; else the anomalies' root causes (those the samples have),
    then the most variable metrics (coefficient of variation, so bytes and counts compare), constants left out.
    """
    if override:
        return list(override)
    import numpy as np

    names = list(dict.fromkeys(k for s in samples for k in s.metrics))
    causes = [f for f in root_cause_ranking(anomalies) if f in names][:limit]
    variation = {}
    for n in names:
        x = np.array([s.metrics[n] for s in samples if n in s.metrics], dtype=float)
        if x.size > 1 and x.max() > x.min():
            variation[n] = float(x.std() / (abs(x.mean()) + 1e-12))
    rest = sorted((n for n in variation if n not in causes), key=lambda n: (-variation[n], n))
    return (causes + rest)[:limit]


# -- the figure ----------------------------------------------------------------------------------

def figure_size(n_features: int, n_models: int) -> tuple[float, float]:
    """Figure size in inches: the metrics panel grows with its features, each model panel is 2 in high."""
    return WIDTH_IN, round(1.2 + _metrics_height(n_features) + 2.0 * max(n_models, 0), 2)


def _metrics_height(n_features: int) -> float:
    return max(2.0, 0.45 * n_features + 0.6)


def _times(ts: Sequence[float]):
    import numpy as np

    return (np.asarray(ts, dtype=float) * 1000).astype("datetime64[ms]")


def build_figure(entity_id: str, samples: Sequence[Sample], scores: Sequence[Score],
                 anomalies: Sequence[Anomaly], *, thresholds: Mapping[str, Threshold | float] | None = None,
                 features: Sequence[str] | None = None, max_features: int = 8) -> "Figure":
    """The report as a matplotlib Figure (Agg, not shown): metrics on top, a panel per model below.

    ``thresholds``: per model_id, a :class:`Threshold` or a value; models not named there use their
    ``Score.threshold``. ``features``: the metrics to plot (default :func:`choose_features`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    feats = choose_features(samples, anomalies, max_features, features)
    models = sorted({s.model_id for s in scores})
    thr = resolve_thresholds(scores)
    for model_id, v in (thresholds or {}).items():
        thr[model_id] = v if isinstance(v, Threshold) else Threshold(float(v), "given")
    fig = Figure(figsize=figure_size(len(feats), len(models)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # draws with Agg whatever pyplot's backend is; no display needed
    ratios = [_metrics_height(len(feats))] + [2.0] * len(models)
    axes = fig.subplots(len(ratios), 1, sharex=True, squeeze=False, height_ratios=ratios)[:, 0]
    causes = set(root_cause_ranking(anomalies))
    _draw_metrics(axes[0], samples, feats, causes)
    for ax, model_id in zip(axes[1:], models):
        _draw_scores(ax, [s for s in scores if s.model_id == model_id], model_id, thr.get(model_id))
    _shade_anomalies(axes, anomalies)
    _label_time_axis(axes[-1])
    fig.suptitle(_title(entity_id, samples, scores, anomalies), fontsize=11)
    return fig


def _title(entity_id: str, samples, scores, anomalies) -> str:
    ref = (list(samples) or list(scores) or list(anomalies) or [None])[0]
    who = f"{entity_id}" + (f"  ({ref.comm}, pid {ref.pid}, host {ref.host})" if ref is not None and ref.comm else "")
    return (f"osad report: {who}\n{plural(len(samples), 'sample')}, {plural(len(scores), 'score')}, "
            f"{plural(len(anomalies), 'anomaly', 'anomalies')}")


def min_max(values: Sequence[float]):
    """``values`` scaled to [0, 1] (NaN where missing; all 0 when constant).

    >>> min_max([2.0, 4.0, float("nan"), 3.0]).tolist()
    [0.0, 1.0, nan, 0.5]
    """
    import numpy as np

    x = np.asarray(values, dtype=float)
    ok = np.isfinite(x)
    if not ok.any():
        return x
    lo, hi = x[ok].min(), x[ok].max()
    return (x - lo) / (hi - lo) if hi > lo else np.where(ok, 0.0, np.nan)


def _draw_metrics(ax, samples: Sequence[Sample], feats: Sequence[str], causes: set[str]) -> None:
    """Each feature min-max normalised to [0, 0.8] and lifted by its row; root causes labelled in red."""
    import numpy as np

    ax.set_title("metrics (each min-max normalised; red name: a root cause of an anomaly)", fontsize=9, loc="left")
    if not samples or not feats:
        ax.text(0.5, 0.5, "no samples" if not samples else "no varying metrics", transform=ax.transAxes,
                ha="center", va="center", color="grey")
        ax.set_yticks([])
        return
    t = _times([s.ts for s in samples])
    for row, name in enumerate(reversed(feats)):
        y = min_max([s.metrics.get(name, np.nan) for s in samples])
        ax.plot(t, row + 0.8 * y + 0.1, lw=1.2 if name in causes else 0.9, color=f"C{row % 10}")
    ax.set_yticks([row + 0.5 for row in range(len(feats))], labels=list(reversed(feats)), fontsize=8)
    for label in ax.get_yticklabels():
        if label.get_text() in causes:
            label.set_color("#d11149")
            label.set_fontweight("bold")
    ax.set_ylim(0, len(feats))
    ax.grid(axis="x", alpha=0.3)


def _draw_scores(ax, scores: Sequence[Score], model_id: str, thr: Threshold | None) -> None:
    """The model's score over time and its threshold (dashed); a log scale when they span over 100x."""
    values = [s.score for s in scores]
    ax.plot(_times([s.window_end_ts for s in scores]), values, lw=1.0, color="#1f4e79", marker=".", ms=3,
            label="score")
    if thr is not None:
        ax.axhline(thr.value, ls="--", lw=1.2, color="#d11149", label=f"threshold {thr.value:.4g} ({thr.source})")
    pos = [v for v in values + ([thr.value] if thr else []) if v > 0]
    if pos and len(pos) == len(values) + (1 if thr else 0) and max(pos) / min(pos) > 100:
        ax.set_yscale("log")
    ax.set_title(f"model {model_id}", fontsize=9, loc="left")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    ax.grid(alpha=0.3)


def _shade_anomalies(axes, anomalies: Sequence[Anomaly]) -> None:
    """Shade every anomaly's interval on every panel; label it on the top panel."""
    import matplotlib.dates as mdates

    for a in sorted(anomalies, key=lambda a: a.start_ts):
        t0, t1 = mdates.date2num(_times([a.start_ts, max(anomaly_end(a), a.start_ts)]))
        color = _SEVERITY_COLOR.get(a.severity, "grey")
        for ax in axes:
            ax.axvspan(t0, t1, color=color, alpha=0.18, lw=0)
        top = a.root_causes[0].feature if a.root_causes else "?"
        axes[0].text(t0, 1.0, f" {a.severity}: {top}", transform=axes[0].get_xaxis_transform(), fontsize=8,
                     color=color, va="bottom", ha="left", fontweight="bold", clip_on=False)


def _label_time_axis(ax) -> None:
    import matplotlib.dates as mdates

    loc = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
    ax.set_xlabel("time (UTC)", fontsize=9)


# -- writers -------------------------------------------------------------------------------------

def check_output(path: str | None) -> Path:
    """The output path, or ReportError (exit 2) when it is missing or its suffix is not .png / .html."""
    if not path:
        raise ReportError("give the output file: --out report.png (an image) or --out report.html "
                          "(the image and a table of the anomalies)", code=2)
    p = Path(path)
    if p.suffix.lower() not in SUFFIXES:
        raise ReportError(f"--out {path}: the file name must end in .png (an image) or .html (the image and a "
                          f"table of the anomalies), not {p.suffix or 'no suffix'!r}", code=2)
    return p


def require_matplotlib() -> None:
    """ReportError (exit 2) when matplotlib is not installed."""
    import importlib

    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise ReportError("osad report draws with matplotlib, which is not installed: "
                          "pip install 'osad[detector]' (or pip install matplotlib)", code=2) from None


def png_bytes(fig: "Figure") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def write_report(fig: "Figure", path: str | Path, entity_id: str, anomalies: Sequence[Anomaly] = (),
                 traces: Mapping[str, list[dict]] | None = None) -> Path:
    """Write ``fig`` as PNG, or as self-contained HTML with the anomaly table, by the suffix of ``path``."""
    p = check_output(str(path))
    p.parent.mkdir(parents=True, exist_ok=True)
    png = png_bytes(fig)
    if p.suffix.lower() == ".png":
        p.write_bytes(png)
    else:
        p.write_text(html_page(entity_id, png, anomalies, traces), encoding="utf-8")
    return p


#: trace lines listed around an anomaly: this long before its start and after its end, at most this many
TRACE_MARGIN_S = 30.0
TRACE_LINES_MAX = 50


def load_traces(path: str) -> list[dict]:
    """The messages of a --trace-output JSONL file (lines that are not trace messages are skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                if isinstance(d, dict) and {"ts", "pid", "text"} <= set(d):
                    out.append(d)
    except OSError as e:
        raise ReportError(f"--traces {path}: cannot read it: {e.strerror}", 2) from None
    return out


def traces_around(traces: Sequence[dict], anomalies: Sequence[Anomaly], margin_s: float = TRACE_MARGIN_S,
                  limit: int = TRACE_LINES_MAX) -> dict[str, list[dict]]:
    """Per anomaly id, the trace messages of its process from ``margin_s`` before it started to ``margin_s``
    after it ended (or its last update, while open), oldest first, at most ``limit``.

    >>> from types import SimpleNamespace as A
    >>> t = [{"ts": 100.0, "pid": 7, "text": "a"}, {"ts": 150.0, "pid": 7, "text": "b"},
    ...      {"ts": 150.0, "pid": 8, "text": "c"}]
    >>> a = A(anomaly_id="i", pid=7, start_ts=140.0, end_ts=160.0, last_ts=160.0)
    >>> [x["text"] for x in traces_around(t, [a])["i"]]
    ['b']
    """
    out = {}
    for a in anomalies:
        end = a.end_ts if a.end_ts is not None else a.last_ts
        lo, hi = a.start_ts - margin_s, end + margin_s
        rows = sorted((t for t in traces if t.get("pid") == a.pid and lo <= float(t["ts"]) <= hi),
                      key=lambda t: float(t["ts"]))
        out[a.anomaly_id] = rows[:limit]
    return out


def _trace_section(anomalies: Sequence[Anomaly], traces: Mapping[str, list[dict]] | None) -> str:
    if traces is None:
        return ""
    parts = [f"<h2>Trace lines around each anomaly (&plusmn;{TRACE_MARGIN_S:.0f} s)</h2>"]
    for a in sorted(anomalies, key=lambda a: a.start_ts):
        rows = traces.get(a.anomaly_id) or []
        parts.append(f"<h3>{html.escape(a.anomaly_id)} ({html.escape(a.severity)}, from {utc_ts(a.start_ts)})</h3>")
        if not rows:
            parts.append("<p>No trace lines of this process then.</p>")
            continue
        body = "".join(f"<tr><td>{utc_ts(float(t['ts']))}</td><td>{t.get('tid', '')}</td><td>"
                       f"{html.escape(str(t.get('event', '')))}</td><td>{html.escape(str(t['text']))}</td></tr>"
                       for t in rows)
        parts.append(f"<table><tr><th>time (UTC)</th><th>tid</th><th>event</th><th>text</th></tr>{body}</table>")
    return "\n".join(parts) + "\n"


def html_page(entity_id: str, png: bytes, anomalies: Sequence[Anomaly],
              traces: Mapping[str, list[dict]] | None = None) -> str:
    """A self-contained HTML page: the image (base64), a table of the anomalies, oldest first, and (``traces``,
    from :func:`traces_around`) the trace lines around each."""
    rows = []
    for a in sorted(anomalies, key=lambda a: a.start_ts):
        end = f"{utc_ts(a.end_ts)}" if a.end_ts is not None else f"open (last {utc_ts(a.last_ts)})"
        causes = ", ".join(f"{r.feature} ({r.contribution:.0%})" for r in a.root_causes)
        cells = (a.anomaly_id, f"{a.status} (rev {a.revision})", a.severity, utc_ts(a.start_ts), end, causes)
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    table = ("<table><tr><th>id</th><th>status</th><th>severity</th><th>start (UTC)</th><th>end (UTC)</th>"
             "<th>root causes</th></tr>\n" + "\n".join(rows) + "</table>") if rows else "<p>No anomalies.</p>"
    title = html.escape(f"osad report: {entity_id}")
    img = base64.b64encode(png).decode("ascii")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>"
            "body{font-family:sans-serif;margin:1.5em}img{max-width:100%}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;font-size:.9em}</style></head>\n"
            f"<body><h1>{title}</h1>\n<img alt=\"metrics, scores and anomalies of {html.escape(entity_id)}\" "
            f"src=\"data:image/png;base64,{img}\">\n<h2>Anomalies ({len(rows)})</h2>\n{table}\n"
            f"{_trace_section(anomalies, traces)}</body></html>\n")


# -- the command ---------------------------------------------------------------------------------

def plural(n: int, one: str, many: str | None = None) -> str:
    """``12,345 samples``, ``1 sample``.

    >>> plural(12345, "sample"), plural(1, "entity", "entities")
    ('12,345 samples', '1 entity')
    """
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def collect(args) -> tuple[Collected, dict[str, float]]:
    """Read every source the options name; returns what was collected and the stored thresholds."""

    out = Collected(args.entity, since=args.since, until=args.until)
    t0 = time.monotonic()
    topics = [SAMPLES, SCORES]
    if args.from_jsonl:
        load_jsonl(args.from_jsonl, out)
    store_url = args.store or (None if args.from_jsonl else DEFAULT_STORE)
    stored = {}
    if store_url and not sqlite_missing(store_url):
        stored = _read_store(store_url, out)
    elif store_url:
        _say(f"no anomalies store at {store_url}" + ("" if args.from_jsonl else ": anomalies come from the topic"))
        topics.append(ANOMALIES)
    if not args.from_jsonl:
        _read_kafka(args, out, topics)
    out.sorted()
    _say(f"read {plural(out.total('sample'), 'sample')}, {plural(out.total('score'), 'score')} and "
         f"{plural(out.total('anomaly'), 'anomaly state')} of {plural(len(out.counts), 'entity', 'entities')} in "
         f"{time.monotonic() - t0:.1f} s" + (f"; skipped {plural(out.skipped, 'malformed message')}" if out.skipped
                                             else ""))
    return out, stored


def _read_store(url: str, out: Collected) -> dict[str, float]:
    from osad.runtime.config import ConfigError

    from .store import StoreError, open_store

    try:
        store = open_store(url, readonly=True)
    except StoreError as e:
        raise ConfigError(f"--store: {e}") from None
    try:
        return load_store(store, out)
    except StoreError as e:
        raise ReportError(f"reading the store: {e}") from None
    finally:
        store.close()


def _read_kafka(args, out: Collected, topics: Sequence[Topic]) -> None:
    from osad.runtime.kafka import BrokerUnavailable

    _say(f"reading {', '.join(t.full_name(args.topic_prefix) for t in topics)} from {args.bootstrap} ...")
    try:
        load_kafka(args.bootstrap, out, topics, prefix=args.topic_prefix, idle_ms=args.idle_ms,
                   connect_timeout_s=args.connect_timeout_s, security=getattr(args, "security", None))
    except BrokerUnavailable as e:
        raise ReportError(f"{e} (or read files with --from-jsonl)") from None


def entity_table(out: Collected, limit: int = 50) -> str:
    """The entities seen, most messages first, with their sample, score and anomaly counts."""
    rows = sorted(out.counts.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    lines = [f"  {'ENTITY':<40} {'SAMPLES':>9} {'SCORES':>8} {'ANOMALIES':>9}"]
    lines += [f"  {eid or '(no key)':<40} {c['sample']:>9,} {c['score']:>8,} {c['anomaly']:>9,}" for eid, c in
              rows[:limit]]
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more")
    return "\n".join(lines)


def run(args) -> int:
    """``osad report``: list the entities (no ENTITY), or draw one entity's report into ``--out``."""
    try:
        if args.entity is not None:
            check_output(args.out)
            require_matplotlib()
        out, stored = collect(args)
        if args.entity is None:
            return _list_entities(out)
        if out.empty():
            raise ReportError(_no_data(out))
        _say(f"{args.entity}: {plural(len(out.samples), 'sample')}, {plural(len(out.scores), 'score')}, "
             f"{plural(len(out.anomalies), 'anomaly', 'anomalies')}")
        _warn_missing_features(args.features, out.samples)
        thresholds = resolve_thresholds(out.scores, stored, dict(args.threshold))
        anomalies = list(out.anomalies.values())
        fig = build_figure(args.entity, out.samples, out.scores, anomalies, thresholds=thresholds,
                           features=args.features, max_features=args.max_features)
        traces = None
        if getattr(args, "traces", None):
            traces = traces_around(load_traces(args.traces), anomalies)
            _say(f"--traces: {sum(map(len, traces.values()))} trace lines around the anomalies"
                 + ("" if str(args.out).lower().endswith(".html") else " (listed only in an .html report)"))
        path = write_report(fig, args.out, args.entity, anomalies, traces)
    except ReportError as e:
        _say(f"osad report: {e}")
        return e.code
    print(path)
    return 0


def _warn_missing_features(features: Sequence[str] | None, samples: Sequence[Sample]) -> None:
    have = {k for s in samples for k in s.metrics}
    missing = [f for f in features or () if f not in have]
    if missing and samples:
        _say(f"--features: no sample has {', '.join(missing)} (metrics there: {', '.join(sorted(have))})")


def _list_entities(out: Collected) -> int:
    if not out.counts:
        _say(f"osad report: no messages in {'; '.join(out.sources) or 'any source'}")
    else:
        _say(f"entities seen in {'; '.join(out.sources)}:\n{entity_table(out)}")
    _say("give one: osad report ENTITY --out report.png (or report.html)")
    return 2


def _no_data(out: Collected) -> str:
    bounds = "" if out.since is None and out.until is None else " within --since/--until"
    known = f"entities that have data:\n{entity_table(out)}" if out.counts else "no entity has data there"
    return (f"no samples, scores or anomalies of {out.entity!r}{bounds} in {'; '.join(out.sources) or 'any source'}"
            f"; {known}")
