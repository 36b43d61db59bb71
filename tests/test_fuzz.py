"""Fuzzing the services' input paths (issue #15, item 4).

Two parts:

* **Pure** (no broker): hypothesis feeds ``schemas.decode`` arbitrary bytes, arbitrary JSON values,
  valid messages with fields replaced by arbitrary JSON, and SignatureWindow frames with arbitrary headers
  and tails. Decoding must return a valid message or raise :class:`~osad.schemas.WireError` (the one error
  the runner routes to the dead-letter topic), never anything else.
* **On the real broker**: the featurizer, detector and alerter run as processes, each on its own topic
  prefix, and get a seeded mix of bad messages interleaved with a good stream (and duplicates of good
  messages) on their input topic, in rounds of the same size. After each round: every service is alive and
  healthy, every bad message (and only those) is on the dead-letter topic with a reason and its source topic,
  partition and offset, its original key and bytes intact; every good message was processed (the windows,
  scores and anomalies the good stream implies are there, once where the service promises idempotence); and
  the service's RSS did not grow across the last round (see ``RSS_GROWTH_MAX``).
"""

from __future__ import annotations

import json
import math
import os
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osad.schemas import (ANOMALIES, DEADLETTER, SAMPLES, SCORES, SIGNATURES, Anomaly, Sample, Score,
                          SignatureWindow, WireError, decode, encode)

SEED = 15  # issue #15: every broker fuzz round derives its messages from (SEED, service, round)
MIB = 1024 * 1024
#: the largest message osad's clients produce and fetch (runtime/kafka.py) and docker-compose's brokers accept
LIMIT = 8 * MIB

# ------------------------------------------------------------------------------------------------
# good messages
# ------------------------------------------------------------------------------------------------

FEATS = ["on_cpu_ns", "rss_anon_bytes", "net_tx_bytes", "syscalls"]


def good_sample(eid: str, seq: int) -> Sample:
    return Sample(entity_id=eid, host="fz", pid=7, comm="fuzz", ts=1.7e9 + seq, interval_s=1.0, seq=seq,
                  metrics={"a": float(seq % 3), "b": float(seq % 5), "c": round(math.sin(seq / 3.0), 6)})


def good_window(eid: str, seq: int, n: int = 4) -> SignatureWindow:
    r = np.random.default_rng(seq)
    return SignatureWindow(entity_id=eid, host="fz", pid=7, comm="fuzz", window_end_ts=1.7e9 + seq,
                           window_end_seq=seq, interval_s=1.0, gap=10, scales=[10, 30, 60], features=FEATS[:n],
                           tri=r.random((5, 3, n * (n + 1) // 2), dtype=np.float32),
                           values=r.random((60, n), dtype=np.float32))


def good_score(eid: str, i: int, value: float, hot: int = 1) -> Score:
    contrib = [0.1, 0.1, 0.1, 0.1]
    contrib[hot] = 1.0
    seq = 100 + 10 * i
    return Score(entity_id=eid, host="fz", pid=7, comm="fuzz", window_end_ts=1.7e9 + seq, window_end_seq=seq,
                 interval_s=1.0, gap=10, model_id="cs-jumpstarter:fuzz", score=float(value), features=FEATS,
                 contributions=contrib)


def good_anomaly(eid: str) -> Anomaly:
    return Anomaly(entity_id=eid, host="fz", anomaly_id="f" * 32, status="open", severity="high", start_ts=1.7e9,
                   last_ts=1.7e9 + 10, score=3.0, threshold=1.0, models=["cs"])


# ------------------------------------------------------------------------------------------------
# bad messages: each is (label, key, value); all are rejected by decode or by the key check
# ------------------------------------------------------------------------------------------------

_HDR = struct.Struct("<4sI")

#: per JSON message type: required fields (missing one is invalid), float fields (NaN/inf are invalid),
#: fields that must not be negative, and bounded strings (with a length over the bound)
_JSON_FIELDS = {
    "sample": dict(required=["entity_id", "host", "ts", "interval_s", "seq", "metrics"],
                   floats=["ts", "interval_s"], negative={"seq": -1, "pid": -3, "interval_s": -1.0},
                   zero={"interval_s": 0.0},
                   huge={"entity_id": 513, "host": 256, "comm": 256, "cgroup": 1025, "container_id": 129},
                   wrong={"ts": "soon", "interval_s": [1.0], "seq": {"n": 1}, "metrics": [1, 2], "entity_id": 42,
                          "host": ["fz"], "pid": "seven", "comm": 3.5, "kind": "score", "schema_version": "one"}),
    "score": dict(required=["entity_id", "host", "window_end_ts", "window_end_seq", "interval_s", "gap", "model_id",
                            "score", "features", "contributions"],
                  floats=["window_end_ts", "interval_s", "score", "threshold"],
                  negative={"window_end_seq": -1, "gap": -10, "pid": -1, "interval_s": -0.5},
                  zero={"gap": 0, "interval_s": 0.0},
                  huge={"entity_id": 600, "host": 300, "comm": 300, "container_id": 200},
                  wrong={"score": "high", "threshold": [1], "features": "abc", "contributions": {"a": 1},
                         "window_end_seq": [1], "gap": "ten", "model_id": 12, "detail": [1.0], "entity_id": None,
                         "kind": "sample"}),
}


def _json_bad(kind: str, good: dict, rng) -> list[tuple[str, bytes]]:
    """Valid-looking JSON objects, each wrong in one way."""
    spec = _JSON_FIELDS[kind]
    out = []

    def mod(label, **changes):
        d = dict(good)
        d.update(changes)
        out.append((label, json.dumps(d).encode()))

    field = rng.choice(spec["required"])
    d = dict(good)
    del d[field]
    out.append((f"missing:{field}", json.dumps(d).encode()))
    f, v = list(spec["wrong"].items())[rng.integers(len(spec["wrong"]))]
    mod(f"wrong-type:{f}", **{f: v})
    mod("extra-field", **{rng.choice(["bogus", "signatures", "Entity_Id", "x" * 40]): 1})
    f = rng.choice(spec["floats"])
    nonfinite = [float("nan"), float("inf"), float("-inf")][rng.integers(3)]
    mod(f"nonfinite:{f}", **{f: nonfinite})  # json.dumps writes NaN / Infinity, as a careless producer would
    f, v = list(spec["negative"].items())[rng.integers(len(spec["negative"]))]
    mod(f"negative:{f}", **{f: v})
    f, v = list(spec["zero"].items())[rng.integers(len(spec["zero"]))]
    mod(f"zero:{f}", **{f: v})
    f, n = list(spec["huge"].items())[rng.integers(len(spec["huge"]))]
    mod(f"huge-string:{f}", **{f: "x" * (n + int(rng.integers(0, 100_000)))})
    mod("bad-version", schema_version=int(rng.choice([0, 2, 99, -1])))
    if kind == "sample":
        mod("nonfinite:metric", metrics={**good["metrics"], "b": float(rng.choice([math.nan, math.inf]))})
        mod("wrong-type:metric", metrics={**good["metrics"], "b": "lots"})
    else:
        mod("contributions-length", contributions=good["contributions"][:-1])
        mod("nonfinite:contribution", contributions=[math.nan] + good["contributions"][1:])
        mod("nonfinite:detail", detail={"broken_w10": math.inf})
    out.append(("not-an-object", json.dumps([[good], 1, "x", None, 3.5][rng.integers(5)]).encode()))
    out.append(("invalid-utf8", json.dumps(good).encode().replace(b'"fz"', b'"f\xff\xfe"', 1)))
    out.append(("deep-nesting", b"[" * 50_000 + b"]" * 50_000))
    return out


def _frame(header, tail: bytes = b"", hlen: int | None = None, magic: bytes = b"OSW\x01") -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return _HDR.pack(magic, len(hb) if hlen is None else hlen) + hb + tail


def _window_bad(good: SignatureWindow, rng) -> list[tuple[str, bytes]]:
    """SignatureWindow frames wrong in one way (header, lengths, arrays)."""
    raw = encode(good)
    _, hlen = _HDR.unpack_from(raw)
    hdr = json.loads(raw[8:8 + hlen])
    arrays = raw[8 + hlen:]
    n_arr = len(arrays) // 4
    out = [
        ("bad-magic", b"OSX\x01" + raw[4:]),
        ("frame-version", b"OSW\x02" + raw[4:]),
        ("header-length-overflow", raw[:4] + struct.pack("<I", 0xFFFFFFFF) + raw[8:]),
        ("header-length-short", raw[:4] + struct.pack("<I", max(1, hlen - int(rng.integers(1, hlen)))) + raw[8:]),
        ("header-not-json", _frame(b"{not json" + bytes(rng.integers(0, 256, 20, dtype=np.uint8)), arrays)),
        ("header-not-object", _frame([[hdr], None, "x", 5, True][rng.integers(5)], arrays)),
        ("header-deep-nesting", _frame(b"[" * 50_000 + b"]" * 50_000, arrays)),
        ("header-missing-step", _frame({k: v for k, v in hdr.items() if k != "step"}, arrays)),
        ("header-step-inf", _frame(json.dumps({**hdr, "step": math.inf}).encode(), arrays)),
        ("header-step-nan", _frame(json.dumps({**hdr, "step": math.nan}).encode(), arrays)),
        ("header-step-zero", _frame({**hdr, "step": 0}, arrays)),
        ("header-step-list", _frame({**hdr, "step": [5]}, arrays)),
        ("header-scale-inf", _frame(json.dumps({**hdr, "scales": [10, 30, math.inf]}).encode(), arrays)),
        ("header-scales-empty", _frame({**hdr, "scales": []}, arrays)),
        ("header-scales-negative", _frame({**hdr, "scales": [-60, 30, 60]}, arrays)),
        ("header-features-string", _frame({**hdr, "features": "abcd"}, arrays)),
        ("header-features-empty", _frame({**hdr, "features": []}, b"")),
        ("header-features-numbers", _frame({**hdr, "features": [1, 2, 3, 4]}, arrays)),
        ("header-array-key", _frame({**hdr, ["tri", "values"][rng.integers(2)]: 1}, arrays)),
        ("header-extra", _frame({**hdr, "bogus": True}, arrays)),
        ("header-version", _frame({**hdr, "schema_version": 2}, arrays)),
        ("header-negative-seq", _frame({**hdr, "window_end_seq": -5}, arrays)),
        ("header-gap-zero", _frame({**hdr, "gap": 0}, arrays)),
        ("header-nonfinite-ts", _frame(json.dumps({**hdr, "window_end_ts": math.nan}).encode(), arrays)),
        ("header-huge-entity", _frame({**hdr, "entity_id": "e" * 5000}, arrays)),
        ("header-huge-step", _frame({**hdr, "step": 10 ** 12}, arrays)),
        ("arrays-short", _frame(hdr, arrays[:-4 * int(rng.integers(1, 50))])),
        ("arrays-long", _frame(hdr, arrays + b"\0" * (4 * int(rng.integers(1, 50))))),
        ("arrays-odd", _frame(hdr, arrays + b"\0")),
        ("arrays-nonfinite", _frame(hdr, _poke(arrays, int(rng.integers(n_arr)),
                                               [math.nan, math.inf, -math.inf][rng.integers(3)]))),
        ("json-not-frame", encode(good_sample(good.entity_id, 1))),
    ]
    return out


def _poke(arrays: bytes, i: int, x: float) -> bytes:
    b = bytearray(arrays)
    struct.pack_into("<f", b, 4 * i, x)
    return bytes(b)


def bad_messages(kind: str, rng, eid: str) -> list[tuple[str, bytes | None, bytes | None]]:
    """One round's bad messages for the input topic of ``kind`` (``sample``, ``window`` or ``score``)."""
    good = {"sample": lambda: good_sample(eid, 3), "window": lambda: good_window(eid, 59),
            "score": lambda: good_score(eid, 3, 1.0)}[kind]()
    raw = encode(good)
    vals: list[tuple[str, bytes | None]] = []
    for _ in range(12):
        vals.append(("random-bytes", rng.bytes(int(rng.integers(1, 3000)))))
    vals.append(("random-bytes-magic", b"OSW\x01" + rng.bytes(int(rng.integers(4, 3000)))))
    vals.append(("empty", b""))
    vals.append(("tombstone", None))
    for cut in sorted(rng.choice(np.arange(1, len(raw)), size=min(10, len(raw) - 1), replace=False)):
        vals.append((f"truncated@{cut}", raw[:cut]))
    if kind == "window":
        vals += _window_bad(good, rng)
        wrong = [encode(good_sample(eid, 4)), encode(good_score(eid, 4, 1.0)), encode(good_anomaly(eid))]
    else:
        vals += _json_bad(kind, json.loads(raw), rng)
        other = {"sample": lambda: good_score(eid, 4, 1.0), "score": lambda: good_sample(eid, 4)}[kind]()
        wrong = [encode(other), encode(good_window(eid, 69)), encode(good_anomaly(eid))]
    vals += [("wrong-kind", w) for w in wrong]
    vals.append(("oversized-near-limit", rng.bytes(LIMIT - 64 * 1024)))
    vals.append(("oversized-over-limit", rng.bytes(LIMIT + 64 * 1024)))
    keys = [eid.encode(), None, b"fz/other", rng.bytes(8)]
    out = [(label, keys[int(rng.integers(len(keys)))], v) for label, v in vals]
    out = [(label, k if k is not None or v is not None else eid.encode(), v) for label, k, v in out]  # a tombstone has a key
    # the oversized pair on one partition every round: the services' fetches then look alike from round to round
    out = [(label, eid.encode() if label.startswith("oversized") else k, v) for label, k, v in out]
    # valid messages whose key is not their entity id: they would land on another entity's partition
    side = f"{eid}-side"
    side_msg = {"sample": lambda s: good_sample(side, s), "window": lambda s: good_window(side, s),
                "score": lambda s: good_score(side, s, 1.0)}[kind]
    out.append(("key-mismatch", b"fz/someone-else", encode(side_msg(9))))
    out.append(("key-missing", None, encode(side_msg(19))))
    out.append(("key-case", side.upper().encode(), encode(side_msg(29))))
    if kind == "window":  # valid, but no model can score it: the detector refuses it when it arrives
        one = SignatureWindow(**{**good_window(f"{eid}-one-row", 9).model_dump(exclude={"tri", "values"}),
                                 "scales": [1]}, tri=np.zeros((5, 1, 10), np.float32), values=np.ones((1, 4), np.float32))
        out.append(("unscorable:one-row", one.entity_id.encode(), encode(one)))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


MODELS = {"sample": Sample, "window": SignatureWindow, "score": Score}


def rejected(kind: str, key: bytes | None, value: bytes | None, label: str = "") -> str | None:
    """Why the runner rejects this record (decode or key check), or None if it would accept it. An
    ``unscorable`` message decodes; the detector's transform refuses it (the runner dead-letters that too)."""
    from osad.runtime.service import check_key

    try:
        check_key(key, decode(value, MODELS[kind]))
    except WireError as e:
        return str(e)
    if label.startswith("unscorable"):
        return "refused by the transform"
    return None


# ------------------------------------------------------------------------------------------------
# pure: hypothesis on the decode path (no broker)
# ------------------------------------------------------------------------------------------------

_ALL_MODELS = (Sample, SignatureWindow, Score, Anomaly)
_json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
                 | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(_json_scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=12), c,
                                                                                              max_size=5), max_leaves=25)
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decodes_or_wire_error(data, model):
    """decode returns a valid ``model`` (whose encoding decodes to an equal one) or raises WireError only."""
    try:
        msg = decode(data, model)
    except WireError as e:
        assert str(e)
        return None
    assert isinstance(msg, model)
    again = decode(encode(msg), model)
    if model is SignatureWindow:
        assert again.model_dump(exclude={"tri", "values"}) == msg.model_dump(exclude={"tri", "values"})
        assert np.isfinite(msg.tri).all() and np.isfinite(msg.values).all()
    else:
        assert again == msg
    return msg


@_FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_raise_wire_error(data):
    for model in _ALL_MODELS:
        _decodes_or_wire_error(data, model)
        _decodes_or_wire_error(b"OSW\x01" + data, model)


@_FUZZ
@given(json_values)
def test_arbitrary_json_decodes_or_raises_wire_error(value):
    data = json.dumps(value).encode()  # NaN and Infinity tokens included, as json.dumps writes them
    for model in _ALL_MODELS:
        _decodes_or_wire_error(data, model)


_GOOD = {Sample: lambda: good_sample("h/1@2", 3), Score: lambda: good_score("h/1@2", 3, 1.0),
         Anomaly: lambda: good_anomaly("h/1@2")}


@_FUZZ
@given(st.sampled_from([Sample, Score, Anomaly]), st.data())
def test_valid_json_messages_with_arbitrary_fields_decode_or_raise_wire_error(model, data):
    d = json.loads(encode(_GOOD[model]()))
    keys = sorted(d) + ["extra", "kind", "schema_version"]
    for k in data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=4, unique=True)):
        if data.draw(st.booleans(), label=f"drop {k}") and k in d:
            del d[k]
        else:
            d[k] = data.draw(json_values, label=k)
    msg = _decodes_or_wire_error(json.dumps(d).encode(), model)
    if msg is not None:  # accepted: then every number in it is finite (JSON has no NaN; the contract rejects it)
        assert all(math.isfinite(x) for x in _floats(msg.model_dump()))


def _floats(v):
    if isinstance(v, float):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _floats(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _floats(x)


@_FUZZ
@given(st.data())
def test_signature_window_frames_with_arbitrary_headers_and_tails_decode_or_raise_wire_error(data):
    good = good_window("h/1@2", 59, n=2)
    raw = encode(good)
    _, hlen = _HDR.unpack_from(raw)
    hdr = json.loads(raw[8:8 + hlen])
    arrays = raw[8 + hlen:]
    how = data.draw(st.sampled_from(["fields", "header", "tail", "length", "truncate", "flip"]))
    if how == "fields":
        for k in data.draw(st.lists(st.sampled_from(sorted(hdr) + ["tri", "values", "extra"]), min_size=1,
                                    max_size=3, unique=True)):
            hdr[k] = data.draw(json_values, label=k)
        frame = _frame(json.dumps(hdr).encode(), arrays)
    elif how == "header":
        frame = _frame(json.dumps(data.draw(json_values)).encode(), data.draw(st.binary(max_size=600)))
    elif how == "tail":
        frame = _frame(hdr, data.draw(st.binary(max_size=len(arrays) + 64)))
    elif how == "length":
        frame = raw[:4] + struct.pack("<I", data.draw(st.integers(0, 2 ** 32 - 1))) + raw[8:]
    elif how == "truncate":
        frame = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:  # one byte changed anywhere (header or arrays: a float may become NaN)
        i = data.draw(st.integers(0, len(raw) - 1))
        frame = raw[:i] + bytes([data.draw(st.integers(0, 255))]) + raw[i + 1:]
    msg = _decodes_or_wire_error(frame, SignatureWindow)
    if how == "truncate":
        assert msg is None


def test_every_prefix_of_a_valid_message_is_a_wire_error():
    for model, msg in ((Sample, good_sample("h/1@2", 3)), (Score, good_score("h/1@2", 3, 1.0)),
                       (Anomaly, good_anomaly("h/1@2")), (SignatureWindow, good_window("h/1@2", 59, n=2))):
        raw = encode(msg)
        assert decode(raw, model) is not None
        for cut in range(len(raw)):
            with pytest.raises(WireError):
                decode(raw[:cut], model)


@pytest.mark.parametrize("kind", ["sample", "window", "score"])
def test_the_broker_fuzz_corpus_is_rejected_by_decode_or_key_check(kind):
    """Each bad message the broker test sends is one the runner must dead-letter (with a reason), and the
    labels cover what issue #15 asks for."""
    items = bad_messages(kind, np.random.default_rng(SEED), "fz/good")
    labels = set()
    for label, key, value in items:
        assert rejected(kind, key, value, label), f"{kind} {label} would be accepted"
        labels.add(label.split("@")[0].split(":")[0])
    assert {"random-bytes", "empty", "tombstone", "truncated", "wrong-kind", "oversized-near-limit",
            "oversized-over-limit", "key-mismatch", "key-missing"} <= labels
    if kind != "window":
        assert {"missing", "wrong-type", "extra-field", "nonfinite", "negative", "huge-string"} <= labels


# ------------------------------------------------------------------------------------------------
# on the real broker: the three services as processes
# ------------------------------------------------------------------------------------------------

ROUNDS = int(os.environ.get('OSAD_FUZZ_ROUNDS', '5'))
#: RSS (the lowest of 6 readings over 1.5 s after a round settled) growth allowed over the last TWO rounds above the
#: highest RSS after any earlier round (all rounds of the same size; the first rounds are the warm-up, in which
#: caches, pools, a calibration and the first large buffers settle). One-time steps of up to ~8 MB happen even late
#: (the alerter once stepped 4.1 MiB in round 5, flat before), so one round's growth alone is not a leak. A round
#: brings each service two messages of ~8 MiB and ~90 smaller ones: keeping even one oversized message (or its
#: dead-letter copy) per round adds at least 16 MiB over two rounds, above this bound.
RSS_GROWTH_MAX = 12 * MIB
#: glibc would otherwise raise its mmap threshold after the first freed 8 MiB buffer and serve later big buffers
#: from the heap, whose top it rarely gives back: RSS would then move by tens of MB with where the last message
#: landed. A fixed threshold keeps every large buffer in its own mapping, returned when freed, so RSS follows
#: what the service holds.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
FEATURIZER_ARGS = ["--scales", "2,4", "--gap", "2", "--step", "2", "--calibration-samples", "5"]
SAMPLES_PER_ROUND, WINDOWS_PER_ROUND, SCORE_PATTERN = 24, 12, [8, 9, 40, 41, 0.5, 0.5, 0.5, 0.5]
ALERT_CALIBRATION = 30


def _good_round(kind: str, r: int, rng) -> list[tuple[str, bytes, bytes]]:
    """Round ``r`` of the good stream of one entity, with some messages repeated right after themselves."""
    if kind == "sample":
        msgs = [good_sample("fz/good", r * SAMPLES_PER_ROUND + j) for j in range(SAMPLES_PER_ROUND)]
    elif kind == "window":
        msgs = [good_window("fz/good", 59 + 10 * (r * WINDOWS_PER_ROUND + j)) for j in range(WINDOWS_PER_ROUND)]
    else:
        vals = [1.0 + 0.05 * math.sin(i) for i in range(ALERT_CALIBRATION)] + SCORE_PATTERN
        msgs = [good_score("fz/good", r * len(vals) + j, v) for j, v in enumerate(vals)]
    out = []
    for m in msgs:
        out.append(("good", b"fz/good", encode(m)))
        for _ in range(int(rng.choice([0, 0, 0, 0, 1, 2]))):  # the same message again (a producer's retry)
            out.append(("duplicate", b"fz/good", out[-1][2]))
    return out


def _interleave(good: list, bad: list, rng) -> list:
    """Bad messages at random places; the good stream (with its duplicates) keeps its order."""
    slots = np.sort(rng.choice(len(good) + len(bad), size=len(bad), replace=False))
    out, gi, bi = [], iter(good), iter(bad)
    bad_at = set(slots.tolist())
    for i in range(len(good) + len(bad)):
        out.append(next(bi) if i in bad_at else next(gi))
    return out


def _expected_windows(samples: list[bytes]) -> tuple[list[int], int]:
    """Window ends the featurizer's policy gives for these samples (the pure core), and its duplicate count."""
    from osad.featurizer.windows import WindowConfig, WindowStore

    store = WindowStore(WindowConfig(scales=(2, 4), gap=2, step=2, calibration_samples=5))
    ends = []
    for raw in samples:
        s = decode(raw, Sample)
        ends += [w.end_seq for _, w in store.add("fz/good", s.seq, s.metrics)]
    return ends, store.counters["duplicate"]


SERVICES = {"sample": ("featurizer", SAMPLES), "window": ("detector", SIGNATURES), "score": ("alerter", SCORES)}


@pytest.mark.broker
@pytest.mark.slow
def test_fuzzed_inputs_are_dead_lettered_and_every_service_goes_on(broker, topic_prefix, tmp_path, capsys):
    import psutil
    from kafka import KafkaProducer

    from osad.runtime.broker import free_port
    from osad.runtime.kafka import ensure_topics
    from tests.conftest import wait_until
    from tests.kafkautil import Proc, TopicReader, health, metric

    prefix = {k: f"{topic_prefix}{SERVICES[k][0][0]}." for k in SERVICES}  # one installation per service
    for p in prefix.values():
        ensure_topics(broker.bootstrap, prefix=p)
    ports = {k: free_port() for k in SERVICES}
    prod = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5, max_request_size=LIMIT + MIB)
    common = ["--bootstrap", broker.bootstrap, "--log-level", "WARNING"]
    argv = {
        "sample": ["featurizer", *common, "--state-dir", str(tmp_path / "fstate"), *FEATURIZER_ARGS],
        "window": ["detect", *common, "--models", str(tmp_path / "models"), "--max-wait-ms", "100",
                   "--cs-handover", "0"],  # one Score per window: counted against the good windows
        "score": ["alert", *common, "--store", f"sqlite:///{tmp_path}/a.db", "--calibration-scores",
                  str(ALERT_CALIBRATION)],
    }
    dlq = {k: TopicReader(broker.bootstrap, DEADLETTER, prefix=prefix[k]) for k in SERVICES}
    outs = {"sample": TopicReader(broker.bootstrap, SIGNATURES, prefix=prefix["sample"]),
            "window": TopicReader(broker.bootstrap, SCORES, prefix=prefix["window"]),
            "score": TopicReader(broker.bootstrap, ANOMALIES, prefix=prefix["score"])}
    sent_bad = {k: {} for k in SERVICES}  # (partition, offset) -> (label, key, value)
    sent_good = {k: [] for k in SERVICES}  # values of good messages (duplicates included), in order
    rss = {k: [] for k in SERVICES}
    counts = {k: dict(fuzzed=0, duplicates=0, good=0) for k in SERVICES}

    def alive_and_healthy():
        for k, p in procs.items():
            assert p.p.poll() is None, f"{SERVICES[k][0]} exited ({p.p.returncode}):\n{p.text()[-3000:]}"
        return all((health(ports[k]) or {}).get("status") == "ok" for k in SERVICES)

    procs = {}
    try:
        for k in SERVICES:
            procs[k] = Proc([*argv[k], "--topic-prefix", prefix[k], "--metrics-port", str(ports[k])],
                            tmp_path / f"{SERVICES[k][0]}.log", env=MALLOC_ENV)
        wait_until(alive_and_healthy, 120, 0.2, what="the three services to be healthy")
        for r in range(ROUNDS):
            for kind, (name, topic) in SERVICES.items():
                rng = np.random.default_rng([SEED, list(SERVICES).index(kind), r])
                bad = bad_messages(kind, rng, "fz/good")
                good = _good_round(kind, r, rng)
                futures = []
                for label, key, value in _interleave(good, bad, rng):
                    if label in ("good", "duplicate"):
                        assert rejected(kind, key, value) is None
                        sent_good[kind].append(value)
                        counts[kind]["good" if label == "good" else "duplicates"] += 1
                    else:
                        assert rejected(kind, key, value, label), label
                        counts[kind]["fuzzed"] += 1
                    futures.append((label, key, value, prod.send(topic.full_name(prefix[kind]), key=key, value=value)))
                prod.flush()
                for label, key, value, fut in futures:
                    md = fut.get(30)
                    if label not in ("good", "duplicate"):
                        sent_bad[kind][(md.partition, md.offset)] = (label, key, value)
            for kind in SERVICES:
                _settle(kind, dlq[kind], outs[kind], sent_bad[kind], sent_good[kind], r + 1, ports[kind],
                        alive_and_healthy, metric)
            for kind in SERVICES:  # the lowest of a few readings: a buffer still held from the last poll is transient
                ps = psutil.Process(procs[kind].p.pid)
                rss[kind].append(min(_rss_samples(ps)))
            assert alive_and_healthy()

        # every bad message, and only those, dead-lettered once, with why and where from, bytes intact
        for kind, (name, topic) in SERVICES.items():
            recs = dlq[kind].records
            assert len(recs) == len(sent_bad[kind])
            seen = set()
            for m in recs:
                h = dict(m.headers)
                src = (int(h["osad.source_partition"]), int(h["osad.source_offset"]))
                assert src in sent_bad[kind] and src not in seen, src
                seen.add(src)
                label, key, value = sent_bad[kind][src]
                assert h["osad.reason"] and h["osad.service"] == name.encode(), (label, h)
                assert h["osad.source_topic"] == topic.full_name(prefix[kind]).encode()
                assert m.key == key, label
                if "osad.truncated_from" in h:  # too large to republish beside the headers: its start, and its size
                    assert label == "oversized-over-limit" and int(h["osad.truncated_from"]) == len(value)
                    assert m.value == value[:len(m.value)] and len(m.value) >= MIB
                else:
                    assert m.value == value, label
            reasons = [dict(m.headers)["osad.reason"].decode() for m in recs]
            assert any("is not its entity_id" in x for x in reasons)
            for m in recs:
                h = dict(m.headers)
                label = sent_bad[kind][(int(h["osad.source_partition"]), int(h["osad.source_offset"]))][0]
                assert label.startswith("unscorable") == h["osad.reason"].startswith(b"processing failed"), (label, h)
            assert metric(ports[kind], "osad_dead_letters_total") == len(sent_bad[kind])
            assert metric(ports[kind], "osad_messages_in_total") == len(sent_bad[kind]) + len(sent_good[kind])

        # the good streams were processed, duplicates as each service promises
        ends, dups = _expected_windows(sent_good["sample"])
        wins = outs["sample"].messages()
        assert [w.window_end_seq for w in wins] == ends and all(w.entity_id == "fz/good" for w in wins)
        assert metric(ports["sample"], "osad_featurizer_events_total", event="duplicate") == dups \
            == counts["sample"]["duplicates"]  # a repeated sample is dropped: no window twice
        want = {decode(v, SignatureWindow).window_end_seq for v in sent_good["window"]}
        scores = outs["window"].messages()
        assert {s.window_end_seq for s in scores} == want and all(s.entity_id == "fz/good" for s in scores)
        assert len(scores) == len(sent_good["window"])  # a repeated window is scored again (same ids: idempotent)
        states = [(a.anomaly_id, a.revision, a.status) for a in outs["score"].messages()]
        assert [s for *_, s in states] == ["open", "update", "closed"] * ROUNDS and len(set(states)) == len(states)
        assert metric(ports["score"], "osad_alerter_events_total", event="duplicate") == counts["score"]["duplicates"]

        growth = {k: rss[k][-1] - max(rss[k][:-2]) for k in SERVICES}  # last two rounds, above the level before
        with capsys.disabled():
            print(f"\nfuzz ({ROUNDS} rounds, seed {SEED}):")
            for kind, (name, _) in SERVICES.items():
                c = counts[kind]
                print(f"  {name:10s} fuzzed {c['fuzzed']:4d}  dead-lettered {len(dlq[kind].records):4d}  good "
                      f"{c['good']:4d} + {c['duplicates']:3d} duplicates processed  crashes 0  RSS "
                      + " -> ".join(f"{x / MIB:.1f}" for x in rss[kind]) + f" MiB (last two rounds {growth[kind] / MIB:+.2f})")
        for k, g in growth.items():
            assert g < RSS_GROWTH_MAX, f"{SERVICES[k][0]} grew {g / MIB:.1f} MiB over the last two rounds: {rss[k]}"
    finally:
        prod.close()
        for r in (*dlq.values(), *outs.values()):
            r.close()
        for k, p in procs.items():
            assert p.terminate() == 0, f"{SERVICES[k][0]}:\n{p.text()[-3000:]}"


def _rss_samples(ps, n: int = 6, every_s: float = 0.25):
    for _ in range(n):
        yield ps.memory_info().rss
        time.sleep(every_s)


def _settle(kind, dlq, out, bad: dict, good: list, rounds: int, port: int, alive_and_healthy, metric,
            timeout_s: float = 90.0):
    """Wait until the service has read everything sent so far and its dead letters and outputs have arrived."""
    deadline = time.monotonic() + timeout_s
    total = len(bad) + len(good)
    while True:
        dlq.poll(100)
        out.poll(100)
        read = metric(port, "osad_messages_in_total") or 0
        if len(dlq.records) >= len(bad) and read >= total and _outputs_done(kind, out, good, rounds):
            break
        assert alive_and_healthy() is not None
        if time.monotonic() > deadline:
            raise AssertionError(f"{kind}: after {timeout_s} s read {read}/{total}, dead letters "
                                 f"{len(dlq.records)}/{len(bad)}, outputs {len(out.records)}")
    dlq.poll(300)  # nothing more may come
    out.poll(100)


def _outputs_done(kind, out, good: list, rounds: int) -> bool:
    if kind == "sample":
        return len(out.records) >= len(_expected_windows(good)[0])
    if kind == "window":
        return len(out.records) >= len(good)  # one compressed-sensing score per window
    return sum(1 for m in out.records if b'"status":"closed"' in m.value) >= rounds  # one incident per round
