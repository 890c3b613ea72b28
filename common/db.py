"""Connections, the run's private schemas, and the queries every proof uses.

Every connection carries `application_name = faillab:<run id>`, so a stuck backend of this run
can be found (and ended) by name, and right after login it SETs the session settings a lesson
depends on (`SESSION`): the scenario's private schema as `search_path`, so a student's
`SELECT * FROM target` touches nothing else, and timeouts, isolation and read-write mode, so
that no role or database default (`ALTER ROLE ... SET`) can change what a lesson shows. They are
SET, not sent as the `options` startup parameter, which poolers such as PgBouncer refuse.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass

import psutil
import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from common import config, output

SCHEMA_PREFIX = "faillab_"

# What every lab connection SETs after login, whatever the role's or database's defaults say.
SESSION = {
    "lock_timeout": "5s",          # a lock that never comes free fails the step, not the run
    "statement_timeout": "20s",    # no lesson statement runs this long; pg_sleep(30) is killed
    "idle_in_transaction_session_timeout": "0",  # lessons hold transactions open on purpose
    "default_transaction_isolation": "read committed",  # what the lessons explain and race
    "default_transaction_read_only": "off",
    "IntervalStyle": "postgres",   # what psycopg2 parses (it sets DateStyle ISO itself)
}
# The search_path of every lab connection, whatever the role's default: only pg_catalog, then this
# session's own temporary schema (last, so a temporary table never hides a lab table). A schema any
# other role can create in (`public` before PostgreSQL 15, one named after the user for "$user")
# is never on it: a function planted there with a better-matching argument type (text for a quoted
# literal) would win over pg_catalog's and run with this role's rights (CVE-2018-1058). A
# scenario's connections put its private schema first, for its own tables: nobody else can create
# anything in it.
TRUSTED_SEARCH_PATH = "pg_catalog, pg_temp"
# Settings that exist only from a server version on (server_version_num), with their value.
SESSION_SINCE = {
    "idle_session_timeout": (140000, "0"),  # the admin connection idles while a scenario runs
    "transaction_timeout": (170000, "0"),  # a role's transaction_timeout would end long lessons
}
# libpq keywords every lab connection logs in with: the lessons' text (quotes, accents, emoji) is
# sent and read as UTF-8 whatever PGCLIENTENCODING, the URL or the role says. A startup
# parameter, not a SET: psycopg2 picks its codec at login and does not follow a later SET.
LOGIN = {"client_encoding": "UTF8"}


class StartupError(Exception):
    """The run cannot start (no database reachable, no right to create a schema): exit 2."""


@dataclass(frozen=True)
class Session:
    """A psycopg2 connection_factory that SETs the lab's session settings right after login.

    It travels inside the connection parameters (a frozen dataclass pickles by value), so a
    worker process that calls psycopg2.connect(**params) gets the same session as the scenario."""
    settings: tuple = ()  # ((name, value), ...), applied after SESSION

    def __call__(self, dsn, async_=0):
        conn = psycopg2.extensions.connection(dsn, async_)
        try:
            apply_session(conn, self.settings)
        except BaseException:
            conn.close()
            raise
        return conn

    def merged(self, settings: dict) -> "Session":
        return Session(tuple({**dict(self.settings), **settings}.items()))


def session_settings(server_version_num: int, settings=()) -> dict:
    """The settings a connection to a server of this version SETs: SESSION, the version's own,
    then `settings` (the scenario's per-connection overrides and its search_path)."""
    since = {name: value for name, (version, value) in SESSION_SINCE.items() if server_version_num >= version}
    return {**SESSION, "search_path": TRUSTED_SEARCH_PATH, **since, **dict(settings)}


def search_path(schema: str | None = None) -> str:
    """The trusted search_path, with `schema` first when a scenario works in it."""
    if not schema:
        return TRUSTED_SEARCH_PATH
    return '"' + schema.replace('"', '""') + '", ' + TRUSTED_SEARCH_PATH  # quote_ident


def apply_session(conn, settings=()) -> None:
    """SET the session settings in one round trip, outside any transaction (a rolled-back SET
    would be undone). The statement is parsed under the role's own search_path, so every name in
    it is qualified."""
    wanted = session_settings(conn.server_version, settings)
    autocommit = conn.autocommit
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_catalog.set_config(s.name, s.value, false) FROM ROWS FROM "
                        "(pg_catalog.unnest(%s::pg_catalog.text[]), pg_catalog.unnest(%s::pg_catalog.text[])) "
                        "AS s(name, value)", (list(wanted), list(wanted.values())))
    finally:
        conn.autocommit = autocommit


def conn_params(params: dict, *, schema: str | None = None, app: str | None = None, **settings) -> dict:
    """libpq keywords with a short connect timeout and the run's name, plus the session settings
    to SET after login (the search_path, and any SESSION value overridden by keyword, e.g.
    statement_timeout="60s"). A plain dict, picklable: hand it to workers."""
    unknown = sorted(set(settings) - set(SESSION) - set(SESSION_SINCE))
    if unknown:
        raise TypeError(f"not a lab session setting: {', '.join(unknown)}")
    kwargs = {"connect_timeout": config.CONNECT_TIMEOUT_S, **params, **LOGIN}
    session = kwargs.get("connection_factory")
    session = session if isinstance(session, Session) else Session()
    if schema:
        settings["search_path"] = search_path(schema)
    kwargs["connection_factory"] = session.merged(settings)
    if app:
        kwargs["application_name"] = app
    return kwargs


def connect(params: dict, *, schema: str | None = None, app: str | None = None,
            autocommit: bool = False, **overrides):
    """psycopg2.connect with conn_params; a keyword names a SESSION setting to override for this
    connection (lock_timeout="30s") or any libpq keyword (connect_timeout=2)."""
    settings = {k: overrides.pop(k) for k in list(overrides) if k in SESSION or k in SESSION_SINCE}
    given = overrides.pop("connection_factory", None)
    base = conn_params(params, schema=schema, app=app)
    if isinstance(given, Session):  # e.g. a proxy's params for the same scenario: its settings win
        base["connection_factory"] = base["connection_factory"].merged(dict(given.settings))
    base["connection_factory"] = base["connection_factory"].merged(settings)
    conn = psycopg2.connect(**{**base, **overrides})
    conn.autocommit = autocommit
    return conn


def explain_connect_error(exc: psycopg2.Error, target: str) -> str:
    """One line a user can act on, with the password masked."""
    import re

    text = output.redact(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
    hint = "check that the server runs and that host and port are right"
    low = text.lower()
    role = re.search(r'role "([^"]*)" does not exist', text)
    if role:
        hint = (f"the server has no role {role.group(1)}: a superuser can create it (CREATE ROLE "
                f"{role.group(1)} LOGIN), or name an existing role as the user")
        return f"cannot connect to {target}: role {role.group(1)} does not exist ({hint})"
    if "password authentication failed" in low or "no password supplied" in low:
        hint = "check the user name and password"
    elif "does not exist" in low and "database" in low:
        hint = "create the database or name an existing one"
    elif "could not translate host name" in low or "name or service not known" in low:
        hint = "check the host name"
    elif "does not support ssl" in low:
        hint = "the server offers no TLS: unset PGSSLMODE or sslmode=require for it, or turn ssl on at the server"
    elif "timeout" in low:
        hint = "the host did not answer in time: check host, port and firewall"
    return f"cannot connect to {target}: {text} ({hint})"


def check_writable(conn, target: str) -> None:
    """A standby (hot standby, a read replica) is read-only whatever a session SETs: exit 2."""
    in_recovery, read_only = rows(conn, "SELECT pg_catalog.pg_is_in_recovery(), "
                                    "pg_catalog.current_setting('transaction_read_only')")[0]
    if in_recovery:
        raise StartupError(f"{target} is a read-only standby (pg_is_in_recovery() is true): "
                           "point the lab at the primary server")
    if read_only == "on":
        raise StartupError(f"{target} gives only read-only transactions: point the lab at a writable server")


# What a database must store text as: the lessons' data holds text no single-byte encoding has
# (CJK, emoji). SQL_ASCII stores the bytes it is sent as they are, so UTF-8 comes back intact.
TEXT_ENCODINGS = ("UTF8", "SQL_ASCII")


def check_encoding(conn, target: str) -> None:
    """A database whose encoding cannot hold the lessons' text (LATIN1, WIN1252, ...): exit 2."""
    database, encoding = rows(conn, "SELECT pg_catalog.current_database(), "
                                    "pg_catalog.current_setting('server_encoding')")[0]
    if encoding not in TEXT_ENCODINGS:
        raise StartupError(f"{target}: the database {database} stores text as {encoding}, which cannot hold the "
                           "lessons' data (CJK, emoji): point the lab at a UTF8 database (CREATE DATABASE ... "
                           "ENCODING 'UTF8' TEMPLATE template0)")


def check_session_kept(conn, params: dict, target: str) -> None:
    """Lessons hold a session: its SETs, locks and backend stay between transactions. A pooler in
    transaction mode hands each transaction to whichever server session is free, so a second
    client is used to make that visible: while one connection holds a transaction open, the
    other's next transaction must still run in its own backend, and the holder must never have
    been given it. Either pool order, LIFO (PgBouncer's default) or round robin, moves a pooled
    connection off its backend in one of the two tests below."""
    def backend(c) -> int:
        with c.cursor() as cur:
            cur.execute("SELECT pg_catalog.pg_backend_pid()")
            return cur.fetchone()[0]

    def refuse(detail: str):
        return StartupError(f"{target} does not keep a session between transactions ({detail}), as a "
                            "pooler in transaction mode does: use the server's direct port or a "
                            "session-mode pool")

    try:  # the second client: raw libpq, no SETs, so it makes no transaction of its own yet
        other = psycopg2.connect(**{"connect_timeout": config.CONNECT_TIMEOUT_S, **params,
                                    "application_name": "faillab:probe"})
    except psycopg2.Error as exc:
        raise StartupError(explain_connect_error(exc, target)) from None
    try:
        mine = backend(conn)                      # autocommit: the backend is free again after this
        with other.cursor() as cur:               # implicit BEGIN: holds a backend until rollback
            cur.execute("SET LOCAL statement_timeout = 0; SELECT pg_catalog.pg_backend_pid()")
            held = cur.fetchone()[0]
        if held == mine or backend(conn) != mine:  # LIFO hands the holder my backend
            raise refuse("two clients shared one server session")
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            before = backend(conn)
            other.rollback()                      # the holder's backend is freed first,
            cur.execute("COMMIT")                 # then mine: round robin hands me the holder's
        if before != mine or backend(conn) != mine:
            raise refuse("one client's transactions ran in different server sessions")
    except psycopg2.Error as exc:
        first = output.redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise refuse(first) from None
    finally:
        with contextlib.suppress(psycopg2.Error):
            other.close()


@contextlib.contextmanager
def open_target(app: str = "faillab:admin"):
    """Resolve the configuration, start the embedded server if nothing is configured, and yield
    (target, params, autocommit connection). Raises StartupError or config.ConfigError with one
    line a user can act on: no server, a read-only standby, a pooler that does not keep sessions.
    The embedded server is released on the way out, whatever happens."""
    from common import embedded

    target = config.resolve()
    with contextlib.ExitStack() as stack:
        params = target.params
        if target.mode == "embedded":
            try:
                params = embedded.acquire()
            finally:
                stack.callback(embedded.release)
        display = config.describe(params)
        try:
            conn = connect(params, autocommit=True, app=app)
        except psycopg2.Error as exc:
            raise StartupError(explain_connect_error(exc, display)) from None
        stack.callback(conn.close)
        check_writable(conn, display)
        check_encoding(conn, display)
        check_session_kept(conn, params, display)
        yield target, params, conn


def backend_pid(conn) -> int:
    """The pid of this connection's backend, asked of the server: libpq's own
    (conn.info.backend_pid) is the pooler's number when PgBouncer answers for the server."""
    return scalar(conn, "SELECT pg_catalog.pg_backend_pid()")


def behind_a_pooler(conn) -> bool:
    """True when a pooler (PgBouncer) stands between this connection and the server."""
    return conn.info.backend_pid != backend_pid(conn)


def scalar(conn, query, args=None):
    with conn.cursor() as cur:
        cur.execute(query, args)
        row = cur.fetchone()
        return None if row is None else row[0]


def rows(conn, query, args=None) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(query, args)
        return cur.fetchall()


def fingerprint(conn, table: str, key: str, columns: list[str] | None = None) -> tuple[int, str]:
    """(row count, md5 over the rows in key order): equal fingerprints mean equal tables."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns) if columns else sql.SQL("t.*")
    query = sql.SQL("SELECT count(*), coalesce(md5(string_agg(row({cols})::text, '|' ORDER BY {key})), '') "
                    "FROM {table} t").format(cols=cols, key=sql.Identifier(key), table=sql.Identifier(table))
    with conn.cursor() as cur:
        cur.execute(query)
        count, digest = cur.fetchone()
    return count, digest


# -- private schemas -----------------------------------------------------------------------
# Liveness: each live run holds a session-level advisory lock derived from its run id on its
# admin connection, so the server itself knows which runs are alive, whatever host or PID
# namespace they run in. A schema or role is debris only when its tag is ours AND the lock of
# the run it names is free (the run's session is gone: it was killed). Advisory locks belong to
# one database, so a role (which is cluster-wide) is judged only from the database it names.
TAG_VERSION = 2
RUN_ID_PREFIX_VARIABLE = "FAILLAB_RUN_PREFIX"  # marks the runs of one test session (or classroom)
SWEEP_LOCK_TIMEOUT = "200ms"  # debris someone else holds a lock on is skipped, not waited for
SWEEP_BUDGET_S = 1.0  # all the sweep may wait on locks at one start; the rest waits for a later run
_HELD: dict[str, int] = {}  # run id -> id() of the connection of this process that holds its lock


def new_run_id() -> str:
    """8 random hex digits, after the optional prefix of FAILLAB_RUN_PREFIX (letters and digits)."""
    prefix = "".join(c for c in os.environ.get(RUN_ID_PREFIX_VARIABLE, "").lower() if c.isalnum())[:8]
    return prefix + secrets.token_hex(4)


def run_lock_key(run_id: str) -> int:
    """The advisory lock key of a run: 64 bits of a hash of its id, as PostgreSQL's signed bigint."""
    import hashlib

    digest = hashlib.blake2b(f"faillab-run:{run_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def hold_run_lock(conn, run_id: str) -> None:
    """Mark this run alive for as long as `conn` is open (a session-level advisory lock)."""
    if run_id in _HELD:
        return
    if not scalar(conn, "SELECT pg_catalog.pg_try_advisory_lock(%s::bigint)", (run_lock_key(run_id),)):
        raise StartupError(f"run id {run_id} is already held by another session; start again")
    _HELD[run_id] = id(conn)


def release_run_lock(conn, run_id: str) -> None:
    if _HELD.pop(run_id, None) is not None:
        with contextlib.suppress(psycopg2.Error):
            scalar(conn, "SELECT pg_catalog.pg_advisory_unlock(%s::bigint)", (run_lock_key(run_id),))


def run_of(name: str) -> str | None:
    """The run id a lab object's name carries: faillab_<run id>_<rest>."""
    if not name.startswith(SCHEMA_PREFIX):
        return None
    import re

    run_id = name[len(SCHEMA_PREFIX):].split("_", 1)[0]
    return run_id if re.fullmatch(r"[0-9a-z]{8,16}", run_id) else None


def owner_tag(conn, name: str) -> str:
    """What the schema or role is, in its comment: the lab's, of which run, in which database."""
    return json.dumps({"faillab": TAG_VERSION, "run": run_of(name), "db": scalar(conn, "SELECT pg_catalog.current_database()"),
                       "host": socket.gethostname(), "pid": os.getpid()})


def _tagged_run(comment: str | None, name: str) -> dict | None:
    """The parsed tag when it is ours and names the run the object's name names; else None."""
    try:
        tag = json.loads(comment or "")
    except ValueError:
        return None
    if not isinstance(tag, dict) or tag.get("faillab") != TAG_VERSION or not tag.get("run"):
        return None
    return tag if tag["run"] == run_of(name) else None


class NameTaken(StartupError):
    """A name this run was about to create is someone else's already: nothing of it is touched."""


# What this process created, by kind and name, with the oid it got: a drop goes by that identity,
# so a same-named object somebody else made meanwhile (or made first) is never dropped.
_CREATED: dict[tuple[str, str], int] = {}


def _create_owned(conn, kind: str, name: str, create, comment, lookup) -> int:
    """CREATE, COMMENT and read the new oid in one transaction (one simple query), so the oid is
    the object this statement made. NameTaken when the name exists already."""
    query = sql.SQL("; ").join([create, comment, lookup])
    try:
        oid = scalar(conn, query, (owner_tag(conn, name), name))
    except (psycopg2.errors.DuplicateSchema, psycopg2.errors.DuplicateObject, psycopg2.errors.UniqueViolation):
        if not conn.autocommit:
            conn.rollback()
        raise NameTaken(f"{kind} {name} already exists and this run did not create it (another session took "
                        "the name first); nothing of it was touched: start the run again") from None
    _CREATED[(kind, name)] = oid
    return oid


def created_oid(kind: str, name: str) -> int | None:
    """The oid of the `kind` ("schema", "role") this process created under `name`, else None."""
    return _CREATED.get((kind, name))


def create_schema(conn, name: str) -> int:
    """CREATE SCHEMA, tagged with its run; returns its oid. The run's lock is held on `conn` from
    now on, so no other run can take the schema for debris while this connection lives."""
    run_id = run_of(name)
    if run_id:
        hold_run_lock(conn, run_id)
    ident = sql.Identifier(name)
    return _create_owned(conn, "schema", name, sql.SQL("CREATE SCHEMA {}").format(ident),
                         sql.SQL("COMMENT ON SCHEMA {} IS %s").format(ident),
                         sql.SQL("SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = %s"))


def mark_kept(conn, name: str) -> None:
    """Replace the owner tag: a schema kept for inspection is not debris of a dead run."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("COMMENT ON SCHEMA {} IS %s").format(sql.Identifier(name)),
                    ("kept for inspection by --keep; drop it with DROP SCHEMA ... CASCADE",))


def drop_schema(conn, name: str) -> None:
    """DROP SCHEMA ... CASCADE; first ends this run's other backends that could hold locks in it.
    A schema this process created is dropped by its identity (its oid, whatever it is called now;
    a schema that took its name meanwhile is left alone); any other by name (an explicit request)."""
    oid = created_oid("schema", name)
    try:
        _drop_schema(conn, name, oid)
    except psycopg2.errors.LockNotAvailable:
        end_other_backends(conn)
        _drop_schema(conn, name, oid)
    _CREATED.pop(("schema", name), None)


@contextlib.contextmanager
def transaction(conn, lock_timeout: str | None = None):
    """A cursor in one transaction on an autocommit connection: committed when the block ends,
    rolled back (nothing changed) when it raises."""
    was = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            if lock_timeout:
                cur.execute("SET LOCAL lock_timeout = %s", (lock_timeout,))
            yield cur
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = was


def _drop_schema(conn, name: str, oid: int | None) -> None:
    with transaction(conn, "3s") as cur:
        if oid is not None:
            cur.execute("SELECT nspname FROM pg_catalog.pg_namespace WHERE oid = %s", (oid,))
            found = cur.fetchone()
            name = found[0] if found else None
        if name is not None:
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        if oid is not None:  # the name still led to this oid: had it been renamed, it would remain
            cur.execute("SELECT count(*) FROM pg_catalog.pg_namespace WHERE oid = %s", (oid,))
            if cur.fetchone()[0]:
                raise NameTaken(f"schema {name} is no longer the one this run created; it was left alone")


def own_left(conn, kind: str, name: str) -> bool:
    """Whether the schema or role this process created under `name` still exists (by oid); for
    one it did not create, whether the name exists."""
    oid = created_oid(kind, name)
    catalog, column = {"schema": ("pg_namespace", "nspname"), "role": ("pg_roles", "rolname")}[kind]
    where = sql.SQL("oid = %s") if oid is not None else sql.SQL("{} = %s").format(sql.Identifier(column))
    return bool(scalar(conn, sql.SQL("SELECT count(*) FROM pg_catalog.{} WHERE {}").format(
        sql.Identifier(catalog), where), (oid if oid is not None else name,)))


def end_other_backends(conn) -> int:
    """pg_terminate_backend on this run's other connections (same application_name)."""
    with conn.cursor() as cur:
        cur.execute("SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity "
                    "WHERE application_name = pg_catalog.current_setting('application_name') "
                    "AND pid <> pg_catalog.pg_backend_pid()")
        return cur.fetchone()[0]


def cancel_other_backends(conn) -> int:
    """pg_cancel_backend on this run's other connections: their current query ends, they stay."""
    with conn.cursor() as cur:
        cur.execute("SELECT count(pg_catalog.pg_cancel_backend(pid)) FROM pg_catalog.pg_stat_activity "
                    "WHERE application_name = pg_catalog.current_setting('application_name') "
                    "AND pid <> pg_catalog.pg_backend_pid()")
        return cur.fetchone()[0]


def schema_exists(conn, name: str) -> bool:
    return bool(scalar(conn, "SELECT count(*) FROM pg_catalog.pg_namespace WHERE nspname = %s", (name,)))


def lab_schemas(conn, own: bool = False) -> list[tuple[str, str | None]]:
    """(name, comment) of the schemas named like the lab's; `own`: only those this role owns."""
    with conn.cursor() as cur:
        cur.execute("SELECT nspname, pg_catalog.obj_description(oid, 'pg_namespace'::pg_catalog.name) "
                    "FROM pg_catalog.pg_namespace WHERE nspname LIKE %s AND (NOT %s OR nspowner = "
                    "(SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)) ORDER BY 1",
                    (SCHEMA_PREFIX.replace("_", r"\_") + "%", own))
        return cur.fetchall()


def create_role(conn, name: str, password: str, connection_limit: int = -1) -> int:
    """A login role for one scenario, tagged with its run like the schemas are; returns its oid.
    NameTaken when a role of that name exists (it is somebody else's)."""
    run_id = run_of(name)
    if run_id:
        hold_run_lock(conn, run_id)
    ident = sql.Identifier(name)
    return _create_owned(conn, "role", name,
                         sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER PASSWORD {} CONNECTION LIMIT {}")
                         .format(ident, sql.Literal(password), sql.Literal(connection_limit)),
                         sql.SQL("COMMENT ON ROLE {} IS %s").format(ident),
                         sql.SQL("SELECT oid FROM pg_catalog.pg_roles WHERE rolname = %s"))


def drop_role(conn, name: str) -> None:
    """End the role's sessions, drop its privileges in this database, drop it. A role this
    process created is found by its oid: another role that has its name is never dropped."""
    oid = created_oid("role", name)
    with conn.cursor() as cur:
        cur.execute("SELECT rolname FROM pg_catalog.pg_roles WHERE " + ("oid = %s" if oid is not None else "rolname = %s"),
                    (oid if oid is not None else name,))
        found = cur.fetchone()
        if not found:
            _CREATED.pop(("role", name), None)
            return
        current = found[0]
        for _ in range(100):  # until its sessions are gone, not just signalled
            cur.execute("SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity "
                        "WHERE usename = %s", (current,))
            if not cur.fetchone()[0]:
                break
            time.sleep(0.02)
    with transaction(conn) as cur:
        cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(current)))
        cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(current)))
        if oid is not None:  # one transaction: a rename between the look-up and the drop undoes it all
            cur.execute("SELECT count(*) FROM pg_catalog.pg_roles WHERE oid = %s", (oid,))
            if cur.fetchone()[0]:
                raise NameTaken(f"role {current} is no longer the one this run created; it was left alone")
    _CREATED.pop(("role", name), None)


def lab_roles(conn) -> list[tuple[str, str | None]]:
    with conn.cursor() as cur:
        cur.execute("SELECT rolname, pg_catalog.shobj_description(oid, 'pg_authid'::pg_catalog.name) "
                    "FROM pg_catalog.pg_roles WHERE rolname LIKE %s "
                    "ORDER BY 1", (SCHEMA_PREFIX.replace("_", r"\_") + "%",))
        return cur.fetchall()


@contextlib.contextmanager
def _dead_run_held(conn, run_id: str):
    """Yield True while this session holds the lock of a dead run (so no other sweeper races
    it), False when the run is alive (its session holds the lock) or is this process's own."""
    if run_id in _HELD:
        yield False
        return
    key = run_lock_key(run_id)
    got = scalar(conn, "SELECT pg_catalog.pg_try_advisory_lock(%s::bigint)", (key,))
    try:
        yield bool(got)
    finally:
        if got:
            with contextlib.suppress(psycopg2.Error):
                scalar(conn, "SELECT pg_catalog.pg_advisory_unlock(%s::bigint)", (key,))


def _drop_quietly(conn, statements: list) -> bool:
    """Run the statements in one transaction with a short lock_timeout; False (and nothing
    changed) when they fail: not ours to drop, locked by someone, or gone already."""
    try:
        with transaction(conn, SWEEP_LOCK_TIMEOUT) as cur:
            for statement in statements:
                cur.execute(statement)
        return True
    except psycopg2.Error:
        return False


def sweep_dead_runs(conn) -> list[str]:
    """Drop the private schemas and roles of killed runs: our tag, and the run's lock is free.
    Only schemas this role owns are looked at (anyone can write a tag on a schema of their own),
    and the waits on locks are bounded in all (SWEEP_BUDGET_S): what is held by someone is left
    for a later run. Never raises for one object: what the role may not drop, or what another
    session holds a lock on, is skipped; live runs, kept schemas and untagged objects are never
    touched."""
    dropped = []
    database = scalar(conn, "SELECT pg_catalog.current_database()")
    deadline = time.monotonic() + SWEEP_BUDGET_S
    candidates = [(name, comment, [sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))], name)
                  for name, comment in lab_schemas(conn, own=True)]
    candidates += [(name, comment, [sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)),
                                    sql.SQL("DROP ROLE {}").format(sql.Identifier(name))], f"role {name}")
                   for name, comment in lab_roles(conn)]
    for name, comment, statements, label in candidates:
        tag = _tagged_run(comment, name)
        if tag is None or (label.startswith("role ") and tag.get("db") != database):
            continue
        if time.monotonic() > deadline:
            break
        with _dead_run_held(conn, tag["run"]) as dead:
            if dead and _drop_quietly(conn, statements):
                dropped.append(label)
    return dropped
