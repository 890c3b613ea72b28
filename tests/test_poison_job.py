"""fail_retry_exhaustion.py, scenario poison_job: a payload that kills its worker (SIGKILL) is
retried forever while the attempt is counted in the transaction the kill rolls back; counted in
a committed claim with a lease, it ends in the dead letters after exactly MAX_ATTEMPTS."""
from __future__ import annotations

import fail_retry_exhaustion as lab
from beyond import assert_brief_keeps_the_proof, assert_exercise_grades, control_tests, run_passing
from conftest import clean_env, lab_schemas, run_patched

SCRIPT, ID = "fail_retry_exhaustion.py", "poison_job"


def test_the_poison_is_retried_forever_then_dead_lettered_once(target, tmp_path):
    result = run_passing(SCRIPT, ID, target, tmp_path)
    m = result.scenario(ID)["measurements"]
    assert m["naive_workers_killed"] == lab.MOST_KILLS and m["naive_poison_attempts"] == 0
    assert m["fixed_workers_killed"] == m["fixed_poison_attempts"] == lab.MAX_ATTEMPTS
    detection = result.scenario(ID)["detection"]
    assert detection["check"] == "workers_killed_uncounted"
    assert detection["found_broken"] == [f"{lab.MOST_KILLS}, 0"]  # killed by the OS, counted by the queue


CONTROLS = [("take_job", "the poison job ends dead with exactly 3 attempts")]

test_the_naive_code_fails_its_control, test_every_slot_has_a_control = control_tests(SCRIPT, ID, CONTROLS)


NO_DEAD_LETTER = '''
def take_job(conn, work, worker):
    with conn.cursor() as cur:
        cur.execute("""
            UPDATE jobs SET attempts = attempts + 1,
              workers = workers || %s,
              lease_until = clock_timestamp() + make_interval(secs => %s)
            WHERE id = (SELECT id FROM jobs WHERE state = 'queued'
                AND (lease_until IS NULL OR lease_until < clock_timestamp())
                ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
            RETURNING id, payload, attempts""", (worker, LEASE_S))
        claimed = cur.fetchone()
    conn.commit()
    if claimed is None:
        return None
    with conn.cursor() as cur:
        work(cur, claimed[0], claimed[1])
        cur.execute("UPDATE jobs SET state = 'done' WHERE id = %s", (claimed[0],))
    conn.commit()
    return claimed[0]
'''


def test_the_exercise_grades_a_claim_without_a_dead_letter_as_failed(embedded_params, tmp_path):
    """Counted and leased, but never parked: the poison kills workers until the lab stops it."""
    target = ("embedded", clean_env(), embedded_params)
    assert_exercise_grades(SCRIPT, ID, NO_DEAD_LETTER, "the poison job ends dead", target, tmp_path)


def test_brief_keeps_every_check_in_80_columns(embedded_params, tmp_path):
    assert_brief_keeps_the_proof(SCRIPT, ID, ("embedded", clean_env(), embedded_params), tmp_path)


# -- the proof checked: the queue broken just before the fixed run's state is read ----------------
# queue_state() is called after the naive run, then after the fixed one: at its 2nd call, a job
# is still queued, with no worker left to take it (one queued as the last worker exited).
JOB_LEFT_QUEUED = f"""
real_state, calls = lab.queue_state, []
def state_with_a_job_left(s):
    calls.append(1)
    if len(calls) == 2:
        with s.conn.cursor() as cur:
            cur.execute("INSERT INTO jobs (id, payload) VALUES (%s, 'a late job')", ({lab.QUEUE_JOBS + 1},))
        s.conn.commit()
    return real_state(s)
lab.queue_state = state_with_a_job_left
"""


def test_no_job_lost_fails_when_a_job_is_left_queued(embedded_params, tmp_path):
    """The fixed run's queue with one job neither done nor dead: "no job lost" fails, and only it
    (the poison is dead, the others were done once)."""
    result = run_patched(SCRIPT, ID, JOB_LEFT_QUEUED, clean_env(), tmp_path)
    record = result.scenario(ID)
    assert result.returncode == 1 and record["triggered"] is True and record["cleaned"] is True, \
        result.stdout[-3000:]
    failed = [c["claim"] for c in record["checks"] if c["phase"] == "recovered" and not c["ok"]]
    assert len(failed) == 1 and failed[0].startswith("no job lost"), failed
    assert f"({lab.QUEUE_JOBS + 1} left)" in failed[0], failed
    assert lab_schemas(embedded_params, result.journal["run_id"]) == []
