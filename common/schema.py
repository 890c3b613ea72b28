"""The workshop tables, in one place: `code/init_schemas.py` and every scenario build from here.

Each statement is idempotent (IF NOT EXISTS) and unqualified: it lands in the schema that the
connection's search_path names, which for the scripts is the scenario's private schema.
"""
from __future__ import annotations

from psycopg2 import sql

TABLES = {
    # The pipeline's input: deterministic rows, so every proof can compare against them.
    "source_rows": """
        CREATE TABLE IF NOT EXISTS source_rows (
            id      integer PRIMARY KEY,
            payload text    NOT NULL,
            amount  numeric(12, 2) NOT NULL
        )""",
    # The pipeline's output. The primary key is what makes "no duplicate" checkable at all;
    # scenarios that need to show duplicates build their own looser table.
    "target_rows": """
        CREATE TABLE IF NOT EXISTS target_rows (
            id        integer PRIMARY KEY,
            payload   text    NOT NULL,
            amount    numeric(12, 2) NOT NULL,
            loaded_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )""",
    # One row per job: where it resumes, who holds it, and a version for compare-and-set.
    "checkpoints": """
        CREATE TABLE IF NOT EXISTS checkpoints (
            job        text PRIMARY KEY,
            last_id    bigint NOT NULL DEFAULT 0,
            rows_done  bigint NOT NULL DEFAULT 0,
            checksum   text   NOT NULL DEFAULT '',
            status     text   NOT NULL DEFAULT 'idle' CHECK (status IN ('idle', 'in_progress', 'done')),
            owner      text,
            heartbeat  timestamptz,
            version    integer NOT NULL DEFAULT 0,
            updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )""",
    # Every checkpoint ever committed: the fallback when the current one is bad.
    "checkpoint_history": """
        CREATE TABLE IF NOT EXISTS checkpoint_history (
            seq       bigserial PRIMARY KEY,
            job       text   NOT NULL,
            last_id   bigint NOT NULL,
            rows_done bigint NOT NULL,
            checksum  text   NOT NULL,
            saved_at  timestamptz NOT NULL DEFAULT clock_timestamp()
        )""",
    # Structured log events, one row each.
    "pipeline_log": """
        CREATE TABLE IF NOT EXISTS pipeline_log (
            id             bigserial PRIMARY KEY,
            logged_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
            level          text NOT NULL,
            logger         text NOT NULL,
            message        text NOT NULL,
            correlation_id text,
            fields         jsonb
        )""",
    # Units of work that exhausted their retries, kept for replay.
    "dead_letter": """
        CREATE TABLE IF NOT EXISTS dead_letter (
            id          bigserial PRIMARY KEY,
            job         text NOT NULL,
            unit        text NOT NULL,
            error_type  text NOT NULL,
            error       text NOT NULL,
            attempts    integer NOT NULL,
            failed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
            replayed_at timestamptz,
            UNIQUE (job, unit)
        )""",
}


def create_tables(conn, *names: str) -> list[str]:
    """Create the named tables (all of them when none is named); returns the names."""
    chosen = names or tuple(TABLES)
    with conn.cursor() as cur:
        for name in chosen:
            cur.execute(TABLES[name])
    conn.commit()
    return list(chosen)


def drop_tables(conn, *names: str) -> list[str]:
    chosen = names or tuple(TABLES)
    with conn.cursor() as cur:
        for name in chosen:
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    conn.commit()
    return list(chosen)


def seed_source(conn, rows: int) -> None:
    """source_rows 1..rows: payload and amount are functions of the id, so any copy is checkable."""
    with conn.cursor() as cur:
        cur.execute("INSERT INTO source_rows (id, payload, amount) "
                    "SELECT g, 'row-' || g, round((g * 7919 %% 10000) / 100.0, 2) "
                    "FROM generate_series(1, %s) g", (rows,))
    conn.commit()
