"""Connections, the run's private schemas, and the queries every proof uses.

Every connection carries `application_name = faillab:<run id>` and a `search_path` set to the
scenario's private schema, so a student's `SELECT * FROM target` touches nothing else, and a
stuck backend of this run can be found (and ended) by name.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time

import psutil
import psycopg2
from psycopg2 import sql

from common import config, output

SCHEMA_PREFIX = "faillab_"


class StartupError(Exception):
    """The run cannot start (no database reachable, no right to create a schema): exit 2."""


def conn_params(params: dict, *, schema: str | None = None, app: str | None = None) -> dict:
    """libpq keywords with a short connect timeout, the run's name and a search_path (picklable)."""
    kwargs = {"connect_timeout": config.CONNECT_TIMEOUT_S, **params}
    if schema:
        kwargs["options"] = f"-c search_path={schema}"
    if app:
        kwargs["application_name"] = app
    return kwargs


def connect(params: dict, *, schema: str | None = None, app: str | None = None,
            autocommit: bool = False, **overrides):
    """psycopg2.connect with conn_params, plus any keyword to override."""
    conn = psycopg2.connect(**{**conn_params(params, schema=schema, app=app), **overrides})
    conn.autocommit = autocommit
    return conn


def explain_connect_error(exc: psycopg2.Error, target: str) -> str:
    """One line a user can act on, with the password masked."""
    text = output.redact(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
    hint = "check that the server runs and that host and port are right"
    low = text.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        hint = "check the user name and password"
    elif "does not exist" in low and "database" in low:
        hint = "create the database or name an existing one"
    elif "could not translate host name" in low or "name or service not known" in low:
        hint = "check the host name"
    elif "timeout" in low:
        hint = "the host did not answer in time: check host, port and firewall"
    return f"cannot connect to {target}: {text} ({hint})"


@contextlib.contextmanager
def open_target(app: str = "faillab:admin"):
    """Resolve the configuration, start the embedded server if nothing is configured, and yield
    (target, params, autocommit connection). Raises StartupError or config.ConfigError with one
    line a user can act on. The embedded server is released on the way out, whatever happens."""
    from common import embedded

    target = config.resolve()
    with contextlib.ExitStack() as stack:
        params = target.params
        if target.mode == "embedded":
            try:
                params = embedded.acquire()
            finally:
                stack.callback(embedded.release)
        try:
            conn = connect(params, autocommit=True, app=app)
        except psycopg2.Error as exc:
            raise StartupError(explain_connect_error(exc, config.describe(params))) from None
        stack.callback(conn.close)
        yield target, params, conn


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
def new_run_id() -> str:
    return secrets.token_hex(4)


def owner_tag() -> str:
    proc = psutil.Process(os.getpid())
    return json.dumps({"host": socket.gethostname(), "pid": proc.pid, "stamp": repr(proc.create_time())})


def create_schema(conn, name: str) -> None:
    """CREATE SCHEMA, tagged with its owner process so a later run can tell debris from a live run."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        cur.execute(sql.SQL("COMMENT ON SCHEMA {} IS %s").format(sql.Identifier(name)), (owner_tag(),))


def mark_kept(conn, name: str) -> None:
    """Replace the owner tag: a schema kept for inspection is not debris of a dead run."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("COMMENT ON SCHEMA {} IS %s").format(sql.Identifier(name)),
                    ("kept for inspection by --keep; drop it with DROP SCHEMA ... CASCADE",))


def drop_schema(conn, name: str) -> None:
    """DROP SCHEMA ... CASCADE; first ends this run's other backends that could hold locks in it."""
    with conn.cursor() as cur:
        cur.execute("SET lock_timeout = '3s'")
        try:
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        except psycopg2.errors.LockNotAvailable:
            end_other_backends(conn)
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def end_other_backends(conn) -> int:
    """pg_terminate_backend on this run's other connections (same application_name)."""
    with conn.cursor() as cur:
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = current_setting('application_name') AND pid <> pg_backend_pid()")
        return cur.fetchone()[0]


def cancel_other_backends(conn) -> int:
    """pg_cancel_backend on this run's other connections: their current query ends, they stay."""
    with conn.cursor() as cur:
        cur.execute("SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = current_setting('application_name') AND pid <> pg_backend_pid()")
        return cur.fetchone()[0]


def schema_exists(conn, name: str) -> bool:
    return bool(scalar(conn, "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (name,)))


def lab_schemas(conn) -> list[tuple[str, str | None]]:
    with conn.cursor() as cur:
        cur.execute("SELECT nspname, obj_description(oid, 'pg_namespace') FROM pg_namespace "
                    "WHERE nspname LIKE %s ORDER BY 1", (SCHEMA_PREFIX.replace("_", r"\_") + "%",))
        return cur.fetchall()


def create_role(conn, name: str, password: str, connection_limit: int = -1) -> None:
    """A login role for one scenario, tagged with its owner process like the schemas are."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER PASSWORD {} CONNECTION LIMIT {}")
                    .format(sql.Identifier(name), sql.Literal(password), sql.Literal(connection_limit)))
        cur.execute(sql.SQL("COMMENT ON ROLE {} IS %s").format(sql.Identifier(name)), (owner_tag(),))


def drop_role(conn, name: str) -> None:
    """End the role's sessions, drop its privileges in this database, drop it."""
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (name,))
        if not cur.fetchone()[0]:
            return
        for _ in range(100):  # until its sessions are gone, not just signalled
            cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = %s", (name,))
            if not cur.fetchone()[0]:
                break
            time.sleep(0.02)
        cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def lab_roles(conn) -> list[tuple[str, str | None]]:
    with conn.cursor() as cur:
        cur.execute("SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname LIKE %s "
                    "ORDER BY 1", (SCHEMA_PREFIX.replace("_", r"\_") + "%",))
        return cur.fetchall()


def _owner_is_dead(comment: str | None) -> bool:
    """True only for our tag, on this host, naming a process that is gone."""
    try:
        tag = json.loads(comment or "")
        if tag["host"] != socket.gethostname():
            return False
        return repr(psutil.Process(tag["pid"]).create_time()) != tag["stamp"]
    except (ValueError, KeyError, TypeError):
        return False
    except psutil.NoSuchProcess:
        return True


def sweep_dead_runs(conn) -> list[str]:
    """Drop the private schemas and roles of runs on this host whose process is gone (killed with
    SIGKILL). Those of live runs, of other hosts, kept ones, or without our tag are never touched."""
    dropped = []
    for name, comment in lab_schemas(conn):
        if _owner_is_dead(comment):
            drop_schema(conn, name)
            dropped.append(name)
    for name, comment in lab_roles(conn):
        if _owner_is_dead(comment):
            try:
                drop_role(conn, name)
                dropped.append(f"role {name}")
            except psycopg2.Error:  # e.g. owns objects in another database: leave it, say nothing
                pass
    return dropped
