"""Bad state on disk: every file a service reads back at start, damaged for real (issue 15, item 6).

* Rebuildable state (the featurizer's learned ranges, the detector's calibrations): the bad file is reported
  (ERROR, naming it and what is wrong), moved aside to ``NAME.corrupt-<UTC time>`` with its bytes unchanged,
  and only its entity starts afresh; the service keeps running.
* State that is data or that the operator gave (the alerter's store, a ``--ranges`` file): the process exits
  with code 2 (``osad up`` does not restart it) and a message naming the file, what is wrong and the way out;
  the file is left as it was.
* A full disk under the alerter's SQLite store (a real 512 KiB tmpfs): reported as such, counted, retried;
  nothing acknowledged is lost and the rest follows once there is room. The alerter's Transform runs in this
  process with a real SQLiteStore (no Kafka), inside a ServiceRunner for its metrics and health.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from osad.alerter.config import AlerterConfig
from osad.alerter.service import Alerter
from osad.alerter.store import StoreError, open_store
from osad.core.signature import Ranges
from osad.detector.calibrations import CalibrationStore
from osad.detector.cs import CSScorer
from osad.detector.engine import Engine, EngineConfig
from osad.featurizer.ranges import RangesStore
from osad.featurizer.service import Featurizer
from osad.featurizer.windows import WindowConfig
from osad.runtime.broker import free_port
from osad.runtime.service import InputMeta, RunnerConfig, ServiceRunner, Transform
from osad.schemas import SCORES, SIGNATURES, Anomaly, RootCause, Sample, Score, SignatureWindow, encode
from tests.conftest import wait_until
from tests.kafkautil import Proc, TopicReader, metric, produce_raw

CORRUPT_NAME = re.compile(r"^(?P<name>.+)\.corrupt-\d{8}T\d{6}Z(-\d+)?$")


def moved_aside(folder: Path, name: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if (m := CORRUPT_NAME.match(p.name)) and m["name"] == name)


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def run_all(cmds: list[list[str]], timeout_s: float = 60.0) -> list[tuple[int, str]]:
    """Run osad command lines side by side (each is a fresh process); (exit code, stderr) of each."""
    procs = [subprocess.Popen([sys.executable, "-m", "osad", *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in cmds]
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout_s)
        out.append((p.returncode, err))
    return out


# -- the ways a file goes bad ------------------------------------------------------------------------------

def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])


def random_bytes(p: Path) -> None:
    p.write_bytes(np.random.default_rng(15).bytes(4096))


def folder_instead(p: Path) -> None:
    p.unlink()
    p.mkdir()


def dangling_link(p: Path) -> None:
    p.unlink()
    p.symlink_to(p.parent / "nowhere" / p.name)


# -- featurizer ----------------------------------------------------------------------------------------------

WCFG = WindowConfig(scales=(2, 4), gap=2, step=2, calibration_samples=5)


def sample(eid: str, i: int) -> Sample:
    return Sample(entity_id=eid, host="h", comm="c", ts=float(i + 1), interval_s=1.0, seq=i,
                  metrics={"a": float(i % 3) + (eid == "b"), "b": float(i % 5)})


def featurize(f: Featurizer, eids, first: int, n: int) -> list[SignatureWindow]:
    out = []
    for i in range(first, first + n):
        out += f.process_batch([(sample(e, i), InputMeta("s", 0, i)) for e in eids])
    return [o.msg for o in out]


def wrong_shape_ranges(p: Path) -> None:  # valid JSON, min and max not lists: an IndexError before
    p.write_text(json.dumps({"entity_id": "a", "features": ["a", "b"], "min": 0, "max": 1}))


def not_an_object(p: Path) -> None:
    p.write_text("[1, 2, 3]")


def nan_clip(p: Path) -> None:
    d = json.loads(p.read_text())
    p.write_text(json.dumps({**d, "clip": float("nan")}))


def test_bad_learned_ranges_are_moved_aside_and_only_their_entity_calibrates_again(tmp_path, caplog):
    state = tmp_path / "state"
    first = Featurizer(WCFG, RangesStore(None, str(state)))
    before = featurize(first, ["a", "b"], 0, 12)
    scaling = {w.entity_id: w.scaling_id for w in before}
    assert set(scaling) == {"a", "b"}
    store = RangesStore(None, str(state))
    pa, pb = store._path("a"), store._path("b")
    good_a, good_b = pa.read_text(), pb.read_text()
    for mangle in (truncate, random_bytes, wrong_shape_ranges, not_an_object, nan_clip, folder_instead,
                   dangling_link):
        pa.write_text(good_a)
        mangle(pa)
        kept = pa.read_bytes() if pa.is_file() else None
        caplog.clear()
        f = Featurizer(WCFG, RangesStore(None, str(state)))  # a restarted featurizer
        after = featurize(f, ["a", "b"], 100, 12)  # must not raise (before: IndexError, IsADirectoryError)
        msgs = errors(caplog)
        assert len(msgs) == 1 and str(pa) in msgs[0] and "entity a" in msgs[0] and "calibrates again" in msgs[0], \
            (mangle.__name__, msgs)
        aside = moved_aside(pa.parent, pa.name)
        assert len(aside) == 1, f"{mangle.__name__}: the bad file was not moved aside"
        if kept is not None:
            assert aside[0].read_bytes() == kept, f"{mangle.__name__}: the bad file was changed"
        assert f.store.counters["calibrated"] == 1, mangle.__name__  # a calibrates again; b scales from its file
        assert f.ranges.corrupt == 1
        assert {w.entity_id for w in after} == {"a", "b"}
        assert {w.scaling_id for w in after if w.entity_id == "b"} == {scaling["b"]}
        assert pb.read_text() == good_b
        assert json.loads(pa.read_text())["entity_id"] == "a"  # a's new calibration replaced the bad file
        for p in aside:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def test_a_bad_learned_ranges_folder_is_moved_aside(tmp_path, caplog):
    state = tmp_path / "state"
    state.mkdir()
    (state / "ranges").write_text("not a folder")
    store = RangesStore(None, str(state))
    assert (state / "ranges").is_dir()
    assert [p.read_text() for p in moved_aside(state, "ranges")] == ["not a folder"]
    assert any("learned ranges folder" in m for m in errors(caplog))
    store.save("a", Ranges(("x",), np.zeros(1), np.ones(1)))
    assert store.lookup("a").features == ("x",)


@pytest.mark.broker
def test_the_featurizer_process_keeps_going_past_a_bad_learned_file(broker, topic_prefix, tmp_path):
    """Before: every sample of the entity was dead-lettered (an IndexError in each), on every restart."""
    state = tmp_path / "state"
    p = RangesStore(None, str(state))._path("e")
    p.write_text(json.dumps({"entity_id": "e", "features": ["a", "b"], "min": 0, "max": 1}))
    kept = p.read_bytes()
    port = free_port()
    f = Proc(["featurizer", "--bootstrap", broker.bootstrap, "--metrics-port", str(port), "--state-dir", str(state),
              "--scales", "2,4", "--gap", "2", "--step", "2", "--calibration-samples", "5"], tmp_path / "f.log")
    try:
        topic = f"{topic_prefix}osad.samples"
        for i in range(12):
            produce_raw(broker.bootstrap, topic, b"e", encode(sample("e", i)))
        reader = TopicReader(broker.bootstrap, SIGNATURES, prefix=topic_prefix)
        reader.read_until(lambda r: len(r) >= 4, 60, "the entity's windows")
        wait_until(lambda: metric(port, "osad_messages_in_total") == 12, 30, what="every sample read")
        assert metric(port, "osad_dead_letters_total") == 0
        assert f.p.poll() is None
        log = f.text()
        assert re.search(r"ERROR .*learned scaling ranges .*" + re.escape(p.name) + r" of entity e are unreadable", log)
        assert [a.read_bytes() for a in moved_aside(p.parent, p.name)] == [kept]
    finally:
        assert f.terminate() == 0


def test_a_bad_ranges_file_stops_the_featurizer_with_exit_2_and_the_way_out(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"entities": {"a": {"features": ["x", "y"], "min": [0, 0], "max": [1, 2]}}}))
    cases = {"truncated": truncate, "random": random_bytes, "folder": folder_instead, "dangling": dangling_link,
             "scalar_min": lambda p: p.write_text(json.dumps({"entities": {"a": {"features": ["x"], "min": 0,
                                                                                 "max": 1}}})),
             "nan_clip": lambda p: p.write_text(good.read_text().replace("[1, 2]", "[1, 2], \"clip\": NaN")),
             "not_an_object": not_an_object}
    paths = {}
    for name, mangle in cases.items():
        paths[name] = p = tmp_path / f"{name}.json"
        shutil.copy(good, p)
        mangle(p)
    kept = {n: p.read_bytes() for n, p in paths.items() if p.is_file()}
    results = run_all([["featurizer", "--bootstrap", "127.0.0.1:1", "--ranges", str(p), "--state-dir",
                        str(tmp_path / "state")] for p in paths.values()])
    for (name, p), (rc, err) in zip(paths.items(), results):
        assert rc == 2, f"{name}: exit {rc}\n{err}"
        assert "Traceback" not in err, f"{name}:\n{err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("osad featurizer: configuration error: ranges file " + str(p)), \
            f"{name}:\n{err}"
        assert "start without --ranges" in err and "--write-ranges" in err, f"{name}: no way out in\n{err}"
    for n, b in kept.items():
        assert paths[n].read_bytes() == b, f"{n}: the operator's file was changed"
    msgs = dict(zip(paths, (e for _, e in results)))
    assert "is a folder" in msgs["folder"] and "symbolic link" in msgs["dangling"]
    assert "clip must be a positive number" in msgs["nan_clip"] and "IndexError" in msgs["scalar_min"]


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str = "512k"):
    """A real, small file system (tmpfs, as root) to fill."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs to fill ({r.stderr.strip() or 'exit ' + str(r.returncode)}): "
                    "these tests need root (CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path, leave: int = 0) -> Path:
    """A filler file that leaves about ``leave`` bytes free."""
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    want = max(0, st.f_bavail * st.f_frsize - leave)
    with open(filler, "ab") as f:
        try:
            f.write(b"\0" * want)
            f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_a_full_disk_under_the_featurizer_state_is_reported_and_windowing_goes_on(tmp_path, caplog):
    with small_disk(tmp_path, "64k") as mnt:
        f = Featurizer(WCFG, RangesStore(None, str(mnt / "state")))
        fill(mnt)
        wins = featurize(f, ["a"], 0, 12)  # before: OSError from the save, each sample dead-lettered
        assert len(wins) == 4
        assert any("cannot save the learned scaling ranges of a" in m and "No space left" in m for m in errors(caplog))
        assert [p.name for p in (mnt / "state" / "ranges").iterdir()] == []  # no half-written file left


# -- detector calibrations -------------------------------------------------------------------------------


def window(eid: str, seq: int, n: int = 3) -> SignatureWindow:
    rng = np.random.default_rng(seq)
    return SignatureWindow(entity_id=eid, host="h", window_end_ts=float(seq), window_end_seq=seq, interval_s=1.0,
                           gap=5, scales=[60], features=[f"m{i}" for i in range(n)], scaling_id="",
                           signatures=np.full((1, 1, n, n), 0.25, np.float32),
                           values=(0.5 + 0.1 * rng.normal(size=(60, n))).astype(np.float32))


def stream(eid: str, count: int, first: int = 59) -> list[SignatureWindow]:
    return [window(eid, first + 5 * k) for k in range(count)]


def families(scores, eid) -> list[str]:
    return [s.model_id.split(":")[0] for s in scores if s.entity_id == eid]


def engine(folder: Path) -> Engine:
    return Engine(CSScorer(gap=5, max_iter=40), EngineConfig(cs_calibrate=5, cs_handover=0), store=CalibrationStore(folder))


def _resave(p: Path, **change) -> None:
    with np.load(p) as z:
        d = {k: z[k] for k in z.files}
    d.update(change)
    with open(p, "wb") as f:
        np.savez(f, **d)


def meta_a_list(p: Path) -> None:  # valid npz, its meta valid JSON but not an object: the detector died before
    _resave(p, meta=np.array("[1]"))


def wrong_shape_arrays(p: Path) -> None:
    with np.load(p) as z:
        names = [k for k in z.files if k != "meta"]
    _resave(p, **{k: np.zeros(7) for k in names})


def nan_arrays(p: Path) -> None:  # before: used, every score 0 with detail.invalid
    with np.load(p) as z:
        d = {k: np.full_like(z[k], np.nan) for k in z.files if k != "meta"}
    _resave(p, **d)


def test_bad_calibration_files_are_moved_aside_and_only_their_entity_calibrates_again(tmp_path, caplog):
    folder = tmp_path / "cal"
    engine(folder).score(stream("a", 5) + stream("b", 5))
    store = CalibrationStore(folder)
    pa, pb = store.path("a"), store.path("b")
    good_a, good_b = pa.read_bytes(), pb.read_bytes()
    later = stream("a", 6, first=59 + 25) + stream("b", 6, first=59 + 25)
    for mangle in (truncate, random_bytes, meta_a_list, wrong_shape_arrays, nan_arrays, folder_instead, dangling_link):
        pa.write_bytes(good_a)
        mangle(pa)
        kept = pa.read_bytes() if pa.is_file() else None
        caplog.clear()
        eng = engine(folder)  # a restarted detector
        out = eng.score(later)  # must not raise (before: AttributeError for meta_a_list, which killed the service)
        msgs = errors(caplog)
        assert len(msgs) == 1 and str(pa) in msgs[0] and "calibrates again" in msgs[0], (mangle.__name__, msgs)
        assert families(out, "a") == ["cs-jumpstarter"] * 5 + ["cs-calibrated"], mangle.__name__
        assert families(out, "b") == ["cs-calibrated"] * 6, mangle.__name__  # b is not affected
        assert eng.store.corrupt == 1 and eng.store.restored == 1
        aside = moved_aside(folder, pa.name)
        assert len(aside) == 1, mangle.__name__
        if kept is not None:
            assert aside[0].read_bytes() == kept
        assert pa.is_file() and pb.read_bytes() == good_b  # a's new calibration is saved
        assert all(np.isfinite(s.score) for s in out)
        shutil.rmtree(aside[0]) if aside[0].is_dir() and not aside[0].is_symlink() else aside[0].unlink()


@pytest.mark.broker
def test_the_detector_process_keeps_scoring_past_a_calibration_it_cannot_use(broker, topic_prefix, tmp_path):
    """Before: the detector raised AttributeError in its batch deadline and exited 1, on every restart."""
    state = tmp_path / "cal"
    state.mkdir()
    p = CalibrationStore(state).path("e")
    np.savez(p, meta=np.array("[1]"))
    kept = p.read_bytes()
    port = free_port()
    d = Proc(["detect", "--bootstrap", broker.bootstrap, "--metrics-port", str(port), "--state-dir", str(state),
              "--models", str(tmp_path / "models")], tmp_path / "d.log")
    try:
        topic = f"{topic_prefix}osad.signatures"
        for w in stream("e", 3):
            produce_raw(broker.bootstrap, topic, b"e", encode(w))
        reader = TopicReader(broker.bootstrap, SCORES, prefix=topic_prefix)
        reader.read_until(lambda r: len(r) >= 3, 90, "a score for every window")
        assert d.p.poll() is None, d.text()[-2000:]
        assert re.search(r"ERROR .*calibration file .*" + re.escape(p.name) + r" of e is unreadable \(its meta is a "
                         r"JSON list", d.text())
        assert [a.read_bytes() for a in moved_aside(state, p.name)] == [kept]
    finally:
        assert d.terminate() == 0


# -- detector checkpoints ------------------------------------------------------------------------------


def test_a_bad_checkpoint_in_the_models_folder_is_reported_and_skipped_not_moved(tmp_path, caplog):
    """Checkpoints are the operator's (or the online trainer's) files: the detector says once what is wrong
    with each and scores without it (compressed sensing goes on); it never moves or changes them."""
    import torch

    from osad.detector.checkpoint import CheckpointError, CheckpointParts, load_checkpoint, save_checkpoint
    from osad.detector.folder import CheckpointFolder, ModelsConfig
    from osad.detector.mscred import MSCREDScorer
    from osad.detector.mscred_net import MSCREDConfig
    from osad.detector.score_stats import Calibration

    models = tmp_path / "models"
    models.mkdir()
    parts = CheckpointParts(features=["a", "b", "c"], scales=(10, 30, 60), gap=10, step=5, ranges=None,
                            config=MSCREDConfig(n_features=3), score_kind="sse", theta=1.0, calibration=Calibration({}),
                            train_info={}, weights={"encoder.weight": torch.zeros(2, 2)})
    save_checkpoint(parts, models / "wrong_shape.safetensors")  # hashes right, tensors not the model's
    (models / "random.safetensors").write_bytes(np.random.default_rng(1).bytes(4096))
    (models / "empty.safetensors").write_bytes(b"")
    shutil.copy(models / "wrong_shape.safetensors", models / "truncated.safetensors")
    truncate(models / "truncated.safetensors")
    (models / "folder.safetensors").mkdir()
    (models / "dangling.safetensors").symlink_to(tmp_path / "gone.safetensors")
    before = {p.name: p.read_bytes() for p in models.iterdir() if p.is_file()}
    f = CheckpointFolder(ModelsConfig(models=str(models)))
    f.scan(force=True)
    f.scan(force=True)
    assert f.models == {}
    msgs = errors(caplog)
    for name, why in {"wrong_shape": "tensors do not fit the model", "random": "not a valid safetensors file",
                      "empty": "not a valid safetensors file", "truncated": "not a valid safetensors file",
                      "folder": "is a folder"}.items():
        hits = [m for m in msgs if f"{name}.safetensors" in m]
        assert len(hits) == 1 and why in hits[0], (name, hits)  # reported once, not at every scan
    assert {p.name: p.read_bytes() for p in models.iterdir() if p.is_file()} == before
    with pytest.raises(CheckpointError, match="symbolic link to .*gone.safetensors, which does not exist"):
        load_checkpoint(models / "dangling.safetensors")
    with pytest.raises(CheckpointError, match="tensors do not fit"):
        MSCREDScorer.from_checkpoint(models / "wrong_shape.safetensors", device="cpu")


# -- the alerter's store ---------------------------------------------------------------------------------------

def anomaly(i: int, rev: int = 0) -> Anomaly:
    return Anomaly(entity_id=f"h/{i}@1", host="h", pid=1, comm="p", anomaly_id=f"{i:032x}", revision=rev,
                   status="open", severity="medium", start_ts=90.0, last_ts=100.0 + i, score=3.0, threshold=1.5,
                   models=["cs-jumpstarter:v1"], root_causes=[RootCause(feature="mem", contribution=0.7)],
                   summary=f"anomaly {i}", max_ratio=2.0, first_window_seq=10, windows_over=2)


def a_store(path: Path, n: int = 2000) -> Path:
    s = open_store(f"sqlite:///{path}")
    s.save([anomaly(i) for i in range(n)], {f"h/{i}@1": {"x": i} for i in range(n // 4)})
    s.close()
    c = sqlite3.connect(path)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    return path


def damage_page(path: Path, page: int) -> None:
    """Overwrite one page (1-based) with garbage."""
    c = sqlite3.connect(path)
    (size,) = c.execute("PRAGMA page_size").fetchone()
    c.close()
    with open(path, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(np.random.default_rng(page).bytes(size))


def index_root(path: Path, name: str) -> int:
    c = sqlite3.connect(path)
    (root,) = c.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()
    c.close()
    return root


def foreign_db(p: Path) -> None:
    p.unlink()
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE customers (name TEXT)")
    c.commit()
    c.close()


def other_shape(p: Path) -> None:  # an osad-named table with other columns
    p.unlink()
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE osad_anomalies (anomaly_id TEXT PRIMARY KEY, revision INTEGER)")
    c.commit()
    c.close()


def test_a_bad_store_stops_the_alerter_with_exit_2_and_the_way_out(tmp_path):
    cases = {"truncated": (truncate, "is damaged"), "random": (random_bytes, "is not an SQLite database"),
             "damaged_index": (lambda p: damage_page(p, index_root(p, "osad_anomalies_last")), "is damaged"),
             "foreign": (foreign_db, "of something else (tables customers)"),
             "other_shape": (other_shape, "lacks the columns entity_id"),
             "folder": (folder_instead, "is a folder"), "dangling": (dangling_link, "symbolic link to")}
    good = a_store(tmp_path / "good.db")
    paths = {}
    for name, (mangle, _) in cases.items():
        paths[name] = p = tmp_path / name / "a.db"
        p.parent.mkdir()
        shutil.copy(good, p)
        mangle(p)
    kept = {n: p.read_bytes() for n, p in paths.items() if p.is_file()}
    results = run_all([["alert", "--bootstrap", "127.0.0.1:1", "--store", f"sqlite:///{p}"] for p in paths.values()])
    for (name, p), (rc, err) in zip(paths.items(), results):
        assert rc == 2, f"{name}: exit {rc}\n{err}"
        assert "Traceback" not in err, f"{name}:\n{err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("osad alert: configuration error: --store: "), f"{name}:\n{err}"
        assert str(p) in err and cases[name][1] in err, f"{name}:\n{err}"
    for name in ("truncated", "random", "damaged_index"):
        assert ".recover" in msgs_of(results, paths, name) and "mv " in msgs_of(results, paths, name)
    for n, b in kept.items():
        assert paths[n].read_bytes() == b, f"{n}: the store was changed"


def msgs_of(results, paths, name) -> str:
    return dict(zip(paths, (e for _, e in results)))[name]


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 command-line shell is not installed "
                    "(Debian package sqlite3); it is what the way out names")
def test_the_way_out_of_a_damaged_store_recovers_every_anomaly(tmp_path):
    p = a_store(tmp_path / "a.db")
    want = {a.anomaly_id: a for a in open_store(f"sqlite:///{p}", readonly=True).list(limit=10_000)}
    damage_page(p, index_root(p, "osad_anomalies_last"))  # an index: every row is still in the table
    with pytest.raises(StoreError) as e:
        open_store(f"sqlite:///{p}")
    assert e.value.reason == "corrupt"
    move, recover, dump = re.findall(r"`([^`]+)`", str(e.value))  # the message's commands, run as written
    has_recover = subprocess.run(["sqlite3", ":memory:", "SELECT 1 FROM sqlite_dbpage"],
                                 capture_output=True).returncode == 0
    for cmd in (move, recover if has_recover else dump):  # (Debian's sqlite3 3.40 shell has no .recover)
        subprocess.run(["bash", "-c", cmd], check=True, cwd=tmp_path, capture_output=True)
    assert (tmp_path / "a.db.corrupt").is_file()
    s = open_store(f"sqlite:///{p}")
    got = {a.anomaly_id: a for a in s.list(limit=10_000)}
    assert got == want and len(got) == 2000
    assert s.load_state("h/7@1") == {"x": 7}
    s.close()


# -- a full disk under the alerter's store -------------------------------------------------------------------------


def score(eid: str, host: str, seq: int, value: float) -> Score:
    return Score(entity_id=eid, host=host, pid=1, comm="w", window_end_ts=1.7e9 + seq, window_end_seq=seq,
                 interval_s=1.0, gap=10, model_id="cs-jumpstarter:v1", score=value, features=["a", "b", "c", "d"],
                 contributions=[1.0, 0.1, 0.1, 0.1])


class Feed:
    """Scores into an Alerter as the runner would hand them over, one incident (open, closed) per entity."""

    def __init__(self, al: Alerter):
        self.al, self.offset, self.k = al, 0, 0
        self.published: dict[str, Anomaly] = {}  # anomaly_id -> its newest revision on the topic

    def incident(self) -> None:
        self.k += 1
        eid, host = f"host-{self.k}/1@1", f"host-{self.k}"
        for j, v in enumerate([5.0, 5.0, 6.0, 0.1, 0.1, 0.1]):
            for o in self.al.process(score(eid, host, 10 * (j + 1), v), InputMeta(SCORES.name, 0, self.offset)):
                self.published[o.msg.anomaly_id] = o.msg
            self.offset += 1

    def commit(self) -> dict[int, int]:
        """What the runner does before committing: outputs acknowledged, then what may not be committed."""
        self.al.acknowledged()
        return self.al.retained()


def in_store(path: Path) -> dict[str, int]:
    s = open_store(f"sqlite:///{path}", readonly=True)
    try:
        return {a.anomaly_id: a.revision for a in s.list(limit=100_000)}
    finally:
        s.close()


def alerter_in_a_runner(store) -> tuple[Alerter, ServiceRunner]:
    cfg = AlerterConfig(static_thresholds={"cs-jumpstarter": 2.0}, host_min_entities=0)
    al = Alerter(cfg, store)
    runner = ServiceRunner(al, RunnerConfig(bootstrap="unused:9092", group="g"), install_signals=False)  # metrics
    return al, runner


def test_a_full_disk_under_the_store_is_reported_and_nothing_acknowledged_is_lost(tmp_path, caplog):
    with small_disk(tmp_path) as mnt:
        db = mnt / "anomalies.db"
        store = open_store(f"sqlite:///{db}")
        al, runner = alerter_in_a_runner(store)
        feed = Feed(al)
        store_errors = lambda: runner.metrics.registry.get_sample_value(  # noqa: E731
            "osad_alerter_store_errors_total", {"service": "alerter"})
        for _ in range(3):
            feed.incident()
            assert feed.commit() == {}
        acknowledged = {a: m.revision for a, m in feed.published.items()}
        assert len(acknowledged) == 3 and in_store(db) == acknowledged
        filler = fill(mnt, leave=48 * 1024)
        caplog.clear()
        for _ in range(200):  # Scores until the store's writes no longer fit
            committed_to = feed.offset
            feed.incident()
            retained = feed.commit()
            if retained:
                break
            acknowledged = {a: m.revision for a, m in feed.published.items()}
        else:
            pytest.fail("200 incidents fitted in 48 KiB: the disk never filled")
        assert retained == {0: committed_to}  # the runner commits nothing past the last good write
        for _ in range(3):  # the alerter goes on while the disk stays full
            feed.incident()
            assert feed.commit() == {0: committed_to}
        assert al.engine.counters["opened"] == len(feed.published) > len(acknowledged)
        msgs = [m for m in errors(caplog) if "store write failed" in m]
        assert len(msgs) == 4 and store_errors() == 4
        assert "the disk is full" in msgs[0] and str(db) in msgs[0] and re.search(r"free of 512\.0 KiB on ", msgs[0])
        assert in_store(db) == acknowledged  # what was acknowledged is all there, unchanged
        filler.unlink()
        assert feed.commit() == {}
        assert in_store(db) == {a: m.revision for a, m in feed.published.items()}  # and the rest followed
        assert store_errors() == 4
        al.shutdown()


def test_healthz_says_the_store_cannot_be_written_while_the_disk_is_full(tmp_path):
    with small_disk(tmp_path, "256k") as mnt:
        store = open_store(f"sqlite:///{mnt}/anomalies.db")
        al, runner = alerter_in_a_runner(store)
        feed = Feed(al)
        ok, h = runner.health()
        assert h["status"] == "ok" and h["store"] == {"ok": True}
        filler = fill(mnt)
        feed.incident()
        assert feed.commit() != {}
        ok, h = runner.health()
        assert ok is True  # HTTP 200: a restart cannot make room, so a liveness probe must not restart it
        assert h["status"] == "degraded" and h["degraded"] == ["store"]
        assert h["store"]["ok"] is False and h["store"]["problem"] == "full"
        assert "the disk is full" in h["store"]["error"] and h["store"]["failing_for_s"] >= 0
        filler.unlink()
        assert feed.commit() == {}
        ok, h = runner.health()
        assert h["status"] == "ok" and h["store"] == {"ok": True}
        al.shutdown()
