"""Every scenario is an exercise: its untouched starting file fails, the reference passes.

Run through the command line, as a student does. The wrong solutions that a student would
plausibly write are tested next to each script's own tests."""
import re
import time

import pytest

from common.output import CONTINUED
from conftest import clean_env, exercise_file, grade, lesson_scenarios, run_script, write_solution

SCRIPTS = ["fail_checkpoint_corruption.py", "fail_idempotency_break.py",
           "fail_retry_exhaustion.py", "fail_logging_failure.py"]


def _exercises():
    out = []
    for script in SCRIPTS:
        listed = run_script(script, "--list", journal=False)
        out += [(script, ln.split()[0]) for ln in listed.stdout.splitlines() if "[exercise]" in ln]
    return out


EXERCISES = _exercises()


def test_every_scenario_has_an_exercise():
    assert EXERCISES == lesson_scenarios(), EXERCISES


@pytest.mark.slow
@pytest.mark.parametrize("script, scenario_id", EXERCISES)
def test_the_starting_file_fails_and_the_reference_passes(script, scenario_id, target, tmp_path):
    name, env, params = target
    started = run_script(script, "--exercise", scenario_id, env=env, tmp_path=tmp_path, journal=False)
    path = exercise_file(tmp_path, script, scenario_id)
    assert started.returncode == 0 and path.exists(), started.stdout + started.stderr
    untouched = grade(script, scenario_id, tmp_path, env)
    record = untouched.scenario(scenario_id)
    assert untouched.returncode == 1 and record["mode"] == "exercise"
    assert "--- Logging error ---" not in untouched.stderr  # counted in the grade, not 62 tracebacks
    assert "did not expect" not in untouched.stdout.split("Grade:")[1]
    assert record["triggered"] is True and record["recovered"] is False and record["cleaned"] is True
    functions = path.read_text().split("\n\n\n", 1)[1]  # below the file's docstring and its import
    assert functions.startswith("def ") and max(len(ln) for ln in functions.splitlines()) <= 74
    assert CONTINUED not in record["sections"]["prevention"]  # the student's code, shown unbroken in 80 columns
    solution = run_script(script, "--exercise", scenario_id, "--solution", env=env, tmp_path=tmp_path,
                          journal=False)
    assert solution.returncode == 0
    path.write_text(solution.stdout.split("\n", 2)[2])  # after the title line and the blank line
    passed = grade(script, scenario_id, tmp_path, env)
    assert passed.returncode == 0, passed.stdout[-3000:]
    assert passed.scenario(scenario_id)["status"] == "passed" and "PASSED" in passed.stdout
    assert not re.search(r"\de[+-]\d\d", passed.stdout.split("Grade:")[1])  # figures as the lesson shows them


@pytest.mark.parametrize("script, scenario_id", EXERCISES)
def test_a_file_that_only_imports_the_lesson_is_refused(script, scenario_id, tmp_path):
    """`from fail_X import *` brings the lesson's own fixes in, some under the slots' names: none
    of them is the student's work."""
    started = run_script(script, "--exercise", scenario_id, tmp_path=tmp_path, journal=False)
    path = exercise_file(tmp_path, script, scenario_id)
    assert started.returncode == 0, started.stderr
    path.write_text(path.read_text().split("\n\n\n", 1)[0] + "\n")  # the docstring and the import line
    refused = run_script(script, "--exercise", scenario_id, tmp_path=tmp_path, journal=False,
                         env=clean_env(DATABASE_URL="postgresql://nobody@127.0.0.1:1/none"))  # before any database
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1, refused.stderr
    assert "does not define" in refused.stderr and f"{scenario_id}.py" in refused.stderr


def test_a_slot_that_hangs_in_a_worker_process_is_stopped_at_the_call_limit(target, tmp_path):
    """poison_job hands take_job() to its worker processes: the call limit holds there too, the
    grade names the time-out as for a call in the main process, and the run stops long before the
    lab's own bound on the queue (60 s)."""
    _, env, _ = target
    write_solution(tmp_path, "fail_retry_exhaustion.py", "poison_job",
                   "def take_job(conn, work, worker):\n    while True:  # a hang\n        time.sleep(0.1)\n")
    started = time.monotonic()
    result = run_script("fail_retry_exhaustion.py", "--exercise", "poison_job", "--call-limit", "2", env=env,
                        tmp_path=tmp_path, timeout=120)
    took = time.monotonic() - started
    record = result.scenario("poison_job")
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    assert result.returncode == 1 and record["cleaned"] is True and record["recovered"] is False, failed
    assert "take_job() did not return within 2 s" in failed, failed
    assert record["student"]["take_job"]["timed_out"] is True
    grade = result.stdout.split("Grade:")[1]
    assert "take_job() did not return within 2 s" in grade
    assert took < 30, took
