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

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg2
from psycopg2 import sql
from psycopg2.extras import execute_values

from common import db, main, scenario

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
    """The explicit column map: extract field -> target column, by name. A missing field is a
    KeyError; an extra field is not loaded."""
    return [tuple(r[c] for c in ORDER_COLUMNS) for r in rows]


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


def unique_key_ddl(server_version_num: int, table: str = "orders") -> BusinessKey:
    """(store_id, order_ref) unique, with every NULL store_id counted as one store: the web shop.
    A plain UNIQUE treats NULLs as distinct, so it never stops a second web-shop row."""
    name, tbl = sql.Identifier(f"{table}_business_key"), sql.Identifier(table)
    if server_version_num >= 150000:  # PostgreSQL 15 added NULLS NOT DISTINCT
        return BusinessKey(
            "UNIQUE NULLS NOT DISTINCT",
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE NULLS NOT DISTINCT (store_id, order_ref)")
            .format(tbl, name),
            sql.SQL("(store_id, order_ref)"))
    # Before 15: index an expression that is never NULL (no store has id 0).
    return BusinessKey(
        "unique index on (coalesce(store_id, 0), order_ref)",
        sql.SQL("CREATE UNIQUE INDEX {} ON {} ((coalesce(store_id, 0)), order_ref)").format(name, tbl),
        sql.SQL("((coalesce(store_id, 0)), order_ref)"))


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
def stage(cur, rows: list[dict]) -> None:
    """Land the extract as it came, then canonicalize the business key once, here at the door."""
    cur.execute("TRUNCATE staging_orders")
    execute_values(cur, "INSERT INTO staging_orders (line, store_id, order_ref, customer_id, invoice_no, "
                        "amount, updated_at) VALUES %s",
                   [(n, *values) for n, values in enumerate(as_values(rows), 1)], page_size=PAGE)
    cur.execute("UPDATE staging_orders SET order_ref = upper(btrim(order_ref)) "
                "WHERE order_ref <> upper(btrim(order_ref))")


def upsert_from_staging(cur, table: str, key: BusinessKey, where: sql.Composable = sql.SQL("true"),
                        args: tuple | None = None) -> int:
    """The newest version of each key wins: in the batch (DISTINCT ON) and against the table
    (WHERE). Returns the rows really written: an older or equal version writes nothing."""
    cur.execute(sql.SQL("""
        INSERT INTO {table} AS t (store_id, order_ref, customer_id, invoice_no, amount, updated_at)
        SELECT DISTINCT ON (store_id, order_ref)
               store_id, order_ref, customer_id, invoice_no, amount, updated_at
          FROM staging_orders WHERE {where}
         ORDER BY store_id, order_ref, updated_at DESC
            ON CONFLICT {key} DO UPDATE
           SET customer_id = excluded.customer_id, invoice_no = excluded.invoice_no,
               amount = excluded.amount, updated_at = excluded.updated_at
         WHERE excluded.updated_at > t.updated_at""").format(
        table=sql.Identifier(table), where=where, key=key.conflict_target), args)
    return cur.rowcount


def load_upsert(conn, rows: list[dict], key: BusinessKey, table: str = "orders") -> int:
    """Stage, then upsert on the business key: one transaction, one commit."""
    with conn.cursor() as cur:
        stage(cur, rows)
        changed = upsert_from_staging(cur, table, key)
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


def prove_idempotent(s, rerun, tables: tuple[str, ...] = ("orders",)) -> None:
    """The proof every scenario ends with: each target equals expected_orders (count, sum,
    checksum), holds no duplicate business key, and running the fixed load again (`rerun`,
    which returns the rows it wrote) changes zero rows and leaves the checksum as it was."""
    want = snapshot(s.conn, "expected_orders")
    before = {t: snapshot(s.conn, t) for t in tables}
    changed = rerun()
    after = {t: snapshot(s.conn, t) for t in tables}
    s.table(["relation", "rows", "sum(amount)", "checksum", "duplicate keys"],
            [(name, snap[0], snap[1], snap[2][:12], snap[3]) for name, snap in
             [("expected_orders", want), *before.items()]])
    s.measure("expected_rows", want[0])
    s.measure("expected_total", float(want[1]))
    s.recovered_if(all(before[t][:3] == want[:3] for t in tables),
                   "target equals the newest source version of every order: count, sum and checksum")
    s.measure("duplicates_after", sum(before[t][3] for t in tables))
    s.recovered_if(all(before[t][3] == 0 for t in tables), "no business key appears twice")
    s.measure("rerun_rowcount", changed, "the fixed load, over every extract already loaded")
    s.recovered_if(changed == 0 and after == before, "the re-run changed 0 rows; checksum unchanged")


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


def repair_duplicates(conn, table: str, key: BusinessKey) -> int:
    """One transaction: keep the newest row per canonical business key (updated_at, then the
    later id), canonicalize the keys, then let the server enforce the right key. Returns rows removed."""
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


@scenario("duplicate_detection", "Duplicates get in although the load uses ON CONFLICT")
def duplicate_detection(s):
    setup(s, V1_V2_DDL, orders=False)
    s.description("""
        The daily order load must survive a re-run: the source re-sends, the scheduler retries.
        Business key: (store_id, order_ref); store_id is NULL for web-shop orders. Two versions of
        the target, both "protected" by ON CONFLICT:
          orders_v1  id serial PRIMARY KEY, and the load says ON CONFLICT DO NOTHING
          orders_v2  UNIQUE (store_id, order_ref), and the load says ON CONFLICT (store_id, order_ref)""")
    day1 = arrive(s, make_orders(s.rng))
    day2 = arrive(s, retype_keys(s.rng, resend(s.rng, day1, corrections=40), RETYPED))
    web_ref = next(r["order_ref"] for r in day1 if r["store_id"] is None)  # real examples, for the text
    retyped_ref = next(b["order_ref"] for a, b in zip(day1, day2) if a["order_ref"] != b["order_ref"])
    s.trigger(f"""
        Load day 1 ({ORDERS} orders, about {WEB_SHARE:.0%} from the web shop), then the CRM's re-export of
        the same day (40 orders corrected since, {RETYPED} keys re-typed like {retyped_ref!r}) into both.""")
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
    s.table(["cause", "table", "business keys held twice"], [
        ("surrogate key: ON CONFLICT only sees the serial id", "orders_v1", surrogate),
        ("nullable key column: NULL store_id rows never conflict", "orders_v2", null_store),
        (f"case or whitespace: {retyped_ref!r} is another key", "orders_v2", spelling)])
    s.measure("duplicates_surrogate_key", surrogate)
    s.measure("duplicates_null_store", null_store)
    s.measure("duplicates_case_whitespace", spelling)
    s.measure("duplicates_before", surrogate + null_store + spelling)
    s.triggered_if(surrogate == ORDERS, f"orders_v1 holds every one of the {ORDERS} orders twice")
    s.triggered_if(null_store == web_shop, f"orders_v2 holds every one of the {web_shop} web-shop orders twice")
    s.triggered_if(spelling == RETYPED, f"orders_v2 holds each of the {RETYPED} re-typed store orders twice")
    s.root_cause(f"""
        ON CONFLICT only reacts to a conflict on a unique index. A serial id is new on every insert, so
        it never conflicts; a UNIQUE constraint treats NULLs as distinct, so (NULL, {web_ref!r}) is
        new every time; and a key compared byte for byte makes {retyped_ref!r} a different order. The
        load was idempotent only for the key the index enforces, not for the business key.""",
                 detect=DUPLICATE_KEYS.format(table="orders_v2"))
    key_form = unique_key_ddl(s.server_version_num).form
    with s.step("Remove duplicates in one transaction (keep the newest by updated_at), canonicalize "
                "the keys, add the right key") as st:
        removed = {t: repair_duplicates(s.conn, t, unique_key_ddl(s.server_version_num, t))
                   for t in ("orders_v1", "orders_v2")}
        st.result = f"removed {removed}; key form: {key_form} (server_version_num {s.server_version_num})"
    s.measure("constraint_form", key_form)
    s.measure("server_version_num", s.server_version_num)

    with s.step("Re-run the naive v1 load of day 1 against the repaired orders_v1") as st:
        inserted = s.measure("naive_rerun_inserted", load_v1_naive(s.conn, day1))
        st.result = f"{inserted} rows inserted"
    s.recovered_if(inserted == 0, "the same ON CONFLICT DO NOTHING now meets the business key: nothing "
                                  "inserted, web-shop orders included")
    s.say("And day 2, with its re-typed keys:")
    with s.expect(psycopg2.errors.CheckViolation, sqlstate="23514"):
        load_v1_naive(s.conn, day2)  # a re-typed key is refused by the CHECK, not stored as a new order
    s.conn.rollback()

    def rerun() -> int:  # the fixed load over both extracts, into both tables
        return sum(load_upsert(s.conn, e, unique_key_ddl(s.server_version_num, t), t)
                   for t in ("orders_v1", "orders_v2") for e in (day1, day2))
    prove_idempotent(s, rerun, ("orders_v1", "orders_v2"))
    s.prevention("""
        Make the unique index the business key, NULL-safe and canonical, and name it as the arbiter.
        Canonicalize keys once, at the door (stage), and let a CHECK refuse any other spelling.""",
                 unique_key_ddl, stage, upsert_from_staging)


# == 2. partial_failure ==========================================================================
COMMIT_EVERY = 100
BAD_LINES = {1234: Decimal("-19.99"),        # a refund sent as a negative order: CHECK (amount >= 0)
             1500: Decimal("250000000.00"),  # an order in rupiah: numeric(10, 2) overflows
             1800: Decimal("-5.00")}         # another negative amount, further down


def with_bad_rows(rows: list[dict]) -> list[dict]:
    return [{**r, "amount": BAD_LINES.get(n, r["amount"])} for n, r in enumerate(rows, 1)]


def load_naive_batches(conn, rows: list[dict], every: int = COMMIT_EVERY) -> None:
    """Row by row, a commit every `every` rows, plain INSERT: written for a run that never fails."""
    with conn.cursor() as cur:
        for n, values in enumerate(as_values(rows), 1):
            cur.execute("INSERT INTO orders (store_id, order_ref, customer_id, invoice_no, amount, updated_at) "
                        "VALUES (%s, %s, %s, %s, %s, %s)", values)
            if n % every == 0:
                conn.commit()
    conn.commit()


CHUNK = 100  # rows moved per savepoint; a chunk the target refuses is retried row by row
REFUSED = (psycopg2.DataError, psycopg2.IntegrityError)  # what the target can refuse a row for


def move(cur, key: BusinessKey, first: int, last: int) -> int:
    """Upsert staging lines first..last under a savepoint: refused, they leave no trace and the
    transaction goes on."""
    cur.execute("SAVEPOINT move")
    try:
        written = upsert_from_staging(cur, "orders", key, sql.SQL("line BETWEEN %s AND %s"), (first, last))
    except REFUSED:
        cur.execute("ROLLBACK TO SAVEPOINT move; RELEASE SAVEPOINT move")
        raise
    cur.execute("RELEASE SAVEPOINT move")
    return written


def load_staged(conn, rows: list[dict], key: BusinessKey) -> int:
    """One transaction: stage the extract, move it chunk by chunk, commit once. In a chunk the
    target refuses, each row gets its own savepoint; a refused row goes to load_rejects with the
    server's error. Returns rows written, rejects included."""
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
                        cur.execute("INSERT INTO load_rejects (order_ref, sqlstate, reason) "
                                    "SELECT order_ref, %s, %s FROM staging_orders WHERE line = %s "
                                    "ON CONFLICT (order_ref) DO NOTHING",
                                    (exc.pgcode, exc.diag.message_primary, line))
                        changed += cur.rowcount
    conn.commit()
    return changed


@scenario("partial_failure", "A load that commits as it goes stops halfway")
def partial_failure(s):
    key = setup(s)
    extract = arrive(s, with_bad_rows(make_orders(s.rng)))
    s.description(f"""
        The load inserts {ORDERS} orders row by row and commits every {COMMIT_EVERY} rows, "so a failure
        loses little". The target refuses negative amounts (CHECK) and amounts of 10^8 or more
        (numeric(10, 2)). Lines {sorted(BAD_LINES)} of today's extract carry such amounts.""")
    s.trigger("Run the load. The first bad row (line 1234, amount -19.99) stops it.")
    with s.expect(psycopg2.errors.CheckViolation, sqlstate="23514"):
        load_naive_batches(s.conn, extract)
    s.conn.rollback()
    first_bad = min(BAD_LINES)
    committed = s.measure("committed_before_error", count(s.conn, "orders"))
    s.measure("rolled_back_in_open_batch", first_bad - 1 - committed,
              f"good rows {committed + 1}..{first_bad - 1}, lost with the open batch")
    every_full_batch = (first_bad - 1) // COMMIT_EVERY * COMMIT_EVERY
    s.triggered_if(committed == every_full_batch,
                   f"{committed} of {ORDERS} rows are in: every batch of {COMMIT_EVERY} committed before "
                   f"line {first_bad} stays, the target is half loaded")
    fixed = arrive(s, [{**r, "amount": -r["amount"], "updated_at": r["updated_at"] + timedelta(hours=1)}
                       if n == first_bad else r for n, r in enumerate(extract, 1)])  # the sign fixed
    s.say(f"The source corrects line {first_bad} and the operator simply runs the job again:")
    with s.expect(psycopg2.errors.UniqueViolation, sqlstate="23505") as caught:
        load_naive_batches(s.conn, fixed)
    s.conn.rollback()
    first_ref = fixed[0]["order_ref"]
    detail = (caught.exc.diag.message_detail or "") if caught.exc else ""  # Key (...)=(null, ORD-00001) ...
    s.triggered_if(f"{first_ref})" in detail,
                   f"the naive re-run fails on line 1 ({first_ref}), a row the first run committed")
    s.triggered_if(s.measure("rows_after_naive_rerun", count(s.conn, "orders")) == committed,
                   f"and adds nothing: still {committed} rows")
    s.root_cause("""
        The commit boundary (every 100 rows) is not the unit of work (the extract), so a failure
        leaves a prefix behind, and nothing records where it stopped. A plain INSERT assumes a first
        run, so the re-run collides with that prefix. Fixing the row you saw does not fix the rows
        the load never reached: lines 1500 and 1800 are still bad.""",
                 detect="SELECT count(*) FROM orders;  -- vs the extract's row count, after every run")
    with s.step("Load the corrected extract through staging: one transaction, a savepoint per chunk "
                "(per row where a chunk is refused), refused rows into load_rejects") as st:
        written = s.measure("staged_rowcount", load_staged(s.conn, fixed, key))
        st.result = f"{written} rows written, rejects included; one commit"
    s.recovered_if(written == ORDERS - committed,
                   f"the {committed} committed rows were skipped, not written again: "
                   f"{written} = {ORDERS} - {committed}")
    with s.step("Read load_rejects: the rows set aside, with the server's error") as st:
        rejects = show_rejects(s)
        st.result = f"{s.measure('quarantined', len(rejects))} rows quarantined"
    s.recovered_if({r[:2] for r in rejects} == {("ORD-01500", "22003"), ("ORD-01800", "23514")},
                   "load_rejects names exactly lines 1500 (22003) and 1800 (23514)")
    prove_idempotent(s, lambda: load_staged(s.conn, fixed, key))
    s.prevention("""
        Make the transaction the unit of work: stage the extract, move it in one transaction, commit
        once. Set refused rows aside with the server's error (a savepoint per chunk, per row inside
        a refused chunk; or validate before the load), and upsert, so a re-run is always safe.""",
                 move, load_staged)


# == 3. constraint_violation =====================================================================
CONSTRAINTS_DDL = """
    CREATE TABLE customers (customer_id integer PRIMARY KEY);
    INSERT INTO customers SELECT generate_series(1, {customers});
    ALTER TABLE orders
        ADD CONSTRAINT orders_invoice_no_key UNIQUE (invoice_no),         -- a second unique key
        ADD CONSTRAINT orders_customer_fkey FOREIGN KEY (customer_id) REFERENCES customers"""

# Validation in staging, before the upsert: each moves the rows the target would refuse into
# load_rejects, with the SQLSTATE it would have raised.
UNKNOWN_CUSTOMER = """
    WITH bad AS (DELETE FROM staging_orders s
                  WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.customer_id = s.customer_id)
              RETURNING s.order_ref, s.customer_id)
    INSERT INTO load_rejects (order_ref, sqlstate, reason)
    SELECT order_ref, '23503', 'customer_id ' || customer_id || ' is not in customers' FROM bad
    ON CONFLICT (order_ref) DO NOTHING"""
INVOICE_OF_ANOTHER_ORDER = """
    WITH bad AS (DELETE FROM staging_orders s USING orders o
                  WHERE o.invoice_no = s.invoice_no AND (o.store_id, o.order_ref) IS DISTINCT FROM (s.store_id, s.order_ref)
              RETURNING s.order_ref, s.invoice_no, o.order_ref AS owner)
    INSERT INTO load_rejects (order_ref, sqlstate, reason)
    SELECT order_ref, '23505', 'invoice_no ' || invoice_no || ' belongs to ' || owner FROM bad
    ON CONFLICT (order_ref) DO NOTHING"""


def load_upsert_naive(conn, rows: list[dict], key: BusinessKey) -> None:
    """One INSERT ... ON CONFLICT (business key) DO UPDATE over the batch, as it came."""
    with conn.cursor() as cur:
        execute_values(cur, sql.SQL("""
            INSERT INTO orders (store_id, order_ref, customer_id, invoice_no, amount, updated_at)
            VALUES %s ON CONFLICT {key} DO UPDATE
               SET customer_id = excluded.customer_id, invoice_no = excluded.invoice_no,
                   amount = excluded.amount, updated_at = excluded.updated_at""").format(key=key.conflict_target),
                       as_values(rows), page_size=PAGE)
    conn.commit()


def load_checked(conn, rows: list[dict], key: BusinessKey) -> int:
    """Stage, set aside what the target would refuse, upsert the rest (newest per key): one
    transaction. Returns rows written, rejects included."""
    with conn.cursor() as cur:
        stage(cur, rows)
        cur.execute(UNKNOWN_CUSTOMER)           # the foreign key, checked on purpose
        changed = cur.rowcount
        cur.execute(INVOICE_OF_ANOTHER_ORDER)   # the second unique key, decided on purpose
        changed += cur.rowcount
        changed += upsert_from_staging(cur, "orders", key)   # DISTINCT ON: one row per key
    conn.commit()
    return changed


@scenario("constraint_violation", "Errors that ON CONFLICT does not cover")
def constraint_violation(s):
    key = setup(s, sql.SQL(CONSTRAINTS_DDL).format(customers=sql.Literal(CUSTOMERS)))
    s.description(f"""
        orders is keyed by (store_id, order_ref) and loaded by one INSERT ... ON CONFLICT DO UPDATE
        per batch. It also has a second unique key (invoice_no) and a foreign key to customers.
        The day's {ORDERS} orders load fine: the naive upsert passes every test on clean data.""")
    base = arrive(s, make_orders(s.rng))
    load_upsert_naive(s.conn, base, key)
    before = snapshot(s.conn, "orders")
    s.require(before[0] == ORDERS, f"the naive upsert loaded the day's {ORDERS} orders")

    def delta(hour: int, *extra: dict) -> list[dict]:  # an hourly API delta: 20 edited orders + extra rows
        return arrive(s, [edit(s.rng, r, timedelta(hours=hour)) for r in s.rng.sample(base[10:], 20)] + list(extra))
    order7 = base[6]
    deltas = [
        delta(1, edit(s.rng, order7, timedelta(hours=1, minutes=5)),    # ORD-00007 edited twice in the hour
              edit(s.rng, order7, timedelta(hours=1, minutes=40))),
        delta(2, {**make_orders(s.rng, 1, ORDERS + 1, DAY1 + timedelta(hours=2))[0],
                  "invoice_no": base[41]["invoice_no"]}),               # re-booked: ORD-00042's invoice
        delta(3, {**make_orders(s.rng, 1, ORDERS + 2, DAY1 + timedelta(hours=3))[0],
                  "customer_id": 9999})]                                # a customer not synced yet
    s.trigger("""
        Three hourly deltas of about 20 edited orders arrive, each with one row ON CONFLICT was never
        asked about: ORD-00007 twice in one batch; a re-booked order ORD-02001 carrying ORD-00042's
        invoice number; an order ORD-02002 for customer 9999, not synced yet.""")
    for batch, error, state in zip(deltas, (psycopg2.errors.CardinalityViolation, psycopg2.errors.UniqueViolation,
                                            psycopg2.errors.ForeignKeyViolation), ("21000", "23505", "23503")):
        with s.expect(error, sqlstate=state):
            load_upsert_naive(s.conn, batch, key)
        s.conn.rollback()
    s.measure("rows_blocked", sum(len(d) for d in deltas), "rows in the three deltas: one bad row stops its batch")
    s.triggered_if(snapshot(s.conn, "orders") == before, "none of the three deltas was written")
    s.root_cause("""
        ON CONFLICT handles one thing: a conflict on its arbiter index, with a row already in the
        table. A key twice in the same statement would be updated twice (21000). A conflict on any
        other unique index is a plain error (23505). Foreign keys and CHECKs are not conflicts at
        all (23503 here; 23514 in partial_failure). One such row fails the whole statement, and the
        batch's good rows wait.""",
                 detect="SELECT store_id, order_ref, count(*) FROM staging_orders GROUP BY 1, 2 "
                        "HAVING count(*) > 1;")
    with s.step("Load each delta with load_checked: dedupe (newest first), set aside the second-key "
                "and foreign-key cases, upsert the rest") as st:
        written = sum(load_checked(s.conn, d, key) for d in deltas)
        st.result = f"{written} rows written (rejects included), no error"
    rejects = show_rejects(s)
    s.measure("rejects", len(rejects))
    s.recovered_if({r[:2] for r in rejects} == {("ORD-02001", "23505"), ("ORD-02002", "23503")},
                   "the re-booked order and the unknown customer are set aside, with the reason")
    newest7 = deltas[0][-1]  # the later of ORD-00007's two edits in the first delta
    held7 = db.rows(s.conn, "SELECT amount, updated_at FROM orders WHERE order_ref = %s", (newest7["order_ref"],))
    s.recovered_if(held7 == [(newest7["amount"], newest7["updated_at"])],
                   f"ORD-00007 holds its newest version ({newest7['amount']}, {newest7['updated_at']:%H:%M})")
    prove_idempotent(s, lambda: sum(load_checked(s.conn, e, key) for e in [base, *deltas]))
    s.prevention("""
        Never hand the server a batch it can refuse: dedupe it on the key (DISTINCT ON, newest first),
        validate references in staging, and decide what a clash on any other unique key means.""",
                 load_checked, INVOICE_OF_ANOTHER_ORDER)


# == 4. data_drift ===============================================================================
HASH_DDL = """
    CREATE TABLE orders_by_hash (   -- idempotency key: a hash of the whole row
        row_hash text PRIMARY KEY, store_id integer, order_ref text NOT NULL, customer_id integer NOT NULL,
        invoice_no text NOT NULL, amount numeric(10, 2) NOT NULL, updated_at timestamptz NOT NULL)"""

# Drift between an extract (staged) and the target, by comparing row hashes per business key.
DRIFT = """
    SELECT CASE WHEN t.order_ref IS NULL THEN 'new'
                WHEN md5(row(s.customer_id, s.invoice_no, s.amount)::text)
                   = md5(row(t.customer_id, t.invoice_no, t.amount)::text) THEN 'unchanged'
                WHEN s.updated_at > t.updated_at THEN 'changed, newer'
                ELSE 'changed, older (late)' END AS drift, count(*)
      FROM staging_orders s
      LEFT JOIN orders t ON t.order_ref = s.order_ref AND t.store_id IS NOT DISTINCT FROM s.store_id
     GROUP BY 1 ORDER BY 1"""


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


def load_by_header_naive(conn, rows: list[dict], key: BusinessKey) -> None:
    """Columns taken from the extract's own field names; ON CONFLICT DO NOTHING keeps what is there."""
    columns = sql.SQL(", ").join(map(sql.Identifier, rows[0]))
    with conn.cursor() as cur:
        execute_values(cur, sql.SQL("INSERT INTO orders ({}) VALUES %s ON CONFLICT {} DO NOTHING").format(
            columns, key.conflict_target), [tuple(r.values()) for r in rows], page_size=PAGE)
    conn.commit()


def detect_drift(conn, rows: list[dict]) -> dict[str, int]:
    """Stage the extract and count new / unchanged / changed rows against the target; writes nothing."""
    with conn.cursor() as cur:
        stage(cur, rows)
        cur.execute(DRIFT)
        drift = dict(cur.fetchall())
    conn.rollback()
    return drift


@scenario("data_drift", "The source re-sends records that changed")
def data_drift(s):
    key = setup(s, HASH_DDL)
    fixes, late_fixes, new_orders = 80, 40, 100  # corrections on day 2, corrections and new orders on day 3
    s.description("""
        Every day the source re-sends the orders it knows, corrected ones with a newer updated_at.
        Three loads that "cannot duplicate": a row-hash idempotency key (orders_by_hash), ON CONFLICT
        (business key) DO NOTHING (orders), and a column list taken from the extract's header.""")
    s.trigger(f"""
        Day 1: {ORDERS} orders. Day 2: the same {ORDERS}, {fixes} corrected. Day 3: {new_orders} new orders
        and {late_fixes} corrections, and the extract now carries a field the table lacks: currency.""")
    day1 = arrive(s, make_orders(s.rng))
    day2 = arrive(s, resend(s.rng, day1, corrections=fixes))
    for extract in (day1, day2):
        load_by_hash_naive(s.conn, extract)
        load_by_header_naive(s.conn, extract, key)
    corrected = {a["order_ref"] for a, b in zip(day1, day2) if a != b}
    later = [edit(s.rng, r, timedelta(days=2)) for r in s.rng.sample(
        [r for r in day1 if r["order_ref"] not in corrected], late_fixes)]
    corrected |= {r["order_ref"] for r in later}
    day3 = [{**r, "currency": "EUR"}
            for r in later + make_orders(s.rng, new_orders, ORDERS + 1, DAY1 + timedelta(days=2))]
    with s.expect(psycopg2.errors.UndefinedColumn, sqlstate="42703"):
        load_by_header_naive(s.conn, day3, key)  # day 3 breaks the INSERT itself
    s.conn.rollback()
    s.say("Days 1 and 2 'succeeded'. Measured against the source:")
    hashed_extra = s.measure("hash_key_extra_rows",
                             count(s.conn, "orders_by_hash") - count(s.conn, "expected_orders"),
                             "orders_by_hash: corrected orders stored twice")
    overcount = s.measure("hash_key_overcount",
                          float(total(s.conn, "orders_by_hash") - total(s.conn, "expected_orders")),
                          "orders_by_hash: sum(amount) above the source")
    stale = s.measure("stale_rows", db.scalar(s.conn, "SELECT count(*) FROM orders o JOIN expected_orders e "
                                                      "USING (order_ref) WHERE o.amount <> e.amount"),
                      "orders: corrections silently ignored by DO NOTHING")
    stale_gap = s.measure("stale_total_gap", float(total(s.conn, "expected_orders") - total(s.conn, "orders")),
                          "orders: sum(amount) below the source")
    s.triggered_if(hashed_extra == fixes and overcount > 0,
                   f"the hash key stores each of the {fixes} corrected orders twice: the total is too high")
    s.triggered_if(stale == fixes and stale_gap > 0,
                   f"DO NOTHING keeps {fixes} stale amounts: the total is too low")
    arrive(s, day3)  # recorded as the source's only now, so the figures above compare days 1 and 2
    s.root_cause("""
        A row hash identifies a version, not an order: a correction is a new hash, so it is stored
        next to the old one. DO NOTHING makes a re-send harmless by ignoring it, corrections
        included. And a column list derived from the extract lets the source change the INSERT.
        Detect it by reconciling against the source: by key, by row hash, by total.""", detect=DRIFT)
    with s.step("Detect drift on day 2: compare row hashes by business key") as st:
        drift = detect_drift(s.conn, day2)
        s.table(["drift", "rows"], sorted(drift.items()))
        st.result = f"{s.measure('drift_changed_newer', drift.get('changed, newer', 0))} rows changed since loaded"
    s.recovered_if(drift == {"changed, newer": fixes, "unchanged": ORDERS - fixes},
                   f"the drift query finds exactly the {fixes} corrected orders, and nothing else")
    with s.step("Load days 2 and 3 with load_upsert: business key, explicit columns, newest wins") as st:
        written = sum(load_upsert(s.conn, e, key) for e in (day2, day3))
        unmapped = sorted(set().union(*day3) - set(ORDER_COLUMNS))
        s.measure("unmapped_fields", unmapped, "in the extract, not in the map: not loaded; add them on purpose")
        st.result = f"{s.measure('upsert_rowcount', written)} rows written"
    s.recovered_if(written == fixes + late_fixes + new_orders,
                   f"exactly the {fixes} + {late_fixes} corrections and the {new_orders} new orders were written")
    with s.step("A late replay of day 1 arrives: older versions must not overwrite newer ones") as st:
        late = s.measure("late_rows_skipped", detect_drift(s.conn, day1).get("changed, older (late)", 0))
        replay = s.measure("late_replay_rowcount", load_upsert(s.conn, day1, key))
        st.result = f"{late} older versions seen, {replay} rows written"
    s.recovered_if(late == len(corrected) and replay == 0,
                   f"WHERE excluded.updated_at > t.updated_at kept all {len(corrected)} newer versions")
    prove_idempotent(s, lambda: sum(load_upsert(s.conn, e, key) for e in (day1, day2, day3)))
    s.prevention("""
        Key on the business key, never on the row's content. Upsert with DO UPDATE ... WHERE
        excluded.updated_at > t.updated_at, so corrections land and late replays do not undo them.
        Map columns explicitly (as_values), and reconcile by row hash to see drift.""",
                 as_values, upsert_from_staging)


if __name__ == "__main__":
    main()
