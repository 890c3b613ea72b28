"""The plumbing in common/: configuration, masking, output, the proxy, the runner's exit codes."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import pytest

from conftest import ROOT, clean_env, lab_schemas, run_script
from servers import free_port
from common import config, output
from common.faults import FaultProxy

BROKEN = "tests/fixtures/fail_broken.py"


# -- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize("env, mode", [
    ({"DATABASE_URL": "postgresql://a@h1/d", "DB_HOST": "h2", "PGHOST": "h3"}, "DATABASE_URL"),
    ({"DB_HOST": "h2", "PGHOST": "h3"}, "DB_*"),
    ({"PGHOST": "h3"}, "PG*"),
    ({}, "embedded"),
])
def test_first_configured_source_wins(env, mode):
    assert config.resolve(env).mode == mode


def test_db_variables_become_libpq_parameters():
    t = config.resolve({"DB_HOST": "db", "DB_PORT": "6543", "DB_NAME": "w", "DB_USER": "u", "DB_PASSWORD": "pw1"})
    assert t.params == {"host": "db", "port": "6543", "dbname": "w", "user": "u", "password": "pw1"}
    assert t.display == "postgresql://u:***@db:6543/w"


def test_password_is_masked_everywhere():
    t = config.resolve({"DATABASE_URL": "postgresql://alice:Sup3rS3cret@db.example:5432/shop"})
    assert "Sup3rS3cret" not in t.display and t.display == "postgresql://alice:***@db.example:5432/shop"
    shown = {
        "url in text: postgresql://alice:Sup3rS3cret@db:5432/shop, then": "url in text: postgresql://alice:***@db:5432/shop, then",
        "postgresql://alice@db/shop?sslmode=require&password=Sup3rS3cret": "postgresql://alice@db/shop?sslmode=require&password=***",
        "host=db password=Sup3rS3cret user=alice": "host=db password=*** user=alice",
        "password='Sup 3r' dbname=shop": "password=*** dbname=shop",
        "{'host': 'db', 'password': 'Sup3rS3cret'}": "{'host': 'db', 'password': '***'}",
        '{"password": "Sup3rS3cret", "user": "alice"}': '{"password": "***", "user": "alice"}',
        "postgresql://alice:p@ss@db/shop": "postgresql://alice:***@db/shop",  # a '@' libpq misreads
    }
    for text, masked in shown.items():
        assert output.redact(text) == masked


@pytest.mark.parametrize("password", ["0", "e", "postgres", "1", "s", ":", "true"])
def test_a_short_password_never_corrupts_output_or_the_journal(password):
    """Masking is by structure: a password that is also a common substring changes nothing else."""
    config.resolve({"DATABASE_URL": f"postgresql://postgres:{password}@127.0.0.1:5432/postgres"})
    journal = json.dumps({"script": "fail_x.py", "seconds": 0.561, "exit_code": 0, "scenarios": [{"id": "e0"}],
                          "database": {"target": f"postgresql://postgres:{password}@127.0.0.1:5432/postgres"}})
    masked = output.redact(journal)
    data = json.loads(masked)
    assert data["seconds"] == 0.561 and data["scenarios"] == [{"id": "e0"}] and data["exit_code"] == 0
    assert data["database"]["target"] == "postgresql://postgres:***@127.0.0.1:5432/postgres"
    assert output.redact("postgresql:// 0 passed, 1 failed (0.5 s) true") == "postgresql:// 0 passed, 1 failed (0.5 s) true"


@pytest.mark.parametrize("url, password", [
    ("postgresql://u:p%40ss@h/d", "p@ss"),
    ("postgresql://u:p%2Fss@h/d", "p/ss"),
    ("postgresql://u:p%23ss@h/d", "p#ss"),
    ("postgresql://u:p#ss@h/d", "p#ss"),  # libpq keeps a raw '#' (a URL parser would cut there)
    ("postgresql://u:p?ss@h/d", "p?ss"),
    ("postgresql://u:p%3Ass@h:5433/d", "p:ss"),
    ("postgresql://u@h/d?password=p%26ss", "p&ss"),
    ("postgres://u:p%20ss@h/d", "p ss"),
])
def test_urls_are_read_by_libpqs_own_parser(url, password):
    target = config.resolve({"DATABASE_URL": url})
    assert target.params["password"] == password and target.params["host"] == "h"
    assert target.display.startswith("postgresql://u:***@h")


@pytest.mark.parametrize("url, fragments", [
    ("postgresql://u:Tr0ub@4dor@h/d", ["Tr0ub", "4dor"]),  # a raw '@': libpq cuts at the first one
    ("postgresql://u:Tr0ub/4dor@h/d", ["Tr0ub", "4dor"]),  # a raw '/': no user info at all
    ("postgresql://u:4411/Tr0ub@h/d", ["4411", "Tr0ub"]),  # ... and a numeric "port"
    ("postgresql://u:Tr0ub%zz@h/d", ["Tr0ub"]),            # a bad percent-escape
    ("postgresql://u:Tr0ub4dor@h:port/d", ["Tr0ub4dor"]),
])
def test_urls_libpq_misreads_are_refused_without_a_fragment_of_the_password(url, fragments):
    with pytest.raises(config.ConfigError) as err:
        config.resolve({"DATABASE_URL": url})
    assert "malformed" in str(err.value) and "%40" in str(err.value)
    assert not [f for f in fragments if f in str(err.value)]


def test_a_missing_role_is_named_with_what_to_do():
    from common import db

    exc = psycopg2.OperationalError('connection to server at "h" (1.2.3.4), port 5432 failed: '
                                    'FATAL:  role "alice" does not exist')
    text = db.explain_connect_error(exc, "postgresql://alice@h:5432/d")
    assert "role alice does not exist" in text and "CREATE ROLE alice LOGIN" in text
    assert "host and port" not in text


def test_a_stream_whose_reader_is_gone_goes_quiet():
    from common.cleanup import SafeStream

    class Gone(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")
    stream = SafeStream(Gone())
    assert stream.write("x\n") == 2 and stream.broken
    stream.write("more")  # nothing raised
    stream.flush()
    assert SafeStream(None).write("to a closed stdout") == len("to a closed stdout")


@pytest.mark.parametrize("url", ["mysql://u:Hunter2x@h/d", "postgresql://u:Hunter2x@h:notaport/d"])
def test_malformed_url_is_a_config_error_without_the_password(url):
    with pytest.raises(config.ConfigError) as err:
        config.resolve({"DATABASE_URL": url})
    assert "Hunter2x" not in str(err.value)


def test_dotenv_never_overrides_and_warns_about_unknown_names(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("DB_HOST=from-file\nDB_NAME=workshop\nDB_PASWORD=typo\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DB_HOST", "from-env")
    monkeypatch.delenv("DB_NAME", raising=False)
    warnings = config.load_dotenv_files()
    assert os.environ["DB_HOST"] == "from-env" and os.environ["DB_NAME"] == "workshop"
    assert any("DB_PASWORD" in w for w in warnings)
    monkeypatch.delenv("DB_NAME")
    monkeypatch.delenv("DB_PASWORD", raising=False)


# -- output ---------------------------------------------------------------------------------------
def test_console_falls_back_to_ascii_when_the_stream_cannot_encode_emoji():
    stream = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    console = output.Console(stream)
    assert console.ascii and console.label("error") == "[ERROR]"
    console.line("✔ done → next")  # must not raise
    stream.flush()
    assert stream.buffer.getvalue().decode("cp1252").strip() == "ok done -> next"


def test_console_uses_emoji_on_utf8_and_no_colour_when_not_a_tty():
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    console = output.Console(stream)
    assert not console.ascii and console.label("error").startswith("❌")
    assert not console.colour


def test_no_color_turns_colour_off_even_on_a_tty(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert output.wants_colour(Tty())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not output.wants_colour(Tty())


def test_error_type_is_module_qualified(embedded_params):
    conn = psycopg2.connect(**embedded_params)
    try:
        with pytest.raises(psycopg2.Error) as err:
            conn.cursor().execute("SELECT 1/0")
    finally:
        conn.close()
    assert output.error_type(err.value) == "psycopg2.errors.DivisionByZero"


# -- the fault proxy ------------------------------------------------------------------------------
def test_proxy_down_really_refuses_and_drops_then_up_restores(embedded_params):
    with FaultProxy(embedded_params["host"], embedded_params["port"]) as proxy:
        via = {**proxy.params(embedded_params), "connect_timeout": 3}
        conn = psycopg2.connect(**via)
        conn.cursor().execute("SELECT 1")
        proxy.down()
        with pytest.raises(psycopg2.OperationalError):
            conn.cursor().execute("SELECT 1")  # the open connection was dropped
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(**via)  # and new ones are refused
        proxy.up()
        fresh = psycopg2.connect(**via)
        fresh.cursor().execute("SELECT 1")
        fresh.close()
        assert proxy.count("forwarded") == 2 and proxy.count("down") == 1
    assert proxy.threads_alive == 0


def test_proxy_binds_loopback_only_and_caps_connections(embedded_params):
    with FaultProxy(embedded_params["host"], embedded_params["port"], max_connections=1) as proxy:
        assert proxy._listener.getsockname()[0] == "127.0.0.1"
        first = psycopg2.connect(**proxy.params(embedded_params))
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(**proxy.params(embedded_params))
        first.close()
        assert proxy.count("over_cap") == 1


# -- the runner: exit codes -----------------------------------------------------------------------
def test_unreachable_database_exits_2_fast_with_one_masked_message(tmp_path):
    env = clean_env(DATABASE_URL=f"postgresql://lab:PwNeverShown9@127.0.0.1:{free_port()}/lab")
    started = time.monotonic()
    result = run_script("fail_checkpoint_corruption.py", env=env, tmp_path=tmp_path)
    assert result.returncode == 2
    assert time.monotonic() - started < 10
    assert "PwNeverShown9" not in result.stdout + result.stderr
    assert "cannot connect to postgresql://lab:***@127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--only", "no_such_id"], ["--only", ","], ["--only", ""], ["--only", " , "],
                                  ["--seed", "x"], ["--control", "no_such_slot", "--only", "passes"]])
def test_bad_arguments_exit_2(tmp_path, args):
    result = run_script(BROKEN, *args, tmp_path=tmp_path)
    assert result.returncode == 2 and result.journal is None, result.stdout[-1000:]
    assert "Traceback" not in result.stderr and result.stderr.strip()


def test_a_scenario_that_did_not_demonstrate_its_failure_fails_the_run(embedded_params, tmp_path):
    result = run_script(BROKEN, "--only", "claims_an_error,passes", tmp_path=tmp_path)
    assert result.returncode == 1
    broken, good = result.journal["scenarios"]
    assert broken["status"] == "failed" and broken["triggered"] is False
    assert "nothing was raised" in broken["reason"]
    assert good["status"] == "passed" and good["observed_errors"][0]["sqlstate"] == "23505"
    assert lab_schemas(embedded_params, result.journal["run_id"]) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_exits_130_after_cleanup(embedded_params, tmp_path, sig):
    journal = tmp_path / "j.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / BROKEN), "--only", "sleeps", "--json", str(journal)],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    while "READY" not in line:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    _, schema, folder = line.split()[:3]
    started = time.monotonic()
    proc.send_signal(sig)
    proc.communicate(timeout=10)
    assert proc.returncode == 130 and time.monotonic() - started < 5
    assert schema not in lab_schemas(embedded_params)
    assert not os.path.exists(folder)
    assert '"status": "interrupted"' in journal.read_text()


# -- cleaned: measured after every outcome, wherever the run left something ---------------------
HOSTILE = "tests/fixtures/fail_hostile.py"


@pytest.fixture(scope="module")
def lone_server():
    """A private server the run's role has to itself: a new object of that role is the run's.
    (On a server where other sessions of the same role work meanwhile, it might be theirs.)"""
    import servers

    with servers.postgres(servers.wheel_install()) as server:
        yield server


def _leaked_functions(server: dict, run_id: str, drop: bool = True) -> int:
    """How many of the fixture's leaked functions of this run exist (dropped when `drop`)."""
    import servers
    from psycopg2 import sql

    conn = psycopg2.connect(**servers.libpq(server))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_proc WHERE proname = %s", (f"labtest_leak_{run_id}",))
            found = cur.fetchone()[0]
            if drop:
                cur.execute(sql.SQL("DROP FUNCTION IF EXISTS public.{}()").format(sql.Identifier(f"labtest_leak_{run_id}")))
        return found
    finally:
        conn.close()


LEAKS = {  # what the fixture leaves -> how the journal's reason names it
    "function": lambda run_id, cwd: f"function public.labtest_leak_{run_id}()",
    "file": lambda run_id, cwd: f"file {cwd / 'left-behind.txt'}",
    "thread": lambda run_id, cwd: "thread fixture-listener",
}
MORE_LEAKS = {  # the same, measured once each (the outcome does not change how they are measured)
    "spawned file": LEAKS["file"],
    "forked file": LEAKS["file"],
    "role": lambda run_id, cwd: f"role faillab_{run_id}_leaked",
    "process": lambda run_id, cwd: "process ",  # and its pid
    "temp file": lambda run_id, cwd: f"file {Path(tempfile.gettempdir()) / f'labtest-leak-{run_id}.txt'}",
    "home file": lambda run_id, cwd: f"file {Path.home() / f'labtest-leak-{run_id}.txt'}",
}
LEAK_CASES = ([(leak, outcome) for leak in sorted(LEAKS) for outcome in ("pass", "crash", "skip", "fail", "stop")]
              + [(leak, "pass") for leak in MORE_LEAKS])


def _remove_leak(leak: str, server: dict, run_id: str, reason: str) -> None:
    """Undo what the fixture left, so the test leaves nothing either."""
    import servers

    if leak == "role":
        conn = psycopg2.connect(**servers.libpq(server))
        conn.autocommit = True
        try:
            conn.cursor().execute(f'DROP ROLE IF EXISTS "faillab_{run_id}_leaked"')
        finally:
            conn.close()
    elif leak == "process":
        pid = int(reason.split("left behind: process ", 1)[1].split(",")[0].split(";")[0])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    elif leak in ("temp file", "home file"):
        Path(MORE_LEAKS[leak](run_id, None).split(" ", 1)[1]).unlink(missing_ok=True)


def _url(server: dict) -> str:
    import servers

    return servers.url(server)


OUTCOME_REASONS = {"crash": "unexpected ZeroDivisionError", "skip": "needs PostgreSQL 99", "fail": "recovered",
                   "stop": "stopped early: the fixture stops early"}


@pytest.mark.parametrize("leak, outcome", LEAK_CASES, ids=[f"{leak}-{outcome}" for leak, outcome in LEAK_CASES])
def test_a_leak_is_named_and_fails_the_scenario_whatever_its_outcome(leak, outcome, lone_server, tmp_path):
    env = clean_env(FAILLAB_FIXTURE_LEAK=leak, FAILLAB_FIXTURE_OUTCOME=outcome, DATABASE_URL=_url(lone_server))
    result = run_script(HOSTILE, "--only", "leaks", env=env, tmp_path=tmp_path)
    run_id = result.journal["run_id"]
    record = result.scenario("leaks")
    try:
        assert _leaked_functions(lone_server, run_id) == (leak == "function")
        assert result.returncode == 1 and record["status"] == "failed" and record["cleaned"] is False, record
        named = (LEAKS.get(leak) or MORE_LEAKS[leak])(run_id, tmp_path)
        assert f"left behind: {named}" in record["reason"], record["reason"]
        if outcome != "pass":  # the outcome's own reason stays first
            assert record["reason"].startswith(OUTCOME_REASONS[outcome]), record["reason"]
    finally:
        _remove_leak(leak, lone_server, run_id, record.get("reason") or "")


def test_a_leak_is_named_while_an_idle_session_of_the_same_role_is_connected(lone_server, tmp_path):
    """A psql of the same role left open and idle did nothing meanwhile: it cannot have made the
    function, so the run's leak is still the run's."""
    import servers

    idle = psycopg2.connect(**servers.libpq(lone_server), application_name="an idle psql")
    try:
        env = clean_env(FAILLAB_FIXTURE_LEAK="function", DATABASE_URL=_url(lone_server))
        result = run_script(HOSTILE, "--only", "leaks", env=env, tmp_path=tmp_path)
    finally:
        idle.close()
    run_id = result.journal["run_id"]
    record = result.scenario("leaks")
    assert _leaked_functions(lone_server, run_id) == 1
    assert result.returncode == 1 and record["cleaned"] is False, record
    assert f"left behind: {LEAKS['function'](run_id, tmp_path)}" in record["reason"], record["reason"]


def _start_ready(scenario_id: str, server: dict, tmp_path, **env):
    """Start the fixture's scenario (journal in tmp_path/j.json); return it and its run id once READY."""
    proc = subprocess.Popen([sys.executable, str(ROOT / HOSTILE), "--only", scenario_id, "--json",
                             str(tmp_path / "j.json")], env=clean_env(DATABASE_URL=_url(server), **env),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(tmp_path))
    line = ""
    while "READY" not in line:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    return proc, line.split()[1]


def test_a_leak_is_named_after_an_interrupt_too(lone_server, tmp_path):
    journal = tmp_path / "j.json"
    proc, run_id = _start_ready("leaks", lone_server, tmp_path, FAILLAB_FIXTURE_LEAK="function",
                                FAILLAB_FIXTURE_OUTCOME="interrupt")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert _leaked_functions(lone_server, run_id) == 1
    record = json.loads(journal.read_text())["scenarios"][0]
    assert proc.returncode == 130 and record["status"] == "interrupted" and record["cleaned"] is False, record
    assert f"left behind: function public.labtest_leak_{run_id}()" in record["reason"]


def test_what_another_session_of_the_same_role_makes_meanwhile_is_not_the_runs_leak(lone_server, tmp_path):
    """Two students share one role: the other one's function in public, made while the run works,
    is theirs; the run stays cleaned."""
    import servers

    proc, run_id = _start_ready("waits", lone_server, tmp_path)
    other = psycopg2.connect(**servers.libpq(lone_server), application_name="another student")
    other.autocommit = True
    try:
        other.cursor().execute(f"CREATE FUNCTION public.labtest_leak_{run_id}() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        proc.communicate("go\n", timeout=60)
    finally:
        other.close()
    record = json.loads((tmp_path / "j.json").read_text())["scenarios"][0]
    assert _leaked_functions(lone_server, run_id) == 1
    assert proc.returncode == 0 and record["cleaned"] is True, record
    assert record["measurements"]["objects_not_attributed"].startswith("1 new object(s)"), record  # and says so


def test_a_clean_scenario_is_cleaned_whatever_its_outcome(embedded_params, tmp_path):
    """No false alarm: the same fixture leaving nothing is cleaned on a pass, a crash and a skip."""
    for outcome, status in (("pass", "passed"), ("crash", "failed"), ("skip", "skipped")):
        result = run_script(HOSTILE, "--only", "leaks", env=clean_env(FAILLAB_FIXTURE_OUTCOME=outcome),
                            tmp_path=tmp_path)
        record = result.scenario("leaks")
        assert record["status"] == status and record["cleaned"] is True, record
        assert "left behind" not in (record.get("reason") or "")


_WRITE_AT_RMDIR: dict = {}  # the folder test_a_folder_... writes into when rmtree gets to its rmdir


def _write_at_rmdir(event: str, args: tuple) -> None:
    """An audit hook (pytest's process keeps it; it acts only while a test arms it): a thread of
    the run appends to its spool by the folder's path just as rmtree, having emptied the folder,
    is about to remove it: the race, at its one bad moment, every time."""
    if event == "os.rmdir" and "folder" in _WRITE_AT_RMDIR:
        folder = _WRITE_AT_RMDIR.pop("folder")
        try:
            with open(folder / "spool.jsonl", "a") as f:
                f.write("{}\n")
        except FileNotFoundError:
            pass  # the folder is gone from that path: the writer's line is lost, as it would be


@pytest.mark.parametrize("remove", ["lab", "plain rmtree"])
def test_a_folder_a_thread_still_writes_into_is_removed(tmp_path, remove):
    """A thread of the run that still appends to a file in the scenario's folder (a log spool
    whose close a Ctrl-C cut short) must not keep the folder alive. With a plain rmtree (the
    control) the write between emptying and rmdir leaves it behind."""
    import shutil

    from common.cleanup import _remove_folder

    if not getattr(_write_at_rmdir, "installed", False):
        sys.addaudithook(_write_at_rmdir)
        _write_at_rmdir.installed = True
    folder = tmp_path / "faillab-run-storage-x"
    folder.mkdir()
    for i in range(5):
        (folder / f"f{i}").write_text("x")
    _WRITE_AT_RMDIR["folder"] = folder
    try:
        if remove == "lab":
            removed = _remove_folder(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed = not folder.exists()
        wrote = "folder" not in _WRITE_AT_RMDIR  # the write really came, at the rmdir
    finally:
        _WRITE_AT_RMDIR.clear()
    assert wrote
    if remove == "lab":
        assert removed and not list(tmp_path.iterdir())  # renamed copy included
    else:
        assert not removed and [p.name for p in folder.iterdir()] == ["spool.jsonl"]  # left behind


# -- a signal is never lost ----------------------------------------------------------------------
SIGNAL_IN_CODEC = ROOT / "tests" / "fixtures" / "signal_in_codec.py"


def _signal_in_codec(handler: str, signame: str, nth: int, params: dict) -> tuple[dict | None, str]:
    dsn = " ".join(f"{k}={v}" for k, v in params.items())
    proc = subprocess.run([sys.executable, str(SIGNAL_IN_CODEC), handler, signame, str(nth), dsn],
                          capture_output=True, text=True, timeout=60, env=clean_env())
    out = proc.stdout.strip()
    return (json.loads(out) if out else None), proc.stderr


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_while_psycopg2_decodes_an_error_is_raised_never_lost(embedded_params, signame):
    """psycopg2 decodes a server error's texts with a Python codec and clears what that call
    raises. A signal that lands there must still stop the run: from execute() itself, or from the
    next checkpoint, with nothing printed."""
    expected = "KeyboardInterrupt" if signame == "SIGINT" else "Interrupted"
    codec_calls = _signal_in_codec("lab", signame, 0, embedded_params)[0]["codec_calls"]
    assert codec_calls >= 2, "psycopg2 no longer decodes through a Python codec: nothing to test"
    lost_by_python = []
    for nth in range(1, codec_calls + 1):
        lab, lab_err = _signal_in_codec("lab", signame, nth, embedded_params)
        assert lab is not None and expected in (lab["execute"], lab["checkpoint"]), (nth, lab, lab_err)
        assert "Traceback" not in lab_err, lab_err
        python, _ = _signal_in_codec("python", signame, nth, embedded_params)
        if python is None or expected not in (python["execute"], python["checkpoint"]):
            lost_by_python.append(nth)
    # the control: a handler that raises at once, in the codec, loses the signal at some of them
    assert lost_by_python, "no codec call loses a signal any more: psycopg2 changed"


@pytest.mark.parametrize("signame, then", [("SIGINT", "goes on"), ("SIGTERM", "goes on"), ("SIGINT", "error")])
def test_a_signal_whose_exception_the_code_lost_still_stops_the_run(embedded_params, tmp_path, signame, then):
    env = {**clean_env(), "LOST_SIGNAL": signame, "LOST_THEN": then}
    result = run_script(BROKEN, "--only", "loses_a_signal,skips", env=env, tmp_path=tmp_path)
    assert result.returncode == 130, result.stdout[-2000:] + result.stderr[-2000:]
    record = result.scenario("loses_a_signal")
    assert record["status"] == "interrupted" and record["cleaned"], record
    assert result.scenario("skips")["status"] == "interrupted"  # the run stopped: never started
    assert "Traceback" not in result.stderr and lab_schemas(embedded_params, result.journal["run_id"]) == []


@pytest.mark.parametrize("hook", ["lab", "python"])
def test_a_signal_in_a_callback_python_cannot_raise_from_is_kept_not_printed(hook):
    """A weakref callback's exception is "ignored" by Python: a signal landing there is kept for
    the next checkpoint, and not printed. With Python's own hook (the control) it is printed."""
    code = f"""
import signal, sys, weakref
sys.path.insert(0, {str(ROOT)!r})
from common import cleanup
if {hook!r} == "lab":
    sys.unraisablehook = cleanup._unraisable  # as arm_signals installs it
class Thing:
    pass
thing = Thing()
ref = weakref.ref(thing, lambda r: cleanup.on_signal(signal.SIGTERM, sys._getframe()))
del thing  # the callback runs, and the signal's exception is raised in it
try:
    cleanup.raise_if_signalled()
except cleanup.Interrupted:
    print("raised at the checkpoint")
cleanup.signal_handled()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "raised at the checkpoint"
    assert ("Exception ignored" in proc.stderr) == (hook == "python"), proc.stderr


def test_a_kept_signal_is_sent_again_and_ends_a_wait_that_has_no_checkpoint():
    """A signal kept in a codec frame must not wait for a checkpoint that a long sleep or lock
    wait postpones: it is sent again, and ends the wait at once."""
    code = f"""
import signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
from common import cleanup
for sig in cleanup.SIGNALS:
    signal.signal(sig, cleanup.on_signal)
in_a_codec = eval(compile("sys._getframe()", cleanup._CODECS[0] + "a_codec.py", "eval"))
cleanup.on_signal(signal.SIGTERM, in_a_codec)  # kept, not raised
started = time.monotonic()
try:
    time.sleep(30)
    print("slept through")
except cleanup.Interrupted:
    print(f"interrupted after {{time.monotonic() - started:.1f}} s")
cleanup.signal_handled()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("interrupted after"), proc.stdout + proc.stderr
    assert float(proc.stdout.split()[2]) < 10 and not proc.stderr  # 30 s without the echo


def test_where_there_is_no_pthread_kill_a_kept_signal_still_comes_back():
    """Windows has no signal.pthread_kill: the echo falls back to _thread.interrupt_main, which
    a busy main thread meets at once (it cannot end a blocking wait there)."""
    code = f"""
import signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
del signal.pthread_kill
from common import cleanup
for sig in cleanup.SIGNALS:
    signal.signal(sig, cleanup.on_signal)
in_a_codec = eval(compile("sys._getframe()", cleanup._CODECS[0] + "a_codec.py", "eval"))
cleanup.on_signal(signal.SIGTERM, in_a_codec)  # kept, not raised
deadline = time.monotonic() + 30
try:
    while time.monotonic() < deadline:
        pass
    print("never came back")
except cleanup.Interrupted:
    print("came back")
cleanup.signal_handled()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "came back" and not proc.stderr, proc.stdout + proc.stderr


def test_a_skip_after_a_claim_that_failed_is_a_failure(tmp_path):
    """A skip says the server cannot host the scenario: it fails nothing. A claim that failed
    before it (a fault that missed, then a skip) is still a failure, and the script exits 1."""
    result = run_script(BROKEN, "--only", "skips", env=clean_env(SKIP_AFTER="failed"), tmp_path=tmp_path)
    record = result.scenario("skips")
    assert result.returncode == 1 and record["status"] == "failed", record
    assert record["reason"] == "the fault landed; then skipped: needs PostgreSQL 99 or later", record["reason"]
