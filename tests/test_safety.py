"""The suite survives what it teaches: interruption, concurrency, bad configuration, least
privilege, hostile consoles. Every guarantee is attacked by a test, as a user would attack it."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

import conftest
import psycopg2
import pwserver
from conftest import ROOT, SERVER_URL, Result, clean_env, lab_schemas, run_at_once, run_script, server_reachable
from common import db, embedded

SCRIPTS = sorted(p.name for p in ROOT.glob("fail_*.py"))
BROKEN = "tests/fixtures/fail_broken.py"
QUICK = ["fail_checkpoint_corruption.py", "--only", "concurrent_access"]  # a short real scenario


def start(args: list[str], env: dict, journal: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / args[0]), *args[1:]] + (["--json", str(journal)] if journal else [])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", errors="replace")


def wait_ready(proc: subprocess.Popen) -> tuple[str, str]:
    """The fixture script prints READY <schema> <folder> once it holds both."""
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        if line.startswith("READY"):
            return tuple(line.split()[1:3])


def wait_until(condition, seconds: float = 10) -> bool:
    """Poll: the embedded server lingers LINGER_S after its last script, then stops."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def run_dirs(run_id: str) -> list[str]:
    return [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(f"faillab-{run_id}-")]


# -- 1. interruption at any moment ----------------------------------------------------------------
def wait_for_the_runner(proc: subprocess.Popen) -> None:
    """The runner is up once it prints its header ('<script>: N scenario(s), run <id>'); before
    that nothing of the run exists (a busy machine may take seconds to get there)."""
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        if " scenario(s), run " in line:
            return


HANG_S = 30  # an exit slower than this is a hang; bench/suite.py reports the real figures


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_interrupt_at_any_moment_cleans_up_and_exits_130(script, embedded_params, tmp_path):
    offsets = [0.2, 0.9, 1.7, 2.9]  # from when the runner is up
    report = []
    for n, offset in enumerate(offsets):
        sig = signal.SIGINT if n % 2 == 0 else signal.SIGTERM
        journal = tmp_path / f"j{n}.json"
        proc = start([script], clean_env(), journal)
        wait_for_the_runner(proc)
        time.sleep(offset)
        workers = []
        try:
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if p.pid != embedded.watchdog_pid()]
        except psutil.NoSuchProcess:
            pass
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=HANG_S + 10)
        took = time.monotonic() - sent
        report.append((offset, sig.name, proc.returncode, round(took, 2)))
        assert proc.returncode in (130, 0), f"offset {offset}: exit {proc.returncode}\n{err[-2000:]}"
        assert took < HANG_S, f"offset {offset}: took {took:.1f} s to exit"
        assert "Traceback" not in err, err[-2000:]
        data = json.loads(journal.read_text())
        if data["run_id"]:
            assert lab_schemas(embedded_params, data["run_id"]) == []
            assert run_dirs(data["run_id"]) == []
        time.sleep(0.2)
        assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE], \
            f"offset {offset}: worker processes outlived the run"
    print(f"\n{script}: (offset s, signal, exit, seconds to exit) {report}")


def test_sigkill_debris_is_swept_by_the_next_run_but_live_runs_are_not_touched(embedded_params, tmp_path):
    victim = start([BROKEN, "--only", "sleeps"], clean_env())
    alive = start([BROKEN, "--only", "sleeps"], clean_env(), tmp_path / "alive.json")
    victim_schema, victim_dir = wait_ready(victim)
    alive_schema, alive_dir = wait_ready(alive)
    victim.kill()
    victim.wait()
    assert victim_schema in lab_schemas(embedded_params)  # SIGKILL: nothing could clean up
    sweeper = run_script(BROKEN, "--only", "passes", tmp_path=tmp_path)
    assert sweeper.returncode == 0  # any run may be the one that sweeps (another may have raced it)
    schemas = lab_schemas(embedded_params)
    assert victim_schema not in schemas and alive_schema in schemas and os.path.isdir(alive_dir)
    alive.send_signal(signal.SIGINT)
    alive.communicate(timeout=10)
    assert alive.returncode == 130 and alive_schema not in lab_schemas(embedded_params)
    assert not os.path.exists(victim_dir)  # the killed run's temp folder went with its schema


def test_no_embedded_server_outlives_its_last_script_whatever_killed_it(tmp_path, monkeypatch):
    """A private data folder, so the session's shared server is not involved."""
    monkeypatch.setenv("FAILLAB_DATA_DIR", str(tmp_path / "data"))
    env = clean_env(FAILLAB_DATA_DIR=str(tmp_path / "data"))
    first = start([BROKEN, "--only", "sleeps"], env)
    second = start([BROKEN, "--only", "sleeps"], env)
    wait_ready(first)
    wait_ready(second)
    server = embedded.server_process()
    assert server is not None
    first.kill()  # SIGKILL: the server must stay up for the second run
    first.wait()
    time.sleep(2 * embedded.WATCH_INTERVAL_S + 0.5)
    assert server.is_running() and embedded.live_users() == [second.pid]
    second.kill()  # the last user dies without cleanup: the watchdog stops the server
    second.wait()
    assert wait_until(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE), \
        "the embedded server outlived every script"
    # The watchdog forgets itself just after the server has gone: give it that moment.
    assert wait_until(lambda: embedded.watchdog_pid() is None), "the watchdog outlived the server"


def test_no_embedded_server_after_an_interrupted_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FAILLAB_DATA_DIR", str(tmp_path / "data"))
    run = start([BROKEN, "--only", "sleeps"], clean_env(FAILLAB_DATA_DIR=str(tmp_path / "data")))
    wait_ready(run)
    server = embedded.server_process()
    assert server is not None
    run.send_signal(signal.SIGINT)
    run.communicate(timeout=10)
    assert run.returncode == 130
    assert wait_until(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE)
    assert wait_until(lambda: embedded.watchdog_pid() is None)


def test_corrupt_library_state_does_not_break_start_up(tmp_path, monkeypatch):
    """The wheel's own defects: an empty/corrupt .handle_pids.json and a postmaster.pid naming
    an unrelated live process (here: this test) must neither break start-up nor be signalled."""
    data = tmp_path / "data"
    monkeypatch.setenv("FAILLAB_DATA_DIR", str(data))
    env = clean_env(FAILLAB_DATA_DIR=str(data))
    assert run_script(BROKEN, "--only", "passes", env=env, tmp_path=tmp_path).returncode == 0  # initdb
    assert wait_until(lambda: embedded.server_process() is None)  # stopped after the linger
    pg = embedded.pgdata()
    (pg / ".handle_pids.json").write_text("{not json")
    (pg / "postmaster.pid").write_text(f"{os.getpid()}\n{pg}\n0\n5432\n{pg}\n\n0 0\nready\n")
    result = run_script(BROKEN, "--only", "passes", env=env, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert wait_until(lambda: embedded.server_process() is None)  # and we were not signalled: still here


# -- 2. concurrency -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_three_copies_at_once_share_nothing(script, target, tmp_path):
    _, env, params = target
    procs = [start([script], env, tmp_path / f"j{n}.json") for n in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    journals = [json.loads((tmp_path / f"j{n}.json").read_text()) for n in range(3)]
    for p, (out, err), j in zip(procs, outs, journals):
        bad = [(s["id"], s.get("reason")) for s in j["scenarios"] if s["status"] != "passed"]
        assert p.returncode == 0 and not bad, f"{bad}\n{err[-2000:]}"
    run_ids = {j["run_id"] for j in journals}
    assert len(run_ids) == 3
    for run_id in run_ids:
        assert lab_schemas(params, run_id) == []


# -- 3. bad configuration -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pw_server(embedded_params):
    with pwserver.password_server() as server:
        yield server


def assert_clean_exit_2(result, secret: str, expect: str, started: float):
    everything = result.stdout + result.stderr + json.dumps(result.journal or {})
    assert result.returncode == 2, result.stdout[-1000:] + result.stderr[-1000:]
    assert time.monotonic() - started < 10
    assert secret not in everything
    assert "Traceback" not in everything
    assert expect in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")], result.stderr


@pytest.mark.parametrize("case", ["unresolvable_host", "wrong_password", "malformed_url", "no_such_database",
                                  "no_create_right"])
def test_bad_configuration_gets_one_clear_message_and_exit_2(case, pw_server, tmp_path):
    secret = pwserver.LAB_PASSWORD
    url, expect = {
        "unresolvable_host": (f"postgresql://lab_user:{secret}@no-such-host.invalid:5432/labdb", "check the host name"),
        "wrong_password": (pwserver.url(pw_server, password=secret + "x"), "check the user name and password"),
        "malformed_url": (f"postgresql://lab_user:{secret}@127.0.0.1:port/labdb", "malformed"),
        "no_such_database": (pwserver.url(pw_server, dbname="nosuchdb"), "create the database"),
        "no_create_right": (pwserver.url(pw_server, user="no_create"), "cannot create a schema"),
    }[case]
    started = time.monotonic()
    result = run_script("fail_checkpoint_corruption.py", env=clean_env(DATABASE_URL=url), tmp_path=tmp_path)
    assert_clean_exit_2(result, secret if case != "wrong_password" else secret + "x", expect, started)


def test_dotenv_typo_is_named_and_the_run_fails_cleanly(pw_server, tmp_path):
    (tmp_path / ".env").write_text(f"DB_HOST=127.0.0.1\nDB_PORT={pw_server['port']}\nDB_NAME=labdb\n"
                                   f"DB_USER=lab_user\nDB_PASWORD={pwserver.LAB_PASSWORD}\n")
    started = time.monotonic()
    result = run_script("fail_checkpoint_corruption.py", env=clean_env(), tmp_path=tmp_path)
    assert "unknown variable DB_PASWORD" in result.stderr
    assert_clean_exit_2(result, pwserver.LAB_PASSWORD, "cannot connect", started)


def test_dotenv_configuration_works_and_never_shows_the_password(pw_server, tmp_path):
    (tmp_path / ".env").write_text(f"DB_HOST=127.0.0.1\nDB_PORT={pw_server['port']}\nDB_NAME=labdb\n"
                                   f"DB_USER=lab_user\nDB_PASSWORD={pwserver.LAB_PASSWORD}\n")
    result = run_script(*QUICK, env=clean_env(), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.journal["database"]["mode"] == "DB_*"
    assert "lab_user:***@127.0.0.1" in result.stdout
    assert pwserver.LAB_PASSWORD not in result.stdout + result.stderr + json.dumps(result.journal)


# -- 4. least privilege ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_passes_as_a_role_that_may_only_create_schemas(script, pw_server, tmp_path):
    result = run_script(script, env=clean_env(DATABASE_URL=pwserver.url(pw_server)), tmp_path=tmp_path)
    bad = [(s["id"], s.get("reason")) for s in (result.journal or {}).get("scenarios", []) if s["status"] != "passed"]
    assert result.returncode == 0 and not bad, f"{bad}\n{result.stderr[-2000:]}"
    assert pwserver.LAB_PASSWORD not in result.stdout + result.stderr + json.dumps(result.journal)


# -- 5. hostile consoles --------------------------------------------------------------------------
@pytest.mark.parametrize("env_extra, ascii_labels", [
    ({"LANG": "C", "LC_ALL": "C"}, None),
    ({"PYTHONIOENCODING": "ascii"}, True),
    ({"PYTHONIOENCODING": "cp1252"}, True),
    ({"PYTHONIOENCODING": "utf-8"}, False),
    ({"NO_COLOR": "1"}, False),
])
def test_hostile_consoles_get_the_same_sections_without_a_crash(env_extra, ascii_labels, embedded_params, tmp_path):
    result = run_script(*QUICK, env=clean_env(**env_extra), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\033[" not in result.stdout  # piped: never colour codes
    if ascii_labels is True:
        assert "[DESCRIPTION]" in result.stdout and "[PREVENTION]" in result.stdout
        assert result.stdout.isascii()
    elif ascii_labels is False:
        assert "📋 Description" in result.stdout and "✅ Prevention" in result.stdout
    sections = result.journal["scenarios"][0]["sections"]
    assert list(sections) == ["description", "trigger", "error", "root_cause", "recovery", "prevention"]
    assert all(text.strip() for text in sections.values())


def run_in_pty(args: list[str], env: dict) -> str:
    """Run with a pseudo-terminal as stdout, as on a real console; return what it printed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / args[0]), *args[1:]], env=env, stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(30)
    os.close(leader)
    assert proc.returncode == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_colour_on_a_terminal_and_none_with_no_color(embedded_params):
    assert "\033[" in run_in_pty(QUICK, clean_env())
    assert "\033[" not in run_in_pty(QUICK, clean_env(NO_COLOR="1"))


# -- 6. safety of the target ----------------------------------------------------------------------
@pytest.mark.skipif(not server_reachable(), reason=f"no PostgreSQL at {SERVER_URL}")
def test_banner_names_the_target_masked_and_whether_it_is_embedded(embedded_params, tmp_path):
    embedded_run = run_script(*QUICK, tmp_path=tmp_path)
    assert "[embedded default server (nothing configured)]" in embedded_run.stdout
    configured = run_script(*QUICK, env=clean_env(DATABASE_URL=SERVER_URL), tmp_path=tmp_path)
    assert "target: postgresql://postgres@127.0.0.1:5432/test  [configured by DATABASE_URL]" in configured.stdout


@pytest.mark.skipif(not server_reachable(), reason=f"no PostgreSQL at {SERVER_URL}")
def test_libpq_pg_variables_select_the_server(tmp_path):
    from psycopg2.extensions import parse_dsn

    p = parse_dsn(SERVER_URL)
    env = clean_env(PGHOST=p["host"], PGPORT=p.get("port", "5432"), PGUSER=p["user"], PGDATABASE=p["dbname"])
    result = run_script(*QUICK, env=env, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.journal["database"]["mode"] == "PG*"
    assert "[configured by PG*]" in result.stdout and f"@{p['host']}:{p.get('port', '5432')}/" in result.stdout


# -- 7. signals from the first import -------------------------------------------------------------
EARLY_OFFSETS = [0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5]
EARLY_SCRIPTS = [s for s in SCRIPTS if "\nimport common" in (ROOT / s).read_text()] + [BROKEN]


def _landed_before_common_ran(returncode: int, sig: int, err: str) -> bool:
    """The signal came before common/__init__.py's first line could install a handler: while the
    interpreter was starting (site, .pth files) or while the import machinery was still reading
    common's source. The interpreter's own default action then, and no frame of common/ in it."""
    if str(ROOT / "common") in err:
        return False
    return returncode == -sig or (sig == signal.SIGINT and returncode == 1 and err.strip().endswith("KeyboardInterrupt"))


def _lost_before_common_ran(proc: subprocess.Popen, sent: float) -> bool:
    """The fixture's `sleeps` prints READY with how many signals common's handlers have seen and
    when: a READY printed after the signal was sent, by a run whose handlers saw none, means the
    interpreter lost it before common/ ran (CPython's start-up can swallow a KeyboardInterrupt).
    Any other run, or a READY before the signal, is left to end (or hang) as it will."""
    if "--only" not in proc.args:
        return False
    for line in proc.stdout:
        if line.startswith("READY"):
            fields = dict(f.split("=", 1) for f in line.split()[3:])
            return fields["seen"] == "0" and float(fields["at"]) > sent
    return False


def _stopped_by_common(report: list) -> int:
    return sum(code == 130 and not lost for _, _, lost, code in report)


@pytest.mark.slow
@pytest.mark.parametrize("script", EARLY_SCRIPTS)
def test_a_signal_in_the_first_fraction_of_a_second_exits_130_and_leaves_nothing(script, embedded_params,
                                                                                 tmp_path):
    args = [script] + (["--only", "sleeps"] if script == BROKEN else [])
    report = []
    # A busy machine starts Python slower, and more signals land before common/ runs: then later
    # offsets are added until half of all signals landed in common's hands (the test is never vacuous).
    offsets = list(EARLY_OFFSETS)
    for n, offset in enumerate(offsets):
        if n == len(offsets) - 1 and _stopped_by_common(report) < len(offsets) // 2 and n < 40:
            offsets.append(offset * 1.25)
        sig = (signal.SIGINT, signal.SIGTERM)[n % 2]
        journal = tmp_path / f"j{n}.json"
        proc = start(args, clean_env(), journal)
        time.sleep(offset)
        sent = time.monotonic()
        proc.send_signal(sig)
        lost = _lost_before_common_ran(proc, sent)
        if lost:  # the interpreter's start-up swallowed it: pressed again, it must stop the run
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)  # a bound for a hang, not a timing claim
        report.append((offset, sig.name, "lost before common ran, then" if lost else "", proc.returncode))
        if not lost and _landed_before_common_ran(proc.returncode, sig, err):
            continue
        data = json.loads(journal.read_text()) if journal.exists() and journal.read_text().strip() else None
        finished = proc.returncode == 0 and data is not None and data["exit_code"] == 0  # it ended first
        assert proc.returncode == 130 or finished, f"offset {offset} {sig.name}: exit {proc.returncode}\n{err[-2000:]}"
        assert "Traceback" not in err, err[-2000:]
        if data and data["run_id"]:
            assert lab_schemas(embedded_params, data["run_id"]) == [] and run_dirs(data["run_id"]) == []
    assert _stopped_by_common(report) >= len(offsets) // 2, report  # not vacuous
    print(f"\n{script}: (offset s, signal, exit) {report}")


# -- 8. liveness that cannot collide --------------------------------------------------------------
def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _python_child(proc: subprocess.Popen) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        if "python" in child.name():
            return child
    raise AssertionError("no python under unshare")


@pytest.mark.skipif(not server_reachable(), reason=f"no PostgreSQL at {SERVER_URL}")
def test_a_run_in_its_own_pid_namespace_is_never_swept_but_a_killed_one_is(tmp_path):
    if not _unshare_works():
        pytest.skip("unshare --pid --fork --mount-proc is not permitted here (needs root or user namespaces)")
    from psycopg2.extensions import parse_dsn

    env = clean_env(DATABASE_URL=SERVER_URL)
    params = parse_dsn(SERVER_URL)
    contained = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(ROOT / BROKEN),
                                  "--only", "sleeps"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
    victim = start([BROKEN, "--only", "sleeps"], env)
    try:
        contained_schema, contained_dir = wait_ready(contained)
        victim_schema, victim_dir = wait_ready(victim)
        # Same host name, and the pid in its tag means nothing out here: only its lock says it lives.
        victim.kill()
        victim.wait()
        sweeper = run_script(BROKEN, "--only", "passes", env=env, tmp_path=tmp_path)
        assert sweeper.returncode == 0, sweeper.stderr[-2000:]
        schemas = lab_schemas(params)
        assert contained_schema in schemas and os.path.isdir(contained_dir)
        assert victim_schema not in schemas and not os.path.exists(victim_dir)  # swept: schema and folder
        inner = _python_child(contained)
        inner.send_signal(signal.SIGINT)
        contained.communicate(timeout=30)
        assert contained.returncode == 130
        assert contained_schema not in lab_schemas(params) and not os.path.exists(contained_dir)
    finally:
        for p in (contained, victim):
            if p.poll() is None:
                p.kill()
                p.wait()


def _dead_tag(run_id: str, dbname: str) -> str:
    return json.dumps({"faillab": db.TAG_VERSION, "run": run_id, "db": dbname})


def _fake_run_id() -> str:
    return conftest.SESSION_PREFIX + os.urandom(3).hex()  # this session's, so the catalog check sees it


def test_dead_debris_the_role_may_not_drop_is_skipped_not_a_startup_error(pw_server, tmp_path):
    from psycopg2 import sql

    run_id = _fake_run_id()
    schema, role = f"faillab_{run_id}_foreign", f"faillab_{run_id}_role"
    admin = pwserver.superuser(pw_server)
    try:
        with admin.cursor() as cur:  # debris of a dead run, but owned by the superuser
            cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            cur.execute(sql.SQL("COMMENT ON SCHEMA {} IS %s").format(sql.Identifier(schema)),
                        (_dead_tag(run_id, pw_server["dbname"]),))
            cur.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
            cur.execute(sql.SQL("COMMENT ON ROLE {} IS %s").format(sql.Identifier(role)),
                        (_dead_tag(run_id, pw_server["dbname"]),))
        result = run_script(BROKEN, "--only", "passes", env=clean_env(DATABASE_URL=pwserver.url(pw_server)),
                            tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "cannot create a schema" not in result.stderr and "Traceback" not in result.stderr
        assert db.schema_exists(admin, schema)  # skipped: not this role's to drop
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        admin.close()


def test_dead_debris_someone_holds_a_lock_on_is_skipped_then_swept_once_free(target, tmp_path):
    from psycopg2 import sql

    _, env, params = target
    run_id = _fake_run_id()
    schema = f"faillab_{run_id}_locked"
    admin = db.connect(params, autocommit=True)
    holder = db.connect(params)
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE SCHEMA {s}; CREATE TABLE {s}.t (id int)").format(s=sql.Identifier(schema)))
            cur.execute(sql.SQL("COMMENT ON SCHEMA {} IS %s").format(sql.Identifier(schema)),
                        (_dead_tag(run_id, db.scalar(admin, "SELECT current_database()")),))
        with holder.cursor() as cur:  # another session reads the table and keeps its transaction open
            cur.execute(sql.SQL("LOCK TABLE {}.t IN ACCESS SHARE MODE").format(sql.Identifier(schema)))
        result = run_script(BROKEN, "--only", "passes", env=env, tmp_path=tmp_path)
        everything = result.stdout + result.stderr
        assert result.returncode == 0, result.stderr[-2000:]
        assert "LockNotAvailable" not in everything and "Traceback" not in result.stderr
        assert db.schema_exists(admin, schema)
        holder.rollback()
        again = run_script(BROKEN, "--only", "passes", env=env, tmp_path=tmp_path)
        assert again.returncode == 0 and not db.schema_exists(admin, schema)  # (or another run swept it)
    finally:
        holder.close()
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        admin.close()


def test_a_live_runs_temp_folder_is_kept_and_a_killed_ones_is_swept(embedded_params, tmp_path):
    alive = start([BROKEN, "--only", "sleeps"], clean_env())
    victim = start([BROKEN, "--only", "sleeps"], clean_env())
    try:
        _, alive_dir = wait_ready(alive)
        _, victim_dir = wait_ready(victim)
        victim.kill()
        victim.wait()
        from common import cleanup

        lone_dead = Path(tempfile.gettempdir()) / f"faillab-{_fake_run_id()}.lock"  # killed before any folder
        lone_dead.write_text("")
        removed = cleanup.sweep_dead_folders()
        assert not os.path.exists(victim_dir) and os.path.isdir(alive_dir)
        assert f"folder {Path(victim_dir).name}" in removed or not os.path.exists(victim_dir)
        victim_run = Path(victim_dir).name.split("-")[1]
        alive_run = Path(alive_dir).name.split("-")[1]
        assert not (Path(tempfile.gettempdir()) / f"faillab-{victim_run}.lock").exists() and not lone_dead.exists()
        assert (Path(tempfile.gettempdir()) / f"faillab-{alive_run}.lock").exists()
    finally:
        alive.send_signal(signal.SIGINT)
        alive.communicate(timeout=30)
    assert alive.returncode == 130 and not os.path.exists(alive_dir)


def test_the_folder_sweep_leaves_no_file_open_under_python_dev_mode(embedded_params, tmp_path):
    """A live run's lock file is tried, found held, and closed again: `-X dev -W error` shows no
    ResourceWarning (an unclosed file) at exit."""
    alive = start([BROKEN, "--only", "sleeps"], clean_env())
    try:
        wait_ready(alive)
        done = subprocess.run([sys.executable, "-X", "dev", "-W", "error", str(ROOT / BROKEN), "--only", "passes"],
                              env=clean_env(), capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
        assert done.returncode == 0, done.stderr[-2000:]
        assert "ResourceWarning" not in done.stderr and "unclosed file" not in done.stderr, done.stderr[-2000:]
    finally:
        alive.send_signal(signal.SIGINT)
        alive.communicate(timeout=30)


# -- 9. only what the lab made --------------------------------------------------------------------
def init_schemas(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "code" / "init_schemas.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not server_reachable(), reason=f"no PostgreSQL at {SERVER_URL}")
def test_init_schemas_drops_only_a_schema_it_created():
    from psycopg2 import sql

    env = clean_env(DATABASE_URL=SERVER_URL)
    foreign, made, absent = conftest.session_name("foreign"), conftest.session_name("made"), conftest.session_name("absent")
    admin = psycopg2.connect(SERVER_URL)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:  # somebody's schema, with a table in it: no lab tag
            cur.execute(sql.SQL("CREATE SCHEMA {s}; CREATE TABLE {s}.precious (id int)").format(s=sql.Identifier(foreign)))
        refused = init_schemas("--schema", foreign, "--drop", env=env)
        assert refused.returncode == 2 and "refusing to drop" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and db.schema_exists(admin, foreign)
        into = init_schemas("--schema", foreign, env=env)  # nor does it build into somebody's schema
        assert into.returncode == 2 and "not created by this command" in into.stderr
        assert db.scalar(admin, "SELECT count(*) FROM pg_tables WHERE schemaname = %s", (foreign,)) == 1
        nothing = init_schemas("--schema", absent, "--drop", env=env)
        assert nothing.returncode == 0 and "nothing to drop" in nothing.stdout
        assert init_schemas("--schema", made, env=env).returncode == 0 and db.schema_exists(admin, made)
        dropped = init_schemas("--schema", made, "--drop", env=env)
        assert dropped.returncode == 0 and "dropped schema" in dropped.stdout and not db.schema_exists(admin, made)
    finally:
        with admin.cursor() as cur:
            for name in (foreign, made):
                cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        admin.close()


def test_init_schemas_refuses_to_drop_public(pw_server):
    """On a private server only: `public` is never at risk of the shared server's."""
    env = clean_env(DATABASE_URL=pwserver.url(pw_server, user="postgres", password=pwserver.SUPERUSER_PASSWORD))
    result = init_schemas("--schema", "public", "--drop", env=env)
    assert result.returncode == 2 and "refusing to drop schema public" in result.stderr
    conn = psycopg2.connect(pwserver.url(pw_server, user="postgres", password=pwserver.SUPERUSER_PASSWORD))
    try:
        assert db.schema_exists(conn, "public")
    finally:
        conn.close()


@pytest.mark.skipif(not server_reachable(), reason=f"no PostgreSQL at {SERVER_URL}")
def test_the_catalog_check_ignores_other_users_but_catches_our_own_leaks():
    from psycopg2 import sql

    other = f"faillab_{os.urandom(4).hex()}_someone"  # another user's run: a plain hex run id
    ours = f"faillab_{conftest.SESSION_PREFIX}{os.urandom(3).hex()}_leak"
    conn = psycopg2.connect(SERVER_URL)
    conn.autocommit = True
    try:
        before = conftest.catalog_snapshot(SERVER_URL)
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE SCHEMA {s}; CREATE TABLE {s}.t (id int)").format(s=sql.Identifier(other)))
        assert conftest.catalog_changes(before, conftest.catalog_snapshot(SERVER_URL)) == {}
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE SCHEMA {s}; CREATE TABLE {s}.t (id int)").format(s=sql.Identifier(ours)))
        changed = conftest.catalog_changes(before, conftest.catalog_snapshot(SERVER_URL))
        assert changed["schemas"]["added"] == [ours] and f"{ours}.t:r" in changed["relations"]["added"]
    finally:
        with conn.cursor() as cur:
            for name in (other, ours):
                cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        conn.close()


# -- 10. secrets: a table of URL shapes against a real SCRAM server -------------------------------
def _q(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


# (shape, password, how the URL carries it, expected exit). Each password is unique, so finding it
# anywhere is a leak; for the shapes libpq misreads, its pieces must not show either.
URL_SHAPES = [
    ("at_encoded", "Kq3@Vm8w", lambda u, p, s: f"postgresql://{u}:{_q(p)}@{s}", 0),
    ("slash_encoded", "Zr5/Lx2d", lambda u, p, s: f"postgresql://{u}:{_q(p)}@{s}", 0),
    ("hash_encoded", "Wd7#Np4k", lambda u, p, s: f"postgresql://{u}:{_q(p)}@{s}", 0),
    ("hash_raw", "Jt6#Hs9q", lambda u, p, s: f"postgresql://{u}:{p}@{s}", 0),
    ("question_raw", "Bf2?Gy7m", lambda u, p, s: f"postgresql://{u}:{p}@{s}", 0),
    ("colon_encoded", "Cv4:Qe1z", lambda u, p, s: f"postgresql://{u}:{_q(p)}@{s}", 0),
    ("quotes_encoded", "Xa'9\"Pl\\3", lambda u, p, s: f"postgresql://{u}:{_q(p)}@{s}", 0),
    ("space_encoded", "Mo8 Rk5t", lambda u, p, s: f"postgresql://{u}:{_q(p)}@{s}", 0),
    ("query_parameter", "Uh3&Dn6p", lambda u, p, s: f"postgresql://{u}@{s}?password={_q(p)}", 0),
    ("postgres_scheme", "Yg1=Tb4c", lambda u, p, s: f"postgres://{u}:{_q(p)}@{s}", 0),
    ("at_raw", "Ln5@Fw2r", lambda u, p, s: f"postgresql://{u}:{p}@{s}", 2),
    ("slash_raw", "Pe9/Sj6v", lambda u, p, s: f"postgresql://{u}:{p}@{s}", 2),
    ("wrong_password", "Ik4@Oz7n", lambda u, p, s: f"postgresql://{u}:{_q(p + 'x')}@{s}", 2),
]


def _pieces(password: str) -> list[str]:
    import re

    return [password] + [p for p in re.split(r"[^A-Za-z0-9]", password) if len(p) >= 3]


@pytest.fixture(scope="module")
def shape_roles(pw_server):
    """One login role per shape, its password set to the shape's, allowed to create schemas."""
    for n, (_, password, _, _) in enumerate(URL_SHAPES + [(s, s, None, 0) for s in SHORT_PASSWORDS]):
        pwserver.add_lab_role(pw_server, f"pw_{n}", password)
    return pw_server


SHORT_PASSWORDS = ["0", "e", "postgres"]


def _run_with_url(url: str, tmp_path: Path, env_extra: dict | None = None) -> tuple[Result, str]:
    report = tmp_path / "handout.md"
    env = clean_env(**(env_extra or {"DATABASE_URL": url}))
    result = run_script(BROKEN, "--only", "passes", "--report", str(report), env=env, tmp_path=tmp_path)
    return result, report.read_text() if report.exists() else ""


@pytest.mark.parametrize("shape", [s[0] for s in URL_SHAPES])
def test_no_url_shape_shows_its_password_anywhere(shape, shape_roles, tmp_path):
    n, (_, password, build, expected) = next((n, s) for n, s in enumerate(URL_SHAPES) if s[0] == shape)
    server = f"{shape_roles['host']}:{shape_roles['port']}/{shape_roles['dbname']}"
    result, report = _run_with_url(build(f"pw_{n}", password, server), tmp_path)
    everything = result.stdout + result.stderr + json.dumps(result.journal or {}) + report
    assert result.returncode == expected, result.stdout[-1500:] + result.stderr[-1500:]
    assert not [p for p in _pieces(password) if p in everything], f"{shape}: the password shows"
    assert "Traceback" not in result.stderr
    if expected == 2:
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    else:
        assert f"pw_{n}:***@" in result.stdout


@pytest.mark.parametrize("via", ["DB_PASSWORD", "PGPASSWORD"])
def test_passwords_from_db_and_pg_variables_never_show(via, shape_roles, tmp_path):
    n, (_, password, _, _) = 0, URL_SHAPES[0]
    if via == "DB_PASSWORD":
        extra = {"DB_HOST": shape_roles["host"], "DB_PORT": str(shape_roles["port"]), "DB_NAME": shape_roles["dbname"],
                 "DB_USER": f"pw_{n}", "DB_PASSWORD": password}
    else:
        extra = {"PGHOST": shape_roles["host"], "PGPORT": str(shape_roles["port"]), "PGDATABASE": shape_roles["dbname"],
                 "PGUSER": f"pw_{n}", "PGPASSWORD": password}
    result, report = _run_with_url("", tmp_path, extra)
    assert result.returncode == 0, result.stderr[-2000:]
    assert password not in result.stdout + result.stderr + json.dumps(result.journal) + report


@pytest.mark.parametrize("password", SHORT_PASSWORDS)
def test_a_short_password_leaves_output_and_journal_intact(password, shape_roles, tmp_path):
    n = len(URL_SHAPES) + SHORT_PASSWORDS.index(password)
    url = f"postgresql://pw_{n}:{password}@{shape_roles['host']}:{shape_roles['port']}/{shape_roles['dbname']}"
    result, report = _run_with_url(url, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    journal = result.journal  # parsed: still valid JSON
    assert set(journal) >= {"script", "seconds", "exit_code", "database", "scenarios"}
    assert isinstance(journal["seconds"], float) and journal["scenarios"][0]["id"] == "passes"
    assert journal["database"]["target"] == f"postgresql://pw_{n}:***@{shape_roles['host']}:{shape_roles['port']}/labdb"
    assert "1 passed, 0 failed" in result.stdout and "***" not in result.stdout.replace(f"pw_{n}:***@", "")
    assert "***" not in report.replace(f"pw_{n}:***@", "")


# -- 11. output with nowhere to go, and output paths ----------------------------------------------
def test_a_reader_that_goes_away_ends_nothing_but_the_output(embedded_params, tmp_path):
    """`| head -5`: the pipe is made small, so the script surely writes after the reader left."""
    import fcntl

    journal = tmp_path / "j.json"
    proc = start(QUICK, clean_env(), journal)
    fcntl.fcntl(proc.stdout.fileno(), 1031, 4096)  # F_SETPIPE_SZ: a one-page pipe
    lines = [proc.stdout.readline() for _ in range(5)]
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert all(lines) and proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    data = json.loads(journal.read_text())
    assert data["scenarios"][0]["cleaned"] and lab_schemas(embedded_params, data["run_id"]) == []


@pytest.mark.parametrize("stdout", ["closed", "/dev/full"])
def test_a_closed_or_full_stdout_is_a_clean_run(stdout, embedded_params, tmp_path):
    journal = tmp_path / "j.json"
    cmd = [sys.executable, str(ROOT / QUICK[0]), *QUICK[1:], "--json", str(journal)]
    if stdout == "closed":
        proc = subprocess.run(["bash", "-c", 'exec "$@" >&-', "run", *cmd], env=clean_env(), capture_output=False,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    else:
        with open("/dev/full", "w") as full:
            proc = subprocess.run(cmd, env=clean_env(), stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    data = json.loads(journal.read_text())
    assert data["exit_code"] == 0 and lab_schemas(embedded_params, data["run_id"]) == []


@pytest.mark.parametrize("flag", ["--json", "--report"])
@pytest.mark.parametrize("where", ["missing_folder", "a_folder", "unwritable", "under_a_file"])
def test_output_paths_are_checked_before_the_run(flag, where, tmp_path):
    (tmp_path / "file").write_text("x")
    path = {"missing_folder": tmp_path / "no" / "such" / "out", "a_folder": tmp_path,
            "unwritable": Path("/proc/version"), "under_a_file": tmp_path / "file" / "out"}[where]
    result = run_script(BROKEN, "--only", "passes", flag, str(path), env=clean_env(DATABASE_URL="postgresql://u@127.0.0.1:1/x"),
                        tmp_path=tmp_path, journal=False)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {flag}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot connect" not in result.stderr  # before the run


# -- 12. hostile environments: a broken embedded data folder, a watchdog without a folder ---------
@pytest.fixture(scope="module")
def sound_data_folder(tmp_path_factory):
    """A private embedded data folder, initialised once and stopped; tests damage copies of it."""
    root = tmp_path_factory.mktemp("sound") / "data"
    env = clean_env(FAILLAB_DATA_DIR=str(root))
    result = run_script(BROKEN, "--only", "passes", env=env, tmp_path=root.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    _wait_stopped(root)
    return root


def _wait_stopped(root: Path) -> None:
    old = os.environ.get("FAILLAB_DATA_DIR")
    os.environ["FAILLAB_DATA_DIR"] = str(root)
    try:
        assert wait_until(lambda: embedded.server_process() is None and embedded.watchdog_pid() is None, 30)
    finally:
        if old is None:
            os.environ.pop("FAILLAB_DATA_DIR")
        else:
            os.environ["FAILLAB_DATA_DIR"] = old


def _damage(pg: Path, how: str) -> None:
    if how == "pg_version":
        (pg / "PG_VERSION").write_text("99\n")
    elif how == "postgresql_conf":
        with open(pg / "postgresql.conf", "a") as f:
            f.write("this is not a setting\n")
    elif how == "pg_hba_conf":
        with open(pg / "pg_hba.conf", "a") as f:
            f.write("garbage in the host rules\n")
    elif how == "pg_control":
        (pg / "global" / "pg_control").unlink()
    elif how == "replaced_by_a_file":
        import shutil
        shutil.rmtree(pg)
        pg.write_text("not a data folder\n")


@pytest.mark.parametrize("how", ["pg_version", "postgresql_conf", "pg_hba_conf", "pg_control", "replaced_by_a_file"])
def test_a_broken_embedded_data_folder_is_set_aside_and_rebuilt(how, sound_data_folder, tmp_path):
    import shutil

    root = tmp_path / "data"
    subprocess.run(["cp", "-a", str(sound_data_folder), str(root)], check=True)  # keeps the owner
    pg = root / "pg18"
    _damage(pg, how)
    try:
        result = run_script(BROKEN, "--only", "passes", env=clean_env(FAILLAB_DATA_DIR=str(root)), tmp_path=tmp_path)
        warnings = [line for line in result.stderr.splitlines() if line.strip()]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(warnings) == 1 and str(pg) in warnings[0] and "kept it as" in warnings[0], warnings
        kept = [p for p in root.iterdir() if p.name.startswith("pg18.broken-")]
        assert len(kept) == 1 and kept[0].name in warnings[0]  # the broken one is kept, and said so
        assert (pg / "PG_VERSION").read_text().strip() == "18"
    finally:
        _wait_stopped(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("what", ["moved", "removed"])
def test_the_watchdog_stops_the_server_when_its_folder_is_moved_or_removed(what, sound_data_folder, tmp_path,
                                                                          monkeypatch):
    import shutil

    root = tmp_path / "data"
    subprocess.run(["cp", "-a", str(sound_data_folder), str(root)], check=True)
    monkeypatch.setenv("FAILLAB_DATA_DIR", str(root))
    run = start([BROKEN, "--only", "sleeps"], clean_env(FAILLAB_DATA_DIR=str(root)))
    try:
        wait_ready(run)
        server = embedded.server_process()
        assert server is not None and embedded.watchdog_pid() is not None
        run.kill()  # no cleanup at all: only the watchdog is left to stop the server
        run.wait()
        if what == "moved":
            root.rename(tmp_path / "elsewhere")
        else:
            shutil.rmtree(root, ignore_errors=True)
        assert wait_until(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, 30), \
            f"the server outlived its {what} data folder"
    finally:
        if run.poll() is None:
            run.kill()
        shutil.rmtree(tmp_path / "elsewhere", ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


# -- 13. a normal user after root, and folders nobody may write -----------------------------------
@pytest.fixture(scope="module")
def normal_user():
    """A throwaway system user (removed afterwards), for what root cannot feel: permissions."""
    import pwd
    import shutil

    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd to make a throwaway normal user")
    name = "labt" + os.urandom(3).hex()
    made = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"useradd refused: {made.stderr.decode(errors='replace').strip()}")
    entry = pwd.getpwnam(name)
    home = Path(tempfile.mkdtemp(prefix="labtest-home-"))
    os.chown(home, entry.pw_uid, entry.pw_gid)
    try:
        yield entry, home
    finally:
        wait_until(lambda: not [p for p in psutil.process_iter(["uids"]) if p.info["uids"]
                                and p.info["uids"].real == entry.pw_uid], 30)
        for p in psutil.process_iter(["uids"]):
            if p.info["uids"] and p.info["uids"].real == entry.pw_uid:
                p.kill()  # only this test's own user: nothing else runs as it
        subprocess.run(["userdel", name], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def _run_as(user, env_extra: dict, cwd: Path) -> subprocess.CompletedProcess:
    entry, home = user
    env = clean_env(**{"HOME": str(home), "USER": entry.pw_name, "LOGNAME": entry.pw_name, **env_extra})
    env.pop("XDG_DATA_HOME", None)
    env.pop("XDG_RUNTIME_DIR", None)
    return subprocess.run([sys.executable, str(ROOT / BROKEN), "--only", "passes"], env=env, cwd=str(cwd),
                          user=entry.pw_uid, group=entry.pw_gid, capture_output=True, text=True, timeout=180)


def _root_owned(parent: Path, name: str, mode: int) -> Path:
    path = parent / name
    path.mkdir()
    path.chmod(mode)
    return path


@pytest.mark.parametrize("case", ["root_left_the_library_lock", "unwritable_tmpdir", "unwritable_data_home",
                                  "unwritable_home"])
def test_a_normal_user_gets_a_working_run_or_one_line(case, normal_user):
    import shutil

    entry, home = normal_user
    work = Path(tempfile.mkdtemp(prefix="labtest-user-"))
    work.chmod(0o755)
    os.chown(work, entry.pw_uid, entry.pw_gid)
    shared_tmp = _root_owned(work, "tmp", 0o1777)  # like /tmp: everyone may write, root left a lock
    (shared_tmp / ".lockfile").write_text("")  # the library's global lock, made by a run as root
    (shared_tmp / ".lockfile").chmod(0o644)
    locked = _root_owned(work, "locked", 0o755)  # nobody but root may write here
    data = work / "data"
    env, expected = {
        "root_left_the_library_lock": ({"TMPDIR": str(shared_tmp), "FAILLAB_DATA_DIR": str(data)}, 0),
        "unwritable_tmpdir": ({"TMPDIR": str(locked), "FAILLAB_DATA_DIR": str(data)}, 0),
        "unwritable_data_home": ({"FAILLAB_DATA_DIR": str(locked / "data")}, 2),
        "unwritable_home": ({"HOME": str(locked)}, 2),
    }[case]
    try:
        result = _run_as(normal_user, env, work)  # (for unwritable_home, HOME decides the data folder)
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.returncode == expected, result.stdout[-1000:] + result.stderr[-2000:]
        if expected == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:") and str(locked) in lines[0], lines
    finally:
        _wait_stopped(data)
        shutil.rmtree(work, ignore_errors=True)


# -- 14. hostile role settings: every lesson sets what it needs, or one line and exit 2 -----------
ROLE_SETTINGS = [
    ("default_transaction_read_only", "on", 0),  # a default a session can SET back (a standby cannot: below)
    ("default_transaction_isolation", "serializable", 0),
    ("lock_timeout", "1ms", 0),
    ("statement_timeout", "50ms", 0),
    ("idle_in_transaction_session_timeout", "100ms", 0),
    ("search_path", "nowhere, \"$user\"", 0),
]


@pytest.fixture(scope="module")
def hostile_roles(pw_server):
    """One role per setting, ALTER ROLE ... SET to it, allowed to create schemas (private server)."""
    for name, value, _ in ROLE_SETTINGS:
        pwserver.add_lab_role(pw_server, f"hostile_{name}", pwserver.LAB_PASSWORD, **{name: value})
    return pw_server


@pytest.fixture(scope="module")
def hostile_runs(hostile_roles, tmp_path_factory):
    """Every script as every hostile role, four runs at a time on the one server (the tests below
    read one run each): {(setting, script): Result}."""
    runs = {(setting, script): (script, clean_env(DATABASE_URL=pwserver.url(hostile_roles, user=f"hostile_{setting}")))
            for setting, _, _ in ROLE_SETTINGS for script in SCRIPTS}
    return run_at_once(runs, tmp_path_factory.mktemp("hostile_runs"), timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("setting", [s[0] for s in ROLE_SETTINGS])
def test_hostile_role_settings_change_no_lesson(setting, script, hostile_runs):
    expected = next(e for n, _, e in ROLE_SETTINGS if n == setting)
    result = hostile_runs[setting, script]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    bad = [(s["id"], s.get("reason")) for s in (result.journal or {}).get("scenarios", []) if s["status"] != "passed"]
    assert result.returncode == expected, f"{setting}: exit {result.returncode} {bad}\n{result.stderr[-2000:]}"
    if expected == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "read-only" in lines[0], lines
    else:
        assert not bad


def test_a_server_that_is_read_only_for_good_is_one_line_and_exit_2(pw_server, tmp_path):
    """A hot standby: no SET can make it writable, so the run cannot start."""
    with pwserver.standby_server(pw_server) as standby:
        result = run_script(BROKEN, "--only", "passes", env=clean_env(DATABASE_URL=pwserver.url(standby)),
                            tmp_path=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and "read-only" in lines[0], lines
    assert pwserver.LAB_PASSWORD not in result.stdout + result.stderr


@pytest.mark.skipif(not server_reachable(), reason=f"no PostgreSQL at {SERVER_URL}")
def test_a_missing_role_is_named_not_blamed_on_host_and_port(tmp_path):
    from psycopg2.extensions import parse_dsn

    p = parse_dsn(SERVER_URL)
    role = "nobody_" + os.urandom(3).hex()
    url = f"postgresql://{role}@{p['host']}:{p.get('port', '5432')}/{p['dbname']}"
    result = run_script(BROKEN, "--only", "passes", env=clean_env(DATABASE_URL=url), tmp_path=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"role {role} does not exist" in lines[0] and "CREATE ROLE" in lines[0] and "host and port" not in lines[0]


def test_a_fifo_put_in_the_journals_place_during_the_run_does_not_block_its_end(embedded_params, tmp_path):
    """The path was a regular file when the run started; a FIFO with no reader put there meanwhile
    would block an ordinary open() for ever. The run ends at once, with one line and exit 2."""
    journal = tmp_path / "j.json"
    proc = start([BROKEN, "--only", "sleeps"], clean_env(), journal)
    try:
        wait_ready(proc)
        journal.unlink(missing_ok=True)
        os.mkfifo(journal)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)  # a bound for a hang, not a timing claim
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-2000:]
    assert f"error: --json {journal} could not be written" in err and "Traceback" not in err, err[-2000:]


def test_writing_a_journal_into_a_fifo_fails_at_once(tmp_path):
    from common.runner import write_file

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    raised = []

    def write():
        try:
            write_file(str(fifo), "{}")
        except OSError as exc:
            raised.append(exc)
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(10)  # a bound for a hang, not a timing claim
    blocked = writer.is_alive()
    if blocked:  # in open(): a reader lets it go, and the test fails
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(10)
    assert not blocked and raised, "write_file blocked on a FIFO"
