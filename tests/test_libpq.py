"""libpq's conventions, the server settings a lesson depends on, and the embedded server's edge
cases, each through the command line as a user meets them, on private servers.

- The fault proxy reaches the server the user's own connection reached, as libpq resolved it: a
  password only in a pgpass file, a service file (while PGHOST names another server), a Unix
  socket host, PGSSLMODE (a TLS-only server; the embedded default, reached over its socket, where
  libpq never uses TLS), a multi-host list whose first host is down. Each runs one scenario that
  goes through the proxy (`--only`), which is enough: every proxy scenario gets its proxy from
  the same Scenario.proxy().
- Server settings: idle_session_timeout on the role, a database whose encoding cannot hold the
  lessons' text, a SQL_ASCII database, a LATIN1 client encoding.
- The embedded server: a killed postmaster left as a zombie, a full disk for its data folder, a
  full temp folder, and `python -X dev -W error`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import psutil
import psycopg2
import pytest
from psycopg2 import sql

import pwserver
import servers
from conftest import ROOT, assert_passed, clean_env, lab_schemas, run_script
from test_safety import wait_until

PROXIED = {  # one scenario per script that goes through the fault proxy, each short
    "checkpoint": ("fail_checkpoint_corruption.py", "db_down"),
    "retry": ("fail_retry_exhaustion.py", "exhaustion"),
}
BROKEN = "tests/fixtures/fail_broken.py"


def run_proxied(which: str, env: dict, tmp_path: Path, check: dict):
    """Run one proxy scenario with `env`; it must pass, clean, and leave no schema on `check`."""
    script, scenario_id = PROXIED[which]
    result = run_script(script, "--only", scenario_id, env=env, tmp_path=tmp_path, timeout=180)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert_passed(result, check, [scenario_id])
    return result


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def plain():
    """A private PostgreSQL 18 with trust authentication, a TCP port and a Unix socket (no TLS)."""
    with servers.needed(), servers.postgres(servers.wheel_install(), prefix="labtest-libpq-") as server:
        yield server


@pytest.fixture(scope="module")
def pw():
    """A private server where lab_user logs in with a password, over TCP only."""
    with servers.needed(), pwserver.password_server() as server:
        yield server


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A private server that takes TCP connections with TLS only; yields (server, CA file)."""
    with servers.needed(), servers.tls_postgres(servers.postgres_install(18),
                                                tmp_path_factory.mktemp("certs")) as found:
        yield found


def superuser(server: dict):
    conn = psycopg2.connect(**servers.libpq(server))
    conn.autocommit = True
    return conn


# -- the fault proxy reaches the server as libpq did ---------------------------------------------
def test_a_password_only_in_a_pgpass_file_reaches_the_server_through_the_proxy(pw, tmp_path):
    url = f"postgresql://lab_user@{pw['host']}:{pw['port']}/{pw['dbname']}"
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"{pw['host']}:{pw['port']}:{pw['dbname']}:lab_user:{pwserver.LAB_PASSWORD}\n")
    passfile.chmod(0o600)
    without = run_script(PROXIED["checkpoint"][0], env=clean_env(DATABASE_URL=url, PGPASSFILE=str(tmp_path / "none")),
                         tmp_path=tmp_path)
    assert "no password supplied" in one_line_error(without)  # the file is the only place it is
    check = {**pw, "user": "lab_user", "password": pwserver.LAB_PASSWORD}
    result = run_proxied("checkpoint", clean_env(DATABASE_URL=url, PGPASSFILE=str(passfile)), tmp_path, check)
    assert pwserver.LAB_PASSWORD not in result.stdout + result.stderr + json.dumps(result.journal)


def test_a_service_file_names_the_server_while_pghost_points_elsewhere(plain, tmp_path):
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[faillab_test]\nhost={plain['host']}\nport={plain['port']}\nuser=postgres\n"
                        "dbname=postgres\n")
    elsewhere = servers.free_port()  # nothing listens there
    env = clean_env(PGSERVICEFILE=str(services), PGSERVICE="faillab_test", PGHOST="127.0.0.1",
                    PGPORT=str(elsewhere))
    result = run_proxied("retry", env, tmp_path, servers.libpq(plain))
    target = result.journal["database"]["target"]  # the service, not the host PGHOST names
    assert "service=faillab_test" in target and str(elsewhere) not in target, target


@pytest.mark.parametrize("form", ["query", "percent-encoded"])
def test_a_unix_socket_host_goes_through_the_proxy_to_the_socket(form, plain, tmp_path):
    folder = plain["socket_dir"]
    url = (f"postgresql://postgres@/postgres?host={folder}&port={plain['port']}" if form == "query"
           else f"postgresql://postgres@{quote(folder, safe='')}:{plain['port']}/postgres")
    run_proxied("retry", clean_env(DATABASE_URL=url), tmp_path, servers.libpq(plain))


@pytest.mark.parametrize("how", ["url", "PG variables"])
def test_a_multi_host_list_goes_through_the_proxy_to_the_host_that_answered(how, plain, tmp_path):
    down = servers.free_port()  # nothing listens there: libpq moves on to the next host
    if how == "url":
        env = clean_env(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{down},127.0.0.1:{plain['port']}/postgres")
    else:
        env = clean_env(PGHOST="127.0.0.1,127.0.0.1", PGPORT=f"{down},{plain['port']}", PGUSER="postgres",
                        PGDATABASE="postgres")
    run_proxied("retry", env, tmp_path, servers.libpq(plain))


@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
def test_pgsslmode_reaches_a_tls_only_server_through_the_proxy(sslmode, tls, tmp_path):
    """hostssl only: the proxy's connections must use TLS too (verify-full: against "localhost")."""
    server, ca = tls
    url = servers.url(server, host="localhost")  # no sslmode in the URL: PGSSLMODE says it
    env = clean_env(DATABASE_URL=url, PGSSLMODE=sslmode, PGSSLROOTCERT=str(ca))
    run_proxied("checkpoint", env, tmp_path, {**servers.libpq(server), "sslmode": "require"})


def test_pgsslmode_require_with_the_embedded_default(embedded_params, tmp_path):
    """A PGSSLMODE meant for another server: the embedded default is reached over its Unix
    socket, where libpq never uses TLS; the proxy's connections use none either."""
    run_proxied("retry", clean_env(PGSSLMODE="require"), tmp_path, embedded_params)


def test_pgsslmode_require_on_a_server_without_tls_is_one_line(plain, tmp_path):
    env = clean_env(DATABASE_URL=servers.url(plain), PGSSLMODE="require")
    line = one_line_error(run_script(PROXIED["retry"][0], env=env, tmp_path=tmp_path))
    assert "does not support SSL" in line and "PGSSLMODE" in line, line


# -- server settings ------------------------------------------------------------------------------
@pytest.mark.parametrize("timeout", ["500ms", "2s"])
def test_idle_session_timeout_on_the_role_ends_no_lab_session(timeout, plain, tmp_path):
    """The admin connection idles while a scenario runs (the storm: about 3 s)."""
    role = f"labtest_idle_{timeout}"
    conn = superuser(plain)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER").format(sql.Identifier(role)))
            cur.execute(sql.SQL("ALTER ROLE {} SET idle_session_timeout = {}").format(sql.Identifier(role),
                                                                                     sql.Literal(timeout)))
        with psycopg2.connect(**{**servers.libpq(plain), "user": role}) as raw, raw.cursor() as cur:
            cur.execute("SHOW idle_session_timeout")
            assert cur.fetchone()[0] == timeout  # really in force for the role
        url = servers.url(plain, user=role)
        result = run_script("fail_retry_exhaustion.py", "--only", "storm", env=clean_env(DATABASE_URL=url),
                            tmp_path=tmp_path, timeout=180)
        assert_passed(result, servers.libpq(plain), ["storm"])
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        conn.close()


@contextlib.contextmanager
def database(server: dict, name: str, encoding: str):
    conn = superuser(server)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {} ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
                        .format(sql.Identifier(name), sql.Literal(encoding)))
        yield {**servers.libpq(server), "dbname": name}
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.close()


def test_a_database_that_cannot_hold_the_lessons_text_is_refused_at_start(plain, tmp_path):
    with database(plain, "labtest_latin1", "LATIN1") as check:
        with contextlib.closing(psycopg2.connect(**check, client_encoding="UTF8")) as raw, raw.cursor() as cur, \
                pytest.raises(psycopg2.errors.UntranslatableCharacter):
            cur.execute("SELECT %s::text", ("\u6771\U0001f389",))  # text structured_parsing stores
        env = clean_env(DATABASE_URL=servers.url(plain, dbname="labtest_latin1"))
        line = one_line_error(run_script("fail_logging_failure.py", env=env, tmp_path=tmp_path))
        assert "LATIN1" in line and "UTF8" in line, line
        assert lab_schemas(check) == []


@pytest.mark.parametrize("case", ["SQL_ASCII database", "PGCLIENTENCODING=LATIN1", "URL client_encoding=LATIN1",
                                  "role client_encoding LATIN1"])
def test_structured_parsing_keeps_its_text_whatever_the_client_encoding(case, plain, tmp_path):
    with contextlib.ExitStack() as stack:
        check, url, extra = servers.libpq(plain), servers.url(plain), {}
        if case == "SQL_ASCII database":
            check = stack.enter_context(database(plain, "labtest_sql_ascii", "SQL_ASCII"))
            url = servers.url(plain, dbname="labtest_sql_ascii")
        elif case == "PGCLIENTENCODING=LATIN1":
            extra = {"PGCLIENTENCODING": "LATIN1"}
        elif case == "URL client_encoding=LATIN1":
            url = servers.url(plain, client_encoding="LATIN1")
        else:
            conn = stack.enter_context(contextlib.closing(superuser(plain)))
            with conn.cursor() as cur:
                cur.execute("CREATE ROLE labtest_latin1_client LOGIN SUPERUSER")
                stack.callback(lambda: conn.cursor().execute("DROP ROLE labtest_latin1_client"))
                cur.execute("ALTER ROLE labtest_latin1_client SET client_encoding = 'LATIN1'")
            url = servers.url(plain, user="labtest_latin1_client")
        result = run_script("fail_logging_failure.py", "--only", "structured_parsing",
                            env=clean_env(DATABASE_URL=url, **extra), tmp_path=tmp_path)
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert_passed(result, check, ["structured_parsing"])


# -- the embedded server --------------------------------------------------------------------------
# A parent that adopts orphans and never reaps them: what a container's pid 1 is without --init.
# It runs the command given as its child, prints the child's pid, and stays until stdin closes.
NO_INIT = """
import ctypes, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)
print("CHILD", child.pid, flush=True)
for line in child.stdout:
    print(line, end="", flush=True)
child.wait()
sys.stdin.read()
"""


@pytest.fixture
def open_tmp():
    """A temp folder the embedded server's user may traverse. pytest's own (tmp_path) is under
    /tmp/pytest-of-<user>, which every new pytest session of that user sets back to 0700."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="labtest-libpq-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def private_data_dir(root: Path, monkeypatch):
    """FAILLAB_DATA_DIR for the scripts and for common.embedded here; at the end, the server of
    that folder is stopped (after its linger) before the folder goes."""
    from common import embedded

    monkeypatch.setenv("FAILLAB_DATA_DIR", str(root))
    try:
        yield clean_env(FAILLAB_DATA_DIR=str(root))
    finally:
        wait_until(lambda: embedded.server_process() is None and embedded.watchdog_pid() is None, 30)
        if embedded.server_process() is not None:
            embedded.stop_server()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a subreaper (prctl) is Linux only")
def test_a_killed_postmaster_left_a_zombie_is_dead_not_a_broken_folder(open_tmp, tmp_path, monkeypatch):
    from common import embedded

    with private_data_dir(open_tmp / "data", monkeypatch) as env:
        parent = subprocess.Popen([sys.executable, "-c", NO_INIT, sys.executable, str(ROOT / BROKEN), "--only",
                                   "sleeps"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=str(tmp_path))
        try:
            child = int(parent.stdout.readline().split()[1])
            for line in parent.stdout:
                if line.startswith("READY"):
                    break
            else:
                raise AssertionError("the run under the non-reaping parent never got ready")
            postmaster = embedded.server_process()
            assert postmaster is not None and postmaster.ppid() == parent.pid  # adopted, never to be reaped
            os.kill(postmaster.pid, signal.SIGKILL)
            os.kill(child, signal.SIGKILL)  # the run dies with it: nothing cleans up
            assert wait_until(lambda: postmaster.status() == psutil.STATUS_ZOMBIE, 10)
            result = run_script(BROKEN, "--only", "passes", env=env, tmp_path=tmp_path)
            assert postmaster.status() == psutil.STATUS_ZOMBIE  # still there while the next run started
        finally:
            parent.stdin.close()  # the zombies go to init, which reaps them
            parent.wait(30)
            parent.stdout.close()
        assert result.returncode == 0, result.stderr[-2000:]
        assert "broken" not in result.stderr, result.stderr
        assert [p.name for p in (open_tmp / "data").iterdir() if p.name.startswith("pg18.")] == []


@contextlib.contextmanager
def tiny_disk(where: Path, size: str, fill_kb: int = 0):
    """A tmpfs of `size` mounted at `where` (root only), optionally mostly filled; unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()[:200]}")
    try:
        if fill_kb:
            (where / "filler").write_bytes(b"\0" * fill_kb * 1024)
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_for_the_data_folder_shows_initdbs_own_error(open_tmp, tmp_path, monkeypatch):
    with tiny_disk(open_tmp / "home", "2m") as home, private_data_dir(home / "data", monkeypatch) as env:
        result = run_script(BROKEN, "--only", "passes", env=env, tmp_path=tmp_path)
        line = one_line_error(result)
        assert "No space left on device" in line and "free space" in line, line
        assert [p.name for p in (home / "data").iterdir() if p.name.startswith("pg18.")] == []  # nothing set aside


def test_a_full_temp_folder_is_named_not_blamed_on_the_formatter(embedded_params, open_tmp, tmp_path):
    with tiny_disk(open_tmp / "tmp", "1m", fill_kb=1000) as tmp:
        result = run_script("fail_logging_failure.py", "--only", "structured_parsing",
                            env=clean_env(TMPDIR=str(tmp)), tmp_path=tmp_path)
        record = result.scenario("structured_parsing")
        assert result.returncode == 1 and record["status"] == "failed", result.stdout[-3000:]
        assert "No space left on device" in record["reason"] and "formatter" not in record["reason"], record["reason"]
        assert record["cleaned"] is True
        assert [p.name for p in tmp.iterdir() if p.name != "filler"] == []
    assert lab_schemas(embedded_params, result.journal["run_id"]) == []


DEV_MODE_RUNS = [("fail_checkpoint_corruption.py", "db_down"), ("fail_idempotency_break.py", "data_drift"),
                 ("fail_logging_failure.py", "structured_parsing"), ("fail_retry_exhaustion.py", "exhaustion")]


def test_python_dev_mode_with_warnings_as_errors_runs_clean(open_tmp, tmp_path, monkeypatch):
    """Each script under `python -X dev -W error`, on a private data folder, so the first run
    starts the server and its watchdog itself (the others join it or start it again)."""
    with private_data_dir(open_tmp / "data", monkeypatch) as env:
        for script, scenario_id in DEV_MODE_RUNS:
            proc = subprocess.run([sys.executable, "-X", "dev", "-W", "error", str(ROOT / script), "--only",
                                   scenario_id], env=env, capture_output=True, text=True, timeout=180,
                                  cwd=str(tmp_path))
            assert proc.returncode == 0, (script, proc.stdout[-2000:], proc.stderr[-3000:])
            warned = [line for line in proc.stderr.splitlines() if "Warning" in line or "Exception ignored" in line]
            assert not warned, (script, proc.stderr[-3000:])
