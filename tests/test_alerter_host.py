"""Host-wide events in the alerter's pure core: several processes of one host over threshold together
with the same root-cause profile make one host event, not one incident each; a process whose
profile differs (the culprit) keeps its own incident."""

import numpy as np

from osad.alerter.core import AlerterConfig, Engine, host_key
from osad.schemas import Score

FEATS = ["on_cpu_ns", "runq_wait_ns", "rss_anon_bytes", "write_bytes", "net_tx_bytes", "forks"]
MODEL = "cs-calibrated:v1"
CALIB = 20
RUNQ = (0.3, 1.0, 0, 0, 0, 0)  # a process kept waiting for a CPU


def one_hot(j):
    return tuple(1.0 if k == j else 0.0 for k in range(len(FEATS)))


def sc(pid, t, value, contrib=(1.0,) * len(FEATS), host="h"):
    """Score of process ``pid``'s window ending at tick t (one window per 2.5 s, windows aligned)."""
    return Score(entity_id=f"{host}/{pid}@7", host=host, pid=pid, comm=f"w{pid}", window_end_ts=1e9 + 2.5 * t,
                 window_end_seq=100 + 5 * t, interval_s=0.5, gap=5, model_id=MODEL, score=float(value),
                 features=FEATS, contributions=list(contrib))


def calibrated(pids, **cfg):
    eng = Engine(AlerterConfig(calibration_scores=CALIB, open_after=3, close_after=3, **cfg))
    rng = np.random.default_rng(0)
    out = [a for t in range(CALIB) for p in pids for a in eng.observe(sc(p, t, 1.0 + 0.1 * rng.random()), 0.0)]
    assert out == []
    return eng


def run(eng, ticks, behaviour, pids=None):
    """``behaviour(pid, t) -> (score, contributions)`` for every pid (default: the engine's), ticks in order."""
    out = []
    pids = pids or sorted(e.ref["pid"] for e in eng.entities.values())
    for t in ticks:
        for p in pids:
            value, contrib = behaviour(p, t)
            out += eng.observe(sc(p, t, value, contrib), 0.0)
    return out


def quiet(p, t):
    return 1.0, (1.0,) * len(FEATS)


def test_processes_over_together_with_one_profile_make_one_host_event():
    pids = [1, 2, 3, 4, 5, 6, 7]
    eng = calibrated(pids)
    out = run(eng, range(CALIB, CALIB + 6), lambda p, t: (3.0 + 0.1 * p, RUNQ))
    out += run(eng, range(CALIB + 6, CALIB + 12), quiet)
    assert {a.scope for a in out} == {"host"}, [a.summary for a in out]
    assert len({a.anomaly_id for a in out}) == 1
    assert [a.status for a in out][0] == "open" and out[-1].status == "closed"
    assert [a.revision for a in out] == list(range(len(out)))
    first = out[0]
    assert first.entity_id == host_key("h") and first.host == "h" and first.pid is None
    assert sorted(first.members) == sorted(f"h/{p}@7" for p in pids)
    assert first.root_causes[0].feature == "runq_wait_ns"
    assert "7 watched processes" in first.summary and "w3 (3)" in first.summary
    assert eng.open_incidents() == 0 and all(e.host_event is None for e in eng.entities.values())


def test_processes_over_together_with_different_profiles_each_get_their_own_incident():
    """Seven faults at once (the end-to-end test does this): timing alone is no common cause."""
    pids = [1, 2, 3, 4, 5, 6]
    eng = calibrated(pids)
    out = run(eng, range(CALIB, CALIB + 4), lambda p, t: (5.0, one_hot(p - 1)))
    opened = [a for a in out if a.status == "open"]
    assert {a.scope for a in out} == {"entity"}
    assert sorted(a.pid for a in opened) == pids
    assert {a.pid: a.root_causes[0].feature for a in opened} == {p: FEATS[p - 1] for p in pids}


def test_the_culprit_keeps_its_own_incident_while_its_victims_make_a_host_event():
    """One process spins on the CPU; the others wait in the run queue because of it."""
    pids = [1, 2, 3, 4, 5]
    eng = calibrated(pids)
    out = run(eng, range(CALIB, CALIB + 5),
              lambda p, t: (20.0, one_hot(0)) if p == 1 else (2.0, RUNQ))
    opened = [a for a in out if a.status == "open"]
    assert len(opened) == 2, [a.summary for a in opened]
    own = next(a for a in opened if a.scope == "entity")
    host = next(a for a in opened if a.scope == "host")
    assert own.pid == 1 and own.root_causes[0].feature == "on_cpu_ns"
    assert sorted(host.members) == [f"h/{p}@7" for p in (2, 3, 4, 5)]
    assert host.root_causes[0].feature == "runq_wait_ns"


def test_a_member_whose_profile_changes_leaves_the_host_event_with_its_own_incident():
    pids = [1, 2, 3, 4]
    eng = calibrated(pids)
    out = run(eng, range(CALIB, CALIB + 4), lambda p, t: (2.0, RUNQ))
    assert [a.scope for a in out if a.status == "open"] == ["host"]
    # process 4 starts leaking memory while the host is still contended
    out = run(eng, range(CALIB + 4, CALIB + 9),
              lambda p, t: (8.0, one_hot(2)) if p == 4 else (2.0, RUNQ))
    own = [a for a in out if a.scope == "entity"]
    assert own and own[0].status == "open" and own[0].pid == 4
    assert own[0].root_causes[0].feature == "rss_anon_bytes"
    assert eng.entities["h/4@7"].host_event is None
    assert eng.hosts["h"].incident is not None  # the others are still in it


def test_one_process_over_while_most_show_the_same_unusual_lead_is_a_host_event():
    """Contention seen end to end: every process's run-queue wait leads its contributions at once,
    all scores rise, one crosses its threshold. Usually on_cpu_ns leads (the calibration here)."""
    pids = [1, 2, 3, 4, 5, 6, 7]
    eng = calibrated(pids)
    out = run(eng, range(CALIB, CALIB + 6), lambda p, t: (2.0 if p == 1 else 0.9, RUNQ))
    assert [(a.status, a.scope) for a in out][:1] == [("open", "host")] and {a.scope for a in out} == {"host"}
    assert out[0].root_causes[0].feature == "runq_wait_ns" and len(out[0].members) == 7


def test_a_cpu_spinner_among_quiet_processes_keeps_its_own_incident():
    """The others' windows are led by on_cpu_ns too, but that is what usually leads them: no lift."""
    pids = [1, 2, 3, 4, 5, 6, 7]
    eng = calibrated(pids)
    out = run(eng, range(CALIB, CALIB + 4), lambda p, t: (20.0, one_hot(0)) if p == 1 else quiet(p, t))
    assert [(a.status, a.scope, a.pid) for a in out] == [("open", "entity", 1)]
    assert out[0].root_causes[0].feature == "on_cpu_ns"


def test_too_few_processes_or_too_small_a_share_stay_per_process():
    eng = calibrated([1, 2])  # fewer than host_min_entities (3) watched on the host
    out = run(eng, range(CALIB, CALIB + 4), lambda p, t: (2.0, RUNQ))
    assert sorted(a.pid for a in out if a.status == "open") == [1, 2] and {a.scope for a in out} == {"entity"}

    eng = calibrated(range(1, 11))  # 3 of 10 alike: under the share (half)
    out = run(eng, range(CALIB, CALIB + 6), lambda p, t: (2.0, RUNQ) if p <= 3 else (1.0, (1.0,) * len(FEATS)))
    opened = [a for a in out if a.status == "open"]
    assert sorted(a.pid for a in opened) == [1, 2, 3] and {a.scope for a in out} == {"entity"}
    # three alike could be the start of a host event: each waited host_hold (2) windows past open_after
    # (3), and its incident still starts at its first window over
    assert eng.counters["held"] == 3 * 2
    assert {a.first_window_seq for a in opened} == {sc(1, CALIB, 0).window_end_seq}
    assert {a.windows_over for a in opened} == {5}

    eng = calibrated(range(1, 21))  # 3 of 20 alike: not even half of the 10 a host event needs, no waiting
    out = run(eng, range(CALIB, CALIB + 3), lambda p, t: (2.0, RUNQ) if p <= 3 else (1.0, (1.0,) * len(FEATS)))
    assert sorted(a.pid for a in out if a.status == "open") == [1, 2, 3] and eng.counters["held"] == 0


def test_the_first_process_to_cross_waits_for_a_host_event_that_is_forming():
    """Contention as seen end to end: the process with the lowest threshold crosses first; run-queue
    wait starts to lead the windows of two others at once, and of the other four two windows later.
    It joins the host event instead of opening an incident of its own; with ``host_hold 0`` it does not
    wait."""
    def contention(p, t):
        if p == 1:
            return 2.0, RUNQ
        return (0.9, RUNQ) if t >= CALIB + (0 if p <= 3 else 2) else quiet(p, t)

    pids = [1, 2, 3, 4, 5, 6, 7]
    eng = calibrated(pids)
    out = run(eng, range(CALIB, CALIB + 6), contention)
    assert [(a.status, a.scope) for a in out][:1] == [("open", "host")] and {a.scope for a in out} == {"host"}
    assert len(out[0].members) == 7 and eng.counters["held"] >= 1
    assert out[0].start_ts == sc(1, CALIB, 0).window_end_ts - 2.5  # from pid 1's first window over

    eng = calibrated(pids, host_hold=0)
    out = run(eng, range(CALIB, CALIB + 6), contention)
    assert [(a.status, a.scope, a.pid) for a in out if a.status == "open"][0] == ("open", "entity", 1)


def test_host_events_can_be_turned_off():
    eng = calibrated([1, 2, 3, 4], host_min_entities=0)
    out = run(eng, range(CALIB, CALIB + 4), lambda p, t: (2.0, RUNQ))
    assert sorted(a.pid for a in out if a.status == "open") == [1, 2, 3, 4] and not eng.hosts


def test_redelivered_scores_and_a_restart_create_no_second_host_event():
    pids = [1, 2, 3, 4]
    eng = calibrated(pids)
    scores = [sc(p, t, 2.0, RUNQ) for t in range(CALIB, CALIB + 4) for p in pids]
    first = [a for s in scores for a in eng.observe(s, 0.0)]
    ids = {a.anomaly_id for a in first}
    assert len(ids) == 1 and first[0].scope == "host"
    assert [a for s in scores for a in eng.observe(s, 0.0)] == []  # the same Scores again
    # restart from the persisted states, mid-event
    saved = eng.take_dirty()
    assert host_key("h") in saved and saved[host_key("h")]["incident"]
    again = Engine(eng.cfg, load=saved.get)
    assert [a for s in scores for a in again.observe(s, 0.0)] == []
    out = run(again, range(CALIB + 4, CALIB + 10), quiet)
    assert [a.status for a in out] == ["closed"] and out[0].anomaly_id in ids
    assert out[0].revision == max(a.revision for a in first) + 1  # the next revision of the same event


def test_a_host_event_nobody_holds_is_closed_by_the_sweep():
    pids = [1, 2, 3]
    eng = calibrated(pids)
    opened = run(eng, range(CALIB, CALIB + 4), lambda p, t: (2.0, RUNQ))
    saved = eng.take_dirty()
    other = Engine(eng.cfg)
    out = other.close_stale(saved[host_key("h")])
    assert [(a.status, a.anomaly_id, a.scope) for a in out] == [("closed", opened[0].anomaly_id, "host")]
    assert "no scores" in out[0].summary
    assert other.take_dirty()[host_key("h")]["incident"] is None
    assert eng.close_stale(saved[host_key("h")]) == []  # held here: nothing


def test_host_event_state_goes_through_the_sqlite_store(tmp_path):
    """Persisted like an entity's state (key host:<host>), found again by a restart and by the sweep."""
    from osad.alerter.store import open_store

    pids = [1, 2, 3]
    eng = calibrated(pids)
    opened = run(eng, range(CALIB, CALIB + 4), lambda p, t: (2.0, RUNQ))
    store = open_store(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        store.save(opened, eng.take_dirty(), now=1000.0)
        assert store.load_state(host_key("h"))["incident"]["anomaly_id"] == opened[0].anomaly_id
        restarted = Engine(eng.cfg, load=store.load_state)
        out = run(restarted, range(CALIB + 4, CALIB + 10), quiet, pids)
        assert [(a.status, a.anomaly_id) for a in out] == [("closed", opened[0].anomaly_id)]
        stale = store.stale_open_states(before=2000.0)
        assert [s["entity_id"] for s in stale if s.get("kind") == "host"] == [host_key("h")]
        swept = Engine(eng.cfg).close_stale(next(s for s in stale if s.get("kind") == "host"))
        assert [a.anomaly_id for a in swept] == [opened[0].anomaly_id]
    finally:
        store.close()
