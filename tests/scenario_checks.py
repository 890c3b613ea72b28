"""Checks that one new scenario's test file runs end to end: its exercise graded three ways, and
its presenter's mode and 80 columns. (The shared runners are in conftest.)"""
from common.fixes import source_of
from conftest import exercise_file, grade, run_script, write_solution


def assert_exercise_grades(script: str, scenario_id: str, wrong: str, claim: str, env: dict, tmp_path) -> None:
    """The untouched starting file fails, the reference passes, and `wrong` (a plausible student
    solution) fails on a claim containing `claim`."""
    started = run_script(script, "--exercise", scenario_id, env=env, tmp_path=tmp_path, journal=False)
    path = exercise_file(tmp_path, script, scenario_id)
    assert started.returncode == 0 and path.exists(), started.stdout
    untouched = grade(script, scenario_id, tmp_path, env)
    record = untouched.scenario(scenario_id)
    assert untouched.returncode == 1 and record["mode"] == "exercise"
    assert record["triggered"] and not record["recovered"] and record["cleaned"]
    solution = run_script(script, "--exercise", scenario_id, "--solution", env=env, tmp_path=tmp_path, journal=False)
    path.write_text(solution.stdout.split("\n", 2)[2])  # after the title line and the blank line
    passed = grade(script, scenario_id, tmp_path, env)
    assert passed.returncode == 0 and passed.scenario(scenario_id)["status"] == "passed", passed.stdout[-3000:]
    write_solution(tmp_path, script, scenario_id, wrong)
    graded = grade(script, scenario_id, tmp_path, env)
    record = graded.scenario(scenario_id)
    assert graded.returncode == 1 and record["triggered"] and record["cleaned"] and not record["recovered"]
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    assert any(claim in c for c in failed), failed
    assert "NOT YET" in graded.stdout


def assert_brief_and_80_columns(script: str, scenario_id: str, full, env: dict, tmp_path, functions) -> None:
    """--brief keeps the detector's result and the lesson, leaves the code to the full run; the
    scenario's output (full and brief) fits 80 columns, and each function shown fits 74."""
    brief = run_script(script, "--only", scenario_id, "--brief", env=env, tmp_path=tmp_path)
    assert brief.returncode == 0, brief.stdout[-3000:]
    record = brief.scenario(scenario_id)
    detection = record["detection"]
    assert detection["fired"] and detection["quiet_after_fix"]
    assert f"the detector {detection['check']} fires" in brief.stdout
    assert "def " not in record["sections"]["prevention"] and record["lesson"] in " ".join(brief.stdout.split())
    for out in (full.stdout, brief.stdout):
        shown = out[out.index(f"[{scenario_id}]"):]
        assert max(len(ln) for ln in shown.splitlines()) <= 80
    for fn in functions:
        assert max(len(ln) for ln in source_of(fn).splitlines()) <= 74, fn.__name__
