"""Culprit and victims: one process's CPU use slows its neighbours; their deviations are its incident.

When a process starts to spin, the processes sharing its CPUs wait longer for one: their run-queue wait
and involuntary switches rise, their system calls take longer, they get less done. Their models see them
deviate, yet nothing in them changed. Such a process is a *victim* of CPU contention. Telling it from a
culprit needs the direction of each change, which contributions do not carry, so every Score carries its
window's levels (``Score.levels``: the mean of the newest ``gap`` scaled samples per feature) and each
entity learns every feature's usual level and spread from its windows under threshold (:func:`measure`;
exponentially weighted, one window weighing ``LEVEL_ALPHA``, not while an incident of the entity or its
host is open, so a fault is never learnt as usual; a deviation is clipped to ``HUBER_K`` spreads before
it is learnt, so a step under the threshold moves level and spread slowly). A window's *change* in a
feature is its level minus the usual one, in spreads (a spread is never taken below ``SPREAD_FLOOR``, a
twentieth of the featurizer's calibration range).

With ``z = contention_z`` (AlerterConfig), an entity due to open an incident is

* a **victim** (:func:`is_victim`) when its run-queue wait or involuntary switches hold a tenth of its
  evidence and rose at least ``z / 2``, its CPU use did not rise as a culprit's (less than ``z / 2`` or
  than its wait), and no other feature that holds a tenth of its evidence rose ``z / 2``, latencies
  aside (``*_time_ns``, ``*_latency_mean_ns``: time inside a system call or function includes the wait
  for a CPU);
* slowed by a **culprit** (:func:`culprit_of`): a process of the same host with an incident of its own
  open whose CPU use rose at least ``CULPRIT_FACTOR * z`` (the one that rose most).

A victim joins its culprit's incident (listed in the culprit's ``affected``, opening none of its own);
without a culprit, two victims or more at once make a host event (contention from outside the watched
processes, e.g. an unwatched process or steal time), unless a peer's CPU use rose as a culprit's does
before its incident opened (the victims wait for it); a lone victim opens nothing (it is counted,
``victim_held``). A victim leaves its culprit as soon as it is no victim any more (its own fault starts:
it then opens its own incident). A culprit's incident also names the neighbours it slows whose models
did not cross their thresholds, those whose wait rose at least ``z`` (:func:`slowed`). This is the
"culprit and victims" item of issue 13; the rule is physical (a process cannot make itself wait for a
CPU without running more), its one setting chosen without labels (docs/evaluation.md).
"""

from __future__ import annotations

import math
from array import array
from typing import Iterable

from osad.schemas import Score

from .state import EntityState, feature_index, shared_features

#: the process's own CPU use: a culprit's rises, a victim's does not
CPU_FEATURE = "on_cpu_ns"
#: what waiting for a CPU raises
WAIT_FEATURES = ("runq_wait_ns", "ctx_switches_involuntary")
#: weight of one window in the usual level and spread of each feature
LEVEL_ALPHA = 0.02
#: windows learnt before changes are measured
LEVEL_MIN_WINDOWS = 20
#: the smallest spread, in the featurizer's scaled units (its calibration range is 0..1)
SPREAD_FLOOR = 0.05
#: a culprit's CPU use rose this many times ``contention_z`` spreads (a hog's: 100 and more, seen live;
#: every process's under contention from outside: up to 4)
CULPRIT_FACTOR = 3.0
#: once armed, a window's deviation is clipped to this many spreads before it is learnt
HUBER_K = 3.0
#: a feature holding at least this share of a victim's evidence must not have risen
EVIDENCE_SHARE = 0.1


def measure(ent: EntityState, s: Score, learn: bool) -> None:
    """The newest window's change from ``ent``'s usual levels (``ent.change``, empty until
    ``LEVEL_MIN_WINDOWS`` were learnt); with ``learn`` the window then adds to the usual levels.
    Each window counts once, whichever of its models' Scores comes first; a Score whose features differ
    from those learnt starts the learning over.

    >>> ent = EntityState("h/1@2")
    >>> def s(seq, level):
    ...     return Score(entity_id="h/1@2", host="h", window_end_ts=float(seq), window_end_seq=seq, interval_s=1.0,
    ...                  gap=1, model_id="m", score=1.0, features=["a"], contributions=[1.0], levels=[level])
    >>> for i in range(LEVEL_MIN_WINDOWS):
    ...     measure(ent, s(i, 0.5 + 0.1 * (i % 2)), learn=True)
    >>> measure(ent, s(20, 1.1), learn=False); round(change_of(ent, "a"), 3)
    11.0
    """
    if s.levels is None or s.window_end_seq <= ent.level_seq:
        return
    ent.level_seq = s.window_end_seq
    if tuple(s.features) != ent.level_features:
        ent.level_features = shared_features(s.features)
        ent.level_mean, ent.level_var, ent.level_n = array("d", s.levels), array("d", [0.0] * len(s.levels)), 0
        ent.change = array("d")
        if learn:
            ent.level_n = 1
        return
    mean, var = ent.level_mean, ent.level_var
    if ent.level_n >= LEVEL_MIN_WINDOWS:
        ent.change = array("d", [round((x - m) / max(math.sqrt(v), SPREAD_FLOOR), 3)
                                 for x, m, v in zip(s.levels, mean, var)])
    else:
        ent.change = array("d")
    if not learn:
        return
    a = max(LEVEL_ALPHA, 1.0 / (ent.level_n + 1))
    armed = ent.level_n >= LEVEL_MIN_WINDOWS
    for i, x in enumerate(s.levels):
        d = x - mean[i]
        if armed:  # Huber-like: a step (a fault under its threshold yet) moves mean and spread slowly
            c = HUBER_K * max(math.sqrt(var[i]), SPREAD_FLOOR)
            d = min(max(d, -c), c)
        mean[i], var[i] = mean[i] + a * d, (1 - a) * (var[i] + a * d * d)
    ent.level_n += 1


def change_of(ent: EntityState, feature: str) -> float:
    """``ent``'s newest window's change in ``feature``, in spreads (0 when not measured)."""
    if not ent.change:
        return 0.0
    i = feature_index(ent.level_features).get(feature)
    return ent.change[i] if i is not None else 0.0


def with_changes(ent: EntityState, changes: dict[str, float]) -> EntityState:
    """``ent`` with these changes as its newest window's (for examples and tests)."""
    ent.level_features = shared_features(changes)
    ent.change = array("d", changes.values())
    return ent


def _latency(feature: str) -> bool:
    return feature.endswith("_time_ns") or feature.endswith("_latency_mean_ns")


def _wait(ent: EntityState) -> float:
    return max((change_of(ent, f) for f in WAIT_FEATURES), default=0.0)


def _cpu_as_victim(ent: EntityState, z: float) -> bool:
    """``ent``'s CPU use rose less than half a bar, or less than its wait did (contention costs CPU too:
    caches shared with the hog make the same work take longer; seen live, up to 4 spreads)."""
    cpu = change_of(ent, CPU_FEATURE)
    return cpu < CULPRIT_FACTOR * z and (cpu < z / 2 or cpu < _wait(ent))


def slowed(ent: EntityState, z: float) -> bool:
    """``ent``'s newest window waited for a CPU at least ``z`` spreads more than usual, its CPU use not
    as a culprit's (how a culprit's incident picks the neighbours it names without evidence of theirs:
    their models may stay under their thresholds)."""
    return z > 0 and _wait(ent) >= z and _cpu_as_victim(ent, z)


def is_victim(ent: EntityState, evidence: dict[str, float], z: float, recent: bool = False) -> bool:
    """Whether ``ent``'s deviation, ``evidence`` (feature -> weight of its windows over threshold), is that
    of a victim of CPU contention: its CPU use did not rise as a culprit's (:func:`_cpu_as_victim`); a wait
    feature holding ``EVIDENCE_SHARE`` of the evidence rose at least ``z / 2`` (``z / 4`` when ``recent``:
    it was a victim within its last ``open_after`` windows, and stays one while its wait ebbs); and no
    other feature holding that share rose ``z / 2``, latencies aside (time in a call includes the wait
    for a CPU).

    >>> ch = {"runq_wait_ns": 2.0, "on_cpu_ns": -0.5, "syscalls": -2.0}
    >>> is_victim(with_changes(EntityState("h/1@2"), ch), {"runq_wait_ns": 0.6, "syscalls": 0.4}, 3.0)
    True
    >>> ch["rss_anon_bytes"] = 4.0  # something of its own rose too: not only a victim
    >>> is_victim(with_changes(EntityState("h/1@2"), ch), {"runq_wait_ns": 0.5, "rss_anon_bytes": 0.5}, 3.0)
    False
    >>> ch["on_cpu_ns"] = 3.0  # it runs more: a culprit, not a victim
    >>> is_victim(with_changes(EntityState("h/1@2"), ch), {"runq_wait_ns": 1.0}, 3.0)
    False
    """
    if z <= 0 or not _cpu_as_victim(ent, z):
        return False
    share = EVIDENCE_SHARE * sum(evidence.values())
    bar = z / 4 if recent else z / 2
    waits = any(evidence.get(f, 0.0) >= share and change_of(ent, f) >= bar for f in WAIT_FEATURES)
    return waits and not any(w >= share and change_of(ent, f) >= z / 2 for f, w in evidence.items()
                             if f not in WAIT_FEATURES and f != CPU_FEATURE and not _latency(f))


def is_culprit(ent: EntityState, z: float, forming: bool = False) -> bool:
    """``ent``'s CPU use rose at least ``CULPRIT_FACTOR * z`` spreads and it has an incident of its own
    open (or, with ``forming``, may have one soon)."""
    return (z > 0 and (forming or ent.incident is not None)
            and change_of(ent, CPU_FEATURE) >= CULPRIT_FACTOR * z)


def culprit_of(victim: EntityState, peers: Iterable[EntityState], z: float, since: float,
               forming: bool = False) -> EntityState | None:
    """The peer (reporting at or after ``since``) whose CPU use rose most, among the culprits (with
    ``forming``, also those whose incident has not opened yet: a victim waits for it)."""
    found = [p for p in peers if p is not victim and p.last_ts >= since and is_culprit(p, z, forming)]
    return max(found, key=lambda p: (change_of(p, CPU_FEATURE), p.entity_id)) if found else None


def evidence_of_pending(ent: EntityState) -> dict[str, float]:
    """The summed weights of ``ent``'s pending windows over threshold (what its incident would open with)."""
    out: dict[str, float] = {}
    for st in ent.streams.values():
        for ev in st.pending:
            for f, w in ev.weights.items():
                out[f] = out.get(f, 0.0) + w
    return out
