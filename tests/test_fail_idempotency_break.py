"""fail_idempotency_break.py: end to end on both targets, its negative controls and wrong
exercise solutions through the command line, plus its helpers on their own."""
from __future__ import annotations

import random
from decimal import Decimal

import psycopg2
import pytest
from psycopg2 import sql

from common import db
from common.fixes import source_of
from common.scenario import _REGISTRY
from conftest import (assert_every_slot_has_a_control, assert_gives_the_handout, assert_passed, grade, run_control,
                      run_script, write_solution)

import fail_idempotency_break as lab

SCRIPT = "fail_idempotency_break.py"
IDS = ["duplicate_detection", "partial_failure", "constraint_violation", "data_drift", "refresh_lock_queue"]


@pytest.fixture(scope="module")
def journal_run(target, tmp_path_factory):
    """One run of the script per target, shared by the end-to-end tests below."""
    name, env, params = target
    result = run_script(SCRIPT, env=env, tmp_path=tmp_path_factory.mktemp(f"idem-{name}"))
    return result, params


@pytest.fixture
def private_schema(target):
    """A connection into a private schema of its own on the target, dropped afterwards."""
    _, _, params = target
    admin = db.connect(params, autocommit=True)
    schema = f"{db.SCHEMA_PREFIX}{db.new_run_id()}_idemtest"
    db.create_schema(admin, schema)
    conn = db.connect(params, schema=schema)
    try:
        yield conn
    finally:
        conn.close()
        db.drop_schema(admin, schema)
        admin.close()


def measured(result, scenario_id: str) -> dict:
    return result.scenario(scenario_id)["measurements"]


def messages(result, scenario_id: str) -> list[str]:
    return [e["message"] for e in result.scenario(scenario_id)["observed_errors"]]


def first_extract(scenario_id: str, seed: int = 1) -> list[dict]:
    """The day-1 extract a scenario draws first from its own generator (the runner seeds it with
    "<seed>:<id>"; the script runs with the default --seed 1): figures computed apart from the run."""
    return lab.make_orders(random.Random(f"{seed}:{scenario_id}"))


def test_all_scenarios_pass_and_clean_up(journal_run):
    result, params = journal_run
    assert_passed(result, params, IDS)


def test_duplicate_detection_measures_each_cause(journal_run):
    result, _ = journal_run
    m = measured(result, "duplicate_detection")
    # the key cannot be added over duplicates; once repaired, a re-typed key is refused by the CHECK
    assert result.error_types("duplicate_detection") == ["psycopg2.errors.UniqueViolation",
                                                         "psycopg2.errors.CheckViolation"]
    assert result.sqlstates("duplicate_detection") == ["23505", "23514"]
    assert "canonical_ref" in messages(result, "duplicate_detection")[1]
    web_shop = sum(r["store_id"] is None for r in first_extract("duplicate_detection"))
    assert 0.1 * lab.ORDERS < web_shop < 0.3 * lab.ORDERS
    assert m["duplicates_surrogate_key"] == lab.ORDERS          # v1 holds every order twice
    assert m["duplicates_null_store"] == web_shop                 # every web-shop order (NULL store_id) twice
    assert m["duplicates_case_whitespace"] == lab.RETYPED
    assert m["duplicates_before"] == lab.ORDERS + web_shop + lab.RETYPED
    assert m["naive_rerun_inserted"] == 0                         # the repaired key stops even the naive load
    assert m["expected_rows"] == lab.ORDERS
    assert m["duplicates_after"] == 0 and m["rerun_rowcount"] == 0
    major = int(result.journal["database"]["server_version"].split(".")[0])
    expected_form = lab.unique_key_ddl(major * 10000).form
    assert m["constraint_form"] == expected_form
    assert m["server_version_num"] // 10000 == major
    recovery = result.scenario("duplicate_detection")["sections"]["recovery"]
    assert f"removed {lab.ORDERS} rows from orders_v1 and {web_shop + lab.RETYPED} from orders_v2" \
        in " ".join(recovery.split())                             # a sentence, not a dict


def test_partial_failure_commits_a_prefix_then_a_lost_connection_leaves_nothing(journal_run):
    result, _ = journal_run
    m = measured(result, "partial_failure")
    assert result.error_types("partial_failure") == ["psycopg2.errors.CheckViolation",
                                                     "psycopg2.OperationalError"]
    assert result.sqlstates("partial_failure") == ["23514"]
    assert "ORD-01234" in messages(result, "partial_failure")[0]    # stopped at line 1234
    assert m["committed_before_error"] == 1200
    assert m["rolled_back_in_open_batch"] == 33
    assert m["rows_after_lost_connection"] == 1200                 # the killed one-commit load left nothing
    assert m["staged_rowcount"] == lab.ORDERS - 1200              # the committed prefix is not written again
    assert m["quarantined"] == 2
    assert m["expected_rows"] == lab.ORDERS - 2
    assert m["duplicates_after"] == 0 and m["rerun_rowcount"] == 0


def test_constraint_violation_shows_each_sqlstate(journal_run):
    result, _ = journal_run
    m = measured(result, "constraint_violation")
    assert result.error_types("constraint_violation") == ["psycopg2.errors.CardinalityViolation",
                                                          "psycopg2.errors.UniqueViolation",
                                                          "psycopg2.errors.ForeignKeyViolation",
                                                          "psycopg2.OperationalError"]
    assert result.sqlstates("constraint_violation") == ["21000", "23505", "23503"]
    cardinality, invoice, customer, _ = messages(result, "constraint_violation")
    assert "cannot affect row a second time" in cardinality
    assert "orders_invoice_no_key" in invoice and "orders_customer_fkey" in customer
    assert m["rows_blocked"] == 3 * 20 + 2 + 1 + 1                # three deltas of 20 edits, plus their bad rows
    assert m["rejects"] == 2
    assert m["rows_written"] == m["rows_blocked"] - 2 - 1          # rejects and ORD-00007's older edit
    assert m["expected_rows"] == lab.ORDERS                       # 2,002 orders sent, 2 set aside
    assert m["duplicates_after"] == 0 and m["rerun_rowcount"] == 0
    recovery = " ".join(result.scenario("constraint_violation")["sections"]["recovery"].split())
    assert "(64 = 61 + 2 + 1)" in recovery                        # every figure reconciles on screen


def test_data_drift_measures_the_damage(journal_run):
    result, _ = journal_run
    m = measured(result, "data_drift")
    assert result.sqlstates("data_drift") == ["42601"]
    assert result.error_types("data_drift") == ["psycopg2.errors.SyntaxError"]
    assert "more expressions than target columns" in messages(result, "data_drift")[0]
    assert m["hash_key_extra_rows"] == 80 and m["hash_key_overcount"] > 0
    assert m["stale_rows"] == 80 and m["stale_total_gap"] > 0       # corrections only raise amounts here
    assert m["drift_changed_newer"] == 80
    assert m["unmapped_fields"] == ["currency"]
    assert m["upsert_rowcount"] == 80 + 40 + 100
    assert m["late_rows_skipped"] == 120 and m["late_replay_rowcount"] == 0
    assert m["expected_rows"] == lab.ORDERS + 100
    assert m["duplicates_after"] == 0 and m["rerun_rowcount"] == 0


HEADLINES = {  # the figure the summary shows for each scenario, as the journal gives it
    "duplicate_detection": {"name": "duplicates_before", "after": "0"},
    "partial_failure": {"name": "committed_before_error", "value": "1200"},
    "constraint_violation": {"name": "rows_blocked", "value": "64"},
    "data_drift": {"name": "hash_key_extra_rows", "value": "80"},
}




def test_each_scenario_gives_the_handout_its_headline_lesson_questions_and_notes(journal_run):
    result, _ = journal_run
    assert_gives_the_handout(result, HEADLINES)


# -- negative controls: the naive code back in each slot, under the same fault -------------------
CONTROLS = [
    ("duplicate_detection", "unique_key_ddl", "nothing inserted, web-shop orders included"),
    ("duplicate_detection", "stage", "re-typed keys land on their canonical orders"),
    ("partial_failure", "load_extract", "nothing of the interrupted load is visible"),
    ("constraint_violation", "load_delta", "delta 1 loads without an error"),
    ("data_drift", "upsert_from_staging", "exactly the 80 + 40 corrections"),
    ("data_drift", "as_values", "exactly the 80 + 40 corrections"),
]


@pytest.mark.parametrize("scenario_id, slot, claim", CONTROLS, ids=[f"{c[0]}-{c[1]}" for c in CONTROLS])
def test_negative_control_fails_with_the_claim_it_breaks(scenario_id, slot, claim, target, tmp_path):
    run_control(SCRIPT, scenario_id, slot, claim, target, tmp_path)


def test_every_slot_has_a_control():
    from test_refresh_lock_queue import CONTROLS as REFRESH_CONTROLS  # run in test_refresh_lock_queue.py

    assert_every_slot_has_a_control(SCRIPT, CONTROLS + REFRESH_CONTROLS)


def test_slot_code_fits_the_projector():
    """Prevention prints each slot's code indented by 6: every line fits in 80 columns."""
    for spec in _REGISTRY:
        if spec.fn.__module__ != lab.__name__:
            continue
        for f in spec.fixes:
            for fn in (f.naive, f.fixed):
                wide = [ln for ln in source_of(fn).splitlines() if len(ln) > 74]
                assert not wide, (fn.__name__, wide)
            assert len(f.hints) == 2, f.slot


# -- plausible wrong solutions, graded as a student runs them ------------------------------------
WRONG = {
    # a NULL-safe index, but ON CONFLICT still names the bare columns: no index matches them
    "index not named as the arbiter": ("duplicate_detection", '''
def unique_key_ddl(server_version_num, table="orders"):
    return BusinessKey(
        "unique index on (coalesce(store_id, 0), order_ref)",
        sql.SQL("CREATE UNIQUE INDEX {} ON {} ((coalesce(store_id, 0)), order_ref)").format(
            sql.Identifier(table + "_business_key"), sql.Identifier(table)),
        sql.SQL("(store_id, order_ref)"))
''', "re-typed keys land on their canonical orders"),
    # one transaction per chunk: the lost connection leaves the committed chunks behind
    "a load that commits per chunk": ("partial_failure", '''
def load_extract(conn, rows, key):
    changed = 0
    with conn.cursor() as cur:
        stage(cur, rows)
        for line in range(1, len(rows) + 1):
            try:
                changed += move(cur, key, line, line)
            except REFUSED as exc:
                cur.execute("INSERT INTO load_rejects SELECT order_ref, %s, %s FROM staging_orders "
                            "WHERE line = %s", (exc.pgcode, exc.diag.message_primary, line))
                changed += cur.rowcount
            if line % 100 == 0:
                conn.commit()
    conn.commit()
    return changed
''', "nothing of the interrupted load is visible"),
    # stage, validate and load, but a commit after each step: the rejects outlive the lost load
    "a commit per step": ("constraint_violation", '''
def load_delta(conn, rows, key):
    with conn.cursor() as cur:
        stage(cur, rows)
        cur.execute(UNKNOWN_CUSTOMER)
        cur.execute(INVOICE_OF_ANOTHER_ORDER)
        conn.commit()
        written = upsert_from_staging(cur, "orders", key)
    conn.commit()
    return written
''', "nothing of delta 2 is visible"),
    # DO UPDATE without "WHERE newer": corrections land, and a late replay undoes them
    "DO UPDATE without WHERE newer": ("data_drift", '''
def upsert_from_staging(cur, table, key, where=sql.SQL("true"), args=None):
    cur.execute(sql.SQL("""
        INSERT INTO {} (store_id, order_ref, customer_id, invoice_no, amount, updated_at)
        SELECT DISTINCT ON (store_id, order_ref) store_id, order_ref, customer_id, invoice_no,
               amount, updated_at
          FROM staging_orders WHERE {} ORDER BY store_id, order_ref, updated_at DESC
            ON CONFLICT {} DO UPDATE SET customer_id = excluded.customer_id,
               invoice_no = excluded.invoice_no, amount = excluded.amount,
               updated_at = excluded.updated_at""").format(
        sql.Identifier(table), where, key.conflict_target), args)
    return cur.rowcount
''', "the replay wrote nothing"),
}


@pytest.mark.parametrize("name", list(WRONG))
def test_a_wrong_solution_fails_with_the_claim_it_breaks(name, target, tmp_path):
    _, env, params = target
    scenario_id, code, claim = WRONG[name]
    write_solution(tmp_path, SCRIPT, scenario_id, code)
    result = grade(SCRIPT, scenario_id, tmp_path, env)
    record = result.scenario(scenario_id)
    assert result.returncode == 1 and record["mode"] == "exercise", result.stdout[-3000:]
    assert record["triggered"] is True and record["cleaned"] is True and record["recovered"] is False
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    assert any(claim in c for c in failed), failed
    assert "NOT YET" in result.stdout


# -- the version-dependent business key ----------------------------------------------------------
@pytest.mark.parametrize("version, form, marker", [
    (130000, "unique index on (coalesce(store_id, 0), order_ref)", "CREATE UNIQUE INDEX"),
    (140000, "unique index on (coalesce(store_id, 0), order_ref)", "CREATE UNIQUE INDEX"),
    (150000, "UNIQUE NULLS NOT DISTINCT", "UNIQUE NULLS NOT DISTINCT"),
    (180004, "UNIQUE NULLS NOT DISTINCT", "UNIQUE NULLS NOT DISTINCT"),
])
def test_unique_key_ddl_picks_the_form_the_server_supports(version, form, marker, embedded_params):
    key = lab.unique_key_ddl(version, "orders")
    assert key.form == form
    conn = db.connect(embedded_params)
    try:
        ddl, target = key.ddl.as_string(conn), key.conflict_target.as_string(conn)
    finally:
        conn.close()
    assert marker in ddl and '"orders_business_key"' in ddl
    assert ("coalesce" in target) == (version < 150000)
    assert ("store_id <> 0" in ddl) == (version < 150000)  # 0 stands for the web shop there


@pytest.mark.parametrize("version", [140000, 150000])
def test_each_key_form_rejects_a_second_null_store_row(version, private_schema):
    """Run both forms on the real server: a second (NULL, key) row is refused, ON CONFLICT with
    the form's conflict target updates the one row instead, and the pre-15 form refuses store 0."""
    conn = private_schema
    key = lab.unique_key_ddl(version, "orders")
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE orders (store_id integer, order_ref text NOT NULL, amount numeric)")
        cur.execute(key.ddl)
        cur.execute("INSERT INTO orders VALUES (NULL, 'ORD-00001', 1), (1, 'ORD-00001', 1)")
        cur.execute(sql.SQL("INSERT INTO orders VALUES (NULL, 'ORD-00001', 2) "
                            "ON CONFLICT {} DO UPDATE SET amount = excluded.amount").format(key.conflict_target))
        cur.execute("SELECT store_id, amount FROM orders ORDER BY store_id NULLS FIRST")
        assert cur.fetchall() == [(None, Decimal(2)), (1, Decimal(1))]
        cur.execute("SAVEPOINT s")
        with pytest.raises(psycopg2.errors.UniqueViolation):
            cur.execute("INSERT INTO orders VALUES (NULL, 'ORD-00001', 3)")
        cur.execute("ROLLBACK TO SAVEPOINT s")
        if version < 150000:
            with pytest.raises(psycopg2.errors.CheckViolation):
                cur.execute("INSERT INTO orders VALUES (0, 'ORD-00002', 1)")
    conn.rollback()


# -- what the drift query and the shape check say --------------------------------------------------
def test_drift_labels_say_what_happened(private_schema):
    conn = private_schema
    at = lab.DAY1
    target = [(1, "ORD-1", 5, "I1", Decimal(1), at), (1, "ORD-2", 5, "I2", Decimal(1), at),
              (1, "ORD-3", 5, "I3", Decimal(1), at), (1, "ORD-4", 5, "I4", Decimal(1), at)]
    staged = [(1, "ORD-1", 5, "I1", Decimal(1), at),                        # same content
              (1, "ORD-2", 5, "I2", Decimal(2), at + lab.timedelta(hours=1)),  # newer
              (1, "ORD-3", 5, "I3", Decimal(2), at),                        # same updated_at, other amount
              (1, "ORD-4", 5, "I4", Decimal(2), at - lab.timedelta(hours=1)),  # older
              (None, "ORD-5", 5, "I5", Decimal(1), at)]                     # new
    with conn.cursor() as cur:
        cur.execute(lab.SHARED_DDL)
        cur.execute(lab.ORDERS_DDL)
        cur.executemany("INSERT INTO orders VALUES (%s, %s, %s, %s, %s, %s)", target)
        cur.executemany("INSERT INTO staging_orders VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        [(n, *r) for n, r in enumerate(staged, 1)])
        cur.execute(lab.DRIFT)
        assert dict(cur.fetchall()) == {"unchanged": 1, "changed, newer": 1, "changed, same updated_at": 1,
                                        "changed, older (late)": 1, "new": 1}
    conn.rollback()


def test_shape_check_reads_columns_and_types_from_the_catalog(private_schema):
    conn = private_schema
    with conn.cursor() as cur:
        cur.execute(lab.ORDERS_DDL)
        cur.execute("ALTER TABLE orders DROP COLUMN invoice_no")
    conn.commit()
    row = {**lab.make_orders(random.Random(1), 1)[0], "store_id": 1, "currency": "EUR"}
    row["updated_at"] = row["updated_at"].replace(tzinfo=None)  # a local time where the table has timestamptz
    shape = {field: (needs, has) for field, needs, has in lab.shape_check(conn, [row])}
    assert shape["currency"] == ("text", "-")                     # a field the table lacks
    assert shape["invoice_no"] == ("text", "-")                   # a column the table lost
    assert shape["updated_at"] == ("timestamp without time zone", "timestamp with time zone")
    assert shape["amount"] == ("numeric", "numeric") and shape["store_id"] == ("integer", "integer")


# -- the fixture data ----------------------------------------------------------------------------
def test_extracts_are_deterministic_and_corrections_really_change():
    day1 = lab.make_orders(random.Random(7), 300)
    assert day1 == lab.make_orders(random.Random(7), 300)
    day2 = lab.resend(random.Random(8), day1, corrections=25)
    changed = [(a, b) for a, b in zip(day1, day2) if a != b]
    assert len(changed) == 25
    assert all(b["amount"] != a["amount"] and b["updated_at"] > a["updated_at"] for a, b in changed)
    assert all(a["amount"] == a["amount"].quantize(Decimal("0.01")) for a in day1)


def test_retype_keys_touches_only_store_orders_and_stays_canonically_equal():
    day1 = lab.make_orders(random.Random(3), 300)
    retyped = lab.retype_keys(random.Random(4), day1, 20)
    differ = [(a, b) for a, b in zip(day1, retyped) if a["order_ref"] != b["order_ref"]]
    assert len(differ) == 20
    assert all(a["store_id"] is not None and b["order_ref"].strip().upper() == a["order_ref"] for a, b in differ)


def test_as_values_maps_columns_by_name_and_the_naive_map_by_position():
    row = {**lab.make_orders(random.Random(1), 1)[0], "currency": "EUR"}
    in_insert_order = (row["store_id"], row["order_ref"], row["customer_id"], row["invoice_no"],
                       row["amount"], row["updated_at"])
    assert lab.as_values([row]) == [in_insert_order]                   # extra field ignored
    assert lab.as_values([dict(reversed(row.items()))]) == [in_insert_order]  # by name, not by position
    assert lab.as_values_naive([row]) == [(*in_insert_order, "EUR")]   # the naive map takes it along
    del row["amount"]
    with pytest.raises(KeyError):
        lab.as_values([row])  # a missing field is loud
