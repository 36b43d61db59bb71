"""``osad alert`` (the alerter service), ``osad anomalies list|show`` (the store), ``osad tail`` (the topic)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from osad.core.thresholds import DEFAULT_FENCE_K
from osad.schemas.messages import SEVERITIES
from osad.runtime.config import ConfigError, add_kafka_options, env_name, non_negative, option, positive

DEFAULT_STORE = "sqlite:///var/alerter/anomalies.db"
_STORE_HELP = ("where anomalies and the alerter's restart state live: sqlite:///relative/path.db, "
               "sqlite:////absolute/path.db, or postgresql://USER:PASSWORD@HOST:PORT/DBNAME")


def _threshold_arg(s: str) -> tuple[str, float]:
    from .core import parse_threshold_override

    return parse_threshold_override(s)


def _repeatable(p: argparse.ArgumentParser, flag: str, *, type, help: str, metavar: str, split: str) -> None:
    """A repeatable flag; its environment variable holds several values separated by ``split``."""
    env = env_name(flag)
    default = []
    raw = os.environ.get(env, "")
    for part in (x.strip() for x in raw.split(split)):
        if not part:
            continue
        try:
            default.append(type(part))
        except ValueError as e:
            raise ConfigError(f"environment variable {env}: {e}") from None

    def conv(x: str):
        try:
            return type(x)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    conv.__name__ = metavar
    sep = "spaces" if split == " " else f"'{split}'"
    p.add_argument(flag, action=_FlagsWin, type=conv, default=default, metavar=metavar,
                   help=f"{help} (repeatable; env {env}, several separated by {sep}; flags replace the env)")


class _FlagsWin(argparse.Action):
    """Append, but the first flag replaces the values that came from the environment."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, "_flags_seen", set())
        cur = [] if self.dest not in seen else list(getattr(namespace, self.dest) or [])
        seen.add(self.dest)
        namespace._flags_seen = seen
        setattr(namespace, self.dest, cur + [values])


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


def register(sub) -> None:
    _register_alert(sub)
    _register_anomalies(sub)
    _register_tail(sub)
    _register_report(sub)


# -- osad alert ----------------------------------------------------------------------------------

def _register_alert(sub) -> None:
    p = sub.add_parser(
        "alert", help="turn scores into anomalies: thresholds, incidents, root cause, storage (service)",
        description="Consume Scores, choose a threshold per (entity, model) without labels, group consecutive "
        "windows over threshold into one incident per entity (published as open, update, closed on the anomalies "
        "topic, keyed by entity id) with its severity and root-cause features; keep anomalies and the state a "
        "restart needs in --store; also post them to --webhook URLs and append them to --jsonl. "
        "See docs/alerter.md.")
    add_kafka_options(p, group_default="osad-alerter")
    option(p, "--store", default=DEFAULT_STORE, help=_STORE_HELP)
    _repeatable(p, "--webhook", type=_url, metavar="URL", split=" ",
                help="also POST each anomaly's JSON here (background, retries with backoff, never blocks)")
    option(p, "--jsonl", default=None, help="also append each anomaly as one JSON line to this file")
    g = p.add_argument_group("thresholds")
    option(g, "--calibration-scores", type=int, default=100,
           check=lambda v: None if v >= 2 else "must be at least 2 (POT needs 20 or more; fewer use mean + 3 std)",
           help="each (entity, model)'s first scores, assumed normal, on which its POT threshold is fitted")
    option(g, "--q", type=float, default=1e-3, check=lambda v: None if 0 < v < 1 else "must be in (0, 1)",
           help="POT risk: the probability that a normal score exceeds the threshold")
    option(g, "--calibration-fence", type=float, default=DEFAULT_FENCE_K,
           check=lambda v: None if v >= 0 else "must be 0 (off) or more",
           help="before POT, leave out calibration scores above Q3 + this many IQR (at most 5%% of them), so a "
           "one-off spike while calibrating cannot lift the threshold out of reach (0: off)")
    g.add_argument("--no-model-threshold", action="store_true",
                   help="ignore the thresholds models carry in their Scores (MSCRED's) and calibrate instead")
    _repeatable(g, "--threshold", type=_threshold_arg, metavar="MODEL_FAMILY=VALUE", split=",",
                help="static threshold for a model family (model_id before ':', e.g. mscred=20); wins over the "
                "other rules")
    g = p.add_argument_group("incidents")
    option(g, "--open-after", type=int, default=2, check=positive,
           help="an incident opens when some model has this many consecutive windows over its threshold")
    option(g, "--close-after", type=int, default=3, check=positive,
           help="it closes when every model of the entity has had this many consecutive windows under threshold")
    option(g, "--top-k", type=int, default=5, check=positive, help="root-cause features reported per anomaly")
    option(g, "--update-min-change", type=float, default=0.1, check=non_negative,
           help="publish an update when the max score/threshold ratio grew by more than this fraction (also when "
           "the top features, the severity or the models change; at most once per window)")
    option(g, "--stale-windows", type=int, default=30, check=positive,
           help="a model that has not scored an entity for this many windows does not hold its incident open")
    option(g, "--idle-timeout-s", type=float, default=600.0, check=positive,
           help="close the incident of, and forget, an entity without scores for this long")
    option(g, "--max-entities", type=int, default=10_000, check=positive,
           help="most entities held in memory (least recently seen leave first; their state stays in the store)")
    option(g, "--state-ttl-s", type=float, default=7 * 86400.0, check=positive,
           help="forget the stored thresholds of entities without an open incident not seen for this long")
    g = p.add_argument_group("host-wide events", "several processes of one host that deviate together (e.g. all "
                             "waiting for a CPU) make one host event (entity host:<host>) instead of one incident each")
    option(g, "--host-min-entities", type=int, default=3,
           check=lambda v: None if v == 0 or v >= 2 else "must be 0 (off) or at least 2",
           help="fewest processes that make a host event; 0 turns host events off")
    option(g, "--host-share", type=float, default=0.5, check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
           help="...and at least this share of the host's watched processes")
    option(g, "--host-similarity", type=float, default=0.7,
           check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
           help="processes over threshold together belong to one event when their root-cause profiles have at least "
           "this cosine similarity")
    option(g, "--host-lift", type=float, default=2.0, check=lambda v: None if v >= 1 else "must be at least 1",
           help="a feature leading most processes' windows at once is a host event when it leads at least this many "
           "times as many processes as usual")
    option(g, "--host-hold", type=int, default=2, check=lambda v: None if v >= 0 else "must be 0 (no waiting) or more",
           help="a process due to open an incident waits up to this many more windows while at least half as "
           "many processes of its host as a host event needs show the start of one (the first to cross, the "
           "one with the lowest threshold, then joins the event instead); 0 never waits")
    g = p.add_argument_group("webhooks")
    option(g, "--webhook-queue", type=int, default=1000, check=positive,
           help="anomalies waiting per webhook; when full the oldest is dropped (and counted)")
    option(g, "--webhook-retries", type=int, default=5, check=non_negative, help="retries after a failed POST")
    option(g, "--webhook-backoff-s", type=float, default=0.5, check=non_negative,
           help="first wait before a retry; doubles each time (at most 30 s)")
    option(g, "--webhook-timeout-s", type=float, default=5.0, check=positive, help="timeout of one POST")
    p.set_defaults(func=run_alert)


def _url(s: str) -> str:
    if not re.match(r"^https?://[^/\s]+", s):
        raise ValueError(f"{s!r} is not an http:// or https:// URL")
    return s


def run_alert(args) -> int:
    from osad.runtime.config import apply_common
    from osad.runtime.service import run_transform

    from .core import AlerterConfig
    from .service import Alerter
    from .sinks import JsonlSink, SinkError, WebhookSink
    from .store import StoreError, open_store

    apply_common(args)
    try:
        cfg = AlerterConfig(
            calibration_scores=args.calibration_scores, q=args.q, calibration_fence=args.calibration_fence,
            use_model_threshold=not args.no_model_threshold,
            static_thresholds=dict(args.threshold), open_after=args.open_after, close_after=args.close_after,
            top_k=args.top_k, update_min_change=args.update_min_change, stale_windows=args.stale_windows,
            idle_timeout_s=args.idle_timeout_s, max_entities=args.max_entities,
            host_min_entities=args.host_min_entities, host_share=args.host_share,
            host_similarity=args.host_similarity, host_lift=args.host_lift,
            host_hold=args.host_hold)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        store = open_store(args.store)
    except StoreError as e:
        raise ConfigError(f"--store: {e}") from None
    sinks = []
    try:
        for url in args.webhook:
            sinks.append(WebhookSink(url, queue_size=args.webhook_queue, retries=args.webhook_retries,
                                     backoff_s=args.webhook_backoff_s, timeout_s=args.webhook_timeout_s))
        if args.jsonl:
            sinks.append(JsonlSink(args.jsonl))
    except SinkError as e:
        store.close()
        raise ConfigError(str(e)) from None
    import logging

    logging.getLogger("osad.alerter").info("alerter: store %s; sinks: %s", store.description,
                                           ", ".join(s.name for s in sinks) or "none")
    alerter = Alerter(cfg, store, sinks, state_ttl_s=args.state_ttl_s)
    try:
        return run_transform(alerter, args)
    finally:
        alerter.shutdown()


# -- osad anomalies ------------------------------------------------------------------------------

def _register_anomalies(sub) -> None:
    p = sub.add_parser("anomalies", help="list or show the anomalies in the alerter's store",
                       description="Read the anomalies the alerter stored (the latest revision of each).")
    s = p.add_subparsers(dest="anomalies_command", metavar="{list,show}")
    ls = s.add_parser("list", help="anomalies, most recently active first",
                      description="Anomalies from --store, most recently active first, filtered.")
    option(ls, "--store", default=DEFAULT_STORE, help=_STORE_HELP)
    ls.add_argument("--entity", default=None, help="only this entity id (a trailing * matches a prefix)")
    ls.add_argument("--severity", type=_argtype(_severities), default=None,
                    help="only these severities, comma-separated (low, medium, high, critical)")
    ls.add_argument("--status", type=_argtype(_statuses), default=None,
                    help="open (still open: status open or update), closed, or update; comma-separated")
    ls.add_argument("--since", type=_argtype(parse_since), default=None,
                    help="only anomalies active since: 30m, 2h, 7d ago, Unix seconds, or an ISO date/time")
    ls.add_argument("--limit", type=_argtype(_positive_int), default=100, help="most rows (default 100)")
    ls.add_argument("--json", action="store_true", help="print a JSON array of the anomalies")
    ls.set_defaults(func=run_list)
    sh = s.add_parser("show", help="one anomaly in full", description="One anomaly from --store, in full.")
    sh.add_argument("id", help="anomaly id (or a unique prefix of at least 6 characters)")
    option(sh, "--store", default=DEFAULT_STORE, help=_STORE_HELP)
    sh.add_argument("--json", action="store_true", help="print the anomaly's JSON")
    sh.set_defaults(func=run_show)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _argtype(fn):
    def conv(s: str):
        try:
            return fn(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    conv.__name__ = getattr(fn, "__name__", "value")
    return conv


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise ValueError("must be greater than 0")
    return v


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


def _open_readonly(url: str):
    from .store import StoreError, open_store

    try:
        return open_store(url, readonly=True)
    except StoreError as e:
        raise ConfigError(f"--store: {e}") from None


def _ts(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _ratio(a) -> str:
    r = a.max_ratio if a.max_ratio is not None else (a.score / a.threshold if a.threshold else float("nan"))
    return f"{r:.2f}x"


def run_list(args) -> int:
    import json

    from .store import StoreError

    store = _open_readonly(args.store)
    try:
        rows = store.list(entity=args.entity, severities=args.severity, statuses=args.status, since=args.since,
                          limit=args.limit)
    except StoreError as e:
        print(f"osad anomalies list: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.json:
        print(json.dumps([a.model_dump(mode="json") for a in rows]))
        return 0
    if not rows:
        print("no anomalies" + (" match these filters" if any(
            (args.entity, args.severity, args.status, args.since)) else " stored yet"))
        return 0
    head = ("ID", "SEVERITY", "STATUS", "REV", "ENTITY", "STARTED (UTC)", "LAST (UTC)", "RATIO", "MODELS",
            "TOP FEATURES")
    table = [head] + [(a.anomaly_id[:12], a.severity, a.status, str(a.revision),
                       a.entity_id + (f" ({a.comm})" if a.comm else ""), _ts(a.start_ts), _ts(a.last_ts), _ratio(a),
                       ",".join(m.split(":", 1)[0] for m in a.models),
                       ",".join(r.feature for r in a.root_causes[:3])) for a in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def run_show(args) -> int:
    from .store import StoreError

    store = _open_readonly(args.store)
    try:
        a = store.get(args.id)
    except StoreError as e:
        print(f"osad anomalies show: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if a is None:
        print(f"osad anomalies show: no anomaly {args.id!r} in the store (see `osad anomalies list`)", file=sys.stderr)
        return 1
    if args.json:
        print(a.model_dump_json())
        return 0
    lines = [
        ("anomaly", a.anomaly_id), ("entity", a.entity_id), ("host", a.host), ("pid", a.pid), ("comm", a.comm),
        ("status", f"{a.status} (revision {a.revision})"), ("severity", a.severity),
        ("started", f"{_ts(a.start_ts)} UTC"), ("last", f"{_ts(a.last_ts)} UTC"),
        ("ended", f"{_ts(a.end_ts)} UTC" if a.end_ts is not None else "- (open)"),
        ("score", f"{a.score:.6g} (threshold {a.threshold:.6g}, ratio {_ratio(a)})"),
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

def _register_tail(sub) -> None:
    p = sub.add_parser("tail", help="watch anomalies arrive on the topic (live table)",
                       description="Read the anomalies topic without a consumer group (from now, or from the "
                       "beginning) and show a live table of incidents, one row each (its latest revision).")
    _topic_options(p)
    p.add_argument("--from-beginning", action="store_true", help="also show anomalies published before now")
    p.add_argument("--entity", type=_argtype(_regex), default=None, help="only entity ids matching this regex")
    p.add_argument("--min-severity", choices=SEVERITIES, default="low", help="hide anomalies below this severity")
    p.add_argument("--once", action="store_true",
                   help="read what is on the topic now (or until --timeout), print the table once and exit")
    p.add_argument("--timeout", type=_argtype(_positive_float), default=None,
                   help="stop after this many seconds (prints the final table)")
    p.add_argument("--rows", type=_argtype(_positive_int), default=30, help="most rows shown (most recent first)")
    p.add_argument("--json", action="store_true", help="print each matching anomaly state as one JSON line instead")
    p.set_defaults(func=run_tail)


def _topic_options(p: argparse.ArgumentParser) -> None:
    """--bootstrap and --topic-prefix, for the commands that read topics without a consumer group."""
    option(p, "--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    option(p, "--topic-prefix", default="", help="prefix for every topic name")


def _regex(s: str):
    try:
        return re.compile(s)
    except re.error as e:
        raise ValueError(f"{s!r} is not a regular expression: {e}") from None


def _positive_float(s: str) -> float:
    v = float(s)
    if v <= 0:
        raise ValueError("must be greater than 0")
    return v


def run_tail(args) -> int:
    from .tail import tail

    return tail(args)


# -- osad report ---------------------------------------------------------------------------------

_REPORT_EXAMPLES = """examples:
  osad report                                         # list the entities that have data (exit 2)
  osad report 'web-1/4242@887123' --out report.png
  osad report 'web-1/4242@887123' --out report.html --since 2h --until 15m
  osad report 'SMD/machine-1-1' --out r.png --features cpu_r,mem_u --threshold mscred=20
  osad report 'web-1/4242@887123' --out r.html --from-jsonl samples.jsonl --from-jsonl scores.jsonl
"""


def _register_report(sub) -> None:
    p = sub.add_parser(
        "report", help="an image (PNG, or HTML with a table) of one entity's metrics, scores, thresholds and anomalies",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_REPORT_EXAMPLES,
        description="""\
Draw one entity's metrics over time (the anomalies' root-cause features and the most
variable metrics, each min-max normalised), a panel per model with its score and its
threshold (dashed), and every anomaly shaded with its severity and top root-cause feature.

Samples and Scores come from the topics (read from the beginning, no consumer group) or from
--from-jsonl files; anomalies and the thresholds the alerter chose from --store (the anomalies
topic when that store does not exist). See docs/alerter.md, "Reports".""")
    p.add_argument("entity", nargs="?", default=None, metavar="ENTITY",
                   help="entity id, e.g. 'web-1/4242@887123'; leave out to list the entities that have data")
    p.add_argument("--out", "-o", default=None, metavar="FILE",
                   help="where to write: FILE.png (the image) or FILE.html (the image and a table of the anomalies), "
                   "e.g. --out report.html")
    p.add_argument("--features", type=_argtype(_names), default=None, metavar="A,B",
                   help="metrics to plot, comma-separated, e.g. --features on_cpu_ns,rss_anon_bytes (default: the "
                   "anomalies' root causes, then the most variable metrics)")
    p.add_argument("--max-features", type=_argtype(_positive_int), default=8, metavar="N",
                   help="most metrics plotted when --features is not given, e.g. --max-features 12 (default 8)")
    p.add_argument("--since", type=_argtype(parse_since), default=None, metavar="WHEN",
                   help="only data from then on: 30m, 2h, 7d ago, Unix seconds or an ISO date/time, e.g. --since 2h")
    p.add_argument("--until", type=_argtype(parse_since), default=None, metavar="WHEN",
                   help="only data up to then, same forms as --since, e.g. --until 15m (15 minutes ago)")
    _repeatable(p, "--threshold", type=_threshold_arg, metavar="MODEL_FAMILY=VALUE", split=",",
                help="draw this threshold for a model family or model_id instead of the alerter's, e.g. mscred=20")
    g = p.add_argument_group("sources")
    _topic_options(g)
    option(g, "--store", default=None,
           help=_STORE_HELP + f"; read only, default {DEFAULT_STORE} (e.g. --store sqlite:////var/lib/osad/a.db)")
    _repeatable(g, "--from-jsonl", type=str, metavar="FILE", split=" ",
                help="read Samples, Scores and Anomalies from this JSONL file instead of the topics (from osad "
                "collect --output jsonl:FILE or osad alert --jsonl FILE), e.g. --from-jsonl run.jsonl")
    option(g, "--idle-ms", type=int, default=1500, check=positive,
           help="stop reading a topic when nothing arrived for this long (or at its end), e.g. --idle-ms 3000")
    option(g, "--connect-timeout-s", type=float, default=10.0, check=positive,
           help="give up when no broker answers within this many seconds, e.g. --connect-timeout-s 30")
    p.set_defaults(func=run_report)


def _names(s: str) -> list[str]:
    vals = [x.strip() for x in s.split(",") if x.strip()]
    if not vals:
        raise ValueError("give one or more metric names, comma-separated, e.g. on_cpu_ns,rss_anon_bytes")
    return vals


def run_report(args) -> int:
    from .report import run

    return run(args)
