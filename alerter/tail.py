"""``osad tail``: the anomalies topic as a live table (rich), one row per incident (its latest revision)."""

from __future__ import annotations

import sys
import time

from osad.runtime.kafka import BrokerUnavailable
from osad.runtime.reader import TopicReader
from osad.schemas import ANOMALIES
from osad.schemas.messages import SEVERITIES

_STYLE = {"low": "cyan", "medium": "yellow", "high": "bold red", "critical": "bold white on red"}


class View:
    """The incidents seen so far, filtered; newest activity first."""

    def __init__(self, entity=None, min_severity: str = "low", rows: int = 30):
        self.entity, self.min_rank, self.rows = entity, SEVERITIES.index(min_severity), rows
        self.latest: dict = {}  # anomaly_id -> Anomaly (highest revision)

    def matches(self, a) -> bool:
        if SEVERITIES.index(a.severity) < self.min_rank:
            return False
        return self.entity is None or bool(self.entity.search(a.entity_id))

    def add(self, a) -> bool:
        """Keep ``a`` if it matches and is newer than what is held; True when the view changed."""
        if not self.matches(a):
            return False
        cur = self.latest.get(a.anomaly_id)
        if cur is not None and cur.revision >= a.revision:
            return False
        self.latest[a.anomaly_id] = a
        if len(self.latest) > 10 * self.rows:  # bounded: forget the least recently active
            for k, _ in sorted(self.latest.items(), key=lambda kv: kv[1].last_ts)[: len(self.latest) - 10 * self.rows]:
                del self.latest[k]
        return True

    def table(self, title: str = ""):
        from rich.table import Table

        t = Table(title=title or None, title_justify="left", expand=False)
        for col in ("LAST (UTC)", "ENTITY", "SEVERITY", "STATUS", "REV", "RATIO", "MODELS", "TOP FEATURES", "ID"):
            t.add_column(col, no_wrap=True)
        shown = sorted(self.latest.values(), key=lambda a: (a.last_ts, a.revision), reverse=True)[: self.rows]
        for a in shown:
            ratio = a.max_ratio if a.max_ratio is not None else (a.score / a.threshold if a.threshold else 0.0)
            t.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a.last_ts)),
                      a.entity_id + (f" ({a.comm})" if a.comm and a.comm not in a.entity_id else ""),
                      f"[{_STYLE[a.severity]}]{a.severity}[/]", a.status, str(a.revision), f"{ratio:.2f}x",
                      ",".join(m.split(":", 1)[0] for m in a.models),
                      ",".join(r.feature for r in a.root_causes[:3]), a.anomaly_id[:12])
        return t


def _line(a) -> str:
    feats = ",".join(r.feature for r in a.root_causes[:3])
    return (f"{time.strftime('%H:%M:%S', time.gmtime(a.last_ts))} {a.severity:<8} {a.status:<6} r{a.revision} "
            f"{a.entity_id} {a.anomaly_id[:12]} [{feats}] {a.summary}")


class _PlainConsole:
    """Stands in for rich's Console where rich is not installed: one line per incident."""

    is_terminal = False

    def print(self, table) -> None:
        print(table)


class _PlainView(View):
    def table(self, title: str = ""):
        shown = sorted(self.latest.values(), key=lambda a: (a.last_ts, a.revision), reverse=True)[: self.rows]
        return "\n".join([title] + [_line(a) for a in shown])


def tail(args) -> int:
    try:
        from rich.console import Console
    except ImportError:  # rich makes the live table; without it, plain lines
        console, view_cls = _PlainConsole(), _PlainView
    else:
        console, view_cls = Console(), View
        if not console.is_terminal:
            console = Console(width=max(console.width, 200))
    topic = ANOMALIES.full_name(args.topic_prefix)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    once = args.once and not args.timeout  # what the topic holds now, then stop
    try:
        reader = TopicReader(args.bootstrap, ANOMALIES, prefix=args.topic_prefix, from_beginning=args.from_beginning,
                             client_id="osad-tail", connect_timeout_s=min(30.0, args.timeout or 30.0),
                             security=getattr(args, "security", None))
    except BrokerUnavailable as e:
        print(f"osad tail: {e}", file=sys.stderr)
        return 1
    view = view_cls(args.entity, args.min_severity, args.rows)
    live = None
    try:
        while not reader.assign():
            if once or (deadline and time.monotonic() > deadline):
                print(f"osad tail: topic {topic} does not exist yet (no alerter has run on this broker?)",
                      file=sys.stderr)
                if not args.json:
                    console.print(view.table(f"{topic}: no anomalies"))
                return 0
            time.sleep(0.5)
        if once:
            reader.mark_end()
        interactive = console.is_terminal and not args.once and not args.json
        if interactive:
            from rich.live import Live

            live = Live(view.table(f"{topic} (Ctrl-C stops)"), console=console, refresh_per_second=4)
            live.start()
        while True:
            for a in reader.poll_messages(200):
                if not view.add(a):
                    continue
                if args.json:
                    print(a.model_dump_json(), flush=True)
                elif live is not None:
                    live.update(view.table(f"{topic} (Ctrl-C stops)"))
                elif not args.once and not args.timeout:
                    print(_line(a), flush=True)
            if once and reader.caught_up():
                break  # caught up, and a poll found nothing more
            if deadline and time.monotonic() > deadline:
                break
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
        reader.close()
    if not args.json and live is None and (args.once or args.timeout):
        console.print(view.table(f"{topic}: {len(view.latest)} incident(s)"))
    return 0
