"""fail_idempotency_break.py: end to end on both targets, its negative controls and wrong
exercise solutions through the command line, plus its helpers on their own."""
from __future__ import annotations

import random
import re
from datetime import datetime, timezone
from decimal import Decimal

import psycopg2
import pytest
from psycopg2 import sql

from common import db, metrics
from common.fixes import source_of
from common.scenario import _REGISTRY
from conftest import (ROOT, on_both_targets, assert_every_slot_has_a_control, assert_gives_the_handout, assert_passed, grade,
                      run_control, run_script, scraped, write_solution)

import conftest
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
    assert m["not_newest_after_repair"] == 0                     # the repair kept the newest rows
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
    assert "64 = 61 written + 2 set aside + 1 superseded" in recovery  # every figure reconciles, checked


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


# -- the loads' metrics, as the textfile collector would read them ----------------------------------
LOADS = ["partial_failure", "constraint_violation", "data_drift"]


@pytest.fixture(scope="module")
def metrics_run(target, tmp_path_factory):
    """One run of the three loads per target with --metrics: the journal and the metrics folder."""
    name, env, params = target
    folder = tmp_path_factory.mktemp(f"idem-metrics-{name}")
    result = run_script(SCRIPT, "--only", ",".join(LOADS), "--metrics", str(folder / "metrics"),
                        env=env, tmp_path=folder)
    assert_passed(result, params, LOADS)
    return result, folder / "metrics" / lab.__name__


def rows_total(samples: dict, outcome: str):
    return samples.get(("pipeline_rows_total", (("outcome", outcome),)))


LAST_SUCCESS = ("pipeline_last_success_timestamp_seconds", ())


def test_the_loads_export_the_rows_they_wrote_and_set_aside(metrics_run):
    """pipeline_rows_total is what the journal measured in the tables, naive run and fixed run."""
    result, folder = metrics_run
    exported = {(sid, phase): scraped(folder, sid, phase) for sid in LOADS for phase in ("naive", "fixed")}
    pf, cv, dd = (measured(result, sid) for sid in LOADS)
    expected = {  # (scenario, phase) -> (loaded, rejected)
        # the naive load committed its 1200-row prefix, then stopped: no row was set aside
        ("partial_failure", "naive"): (pf["committed_before_error"], 0),
        # the run the server ended wrote nothing; the next wrote the rest, its rejects among them
        ("partial_failure", "fixed"): (pf["staged_rowcount"] - pf["quarantined"] + pf["rerun_rowcount"],
                                       pf["quarantined"]),
        # the day's base load went in; each naive delta was refused whole
        ("constraint_violation", "naive"): (cv["expected_rows"], 0),
        ("constraint_violation", "fixed"): (cv["rows_written"] + cv["rerun_rowcount"], cv["rejects"]),
        # day 1 went in; day 2's DO NOTHING wrote none of its corrections (stale_rows), day 3 failed
        ("data_drift", "naive"): (lab.ORDERS, 0),
        ("data_drift", "fixed"): (dd["upsert_rowcount"] + dd["late_replay_rowcount"] + dd["rerun_rowcount"], 0),
    }
    got = {key: (rows_total(samples, "loaded"), rows_total(samples, "rejected")) for key, samples in exported.items()}
    assert got == expected
    assert pf["staged_rowcount"] - pf["quarantined"] == pf["expected_rows"] - pf["committed_before_error"]
    assert dd["stale_rows"] == 80  # day 2 wrote nothing, although 80 of its orders had changed
    for (sid, phase), samples in exported.items():  # the files hold what the journal recorded last
        journal = result.scenario(sid)["metrics"][phase][-1]
        assert {metrics.series_name(name, dict(labels)): value for (name, labels), value in samples.items()} == journal


def test_the_last_success_is_exported_only_by_a_load_that_ran_to_its_end(metrics_run):
    result, folder = metrics_run
    started = datetime.strptime(result.journal["started_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    during = (started.timestamp(), started.timestamp() + result.journal["seconds"] + 1)
    for sid in LOADS:
        naive, fixed = (scraped(folder, sid, phase) for phase in ("naive", "fixed"))
        assert during[0] <= fixed[LAST_SUCCESS] <= during[1]
        if sid == "partial_failure":  # its only naive load stopped at line 1234
            assert LAST_SUCCESS not in naive
        else:  # the base load, or days 1 and 2, "succeeded"
            assert during[0] <= naive[LAST_SUCCESS] <= fixed[LAST_SUCCESS]


# -- detectors: each fires on the naive run's real damage and is quiet after the fix ---------------
DETECTORS = {  # scenario -> (check, kind, how many items it finds on the broken state)
    "duplicate_detection": ("duplicate_business_keys", "sql", None),  # duplicates_before, measured
    "partial_failure": ("unloaded_orders", "python", lab.ORDERS - 1200),
    "constraint_violation": ("OrderDeltasNotLoaded", "metric", 1),
    "data_drift": ("orders_behind_source", "sql", 80 + 40 + 100),
}


def found_count(summary: list[str]) -> int:
    """How many items a detector found, from its journal summary (5 lines, then "... and N more")."""
    more = re.fullmatch(r"\.\.\. and (\d+) more", summary[-1]) if summary else None
    return 5 + int(more.group(1)) if more else len(summary)


@pytest.mark.parametrize("scenario_id", list(DETECTORS))  # refresh_lock_queue's: in its own file
def test_each_detector_fires_on_the_damage_and_is_quiet_after_the_fix(journal_run, scenario_id):
    result, _ = journal_run
    record = result.scenario(scenario_id)
    check, kind, found = DETECTORS[scenario_id]
    detection = record["detection"]
    assert (detection["check"], detection["kind"]) == (check, kind)
    assert detection["fired"] is True and detection["quiet_after_fix"] is True
    assert detection["found_after_fix"] == []
    if found is None:
        found = record["measurements"]["duplicates_before"]
    assert found_count(detection["found_broken"]) == found, detection["found_broken"]
    assert len(detection["runbook"].split(". ")) >= 2 and detection["runbook"].startswith(check)
    assert " fired: " in record["sections"]["root_cause"]


def test_the_backlog_alert_reads_what_the_job_exported(journal_run):
    result, _ = journal_run
    record = result.scenario("constraint_violation")
    assert record["detection"]["found_broken"] == ["orders_delta_rows_behind, 64.0"]
    def gauge(samples):  # its successive values, each once (a sample is taken whenever any metric moves)
        values = [v["orders_delta_rows_behind"] for v in samples if "orders_delta_rows_behind" in v]
        return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
    naive, fixed = record["metrics"]["naive"], record["metrics"]["fixed"]
    assert gauge(naive) == [64.0]        # no delta ever committed
    assert gauge(fixed) == [42.0, 0.0]   # delta 1, then 2 (after the loss) and 3


def test_the_checked_in_alert_tests_are_what_a_run_gives(journal_run):
    import sys

    sys.path.insert(0, str(ROOT / "alerts"))
    import generate

    result, _ = journal_run  # the run these tests already made (seed 1), not one more
    text = generate.test_document(result.journal)
    assert text == (ROOT / "alerts" / "fail_idempotency_break.test.yml").read_text(encoding="utf-8")


def test_promtool_passes_the_alert_rule_tests():
    import subprocess

    from promtool import Unavailable, promtool

    try:
        tool = promtool()
    except Unavailable as exc:
        pytest.skip(str(exc))
    for args in (["check", "rules", "fail_idempotency_break.rules.yml"],
                 ["test", "rules", "fail_idempotency_break.test.yml"]):
        got = subprocess.run([tool, *args], cwd=ROOT / "alerts", capture_output=True, text=True)
        assert got.returncode == 0, got.stdout + got.stderr


@pytest.mark.parametrize("scenario_id", ["partial_failure", "constraint_violation"])
def test_the_lost_connection_is_the_server_ending_it(journal_run, scenario_id):
    result, _ = journal_run
    m = measured(result, scenario_id)
    assert m["lost_connection_sqlstate"] in (None, "57P01")     # never 57014: not a cancel
    assert m["ended_backend_listed"] is False                   # pg_stat_activity no longer has it


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
    ("partial_failure", "unloaded_orders", "the detector unloaded_orders_by_count is quiet after the recovery"),
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
    # a completeness check by key that forgets the rows set aside: it never goes quiet
    "a completeness check that ignores load_rejects": ("partial_failure", '''
load_extract = load_staged
def unloaded_orders(conn):
    return db.rows(conn, "SELECT DISTINCT upper(btrim(order_ref)) FROM source_orders s WHERE NOT EXISTS ("
                         "SELECT 1 FROM orders o WHERE o.order_ref = upper(btrim(s.order_ref)))")
''', "the detector unloaded_orders is quiet after the recovery"),
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


# -- checks that check: the lesson run with one of its pieces wrong ------------------------------
def run_patched(scenario_id: str, patch: str, target, tmp_path):
    """Run one scenario of the lesson with `patch` applied to it (imported as `lab`), as a real bug
    in it would be; the fault must still land and the run clean up."""
    _, env, _ = target
    result = conftest.run_patched(SCRIPT, scenario_id, patch, env, tmp_path)
    record = result.scenario(scenario_id)
    assert result.returncode == 1 and record["triggered"] is True and record["cleaned"] is True, result.stdout[-3000:]
    return record


def failed_claims(record: dict) -> list[str]:
    return [c["claim"] for c in record["checks"] if not c["ok"]]


# The repair keeps the OLDEST row of each key: the fixed reload after it writes the newest versions
# again, so only the check made right after the repair can see it.
KEEP_OLDEST = """
from psycopg2 import sql
def repair_keeping_the_oldest(conn, table, key):
    t = sql.Identifier(table)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DELETE FROM {t} WHERE id IN (SELECT id FROM (SELECT id, row_number() OVER ("
                            "PARTITION BY store_id, upper(btrim(order_ref)) ORDER BY updated_at, id) AS oldest "
                            "FROM {t}) ranked WHERE oldest > 1)").format(t=t))
        removed = cur.rowcount
        cur.execute(sql.SQL("UPDATE {t} SET order_ref = upper(btrim(order_ref)) "
                            "WHERE order_ref <> upper(btrim(order_ref))").format(t=t))
        cur.execute(sql.SQL("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {old}").format(
            t=t, old=sql.Identifier(table + "_natural_key")))
        cur.execute(sql.SQL("ALTER TABLE {t} ADD CONSTRAINT {c} CHECK (order_ref = upper(btrim(order_ref)))").format(
            t=t, c=sql.Identifier(table + "_canonical_ref")))
        cur.execute(key.ddl)
    conn.commit()
    return removed
lab.repair_duplicates = repair_keeping_the_oldest
"""


def test_a_repair_that_keeps_the_oldest_row_fails_right_after_the_repair(target, tmp_path):
    record = run_patched("duplicate_detection", KEEP_OLDEST, target, tmp_path)
    failed = failed_claims(record)
    assert record["measurements"]["not_newest_after_repair"] > 0
    # the check right after the repair sees it, and the reload that then overwrites the evidence
    # writes the versions the repair should have kept; the final proof sees nothing
    assert failed == ["right after the repair, each table holds the newest version of every order, "
                      "once: count, sum and checksum as expected_orders",
                      f"the {lab.RETYPED} re-typed keys land on their canonical orders: no error, no new "
                      "row, nothing written (the repair kept day 2's versions)"]


@pytest.mark.parametrize("scenario_id, claim", [
    ("partial_failure", "the server ended the load's connection at line"),
    ("constraint_violation", "the server ended the connection of delta 2")])
def test_a_cancelled_statement_is_not_a_lost_connection(scenario_id, claim, target, tmp_path):
    """The fault made a cancel (57014) instead: the session lives on, so the claim fails."""
    patch = ("assert 'pg_terminate_backend(pg_backend_pid())' in lab.KILL_SWITCH\n"
             "lab.KILL_SWITCH = lab.KILL_SWITCH.replace('pg_terminate_backend(pg_backend_pid())', "
             "'pg_cancel_backend(pg_backend_pid())')")
    record = run_patched(scenario_id, patch, target, tmp_path)
    failed = failed_claims(record)
    assert len(failed) == 1 and claim in failed[0], failed
    assert record["measurements"]["lost_connection_sqlstate"] == "57014"   # each part measured
    assert record["measurements"]["ended_backend_listed"] is True


ELSEWHERE = """
real_switch = lab.server_ends_connection
def switch_on_another_line(s, when=None):  # the kill switch fires one row later than the lesson says
    return real_switch(s, lab.sql.SQL("NEW.order_ref = 'ORD-01351'"))
lab.server_ends_connection = switch_on_another_line
"""


def test_a_fault_that_lands_on_another_line_fails_on_its_claim(embedded_params, tmp_path):
    """Where the connection ended is what the server recorded, not what the lesson meant."""
    from conftest import clean_env

    record = run_patched("partial_failure", ELSEWHERE, ("embedded", clean_env(), embedded_params), tmp_path)
    assert record["measurements"]["connection_ended_at"] == 1351
    assert failed_claims(record) == [c["claim"] for c in record["checks"]
                                     if c["claim"].startswith("the server ended the load's connection at line 1350")]


def test_a_fault_that_does_not_land_fails_on_its_claim(target, tmp_path):
    """FAILLAB_NO_FAULTS=1: the server never ends the connection, so the claim that it did fails,
    and nothing else is excused: no skip, no crash, everything cleaned."""
    result = run_script(SCRIPT, "--only", "partial_failure,constraint_violation",
                        env={**target[1], "FAILLAB_NO_FAULTS": "1"}, tmp_path=tmp_path)
    assert result.returncode == 1
    for scenario_id, claim in [("partial_failure", "the server ended the load's connection"),
                               ("constraint_violation", "the server ended the connection of delta 2")]:
        record = result.scenario(scenario_id)
        assert record["status"] == "failed" and record["triggered"] and record["cleaned"], record.get("reason")
        assert not record["reason"].startswith("unexpected ")
        assert claim in failed_claims(record)[0]
        assert record["measurements"]["ended_backend_listed"] is True


# The recovered state broken just before the final proof: each way must fail its named claims.
EQUALS = "target equals the newest source version of every order: count, sum and checksum"
DAMAGE = {
    "a row missing": ("DELETE FROM orders WHERE order_ref = 'ORD-00001'",
                      [EQUALS, "0 rows changed"]),  # the re-run puts it back: 1 row changed
    "a row doubled": ("ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_business_key; "
                      "DROP INDEX IF EXISTS orders_business_key; "
                      "INSERT INTO orders SELECT * FROM orders WHERE order_ref = 'ORD-00001'",
                      [EQUALS, "no business key appears twice", "the load run again"]),
    "an amount a cent off": ("UPDATE orders SET amount = amount - 0.01 WHERE order_ref = 'ORD-00001'",
                             [EQUALS, "orders_behind_source is quiet"]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_the_final_proof_fails_on_a_damaged_target(damage, target, tmp_path):
    statement, claims = DAMAGE[damage]
    patch = f"""
real_proof = lab.prove_idempotent
def damaged_then_proven(s, rerun, tables=("orders",)):
    with s.conn.cursor() as cur:
        cur.execute({statement!r})
    s.conn.commit()
    real_proof(s, rerun, tables)
lab.prove_idempotent = damaged_then_proven
"""
    failed = failed_claims(run_patched("data_drift", patch, target, tmp_path))
    for claim in claims:
        assert any(claim in c for c in failed), (claim, failed)


# -- every recovery check checked: the recovered state broken just before the check looks ---------
BREAK_BEFORE = """
real, calls = lab.{function}, []
def broken(first, *args, **kwargs):  # break the state once, just before this call; then let it run
    calls.append(1)
    if len(calls) == {call}:
        conn = getattr(first, "conn", first)
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute({statement!r})
        conn.commit()
    return real(first, *args, **kwargs)
lab.{function} = broken
"""
UNCHANGED = ("(SELECT min(o.order_ref) FROM orders o JOIN expected_orders e USING (store_id, order_ref) "
             "WHERE o.amount = e.amount)")  # an order no extract corrected
CORRECTED = "(SELECT min(order_ref) FROM orders WHERE updated_at > '2026-03-03')"  # one corrected since day 1
BROKEN_STATES = {  # what is broken, just before which call (the how-many-th) of which function, the claims that fail
    "duplicate_detection, a key held three times": (
        "repair_duplicates", 1, "INSERT INTO orders_v1 (store_id, order_ref, customer_id, invoice_no, amount, "
        "updated_at) SELECT store_id, order_ref, customer_id, invoice_no, amount, updated_at FROM orders_v1 "
        "WHERE order_ref = 'ORD-00001' LIMIT 1", "one copy removed per key held twice"),
    "duplicate_detection, a row missing after the repair": (
        "snapshot", 1, "DELETE FROM orders_v2 WHERE order_ref = 'ORD-00001'",
        "right after the repair, each table holds the newest version of every order"),
    "duplicate_detection, a row missing before the reload": (
        "attempt", 1, "DELETE FROM orders_v1 WHERE order_ref = 'ORD-00002'",
        "re-typed keys land on their canonical orders: no error, no new row, nothing written"),
    "partial_failure, the prefix a row short": (
        "visible_state", 1, "DELETE FROM orders WHERE order_ref = 'ORD-00001'",
        ("nothing of the interrupted load is visible: orders is still the 1200-row prefix",
         "the run completes and writes the 800 missing rows")),  # it wrote 801
    "partial_failure, a reject the lost load left": (
        "visible_state", 2, "INSERT INTO load_rejects VALUES ('ORD-01500', '22003', 'left by the lost load')",
        "nothing of the interrupted load is visible"),
    "partial_failure, a reject with another SQLSTATE": (
        "show_rejects", 1, "UPDATE load_rejects SET sqlstate = '23514' WHERE order_ref = 'ORD-01500'",
        "load_rejects names exactly lines 1500 (22003) and 1800 (23514)"),
    "constraint_violation, ORD-00007 a cent off after delta 1": (
        "not_held", 1, "UPDATE orders SET amount = amount - 0.01 WHERE order_ref = 'ORD-00007'",
        "orders holds the newest version of each of delta 1's"),
    "constraint_violation, a reject of the lost delta 2": (
        "visible_state", 2, "INSERT INTO load_rejects VALUES ('ORD-02001', '23505', 'left by the lost load')",
        "nothing of delta 2 is visible"),
    "constraint_violation, a reject missing": (
        "show_rejects", 1, "DELETE FROM load_rejects WHERE order_ref = 'ORD-02002'",
        "the re-booked order and the unknown customer are set aside"),
    "constraint_violation, a row of delta 2 already in": (  # delta 2's edits are the versions of 08:xx
        "attempt", 3, "UPDATE orders o SET amount = s.amount, updated_at = s.updated_at FROM source_orders s "
        "WHERE s.received = (SELECT min(received) FROM source_orders WHERE updated_at "
        "BETWEEN '2026-03-02 08:00+00' AND '2026-03-02 08:30+00') AND o.order_ref = s.order_ref",
        "each delta writes one row per order it carries"),
    "data_drift, one more order changed": (
        "detect_drift", 1, f"UPDATE orders SET amount = amount - 0.01 WHERE order_ref = {UNCHANGED}",
        "the drift query finds exactly the 80 corrected orders"),
    "data_drift, a column retyped": (
        "shape_check", 1, "ALTER TABLE orders ALTER COLUMN customer_id TYPE bigint",
        "the shape check finds the one new field, currency, and no type change"),
    "data_drift, a row missing before the load": (
        "attempt", 1, f"DELETE FROM orders WHERE order_ref = {UNCHANGED}",
        "the 100 new orders were written, each on its day"),
    "data_drift, a correction older than day 1": (
        "detect_drift", 2, f"UPDATE orders SET updated_at = updated_at - interval '3 days' "
        f"WHERE order_ref = {CORRECTED}", "the replay wrote nothing"),
    "data_drift, a cent off after the load": (
        "snapshot", 1, "UPDATE orders SET amount = amount + 0.01 WHERE order_ref = 'ORD-00001'",
        "orders now equals the newest source version of every order, before any replay"),
}


@pytest.mark.parametrize("name, target", on_both_targets(BROKEN_STATES, lambda n: n.split(",")[0]),
                         indirect=["target"])
def test_a_recovery_check_fails_when_the_state_it_guards_is_broken(name, target, tmp_path):
    function, call, statement, claim = BROKEN_STATES[name]
    patch = BREAK_BEFORE.format(function=function, call=call, statement=statement)
    record = run_patched(name.split(",")[0], patch, target, tmp_path)
    failed = [c["claim"] for c in record["checks"] if c["phase"] == "recovered" and not c["ok"]]
    for one in (claim,) if isinstance(claim, str) else claim:
        assert any(one in c for c in failed), (one, failed)
    assert not [e for e in record["observed_errors"] if e["type"].startswith("common.")], record["observed_errors"]


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
