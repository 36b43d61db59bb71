"""``osad up``: the whole pipeline on this machine, each service its own OS process.

Starts the embedded broker (unless ``--bootstrap`` names a running Kafka), creates the topics,
then every service this installation has (collector, featurizer, detector, alerter), each with
its metrics/health endpoint on its own port and its log in ``--log-dir``. Ctrl-C (or SIGTERM)
stops them all cleanly: SIGTERM first (each finishes its batch and commits), SIGKILL only after
``--stop-timeout-s``.

On a terminal it shows a live view (refreshed every second, osad/live.py): each service's pid,
state, health and throughput (from its /metrics and /healthz), the entities seen in the last
``--view-window-s`` seconds with their latest sample and score, the anomalies (as ``osad tail``
shows them) and the last lines of any service log that reports an error. ``--no-view``, or output
that is not a terminal, prints a banner instead and leaves the services to their logs.

``--demo`` replays one SMD entity with labelled anomalies instead of watching this machine (the
collector is not started): its last normal train rows as fast as possible, so that the featurizer
(scaling with the train ranges), the detector and the alerter calibrate within seconds (the demo
lowers their calibration counts), then its test rows at ``--demo-rate`` rows per second from a
little before the first labelled anomaly. The first incident appears within about a minute. The
demo keeps its state in STATE/demo (the train ranges, the alerter's store), afresh each time.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from osad.runtime.config import ConfigError, non_negative, option, positive
from osad.runtime.procs import start_logged, stop_all

# (service name, osad subcommand, extra arguments; {state} is --state-dir); started in this order,
# stopped in reverse.
PIPELINE = (
    ("featurizer", "featurizer", ["--state-dir", "{state}/featurizer"]),
    ("detector", "detect", ["--models", "{state}/models"]),
    ("alerter", "alert", ["--store", "sqlite:///{state}/alerter/anomalies.db"]),
    ("collector", "collect", ["--all"]),
)

# --demo: which data, and how the services calibrate on it (their own options, lowered so that the
# first incident comes within about a minute; see plan_demo)
DEMO_DATASET = "../shared/datasets/SMD"
DEMO_ENTITY = "machine-1-6"
DEMO_CS_CALIBRATE = 20  # detector --cs-calibrate (30): windows its per-entity compressed sensing is fitted on
DEMO_CALIBRATION_SCORES = 40  # alerter --calibration-scores (100): scores its POT threshold is fitted on
# alerter --open-after (2): SMD's labelled anomalies mostly last 4 to 10 rows, so they fall into one window of
# gap 10 rows; two consecutive windows over threshold, the service's default, would wait for a long one
DEMO_OPEN_AFTER = 1
DEMO_MARGIN_WINDOWS = 5  # train windows beyond calibration, so that no test window falls into the alerter's
DEMO_LEAD_ROWS = 30  # test rows windowed before the first labelled anomaly
DEMO_STARTUP_S = 15.0  # measured: start of `osad up --demo` to the first test row scored (see README)
# the extra arguments each service gets in demo mode ({demo} is the demo's state folder); later flags win
DEMO_ARGS = {
    "featurizer": ["--ranges", "{demo}/ranges.json"],
    "detector": ["--cs-calibrate", str(DEMO_CS_CALIBRATE), "--max-batch", str(DEMO_CS_CALIBRATE)],
    "alerter": ["--store", "sqlite:///{demo}/anomalies.db", "--calibration-scores", str(DEMO_CALIBRATION_SCORES),
                "--open-after", str(DEMO_OPEN_AFTER)],
}


def register(sub) -> None:
    p = sub.add_parser("up", help="run the whole pipeline locally (embedded broker + every service)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    option(p, "--bootstrap", default="", help="use this Kafka instead of starting the embedded broker")
    option(p, "--broker-port", type=int, default=9092, check=positive, help="port of the embedded broker")
    option(p, "--metrics-base-port", type=int, default=9400, check=positive,
           help="services serve /metrics and /healthz on consecutive ports from here")
    option(p, "--log-dir", default="var/up", help="folder for each service's log")
    option(p, "--state-dir", default="var", help="folder for the services' state (learned scaling ranges, ...)")
    option(p, "--only", type=lambda s: [x for x in s.split(",") if x], default=None,
           help="comma-separated services to start (default: every one available)")
    option(p, "--replay", default=None,
           help="also replay this benchmark data set folder (e.g. ../shared/datasets/SMD) into the pipeline")
    option(p, "--replay-args", default="--rate 20", help="extra arguments for the replay (see osad replay --help)")
    option(p, "--collect-args", default="--all", help="arguments for the collector (see osad collect --help)")
    option(p, "--stop-timeout-s", type=float, default=20.0, check=positive, help="grace period before SIGKILL")
    option(p, "--run-for-s", type=float, default=0.0, check=non_negative,
           help="stop by itself after this many seconds (0: until Ctrl-C)")
    g = p.add_argument_group("live view")
    g.add_argument("--no-view", action="store_true",
                   help="no live view: print a banner and leave the services to their logs (also when the output "
                   "is not a terminal)")
    option(g, "--view-window-s", type=float, default=30.0, check=positive,
           help="the view lists the entities that sent a sample within this many seconds")
    option(g, "--view-rows", type=int, default=12, check=positive, help="most entities and anomalies the view lists")
    g = p.add_argument_group("demo")
    g.add_argument("--demo", action="store_true",
                   help="replay an SMD entity with labelled anomalies (no collector) so that detections appear "
                   "within about a minute")
    option(g, "--demo-dataset", default=DEMO_DATASET, help="SMD data set folder (train/, test/, test_label/)")
    option(g, "--demo-entity", default=DEMO_ENTITY, help="entity (machine) of the data set to replay")
    option(g, "--demo-rate", type=float, default=20.0, check=positive,
           help="test rows per second (the train rows go as fast as possible); SMD has one row a minute")
    p.set_defaults(func=run)


@dataclass
class Child:
    name: str
    cmd: list[str]
    log: Path
    port: int | None
    proc: subprocess.Popen | None = None
    oneshot: bool = False
    after: str | None = None  # start once this one-shot child has finished well

    def state(self) -> str:
        if self.proc is None:
            return "waiting"
        code = self.proc.poll()
        if code is None:
            return "up"
        return "done" if code == 0 and self.oneshot else f"exited {code}"


def available_commands() -> set[str]:
    from osad.cli import build_parser

    p = build_parser()
    for a in p._actions:  # the subcommand table
        if isinstance(a, argparse._SubParsersAction):
            return set(a.choices)
    return set()


def _osad(*args: str) -> list[str]:
    return [sys.executable, "-m", "osad", *args]


# -- the demo --------------------------------------------------------------------------------------

@dataclass
class DemoPlan:
    dataset: str
    entity: str
    entity_id: str
    n_train: int
    train_skip: int  # the train rows from here on are replayed (as fast as possible)
    test_skip: int  # then the test rows from here on (at rate)
    segments: list[tuple[int, int]]  # labelled anomalies at or after test_skip: test rows, inclusive
    rate: float

    def due_s(self, row: int) -> float:
        """Seconds after the start until the test row ``row`` has been replayed and its window scored."""
        from osad.core.signature import DEFAULT_GAP

        return DEMO_STARTUP_S + (row - self.test_skip + DEFAULT_GAP) / self.rate

    def describe(self, state_dir: str) -> list[str]:
        from osad.core.signature import DEFAULT_GAP

        a, b = self.segments[0]
        later = ", ".join(f"{x}..{y} (~{self.due_s(x):.0f} s)" for x, y in self.segments[1:4])
        return [
            f"demo: {self.entity_id} from {self.dataset}; the collector is not started in demo mode "
            "(the replay is the only source)",
            f"  1. its last {self.n_train - self.train_skip} normal train rows (of {self.n_train}) as fast as "
            f"possible: the featurizer scales with the train ranges ({state_dir}/demo/ranges.json), the detector "
            f"fits compressed sensing on {DEMO_CS_CALIBRATE} windows and the alerter its thresholds on the next "
            f"{DEMO_CALIBRATION_SCORES} scores",
            f"  2. its test rows from row {self.test_skip} at {self.rate:g} rows/s (a window every {DEFAULT_GAP} rows; "
            f"one over its threshold opens an incident: --open-after {DEMO_OPEN_AFTER})",
            f"anomaly labelled at rows {a}..{b} of the test split, expect an incident in ~{self.due_s(a):.0f} s"
            + (f"; later labelled anomalies at rows {later}" if later else ""),
        ]


def label_segments(labels) -> list[tuple[int, int]]:
    """Runs of labelled rows: (first, last) row, inclusive.

    >>> label_segments([0, 1, 1, 0, 0, 1])
    [(1, 2), (5, 5)]
    """
    out, start = [], None
    for i, v in enumerate(list(labels) + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - 1))
            start = None
    return out


def plan_demo(dataset: str, entity: str, n_train: int, labels, rate: float, entity_id: str = "") -> DemoPlan:
    """Which train and test rows the demo replays (pure: from the split sizes and the labels).

    Train: enough of the last normal rows for one window span, the detector's calibration windows,
    the alerter's calibration scores and a margin. Test: from a little more than a window span
    before the first labelled anomaly (a skip restarts the featurizer's window), so a few normal
    windows come first; from row 0 when the anomaly is that early (train and test rows then follow
    each other without a gap).
    """
    from osad.core.signature import DEFAULT_GAP, DEFAULT_SCALES, DEFAULT_STEP, span

    need = span(DEFAULT_SCALES, DEFAULT_GAP, DEFAULT_STEP)
    train_rows = need + DEFAULT_GAP * (DEMO_CS_CALIBRATE + DEMO_CALIBRATION_SCORES + DEMO_MARGIN_WINDOWS)
    if n_train < train_rows:
        raise ConfigError(f"--demo-entity {entity}: {n_train} train rows; the demo needs at least {train_rows}")
    segments = label_segments(labels)
    if not segments:
        raise ConfigError(f"--demo-entity {entity}: its test_label/ marks no anomaly; choose another entity")
    first = segments[0][0]
    skip = max(0, first - need - DEMO_LEAD_ROWS)
    return DemoPlan(dataset, entity, entity_id or entity, n_train, n_train - train_rows, skip,
                    [sg for sg in segments if sg[0] >= skip], rate)


def load_demo(args) -> DemoPlan:
    """Read the demo entity (clear errors naming --demo-dataset / --demo-entity), plan its replay and
    write its train ranges for the featurizer, as ``osad replay --write-ranges`` does."""
    from osad.collector.replay import ReplayPlan, train_ranges
    from osad.core.datasets import DatasetError, list_entities, load_entity
    from osad.core.signature import write_ranges_file

    folder = Path(args.demo_dataset)
    if not folder.is_dir():
        raise ConfigError(f"--demo-dataset {folder}: no such folder; give the SMD data set folder (train/, test/, "
                          "test_label/) with --demo-dataset DIR (env OSAD_DEMO_DATASET)")
    try:
        names = list_entities(folder)
        if args.demo_entity not in names:
            raise ConfigError(f"--demo-entity {args.demo_entity}: not in {folder}; choose one of {', '.join(names)}")
        e = load_entity(folder, args.demo_entity)
    except DatasetError as err:
        raise ConfigError(f"--demo-dataset {folder}: {err}") from None
    if e.test is None or e.test_label is None:
        raise ConfigError(f"--demo-dataset {folder}: no test/ and test_label/ file for {args.demo_entity}; the demo "
                          "needs labelled test rows to start shortly before an anomaly")
    demo = plan_demo(str(folder), args.demo_entity, e.train.shape[0], e.test_label, args.demo_rate, e.entity_id)
    d = Path(args.state_dir) / "demo"
    d.mkdir(parents=True, exist_ok=True)
    write_ranges_file(d / "ranges.json", train_ranges(ReplayPlan([e], "test", None)))
    # the broker starts empty, so does the demo: an alerter state of an earlier demo would take the same
    # windows for duplicates
    for f in d.glob("anomalies.db*"):
        f.unlink()
    return demo


def demo_children(demo: DemoPlan, bootstrap: str, log_dir: Path) -> list[Child]:
    base = ("replay", demo.dataset, "--bootstrap", bootstrap, "--entity", demo.entity)
    return [
        Child("replay-train", _osad(*base, "--split", "train", "--skip", str(demo.train_skip), "--rate", "0"),
              log_dir / "replay-train.log", None, oneshot=True),
        Child("replay-test", _osad(*base, "--split", "test", "--skip", str(demo.test_skip), "--rate",
                                   f"{demo.rate:g}"),
              log_dir / "replay-test.log", None, oneshot=True, after="replay-train"),
    ]


# -- plan and run ----------------------------------------------------------------------------------

def check_options(args) -> None:
    names = [n for n, _, _ in PIPELINE]
    bad = [n for n in args.only or [] if n not in names]
    if bad:
        raise ConfigError(f"--only: no service {', '.join(bad)}; choose from {', '.join(names)}")
    if args.demo and args.replay:
        raise ConfigError("--demo replays its own data set; leave out --replay (or choose the demo's data with "
                          "--demo-dataset DIR --demo-entity NAME)")


def plan(args, bootstrap: str, have: set[str], demo: DemoPlan | None = None) -> list[Child]:
    log_dir = Path(args.log_dir)
    children = []
    port = args.metrics_base_port
    for name, cmd, extra in PIPELINE:
        if cmd not in have or (args.only and name not in args.only):
            continue
        if demo and name == "collector":
            continue
        extra = [a.format(state=args.state_dir) for a in extra]
        if name == "collector":
            extra = shlex.split(args.collect_args)
        if demo:
            extra = _override(extra, [a.format(demo=f"{args.state_dir}/demo") for a in DEMO_ARGS.get(name, [])])
        children.append(Child(name, _osad(cmd, "--bootstrap", bootstrap, "--metrics-port", str(port), *extra),
                              log_dir / f"{name}.log", port))
        port += 1
    if args.replay:
        children.append(Child("replay", _osad("replay", args.replay, "--bootstrap", bootstrap,
                                              *shlex.split(args.replay_args)),
                              log_dir / "replay.log", None, oneshot=True))
    if demo:
        children += demo_children(demo, bootstrap, log_dir)
    return children


def _override(base: list[str], flags: list[str]) -> list[str]:
    """``base`` arguments with the ``--flag value`` pairs of ``flags`` replacing (or added to) its own.

    >>> _override(["--store", "a", "--x"], ["--store", "b", "--n", "1"])
    ['--x', '--store', 'b', '--n', '1']
    """
    names = set(flags[::2])
    out, skip = [], False
    for a in base:
        if skip:
            skip = False
        elif a in names:
            skip = True
        else:
            out.append(a)
    return out + flags


def run(args) -> int:
    from osad.runtime.broker import BrokerError, EmbeddedBroker
    from osad.runtime.kafka import ensure_topics

    have = available_commands()
    check_options(args)
    demo = load_demo(args) if args.demo else None
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        try:
            broker = EmbeddedBroker(port=args.broker_port, log_file=str(log_dir / "broker.log")).start()
        except BrokerError as e:
            print(f"osad up: {e}", file=sys.stderr)
            return 1
        bootstrap = broker.bootstrap
    ensure_topics(bootstrap)
    children = plan(args, bootstrap, have, demo)
    notes = demo.describe(args.state_dir) if demo else []
    stopping = {"flag": False}

    def _stop(*_):
        stopping["flag"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rc = 0
    view = None
    failed: Child | None = None
    try:
        for c in children:
            if not c.after:
                _start(c, env)
        if not args.no_view and sys.stdout.isatty():
            view = _start_view(args, bootstrap, broker, children, notes)
        if view is None:
            if notes:
                print("\n".join(notes), file=sys.stderr, flush=True)
            _banner(bootstrap, broker is not None, children)
        by_name = {c.name: c for c in children}
        deadline = time.monotonic() + args.run_for_s if args.run_for_s > 0 else None
        while not stopping["flag"]:
            for c in children:
                if c.proc is None:
                    if by_name[c.after].state() == "done":
                        _start(c, env)
                    continue
                code = c.proc.poll()
                if code is None or c.oneshot and code == 0:
                    continue
                failed, rc = c, 1
                break
            if failed or deadline and time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    finally:
        if view is not None:
            view.stop()
        if failed is not None:
            print(f"osad up: {failed.name} exited with code {failed.proc.returncode}; last lines of {failed.log}:",
                  file=sys.stderr)
            print(_tail(failed.log), file=sys.stderr)
        print("osad up: stopping services ...", file=sys.stderr)
        _stop_all([c for c in reversed(children) if c.proc], args.stop_timeout_s)
        if broker:
            broker.stop()
        print("osad up: stopped", file=sys.stderr)
    return rc


def _start(c: Child, env: dict) -> None:
    c.proc = start_logged(c.cmd, c.log, env)


def _start_view(args, bootstrap: str, broker, children: list[Child], notes: list[str]):
    """The live view, or None (saying why) when it cannot start: the pipeline runs on without it."""
    try:
        from osad.live import LiveView, Watched

        watched = []
        if broker is not None:
            watched.append(Watched("broker", lambda: broker.proc.pid if broker.proc else None,
                                   lambda: "up" if broker.proc and broker.proc.poll() is None else "down"))
        for c in children:
            watched.append(Watched(c.name, lambda c=c: c.proc.pid if c.proc else None, c.state, c.port, c.log))
        return LiveView(bootstrap, watched, title="osad up" + (" --demo" if args.demo else ""), notes=notes,
                        window_s=args.view_window_s, rows=args.view_rows).start()
    except Exception as e:  # noqa: BLE001 - the view is a convenience; the services matter
        print(f"osad up: no live view ({type(e).__name__}: {e}); the services run on", file=sys.stderr)
        return None


def _stop_all(children: list[Child], timeout_s: float) -> None:
    names = {id(c.proc): c.name for c in children}

    def killing(p) -> None:
        print(f"osad up: {names[id(p)]} did not stop within {timeout_s:.0f} s; killing it", file=sys.stderr)

    stop_all([c.proc for c in children], timeout_s, on_kill=killing)


def _banner(bootstrap: str, embedded: bool, children: list[Child]) -> None:
    from osad.schemas import ANOMALIES, DEADLETTER, SAMPLES

    lines = [f"osad is up. Kafka: {bootstrap}" + (" (embedded broker, memory only)" if embedded else "")]
    for c in children:
        where = f"http://127.0.0.1:{c.port}/metrics  /healthz" if c.port else "(one-shot)"
        pid = c.proc.pid if c.proc else f"- (starts after {c.after})"
        lines.append(f"  {c.name:<12} pid {pid:<7} {where:<42} log {c.log}")
    lines.append(f"  samples: {SAMPLES.full_name()}   anomalies: {ANOMALIES.full_name()}   "
                 f"dead letters: {DEADLETTER.full_name()}")
    lines.append("Ctrl-C stops everything.")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
