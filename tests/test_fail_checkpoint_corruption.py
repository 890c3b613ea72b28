"""fail_checkpoint_corruption.py, run as a user runs it, against each target."""
from conftest import assert_passed, run_script

SCRIPT = "fail_checkpoint_corruption.py"
IDS = ["corruption", "db_down", "concurrent_access", "interrupted_recovery"]


def test_every_scenario_demonstrates_recovers_and_cleans(target, tmp_path):
    name, env, params = target
    result = run_script(SCRIPT, env=env, tmp_path=tmp_path)
    assert_passed(result, params, IDS)
    j = result.journal
    assert j["database"]["mode"] == ("embedded" if name == "embedded" else "DATABASE_URL")

    # corruption: a torn file that really fails to parse, and a checkpoint that ran ahead of the data
    assert result.error_types("corruption")[:2] == ["json.decoder.JSONDecodeError", "psycopg2.errors.CheckViolation"]
    m = result.scenario("corruption")["measurements"]
    assert m["rows_missing_before"] == 500 and m["rows_missing_after"] == 0
    assert m["torn_file_bytes"] > 0  # the kill landed mid-write, not before it

    # db_down: a real connection error through the proxy, the restart duplicated a batch, the fix reconnected
    assert result.error_types("db_down") == ["psycopg2.OperationalError"]
    m = result.scenario("db_down")["measurements"]
    assert m["rows_duplicated_before"] == 500 and m["reconnect_attempts"] > 1

    # concurrent_access: duplicated batch, checkpoint moved backwards, and a real 40001 from the fix
    m = result.scenario("concurrent_access")["measurements"]
    assert m["rows_duplicated"] == 500 and m["checkpoint_moved_backwards"] == 1
    assert "40001" in result.sqlstates("concurrent_access")

    # interrupted_recovery: a real SIGKILL, the naive restart refused, the forced one hit the key
    m = result.scenario("interrupted_recovery")["measurements"]
    assert m["worker_exit_code"] == -9 and m["naive_restart_claimed"] is False
    assert result.sqlstates("interrupted_recovery") == ["23505"]


def test_only_and_list(tmp_path):
    listed = run_script(SCRIPT, "--list", journal=False, tmp_path=tmp_path)
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == IDS
    one = run_script(SCRIPT, "--only", "concurrent_access", tmp_path=tmp_path)
    assert one.returncode == 0
    assert [r["id"] for r in one.journal["scenarios"]] == ["concurrent_access"]
