"""``osad agreement DIR --entity NAME``: does the live pipeline detect what ``osad evaluate`` says it does?

Runs one benchmark entity twice with the default model (``cs``, calibrated compressed sensing):

* **offline**: :func:`detector.evaluate.evaluate_entity`, exactly as ``osad evaluate`` does;
* **streaming**: ``osad replay`` publishes the same train rows then the test rows as Samples through
  the real services (featurizer with the replay's train ranges, detector, alerter) on a Kafka
  broker (the embedded one unless ``--bootstrap``), and the test points inside the alerter's
  incidents are the predictions.

The services get the settings that make them the protocol of ``osad evaluate``: the detector fits
each entity's compressed sensing on its first windows (``--cs-calibrate`` = the train head's
windows), the alerter fits its POT threshold on the next ones (``--calibration-scores`` = the
held-out train tail's windows, same ``--q``), and an incident opens on the first window over the
threshold and closes on the first under it (``--open-after 1 --close-after 1``), so that its
incidents are the points over the threshold. The test rows are trimmed by at most ``gap - 1``
so that the last one ends a window (the featurizer publishes no window for an incomplete gap).

It prints both deployed F1 values, their difference, both thresholds and how far the streamed
window scores are from the offline ones, and exits 1 when the F1 values differ by more than
``--tolerance`` (0.02).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from osad.pipeline import ALERTER, DETECTOR, FEATURIZER, TRANSFORMS, command_line, connection, osad
from osad.runtime.config import Config, KafkaSecurity, positive, section, setting
from osad.runtime.procs import start_logged, stop_all


@dataclass(frozen=True)
class AgreementConfig(Config):
    """check that the live pipeline and `osad evaluate` agree on one entity"""

    dir: str = setting(positional=True, help="benchmark data set folder (train/, test/, test_label/), e.g. "
                       "tests/data/datasets/SMD (the repository's slice: 5,008 train and 6,000 test rows of "
                       "machine-1-6) or the full ../shared/datasets/SMD")
    entity: str = setting(required=True, help="entity (machine/service) name, e.g. machine-1-6")
    limit_train: int | None = setting(None, check=positive,
                                      help="use only the last N train rows (as osad evaluate --limit-train)")
    limit_test: int | None = setting(None, check=positive,
                                     help="use only the first N test rows (as osad evaluate --limit-test)")
    bootstrap: str = setting("", help="use this Kafka instead of starting the embedded broker")
    work_dir: str | None = setting(None, help="keep the services' logs and state here (default: a temporary folder)")
    tolerance: float = setting(0.02, check=positive, help="largest accepted difference of the two deployed F1 values")
    timeout_s: float = setting(1800.0, check=positive,
                               help="give up when the pipeline has not scored every window by then")
    json: str | None = setting(None, help="also write the result to this JSON file")
    security: KafkaSecurity = section(KafkaSecurity)  # TLS / SASL of a secured --bootstrap

    def validate(self) -> str | None:
        if not self.bootstrap and self.security.security_protocol != "PLAINTEXT":
            return (f"--security-protocol {self.security.security_protocol} is for a secured --bootstrap; the "
                    "embedded broker speaks plaintext")
        return None


def register(sub) -> None:
    AgreementConfig.add_command(sub, "agreement", lambda args: run(AgreementConfig.from_args(args)),
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)


# ------------------------------------------------------------------------------- the plan (pure)

@dataclass(frozen=True)
class Plan:
    """Which rows are replayed and how many windows each part of the protocol has."""

    n_train_total: int  # train rows of the data set
    n_train: int  # train rows used (the last ones)
    n_test: int  # test rows used (the first ones)
    n_fit: int  # train head: fits the model
    fit_windows: int  # windows of the head (the detector's --cs-calibrate)
    val_windows: int  # featurizer windows of the tail (the alerter's --calibration-scores)
    last_window_seq: int

    @property
    def skip(self) -> int:
        """Train rows not replayed (the replay's --skip)."""
        return self.n_train_total - self.n_train

    @property
    def test_seq0(self) -> int:
        return self.n_train_total


def make_plan(n_train_total: int, n_test_total: int, limit_train: int | None, limit_test: int | None, *,
              gap: int, need: int, val_fraction: float) -> Plan:
    """Rows and window counts of one run. Windows end at rows whose number in train + test has
    ``(seq + 1) % gap == 0`` (the featurizer's grid, which ``osad evaluate`` follows too); the test
    rows are trimmed by at most ``gap - 1`` so that the last one ends a window.

    >>> p = make_plan(23688, 23689, None, None, gap=10, need=100, val_fraction=0.2)
    >>> p.n_train, p.n_test, p.n_fit, p.fit_windows, p.val_windows, p.skip
    (23688, 23682, 18950, 1886, 473, 0)
    """
    n_train = min(limit_train or n_train_total, n_train_total)
    skip = n_train_total - n_train
    n_val = int(round(val_fraction * n_train))
    n_fit = n_train - n_val
    if n_fit < need + gap:
        raise ValueError(f"{n_train} train rows are too few (windows need {need} rows); use more")
    n_test = min(limit_test or n_test_total, n_test_total)
    n_test -= (n_train_total + n_test) % gap
    if n_test < gap:
        raise ValueError(f"{n_test} test rows are too few")
    ends = np.arange(need - 1, n_train)  # local row numbers of the used train rows
    ends = ends[(skip + ends + 1) % gap == 0]
    return Plan(n_train_total, n_train, n_test, n_fit, fit_windows=int((ends < n_fit).sum()),
                val_windows=int((ends >= n_fit).sum()), last_window_seq=n_train_total + n_test - 1)


def incident_points(anomalies, seq_of, first_seq: int, n: int) -> np.ndarray:
    """0/1 per point ``first_seq .. first_seq + n - 1``: inside one of the incidents.

    An incident covers the points from its start (the row before its first window's newest ``gap``
    rows: ``start_ts``) exclusive to its last window over threshold (``end_ts``; ``last_ts`` while open).
    """
    pred = np.zeros(n, np.int8)
    for a in anomalies:
        lo = seq_of(a.start_ts) + 1
        hi = seq_of(a.end_ts if a.end_ts is not None else a.last_ts)
        lo, hi = max(lo, first_seq), min(hi, first_seq + n - 1)
        if hi >= lo:
            pred[lo - first_seq: hi - first_seq + 1] = 1
    return pred


# ------------------------------------------------------------------------------- running it

def service_commands(plan: Plan, work: Path, bootstrap: str, prefix: str, *, q: float, fence: float,
                     security: KafkaSecurity | None = None) -> dict:
    """The pipeline's transforms (osad.pipeline, their state in ``work``), each set to its part of ``osad
    evaluate``'s protocol: the featurizer scales with the replay's train ranges, the detector fits compressed
    sensing on the train head's windows, the alerter its POT threshold (``q``, ``fence``) on the tail's, and
    an incident spans the windows over the threshold. Returns service name -> command line."""
    protocol = {
        FEATURIZER.name: ["--ranges", str(work / "ranges.json")],
        DETECTOR.name: ["--cs-calibrate", str(plan.fit_windows), "--cs-handover", "0"],
        ALERTER.name: ["--calibration-scores", str(plan.val_windows), "--q", str(q), "--calibration-fence", str(fence),
                       "--arm-scores", "0", "--open-after", "1", "--close-after", "1"],
    }
    return {s.name: command_line(s, state=str(work), bootstrap=bootstrap, prefix=prefix, security=security,
                                 overrides=protocol.get(s.name, ())) for s in TRANSFORMS}


def replay_args(cfg: AgreementConfig, plan: Plan, bootstrap: str, prefix: str,
                security: KafkaSecurity | None = None) -> list[str]:
    """``osad replay``'s arguments: the used train rows, then the test rows, of the entity."""
    return ["replay", cfg.dir, *connection(bootstrap, prefix, security), "--entity", cfg.entity, "--split", "both",
            "--skip", str(plan.skip), "--limit", str(plan.n_train + plan.n_test)]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Services:
    """Child processes, each logging to its own file; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, log_dir: Path, env: dict):
        self.log_dir, self.env, self.procs = log_dir, env, {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        p = self.procs[name] = start_logged(cmd, self.log_dir / f"{name}.log", self.env)
        return p

    def check(self) -> None:
        for name, p in self.procs.items():
            code = p.poll()
            if code not in (None, 0) or (code == 0 and name != "replay"):
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(f"{name} exited with code {code}:\n" + "\n".join(tail))

    def stop(self, timeout_s: float = 20.0) -> None:
        stop_all(self.procs.values(), timeout_s)


def run(cfg: AgreementConfig) -> int:
    from osad.core import metrics as M
    from osad.core.datasets import load_entity
    from osad.core.signature import span
    from osad.detector.evaluate import EvalConfig, evaluate_entity

    ev0 = EvalConfig()
    ent = load_entity(cfg.dir, cfg.entity)
    if ent.test is None or ent.test_label is None:
        print(f"osad agreement: {ent.entity_id} has no test/ and test_label/ files", file=sys.stderr)
        return 2
    need = span(ev0.scales, ev0.gap, ev0.step)
    plan = make_plan(ent.train.shape[0], ent.test.shape[0], cfg.limit_train, cfg.limit_test,
                     gap=ev0.gap, need=need, val_fraction=ev0.val_fraction)
    _say(f"osad agreement: {ent.entity_id}: train rows {plan.skip}..{plan.n_train_total - 1} "
         f"({plan.n_train}: head {plan.n_fit} = {plan.fit_windows} windows, tail {plan.n_train - plan.n_fit} = "
         f"{plan.val_windows} windows), test rows 0..{plan.n_test - 1}")

    t0 = time.monotonic()
    _say("offline: osad evaluate's protocol ...")
    ev = EvalConfig(limit_train=plan.n_train, limit_test=plan.n_test)
    off = evaluate_entity(cfg.dir, cfg.entity, ["cs"], ev, keep_scores=True)
    off_cs, off_points = off["models"]["cs"], off["_arrays"]["cs"]
    _say(f"offline: deployed_f1 {off_cs['deployed_f1']:.4f} at threshold {off_cs['threshold']:.6g} "
         f"({time.monotonic() - t0:.0f} s)")

    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="osad-agreement-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        stream = _stream(cfg, plan, ent, work)
    finally:
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    labels = ent.test_label[: plan.n_test]
    stream_f1 = M.f1_at(stream["pred"].astype(float), labels, 0.5)
    # the same points through the streamed window scores and the alerter's threshold (no incident logic)
    s_points = stream["point_scores"]
    thr = stream["threshold"]
    s_f1 = M.f1_at(np.nan_to_num(s_points, nan=-np.inf), labels, thr)["f1"] if thr is not None else float("nan")
    both = ~np.isnan(s_points)
    rel = np.abs(s_points[both] - off_points[both]) / np.maximum(np.abs(off_points[both]), 1e-9)
    result = {
        "entity": ent.entity_id, "model": "cs", "plan": plan.__dict__,
        "offline": {"deployed_f1": off_cs["deployed_f1"], "threshold": off_cs["threshold"],
                    "precision": off_cs["deployed_precision"], "recall": off_cs["deployed_recall"],
                    "model_id": off_cs["model_id"]},
        "streaming": {"deployed_f1": stream_f1["f1"], "precision": stream_f1["precision"],
                      "recall": stream_f1["recall"], "threshold": thr, "model_id": stream["model_id"],
                      "incidents": stream["incidents"], "scores": stream["n_scores"],
                      "deployed_f1_from_scores": s_f1, "wall_s": stream["wall_s"]},
        "difference": abs(stream_f1["f1"] - off_cs["deployed_f1"]),
        "score_agreement": {"points_compared": int(both.sum()),
                            "max_rel_diff": float(rel.max()) if rel.size else None,
                            "median_rel_diff": float(np.median(rel)) if rel.size else None},
        "tolerance": cfg.tolerance,
    }
    result["agree"] = bool(result["difference"] <= cfg.tolerance)
    _print(result)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2, default=float))
    return 0 if result["agree"] else 1


def _stream(cfg: AgreementConfig, plan: Plan, ent, work: Path) -> dict:
    """Replay through the real services; returns predictions, point scores and the threshold used."""
    from osad.alerter.report import Collected, load_kafka
    from osad.alerter.store import open_store
    from osad.detector.evaluate import EvalConfig
    from osad.runtime.broker import EmbeddedBroker, free_port
    from osad.runtime.kafka import ensure_topics
    from osad.schemas import SCORES

    ev = EvalConfig()  # the offline side's threshold rule, which the alerter must apply too

    prefix = f"agree{uuid.uuid4().hex[:8]}."  # topics of their own, also on a shared --bootstrap
    security = cfg.security if cfg.bootstrap else None  # the embedded broker speaks plaintext
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(security.secret_env() if security else {}))
    broker = None
    bootstrap = cfg.bootstrap
    if not bootstrap:
        broker = EmbeddedBroker(port=free_port(), log_file=str(work / "broker.log")).start()
        bootstrap = broker.bootstrap
    svc = _Services(work, env)
    t0 = time.monotonic()
    try:
        ensure_topics(bootstrap, prefix=prefix, security=security)
        replay = replay_args(cfg, plan, bootstrap, prefix, security)
        subprocess.run(osad(*replay, "--dry-run", "--write-ranges", str(work / "ranges.json")), env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, cmd in service_commands(plan, work, bootstrap, prefix, q=ev.q, fence=ev.fence,
                                          security=security).items():
            svc.start(name, cmd)
        svc.start("replay", osad(*replay))
        _say(f"streaming: replaying {plan.n_train + plan.n_test} rows through {', '.join(s.name for s in TRANSFORMS)} "
             f"on {bootstrap} (logs in {work}) ...")
        store_url = ALERTER.value("--store", str(work))
        store = _wait_scored(svc, store_url, ent.entity_id, plan.last_window_seq, cfg.timeout_s, open_store)
        try:
            state = store.load_state(ent.entity_id) or {}
            anomalies = store.list(entity=ent.entity_id, limit=10_000_000)
        finally:
            store.close()
        wall = time.monotonic() - t0
        got = Collected(ent.entity_id)
        load_kafka(bootstrap, got, (SCORES,), prefix=prefix, idle_ms=3000, security=security)
    finally:
        svc.stop()
        if broker:
            broker.stop()
    fitted = [m for m in (state.get("streams") or {}) if ":fitted:" in m]
    model_id = fitted[0] if fitted else None
    st = (state.get("streams") or {}).get(model_id) or {}
    thr = st.get("judged_threshold", st.get("threshold"))
    interval = ent.interval_s
    from osad.collector.replay import DEFAULT_START_TS as start_ts

    def seq_of(ts: float) -> int:
        return int(round((ts - start_ts) / interval)) - 1

    pred = incident_points(anomalies, seq_of, plan.test_seq0, plan.n_test)
    point_scores = np.full(plan.n_test, np.nan)
    n_scores = 0
    for s in got.scores:
        if s.model_id != model_id:
            continue
        n_scores += 1
        lo, hi = s.window_end_seq - s.gap + 1 - plan.test_seq0, s.window_end_seq - plan.test_seq0
        lo, hi = max(lo, 0), min(hi, plan.n_test - 1)
        if hi >= lo:
            point_scores[lo: hi + 1] = s.score
    return {"pred": pred, "point_scores": point_scores, "threshold": thr, "model_id": model_id,
            "incidents": len(anomalies), "n_scores": n_scores, "wall_s": round(wall, 1)}


def _wait_scored(svc: _Services, store_url: str, entity_id: str, last_seq: int, timeout_s: float, open_store):
    """Poll the alerter's store until it has judged the entity's last window; returns the open store."""
    deadline = time.monotonic() + timeout_s
    last_report, store = 0.0, None
    while True:
        svc.check()
        if store is None and Path(store_url[len("sqlite:///"):]).exists():
            store = open_store(store_url, readonly=True)
        seen = -1
        if store is not None:
            streams = (store.load_state(entity_id) or {}).get("streams") or {}
            seen = max((s.get("last_seq") or -1 for m, s in streams.items() if ":fitted:" in m), default=-1)
            if seen >= last_seq:
                return store
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"the pipeline did not score window {last_seq} within {timeout_s:.0f} s "
                               f"(last judged: {seen}); see the logs")
        if now - last_report > 10:
            last_report = now
            _say(f"  ... alerter has judged windows up to seq {seen} of {last_seq}")
        time.sleep(0.5)


def _print(r: dict) -> None:
    off, st = r["offline"], r["streaming"]
    sa = r["score_agreement"]
    lines = [
        f"entity {r['entity']}, model cs",
        "                 deployed_f1  precision  recall  threshold",
        f"offline          {off['deployed_f1']:11.4f} {off['precision']:10.4f} {off['recall']:7.4f}  {off['threshold']:.6g}",
        f"streaming        {st['deployed_f1']:11.4f} {st['precision']:10.4f} {st['recall']:7.4f}  "
        f"{st['threshold'] if st['threshold'] is None else format(st['threshold'], '.6g')}",
        f"difference       {r['difference']:11.4f}   (tolerance {r['tolerance']})  -> "
        + ("AGREE" if r["agree"] else "DISAGREE"),
        f"streamed scores vs offline: {sa['points_compared']} test points, relative difference median "
        f"{_fmt(sa['median_rel_diff'])}, max {_fmt(sa['max_rel_diff'])}; incidents {st['incidents']}, "
        f"{st['scores']} scores, pipeline wall time {st['wall_s']} s",
    ]
    print("\n".join(lines))


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2e}"
