"""The message contract: models, wire format, JSON Schema export, configuration errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from osad import schemas
from osad.schemas import Anomaly, Sample, Score, SignatureWindow, WireError, decode, encode, window_nbytes


def window(n=38, step=5, scales=(10, 30, 60), seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random((step, len(scales), n, n)).astype(np.float32)
    a = a + a.transpose(0, 1, 3, 2)
    return SignatureWindow(entity_id="h/1@2", host="h", pid=1, comm="c", window_end_ts=10.0, window_end_seq=99,
                           interval_s=1.0, gap=10, scales=list(scales), features=[f"f{i}" for i in range(n)],
                           signatures=a, values=rng.random((max(scales), n))), a


def test_window_round_trip_is_exact_and_compact():
    w, full = window()
    b = encode(w)
    assert len(b) < window_nbytes(38) + 1024  # arrays + a small header
    assert window_nbytes(38) == 4 * (5 * 3 * 741 + 60 * 38)
    w2 = decode(b, SignatureWindow)
    np.testing.assert_array_equal(w2.signatures, full)
    np.testing.assert_array_equal(w2.values, w.values)
    assert w2.model_dump(exclude={"tri", "values"}) == w.model_dump(exclude={"tri", "values"})


@pytest.mark.parametrize("mangle,reason", [
    (lambda b: b[:-4], "header implies"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:8] + b"}" + b[9:], "header is not valid"),
    (lambda b: b"", "bad magic"),
])
def test_corrupt_windows_are_rejected_with_a_reason(mangle, reason):
    w, _ = window(n=5)
    with pytest.raises(WireError, match=reason):
        decode(mangle(encode(w)), SignatureWindow)


def test_json_messages_round_trip_and_reject_bad_input():
    s = Sample(entity_id="h/1@2", host="h", pid=1, comm="c", ts=1.0, interval_s=1.0, seq=0,
               metrics={"on_cpu_ns": 1e6, "rss_anon_bytes": 4096.0})
    assert decode(encode(s), Sample) == s
    assert json.loads(encode(s))["schema_version"] == schemas.SCHEMA_VERSION
    with pytest.raises(WireError, match="schema_version 99 is not supported"):
        decode(encode(s).replace(b'"schema_version":1', b'"schema_version":99'), Sample)
    with pytest.raises(WireError, match="metrics"):
        decode(encode(s).replace(b"4096.0", b"NaN"), Sample)
    with pytest.raises(WireError, match="not a valid Sample"):
        decode(b"\xff\xfe", Sample)
    with pytest.raises(WireError, match="tombstone"):
        decode(None, Sample)
    sc = Score(entity_id="e", host="h", window_end_ts=1.0, window_end_seq=9, interval_s=1.0, gap=10, model_id="cs",
               score=1.5, features=["a", "b"], contributions=[0.5, 1.0])
    assert decode(encode(sc), Score) == sc
    with pytest.raises(ValueError, match="contributions has 1 values for 2 features"):
        Score(**{**sc.model_dump(), "contributions": [1.0]})
    an = Anomaly(entity_id="e", host="h", anomaly_id="x", status="open", severity="high", start_ts=1.0, last_ts=2.0,
                 score=3.0, threshold=1.0, models=["cs"])
    assert decode(encode(an), Anomaly) == an


def test_schemas_command_exports_every_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "osad", "schemas", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["Anomaly.schema.json", "Sample.schema.json", "Score.schema.json", "SignatureWindow.schema.json"]
    sw = json.loads((tmp_path / "SignatureWindow.schema.json").read_text())
    assert "step" in sw["properties"] and "features" in sw["properties"] and "tri" not in sw["properties"]


def test_bad_configuration_says_what_to_fix(tmp_path):
    env = {"OSAD_GAP": "ten", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "osad", "featurizer", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "OSAD_GAP='ten' is not valid for --gap" in r.stderr
    r = subprocess.run([sys.executable, "-m", "osad", "featurizer", "--gap", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--gap" in r.stderr and "greater than 0" in r.stderr
    r = subprocess.run([sys.executable, "-m", "osad", "featurizer", "--ranges", str(tmp_path / "nope.json"),
                        "--bootstrap", "127.0.0.1:1"], capture_output=True, text=True)
    assert r.returncode == 2 and "nope.json does not exist" in r.stderr


def test_unreachable_broker_is_a_clear_error():
    from osad.runtime.kafka import BrokerUnavailable, make_producer

    with pytest.raises(BrokerUnavailable, match="no Kafka broker answered at 127.0.0.1:1 .*osad broker"):
        make_producer("127.0.0.1:1", "t", connect_timeout_s=1)
