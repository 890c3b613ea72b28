"""fail_retry_exhaustion.py: end to end on both targets, its negative controls and wrong exercise
solutions through the command line, plus its helpers against a real server."""
from __future__ import annotations

import random
import re
import socket
import threading

import psycopg2
import psycopg2.errors
import pytest
from tenacity import stop_after_delay, stop_before_delay, wait_exponential, wait_fixed

from common import db
from conftest import (on_both_targets, assert_gives_the_handout, assert_control_fails, assert_every_slot_has_a_control, assert_passed, clean_env, grade,
                      lab_schemas, run_control, run_script, write_solution)

import conftest
import fail_retry_exhaustion as lab
from common.faults import FaultProxy
from common.fixes import source_of

SCRIPT = "fail_retry_exhaustion.py"
IDS = ["exhaustion", "storm", "backoff_calculation", "non_transient", "poison_job", "hung_attempt"]


# The storm's two measurements a machine too busy to time it can blur, each measured again in
# rounds, then failed by name with its figures (exit 1): the wall of logins, and the spread.
BLURRED = {"storm": (re.compile(r"the wall of logins met the \d+ free sessions .+ allows: \d+ logins in the "
                                r"busiest 50 ms, \d+ refused, \d+ logged by the \d+ workers \(one for every "
                                r"eight wanted\), in round {n} of at most {n}".format(n=lab.STORM_ROUNDS)),
                     re.compile(r"the real storm showed the spread the policy plans, measured {n} time\(s\): no "
                                r"jitter peak \d+, \d+ refused, the fix peak \d+, \d+ refused, \d+ logged by its "
                                r"\d+ workers \(fewer than one for every eight wanted\)".format(n=lab.STORM_ROUNDS)))}


def inconclusive(result, scenario_id: str) -> bool:
    """A timing a scenario depends on (the storm's wall of logins, its spread) may be blurred on a
    machine too busy to time it: after its last round the run fails (exit 1) on that one named
    claim, with its figures, and stops there; it never passes or skips by luck. True only for
    exactly that failure: any other failed claim, a skip or a crash is not."""
    record = result.scenario(scenario_id)
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    if result.returncode != 1 or record["status"] != "failed" or len(failed) != 2 or not record["cleaned"]:
        return False
    claim, stop = failed
    return stop == f"stopped early: {claim}" and record["reason"] == stop and \
        any(pattern.fullmatch(claim) for pattern in BLURRED.get(scenario_id, ()))


@pytest.fixture(scope="module")
def full_run(target, tmp_path_factory):
    """One run of the script per target, shared by the end-to-end tests below."""
    name, env, params = target
    return run_script(SCRIPT, env=env, tmp_path=tmp_path_factory.mktemp(f"retry-{name}")), params


def test_every_scenario_demonstrates_recovers_and_cleans(full_run):
    """One run per target (embedded and the shared server), read through its journal."""
    result, params = full_run
    timed = ("storm",)
    if result.journal and any(inconclusive(result, sid) for sid in timed):  # exit 1, on that claim only
        assert [r["id"] for r in result.journal["scenarios"]] == IDS
        assert all(r["status"] == "passed" or (r["id"] in timed and inconclusive(result, r["id"]))
                   for r in result.journal["scenarios"]), result.stdout[-3000:]
        assert lab_schemas(params, result.journal["run_id"]) == []
    else:
        assert_passed(result, params, IDS)
    m = {r["id"]: r["measurements"] for r in result.journal["scenarios"]}

    # exhaustion: RetryError hides the cause; the dead letter is replayed exactly once, though the
    # first replay's session was ended between the work and the mark
    assert result.error_types("exhaustion")[:3] == ["tenacity.RetryError", "psycopg2.OperationalError",
                                                    "psycopg2.OperationalError"]
    assert len(result.error_types("exhaustion")) == 4  # the ended replay's error
    retry_error, cause = (e["message"] for e in result.scenario("exhaustion")["observed_errors"][:2])
    assert re.fullmatch(r"RetryError\[<Future at 0x[0-9a-f]+ state=finished raised OperationalError>\]", retry_error)
    assert cause.splitlines()[0] not in retry_error
    assert m["exhaustion"]["attempts_before_giving_up"] == 5
    assert m["exhaustion"]["policy_seconds"] >= 0.15  # it really slept 10 + 20 + 40 + 80 ms
    assert m["exhaustion"]["unit_runs"] == 1

    # storm: the policy's own schedule (a function of --seed, not of timing) spreads the logins
    storm = m["storm"]
    if not inconclusive(result, "storm") or "planned_peak_50ms_fix" in storm:  # made after the wall of logins
        assert storm["planned_peak_50ms_no_jitter"] == lab.STORM_WORKERS
        assert 2 * storm["planned_peak_50ms_fix"] <= storm["planned_peak_50ms_no_jitter"]
    if not inconclusive(result, "storm"):
        assert storm["no_jitter_peak"] > storm["no_jitter_rejected"] > 0
        assert result.error_types("storm") == ["psycopg2.OperationalError"]
        if "a role of their own" in result.scenario("storm")["sections"]["description"]:  # else the proxy's cap
            assert "too many connections for role" in result.scenario("storm")["observed_errors"][0]["message"]
    conn = db.connect(params, autocommit=True)
    try:  # the workers' role went with the run
        roles = db.scalar(conn, "SELECT count(*) FROM pg_roles WHERE rolname LIKE %s",
                          (f"{db.SCHEMA_PREFIX}{result.journal['run_id']}%",))
    finally:
        conn.close()
    assert roles == 0

    # backoff_calculation: time.sleep refuses an uncapped sleep, the hand-capped loop overflows at
    # attempt 1024, ms read as s, late stops on the lab's clock; the policy in the slot meets every
    # bound. Nothing here depends on the machine's speed: never inconclusive.
    backoff = m["backoff_calculation"]
    assert result.error_types("backoff_calculation")[:2] == ["OverflowError", "OverflowError"]
    assert backoff["hand_capped_sleeps"] == 1023
    assert backoff["ms_as_seconds_sleep_s"] == lab.RETRY_DELAY_MS
    assert backoff["naive_worst_case_s"] > lab.DEADLINE_S >= backoff["policy_worst_case_s"]
    assert backoff["policy_worst_attempts"] == lab.ATTEMPTS and backoff["policy_longest_sleep_s"] == lab.CAP_S
    assert backoff["stop_after_delay_gave_up_at_s"] == backoff["stop_before_delay_gave_up_at_s"] == 301
    assert backoff["policy_gave_up_at_s"] == 251 <= lab.DEADLINE_S

    # non_transient: the permanent error once instead of five times; the deadlock retried to success
    fixed = m["non_transient"]
    assert fixed["permanent_error_attempts_naive"] == 5 and fixed["permanent_error_attempts_fixed"] == 1
    assert fixed["deadlock_attempts"] == 2
    assert fixed["order_42_payments"] == 2 and fixed["order_43_payments"] == 1
    assert result.sqlstates("non_transient") == ["42P01", "42P01", "40P01"]
    assert fixed["contract_errors_raised"] == 8  # 42P01, a lost session, 22P02, 23505, 57014, 40001, 57P01, 08P01
    recovery = result.scenario("non_transient")["sections"]["recovery"]
    for code in ("22P02", "23505", "57014", "40001", "08P01"):
        assert code in recovery


DETECTORS = {"exhaustion": ("metric", "PipelineUnitLost", ["lost, 1.0"]),
             "storm": ("python", "find_login_storm", None),
             "backoff_calculation": ("metric", "RetrySleepPastBounds", None),
             "non_transient": ("sql", "orders_charged_twice", ["42, 2"])}


def test_every_detector_fires_on_the_damage_and_is_quiet_after_the_fix(full_run):
    """Each scenario's detector ran against the naive run's state (it fired, on what the damage
    really was) and again after the recovery (quiet)."""
    result, _ = full_run
    for scenario_id, (kind, check, found) in DETECTORS.items():
        record = result.scenario(scenario_id)
        if inconclusive(result, scenario_id):  # stopped before its root cause, or before the detector's second run
            continue
        detection = record["detection"]
        assert (detection["kind"], detection["check"]) == (kind, check), scenario_id
        assert detection["fired"] is True and detection["quiet_after_fix"] is True, (scenario_id, detection)
        assert detection["found_after_fix"] == [] and detection["runbook"], scenario_id
        if found is not None:
            assert detection["found_broken"] == found, (scenario_id, detection["found_broken"])
    if not inconclusive(result, "storm"):
        run, workers, refused = result.scenario("storm")["detection"]["found_broken"][0].split(", ")
        assert run.startswith("no jitter") and 8 * int(refused) >= int(workers) > 0
    bounds = dict(line.split(", ") for line in result.scenario("backoff_calculation")["detection"]["found_broken"])
    assert set(bounds) == {"cap", "deadline"}


HEADLINES = {  # the figure the summary shows for each scenario; the storm's refusals vary with timing
    "exhaustion": {"name": "attempts_before_giving_up", "value": "5"},
    "storm": {"name": "no_jitter_rejected"},
    "backoff_calculation": {"name": "naive_worst_case_s"},
    "non_transient": {"name": "order_42_payments", "value": "2"},
}


def test_each_scenario_gives_the_handout_its_headline_lesson_questions_and_notes(full_run):
    result, _ = full_run
    assert list(HEADLINES) == IDS[:4]  # the handouts of poison_job and hung_attempt: in their own files
    # an inconclusive scenario stops before its headline and its prevention
    assert_gives_the_handout(result, {i: h for i, h in HEADLINES.items() if not inconclusive(result, i)})


# -- negative controls: the naive code back in each slot must fail a named claim ---------------------
CONTROLS = [
    ("exhaustion", "run_unit", "the job exits with EX_TEMPFAIL"),
    ("exhaustion", "replay_dead_letters", "done and marked, or neither"),
    ("storm", "storm_policy", "the policy spreads the workers"),
    ("storm", "find_login_storm", "the detector find_login_storm_naive is quiet after the recovery"),
    ("backoff_calculation", "backoff_policy", "every sleep within the 30 s cap"),
    ("non_transient", "is_transient", "the permanent error fails on its first attempt"),
    ("non_transient", "pay_and_refresh", "order 43 is charged exactly once"),
]


@pytest.mark.parametrize("scenario_id, slot, claim", CONTROLS, ids=[f"{c[0]}-{c[1]}" for c in CONTROLS])
def test_negative_control_fails_with_the_claim_it_breaks(scenario_id, slot, claim, target, tmp_path):
    run_control(SCRIPT, scenario_id, slot, claim, target, tmp_path)


def test_every_slot_has_a_control():
    from test_hung_attempt import CONTROLS as HUNG  # run in their own files
    from test_poison_job import CONTROLS as POISON

    assert_every_slot_has_a_control(SCRIPT, CONTROLS + [("poison_job", *c) for c in POISON]
                                    + [("hung_attempt", *c) for c in HUNG])


@pytest.mark.parametrize("scenario_id, slot, alert", [("exhaustion", "run_unit", "PipelineUnitLost"),
                                                      ("backoff_calculation", "backoff_policy", "RetrySleepPastBounds")])
def test_the_alert_still_fires_when_the_naive_code_runs_the_recovery(embedded_params, tmp_path, scenario_id, slot, alert):
    """The metric alerts watch the job, not the lab: with the naive code back in the slot, the
    recovery's own run counts a lost unit (or a sleep past its bounds) and the alert fires again."""
    result = run_script(SCRIPT, "--only", scenario_id, "--control", slot, tmp_path=tmp_path)
    detection = result.scenario(scenario_id)["detection"]
    assert detection["check"] == alert and detection["fired"] is True
    assert detection["quiet_after_fix"] is False and detection["found_after_fix"], detection
    failed = [c["claim"] for c in result.scenario(scenario_id)["checks"] if not c["ok"]]
    assert f"the detector {alert} is quiet after the recovery" in failed


def run_patched(tmp_path, env, scenario_id: str, patch: str):
    """Run one scenario of the lesson with `patch` applied: a bug, or a fault that does not land,
    made on purpose."""
    return conftest.run_patched(SCRIPT, scenario_id, patch, env, tmp_path)


BROKEN = {  # what breaks, the patch that breaks it, and the claim that must then fail
    "a refund that refunds nothing (order 42 still charged twice)": (
        "lab.refund_repeated_charges = lambda conn, order_id: []",
        ["order 42 is charged once", "the detector orders_charged_twice is quiet after the recovery"]),
    "a refund that refunds every charge of the order": (
        "def refund_all(conn, order_id):\n"
        "    with conn.cursor() as cur:\n"
        "        cur.execute('DELETE FROM payments WHERE order_id = %s RETURNING id', (order_id,))\n"
        "        ids = [r[0] for r in cur.fetchall()]\n"
        "    conn.commit()\n"
        "    return ids\n"
        "lab.refund_repeated_charges = refund_all",
        ["order 42 is charged once"]),
    "a garbled message that never garbles (08P01 never raised)": (
        "from common import faults\nfaults.FaultProxy.garble_next_query = lambda self: None",
        ["the server raised every error of the contract"]),
    "a classifier that calls 57014 transient": (
        "lab.TRANSIENT_SQLSTATES.add('57014')",
        ["is_transient agrees with the contract on all 8 errors; it disagrees on 57014"]),
}


@pytest.mark.parametrize("what", list(BROKEN))
def test_a_broken_recovery_or_a_fault_that_did_not_land_fails_its_named_claim(embedded_params, tmp_path, what):
    patch, claims = BROKEN[what]
    result = run_patched(tmp_path, clean_env(), "non_transient", patch)
    record = result.scenario("non_transient")
    assert result.returncode == 1 and record["status"] == "failed" and record["cleaned"] is True
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    for claim in claims:
        assert any(c.startswith(claim) for c in failed), (claim, failed)
    assert lab_schemas(embedded_params, result.journal["run_id"]) == []


def test_a_storm_whose_limit_never_came_into_force_fails_on_that_claim(target, tmp_path):
    """The lesson run from a wrapper whose ALTER ROLE ... CONNECTION LIMIT never runs (and whose
    proxy cap is off): the limit read back is not the one wanted, and the storm stops on that
    claim instead of calling the run inconclusive."""
    _, env, params = target
    result = run_patched(tmp_path, env, "storm", "lab.set_connection_limit = lambda admin, role, limit: None\n"
                         "lab.faults_enabled = lambda: False  # the proxy's cap, where there is no role")
    record = result.scenario("storm")
    assert result.returncode == 1 and record["status"] == "failed", result.stdout[-3000:]
    assert record["reason"].startswith("stopped early: the connection limit came into force"), record["reason"]
    assert record["cleaned"] is True and lab_schemas(params, result.journal["run_id"]) == []


BLURRED_STORMS = {  # a measurement that never comes out, forced: (the patch, the claim the run stops on)
    "the wall of logins": ("lab.storm_policy_naive = lab.storm_policy_jittered  # no lockstep: no wall, in any round",
                           "the wall of logins met the"),
    "the spread": ("lab.spread_out = lambda naive, fixed, workers: False  # a machine too busy, in every round",
                   "the real storm showed the spread the policy plans"),
}


@pytest.mark.parametrize("what", list(BLURRED_STORMS))
def test_a_storm_measurement_that_never_comes_out_fails_on_its_claim_with_its_figures(embedded_params, tmp_path, what):
    """Measured again in every round it has, and still not there: the run fails on that claim, with
    the last round's figures, and exits 1 (never a skip, never exit 0)."""
    patch, claim = BLURRED_STORMS[what]
    result = run_patched(tmp_path, clean_env(), "storm", patch)
    record = result.scenario("storm")
    assert result.returncode == 1 and record["status"] == "failed", result.stdout[-3000:]
    assert record["reason"].startswith(f"stopped early: {claim}"), record["reason"]
    assert inconclusive(result, "storm")  # its last round's figures: what the other tests accept, and no more
    assert (record["triggered"], record["recovered"]) == ((False, False) if claim.startswith("the wall") else
                                                          (True, False))
    assert record["cleaned"] is True and lab_schemas(embedded_params, result.journal["run_id"]) == []


def test_an_exercise_graded_on_a_blurred_storm_fails_and_exits_1(embedded_params, tmp_path):
    """A student's policy that fails a claim, graded on a machine too busy to show the spread: the
    grade is NOT YET and the exit status 1, with both failures named."""
    write_solution(tmp_path, SCRIPT, "storm", next(code for name, _, code in WRONG["storm"]
                                                   if name == "jitter from the module's shared random"))
    wrapper = tmp_path / "patched_lesson.py"
    wrapper.write_text(conftest.PATCHED_LESSON.format(root=str(conftest.ROOT), module=SCRIPT[:-3],
                                                      patch=BLURRED_STORMS["the spread"][0]), encoding="utf-8")
    result = run_script(str(wrapper), "--exercise", "storm", env=clean_env(), tmp_path=tmp_path)
    record = result.scenario("storm")
    assert record["mode"] == "exercise" and result.returncode == 1 and record["status"] == "failed", \
        result.stdout[-3000:]
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    assert any("drawn from the generator it is given" in c for c in failed), failed
    assert any(c.startswith("stopped early: the real storm showed the spread") for c in failed), failed
    assert not inconclusive(result, "storm") and "NOT YET" in result.stdout
    assert record["cleaned"] is True and lab_schemas(embedded_params, result.journal["run_id"]) == []


# -- every recovery check checked: the state it guards broken just before it looks ------------------
BREAK = '''
real_{name}, calls_{name} = lab.{name}, []
def broken_{name}(*args, **kwargs):  # lab.{name} as the lesson calls it, with the state broken
    calls_{name}.append(1)
    n, conn = len(calls_{name}), getattr(args[0], "conn", args[0])
    def sql(statement):  # on the scenario's connection
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute(statement)
        conn.commit()
    if {before!r} and {when}:
        {code}
    result = real_{name}(*args, **kwargs)
    if not {before!r} and {when}:
        {code}
    return result
lab.{name} = broken_{name}
'''


BROKEN_STATES = {  # what is broken: (lab function, `code` run before or after the call when `when`
    #                 holds, n: the call's number, args: its arguments; the claim that must then fail)
    "exhaustion, the dead letter one attempt short": ("run_job", "after", "n == 2",
        "sql('UPDATE dead_letter SET attempts = attempts - 1')", "is parked with its real error and 5 attempts"),
    "exhaustion, the ended replay's mark without its work": ("batch_state", "before", "n == 4",
        "sql('UPDATE dead_letter SET replayed_at = now()')", "done and marked, or neither"),
    "exhaustion, a row of the replayed unit missing": ("batch_state", "before", "n == 5",
        "sql('DELETE FROM target_rows WHERE id = 61')", "loaded and marked: ran 1 time(s), 9 of 10 rows"),
    "exhaustion, the replayed unit run twice": ("batch_state", "before", "n == 5",
        "sql(\"INSERT INTO unit_runs (unit) VALUES ('batch-0007')\")", "loaded and marked: ran 2 time(s)"),
    "exhaustion, the replayed unit left pending": ("batch_state", "before", "n == 5",
        "sql('UPDATE dead_letter SET replayed_at = NULL')", "10 of 10 rows equal to source, 1 dead letter"),
    "storm, a worker's batch written twice in the jittered run": ("run_storm", "after",
        "args[3].startswith('fix')", "result['rows'] += 1", "every one of the"),
    "backoff_calculation, the worst case one sleep past the cap": ("drive", "after", "n == 3",
        "result['sleeps'][-1] = lab.CAP_S + 1", "every sleep within the 30 s cap"),
    "backoff_calculation, the same seed drawing other sleeps": ("drive", "after", "n == 5",
        "result['sleeps'] = [0.9 * x for x in result['sleeps']]", "drawn from the generator the policy is given"),
    "backoff_calculation, the slow stop one sleep and one attempt later": ("drive", "after", "n == 7",
        "result['gave_up_at'] += lab.CAP_S + lab.ATTEMPT_TIMEOUT_S", "given up within the 300 s deadline"),
    "backoff_calculation, the policy at 1:1000 one sleep off": ("drive", "after", "n == 8",
        "result['sleeps'][-1] *= 2", "at 1:1000 it is the same policy"),
    "non_transient, order 43 charged twice": ("in_transaction", "after",
        "args[1] is lab.record_payment and args[2:] == (43,)", "real_in_transaction(*args)",
        "order 43 is charged exactly once"),
    "non_transient, a transfer applied twice": ("transfer", "after", "args[1] == 1", "real_transfer(*args[:4])",
        "each transfer applied exactly once"),
    "poison_job, another job done twice": ("queue_state", "before", "n == 2",
        "sql('INSERT INTO job_effects SELECT * FROM job_effects WHERE job_id = 5')",
        "every other job done exactly once: 6 of 7"),
    "poison_job, a worker of the dead letter not killed": ("queue_state", "before", "n == 2",
        "sql('UPDATE worker_exits SET exit_code = 0 WHERE pid = (SELECT workers[1] FROM dead_jobs)')",
        "the dead letter names the 3 workers that took job 1, each reported killed"),
    "hung_attempt, the unit applied twice": ("ledger_of", "before", "n == 1",
        "sql(\"INSERT INTO ledger (unit, amount) VALUES ('unit-2', 25)\")", "unit-2 is in the ledger 2 time(s)"),
}


@pytest.mark.parametrize("name, target", on_both_targets(BROKEN_STATES, lambda n: n.split(",")[0]),
                         indirect=["target"])
def test_a_recovery_check_fails_when_the_state_it_guards_is_broken(name, target, tmp_path):
    """Each recovery claim of each scenario, shown to fail when what it guards is broken (a row
    missing, doubled, stale, a figure off) just before it looks; the failure itself still shown."""
    function, position, when, code, claim = BROKEN_STATES[name]
    patch = BREAK.format(name=function, before=position == "before", when=when, code=code)
    scenario_id = name.split(",")[0]
    result = run_patched(tmp_path, target[1], scenario_id, patch)
    record = result.scenario(scenario_id)
    if inconclusive(result, scenario_id):  # the storm on a machine too busy to time it
        pytest.skip(record["reason"])
    assert result.returncode == 1 and record["triggered"] is True and record["cleaned"] is True, \
        result.stdout[-3000:]
    failed = [c["claim"] for c in record["checks"] if c["phase"] == "recovered" and not c["ok"]]
    assert any(claim in c for c in failed), (claim, failed)
    assert lab_schemas(target[2], result.journal["run_id"]) == []


# -- faults that do not land: FAILLAB_NO_FAULTS=1 makes the proxy's outage a no-op -------------------
FAULT_NOT_LANDED = {  # each scenario stops on the claim that its outage landed
    "exhaustion": "stopped early: the outage landed: the proxy refused the job's connections to batch-0007",
    "storm": "stopped early: the outage landed: the proxy dropped the connections of 0 of the ",
    "backoff_calculation": "stopped early: the outage landed: every attempt through the proxy failed (0 of 34",
    "non_transient": "stopped early: the outage landed: the report's connection failed after the payment",
}


def test_every_scenario_whose_outage_does_not_land_fails_on_that_claim(target, tmp_path):
    """Without its fault a scenario must neither pass, nor crash on what the fault should have
    left (no RetryError, no sleeps), nor call the outage that never came an inconclusive timing."""
    result = run_script(SCRIPT, env={**target[1], "FAILLAB_NO_FAULTS": "1"}, tmp_path=tmp_path, timeout=180)
    assert result.returncode == 1 and result.journal is not None, result.stderr[-3000:]
    records = {r["id"]: r for r in result.journal["scenarios"]}
    assert list(records) == IDS
    for scenario_id, reason in FAULT_NOT_LANDED.items():
        record = records[scenario_id]
        assert record["cleaned"] is True, (scenario_id, record.get("reason"))
        if scenario_id == "storm" and record.get("reason", "").startswith("not run: no room"):
            continue  # a crowded shared server gave the storm no room: not run, which fails too, but not the fault
        assert record["status"] == "failed" and record["triggered"] is False, (scenario_id, record.get("reason"))
        assert record["reason"].startswith(reason), (scenario_id, record["reason"])
    assert lab_schemas(target[2], result.journal["run_id"]) == []


def test_a_replay_that_waits_for_the_lock_is_right_too(target, tmp_path):
    """FOR UPDATE without SKIP LOCKED: the second replayer waits for the first one's commit, then
    finds nothing left to do. Slower, but exactly once: graded as passing. Its SQL is written in
    lower case over several lines, which the lab's hooks must read as well as the lesson's."""
    _, env, params = target
    replay = source_of(lab.replay_dead_letters)
    for upper, lower in (('"SELECT unit FROM dead_letter"', '"select unit\\n  from dead_letter"'),
                         ("FOR UPDATE SKIP LOCKED", "for update"), ('"UPDATE dead_letter', '"update\\n  dead_letter')):
        assert upper in replay
        replay = replay.replace(upper, lower)
    write_solution(tmp_path, SCRIPT, "exhaustion", "run_unit = run_unit_dead_letter\n\n" + replay)
    result = grade(SCRIPT, "exhaustion", tmp_path, env)
    assert result.returncode == 0 and result.scenario("exhaustion")["status"] == "passed", result.stdout[-3000:]
    assert lab_schemas(params, result.journal["run_id"]) == []


def test_the_naive_replay_runs_the_unit_again(target, tmp_path):
    """The control of the replay: the ended session left the work committed and the mark not, so
    the next replay ran the unit again."""
    _, env, params = target
    result = run_script(SCRIPT, "--only", "exhaustion", "--control", "replay_dead_letters", env=env, tmp_path=tmp_path)
    assert_control_fails(result, params, "exhaustion", "ran exactly once")
    assert result.scenario("exhaustion")["measurements"]["unit_runs"] == 3  # the ended replay, then both replayers


# -- wrong solutions a student would plausibly write, graded as a student grades them ---------------
WRONG = {
    "backoff_calculation": [
        ("no cap", "every sleep within the 30 s cap", '''
def backoff_policy(rng, scale=1.0):
    return Retrying(wait=wait_full_jitter(rng, multiplier=BASE_S * scale),
                    stop=stop_after_attempt(ATTEMPTS) | stop_before_delay(DEADLINE_S * scale),
                    retry=retry_if_exception_type(psycopg2.OperationalError), reraise=True)
'''),
        ("no jitter", "drawn from the generator the policy is given", '''
def backoff_policy(rng, scale=1.0):
    return Retrying(wait=wait_exponential(multiplier=BASE_S * scale, max=CAP_S * scale),
                    stop=stop_after_attempt(ATTEMPTS) | stop_before_delay(DEADLINE_S * scale),
                    retry=retry_if_exception_type(psycopg2.OperationalError), reraise=True)
'''),
        ("no stop", "gives up after at most 12 attempts", '''
def backoff_policy(rng, scale=1.0):
    return Retrying(wait=wait_full_jitter(rng, multiplier=BASE_S * scale, max=CAP_S * scale),
                    retry=retry_if_exception_type(psycopg2.OperationalError), reraise=True)
'''),
        ("a stop on attempts only", "given up within the 300 s deadline", '''
def backoff_policy(rng, scale=1.0):
    return Retrying(wait=wait_full_jitter(rng, multiplier=BASE_S * scale, max=CAP_S * scale),
                    stop=stop_after_attempt(ATTEMPTS),
                    retry=retry_if_exception_type(psycopg2.OperationalError), reraise=True)
'''),
        ("stop_after_delay in place of stop_before_delay", "given up within the 300 s deadline", '''
def backoff_policy(rng, scale=1.0):
    return Retrying(wait=wait_full_jitter(rng, multiplier=BASE_S * scale, max=CAP_S * scale),
                    stop=stop_after_attempt(ATTEMPTS) | stop_after_delay((DEADLINE_S - ATTEMPT_TIMEOUT_S) * scale),
                    retry=retry_if_exception_type(psycopg2.OperationalError), reraise=True)
'''),
        ("a deadline that counts the next sleep, not the next attempt", "given up within the 300 s deadline", '''
def backoff_policy(rng, scale=1.0):
    return Retrying(wait=wait_full_jitter(rng, multiplier=BASE_S * scale, max=CAP_S * scale),
                    stop=stop_after_attempt(ATTEMPTS) | stop_before_delay(DEADLINE_S * scale),
                    retry=retry_if_exception_type(psycopg2.OperationalError), reraise=True)
'''),
        ("jitter from the module's shared random", "drawn from the generator the policy is given", '''
def backoff_policy(rng, scale=1.0):
    return Retrying(wait=wait_random_exponential(multiplier=BASE_S * scale, max=CAP_S * scale),
                    stop=stop_after_attempt(ATTEMPTS) | stop_before_delay((DEADLINE_S - ATTEMPT_TIMEOUT_S) * scale),
                    retry=retry_if_exception_type(psycopg2.OperationalError), reraise=True)
'''),
    ],
    "storm": [
        ("no stop: a login that keeps failing is retried for ever", "gives up on a login that keeps failing", '''
def storm_policy(rng):
    return Retrying(wait=wait_full_jitter(rng, multiplier=STORM_BASE_S, max=STORM_CAP_S),
                    retry=retry_if_exception(is_transient), reraise=True)
'''),
        ("every error retried, not only transient ones", "retries only transient errors", '''
def storm_policy(rng):
    return Retrying(wait=wait_full_jitter(rng, multiplier=STORM_BASE_S, max=STORM_CAP_S),
                    stop=stop_before_delay(STORM_GIVE_UP_S), reraise=True)
'''),
        ("no reraise=True: a RetryError in place of the real error", "raises the login's own error", '''
def storm_policy(rng):
    return Retrying(wait=wait_full_jitter(rng, multiplier=STORM_BASE_S, max=STORM_CAP_S),
                    stop=stop_before_delay(STORM_GIVE_UP_S), retry=retry_if_exception(is_transient))
'''),
        ("every worker's jitter seeded alike", "the policy spreads the workers", '''
def storm_policy(rng):
    return Retrying(wait=wait_full_jitter(random.Random(42), multiplier=STORM_BASE_S, max=STORM_CAP_S),
                    stop=stop_before_delay(STORM_GIVE_UP_S), retry=retry_if_exception(is_transient),
                    reraise=True)
'''),
        ("jitter from the module's shared random", "drawn from the generator it is given", '''
find_login_storm = find_login_storm

def storm_policy(rng):
    return Retrying(wait=wait_random_exponential(multiplier=STORM_BASE_S, max=STORM_CAP_S),
                    stop=stop_before_delay(STORM_GIVE_UP_S), retry=retry_if_exception(is_transient),
                    reraise=True)
'''),
    ],
    "exhaustion": [
        ("the RetryError's text parked as the error", "parked with its real error", '''
def run_unit(params, dlq, unit):
    try:
        LOAD_POLICY(load_batch_via, params, unit)
        return 0
    except RetryError as exc:
        with dlq.cursor() as cur:
            cur.execute("INSERT INTO dead_letter (job, unit, error_type, error, attempts) "
                        "VALUES (%s, %s, %s, %s, %s)", (JOB, unit, type(exc).__name__, str(exc), 5))
        dlq.commit()
        return EXIT_TEMPFAIL
'''),
        ("the mark committed before the work", "done and marked, or neither", '''
run_unit = run_unit_dead_letter

def replay_dead_letters(conn):
    done = []
    while True:
        with conn.cursor() as cur:
            cur.execute("UPDATE dead_letter SET replayed_at = now() WHERE id = (SELECT id FROM dead_letter "
                        "WHERE job = %s AND replayed_at IS NULL ORDER BY id LIMIT 1) RETURNING unit", (JOB,))
            row = cur.fetchone()
        conn.commit()
        if row is None:
            return done
        with conn.cursor() as cur:
            load_batch(cur, row[0])
        conn.commit()
        done.append(row[0])
'''),
    ],
    "exhaustion, concurrent": [
        ("a replay whose read locks nothing", "two replayers at once replayed batch-0007 once",
         "run_unit = run_unit_dead_letter\n\n" + source_of(lab.replay_dead_letters).replace(" FOR UPDATE SKIP LOCKED", "")),
    ],
    "non_transient": [
        ("every database error retried", "the permanent error fails on its first attempt", '''
pay_and_refresh = pay_once_retry_refresh

def is_transient(exc):
    return isinstance(exc, psycopg2.Error)
'''),
        ("every OperationalError retried, 08P01 and 57014 included", "is_transient agrees with the contract", '''
pay_and_refresh = pay_once_retry_refresh

def is_transient(exc):
    return isinstance(exc, psycopg2.OperationalError) or getattr(exc, "pgcode", None) in TRANSIENT_SQLSTATES
'''),
        ("a lost connection, which has no SQLSTATE, not retried", "the failed refresh retried", '''
pay_and_refresh = pay_once_retry_refresh

def is_transient(exc):
    return isinstance(exc, psycopg2.Error) and exc.pgcode in TRANSIENT_SQLSTATES
'''),
    ],
}
WRONG_CASES = [(sid.split(",")[0], name, claim, code) for sid, cases in WRONG.items() for name, claim, code in cases]


@pytest.mark.parametrize("scenario_id, name, claim, code", WRONG_CASES, ids=[f"{c[0]}: {c[1]}" for c in WRONG_CASES])
def test_a_wrong_solution_fails_with_the_claim_it_breaks(target, tmp_path, scenario_id, name, claim, code):
    _, env, params = target
    write_solution(tmp_path, SCRIPT, scenario_id, code)  # a slot it leaves alone: the lesson's fix, imported
    result = grade(SCRIPT, scenario_id, tmp_path, env)
    record = result.scenario(scenario_id)
    if inconclusive(result, scenario_id):  # a shared server that took the wall of logins one by one
        pytest.skip(record["reason"])
    assert record["mode"] == "exercise" and result.returncode == 1, result.stdout[-3000:]
    assert record["triggered"] is True and record["cleaned"] is True and record["recovered"] is False
    failed = [c["claim"] for c in record["checks"] if c["phase"] == "recovered" and not c["ok"]]
    assert any(claim in c for c in failed), f"failed claims {failed}, wanted one with {claim!r}"
    assert "NOT YET" in result.stdout
    assert lab_schemas(params, result.journal["run_id"]) == []


# -- is_transient, against errors a real server raised ------------------------------------------
@pytest.fixture
def scratch(embedded_params):
    """A private schema on the embedded server, dropped afterwards; yields (params, schema)."""
    admin = db.connect(embedded_params, autocommit=True)
    schema = f"{db.SCHEMA_PREFIX}{db.new_run_id()}_classify"
    db.create_schema(admin, schema)
    try:
        yield embedded_params, schema
    finally:
        db.drop_schema(admin, schema)
        admin.close()


def raised_by(conn, statement: str) -> psycopg2.Error:
    with pytest.raises(psycopg2.Error) as info:
        with conn.cursor() as cur:
            cur.execute(statement)
    conn.rollback()
    return info.value


def test_permanent_errors_are_not_transient(scratch):
    params, schema = scratch
    conn = db.connect(params, schema=schema)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE t (id int PRIMARY KEY)")
            cur.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        errors = {"42P01": raised_by(conn, "SELECT * FROM no_such_table"),
                  "23505": raised_by(conn, "INSERT INTO t VALUES (1)"),
                  "22012": raised_by(conn, "SELECT 1 / 0"),
                  "42601": raised_by(conn, "SELEC 1")}
    finally:
        conn.close()
    assert {code: e.pgcode for code, e in errors.items()} == {code: code for code in errors}
    assert not any(lab.is_transient(e) for e in errors.values())
    assert all(lab.is_transient_naive(e) for e in errors.values())  # what the naive predicate gets wrong


def garbled(params: dict):
    """Send one query through a fault proxy told to garble it: (what the server raised, the
    result of a second query on the same session)."""
    admin = db.connect(params)
    try:
        with FaultProxy.in_front_of(admin) as proxy:
            conn = db.connect(proxy.params(params), sslmode="disable")
            try:
                proxy.garble_next_query()
                error = lab.error_of(conn, "SELECT 1")
                after = db.scalar(conn, "SELECT 2")
            finally:
                conn.close()
    finally:
        admin.close()
    return error, after


def test_a_protocol_violation_from_a_real_server_is_not_transient(embedded_params):
    """The proxy garbles one Query message; the server answers ERROR 08P01, which psycopg2 keeps
    (it is an ERROR, not a FATAL), and the session goes on."""
    error, after = garbled(embedded_params)
    assert isinstance(error, psycopg2.errors.ProtocolViolation) and error.pgcode == "08P01"
    assert isinstance(error, psycopg2.OperationalError)  # what "retry every OperationalError" would retry
    assert "invalid string in message" in str(error) and after == 2
    assert not lab.is_transient(error)


def test_the_proxy_garbles_nothing_without_faults(embedded_params, monkeypatch):
    monkeypatch.setenv("FAILLAB_NO_FAULTS", "1")
    assert garbled(embedded_params) == (None, 2)


def test_a_statement_cancelled_by_its_timeout_is_not_transient(scratch):
    params, schema = scratch
    conn = db.connect(params, schema=schema)
    try:
        error = lab.error_of(conn, "SET LOCAL statement_timeout = '20ms'", "SELECT pg_sleep(5)")
    finally:
        conn.close()
    assert isinstance(error, psycopg2.errors.QueryCanceled) and error.pgcode == "57014"
    assert isinstance(error, psycopg2.OperationalError) and not lab.is_transient(error)


def test_a_refused_connection_is_transient():
    with socket.socket() as probe:  # a port nobody listens on: bind, note it, close it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(psycopg2.OperationalError) as info:
        psycopg2.connect(host="127.0.0.1", port=port, dbname="x", user="x", connect_timeout=2)
    assert info.value.pgcode is None
    assert lab.is_transient(info.value)


def test_a_login_error_carries_no_sqlstate(embedded_params):
    """Why is_transient cannot match 53300 or 57P03: psycopg2 gives a login error no SQLSTATE."""
    with pytest.raises(psycopg2.OperationalError) as info:
        db.connect({**embedded_params, "dbname": "faillab_no_such_database"})
    assert "does not exist" in str(info.value) and info.value.pgcode is None


def test_serialization_failure_is_transient(scratch):
    params, schema = scratch
    a, b = db.connect(params, schema=schema), db.connect(params, schema=schema, autocommit=True)
    try:
        with b.cursor() as cur:
            cur.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
            cur.execute("INSERT INTO t VALUES (1, 0)")
        a.set_session(isolation_level="REPEATABLE READ")
        with a.cursor() as cur:
            cur.execute("SELECT v FROM t WHERE id = 1")  # a's snapshot starts here
        with b.cursor() as cur:
            cur.execute("UPDATE t SET v = 1 WHERE id = 1")
        error = raised_by(a, "UPDATE t SET v = 2 WHERE id = 1")
    finally:
        a.close()
        b.close()
    assert isinstance(error, psycopg2.errors.SerializationFailure) and error.pgcode == "40001"
    assert lab.is_transient(error)


def test_deadlock_is_transient(scratch):
    params, schema = scratch
    setup = db.connect(params, schema=schema, autocommit=True)
    with setup.cursor() as cur:
        cur.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int)")
        cur.execute("INSERT INTO accounts VALUES (1, 0), (2, 0)")
    setup.close()
    barrier, caught = threading.Barrier(2, timeout=10), []

    def lock_in_order(first: int, second: int) -> None:
        conn = db.connect(params, schema=schema)
        try:
            with conn.cursor() as cur:
                cur.execute("SET deadlock_timeout = '50ms'")
                cur.execute("UPDATE accounts SET balance = 1 WHERE id = %s", (first,))
                barrier.wait()
                cur.execute("UPDATE accounts SET balance = 1 WHERE id = %s", (second,))
            conn.commit()
        except psycopg2.Error as exc:
            caught.append(exc)
            conn.rollback()
        finally:
            conn.close()

    workers = [threading.Thread(target=lock_in_order, args=pair) for pair in ((1, 2), (2, 1))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    assert [e.pgcode for e in caught] == ["40P01"]
    assert lab.is_transient(caught[0])


def test_a_terminated_session_is_transient(scratch):
    """The fault the replay meets: its session ended by pg_terminate_backend."""
    params, schema = scratch
    victim, admin = db.connect(params, schema=schema), db.connect(params, autocommit=True)
    try:
        pid = db.scalar(victim, "SELECT pg_backend_pid()")  # the server's (a pooler's differs)
        victim.rollback()
        db.scalar(admin, "SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg2.OperationalError) as info:
            for _ in range(50):  # the backend takes a moment to go
                with victim.cursor() as cur:
                    cur.execute("SELECT pg_sleep(0.05)")
                victim.rollback()
    finally:
        victim.close()
        admin.close()
    assert lab.is_transient(info.value)


def test_only_database_errors_are_classified():
    assert not lab.is_transient(ValueError("not a database error"))
    assert not lab.is_transient(OSError("connection reset"))  # a retry decision for another layer


# -- the backoff arithmetic ----------------------------------------------------------------------
def test_human_names_the_largest_unit_that_fits():
    assert lab.human(2 ** 30) == "34.0 years" and lab.human(2 ** 20) == "12.1 days"
    assert lab.human(1024) == "17.1 min" and lab.human(3600) == "1.0 h" and lab.human(59.5) == "59.50 s"


def test_backoff_schedule_follows_the_policy():
    assert lab.backoff_schedule(wait_exponential(multiplier=1, max=10), 7) == [1, 2, 4, 8, 10, 10]
    assert lab.backoff_schedule(wait_fixed(0.5), 4) == [0.5, 0.5, 0.5]
    assert lab.backoff_schedule(wait_fixed(1), 1) == []
    naive = lab.backoff_schedule(lab.wait_naive, 31)
    assert naive[0] == 2 and naive[29] == 2 ** 30
    assert lab.backoff_schedule(lab.wait_naive, 1024)[-1] == 2.0 ** 1023  # the largest power of two a float holds
    with pytest.raises(OverflowError):
        lab.backoff_schedule(lab.wait_naive, 1025)
    capped = lab.backoff_schedule(lab.wait_hand_capped, 1024)
    assert capped[:5] == [2, 4, 8, 16, lab.CAP_S] and set(capped[4:]) == {lab.CAP_S}
    with pytest.raises(OverflowError):  # the hand-written cap comes too late
        lab.backoff_schedule(lab.wait_hand_capped, 1025)
    assert lab.backoff_schedule(wait_exponential(multiplier=1, max=30), 1025)[-1] == 30  # tenacity's guard


def test_full_jitter_stays_in_its_window_and_follows_the_seed():
    def draws(seed):
        return lab.backoff_schedule(lab.wait_full_jitter(random.Random(seed), multiplier=1, max=30), 12)
    windows = lab.backoff_schedule(wait_exponential(multiplier=1, max=30), 12)
    assert all(0 <= d <= w for d, w in zip(draws(5), windows))
    assert draws(5) == draws(5) and draws(5) != draws(6)


def test_the_bounded_policy_worst_case_fits_the_deadline():
    """The fixed policy over a step that always fails, every jitter draw at the top of its window;
    its sleeps are recorded instead of slept."""
    def always_fails():
        raise psycopg2.OperationalError("server closed the connection unexpectedly")

    run = lab.drive(lab.backoff_bounded(lab.TopOfWindow()), always_fails)
    assert isinstance(run["raised"], psycopg2.OperationalError)  # reraise: the real error, not a RetryError
    assert run["attempts"] == lab.ATTEMPTS
    assert run["sleeps"] == [1, 2, 4, 8, 16] + [lab.CAP_S] * (lab.ATTEMPTS - 6)
    assert sum(run["sleeps"]) <= lab.DEADLINE_S
    naive = lab.drive(lab.backoff_naive(lab.TopOfWindow()), always_fails)
    assert naive["attempts"] == lab.RUNAWAY_ATTEMPTS  # it never stops: the lab's own bound ended it


def test_the_lab_clock_decides_the_stops_the_same_way_every_time():
    """Every draw at the top of its window, each attempt costing 20 s on the lab's clock: the
    stops decide on that clock, not on the machine's, so the figures are exact."""
    def always_fails():
        raise psycopg2.OperationalError("lock timeout")

    def gave_up_at(stop):
        return lab.drive(lab.capped_jitter_until(stop, lab.TopOfWindow()), always_fails,
                         attempt_s=lab.ATTEMPT_TIMEOUT_S)["gave_up_at"]

    assert gave_up_at(stop_after_delay(lab.DEADLINE_S)) == 301  # sleeps to 281, then a 20 s attempt
    assert gave_up_at(stop_before_delay(lab.DEADLINE_S)) == 301  # counts the sleep, not the attempt
    assert gave_up_at(stop_after_delay(lab.DEADLINE_S - lab.ATTEMPT_TIMEOUT_S)) == 301
    assert gave_up_at(stop_before_delay(lab.DEADLINE_S - lab.ATTEMPT_TIMEOUT_S)) == 251
    run = lab.drive(lab.backoff_bounded(lab.TopOfWindow()), always_fails, attempt_s=lab.ATTEMPT_TIMEOUT_S)
    assert run["gave_up_at"] == 251 and run["attempts"] == 8 and sum(run["sleeps"]) == 91
    assert [lab.drive(lab.backoff_bounded(lab.TopOfWindow()), always_fails,
                      attempt_s=lab.ATTEMPT_TIMEOUT_S)["gave_up_at"] for _ in range(3)] == [251] * 3


def test_the_policies_draw_from_the_generator_they_are_given():
    def always_fails():
        raise psycopg2.OperationalError("down")

    def sleeps(policy):
        return lab.drive(policy, always_fails)["sleeps"]

    assert sleeps(lab.backoff_bounded(random.Random(1))) == sleeps(lab.backoff_bounded(random.Random(1)))
    assert sleeps(lab.backoff_bounded(random.Random(1))) != sleeps(lab.backoff_bounded(random.Random(2)))
    seeds = [random.Random(n).getrandbits(64) for n in range(4)]
    assert lab.planned_first_logins(lab.storm_policy_jittered, seeds) == \
        lab.planned_first_logins(lab.storm_policy_jittered, seeds)


def test_the_planned_storm_follows_the_policy():
    seeds = [random.Random(n).getrandbits(64) for n in range(lab.STORM_WORKERS)]
    lockstep = lab.planned_first_logins(lab.storm_policy_naive, seeds)
    assert lockstep == pytest.approx([0.35] * lab.STORM_WORKERS)  # 50 + 100 + 200 ms: every worker at once
    spread = lab.planned_first_logins(lab.storm_policy_jittered, seeds)
    assert all(t >= lab.STORM_OUTAGE_S for t in spread)
    assert 2 * lab.peak_in_window(spread) <= lab.peak_in_window(lockstep) == lab.STORM_WORKERS
    assert spread == lab.planned_first_logins(lab.storm_policy_jittered, seeds)  # a function of the seeds


def test_peak_in_window():
    assert lab.peak_in_window([]) == 0
    assert lab.peak_in_window([0.0, 0.01, 0.02, 0.2]) == 3
    assert lab.peak_in_window([0.0, 0.05, 0.1], width=0.05) == 2  # both ends of a window count
    assert lab.peak_in_window([0.3, 0.0, 0.31, 0.32]) == 3  # order does not matter


def test_the_histogram_adds_up_to_the_table():
    """Rows before the outage's end hold the attempts sent while it was down, the rows after the
    logins that reached the server, so a student can add them up to the table's columns."""
    back = lab.STORM_OUTAGE_S + 0.001
    run = {"back": back, "times": [0.0, 0.05, 0.2999, back - 0.0005, back, 0.35, 0.351, 0.9]}
    rows = lab.histogram([run])
    counts = [int(r[1].split()[-1]) for r in rows]
    split = [n for n, r in enumerate(rows) if "(back)" in r[0]][0]
    assert sum(counts[:split]) == 4 and sum(counts[split:]) == 4
    assert rows[split][0].strip().startswith(f"{round(1000 * lab.STORM_OUTAGE_S)} ms")
