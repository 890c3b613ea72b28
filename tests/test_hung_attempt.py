"""fail_retry_exhaustion.py, scenario hung_attempt: the path to the server goes silent without
closing; a policy with a stop and a wait but no bound on one attempt waits forever (the lab
heals the path at its own limit); a per-attempt deadline abandons the connection, and the unit,
whose COMMIT had landed, is not applied twice."""
from __future__ import annotations

import fail_retry_exhaustion as lab
from beyond import assert_brief_keeps_the_proof, assert_exercise_grades, control_tests, run_passing
from conftest import clean_env

SCRIPT, ID = "fail_retry_exhaustion.py", "hung_attempt"


def test_the_unbounded_attempt_hangs_and_the_deadline_ends_it(target, tmp_path):
    result = run_passing(SCRIPT, ID, target, tmp_path)
    record = result.scenario(ID)
    assert record["measurements"]["naive_waited_s"] >= lab.LAB_LIMIT_S
    assert record["measurements"]["fixed_ledger_rows"] == 1
    assert record["detection"]["found_broken"][0].startswith("1, unit-1, done, ")  # the naive run overran
    assert record["observed_errors"] == []  # the hang raises nothing: that is the failure


CONTROLS = [("run_unit", "the job ended within its 2 s deadline"),
            ("apply_unit", "nothing applied twice")]

test_the_naive_code_fails_its_control, test_every_slot_has_a_control = control_tests(SCRIPT, ID, CONTROLS)


CANCEL_NOT_ABANDON = '''
apply_unit = add_to_ledger_once


def run_unit(connect, apply, unit):
    for attempt in Retrying(stop=stop_after_attempt(3), wait=wait_fixed(0.1), reraise=True,
                            retry=retry_if_exception_type(psycopg2.OperationalError)):
        with attempt:
            conn = connect(**KEEPALIVES)
            timer = threading.Timer(ATTEMPT_DEADLINE_S, conn.cancel)
            timer.start()
            try:
                with conn.cursor() as cur:
                    apply(cur, unit)
                conn.commit()
            finally:
                timer.cancel()
                conn.close()
'''


def test_the_exercise_grades_a_cancel_instead_of_an_abandon_as_failed(embedded_params, tmp_path):
    """A cancel request reaches a server with nothing to cancel: the attempt still waits."""
    target = ("embedded", clean_env(), embedded_params)
    assert_exercise_grades(SCRIPT, ID, CANCEL_NOT_ABANDON, "the job ended within its 2 s deadline", target, tmp_path)


def test_brief_keeps_every_check_in_80_columns(embedded_params, tmp_path):
    assert_brief_keeps_the_proof(SCRIPT, ID, ("embedded", clean_env(), embedded_params), tmp_path)
