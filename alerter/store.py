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
import os
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
    """The store cannot be opened, read or written; the text says which store and what to do.

    ``reason`` says which: ``"full"`` (no space left under it), ``"corrupt"`` (damaged, or not an osad
    store) or ``"error"`` (anything else: permissions, locks, a server that is down, ...)."""

    def __init__(self, message: str, reason: str = "error"):
        super().__init__(message)
        self.reason = reason


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

    def last_saved_at(self) -> float | None:
        """When a state was last written (the newest ``updated_at``), or None for an empty store: anomalies
        published after it may not be in the store yet (the alerter stopped before its next checkpoint)."""
        def tx(cur):
            cur.execute("SELECT MAX(updated_at) FROM osad_alerter_state")
            return cur.fetchone()
        row = self._read(tx)
        return float(row[0]) if row and row[0] is not None else None

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


#: each table's columns, as _SCHEMA creates them (a store whose tables lack some is not one osad wrote)
_COLUMNS = {q.split()[5]: [c.split()[0] for c in q[q.index("(") + 1: q.rindex(")")].split(",")]
            for q in _SCHEMA if q.startswith("CREATE TABLE")}

#: SQLite's primary result codes that the messages below tell apart
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, \
    _SQLITE_CANTOPEN, _SQLITE_NOTADB = 3, 5, 6, 8, 10, 11, 13, 14, 26


def _size(n: float) -> str:
    """
    >>> _size(0), _size(524288), _size(3.5 * 2**30)
    ('0 B', '512.0 KiB', '3.5 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def free_space(path: str) -> tuple[int, int] | None:
    """(bytes free to this user, size) of the file system that holds ``path``'s folder, or None."""
    try:
        st = os.statvfs(Path(path).resolve().parent)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


class SQLiteStore(Store):
    kind = "sqlite"

    def __init__(self, path: str, readonly: bool = False):
        import sqlite3

        super().__init__(readonly)
        self.path = path
        self.description = f"SQLite store {path}"
        memory = path == ":memory:"
        if not memory:
            self._check_path(Path(path))
        try:
            if readonly:
                if not memory and not Path(path).is_file():
                    raise StoreError(f"no anomalies store at {path} (has `osad alert` run with this --store?); "
                                     "give the store the alerter writes with --store / OSAD_STORE")
                target = path if memory else f"file:{Path(path).resolve()}?mode=ro"
                self.conn = sqlite3.connect(target, uri=not memory, timeout=30, check_same_thread=False,
                                            isolation_level=None)
            else:
                existed = not memory and Path(path).is_file() and Path(path).stat().st_size > 0
                if not memory:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                self.conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
                if existed:  # before anything writes to it: a file that is not our store stays as it was
                    self._quick_check()
                    self._transaction(self._check_schema)
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
                self._transaction(self._create_schema)
        except sqlite3.Error as e:
            raise self._error(e, "cannot open") from None
        except OSError as e:
            raise StoreError(f"cannot create the folder of {self.description}: {e}") from None

    # -- opening ----------------------------------------------------------------------------
    def _check_path(self, p: Path) -> None:
        """A folder or a dangling link where the database should be: say so (SQLite says "unable to open")."""
        if p.is_symlink() and not p.exists():
            raise StoreError(f"{self.description} is a symbolic link to {os.readlink(p)}, which does not exist: "
                             "point it at the alerter's database, or give --store a path of its own (a new, empty "
                             "store is created there)")
        if p.exists() and not p.is_file():
            what = "a folder" if p.is_dir() else "not a regular file"
            raise StoreError(f"{self.description} is {what}, not an SQLite database file: give --store the "
                             "database file (e.g. sqlite:///var/alerter/anomalies.db), or move it away")

    def _quick_check(self) -> None:
        """SQLite's own check of every page (O(size): about 0.2 s for 150 MB), so a damaged store stops the
        alerter at start with the way out, instead of failing its writes later."""
        import sqlite3

        rows = [r[0] for r in self.conn.execute("PRAGMA quick_check(3)").fetchall()]
        if rows != ["ok"]:
            found = "; ".join(" ".join(line.split()) for r in rows for line in str(r).splitlines()
                              if line.strip() and not line.startswith("***"))
            raise self._error(sqlite3.DatabaseError(f"quick_check: {found[:300]}"), "cannot open", code=_SQLITE_CORRUPT)

    def _check_schema(self, cur) -> None:
        """Refuse a database of something else, or osad tables without the columns osad writes."""
        cur.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        tables = sorted(r[0] for r in cur.fetchall())
        foreign = [t for t in tables if t not in _COLUMNS]
        if foreign and "osad_store_meta" not in tables:
            raise StoreError(f"{self.description} is an SQLite database of something else (tables "
                             f"{', '.join(foreign[:5])}), not an osad anomalies store: give --store a file of its "
                             "own (a new one is created)", reason="corrupt")
        for table, want in _COLUMNS.items():  # before the schema's indexes, which name the columns
            if table not in tables:
                continue
            cur.execute(f"PRAGMA table_info({table})")
            have = {r[1] for r in cur.fetchall()}
            missing = [c for c in want if c not in have]
            if missing:
                raise StoreError(f"{self.description}: its table {table} lacks the columns {', '.join(missing)}, so "
                                 "it is not a store this osad wrote: give --store a file of its own (a new one is "
                                 "created), or move this one aside", reason="corrupt")

    # -- errors -----------------------------------------------------------------------------
    def _error(self, e, doing: str = "", code: int | None = None) -> StoreError:
        """The StoreError for SQLite's ``e``: what it means for this store and what to do."""
        code = (getattr(e, "sqlite_errorcode", None) if code is None else code) or 0
        primary, p, where = code & 0xFF, self.path, f"{doing} {self.description}" if doing else self.description
        space = free_space(p) if p != ":memory:" else None
        room = f"{_size(space[0])} free of {_size(space[1])} on the file system of {Path(p).resolve().parent}" \
            if space else "free space unknown"
        if primary == _SQLITE_FULL or (primary == _SQLITE_IOERR and space is not None and space[0] < 64 * 1024):
            return StoreError(f"{where}: the disk is full ({e}; {room}): free space there, or move the store to a "
                              "larger disk (--store)", reason="full")
        if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            what = "is damaged" if primary == _SQLITE_CORRUPT else \
                "is not an SQLite database: not a store the alerter wrote, or its first page is damaged"
            return StoreError(
                f"{where}: the file {what} ({e}). It holds the anomaly history, so osad neither starts on it nor "
                f"replaces it. Way out: stop the alerter, move the file aside with its -wal and -shm files (`for x "
                f"in '' -wal -shm; do [ -e {p}$x ] && mv {p}$x {p}.corrupt$x; done`), then start the alerter again, "
                f"on a new, empty store at the same path (its thresholds calibrate again), or first recover what is "
                f"readable into "
                f"it: `sqlite3 {p}.corrupt .recover | sqlite3 {p}` (with a shell that has no .recover, 'no such table: "
                f"sqlite_dbpage': `sqlite3 {p}.corrupt .dump | sqlite3 {p}`)", reason="corrupt")
        if primary in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_CANTOPEN):
            return StoreError(f"{where} ({e}): check that its folder exists and that this user may write the file "
                              "and the folder (SQLite keeps -wal and -shm files beside it)")
        if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return StoreError(f"{where} ({e}): another process held it locked for over 30 s (a second alerter on "
                              "the same file? replicas share a PostgreSQL store, not an SQLite file)")
        if primary == _SQLITE_IOERR:
            return StoreError(f"{where}: the disk failed a read or write ({e}; {room}): check the disk and the "
                              "kernel log")
        return StoreError(f"{where}: {e}")

    def _has_tables(self) -> bool:
        import sqlite3

        with self._lock:
            try:
                row = self.conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'osad_anomalies'").fetchone()
            except sqlite3.Error as e:
                raise self._error(e) from None
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
                raise self._error(e) from None
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

