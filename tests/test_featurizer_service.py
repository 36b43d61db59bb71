"""The featurizer as a running process on the real embedded broker."""

import json

import numpy as np
import pytest

from osad.core.datasets import load_entity
from osad.core.signature import Ranges, signature_windows_naive, window_ends
from osad.runtime.broker import free_port
from osad.schemas import DEADLETTER, SAMPLES, SIGNATURES, Sample, encode
from tests.conftest import wait_until
from tests.kafkautil import Proc, TopicReader, health, metric, produce_raw, replicas_split

pytestmark = [pytest.mark.broker]


def featurizer(tmp_path, broker, name="f", *extra, ranges=None, port=None):
    port = port or free_port()
    args = ["featurizer", "--bootstrap", broker.bootstrap, "--metrics-port", str(port),
            "--state-dir", str(tmp_path / "state")]
    if ranges:
        args += ["--ranges", str(ranges)]
    return Proc(args + list(extra), tmp_path / f"{name}.log"), port


def replay(tmp_path, broker, ds, *extra, name="replay"):
    return Proc(["replay", str(ds), "--bootstrap", broker.bootstrap, *extra], tmp_path / f"{name}.log")


def write_ranges(tmp_path, ds, *entities):
    out = tmp_path / "ranges.json"
    args = ["replay", str(ds), "--dry-run", "--write-ranges", str(out)]
    for e in entities:
        args += ["--entity", e]
    Proc(args, tmp_path / "ranges.log").run_to_end()
    return out


def expected_ends(n_rows, first_seq):
    return [int(first_seq + t) for t in window_ends(n_rows, first_seq=first_seq)]


def test_replayed_smd_windows_equal_the_formula(broker, topic_prefix, tmp_path, datasets_dir):
    smd = datasets_dir / "SMD"
    ranges = write_ranges(tmp_path, smd, "machine-1-6")
    ent = load_entity(smd, "machine-1-6")
    n = 2100
    f, port = featurizer(tmp_path, broker, ranges=ranges)
    try:
        replay(tmp_path, broker, smd, "--entity", "machine-1-6", "--split", "test", "--limit", str(n)).run_to_end()
        first = ent.train.shape[0]
        exp = expected_ends(n, first)
        wait_until(lambda: metric(port, "osad_messages_in_total") == n, 120, what="featurizer to read every sample")
        wait_until(lambda: metric(port, "osad_offset_commits_total") is not None, 30, what="a commit")
        reader = TopicReader(broker.bootstrap, SIGNATURES, prefix=topic_prefix)
        reader.read_until(lambda r: len(r) >= len(exp), 60, "all windows")
        reader.poll(500)
        wins = reader.messages()
        assert metric(port, "osad_messages_out_total", topic="osad.signatures") == len(exp)
        assert len(wins) == len(exp), "windows lost or duplicated"
        assert [w.window_end_seq for w in wins] == exp
        r = Ranges.fit(ent.feature_names, ent.train)
        x = r.transform(ent.test[:n])
        ref = signature_windows_naive(x, np.array(exp) - first)
        got = np.stack([w.signatures for w in wins])
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
        vals = np.stack([w.values for w in wins])
        np.testing.assert_allclose(vals[-1], x[exp[-1] - first - 59: exp[-1] - first + 1], atol=1e-5)
        w = wins[0]
        assert w.entity_id == "SMD/machine-1-6" and w.features == ent.feature_names and w.scales == [10, 30, 60]
        assert w.window_end_ts == pytest.approx(1_700_000_000 + (exp[0] + 1) * 60.0)
        assert w.scaling_id == r.scaling_id
    finally:
        assert f.terminate() == 0


def test_malformed_messages_go_to_dead_letter_and_processing_goes_on(broker, topic_prefix, tmp_path):
    f, port = featurizer(tmp_path, broker, "f", "--scales", "2,4", "--gap", "2", "--step", "2",
                         "--calibration-samples", "5")
    try:
        topic = SAMPLES.full_name(topic_prefix)
        produce_raw(broker.bootstrap, topic, b"bad-1", b"\x00not json at all")
        produce_raw(broker.bootstrap, topic, b"bad-2", json.dumps({"entity_id": "x", "host": "h"}).encode())
        for i in range(12):
            s = Sample(entity_id="ok", host="h", comm="c", ts=float(i + 1), interval_s=1.0, seq=i,
                       metrics={"a": float(i % 3), "b": float(i % 5)})
            produce_raw(broker.bootstrap, topic, b"ok", encode(s))
        dlq = TopicReader(broker.bootstrap, DEADLETTER, prefix=topic_prefix)
        recs = dlq.read_until(lambda r: len(r) >= 2, 60, "2 dead letters")
        by_key = {m.key: m for m in recs}
        assert by_key[b"bad-1"].value == b"\x00not json at all"  # the original bytes, untouched
        h1 = dict(by_key[b"bad-1"].headers)
        assert b"not a valid Sample" in h1["osad.reason"]
        assert h1["osad.source_topic"].decode() == topic and h1["osad.service"] == b"featurizer"
        h2 = dict(by_key[b"bad-2"].headers)
        assert b"ts: Field required" in h2["osad.reason"]
        sig = TopicReader(broker.bootstrap, SIGNATURES, prefix=topic_prefix)
        sig.read_until(lambda r: len(r) >= 4, 60, "windows after the bad messages")
        assert [w.window_end_seq for w in sig.messages()][:4] == [5, 7, 9, 11]
        assert metric(port, "osad_dead_letters_total") == 2
        assert health(port)["status"] == "ok"
    finally:
        assert f.terminate() == 0


def test_sigterm_mid_stream_then_restart_loses_no_window(broker, topic_prefix, tmp_path, datasets_dir):
    """SIGTERM while Samples are still arriving (the replay still publishing, by construction, not by timing:
    the second half is replayed at 100 rows/s, 15 s, and the stop comes at its first window), then a new
    featurizer: every expected window is published."""
    smd = datasets_dir / "SMD"
    ranges = write_ranges(tmp_path, smd, "machine-1-6")  # the entity with 3000 test rows in the repository's slice
    n, half = 3000, 1500
    first = load_entity(smd, "machine-1-6", with_test=False).train.shape[0]
    exp = set(expected_ends(n, first))
    f1, port = featurizer(tmp_path, broker, "f1", ranges=ranges)
    wait_until(lambda: (health(port) or {}).get("status") == "ok", 60, what="featurizer healthy")
    replay(tmp_path, broker, smd, "--entity", "machine-1-6", "--split", "test", "--limit", str(half),
           name="replay1").run_to_end(120)
    reader = TopicReader(broker.bootstrap, SIGNATURES, prefix=topic_prefix)
    head = {e for e in exp if e < first + half}
    reader.read_until(lambda r: {w.window_end_seq for w in reader.messages()} >= head, 120, "the first half's windows")
    rp = replay(tmp_path, broker, smd, "--entity", "machine-1-6", "--split", "test", "--skip", str(half),
                "--limit", str(n - half), "--rate", "100", name="replay2")
    reader.read_until(lambda r: any(w.window_end_seq >= first + half for w in reader.messages()), 60,
                      "a window of the second half")
    assert rp.p.poll() is None, "the replay had already ended: not a mid-stream stop"
    assert f1.terminate() == 0, f1.text()[-2000:]
    assert "stopped cleanly" in f1.text()
    f2, port2 = featurizer(tmp_path, broker, "f2", ranges=ranges)
    try:
        wait_until(lambda: (health(port2) or {}).get("status") == "ok", 60, what="the second featurizer healthy")
        rp.run_to_end(180)
        reader.read_until(lambda r: {w.window_end_seq for w in reader.messages()} >= exp, 180,
                          "every expected window after the restart")
    finally:
        assert f2.terminate() == 0


def test_two_replicas_split_partitions_and_together_cover_everything(broker, topic_prefix, tmp_path, datasets_dir):
    smd, asd = datasets_dir / "SMD", datasets_dir / "ASD"
    r1 = write_ranges(tmp_path, smd)  # SMD entities use train-split ranges; ASD ones calibrate online
    n = 400
    fa, pa = featurizer(tmp_path, broker, "fa", "--calibration-samples", "100", ranges=r1)
    fb, pb = featurizer(tmp_path, broker, "fb", "--calibration-samples", "100", ranges=r1)
    try:
        wait_until(lambda: replicas_split([pa, pb], SAMPLES.default_partitions), 90,
                   what="both replicas to share the samples topic's partitions")
        replay(tmp_path, broker, smd, "--split", "test", "--limit", str(n), name="r1").run_to_end()
        replay(tmp_path, broker, asd, "--split", "test", "--limit", str(n), name="r2").run_to_end()
        want = {}
        for ds in (smd, asd):
            for e in sorted(p.stem for p in (ds / "train").iterdir()):
                first = load_entity(ds, e, with_test=False).train.shape[0]
                want[f"{ds.name}/{e}"] = set(expected_ends(n, first))
        reader = TopicReader(broker.bootstrap, SIGNATURES, prefix=topic_prefix)

        def complete(_r):
            have = {}
            for w in reader.messages():
                have.setdefault(w.entity_id, set()).add(w.window_end_seq)
            return all(have.get(k, set()) >= v for k, v in want.items())
        reader.read_until(complete, 180, "windows of every entity")
        outs = [metric(p, "osad_messages_out_total", topic="osad.signatures") or 0 for p in (pa, pb)]
        assert all(o > 0 for o in outs), f"one replica did no work: {outs}"
    finally:
        assert fa.terminate() == 0
        assert fb.terminate() == 0
