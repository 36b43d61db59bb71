"""The detector as running processes on the real embedded broker."""

import pytest

from osad.core.datasets import load_entity
from osad.runtime.broker import free_port
from osad.schemas import SCORES, SIGNATURES
from tests.conftest import wait_until
from tests.kafkautil import Proc, TopicReader, health, metric, replicas_split
from tests.test_featurizer_service import expected_ends, featurizer, replay, write_ranges

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def detector(tmp_path, broker, name, models, *extra):
    port = free_port()
    p = Proc(["detect", "--bootstrap", broker.bootstrap, "--metrics-port", str(port), "--models", str(models),
              "--reload-s", "0.5", "--max-wait-ms", "100", *extra], tmp_path / f"{name}.log")
    return p, port


def scores_by(reader, prefix):
    got = {}
    for s in reader.messages():
        if s.model_id.startswith(prefix):
            got.setdefault(s.entity_id, set()).add(s.window_end_seq)
    return got


def test_cs_scores_every_window_and_mscred_joins_when_a_checkpoint_appears(broker, topic_prefix, tmp_path,
                                                                           datasets_dir):
    asd = datasets_dir / "ASD"
    ranges = write_ranges(tmp_path, asd, "omi-1")
    models = tmp_path / "models"
    models.mkdir()
    (models / "broken.safetensors").write_bytes(b"\x00\x01 not a checkpoint")
    f, _ = featurizer(tmp_path, broker, "f", ranges=ranges)
    d, dport = detector(tmp_path, broker, "d", models)
    first = load_entity(asd, "omi-1", with_test=False).train.shape[0]
    try:
        replay(tmp_path, broker, asd, "--entity", "omi-1", "--split", "test", "--limit", "160").run_to_end()
        exp1 = set(expected_ends(160, first))
        reader = TopicReader(broker.bootstrap, SCORES, prefix=topic_prefix)
        reader.read_until(lambda r: scores_by(reader, "cs").get("ASD/omi-1", set()) >= exp1, 180,
                          "a compressed-sensing score for every window (cold start)")
        assert not scores_by(reader, "mscred"), "no checkpoint yet, so no MSCRED score"
        s = reader.messages()[0]
        assert len(s.contributions) == 19 and s.features[0] == "f01" and s.gap == 10
        assert "skipping checkpoint" in d.text() and "broken.safetensors" in d.text()
        assert health(dport)["status"] == "ok"

        # a checkpoint appears while the service runs: MSCRED joins without a restart
        Proc(["train", str(asd), "--entity", "omi-1", "--epochs", "1", "--max-windows", "48", "--batch-size", "16",
              "--out", str(models / "omi-1.safetensors"), "--quiet"], tmp_path / "train.log").run_to_end(600)
        wait_until(lambda: metric(dport, "osad_detector_checkpoints") == 1, 60, what="the checkpoint to load")
        replay(tmp_path, broker, asd, "--entity", "omi-1", "--split", "test", "--skip", "160", "--limit", "100",
               name="replay2").run_to_end()
        exp2 = {e for e in expected_ends(260, first) if e not in exp1}
        reader.read_until(lambda r: scores_by(reader, "mscred").get("ASD/omi-1", set()) >= exp2, 180,
                          "MSCRED scores for the windows after the checkpoint appeared")
        ms = [x for x in reader.messages() if x.model_id.startswith("mscred")]
        assert ms[0].threshold is not None and ms[0].threshold > 0
        assert {"broken_w10", "broken_w30", "broken_w60"} <= set(ms[0].detail)
        assert scores_by(reader, "cs")["ASD/omi-1"] >= exp1 | exp2
    finally:
        assert d.terminate() == 0
        assert f.terminate() == 0


def test_two_detector_replicas_split_the_work_and_score_everything(broker, topic_prefix, tmp_path, datasets_dir):
    asd, smd = datasets_dir / "ASD", datasets_dir / "SMD"
    ranges = write_ranges(tmp_path, asd)
    n = 130
    f, _ = featurizer(tmp_path, broker, "f", "--calibration-samples", "100", ranges=ranges)
    da, pa = detector(tmp_path, broker, "da", tmp_path / "none")
    db, pb = detector(tmp_path, broker, "db", tmp_path / "none")
    try:
        wait_until(lambda: replicas_split([pa, pb], SIGNATURES.default_partitions), 90,
                   what="both detector replicas to share the signatures topic")
        replay(tmp_path, broker, asd, "--split", "test", "--limit", str(n)).run_to_end()
        replay(tmp_path, broker, smd, "--split", "test", "--limit", str(n), name="r2").run_to_end()
        want = {}
        for ds in (asd, smd):
            for e in sorted(p.stem for p in (ds / "train").iterdir()):
                first = load_entity(ds, e, with_test=False).train.shape[0]
                want[f"{ds.name}/{e}"] = set(expected_ends(n, first))
        reader = TopicReader(broker.bootstrap, SCORES, prefix=topic_prefix)
        reader.read_until(lambda r: all(scores_by(reader, "cs").get(k, set()) >= v for k, v in want.items()), 300,
                          "a score for every window of every entity")
        done = [metric(p, "osad_detector_scores_total") or 0 for p in (pa, pb)]
        assert all(x > 0 for x in done), f"one replica scored nothing: {done}"
        assert sum(done) >= sum(len(v) for v in want.values())
    finally:
        assert da.terminate() == 0
        assert db.terminate() == 0
        assert f.terminate() == 0


def test_train_online_adds_mscred_for_an_entity_without_checkpoint(broker, topic_prefix, tmp_path):
    import math

    from osad.schemas import SAMPLES, Sample, encode
    from kafka import KafkaProducer

    models = tmp_path / "models"
    f, _ = featurizer(tmp_path, broker, "f", "--calibration-samples", "50")
    d, dport = detector(tmp_path, broker, "d", models, "--train-online", "--train-windows", "24",
                        "--train-epochs", "2", "--no-cs")
    prod = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)

    def send(a, b):
        for i in range(a, b):
            m = {f"m{k}": math.sin(i / (5 + k)) + 0.1 * k for k in range(4)}
            s = Sample(entity_id="synthetic/e1", host="h", comm="synth", ts=float(i), interval_s=1.0, seq=i, metrics=m)
            prod.send(SAMPLES.full_name(topic_prefix), key=b"synthetic/e1", value=encode(s))
        prod.flush()

    try:
        send(0, 340)  # 25 windows: the first 24 train the model
        wait_until(lambda: list(models.glob("online-*.safetensors")), 300, what="the online model's checkpoint")
        wait_until(lambda: metric(dport, "osad_detector_checkpoints") == 1, 60, what="the detector to load it")
        send(340, 400)
        reader = TopicReader(broker.bootstrap, SCORES, prefix=topic_prefix)
        reader.read_until(lambda r: scores_by(reader, "mscred").get("synthetic/e1"), 120, "an online MSCRED score")
        assert "training MSCRED online for synthetic/e1 on 24 windows" in d.text()
    finally:
        prod.close()
        assert d.terminate() == 0
        assert f.terminate() == 0


def test_a_restarted_detector_goes_on_with_the_calibrations_in_its_state_dir(broker, topic_prefix, tmp_path,
                                                                            datasets_dir):
    asd = datasets_dir / "ASD"
    ranges = write_ranges(tmp_path, asd, "omi-1")
    state, models = tmp_path / "detector-state", tmp_path / "models"
    f, _ = featurizer(tmp_path, broker, "f", ranges=ranges)
    first = load_entity(asd, "omi-1", with_test=False).train.shape[0]
    args = ("--state-dir", str(state), "--cs-calibrate", "5")
    d, _ = detector(tmp_path, broker, "d1", models, *args)
    reader = TopicReader(broker.bootstrap, SCORES, prefix=topic_prefix)
    try:
        replay(tmp_path, broker, asd, "--entity", "omi-1", "--split", "test", "--limit", "200").run_to_end()
        exp1 = set(expected_ends(200, first))
        assert len(exp1) > 6
        reader.read_until(lambda r: scores_by(reader, "cs-calibrated").get("ASD/omi-1", set()) >= exp1 - set(
            sorted(exp1)[:5]), 180, "calibrated scores after the fifth window")
        assert len(list(state.glob("*.npz"))) == 1
        assert d.terminate() == 0
        d, _ = detector(tmp_path, broker, "d2", models, *args)
        replay(tmp_path, broker, asd, "--entity", "omi-1", "--split", "test", "--skip", "200", "--limit", "60",
               name="replay2").run_to_end()
        exp2 = {e for e in expected_ends(260, first) if e not in exp1}
        assert len(exp2) >= 5
        reader.read_until(lambda r: scores_by(reader, "cs").get("ASD/omi-1", set()) >= exp1 | exp2, 180,
                          "scores for the windows after the restart")
        after = [s for s in reader.messages() if s.window_end_seq in exp2]
        assert after and all(s.model_id.startswith("cs-calibrated:") for s in after), \
            {s.model_id.split(":")[0] for s in after}
        assert "restored" in d.text()
    finally:
        assert d.terminate() == 0
        assert f.terminate() == 0
