"""common.faults' statement hooks against the embedded server: what a hooked cursor reports of each
statement, and what a connection handed over as Instrumented reports of its commits and rollbacks."""
from __future__ import annotations

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import pytest
from psycopg2 import sql

from common.faults import Hooks, Instrumented, hooked_cursor


class Journal(Hooks):
    """Every report, in order."""

    def __init__(self):
        self.seen: list[tuple] = []

    def opened(self, conn, pid):
        self.seen.append(("opened", pid))

    def before_execute(self, conn, text):
        self.seen.append(("before", text))

    def after_execute(self, conn, text):
        self.seen.append(("after", text))

    def before_commit(self, conn):
        self.seen.append(("commit",))

    def after_end(self, conn, committed):
        self.seen.append(("end", committed))

    def failed(self, conn, exc):
        self.seen.append(("failed", type(exc).__name__))


@pytest.fixture
def raw(embedded_params):
    conn = psycopg2.connect(**embedded_params)
    try:
        yield conn
    finally:
        conn.close()


def test_a_hooked_cursor_reports_the_text_of_str_bytes_and_composed_statements(raw):
    journal = Journal()
    raw.cursor_factory = hooked_cursor(journal)
    composed = sql.SQL("SELECT {} AS {}").format(sql.Literal(3), sql.Identifier("three"))
    with raw.cursor() as cur:
        for query, args in (("SELECT %s", (1,)), (b"SELECT 2", None), (composed, None)):
            cur.execute(query, args)
    texts = ["SELECT %s", "SELECT 2", 'SELECT 3 AS "three"']
    assert journal.seen == [(when, text) for text in texts for when in ("before", "after")]


def test_a_failed_statement_is_reported_as_failed_not_as_run(raw):
    journal = Journal()
    raw.cursor_factory = hooked_cursor(journal)
    with pytest.raises(psycopg2.errors.DivisionByZero), raw.cursor() as cur:
        cur.execute("SELECT 1/0")
    assert journal.seen == [("before", "SELECT 1/0"), ("failed", "DivisionByZero")]


def test_instrumented_reports_the_server_pid_statements_commits_and_rollbacks(raw):
    journal = Journal()
    conn = Instrumented(raw, journal)
    assert journal.seen == [("opened", raw.info.backend_pid)]  # the pid's own SELECT is not reported
    assert raw.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    create = "CREATE TEMP TABLE t (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)"
    with conn, conn.cursor() as cur:
        cur.execute(create)
    with pytest.raises(ZeroDivisionError), conn:
        raise ZeroDivisionError
    with conn.cursor(cursor_factory=psycopg2.extras.DictCursor) as cur:  # a class the caller names
        cur.execute("INSERT INTO t VALUES (1)")
        assert isinstance(cur, psycopg2.extras.DictCursor)
    with cur.connection.cursor() as cur:  # the real connection's own cursors report too
        cur.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(psycopg2.errors.UniqueViolation):
        conn.commit()  # the deferred check fails the COMMIT
    assert journal.seen[1:] == [
        ("before", create), ("after", create), ("commit",), ("end", True),
        ("end", False),
        *[(when, "INSERT INTO t VALUES (1)") for _ in range(2) for when in ("before", "after")],
        ("commit",), ("failed", "UniqueViolation")]


# -- the proxy's silent path ----------------------------------------------------------------------
def test_a_stalled_path_holds_the_reply_until_it_resumes_and_closes_nothing(embedded_params):
    import threading

    from common import db
    from common.faults import FaultProxy

    admin = db.connect(embedded_params)
    try:
        with FaultProxy.in_front_of(admin) as proxy:
            conn = db.connect(proxy.params(embedded_params))
            pid = db.backend_pid(conn)
            proxy.stall()
            got: list = []
            waiter = threading.Thread(target=lambda: got.append(db.scalar(conn, "SELECT 7")), daemon=True)
            waiter.start()
            waiter.join(1.0)
            assert waiter.is_alive() and got == []  # the query reached the server; its reply did not come back
            assert db.scalar(admin, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)) == 1
            proxy.resume()
            waiter.join(10)
            assert got == [7]  # the held reply arrives once the path heals, on the same session
            conn.close()
    finally:
        admin.close()


def test_a_stall_is_a_no_op_without_faults(embedded_params, monkeypatch):
    from common import db
    from common.faults import FaultProxy

    monkeypatch.setenv("FAILLAB_NO_FAULTS", "1")
    admin = db.connect(embedded_params)
    try:
        with FaultProxy.in_front_of(admin) as proxy:
            conn = db.connect(proxy.params(embedded_params))
            proxy.stall()
            assert db.scalar(conn, "SELECT 7") == 7
            conn.close()
    finally:
        admin.close()
