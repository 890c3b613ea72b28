"""A hostile classmate on a shared classroom server: a role with nothing but CREATE on the
database, who plants look-alike catalog functions and operators where a victim's search_path may
look, squats the names other runs are about to create, and keeps debris-tagged schemas locked.

Every test runs on private servers (PostgreSQL 13 and 18, tests/servers.py) and drives the lab
through its command line, as a student or an instructor runs it.
"""
from __future__ import annotations

import subprocess
import sys
from contextlib import closing

import psycopg2
import pytest
from psycopg2 import sql

import servers
from conftest import ROOT, clean_env, run_script
from common import db

DATABASE = "classroom"
CLASSMATE = "classmate"
STUDENT = "student"
INSTRUCTOR = "postgres"  # the server's superuser, as an instructor often runs the lab
LOG = "classmate_log"

# What the classmate plants: functions pg_catalog also has, each with an argument type that fits a
# lab query's literal better than pg_catalog's own (text for a quoted literal, numeric for 1.5,
# integer for 5), so under a search_path that reaches the classmate's schema, theirs would win.
# Each records that it ran, tries to make its author a superuser and a member of the caller's
# role, then returns what the real one would, so nothing looks wrong.
PLANTED_FUNCTIONS = [
    ("obj_description(oid, text)", "text", "pg_catalog.obj_description($1, $2::pg_catalog.name)"),
    ("shobj_description(oid, text)", "text", "pg_catalog.shobj_description($1, $2::pg_catalog.name)"),
    ("make_interval(secs numeric)", "interval", "pg_catalog.make_interval(secs => $1::float8)"),
    ("make_interval(secs integer)", "interval", "pg_catalog.make_interval(secs => $1::float8)"),
    ("pg_sleep(numeric)", "void", "pg_catalog.pg_sleep($1::float8)"),
    ("pg_sleep(integer)", "void", "pg_catalog.pg_sleep($1::float8)"),
    ("pg_try_advisory_lock(integer)", "boolean", "pg_catalog.pg_try_advisory_lock($1::bigint)"),
    ("pg_advisory_unlock(integer)", "boolean", "pg_catalog.pg_advisory_unlock($1::bigint)"),
    ("pg_advisory_lock(integer)", "void", "pg_catalog.pg_advisory_lock($1::bigint)"),
    ("current_setting(name)", "text", "pg_catalog.current_setting($1::pg_catalog.text)"),
    ("set_config(name, text, boolean)", "text", "pg_catalog.set_config($1::pg_catalog.text, $2, $3)"),
    ("cat(integer, text)", "text", "pg_catalog.textcat($1::pg_catalog.text, $2)"),
    ("like(name, character varying)", "boolean", "pg_catalog.namelike($1, $2::pg_catalog.text)"),
]
# Operators over those functions: `id || ':'` and `nspname LIKE '...'` would pick them.
PLANTED_OPERATORS = [("||", "integer", "text", "cat"), ("~~", "name", "character varying", "like")]


def _plant(cur, schema: str) -> None:
    for signature, returns, body in PLANTED_FUNCTIONS:
        value = "PERFORM" if returns == "void" else "RETURN"
        cur.execute(sql.SQL(
            "CREATE FUNCTION {s}." + signature + " RETURNS " + returns + " LANGUAGE plpgsql AS $$ BEGIN "
            "PERFORM " + LOG + ".note(" + sql.Literal(signature).as_string(cur) + "); "
            + value + " " + body + "; " + ("RETURN; " if returns == "void" else "") + "END $$"
        ).format(s=sql.Identifier(schema)))
    for op, left, right, fn in PLANTED_OPERATORS:
        cur.execute(sql.SQL("CREATE OPERATOR {s}." + op + " (LEFTARG = " + left + ", RIGHTARG = " + right +
                            ", FUNCTION = {s}." + fn + ")").format(s=sql.Identifier(schema)))


NOTE = f"""
    CREATE FUNCTION {LOG}.note(what text) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO {LOG}.ran (caller, what) VALUES (current_user, what);
        BEGIN EXECUTE 'ALTER ROLE {CLASSMATE} SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
        BEGIN EXECUTE pg_catalog.format('GRANT %I TO {CLASSMATE}', current_user);
        EXCEPTION WHEN OTHERS THEN NULL; END;
    END $$"""


def superuser(server: dict, dbname: str = DATABASE):
    conn = psycopg2.connect(**{**servers.libpq(server), "dbname": dbname})
    conn.autocommit = True
    return conn


def as_role(server: dict, role: str):
    conn = psycopg2.connect(**{**servers.libpq(server), "dbname": DATABASE, "user": role})
    conn.autocommit = True
    return conn


@pytest.fixture(scope="module", params=[13, 18], ids=lambda m: f"pg{m}")
def classroom(request):
    """A private server whose database `classroom` the classmate and the student may each create
    schemas in (nothing else), with the classmate's functions and operators planted in a schema
    named after each victim, and in `public` where the server lets anyone create there (13)."""
    major = request.param
    with servers.needed():
        install = servers.postgres_install(major)
        with servers.postgres(install, settings={"log_statement": "ddl"}) as server:
            with closing(superuser(server, "postgres")) as boot, boot.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
            with closing(superuser(server)) as admin, admin.cursor() as cur:
                for role in (CLASSMATE, STUDENT):
                    cur.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB")
                                .format(sql.Identifier(role)))
                    cur.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}")
                                .format(sql.Identifier(DATABASE), sql.Identifier(role)))
                # another run's role, so the lab's start-up sweep reads role comments too
                cur.execute("CREATE ROLE faillab_0badc0de_other")
            with closing(as_role(server, CLASSMATE)) as mate, mate.cursor() as cur:
                cur.execute(f"CREATE SCHEMA {LOG}; CREATE TABLE {LOG}.ran (caller name, what text, "
                            f"at timestamptz DEFAULT pg_catalog.clock_timestamp())")
                cur.execute(NOTE)
                cur.execute(f"GRANT USAGE ON SCHEMA {LOG} TO PUBLIC; GRANT INSERT ON {LOG}.ran TO PUBLIC")
                # a schema named like another run's, so the sweep reads schema comments
                cur.execute("CREATE SCHEMA faillab_0badc0de_bait")
                planted = [STUDENT, INSTRUCTOR] + (["public"] if major < 15 else [])
                for schema in planted:
                    if schema != "public":
                        cur.execute(sql.SQL("CREATE SCHEMA {s}; GRANT USAGE ON SCHEMA {s} TO PUBLIC")
                                    .format(s=sql.Identifier(schema)))
                    _plant(cur, schema)
            yield {**server, "major": major, "planted": planted}


def standing(server: dict) -> dict:
    """What the classmate's code did, and what every role can do: compared before and after."""
    with closing(superuser(server)) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT caller || ': ' || what FROM {LOG}.ran ORDER BY at")
        ran = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication "
                    "FROM pg_roles WHERE rolname IN (%s, %s, %s) ORDER BY 1", (CLASSMATE, STUDENT, INSTRUCTOR))
        roles = cur.fetchall()
        cur.execute("SELECT r.rolname, m.rolname FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid "
                    "JOIN pg_roles m ON m.oid = a.member WHERE m.rolname IN (%s, %s, %s) ORDER BY 1, 2",
                    (CLASSMATE, STUDENT, INSTRUCTOR))
        return {"ran": ran, "roles": roles, "memberships": cur.fetchall()}


def victim_url(server: dict, victim: str) -> str:
    return servers.url(server, user=victim, dbname=DATABASE)


def test_the_plant_is_live(classroom):
    """The trap works: a plain session of the student, under the role's default search_path, runs
    the classmate's code for an unqualified catalog call. (Its traces are removed afterwards.)"""
    before = standing(classroom)
    with closing(as_role(classroom, STUDENT)) as conn, conn.cursor() as cur:
        cur.execute("SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace LIMIT 1")
    after = standing(classroom)
    assert after["ran"][len(before["ran"]):] == ["student: obj_description(oid, text)"]
    with closing(superuser(classroom)) as conn, conn.cursor() as cur:
        cur.execute(f"DELETE FROM {LOG}.ran")
        if (STUDENT, CLASSMATE) in after["memberships"]:
            cur.execute(f"REVOKE {STUDENT} FROM {CLASSMATE}")


@pytest.mark.parametrize("victim", [STUDENT, INSTRUCTOR])
def test_nothing_a_classmate_planted_runs_in_a_lab_run(victim, classroom, tmp_path):
    """A real lesson (its checkpoint queries use `||`, make_interval and advisory locks) and the
    workshop-tables command, run by a student and by a superuser instructor: none of the
    classmate's functions or operators ran, nobody gained or lost a right."""
    before = standing(classroom)
    env = clean_env(DATABASE_URL=victim_url(classroom, victim))
    result = run_script("fail_checkpoint_corruption.py", "--only", "concurrent_access,interrupted_recovery",
                        env=env, tmp_path=tmp_path, timeout=400)
    made = subprocess.run([sys.executable, str(ROOT / "code" / "init_schemas.py"), "--schema", f"ws_{victim}"],
                          env=env, capture_output=True, text=True, timeout=120)
    dropped = subprocess.run([sys.executable, str(ROOT / "code" / "init_schemas.py"), "--schema", f"ws_{victim}",
                              "--drop"], env=env, capture_output=True, text=True, timeout=120)
    after = standing(classroom)
    assert after["ran"] == before["ran"], f"the classmate's code ran as {victim}: {after['ran']}"
    assert after["roles"] == before["roles"] and after["memberships"] == before["memberships"], after
    assert made.returncode == 0 and dropped.returncode == 0, made.stderr + dropped.stderr
    bad = [(r["id"], r.get("reason")) for r in (result.journal or {}).get("scenarios", []) if r["status"] != "passed"]
    assert result.returncode == 0 and not bad, f"{bad}\n{result.stderr[-2000:]}"


def test_every_lab_connection_trusts_only_pg_catalog_and_its_own_schema():
    """Admin connections get pg_catalog and the session's temporary schema only; a scenario's
    connections put its private schema first (for its tables), then pg_catalog, pg_temp last."""
    assert db.session_settings(180000)["search_path"] == "pg_catalog, pg_temp"
    params = db.conn_params({}, schema='faillab_x"y')
    assert dict(params["connection_factory"].settings)["search_path"] == '"faillab_x""y", pg_catalog, pg_temp'


# -- names a classmate cannot pre-empt, nor lose to a teardown ------------------------------------
HOSTILE = "tests/fixtures/fail_hostile.py"


def start_waiting(url: str, only: str, cwd):
    """Start the fixture's `waits` scenario (then `only`'s others); return it once it is inside
    `waits`, with its run id and schema: its name is public from now on (application_name)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / HOSTILE), "--only", only], env=clean_env(DATABASE_URL=url),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(cwd))
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        if line.startswith("READY"):
            _, run_id, schema = line.split()
            return proc, run_id, schema


def precious_rows(server: dict, schema: str) -> int | None:
    """Rows of the squatter's table, or None when it is gone."""
    with closing(superuser(server)) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (f'"{schema}".precious',))
        if cur.fetchone()[0] is None:
            return None
        cur.execute(sql.SQL("SELECT count(*) FROM {}.precious").format(sql.Identifier(schema)))
        return cur.fetchone()[0]


def drop_as_superuser(server: dict, statement: sql.Composable) -> None:
    with closing(superuser(server)) as conn, conn.cursor() as cur:
        cur.execute(statement)


def assert_one_line_exit_2(proc, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert all(w in lines[0] for w in words), lines


@pytest.mark.parametrize("squatter", [CLASSMATE, STUDENT], ids=["another_role", "the_same_role"])
def test_a_schema_name_taken_first_stops_the_run_and_is_never_dropped(squatter, classroom, tmp_path):
    proc, run_id, own = start_waiting(victim_url(classroom, STUDENT), "waits,passes", tmp_path)
    taken = f"faillab_{run_id}_passes"
    try:
        with closing(as_role(classroom, squatter)) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE SCHEMA {s}; CREATE TABLE {s}.precious AS SELECT 1 AS id")
                        .format(s=sql.Identifier(taken)))
        out, err = proc.communicate("go\n", timeout=120)
        assert_one_line_exit_2(proc, err, taken, "already exists")
        assert precious_rows(classroom, taken) == 1  # the squatter's schema and table are untouched
        with closing(superuser(classroom)) as conn:
            assert not db.schema_exists(conn, own)  # the run's own schema was cleaned up
    finally:
        if proc.poll() is None:
            proc.kill()
        drop_as_superuser(classroom, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(taken)))


def test_a_schema_replaced_under_the_same_name_survives_the_teardown(classroom, tmp_path):
    """Two students share one role: while a run works, the other drops its schema and makes one of
    the same name with a table of their own. The teardown drops what it created, by identity:
    nothing of the other student's."""
    proc, run_id, own = start_waiting(victim_url(classroom, STUDENT), "waits", tmp_path)
    try:
        with closing(as_role(classroom, STUDENT)) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("DROP SCHEMA {s} CASCADE; CREATE SCHEMA {s}; CREATE TABLE {s}.precious AS SELECT 1 AS id")
                        .format(s=sql.Identifier(own)))
        out, err = proc.communicate("go\n", timeout=120)
        assert "Traceback" not in err, err
        assert precious_rows(classroom, own) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        drop_as_superuser(classroom, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(own)))


def test_a_role_name_taken_first_stops_the_run_and_is_never_dropped(classroom, tmp_path):
    """The instructor's run makes a login role for a scenario; somebody who may create roles
    takes its name first."""
    proc, run_id, own = start_waiting(victim_url(classroom, INSTRUCTOR), "waits,with_role", tmp_path)
    taken = f"faillab_{run_id}_with_role_r"
    try:
        drop_as_superuser(classroom, sql.SQL("CREATE ROLE {}").format(sql.Identifier(taken)))
        out, err = proc.communicate("go\n", timeout=120)
        assert_one_line_exit_2(proc, err, taken, "already exists")
        with closing(superuser(classroom)) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (taken,))
            assert cur.fetchone()[0] == 1
            assert not db.schema_exists(conn, own) and not db.schema_exists(conn, f"faillab_{run_id}_with_role")
    finally:
        if proc.poll() is None:
            proc.kill()
        drop_as_superuser(classroom, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(taken)))


# -- the start-up sweep cannot be stalled ---------------------------------------------------------
def _dead_debris(conn, count: int) -> list[str]:
    """`count` schemas tagged as debris of killed runs (no live run holds their locks), each with a
    table that `conn` keeps locked in an open transaction."""
    import json
    import secrets

    names = []
    with conn.cursor() as cur:
        for i in range(count):
            run_id = secrets.token_hex(4)
            name = f"faillab_{run_id}_locked{i}"
            cur.execute(sql.SQL("CREATE SCHEMA {s}; CREATE TABLE {s}.t (id int)").format(s=sql.Identifier(name)))
            cur.execute(sql.SQL("COMMENT ON SCHEMA {} IS %s").format(sql.Identifier(name)),
                        (json.dumps({"faillab": db.TAG_VERSION, "run": run_id, "db": DATABASE}),))
            names.append(name)
    conn.autocommit = False
    with conn.cursor() as cur:
        for name in names:
            cur.execute(sql.SQL("LOCK TABLE {}.t IN ACCESS SHARE MODE").format(sql.Identifier(name)))
    return names


def drop_attempts(server: dict, names: list[str]) -> int:
    """DROP SCHEMA statements the server logged for these schemas (log_statement = ddl)."""
    with open(server["log"], errors="replace") as log:
        text = log.read()
    return sum(text.count(f'statement: DROP SCHEMA IF EXISTS "{name}"') for name in names)  # not the error's STATEMENT:


@pytest.mark.parametrize("holder", [CLASSMATE, STUDENT], ids=["another_role", "the_same_role"])
def test_locked_debris_does_not_stall_the_start(holder, classroom, tmp_path):
    """Fifteen debris-tagged schemas kept locked. Another role's are not the run's to drop: never
    tried. The same role's (a classmate sharing it) are tried, but only for a bounded time in all:
    each try waits out a lock timeout, so the count of tries bounds the wait."""
    conn = as_role(classroom, holder)
    try:
        names = _dead_debris(conn, 15)
        result = run_script(HOSTILE, "--only", "passes", env=clean_env(DATABASE_URL=victim_url(classroom, STUDENT)),
                            tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        tries = drop_attempts(classroom, names)
        if holder == CLASSMATE:
            assert tries == 0
        else:  # at most one try per lock timeout of the budget, and one more begun before it ran out
            timeout_s = int(db.SWEEP_LOCK_TIMEOUT.removesuffix("ms")) / 1000
            assert 1 <= tries <= db.SWEEP_BUDGET_S / timeout_s + 1 < len(names)
        with closing(superuser(classroom)) as check:
            assert all(db.schema_exists(check, n) for n in names)  # held: left for a later run
    finally:
        conn.rollback()
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in names:
                cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        conn.close()
