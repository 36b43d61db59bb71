"""The anomalies store: SQLite and a real PostgreSQL server, same schema, same answers."""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from osad.alerter.store import StoreError, open_store, redact
from osad.runtime.broker import free_port
from osad.schemas import Anomaly, RootCause


def anomaly(aid="a" * 32, rev=0, status="open", severity="medium", entity="h/1@5", last_ts=100.0, **kw):
    return Anomaly(entity_id=entity, host="h", pid=1, comm="proc", anomaly_id=aid, revision=rev, status=status,
                   severity=severity, start_ts=90.0, last_ts=last_ts, end_ts=kw.pop("end_ts", None), score=3.0,
                   threshold=1.5, models=["cs-jumpstarter:v1"], root_causes=[RootCause(feature="mem", contribution=0.7)],
                   summary=kw.pop("summary", f"rev {rev}"), max_ratio=2.0, first_window_seq=10, windows_over=2, **kw)


# -- a throwaway PostgreSQL cluster ---------------------------------------------------------------

def _pg_bindir() -> str | None:
    def version(d):
        try:
            return float(Path(d).parent.name)
        except ValueError:
            return 0.0
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return d
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return os.path.dirname(os.path.realpath(initdb))
    return None


@pytest.fixture(scope="module")
def pg_server():
    """A PostgreSQL cluster in a temporary folder on a free loopback port (as user postgres when root)."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or on PATH; "
                    "install the Debian package postgresql (scripts/setup.sh does)")
    pytest.importorskip("psycopg", reason="psycopg is a dependency of osad: pip install -e . (scripts/setup.sh)")
    root = tempfile.mkdtemp(prefix="osad-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), free_port()
    run = lambda *cmd: subprocess.run(as_user + list(cmd), capture_output=True, text=True, timeout=300)  # noqa: E731
    r = run(f"{bindir}/initdb", "-D", data, "-U", "osad", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
    assert r.returncode == 0, f"initdb failed:\n{r.stdout}\n{r.stderr}"
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off " \
           "-c full_page_writes=off"
    r = run(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(root, "server.log"), "-w", "-t", "120", "-o", opts,
            "start")
    assert r.returncode == 0, f"pg_ctl start failed:\n{r.stdout}\n{r.stderr}\n" + \
        Path(root, "server.log").read_text(errors="replace")[-2000:]
    try:
        yield f"postgresql://osad@127.0.0.1:{port}"
    finally:
        run(f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_server):
    """A fresh database on the throwaway server for one test."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    yield f"{pg_server}/{name}"
    with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/a.db"
    return request.getfixturevalue("pg_dsn")


# -- behaviour, on both backends -----------------------------------------------------------------

def scenario(url: str) -> dict:
    """Writes and reads that must give the same answers on every backend."""
    st = open_store(url)
    res = {}
    try:
        st.save([anomaly(rev=0)], now=1000.0)
        st.save([anomaly(rev=2, status="update", severity="high")], now=1001.0)
        st.save([anomaly(rev=1, status="update")], now=1002.0)  # late: an older revision changes nothing
        st.save([anomaly(rev=2, status="update", severity="high", summary="same revision again")], now=1003.0)
        got = st.get("a" * 32)
        res["kept"] = (got.revision, got.severity, got.summary)
        st.save([anomaly(rev=3, status="closed", severity="high", end_ts=99.0)])
        res["closed"] = st.get("aaaaaa").model_dump()  # unique prefix
        st.save([anomaly("b" * 32, entity="h/2@7", severity="low", last_ts=200.0),
                 anomaly("bc" + "0" * 30, entity="other/1", severity="critical", last_ts=300.0, status="update",
                         rev=4)])
        res["count"] = st.count()
        ids = lambda rows: [a.anomaly_id[:2] for a in rows]  # noqa: E731
        res["all"] = ids(st.list())
        res["entity"] = ids(st.list(entity="h/1@5"))
        res["prefix"] = ids(st.list(entity="h/*"))
        res["no_like_wildcards"] = ids(st.list(entity="h_*"))
        res["severity"] = ids(st.list(severities=["high", "critical"]))
        res["open"] = ids(st.list(statuses=["open", "update"]))
        res["since"] = ids(st.list(since=150.0))
        res["limit"] = ids(st.list(limit=1))
        res["short"] = st.get("b")  # shorter than 6 characters: exact ids only
        res["prefixes"] = [st.get("bc0000").anomaly_id[:2], st.get("bbbbbb").anomaly_id[:2]]
        # restart state
        st.save(states={"h/1@5": {"v": 1, "x": [1, 2], "incident": {"id": 1}}, "h/2@7": {"v": 1, "incident": None}},
                now=1000.0)
        res["state"] = st.load_state("h/1@5")
        st.save(states={"h/1@5": {"v": 1, "x": [3], "incident": None}}, now=2000.0)
        res["state2"] = st.load_state("h/1@5")
        st.save(states={"h/3@1": {"v": 1, "incident": {"id": 3}}}, now=500.0)
        res["stale"] = st.stale_open_states(before=1500.0)
        res["pruned"] = st.prune_states(before=1500.0)
        res["after_prune"] = [st.load_state(e) is not None for e in ("h/1@5", "h/2@7", "h/3@1")]
        st.save(states={"h/1@5": None})
        res["deleted"] = st.load_state("h/1@5")
    finally:
        st.close()
    ro = open_store(url, readonly=True)
    try:
        res["readonly"] = [a.anomaly_id[:2] for a in ro.list()]
    finally:
        ro.close()
    return res


def test_store_semantics(store_url):
    r = scenario(store_url)
    assert r["kept"] == (2, "high", "rev 2")
    assert r["closed"]["revision"] == 3 and r["closed"]["status"] == "closed" and r["closed"]["end_ts"] == 99.0
    assert r["closed"]["root_causes"] == [{"feature": "mem", "contribution": 0.7}]
    assert r["count"] == 3
    assert r["all"] == ["bc", "bb", "aa"]  # most recently active first
    assert r["entity"] == ["aa"] and r["prefix"] == ["bb", "aa"] and r["no_like_wildcards"] == []
    assert r["severity"] == ["bc", "aa"] and r["open"] == ["bc", "bb"] and r["since"] == ["bc", "bb"]
    assert r["limit"] == ["bc"] and r["short"] is None and r["prefixes"] == ["bc", "bb"]
    assert r["state"] == {"v": 1, "x": [1, 2], "incident": {"id": 1}}
    assert r["state2"] == {"v": 1, "x": [3], "incident": None}
    assert r["stale"] == [{"v": 1, "incident": {"id": 3}}]
    assert r["pruned"] == 1 and r["after_prune"] == [True, False, True]
    assert r["deleted"] is None and r["readonly"] == ["bc", "bb", "aa"]


def test_sqlite_and_postgresql_answer_the_same(tmp_path, pg_dsn):
    assert scenario(f"sqlite:///{tmp_path}/same.db") == scenario(pg_dsn)


def test_an_ambiguous_id_prefix_asks_for_more(tmp_path):
    st = open_store(f"sqlite:///{tmp_path}/p.db")
    st.save([anomaly("abcdef" + "0" * 26), anomaly("abcdef" + "1" * 26)])
    with pytest.raises(StoreError, match="more than one anomaly id; give more characters"):
        st.get("abcdef")
    assert st.get("abcdef1").anomaly_id.endswith("1")
    st.close()


def test_schema_is_created_once_and_reopened(store_url):
    a = open_store(store_url)
    a.save([anomaly()])
    a.close()
    b = open_store(store_url)  # second open: tables exist, version matches
    assert b.count() == 1
    b.close()


# -- errors a user can act on --------------------------------------------------------------------

def test_bad_store_urls_say_what_to_write(tmp_path):
    for url, words in (("mysql://x/y", "postgresql://USER"), ("sqlite://relative.db", "sqlite:///relative"),
                       ("anomalies.db", "sqlite:///PATH")):
        with pytest.raises(StoreError, match=words):
            open_store(url)
    with pytest.raises(StoreError, match="no anomalies store at .*osad alert"):
        open_store(f"sqlite:///{tmp_path}/missing.db", readonly=True)
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="SQLite"):
        open_store(f"sqlite:///{tmp_path}/junk.db")


def test_unreachable_postgresql_says_so_without_the_password():
    pytest.importorskip("psycopg")
    port = free_port()
    with pytest.raises(StoreError) as e:
        open_store(f"postgresql://osad:hunter2@127.0.0.1:{port}/osad")
    msg = str(e.value)
    assert "cannot connect" in msg and "hunter2" not in msg and "***" in msg and "server is running" in msg
    assert redact("postgres://u:p@h/d") == "postgres://u:***@h/d"


def test_a_store_of_another_schema_version_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/v.db"
    open_store(url).close()
    import sqlite3

    c = sqlite3.connect(tmp_path / "v.db")
    c.execute("UPDATE osad_store_meta SET value = '99' WHERE key = 'schema_version'")
    c.commit()
    c.close()
    with pytest.raises(StoreError, match="schema version 99"):
        open_store(url)
