"""Checks the newer scenarios share: one run read through its journal, the detector both ways,
80 columns, --brief, and the exercise graded as a student grades it."""
from __future__ import annotations

import unicodedata

from conftest import assert_passed, exercise_file, grade, lab_schemas, run_script, write_solution


def columns(line: str) -> int:
    """How many terminal columns a line takes (an emoji takes two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1
               for c in line)


def assert_fits_80_columns(stdout: str) -> None:
    wide = [line for line in stdout.splitlines() if columns(line) > 80]
    assert not wide, wide


def run_passing(script: str, scenario_id: str, target, tmp_path, *args: str):
    """One run of one scenario: it passes, its detector fired and went quiet, it fits 80 columns."""
    _, env, params = target
    result = run_script(script, "--only", scenario_id, *args, env=env, tmp_path=tmp_path)
    assert_passed(result, params, [scenario_id])
    detection = result.scenario(scenario_id)["detection"]
    assert detection["fired"] is True and detection["quiet_after_fix"] is True, detection
    assert detection["found_broken"] and not detection["found_after_fix"] and detection["runbook"]
    assert_fits_80_columns(result.stdout)
    return result


def assert_exercise_grades(script: str, scenario_id: str, wrong: str, claim: str, target, tmp_path) -> None:
    """The untouched starting file fails, the reference passes, and `wrong` (a plausible wrong
    solution) fails on a recovery claim containing `claim`."""
    _, env, params = target
    started = run_script(script, "--exercise", scenario_id, env=env, tmp_path=tmp_path, journal=False)
    path = exercise_file(tmp_path, script, scenario_id)
    assert started.returncode == 0 and path.exists(), started.stdout + started.stderr
    functions = path.read_text().split("\n\n\n", 1)[1]
    assert max(len(ln) for ln in functions.splitlines()) <= 74
    untouched = grade(script, scenario_id, tmp_path, env)
    record = untouched.scenario(scenario_id)
    assert untouched.returncode == 1 and record["mode"] == "exercise"
    assert record["triggered"] is True and record["recovered"] is False and record["cleaned"] is True
    solution = run_script(script, "--exercise", scenario_id, "--solution", env=env, tmp_path=tmp_path,
                          journal=False)
    path.write_text(solution.stdout.split("\n", 2)[2])
    passed = grade(script, scenario_id, tmp_path, env)
    assert passed.returncode == 0 and passed.scenario(scenario_id)["status"] == "passed", passed.stdout[-3000:]
    write_solution(tmp_path, script, scenario_id, wrong)
    failed = grade(script, scenario_id, tmp_path, env)
    record = failed.scenario(scenario_id)
    assert failed.returncode == 1 and record["triggered"] is True and record["cleaned"] is True
    claims = [c["claim"] for c in record["checks"] if c["phase"] == "recovered" and not c["ok"]]
    assert any(claim in c for c in claims if not c.startswith(("unexpected ", "stopped early"))), claims
    for result in (untouched, passed, failed):
        assert lab_schemas(params, result.journal["run_id"]) == []


def assert_brief_keeps_the_proof(script: str, scenario_id: str, target, tmp_path) -> None:
    """--brief: every check and the detector's verdict still shown, the code left to the full run."""
    _, env, params = target
    brief = run_script(script, "--only", scenario_id, "--brief", env=env, tmp_path=tmp_path)
    assert_passed(brief, params, [scenario_id])
    record = brief.scenario(scenario_id)
    shown = " ".join(brief.stdout.split())
    assert all(" ".join(c["claim"].split()) in shown for c in record["checks"])
    assert " fired: " in brief.stdout and "def " not in record["sections"]["prevention"]
    assert_fits_80_columns(brief.stdout)



def control_tests(script: str, scenario_id: str, controls: list[tuple[str, str]]):
    """The two tests of a scenario's negative controls, for its test module to take in: each
    slot's control fails on its named claim (both targets), and every slot has one."""
    import pytest

    from conftest import declared_fixes, run_control

    @pytest.mark.parametrize("slot, claim", controls)
    def test_the_naive_code_fails_its_control(slot, claim, target, tmp_path):
        run_control(script, scenario_id, slot, claim, target, tmp_path)

    def test_every_slot_has_a_control():
        assert {f.slot for f in declared_fixes(script) if f.scenario_id == scenario_id} == {s for s, _ in controls}

    return test_the_naive_code_fails_its_control, test_every_slot_has_a_control
