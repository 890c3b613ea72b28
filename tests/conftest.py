"""Shared test plumbing: run a script as a user does and read its journal, against two targets.

Targets: the embedded default (nothing configured; started once for the whole session by
registering pytest itself as a user, so each script joins a warm server) and the machine's
PostgreSQL at 127.0.0.1:5432 when it answers (FAILLAB_TEST_SERVER overrides the URL).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import db, embedded  # noqa: E402

CONFIG_VARS = ("DATABASE_URL", "DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD",
               "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSERVICE")
SERVER_URL = os.environ.get("FAILLAB_TEST_SERVER", "postgresql://postgres@127.0.0.1:5432/test")


def clean_env(**extra) -> dict:
    """The environment of a user who configured nothing, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env.pop("NO_COLOR", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def server_reachable() -> bool:
    try:
        psycopg2.connect(SERVER_URL, connect_timeout=2).close()
        return True
    except psycopg2.Error:
        return False


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    journal: dict | None

    def scenario(self, scenario_id: str) -> dict:
        for record in (self.journal or {}).get("scenarios", []):
            if record["id"] == scenario_id:
                return record
        raise AssertionError(f"no scenario {scenario_id!r} in the journal:\n{self.stdout[-3000:]}\n{self.stderr[-2000:]}")

    def error_types(self, scenario_id: str) -> list[str]:
        return [e["type"] for e in self.scenario(scenario_id)["observed_errors"]]

    def sqlstates(self, scenario_id: str) -> list[str]:
        return [e["sqlstate"] for e in self.scenario(scenario_id)["observed_errors"] if e["sqlstate"]]


def run_script(script: str, *args: str, env: dict | None = None, timeout: float = 240,
               tmp_path: Path | None = None, journal: bool = True) -> Result:
    """Run ROOT/script in a subprocess with --json; return exit code, output and the journal."""
    journal_path = None
    cmd = [sys.executable, str(ROOT / script), *args]
    if journal:
        journal_path = Path(tmp_path or ROOT) / f"journal-{Path(script).name}-{os.getpid()}-{len(args)}.json"
        journal_path.unlink(missing_ok=True)
        cmd += ["--json", str(journal_path)]
    proc = subprocess.run(cmd, env=env if env is not None else clean_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=str(tmp_path or ROOT), encoding="utf-8", errors="replace")
    data = None
    if journal_path and journal_path.exists():
        data = json.loads(journal_path.read_text(encoding="utf-8"))
        journal_path.unlink()
    return Result(proc.returncode, proc.stdout, proc.stderr, data)


PATCHED_LESSON = '''\
import sys
sys.path.insert(0, {root!r})
import common  # first: from here on a signal exits 130
import {module} as lab
from common import db
{patch}
if __name__ == "__main__":  # the lesson's run, not again in a worker process it spawns
    sys.modules["__main__"].__file__ = lab.__file__  # the lesson's name, its alerts, its workers
    sys.modules["__main__"].__doc__ = lab.__doc__
    common.main()
'''


def run_patched(script: str, scenario_id: str, patch: str, env: dict, tmp_path: Path) -> Result:
    """One scenario of a lesson, run from a tiny wrapper that first applies `patch` (Python, the
    lesson imported as `lab`): a bug in it, a state broken on purpose, a fault that does not land."""
    wrapper = Path(tmp_path) / "patched_lesson.py"
    wrapper.write_text(PATCHED_LESSON.format(root=str(ROOT), module=Path(script).stem, patch=patch), encoding="utf-8")
    return run_script(str(wrapper), "--only", scenario_id, env=env, tmp_path=tmp_path)


def run_at_once(runs: dict, tmp_path: Path, at_once: int = 4, **kwargs) -> dict:
    """Run several scripts at the same time, as the users of one server do (each waits for its
    share of the server, as in a classroom): `runs` maps a key to (script, env, *args); returns
    {key: Result}. Each run works in a folder of its own under tmp_path."""
    from concurrent.futures import ThreadPoolExecutor

    def run_one(item):
        key, (script, env, *args) = item
        folder = Path(tmp_path) / "".join(c if c.isalnum() else "_" for c in str(key))
        folder.mkdir(parents=True, exist_ok=True)
        return key, run_script(script, *args, env=env, tmp_path=folder, **kwargs)

    with ThreadPoolExecutor(max(1, min(at_once, len(runs)))) as pool:
        return dict(pool.map(run_one, runs.items()))


@pytest.fixture(scope="session", autouse=True)
def kept_servers():
    """Private servers with the defaults are started once per test process and reset between the
    tests that use them (servers.KeptServers); all are stopped when the session ends."""
    import servers

    with servers.kept_servers() as kept:
        yield kept


# Out of the quick subset too: a run per broken state, the grading of students' code (a run per
# wrong solution or exercise file), and the sweeps and walkthroughs that run a lesson many times.
SLOW_BY_NAME = ("test_a_recovery_check_fails_when", "test_a_wrong_solution_fails")
SLOW_IF_NAMED = ("exercise_grades", "saver_is_caught_whatever_api", "saver_meets_a_kill_point",
                 "generator_reproduces_the_checked_in_series", "pause_shows_no_reveal",
                 "broken_embedded_data_folder", "formatter_that_never_returns")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """With pytest-xdist's --dist loadgroup, the tests that use a module-scoped fixture (a server
    it starts, a run of a script it makes) go to one worker, so the fixture is made once and not
    once per worker; the fixture a test asks for itself names the group (hostile_roles, not the
    pw_server beneath it: each worker may start a server of its own, but runs no set-up twice).
    Tests of one target (embedded, server) form a group of their own. A test that names its
    group (servers it shares with other tests) keeps it."""
    for item in items:
        target = getattr(getattr(item, "callspec", None), "params", {}).get("target")
        if item.get_closest_marker("matrix") or item.get_closest_marker("classroom") or target == "server" \
                or item.name.startswith(SLOW_BY_NAME) or item.path.name == "test_exercises.py" \
                or any(part in item.name for part in SLOW_IF_NAMED):
            item.add_marker(pytest.mark.slow)  # the quick subset, -m "not slow": the embedded target only
        info = getattr(item, "_fixtureinfo", None)
        if info is None or item.get_closest_marker("xdist_group"):
            continue
        shared = [n for n in item.fixturenames
                  if (defs := info.name2fixturedefs.get(n)) and defs[-1].scope == "module"]
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}::{shared[0]}"
                                                    + (f"[{target}]" if target else "")))


@pytest.fixture(scope="session")
def embedded_params():
    """Start (or join) the embedded server once for the session."""
    params = embedded.acquire()
    yield params
    embedded.release()


def on_both_targets(names, scenario_of) -> list:
    """Parameters (name, target) for a test that takes `target` indirectly: every name against the
    embedded default, and the first name of each scenario against the configured server too (a
    check is the lesson's own code on either server: one per scenario shows that it holds there)."""
    first: dict = {}
    for name in names:
        first.setdefault(scenario_of(name), name)
    return ([pytest.param(name, "embedded", id=name) for name in names]
            + [pytest.param(name, "server", id=f"{name} [server]") for name in first.values()])


@pytest.fixture(scope="session", params=["embedded", "server"])
def target(request):
    """(name, environment for the script, connection parameters for checking it)."""
    if request.param == "embedded":
        params = request.getfixturevalue("embedded_params")
        return "embedded", clean_env(), params
    if not server_reachable():
        pytest.skip(f"no PostgreSQL at {SERVER_URL} (set FAILLAB_TEST_SERVER to test against one)")
    from psycopg2.extensions import parse_dsn
    return "server", clean_env(DATABASE_URL=SERVER_URL), parse_dsn(SERVER_URL)


def scraped(folder: Path, scenario_id: str, phase: str) -> dict[tuple, float]:
    """What --metrics wrote for one run of a scenario, parsed by prometheus_client's own parser, as
    a scraper reads it: {(sample name, sorted label items): value}, without the _created samples."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (Path(folder) / f"{scenario_id}.{phase}.prom").read_text(encoding="utf-8")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith("_created")}


def lab_schemas(params: dict, run_id: str | None = None) -> list[str]:
    """Private schemas on the target, of one run or of all runs."""
    conn = db.connect(params, autocommit=True)
    try:
        names = [n for n, _ in db.lab_schemas(conn)]
    finally:
        conn.close()
    return [n for n in names if run_id is None or n.startswith(f"{db.SCHEMA_PREFIX}{run_id}_")]


def assert_passed(result: Result, params: dict, expected_ids: list[str]) -> None:
    """Every scenario passed with all three verdicts, exit 0, and the run left no schema."""
    assert result.journal is not None, f"no journal; exit {result.returncode}\n{result.stderr[-3000:]}"
    got = [r["id"] for r in result.journal["scenarios"]]
    assert got == expected_ids
    failed = {r["id"]: r.get("reason") for r in result.journal["scenarios"] if r["status"] != "passed"}
    assert not failed, f"{failed}\n{result.stdout[-4000:]}"
    for record in result.journal["scenarios"]:
        assert record["triggered"] and record["recovered"] and record["cleaned"], record["id"]
        for section in ("description", "trigger", "error", "root_cause", "recovery", "prevention"):
            assert record["sections"][section].strip(), f"{record['id']}: empty {section} section"
    assert result.returncode == 0, result.stderr[-3000:]
    assert lab_schemas(params, result.journal["run_id"]) == []


# The runs and test objects of this test session carry its prefix: lab objects are named
# faillab_<prefix>..., objects a test makes by hand labtest_<prefix>... (a run id of its own is
# hex, so no other run's name can start with the prefix's "t"). The catalog check compares only
# those, so other users of the shared server at the same time cannot fail it, and it still
# catches this session's own leaks. The server's shape (databases, configuration) no user of a
# lab server changes is compared in full.
# Under pytest-xdist each worker is a user of the shared server of its own: it inherits the
# controller's prefix and adds its number, so one worker's catalog check never counts the other
# worker's runs as its own (they come and go while it compares).
_BASE_PREFIX = os.environ.setdefault(db.RUN_ID_PREFIX_VARIABLE, "t" + os.urandom(3).hex())
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")[2:]  # gw0 -> "0"
SESSION_PREFIX = _BASE_PREFIX[:6] + f"{int(_WORKER):02d}" if _WORKER.isdigit() else _BASE_PREFIX
os.environ[db.RUN_ID_PREFIX_VARIABLE] = SESSION_PREFIX
OURS = (f"{db.SCHEMA_PREFIX}{SESSION_PREFIX}", f"labtest_{SESSION_PREFIX}")
LAB_NAMED = (db.SCHEMA_PREFIX, "labtest_")


def session_name(label: str) -> str:
    """A name for an object a test creates by hand on a shared server (the catalog check's)."""
    return f"labtest_{SESSION_PREFIX}_{label}"


CATALOG_QUERIES = {
    # query -> how to find the object's name in a row (the part the ownership test looks at)
    "databases": "SELECT datname FROM pg_database",
    "schemas": "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg_temp%' AND nspname NOT LIKE 'pg_toast_temp%'",
    "relations": "SELECT n.nspname || '.' || c.relname || ':' || c.relkind::text FROM pg_class c "
                 "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', "
                 "'information_schema') AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'",
    "roles": "SELECT rolname || ':' || rolsuper || rolcreaterole || rolcreatedb || rolcanlogin || ':' || rolconnlimit "
             "FROM pg_roles",
    "role_settings": "SELECT coalesce(r.rolname, '*') || ':' || coalesce(d.datname, '*') || ':' || "
                     "array_to_string(s.setconfig, ',') FROM pg_db_role_setting s "
                     "LEFT JOIN pg_roles r ON r.oid = s.setrole LEFT JOIN pg_database d ON d.oid = s.setdatabase",
    "settings": "SELECT name || '=' || setting FROM pg_settings WHERE source NOT IN "
                "('default', 'session', 'client', 'override')",
    "file_settings": "SELECT name || '=' || coalesce(setting, '') FROM pg_file_settings",
}


def _ours_to_compare(item: str) -> bool:
    """Compare an item unless it is a lab or test object of somebody else (another session)."""
    return item.startswith(OURS) or not item.startswith(LAB_NAMED)


def catalog_snapshot(url: str) -> dict:
    """Databases, schemas, relations, roles and settings of a server, for before/after
    comparison: all of it except the lab and test objects of other sessions."""
    conn = psycopg2.connect(url, connect_timeout=3)
    try:
        with conn.cursor() as cur:
            snap = {}
            for name, query in CATALOG_QUERIES.items():
                cur.execute(query)
                snap[name] = sorted(str(r[0]) for r in cur.fetchall() if _ours_to_compare(str(r[0])))
        return snap
    finally:
        conn.close()


def catalog_changes(before: dict, after: dict) -> dict:
    return {k: {"added": sorted(set(after[k]) - set(before[k])), "removed": sorted(set(before[k]) - set(after[k]))}
            for k in before if before[k] != after[k]}


@pytest.fixture(scope="session", autouse=True)
def shared_server_untouched():
    """The whole suite may create and drop only its own private schemas on the shared server:
    what it could have made (its lab and test objects) and the server's shape are the same
    before and after, whatever other users of the server do meanwhile."""
    if not server_reachable():
        yield
        return
    before = catalog_snapshot(SERVER_URL)
    yield
    changed = catalog_changes(before, catalog_snapshot(SERVER_URL))
    assert not changed, f"the suite changed the shared server's catalog: {changed}"


def assert_control_fails(result: Result, params: dict, scenario_id: str, claim: str) -> None:
    """A negative control: with the naive code back in a fix slot, the same fault still landed
    (triggered), the run cleaned up, and recovery failed on a named claim containing `claim`
    (not on a crash)."""
    record = result.scenario(scenario_id)
    assert record["mode"] == "control", record.get("fixes")
    assert result.returncode == 1, result.stdout[-3000:]
    assert record["triggered"] is True, f"the fault did not land: {record.get('reason')}"
    assert record["cleaned"] is True, record.get("reason")
    assert record["recovered"] is False, f"the control passed: {scenario_id}\n{result.stdout[-3000:]}"
    failed = [c["claim"] for c in record["checks"] if c["phase"] == "recovered" and not c["ok"]]
    named = [c for c in failed if not c.startswith(("unexpected ", "stopped early"))]
    assert any(claim in c for c in named), f"failed claims {failed}, wanted one with {claim!r}"
    assert lab_schemas(params, result.journal["run_id"]) == []


def run_control(script: str, scenario_id: str, slot: str, claim: str, target, tmp_path: Path) -> None:
    """Run one negative control through the command line and check it (assert_control_fails);
    the journal must also show that the slot really held the naive code."""
    _, env, params = target
    result = run_script(script, "--only", scenario_id, "--control", slot, env=env, tmp_path=tmp_path)
    assert_control_fails(result, params, scenario_id, claim)
    naive = next(f.naive for f in declared_fixes(script) if f.slot == slot and f.scenario_id == scenario_id)
    assert result.scenario(scenario_id)["fixes"][slot].endswith("." + naive.__name__)


def lesson_scenarios() -> list[tuple[str, str]]:
    """(script, scenario id) of every scenario of every lesson, in the lab's order."""
    import importlib

    from common.lab import ORDER
    from common.scenario import _REGISTRY

    modules = [importlib.import_module(Path(script).stem) for script in ORDER]
    return [(f"{m.__name__}.py", spec.id) for m in modules for spec in _REGISTRY if spec.fn.__module__ == m.__name__]


def declared_fixes(script: str) -> list:
    """Every fix a lesson declares, each with its scenario id (imported from the script itself)."""
    import importlib

    from common.scenario import _REGISTRY

    module = importlib.import_module(Path(script).stem)
    return [_ScenarioFix(spec.id, f.slot, f.naive, f.fixed, f.hints) for spec in _REGISTRY
            if spec.fn.__module__ == module.__name__ for f in spec.fixes]


@dataclass
class _ScenarioFix:
    scenario_id: str
    slot: str
    naive: object
    fixed: object
    hints: tuple = ()


def assert_every_slot_has_a_control(script: str, controls: list[tuple[str, str, str]]) -> None:
    declared = {(f.scenario_id, f.slot) for f in declared_fixes(script)}
    assert declared == {(c[0], c[1]) for c in controls}


# -- the handout ---------------------------------------------------------------------------------


def assert_gives_the_handout(result, headlines: dict[str, dict]) -> None:
    """Each scenario of `headlines` gives the handout its headline figure (at least these items),
    a lesson line of its own, two or three questions, and a note on every figure kept off screen."""
    for scenario_id, headline in headlines.items():
        record = result.scenario(scenario_id)
        assert headline.items() <= (record["headline"] or {}).items(), (scenario_id, record["headline"])
        prevention = " ".join(record["sections"]["prevention"].split())
        assert record["lesson"] and not prevention.startswith(record["lesson"]), scenario_id  # its own line
        assert 2 <= len(record["questions"]) <= 3 and all(q.endswith("?") for q in record["questions"])
        hidden = [b for blocks in record["blocks"].values() for b in blocks
                  if b["kind"] == "measure" and not b["shown"]]
        assert hidden and all(b["note"] for b in hidden), [b["name"] for b in hidden if not b["note"]]


# -- exercises, graded through the command line as a student runs them --------------------------
def exercise_file(tmp_path: Path, script: str, scenario_id: str) -> Path:
    return tmp_path / "exercises" / script[:-3] / f"{scenario_id}.py"


def grade(script: str, scenario_id: str, tmp_path: Path, env: dict | None = None) -> Result:
    """Run the exercise of scenario_id on the student's file in tmp_path/exercises."""
    return run_script(script, "--exercise", scenario_id, env=env, tmp_path=tmp_path)


def write_solution(tmp_path, script, scenario_id, code: str):
    """A student's file: the lesson's helpers, then `code`, in which a wrong solution names only
    the slot it gets wrong. The grader takes only functions the file defines itself, so every other
    slot is written out as a function handing over to the lesson's fix, and `slot = function` as a
    function handing over to that function: what a student would write to keep the lesson's code."""
    import re

    slots = {f.slot: f.fixed.__name__ for f in declared_fixes(script) if f.scenario_id == scenario_id}

    def hand_over(slot: str, to: str) -> str:  # the lesson's function by the module: it may share the slot's name
        target = f"__import__({script[:-3]!r}).{to}" if to == slot or to == slots.get(slot) else to
        return f"\n\ndef {slot}(*args, **kwargs):\n    return {target}(*args, **kwargs)\n"

    for slot in slots:
        code = re.sub(rf"^{slot} = (\w+)[ \t]*$", lambda m, slot=slot: hand_over(slot, m.group(1)), code, flags=re.M)
    code += "".join(hand_over(slot, fixed) for slot, fixed in slots.items()
                    if not re.search(rf"^def {slot}\(", code, re.M))
    path = exercise_file(tmp_path, script, scenario_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"from {script[:-3]} import *  # noqa\n\n{code}")
    return path
