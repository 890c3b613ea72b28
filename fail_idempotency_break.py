"""Idempotent loads that are not: four real ways "we use ON CONFLICT, so re-runs are safe" breaks.

The pipeline under test is a daily load of orders from an extract (rows as a JSON API or a CSV
reader hands them over) into a target table keyed by the business key (store_id, order_ref);
store_id is NULL for web-shop orders. Each scenario runs a load twice, or once with a failure in
the middle, against real PostgreSQL, measures the damage with a query, recovers, and ends with
the same proof: the target equals the newest version of every order the source sent (count, sum
and checksum), no business key appears twice, and the fixed load run again changes zero rows.

Run: python3 fail_idempotency_break.py [--list] [--only ID] [--json -] [--seed N]
"""
from __future__ import annotations

import common  # noqa: F401  first: its signal handlers are installed from the first instant

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import NamedTuple

import psycopg2
from psycopg2 import sql
from psycopg2.extras import execute_values
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from common import db, main, scenario
from common.detect import metric_alert, sql_check
from common.faults import faults_enabled
from common.fixes import fix
from common.metrics import total as metric_total

# -- the fixture: a day of orders, small and deterministic (--seed) ------------------------------
ORDERS = 2000                 # orders in a daily extract
STORES = 4                    # store_id 1..4; NULL means the web shop
WEB_SHARE = 0.2               # share of web-shop orders (store_id NULL)
CUSTOMERS = 200
PAGE = 10_000                 # execute_values page size: a whole extract is one statement
DAY1 = datetime(2026, 3, 2, 6, 0, tzinfo=timezone.utc)
ORDER_COLUMNS = ("store_id", "order_ref", "customer_id", "invoice_no", "amount", "updated_at")


def make_orders(rng, n: int = ORDERS, first: int = 1, at: datetime = DAY1) -> list[dict]:
    """One dict per order, the way an API or a CSV reader delivers an extract."""
    return [{"store_id": None if rng.random() < WEB_SHARE else rng.randint(1, STORES),
             "order_ref": f"ORD-{i:05d}",
             "customer_id": rng.randint(1, CUSTOMERS),
             "invoice_no": f"INV-{i:05d}",
             "amount": Decimal(rng.randint(100, 50_000)).scaleb(-2),  # 1.00 .. 500.00, two decimals
             "updated_at": at + timedelta(seconds=i)} for i in range(first, first + n)]


def edit(rng, row: dict, later: timedelta) -> dict:
    """A later version of an order: the amount corrected (always a different one), updated_at moved forward."""
    return {**row, "amount": row["amount"] + Decimal(rng.randint(1, 5_000)).scaleb(-2),
            "updated_at": row["updated_at"] + later}


def resend(rng, rows: list[dict], corrections: int, later: timedelta = timedelta(days=1)) -> list[dict]:
    """The same extract sent again, with `corrections` orders corrected since."""
    picked = set(rng.sample(range(len(rows)), corrections))
    return [edit(rng, r, later) if i in picked else dict(r) for i, r in enumerate(rows)]


def as_values(rows: list[dict]) -> list[tuple]:
    """The explicit column map: field -> column, by name. A missing
    field is a KeyError; a field the map does not name is not loaded."""
    return [tuple(r[c] for c in ORDER_COLUMNS) for r in rows]


def as_values_naive(rows: list[dict]) -> list[tuple]:
    """The values in the extract's own field order."""
    return [tuple(r.values()) for r in rows]


# -- the shared tables: where the source, the staging area and the rejects live ------------------
SHARED_DDL = """
    -- every row the source ever sent, as it arrived: what the proofs compare the target with
    CREATE TABLE source_orders (
        received serial PRIMARY KEY, store_id integer, order_ref text, customer_id integer,
        invoice_no text, amount numeric, updated_at timestamptz);
    -- where a fixed load lands an extract first: no constraint, so every row can land
    CREATE UNLOGGED TABLE staging_orders (
        line integer PRIMARY KEY, store_id integer, order_ref text, customer_id integer,
        invoice_no text, amount numeric, updated_at timestamptz);
    -- rows a fixed load set aside, with the reason: nothing is dropped silently
    CREATE TABLE load_rejects (order_ref text PRIMARY KEY, sqlstate text NOT NULL, reason text NOT NULL);
    -- what the target must equal: the newest version of each order by canonical business key,
    -- minus the rows set aside
    CREATE VIEW expected_orders AS
        SELECT * FROM (
            SELECT DISTINCT ON (store_id, upper(btrim(order_ref)))
                   store_id, upper(btrim(order_ref)) AS order_ref, customer_id, invoice_no, amount, updated_at
              FROM source_orders
             ORDER BY store_id, upper(btrim(order_ref)), updated_at DESC, received DESC) latest
         WHERE NOT EXISTS (SELECT 1 FROM load_rejects r WHERE r.order_ref = latest.order_ref)"""

# The target of every fixed load; its business key comes from unique_key_ddl below.
ORDERS_DDL = """
    CREATE TABLE orders (
        store_id    integer,                                       -- NULL: a web-shop order
        order_ref   text NOT NULL CHECK (order_ref = upper(btrim(order_ref))),  -- canonical keys only
        customer_id integer NOT NULL,
        invoice_no  text NOT NULL,
        amount      numeric(10, 2) NOT NULL CHECK (amount >= 0),   -- refunds are separate documents
        updated_at  timestamptz NOT NULL)"""


@dataclass(frozen=True)
class BusinessKey:
    form: str                       # which form the server got (journal: constraint_form)
    ddl: sql.Composed               # makes the server enforce the key
    conflict_target: sql.Composed   # what ON CONFLICT names, so this key is the arbiter


def unique_key_ddl(server_version_num: int,
                   table: str = "orders") -> BusinessKey:
    """(store_id, order_ref) unique, every NULL store_id counted as one
    store: the web shop. A plain UNIQUE treats NULLs as distinct."""
    tbl = sql.Identifier(table)
    key = sql.Identifier(f"{table}_business_key")
    if server_version_num >= 150000:  # NULLS NOT DISTINCT: from 15 on
        return BusinessKey(
            "UNIQUE NULLS NOT DISTINCT",
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE NULLS NOT"
                    " DISTINCT (store_id, order_ref)").format(tbl, key),
            sql.SQL("(store_id, order_ref)"))
    # Before 15: a unique index on an expression that is never NULL.
    # 0 stands for the web shop, so no store may have id 0 (the CHECK).
    return BusinessKey(
        "unique index on (coalesce(store_id, 0), order_ref)",
        sql.SQL("ALTER TABLE {t} ADD CONSTRAINT {c}"
                " CHECK (store_id <> 0); CREATE UNIQUE INDEX {k}"
                " ON {t} ((coalesce(store_id, 0)), order_ref)").format(
            t=tbl, k=key, c=sql.Identifier(f"{table}_store_id_not_0")),
        sql.SQL("((coalesce(store_id, 0)), order_ref)"))


def plain_unique_key(server_version_num: int,
                     table: str = "orders") -> BusinessKey:
    """UNIQUE (store_id, order_ref), as most tables declare it."""
    tbl = sql.Identifier(table)
    key = sql.Identifier(f"{table}_business_key")
    return BusinessKey(
        "UNIQUE",
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {}"
                " UNIQUE (store_id, order_ref)").format(tbl, key),
        sql.SQL("(store_id, order_ref)"))


def setup(s, *ddl: str | sql.Composable, orders: bool = True) -> BusinessKey:
    """The shared tables, this scenario's own, and (usually) the keyed target `orders`."""
    key = unique_key_ddl(s.server_version_num)
    with s.conn.cursor() as cur:
        cur.execute(SHARED_DDL)
        if orders:
            cur.execute(ORDERS_DDL)
            cur.execute(key.ddl)
        for statement in ddl:
            cur.execute(statement)
    s.conn.commit()
    return key


def arrive(s, rows: list[dict]) -> list[dict]:
    """Record an extract in source_orders as it arrives (the proofs' reference), and return it."""
    with s.conn.cursor() as cur:
        execute_values(cur, "INSERT INTO source_orders (store_id, order_ref, customer_id, invoice_no, amount, "
                            "updated_at) VALUES %s", as_values(rows), page_size=PAGE)
    s.conn.commit()
    return rows


def count(conn, table: str) -> int:
    return db.scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))


def total(conn, table: str) -> Decimal:
    return db.scalar(conn, sql.SQL("SELECT coalesce(sum(amount), 0) FROM {}").format(sql.Identifier(table)))


# Business keys held by more than one row, grouped the way the constraint should have seen them:
# GROUP BY puts all NULL store_ids together, and the key is compared in canonical form.
DUPLICATE_KEYS = """
    SELECT store_id, upper(btrim(order_ref)) AS business_key,
           count(*) AS copies, count(DISTINCT order_ref) AS spellings
      FROM {table} GROUP BY 1, 2 HAVING count(*) > 1"""


def duplicate_keys(conn, table: str, where: sql.Composable = sql.SQL("true")) -> int:
    keys = sql.SQL(DUPLICATE_KEYS).format(table=sql.Identifier(table))
    return db.scalar(conn, sql.SQL("SELECT count(*) FROM ({}) d WHERE {}").format(keys, where))


# -- the fixed load, in pieces every scenario shares ---------------------------------------------
def stage_as_is(cur, rows: list[dict], values=as_values) -> None:
    """Land the extract as it came, numbered by line, in staging."""
    cur.execute("TRUNCATE staging_orders")
    execute_values(cur, """
        INSERT INTO staging_orders (line, store_id, order_ref,
                    customer_id, invoice_no, amount, updated_at)
        VALUES %s""", [(n, *v) for n, v in enumerate(values(rows), 1)],
        page_size=PAGE)


def stage(cur, rows: list[dict], values=as_values) -> None:
    """Land the extract as it came, then canonicalize the business key
    once, here at the door: ' ord-00042' is ORD-00042."""
    stage_as_is(cur, rows, values)
    cur.execute("UPDATE staging_orders SET order_ref = upper(btrim("
                "order_ref)) WHERE order_ref <> upper(btrim(order_ref))")


def upsert_from_staging(cur, table: str, key: BusinessKey,
                        where: sql.Composable = sql.SQL("true"),
                        args: tuple | None = None) -> int:
    """The newest version of each key wins: in the batch (DISTINCT ON)
    and against the table (WHERE). Returns the rows really written: an
    older version, or the same one again, writes nothing."""
    cur.execute(sql.SQL("""
        INSERT INTO {table} AS t (store_id, order_ref, customer_id,
                                  invoice_no, amount, updated_at)
        SELECT DISTINCT ON (store_id, order_ref) store_id, order_ref,
               customer_id, invoice_no, amount, updated_at
          FROM staging_orders WHERE {where}
         ORDER BY store_id, order_ref, updated_at DESC
            ON CONFLICT {key} DO UPDATE
           SET customer_id = excluded.customer_id,
               invoice_no = excluded.invoice_no,
               amount = excluded.amount, updated_at = excluded.updated_at
         WHERE excluded.updated_at > t.updated_at""").format(
        table=sql.Identifier(table), where=where,
        key=key.conflict_target), args)
    return cur.rowcount


def upsert_from_staging_naive(cur, table: str, key: BusinessKey,
                              where: sql.Composable = sql.SQL("true"),
                              args: tuple | None = None) -> int:
    """ON CONFLICT DO NOTHING: a re-sent order cannot be stored twice."""
    cur.execute(sql.SQL("""
        INSERT INTO {table} (store_id, order_ref, customer_id,
                             invoice_no, amount, updated_at)
        SELECT store_id, order_ref, customer_id, invoice_no, amount,
               updated_at
          FROM staging_orders WHERE {where}
            ON CONFLICT {key} DO NOTHING""").format(
        table=sql.Identifier(table), where=where,
        key=key.conflict_target), args)
    return cur.rowcount


def load_upsert(conn, rows: list[dict], key: BusinessKey, table: str = "orders", *,
                stage=stage, values=as_values, upsert=upsert_from_staging) -> int:
    """Stage, then upsert on the business key: one transaction, one commit. Returns the rows
    written. Each piece is a parameter, so a lesson can hold its own version in a fix slot."""
    with conn.cursor() as cur:
        stage(cur, rows, values)
        changed = upsert(cur, table, key)
    conn.commit()
    return changed


def show_rejects(s) -> list[tuple]:
    """Print load_rejects and return its rows (order_ref, sqlstate, reason)."""
    rejects = db.rows(s.conn, "SELECT order_ref, sqlstate, reason FROM load_rejects ORDER BY order_ref")
    s.table(["order_ref", "sqlstate", "reason"], rejects)
    return rejects


def snapshot(conn, relation: str) -> tuple:
    """(rows, sum(amount), checksum, duplicate keys): two relations are equal when these are."""
    rows, digest = db.fingerprint(conn, relation, "order_ref", list(ORDER_COLUMNS))
    return rows, total(conn, relation), digest, duplicate_keys(conn, relation)


def attempt(s, conn, load, *args):
    """Call a load held in a fix slot. An error it raises is shown, its transaction rolled back,
    and it fails the claim that follows, not the run. Returns (result, error)."""
    try:
        return load(*args), None
    except Exception as exc:  # the fix under test failed: its claim says so
        s.observe(exc)
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()  # a connection the server ended stays closed
        return None, exc


def prove_idempotent(s, rerun, tables: tuple[str, ...] = ("orders",)) -> None:
    """The proof every scenario ends with: each target equals expected_orders (count, sum,
    checksum), holds no duplicate business key, and running the load again (`rerun`, which
    returns the rows it wrote) raises nothing, changes zero rows and leaves the checksum as it was."""
    want = snapshot(s.conn, "expected_orders")
    before = {t: snapshot(s.conn, t) for t in tables}
    changed, error = attempt(s, s.conn, rerun)
    after = {t: snapshot(s.conn, t) for t in tables}
    s.table(["relation", "rows", "sum(amount)", "checksum", "duplicate keys"],
            [(name, snap[0], snap[1], snap[2][:12], snap[3]) for name, snap in
             [("expected_orders", want), *before.items()]])
    s.measure("expected_rows", want[0], show=False, note="rows the target must hold: expected_orders")
    s.measure("expected_total", float(want[1]), show=False, note="sum(amount) the target must hold")
    s.recovered_if(all(before[t][:3] == want[:3] for t in tables),
                   "target equals the newest source version of every order: count, sum and checksum")
    s.measure("duplicates_after", sum(before[t][3] for t in tables), show=False,
              note="business keys held twice after the recovery")
    s.recovered_if(all(before[t][3] == 0 for t in tables), "no business key appears twice")
    s.measure("rerun_rowcount", changed, show=False,
              note="rows the load changed, run again over every extract")
    s.recovered_if(error is None and changed == 0 and after == before,
                   "the load run again over every extract: no error, 0 rows changed, checksum unchanged"
                   + ("" if error is None else f" (it raised {type(error).__name__})")
                   + ("" if error is not None or changed == 0 else f" ({changed} rows changed)"))


# -- the job's metrics: what the scheduler exports around each run of a load into orders --------
def committed_state(s) -> tuple[list[str], int]:
    """(the ctid of every row version orders holds, the rows of load_rejects), as committed now.
    A row a load writes, inserted or updated, is a new row version with a ctid of its own."""
    s.conn.rollback()  # a fresh snapshot; a load that failed on s.conn left its transaction to end
    versions = [ctid for ctid, in db.rows(s.conn, "SELECT ctid::text FROM orders")]
    rejects = count(s.conn, "load_rejects")
    s.conn.rollback()
    return versions, rejects


def exported(s, load):
    """`load` as the scheduler runs it, with what production counts of each run, read from the
    server once the run ended, whether it returned or raised: pipeline_rows_total{outcome}, the
    rows it left written in orders ("loaded": row versions that were not there before it) and set
    aside ("rejected": rows it added to load_rejects); and, when it returned,
    pipeline_last_success_timestamp_seconds."""
    rows = ("pipeline_rows_total", "Rows the order loads left written in orders or set aside, by outcome")

    def run(*args, **kwargs):
        (versions, rejects), ok = committed_state(s), False
        try:
            result = load(*args, **kwargs)
            ok = True
            return result
        finally:
            s.conn.rollback()
            loaded = db.scalar(s.conn, "SELECT count(*) FROM orders WHERE ctid NOT IN "
                                       "(SELECT unnest(%s::text[]::tid[]))", (versions,))
            rejected = count(s.conn, "load_rejects") - rejects
            s.conn.rollback()
            s.counter(*rows, ["outcome"]).labels(outcome="loaded").inc(loaded)
            s.counter(*rows, ["outcome"]).labels(outcome="rejected").inc(rejected)
            if ok:
                s.gauge("pipeline_last_success_timestamp_seconds",
                        "When a load of orders last ran to its end").set_to_current_time()
    return run


# -- the lab's fault: the server ends the load's connection in the middle of it ----------------
KILL_SWITCH = """
    CREATE SEQUENCE kill_switch_fired;   -- sequences: what they hold survives the rollback
    CREATE SEQUENCE kill_switch_order;   -- the order it fired at: 1350 for ORD-01350
    CREATE FUNCTION kill_switch() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF nextval('kill_switch_fired') = 1 THEN  -- once: the next run gets through
            PERFORM setval('kill_switch_order', substr(NEW.order_ref, 5)::bigint);
            PERFORM pg_terminate_backend(pg_backend_pid());
            PERFORM pg_catalog.pg_sleep(5);        -- the end lands here, mid-statement
        END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER kill_switch BEFORE INSERT OR UPDATE ON orders
        FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION kill_switch()"""


@contextlib.contextmanager
def server_ends_connection(s, when: sql.Composable = sql.SQL("true")):
    """Arm a one-shot fault from outside the load: the first row written to orders that matches
    `when` makes the server end that connection (pg_terminate_backend), in the middle of the
    statement. Yields a function that says at which order it fired, as the server recorded it
    (1350 for ORD-01350), or None; disarmed on the way out. Under FAILLAB_NO_FAULTS=1 it is never
    armed, so the claims that it landed must fail."""
    if not faults_enabled():
        yield lambda: None
        return
    with s.conn.cursor() as cur:
        cur.execute(sql.SQL(KILL_SWITCH).format(when=when))
    s.conn.commit()
    try:
        yield lambda: db.scalar(s.conn, "SELECT last_value FROM kill_switch_order WHERE is_called")
    finally:
        s.conn.rollback()
        with s.conn.cursor() as cur:
            cur.execute("DROP TRIGGER kill_switch ON orders; DROP FUNCTION kill_switch(); "
                        "DROP SEQUENCE kill_switch_fired, kill_switch_order")
        s.conn.commit()


BACKEND = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"


def backend_of(job) -> tuple:
    """The job's backend as pg_stat_activity lists it: (pid, backend_start). The start time tells
    it apart from a later backend of the server that gets the same pid."""
    backend = db.rows(job, BACKEND)[0]
    job.rollback()
    return backend


def backend_listed(s, backend: tuple) -> bool:
    """Whether pg_stat_activity still lists this backend. A terminated backend leaves it as it
    exits: asked again for up to 5 s, on the run's own autocommit connection."""
    listed = Retrying(stop=stop_after_delay(5), wait=wait_fixed(0.05), retry=retry_if_result(bool),
                      retry_error_callback=lambda state: state.outcome.result())
    return listed(db.scalar, s.run.admin, "SELECT count(*) > 0 FROM pg_stat_activity "
                                          "WHERE pid = %s AND backend_start = %s", backend)


def connection_ended(s, job, backend: tuple, error) -> bool:
    """The fault landed as the server ending the connection, by what the server and libpq say:
    an OperationalError that is not a cancel (57014: the statement ends, the session lives),
    the connection closed, and the backend gone from pg_stat_activity."""
    state = getattr(error, "pgcode", None)
    listed = backend_listed(s, backend)
    s.measure("lost_connection_sqlstate", state, show=False,
              note="the SQLSTATE of the lost connection: none (libpq saw the socket close) or 57P01")
    s.measure("ended_backend_listed", listed, show=False,
              note="pg_stat_activity still lists the ended backend afterwards")
    return (isinstance(error, psycopg2.OperationalError) and state in (None, "57P01")
            and bool(job.closed) and not listed)


class Visible(NamedTuple):
    """What a reader of the target sees: orders (its snapshot) and the rejects."""
    rows: int
    total: Decimal
    checksum: str
    duplicates: int
    rejects: int


def visible_state(s) -> Visible:
    return Visible(*snapshot(s.conn, "orders"), count(s.conn, "load_rejects"))


def not_held(conn, rows: list[dict]) -> list[str]:
    """The orders of an extract whose newest version in it (amount, updated_at) is not the one
    orders holds: what a load of that extract must leave at zero."""
    newest = {}
    for r in rows:
        if r["order_ref"] not in newest or r["updated_at"] > newest[r["order_ref"]]["updated_at"]:
            newest[r["order_ref"]] = r
    held = dict((ref, (amount, at)) for ref, amount, at in db.rows(
        conn, "SELECT order_ref, amount, updated_at FROM orders WHERE order_ref = ANY(%s)", (list(newest),)))
    return sorted(ref for ref, r in newest.items() if held.get(ref) != (r["amount"], r["updated_at"]))


# == 1. duplicate_detection ======================================================================
V1_V2_DDL = """
    CREATE TABLE orders_v1 (   -- v1: the only unique key is a surrogate
        id serial PRIMARY KEY, store_id integer, order_ref text NOT NULL, customer_id integer NOT NULL,
        invoice_no text NOT NULL, amount numeric(10, 2) NOT NULL, updated_at timestamptz NOT NULL);
    CREATE TABLE orders_v2 (   -- v2: a natural key, but over a nullable column
        id serial PRIMARY KEY, store_id integer, order_ref text NOT NULL, customer_id integer NOT NULL,
        invoice_no text NOT NULL, amount numeric(10, 2) NOT NULL, updated_at timestamptz NOT NULL,
        CONSTRAINT orders_v2_natural_key UNIQUE (store_id, order_ref))"""
RETYPED = 60  # store orders whose key the CRM export re-types


def retype_keys(rng, rows: list[dict], k: int) -> list[dict]:
    """A CRM export re-types some keys: 'ord-00042', ' ORD-00042', 'ORD-00042 '. Store orders only,
    so each cause below is measured on its own."""
    picked = set(rng.sample([i for i, r in enumerate(rows) if r["store_id"] is not None], k))
    spell = (str.lower, lambda ref: " " + ref, lambda ref: ref + " ")
    return [{**r, "order_ref": rng.choice(spell)(r["order_ref"])} if i in picked else r for i, r in enumerate(rows)]


def load_v1_naive(conn, rows: list[dict]) -> int:
    """ON CONFLICT DO NOTHING, but the only unique key is the serial id: it never conflicts.
    Returns the rows inserted."""
    with conn.cursor() as cur:
        execute_values(cur, """
            INSERT INTO orders_v1 (store_id, order_ref, customer_id, invoice_no, amount, updated_at)
            VALUES %s ON CONFLICT DO NOTHING""", as_values(rows), page_size=PAGE)
        inserted = cur.rowcount
    conn.commit()
    return inserted


def load_v2_naive(conn, rows: list[dict]) -> None:
    """ON CONFLICT on the natural key, but NULL never equals NULL, and 'ord-00042' is not 'ORD-00042'."""
    with conn.cursor() as cur:
        execute_values(cur, """
            INSERT INTO orders_v2 (store_id, order_ref, customer_id, invoice_no, amount, updated_at)
            VALUES %s ON CONFLICT (store_id, order_ref) DO UPDATE
               SET customer_id = excluded.customer_id, invoice_no = excluded.invoice_no,
                   amount = excluded.amount, updated_at = excluded.updated_at""", as_values(rows), page_size=PAGE)
    conn.commit()


# The check a scheduler runs after each load: business keys held by more than one row, in the
# canonical form the key should have (GROUP BY puts all NULL store_ids together).
DUPLICATE_BUSINESS_KEYS = sql_check("duplicate_business_keys", """
    SELECT 'orders_v1' AS target, store_id,
           upper(btrim(order_ref)) AS business_key, count(*) AS copies
      FROM orders_v1 GROUP BY 2, 3 HAVING count(*) > 1
    UNION ALL
    SELECT 'orders_v2', store_id, upper(btrim(order_ref)), count(*)
      FROM orders_v2 GROUP BY 2, 3 HAVING count(*) > 1
     ORDER BY 1, 3, 2""")

# Rows that are not the newest version the source sent of their order.
NOT_NEWEST = """
    SELECT count(*) FROM {table} t
     WHERE NOT EXISTS (SELECT 1 FROM expected_orders e
                        WHERE e.order_ref = upper(btrim(t.order_ref))
                          AND e.store_id IS NOT DISTINCT FROM t.store_id
                          AND (e.amount, e.updated_at) = (t.amount, t.updated_at))"""


def repair_duplicates(conn, table: str, key: BusinessKey) -> int:
    """One transaction: keep the newest row per canonical business key (updated_at, then the
    later id), canonicalize the keys, then let the server enforce `key`. Returns rows removed."""
    t = sql.Identifier(table)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("""
            DELETE FROM {t} WHERE id IN (
                SELECT id FROM (SELECT id, row_number() OVER (
                                    PARTITION BY store_id, upper(btrim(order_ref))
                                    ORDER BY updated_at DESC, id DESC) AS newest
                                  FROM {t}) ranked
                 WHERE newest > 1)""").format(t=t))
        removed = cur.rowcount
        cur.execute(sql.SQL("UPDATE {t} SET order_ref = upper(btrim(order_ref)) "
                            "WHERE order_ref <> upper(btrim(order_ref))").format(t=t))
        cur.execute(sql.SQL("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {old}, "
                            "ADD CONSTRAINT {canonical} CHECK (order_ref = upper(btrim(order_ref)))").format(
            t=t, old=sql.Identifier(f"{table}_natural_key"), canonical=sql.Identifier(f"{table}_canonical_ref")))
        cur.execute(key.ddl)
    conn.commit()
    return removed


@scenario("duplicate_detection", "Duplicates get in although the load uses ON CONFLICT", fixes=[
    fix("unique_key_ddl", naive=plain_unique_key, fixed=unique_key_ddl,
        contract="""
        Return the BusinessKey of `table`: the DDL that makes the server enforce the business key
        (store_id, order_ref), and the conflict target that names that key to ON CONFLICT. Every
        NULL store_id is one store, the web shop: a second (NULL, 'ORD-00042') must conflict.
        Work on the server_version_num given (UNIQUE NULLS NOT DISTINCT exists from 150000 on).
        Graded: after the repair, the naive ON CONFLICT DO NOTHING load of day 1 inserts 0 rows,
        and each table equals the newest source version of every order, with no key twice.""",
        hints=("""
            Which rows of day 1 does the repaired orders_v1 still take twice?
            Look at their store_id.""", """
            UNIQUE NULLS NOT DISTINCT (store_id, order_ref) from PostgreSQL 15;
            before it, a unique index on ((coalesce(store_id, 0)), order_ref),
            with that same expression in the conflict target.""")),
    fix("stage", naive=stage_as_is, fixed=stage,
        contract="""
        Land `rows` (mapped by `values`) in staging_orders, numbered from 1 in the column `line`,
        after emptying it, so that every business key in staging is canonical: order_ref upper
        case, without surrounding blanks (' ord-00042' is ORD-00042). The target refuses any
        other spelling (CHECK). Graded: the fixed load of day 2, whose CRM export re-typed 60
        keys, updates the canonical orders: no error, no new row.""",
        hints=("""
            What does the CHECK orders_v1_canonical_ref say about ' ord-00042'?""", """
            After landing the rows: UPDATE staging_orders
            SET order_ref = upper(btrim(order_ref))
            WHERE order_ref <> upper(btrim(order_ref)).""")),
])
def duplicate_detection(s):
    setup(s, V1_V2_DDL, orders=False)
    s.description("""
        The daily order load must survive a re-run: the source re-sends, the scheduler
        retries. Business key: (store_id, order_ref); store_id is NULL for web-shop orders.
        Two versions of the target, both "protected" by ON CONFLICT:
          orders_v1  id serial PRIMARY KEY; the load says ON CONFLICT DO NOTHING
          orders_v2  UNIQUE (store_id, order_ref); the load says
                     ON CONFLICT (store_id, order_ref) DO UPDATE""")
    day1 = arrive(s, make_orders(s.rng))
    day2 = arrive(s, retype_keys(s.rng, resend(s.rng, day1, corrections=40), RETYPED))
    web_ref = next(r["order_ref"] for r in day1 if r["store_id"] is None)  # real examples, for the text
    retyped_ref = next(b["order_ref"] for a, b in zip(day1, day2) if a["order_ref"] != b["order_ref"])
    s.trigger(f"""
        Load day 1 ({ORDERS} orders, about {WEB_SHARE:.0%} from the web shop), then the CRM's
        re-export of the same day (40 orders corrected since, {RETYPED} keys re-typed like
        '{retyped_ref}') into both.""")
    for extract in (day1, day2):
        load_v1_naive(s.conn, extract)
        load_v2_naive(s.conn, extract)
    with s.expect(psycopg2.errors.UniqueViolation, sqlstate="23505"):
        with s.conn.cursor() as cur:  # the obvious fix, adding the key now, is refused: the duplicates are in
            cur.execute(unique_key_ddl(s.server_version_num, "orders_v2").ddl)
    s.conn.rollback()
    web_shop = db.scalar(s.conn, "SELECT count(DISTINCT order_ref) FROM source_orders WHERE store_id IS NULL")
    surrogate = duplicate_keys(s.conn, "orders_v1")
    null_store = duplicate_keys(s.conn, "orders_v2", sql.SQL("store_id IS NULL"))
    spelling = duplicate_keys(s.conn, "orders_v2", sql.SQL("store_id IS NOT NULL AND spellings > 1"))
    s.table(["cause", "table", "keys held twice"], [
        ("surrogate key: ON CONFLICT sees only the id", "orders_v1", surrogate),
        ("NULL store_id rows never conflict", "orders_v2", null_store),
        (f"case or blanks: '{retyped_ref}' is another key", "orders_v2", spelling)])
    s.measure("duplicates_surrogate_key", surrogate, show=False,
              note="keys twice in orders_v1: a serial id never conflicts")
    s.measure("duplicates_null_store", null_store, show=False,
              note="web-shop keys (NULL store_id) twice in orders_v2")
    s.measure("duplicates_case_whitespace", spelling, show=False,
              note="re-typed store keys twice in orders_v2")
    held_twice = {t: duplicate_keys(s.conn, t) for t in ("orders_v1", "orders_v2")}
    s.measure("duplicates_before", sum(held_twice.values()), show=False,
              note="business keys held twice, the three causes together", headline=True)
    s.triggered_if(held_twice == {"orders_v1": surrogate, "orders_v2": null_store + spelling},
                   f"the three causes are every key held twice: {held_twice['orders_v1']} in "
                   f"orders_v1, {held_twice['orders_v2']} in orders_v2")
    s.triggered_if(surrogate == ORDERS, f"orders_v1 holds every one of the {ORDERS} orders twice")
    s.triggered_if(null_store == web_shop, f"orders_v2 holds every one of the {web_shop} web-shop orders twice")
    s.triggered_if(spelling == RETYPED, f"orders_v2 holds each of the {RETYPED} re-typed store orders twice")
    s.root_cause(f"""
        ON CONFLICT only reacts to a conflict on a unique index. A serial id is new on every
        insert, so it never conflicts; a UNIQUE constraint treats NULLs as distinct, so
        (NULL, '{web_ref}') is new every time; and a key compared byte for byte makes
        '{retyped_ref}' a different order. The load was idempotent only for the key the index
        enforces, not for the business key.""",
                 detect=DUPLICATE_BUSINESS_KEYS, runbook="""
        duplicate_business_keys: a business key is held by more than one row of a target, so
        every sum over it counts some orders twice. Stop the loads into that table, find the
        cause (the unique index ON CONFLICT names is not the business key: a surrogate id, a
        nullable column, uncanonical spellings), keep the newest row of each key in one
        transaction, then add the real key.""")
    business_key = s.fix("unique_key_ddl")
    keys = {t: business_key(s.server_version_num, t) for t in ("orders_v1", "orders_v2")}
    with s.step("In one transaction per table: keep the newest row of each key, canonicalize "
                "the keys, add the business key") as st:
        removed = {t: repair_duplicates(s.conn, t, keys[t]) for t in keys}
        st.result = (f"removed {removed['orders_v1']} rows from orders_v1 and {removed['orders_v2']} "
                     f"from orders_v2; the key: {keys['orders_v1'].form}")
    s.measure("constraint_form", keys["orders_v1"].form, show=False,
              note="the form of business key this server got")
    s.measure("server_version_num", s.server_version_num, show=False,
              note="the server version, which decides that form")
    s.recovered_if(removed == {"orders_v1": surrogate, "orders_v2": null_store + spelling},
                   f"one copy removed per key held twice: {surrogate} from orders_v1, "
                   f"{null_store} + {spelling} from orders_v2")
    # Checked now, before any reload: the fixed load below writes the newest versions again and
    # would hide a repair that kept the wrong copy.
    want = snapshot(s.conn, "expected_orders")
    kept = {t: snapshot(s.conn, t) for t in keys}
    not_newest = {t: db.scalar(s.conn, sql.SQL(NOT_NEWEST).format(table=sql.Identifier(t))) for t in keys}
    s.measure("not_newest_after_repair", sum(not_newest.values()), show=False,
              note="rows the repair kept that are not their order's newest version")
    s.recovered_if(all(kept[t] == want for t in keys) and not any(not_newest.values()),
                   "right after the repair, each table holds the newest version of every order, "
                   "once: count, sum and checksum as expected_orders")

    with s.step("Re-run the naive v1 load of day 1 against the repaired orders_v1") as st:
        inserted = s.measure("naive_rerun_inserted", load_v1_naive(s.conn, day1), show=False,
                             note="rows the naive day-1 load inserted into the repaired orders_v1")
        st.result = f"{inserted} rows inserted"
    s.recovered_if(inserted == 0, "the same ON CONFLICT DO NOTHING now meets the business key: "
                                  "nothing inserted, web-shop orders included")
    s.say("And day 2, with its re-typed keys:")
    with s.expect(psycopg2.errors.CheckViolation, sqlstate="23514"):
        load_v1_naive(s.conn, day2)  # a re-typed key is refused by the CHECK, not stored as a new order
    s.conn.rollback()

    def load_all(extracts) -> int:  # the fixed load, into both tables
        return sum(load_upsert(s.conn, e, keys[t], t, stage=s.fix("stage"))
                   for t in keys for e in extracts)
    with s.step("Load day 2 again, into both tables, with the fixed load: stage, then upsert") as st:
        written, error = attempt(s, s.conn, load_all, [day2])
        rows_now = {t: count(s.conn, t) for t in keys}
        st.result = (f"{written} rows written; orders_v1 {rows_now['orders_v1']} rows, "
                     f"orders_v2 {rows_now['orders_v2']}" if error is None else "the load failed")
    s.recovered_if((error, written, rows_now) == (None, 0, {t: ORDERS for t in keys}),
                   f"the {RETYPED} re-typed keys land on their canonical orders: no error, no new "
                   "row, nothing written (the repair kept day 2's versions)")
    prove_idempotent(s, lambda: load_all([day1, day2]), tuple(keys))
    s.prevention("""
        Make the unique index the business key, NULL-safe and canonical, and name it as the
        arbiter. Canonicalize keys once, at the door (stage), and let a CHECK refuse any other
        spelling. The load itself is upsert_from_staging (shown in data_drift).""",
                 stage_as_is,
                 lesson="ON CONFLICT guards only the key a unique index enforces: make that index "
                        "the business key, NULL-safe and canonical.",
                 questions=(
                     "Which of your tables have a serial id as their only unique key, and what "
                     "does ON CONFLICT DO NOTHING protect there?",
                     "Which of your business keys has a nullable column, and what does a plain "
                     "UNIQUE let in through it?",
                     "What other spellings of a key (case, blanks, leading zeros) can your "
                     "sources send, and where would you canonicalize them?"))


# == 2. partial_failure ==========================================================================
COMMIT_EVERY = 100
BAD_LINES = {1234: Decimal("-19.99"),        # a refund sent as a negative order: CHECK (amount >= 0)
             1500: Decimal("250000000.00"),  # an order in rupiah: numeric(10, 2) overflows
             1800: Decimal("-5.00")}         # another negative amount, further down
ENDED_AT = 1350  # the line at which the server ends the recovery's first load
# What the naive load leaves: its full batches before the first bad line (1200 rows).
PREFIX = (min(BAD_LINES) - 1) // COMMIT_EVERY * COMMIT_EVERY


def with_bad_rows(rows: list[dict]) -> list[dict]:
    return [{**r, "amount": BAD_LINES.get(n, r["amount"])} for n, r in enumerate(rows, 1)]


def load_batches_naive(conn, rows: list[dict], key: BusinessKey) -> int:
    """Row by row, a commit every COMMIT_EVERY rows "so a failure loses
    little"; ON CONFLICT DO NOTHING "so a re-run is safe". Returns the
    rows inserted."""
    inserted = 0
    with conn.cursor() as cur:
        for n, values in enumerate(as_values(rows), 1):
            cur.execute("""
                INSERT INTO orders (store_id, order_ref, customer_id,
                                    invoice_no, amount, updated_at)
                VALUES (%s, %s, %s, %s, %s, %s)
                ON CONFLICT DO NOTHING""", values)
            inserted += cur.rowcount
            if n % COMMIT_EVERY == 0:
                conn.commit()
    conn.commit()
    return inserted


CHUNK = 100  # rows moved per savepoint; a chunk the target refuses is retried row by row
REFUSED = (psycopg2.DataError, psycopg2.IntegrityError)  # what the target can refuse a row for


def move(cur, key: BusinessKey, first: int, last: int) -> int:
    """Upsert staging lines first..last under a savepoint: refused,
    they leave no trace and the transaction goes on."""
    cur.execute("SAVEPOINT move")
    try:
        written = upsert_from_staging(
            cur, "orders", key, sql.SQL("line BETWEEN %s AND %s"),
            (first, last))
    except REFUSED:
        cur.execute("ROLLBACK TO SAVEPOINT move; RELEASE SAVEPOINT move")
        raise
    cur.execute("RELEASE SAVEPOINT move")
    return written


def load_staged(conn, rows: list[dict], key: BusinessKey) -> int:
    """One transaction: stage the extract, move it chunk by chunk,
    commit once. In a chunk the target refuses, each row gets its own
    savepoint; a refused row goes to load_rejects with the server's
    error. Returns the rows written, rejects included."""
    changed = 0
    with conn.cursor() as cur:
        stage(cur, rows)
        for first in range(1, len(rows) + 1, CHUNK):
            last = min(first + CHUNK - 1, len(rows))
            try:
                changed += move(cur, key, first, last)
            except REFUSED:
                for line in range(first, last + 1):
                    try:
                        changed += move(cur, key, line, line)
                    except REFUSED as exc:
                        cur.execute("""
                            INSERT INTO load_rejects
                            SELECT order_ref, %s, %s FROM staging_orders
                             WHERE line = %s
                            ON CONFLICT (order_ref) DO NOTHING""",
                            (exc.pgcode, exc.diag.message_primary, line))
                        changed += cur.rowcount
    conn.commit()  # the only commit: all of the extract, or nothing
    return changed


def unloaded_orders_by_count(conn) -> list[tuple]:
    """Fewer rows in orders than orders in the extract: a load
    stopped short. Returns [(sent, loaded)], or [] when complete."""
    sent = db.scalar(conn, "SELECT count(DISTINCT upper(btrim("
                           "order_ref))) FROM source_orders")
    loaded = db.scalar(conn, "SELECT count(*) FROM orders")
    return [(sent, loaded)] if loaded < sent else []


def unloaded_orders(conn) -> list[tuple]:
    """Every order the source sent is in orders or set aside in
    load_rejects: the ones in neither, by business key."""
    return db.rows(conn, """
        SELECT DISTINCT s.store_id, upper(btrim(s.order_ref)) AS ref
          FROM source_orders s
         WHERE NOT EXISTS (
                   SELECT 1 FROM orders o
                    WHERE o.order_ref = upper(btrim(s.order_ref))
                      AND o.store_id IS NOT DISTINCT FROM s.store_id)
           AND NOT EXISTS (
                   SELECT 1 FROM load_rejects r
                    WHERE r.order_ref = upper(btrim(s.order_ref)))
         ORDER BY 2""")


@scenario("partial_failure", "A load that commits as it goes stops halfway", fixes=[
    fix("load_extract", naive=load_batches_naive, fixed=load_staged,
        contract=f"""
        Load the extract `rows` into orders (business key `key`; upsert_from_staging and stage
        are there to use) and return the rows written, rejects included. The extract is the
        unit of work: if the load fails or its connection is lost at any row, a reader sees
        nothing of it, ever. A row the target refuses (SQLSTATE class 22 or 23) goes to
        load_rejects (order_ref, sqlstate, reason) and the rest loads. Rows already there, in
        the same version, are not written again.
        Graded: the server ends the first run's connection at line {ENDED_AT}: orders and
        load_rejects must look exactly as before it; the next run writes the
        {ORDERS - PREFIX} missing rows (2 of them as rejects: lines 1500 and 1800), and a run
        after that writes nothing.""",
        hints=("""
            Count the COMMITs: what does a reader see when the server ends the
            connection between two of them? And at the first bad row?""", """
            Stage the extract, then one transaction with one commit at the end.
            Move the rows in chunks, each under a SAVEPOINT; in a chunk that
            fails, retry row by row, each under its own savepoint, and INSERT a
            refused row into load_rejects.""")),
    fix("unloaded_orders", naive=unloaded_orders_by_count, fixed=unloaded_orders,
        contract=f"""
        The completeness check a scheduler runs after each load: given a connection, return
        the orders the source sent (source_orders, every version of every order as it
        arrived) that are neither in orders nor set aside in load_rejects, one item per
        order, by business key (store_id and order_ref, compared upper case and without
        blanks); an empty list when the load is complete.
        Graded: on the {ORDERS - PREFIX} orders the stopped naive load never wrote it fires; after
        the recovery (orders holds {ORDERS - 2} orders, load_rejects 2) it finds nothing.""",
        hints=("""
            Two rows of the extract are refused on purpose and set aside: what
            does a comparison of row counts say once they are?""", """
            Compare by key, not by count: SELECT ... FROM source_orders s
            WHERE NOT EXISTS (... orders ...) AND NOT EXISTS (...
            load_rejects ...).""")),
])
def partial_failure(s):
    key = setup(s)
    extract = arrive(s, with_bad_rows(make_orders(s.rng)))
    bad = ", ".join(map(str, sorted(BAD_LINES)))
    s.description(f"""
        The load inserts {ORDERS} orders row by row and commits every {COMMIT_EVERY} rows, "so a
        failure loses little", with ON CONFLICT DO NOTHING, "so a re-run is safe". The target
        refuses negative amounts (CHECK) and amounts of 10^8 or more (numeric(10, 2)). Lines
        {bad} of today's extract carry such amounts.""")
    s.trigger(f"Run the load. The first bad row (line {min(BAD_LINES)}, amount "
              f"{BAD_LINES[min(BAD_LINES)]}) stops it.")
    with s.expect(psycopg2.errors.CheckViolation, sqlstate="23514"):
        exported(s, load_batches_naive)(s.conn, extract, key)
    s.conn.rollback()
    first_bad = min(BAD_LINES)
    committed = s.measure("committed_before_error", count(s.conn, "orders"), show=False,
                          note="rows the naive load committed before its first bad row: a prefix",
                          headline=True)
    held = {ref for ref, in db.rows(s.conn, "SELECT order_ref FROM orders")}
    lines_in = {n for n, r in enumerate(extract, 1) if r["order_ref"] in held}
    batches = s.measure("committed_batches", db.scalar(
        s.conn, "SELECT count(DISTINCT xmin::text) FROM orders"), show=False,
        note="transactions that wrote the rows orders holds (distinct xmin)")
    s.triggered_if((committed, lines_in, batches) == (PREFIX, set(range(1, PREFIX + 1)),
                                                     PREFIX // COMMIT_EVERY),
                   f"{committed} of {ORDERS} rows are in, lines 1..{PREFIX}, written by "
                   f"{batches} transactions: the batches committed before line {first_bad} stay")
    rolled_back = [n for n in range(1, first_bad) if n not in lines_in]
    lost = s.measure("rolled_back_in_open_batch", len(rolled_back), show=False,
                     note="good rows lost with the open batch at the first bad row")
    s.triggered_if(rolled_back == list(range(committed + 1, first_bad)),
                   f"the {lost} good rows {min(rolled_back, default=None)}.."
                   f"{max(rolled_back, default=None)} of the open batch "
                   "were rolled back with it; the lines after it were never tried")
    s.root_cause(f"""
        The commit boundary (every {COMMIT_EVERY} rows) is not the unit of work (the extract):
        a failure at any row, a bad value or a lost connection, leaves a prefix behind, and
        readers see it as if it were the day's data. DO NOTHING makes a re-run skip the prefix,
        but not finish: fixing the row you saw does not fix the rows the load never reached
        (lines {", ".join(map(str, sorted(BAD_LINES)[1:]))} are still bad), and each run that
        stops leaves a longer prefix.""",
                 detect=s.fix("unloaded_orders"), runbook="""
        unloaded_orders: orders the source sent are neither in the target nor set aside, so
        readers take a part of the day for all of it. Look at the last load run: if it failed
        after committing part of the extract, mark the day incomplete for readers, fix what
        stopped it and run the load again; it must be one transaction per extract.""")
    fixed = arrive(s, [{**r, "amount": -r["amount"], "updated_at": r["updated_at"] + timedelta(hours=1)}
                       if n == first_bad else r for n, r in enumerate(extract, 1)])  # the sign fixed
    load = exported(s, s.fix("load_extract"))
    before = visible_state(s)
    ended_ref = fixed[ENDED_AT - 1]["order_ref"]
    with server_ends_connection(s, sql.SQL("NEW.order_ref = {}").format(sql.Literal(ended_ref))) as fired_at:
        with s.step(f"The source corrects line {first_bad}; run the load. The server ends its "
                    f"connection at line {ENDED_AT} (pg_terminate_backend)") as st:
            job = s.connect()
            backend = backend_of(job)
            _, error = attempt(s, job, load, job, fixed, key)
            after = visible_state(s)
            st.result = (f"orders {before.rows} -> {after.rows} rows, "
                         f"load_rejects {before.rejects} -> {after.rejects}")
        at = s.measure("connection_ended_at", fired_at(), show=False,
                       note="the order whose row the server ended the load at, as the server recorded it")
        s.recovered_if(connection_ended(s, job, backend, error) and at == ENDED_AT,
                       f"the server ended the load's connection at line {ENDED_AT}: its backend is "
                       f"gone from pg_stat_activity, the error a lost connection, not a cancel (57014)")
    s.measure("rows_after_lost_connection", after.rows, show=False,
              note="rows in orders after the one-commit load lost its connection")
    s.recovered_if((after, after.rows) == (before, committed),
                   f"nothing of the interrupted load is visible: orders is still the "
                   f"{committed}-row prefix, same checksum; load_rejects as before")
    with s.step("Run it again, on a new connection") as st:
        job = s.connect()
        written, error = attempt(s, job, load, job, fixed, key)
        s.measure("staged_rowcount", written, show=False,
                  note="rows the run on a new connection wrote, rejects included")
        st.result = f"{written} rows written, rejects included" if error is None else "the load failed"
    missing = ORDERS - committed
    s.recovered_if((error, written) == (None, missing),
                   f"the run completes and writes the {missing} missing rows, not the "
                   f"{committed} already in" + ("" if error is None else
                                                 f" (it raised {type(error).__name__})"))
    with s.step("Read load_rejects: the rows set aside, with the server's error") as st:
        rejects = show_rejects(s)
        quarantined = s.measure("quarantined", len(rejects), show=False,
                                note="rows set aside in load_rejects")
        st.result = f"{quarantined} rows set aside"
    s.recovered_if({r[:2] for r in rejects} == {("ORD-01500", "22003"), ("ORD-01800", "23514")},
                   "load_rejects names exactly lines 1500 (22003) and 1800 (23514)")
    prove_idempotent(s, lambda: load(s.conn, fixed, key))
    s.prevention("""
        Make the transaction the unit of work: stage the extract, move it in one transaction,
        commit once; a lost connection then loses the whole run, never part of it, and the next
        run starts clean. Set refused rows aside with the server's error (a savepoint per
        chunk, per row inside a refused chunk), and upsert, so a re-run is always safe.""",
                 move,
                 lesson="Commit once per extract: a load that commits as it goes leaves a prefix "
                        "that readers take for the day's data.",
                 questions=(
                     "What does a reader of your target see while a load is halfway, and after "
                     "it stops there?",
                     "Your load commits in batches to keep transactions short: what would one "
                     "transaction per extract cost on your largest load?",
                     "Who reads `load_rejects` the next morning, and what do they do with a row "
                     "in it?"))


# == 3. constraint_violation =====================================================================
EDITS = 20  # orders edited in each hourly delta
CONSTRAINTS_DDL = """
    CREATE TABLE customers (customer_id integer PRIMARY KEY);
    INSERT INTO customers SELECT generate_series(1, {customers});
    ALTER TABLE orders
        ADD CONSTRAINT orders_invoice_no_key UNIQUE (invoice_no),         -- a second unique key
        ADD CONSTRAINT orders_customer_fkey FOREIGN KEY (customer_id) REFERENCES customers"""

# Validation in staging, before the upsert: each moves the rows the target would refuse into
# load_rejects, with the SQLSTATE it would have raised.
UNKNOWN_CUSTOMER = """
    WITH bad AS (
        DELETE FROM staging_orders s
         WHERE NOT EXISTS (SELECT 1 FROM customers c
                            WHERE c.customer_id = s.customer_id)
        RETURNING s.order_ref, s.customer_id)
    INSERT INTO load_rejects (order_ref, sqlstate, reason)
    SELECT order_ref, '23503',
           'customer_id ' || customer_id || ' is not in customers'
      FROM bad
    ON CONFLICT (order_ref) DO NOTHING"""
INVOICE_OF_ANOTHER_ORDER = """
    WITH bad AS (
        DELETE FROM staging_orders s USING orders o
         WHERE o.invoice_no = s.invoice_no
           AND (o.store_id, o.order_ref)
               IS DISTINCT FROM (s.store_id, s.order_ref)
        RETURNING s.order_ref, s.invoice_no, o.order_ref AS owner)
    INSERT INTO load_rejects (order_ref, sqlstate, reason)
    SELECT order_ref, '23505',
           'invoice_no ' || invoice_no || ' belongs to ' || owner
      FROM bad
    ON CONFLICT (order_ref) DO NOTHING"""


def load_upsert_naive(conn, rows: list[dict], key: BusinessKey) -> int:
    """One INSERT ... ON CONFLICT (business key) DO UPDATE over the
    batch, as it came. Returns the rows written."""
    with conn.cursor() as cur:
        execute_values(cur, sql.SQL("""
            INSERT INTO orders (store_id, order_ref, customer_id,
                                invoice_no, amount, updated_at)
            VALUES %s ON CONFLICT {key} DO UPDATE
               SET customer_id = excluded.customer_id,
                   invoice_no = excluded.invoice_no,
                   amount = excluded.amount,
                   updated_at = excluded.updated_at""").format(
            key=key.conflict_target), as_values(rows), page_size=PAGE)
        written = cur.rowcount
    conn.commit()
    return written


def load_checked(conn, rows: list[dict], key: BusinessKey) -> int:
    """Stage, set aside what the target would refuse, upsert the rest
    (newest per key): one transaction, one commit. Returns the rows
    written to orders (the rejects are in load_rejects)."""
    with conn.cursor() as cur:
        stage(cur, rows)
        cur.execute(UNKNOWN_CUSTOMER)          # the foreign key
        cur.execute(INVOICE_OF_ANOTHER_ORDER)  # the second unique key
        written = upsert_from_staging(cur, "orders", key)  # one per key
    conn.commit()  # the rejects and the rows: together or not at all
    return written


def rows_behind(s):
    """The job's backlog, as it exports it: rows of received deltas whose load has not committed."""
    return s.gauge("orders_delta_rows_behind", "Rows of received deltas not loaded yet")


# Alert when received rows wait longer than a few runs of the hourly job would take (the rule in
# alerts/fail_idempotency_break.rules.yml; promtool tests it on a real run's series).
DELTAS_NOT_LOADED = metric_alert("OrderDeltasNotLoaded", lambda values: [
    ("orders_delta_rows_behind", behind)] if (behind := metric_total(values, "orders_delta_rows_behind")) else [])


@scenario("constraint_violation", "Errors that ON CONFLICT does not cover", fixes=[
    fix("load_delta", naive=load_upsert_naive, fixed=load_checked,
        contract="""
        Load the delta `rows` into orders (business key `key`) and return the rows written to
        orders. orders also has a second unique key (invoice_no) and a foreign key to
        customers: a row that would break either goes to load_rejects (order_ref, sqlstate
        23505 or 23503, reason) and the rest of the delta loads; a key twice in the delta loads
        its newest version. The delta is one unit of work: if the connection is lost anywhere
        in it, neither its rows nor its rejects are visible.
        Graded: each delta loads without an error; the server ends the connection of delta 2
        between its validation and its upsert, and nothing of delta 2 may be visible; the
        re-booked order and the unknown customer are set aside; ORD-00007 holds its newest
        version; orders equals the newest source versions.""",
        hints=(f"""
            ON CONFLICT covers one case only. Which three rows make the single
            INSERT fail, and what happens to the {EDITS} good rows of each delta?""", """
            Stage the delta; move the rows with an unknown customer, or with the
            invoice_no of another order, into load_rejects (DELETE ... RETURNING
            feeding an INSERT); then upsert_from_staging (DISTINCT ON, newest
            first). One commit at the end, for the rows and the rejects.""")),
])
def constraint_violation(s):
    key = setup(s, sql.SQL(CONSTRAINTS_DDL).format(customers=sql.Literal(CUSTOMERS)))
    s.description(f"""
        orders is keyed by (store_id, order_ref) and loaded by one INSERT ... ON CONFLICT DO
        UPDATE per batch. It also has a second unique key (invoice_no) and a foreign key to
        customers. The day's {ORDERS} orders load fine: the naive upsert passes every test on
        clean data.""")
    base = arrive(s, make_orders(s.rng))
    exported(s, load_upsert_naive)(s.conn, base, key)
    before = snapshot(s.conn, "orders")
    s.require(before[0] == ORDERS, f"the naive upsert loaded the day's {ORDERS} orders")

    def delta(hour: int, *extra: dict) -> list[dict]:  # an hourly API delta: EDITS edited orders + extra rows
        return arrive(s, [edit(s.rng, r, timedelta(hours=hour)) for r in s.rng.sample(base[10:], EDITS)]
                      + list(extra))
    order7 = base[6]
    deltas = [
        delta(1, edit(s.rng, order7, timedelta(hours=1, minutes=5)),    # ORD-00007 edited twice in the hour
              edit(s.rng, order7, timedelta(hours=1, minutes=40))),
        delta(2, {**make_orders(s.rng, 1, ORDERS + 1, DAY1 + timedelta(hours=2))[0],
                  "invoice_no": base[41]["invoice_no"]}),               # re-booked: ORD-00042's invoice
        delta(3, {**make_orders(s.rng, 1, ORDERS + 2, DAY1 + timedelta(hours=3))[0],
                  "customer_id": 9999})]                                # a customer not synced yet
    sizes = [len(d) for d in deltas]
    s.trigger(f"""
        Three hourly deltas of {EDITS} edited orders arrive ({" + ".join(map(str, sizes))} rows),
        each with a row ON CONFLICT was never asked about: ORD-00007 twice in one batch; a
        re-booked order ORD-02001 carrying ORD-00042's invoice number; an order ORD-02002 for
        customer 9999, not synced yet.""")
    behind = rows_behind(s)
    behind.set(sum(sizes))  # the job's backlog: every delta received, none loaded yet
    refused = []  # the SQLSTATE the server refused each delta with
    for batch, error, state in zip(deltas, (psycopg2.errors.CardinalityViolation, psycopg2.errors.UniqueViolation,
                                            psycopg2.errors.ForeignKeyViolation), ("21000", "23505", "23503")):
        with s.expect(error, sqlstate=state) as caught:
            exported(s, load_upsert_naive)(s.conn, batch, key)
            behind.dec(len(batch))  # a committed delta is off the backlog
        s.conn.rollback()
        refused.append(getattr(caught.exc, "pgcode", None))
    blocked = s.measure("rows_blocked", sum(len(d) for d, state in zip(deltas, refused) if state), show=False,
                        note="rows of the three deltas the naive upsert could not write", headline=True)
    s.triggered_if((refused, snapshot(s.conn, "orders")) == (["21000", "23505", "23503"], before),
                   f"none of the {blocked} rows was written: one bad row stops its whole batch "
                   f"({', '.join(map(str, refused))})")
    s.root_cause("""
        ON CONFLICT handles one thing: a conflict on its arbiter index, with a row already in
        the table. A key twice in the same statement would be updated twice (21000). A conflict
        on any other unique index is a plain error (23505). Foreign keys and CHECKs are not
        conflicts at all (23503 here; 23514 in partial_failure). One such row fails the whole
        statement, and the batch's good rows wait.""",
                 detect=DELTAS_NOT_LOADED, runbook="""
        OrderDeltasNotLoaded: rows of received deltas have waited for more than 15 minutes, so
        readers see hours-old orders. Read the job's last error: a constraint a row breaks (21000,
        23505, 23503, 23514) blocks its whole batch and every run after it; set that row aside
        (load_rejects) and load the rest. A lost connection only needs the run again.""")
    load = exported(s, s.fix("load_delta"))
    pending = set(range(len(deltas)))  # the fixed job starts from the same three deltas

    def load_delta(n: int, job):  # one run of the job for delta n: off the backlog once committed
        done, error = attempt(s, job, load, job, deltas[n], key)
        if error is None:
            pending.discard(n)
        rows_behind(s).set(sum(sizes[p] for p in pending))
        return done, error
    with s.step("Load delta 1 with load_checked: dedupe (newest first), set aside what the "
                "target would refuse, upsert the rest") as st:
        job = s.connect()
        first, error = load_delta(0, job)
        st.result = f"{first} rows written" if error is None else "the load failed"
    s.recovered_if(error is None, "delta 1 loads without an error")
    missed = not_held(s.conn, deltas[0])
    s.recovered_if(not missed, f"orders holds the newest version of each of delta 1's "
                               f"{len({r['order_ref'] for r in deltas[0]})} orders"
                   + (f" (not: {', '.join(missed[:3])})" if missed else ""))
    before2 = visible_state(s)
    with server_ends_connection(s) as fired_at:
        with s.step("Load delta 2; the server ends the connection at its first write to "
                    "orders, after the validation") as st:
            backend = backend_of(job)
            _, error = load_delta(1, job)
            after2 = visible_state(s)
            st.result = (f"orders {before2.rows} -> {after2.rows} rows, "
                         f"load_rejects {before2.rejects} -> {after2.rejects}")
        s.recovered_if(connection_ended(s, job, backend, error) and fired_at() is not None,
                       "the server ended the connection of delta 2 between its validation and its "
                       "upsert: its backend is gone from pg_stat_activity, the error a lost "
                       "connection, not a cancel (57014)")
    s.recovered_if(after2 == before2, "nothing of delta 2 is visible: orders as after delta 1, "
                                      "no reject of it in load_rejects")
    with s.step("Load delta 2 again on a new connection, then delta 3") as st:
        job = s.connect()
        (second, error2), (third, error3) = [load_delta(n, job) for n in (1, 2)]
        st.result = (f"{second} and {third} rows written" if not (error2 or error3)
                     else "a load failed")
    s.recovered_if(not (error2 or error3), "deltas 2 and 3 load without an error")
    rejects = show_rejects(s)
    s.measure("rejects", len(rejects), show=False, note="rows set aside in load_rejects")
    s.recovered_if({r[:2] for r in rejects} == {("ORD-02001", "23505"), ("ORD-02002", "23503")},
                   "the re-booked order and the unknown customer are set aside, with the reason")
    newest7 = deltas[0][-1]  # the later of ORD-00007's two edits in the first delta
    held7 = db.rows(s.conn, "SELECT amount, updated_at FROM orders WHERE order_ref = %s", (newest7["order_ref"],))
    s.recovered_if(held7 == [(newest7["amount"], newest7["updated_at"])],
                   f"{newest7['order_ref']} holds its newest version ({newest7['amount']}, "
                   f"{newest7['updated_at']:%H:%M})")
    written = [first, second, third]
    done = None if None in written else sum(written)
    s.measure("rows_written", done, show=False, note="rows the three deltas wrote with load_checked")
    set_aside = {ref for ref, _, _ in rejects}
    due = [len({r["order_ref"] for r in d} - set_aside) for d in deltas]  # one row per order
    s.recovered_if(written == due, "each delta writes one row per order it carries, less the "
                                   f"ones set aside: {', '.join(map(str, due))} rows")
    superseded = sum(len(d) - len({r["order_ref"] for r in d}) for d in deltas)  # ORD-00007's older edit
    s.recovered_if(done == sum(sizes) - len(rejects) - superseded,
                   f"every row of the deltas is accounted for: {sum(sizes)} = {done} written + "
                   f"{len(rejects)} set aside + {superseded} superseded in its own batch")
    prove_idempotent(s, lambda: sum(load(s.conn, e, key) for e in [base, *deltas]))
    s.prevention("""
        Never hand the server a batch it can refuse: dedupe it on the key (DISTINCT ON, newest
        first), validate references in staging, decide what a clash on any other unique key
        means, and commit the rejects with the rows, in one transaction.""",
                 INVOICE_OF_ANOTHER_ORDER,
                 lesson="ON CONFLICT covers one conflict only: dedupe and validate the batch in "
                        "staging, and commit the rejects with the rows.",
                 questions=(
                     "Which unique keys, foreign keys and CHECKs does your target have besides "
                     "the key ON CONFLICT names?",
                     "A row refers to a customer not synced yet: should it wait, be set aside, "
                     "or stop the load?",
                     "One key twice in a batch: which version must win, and what in your data "
                     "decides it?"))


# == 4. data_drift ===============================================================================
HASH_DDL = """
    CREATE TABLE orders_by_hash (   -- idempotency key: a hash of the whole row
        row_hash text PRIMARY KEY, store_id integer, order_ref text NOT NULL, customer_id integer NOT NULL,
        invoice_no text NOT NULL, amount numeric(10, 2) NOT NULL, updated_at timestamptz NOT NULL)"""

# Drift between an extract (staged) and the target, by comparing row hashes per business key.
# The staged row is hashed as the target stores it (amount numeric(10, 2): 1 and 1.00 are one value).
DRIFT = """
    SELECT CASE WHEN t.order_ref IS NULL THEN 'new'
                WHEN md5(row(s.customer_id, s.invoice_no,
                             s.amount::numeric(10, 2))::text)
                   = md5(row(t.customer_id, t.invoice_no,
                             t.amount)::text) THEN 'unchanged'
                WHEN s.updated_at > t.updated_at THEN 'changed, newer'
                WHEN s.updated_at = t.updated_at
                     THEN 'changed, same updated_at'
                ELSE 'changed, older (late)' END AS drift, count(*)
      FROM staging_orders s
      LEFT JOIN orders t
             ON t.order_ref = s.order_ref
            AND t.store_id IS NOT DISTINCT FROM s.store_id
     GROUP BY 1 ORDER BY 1"""

# The freshness check a scheduler runs after each load: orders whose newest version the source
# sent (source_orders, as it arrived) is not the version the target holds, or not there at all.
ORDERS_BEHIND_SOURCE = sql_check("orders_behind_source", """
    SELECT e.store_id, e.order_ref, e.updated_at AS sent,
           o.updated_at AS held
      FROM expected_orders e
      LEFT JOIN orders o
             ON o.order_ref = e.order_ref
            AND o.store_id IS NOT DISTINCT FROM e.store_id
     WHERE (o.customer_id, o.invoice_no, o.amount, o.updated_at)
           IS DISTINCT FROM
           (e.customer_id, e.invoice_no, e.amount, e.updated_at)
     ORDER BY 2""")

# The target's shape as the catalog has it: what an extract's fields are checked against.
TARGET_SHAPE = """
    SELECT column_name, data_type FROM information_schema.columns
     WHERE table_schema = current_schema() AND table_name = %s"""
PG_TYPE = {bool: "boolean", int: "integer", str: "text", float: "double precision",
           Decimal: "numeric", datetime: "timestamp with time zone"}


def row_hash(row: dict) -> str:
    return hashlib.md5(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()


def load_by_hash_naive(conn, rows: list[dict]) -> None:
    """Idempotency key = hash of the whole row: a corrected order has a new hash, so it is 'new'."""
    with conn.cursor() as cur:
        execute_values(cur, """
            INSERT INTO orders_by_hash (row_hash, store_id, order_ref, customer_id, invoice_no, amount, updated_at)
            VALUES %s ON CONFLICT (row_hash) DO NOTHING""",
                       [(row_hash(r), *v) for r, v in zip(rows, as_values(rows))], page_size=PAGE)
    conn.commit()


def extract_type(rows: list[dict], field: str) -> str:
    """The PostgreSQL type a field's values need (the first non-NULL value decides)."""
    value = next((r[field] for r in rows if r.get(field) is not None), None)
    if value is None:
        return "NULL only"
    if isinstance(value, datetime) and value.tzinfo is None:
        return "timestamp without time zone"
    return PG_TYPE.get(type(value), type(value).__name__)


def shape_check(conn, rows: list[dict], table: str = "orders") -> list[tuple[str, str, str]]:
    """Shape first: each field of the extract (and each column of the target) with the type the
    extract needs and the type the catalog has; '-' where one side lacks it."""
    columns = dict(db.rows(conn, TARGET_SHAPE, (table,)))
    conn.rollback()
    fields = list(dict.fromkeys(f for r in rows for f in r))
    return [(f, extract_type(rows, f) if f in fields else "-", columns.get(f, "-"))
            for f in fields + [c for c in columns if c not in fields]]


def detect_drift(conn, rows: list[dict]) -> dict[str, int]:
    """Then content: stage the extract and count new / unchanged / changed rows against the
    target, by business key and row hash; writes nothing."""
    with conn.cursor() as cur:
        stage(cur, rows)
        cur.execute(DRIFT)
        drift = dict(cur.fetchall())
    conn.rollback()
    return drift


@scenario("data_drift", "The source re-sends records that changed", fixes=[
    fix("upsert_from_staging", naive=upsert_from_staging_naive, fixed=upsert_from_staging,
        contract="""
        Write the staged rows (staging_orders, lines matching `where` with `args`) into `table`
        on the business key `key` (its conflict_target) and return the rows really written. A
        newer version (a later updated_at) replaces the one in the table; an older or the same
        one writes nothing; a key twice in staging writes its newest version.
        Graded: loading days 2 and 3 writes exactly the 80 + 40 corrections and the 100 new
        orders; a late replay of day 1 writes 0 rows; orders equals the newest source version of
        every order.""",
        hints=("""
            DO NOTHING makes a re-send harmless, and a correction too. What
            should win when the key is already there?""", """
            ON CONFLICT ... DO UPDATE SET ... = excluded.... WHERE
            excluded.updated_at > t.updated_at (the target aliased AS t), and
            DISTINCT ON (store_id, order_ref) ... ORDER BY ..., updated_at DESC
            for a key twice in the batch.""")),
    fix("as_values", naive=as_values_naive, fixed=as_values,
        contract="""
        Turn extract rows (dicts) into tuples in the order of ORDER_COLUMNS (store_id,
        order_ref, customer_id, invoice_no, amount, updated_at), by field name, whatever order
        the extract's fields come in and whatever fields it adds. A missing field is an error.
        Graded: day 3, whose extract adds a field currency, loads: 40 corrections and 100 new
        orders written, the currency not loaded.""",
        hints=("""
            What does tuple(row.values()) give when the export adds a field?""", """
            tuple(row[c] for c in ORDER_COLUMNS): by name, in the order of the
            target's column list.""")),
])
def data_drift(s):
    key = setup(s, HASH_DDL)
    fixes, late_fixes, new_orders = 80, 40, 100  # corrections on day 2, corrections and new orders on day 3
    s.description("""
        Every day the source re-sends the orders it knows, corrected ones with a newer
        updated_at. Two loads that "cannot duplicate": a row-hash idempotency key
        (orders_by_hash), and ON CONFLICT (business key) DO NOTHING through staging (orders),
        with each extract row's values taken in the order its fields come.""")
    s.trigger(f"""
        Day 1: {ORDERS} orders. Day 2: the same {ORDERS}, {fixes} corrected. Day 3: {new_orders}
        new orders and {late_fixes} corrections, and the extract now carries a field the table
        lacks: currency.""")
    day1 = arrive(s, make_orders(s.rng))
    day2 = arrive(s, resend(s.rng, day1, corrections=fixes))

    def load_naive(extract):
        return exported(s, load_upsert)(s.conn, extract, key, values=as_values_naive,
                                        upsert=upsert_from_staging_naive)
    for extract in (day1, day2):
        load_by_hash_naive(s.conn, extract)
        load_naive(extract)
    corrected = {a["order_ref"] for a, b in zip(day1, day2) if a != b}
    later = [edit(s.rng, r, timedelta(days=2)) for r in s.rng.sample(
        [r for r in day1 if r["order_ref"] not in corrected], late_fixes)]
    corrected |= {r["order_ref"] for r in later}
    day3 = [{**r, "currency": "EUR"}
            for r in later + make_orders(s.rng, new_orders, ORDERS + 1, DAY1 + timedelta(days=2))]
    with s.expect(psycopg2.errors.SyntaxError, sqlstate="42601"):
        load_naive(day3)  # day 3 breaks the load itself: one value more than columns
    s.conn.rollback()
    s.say("Days 1 and 2 'succeeded'. Measured against the source:")
    hashed_extra = count(s.conn, "orders_by_hash") - count(s.conn, "expected_orders")
    overcount = total(s.conn, "orders_by_hash") - total(s.conn, "expected_orders")
    stale = db.scalar(s.conn, "SELECT count(*) FROM orders o JOIN expected_orders e "
                              "USING (order_ref) WHERE o.amount <> e.amount")
    stale_gap = total(s.conn, "expected_orders") - total(s.conn, "orders")
    s.table(["table", "damage", "measured"], [
        ("orders_by_hash", "corrected orders stored twice", hashed_extra),
        ("orders_by_hash", "sum(amount) above the source", overcount),
        ("orders", "corrections ignored by DO NOTHING", stale),
        ("orders", "sum(amount) below the source", stale_gap)])
    s.measure("hash_key_extra_rows", hashed_extra, show=False,
              note="corrected orders stored twice under the row-hash key", headline=True)
    s.measure("hash_key_overcount", float(overcount), show=False,
              note="sum(amount) of orders_by_hash above the source")
    s.measure("stale_rows", stale, show=False, note="orders whose correction DO NOTHING ignored")
    s.measure("stale_total_gap", float(stale_gap), show=False, note="sum(amount) of orders below the source")
    was = {a["order_ref"]: (a["amount"], b["amount"]) for a, b in zip(day1, day2) if a != b}
    s.triggered_if((hashed_extra, overcount) == (fixes, sum(old for old, _ in was.values())),
                   f"the hash key stores each of the {fixes} corrected orders twice: the total is "
                   f"{overcount} too high, their old amounts")
    s.triggered_if((stale, stale_gap) == (fixes, sum(new - old for old, new in was.values())),
                   f"DO NOTHING keeps {fixes} stale amounts: the total is {stale_gap} too low, "
                   "what their corrections added")
    arrive(s, day3)  # recorded as the source's only now, so the figures above compare days 1 and 2
    s.root_cause("""
        A row hash identifies a version, not an order: a correction is a new hash, so it is
        stored next to the old one. DO NOTHING makes a re-send harmless by ignoring it,
        corrections included. And values taken in the extract's field order break the day the
        source adds a field. Detect it by reconciling
        against the target: the shape (fields and types against the catalog), then the content
        (by business key and row hash), then the totals.""",
                 detect=ORDERS_BEHIND_SOURCE, runbook="""
        orders_behind_source: the target holds an older version of some orders than the source
        sent, or none at all: corrections ignored, or a load that stopped. Compare the last
        extract with the target (drift by business key and row hash, its shape against the
        catalog), fix the load, and load the newest versions again; nothing else needs undoing.""")
    with s.step("Day 2 against orders: compare row hashes by business key") as st:
        drift = detect_drift(s.conn, day2)
        s.table(["drift", "rows"], sorted(drift.items()))
        newer = s.measure("drift_changed_newer", drift.get("changed, newer", 0), show=False,
                          note="day-2 rows the drift query finds changed and newer")
        st.result = f"{newer} rows changed since loaded"
    s.recovered_if(drift == {"changed, newer": fixes, "unchanged": ORDERS - fixes},
                   f"the drift query finds exactly the {fixes} corrected orders, and nothing else")
    with s.step("Day 3's shape against the catalog (information_schema.columns of orders)") as st:
        shape = shape_check(s.conn, day3)
        s.table(["field", "extract needs", "orders has"], shape)
        unmapped = [f for f, _, has in shape if has == "-"]
        mistyped = [f for f, needs, has in shape if "-" not in (needs, has) and needs != has]
        s.measure("unmapped_fields", unmapped, show=False, note="day-3 fields orders has no column for")
        st.result = (f"not in orders: {', '.join(unmapped) or 'none'}; "
                     f"type differs: {', '.join(mistyped) or 'none'}")
    s.recovered_if((unmapped, mistyped) == (["currency"], []),
                   "the shape check finds the one new field, currency, and no type change")
    load = s.fix("upsert_from_staging"), s.fix("as_values")

    def load_fixed(extract) -> int:
        return exported(s, load_upsert)(s.conn, extract, key, upsert=load[0], values=load[1])
    with s.step("Load days 2 and 3 with the fixes: explicit column map, newest version wins") as st:
        written, error = attempt(s, s.conn, lambda: {"day 2": load_fixed(day2), "day 3": load_fixed(day3)})
        s.measure("upsert_rowcount", None if error else sum(written.values()), show=False,
                  note="rows the fixed load of days 2 and 3 wrote")
        st.result = (f"{written['day 2']} and {written['day 3']} rows written; currency not loaded"
                     if error is None else "the load failed")
    s.recovered_if(written == {"day 2": fixes, "day 3": late_fixes + new_orders},
                   f"exactly the {fixes} + {late_fixes} corrections and the {new_orders} new orders "
                   "were written, each on its day")
    s.recovered_if(snapshot(s.conn, "orders")[:3] == snapshot(s.conn, "expected_orders")[:3],
                   "orders now equals the newest source version of every order, before any replay")
    with s.step("A late replay of day 1 arrives: older versions must not overwrite newer ones") as st:
        late = s.measure("late_rows_skipped", detect_drift(s.conn, day1).get("changed, older (late)", 0),
                         show=False, note="older versions the late replay of day 1 carried")
        replay, error = attempt(s, s.conn, load_fixed, day1)
        s.measure("late_replay_rowcount", replay, show=False, note="rows the late replay wrote")
        st.result = f"{late} older versions seen, {replay} rows written"
    s.recovered_if((late, replay) == (len(corrected), 0),
                   f"the replay wrote nothing: all {len(corrected)} newer versions kept")
    prove_idempotent(s, lambda: sum(map(load_fixed, (day1, day2, day3))))
    s.prevention("""
        Key on the business key, never on the row's content. Upsert with DO UPDATE ... WHERE
        excluded.updated_at > t.updated_at, so corrections land and late replays do not undo
        them; a change with the same updated_at writes nothing, and the drift query shows it
        apart. Map columns by name (as_values), and check an extract's shape against the
        catalog, then its content by row hash.""",
                 lesson="Key on the business key, not the row's content, and let the newest "
                        "updated_at win.",
                 questions=(
                     "Does your source send an `updated_at` you can trust, and what would you "
                     "order versions by if it did not?",
                     "A correction arrives with the same `updated_at` as the stored row: what "
                     "should the load do, and how would you notice?",
                     "The source adds a field: should the load fail, ignore it, or add a "
                     "column, and who decides?"))



# == 5. refresh_lock_queue =======================================================================
import random  # noqa: E402  (this section's)

from tenacity import (Retrying, retry_if_exception_type, retry_if_result,  # noqa: E402
                      stop_after_attempt, stop_after_delay, wait_fixed)

from common import budget  # noqa: E402
from common.detect import sql_check  # noqa: E402
from common.faults import Hooks, Instrumented  # noqa: E402

LOCK_WAIT_S = 0.1    # the refresh's lock_timeout (production: a second or a few)
LOCK_WAIT = f"{LOCK_WAIT_S * 1000:g}ms"
# What a busy machine may add to a lock wait the server measures. When the lock_timeout fires,
# the refresh's backend must get a CPU to give up its place; then each reader's backend must get
# one to take its lock and answer. On a 2-core machine shared by a dozen busy processes, each of
# those wake-ups can wait several scheduler slices, tens of milliseconds, and on a bad moment a
# few of them. 0.4 s covers that, and is still far below the 1 s a lock_timeout often has in
# production: the claims below must tell the two apart.
LOCK_MARGIN_S = 0.4
# The pauses between refused attempts (run_refresh) are jittered when they follow the generator the
# policy is given: with every draw at the top of its window they are longer than with every draw
# at the bottom by at least DRAWN_APART_S (the fix: 0.25 s; a fixed pause: only a busy machine's
# noise), and a seeded generator's pauses differ from each other by more than JITTER_SPREAD_S.
DRAWN_APART_S = 0.05
JITTER_SPREAD_S = 0.02
ATTEMPTS = 5         # the refresh's bounded retry
READERS = 3          # dashboards that read the table while the refresh waits
QUEUE_LIMIT_S = 3.0  # how long the lab lets a queue stand before it ends the idle reader
WAIT_S = 15.0        # the longest the lab waits for anything it set up
IDLE_LIMIT = "500ms"  # the readers' idle_in_transaction_session_timeout (production: minutes)
# Sessions this scenario opens beside the run's own two, at most at once: the idle reader, the
# refresh, the readers and the lab's watch on the refresh, or the detector's (bench/classroom.py
# --cost: 7 to 8 in all).
REFRESH_SESSIONS = READERS + 3
REFRESH_DDL = """
    -- what the dashboards read: orders and amount per customer, rebuilt from the source
    CREATE VIEW customer_totals_source AS
        SELECT customer_id, count(*) AS orders, sum(amount) AS amount
          FROM source_orders GROUP BY customer_id;
    CREATE TABLE customer_totals AS SELECT * FROM customer_totals_source"""
# A dashboard's query: the table's fingerprint, and how long the server kept the statement
# before its first row (from statement_timestamp(): the wait for its lock, by the server's clock).
READ_TOTALS = """
    SELECT count(*), coalesce(md5(string_agg(row(t.*)::text, '|' ORDER BY customer_id)), ''),
           extract(epoch FROM clock_timestamp() - statement_timestamp())::float8
      FROM customer_totals t"""
# Our sessions as the server sees them: what each waits for, who blocks it, for how long.
QUEUE = """
    SELECT a.pid, a.state, coalesce(a.wait_event_type, '-'), pg_blocking_pids(a.pid),
           round(extract(epoch FROM clock_timestamp() - CASE WHEN a.wait_event_type = 'Lock'
                 THEN a.query_start ELSE a.state_change END)::numeric, 2)
      FROM pg_stat_activity a WHERE a.pid = ANY(%s) ORDER BY a.backend_start"""
LOCK_QUEUE = sql_check("lock_queue_on_pipeline_tables", """
    -- sessions waiting for a lock on the pipeline's tables, and who blocks
    SELECT w.pid, w.mode, c.relname, pg_blocking_pids(w.pid) AS blocked_by,
           round(extract(epoch FROM clock_timestamp() - a.query_start)
                 ::numeric, 1) AS waiting_s
      FROM pg_locks w
      JOIN pg_class c ON c.oid = w.relation
      JOIN pg_stat_activity a ON a.pid = w.pid
     WHERE NOT w.granted AND c.relnamespace =
           (SELECT oid FROM pg_namespace WHERE nspname = current_schema())""")


def refresh_truncate_reload(conn) -> None:
    """Refresh customer_totals in one transaction: empty it and reload it
    from the source. Readers see the old totals or the new ones, never a
    half-loaded table, and a re-run gives the same table."""
    with conn.cursor() as cur:
        cur.execute("TRUNCATE customer_totals")
        cur.execute("INSERT INTO customer_totals "
                    "SELECT * FROM customer_totals_source")
    conn.commit()


def refresh_build_and_swap(conn) -> None:
    """Build the new totals in a table of their own (no reader waits for
    that), then swap it in with a tiny transaction that waits for its
    lock at most LOCK_WAIT: it raises LockNotAvailable (55P03) rather
    than queue every reader behind it."""
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS customer_totals_new")
        cur.execute("CREATE TABLE customer_totals_new AS "
                    "SELECT * FROM customer_totals_source")
        conn.commit()  # built; the live table is untouched
        try:
            cur.execute("SET LOCAL lock_timeout = %s", (LOCK_WAIT,))
            cur.execute("ALTER TABLE customer_totals "
                        "RENAME TO customer_totals_old")
            cur.execute("ALTER TABLE customer_totals_new "
                        "RENAME TO customer_totals")
            cur.execute("DROP TABLE customer_totals_old")
            conn.commit()
        except psycopg2.Error:
            conn.rollback()  # the live table as it was; try again later
            raise


def run_refresh_once(conn, refresh_table, rng) -> None:
    """Run the refresh."""
    refresh_table(conn)


def run_refresh_retrying(conn, refresh_table, rng) -> None:
    """Run the refresh; when its lock did not come in time (55P03), try
    again after a jittered pause, a bounded number of times: it never
    queues readers for long, and one busy moment does not fail it. The
    pauses are drawn from `rng`, so jobs started together spread out."""
    for attempt in Retrying(
            retry=retry_if_exception_type(
                psycopg2.errors.LockNotAvailable),
            stop=stop_after_attempt(ATTEMPTS),  # then alert someone
            wait=lambda _: rng.uniform(0.05, 0.3),  # production: minutes
            reraise=True):
        with attempt:
            refresh_table(conn)


def jitter(s) -> random.Random:
    """The generator a refresh job's retry draws its pauses from: seeded by --seed."""
    return random.Random(s.rng.getrandbits(64))


class EveryDraw(random.Random):
    """A generator whose every draw is at the same point of its window: 0.0 the bottom, 1.0 the top."""

    def __init__(self, at: float):
        super().__init__(0)
        self.at = min(at, 1.0 - 2.0 ** -53)  # random() is below 1

    def random(self) -> float:
        return self.at


def in_thread(s, fn, *args) -> dict:
    """Run fn in a thread, as a scheduler or a dashboard would; its outcome lands in the box."""
    box = {"done": s.event(), "error": None, "result": None}

    def run():
        try:
            box["result"] = fn(*args)
        except Exception as exc:  # the code under test failed: its claim says so
            box["error"] = exc
        finally:
            box["done"].set()
    s.thread(run)
    return box


def wait_until(condition, seconds: float = WAIT_S) -> bool:
    """Poll `condition` until it holds or `seconds` pass; return whether it held."""
    poll = Retrying(retry=retry_if_result(lambda held: not held), stop=stop_after_delay(seconds),
                    wait=wait_fixed(0.01), retry_error_callback=lambda state: False)
    return poll(condition)


def backend_alive(conn, pid: int) -> bool:
    alive = bool(db.scalar(conn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)))
    conn.rollback()
    return alive


def read_totals(conn) -> tuple:
    """(rows, checksum, seconds the server kept the statement waiting)."""
    (n, digest, waited), = db.rows(conn, READ_TOTALS)
    conn.rollback()
    return n, digest, waited


class Sessions:
    """The scenario's sessions by name, and what the server says about them."""

    def __init__(self, s):
        self.s, self.names = s, {}

    def add(self, name: str, conn):
        self.names[db.backend_pid(conn)] = name
        if not conn.autocommit:
            conn.rollback()  # backend_pid's SELECT opened a transaction: end it, nothing else
        return conn

    def pid(self, name: str) -> int:
        return next(p for p, n in self.names.items() if n == name)

    def queue(self) -> list[tuple]:
        """(name, state, waits for, blocked by, for s) of each live session of ours."""
        found = db.rows(self.s.conn, QUEUE, (list(self.names),))
        self.s.conn.rollback()
        return [(self.names[pid], state, waits, [self.names.get(b, "another session") for b in blocked], secs)
                for pid, state, waits, blocked, secs in found]

    def blocked(self) -> dict[str, list[str]]:
        """Our sessions the server shows blocked (pg_blocking_pids), each with its blockers."""
        return {who: by for who, _, _, by, _ in self.queue() if by}

    def idle_reader(self, name: str = "idle reader", **settings):
        """A dashboard that read the totals and left its transaction open: ACCESS SHARE held."""
        conn = self.add(name, self.s.connect(**settings))
        db.rows(conn, READ_TOTALS)  # no commit: idle in transaction from here
        return conn

    def readers(self) -> list[dict]:
        """READERS dashboards, each running its query in a thread of its own. No lock_timeout,
        as dashboards have none: the lab's statement_timeout bounds their wait."""
        boxes = []
        for n in range(1, READERS + 1):
            conn = self.add(f"reader {n}", self.s.connect(lock_timeout="0"))
            boxes.append(in_thread(self.s, read_totals, conn))
            boxes[-1]["conn"] = conn
        return boxes


def finished(boxes: list[dict]) -> bool:
    return all(b["done"].is_set() for b in boxes)


# How long the server kept the refresh's last statement, read once it has failed: the statement
# started at query_start, and its session went idle (its transaction aborted) at state_change.
STATEMENT_WAIT = """
    SELECT extract(epoch FROM state_change - query_start)::float8
      FROM pg_stat_activity WHERE pid = %s AND state LIKE 'idle%%'"""


class RefreshWatch(Hooks):
    """The lab's hooks on the refresh's connection (faults.Instrumented), reading on `watch` (an
    autocommit connection of its own). `errors`: the SQLSTATE of every error the server answered
    the refresh with. For each refused attempt (55P03): `waits`, how long the server kept the
    refused statement (pg_stat_activity, read before the refresh rolls back), and `pauses`, the
    seconds from the refusal to the refresh's next statement, by the OS's monotonic clock."""

    def __init__(self, watch):
        self.watch, self.pid, self.refused_at = watch, None, None
        self.errors, self.waits, self.pauses = [], [], []

    def opened(self, conn, pid: int) -> None:
        self.pid = pid

    def before_execute(self, conn, text: str) -> None:
        if self.refused_at is not None:
            self.pauses.append(time.monotonic() - self.refused_at)
            self.refused_at = None

    def failed(self, conn, exc: Exception) -> None:
        self.errors.append(getattr(exc, "pgcode", None))
        if isinstance(exc, psycopg2.errors.LockNotAvailable):
            self.waits.append(db.scalar(self.watch, STATEMENT_WAIT, (self.pid,)))
            self.refused_at = time.monotonic()


class EndIdleAfter(RefreshWatch):
    """RefreshWatch, and the idle reader ends its transaction after the refresh's `n`-th refused
    attempt (55P03), and a reader reads the table after each commit of the refresh. The moment is
    counted apart from `errors`, which the claims read."""

    def __init__(self, idle, n: int, watch):
        super().__init__(watch)
        self.idle, self.n = idle, n
        self.refused, self.readings = 0, []

    def failed(self, conn, exc: Exception) -> None:
        super().failed(conn, exc)
        if isinstance(exc, psycopg2.errors.LockNotAvailable):
            self.refused += 1
            if self.refused == self.n:
                self.idle.rollback()  # the dashboard ends its transaction

    def after_end(self, conn, committed: bool) -> None:
        if committed:
            self.readings.append(read_totals(self.watch)[:2])


def refused_pauses(s, rng) -> RefreshWatch:
    """run_refresh (the slot) with `rng`, and the lesson's refresh_build_and_swap, while a reader
    stays idle in its transaction: every attempt is refused. What the lab saw of it (RefreshWatch).
    An error the policy raises at the end is the one expected, or its failure: the claim on the
    pauses says which, not the error."""
    sessions = Sessions(s)
    idle = sessions.idle_reader()
    watch = s.connect(autocommit=True)
    hooks = RefreshWatch(watch)
    refresher = Instrumented(s.connect(lock_timeout="0"), hooks)
    try:
        s.fix("run_refresh")(refresher, refresh_build_and_swap, rng)
    except Exception:  # noqa: BLE001  the refresh gave up (55P03), or failed: the pauses tell
        pass
    for conn in (idle, refresher, watch):
        conn.close()
    return hooks


def versions(s) -> tuple:
    """(the table's fingerprint now, the source's): the two states a reader may see."""
    old = db.fingerprint(s.conn, "customer_totals", "customer_id")
    new = db.fingerprint(s.conn, "customer_totals_source", "customer_id")
    s.conn.rollback()
    return old, new


def new_orders(s, n: int) -> tuple:
    """More orders arrive, so that a refresh changes the totals. Returns versions(s): they differ,
    or a refresh that did nothing would pass for one that landed."""
    first = count(s.conn, "source_orders") + 1
    s.conn.rollback()
    arrive(s, make_orders(s.rng, n, first, DAY1 + timedelta(days=1)))
    old, new = versions(s)
    s.require(old != new, f"{n} new orders arrived: the table no longer equals the source's totals")
    return old, new


@scenario("refresh_lock_queue", "A full refresh freezes every reader", fixes=[
    fix("refresh_table", naive=refresh_truncate_reload, fixed=refresh_build_and_swap,
        contract="""
        Replace the rows of customer_totals with those of the view customer_totals_source (same
        columns), and commit. Readers run all the while: each of them must see either the old
        totals or the new ones, never an empty or half-loaded table. A reader may sit idle in its
        transaction holding its lock on customer_totals: the refresh must then fail within about
        LOCK_WAIT (raise psycopg2.errors.LockNotAvailable, SQLSTATE 55P03) rather than wait and
        queue every later reader behind it. Graded: with a reader idle in its transaction, 3
        readers must all be answered while it is still idle, none of them waiting, nor any
        refused attempt, longer than LOCK_WAIT (and a busy machine's margin, LOCK_MARGIN_S) by
        the server's clock; then the reader ends, and the table must hold the new totals.""",
        hints=("TRUNCATE needs the strongest lock (ACCESS EXCLUSIVE); while it waits for it, every "
               "reader that comes after waits behind it. How long may it wait?",
               "Build customer_totals_new first (CREATE TABLE ... AS SELECT), commit, then in one "
               "tiny transaction: SET LOCAL lock_timeout = LOCK_WAIT; rename the live table away, "
               "rename the new one in, drop the old one; on an error roll back and raise.")),
    fix("run_refresh", naive=run_refresh_once, fixed=run_refresh_retrying,
        contract="""
        Run refresh_table(conn) until it succeeds. It raises psycopg2.errors.LockNotAvailable
        (55P03) when a reader holds the table at that moment: try again after a short random
        pause drawn from `rng` (a random.Random), a bounded number of times (ATTEMPTS), and
        raise the last error when they are all used up. Graded: a reader idle in its
        transaction ends after the second refused attempt; the refresh must land on a later
        one. With the reader idle throughout, the pauses between refused attempts must vary,
        and follow rng: with every draw at the top of its window they must be longer than
        with every draw at the bottom.""",
        hints=("A refused lock is a busy moment, not a broken table. What should the job do next? "
               "And if every job that was refused tries again after the same pause?",
               "tenacity: Retrying(retry=retry_if_exception_type(psycopg2.errors.LockNotAvailable), "
               "stop=stop_after_attempt(ATTEMPTS), wait=lambda _: rng.uniform(0.05, 0.3), "
               "reraise=True).")),
])
def refresh_lock_queue(s):
    with budget.share(s, REFRESH_SESSIONS, least=REFRESH_SESSIONS):
        setup(s, REFRESH_DDL, orders=False)
        arrive(s, make_orders(s.rng))
        refresh_truncate_reload(s.conn)  # the first build
        s.description(f"""
            Dashboards read customer_totals, orders and amount per customer, rebuilt from the
            orders by a full refresh: TRUNCATE and reload in one transaction, the safe way to make
            a re-run idempotent. No reader ever sees a half-loaded table. {READERS} dashboards
            read it while the refresh runs.""")
        s.trigger(f"""
            One dashboard reads the table and leaves its transaction open (a BI tool, a notebook,
            a connection pool that does not commit). New orders arrive and the refresh starts;
            then the other dashboards query the table. No session here sets a lock_timeout: the
            default is to wait for ever (the lab's statement_timeout,
            {db.SESSION['statement_timeout']}, ends any wait).""")
        sessions = Sessions(s)
        idle = sessions.idle_reader()
        new_orders(s, 100)
        refresher = sessions.add("refresh", s.connect(lock_timeout="0"))
        refresh = in_thread(s, refresh_truncate_reload, refresher)
        s.require(wait_until(lambda: sessions.blocked() == {"refresh": ["idle reader"]}),
                  "the refresh waits for its lock behind the idle reader (pg_blocking_pids)")
        asked = time.monotonic()  # the readers ask; each wait the server measures is within ...
        readers = sessions.readers()
        s.require(wait_until(lambda: len([by for by in sessions.blocked().values() if by == ["refresh"]]) == READERS),
                  f"the {READERS} readers are blocked behind the refresh (pg_blocking_pids)")
        queued = time.monotonic()  # ... and from here on all of them are, until the idle reader ends
        queue = sessions.queue()
        s.table(["session", "state", "waits for", "blocked by", "for s"],
                [(name, state, waits, ", ".join(by) or "-", secs) for name, state, waits, by, secs in queue])
        blocked = [name for name, _, _, by, _ in queue if by]
        s.measure("sessions_blocked_before", len(blocked), show=False, headline=True,
                  note="sessions the server showed blocked (pg_blocking_pids): the refresh and the readers")
        s.triggered_if(len(blocked) == READERS + 1,
                       f"{READERS} readers queue behind the refresh, which queues behind a reader idle in "
                       f"its transaction: {len(blocked)} sessions blocked")

        s.root_cause("""
            TRUNCATE (like ALTER TABLE, DROP, REINDEX without CONCURRENTLY, VACUUM FULL) needs an
            ACCESS EXCLUSIVE lock. It waits for the idle reader's ACCESS SHARE lock, and PostgreSQL
            grants locks in order: every reader that asks after it waits behind the refresh, although
            readers do not conflict with each other. One forgotten transaction freezes every dashboard,
            and nothing fails: the load just waits, with no lock_timeout, for ever.""", detect=LOCK_QUEUE,
                     runbook="""
            Sessions are waiting for a lock on the pipeline's tables. Look at who blocks them
            (pg_blocking_pids): end the session idle in its transaction (pg_terminate_backend),
            or cancel the refresh that queues the readers; then give the refresh a lock_timeout.""")

        with s.step("On call: end the idle reader's session (pg_terminate_backend); the queue drains") as st:
            least = time.monotonic() - queued
            db.scalar(s.conn, "SELECT pg_terminate_backend(%s)", (sessions.pid("idle reader"),))
            s.conn.rollback()
            drained = wait_until(lambda: refresh["done"].is_set() and finished(readers))
            most = time.monotonic() - asked
            waits = [b["result"][2] for b in readers if b["result"]]
            s.measure("reader_wait_before_s", round(max(waits or [0]), 2), show=False,
                      note="the longest a reader waited behind the refresh, by the server's clock")
            st.result = (f"the refresh landed; the readers waited up to {max(waits or [0]):.2f} s"
                         if drained and refresh["error"] is None else "the queue did not drain")
            landed, wanted = versions(s)
            s.recovered_if(drained and refresh["error"] is None and len(waits) == READERS and landed == wanted,
                           "the refresh landed (customer_totals equals the source's totals) and every "
                           "reader answered once the idle reader was gone")
            s.triggered_if([least <= wait <= most for wait in waits] == [True] * READERS,
                           f"each reader waited {least:.2f} s at least (seen blocked until the idle "
                           f"reader ended) and {most:.2f} s at most, by the server's clock")
            for conn in [idle, refresher] + [b["conn"] for b in readers]:
                conn.close()

        sessions = Sessions(s)
        with s.step("A reader idle in its transaction again: run_refresh(refresh_table) while "
                    f"{READERS} dashboards read") as st:
            idle = sessions.idle_reader()
            old, new = new_orders(s, 100)
            watch = s.connect(autocommit=True)
            hooks = RefreshWatch(watch)
            refresher = Instrumented(sessions.add("refresh", s.connect(lock_timeout="0")), hooks)
            refresh = in_thread(s, s.fix("run_refresh"), refresher, s.fix("refresh_table"), jitter(s))
            wait_until(lambda: refresh["done"].is_set() or "refresh" in sessions.blocked())
            readers = sessions.readers()
            if wait_until(lambda: finished(readers), QUEUE_LIMIT_S):  # else they queue behind the refresh
                wait_until(lambda: refresh["done"].is_set())  # its bounded retries run out
            stuck = sessions.blocked()  # measured while the idle reader still holds its lock
            answered = [b["result"] for b in readers if b["result"]]
            longest = max((r[2] for r in answered), default=None)
            s.measure("sessions_blocked_after", len(stuck), show=False,
                      note="sessions still blocked while the reader stayed idle, with the fix")
            s.measure("reader_wait_after_s", None if longest is None else round(longest, 2), show=False,
                      note="the longest a reader waited, with the fix, by the server's clock")
            st.result = (f"{len(answered)} of {READERS} readers answered, {len(stuck)} sessions blocked"
                         + ("" if longest is None else f", longest wait {longest:.2f} s"))
            with s.expect(psycopg2.errors.LockNotAvailable, sqlstate="55P03"):
                if refresh["error"] is not None:
                    raise refresh["error"]  # the refresh's own error, raised in its thread
            s.recovered_if(not stuck and len(answered) == READERS,
                           "every reader answered while the idle transaction still held its lock: "
                           f"{len(stuck)} sessions blocked (pg_blocking_pids)")
            bound = LOCK_WAIT_S + LOCK_MARGIN_S
            s.recovered_if(longest is not None and longest <= bound,
                           f"no reader waited longer than the lock timeout ({LOCK_WAIT}, with "
                           f"{LOCK_MARGIN_S:g} s for a busy machine), by the server's clock")
            refused = [w for w in hooks.waits if w is not None]
            slowest = max(refused, default=None)
            s.measure("refused_wait_s", None if slowest is None else round(slowest, 2), show=False,
                      note="the longest a refused attempt waited for its lock, by the server's clock")
            s.recovered_if(refused and len(refused) == len(hooks.waits) and slowest <= bound,
                           f"the refresh left the queue within its lock timeout: each of its "
                           f"{len(hooks.waits)} refused attempts waited at most {LOCK_WAIT} (with "
                           f"{LOCK_MARGIN_S:g} s for a busy machine)"
                           + ("" if slowest is None else f", {slowest:.2f} s at most")
                           + ", by the server's clock (pg_stat_activity)")
            idle.rollback()  # the dashboard finally ends its transaction: whatever still waits goes on
            wait_until(lambda: refresh["done"].is_set() and finished(readers))
            seen = [b["result"][:2] for b in readers if b["result"]]
            for conn in [idle, refresher, watch] + [b["conn"] for b in readers]:
                conn.close()

        sessions = Sessions(s)
        with s.step("Again, and the idle reader ends after the refresh's second refused attempt") as st:
            idle = sessions.idle_reader()
            before, after = new_orders(s, 100)
            watch = s.connect(autocommit=True)
            hooks = EndIdleAfter(idle, 2, watch)
            refresher = Instrumented(s.connect(lock_timeout="0"), hooks)
            refresh = in_thread(s, s.fix("run_refresh"), refresher, s.fix("refresh_table"), jitter(s))
            if not wait_until(lambda: refresh["done"].is_set(), QUEUE_LIMIT_S):
                idle.rollback()  # the refresh queued instead of giving up: let it through
                wait_until(lambda: refresh["done"].is_set())
            landed = versions(s)[0]
            refused = s.measure("refused_attempts", hooks.errors.count("55P03"), show=False,
                                note="refresh attempts refused with 55P03 before the idle reader ended")
            st.result = (f"{refused} attempts refused (55P03), then "
                         + ("it landed" if refresh["error"] is None else f"{type(refresh['error']).__name__}"))
            s.recovered_if(refresh["error"] is None and hooks.errors == ["55P03"] * 2 and landed == after,
                           "the refresh landed on its third attempt, once the idle reader had ended: "
                           "the server refused two (55P03), nothing else; customer_totals equals the "
                           "source's totals (count and checksum)")
            readings = seen + hooks.readings
            wrong = [r for r in seen if r not in (old, new)] + [r for r in hooks.readings if r not in (before, after)]
            s.measure("readings_wrong", len(wrong), show=False,
                      note="readings of the table that were neither the old totals nor the new ones")
            s.recovered_if(not wrong and readings,
                           f"no reader ever saw an empty or half-loaded table ({len(readings)} readings, "
                           "each the old totals or the new ones)")
            for conn in (idle, refresher, watch):
                conn.close()

        with s.step("The pauses between refused attempts: run_refresh with the reader idle "
                    "throughout, its generator seeded, then drawing the bottom of every window, "
                    "then the top") as st:
            runs = {name: refused_pauses(s, rng) for name, rng in
                    (("seeded", jitter(s)), ("bottom", EveryDraw(0.0)), ("top", EveryDraw(1.0)))}
            s.table(["generator", "attempts refused", "pauses between them (s)"],
                    [(name, len(run.waits), ", ".join(f"{p:.2f}" for p in run.pauses) or "-")
                     for name, run in runs.items()])
            seeded, bottom, top = (runs[n].pauses for n in ("seeded", "bottom", "top"))
            spread = max(seeded) - min(seeded) if seeded else 0.0
            apart = min(top) - max(bottom) if top and bottom else 0.0
            s.measure("pause_spread_s", round(spread, 3), show=False,
                      note="longest minus shortest pause between refused attempts, seeded generator")
            s.measure("pauses_top_minus_bottom_s", round(apart, 3), show=False,
                      note="shortest pause with every draw at the top minus longest at the bottom")
            st.result = f"pauses spread over {spread:.3f} s; top minus bottom {apart:.3f} s"
            s.recovered_if(all(len(run.pauses) == ATTEMPTS - 1 for run in runs.values())
                           and spread > JITTER_SPREAD_S and apart >= DRAWN_APART_S,
                           f"the pauses between refused attempts are jittered: a seeded generator's "
                           f"{len(seeded)} pauses differ by {spread:.3f} s (more than {JITTER_SPREAD_S:g} s), "
                           f"and they follow the generator the policy is given: every draw at the top "
                           f"makes each pause longer than any at the bottom by {apart:.3f} s (at least "
                           f"{DRAWN_APART_S:g} s); {ATTEMPTS - 1} pauses a run, by the OS's clock")

        with s.step(f"What the server offers against the idle reader: idle_in_transaction_session_timeout "
                    f"({IDLE_LIMIT}, set by the dashboard's session)") as st:
            sessions = Sessions(s)
            idle = sessions.idle_reader(idle_in_transaction_session_timeout=IDLE_LIMIT)
            pid = sessions.pid("idle reader")
            gone = wait_until(lambda: not backend_alive(s.conn, pid))
            with s.expect(psycopg2.OperationalError, psycopg2.InternalError,
                          label="the idle reader's next statement: the server had ended its session, "
                                "OperationalError"):
                db.rows(idle, READ_TOTALS)
            idle.close()
            new_orders(s, 100)
            refresher = s.connect(lock_timeout="0")
            done, error = attempt(s, refresher, s.fix("run_refresh"), refresher, s.fix("refresh_table"),
                                  jitter(s))
            refresher.close()
            st.result = "the server ended the idle session; the refresh " + ("landed" if error is None else "failed")
            landed, wanted = versions(s)
            s.recovered_if(gone and error is None and landed == wanted,
                           f"the server ended the reader idle past {IDLE_LIMIT} (its backend is gone), "
                           "and the refresh then landed at once")
        s.prevention(f"""
            Give every refresh a lock_timeout and a bounded, jittered retry: refused (55P03), it
            leaves the queue and the readers behind it go on; it lands when the idle reader has
            gone. Do the slow part (building the new table) without the lock, and take the
            ACCESS EXCLUSIVE lock only for a tiny swap (ALTER TABLE ... RENAME). Views and grants
            follow the old table: recreate them in the swap. And end forgotten transactions on the
            server: idle_in_transaction_session_timeout, which any role may SET for its own
            sessions and an administrator may set per role.""",
                     "ALTER ROLE dashboards SET idle_in_transaction_session_timeout = '5min';",
                     lesson="A refresh that waits for its lock freezes every reader behind it: give it a "
                            "lock_timeout and a bounded retry, and take the lock only for a tiny swap.",
                     questions=(
                         "Which of your jobs take an ACCESS EXCLUSIVE lock (TRUNCATE, ALTER, DROP, "
                         "REINDEX), and what do they do while they wait for it?",
                         "Who on your server can leave a transaction open for an hour, and what ends "
                         "it?",
                         "How many refused attempts should page someone rather than retry?"))


if __name__ == "__main__":
    main()
