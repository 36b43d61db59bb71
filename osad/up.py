"""``osad up``: the whole pipeline on this machine, each service its own OS process.

Starts the embedded broker (unless ``--bootstrap`` names a running Kafka), creates the topics,
then every service this installation has (collector, featurizer, detector, alerter), each with
its metrics/health endpoint on its own port and its log in ``--log-dir`` (each run's own: the
previous run's ``NAME.log`` becomes ``NAME.log.1``). Ctrl-C (or SIGTERM, SIGHUP) stops them all
cleanly: SIGTERM first (each finishes its batch and commits), SIGKILL only after ``--stop-timeout-s``.

Supervision: no child outlives ``osad up``, however it dies (SIGKILL too): each child gets SIGTERM from
the kernel when it dies (Linux's parent-death signal) and a watcher process, the lifeline, stops (then
kills) whatever it left running (runtime/procs.py). Output that goes away (``| tee`` ended by the same
Ctrl-C) is ignored, never a reason to leave the children. A service that exits by itself is reported
(on stderr, in the live view, in its log) and restarted after a wait that doubles with each quick crash
in a row (``--restart-backoff-s`` .. ``--restart-backoff-max-s``; a service that ran
``--restart-stable-s`` starts afresh); after ``--restart-limit`` quick crashes in a row, or an exit with
code 2 (its configuration is wrong: a restart cannot help), ``osad up`` gives up, saying so, and stops.

On a terminal it shows a live view (refreshed every second, osad/live.py): each service's pid,
state, health and throughput (from its /metrics and /healthz), the entities seen in the last
``--view-window-s`` seconds with their latest sample and score, the anomalies (as ``osad tail``
shows them) and the last lines of any service log that reports an error. ``--no-view``, or output
that is not a terminal, prints a banner instead and leaves the services to their logs.

``--demo`` replays one SMD entity with labelled anomalies instead of watching this machine (the
collector is not started; the data: the slice of SMD in the repository, tests/data/datasets/SMD,
unless ``--demo-dataset DIR``): its last normal train rows as fast as possible, so that the
featurizer (scaling with the train ranges), the detector and the alerter calibrate within seconds
(the demo lowers their calibration counts), then its test rows at ``--demo-rate`` rows per second
from a little before the first labelled anomaly. The first incident appears within about a minute.
The demo keeps its state in STATE/demo (the train ranges, the alerter's store), afresh each time.
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

from osad.cli import available_commands
from osad.core.metrics import segments as label_segments  # the labelled runs the demo replays
from osad.pipeline import COLLECTOR, METRICS_PORT, PIPELINE, Service, command_line, connection, metrics_ports
from osad.pipeline import names as service_names
from osad.pipeline import osad as _osad
from osad.runtime.config import Config, ConfigError, KafkaSecurity, non_negative, positive, section, setting
from osad.runtime.cli import STORAGE_HELP
from osad.runtime.procs import Lifeline, exit_text, start_logged, stop_all
from osad.schemas import ANOMALIES, DEADLETTER, SAMPLES

# --demo: which data, and how the services calibrate on it (their own options, lowered so that the
# first incident comes within about a minute; see plan_demo)
# the demo's data: the slice of SMD in the repository (tests/data/datasets/SMD, see its README.md), found beside the
# package's source folder (osad is installed editable from the repository, as ./dev does); an install without
# the repository must name a folder with --demo-dataset
DEMO_DATASET_IN_REPO = Path("tests") / "data" / "datasets" / "SMD"
DEMO_ENTITY = "machine-1-6"
DEMO_CS_CALIBRATE = 20  # detector --cs-calibrate (30): windows its per-entity compressed sensing is fitted on
DEMO_CALIBRATION_SCORES = 40  # alerter --calibration-scores (100): scores its POT threshold is fitted on
# alerter --open-after (2): SMD's labelled anomalies mostly last 4 to 10 rows, so they fall into one window of
# gap 10 rows; two consecutive windows over threshold, the service's default, would wait for a long one
DEMO_OPEN_AFTER = 1
DEMO_MARGIN_WINDOWS = 5  # train windows beyond calibration, so that no test window falls into the alerter's
DEMO_LEAD_ROWS = 30  # test rows windowed before the first labelled anomaly
# when osad up dies, its embedded broker dies with it (memory only): nothing is left for the services to commit to,
# so the lifeline kills what is still running after this grace (an external --bootstrap: after --stop-timeout-s)
ORPHAN_GRACE_S = 3.0
#: a service's exit code that means its options are wrong (runtime/cli.py, argparse): restarting cannot help
CONFIG_ERROR = 2
DEMO_STARTUP_S = 15.0  # measured: start of `osad up --demo` to the first test row scored (see README)
# what each service's declared arguments get in demo mode ({demo} is the demo's state folder): these
# --flag value pairs replace (or are added to) its own
DEMO_ARGS = {
    "featurizer": ["--ranges", "{demo}/ranges.json"],
    "detector": ["--cs-calibrate", str(DEMO_CS_CALIBRATE), "--max-batch", str(DEMO_CS_CALIBRATE)],
    "alerter": ["--store", "sqlite:///{demo}/anomalies.db", "--calibration-scores", str(DEMO_CALIBRATION_SCORES),
                "--open-after", str(DEMO_OPEN_AFTER)],
}


def _service_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


@dataclass(frozen=True)
class UpConfig(Config):
    """run the whole pipeline locally (embedded broker + every service)"""

    bootstrap: str = setting("", help="use this Kafka instead of starting the embedded broker")
    topic_prefix: str = setting("", help="prefix for every topic name and consumer group (several installations "
                                "on one cluster); every service is given it")
    broker_port: int = setting(9092, help="port of the embedded broker", check=positive)
    broker_storage: str = setting("memory://tansu/", env="OSAD_BROKER_STORAGE", metavar="URL", help=STORAGE_HELP)
    metrics_base_port: int = setting(METRICS_PORT, check=positive,
                                     help="services serve /metrics and /healthz on consecutive ports from here")
    log_dir: str = setting("var/up", help="folder for each service's log")
    state_dir: str = setting("var", help="folder for the services' state (learned scaling ranges, ...)")
    only: list[str] | None = setting(None, parse=_service_list,
                                     help="comma-separated services to start (default: every one available)")
    replay: str | None = setting(None, help="also replay this benchmark data set folder (e.g. "
                                 "tests/data/datasets/SMD, or the full ../shared/datasets/SMD) into the pipeline")
    replay_args: str = setting("--rate 20", help="extra arguments for the replay (see osad replay --help)")
    collect_args: str = setting(" ".join(COLLECTOR.args),
                                help="arguments for the collector (see osad collect --help)")
    stop_timeout_s: float = setting(20.0, help="grace period before SIGKILL", check=positive)
    run_for_s: float = setting(0.0, check=non_negative, help="stop by itself after this many seconds (0: until Ctrl-C)")
    view: bool = setting(True, flag="--no-view", negate=True, group="live view",
                         help="no live view: print a banner and leave the services to their logs (also when the "
                         "output is not a terminal)")
    view_window_s: float = setting(30.0, check=positive, group="live view",
                                   help="the view lists the entities that sent a sample within this many seconds")
    view_rows: int = setting(12, check=positive, group="live view", help="most entities and anomalies the view lists")
    restart_limit: int = setting(5, check=non_negative, group="supervision",
                                 help="a service that exits by itself is restarted, at most this many times in a row "
                                 "(each after it ran less than --restart-stable-s); then osad up gives up and stops "
                                 "(0: never restart, stop at the first exit)")
    restart_backoff_s: float = setting(1.0, check=positive, group="supervision",
                                       help="wait before restarting a service; doubled after each quick crash in a row")
    restart_backoff_max_s: float = setting(30.0, check=positive, group="supervision",
                                           help="the longest wait before restarting a service")
    restart_stable_s: float = setting(60.0, check=positive, group="supervision",
                                      help="a service that ran this long before exiting counts as stable: its "
                                      "crashes in a row and its wait start afresh")
    demo: bool = setting(False, group="demo", help="replay an SMD entity with labelled anomalies (no collector) so "
                         "that detections appear within about a minute")
    demo_dataset: str = setting("", group="demo", help="SMD data set folder (train/, test/, test_label/); default: "
                                f"the slice in the repository, {DEMO_DATASET_IN_REPO}")
    demo_entity: str = setting(DEMO_ENTITY, group="demo", help="entity (machine) of the data set to replay")
    demo_rate: float = setting(20.0, check=positive, group="demo", help="test rows per second (the train rows go "
                               "as fast as possible); SMD has one row a minute")
    security: KafkaSecurity = section(KafkaSecurity)  # TLS / SASL of a secured --bootstrap, passed to every child

    def validate(self) -> str | None:
        if not self.bootstrap and self.security.security_protocol != "PLAINTEXT":
            return (f"--security-protocol {self.security.security_protocol} is for a secured --bootstrap; the "
                    "embedded broker speaks plaintext (docs/security.md)")
        known = service_names()
        bad = [n for n in self.only or [] if n not in known]
        if bad:
            return f"--only: no service {', '.join(bad)}; choose from {', '.join(known)}"
        if self.demo and self.replay:
            return ("--demo replays its own data set; leave out --replay (or choose the demo's data with "
                    "--demo-dataset DIR --demo-entity NAME)")
        return None


def register(sub) -> None:
    UpConfig.add_command(sub, "up", lambda args: run(UpConfig.from_args(args)), description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)


@dataclass
class Child:
    name: str
    cmd: list[str]
    log: Path
    port: int | None
    proc: subprocess.Popen | None = None
    oneshot: bool = False
    after: str | None = None  # start once this one-shot child has finished well
    # supervision (services only; a one-shot that fails ends the run)
    started: float = 0.0  # time.monotonic() of its last start
    restarts: int = 0  # restarts in this run
    crashes: int = 0  # exits in a row, each within --restart-stable-s of its start
    restart_at: float | None = None  # time.monotonic() when it is started again (it has exited)
    gave_up: bool = False
    reaped: bool = False  # a one-shot that finished, forgotten by the lifeline

    def state(self) -> str:
        if self.proc is None:
            return "waiting"
        code = self.proc.poll()
        if code is None:
            return f"up (restarted {self.restarts}x)" if self.restarts else "up"
        if self.gave_up:
            return f"failed: {exit_text(code)}"
        if self.restart_at is not None:
            return f"{exit_text(code)}; restart in {max(0.0, self.restart_at - time.monotonic()):.0f}s"
        return "done" if code == 0 and self.oneshot else f"exited {code}"


def backoff_s(crashes: int, first_s: float, max_s: float) -> float:
    """The wait before restarting a service after its ``crashes``-th quick exit in a row (1, 2, ...).

    >>> [backoff_s(n, 1.0, 10.0) for n in (1, 2, 3, 4, 5)]
    [1.0, 2.0, 4.0, 8.0, 10.0]
    """
    return min(max_s, first_s * 2.0 ** max(0, min(crashes - 1, 60)))


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


def demo_dataset(package_dir: Path = Path(__file__).resolve().parent) -> Path:
    """The default --demo-dataset: the repository's slice of SMD, beside the package's source folder
    (``osad/``); a clear error where this installation has no repository around it."""
    folder = package_dir.parent / DEMO_DATASET_IN_REPO
    if not (folder / "train").is_dir():
        raise ConfigError(f"--demo: no demo data beside this installation of osad ({folder} does not exist: the "
                          f"demo's slice of SMD, {DEMO_DATASET_IN_REPO}, is in the repository, not in the package); "
                          "give an SMD folder (train/, test/, test_label/) with --demo-dataset DIR (env "
                          f"OSAD_DEMO_DATASET), e.g. {DEMO_DATASET_IN_REPO} of a clone of osad or the full SMD "
                          "(github.com/NetManAIOps/OmniAnomaly)")
    return folder


def load_demo(cfg: UpConfig) -> DemoPlan:
    """Read the demo entity (clear errors naming --demo-dataset / --demo-entity), plan its replay and
    write its train ranges for the featurizer, as ``osad replay --write-ranges`` does."""
    from osad.collector.replay import ReplayPlan, train_ranges
    from osad.core.datasets import DatasetError, list_entities, load_entity
    from osad.core.signature import write_ranges_file

    folder = Path(cfg.demo_dataset) if cfg.demo_dataset else demo_dataset()
    if not folder.is_dir():
        raise ConfigError(f"--demo-dataset {folder}: no such folder; give the SMD data set folder (train/, test/, "
                          f"test_label/) with --demo-dataset DIR (env OSAD_DEMO_DATASET), e.g. {DEMO_DATASET_IN_REPO} "
                          "of a clone of osad")
    try:
        names = list_entities(folder)
        if cfg.demo_entity not in names:
            raise ConfigError(f"--demo-entity {cfg.demo_entity}: not in {folder}; choose one of {', '.join(names)}")
        e = load_entity(folder, cfg.demo_entity)
    except DatasetError as err:
        raise ConfigError(f"--demo-dataset {folder}: {err}") from None
    if e.test is None or e.test_label is None:
        raise ConfigError(f"--demo-dataset {folder}: no test/ and test_label/ file for {cfg.demo_entity}; the demo "
                          "needs labelled test rows to start shortly before an anomaly")
    demo = plan_demo(str(folder), cfg.demo_entity, e.train.shape[0], e.test_label, cfg.demo_rate, e.entity_id)
    d = Path(cfg.state_dir) / "demo"
    d.mkdir(parents=True, exist_ok=True)
    write_ranges_file(d / "ranges.json", train_ranges(ReplayPlan([e], "test", None)))
    # the broker starts empty, so does the demo: an alerter state of an earlier demo would take the same
    # windows for duplicates
    for f in d.glob("anomalies.db*"):
        f.unlink()
    return demo


def demo_children(demo: DemoPlan, bootstrap: str, prefix: str, log_dir: Path, security=None) -> list[Child]:
    base = ("replay", demo.dataset, *connection(bootstrap, prefix, security), "--entity", demo.entity)
    return [
        Child("replay-train", _osad(*base, "--split", "train", "--skip", str(demo.train_skip), "--rate", "0"),
              log_dir / "replay-train.log", None, oneshot=True),
        Child("replay-test", _osad(*base, "--split", "test", "--skip", str(demo.test_skip), "--rate",
                                   f"{demo.rate:g}"),
              log_dir / "replay-test.log", None, oneshot=True, after="replay-train"),
    ]


# -- plan and run ----------------------------------------------------------------------------------

def services(cfg: UpConfig, have: set[str], demo: bool = False) -> list[Service]:
    """The declared services this run starts, in start order: those whose command this installation has,
    named by --only (if given); in demo mode no source (the replay is the only one)."""
    return [s for s in PIPELINE if s.command in have and (not cfg.only or s.name in cfg.only)
            and not (demo and s.is_source)]


def plan(cfg: UpConfig, bootstrap: str, have: set[str], demo: DemoPlan | None = None) -> list[Child]:
    """Every child process of this run: the services (from the declaration), then the one-shot replays."""
    log_dir = Path(cfg.log_dir)
    chosen = services(cfg, have, demo is not None)
    ports = metrics_ports(chosen, cfg.metrics_base_port)
    children = []
    for s in chosen:
        args = shlex.split(cfg.collect_args) if s is COLLECTOR else None
        overrides = [a.format(demo=f"{cfg.state_dir}/demo") for a in DEMO_ARGS.get(s.name, [])] if demo else []
        cmd = command_line(s, state=cfg.state_dir, bootstrap=bootstrap, prefix=cfg.topic_prefix,
                           metrics_port=ports[s.name], args=args, overrides=overrides, security=cfg.security)
        children.append(Child(s.name, cmd, log_dir / f"{s.name}.log", ports[s.name]))
    if cfg.replay:
        children.append(Child("replay", _osad("replay", cfg.replay, *connection(bootstrap, cfg.topic_prefix, cfg.security),
                                              *shlex.split(cfg.replay_args)),
                              log_dir / "replay.log", None, oneshot=True))
    if demo:
        children += demo_children(demo, bootstrap, cfg.topic_prefix, log_dir, cfg.security)
    return children


def run(cfg: UpConfig) -> int:
    from osad.runtime.broker import BrokerError, BrokerKeeper, EmbeddedBroker
    from osad.runtime.kafka import ensure_topics

    have = available_commands()
    demo = load_demo(cfg) if cfg.demo else None
    log_dir = Path(cfg.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    stopping = {"flag": False}

    def _stop(*_):
        stopping["flag"] = True

    # from here on a signal only asks the loop to stop; nothing is started before the handlers are in place
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python's default: a write to a closed pipe raises EPIPE (_say)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **cfg.security.secret_env())  # passwords: not on command lines
    rc = 0
    view = None
    broker = None
    keeper = None
    children: list[Child] = []
    failed: Child | None = None
    events: list[str] = []
    # every child is told to the lifeline: it stops them should this process die without doing so itself
    lifeline = Lifeline(grace_s=cfg.stop_timeout_s if cfg.bootstrap else min(cfg.stop_timeout_s, ORPHAN_GRACE_S),
                        label="osad up (lifeline)")
    try:
        bootstrap = cfg.bootstrap
        if not bootstrap:
            _rotate([log_dir / "broker.log"])
            try:
                broker = EmbeddedBroker(port=cfg.broker_port, log_file=str(log_dir / "broker.log"),
                                        storage=cfg.broker_storage).start()
            except BrokerError as e:
                _say(f"osad up: {e}")
                return 1
            lifeline.watch(broker.proc.pid, "broker")
            bootstrap = broker.bootstrap
            keeper = BrokerKeeper(
                broker, lambda: ensure_topics(bootstrap, prefix=cfg.topic_prefix, security=cfg.security),
                say=lambda m: _note(f"osad up: {m}", events), on_restart=lambda pid: lifeline.watch(pid, "broker"))
        ensure_topics(bootstrap, prefix=cfg.topic_prefix, security=cfg.security)
        children = plan(cfg, bootstrap, have, demo)
        _rotate([c.log for c in children])
        notes = demo.describe(cfg.state_dir) if demo else []
        for c in children:
            if not c.after and not stopping["flag"]:
                _start(c, env, lifeline)
        if cfg.view and sys.stdout.isatty() and not stopping["flag"]:
            view = _start_view(cfg, bootstrap, broker, children, notes, events)
        if view is None:
            if notes:
                _say("\n".join(notes))
            _banner(bootstrap, cfg.topic_prefix, broker and (f"storage {broker.storage}" if broker.durable
                                                             else "memory only"), children)
        by_name = {c.name: c for c in children}
        deadline = time.monotonic() + cfg.run_for_s if cfg.run_for_s > 0 else None
        while not stopping["flag"]:
            if keeper is not None and not keeper.check():
                rc = 1
                break
            for c in children:
                if c.proc is None:
                    if by_name[c.after].state() == "done":
                        _start(c, env, lifeline)
                    continue
                if not _supervise(c, cfg, env, lifeline, events):
                    failed, rc = c, 1
                    break
            if failed or deadline and time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    finally:
        # each step on its own: a failing one (the terminal gone, say) must not leave the children running
        try:
            if view is not None:
                view.stop()
            if failed is not None:
                _say(f"osad up: {failed.name} {exit_text(failed.proc.returncode)}; last lines of {failed.log}:\n"
                     + _tail(failed.log))
            if broker or any(c.proc for c in children):
                _say("osad up: stopping services ...")
        finally:
            try:
                _stop_all([c for c in reversed(children) if c.proc], cfg.stop_timeout_s)
                for c in children:
                    if c.proc:
                        lifeline.forget(c.proc.pid)
            finally:
                try:
                    if broker:
                        pid = broker.proc.pid if broker.proc else None
                        broker.stop()
                        if pid:
                            lifeline.forget(pid)
                finally:
                    lifeline.close()
                    if broker or any(c.proc for c in children):
                        _say("osad up: stopped")
                    _flush_quietly()
    return rc


def _supervise(c: Child, cfg: UpConfig, env: dict, lifeline: Lifeline, events: list[str]) -> bool:
    """One look at a started child: restart a service that has exited, when due. False: the run must end
    (a one-shot failed, or a service is given up on)."""
    now = time.monotonic()
    if c.restart_at is not None:
        if now >= c.restart_at:
            c.restart_at = None
            c.restarts += 1
            _start(c, env, lifeline)
            _report(c, f"osad up: {c.name} restarted (pid {c.proc.pid}, restart {c.restarts} in this run)", events)
        return True
    code = c.proc.poll()
    if code is None:
        return True
    if c.oneshot:
        if code == 0 and not c.reaped:
            c.reaped = True  # nothing left for the lifeline to stop
            lifeline.forget(c.proc.pid)
        return code == 0
    lifeline.forget(c.proc.pid)
    ran = now - c.started
    c.crashes = 1 if ran >= cfg.restart_stable_s else c.crashes + 1
    how = f"osad up: {c.name} (pid {c.proc.pid}) {exit_text(code)} after {ran:.0f} s"
    if cfg.restart_limit == 0:
        return False
    if code == CONFIG_ERROR:
        c.gave_up = True
        _report(c, f"{how}: a configuration error; restarting cannot help, giving up", events)
        return False
    if c.crashes > cfg.restart_limit:
        c.gave_up = True
        _report(c, f"{how}: {c.crashes} exits in a row, each within {cfg.restart_stable_s:g} s of its start "
                   f"(--restart-limit {cfg.restart_limit}); giving up", events)
        return False
    wait = backoff_s(c.crashes, cfg.restart_backoff_s, cfg.restart_backoff_max_s)
    c.restart_at = now + wait
    _report(c, f"{how}; restarting it in {wait:g} s (exit {c.crashes} in a row; at most {cfg.restart_limit})", events)
    return True


def _note(msg: str, events: list[str]) -> None:
    """Say it on stderr and in the live view (its list of events)."""
    _say(msg)
    events.append(f"{time.strftime('%H:%M:%S')} {msg.removeprefix('osad up: ')}")
    del events[:-20]


def _report(c: Child, msg: str, events: list[str]) -> None:
    """Say it on stderr, in the live view (its list of events) and in the service's own log."""
    _note(msg, events)
    try:
        with open(c.log, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
    except OSError:
        pass


def _start(c: Child, env: dict, lifeline: Lifeline) -> None:
    # always from the main thread: the parent-death signal fires when the thread that forked the child ends
    c.proc = start_logged(c.cmd, c.log, env)
    c.started = time.monotonic()
    lifeline.watch(c.proc.pid, c.name)


def _rotate(logs: list[Path]) -> None:
    """Each run's logs are its own: the previous run's NAME.log becomes NAME.log.1 (the one before is dropped)."""
    for log in logs:
        try:
            if log.exists():
                os.replace(log, log.with_name(log.name + ".1"))
        except OSError as e:
            _say(f"osad up: cannot move the previous {log} aside ({e}); its lines stay in the log")


def _say(msg: str) -> None:
    """A line on stderr; output nobody reads any more (EPIPE: a closed ``| tee``; EIO: a closed terminal) is
    dropped from then on, never a reason to stop short of stopping the children."""
    try:
        print(msg, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        _silence(sys.stderr)


def _silence(stream) -> None:
    """Point ``stream``'s descriptor at /dev/null, so that what is still buffered and later writes go nowhere
    instead of failing (also at exit, where Python would report the broken pipe and exit with 120)."""
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except (OSError, ValueError):
        pass


def _flush_quietly() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            _silence(stream)
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def _start_view(cfg: UpConfig, bootstrap: str, broker, children: list[Child], notes: list[str], events: list[str]):
    """The live view, or None (saying why) when it cannot start: the pipeline runs on without it."""
    try:
        from osad.live import LiveView, Watched

        watched = []
        if broker is not None:
            watched.append(Watched("broker", lambda: broker.proc.pid if broker.proc else None,
                                   lambda: "up" if broker.proc and broker.proc.poll() is None else "down"))
        for c in children:
            watched.append(Watched(c.name, lambda c=c: c.proc.pid if c.proc else None, c.state, c.port, c.log))
        return LiveView(bootstrap, watched, title="osad up" + (" --demo" if cfg.demo else ""), notes=notes,
                        window_s=cfg.view_window_s, rows=cfg.view_rows, prefix=cfg.topic_prefix,
                        events=lambda: list(events), security=cfg.security).start()
    except Exception as e:  # noqa: BLE001 - the view is a convenience; the services matter
        _say(f"osad up: no live view ({type(e).__name__}: {e}); the services run on")
        return None


def _stop_all(children: list[Child], timeout_s: float) -> None:
    names = {id(c.proc): c.name for c in children}

    def killing(p) -> None:
        _say(f"osad up: {names[id(p)]} did not stop within {timeout_s:.0f} s; killing it")

    stop_all([c.proc for c in children], timeout_s, on_kill=killing)


def _banner(bootstrap: str, prefix: str, embedded: bool, children: list[Child]) -> None:
    lines = [f"osad is up. Kafka: {bootstrap}" + (f" (embedded broker, {embedded})" if embedded else "")]
    for c in children:
        where = f"http://127.0.0.1:{c.port}/metrics  /healthz" if c.port else "(one-shot)"
        pid = c.proc.pid if c.proc else f"- (starts after {c.after})"
        lines.append(f"  {c.name:<12} pid {pid:<7} {where:<42} log {c.log}")
    lines.append(f"  samples: {SAMPLES.full_name(prefix)}   anomalies: {ANOMALIES.full_name(prefix)}   "
                 f"dead letters: {DEADLETTER.full_name(prefix)}")
    lines.append("Ctrl-C stops everything.")
    _say("\n".join(lines))


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
