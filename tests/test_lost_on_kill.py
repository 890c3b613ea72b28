"""fail_logging_failure.py, scenario lost_on_kill: a job killed with SIGKILL loses what its
MemoryHandler held, the event of a committed batch among it; written in the batch's own
transaction, the event survives, and the diagnostics lost show as a counted gap."""
from __future__ import annotations

import fail_logging_failure as lab
from beyond import assert_brief_keeps_the_proof, assert_exercise_grades, control_tests, run_passing
from conftest import clean_env

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
