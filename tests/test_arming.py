"""Fast arming at the default settings: a new process is judged within 5 minutes of its first Sample, and from
then on every one of its windows is judged (the featurizer's ranges, the detector's jump-start score and its
calibration, the alerter's provisional threshold, the hand-over to the calibrated model, POT).

The services' own transforms, chained in-process with their default configurations, fed one Sample a second
(the collector's default interval) of a process with 35 noisy metrics; time is the Samples' own."""

import numpy as np

from osad.alerter.config import AlerterConfig
from osad.alerter.core import Engine as AlerterEngine
from osad.detector.cs import CSScorer
from osad.detector.engine import Engine as DetectorEngine
from osad.detector.engine import EngineConfig
from osad.detector.service import BatchConfig, Detector
from osad.featurizer.ranges import RangesStore
from osad.featurizer.service import Featurizer
from osad.featurizer.windows import WindowConfig
from osad.runtime.service import InputMeta
from osad.schemas import Sample

T0 = 1.7e9


def test_a_new_process_is_judged_within_five_minutes_and_every_window_after(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"m{i:02d}" for i in range(35)]
    level = rng.uniform(10, 1000, len(names))
    fe = Featurizer(WindowConfig(), RangesStore(None, str(tmp_path)))
    det = Detector(DetectorEngine(CSScorer(), EngineConfig()), BatchConfig())
    al = AlerterEngine(AlerterConfig())
    judged = {}  # window_end_seq -> judged by some model
    first_judged_ts = None
    horizon = 900  # samples: past the calibration and the hand-over (about 560 s), into POT's collection
    for i in range(horizon):
        m = level * (1 + 0.05 * np.sin(i / 30.0)) * (1 + 0.03 * rng.standard_normal(len(names)))
        s = Sample(entity_id="h/1@1", host="h", pid=1, comm="proc", ts=T0 + i + 1, interval_s=1.0, seq=i,
                   metrics=dict(zip(names, m.tolist())))
        wins = fe.process_batch([(s, InputMeta("samples", 0, i))])
        outs = list(det.process_batch([(o.msg, InputMeta("signatures", 0, i)) for o in wins])) + list(det.close())
        for o in outs:
            sc = o.msg
            al.observe(sc, now=0.0)
            st = al.entities["h/1@1"].streams[sc.model_id]
            ok = st.judged_threshold is not None and st.last_seq == sc.window_end_seq and st.threshold is not None
            judged[sc.window_end_seq] = judged.get(sc.window_end_seq, False) or ok
            if ok and first_judged_ts is None:
                first_judged_ts = sc.window_end_ts
    assert first_judged_ts is not None, "no window was ever judged"
    armed_after = first_judged_ts - T0
    print(f"armed {armed_after:.0f} s after the first Sample")
    assert armed_after <= 300
    after = sorted(q for q in judged if q >= first_judged_ts - T0 - 1)
    assert after and all(judged[q] for q in after), [q for q in after if not judged[q]]
    models = {mid.split(":")[0] for mid in al.entities["h/1@1"].streams}
    assert models == {"cs-jumpstarter", "cs-calibrated"}
    assert al.entities["h/1@1"].incident is None  # nothing abnormal happened
