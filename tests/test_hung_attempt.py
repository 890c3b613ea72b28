"""fail_retry_exhaustion.py, scenario hung_attempt: the path to the server goes silent without
closing; a policy with a stop and a wait but no bound on one attempt waits forever (the lab
heals the path at its own limit); a per-attempt deadline abandons the connection, and the unit,
whose COMMIT had landed, is not applied twice."""
from __future__ import annotations

import pytest

import fail_retry_exhaustion as lab
from beyond import assert_brief_keeps_the_proof, assert_exercise_grades, control_tests, run_passing
from conftest import clean_env, lab_schemas, run_patched

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


# -- the proofs checked: the state each guards broken just before it looks ------------------------
# A session the job left behind, as the server sees it; the proof is handed its pid with the
# job's own (it looks only at the job's sessions).
LEFT_BEHIND = '''
real_left = lab.job_sessions_left
def left_with_one_more(s, pids):
    conn = s.connect(autocommit={autocommit})  # closed at teardown
    with conn.cursor() as cur:
        cur.execute({statement!r})
    return real_left(s, [*pids, conn.get_backend_pid()])
lab.job_sessions_left = left_with_one_more
'''
# The fixed run's first socket (the 2nd first attempt of a job), one option set back by the OS
# call a library or a sidecar would make, just before the lab reads the options back.
SOCKET_OPTION = '''
import os, socket
real_opened, first_attempts = lab.StallAtFirstCommit.opened, []
def opened(self, conn, pid):
    if not self.seen:
        first_attempts.append(pid)
    if len(first_attempts) == 2 and len(self.seen) == 0:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        sock.setsockopt({level}, {option}, {value})
        sock.close()
    real_opened(self, conn, pid)
lab.StallAtFirstCommit.opened = opened
'''
BROKEN_STATES = {  # what is broken: the patch, and the claim that must then fail
    "a session left idle in a transaction": (
        LEFT_BEHIND.format(autocommit=False, statement="SELECT count(*) FROM ledger"),
        "no session of the job is left idle in a transaction or holding a lock"),
    "a session left idle holding an advisory lock": (
        LEFT_BEHIND.format(autocommit=True, statement="SELECT pg_advisory_lock(7)"),
        "no session of the job is left idle in a transaction or holding a lock"),
    "the job's socket without SO_KEEPALIVE": (
        SOCKET_OPTION.format(level="socket.SOL_SOCKET", option="socket.SO_KEEPALIVE", value=0),
        "the OS reports the job's socket with SO_KEEPALIVE"),
    "the job's socket without TCP_USER_TIMEOUT": (
        SOCKET_OPTION.format(level="socket.IPPROTO_TCP", option="getattr(socket, 'TCP_USER_TIMEOUT', 18)",
                             value=0),
        "the OS reports the job's socket with SO_KEEPALIVE"),
}


@pytest.mark.parametrize("name", list(BROKEN_STATES))
def test_a_recovery_check_fails_when_the_state_it_guards_is_broken(name, embedded_params, tmp_path):
    """Each proof fails, on its own claim, when what it guards is broken just before it looks:
    the failure still shown, everything cleaned up."""
    patch, claim = BROKEN_STATES[name]
    result = run_patched(SCRIPT, ID, patch, clean_env(), tmp_path)
    record = result.scenario(ID)
    assert result.returncode == 1 and record["triggered"] is True and record["cleaned"] is True, \
        result.stdout[-3000:]
    failed = [c["claim"] for c in record["checks"] if c["phase"] == "recovered" and not c["ok"]]
    assert any(c.startswith(claim) for c in failed), (claim, failed)
    assert [c for c in failed if not c.startswith(claim)] == [], failed  # that claim alone
    assert lab_schemas(embedded_params, result.journal["run_id"]) == []


# -- what the run costs the server: its sessions when it holds the most --------------------------
# At each attempt's connection the server is asked how many sessions the run holds (its own name,
# application_name): the fixed run's second attempt is its peak (the abandoned first one is still
# on the server, the path being silent).
SESSIONS_AT_EACH_ATTEMPT = '''
real_opened = lab.StallAtFirstCommit.opened
def opened(self, conn, pid):
    real_opened(self, conn, pid)
    held = db.scalar(conn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                           "current_setting('application_name')")
    conn.rollback()
    print(f"sessions held: {held}", flush=True)
lab.StallAtFirstCommit.opened = opened
'''
PEAK_SESSIONS = 5  # the README's cost of this scenario: within a run's share (common/budget.py)


def test_the_run_holds_at_most_its_stated_sessions(embedded_params, tmp_path):
    """The run's admin and scenario sessions, the cancel's session and the job's two attempts:
    one cancel session for both runs, none left open between them."""
    from common import budget

    result = run_patched(SCRIPT, ID, SESSIONS_AT_EACH_ATTEMPT, clean_env(), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    held = [int(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("sessions held: ")]
    assert len(held) == 3, result.stdout[-3000:]  # the naive run's one attempt, the fixed run's two
    assert max(held) == PEAK_SESSIONS <= budget.RUN_PEAK, held
