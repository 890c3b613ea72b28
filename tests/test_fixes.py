"""The verdicts are honest: a crash fails its phase, a control fails, an exercise is graded.

Uses the fixture script tests/fixtures/fail_broken.py, run as a user runs it."""
import logging
import sys
from pathlib import Path

import psycopg2
import pytest

from common.exercise import logging_reports
from conftest import ROOT, run_script

BROKEN = "tests/fixtures/fail_broken.py"


@pytest.mark.parametrize("scenario_id, phase", [
    ("crash_in_trigger", "triggered"),
    ("crash_in_recovery", "recovered"),
    ("unfinished_after_pass", "recovered"),
    ("crash_in_worker", "recovered"),  # a worker thread's error: no pass, though every claim held
])
def test_a_crash_or_an_early_stop_after_passing_checks_fails_its_phase(scenario_id, phase, tmp_path):
    result = run_script(BROKEN, "--only", scenario_id, tmp_path=tmp_path)
    record = result.scenario(scenario_id)
    assert result.returncode == 1
    assert record["status"] == "failed" and record[phase] is False
    assert any(c["ok"] for c in record["checks"]), "the fixture passes a check before it crashes"
    assert record["cleaned"] is True


def test_a_worker_thread_that_crashes_fails_the_scenario_by_name(tmp_path):
    result = run_script(BROKEN, "--only", "crash_in_worker", tmp_path=tmp_path)
    record = result.scenario("crash_in_worker")
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    assert result.returncode == 1 and record["triggered"] is True and record["recovered"] is False, failed
    assert failed == ["unexpected KeyError in worker the loader: 'missing'"], failed
    assert record["reason"] == failed[0] and record["cleaned"] is True


def test_the_fix_runs_through_its_slot_and_prevention_prints_it(tmp_path):
    result = run_script(BROKEN, "--only", "with_fix", tmp_path=tmp_path)
    record = result.scenario("with_fix")
    assert result.returncode == 0 and record["status"] == "passed" and record["mode"] == "fixed"
    assert record["fixes"] == {"insert_key": "__main__.insert_once"}
    assert "ON CONFLICT DO NOTHING" in record["sections"]["prevention"]


def test_a_negative_control_fails_with_the_claim_it_breaks(tmp_path):
    result = run_script(BROKEN, "--only", "with_fix", "--control", "insert_key", tmp_path=tmp_path)
    record = result.scenario("with_fix")
    assert result.returncode == 1 and record["mode"] == "control"
    assert record["triggered"] is True and record["recovered"] is False and record["cleaned"] is True
    assert [c["claim"] for c in record["checks"] if not c["ok"]] == [
        "key 1 is there exactly once", "the detector key_missing is quiet after the recovery"]
    assert record["fixes"] == {"insert_key": "__main__.insert_twice"}


def test_an_unknown_control_slot_is_a_usage_error(tmp_path):
    result = run_script(BROKEN, "--only", "with_fix", "--control", "nope", tmp_path=tmp_path, journal=False)
    assert result.returncode == 2 and "no fix slot nope" in result.stderr


def _exercise(tmp_path, *extra):
    return run_script(BROKEN, "--exercise", "with_fix", "--call-limit", "2", *extra, tmp_path=tmp_path)


SOLUTIONS = {
    "reference": ("def insert_key(conn):\n    with conn.cursor() as cur:\n"
                  "        cur.execute('INSERT INTO k VALUES (1) ON CONFLICT DO NOTHING')\n    conn.commit()\n", 0, None),
    "raises": ("def insert_key(conn):\n    raise RuntimeError('student bug')\n", 1, "RuntimeError: student bug"),
    "loops": ("def insert_key(conn):\n    while True:\n        pass\n", 1, "did not return within 2 s"),
    "waits in the server": ("def insert_key(conn):\n    conn.cursor().execute('SELECT pg_sleep(60)')\n", 1,
                            "did not return within 2 s"),
    "wrong": ("def insert_key(conn):\n    conn.commit()\n", 1, "key 1 is there exactly once"),
}


def test_exercise_start_never_overwrites_and_grades_the_starting_file_failed(tmp_path):
    start = _exercise(tmp_path)
    path = tmp_path / "exercises" / "fail_broken" / "with_fix.py"
    assert start.returncode == 0 and "exercises/fail_broken/with_fix.py" in start.stdout  # as typed from here
    text = path.read_text()
    assert "def insert_key(conn):" in text and "exactly once, without an error" in " ".join(text.split())
    assert "insert_twice" not in text  # renamed to the slot
    graded = _exercise(tmp_path)
    assert graded.returncode == 1 and "NOT YET" in graded.stdout
    assert graded.scenario("with_fix")["recovered"] is False
    assert path.read_text() == text


@pytest.mark.parametrize("name", list(SOLUTIONS))
def test_exercise_grades_a_solution(name, tmp_path):
    code, want_rc, want_reason = SOLUTIONS[name]
    path = tmp_path / "exercises" / "fail_broken" / "with_fix.py"
    path.parent.mkdir(parents=True)
    path.write_text("from fail_broken import *\n\n" + code)
    result = _exercise(tmp_path)
    record = result.scenario("with_fix")
    assert result.returncode == want_rc, result.stdout[-2000:]
    assert record["mode"] == "exercise" and record["cleaned"] is True
    assert ("PASSED" if want_rc == 0 else "NOT YET") in result.stdout
    if want_reason:
        assert record["recovered"] is False
        assert any(want_reason in c["claim"] for c in record["checks"] if not c["ok"]), record["checks"]
    assert record["seconds"] < 30


def test_hints_in_levels_and_the_solution(tmp_path):
    one = _exercise(tmp_path, "--hint")
    two = _exercise(tmp_path, "--hint", "2")
    solution = _exercise(tmp_path, "--solution")
    assert "Look at ON CONFLICT" in one.stdout and "DO NOTHING inserts" not in one.stdout
    assert "DO NOTHING inserts at most once" in two.stdout
    assert "def insert_key(conn):" in solution.stdout and "ON CONFLICT DO NOTHING" in solution.stdout
    assert not (tmp_path / "exercises").exists()  # asking for hints writes nothing


def test_list_marks_the_scenarios_with_exercises(tmp_path):
    listed = run_script(BROKEN, "--list", journal=False, tmp_path=tmp_path)
    lines = {ln.split()[0]: ln for ln in listed.stdout.splitlines()}
    assert "[exercise]" in lines["with_fix"] and "[exercise]" not in lines["passes"]


def test_a_skip_says_why_and_fails_nothing(tmp_path):
    result = run_script(BROKEN, "--only", "skips,passes", tmp_path=tmp_path)
    record = result.scenario("skips")
    assert record["status"] == "skipped" and record["reason"] == "needs PostgreSQL 99 or later"
    assert record["cleaned"] is True and result.returncode == 0
    assert "1 passed, 0 failed, 1 skipped" in result.stdout


# -- the grader as a student meets it ----------------------------------------------------------------
SLOTS = "tests/fixtures/fail_slots.py"


def _student_file(tmp_path, script: str, scenario_id: str, code: str):
    path = tmp_path / "exercises" / script / f"{scenario_id}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"from {script} import *  # noqa\n{code}")
    return path


@pytest.mark.parametrize("code", [
    "",  # only the lesson's import line: the lesson's own insert_once came in, but no insert_key
    "\ndef insert_kye(conn):\n    pass\n",  # misspelt
    "\ninsert_key = insert_once\n",  # the lesson's fix under the slot's name
])
def test_grading_takes_only_the_functions_the_students_file_defines(tmp_path, code):
    _student_file(tmp_path, "fail_broken", "with_fix", code)
    result = _exercise(tmp_path)
    assert result.returncode == 2 and result.journal is None, result.stdout[-2000:]
    assert result.stderr.count("\n") == 1 and "does not define insert_key() itself" in result.stderr
    assert "with_fix.py" in result.stderr and "Traceback" not in result.stderr


def test_a_slot_that_reaches_its_limit_is_named_and_never_called_again(tmp_path):
    """The scenario retries its slot after any error (as a job runner does); the student's loop
    keeps running SQL, so the limit cancels a query: the grade still names the time-out."""
    _student_file(tmp_path, "fail_slots", "retried", "\ndef count_keys(conn):\n    while True:\n"
                  "        with conn.cursor() as cur:\n            cur.execute('SELECT pg_sleep(0.05)')\n")
    result = run_script(SLOTS, "--exercise", "retried", "--call-limit", "1", tmp_path=tmp_path)
    record = result.scenario("retried")
    assert result.returncode == 1 and record["cleaned"] is True
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    assert "count_keys() did not return within 1 s" in failed, failed
    assert record["student"]["count_keys"]["calls"] == 1 and record["student"]["count_keys"]["timed_out"]
    assert "57014" not in " ".join(failed) and "QueryCanceled" not in result.stdout.split("Grade:")[1]


def _grade_own_steps(tmp_path, code: str, *flags):
    _student_file(tmp_path, "fail_slots", "own_steps", code)
    result = run_script(SLOTS, "--exercise", "own_steps", *flags, tmp_path=tmp_path)
    grade = result.stdout.split("Grade:")[1].split("What your code did")[0]
    own, yours = grade.split("The lesson's own recovery steps")[1].split("Your code, under the same fault:")
    return result, " ".join(own.split()), " ".join(yours.split())


def test_the_grade_shows_the_lessons_own_recovery_steps_apart_from_the_students_claims(tmp_path):
    """A claim made before the student's code ran, or an error the lesson raised itself after it,
    cannot depend on the student's code: it is not one of their ticks."""
    result, own, yours = _grade_own_steps(tmp_path, "\ndef insert_key(conn):\n    insert_guarded(conn)\n")
    assert result.returncode == 0 and "PASSED" in result.stdout, result.stdout[-2000:]
    assert yours == "✔ key 1 is there exactly once ✔ the detector key_missing is quiet after the recovery", yours
    assert own == "(before your code ran, or without it): ✔ k is empty before the fix runs ✔ UniqueViolation " \
                  "(SQLSTATE 23505) raised", own
    checks = [(c["phase"], c["claim"], c["yours"]) for c in result.scenario("own_steps")["checks"]]
    assert checks == [("triggered", "UniqueViolation (SQLSTATE 23505) raised", False),
                      ("triggered", "the detector key_missing fires on the broken state", False),
                      ("recovered", "k is empty before the fix runs", False),
                      ("recovered", "key 1 is there exactly once", True),
                      ("recovered", "UniqueViolation (SQLSTATE 23505) raised", False),
                      ("recovered", "the detector key_missing is quiet after the recovery", True)], checks


def test_a_claim_checked_after_the_students_code_was_stopped_is_not_credited(tmp_path):
    """The scenario goes on after the time limit stopped the student's code: what it checks then
    is what the lab did after the stop, not a tick for the student."""
    result, own, yours = _grade_own_steps(tmp_path, "\ndef insert_key(conn):\n    insert_guarded(conn)\n"
                                                    "    while True:\n        pass\n", "--call-limit", "1")
    assert result.returncode == 1 and "NOT YET" in result.stdout, result.stdout[-2000:]
    assert "✔ key 1 is there exactly once" not in yours and "✘ insert_key() did not return within 1 s" in yours
    assert "key 1 is there exactly once (not credited: checked after your code was stopped at its time " \
           "limit)" in yours, yours


def test_the_grade_tells_the_student_what_their_code_did(tmp_path):
    _student_file(tmp_path, "fail_broken", "with_fix", "\ndef insert_key(conn):\n    try:\n"
                  "        insert_twice(conn)\n    except Exception:\n        conn.rollback()\n")
    caught = _exercise(tmp_path)
    grade = caught.stdout.split("Grade:")[1]
    demo, yours = grade.split("Your code, under the same fault:")
    assert "The lesson's demonstration" in demo and "UniqueViolation (SQLSTATE 23505) raised" in demo
    assert "key 1 is there exactly once" in yours and "UniqueViolation" not in yours.split("What your code did")[0]
    said = " ".join(grade.split())
    assert "insert_key(): called 1 time here; it returned normally every time" in said
    assert ("The fault was real (a constraint violated, psycopg2.errors.UniqueViolation, as the demonstration "
            "shows) and your code raised nothing: it caught the error and went on") in said
    _student_file(tmp_path, "fail_broken", "with_fix", "\ndef insert_key(conn):\n    return undefined + 1\n")
    crashed = _exercise(tmp_path)
    assert "did not expect" not in crashed.stdout
    assert "Your insert_key() raised an error of its own (exercises/fail_broken/with_fix.py, line 4)" in crashed.stdout
    failed = [c["claim"] for c in crashed.scenario("with_fix")["checks"] if not c["ok"]]
    assert failed == ["your insert_key() raised NameError: name 'undefined' is not defined "
                      "(exercises/fail_broken/with_fix.py, line 4)"]


def test_logging_own_error_reports_are_counted_not_printed(tmp_path):
    _student_file(tmp_path, "fail_slots", "logged", "\ndef make_handler():\n    return FailingHandler()\n")
    result = run_script(SLOTS, "--exercise", "logged", tmp_path=tmp_path)
    assert result.returncode == 1 and "--- Logging error ---" not in result.stderr
    grade = " ".join(result.stdout.split("Grade:")[1].split())
    assert "logging printed 5 '--- Logging error ---' report(s)" in grade and grade.count("Logging error") == 2
    assert result.scenario("logged")["triggered"] is True  # the lesson's own count still saw its five


@pytest.mark.parametrize("flags", [["--solution"], ["--hint"], ["--hint", "2"], ["--call-limit", "5"],
                                   ["--exercise-dir", "mine"], ["--restart"]])
def test_an_exercise_flag_without_exercise_is_refused(tmp_path, flags):
    result = run_script(BROKEN, "--only", "passes", *flags, tmp_path=tmp_path)
    assert result.returncode == 2 and result.journal is None and result.stdout == ""
    assert result.stderr.count("\n") == 1 and f"{flags[0]} works with --exercise ID" in result.stderr


@pytest.mark.parametrize("flags, words", [
    (["--exercise", "with_fix", "--call-limit", "inf"], "out of range"),
    (["--exercise", "with_fix", "--call-limit", "nan"], "out of range"),
    (["--exercise", "with_fix", "--call-limit", "0"], "out of range"),
    (["--exercise", "with_fix", "--call-limit", "-1"], "out of range"),
    (["--exercise", "with_fix", "--hint", "0"], "out of range"),
    (["--seed", "1.5"], "'1.5' is not a whole number"),
    (["--seed", "-1"], "out of range"),
    (["--control", ","], "--control names no fix slot"),
    (["--only", ","], "--only names no scenario"),
    (["--nosuch"], "unrecognized arguments"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, flags, words):
    result = run_script(BROKEN, *flags, tmp_path=tmp_path)
    assert result.returncode == 2 and result.journal is None
    assert result.stderr.count("\n") == 1 and words in result.stderr, result.stderr


def test_a_fifo_or_a_device_for_the_journal_is_refused_before_the_run(tmp_path):
    import os

    fifo = tmp_path / "journal.fifo"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero", tmp_path):
        for flag in ("--json", "--report"):
            result = run_script(BROKEN, "--only", "passes", flag, str(path), tmp_path=tmp_path, journal=False,
                                timeout=60)  # a blocked open would hang here
            assert result.returncode == 2 and result.stdout == "", result.stdout
            assert result.stderr.count("\n") == 1 and flag in result.stderr
    assert run_script(BROKEN, "--only", "passes", "--report", "/dev/null", tmp_path=tmp_path).returncode == 0


def test_a_negative_control_says_its_failure_is_the_expected_outcome(tmp_path):
    result = run_script(BROKEN, "--only", "with_fix", "--control", "insert_key", tmp_path=tmp_path)
    assert result.returncode == 1
    said = " ".join(result.stdout.split("Summary")[1].split())
    assert "the naive code failed, as it must" in said and "are the expected outcome" in said


def test_progress_lists_each_exercise_with_its_state_and_the_next_command(tmp_path):
    def progress():
        shown = run_script(BROKEN, "--progress", tmp_path=tmp_path, journal=False)
        assert shown.returncode == 0, shown.stderr
        return {"out": shown.stdout}

    first = progress()
    assert "with_fix" in first["out"] and "not started" in first["out"] and "--exercise with_fix" in first["out"]
    _exercise(tmp_path)
    assert progress()["out"].split("with_fix")[1].splitlines()[0].strip() == "started"
    path = tmp_path / "exercises" / "fail_broken" / "with_fix.py"
    mine = "from fail_broken import *\n\ndef insert_key(conn):\n    insert_once(conn)\n"
    path.write_text(mine)
    assert _exercise(tmp_path).returncode == 0
    state = progress()["out"]
    assert state.split("with_fix")[1].split()[0] == "passed" and "1 of 1 passed at their last grade" in state
    assert "Every exercise passed" in state
    restarted = _exercise(tmp_path, "--restart")
    aside = path.with_name("with_fix.old-1.py")
    assert restarted.returncode == 0 and aside.read_text() == mine  # moved aside, never deleted
    assert "insert_twice" not in path.read_text() and "def insert_key(conn):" in path.read_text()
    assert "exercises/fail_broken/with_fix.old-1.py" in restarted.stdout
    assert progress()["out"].split("with_fix")[1].splitlines()[0].strip() == "started"


def test_exercise_start_restart_and_progress_name_the_folder_and_fit_80_columns(tmp_path):
    """With --exercise-dir, the commands the lab prints carry the folder (else `--progress` lists
    an empty one); every line fits 80 columns, and a command wraps between its arguments."""
    start = _exercise(tmp_path, "--exercise-dir", "mine")
    restarted = _exercise(tmp_path, "--exercise-dir", "mine", "--restart")
    progress = run_script(BROKEN, "--progress", "--exercise-dir", "mine", tmp_path=tmp_path, journal=False)
    for shown in (start, restarted, progress):
        assert shown.returncode == 0, shown.stderr
        assert max(len(ln) for ln in shown.stdout.splitlines()) <= 80, shown.stdout
    for shown in (start, restarted):
        said = " ".join(shown.stdout.split("progress:")[1].split("Only the functions")[0].split())
        assert said.endswith(" --progress --exercise-dir mine"), said
    assert "your previous file is kept as mine/fail_broken/with_fix.old-1.py" in " ".join(restarted.stdout.split())
    command = progress.stdout.split("next (grade it again once you have edited it):")[1].split("to start one")[0]
    assert command.split() == [sys.executable, str(ROOT / BROKEN), "--exercise", "with_fix", "--exercise-dir", "mine"]


def test_the_lab_summary_legend_fits_80_columns():
    import io

    from common import lab, output

    shown = io.StringIO()
    record = {"id": "with_fix", "status": "passed", "triggered": True, "recovered": True, "cleaned": True,
              "seconds": 1.0}
    lab.summary(output.Console(shown, width=80), [{"script": "fail_broken.py", "scenarios": [record]}], 1.0, [])
    assert max(len(ln) for ln in shown.getvalue().splitlines()) <= 80, shown.getvalue()
    said = " ".join(shown.getvalue().split())
    assert "t r c: triggered, recovered, cleaned; naive" in said and "naive code, then after the fix" in said


def test_ctrl_c_counts_the_scenarios_it_never_started_as_not_run(tmp_path):
    import json
    import signal
    import subprocess

    from conftest import clean_env

    journal = tmp_path / "j.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / BROKEN), "--only", "sleeps,crash_in_trigger,with_fix",
                             "--json", str(journal)], env=clean_env(), cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("READY"):
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "0 passed, 0 failed, 1 interrupted, 2 not run" in out
    assert [r["status"] for r in json.loads(journal.read_text())["scenarios"]] == ["interrupted"] * 3


class StoreOnAClosedPort(logging.Handler):
    """A handler whose store is down: psycopg2's message is multi-line and ends in a newline."""

    def emit(self, record):
        try:
            psycopg2.connect("postgresql://nobody@127.0.0.1:1/none", connect_timeout=2)
        except psycopg2.Error:  # as the standard library's handlers do: the record is dropped, and said so
            self.handleError(record)


def test_the_summary_of_logging_own_error_report_shows_the_exception_line():
    logger = logging.getLogger("faillab.test.closed_port")
    logger.propagate, handler = False, StoreOnAClosedPort()
    logger.addHandler(handler)
    try:
        with logging_reports() as tally:
            logger.error("order %s lost", 42)
    finally:
        logger.removeHandler(handler)
    assert tally["count"] == 1
    assert tally["first"] == [
        "--- Logging error ---",
        'psycopg2.OperationalError: connection to server at "127.0.0.1", port 1 failed: Connection refused',
        "Message: 'order %s lost'", "Arguments: (42,)"], tally["first"]
