"""late_commit (fail_checkpoint_corruption.py), run as a user runs it, against each target."""
import pytest

import fail_checkpoint_corruption as lab
from conftest import assert_gives_the_handout, assert_passed, clean_env, run_control, run_script
from scenario_checks import assert_brief_and_80_columns, assert_exercise_grades
from test_fail_checkpoint_corruption import (BREAK_AT_CALL, assert_the_claim_fails, assert_the_detector_runs_last,
                                             run_patched)

SCRIPT = "fail_checkpoint_corruption.py"
ID = "late_commit"


@pytest.fixture(scope="module")
def full_run(target, tmp_path_factory):
    name, env, params = target
    return run_script(SCRIPT, "--only", ID, env=env, tmp_path=tmp_path_factory.mktemp(f"late-{name}")), params


def test_the_late_commit_is_skipped_then_copied_exactly_once(full_run):
    result, params = full_run
    assert_passed(result, params, [ID])
    record = result.scenario(ID)
    m = record["measurements"]
    assert m["events_missing_before"] == [lab.EVENTS + 1] and m["events_missing_after"] == []
    assert m["held_back_while_open"] == 1  # B's committed event waited for A: the price of the bound
    assert m["lookback_missing"] == {"2 ids late": 0, f"{lab.LOOKBACK} ids late": 1}
    d = record["detection"]
    assert d["check"] == "events_skipped_below_copied" and d["kind"] == "sql"
    assert d["fired"] and d["found_broken"] == [f"{lab.EVENTS + 1}, written by A"]
    assert d["quiet_after_fix"] and d["found_after_fix"] == [] and d["runbook"]
    assert_gives_the_handout(result, {ID: {"name": "events_missing_before", "value": str(lab.EVENTS + 1),
                                           "after": "none"}})


def test_the_recovery_ends_with_the_detector_quiet(full_run):
    assert_the_detector_runs_last(full_run[0].scenario(ID))


CONTROLS = [(ID, "extract_events", "the anti-join is empty")]


def test_the_naive_extract_in_the_slot_fails(target, tmp_path):
    run_control(SCRIPT, *CONTROLS[0], target, tmp_path)


WRONG = '''
def extract_events(conn):
    """Bounded by this transaction's own id: later than A's, still open."""
    with conn.cursor() as cur:
        cur.execute("SELECT below_xid FROM watermarks WHERE job = %s", (EXTRACT,))
        since = cur.fetchone()[0]
        cur.execute("SELECT pg_current_xact_id()")
        bound = cur.fetchone()[0]
        cur.execute("INSERT INTO events_copy (id, payload) SELECT id, payload FROM events "
                    "WHERE written_by >= %s AND written_by < %s", (since, bound))
        copied = cur.rowcount
        cur.execute("UPDATE watermarks SET below_xid = %s WHERE job = %s", (bound, EXTRACT))
    conn.commit()
    return copied
'''


def test_the_exercise_grades_untouched_reference_and_a_wrong_bound(target, tmp_path):
    assert_exercise_grades(SCRIPT, ID, WRONG, "the watermark never passed A's transaction", target[1], tmp_path)


def test_brief_keeps_the_detector_and_everything_fits_80_columns(full_run, target, tmp_path):
    assert_brief_and_80_columns(SCRIPT, ID, full_run[0], target[1], tmp_path,
                                (lab.extract_after_id, lab.extract_below_oldest_running, lab.extract_with_lookback))


# -- the checks checked: the copy broken just before events_damage() reads it ---------------------
# events_damage() runs at the end of each run of the two sessions and after the backfill: 1st call
# the naive extract, 2nd the backfill, 3rd and 4th the lookback's two runs, 5th the fixed extract.
LATE, TWICE = f"DELETE FROM events_copy WHERE id = {lab.EVENTS + 1}", \
    "INSERT INTO events_copy SELECT id, payload FROM events_copy WHERE id = 50"
BROKEN_STATES = {  # what is broken, at which call (that one only), the claim that must fail
    "the backfill, a row missing": (2, "DELETE FROM events_copy WHERE id = 50",
                                    "after the backfill, the anti-join is empty"),
    "the lookback, the late event lost": (3, LATE, "the lookback is a trade-off"),
    "the fixed extract, a row doubled": (5, TWICE, "nothing was copied twice"),
}


@pytest.mark.parametrize("name", list(BROKEN_STATES))
def test_a_recovery_check_fails_when_the_copy_it_guards_is_broken(name, embedded_params, tmp_path):
    at, statement, claim = BROKEN_STATES[name]
    patch = BREAK_AT_CALL.format(name="events_damage", at=at, statement=statement)
    assert_the_claim_fails(run_patched(tmp_path, ID, patch, clean_env()), ID, claim)
