"""Where anomalies and the alerter's restart state live: SQLite (default) or PostgreSQL.

``open_store(url)``:

* ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (three slashes then the path, as
  SQLAlchemy writes it), ``sqlite:///:memory:``: the standard library's sqlite3, WAL journal (readers
  such as ``osad anomalies list`` never block the writer);
* ``postgresql://user:password@host:port/dbname`` (or ``postgres://``, or any libpq DSN): psycopg 3.

Both hold the same tables with the same meaning (see docs/alerter.md, "Store"):

* ``osad_anomalies``: one row per anomaly_id, the latest revision (an upsert never replaces a row by
  a lower or equal revision, so re-delivered states change nothing);
* ``osad_alerter_state``: per entity, the JSON state a restarted alerter needs (thresholds, last
  sequence numbers, the open incident);
* ``osad_store_meta``: the schema version.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Iterable

from osad.schemas import Anomaly, decode, encode, severity_rank

SCHEMA_VERSION = "1"
#: where ``osad alert`` keeps anomalies and state unless ``--store`` (``OSAD_STORE``) says otherwise
DEFAULT_STORE = "sqlite:///var/alerter/anomalies.db"
STORE_HELP = ("where anomalies and the alerter's restart state live: sqlite:///relative/path.db, "
              "sqlite:////absolute/path.db, or postgresql://USER:PASSWORD@HOST:PORT/DBNAME")
#: stored states of entities without an open incident are forgotten when not updated for this long
STATE_TTL_S = 7 * 86400.0

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS osad_store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS osad_anomalies (
        anomaly_id TEXT PRIMARY KEY,
        revision BIGINT NOT NULL,
        entity_id TEXT NOT NULL,
        status TEXT NOT NULL,
        severity TEXT NOT NULL,
        severity_rank INTEGER NOT NULL,
        start_ts DOUBLE PRECISION NOT NULL,
        last_ts DOUBLE PRECISION NOT NULL,
        end_ts DOUBLE PRECISION,
        max_ratio DOUBLE PRECISION,
        models TEXT NOT NULL,
        summary TEXT NOT NULL,
        body TEXT NOT NULL,
        stored_at DOUBLE PRECISION NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS osad_anomalies_entity ON osad_anomalies (entity_id, last_ts)""",
    """CREATE INDEX IF NOT EXISTS osad_anomalies_last ON osad_anomalies (last_ts)""",
    """CREATE TABLE IF NOT EXISTS osad_alerter_state (
        entity_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        open_incident INTEGER NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS osad_alerter_state_open ON osad_alerter_state (open_incident, updated_at)""",
)

_UPSERT_ANOMALY = """
INSERT INTO osad_anomalies (anomaly_id, revision, entity_id, status, severity, severity_rank, start_ts, last_ts,
                            end_ts, max_ratio, models, summary, body, stored_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (anomaly_id) DO UPDATE SET
    revision = excluded.revision, entity_id = excluded.entity_id, status = excluded.status,
    severity = excluded.severity, severity_rank = excluded.severity_rank, start_ts = excluded.start_ts,
    last_ts = excluded.last_ts, end_ts = excluded.end_ts, max_ratio = excluded.max_ratio,
    models = excluded.models, summary = excluded.summary, body = excluded.body, stored_at = excluded.stored_at
WHERE excluded.revision > osad_anomalies.revision
"""

_UPSERT_STATE = """
INSERT INTO osad_alerter_state (entity_id, state, open_incident, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (entity_id) DO UPDATE SET
    state = excluded.state, open_incident = excluded.open_incident, updated_at = excluded.updated_at
"""


class StoreError(RuntimeError):
    """The store cannot be opened, read or written; the text says which store and what to do."""


def redact(url: str) -> str:
    """The URL without its password, for messages.

    >>> redact("postgresql://osad:secret@db:5432/osad")
    'postgresql://osad:***@db:5432/osad'
    """
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def open_store(url: str, readonly: bool = False) -> "Store":
    """Open (and, unless ``readonly``, create) the store named by ``url``."""
    url = (url or "").strip()
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://"):]
        if not rest.startswith("/") or rest == "/":
            raise StoreError(f"store {url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db")
        path = rest[1:]
        return SQLiteStore(path, readonly=readonly)
    if url.startswith(("postgresql://", "postgres://")) or re.match(r"^\s*\w+=", url):
        return PostgresStore(url, readonly=readonly)
    raise StoreError(f"store {redact(url)!r} is not a store URL: use sqlite:///PATH (e.g. sqlite:///var/alerter/"
                     "anomalies.db) or postgresql://USER:PASSWORD@HOST:PORT/DBNAME")


class Store:
    """Shared SQL; subclasses provide the connection and its placeholder style."""

    kind = "?"
    description = "?"

    def __init__(self, readonly: bool = False):
        self.readonly = readonly
        self._lock = threading.Lock()

    # -- subclass hooks ---------------------------------------------------------------------
    def _sql(self, q: str) -> str:
        return q

    def _transaction(self, fn):  # pragma: no cover - overridden
        raise NotImplementedError

    def _has_tables(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    # -- schema -----------------------------------------------------------------------------
    def _create_schema(self, cur) -> None:
        for stmt in _SCHEMA:
            cur.execute(stmt)
        cur.execute(self._sql("SELECT value FROM osad_store_meta WHERE key = ?"), ("schema_version",))
        row = cur.fetchone()
        if row is None:
            cur.execute(self._sql("INSERT INTO osad_store_meta (key, value) VALUES (?, ?)"),
                        ("schema_version", SCHEMA_VERSION))
        elif row[0] != SCHEMA_VERSION:
            raise StoreError(f"{self.description} holds alerter schema version {row[0]}, this osad speaks "
                             f"{SCHEMA_VERSION}: use another store or the osad version that wrote it")

    # -- writes -----------------------------------------------------------------------------
    def save(self, anomalies: Iterable[Anomaly] = (), states: dict[str, dict | None] | None = None,
             now: float | None = None) -> None:
        """Upsert anomalies (keeping each id's highest revision) and replace states (None deletes), in
        one transaction."""
        now = time.time() if now is None else now
        rows = [(a.anomaly_id, a.revision, a.entity_id, a.status, a.severity, severity_rank(a.severity),
                 a.start_ts, a.last_ts, a.end_ts, a.max_ratio, ",".join(a.models), a.summary,
                 encode(a).decode(), now) for a in anomalies]
        st_rows, deletes = [], []
        for eid, st in (states or {}).items():
            if st is None:
                deletes.append((eid,))
            else:
                st_rows.append((eid, json.dumps(st, separators=(",", ":")), 1 if st.get("incident") else 0, now))
        if not rows and not st_rows and not deletes:
            return

        def tx(cur):
            if rows:
                cur.executemany(self._sql(_UPSERT_ANOMALY), rows)
            if st_rows:
                cur.executemany(self._sql(_UPSERT_STATE), st_rows)
            if deletes:
                cur.executemany(self._sql("DELETE FROM osad_alerter_state WHERE entity_id = ?"), deletes)

        self._transaction(tx)

    def prune_states(self, before: float) -> int:
        """Forget the states (thresholds) of entities without an open incident not updated since ``before``."""
        def tx(cur):
            cur.execute(self._sql("DELETE FROM osad_alerter_state WHERE open_incident = 0 AND updated_at < ?"),
                        (before,))
            return cur.rowcount
        return self._transaction(tx) or 0

    # -- reads ------------------------------------------------------------------------------
    def load_state(self, entity_id: str) -> dict | None:
        def tx(cur):
            cur.execute(self._sql("SELECT state FROM osad_alerter_state WHERE entity_id = ?"), (entity_id,))
            return cur.fetchone()
        row = self._read(tx)
        return json.loads(row[0]) if row else None

    def stale_open_states(self, before: float, limit: int = 100) -> list[dict]:
        """States with an open incident not updated since ``before`` (no alerter holds them)."""
        def tx(cur):
            cur.execute(self._sql("SELECT state FROM osad_alerter_state WHERE open_incident = 1 AND updated_at < ? "
                                  "ORDER BY updated_at LIMIT ?"), (before, limit))
            return cur.fetchall()
        return [json.loads(r[0]) for r in self._read(tx) or []]

    def list(self, entity: str | None = None, severities: Iterable[str] | None = None,
             statuses: Iterable[str] | None = None, since: float | None = None, limit: int = 100) -> list[Anomaly]:
        """Anomalies, most recently active first. ``entity``: exact id, or a prefix ending in ``*``;
        ``since``: active at or after this Unix time (``last_ts``)."""
        where, args = [], []
        if entity:
            if entity.endswith("*"):
                where.append("entity_id LIKE ? ESCAPE '!'")
                args.append(_like_escape(entity[:-1]) + "%")
            else:
                where.append("entity_id = ?")
                args.append(entity)
        for col, vals in (("severity", severities), ("status", statuses)):
            vals = list(vals or [])
            if vals:
                where.append(f"{col} IN ({', '.join('?' for _ in vals)})")
                args += vals
        if since is not None:
            where.append("last_ts >= ?")
            args.append(since)
        q = "SELECT body FROM osad_anomalies" + (" WHERE " + " AND ".join(where) if where else "")
        q += " ORDER BY last_ts DESC, anomaly_id LIMIT ?"
        args.append(limit)

        def tx(cur):
            cur.execute(self._sql(q), tuple(args))
            return cur.fetchall()
        return [decode(r[0].encode(), Anomaly) for r in self._read(tx) or []]

    def get(self, anomaly_id: str) -> Anomaly | None:
        """The anomaly with this id, or with this unique id prefix (at least 6 characters)."""
        ident = anomaly_id.strip()

        def tx(cur):
            cur.execute(self._sql("SELECT body FROM osad_anomalies WHERE anomaly_id = ?"), (ident,))
            row = cur.fetchone()
            if row is not None or len(ident) < 6:
                return [row] if row else []
            cur.execute(self._sql("SELECT body FROM osad_anomalies WHERE anomaly_id LIKE ? ESCAPE '!' "
                                  "ORDER BY anomaly_id LIMIT 2"), (_like_escape(ident) + "%",))
            return cur.fetchall()
        rows = self._read(tx) or []
        if len(rows) > 1:
            raise StoreError(f"{ident!r} is the start of more than one anomaly id; give more characters")
        return decode(rows[0][0].encode(), Anomaly) if rows else None

    def count(self) -> int:
        def tx(cur):
            cur.execute("SELECT COUNT(*) FROM osad_anomalies")
            return cur.fetchone()
        row = self._read(tx)
        return int(row[0]) if row else 0

    def _read(self, fn):
        if self.readonly and not self._has_tables():
            return None  # nothing was ever written here
        return self._transaction(fn)


def _like_escape(s: str) -> str:
    return s.replace("!", "!!").replace("%", "!%").replace("_", "!_")


class SQLiteStore(Store):
    kind = "sqlite"

    def __init__(self, path: str, readonly: bool = False):
        import sqlite3

        super().__init__(readonly)
        self.path = path
        self.description = f"SQLite store {path}"
        memory = path == ":memory:"
        try:
            if readonly:
                if not memory and not Path(path).is_file():
                    raise StoreError(f"no anomalies store at {path} (has `osad alert` run with this --store?); "
                                     "give the store the alerter writes with --store / OSAD_STORE")
                target = path if memory else f"file:{Path(path).resolve()}?mode=ro"
                self.conn = sqlite3.connect(target, uri=not memory, timeout=30, check_same_thread=False,
                                            isolation_level=None)
            else:
                if not memory:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                self.conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
                self._transaction(self._create_schema)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {self.description}: {e}; check that the folder exists and is "
                             "writable, and that the file is an SQLite database") from None
        except OSError as e:
            raise StoreError(f"cannot create the folder of {self.description}: {e}") from None

    def _has_tables(self) -> bool:
        with self._lock:
            row = self.conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'osad_anomalies'").fetchone()
        return row is not None

    def _transaction(self, fn):
        import sqlite3

        with self._lock:
            cur = self.conn.cursor()
            try:
                cur.execute("BEGIN" if self.readonly else "BEGIN IMMEDIATE")
                out = fn(cur)
                cur.execute("COMMIT")
                return out
            except StoreError:
                cur.execute("ROLLBACK")
                raise
            except sqlite3.Error as e:
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise StoreError(f"{self.description}: {e}") from None
            finally:
                cur.close()

    def close(self) -> None:
        with self._lock:
            self.conn.close()


class PostgresStore(Store):
    kind = "postgresql"

    def __init__(self, dsn: str, readonly: bool = False, connect_timeout_s: int = 10):
        super().__init__(readonly)
        try:
            import psycopg
        except ImportError:
            raise StoreError("a postgresql:// store needs psycopg: pip install 'psycopg[binary]'") from None
        self._psycopg = psycopg
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self.description = f"PostgreSQL store {redact(dsn)}"
        self.conn = None
        self._connect()
        if not readonly:
            def tx(cur):
                cur.execute("SELECT pg_advisory_xact_lock(7402215361)")  # replicas create the schema one at a time
                self._create_schema(cur)
            self._transaction(tx)

    def _connect(self) -> None:
        try:
            self.conn = self._psycopg.connect(self.dsn, connect_timeout=self.connect_timeout_s, autocommit=False)
        except self._psycopg.Error as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StoreError(f"cannot connect to {self.description}: {msg}; check host, port, database name, user "
                             "and password in the DSN, and that the server is running and reachable") from None

    def _sql(self, q: str) -> str:
        return q.replace("?", "%s")

    def _has_tables(self) -> bool:
        def tx(cur):
            cur.execute("SELECT to_regclass('osad_anomalies') IS NOT NULL")
            return cur.fetchone()[0]
        return bool(self._transaction(tx))

    def _transaction(self, fn, retry: bool = True):
        psycopg = self._psycopg
        with self._lock:
            if self.conn is None or self.conn.closed:
                self._connect()
            try:
                with self.conn.transaction():
                    with self.conn.cursor() as cur:
                        out = fn(cur)
                return out
            except StoreError:
                raise
            except psycopg.OperationalError as e:
                # the connection broke (server restart, network): reconnect once, then give up
                try:
                    self.conn.close()
                except Exception:
                    pass
                self.conn = None
                if not retry:
                    raise StoreError(f"{self.description}: {str(e).strip()}") from None
            except psycopg.Error as e:
                raise StoreError(f"{self.description}: {str(e).strip()}") from None
        return self._transaction(fn, retry=False)

    def close(self) -> None:
        with self._lock:
            if self.conn is not None:
                self.conn.close()

