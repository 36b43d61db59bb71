"""`osad anomalies list/show` on a store, `osad tail --once` on the real broker, `osad alert` errors."""

import json
import subprocess

import pytest

from osad.alerter.cli import parse_since
from osad.alerter.store import open_store
from osad.schemas import ANOMALIES, Anomaly, RootCause, encode
from tests.conftest import osad_cmd


def anomaly(aid, entity, severity, status, last_ts, rev=1, feats=("rss_anon_bytes", "on_cpu_ns")):
    return Anomaly(entity_id=entity, host="h", pid=7, comm="worker", anomaly_id=aid, revision=rev, status=status,
                   severity=severity, start_ts=last_ts - 30, last_ts=last_ts,
                   end_ts=last_ts if status == "closed" else None, score=4.2, threshold=1.4,
                   models=["cs-jumpstarter:v1", "mscred:abc"],
                   root_causes=[RootCause(feature=f, contribution=c) for f, c in zip(feats, (0.625, 0.25))],
                   summary="worker: over threshold", max_ratio=3.0, first_window_seq=120, windows_over=4)


A = anomaly("a1" * 16, "h/7@100", "high", "closed", 1_700_000_000.0, rev=3)
B = anomaly("b2" * 16, "h/8@200", "critical", "update", 1_700_000_100.0, feats=("net_tx_bytes", "syscalls"))
C = anomaly("c3" * 16, "other/1@5", "low", "open", 1_700_000_200.0, rev=0)
H = anomaly("d4" * 16, "host:h", "low", "closed", 1_699_999_000.0).model_copy(
    update={"pid": None, "scope": "host", "members": ["h/7@100", "h/8@200", "h/9@300"]})


def osad(*args, check=True, timeout=120):
    r = subprocess.run(osad_cmd(*args), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"osad {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path}/anomalies.db"
    st = open_store(url)
    st.save([A, B, C])
    st.close()
    return url


def test_anomalies_list_table_filters_and_json(db):
    out = osad("anomalies", "list", "--store", db).stdout.splitlines()
    assert out[0].split()[:4] == ["ID", "SEVERITY", "STATUS", "REV"]
    assert [line.split()[0] for line in out[1:]] == ["c3" * 6, "b2" * 6, "a1" * 6]  # most recent first
    row_a = out[3]
    for text in ("high", "closed", "3", "h/7@100 (worker)", "2023-11-14 22:13:20", "3.00x", "cs-jumpstarter,mscred",
                 "rss_anon_bytes,on_cpu_ns"):
        assert text in row_a, (text, row_a)

    def ids(*flags):
        return [a["anomaly_id"][:2] for a in json.loads(osad("anomalies", "list", "--store", db, "--json",
                                                              *flags).stdout)]
    assert ids() == ["c3", "b2", "a1"]
    assert ids("--entity", "h/7@100") == ["a1"] and ids("--entity", "h/*") == ["b2", "a1"]
    assert ids("--severity", "high,critical") == ["b2", "a1"]
    assert ids("--status", "open") == ["c3", "b2"] and ids("--status", "closed") == ["a1"]
    assert ids("--since", "1700000050") == ["c3", "b2"] and ids("--since", "2023-11-14T22:16:00Z") == ["c3"]
    assert ids("--limit", "1") == ["c3"]
    full = json.loads(osad("anomalies", "list", "--store", db, "--json", "--entity", "h/7@100").stdout)[0]
    assert Anomaly.model_validate(full) == A
    assert "no anomalies match" in osad("anomalies", "list", "--store", db, "--entity", "nobody").stdout


def test_anomalies_show(db):
    out = osad("anomalies", "show", "a1a1a1a1", "--store", db).stdout
    for text in (f"anomaly:      {A.anomaly_id}", "entity:       h/7@100", "status:       closed (revision 3)",
                 "severity:     high", "ratio 3.00x", "windows over: 4", "models:       cs-jumpstarter:v1, mscred:abc",
                 "1. rss_anon_bytes", "62.5%", "2. on_cpu_ns", "25.0%"):
        assert text in out, (text, out)
    assert "- (open)" in osad("anomalies", "show", C.anomaly_id, "--store", db).stdout
    assert Anomaly.model_validate_json(osad("anomalies", "show", B.anomaly_id, "--store", db, "--json").stdout) == B
    st = open_store(db)
    st.save([H])
    st.close()
    out = osad("anomalies", "show", H.anomaly_id, "--store", db).stdout
    assert "scope:        host" in out and "members:      h/7@100, h/8@200, h/9@300" in out
    r = osad("anomalies", "show", "ffffffff", "--store", db, check=False)
    assert r.returncode == 1 and "no anomaly 'ffffffff'" in r.stderr


def test_anomalies_errors_a_user_can_act_on(tmp_path, db):
    r = osad("anomalies", "list", "--store", f"sqlite:///{tmp_path}/nope.db", check=False)
    assert r.returncode == 2 and "no anomalies store at" in r.stderr and "--store" in r.stderr
    r = osad("anomalies", "list", "--store", db, "--since", "yesterday", check=False)
    assert r.returncode == 2 and "duration ago" in r.stderr
    r = osad("anomalies", "list", "--store", db, "--severity", "huge", check=False)
    assert r.returncode == 2 and "low, medium, high, critical" in r.stderr
    r = osad("alert", "--threshold", "mscred:20", check=False)
    assert r.returncode == 2 and "MODEL_FAMILY=VALUE" in r.stderr
    r = osad("alert", "--host-share", "0", check=False)
    assert r.returncode == 2 and "--host-share" in r.stderr and "(0, 1]" in r.stderr
    r = osad("alert", "--host-hold", "-1", check=False)
    assert r.returncode == 2 and "--host-hold" in r.stderr and "0 (no waiting) or more" in r.stderr
    r = osad("alert", "--store", "postgres://osad:pw@127.0.0.1:1/osad", check=False)
    assert r.returncode == 2 and "cannot connect" in r.stderr and "pw@" not in r.stderr


def test_parse_since():
    assert parse_since("90s", now=1000.0) == 910.0 and parse_since("1w", now=1e6) == 1e6 - 604800
    assert parse_since("2023-11-14T22:13:20+00:00") == 1_700_000_000.0
    with pytest.raises(ValueError, match="ISO"):
        parse_since("last tuesday")


@pytest.mark.broker
@pytest.mark.slow
def test_tail_once_shows_the_latest_revision_of_each_incident_filtered(broker, topic_prefix):
    from kafka import KafkaProducer

    from osad.runtime.kafka import ensure_topics

    ensure_topics(broker.bootstrap, (ANOMALIES,), prefix=topic_prefix)
    prod = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    older_a = anomaly(A.anomaly_id, A.entity_id, "medium", "open", A.last_ts - 20, rev=0)
    for a in (older_a, A, B, C):
        prod.send(ANOMALIES.full_name(topic_prefix), key=a.entity_id.encode(), value=encode(a))
    prod.send(ANOMALIES.full_name(topic_prefix), key=b"x", value=b"not json")  # ignored
    prod.flush()
    prod.close()

    base = ("tail", "--bootstrap", broker.bootstrap, "--from-beginning", "--once")
    out = osad(*base).stdout
    assert "3 incident(s)" in out
    lines = [x for x in out.splitlines() if "h/7@100" in x]
    assert len(lines) == 1 and "closed" in lines[0] and "high" in lines[0] and A.anomaly_id[:12] in lines[0]
    assert out.index("other/1@5") < out.index("h/8@200") < out.index("h/7@100")  # most recent first

    out = osad(*base, "--entity", r"^h/", "--min-severity", "high").stdout
    assert "2 incident(s)" in out and "other/1@5" not in out and "h/8@200" in out

    js = osad(*base, "--json", "--min-severity", "critical").stdout.splitlines()
    assert [Anomaly.model_validate_json(x) for x in js] == [B]

    # from now: nothing published since, so the timeout ends it with an empty table
    out = osad("tail", "--bootstrap", broker.bootstrap, "--once", "--timeout", "2").stdout
    assert "0 incident(s)" in out


def test_repeatable_options_from_the_environment_and_flags_replace_them(monkeypatch):
    from osad.cli import build_parser

    monkeypatch.setenv("OSAD_THRESHOLD", "mscred=3, cs-jumpstarter=0.5")
    monkeypatch.setenv("OSAD_WEBHOOK", "http://a.example/x http://b.example/y")
    p = build_parser()
    a = p.parse_args(["alert"])
    assert a.static_thresholds == [("mscred", 3.0), ("cs-jumpstarter", 0.5)] and len(a.webhook) == 2
    a = p.parse_args(["alert", "--threshold", "mscred=9", "--threshold", "x=1"])
    assert a.static_thresholds == [("mscred", 9.0), ("x", 1.0)] and len(a.webhook) == 2


def test_docstring_examples_run():
    import doctest

    from osad.alerter import cli, config, core, display, host_events, incidents, state, store, thresholds
    for mod in (core, config, state, thresholds, incidents, host_events, store, display, cli):
        r = doctest.testmod(mod)
        assert r.attempted > 0 and r.failed == 0, mod.__name__


def test_every_option_of_the_alerters_commands_is_a_declared_setting():
    """Each flag and positional of alert, anomalies list/show, tail and report comes from one Config field
    (Config.add_arguments marks it), with help text; every flag of `osad alert` (a service) has its variable."""
    import argparse
    import dataclasses

    from osad.cli import build_parser
    from osad.runtime.config import env_name

    def subparsers(p):
        return {name: sp for a in p._actions if isinstance(a, argparse._SubParsersAction)
                for name, sp in a.choices.items()}
    top = subparsers(build_parser())
    commands = {"alert": top["alert"], "tail": top["tail"], "report": top["report"],
                **{f"anomalies {k}": v for k, v in subparsers(top["anomalies"]).items()}}
    assert set(commands) == {"alert", "tail", "report", "anomalies list", "anomalies show"}
    for name, p in commands.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            cls, field = a.osad_setting
            s = {f.name: f for f in dataclasses.fields(cls)}[field].metadata["osad"]
            assert a.dest == field and s.help, (name, a.option_strings)
            if name == "alert":
                assert s.env_for(field) == env_name(a.option_strings[0]), a.option_strings
