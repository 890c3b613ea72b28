"""fail_logging_failure.py, scenario lost_on_kill: a job killed with SIGKILL loses what its
MemoryHandler held, the event of a committed batch among it; written in the batch's own
transaction, the event survives, and the diagnostics lost show as a counted gap."""
from __future__ import annotations

import pytest

import fail_logging_failure as lab
from beyond import assert_brief_keeps_the_proof, assert_exercise_grades, control_tests, run_passing
from conftest import clean_env
from test_fail_logging_failure import FIXED_RUN, assert_fails_on_its_claim, before, run_patched

SCRIPT, ID = "fail_logging_failure.py", "lost_on_kill"


def test_the_kill_loses_the_buffer_and_the_fix_keeps_every_event(target, tmp_path):
    result = run_passing(SCRIPT, ID, target, tmp_path)
    record = result.scenario(ID)
    m = record["measurements"]
    assert m["naive_exit_code"] == lab.KILLED_BY_SIGKILL
    per_batch = lab.CHECKS_PER_BATCH + 1  # the diagnostics, then the event
    emitted = lab.KILL_AFTER * per_batch
    assert m["naive_records_lost"] == emitted % lab.LOG_BUFFER  # what the last flush left in the buffer
    assert 0 < m["fixed_records_lost"] < lab.LOG_BUFFER
    assert record["detection"]["found_broken"] == [str(lab.KILL_AFTER)]  # the batch killed with its event


CONTROLS = [("commit_batch", "every committed batch has its event")]

test_the_naive_code_fails_its_control, test_every_slot_has_a_control = control_tests(SCRIPT, ID, CONTROLS)


LOGGED_BEFORE_THE_COMMIT = '''
def commit_batch(conn, log, stamp, batch):
    with conn.cursor() as cur:
        load_rows(cur, stamp.run_id, batch)
    log.info("batch %s committed", batch,
             extra={"event": "batch_committed", "batch": batch})
    conn.commit()
'''


def test_the_exercise_grades_an_event_logged_before_the_commit_as_failed(embedded_params, tmp_path):
    """Logged before the commit is still logged into the buffer: the kill takes it all the same."""
    target = ("embedded", clean_env(), embedded_params)
    assert_exercise_grades(SCRIPT, ID, LOGGED_BEFORE_THE_COMMIT, "every committed batch has its event",
                           target, tmp_path)


def test_brief_keeps_every_check_in_80_columns(embedded_params, tmp_path):
    assert_brief_keeps_the_proof(SCRIPT, ID, ("embedded", clean_env(), embedded_params), tmp_path)


# -- the checks checked: the fixed run's state broken just before a claim looks at it ----------------
ONE_SHORT = '''
real_run_and_kill = lab.run_and_kill
def one_batch_short(s, run_id, commit_batch):  # a figure off by one: a batch fewer than committed
    r = real_run_and_kill(s, run_id, commit_batch)
    r["committed"] -= run_id.startswith("fixed-")
    return r
lab.run_and_kill = one_batch_short
'''
BROKEN_STATES = {  # the patch that breaks the fixed run just before a check, the claim that must fail
    "batch 2's event missing": (
        before("lab.events_missing", FIXED_RUN, "DELETE FROM job_log WHERE run_id = %(run)s "
                                                "AND event = 'batch_committed' AND batch = 2"),
        "every committed batch has its event"),
    "a stored record deleted before the gap is counted": (
        before("lab.record_log_gap", FIXED_RUN, "DELETE FROM job_log WHERE run_id = %(run)s AND seq = 1"),
        "the loss is counted where an operator sees it"),
    "the batches committed counted one short": (ONE_SHORT, "every committed batch has its event"),
}


@pytest.mark.parametrize("name", list(BROKEN_STATES))
def test_a_recovery_check_fails_when_the_state_it_guards_is_broken(name, embedded_params, tmp_path):
    patch, claim = BROKEN_STATES[name]
    assert_fails_on_its_claim(run_patched(tmp_path, ID, patch, clean_env()), ID, claim)


def test_a_sigterm_does_not_pass_for_the_kill(embedded_params, tmp_path):
    """terminate() in place of kill(): SIGTERM, which a process may catch and flush its logs on,
    is not the SIGKILL the lesson is about; the run stops on the claim that the kill landed."""
    patch = "import multiprocessing.process as mp\nmp.BaseProcess.kill = mp.BaseProcess.terminate"
    result = run_patched(tmp_path, ID, patch, clean_env())
    record = result.scenario(ID)
    assert result.returncode == 1 and record["triggered"] is False and record["cleaned"] is True
    assert record["reason"].startswith("stopped early: the kill landed"), record["reason"]
    assert record["measurements"]["naive_exit_code"] != lab.KILLED_BY_SIGKILL
