"""The verdicts are honest: a crash fails its phase, a control fails, an exercise is graded.

Uses the fixture script tests/fixtures/fail_broken.py, run as a user runs it."""
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_script

BROKEN = "tests/fixtures/fail_broken.py"


@pytest.mark.parametrize("scenario_id, phase", [
    ("crash_in_trigger", "triggered"),
    ("crash_in_recovery", "recovered"),
    ("unfinished_after_pass", "recovered"),
])
def test_a_crash_or_an_early_stop_after_passing_checks_fails_its_phase(scenario_id, phase, tmp_path):
    result = run_script(BROKEN, "--only", scenario_id, tmp_path=tmp_path)
    record = result.scenario(scenario_id)
    assert result.returncode == 1
    assert record["status"] == "failed" and record[phase] is False
    assert any(c["ok"] for c in record["checks"]), "the fixture passes a check before it crashes"
    assert record["cleaned"] is True


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
    assert start.returncode == 0 and str(path) in start.stdout
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
