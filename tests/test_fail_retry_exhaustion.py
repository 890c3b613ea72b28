"""fail_retry_exhaustion.py: end to end on both targets, plus its helpers against a real server."""
from __future__ import annotations

import random
import re
import socket
import threading

import psycopg2
import psycopg2.errors
import pytest
from tenacity import wait_exponential, wait_fixed

from common import db
from conftest import assert_passed, run_script

import fail_retry_exhaustion as lab

IDS = ["exhaustion", "storm", "backoff_calculation", "non_transient"]


def test_every_scenario_demonstrates_recovers_and_cleans(target, tmp_path):
    """One run per target (embedded and the shared server), read through its journal."""
    _, env, params = target
    result = run_script("fail_retry_exhaustion.py", env=env, tmp_path=tmp_path)
    assert_passed(result, params, IDS)
    m = {r["id"]: r["measurements"] for r in result.journal["scenarios"]}

    # exhaustion: RetryError hides the cause; the dead letter is replayed, the unit runs once
    assert result.error_types("exhaustion") == ["tenacity.RetryError", "psycopg2.OperationalError",
                                                "psycopg2.OperationalError"]
    retry_error, cause, _ = (e["message"] for e in result.scenario("exhaustion")["observed_errors"])
    assert re.fullmatch(r"RetryError\[<Future at 0x[0-9a-f]+ state=finished raised OperationalError>\]", retry_error)
    assert cause.splitlines()[0] not in retry_error
    assert m["exhaustion"]["attempts_before_giving_up"] == 5
    assert m["exhaustion"]["policy_seconds"] >= 0.15  # it really slept 10 + 20 + 40 + 80 ms
    assert m["exhaustion"]["unit_runs"] == 1

    # storm: full jitter at least halves the busiest 50 ms of logins, and is refused less,
    # though it makes more attempts while the database is down (the README says so)
    storm = m["storm"]
    assert 2 * storm["full_jitter_peak_50ms"] <= storm["no_jitter_peak_50ms"]
    assert storm["no_jitter_peak_50ms"] > lab.STORM_SLOTS
    assert storm["full_jitter_rejections"] < storm["no_jitter_rejections"]
    assert storm["full_jitter_attempts"] > storm["no_jitter_attempts"] >= 3 * lab.STORM_WORKERS
    assert min(storm["no_jitter_recovery_s"], storm["full_jitter_recovery_s"]) > lab.STORM_OUTAGE_S
    assert result.error_types("storm") == ["psycopg2.OperationalError"]
    if "a role of their own" in result.scenario("storm")["sections"]["description"]:  # else the proxy's cap
        assert "too many connections for role" in result.scenario("storm")["observed_errors"][0]["message"]
    conn = db.connect(params, autocommit=True)
    try:  # the workers' role went with the run
        roles = db.scalar(conn, "SELECT count(*) FROM pg_roles WHERE rolname LIKE %s",
                          (f"{db.SCHEMA_PREFIX}{result.journal['run_id']}%",))
    finally:
        conn.close()
    assert roles == 0

    # backoff_calculation: overflow, ms read as s, a late stop; the fixed policy meets the deadline
    backoff = m["backoff_calculation"]
    assert result.error_types("backoff_calculation") == ["OverflowError", "psycopg2.OperationalError",
                                                         "psycopg2.OperationalError"]
    assert backoff["ms_as_seconds_sleep_s"] == lab.RETRY_DELAY_MS
    assert backoff["naive_worst_case_s"] > lab.DEADLINE_S >= backoff["capped_worst_case_s"]
    assert backoff["stop_after_delay_attempts"] == 3 and backoff["stop_after_delay_overshoot_s"] > 0
    assert backoff["stop_before_delay_attempts"] == 2
    assert backoff["stop_before_delay_seconds"] <= lab.STOP_LIMIT_S
    assert backoff["fixed_policy_seconds"] <= lab.DEADLINE_S * lab.SCALE

    # non_transient: the permanent error once instead of five times; the deadlock retried to success
    fixed = m["non_transient"]
    assert fixed["permanent_error_attempts_naive"] == 5 and fixed["permanent_error_attempts_fixed"] == 1
    assert fixed["deadlock_attempts"] == 2
    assert fixed["order_42_payments"] == 2 and fixed["order_43_payments"] == 1
    assert result.sqlstates("non_transient") == ["42P01", "42P01", "40P01"]


# -- is_transient, against errors a real server raised ------------------------------------------
@pytest.fixture
def scratch(embedded_params):
    """A private schema on the embedded server, dropped afterwards; yields (params, schema)."""
    admin = db.connect(embedded_params, autocommit=True)
    schema = f"{db.SCHEMA_PREFIX}{db.new_run_id()}_classify"
    db.create_schema(admin, schema)
    try:
        yield embedded_params, schema
    finally:
        db.drop_schema(admin, schema)
        admin.close()


def raised_by(conn, statement: str) -> psycopg2.Error:
    with pytest.raises(psycopg2.Error) as info:
        with conn.cursor() as cur:
            cur.execute(statement)
    conn.rollback()
    return info.value


def test_permanent_errors_are_not_transient(scratch):
    params, schema = scratch
    conn = db.connect(params, schema=schema)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE t (id int PRIMARY KEY)")
            cur.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        errors = {"42P01": raised_by(conn, "SELECT * FROM no_such_table"),
                  "23505": raised_by(conn, "INSERT INTO t VALUES (1)"),
                  "22012": raised_by(conn, "SELECT 1 / 0"),
                  "42601": raised_by(conn, "SELEC 1")}
    finally:
        conn.close()
    assert {code: e.pgcode for code, e in errors.items()} == {code: code for code in errors}
    assert not any(lab.is_transient(e) for e in errors.values())


def test_a_refused_connection_is_transient():
    with socket.socket() as probe:  # a port nobody listens on: bind, note it, close it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(psycopg2.OperationalError) as info:
        psycopg2.connect(host="127.0.0.1", port=port, dbname="x", user="x", connect_timeout=2)
    assert info.value.pgcode is None
    assert lab.is_transient(info.value)


def test_serialization_failure_is_transient(scratch):
    params, schema = scratch
    a, b = db.connect(params, schema=schema), db.connect(params, schema=schema, autocommit=True)
    try:
        with b.cursor() as cur:
            cur.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
            cur.execute("INSERT INTO t VALUES (1, 0)")
        a.set_session(isolation_level="REPEATABLE READ")
        with a.cursor() as cur:
            cur.execute("SELECT v FROM t WHERE id = 1")  # a's snapshot starts here
        with b.cursor() as cur:
            cur.execute("UPDATE t SET v = 1 WHERE id = 1")
        error = raised_by(a, "UPDATE t SET v = 2 WHERE id = 1")
    finally:
        a.close()
        b.close()
    assert isinstance(error, psycopg2.errors.SerializationFailure) and error.pgcode == "40001"
    assert lab.is_transient(error)


def test_deadlock_is_transient(scratch):
    params, schema = scratch
    setup = db.connect(params, schema=schema, autocommit=True)
    with setup.cursor() as cur:
        cur.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int)")
        cur.execute("INSERT INTO accounts VALUES (1, 0), (2, 0)")
    setup.close()
    barrier, caught = threading.Barrier(2, timeout=10), []

    def lock_in_order(first: int, second: int) -> None:
        conn = db.connect(params, schema=schema)
        try:
            with conn.cursor() as cur:
                cur.execute("SET deadlock_timeout = '50ms'")
                cur.execute("UPDATE accounts SET balance = 1 WHERE id = %s", (first,))
                barrier.wait()
                cur.execute("UPDATE accounts SET balance = 1 WHERE id = %s", (second,))
            conn.commit()
        except psycopg2.Error as exc:
            caught.append(exc)
            conn.rollback()
        finally:
            conn.close()

    workers = [threading.Thread(target=lock_in_order, args=pair) for pair in ((1, 2), (2, 1))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    assert [e.pgcode for e in caught] == ["40P01"]
    assert lab.is_transient(caught[0])


def test_only_database_errors_are_classified():
    assert not lab.is_transient(ValueError("not a database error"))
    assert not lab.is_transient(OSError("connection reset"))  # a retry decision for another layer


# -- the backoff arithmetic ----------------------------------------------------------------------
def test_backoff_schedule_follows_the_policy():
    assert lab.backoff_schedule(wait_exponential(multiplier=1, max=10), 7) == [1, 2, 4, 8, 10, 10]
    assert lab.backoff_schedule(wait_fixed(0.5), 4) == [0.5, 0.5, 0.5]
    assert lab.backoff_schedule(wait_fixed(1), 1) == []
    naive = lab.backoff_schedule(lab.wait_naive, 31)
    assert naive[0] == 2 and naive[29] == 2 ** 30
    assert lab.backoff_schedule(lab.wait_naive, 1024)[-1] == 2.0 ** 1023  # the largest power of two a float holds
    with pytest.raises(OverflowError):
        lab.backoff_schedule(lab.wait_naive, 1025)
    assert lab.backoff_schedule(wait_exponential(multiplier=1, max=30), 1025)[-1] == 30  # tenacity's guard


def test_full_jitter_stays_in_its_window_and_follows_the_seed():
    def draws(seed):
        return lab.backoff_schedule(lab.wait_full_jitter(random.Random(seed), multiplier=1, max=30), 12)
    windows = lab.backoff_schedule(wait_exponential(multiplier=1, max=30), 12)
    assert all(0 <= d <= w for d, w in zip(draws(5), windows))
    assert draws(5) == draws(5) and draws(5) != draws(6)


def test_fixed_policy_worst_case_fits_the_deadline():
    """The fixed policy over a step that always fails, every jitter draw at the top of its window;
    its sleeps are recorded instead of slept."""
    class TopOfWindow(random.Random):
        def uniform(self, a, b):
            return b

    def always_fails():
        raise psycopg2.OperationalError("server closed the connection unexpectedly")

    asked = []
    policy = lab.fixed_policy(TopOfWindow()).copy(sleep=asked.append)
    with pytest.raises(psycopg2.OperationalError):  # reraise: the real error, not a RetryError
        policy(always_fails)
    assert policy.statistics["attempt_number"] == lab.ATTEMPTS
    assert asked == [1, 2, 4, 8, 16] + [lab.CAP_S] * (lab.ATTEMPTS - 6)
    assert sum(asked) <= lab.DEADLINE_S


def test_peak_in_window():
    assert lab.peak_in_window([]) == 0
    assert lab.peak_in_window([0.0, 0.01, 0.02, 0.2]) == 3
    assert lab.peak_in_window([0.0, 0.05, 0.1], width=0.05) == 2  # both ends of a window count
    assert lab.peak_in_window([0.3, 0.0, 0.31, 0.32]) == 3  # order does not matter
