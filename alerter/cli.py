"""``osad alert`` (the alerter service), ``osad anomalies list|show`` (the store), ``osad tail`` (the topic),
``osad report`` (one entity's picture).

Each command's settings are one :class:`~osad.runtime.config.Config` below (the engine's rules are
:class:`osad.alerter.config.AlerterConfig`): its flags, ``OSAD_*`` variables, checks and --help come
from that declaration, and the command runs with the typed object ``from_args`` builds.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from dataclasses import dataclass

from osad.runtime.config import (Config, ConfigError, KafkaConfig, ServiceConfig, non_negative, positive, section,
                                 setting, setup_logging)
from osad.schemas.messages import SEVERITIES, Severity

from .config import INCIDENTS, AlerterConfig, parse_threshold_override
from .display import ratio_text, utc_ts
from .store import DEFAULT_STORE, STATE_TTL_S, STORE_HELP

WEBHOOKS, SOURCES = "webhooks", "sources"
#: ``--webhook-format``: the anomaly's own JSON, or Alertmanager's webhook payload (alerter/sinks.py)
WEBHOOK_FORMATS = ("osad", "alertmanager")


def _store(default: str | None = DEFAULT_STORE, help: str = STORE_HELP, **kw):
    """The ``--store`` setting (env ``OSAD_STORE``) of the commands that use the alerter's store."""
    return setting(default, help=help, **kw)


# -- parsers of the settings' values (a ValueError says what to write) -----------------------------

def _severities(s: str) -> list[str]:
    vals = [x.strip().lower() for x in s.split(",") if x.strip()]
    bad = [x for x in vals if x not in SEVERITIES]
    if bad or not vals:
        raise ValueError(f"severity must be one or more of {', '.join(SEVERITIES)} (comma-separated)")
    return vals


def parse_since(s: str, now: float | None = None) -> float:
    """``30m``, ``2h``, ``7d``, ``45s`` ago; Unix seconds; or an ISO 8601 date/time (UTC unless it says).

    >>> parse_since("2h", now=10000.0), parse_since("1700000000"), parse_since("1970-01-02")
    (2800.0, 1700000000.0, 86400.0)
    """
    from datetime import datetime, timezone

    now = time.time() if now is None else now
    s = s.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", s)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now - float(m.group(1)) * unit
    try:
        return float(s)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"{s!r}: give a duration ago (30m, 2h, 7d), Unix seconds, or an ISO date/time "
                         "(2025-01-31 or 2025-01-31T12:00:00Z)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _statuses(s: str) -> list[str]:
    out = []
    for x in (y.strip().lower() for y in s.split(",") if y.strip()):
        if x == "open":
            out += ["open", "update"]
        elif x in ("closed", "update"):
            out.append(x)
        else:
            raise ValueError(f"status {x!r}: choose open, closed or update")
    if not out:
        raise ValueError("give open, closed or update")
    return out


def _regex(s: str):
    try:
        return re.compile(s)
    except re.error as e:
        raise ValueError(f"{s!r} is not a regular expression: {e}") from None


def _names(s: str) -> list[str]:
    vals = [x.strip() for x in s.split(",") if x.strip()]
    if not vals:
        raise ValueError("give one or more metric names, comma-separated, e.g. on_cpu_ns,rss_anon_bytes")
    return vals


def _webhook_url(s: str) -> str:
    if not re.match(r"^https?://[^/\s]+", s):
        raise ValueError(f"{s!r} is not an http:// or https:// URL")
    return s


def register(sub) -> None:
    _register_alert(sub)
    _register_anomalies(sub)
    _register_tail(sub)
    _register_report(sub)


# -- osad alert ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlertConfig(Config):
    """turn scores into anomalies: thresholds, incidents, root cause, storage (service)

    Consume Scores, choose a threshold per (entity, model) without labels, group consecutive windows over
    threshold into one incident per entity (published as open, update, closed on the anomalies topic, keyed by
    entity id) with its severity and root-cause features; keep anomalies and the state a restart needs in
    --store; also post them to --webhook URLs and append them to --jsonl. See docs/alerter.md.
    """

    kafka: KafkaConfig = section(KafkaConfig)
    service: ServiceConfig = section(ServiceConfig, group="osad-alerter")
    store: str = _store()
    webhook: list[str] = setting([], repeat=" ", parse=_webhook_url, metavar="URL",
                                 help="also POST each anomaly here, as its JSON or as --webhook-format gives "
                                 "(background, retries with backoff, never blocks)")
    webhook_format: str = setting("osad", group=WEBHOOKS, choices=WEBHOOK_FORMATS,
                                  help="what each --webhook POST carries: osad (the anomaly's JSON, as on the topic) "
                                  "or alertmanager (Alertmanager's webhook payload, version 4: firing while the "
                                  "incident is open, resolved with endsAt when it closes; see docs/observability.md)")
    webhook_link: str | None = setting(None, group=WEBHOOKS, metavar="URL",
                                       help="with --webhook-format alertmanager: the alerts' generatorURL, with "
                                       "{entity}, {host} and {anomaly_id} replaced, e.g. a Grafana dashboard "
                                       "https://grafana.example/d/osad?var-entity={entity}")
    jsonl: str | None = setting(None, help="also append each anomaly as one JSON line to this file")
    engine: AlerterConfig = section(AlerterConfig)
    state_ttl_s: float = setting(STATE_TTL_S, group=INCIDENTS, check=positive,
                                 help="forget the stored thresholds of entities without an open incident not "
                                 "seen for this long")
    webhook_queue: int = setting(1000, group=WEBHOOKS, check=positive,
                                 help="anomalies waiting per webhook; when full the oldest is dropped (and counted)")
    webhook_retries: int = setting(5, group=WEBHOOKS, check=non_negative, help="retries after a failed POST")
    webhook_backoff_s: float = setting(0.5, group=WEBHOOKS, check=non_negative,
                                       help="first wait before a retry; doubles each time (at most 30 s)")
    webhook_timeout_s: float = setting(5.0, group=WEBHOOKS, check=positive, help="timeout of one POST")


def _register_alert(sub) -> None:
    AlertConfig.add_command(sub, "alert", run_alert)


def run_alert(args) -> int:
    from osad.runtime.service import run_transform

    from .service import Alerter
    from .sinks import AlertmanagerWebhookSink, JsonlSink, SinkError, WebhookSink
    from .store import StoreError, open_store

    cfg = AlertConfig.from_args(args)
    setup_logging(cfg.service.log_level)
    try:
        store = open_store(cfg.store)
    except StoreError as e:
        raise ConfigError(f"--store: {e}") from None
    sinks = []
    if cfg.webhook_link and cfg.webhook_format != "alertmanager":
        logging.getLogger("osad.alerter").warning("--webhook-link is used only with --webhook-format alertmanager")
    try:
        for url in cfg.webhook:
            delivery = dict(queue_size=cfg.webhook_queue, retries=cfg.webhook_retries,
                            backoff_s=cfg.webhook_backoff_s, timeout_s=cfg.webhook_timeout_s)
            if cfg.webhook_format == "alertmanager":
                sinks.append(AlertmanagerWebhookSink(url, link=cfg.webhook_link, **delivery))
            else:
                sinks.append(WebhookSink(url, **delivery))
        if cfg.jsonl:
            sinks.append(JsonlSink(cfg.jsonl))
    except SinkError as e:
        store.close()
        raise ConfigError(str(e)) from None
    logging.getLogger("osad.alerter").info("alerter: store %s; sinks: %s", store.description,
                                           ", ".join(s.name for s in sinks) or "none")
    alerter = Alerter(cfg.engine, store, sinks, state_ttl_s=cfg.state_ttl_s, published=published_since(cfg.kafka))
    try:
        return run_transform(alerter, cfg.kafka, cfg.service)
    finally:
        alerter.shutdown()


def published_since(kafka):
    """``lookup(since_ts)``: the (anomaly_id, revision) pairs on the anomalies topic stamped since then. The alerter
    asks after each (re)assignment, so that Scores read again after a crash do not publish an anomaly twice."""
    def lookup(since_ts: float) -> set[tuple[str, int]]:
        from osad.runtime.reader import TopicReader
        from osad.schemas import ANOMALIES

        out: set[tuple[str, int]] = set()
        with TopicReader(kafka.bootstrap, ANOMALIES, prefix=kafka.topic_prefix, security=kafka.security,
                         client_id="osad-alerter-published") as r:
            if not r.wait_assigned(10.0):
                return out  # no anomalies topic: nothing was published
            if since_ts > 0:
                r.seek_to_time(since_ts)

            def add(rec) -> None:
                a = r.decode(rec)
                if a is not None:
                    out.add((a.anomaly_id, a.revision))

            r.read_until_idle(3000, add)
        return out
    return lookup


# -- osad anomalies ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ListConfig(Config):
    """anomalies, most recently active first

    Anomalies from --store, most recently active first, filtered.
    """

    store: str = _store()
    entity: str | None = setting(None, env="OSAD_ANOMALIES_ENTITY",
                                 help="only this entity id (a trailing * matches a prefix)")
    severity: list[str] | None = setting(None, env="OSAD_ANOMALIES_SEVERITY", parse=_severities,
                                         help="only these severities, comma-separated (low, medium, high, critical)")
    status: list[str] | None = setting(None, env="OSAD_ANOMALIES_STATUS", parse=_statuses,
                                       help="open (still open: status open or update), closed, or update; "
                                       "comma-separated")
    since: float | None = setting(None, env="OSAD_ANOMALIES_SINCE", parse=parse_since,
                                  help="only anomalies active since: 30m, 2h, 7d ago, Unix seconds, or an ISO "
                                  "date/time")
    limit: int = setting(100, env="OSAD_ANOMALIES_LIMIT", check=positive, help="most rows")
    json: bool = setting(False, env="OSAD_ANOMALIES_JSON", help="print a JSON array of the anomalies")


@dataclass(frozen=True)
class ShowConfig(Config):
    """one anomaly in full

    One anomaly from --store, in full.
    """

    id: str = setting(positional=True, help="anomaly id (or a unique prefix of at least 6 characters)")
    store: str = _store()
    json: bool = setting(False, env="OSAD_ANOMALIES_JSON", help="print the anomaly's JSON")


def _register_anomalies(sub) -> None:
    p = sub.add_parser("anomalies", help="list or show the anomalies in the alerter's store",
                       description="Read the anomalies the alerter stored (the latest revision of each).")
    s = p.add_subparsers(dest="anomalies_command", metavar="{list,show}")
    ListConfig.add_command(s, "list", run_list)
    ShowConfig.add_command(s, "show", run_show)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _open_readonly(url: str):
    from .store import StoreError, open_store

    try:
        return open_store(url, readonly=True)
    except StoreError as e:
        raise ConfigError(f"--store: {e}") from None


def run_list(args) -> int:
    import json

    from .store import StoreError

    cfg = ListConfig.from_args(args)
    store = _open_readonly(cfg.store)
    try:
        rows = store.list(entity=cfg.entity, severities=cfg.severity, statuses=cfg.status, since=cfg.since,
                          limit=cfg.limit)
    except StoreError as e:
        print(f"osad anomalies list: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if cfg.json:
        print(json.dumps([a.model_dump(mode="json") for a in rows]))
        return 0
    if not rows:
        print("no anomalies" + (" match these filters" if any(
            (cfg.entity, cfg.severity, cfg.status, cfg.since)) else " stored yet"))
        return 0
    head = ("ID", "SEVERITY", "STATUS", "REV", "ENTITY", "STARTED (UTC)", "LAST (UTC)", "RATIO", "MODELS",
            "TOP FEATURES")
    table = [head] + [(a.anomaly_id[:12], a.severity, a.status, str(a.revision),
                       a.entity_id + (f" ({a.comm})" if a.comm else ""), utc_ts(a.start_ts), utc_ts(a.last_ts),
                       ratio_text(a),
                       ",".join(m.split(":", 1)[0] for m in a.models),
                       ",".join(r.feature for r in a.root_causes[:3])) for a in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def run_show(args) -> int:
    from .store import StoreError

    cfg = ShowConfig.from_args(args)
    store = _open_readonly(cfg.store)
    try:
        a = store.get(cfg.id)
    except StoreError as e:
        print(f"osad anomalies show: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if a is None:
        print(f"osad anomalies show: no anomaly {cfg.id!r} in the store (see `osad anomalies list`)", file=sys.stderr)
        return 1
    if cfg.json:
        print(a.model_dump_json())
        return 0
    lines = [
        ("anomaly", a.anomaly_id), ("entity", a.entity_id), ("host", a.host), ("pid", a.pid), ("comm", a.comm),
        ("status", f"{a.status} (revision {a.revision})"), ("severity", a.severity),
        ("started", f"{utc_ts(a.start_ts)} UTC"), ("last", f"{utc_ts(a.last_ts)} UTC"),
        ("ended", f"{utc_ts(a.end_ts)} UTC" if a.end_ts is not None else "- (open)"),
        ("score", f"{a.score:.6g} (threshold {a.threshold:.6g}, ratio {ratio_text(a)})"),
        ("windows over", a.windows_over), ("first window", a.first_window_seq), ("models", ", ".join(a.models)),
        ("scope", a.scope if a.scope != "entity" else None),
        ("members", ", ".join(a.members)), ("summary", a.summary),
    ]
    for k, v in lines:
        if v is not None and v != "":
            print(f"{k + ':':<14}{v}")
    if a.root_causes:
        print("root causes:")
        for i, r in enumerate(a.root_causes, 1):
            print(f"  {i}. {r.feature:<32} {r.contribution:6.1%}")
    return 0


# -- osad tail -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TailConfig(KafkaConfig):
    """watch anomalies arrive on the topic (live table)

    Read the anomalies topic without a consumer group (from now, or from the beginning) and show a live table of
    incidents, one row each (its latest revision).
    """

    from_beginning: bool = setting(False, env="OSAD_TAIL_FROM_BEGINNING",
                                   help="also show anomalies published before now")
    entity: re.Pattern | None = setting(None, env="OSAD_TAIL_ENTITY", parse=_regex,
                                        help="only entity ids matching this regex")
    min_severity: Severity = setting("low", env="OSAD_TAIL_MIN_SEVERITY", choices=SEVERITIES,
                                     help="hide anomalies below this severity")
    once: bool = setting(False, env="OSAD_TAIL_ONCE",
                         help="read what is on the topic now (or until --timeout), print the table once and exit")
    timeout: float | None = setting(None, env="OSAD_TAIL_TIMEOUT", check=positive,
                                    help="stop after this many seconds (prints the final table)")
    rows: int = setting(30, env="OSAD_TAIL_ROWS", check=positive, help="most rows shown (most recent first)")
    json: bool = setting(False, env="OSAD_TAIL_JSON", help="print each matching anomaly state as one JSON line instead")


def _register_tail(sub) -> None:
    TailConfig.add_command(sub, "tail", run_tail)


def run_tail(args) -> int:
    from .tail import tail

    return tail(TailConfig.from_args(args))


# -- osad report ---------------------------------------------------------------------------------

_REPORT_EXAMPLES = """examples:
  osad report                                         # list the entities that have data (exit 2)
  osad report 'web-1/4242@887123' --out report.png
  osad report 'web-1/4242@887123' --out report.html --since 2h --until 15m
  osad report 'SMD/machine-1-1' --out r.png --features cpu_r,mem_u --threshold mscred=20
  osad report 'web-1/4242@887123' --out r.html --from-jsonl samples.jsonl --from-jsonl scores.jsonl
"""


@dataclass(frozen=True)
class ReportConfig(KafkaConfig):
    """an image (PNG, or HTML with a table) of one entity's metrics, scores, thresholds and anomalies"""

    entity: str | None = setting(None, positional=True, nargs="?", metavar="ENTITY",
                                 help="entity id, e.g. 'web-1/4242@887123'; leave out to list the entities that "
                                 "have data")
    out: str | None = setting(None, env="OSAD_REPORT_OUT", aliases=("-o",), metavar="FILE",
                              help="where to write: FILE.png (the image) or FILE.html (the image and a table of the "
                              "anomalies), e.g. --out report.html")
    features: list[str] | None = setting(None, env="OSAD_REPORT_FEATURES", parse=_names, metavar="A,B",
                                         help="metrics to plot, comma-separated, e.g. --features "
                                         "on_cpu_ns,rss_anon_bytes (default: the anomalies' root causes, then the "
                                         "most variable metrics)")
    max_features: int = setting(8, env="OSAD_REPORT_MAX_FEATURES", check=positive, metavar="N",
                                help="most metrics plotted when --features is not given, e.g. --max-features 12")
    since: float | None = setting(None, env="OSAD_REPORT_SINCE", parse=parse_since, metavar="WHEN",
                                  help="only data from then on: 30m, 2h, 7d ago, Unix seconds or an ISO date/time, "
                                  "e.g. --since 2h")
    until: float | None = setting(None, env="OSAD_REPORT_UNTIL", parse=parse_since, metavar="WHEN",
                                  help="only data up to then, same forms as --since, e.g. --until 15m (15 minutes "
                                  "ago)")
    threshold: list[tuple[str, float]] = setting(
        [], repeat=",", parse=parse_threshold_override, metavar="MODEL_FAMILY=VALUE",
        help="draw this threshold for a model family or model_id instead of the alerter's, e.g. mscred=20")
    store: str | None = _store(None, group=SOURCES, help=STORE_HELP + f"; read only, default {DEFAULT_STORE} "
                               "(e.g. --store sqlite:////var/lib/osad/a.db)")
    from_jsonl: list[str] = setting([], repeat=" ", group=SOURCES, metavar="FILE",
                                    help="read Samples, Scores and Anomalies from this JSONL file instead of the "
                                    "topics (from osad collect --output jsonl:FILE or osad alert --jsonl FILE), "
                                    "e.g. --from-jsonl run.jsonl")
    traces: str | None = setting(None, env="OSAD_REPORT_TRACES", group=SOURCES, metavar="FILE",
                                 help="the collector's --trace-output JSONL: the HTML report lists the entity's "
                                 "trace lines from 30 s before each anomaly to 30 s after it, e.g. --traces "
                                 "traces.jsonl")
    idle_ms: int = setting(1500, group=SOURCES, check=positive,
                           help="stop reading a topic when nothing arrived for this long (or at its end), e.g. "
                           "--idle-ms 3000")
    connect_timeout_s: float = setting(10.0, group=SOURCES, check=positive,
                                       help="give up when no broker answers within this many seconds, e.g. "
                                       "--connect-timeout-s 30")


def _register_report(sub) -> None:
    ReportConfig.add_command(
        sub,
        "report",
        run_report,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_REPORT_EXAMPLES,
        description="""\
Draw one entity's metrics over time (the anomalies' root-cause features and the most
variable metrics, each min-max normalised), a panel per model with its score and its
threshold (dashed), and every anomaly shaded with its severity and top root-cause feature.

Samples and Scores come from the topics (read from the beginning, no consumer group) or from
--from-jsonl files; anomalies and the thresholds the alerter chose from --store (the anomalies
topic when that store does not exist). See docs/alerter.md, "Reports".""",
    )


def run_report(args) -> int:
    from .report import run

    return run(ReportConfig.from_args(args))
