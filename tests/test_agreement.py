"""Streaming and offline agree: the live pipeline (replay -> featurizer -> detector -> alerter on the real
broker) flags the same test points of an SMD machine as `osad evaluate` (issue 5)."""

import doctest
import json
from types import SimpleNamespace

import numpy as np
import pytest

import osad.agreement as agreement
from osad.agreement import incident_points, make_plan


def test_docstring_examples():
    assert doctest.testmod(agreement).failed == 0


def test_plan_puts_every_part_on_the_featurizer_grid():
    p = make_plan(23688, 23689, 5000, 6000, gap=10, need=100, val_fraction=0.2)
    assert (p.n_train, p.skip, p.n_fit) == (5000, 18688, 4000)
    assert (p.n_train_total + p.n_test) % 10 == 0 and p.n_test == 5992  # the last test row ends a window
    # head windows: ends e >= 99 (local) with (skip + e + 1) % 10 == 0 below 4000: 101, 111, ..., 3991
    assert p.fit_windows == len(range(101, 4000, 10)) and p.val_windows == len(range(4001, 5000, 10))
    with pytest.raises(ValueError, match="too few"):
        make_plan(120, 100, None, None, gap=10, need=100, val_fraction=0.2)


def test_incident_points_cover_from_the_first_window_rows_to_the_last_over_window():
    seq_of = lambda ts: int(ts) - 1  # ts = seq + 1
    a_closed = SimpleNamespace(start_ts=1010.0, end_ts=1030.0, last_ts=1040.0)  # windows ending 1019..1029
    a_open = SimpleNamespace(start_ts=1090.0, end_ts=None, last_ts=1120.0)  # still open past the end
    pred = incident_points([a_closed, a_open], seq_of, first_seq=1000, n=100)
    want = np.zeros(100, np.int8)
    want[10:30] = 1  # seqs 1010..1029
    want[90:] = 1  # seqs 1090..1099 (clipped)
    assert np.array_equal(pred, want)


@pytest.mark.broker
@pytest.mark.slow
def test_streaming_pipeline_gives_the_offline_deployed_f1(broker, datasets_dir, tmp_path):
    from osad.cli import main

    out = tmp_path / "agreement.json"
    rc = main(["agreement", str(datasets_dir / "SMD"), "--entity", "machine-1-6", "--limit-train", "5000",
               "--limit-test", "6000", "--bootstrap", broker.bootstrap, "--work-dir", str(tmp_path / "work"),
               "--json", str(out), "--timeout-s", "600"])
    r = json.loads(out.read_text())
    # the streamed window scores are the offline ones, the alerter's POT threshold is evaluate's ...
    assert r["score_agreement"]["points_compared"] == r["plan"]["n_test"]
    assert r["score_agreement"]["max_rel_diff"] < 1e-4
    assert r["streaming"]["threshold"] == pytest.approx(r["offline"]["threshold"], rel=1e-4)
    # ... and the incidents flag the same points: the same deployed F1
    assert r["offline"]["deployed_f1"] > 0.1 and r["streaming"]["incidents"] > 0
    assert r["difference"] <= 0.02, r
    assert rc == 0
