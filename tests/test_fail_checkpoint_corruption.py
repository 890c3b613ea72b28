"""fail_checkpoint_corruption.py, run as a user runs it, against each target."""
import inspect
import json
import multiprocessing
import os
import re

import pytest
from prometheus_client import CollectorRegistry, Counter

import conftest
import fail_checkpoint_corruption as lab
from common import killpoints
from common.fixes import source_of
from common.scenario import _REGISTRY
from conftest import (on_both_targets, assert_gives_the_handout, assert_every_slot_has_a_control, assert_passed, clean_env, grade, lab_schemas, run_control,
                      run_script, scraped, write_solution)

SCRIPT = "fail_checkpoint_corruption.py"
IDS = ["corruption", "db_down", "concurrent_access", "interrupted_recovery", "late_commit"]


@pytest.fixture(scope="module")
def full_run(target, tmp_path_factory):
    """One run of the script per target, shared by the end-to-end tests below."""
    name, env, params = target
    folder = tmp_path_factory.mktemp(f"checkpoint-{name}")
    result = run_script(SCRIPT, "--metrics", "metrics", env=env, tmp_path=folder)
    result.metrics = folder / "metrics" / "fail_checkpoint_corruption"  # the .prom files, by scenario and run
    return name, result, params


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
    assert m["kill_points_seen_by"] == ("system calls" if killpoints._tracer_arch() else "python hooks")

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


DETECTORS = {  # each scenario's detector: its name, its kind, and the first thing it found
    "corruption": ("CheckpointTorn", "metric", "checkpoint_restores_total{outcome=torn} = 1"),
    "db_down": ("ids_copied_twice", "sql", "1001, 2"),
    "concurrent_access": ("checkpoint_race", "sql", "moved back, 3, 500, 1000"),
    "interrupted_recovery": ("find_stuck_runs_past_lease", "python", "orders_copy, "),
}


def test_every_detector_fires_on_the_broken_state_and_is_quiet_after_the_fix(full_run):
    _, result, _ = full_run
    assert list(DETECTORS) == IDS[:4]  # late_commit's: in test_late_commit.py
    for scenario_id, (check, kind, first) in DETECTORS.items():
        record = result.scenario(scenario_id)
        detection = record["detection"]
        assert (detection["check"], detection["kind"]) == (check, kind), scenario_id
        assert detection["fired"] is True and detection["quiet_after_fix"] is True, (scenario_id, detection)
        assert detection["found_broken"][0].startswith(first), (scenario_id, detection["found_broken"])
        assert detection["found_after_fix"] == [] and detection["runbook"], scenario_id
        assert "How to detect it" in record["sections"]["root_cause"], scenario_id
    found = {i: result.scenario(i)["detection"]["found_broken"] for i in DETECTORS}
    assert found["db_down"][-1] == "... and 495 more"  # the 500 ids of batch 3, twice each
    assert found["concurrent_access"][-1] == "... and 496 more"  # one move back, 500 ids twice
    assert len(found["interrupted_recovery"]) == 1  # the one run, its owner dead
    metrics = result.scenario("corruption")["metrics"]
    assert metrics["naive"][-1]['checkpoint_restores_total{outcome="torn"}'] == 1
    assert 'checkpoint_restores_total{outcome="torn"}' not in metrics["fixed"][-1]


def test_the_alert_rules_pass_promtool_on_the_series_this_run_recorded(full_run, tmp_path):
    """The checked-in rule tests are the ones this run generates (the counts do not depend on
    timing), and promtool passes them; with the fixed run's series in the naive test, it fails."""
    import subprocess
    import sys

    import yaml

    from conftest import ROOT
    from promtool import Unavailable, promtool

    sys.path.insert(0, str(ROOT / "alerts"))
    import generate

    _, result, _ = full_run
    text = generate.test_document(result.journal)
    if result.scenario("corruption")["measurements"]["kill_points_seen_by"] == "system calls":
        # generated where kill points are system calls; python hooks see more points (each write)
        assert text == (ROOT / "alerts" / "fail_checkpoint_corruption.test.yml").read_text(encoding="utf-8")
    try:
        tool = promtool()
    except Unavailable as exc:
        pytest.skip(str(exc))
    rules = ROOT / "alerts" / "fail_checkpoint_corruption.rules.yml"
    (tmp_path / rules.name).write_text(rules.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "t.test.yml").write_text(text, encoding="utf-8")
    got = subprocess.run([tool, "test", "rules", "t.test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert got.returncode == 0, got.stdout + got.stderr
    doc = yaml.safe_load(text)
    doc["tests"][0]["input_series"] = doc["tests"][1]["input_series"]
    (tmp_path / "t.test.yml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    got = subprocess.run([tool, "test", "rules", "t.test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert got.returncode != 0


def assert_the_detector_runs_last(record: dict) -> None:
    """The recovery ends with the detector's run on the recovered state, quiet: it is the last
    step of 🔧 (in its blocks and its printed text) and its claim the last one the scenario makes."""
    check = record["detection"]["check"]
    ran = f"Run the SQL check {check} again"
    steps = [b["text"] for b in record["blocks"]["recovery"] if b["kind"] == "step"]
    assert steps[-1] == ran, steps
    numbered = re.findall(r"^ *\d+\. (.*)$", record["sections"]["recovery"], re.M)
    assert numbered[-1].startswith(ran), numbered
    last = record["checks"][-1]
    assert (last["phase"], last["ok"], last["claim"]) == \
        ("recovered", True, f"the detector {check} is quiet after the recovery"), record["checks"][-3:]


def test_concurrent_access_ends_its_recovery_with_the_detector_quiet(full_run):
    assert_the_detector_runs_last(full_run[1].scenario("concurrent_access"))


def exported(folder, scenario_id: str) -> dict[str, dict[str, float]]:
    """What --metrics wrote for a scenario, parsed as Prometheus reads it: {run: {series: value}}."""
    from common.metrics import series_name

    return {phase: {series_name(name, dict(labels)): value
                    for (name, labels), value in scraped(folder, scenario_id, phase).items()}
            for phase in ("naive", "fixed")}


def job_figures(copied, behind, skipped) -> dict[str, float]:
    return {"pipeline_rows_copied_total": copied, 'pipeline_checkpoint_lag_rows{state="behind"}': behind,
            'pipeline_checkpoint_lag_rows{state="skipped"}': skipped}


EVENTS_WRITTEN = lab.EVENTS + 2  # late_commit: the backlog, then A's event and B's
JOB_METRICS = {  # what each job exports at the end of its naive run and of its fixed run, by what the journal measured
    "db_down": lambda m: (  # the naive restart copied batch 3 again; the fix ran once per fault, from empty
        job_figures(lab.SOURCE_ROWS + m["rows_duplicated_before"], 0, 0),
        job_figures(lab.SOURCE_ROWS * len([k for k in m if k.startswith("after_reconnect_")]), 0, 0)),
    "interrupted_recovery": lambda m: (  # the killed run's batches; then worker 2's and the restart's
        job_figures(m["killed_run"]["rows"], lab.SOURCE_ROWS - m["killed_run"]["checkpoint"], 0),
        job_figures(m["late_write"]["checkpoint"] - m["killed_run"]["rows"],
                    lab.SOURCE_ROWS - m["late_write"]["checkpoint"], 0)),
    "late_commit": lambda m: (  # the lag counts A's late event as skipped: the watermark passed it
        job_figures(EVENTS_WRITTEN - len(m["events_missing_before"]), 0, len(m["events_missing_before"])),
        job_figures(EVENTS_WRITTEN - len(m["events_missing_after"]), 0, len(m["events_missing_after"]))),
}


def test_the_jobs_export_what_the_journal_measured(full_run):
    """--metrics writes each job's rows copied, lag and last success, naive run and fixed run; parsed
    as Prometheus parses them, they are the figures the journal measured. The naive late_commit's
    lag shows the skipped event; the killed run of interrupted_recovery never succeeded."""
    from datetime import datetime

    _, result, _ = full_run
    started = datetime.fromisoformat(result.journal["started_at"].replace("Z", "+00:00")).timestamp()
    ended = started + result.journal["seconds"]
    for scenario_id, expect in JOB_METRICS.items():
        record = result.scenario(scenario_id)
        got = exported(result.metrics, scenario_id)
        for phase, figures in zip(("naive", "fixed"), expect(record["measurements"])):
            assert {k: got[phase][k] for k in figures} == figures, (scenario_id, phase, got[phase])
            assert got[phase] == record["metrics"][phase][-1], (scenario_id, phase)  # the journal's last sample
        success = {phase: got[phase]["pipeline_last_success_timestamp_seconds"] for phase in got}
        if scenario_id == "interrupted_recovery":
            assert success["naive"] == 0, success  # killed, then the naive restart refused: no run succeeded
        else:
            assert started - 1 <= success["naive"] <= success["fixed"], (scenario_id, success, started)
        assert started - 1 <= success["fixed"] <= ended + 1, (scenario_id, success, ended)


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


def test_a_fault_that_never_lands_fails_fast_with_its_reason(target, tmp_path):
    """With the proxy's faults disabled (FAILLAB_NO_FAULTS=1), db_down must stop on the claim that
    its outage landed, not hang, crash or pass; the other scenarios inject no switchable fault
    (their kills and races are real either way) and still pass."""
    result = run_script(SCRIPT, env={**target[1], "FAILLAB_NO_FAULTS": "1"}, timeout=180, tmp_path=tmp_path)
    assert result.returncode == 1 and result.journal is not None, result.stderr[-3000:]
    records = {r["id"]: r for r in result.journal["scenarios"]}
    assert list(records) == IDS
    record = records["db_down"]
    assert record["status"] == "failed" and record["triggered"] is False and record["cleaned"] is True
    assert record["reason"] == "stopped early: the connection dropped between the data and its checkpoint", \
        record["reason"]
    assert all(records[i]["status"] == "passed" for i in IDS if i != "db_down"), \
        {i: r.get("reason") for i, r in records.items()}
    assert lab_schemas(target[2], result.journal["run_id"]) == []


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
    ("interrupted_recovery", "find_stuck_runs", "find_stuck_runs() finds nothing while worker 2 is alive"),
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


LEASE_OK = '''
def claim_job(conn, owner, lease_s):
    return claim_with_lease(conn, owner, lease_s)

def write_batch(conn, token):
    return write_batch_fenced(conn, token)
'''


# A check that waits for a silence of 5 minutes when the lease is 1 s: on the broken state it finds
# nothing, and the scenario fails on the claim that its detector fires.
STUCK_AFTER_5_MIN = '''
def find_stuck_runs(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT job, owner FROM checkpoints WHERE status = 'in_progress' "
                    "AND heartbeat < clock_timestamp() - interval '5 minutes'")
        return cur.fetchall()
''' + LEASE_OK


def test_a_detector_that_waits_longer_than_the_lease_finds_nothing_and_fails(target, tmp_path):
    _, env, params = target
    write_solution(tmp_path, SCRIPT, "interrupted_recovery", STUCK_AFTER_5_MIN)
    result = grade(SCRIPT, "interrupted_recovery", tmp_path, env)
    record = result.scenario("interrupted_recovery")
    assert result.returncode == 1 and record["mode"] == "exercise", result.stdout[-3000:]
    assert record["detection"]["fired"] is False and record["triggered"] is False
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    assert failed == ["the detector find_stuck_runs fires on the broken state"], failed
    assert record["recovered"] is True and record["cleaned"] is True  # only the detector was wrong
    assert lab_schemas(params, result.journal["run_id"]) == []


# Savers that overwrite the checkpoint in place, each through another API (the kill points must
# catch them all, wherever the OS sees their writes).
def save_with_pathlib(path, state):
    path.write_text(json.dumps(state), encoding="utf-8")


def save_with_os_write(path, state):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(state).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def save_truncate_then_write(path, state):
    os.truncate(path, 0)
    with open(path, "r+", encoding="utf-8") as f:
        f.write(json.dumps(state))


def as_save_checkpoint(saver) -> str:
    """A saver's source as a student's save_checkpoint."""
    return inspect.getsource(saver).replace(f"def {saver.__name__}(", "def save_checkpoint(", 1)


TEMP_FILE_WRITTEN = '''
import shutil

def save_checkpoint(path, state):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
'''
WRONG = {
    "temp file copied into place": ("corruption", TEMP_FILE_WRITTEN + '''\
    shutil.copyfile(tmp, path)  # not one step: the copy truncates the checkpoint first
''' + RESUME_OK, "always left a whole checkpoint"),
    "pathlib write_text in place": ("corruption", as_save_checkpoint(save_with_pathlib) + RESUME_OK, "always left a whole checkpoint"),
    "os.open and os.write in place": ("corruption", as_save_checkpoint(save_with_os_write) + RESUME_OK, "always left a whole checkpoint"),
    "os.truncate, then write": ("corruption", as_save_checkpoint(save_truncate_then_write) + RESUME_OK, "always left a whole checkpoint"),
    "temp file never renamed into place": ("corruption", TEMP_FILE_WRITTEN + RESUME_OK,
                                           "not killed, save_checkpoint() saved the new checkpoint"),
    "checkpoint never trusted, only the data": ("corruption", SAVE_OK + '''
def resume_point(conn, text):
    with conn.cursor() as cur:
        return gap_free_until(cur)
''', "resume_point() trusted the good file"),
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
    # Exactly once too, but optimistic (a version check, no lock): the slot claims a row lock.
    "version check in the row-lock slot": ("concurrent_access", '''
worker_locked = worker_compare_and_set
''', "row lock (FOR UPDATE): the second worker's read of the checkpoint waited on the first one's lock"),
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

def find_stuck_runs(conn):
    return find_stuck_runs_past_lease(conn)
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


# -- kill points where the OS sees writes: whatever API a saver writes through --------------------
def save_with_os_replace_of_a_copy(path, state):
    """Atomic through other APIs: pathlib for the temp file, os.replace for the swap."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(json.dumps(state).encode())
    os.replace(tmp, path)


class Sweeper:
    """What kill_sweep uses of a scenario: a folder and a way to start a process."""

    def __init__(self, folder):
        self.tmpdir, self.procs = folder, []

    def counter(self, name, doc, labels=()):
        return Counter(name, doc, labels, registry=CollectorRegistry())

    def spawn(self, target, *args):
        proc = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    spawn_many = spawn  # the scenario's fork server only saves start-up time; a spawned child is the same


OLD, NEW = {"job": lab.JOB, "last_id": 1000}, {"job": lab.JOB, "last_id": 1500}


def sweep_with(saver, mode, tmp_path, monkeypatch) -> dict:
    """The lesson's kill sweep of `saver`, its kill points placed by `mode`; it must end whole."""
    if mode == "python hooks":
        monkeypatch.setenv(killpoints.MODE_VARIABLE, "python")
    elif killpoints._tracer_arch() is None:
        pytest.skip("system call tracing needs Linux on x86_64 or aarch64")
    sweep = lab.kill_sweep(Sweeper(tmp_path), saver, OLD, NEW)
    assert sweep["seen_by"] == mode and sweep["crashed"] is None and sweep["finished"] == "new", sweep
    return sweep
IN_PLACE = [lab.save_checkpoint_in_place, save_with_pathlib, save_with_os_write, save_truncate_then_write]


@pytest.mark.parametrize("mode", ["system calls", "python hooks"])
@pytest.mark.parametrize("saver", IN_PLACE, ids=[f.__name__ for f in IN_PLACE])
def test_an_in_place_saver_is_caught_whatever_api_it_writes_through(saver, mode, tmp_path, monkeypatch):
    sweep = sweep_with(saver, mode, tmp_path, monkeypatch)
    torn = [p for p, o in sweep["points"].items() if o not in ("old", "new")]
    assert torn, sweep  # a kill between its truncation and its last write: no valid checkpoint
    assert lab.read_back(tmp_path / "kills" / "checkpoint.json", OLD, NEW)[0] == "new"


ATOMIC = [lab.save_checkpoint_atomic, save_with_os_replace_of_a_copy]


@pytest.mark.parametrize("mode", ["system calls", "python hooks"])
@pytest.mark.parametrize("saver", ATOMIC, ids=[f.__name__ for f in ATOMIC])
def test_an_atomic_saver_meets_a_kill_point_at_each_operation_and_survives(saver, mode, tmp_path, monkeypatch):
    sweep = sweep_with(saver, mode, tmp_path, monkeypatch)
    assert set(sweep["points"].values()) <= {"old", "new"} and sweep["points"][1] == "old", sweep
    assert len(sweep["points"]) == len(sweep["operations"]), sweep  # one kill per operation
    kinds = " ".join(sweep["operations"])
    assert "write" in kinds and ("rename" in kinds), sweep["operations"]


# -- the checks checked: the lesson run from a tiny wrapper with one function patched --------------
BREAK_BEFORE = '''
real, calls = lab.{name}, []
def broken(first, *args):  # break the recovered state, then let the check look at it
    calls.append(1)
    if len(calls) > {skip}:  # the calls before the recovery look at the broken run: left alone
        conn = getattr(first, "conn", first)
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute({statement!r})
        conn.commit()
    return real(first, *args)
lab.{name} = broken
'''
MISSING, DOUBLED = "DELETE FROM target_rows WHERE id = 1234", "INSERT INTO target_rows SELECT * FROM target_rows WHERE id = 1234"
STALE, BEHIND = "UPDATE target_rows SET amount = amount + 1 WHERE id = 1234", "UPDATE checkpoints SET last_id = last_id - 1"
AHEAD = "UPDATE checkpoints SET last_id = last_id + 500"
LOCKED = "row lock (FOR UPDATE): each batch copied exactly once"
BROKEN_STATES = {  # what is broken, just before which call (after how many), the claim that must fail
    "corruption, a row missing": ("corruption", "prove_exactly_once", 0, MISSING, "missing 1, duplicated 0"),
    "corruption, a row stale": ("corruption", "prove_exactly_once", 0, STALE, "equals source_rows by count and checksum"),
    "corruption, the checkpoint a batch ahead at the re-run": ("corruption", "copy_batch_one_commit", 0, AHEAD,
                                                               "the re-run copied the"),
    "db_down, a row doubled": ("db_down", "prove_exactly_once", 0, DOUBLED, "missing 0, duplicated 1"),
    "db_down, a row doubled after the repair": ("db_down", "exactly_once", 0, DOUBLED,
                                                "after the repair, target_rows equals source_rows again"),
    "db_down, a row doubled after a drop": ("db_down", "exactly_once", 1, DOUBLED, "the checkpoint matched the data"),
    "concurrent_access, a row doubled": ("concurrent_access", "exactly_once", 0, DOUBLED, LOCKED),
    "concurrent_access, the checkpoint one behind": ("concurrent_access", "damage", 1, BEHIND, LOCKED),
    "concurrent_access, a row doubled under compare-and-set": ("concurrent_access", "exactly_once", 1, DOUBLED,
                                                               "compare-and-set on version: each batch copied"),
    "interrupted_recovery, a row missing": ("interrupted_recovery", "prove_exactly_once", 0, MISSING, "missing 1"),
    "interrupted_recovery, a late write doubled": ("interrupted_recovery", "damage", 0, DOUBLED, "late write was refused"),
}


def run_patched(tmp_path, scenario_id: str, patch: str, env: dict):
    return conftest.run_patched(SCRIPT, scenario_id, patch, env, tmp_path)


def assert_the_claim_fails(result, scenario_id: str, claim: str) -> None:
    """The run of `scenario_id` (alone, as --only ran it) failed on the recovery claim `claim`,
    and only there: the failure was triggered, everything cleaned, no lab error."""
    assert [r["id"] for r in result.journal["scenarios"]] == [scenario_id]
    record = result.scenario(scenario_id)
    assert result.returncode == 1 and record["triggered"] is True and record["cleaned"] is True, result.stdout[-3000:]
    failed = [c["claim"] for c in record["checks"] if c["phase"] == "recovered" and not c["ok"]]
    assert any(claim in c for c in failed), failed
    assert not [e for e in record["observed_errors"] if e["type"].startswith("common.")], record["observed_errors"]


@pytest.mark.parametrize("name, target", on_both_targets(BROKEN_STATES, lambda n: BROKEN_STATES[n][0]),
                         indirect=["target"])
def test_a_recovery_check_fails_when_the_state_it_guards_is_broken(name, target, tmp_path):
    scenario_id, function, skip, statement, claim = BROKEN_STATES[name]
    patch = BREAK_BEFORE.format(name=function, skip=skip, statement=statement)
    assert_the_claim_fails(run_patched(tmp_path, scenario_id, patch, target[1]), scenario_id, claim)


# Where the call before the check takes no connection: the scenario's own, remembered from the
# call that builds its tables, breaks the state at the n-th call of `name` only.
BREAK_AT_CALL = '''
seen, calls, real = {{}}, [], lab.{name}
def remembering(build):
    def wrapped(s, *args, **kwargs):
        seen["s"] = s
        return build(s, *args, **kwargs)
    return wrapped
lab.fresh_pipeline, lab.fresh_events = remembering(lab.fresh_pipeline), remembering(lab.fresh_events)
def broken(*args, **kwargs):
    calls.append(1)
    if len(calls) == {at}:
        conn = seen["s"].conn
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute({statement!r})
        conn.commit()
    return real(*args, **kwargs)
lab.{name} = broken
'''
# db_down: the drop has landed in a run of the fixed job; the committed checkpoint moves one back
# before the job reconnects and reads it
BEHIND_AFTER_A_DROP = '''
real_failed = lab.Outage.failed
def failed(self, conn, exc):
    landed = self.landed
    real_failed(self, conn, exc)
    if self.landed and not landed and self.s.phase == "recovered" and self.point == "write":
        with self.watch.cursor() as cur:
            cur.execute("UPDATE checkpoints SET last_id = last_id - 1")
lab.Outage.failed = failed
'''
PATCHED_STATES = {  # what is broken, by which patch, the claim that must fail
    "corruption, a row gone before the rewind": ("corruption", BREAK_AT_CALL.format(  # words(): its 7th call
        name="words", at=7, statement="DELETE FROM target_rows WHERE id = 2000"), "the rewind removed the"),
    "db_down, the checkpoint one behind after a drop": ("db_down", BEHIND_AFTER_A_DROP,
                                                        "before the checkpoint write: reconnecting, the job found"),
    "interrupted_recovery, a row missing when worker 2 took over": ("interrupted_recovery", BREAK_AT_CALL.format(
        # words(): its 1st call, as worker 2 starts batch 3: a row of batch 1, committed long before
        name="words", at=1, statement="DELETE FROM target_rows WHERE id = 234"), "worker 2 resumed after id 1000"),
    "interrupted_recovery, the checkpoint a batch ahead at the takeover": ("interrupted_recovery", BREAK_AT_CALL.format(
        name="words", at=2, statement=AHEAD), "the restart copied the"),  # words(): 2nd call, worker 2 paused
}


@pytest.mark.parametrize("name", list(PATCHED_STATES))
def test_a_recovery_check_fails_when_a_patch_breaks_what_it_guards(name, embedded_params, tmp_path):
    scenario_id, patch, claim = PATCHED_STATES[name]
    assert_the_claim_fails(run_patched(tmp_path, scenario_id, patch, clean_env()), scenario_id, claim)


CANCEL_INSTEAD_OF_DROP = '''
def cancel_instead(self, conn, text):  # the statement is cancelled (57014); the connection lives
    if self.point == "write" and self.armed and self.data_inserts >= 3 and lab.is_checkpoint_write(text):
        self.armed = False
        with conn.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = '10ms'")
            cur.execute("SELECT pg_sleep(1)")
lab.Outage.before_execute = cancel_instead
'''


def test_a_cancelled_statement_does_not_pass_for_a_lost_connection(embedded_params, tmp_path):
    result = run_patched(tmp_path, "db_down", CANCEL_INSTEAD_OF_DROP, clean_env())
    record = result.scenario("db_down")
    assert "57014" in result.sqlstates("db_down"), record["observed_errors"]
    assert result.returncode == 1 and record["triggered"] is False and record["cleaned"] is True
    assert record["reason"] == "stopped early: the connection dropped between the data and its checkpoint", \
        record["reason"]
