"""fail_checkpoint_corruption.py, run as a user runs it, against each target."""
import re

import pytest

import fail_checkpoint_corruption as lab
from common.fixes import source_of
from common.scenario import _REGISTRY
from conftest import (assert_gives_the_handout, assert_every_slot_has_a_control, assert_passed, clean_env, grade, lab_schemas, run_control,
                      run_script, write_solution)

SCRIPT = "fail_checkpoint_corruption.py"
IDS = ["corruption", "db_down", "concurrent_access", "interrupted_recovery", "late_commit"]


@pytest.fixture(scope="module")
def full_run(target, tmp_path_factory):
    """One run of the script per target, shared by the end-to-end tests below."""
    name, env, params = target
    return name, run_script(SCRIPT, env=env, tmp_path=tmp_path_factory.mktemp(f"checkpoint-{name}")), params


def test_every_scenario_demonstrates_recovers_and_cleans(full_run):
    name, result, params = full_run
    assert_passed(result, params, IDS)
    j = result.journal
    assert j["database"]["mode"] == ("embedded" if name == "embedded" else "DATABASE_URL")

    # corruption: kills that really tore the file, a checkpoint that ran ahead of the data; then
    # not one kill of the atomic saver left a bad file
    assert result.error_types("corruption")[:2] == ["json.decoder.JSONDecodeError", "psycopg2.errors.CheckViolation"]
    m = result.scenario("corruption")["measurements"]
    assert m["rows_missing_before"] == 500 and m["rows_missing_after"] == 0
    assert m["kills_torn_before"] > 0 and m["kills_torn_after"] == 0

    # db_down: a real connection error through the proxy, the restart duplicated a batch; the fix
    # reconnected after each of the three drops and found the checkpoint where the data was
    assert result.error_types("db_down") == ["psycopg2.OperationalError"]
    m = result.scenario("db_down")["measurements"]
    assert m["rows_duplicated_before"] == 500
    assert all(m[f"connections_{p}"] > 1 for p in ("write", "commit", "reply"))
    assert m["after_reconnect_write"] == m["after_reconnect_commit"] == {"checkpoint": 1000, "rows": 1000}
    assert m["after_reconnect_reply"] == {"checkpoint": 1500, "rows": 1500}  # the server did commit

    # concurrent_access: duplicated batch, checkpoint moved backwards, and a real 40001 from the fix
    m = result.scenario("concurrent_access")["measurements"]
    assert m["rows_duplicated"] == 500 and m["checkpoint_moved_backwards"] == 1
    assert m["compare_and_set_conflicts"] >= 1
    assert "40001" in result.sqlstates("concurrent_access")

    # interrupted_recovery: a real SIGKILL, the naive restart refused; the stalled owner's write fenced off
    m = result.scenario("interrupted_recovery")["measurements"]
    assert m["worker_exit_code"] == -9 and m["naive_restart_claimed"] is False
    assert m["late_write"] == {"checkpoint": 3000, "duplicated": 0}


HEADLINES = {  # the figure the summary shows for each scenario, as the journal gives it
    "corruption": {"name": "rows_missing_before", "value": "500", "after": "0"},
    "db_down": {"name": "rows_duplicated_before", "value": "500", "after": "0"},
    "concurrent_access": {"name": "rows_duplicated", "value": "500"},
    "interrupted_recovery": {"name": "naive_restart_claimed", "value": "no"},
    "late_commit": {"name": "events_missing_before", "value": "101", "after": "none"},
}


def test_each_scenario_gives_the_handout_its_headline_lesson_questions_and_notes(full_run):
    _, result, _ = full_run
    assert list(HEADLINES) == IDS
    assert_gives_the_handout(result, HEADLINES)


def test_only_and_list(tmp_path):
    listed = run_script(SCRIPT, "--list", journal=False, tmp_path=tmp_path)
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == IDS
    one = run_script(SCRIPT, "--only", "concurrent_access", tmp_path=tmp_path)
    assert one.returncode == 0
    assert [r["id"] for r in one.journal["scenarios"]] == ["concurrent_access"]


def test_a_fault_that_never_lands_fails_fast_with_its_reason(embedded_params, tmp_path):
    """With the proxy's faults disabled (FAILLAB_NO_FAULTS=1), db_down must stop on the claim that
    its outage landed, not hang, crash or pass; the other scenarios inject no switchable fault
    (their kills and races are real either way) and still pass."""
    result = run_script(SCRIPT, env=clean_env(FAILLAB_NO_FAULTS="1"), timeout=180, tmp_path=tmp_path)
    assert result.returncode == 1 and result.journal is not None, result.stderr[-3000:]
    records = {r["id"]: r for r in result.journal["scenarios"]}
    assert list(records) == IDS
    record = records["db_down"]
    assert record["status"] == "failed" and record["triggered"] is False and record["cleaned"] is True
    assert record["reason"] == "stopped early: the connection dropped between the data and its checkpoint", \
        record["reason"]
    assert all(records[i]["status"] == "passed" for i in IDS if i != "db_down"), \
        {i: r.get("reason") for i, r in records.items()}
    assert lab_schemas(embedded_params, result.journal["run_id"]) == []


def test_prevention_code_fits_the_screen_and_holds_no_lab_instrumentation():
    for spec in _REGISTRY:
        if spec.fn.__module__ != lab.__name__:
            continue
        for f in spec.fixes:
            for fn in (f.naive, f.fixed):
                source = source_of(fn)
                assert max(len(ln) for ln in source.splitlines()) <= 74, fn.__name__
                assert not re.search(r"\.wait\(|[Bb]arrier|Event\(|SlowDisk|\bslow\b|sleep\(|hook|after_commit", source), \
                    fn.__name__


# -- negative controls: the naive code back in each slot, under the same fault -------------------
CONTROLS = [
    ("corruption", "save_checkpoint", "always left a whole checkpoint"),
    ("corruption", "resume_point", "resume_point() said 1000 for every bad file"),
    ("db_down", "copy_next_batch", "the checkpoint matched the data"),
    ("db_down", "run_job", "the job reconnected on its own and finished"),
    ("concurrent_access", "worker_locked", "row lock (FOR UPDATE): each batch copied exactly once"),
    ("concurrent_access", "worker_compare_and_set", "compare-and-set on version: each batch copied exactly once"),
    ("interrupted_recovery", "claim_job", "worker 2 took over the dead owner's expired lease"),
    ("interrupted_recovery", "write_batch", "the stalled owner's late write was refused"),
]


@pytest.mark.parametrize("scenario_id, slot, claim", CONTROLS, ids=[f"{c[0]}-{c[1]}" for c in CONTROLS])
def test_negative_control_fails_with_the_claim_it_breaks(scenario_id, slot, claim, target, tmp_path):
    run_control(SCRIPT, scenario_id, slot, claim, target, tmp_path)


def test_every_slot_has_a_control():
    from test_late_commit import CONTROLS as LATE_COMMIT_CONTROLS  # run in test_late_commit.py

    assert_every_slot_has_a_control(SCRIPT, CONTROLS + LATE_COMMIT_CONTROLS)


# -- plausible wrong solutions, graded through the command line as a student runs them ------------
RESUME_OK = '''
def resume_point(conn, text):
    return resume_point_validated(conn, text)
'''
SAVE_OK = '''
def save_checkpoint(path, state):
    save_checkpoint_atomic(path, state)
'''
WRONG = {
    "temp file copied into place": ("corruption", '''
import shutil

def save_checkpoint(path, state):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.copyfile(tmp, path)  # not one step: the copy truncates the checkpoint first
''' + RESUME_OK, "always left a whole checkpoint"),
    "checkpoint trusted whenever it parses": ("corruption", SAVE_OK + '''
def resume_point(conn, text):
    try:
        return json.loads(text)["last_id"]
    except ValueError:
        with conn.cursor() as cur:
            return gap_free_until(cur)
''', "resume_point() said 1000 for every bad file"),
    "checkpoint saved in its own transaction": ("db_down", '''
def copy_next_batch(conn):
    with conn.cursor() as cur:
        last_id = copy_batch(cur, read_checkpoint(conn))
        conn.commit()
        if last_id is not None:
            set_checkpoint(cur, last_id)
            conn.commit()
    return last_id

def run_job(connect, copy_next_batch):
    run_job_resilient(connect, copy_next_batch)
''', "the checkpoint matched the data"),
    "retry on the same dead connection": ("db_down", '''
def copy_next_batch(conn):
    return copy_batch_one_commit(conn)

def run_job(connect, copy_next_batch):
    conn = connect()
    for attempt in Retrying(retry=retry_if_exception_type(psycopg2.OperationalError),
                            stop=stop_after_attempt(5), reraise=True):
        with attempt:
            while copy_next_batch(conn) is not None:
                pass
    conn.close()
''', "the job reconnected on its own and finished"),
    "row lock released before the write": ("concurrent_access", '''
def worker_locked(conn, batches):
    with conn.cursor() as cur:
        for _ in range(batches):
            cur.execute("SELECT last_id FROM checkpoints WHERE job = %s FOR UPDATE", (JOB,))
            last_id = cur.fetchone()[0]
            conn.commit()  # the lock goes with this commit
            new_last = copy_batch(cur, last_id)
            if new_last is None:
                break
            set_checkpoint(cur, new_last)
            conn.commit()

def worker_compare_and_set(conn, batches):
    worker_compare_and_set_reference(conn, batches)

from fail_checkpoint_corruption import worker_compare_and_set as worker_compare_and_set_reference
''', "row lock (FOR UPDATE): each batch copied exactly once"),
    "lease taken without checking the heartbeat": ("interrupted_recovery", '''
def claim_job(conn, owner, lease_s):
    with conn.cursor() as cur:
        cur.execute("UPDATE checkpoints SET status = 'in_progress', owner = %s, "
                    "heartbeat = clock_timestamp(), version = version + 1 "
                    "WHERE job = %s RETURNING version", (owner, JOB))
        row = cur.fetchone()
    conn.commit()
    return row[0] if row else None

def write_batch(conn, token):
    return write_batch_fenced(conn, token)
''', "a live owner's lease is not taken"),
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
