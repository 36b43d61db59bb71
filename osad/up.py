"""``osad up``: the whole pipeline on this machine, each service its own OS process.

Starts the embedded broker (unless ``--bootstrap`` names a running Kafka), creates the topics,
then every service this installation has (collector, featurizer, detector, alerter), each with
its metrics/health endpoint on its own port and its log in ``--log-dir``. Ctrl-C (or SIGTERM)
stops them all cleanly: SIGTERM first (each finishes its batch and commits), SIGKILL only after
``--stop-timeout-s``.
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

from runtime.config import option, positive

# (service name, osad subcommand, extra arguments; {state} is --state-dir); started in this order,
# stopped in reverse.
PIPELINE = (
    ("featurizer", "featurizer", ["--state-dir", "{state}/featurizer"]),
    ("detector", "detect", ["--models", "{state}/models"]),
    ("alerter", "alert", ["--store", "sqlite:///{state}/alerter/anomalies.db"]),
    ("collector", "collect", ["--all"]),
)


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
    option(p, "--run-for-s", type=float, default=0.0, help="stop by itself after this many seconds (0: until Ctrl-C)")
    p.set_defaults(func=run)


@dataclass
class Child:
    name: str
    cmd: list[str]
    log: Path
    port: int | None
    proc: subprocess.Popen | None = None
    oneshot: bool = False


def available_commands() -> set[str]:
    from osad.cli import build_parser

    p = build_parser()
    for a in p._actions:  # the subcommand table
        if isinstance(a, argparse._SubParsersAction):
            return set(a.choices)
    return set()


def _osad(*args: str) -> list[str]:
    return [sys.executable, "-m", "osad", *args]


def plan(args, bootstrap: str, have: set[str]) -> list[Child]:
    log_dir = Path(args.log_dir)
    children = []
    port = args.metrics_base_port
    for name, cmd, extra in PIPELINE:
        if cmd not in have or (args.only and name not in args.only):
            continue
        extra = [a.format(state=args.state_dir) for a in extra]
        if name == "collector":
            extra = shlex.split(args.collect_args)
        children.append(Child(name, _osad(cmd, "--bootstrap", bootstrap, "--metrics-port", str(port), *extra),
                              log_dir / f"{name}.log", port))
        port += 1
    if args.replay:
        children.append(Child("replay", _osad("replay", args.replay, "--bootstrap", bootstrap,
                                              *shlex.split(args.replay_args)),
                              log_dir / "replay.log", None, oneshot=True))
    return children


def run(args) -> int:
    from runtime.broker import BrokerError, EmbeddedBroker
    from runtime.kafka import ensure_topics

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
    children = plan(args, bootstrap, available_commands())
    stopping = {"flag": False}

    def _stop(*_):
        stopping["flag"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rc = 0
    try:
        for c in children:
            c.proc = subprocess.Popen(c.cmd, stdout=open(c.log, "ab"), stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        _banner(bootstrap, broker is not None, children)
        deadline = time.monotonic() + args.run_for_s if args.run_for_s > 0 else None
        while not stopping["flag"]:
            for c in children:
                code = c.proc.poll()
                if code is None or c.oneshot and code == 0:
                    continue
                print(f"osad up: {c.name} exited with code {code}; last lines of {c.log}:", file=sys.stderr)
                print(_tail(c.log), file=sys.stderr)
                stopping["flag"] = True
                rc = 1
                break
            if deadline and time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    finally:
        print("osad up: stopping services ...", file=sys.stderr)
        _stop_all([c for c in reversed(children) if c.proc], args.stop_timeout_s)
        if broker:
            broker.stop()
        print("osad up: stopped", file=sys.stderr)
    return rc


def _stop_all(children: list[Child], timeout_s: float) -> None:
    for c in children:
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for c in children:
        try:
            c.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"osad up: {c.name} did not stop within {timeout_s:.0f} s; killing it", file=sys.stderr)
            c.proc.kill()
            c.proc.wait()


def _banner(bootstrap: str, embedded: bool, children: list[Child]) -> None:
    from schemas import ANOMALIES, DEADLETTER, SAMPLES

    lines = [f"osad is up. Kafka: {bootstrap}" + (" (embedded broker, memory only)" if embedded else "")]
    for c in children:
        where = f"http://127.0.0.1:{c.port}/metrics  /healthz" if c.port else "(one-shot)"
        lines.append(f"  {c.name:<11} pid {c.proc.pid:<7} {where:<42} log {c.log}")
    lines.append(f"  samples: {SAMPLES.full_name()}   anomalies: {ANOMALIES.full_name()}   "
                 f"dead letters: {DEADLETTER.full_name()}")
    lines.append("Ctrl-C stops everything.")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
