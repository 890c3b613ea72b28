"""refresh_lock_queue (fail_idempotency_break.py), run as a user runs it, against each target."""
import pytest

import fail_idempotency_break as lab
from conftest import (assert_gives_the_handout, assert_passed, clean_env, grade, run_control, run_script,
                      write_solution)
from scenario_checks import assert_brief_and_80_columns, assert_exercise_grades

SCRIPT = "fail_idempotency_break.py"
ID = "refresh_lock_queue"


@pytest.fixture(scope="module")
def full_run(target, tmp_path_factory):
    name, env, params = target
    return run_script(SCRIPT, "--only", ID, env=env, tmp_path=tmp_path_factory.mktemp(f"refresh-{name}")), params


def test_readers_queue_behind_the_refresh_then_never_wait_past_its_lock_timeout(full_run):
    result, params = full_run
    assert_passed(result, params, [ID])
    record = result.scenario(ID)
    m = record["measurements"]
    assert m["sessions_blocked_before"] == lab.READERS + 1 and m["sessions_blocked_after"] == 0
    bound = lab.LOCK_WAIT_S + lab.LOCK_MARGIN_S  # by the server's clock, for the readers and the refresh
    assert m["reader_wait_after_s"] <= bound and lab.LOCK_WAIT_S <= m["refused_wait_s"] <= bound
    assert m["pause_spread_s"] > lab.JITTER_SPREAD_S and m["pauses_top_minus_bottom_s"] >= lab.DRAWN_APART_S
    assert m["refused_attempts"] == 2 and m["readings_wrong"] == 0
    assert result.sqlstates(ID) == ["55P03"]  # the refresh gave up its place in the queue
    assert result.error_types(ID)[-1] == "psycopg2.OperationalError"  # the session the server ended
    d = record["detection"]
    assert d["check"] == "lock_queue_on_pipeline_tables" and d["kind"] == "sql"
    assert d["fired"] and len(d["found_broken"]) == lab.READERS + 1
    assert sum("AccessExclusiveLock" in line for line in d["found_broken"]) == 1
    assert d["quiet_after_fix"] and d["found_after_fix"] == [] and d["runbook"]
    assert_gives_the_handout(result, {ID: {"name": "sessions_blocked_before", "value": "4", "after": "0"}})


CONTROLS = [(ID, "refresh_table", "every reader answered while the idle transaction still held its lock"),
            (ID, "run_refresh", "the refresh landed on its third attempt")]


@pytest.mark.parametrize("scenario_id, slot, claim", CONTROLS, ids=[c[1] for c in CONTROLS])
def test_the_naive_code_in_each_slot_fails(scenario_id, slot, claim, target, tmp_path):
    run_control(SCRIPT, scenario_id, slot, claim, target, tmp_path)


WRONG = '''
def refresh_table(conn):
    """No lock to wait for: empty the table and reload it, one commit each."""
    with conn.cursor() as cur:
        cur.execute("DELETE FROM customer_totals")
        conn.commit()
        cur.execute("INSERT INTO customer_totals SELECT * FROM customer_totals_source")
    conn.commit()

def run_refresh(conn, refresh_table, rng):
    run_refresh_retrying(conn, refresh_table, rng)
'''


def test_the_exercise_grades_untouched_reference_and_a_refresh_in_two_commits(target, tmp_path):
    assert_exercise_grades(SCRIPT, ID, WRONG, "no reader ever saw an empty or half-loaded table", target[1], tmp_path)


# Plausible wrong solutions, each graded as a student runs it, and the claim each must fail.
WRONG_SOLUTIONS = {
    # the swap waits for its lock up to a second, as production often has it: ten times the contract
    "a lock_timeout of 1s": ("""
def refresh_table(conn):
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS customer_totals_new")
        cur.execute("CREATE TABLE customer_totals_new AS SELECT * FROM customer_totals_source")
        conn.commit()
        try:
            cur.execute("SET LOCAL lock_timeout = '1s'")
            cur.execute("ALTER TABLE customer_totals RENAME TO customer_totals_old")
            cur.execute("ALTER TABLE customer_totals_new RENAME TO customer_totals")
            cur.execute("DROP TABLE customer_totals_old")
            conn.commit()
        except psycopg2.Error:
            conn.rollback()
            raise
""", "the refresh left the queue within its lock timeout"),
    # bounded and retried, but every job that was refused comes back after the same pause
    "a fixed pause": ("""
refresh_table = refresh_build_and_swap
def run_refresh(conn, refresh_table, rng):
    Retrying(retry=retry_if_exception_type(psycopg2.errors.LockNotAvailable), stop=stop_after_attempt(ATTEMPTS),
             wait=wait_fixed(0.2), reraise=True)(refresh_table, conn)
""", "the pauses between refused attempts are jittered"),
    # bounded and retried at once: no pause at all
    "no pause": ("""
refresh_table = refresh_build_and_swap
def run_refresh(conn, refresh_table, rng):
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return refresh_table(conn)
        except psycopg2.errors.LockNotAvailable:
            if attempt == ATTEMPTS:
                raise
""", "the pauses between refused attempts are jittered"),
}


@pytest.mark.parametrize("name", list(WRONG_SOLUTIONS))
def test_a_wrong_solution_fails_on_its_claim(name, embedded_params, tmp_path):
    code, claim = WRONG_SOLUTIONS[name]
    write_solution(tmp_path, SCRIPT, ID, code)
    result = grade(SCRIPT, ID, tmp_path, clean_env())
    record = result.scenario(ID)
    assert result.returncode == 1 and record["mode"] == "exercise", result.stdout[-3000:]
    assert record["triggered"] is True and record["cleaned"] is True
    failed = [c["claim"] for c in record["checks"] if c["phase"] == "recovered" and not c["ok"]]
    assert any(claim in c for c in failed), failed
    # a lock wait ten times too long may also keep the readers past the bound; nothing else fails
    assert all(claim in c or "no reader waited longer" in c for c in failed), failed


def test_brief_keeps_the_detector_and_everything_fits_80_columns(full_run, target, tmp_path):
    assert_brief_and_80_columns(SCRIPT, ID, full_run[0], target[1], tmp_path,
                                (lab.refresh_truncate_reload, lab.refresh_build_and_swap, lab.run_refresh_once,
                                 lab.run_refresh_retrying))


# Each refresh that claims to have landed is checked against a table broken just before the check:
# customer_totals a unit off, before the n-th versions() (3 new_orders before it, 4 landed checks).
OFF = "UPDATE customer_totals SET amount = amount + 1 WHERE customer_id = (SELECT min(customer_id) FROM customer_totals)"
LANDED = {2: "the refresh landed (customer_totals equals the source's totals)",
          5: "the refresh landed on its third attempt",
          7: "and the refresh then landed at once"}


@pytest.mark.parametrize("call", list(LANDED), ids=["on call", "bounded retry", "idle timeout"])
def test_a_refresh_that_did_not_land_fails_its_claim(call, embedded_params, tmp_path):
    from test_fail_idempotency_break import BREAK_BEFORE, run_patched

    patch = BREAK_BEFORE.format(function="versions", call=call, statement=OFF)
    record = run_patched(ID, patch, ("embedded", clean_env(), embedded_params), tmp_path)
    failed = [c["claim"] for c in record["checks"] if c["phase"] == "recovered" and not c["ok"]]
    assert len(failed) == 1 and LANDED[call] in failed[0], failed


AFTER_ONE = """
real_init = lab.EndIdleAfter.__init__
def after_one(self, idle, n, watch):  # the idle reader ends after the first refusal, not the second
    real_init(self, idle, 1, watch)
lab.EndIdleAfter.__init__ = after_one
"""


def test_an_idle_reader_that_ends_too_early_fails_the_attempts_claim(embedded_params, tmp_path):
    """The hook's moment is pinned by the refusals the refresh really got (55P03), not assumed."""
    from test_fail_idempotency_break import failed_claims, run_patched

    record = run_patched(ID, AFTER_ONE, ("embedded", clean_env(), embedded_params), tmp_path)
    assert record["measurements"]["refused_attempts"] == 1
    failed = failed_claims(record)
    assert len(failed) == 1 and "the refresh landed on its third attempt" in failed[0], failed
