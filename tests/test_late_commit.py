"""late_commit (fail_checkpoint_corruption.py), run as a user runs it, against each target."""
import pytest

import fail_checkpoint_corruption as lab
from common.fixes import source_of
from conftest import (assert_gives_the_handout, assert_passed, exercise_file, grade, run_control, run_script,
                      write_solution)

SCRIPT = "fail_checkpoint_corruption.py"
ID = "late_commit"


@pytest.fixture(scope="module")
def full_run(target, tmp_path_factory):
    name, env, params = target
    return run_script(SCRIPT, "--only", ID, env=env, tmp_path=tmp_path_factory.mktemp(f"late-{name}")), params


def test_the_late_commit_is_skipped_then_copied_exactly_once(full_run):
    result, params = full_run
    assert_passed(result, params, [ID])
    record = result.scenario(ID)
    m = record["measurements"]
    assert m["events_missing_before"] == [lab.EVENTS + 1] and m["events_missing_after"] == []
    assert m["held_back_while_open"] == 1  # B's committed event waited for A: the price of the bound
    assert m["lookback_missing"] == {"2 ids late": 0, f"{lab.LOOKBACK} ids late": 1}
    d = record["detection"]
    assert d["check"] == "events_skipped_below_copied" and d["kind"] == "sql"
    assert d["fired"] and d["found_broken"] == [f"{lab.EVENTS + 1}, written by A"]
    assert d["quiet_after_fix"] and d["found_after_fix"] == [] and d["runbook"]
    assert_gives_the_handout(result, {ID: {"name": "events_missing_before", "value": str(lab.EVENTS + 1),
                                           "after": "none"}})


CONTROLS = [(ID, "extract_events", "the anti-join is empty")]


def test_the_naive_extract_in_the_slot_fails(target, tmp_path):
    run_control(SCRIPT, *CONTROLS[0], target, tmp_path)


WRONG = '''
def extract_events(conn):
    """Bounded by this transaction's own id: later than A's, still open."""
    with conn.cursor() as cur:
        cur.execute("SELECT below_xid FROM watermarks WHERE job = %s", (EXTRACT,))
        since = cur.fetchone()[0]
        cur.execute("SELECT pg_current_xact_id()")
        bound = cur.fetchone()[0]
        cur.execute("INSERT INTO events_copy (id, payload) SELECT id, payload FROM events "
                    "WHERE written_by >= %s AND written_by < %s", (since, bound))
        copied = cur.rowcount
        cur.execute("UPDATE watermarks SET below_xid = %s WHERE job = %s", (bound, EXTRACT))
    conn.commit()
    return copied
'''


def test_the_exercise_grades_untouched_reference_and_a_wrong_bound(target, tmp_path):
    _, env, _ = target
    started = run_script(SCRIPT, "--exercise", ID, env=env, tmp_path=tmp_path, journal=False)
    assert started.returncode == 0 and exercise_file(tmp_path, SCRIPT, ID).exists(), started.stdout
    untouched = grade(SCRIPT, ID, tmp_path, env)
    record = untouched.scenario(ID)
    assert untouched.returncode == 1 and record["mode"] == "exercise"
    assert record["triggered"] and not record["recovered"] and record["cleaned"]
    solution = run_script(SCRIPT, "--exercise", ID, "--solution", env=env, tmp_path=tmp_path, journal=False)
    exercise_file(tmp_path, SCRIPT, ID).write_text(solution.stdout.split("\n", 2)[2])
    passed = grade(SCRIPT, ID, tmp_path, env)
    assert passed.returncode == 0 and passed.scenario(ID)["status"] == "passed", passed.stdout[-3000:]
    write_solution(tmp_path, SCRIPT, ID, WRONG)
    wrong = grade(SCRIPT, ID, tmp_path, env)
    record = wrong.scenario(ID)
    assert wrong.returncode == 1 and record["triggered"] and record["cleaned"] and not record["recovered"]
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    assert any("the watermark never passed A's transaction" in c for c in failed), failed
    assert "NOT YET" in wrong.stdout


def test_brief_keeps_the_detector_and_everything_fits_80_columns(full_run, target, tmp_path):
    result, _ = full_run
    brief = run_script(SCRIPT, "--only", ID, "--brief", env=target[1], tmp_path=tmp_path)
    assert brief.returncode == 0, brief.stdout[-3000:]
    record = brief.scenario(ID)
    assert record["detection"]["fired"] and record["detection"]["quiet_after_fix"]
    assert "the detector events_skipped_below_copied fires" in brief.stdout
    assert "def " not in record["sections"]["prevention"] and record["lesson"] in " ".join(brief.stdout.split())
    for out in (result.stdout, brief.stdout):
        scenario_part = out[out.index("[late_commit]"):]
        assert max(len(ln) for ln in scenario_part.splitlines()) <= 80
    for fn in (lab.extract_after_id, lab.extract_below_oldest_running, lab.extract_with_lookback):
        assert max(len(ln) for ln in source_of(fn).splitlines()) <= 74, fn.__name__
