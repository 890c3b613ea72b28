"""fail_idempotency_break.py: end to end on both targets, plus its helpers on their own."""
from __future__ import annotations

import random
from decimal import Decimal

import psycopg2
import pytest
from psycopg2 import sql

from common import db
from conftest import assert_passed, run_script

import fail_idempotency_break as lab

SCRIPT = "fail_idempotency_break.py"
IDS = ["duplicate_detection", "partial_failure", "constraint_violation", "data_drift"]


@pytest.fixture(scope="module")
def journal_run(target, tmp_path_factory):
    """One run of the script per target, shared by the end-to-end tests below."""
    name, env, params = target
    result = run_script(SCRIPT, env=env, tmp_path=tmp_path_factory.mktemp(f"idem-{name}"))
    return result, params


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


def test_partial_failure_commits_a_prefix_then_recovers(journal_run):
    result, _ = journal_run
    m = measured(result, "partial_failure")
    assert result.error_types("partial_failure") == ["psycopg2.errors.CheckViolation",
                                                     "psycopg2.errors.UniqueViolation"]
    assert result.sqlstates("partial_failure") == ["23514", "23505"]
    first_error, rerun_error = messages(result, "partial_failure")
    assert "ORD-01234" in first_error and "ORD-00001" in rerun_error  # stopped at line 1234; re-run at line 1
    assert m["committed_before_error"] == 1200 == m["rows_after_naive_rerun"]
    assert m["rolled_back_in_open_batch"] == 33
    assert m["staged_rowcount"] == lab.ORDERS - 1200              # the committed prefix is not written again
    assert m["quarantined"] == 2
    assert m["expected_rows"] == lab.ORDERS - 2
    assert m["duplicates_after"] == 0 and m["rerun_rowcount"] == 0


def test_constraint_violation_shows_each_sqlstate(journal_run):
    result, _ = journal_run
    m = measured(result, "constraint_violation")
    assert result.error_types("constraint_violation") == ["psycopg2.errors.CardinalityViolation",
                                                          "psycopg2.errors.UniqueViolation",
                                                          "psycopg2.errors.ForeignKeyViolation"]
    assert result.sqlstates("constraint_violation") == ["21000", "23505", "23503"]
    cardinality, invoice, customer = messages(result, "constraint_violation")
    assert "cannot affect row a second time" in cardinality
    assert "orders_invoice_no_key" in invoice and "orders_customer_fkey" in customer
    assert m["rows_blocked"] == 3 * 20 + 2 + 1 + 1                # three deltas of 20 edits, plus their bad rows
    assert m["rejects"] == 2
    assert m["expected_rows"] == lab.ORDERS                       # 2,002 orders sent, 2 set aside
    assert m["duplicates_after"] == 0 and m["rerun_rowcount"] == 0


def test_data_drift_measures_the_damage(journal_run):
    result, _ = journal_run
    m = measured(result, "data_drift")
    assert result.sqlstates("data_drift") == ["42703"]
    assert result.error_types("data_drift") == ["psycopg2.errors.UndefinedColumn"]
    assert 'column "currency"' in messages(result, "data_drift")[0]
    assert m["hash_key_extra_rows"] == 80 and m["hash_key_overcount"] > 0
    assert m["stale_rows"] == 80 and m["stale_total_gap"] > 0       # corrections only raise amounts here
    assert m["drift_changed_newer"] == 80
    assert m["unmapped_fields"] == ["currency"]
    assert m["upsert_rowcount"] == 80 + 40 + 100
    assert m["late_rows_skipped"] == 120 and m["late_replay_rowcount"] == 0
    assert m["expected_rows"] == lab.ORDERS + 100
    assert m["duplicates_after"] == 0 and m["rerun_rowcount"] == 0


# -- the version-dependent business key ----------------------------------------------------------
@pytest.mark.parametrize("version, form, marker", [
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


@pytest.mark.parametrize("version", [140000, 150000])
def test_each_key_form_rejects_a_second_null_store_row(version, target):
    """Run both forms on the real server: a second (NULL, key) row is refused, and ON CONFLICT
    with the form's conflict target updates the one row instead."""
    _, _, params = target
    admin = db.connect(params, autocommit=True)
    schema = f"{db.SCHEMA_PREFIX}{db.new_run_id()}_keyform"
    db.create_schema(admin, schema)
    conn = db.connect(params, schema=schema)
    try:
        key = lab.unique_key_ddl(version, "orders")
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE orders (store_id integer, order_ref text NOT NULL, amount numeric)")
            cur.execute(key.ddl)
            cur.execute("INSERT INTO orders VALUES (NULL, 'ORD-00001', 1)")
            cur.execute(sql.SQL("INSERT INTO orders VALUES (NULL, 'ORD-00001', 2) "
                                "ON CONFLICT {} DO UPDATE SET amount = excluded.amount").format(key.conflict_target))
            cur.execute("SELECT count(*), max(amount) FROM orders")
            assert cur.fetchone() == (1, Decimal(2))
            with pytest.raises(psycopg2.errors.UniqueViolation):
                cur.execute("INSERT INTO orders VALUES (NULL, 'ORD-00001', 3)")
        conn.rollback()
    finally:
        conn.close()
        db.drop_schema(admin, schema)
        admin.close()


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


def test_as_values_maps_columns_by_name():
    row = {**lab.make_orders(random.Random(1), 1)[0], "currency": "EUR"}
    in_insert_order = (row["store_id"], row["order_ref"], row["customer_id"], row["invoice_no"],
                       row["amount"], row["updated_at"])
    assert lab.as_values([row]) == [in_insert_order]                   # extra field ignored
    assert lab.as_values([dict(reversed(row.items()))]) == [in_insert_order]  # by name, not by position
    del row["amount"]
    with pytest.raises(KeyError):
        lab.as_values([row])  # a missing field is loud
