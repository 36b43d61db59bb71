"""The whole pipeline end to end on the embedded broker: detection latency and sustained throughput.

    .venv/bin/python bench/pipeline.py [--rounds 3] [--json PATH] [--quick] [--phases latency,throughput]

Every round starts the embedded broker and, as ``osad up`` does, the pipeline's transforms as
osad/pipeline.py declares them: the featurizer, the detector (compressed sensing, no MSCRED
checkpoint) and the alerter (a temporary SQLite store), as their own processes, on topics with a
prefix of their own (given to each with --topic-prefix). This script plays the collector: synthetic
processes with 38 metrics (the collector's 22 and 16 uprobe metrics), one Sample per process per
``--interval``, published with the collector's producer settings and flushed every interval.

Calibrations are shortened (the same in every phase): featurizer ``--calibration-samples 100``,
detector ``--cs-calibrate 10`` windows, alerter ``--calibration-scores 30``; everything else is
the services' defaults.

* **Latency.** ``--entities`` processes first send their normal history (in waves, faster than
  live, until every calibration is done and the pipeline is idle), then live: one Sample per process
  per interval, time stamped with the wall clock. After a normal stretch the processes get a fault
  in turn, one every ``--stagger`` intervals: a step (x ``--fault-factor``) on 4 of the process's
  metrics for ``--fault-len`` Samples (with ``--cycles`` > 1 a process's next fault comes after 100
  normal Samples at least: its incident has to close first). Each fault's incident is matched by
  entity and ``first_window_seq``; the window whose Score opened it is the ``open`` Anomaly's
  ``last_ts`` (checked against ``first_window_seq + (open_after - 1) * gap``). Latency *after the
  window completes* = the Anomaly record's timestamp (CreateTime: the alerter's producer) minus the
  time this script published the Sample that completed that window; *after the fault* = minus the
  time it published the fault's first Sample. Both clocks are this host's. Per stage (the record
  timestamps of that window's SignatureWindow and Score): featurizer, detector, alerter; the first
  two also over every live window. Open Anomalies that match no fault are false positives.
* **Latency baseline: the bare transport, same hops.** Three identity transforms run by the
  services' own runner (``runtime.service.ServiceRunner``: same consumer and producer settings,
  same poll loop; here threads of this process) relay Samples through four topics, as the pipeline
  takes a Sample to an Anomaly through four topics; the same message pattern (``--entities``
  messages every interval). Its p50/p99 from publication to the last record's timestamp is the
  floor that Kafka and the runner set; the ratio says what the services' work and waits add.
* **Throughput.** ``--tp-entities`` other processes send their history (until the detector has
  calibrated every one), then Samples round-robin at an offered rate R Samples/s for
  ``--step-s`` seconds. The pipeline **holds** R when (1) every window completed in the second half
  of the step was scored within ``--delay-bound`` s of the publication of the Sample that completed
  it (Score record timestamp), (2) that delay does not grow: median over the last quarter of the
  step <= median over the second quarter + 1 s, and (3) within ``--delay-bound`` s after the step the
  alerter has consumed every Score published during it (its ``osad_messages_in_total``). R starts
  at ``--rate0`` and grows by ``--rate-factor`` while held, then bisects (geometric mean) between
  the highest held and the lowest failed rate until they are within 15% (or ``--max-steps``); the
  pipeline drains between steps. Reported: the highest held rate; per step also the services' CPU.
* **Throughput baseline: the same work in one process, no Kafka.** The services' own transforms
  (``Featurizer``, ``Detector``, the alerter's ``Engine``) chained in this process on the same
  kind of Samples (decoded from the same JSON), calibrated the same way, objects between the
  stages: *as live* (one Sample per process per call and the detector's queue scored after each:
  one window per model call, as in the pipeline below saturation) and *batched* (500 Samples per
  call, a backlog's polls). Ratio = pipeline sustained / in-process Samples/s (the pipeline spreads
  its stages over processes and both cores, and shares them with the broker and this script).

Medians over rounds are printed; latency percentiles are also given over the faults of all rounds
together. Progress goes to stderr; each round's logs go to a temporary folder (kept with --keep or
when a round fails; a failed round is reported and the others still run). Ctrl-C or SIGTERM stops
the services (SIGTERM, then SIGKILL) and the broker.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # not bench/: its file names would shadow the packages

import numpy as np  # noqa: E402

from bench._common import health, http_text, metric, osad_process, stop_processes, wait_for  # noqa: E402
from osad.pipeline import ALERTER, DETECTOR, FEATURIZER, TRANSFORMS, service_args  # noqa: E402
from osad.schemas import SAMPLES  # noqa: E402

GAP = 10  # the featurizer's default gap: a window every 10 samples, ending where (seq + 1) % 10 == 0
SPAN = 100  # samples before an entity's first window: max(scales) + (step - 1) * gap = 60 + 40
OPEN_AFTER = 2  # the alerter's default --open-after
WAVE = 3  # windows per process in one wave of history (see warm_up)
RELAY_WARM = 3  # first intervals of the transport baseline not counted (connections, metadata)
RECOVERY = 100  # samples of normal behaviour a process gets between two of its faults (--cycles > 1), at least


def features() -> list[str]:
    from osad.collector.metrics import METRICS

    probes = ("handle_request", "parse", "query", "send_reply", "cache_get", "gc")
    names = [m.name for m in METRICS]
    names += [f"uprobe_{p}_{s}" for p in probes for s in ("calls", "time_ns", "latency_mean_ns")]
    return names[:38]


class Synth:
    """Normal behaviour of synthetic processes: per metric a level, a slow wave and noise."""

    def __init__(self, n: int, n_features: int, seed: int):
        self.rng = np.random.default_rng(seed)
        shape = (n, n_features)
        self.level = 10.0 ** self.rng.uniform(2, 8, shape)
        self.amp = self.rng.uniform(0.02, 0.15, shape)
        self.period = self.rng.uniform(60, 600, shape)
        self.phase = self.rng.uniform(0, 2 * math.pi, shape)

    def rows(self, ks: np.ndarray, seqs: np.ndarray, factor: np.ndarray | None = None) -> np.ndarray:
        """Rows [len(ks), F] of processes ``ks`` at samples ``seqs`` (times ``factor`` where given)."""
        wave = self.amp[ks] * np.sin(2 * math.pi * seqs[:, None] / self.period[ks] + self.phase[ks])
        x = self.level[ks] * (1.0 + wave + 0.03 * self.rng.standard_normal((len(ks), self.level.shape[1])))
        return x if factor is None else x * factor


@dataclass
class Feed:
    """Synthetic processes publishing Samples (this script's stand-in for the collector)."""

    prefix: str  # entity ids are PREFIX000, PREFIX001, ...
    n: int
    names: list[str]
    interval_s: float
    seed: int
    topic: str = ""  # the samples topic it publishes to (its full name)
    synth: Synth = field(init=False)
    ids: list[str] = field(init=False)

    def __post_init__(self):
        self.synth = Synth(self.n, len(self.names), self.seed)
        self.ids = [f"{self.prefix}{k:03d}" for k in range(self.n)]

    def payloads(self, ks, seqs, ts, factor=None) -> list[bytes]:
        from osad.schemas import Sample, encode

        ks, seqs = np.asarray(ks, dtype=np.int64), np.asarray(seqs, dtype=np.int64)
        rows = self.synth.rows(ks, seqs, factor)
        return [encode(Sample(entity_id=self.ids[k], host="bench", pid=10_000 + int(k), comm=f"svc{k}", ts=float(t),
                              interval_s=self.interval_s, seq=int(s), metrics=dict(zip(self.names, row.tolist()))))
                for k, s, t, row in zip(ks, seqs, ts, rows)]


def pct(xs, q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def last_window_before(seq_next: int) -> int:
    """End seq of the last complete window when samples 0 .. seq_next - 1 have been sent."""
    return (seq_next // GAP) * GAP - 1


def fmt_s(x: float | None) -> str:
    return "never scored" if x is None else f"{x:.2f} s"


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- reading the outputs ---------------------------------------------------------------------

class Reader:
    """One group-less reader of the pipeline's outputs (runtime/reader.py): Anomalies and Scores from the start
    of the round, SignatureWindows (headers only) while :meth:`watch_signatures` is on. Keeps record timestamps."""

    def __init__(self, bootstrap: str, prefix: str):
        from osad.runtime.reader import TopicReader
        from osad.schemas import ANOMALIES, SCORES, SIGNATURES

        self.topics = {ANOMALIES.full_name(prefix): "a", SCORES.full_name(prefix): "s",
                       SIGNATURES.full_name(prefix): "w"}
        self.r = TopicReader(bootstrap, (ANOMALIES, SCORES), prefix=prefix, client_id="bench-reader")
        wait_for(self.r.assign, 30, "the output topics' metadata")
        self.opens: list[tuple[dict, float, float]] = []  # (open Anomaly, its record time, time this reader got it)
        self.closes: dict[str, dict] = {}  # anomaly id -> its closed state
        self.fitted: dict[tuple[str, int], float] = {}  # (entity, window seq) -> time of its calibrated CS Score
        self.scored: dict[str, int] = {}  # entity -> newest window seq with any Score
        self.score_times: list[float] = []  # record times of every Score read
        self.sigs: dict[tuple[str, int], float] = {}  # (entity, window seq) -> time of its SignatureWindow
        self.ts_types: set[int] = set()
        self.matched = 0  # open Anomalies already given to faults (latency phase)

    def watch_signatures(self, on: bool) -> None:
        from osad.schemas import SIGNATURES

        if on:
            wait_for(lambda: self.r.add(SIGNATURES), 30, "the signatures topic's metadata")
        else:
            self.r.remove(SIGNATURES)

    def poll(self, timeout_s: float) -> None:
        got = self.r.poll(max(0, int(timeout_s * 1000)))
        now = time.time()
        for m in got:
            kind = self.topics[m.topic]
            t = m.timestamp / 1000.0
            self.ts_types.add(m.timestamp_type)
            if kind == "s":
                d = json.loads(m.value)
                self.score_times.append(t)
                seq = d["window_end_seq"]
                self.scored[d["entity_id"]] = max(seq, self.scored.get(d["entity_id"], -1))
                if d["model_id"].startswith("cs-calibrated") and ":fitted:" in d["model_id"]:
                    self.fitted[(d["entity_id"], seq)] = t
            elif kind == "a":
                d = json.loads(m.value)
                if d["status"] == "open":
                    self.opens.append((d, t, now))
                elif d["status"] == "closed":
                    self.closes[d["anomaly_id"]] = d
            else:
                (hlen,) = struct.unpack_from("<I", m.value, 4)
                h = json.loads(m.value[8:8 + hlen])
                self.sigs[(h["entity_id"], h["window_end_seq"])] = t

    def poll_until(self, t_wall: float) -> None:
        while (rem := t_wall - time.time()) > 0:
            self.poll(min(rem, 0.2))

    def close(self) -> None:
        self.r.close()


# -- one round: broker + services ------------------------------------------------------------

class Round:
    """The embedded broker and the three services for one round; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, a, idx: int, tmp: Path):
        self.a, self.idx, self.tmp = a, idx, tmp
        self.procs: dict[str, tuple] = {}
        self.broker = None
        self.loads: list[tuple[str, float]] = []  # (when, 1-minute load average)

    def note_load(self, when: str) -> None:
        self.loads.append((when, os.getloadavg()[0]))

    def __enter__(self) -> "Round":
        from osad.runtime.broker import EmbeddedBroker, free_port
        from osad.runtime.kafka import ensure_topics

        a, tmp = self.a, self.tmp
        try:
            self.broker = EmbeddedBroker(log_file=str(tmp / "broker.log")).start()
            self.prefix = f"bench{os.getpid()}r{self.idx}."
            ensure_topics(self.broker.bootstrap, prefix=self.prefix)
            ports = {s.name: free_port() for s in TRANSFORMS}
            for name, args in service_commands(a, tmp, self.broker.bootstrap, self.prefix, ports).items():
                p = osad_process(args, tmp / f"{name}.log", env=service_env(a))
                self.procs[name] = (p, ports[name])
            t0 = time.monotonic()
            wait_for(self._ready, 300, "the services to start and join their groups")
            say(f"round {self.idx + 1}: broker and services up in {time.monotonic() - t0:.1f} s (logs in {tmp})")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        for name, (p, port) in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode}; see {self.tmp / (name + '.log')}")
            h = health(port)
            if not h or h.get("status") != "ok" or not h.get("assigned_partitions"):
                return False
        return True

    def metrics(self, name: str) -> str | None:
        return http_text(self.procs[name][1], "/metrics")

    def usage(self) -> dict[str, float]:
        """CPU seconds so far of each service, the broker and this process; the detector's model calls."""
        import psutil

        out = {}
        procs = {name: p.pid for name, (p, _) in self.procs.items()}
        procs.update(broker=self.broker.proc.pid, bench=os.getpid())
        for name, pid in procs.items():
            try:
                c = psutil.Process(pid).cpu_times()
                out[name] = c.user + c.system
            except psutil.Error:
                out[name] = float("nan")
        m = self.metrics("detector")
        out["model_s"] = metric(m, "osad_detector_model_seconds_sum")
        out["model_calls"] = metric(m, "osad_detector_batch_windows_count")
        out["model_windows"] = metric(m, "osad_detector_batch_windows_sum")
        return out

    def alive(self) -> None:
        for name, (p, _) in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode}; see {self.tmp / (name + '.log')}")

    def __exit__(self, *exc) -> None:
        # stopped in reverse order of the pipeline, as `osad up` does
        stop_processes([p for p, _ in reversed(self.procs.values())], timeout_s=20.0)
        if self.broker:
            self.broker.stop()


def service_commands(a, tmp: Path, bootstrap: str, prefix: str, ports: dict[str, int]) -> dict[str, list[str]]:
    """The ``osad`` arguments of each of the pipeline's transforms (osad.pipeline, their state in ``tmp``), with
    this benchmark's calibrations and the extra arguments given (--featurizer-arg, ...)."""
    calibration = {FEATURIZER.name: ["--calibration-samples", str(a.feat_calibration)],
                   DETECTOR.name: ["--cs-calibrate", str(a.cs_calibrate)],
                   ALERTER.name: ["--calibration-scores", str(a.alert_calibration)]}
    extra = {FEATURIZER.name: a.featurizer_arg, DETECTOR.name: a.detect_arg, ALERTER.name: a.alert_arg}
    return {s.name: service_args(s, state=str(tmp), bootstrap=bootstrap, prefix=prefix, metrics_port=ports[s.name],
                                 overrides=calibration.get(s.name, ()), extra=extra.get(s.name, ()))
            for s in TRANSFORMS}


def service_env(a) -> dict:
    """The services' environment: this one's, with the --env KEY=VALUE pairs."""
    return dict(os.environ, **dict(kv.partition("=")[::2] for kv in a.env))


def producer(bootstrap: str):
    from osad.runtime.kafka import make_producer

    return make_producer(bootstrap, "bench-collector")  # the collector's settings (linger 5 ms, acks all)


def send(prod, feed: Feed, ks, seqs, ts, factor=None, topic: str | None = None) -> list[float]:
    """Publish Samples (to ``feed``'s topic unless ``topic``, a full name); returns the wall-clock time of each
    one's publication (just before its send)."""
    topic = topic or feed.topic
    out = []
    for k, v in zip(ks, feed.payloads(ks, seqs, ts, factor)):
        out.append(time.time())
        prod.send(topic, key=feed.ids[k].encode(), value=v)
    return out


def warm_up(rnd: Round, reader: Reader, prod, feed: Feed, n_samples: list[int], need_alerter: int, t_ref: float,
            what: str) -> None:
    """Send each process's first ``n_samples[k]`` Samples (time stamps ending at ``t_ref``), then wait until
    every one of its windows is scored, each process has calibrated compressed sensing, the alerter has
    ``need_alerter`` calibrated streams and has read every Score.

    The history goes out in waves of ``WAVE`` windows per process, each wave once the previous one is
    scored: time runs faster than live, but the detector sees what it sees live, windows of many
    processes in a batch. (All of it at once would put dozens of one process's windows in one batch,
    and the detector then fits that process's compressed sensing again for every ``--cs-calibrate``
    of them, seconds each.)"""
    t0 = time.monotonic()
    sent = 0
    while sent < max(n_samples):
        upto = SPAN if sent == 0 else sent + WAVE * GAP
        ks, seqs = history_slice(n_samples, sent, upto)
        send(prod, feed, ks, seqs, [t_ref - (n_samples[k] - s) * feed.interval_s for k, s in zip(ks, seqs)])
        prod.flush()
        sent = upto
        last = {feed.ids[k]: last_window_before(min(sent, n_samples[k])) for k in range(feed.n)}

        def scored() -> bool:
            rnd.alive()
            reader.poll(0.2)
            return all(reader.scored.get(e, -1) >= w for e, w in last.items())

        wait_for(scored, 600, f"{what}: the pipeline to score the history", every_s=0)
    if any(not any((e, s) in reader.fitted for s in range(w, w - 3 * GAP, -GAP)) for e, w in last.items()):
        raise RuntimeError(f"{what}: the detector has not calibrated compressed sensing for every process")

    def alerter_done() -> bool:
        reader.poll(0.2)
        m = rnd.metrics("alerter")
        return (metric(m, "osad_alerter_events_total", event="calibrated") >= need_alerter
                and metric(m, "osad_messages_in_total") >= len(reader.score_times))

    wait_for(alerter_done, 120, f"{what}: the alerter to calibrate", every_s=0)
    say(f"  {what}: {sum(n_samples)} Samples of history taken in {time.monotonic() - t0:.1f} s")


# -- latency ---------------------------------------------------------------------------------

@dataclass
class Fault:
    k: int
    j0: int  # first faulty tick
    j1: int  # first tick after the fault
    feats: list[int]
    anomaly: dict | None = None
    t_anomaly: float = 0.0  # its record timestamp
    t_received: float = 0.0  # when this script's consumer had it


def latency_phase(rnd: Round, reader: Reader, prod, names: list[str]) -> dict:
    a = rnd.a
    n, iv = a.entities, a.interval
    feed = Feed("bench/lat", n, names, iv, seed=rnd.idx, topic=SAMPLES.full_name(rnd.prefix))
    # history: the span, the detector's calibration windows, the alerter's, and two more windows;
    # process k is k % GAP samples ahead, so the processes' windows do not all complete on the same tick
    hist = SPAN + GAP * (a.cs_calibrate + a.alert_calibration + 2)
    seq0 = [hist + k % GAP for k in range(n)]  # seq of each process's first live Sample
    warm_up(rnd, reader, prod, feed, seq0, n, time.time(), "latency history")
    false_before = len(reader.opens)
    reader.matched = len(reader.opens)

    relay = relay_baseline(rnd, feed, a.relay_ticks)

    # one fault every `step` ticks; a process's next fault (with --cycles > 1) after RECOVERY normal Samples
    cycle = n * a.stagger if a.cycles == 1 else max(n * a.stagger, a.fault_len + RECOVERY)
    step = cycle / n
    faults = [Fault(k, a.normal_ticks + int(round(k * step + c * cycle)),
                    a.normal_ticks + int(round(k * step + c * cycle)) + a.fault_len,
                    [(4 * (k + c * n) + i) % len(names) for i in range(4)])
              for c in range(a.cycles) for k in range(n)]
    last_end = max(f.j1 for f in faults)
    reader.watch_signatures(True)
    t_pub: dict[tuple[int, int], float] = {}
    rnd.note_load("live start")
    t_live0 = time.time() + 0.5
    say(f"  live: {n} processes, one Sample each every {iv:g} s; {len(faults)} faults from tick {a.normal_ticks} "
        f"to {last_end} (one every {step:.1f} s)")
    fp: list[dict] = []
    j = 0
    while True:
        reader.poll_until(t_live0 + j * iv)
        rnd.alive()
        factor = np.ones((n, len(names)))
        for f in faults:
            if f.j0 <= j < f.j1:
                factor[f.k, f.feats] = a.fault_factor
        ks = list(range(n))
        seqs = [seq0[k] + j for k in ks]
        for k, t in zip(ks, send(prod, feed, ks, seqs, [t_live0 + j * iv] * n, factor)):
            t_pub[(k, seq0[k] + j)] = t
        prod.flush()
        fp += match_faults(faults, reader, feed, seq0)
        j += 1
        if j >= last_end and (all(f.anomaly for f in faults) or j >= last_end + a.tail_ticks):
            break
    rnd.note_load("live end")
    reader.poll(1.0)
    fp += match_faults(faults, reader, feed, seq0)
    reader.watch_signatures(False)

    res = {"faults": len(faults), "detected": 0, "false_positives": len(fp),
           "false_positives_history": false_before, "window_seq_mismatch": 0,
           "after_window_s": [], "after_window_received_s": [], "after_fault_s": [], "stage_featurizer_s": [],
           "stage_detector_s": [], "stage_alerter_s": [], "relay_s": relay, "close_after_fault_end_samples": [], "per_fault": []}
    for f in faults:
        res["per_fault"].append({"process": f.k, "first_faulty_seq": seq0[f.k] + f.j0, "samples": a.fault_len,
                                 "metrics": [names[i] for i in f.feats], "detected": bool(f.anomaly),
                                 "first_window_seq": (f.anomaly or {}).get("first_window_seq")})
        if not f.anomaly:
            continue
        an = f.anomaly
        closed = reader.closes.get(an["anomaly_id"])
        if closed:  # how long the incident outlived the fault (a process's next fault must come later)
            res["close_after_fault_end_samples"].append(
                seq0[f.k] + int(round((closed["last_ts"] - t_live0) / iv)) - (seq0[f.k] + f.j1 - 1))
        seq_open = seq0[f.k] + int(round((an["last_ts"] - t_live0) / iv))
        if seq_open != an["first_window_seq"] + (OPEN_AFTER - 1) * GAP:
            res["window_seq_mismatch"] += 1
        if (f.k, seq_open) not in t_pub:
            continue
        res["detected"] += 1
        eid = feed.ids[f.k]
        res["after_window_s"].append(f.t_anomaly - t_pub[(f.k, seq_open)])
        res["after_window_received_s"].append(f.t_received - t_pub[(f.k, seq_open)])
        res["after_fault_s"].append(f.t_anomaly - t_pub[(f.k, seq0[f.k] + f.j0)])
        t_sig, t_score = reader.sigs.get((eid, seq_open)), reader.fitted.get((eid, seq_open))
        if t_sig and t_score:
            res["stage_featurizer_s"].append(t_sig - t_pub[(f.k, seq_open)])
            res["stage_detector_s"].append(t_score - t_sig)
            res["stage_alerter_s"].append(f.t_anomaly - t_score)
    # every live window, incidents or not: featurizer and detector stages
    allf, alld = [], []
    index = {e: k for k, e in enumerate(feed.ids)}
    for (e, s), t_sig in reader.sigs.items():
        k = index.get(e)
        if (k, s) in t_pub and (e, s) in reader.fitted:
            allf.append(t_sig - t_pub[(k, s)])
            alld.append(reader.fitted[(e, s)] - t_sig)
    res["all_windows_featurizer_s"], res["all_windows_detector_s"] = allf, alld
    lw = res["after_window_s"]
    say(f"  latency: {res['detected']}/{len(faults)} faults detected, {len(fp)} false positives; after the window "
        f"p50 {pct(lw, 50):.3f} s p99 {pct(lw, 99):.3f} s; transport p50 {pct(relay, 50):.3f} s "
        f"p99 {pct(relay, 99):.3f} s")
    return res


def match_faults(faults: list[Fault], reader: Reader, feed: Feed, seq0: list[int]) -> list[dict]:
    """Give each open Anomaly not looked at yet to the fault it belongs to; returns those of ``feed``'s
    processes that belong to none (false positives)."""
    out = []
    for an, t, t_got in reader.opens[reader.matched:]:
        eid = an["entity_id"]
        k = feed.ids.index(eid) if eid in feed.ids else None
        hit = None
        for f in faults:
            if f.k != k or f.anomaly:
                continue
            first_window = seq0[k] + f.j0 + (-(seq0[k] + f.j0 + 1)) % GAP  # first window with a faulty Sample
            last_window = seq0[k] + f.j1 - 1 + 59  # the last one that still holds one
            if first_window <= an.get("first_window_seq", -1) <= last_window:
                hit = f
                break
        if hit:
            hit.anomaly, hit.t_anomaly, hit.t_received = an, t, t_got
        elif k is not None:
            out.append(an)
    reader.matched = len(reader.opens)
    return out


# -- latency baseline: the bare transport through the same number of hops --------------------

def relay_baseline(rnd: Round, feed: Feed, ticks: int) -> list[float]:
    """Samples through three identity transforms run by the services' runner (4 topics, 3 hops of
    consume -> produce), the same pattern as live Samples; latencies publication -> last record."""
    from osad.runtime.kafka import ensure_topics
    from osad.runtime.reader import TopicReader
    from osad.runtime.service import Output, RunnerConfig, ServiceRunner, Transform
    from osad.schemas import Sample, Topic

    topics = [Topic(f"bench.relay{i}", Sample, 12, "relay baseline") for i in range(4)]
    ensure_topics(rnd.broker.bootstrap, tuple(topics), prefix=rnd.prefix)

    class Relay(Transform):
        def __init__(self, i: int):
            self.name, self.input, self.out = f"relay{i}", topics[i], topics[i + 1]

        def process(self, msg, meta):
            return [Output(self.out, msg)]

    runners = [ServiceRunner(Relay(i), RunnerConfig(rnd.broker.bootstrap, f"{rnd.prefix}bench-relay{i}",
                                                    topic_prefix=rnd.prefix, create_topics=False),
                             install_signals=False)
               for i in range(3)]
    threads = [threading.Thread(target=r.run, daemon=True) for r in runners]
    sink = TopicReader(rnd.broker.bootstrap, topics[3], prefix=rnd.prefix, client_id="bench-relay-sink")
    prod = producer(rnd.broker.bootstrap)
    try:
        for t in threads:
            t.start()
        wait_for(sink.assign, 30, "the relay topics' metadata")
        wait_for(lambda: all(r.health()[1]["assigned_partitions"] for r in runners), 120, "the relays to join")
        t_pub, lat = {}, {}
        seq0 = 1_000_000
        t0 = time.time() + 0.2
        for j in range(RELAY_WARM + ticks):
            due = t0 + j * feed.interval_s
            while time.time() < due:
                _collect(sink, t_pub, lat, min(0.2, max(0.0, due - time.time())))
            ks = list(range(feed.n))
            for k, t in zip(ks, send(prod, feed, ks, [seq0 + j] * feed.n, [due] * feed.n,
                                     topic=topics[0].full_name(rnd.prefix))):
                t_pub[(feed.ids[k], seq0 + j)] = t
            prod.flush()
        deadline = time.monotonic() + 30
        while len(lat) < len(t_pub) and time.monotonic() < deadline:
            _collect(sink, t_pub, lat, 0.2)
        if len(lat) < len(t_pub):
            raise RuntimeError(f"relay baseline: {len(lat)} of {len(t_pub)} messages came through")
        return [v for (_, seq), v in lat.items() if seq >= seq0 + RELAY_WARM]
    finally:
        for r in runners:
            r.stop()
        for t in threads:
            t.join(30)
        sink.close()
        prod.close()


def _collect(sink, t_pub: dict, lat: dict, timeout_s: float) -> None:
    for m in sink.poll(int(timeout_s * 1000)):
        d = json.loads(m.value)
        key = (d["entity_id"], d["seq"])
        lat[key] = m.timestamp / 1000.0 - t_pub[key]


# -- throughput ------------------------------------------------------------------------------

class RoundRobin:
    """Samples of ``feed``'s processes in turn, each process at its own phase of the window grid."""

    def __init__(self, feed: Feed):
        self.feed = feed
        self.phase = [k % GAP for k in range(feed.n)]  # as in the latency phase
        self.next = np.zeros(feed.n, np.int64)
        self.cursor = 0

    def history(self, cs_calibrate: int) -> list[int]:
        """Samples of history per process: the span, the detector's calibration windows and two more."""
        return [SPAN + GAP * (cs_calibrate + 2) + p for p in self.phase]

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        ks = (self.cursor + np.arange(count)) % self.feed.n
        self.cursor = int((self.cursor + count) % self.feed.n)
        seqs = np.empty(count, np.int64)
        for i, k in enumerate(ks):  # a process may come up more than once in a long chunk
            seqs[i] = self.next[k]
            self.next[k] += 1
        return ks, seqs

    def send(self, prod, count: int, completions: list) -> None:
        """Publish ``count`` Samples; remember when each window-completing one was published."""
        if count <= 0:
            return
        ks, seqs = self.take(count)
        times = send(prod, self.feed, ks, seqs, [time.time()] * count)
        for k, s, t in zip(ks, seqs, times):
            if (s + 1) % GAP == 0:
                completions.append((t, self.feed.ids[k], int(s)))


def history_slice(n_samples: list[int], lo: int, hi: int) -> tuple[list[int], list[int]]:
    """(processes, seqs) of the history Samples lo <= seq < hi, seq by seq (every process's seq s, then s + 1)."""
    ks, seqs = [], []
    for s in range(lo, hi):
        for k, n in enumerate(n_samples):
            if s < n:
                ks.append(k)
                seqs.append(s)
    return ks, seqs


def throughput_phase(rnd: Round, reader: Reader, prod, names: list[str]) -> dict:
    a = rnd.a
    feed = Feed("bench/tp", a.tp_entities, names, 1.0, seed=1000 + rnd.idx, topic=SAMPLES.full_name(rnd.prefix))
    rr = RoundRobin(feed)
    n_hist = rr.history(a.cs_calibrate)  # the alerter calibrates during the first steps
    warm_up(rnd, reader, prod, feed, n_hist, 0, time.time(), "throughput history")
    rr.next[:] = n_hist
    steps = []
    lo = hi = None
    rate = a.rate0
    for _ in range(a.max_steps):
        res = tp_step(rnd, reader, prod, rr, rate)
        steps.append(res)
        say(f"  {rate:7.0f} Samples/s offered: {'held' if res['held'] else 'NOT held'} ({res['why']}); "
            f"{res['scored_per_s']:.1f} windows/s scored, delay p50 {res['delay_p50_s']:.2f} s, "
            f"max (2nd half) {fmt_s(res['delay_max_s'])}")
        say("      CPU (share of one core): " + ", ".join(f"{k} {v:.2f}" for k, v in res["cpu_share"].items())
            + f"; detector model {1000 * res['model_s_per_window']:.1f} ms per window, "
            f"{res['windows_per_model_call']:.1f} windows per call")
        if res["held"]:
            lo = rate
        else:
            hi = rate
        drain(rnd, reader, rr)
        if lo is not None and hi is not None:
            if hi / lo < 1.15:
                break
            rate = math.sqrt(lo * hi)
        else:
            rate = rate * a.rate_factor if hi is None else rate / a.rate_factor
    return {"sustained": lo or 0.0, "lowest_failed": hi, "steps": steps}


def tp_step(rnd: Round, reader: Reader, prod, rr: RoundRobin, rate: float) -> dict:
    a = rnd.a
    completions: list = []
    sent = 0
    rnd.note_load(f"step {rate:.0f}/s")
    use0 = rnd.usage()
    t0 = time.monotonic()
    w0 = time.time()
    while (el := time.monotonic() - t0) < a.step_s:
        due = int(el * rate) - sent
        if due > 0:
            rr.send(prod, min(due, 2000), completions)
            sent += min(due, 2000)
        reader.poll(0.05)  # Samples go out in chunks of 50 ms
    prod.flush()
    w_end = time.time()
    use = {k: v - use0[k] for k, v in rnd.usage().items()}
    n_scores_by_end = sum(1 for t in reader.score_times if t <= w_end)
    bound = a.delay_bound
    alerter_ok = False
    while time.time() < w_end + bound:
        reader.poll(0.1)
        rnd.alive()
        if all(reader.scored.get(e, -1) >= s for _, e, s in completions[-200:]):
            alerter_ok = metric(rnd.metrics("alerter"), "osad_messages_in_total") >= n_scores_by_end
            if alerter_ok:
                break
    if not alerter_ok:
        alerter_ok = metric(rnd.metrics("alerter"), "osad_messages_in_total") >= n_scores_by_end
    delays = [(t, reader.fitted.get((e, s), math.inf) - t) for t, e, s in completions]
    dur = w_end - w0
    half = [d for t, d in delays if t >= w0 + dur / 2]
    q2 = [d for t, d in delays if w0 + dur / 4 <= t < w0 + dur / 2]
    q4 = [d for t, d in delays if t >= w0 + 3 * dur / 4]
    dmax = max(half) if half else math.inf
    grows = bool(q2 and q4) and statistics.median(q4) > statistics.median(q2) + 1.0
    why = []
    if dmax > bound:
        why.append(f"a window waited {dmax:.1f} s > {bound:g} s")
    if grows:
        why.append(f"delay grows ({statistics.median(q2):.2f} -> {statistics.median(q4):.2f} s)")
    if not alerter_ok:
        why.append("the alerter fell behind")
    finite = [d for _, d in delays if math.isfinite(d)]
    scored_in_step = sum(1 for t, e, s in completions if reader.fitted.get((e, s), math.inf) <= w_end)
    return {"rate": rate, "sent": sent, "seconds": dur, "windows": len(completions),
            "scored_per_s": scored_in_step / dur, "delay_p50_s": pct(finite, 50),
            "delay_max_s": dmax if math.isfinite(dmax) else None, "held": not why,
            "why": "; ".join(why) or "delay bounded, alerter kept up",
            "cpu_share": {k: use[k] / dur for k in ("featurizer", "detector", "alerter", "broker", "bench")},
            "model_s_per_window": use["model_s"] / max(1.0, use["model_windows"]),
            "windows_per_model_call": use["model_windows"] / max(1.0, use["model_calls"])}


def drain(rnd: Round, reader: Reader, rr: RoundRobin) -> None:
    """Wait until every window sent so far is scored and the alerter has read every Score."""
    last = {rr.feed.ids[k]: last_window_before(int(rr.next[k])) for k in range(rr.feed.n)}

    def idle() -> bool:
        reader.poll(0.2)
        rnd.alive()
        return (all(reader.scored.get(e, -1) >= w for e, w in last.items())
                and metric(rnd.metrics("alerter"), "osad_messages_in_total") >= len(reader.score_times))

    wait_for(idle, 600, "the pipeline to drain between steps", every_s=0)


# -- throughput baseline: the same transforms in this process, no Kafka ---------------------

def core_baseline(a, names: list[str], tmp: Path, seed: int) -> dict:
    """Samples/s of Featurizer -> Detector -> alerter Engine in this process, objects between the stages,
    after the same history as the throughput phase: *as live*, one Sample per process per call and the
    detector's queue scored after each (one window per model call, as the pipeline below saturation);
    *batched*, 500 Samples per call (a backlog's polls: several windows of a process per model call)."""
    from osad.alerter.core import AlerterConfig, Engine
    from osad.detector.cs import CSScorer
    from osad.detector.engine import Engine as DetectorEngine
    from osad.detector.engine import EngineConfig
    from osad.detector.service import BatchConfig, Detector
    from osad.featurizer.ranges import RangesStore
    from osad.featurizer.service import Featurizer
    from osad.featurizer.windows import WindowConfig
    from osad.runtime.service import InputMeta
    from osad.schemas import Sample, decode

    feed = Feed("bench/core", a.core_entities, names, 1.0, seed=seed)
    fe = Featurizer(WindowConfig(calibration_samples=a.feat_calibration), RangesStore(None, str(tmp / "core")))
    det = Detector(DetectorEngine(CSScorer(gap=10), EngineConfig(cs_calibrate=a.cs_calibrate)),
                   BatchConfig(max_batch=64, max_wait_ms=200.0))
    eng = Engine(AlerterConfig(calibration_scores=a.alert_calibration))
    offset = 0

    def run(payloads: list[bytes], chunk: int, flush_each: bool) -> None:
        nonlocal offset
        for i in range(0, len(payloads), chunk):
            batch = []
            for b in payloads[i:i + chunk]:
                batch.append((decode(b, Sample), InputMeta("samples", 0, offset)))
                offset += 1
            wins = fe.process_batch(batch)
            outs = list(det.process_batch([(o.msg, InputMeta("signatures", 0, offset)) for o in wins]))
            if flush_each:
                outs += det.close()
            for o in outs:
                eng.observe(o.msg, time.time())
        for o in det.close():
            eng.observe(o.msg, time.time())

    rr = RoundRobin(feed)
    n_hist = rr.history(a.cs_calibrate)
    ks, seqs = history_slice(n_hist, 0, max(n_hist))
    run(feed.payloads(ks, seqs, [time.time()] * len(ks)), 500, False)
    rr.next[:] = n_hist
    out = {}
    for mode, chunk, flush in (("as_live", feed.n, True), ("batched", 500, False)):
        ks, seqs = rr.take(feed.n * a.core_samples)
        payloads = feed.payloads(ks, seqs, [time.time()] * len(ks))
        t0 = time.perf_counter()
        run(payloads, chunk, flush)
        out[mode] = len(payloads) / (time.perf_counter() - t0)
    out["samples"] = feed.n * a.core_samples
    say(f"  in-process chain ({feed.n} processes, {out['samples']} Samples each way): as live "
        f"{out['as_live']:.0f} Samples/s, batched {out['batched']:.0f} Samples/s")
    return out


# -- main --------------------------------------------------------------------------------------

def run_round(a, idx: int, names: list[str]) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"osad-bench-pipeline-r{idx + 1}-"))
    out = {"round": idx + 1, "load_before": os.getloadavg(), "logs": str(tmp)}
    ok = False
    try:
        with Round(a, idx, tmp) as rnd:
            out["loads"] = rnd.loads
            reader = Reader(rnd.broker.bootstrap, rnd.prefix)
            prod = producer(rnd.broker.bootstrap)
            try:
                if "latency" in a.phases:
                    out["latency"] = latency_phase(rnd, reader, prod, names)
                if "throughput" in a.phases:
                    out["core"] = core_baseline(a, names, tmp, seed=2000 + idx)
                    out["throughput"] = throughput_phase(rnd, reader, prod, names)
                out["record_timestamp_types"] = sorted(reader.ts_types)
            finally:
                prod.close()
                reader.close()
        ok = True
    except Exception as e:  # a service died, a wait timed out: keep the phases done, go on with the next round
        out["error"] = f"{type(e).__name__}: {e}"
        say(f"round {idx + 1} failed: {out['error']}")
    finally:
        out["load_after"] = os.getloadavg()
        if ok and not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(f"round {idx + 1}: logs kept in {tmp}")
    return out


def summarize(a, rounds: list[dict]) -> dict:
    def med(xs):
        xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
        return statistics.median(xs) if xs else float("nan")

    s: dict = {"rounds": len(rounds)}
    lat = [r["latency"] for r in rounds if "latency" in r]
    if lat:
        pooled = {k: [x for r in lat for x in r[k]] for k in
                  ("after_window_s", "after_window_received_s", "after_fault_s", "relay_s", "stage_featurizer_s",
                   "stage_detector_s", "stage_alerter_s", "all_windows_featurizer_s", "all_windows_detector_s")}
        s["latency"] = {
            "faults": sum(r["faults"] for r in lat), "detected": sum(r["detected"] for r in lat),
            "false_positives": sum(r["false_positives"] for r in lat),
            "window_seq_mismatch": sum(r["window_seq_mismatch"] for r in lat),
            "median_of_rounds": {k: {"p50": med([pct(r[k], 50) for r in lat]), "p99": med([pct(r[k], 99) for r in lat])}
                                 for k in pooled},
            "pooled": {k: {"p50": pct(v, 50), "p99": pct(v, 99), "count": len(v)} for k, v in pooled.items()},
        }
    tp = [r for r in rounds if "throughput" in r]
    if tp:
        held = [r["throughput"]["sustained"] for r in tp]
        s["throughput"] = {"sustained_per_round": held, "sustained_median": med(held)}
        for mode in ("as_live", "batched"):
            s["throughput"][f"core_{mode}_per_round"] = [r["core"][mode] for r in tp]
            s["throughput"][f"core_{mode}_median"] = med([r["core"][mode] for r in tp])
            s["throughput"][f"ratio_{mode}_median"] = med([r["throughput"]["sustained"] / r["core"][mode] for r in tp])
    return s


def report(a, s: dict, rounds: list[dict]) -> None:
    loads = [x for r in rounds for x in (r["load_before"][0], r["load_after"][0], *(v for _, v in r.get("loads", ())))]
    print(f"Pipeline end to end on the embedded broker: featurizer, detector (compressed sensing) and alerter as "
          f"processes; {s['rounds']} round(s), medians of rounds")
    print(f"calibrations: featurizer {a.feat_calibration} samples, detector {a.cs_calibrate} windows, alerter "
          f"{a.alert_calibration} scores; load average (1 min) {min(loads):.1f}-{max(loads):.1f} on "
          f"{os.cpu_count()} cores")
    if "latency" in s:
        L = s["latency"]
        m, p = L["median_of_rounds"], L["pooled"]
        print(f"\nlatency, {a.entities} processes, one Sample each per {a.interval:g} s: {L['detected']} of "
              f"{L['faults']} faults detected, {L['false_positives']} false positives"
              + (f", {L['window_seq_mismatch']} opening windows not at first_window_seq + gap"
                 if L["window_seq_mismatch"] else ""))
        rows = (("Sample published -> Anomaly published", None, None),
                ("  after the window completes (pipeline)", "after_window_s", None),
                ("  same, until a consumer has the Anomaly", "after_window_received_s", None),
                ("  after the fault's first Sample", "after_fault_s", None),
                ("  bare transport, same 4 topics / 3 hops", "relay_s", None),
                ("stages of the opening window", None, None),
                ("  featurizer (Sample -> SignatureWindow)", "stage_featurizer_s", None),
                ("  detector (SignatureWindow -> Score)", "stage_detector_s", None),
                ("  alerter (Score -> Anomaly)", "stage_alerter_s", None),
                ("stages, every live window", None, None),
                ("  featurizer", "all_windows_featurizer_s", None),
                ("  detector", "all_windows_detector_s", None))
        print(f"{'':<44}{'p50':>9}{'p99':>9}{'pooled p50':>12}{'pooled p99':>12}{'count':>7}")
        for label, k, _ in rows:
            if k is None:
                print(label)
                continue
            print(f"{label:<44}{m[k]['p50']:>8.3f}s{m[k]['p99']:>8.3f}s{p[k]['p50']:>11.3f}s{p[k]['p99']:>11.3f}s"
                  f"{p[k]['count']:>7}")
        print(f"ratio pipeline (after the window) / bare transport: p50 "
              f"{m['after_window_s']['p50'] / m['relay_s']['p50']:.1f}x, p99 "
              f"{m['after_window_s']['p99'] / m['relay_s']['p99']:.1f}x; target p99 < 2 s after the window: "
              f"{'met' if m['after_window_s']['p99'] < 2.0 else 'NOT met'}")
    if "throughput" in s:
        T = s["throughput"]
        print(f"\nthroughput, {a.tp_entities} processes, steps of {a.step_s:g} s, held = delay <= {a.delay_bound:g} s "
              f"and not growing, alerter keeping up")
        def rounds_of(xs):
            return ", ".join(f"{x:.0f}" for x in xs)

        print(f"  {'pipeline, highest rate held':<42}{T['sustained_median']:8.0f} Samples/s  "
              f"(rounds: {rounds_of(T['sustained_per_round'])})")
        for mode, label in (("as_live", "in-process, as live (1 window per call)"),
                            ("batched", "in-process, batched (500 Samples a call)")):
            print(f"  {label:<42}{T[f'core_{mode}_median']:8.0f} Samples/s  "
                  f"(rounds: {rounds_of(T[f'core_{mode}_per_round'])}); "
                  f"ratio pipeline / it {T[f'ratio_{mode}_median']:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (few processes, short steps)")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    ap.add_argument("--phases", default="latency,throughput", help="latency, throughput or both (comma-separated)")
    ap.add_argument("--keep", action="store_true", help="keep the rounds' logs")
    g = ap.add_argument_group("latency")
    g.add_argument("--entities", type=int, default=40, help="live processes")
    g.add_argument("--interval", type=float, default=1.0, help="seconds between a process's Samples")
    g.add_argument("--cycles", type=int, default=1, help="faults per process")
    g.add_argument("--fault-len", type=int, default=25, help="Samples a fault lasts")
    g.add_argument("--fault-factor", type=float, default=3.0, help="the step: faulty metrics are multiplied by this")
    g.add_argument("--stagger", type=float, default=3.0, help="intervals between the starts of two faults (at least)")
    g.add_argument("--normal-ticks", type=int, default=20, help="live Samples before the first fault")
    g.add_argument("--tail-ticks", type=int, default=40, help="at most this many Samples after the last fault")
    g.add_argument("--relay-ticks", type=int, default=30, help="intervals of the transport baseline")
    g = ap.add_argument_group("throughput")
    g.add_argument("--tp-entities", type=int, default=50)
    g.add_argument("--step-s", type=float, default=30.0)
    g.add_argument("--rate0", type=float, default=150.0, help="first offered rate, Samples/s")
    g.add_argument("--rate-factor", type=float, default=1.5)
    g.add_argument("--max-steps", type=int, default=7)
    g.add_argument("--delay-bound", type=float, default=5.0, help="seconds")
    g.add_argument("--core-entities", type=int, default=10, help="processes of the in-process baseline")
    g.add_argument("--core-samples", type=int, default=300, help="timed Samples per process, in-process baseline")
    g = ap.add_argument_group("services")
    g.add_argument("--feat-calibration", type=int, default=100, help="featurizer --calibration-samples")
    g.add_argument("--cs-calibrate", type=int, default=10, help="detector --cs-calibrate")
    g.add_argument("--alert-calibration", type=int, default=30, help="alerter --calibration-scores")
    g.add_argument("--featurizer-arg", action="append", default=[], help="extra argument (repeatable)")
    g.add_argument("--detect-arg", action="append", default=[], help="extra argument (repeatable)")
    g.add_argument("--alert-arg", action="append", default=[], help="extra argument (repeatable)")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the services (e.g. OMP_NUM_THREADS=1; repeatable)")
    a = ap.parse_args()
    if a.quick:
        a.rounds = min(a.rounds, 1)
        a.entities, a.interval, a.cycles, a.fault_len, a.normal_ticks, a.tail_ticks = 6, 0.5, 1, 20, 10, 30
        a.relay_ticks = 6
        a.tp_entities, a.step_s, a.rate0, a.rate_factor, a.max_steps = 10, 8.0, 100.0, 2.0, 2
        a.core_entities, a.core_samples = 4, 100
    a.phases = {p.strip() for p in a.phases.split(",") if p.strip()}

    def _term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _term)
    names = features()
    rounds = []
    try:
        for i in range(a.rounds):
            say(f"round {i + 1} of {a.rounds} (load average {os.getloadavg()[0]:.2f})")
            rounds.append(run_round(a, i, names))
    except KeyboardInterrupt:
        say("interrupted; services and broker stopped")
        return 130
    s = summarize(a, rounds)
    report(a, s, rounds)
    failed = [r for r in rounds if "error" in r]
    for r in failed:
        print(f"round {r['round']} failed: {r['error']} (logs in {r['logs']})")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": {k: (sorted(v) if isinstance(v, set) else v)
                                                     for k, v in vars(a).items()},
                                            "summary": s, "rounds": rounds}, indent=1, default=float))
        say(f"wrote {a.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
