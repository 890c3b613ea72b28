"""Retries that give up, storm, miscalculate, or retry the wrong thing.

Retries are how a pipeline survives a transient fault, and how it turns a blip into an outage.
Each scenario breaks a retry policy for real: connection failures come from a fault proxy in
front of PostgreSQL, server errors from PostgreSQL itself, and every figure printed is measured
during the run. Every retry is a tenacity policy, so where the fix is a better policy, naive and
fixed differ by one value.
Waits are scaled down to milliseconds (1 s in production = 1 ms here unless said otherwise); the
output says what the production values would be. Stops by time are decided on a clock the lab
hands tenacity, so their figures are the same on every machine. --seed repeats the random draws
(jitter), not the measured timings, which depend on the machine. Each scenario runs the check an
operator would run (a SQL check, or an alert on the job's metrics, alerts/), where it must fire on
the damage and be quiet after the fix.

Run: python fail_retry_exhaustion.py [--only ID] [--json PATH] [--seed N] [--keep] [--ascii]
"""
from __future__ import annotations

import common  # noqa: F401  first: the lab's signal handlers are installed from the first instant

import contextlib
import itertools
import logging
import multiprocessing.connection
import os
import random
import re
import signal
import socket
import textwrap
import threading
import time

import psycopg2
import psycopg2.errors
from psycopg2 import sql
from tenacity import (RetryCallState, RetryError, Retrying, retry_if_exception, retry_if_exception_type,
                      stop_after_attempt, stop_after_delay, stop_before_delay, wait_exponential, wait_fixed,
                      wait_random_exponential)

from common import budget, db, main, scenario, schema
from common.detect import metric_alert, sql_check
from common.faults import Hooks, Instrumented, faults_enabled
from common.fixes import fix
from common.metrics import total
from common.output import words

JOB = "nightly_orders"
SOURCE_ROWS = 100
BATCH_SIZE = 10
log = logging.getLogger("pipeline")


# -- the unit of work most scenarios retry ------------------------------------------------------
def batch_bounds(unit: str) -> tuple[int, int]:
    """'batch-0007' covers source ids 61..70."""
    n = int(unit.rsplit("-", 1)[1])
    return (n - 1) * BATCH_SIZE + 1, n * BATCH_SIZE


def load_batch(cur, unit: str) -> None:
    """Copy one batch to target_rows, and log that it ran: unit_runs counts side effects."""
    lo, hi = batch_bounds(unit)
    cur.execute("INSERT INTO target_rows (id, payload, amount) SELECT id, payload, amount FROM source_rows "
                "WHERE id BETWEEN %s AND %s ON CONFLICT (id) DO NOTHING", (lo, hi))
    cur.execute("INSERT INTO unit_runs (unit) VALUES (%s)", (unit,))


def load_batch_via(params: dict, unit: str) -> None:
    """One attempt: connect (through the proxy), load, commit. A lost connection raises."""
    with counted_attempt():
        conn = db.connect(params)
        try:
            with conn.cursor() as cur:
                load_batch(cur, unit)
            conn.commit()
        finally:
            conn.close()


def batch_state(conn, unit: str) -> tuple[int, int]:
    """(rows of the batch in target_rows equal to their source row, times the unit ran)."""
    lo, hi = batch_bounds(unit)
    loaded = db.scalar(conn, "SELECT count(*) FROM target_rows JOIN source_rows USING (id, payload, amount) "
                             "WHERE id BETWEEN %s AND %s", (lo, hi))
    runs = db.scalar(conn, "SELECT count(*) FROM unit_runs WHERE unit = %s", (unit,))
    conn.commit()
    return loaded, runs


def timeline(s, started: float):
    """A tenacity before_sleep hook: one line per failed attempt, as it happens."""
    def before_sleep(rs: RetryCallState) -> None:
        exc = rs.outcome.exception()
        s.say(f"attempt {rs.attempt_number}  t={1000 * (time.monotonic() - started):4.0f} ms  "
              f"sleep {1000 * rs.next_action.sleep:3.0f} ms  {type(exc).__name__}: {first_line(exc, 38)}")
    return before_sleep


def first_line(exc: BaseException, width: int = 60) -> str:
    """The first line of an error, without libpq's 'connection to server at ... failed:' preamble."""
    text = (str(exc).strip().splitlines() or [repr(exc)])[0].split(" failed: ", 1)[-1]
    return text if len(text) <= width else text[:width - 3] + "..."


# -- what the job counts, as production would scrape it (prometheus_client) ------------------------
# Into the registry of the run under way (common/metrics.py): --metrics DIR writes them.
_counting: list = []  # the scenario whose job is running: its attempts are counted there


@contextlib.contextmanager
def job_metrics(s):
    """While the job runs, count each attempt it makes in s's metrics; the job's metrics exist
    from its start (0 dead letters, last success 0: never)."""
    s.counter("pipeline_dead_letters_total", "Dead letters the job wrote")
    s.gauge("pipeline_last_success_timestamp_seconds", "When a unit of the job last completed")
    _counting.append(s)
    try:
        yield
    finally:
        _counting.remove(s)


@contextlib.contextmanager
def counted_attempt():
    """One attempt of the job at a unit of work, counted by how it ended: ok, transient (worth
    another, is_transient) or permanent (it fails the same way every time)."""
    try:
        yield
    except Exception as exc:
        count_attempt("transient" if is_transient(exc) else "permanent")
        raise
    count_attempt("ok")


def count_attempt(outcome: str) -> None:
    for s in _counting[-1:]:
        s.counter("pipeline_attempts_total", "Attempts the job made at a unit of work, by outcome",
                  ["outcome"]).labels(outcome=outcome).inc()


def dead_letters_written(s, n: int) -> None:
    s.counter("pipeline_dead_letters_total", "Dead letters the job wrote").inc(n)


def unit_completed(s, at: float | None = None) -> None:
    """A unit of the job completed: now, or at `at` (seconds since the epoch)."""
    last = s.gauge("pipeline_last_success_timestamp_seconds", "When a unit of the job last completed")
    last.set(at) if at is not None else last.set_to_current_time()


def backoff_schedule(policy, attempts: int) -> list[float]:
    """The sleeps a tenacity wait policy asks for after failed attempts 1 .. attempts-1."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    waits = []
    for n in range(1, attempts):
        state.attempt_number = n
        waits.append(policy(state))
    return waits


# -- 1. exhaustion ---------------------------------------------------------------------------------
# Production: 5 attempts, 1 s doubling to at most 8 s (15 s of waiting). Here: 10 ms doubling to 80 ms.
LOAD_POLICY = Retrying(stop=stop_after_attempt(5), wait=wait_exponential(multiplier=0.01, max=0.08),
                       retry=retry_if_exception_type(psycopg2.OperationalError))
EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL: "try again later"; the scheduler retries the job, not the unit


def run_unit_naive(params: dict, dlq, unit: str) -> int:
    """Naive: log what str(exc) says and exit 1."""
    try:
        LOAD_POLICY(load_batch_via, params, unit)
        return 0
    except RetryError as exc:
        log.error("%s failed: %s", unit, exc)
        return 1


def run_unit_dead_letter(params: dict, dlq, unit: str) -> int:
    """Fixed: on exhaustion, park the unit with its real cause."""
    try:
        LOAD_POLICY(load_batch_via, params, unit)
        return 0
    except RetryError as exc:
        cause = exc.last_attempt.exception()  # str(exc): only its class
        with dlq.cursor() as cur:
            cur.execute(
                "INSERT INTO dead_letter"
                " (job, unit, error_type, error, attempts)"
                " VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (job, unit) DO UPDATE"
                " SET error_type = excluded.error_type,"
                " error = excluded.error, replayed_at = NULL,"
                " attempts = dead_letter.attempts + excluded.attempts",
                (JOB, unit, type(cause).__name__, str(cause).strip(),
                 exc.last_attempt.attempt_number))
        dlq.commit()
        return EXIT_TEMPFAIL


@contextlib.contextmanager
def job_log():
    """The job's log records while it runs, kept for the lesson to show instead of printed."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    log.propagate, propagated = False, log.propagate
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.propagate = propagated


def run_job(s, run_unit, params: dict, unit: str) -> int:
    """What the scheduler runs: one unit through `run_unit` (dead letters over s.conn, which does
    not go through the proxy), and the job's metric pipeline_units_total by outcome, read from
    the server afterwards: loaded (its rows are there), parked (a dead letter is pending for it)
    or lost (neither). Its attempts are counted as they are made (load_batch_via); a dead letter
    is counted written when its row has a new version."""
    letter = "SELECT xmin::text FROM dead_letter WHERE job = %s AND unit = %s"
    before = db.scalar(s.conn, letter, (JOB, unit))
    s.conn.commit()
    with job_metrics(s):
        status = run_unit(params, s.conn, unit)
    s.conn.rollback()  # end any transaction the call left open on the lab's connection
    loaded, _ = batch_state(s.conn, unit)
    parked = db.scalar(s.conn, "SELECT count(*) FROM dead_letter WHERE job = %s AND unit = %s"
                               " AND replayed_at IS NULL", (JOB, unit))
    written = db.scalar(s.conn, letter, (JOB, unit)) not in (None, before)  # a new row version
    s.conn.commit()
    outcome = "loaded" if loaded == BATCH_SIZE else "parked" if parked else "lost"
    s.counter("pipeline_units_total", "Units of work the job ran, by outcome",
              ["outcome"]).labels(outcome=outcome).inc()
    dead_letters_written(s, int(written))
    if outcome == "loaded":
        unit_completed(s)
    return status


# The job's metrics: a unit given up and parked nowhere is lost; alerted on.
UNIT_LOST = metric_alert("PipelineUnitLost", lambda values: [
    ("lost", n)] if (n := total(values, "pipeline_units_total", outcome="lost")) else [])


def replayed_units(s, units: list[str]) -> None:
    """The replay is the job too: a unit it returns has completed."""
    if units:
        unit_completed(s)


def replay_dead_letters_naive(conn) -> list[str]:
    """Naive: the work commits, then the mark commits on its own."""
    done = []
    while True:
        with conn.cursor() as cur:
            cur.execute("SELECT unit FROM dead_letter"
                        " WHERE job = %s AND replayed_at IS NULL"
                        " ORDER BY id LIMIT 1", (JOB,))
            row = cur.fetchone()
            if row is None:
                conn.commit()
                return done
            load_batch(cur, row[0])
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("UPDATE dead_letter SET replayed_at = now()"
                        " WHERE job = %s AND unit = %s", (JOB, row[0]))
        conn.commit()
        done.append(row[0])


def replay_dead_letters(conn) -> list[str]:
    """Replay each parked unit and mark it in the SAME transaction."""
    done = []
    while True:
        with conn.cursor() as cur:
            cur.execute("SELECT unit FROM dead_letter"
                        " WHERE job = %s AND replayed_at IS NULL"
                        " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                        (JOB,))
            row = cur.fetchone()
            if row is None:
                conn.commit()
                return done
            load_batch(cur, row[0])
            cur.execute("UPDATE dead_letter SET replayed_at = now()"
                        " WHERE job = %s AND unit = %s", (JOB, row[0]))
        conn.commit()  # the work and its mark: both or neither
        done.append(row[0])


class WatchedReplay(Hooks):
    """What the lab sees of a replay's connection (faults.Instrumented wraps it from outside): each
    statement is sorted into what it does to the dead letters (the read: SELECT from dead_letter;
    the work: INSERT INTO target_rows or unit_runs; the mark: UPDATE or DELETE of dead_letter), and
    subclasses act before or after it."""

    KINDS = (("read", re.compile(r"\bSELECT\b.*\bFROM\s+dead_letter\b", re.I | re.S)),
             ("work", re.compile(r"\bINSERT\s+INTO\s+(target_rows|unit_runs)\b", re.I)),
             ("mark", re.compile(r"\b(UPDATE|DELETE\s+FROM)\s+dead_letter\b", re.I)))

    def __init__(self):
        self.done: list[str] = []  # the kinds of the statements that ran, in order

    def kinds(self, text: str) -> set[str]:
        return {kind for kind, pattern in self.KINDS if pattern.search(text)}

    def before_execute(self, conn, text: str) -> None:
        self.before(self.kinds(text))

    def after_execute(self, conn, text: str) -> None:
        self.after(self.kinds(text))

    def before(self, kinds: set[str]) -> None:
        pass

    def after(self, kinds: set[str]) -> None:
        self.done += sorted(kinds)


class TerminatedBetweenWorkAndMark(WatchedReplay):
    """Once one half of a replay (the work or the mark) has run, its session is ended with
    pg_terminate_backend just before the other half's first statement, once. A statement that
    does both halves at once leaves nothing in between (`one_statement`). The backend's pid is
    the server's, told to opened() when the connection is wrapped."""

    def __init__(self, admin):
        super().__init__()
        self._admin = admin
        self._pid = 0
        self.landed_before: str | None = None  # the half that never got to run
        self.one_statement = False
        self._armed = True  # one try only

    def opened(self, conn, pid: int) -> None:
        self._pid = pid

    def before(self, kinds: set[str]) -> None:
        halves = kinds & {"work", "mark"}
        self.one_statement |= len(halves) == 2
        if len(halves) != 1 or not self._armed:
            return
        ran = {"work", "mark"} & set(self.done)
        if ran and not ran & halves:
            pid, self._armed = self._pid, False
            if not db.scalar(self._admin, "SELECT pg_terminate_backend(%s)", (pid,)):
                return  # no such backend: the fault did not land (the claim on landed_before says so)
            deadline = time.monotonic() + 5  # wait until the backend is gone (pg_terminate_backend signals)
            while db.scalar(self._admin, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)):
                if time.monotonic() > deadline:
                    return  # still there: not ended, so not landed
                time.sleep(0.01)
            self.landed_before = halves.pop()  # the server no longer lists the backend


class ReplayersMeet(WatchedReplay):
    """Two replayers started together: each, once its first read of dead_letter has returned, waits
    before its first work for the other's first read (at most `patience` seconds: a read that
    waits for a lock the first one holds returns only after its commit). Notes when it sent its
    first read and when its first work began."""

    def __init__(self, mine, theirs, patience: float = 3.0):
        super().__init__()
        self.mine, self.theirs, self.patience = mine, theirs, patience
        self.read_at: float | None = None
        self.work_at: float | None = None

    def before(self, kinds: set[str]) -> None:
        if "read" in kinds and self.read_at is None:
            self.read_at = time.monotonic()
        if "work" in kinds and "work" not in self.done:
            self.theirs.wait(self.patience)
            self.work_at = time.monotonic()

    def after(self, kinds: set[str]) -> None:
        super().after(kinds)
        if "read" in kinds:
            self.mine.set()


EXHAUSTION_FIXES = [
    fix("run_unit", naive=run_unit_naive, fixed=run_unit_dead_letter,
        contract="""
            Run one unit: LOAD_POLICY(load_batch_via, params, unit); return 0 when it loads.
            When the policy gives up (tenacity.RetryError), park the unit in dead_letter over
            `dlq` (a connection the outage does not reach) with its REAL cause: error_type = the
            class name of the last attempt's exception, error = its message (not str(RetryError),
            which names only the class), attempts = the attempts made; commit; return
            EXIT_TEMPFAIL (75), the status a scheduler reads as "try again later".
            The grader runs it while the database is down for the job: the return value must be
            75 and dead_letter must hold (unit, 'OperationalError', 5) with the real message; then
            once more with the database up, on the next unit: 0, and the unit loaded once.""",
        hints=("RetryError hides the real error. Where does tenacity keep the last attempt?",
               "exc.last_attempt.exception() is the real error and exc.last_attempt.attempt_number\n"
               "the attempts: INSERT them into dead_letter over dlq, commit, return EXIT_TEMPFAIL.")),
    fix("replay_dead_letters", naive=replay_dead_letters_naive, fixed=replay_dead_letters,
        contract="""
            Replay every unit of JOB parked in dead_letter with replayed_at NULL: run
            load_batch(cur, unit) and set replayed_at; return the units replayed, in order.
            Each unit must run exactly once, however the replay is interrupted. The grader ends
            the replay's session (pg_terminate_backend) between the work and the mark, then starts
            two replays at once, then one more: the unit must then be loaded, have run exactly
            once (unit_runs), been replayed by one of the two, and have no dead letter pending.""",
        hints=("What is left if the session dies after the batch committed but before the dead\n"
               "letter was marked? What does the next replay do then?",
               "Do the work and the UPDATE of replayed_at in the same transaction, one commit after\n"
               "both: a session that dies in between leaves neither.")),
]


@scenario("exhaustion", "Retries run out while the database is still down", fixes=EXHAUSTION_FIXES)
def exhaustion(s):
    unit = "batch-0007"
    s.description(f"""
        A job loads {SOURCE_ROWS} source rows in batches of {BATCH_SIZE}; each batch is one unit of work,
        retried by a tenacity policy: 5 attempts, 10 ms doubling to 80 ms (production: 1 s to 8 s).
        The promise: a batch is loaded exactly once, even across a database outage.""")
    s.tables("source_rows", "target_rows", "dead_letter")
    with s.conn.cursor() as cur:
        cur.execute("CREATE TABLE unit_runs (unit text NOT NULL, ran_at timestamptz DEFAULT clock_timestamp())")
    schema.seed_source(s.conn, SOURCE_ROWS)
    proxy = s.proxy()
    params = s.via(proxy)

    s.trigger(f"""
        The job's connections go through the fault proxy, which now resets every one of them: for
        the job, the database is gone, and it stays gone longer than the policy lasts. The job
        tries {unit}; each failed attempt is printed by the policy's before_sleep.""")
    proxy.down()
    down_at = started = time.monotonic()
    with s.expect(RetryError) as caught:
        LOAD_POLICY.copy(before_sleep=timeline(s, started))(load_batch_via, params, unit)
    s.require(caught.exc is not None, f"the outage landed: the proxy refused the job's connections to {unit}")
    policy_s = s.measure("policy_seconds", round(time.monotonic() - started, 3), show=False,
                         note="seconds from the first attempt to the RetryError")
    exc = caught.exc
    cause = exc.last_attempt.exception()
    attempts = s.measure("attempts_before_giving_up", exc.last_attempt.attempt_number, show=False,
                         note="attempts the policy made before it raised RetryError", headline=True)
    s.say(f"attempt {attempts}  t={1000 * policy_s:4.0f} ms  no sleep: stop_after_attempt(5) gives up "
          f"and raises {type(exc).__name__}")
    waits = backoff_schedule(LOAD_POLICY.wait, attempts)
    s.triggered_if(policy_s >= sum(waits), f"between its attempts the policy slept "
                                           f"{' + '.join(f'{1000 * w:.0f}' for w in waits)} ms: "
                                           f"the RetryError came {1000 * policy_s:.0f} ms after the first")
    s.say(f"What a log line built from str(exc) shows: {exc}")
    s.triggered_if(type(cause).__name__ in str(exc) and str(cause).splitlines()[0] not in str(exc),
                   f"str(exc) names the cause's class, {type(cause).__name__}, and not its message")
    s.say("The cause is still there, in exc.last_attempt.exception():")
    s.observe(cause)
    s.say("With reraise=True the policy raises the last real error itself, not a wrapper:")
    with s.expect(psycopg2.OperationalError):
        LOAD_POLICY.copy(reraise=True)(load_batch_via, params, unit)
    loaded, runs = batch_state(s.conn, unit)
    s.triggered_if(attempts == 5 and loaded == runs == 0,
                   f"all {attempts} attempts failed; {unit} has {loaded} of {BATCH_SIZE} rows loaded, ran {runs} times")
    with job_log() as records:
        since = time.monotonic()
        status = run_job(s, run_unit_naive, params, unit)
    s.measure("naive_job_attempts", proxy.count("down", since), show=False,
              note="connections of the naive job the proxy refused")
    s.say("The job itself, run_unit_naive, does that; its log holds:")
    s.code("\n".join(textwrap.fill(f"{r.levelname} {r.getMessage()}", 72, subsequent_indent="  ")
                     for r in records), lang="text")  # wrapped as a log viewer would
    parked = db.scalar(s.conn, "SELECT count(*) FROM dead_letter")
    s.conn.commit()
    s.triggered_if(status == 1 and parked == 0,
                   f"the job exited {status} and wrote {parked} dead letter(s): nothing records {unit}")

    production_sleeps_s = sum(waits) / 0.01  # 10 ms here = 1 s there
    s.root_cause(f"""
        A retry policy is a bet that the fault is shorter than the policy. The outage outlived it
        (the {attempts} attempts above; {production_sleeps_s:.0f} s of sleeps in production), and tenacity raised
        RetryError. Its message names only the cause's class ("raised OperationalError"); a job
        that logs str(exc) and exits 1 leaves no record of which unit failed, nor why, nor a way
        to redo just that unit. A check on a dead-letter table would find nothing: this job
        never writes one. What shows the loss is the job's own count of units by outcome. And a
        replay that commits the work and its mark separately runs the unit twice when it dies
        between the two.""",
        detect=UNIT_LOST,
        runbook="""
            The job gave up on a unit of work and parked it nowhere: its rows are missing and
            nothing will replay them. Find the unit in the job's log, load or park it by hand,
            and make the job write a dead letter (with the real error) when its retries run out.""")

    with s.step("run the unit again with run_unit (database still down for the job)") as st:
        since = time.monotonic()
        status = run_job(s, s.fix("run_unit"), params, unit)
        st.result = f"returned {status}; dead_letter now holds:"
    s.measure("fixed_job_attempts", proxy.count("down", since), show=False,
              note="connections of the fixed job the proxy refused")
    parked = db.rows(s.conn, "SELECT unit, error_type, attempts, error FROM dead_letter WHERE job = %s", (JOB,))
    s.conn.commit()
    if parked:
        s.table(["unit", "error_type", "attempts", "error"], [[u, t, n, first_line(e, 36)] for u, t, n, e in parked])
    s.recovered_if(status == EXIT_TEMPFAIL and [row[:3] for row in parked] == [(unit, "OperationalError", 5)]
                   and "RetryError" not in parked[0][3],
                   f"the job exits with EX_TEMPFAIL ({EXIT_TEMPFAIL}) and {unit} is parked with its real "
                   f"error and 5 attempts ({len(parked)} dead letter(s))")
    outage_s = s.measure("outage_seconds", round(time.monotonic() - down_at, 3), show=False,
                         note="seconds the database was down for the job")
    proxy.up()
    with s.step(f"the database is back after {outage_s:.2f} s: replay the dead letters; the replay's "
                "session is ended between the work and the mark") as st:
        admin = s.connect(autocommit=True)
        faulty = TerminatedBetweenWorkAndMark(admin)
        conn = Instrumented(s.connect(params), faulty)
        try:
            first = s.fix("replay_dead_letters")(conn)
            replayed_units(s, first)
            st.result = f"replayed {words(first)}"
        except psycopg2.Error as err:
            s.observe(err, "The replay's session, ended between the two halves:")
            st.result = f"the replay failed: {type(err).__name__}" + (
                f" (SQLSTATE {err.pgcode})" if err.pgcode else " (no SQLSTATE: the session was gone)")
        admin.close()  # the fault's session, done with: the run keeps within its share of the server
    if faulty.one_statement and faulty.landed_before is None:
        s.recovered_if(True, "the replay does the work and the mark in one statement: no moment between them")
    else:
        ran = sorted({k for k in faulty.done if k != "read"})  # the half that ran before the end
        s.recovered_if(len(ran) == 1 and faulty.landed_before in {"work", "mark"} - set(ran),
                       f"the fault landed: the server ended the replay's session (gone from "
                       f"pg_stat_activity) after its {words(ran)}, before its {words(faulty.landed_before)}")
    loaded, runs = batch_state(s.conn, unit)
    pending = db.scalar(s.conn, "SELECT count(*) FROM dead_letter WHERE replayed_at IS NULL")
    s.conn.commit()
    s.recovered_if((runs, pending) in ((0, 1), (1, 0)),
                   f"the ended replay left {unit} done and marked, or neither: ran {runs} time(s), "
                   f"{pending} dead letter(s) pending")
    with s.step("the scheduler runs the replay again: two replayers at once, then one more") as st:
        a_read, b_read, replayed = s.event(), s.event(), {}

        def replayer(name: str, conn) -> None:
            replayed[name] = s.fix("replay_dead_letters")(conn)
            replayed_units(s, replayed[name])

        meets = [ReplayersMeet(a_read, b_read), ReplayersMeet(b_read, a_read)]
        conns, pair = [], []
        for name, meet in zip("ab", meets):  # a starts while b still connects, as before
            conns.append(s.connect(params))
            pair.append(s.thread(replayer, name, Instrumented(conns[-1], meet)))
        for w in pair:
            w.join(30)
        conns.append(s.connect(params))
        third = s.fix("replay_dead_letters")(conns[-1])
        replayed_units(s, third)
        for conn in conns:  # done with: the run keeps within its share of the server
            conn.close()
        st.result = f"then {words(third)} (nothing left to do)"
    reads = [m.read_at for m in meets]
    works = [m.work_at for m in meets if m.work_at is not None]
    s.recovered_if(None not in reads and works and max(reads) < min(works),
                   f"the two replayers met: both had sent their read of dead_letter before either began "
                   f"the work ({len(works)} of them did work)")
    between = [u for name in ("a", "b") for u in replayed.get(name, ["(failed)"])]  # each must end
    s.recovered_if(between == [unit],
                   f"two replayers at once replayed {unit} once between them: a {words(replayed.get('a', 'failed'))}, "
                   f"b {words(replayed.get('b', 'failed'))}")
    loaded, runs = batch_state(s.conn, unit)
    pending = db.scalar(s.conn, "SELECT count(*) FROM dead_letter WHERE replayed_at IS NULL")
    s.conn.commit()
    s.measure("unit_runs", runs, show=False, note="times the parked unit ran, every replay counted")
    s.recovered_if(loaded == BATCH_SIZE and runs == 1 and pending == 0,
                   f"{unit} ran exactly once and is loaded and marked: ran {runs} time(s), {loaded} of "
                   f"{BATCH_SIZE} rows equal to source, {pending} dead letter(s) pending")
    following = "batch-0008"
    with s.step(f"the database is up: the job runs the next unit, {following}, with run_unit") as st:
        status = run_job(s, s.fix("run_unit"), params, following)
        loaded, runs = batch_state(s.conn, following)
        st.result = f"returned {status}; {loaded} of {BATCH_SIZE} rows loaded"
    s.recovered_if((status, loaded, runs) == (0, BATCH_SIZE, 1),
                   f"with the database up run_unit loads {following} once and exits 0: returned {status}, "
                   f"{loaded} of {BATCH_SIZE} rows, ran {runs} time(s)")

    s.prevention("""
        Expect exhaustion: catch RetryError, keep the real cause (exc.last_attempt.exception(), or
        reraise=True), park the unit where the outage does not reach (here a table written over a
        connection that bypasses the proxy; in production often a separate database or queue),
        and exit with a status the scheduler understands. Replay marks the dead letter in the
        same transaction as the work: a session ended between the two leaves neither, and a
        second replay finds nothing left to do. Its read locks the dead letter it takes (FOR
        UPDATE SKIP LOCKED), so two replayers at once never take the same unit.""",
                 lesson="Plan for the retries running out: keep the real error, park the unit where "
                        "the outage does not reach, and replay it exactly once.",
                 questions=(
                     "When your job's retries run out, what does the log say, and could you redo "
                     "just the unit that failed?",
                     "Where would your dead letters live so that the outage that made them does "
                     "not reach them too?",
                     "What exit status does your scheduler need to tell \"try again later\" from "
                     "\"broken\"?"))


# -- 2. storm --------------------------------------------------------------------------------------
STORM_WORKERS = 32
STORM_MIN_WORKERS = 16  # fewer: a jittered schedule shows its spread less surely (1 seed in 20 at 8)
STORM_OUTAGE_S = 0.30   # production: a 30 s failover. Ends 50 ms before the lockstep retry at +350 ms
STORM_BASE_S = 0.05     # production: 1 s
STORM_CAP_S = 0.8       # production: 60 s
STORM_GIVE_UP_S = 5     # production: 5 min
STORM_HOLD_S = 0.08     # each worker's batch keeps its session this long
STORM_WINDOW_S = 0.05
STORM_ROUNDS = 3        # a measurement blurred by a busy machine is repeated at most this often


class wait_full_jitter(wait_random_exponential):
    """tenacity's full jitter, drawing from a random.Random of its own.

    wait_random_exponential draws from the module-level `random`,
    which all threads share: which worker gets which number would
    depend on thread scheduling, so --seed could not repeat the draws.
    One generator per worker, seeded in worker order, makes each
    worker's waits a function of --seed."""

    def __init__(self, rng: random.Random, **kw):
        super().__init__(**kw)
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        high = wait_exponential.__call__(self, retry_state)
        return self.rng.uniform(self.min, high)


def storm_policy_naive(rng: random.Random) -> Retrying:
    """Naive: exponential backoff, no jitter: the same sleeps for all."""
    return Retrying(
        wait=wait_exponential(multiplier=STORM_BASE_S,
                              max=STORM_CAP_S),
        stop=stop_before_delay(STORM_GIVE_UP_S),
        retry=retry_if_exception(is_transient), reraise=True)


def storm_policy_jittered(rng: random.Random) -> Retrying:
    """Fixed: capped full jitter, each worker drawing from its own rng."""
    return Retrying(
        wait=wait_full_jitter(rng, multiplier=STORM_BASE_S,
                              max=STORM_CAP_S),
        stop=stop_before_delay(STORM_GIVE_UP_S),
        retry=retry_if_exception(is_transient), reraise=True)


def peak_in_window(times: list[float], width: float = STORM_WINDOW_S) -> int:
    """The most events in any window of `width` seconds (a sliding window over sorted times)."""
    times, peak, lo = sorted(times), 0, 0
    for hi, t in enumerate(times):
        while times[lo] < t - width:
            lo += 1
        peak = max(peak, hi - lo + 1)
    return peak


def planned_first_logins(policy_for, seeds: list[int], outage_s: float = STORM_OUTAGE_S) -> list[float]:
    """When each worker's policy plans its first login after the outage: the sum of the sleeps its
    tenacity wait asks for (each worker's own generator, seeded as in the run; attempts counted as
    taking no time), first at or past `outage_s`. Depends on the policy and --seed only."""
    planned = []
    for seed in seeds:
        wait, at = policy_for(random.Random(seed)).wait, 0.0
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
        while at < outage_s and state.attempt_number < 1000:
            at += wait(state)
            state.attempt_number += 1
        planned.append(at)
    return planned


def first_login(params: dict, rng: random.Random):
    """A worker's first session, before the outage. Copies of this script or other users may fill the
    server's max_connections for a moment: retry (jittered) until there is room. Not measured."""
    return Retrying(wait=wait_full_jitter(rng, multiplier=0.01, max=0.2), stop=stop_after_delay(10),
                    retry=retry_if_exception_type(psycopg2.OperationalError), reraise=True)(db.connect, params)


def storm_worker(params: dict, label: str, policy: Retrying, barrier, logins: list, out: dict, i: int,
                 refused_login) -> None:
    """One pipeline worker: holds its own connection, loses it, reconnects under `policy`, writes its batch
    and logs, in the job's log (storm_done), how many of its logins were refused (`refused_login(exc,
    when)` tells a refusal from the outage). Appends the time of every login it sends to `logins`."""
    state = {"conn": first_login(params, random.Random(i)), "attempts": 0, "errors": []}

    def write_batch() -> None:
        state["attempts"] += 1
        try:
            if state["conn"] is None:
                logins.append(time.monotonic())
                state["conn"] = db.connect(params)
            refused = sum(1 for when, exc in state["errors"] if refused_login(exc, when))
            with state["conn"].cursor() as cur:
                cur.execute("INSERT INTO storm_done (run, worker, attempts, refused) VALUES (%s, %s, %s, %s)",
                            (label, i, state["attempts"], refused))
                cur.execute("SELECT pg_catalog.pg_sleep(%s)", (STORM_HOLD_S,))
            state["conn"].commit()
        except psycopg2.OperationalError as exc:
            state["errors"].append((time.monotonic(), exc))
            if state["conn"] is not None:
                state["conn"].close()
            state["conn"] = None
            raise

    try:
        barrier.wait()  # every worker is connected
        barrier.wait()  # the database is gone: every worker finds out now, at the same moment
        policy(write_batch)
        out[i] = {"done": time.monotonic(), "attempts": state["attempts"], "errors": state["errors"]}
    finally:
        if state["conn"] is not None:
            state["conn"].close()


def run_storm(s, admin, role: dict | None, label: str, policy_for, seeds: list[int], slots: int) -> dict:
    """One run of the outage under one policy: connect the workers, take the database away, count."""
    workers = len(seeds)
    proxy = s.proxy()
    params = {**s.via(proxy), **(role or {})}
    if role:
        set_connection_limit(admin, role["user"], workers)
    barrier = s.barrier(workers + 1, timeout=20)
    logins: list[float] = []
    out: dict = {}
    back_at = [float("inf")]  # when the database came back, once it has

    def refused_login(exc, when: float) -> bool:
        # psycopg2 gives a refused login no SQLSTATE (pgcode is None): the server's FATAL message is
        # how to tell 53300 from a dropped connection. Without the role, the proxy's resets after up().
        return "too many connections for role" in str(exc) if role else when >= back_at[0]

    policies = [policy_for(random.Random(seed)) for seed in seeds]
    threads = [s.thread(storm_worker, params, label, policies[i], barrier, logins, out, i, refused_login,
                        name=f"faillab-storm-{i}") for i in range(workers)]
    barrier.wait()
    # While it is down, other clients take the free slots: when it comes back only `slots` are
    # left. PostgreSQL checks CONNECTION LIMIT at login only, so the live sessions are not touched.
    # The limit is read back from where it is enforced: the role's in pg_roles, or the proxy's cap.
    if role:
        set_connection_limit(admin, role["user"], slots)
        in_force = db.scalar(admin, "SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role["user"],))
    else:
        proxy.max_connections = slots
        in_force = proxy.max_connections if faults_enabled() else None
    proxy.down()
    # The proxy's connection threads see the drop at their next select timeout, up to 0.2 s later.
    # Let them end before the workers look: waking among the workers, queueing with them for the
    # GIL, they would make the workers notice the loss up to ~90 ms apart instead of ~10 ms.
    deadline = time.monotonic() + 2
    while proxy.threads_alive > 1 and time.monotonic() < deadline:  # 1: its accept loop
        time.sleep(0.002)
    lost_at = time.monotonic()
    barrier.wait()
    time.sleep(STORM_OUTAGE_S)
    up_at = back_at[0] = time.monotonic()  # before up(): a login sent in between is counted as reaching it
    proxy.up()
    for t in threads:
        t.join(10)
    # Login times are taken by the workers as they send them: the proxy, a Python thread on a busy
    # machine, may accept a burst later than it was sent, which is not what jitter is about.
    sent = sorted(t - lost_at for t in logins)
    back = up_at - lost_at
    reached = [t for t in sent if t >= back]
    refusals = sorted(((when, e) for r in out.values() for when, e in r["errors"] if refused_login(e, when)),
                      key=lambda pair: pair[0])
    rows, distinct = db.rows(s.conn, "SELECT count(*), count(DISTINCT worker) FROM storm_done WHERE run = %s",
                             (label,))[0]
    logged = db.scalar(s.conn, "SELECT coalesce(sum(refused), 0) FROM storm_done WHERE run = %s", (label,))
    s.conn.commit()
    return {"refusals": [e for _, e in refusals], "back": back, "limit": in_force, "logged_refused": logged,
            "rejected": len(refusals) if role else proxy.count("over_cap", lost_at),
            "down": len(sent) - len(reached), "reached": len(reached), "times": sent, "peak": peak_in_window(reached),
            "recovered": len(out), "rows": rows, "workers": distinct,
            "lost": sum(1 for r in out.values() if r["errors"]),
            "recovery_s": max((r["done"] for r in out.values()), default=lost_at) - lost_at}


def set_connection_limit(admin, role: str, limit: int) -> None:
    with admin.cursor() as cur:
        cur.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(sql.Identifier(role), sql.Literal(limit)))


def histogram(series: list[dict], bucket: float = 0.05, width: int = 22) -> list[list[str]]:
    """One row per `bucket` seconds after the loss, one text bar per run, side by side. Rows before the
    outage's end hold the attempts sent while it was down; the rows after, the logins that reached
    the server (an attempt sent in the last moments of the outage is counted in its last row)."""
    split = round(STORM_OUTAGE_S / bucket)

    def row_of(t: float, back: float) -> int:
        return min(int(t / bucket), split - 1) if t < back else max(int(t / bucket), split)

    buckets = max(max((row_of(t, r["back"]) for t in r["times"]), default=0) for r in series) + 1
    counts = [[0] * buckets for _ in series]
    for c, r in zip(counts, series):
        for t in r["times"]:
            c[row_of(t, r["back"])] += 1
    top = max(max(c) for c in counts) or 1
    return [[f"{round(1000 * k * bucket):4d} ms" + (" (back)" if k == split else "")] +
            [("█" * round(width * c[k] / top)).ljust(width) + f" {c[k]:3d}" for c in counts] for k in range(buckets)]


def spread_out(naive: dict, fixed: dict, workers: int) -> bool:
    """A pair of runs that shows the policy's spread: half the peak, fewer refusals, and fewer than
    the job's alert counts as a storm (one for every eight workers)."""
    return (2 * fixed["peak"] <= naive["peak"] and fixed["rejected"] < naive["rejected"]
            and 8 * fixed["logged_refused"] < workers)


def storm_figures(r: dict) -> str:
    return f"peak {r['peak']}, {r['rejected']} refused"


def met_the_limit(r: dict, slots: int, workers: int) -> bool:
    """A wall of logins: more in the busiest 50 ms than there are free sessions, and refused enough
    of them for the job's own alert (one for every eight workers)."""
    return r["peak"] > slots and r["rejected"] > 0 and 8 * r["logged_refused"] >= workers


def write_a_bad_batch(conn) -> None:
    """One attempt at a batch the server refuses on every attempt: its worker is no number (22P02)."""
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO storm_done (run, worker, attempts, refused) VALUES ('bad', 'w-1', 1, 0)")
    finally:
        conn.rollback()


def find_login_storm_naive(conn) -> list:
    """Naive: every run in the job's log with refused logins. It
    fires on the storm, and then again on every check after it,
    on every storm that ever was: an alert nobody can clear."""
    with conn.cursor() as cur:
        cur.execute("SELECT run, count(*), sum(refused)"
                    " FROM storm_done GROUP BY run"
                    " HAVING 8 * sum(refused) >= count(*)")
        return cur.fetchall()


def find_login_storm(conn) -> list:
    """The job's own log of its last reconnection (storm_done): its
    run, workers and refused logins, when there were at least one
    for every eight workers. The storm is over when this runs:
    the sessions open now show nothing of it."""
    with conn.cursor() as cur:
        cur.execute("SELECT run, count(*), sum(refused)"
                    " FROM storm_done WHERE run = (SELECT run"
                    " FROM storm_done ORDER BY done_at DESC LIMIT 1)"
                    " GROUP BY run HAVING 8 * sum(refused) >= count(*)")
        return cur.fetchall()


STORM_FIXES = [
    fix("storm_policy", naive=storm_policy_naive, fixed=storm_policy_jittered,
        contract="""
            Return the tenacity Retrying a pipeline worker reconnects with, after the database
            dropped every worker's connection at the same moment. Use `rng` (a random.Random,
            seeded per worker) for any random draw, so --seed repeats the run. Keep 50 ms
            doubling to 800 ms (STORM_BASE_S, STORM_CAP_S), give up after STORM_GIVE_UP_S,
            retry only transient errors (is_transient) and raise the real error (reraise=True).
            Workers that failed together must not retry together. The grader computes each
            worker's first login after the 300 ms outage from the policy's own waits. On a clock
            it controls (sleeps recorded, not slept) it drives the policy against a login that
            keeps failing: it must give up within STORM_GIVE_UP_S (and one capped sleep), raising
            the login's own error, not a RetryError; and against a batch the server refuses
            (22P02), which must fail on its first attempt. Then it runs the real storm: the
            busiest 50 ms of logins must be at most half of the unjittered policy's, with fewer
            logins refused, and every worker must write its batch once.""",
        hints=("Every worker computes the same sleeps from the same attempt numbers. What would\n"
               "make worker 3's sleep different from worker 4's?",
               "Full jitter: sleep a uniform draw from [0, the exponential window], drawn from the\n"
               "worker's own rng: wait_full_jitter(rng, multiplier=STORM_BASE_S, max=STORM_CAP_S).")),
    fix("find_login_storm", naive=find_login_storm_naive, fixed=find_login_storm,
        contract="""
            The detector, a check a scheduler runs after the fact: return what it finds of a
            login storm that has passed (an empty list when there is none). Each worker logs its
            reconnection in the job's table storm_done (run, worker, attempts, refused: the
            logins the server refused it before it got in, done_at). Return a row (run, workers,
            refused logins) for the job's LAST run (the one with the latest done_at) when it had
            at least one refused login for every eight workers; nothing otherwise. `conn` is an
            autocommit connection into the scenario's schema.
            The grader runs it once the unjittered storm is over, where it must find it, and after
            the jittered run, where it must find nothing.""",
        hints=("By the time a scheduled check runs, every worker has reconnected or given up. What\n"
               "is left of the storm, and where?",
               "Read the job's log, not pg_stat_activity: sum(refused) and count(*) of storm_done\n"
               "for the run with the latest done_at, HAVING 8 * sum(refused) >= count(*).")),
]


@scenario("storm", "Retry storm: every worker reconnects at the same moment", fixes=STORM_FIXES)
def storm(s):
    s.description(f"""
        {STORM_WORKERS} pipeline workers (threads), each with its own connection through the proxy. When
        the connection drops, a worker reconnects with exponential backoff, {1000 * STORM_BASE_S:.0f} ms doubling
        to {1000 * STORM_CAP_S:.0f} ms (production: 1 s doubling to 60 s), writes its batch (holding a session
        for {1000 * STORM_HOLD_S:.0f} ms) and is done.""")
    with s.conn.cursor() as cur:
        cur.execute("CREATE TABLE storm_done (run text NOT NULL, worker int NOT NULL, attempts int NOT NULL, "
                    "refused int NOT NULL, done_at timestamptz DEFAULT clock_timestamp())")
    s.conn.commit()
    # The share counts the storm's own admin connection too: a run waiting in line holds only the
    # sessions every run has, and opens the admin connection once its turn has come.
    with budget.share(s, STORM_WORKERS + 1, least=STORM_MIN_WORKERS + 1) as granted:
        admin = s.connect(autocommit=True)
        pooled = db.behind_a_pooler(admin)  # a pooler's logins never reach the server: no role limit there
        role = None if pooled else s.role("w", connection_limit=STORM_WORKERS)  # None if we may not create roles
        storm_runs(s, admin, role, granted - 1, pooled)


def storm_runs(s, admin, role: dict | None, workers: int, pooled: bool = False) -> None:
    slots = workers // 2
    if workers < STORM_WORKERS:
        s.say(f"The server is shared: this run may open {workers} connections now, so the storm is scaled\n"
              f"down to {workers} workers and {slots} free sessions (same outage, same policies).")
    if role:
        s.say(f"The workers log in as a role of their own, {role['user']}; while the database is down\n"
              f"its CONNECTION LIMIT drops to {slots} (other clients took the free slots; PostgreSQL\n"
              "checks the limit at login only), so every login refused after the outage is a real 53300.")
    elif pooled:
        s.say("The workers log in through a pooler (PgBouncer), which keeps its server sessions\n"
              "between clients: the server sees no login to refuse, so the limit of\n"
              f"{slots} sessions is enforced by the proxy instead (max_connections): it resets the excess.")
    else:
        s.say("This role may not create roles (neither rolsuper nor rolcreaterole), so the limit of\n"
              f"{slots} sessions is enforced by the proxy instead (max_connections): it resets the excess.")
    s.trigger(f"""
        A barrier lines the {workers} workers up; the proxy drops every connection at once and
        refuses new ones for {1000 * STORM_OUTAGE_S:.0f} ms (production: a 30 s failover); then only
        {slots} sessions are free. First run: exponential backoff without jitter (wait_exponential).""")
    seeds = [s.rng.getrandbits(64) for _ in range(workers)]
    naive_seen = []
    where = "pg_roles.rolconnlimit" if role else "the proxy's cap"
    for n in range(1, STORM_ROUNDS + 1):
        nj = run_storm(s, admin, role, f"no jitter {n}", storm_policy_naive, seeds, slots)
        naive_seen.append(nj)
        # A busy machine blurs the timing, never this: every connection was dropped, in every round
        s.require(nj["lost"] == workers, f"the outage landed: the proxy dropped the connections of "
                                         f"{nj['lost']} of the {workers} workers")
        s.require(nj["limit"] == slots, f"the connection limit came into force while the database was down: "
                                        f"{where} reads {words(nj['limit'])}, {slots} wanted")
        if met_the_limit(nj, slots, workers):
            break
        # A server slowed by other users may take the logins one by one: none refused. Measured again.
        s.say(f"Round {n}: {storm_figures(nj)}, {nj['logged_refused']} logged by the workers: no wall of logins.")
    if nj["refusals"]:
        s.observe(nj["refusals"][0], "The first login refused after the database came back:")
    # Still no wall after the last round: the fault did not land, and the run fails on it (exit 1).
    s.require(met_the_limit(nj, slots, workers),
              f"the wall of logins met the {slots} free sessions {where} allows: {nj['peak']} logins "
              f"in the busiest 50 ms, {nj['rejected']} refused, {nj['logged_refused']} logged by the "
              f"{workers} workers (one for every eight wanted), in round {len(naive_seen)} of at most {STORM_ROUNDS}")

    lockstep = ", ".join(f"+{1000 * t:.0f}" for t in itertools.accumulate(
        backoff_schedule(wait_exponential(multiplier=STORM_BASE_S, max=STORM_CAP_S), 6)))
    s.root_cause(f"""
        Backoff without jitter is a schedule every worker shares: they all lost the connection at
        the same moment, so they all retry at {lockstep} ms... in lockstep. The database
        comes back to a wall of logins at once; the excess is refused, and the refused workers
        retry together again. Full jitter draws each sleep uniformly from [0, window], so the
        same workers arrive spread over the window. By the time anyone looks, the storm is over:
        the sessions open now show nothing, the job's log of refused logins does. (M. Brooker, "Exponential Backoff And
        Jitter", AWS Architecture Blog, 2015: with 100 clients contending for one resource,
        jitter cut the total calls by more than half.)""",
        detect=s.fix("find_login_storm"),
        runbook="""
            After an outage, the job's workers had a login refused for every eight of them or more: they came
            back in lockstep and met the connection limit. Check that every worker finished (or
            rerun those that gave up), then jitter the reconnect backoff; a check of the sessions
            open now finds nothing once the storm has passed.""")
    policy_for = s.fix("storm_policy")
    with s.step("the policy's own schedule: each worker's first login after the outage, from its waits") as st:
        firsts = planned_first_logins(policy_for, seeds)
        planned = {"naive": peak_in_window(planned_first_logins(storm_policy_naive, seeds)),
                   "fix": peak_in_window(firsts)}
        again = planned_first_logins(policy_for, seeds)  # the same seeds: the same draws
        others = planned_first_logins(policy_for, [random.Random(seed).getrandbits(64) for seed in seeds])
        st.result = f"computed for the {workers} workers' seeds, with no sleep and no database"
    s.recovered_if(firsts == again and firsts != others,
                   "each worker's waits are drawn from the generator it is given: the same seeds planned the "
                   "same first logins, other seeds others")
    s.measure("planned_peak_50ms_no_jitter", planned["naive"], show=False,
              note="first logins in the busiest 50 ms, as no jitter plans them")
    s.measure("planned_peak_50ms_fix", planned["fix"], show=False,
              note="first logins in the busiest 50 ms, as the policy plans them")
    planned_ok = s.recovered_if(2 * planned["fix"] <= planned["naive"],
                                f"the policy spreads the workers: its planned busiest 50 ms is at most half "
                                f"of no jitter's ({planned['naive']} -> {planned['fix']})")
    with s.step("the policy's rules on the lab's clock: a login that keeps failing, a bad batch") as st:
        proxy = s.proxy()
        proxy.down()
        down = drive(policy_for(random.Random(seeds[0])), ping_via, s.via(proxy))  # sleeps recorded, not slept
        bad = drive(policy_for(random.Random(seeds[0])), write_a_bad_batch, s.conn)
        st.result = (f"the login: {down['attempts']} attempts, given up {down['gave_up_at']:.2f} s after the "
                     f"first; the bad batch: {bad['attempts']} attempt(s)")
    runaway = " (still retrying: the lab stopped it)" if down["attempts"] >= RUNAWAY_ATTEMPTS else ""
    s.recovered_if(isinstance(down["raised"], (psycopg2.OperationalError, RetryError)) and not runaway
                   and down["gave_up_at"] <= STORM_GIVE_UP_S + STORM_CAP_S,
                   f"the policy gives up on a login that keeps failing: {down['attempts']} attempts, "
                   f"{down['gave_up_at']:.2f} s after the first on the lab's clock (at most {STORM_GIVE_UP_S} s, "
                   f"and at most one {1000 * STORM_CAP_S:.0f} ms sleep more){runaway}")
    s.recovered_if(isinstance(down["raised"], psycopg2.OperationalError),
                   "the policy raises the login's own error when it gives up, not tenacity's RetryError: "
                   f"raised {type(down['raised']).__name__}")
    s.recovered_if(bad["attempts"] == 1 and isinstance(bad["raised"], psycopg2.errors.InvalidTextRepresentation),
                   "the policy retries only transient errors: a batch the server refuses (22P02) fails on its "
                   f"first attempt: {bad['attempts']} attempt(s), raised {type(bad['raised']).__name__}")
    rounds = []
    with s.step("the same outage again, with the policy in the slot") as st:
        for n in range(1, STORM_ROUNDS + 1):
            if n > 1:  # the last pair was blurred by a busy machine: measure both again
                nj = run_storm(s, admin, role, f"no jitter {len(naive_seen) + 1}", storm_policy_naive, seeds, slots)
                naive_seen.append(nj)
            fj = run_storm(s, admin, role, f"fix {n}", policy_for, seeds, slots)
            rounds.append((nj, fj))
            if spread_out(nj, fj, workers) or not planned_ok:
                break
        st.result = "both runs side by side below"
        if len(rounds) > 1:  # the earlier pairs are shown here, the last one below
            st.result = f"measured {len(rounds)} times on a busy machine: " + "; ".join(
                f"no jitter {storm_figures(a)}, the fix {storm_figures(b)}" for a, b in rounds[:-1]) + \
                "; the last pair below"
    s.table(["policy", "down: attempts", "back: logins", "peak 50 ms", "refused", "all done"],
            [[name, r["down"], r["reached"], r["peak"], r["rejected"], f"{1000 * r['recovery_s']:.0f} ms"]
             for name, r in (("no jitter", nj), ("the fix", fj))])
    for name, label, r in (("no_jitter", "no jitter", nj), ("fix", "the fix", fj)):
        for key, column in (("down", "down: attempts"), ("reached", "back: logins"),
                            ("peak", "peak 50 ms"), ("rejected", "refused")):
            s.measure(f"{name}_{key}", r[key], show=False, note=f"{label}: {column}",
                      headline=(name, key) == ("no_jitter", "rejected"))
        s.measure(f"{name}_recovery_s", round(r["recovery_s"], 3), show=False,
                  note=f"{label}: all done, in seconds")
    s.measure("rounds", len(rounds), show=False, note="pairs of runs measured with the policy")
    s.say(f"Connection attempts per 50 ms after the loss; the database is back at {1000 * STORM_OUTAGE_S:.0f} ms:")
    s.table(["after the loss", "no jitter", "the fix"], histogram([nj, fj]))
    s.say(f"""
        "down: attempts" counts what the workers sent while the database was down (the rows
        before {1000 * STORM_OUTAGE_S:.0f} ms): each met the proxy's TCP reset at once, so here they cost the server
        nothing. (A dead host in production answers nothing: each attempt hangs until
        connect_timeout, so there are fewer, slower attempts; a server that is restarting answers
        each with a refusal it has to send.) Jittered sleeps average half of their window, so the
        fix makes more of those. The next columns are what the server saw once it was back: the
        logins, the most of them in any 50 ms, and the refusals. In exchange the last worker may
        finish a little later. --seed repeats the random draws, not these timings.""")
    if planned_ok:  # the policy's own schedule spreads the workers: a storm that never showed it fails (exit 1)
        s.require(spread_out(nj, fj, workers),
                  f"the real storm showed the spread the policy plans, measured {len(rounds)} time(s): no jitter "
                  f"{storm_figures(nj)}, the fix {storm_figures(fj)}, {fj['logged_refused']} logged by its "
                  f"{workers} workers (fewer than one for every eight wanted)")
    s.recovered_if(2 * fj["peak"] <= nj["peak"],
                   f"the busiest 50 ms of logins is at most half of no jitter's: {nj['peak']} -> {fj['peak']}")
    s.recovered_if(fj["rejected"] < nj["rejected"], f"fewer logins refused: {nj['rejected']} -> {fj['rejected']}")
    runs = naive_seen + [b for _, b in rounds]
    s.recovered_if(all(r["lost"] == workers for r in runs),
                   f"the outage dropped the connections of all {workers} workers in each of the {len(runs)} runs")
    s.recovered_if(all(r["limit"] == slots for r in runs),
                   f"the limit of {slots} sessions was in force in each of the {len(runs)} runs ({where})")
    s.recovered_if(all(r["rows"] == r["workers"] == r["recovered"] == workers for r in runs),
                   f"in each of the {len(runs)} runs every one of the {workers} workers wrote its batch exactly "
                   f"once (rows: {words(sorted({r['rows'] for r in runs}))})")

    s.prevention("""
        Jitter every backoff that many clients share: full jitter with a cap, so clients that
        failed together do not retry together. For a repeatable run (--seed), give each worker
        its own generator (the wait below). In production: 1 s doubling to 60 s, and a stop.""",
        wait_full_jitter,
        lesson="Jitter every backoff that many clients share: clients that failed together must "
               "not retry together.",
        questions=(
            "How many of your workers, jobs or pods lose their connection in the same failover, "
            "and when do they all come back?",
            "What does your database do with a wall of logins: how many sessions are free, and "
            "who gets refused?",
            "Your backoff is jittered: is the draw really per client, or do they share one "
            "seed?"))


# -- 3. backoff_calculation ------------------------------------------------------------------------
BASE_S, CAP_S = 1, 30   # production backoff: 1 s doubling, at most 30 s per sleep
ATTEMPTS = 12
DEADLINE_S = 300        # the job must have succeeded or given up 5 min after a failure
SCALE = 0.001           # real runs in this scenario: 1 s of production = 1 ms
RETRY_DELAY_MS = 500    # a setting in milliseconds, as config files often have
ATTEMPT_TIMEOUT_S = 20  # each attempt is bounded too: it waits at most 20 s for a lock (lock_timeout)
RUNAWAY_ATTEMPTS = 4 * ATTEMPTS  # the lab stops a policy that is still retrying after this many
YEAR_S = 365.25 * 86400


def wait_naive(retry_state: RetryCallState) -> float:
    """The hand-written backoff: base * 2 ** attempt, nothing else."""
    return BASE_S * 2.0 ** retry_state.attempt_number


def wait_hand_capped(retry_state: RetryCallState) -> float:
    """The hand-written backoff with a hand-written cap: the power is computed before min() caps it."""
    return min(CAP_S, BASE_S * 2.0 ** retry_state.attempt_number)


def human(seconds: float) -> str:
    for unit, size in (("years", YEAR_S), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:,.2f} s"


def backoff_naive(rng: random.Random, scale: float = 1.0) -> Retrying:
    """Naive: tenacity's exponential backoff as it comes: no cap (its
    default max is about 1.5e11 years), no jitter, no stop."""
    return Retrying(
        wait=wait_exponential(multiplier=BASE_S * scale),
        retry=retry_if_exception_type(psycopg2.OperationalError),
        reraise=True)


def backoff_bounded(rng: random.Random, scale: float = 1.0) -> Retrying:
    """Capped full jitter, bounded by attempts AND by a deadline that
    counts the next sleep and the next attempt, which its own timeout
    bounds (ATTEMPT_TIMEOUT_S)."""
    return Retrying(
        wait=wait_full_jitter(rng, multiplier=BASE_S * scale,
                              max=CAP_S * scale),
        stop=stop_after_attempt(ATTEMPTS)
        | stop_before_delay((DEADLINE_S - ATTEMPT_TIMEOUT_S) * scale),
        retry=retry_if_exception_type(psycopg2.OperationalError),
        reraise=True)


class TopOfWindow(random.Random):
    """A generator whose every draw is the top of its range: the worst case of a jittered wait."""

    def uniform(self, a, b):
        return b

    def random(self):
        return 1.0 - 2.0 ** -53


def ping_via(params: dict) -> None:
    """One attempt: connect (through the proxy) and run a query."""
    with counted_attempt():
        conn = db.connect(params)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        finally:
            conn.close()


def sleeps_requested(wait, params: dict, attempts: int = 2, counted=None) -> list[float]:
    """The sleeps tenacity asks for in a real retry loop whose every attempt fails (the proxy is
    down); its sleep is intercepted, so asking for years costs nothing. `counted`: the job's
    before_sleep hook (its metrics)."""
    asked: list[float] = []
    with contextlib.suppress(psycopg2.OperationalError):  # the last attempt's error, expected
        Retrying(wait=wait, stop=stop_after_attempt(attempts), sleep=asked.append, reraise=True,
                 **({"before_sleep": counted} if counted else {}))(ping_via, params)
    return asked


class LabClock:
    """A clock the lab controls, for a tenacity policy. tenacity reads time.monotonic() when an
    attempt fails (RetryCallState.outcome_timestamp) and decides its stop on the seconds since
    the first attempt. On this clock a sleep advances the time instead of sleeping, each attempt
    advances it by what it costs in production, and stamp(), the policy's `after` hook (run after
    a failed attempt, before the wait and the stop are decided), hands tenacity this clock's
    time: stop_after_delay and stop_before_delay decide the same way on every run."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def stamp(self, retry_state: RetryCallState) -> None:
        retry_state.start_time, retry_state.outcome_timestamp = 0.0, self.now


def drive(policy: Retrying, attempt, *args, attempt_s: float = 0.0, counted=None) -> dict:
    """Run a policy on a LabClock against an attempt that always fails: each attempt really runs
    (and fails) and costs `attempt_s` on the clock; the sleeps are recorded, not slept. The lab
    adds its own bound from outside, so a policy that never stops ends too. `counted`: the job's
    before_sleep hook (its metrics), run after the policy's own."""
    clock = LabClock()

    def timed(*a):
        try:
            return attempt(*a)
        finally:
            clock.now += attempt_s

    def after(rs: RetryCallState) -> None:
        clock.stamp(rs)
        if policy.after:
            policy.after(rs)

    def before_sleep(rs: RetryCallState) -> None:
        if policy.before_sleep:
            policy.before_sleep(rs)
        if counted:
            counted(rs)

    bounded = policy.copy(sleep=clock.sleep, after=after, before_sleep=before_sleep,
                          stop=policy.stop | stop_after_attempt(RUNAWAY_ATTEMPTS))
    raised = None
    try:
        bounded(timed, *args)
    except Exception as exc:  # what the policy lets out: the real error, or a RetryError wrapping it
        raised = exc
    return {"sleeps": clock.sleeps, "attempts": bounded.statistics.get("attempt_number", 0), "raised": raised,
            "gave_up_at": clock.now}


def sleep_counter(s):
    """The job's before_sleep hook: count each sleep its retry policy plans, by the bound it
    breaks: "cap" (longer than CAP_S), "deadline" (ending past DEADLINE_S after the first
    attempt) or "within" (production seconds)."""
    def counted(rs: RetryCallState) -> None:
        ends = max(rs.idle_for, rs.seconds_since_start + rs.upcoming_sleep)
        bound = "cap" if rs.upcoming_sleep > CAP_S else "deadline" if ends > DEADLINE_S else "within"
        s.counter("pipeline_retry_sleeps_total", "Sleeps planned by the job's retry policy, by the bound they break",
                  ["bound"]).labels(bound=bound).inc()  # the registry of the run under way: naive, then fixed
    return counted


def capped_jitter_until(stop, rng: random.Random) -> Retrying:
    """Capped full jitter, at most ATTEMPTS attempts, and `stop`: the time bound under test."""
    return Retrying(wait=wait_full_jitter(rng, multiplier=BASE_S, max=CAP_S),
                    stop=stop_after_attempt(ATTEMPTS) | stop,
                    retry=retry_if_exception_type(psycopg2.OperationalError), reraise=True)


def up_after(proxy, seconds: float) -> None:
    time.sleep(seconds)
    proxy.up()


def locked_out(conn) -> None:
    """One slow attempt: wait for a lock a maintenance job holds until lock_timeout
    (ATTEMPT_TIMEOUT_S, scaled: 20 ms here), then fail (55P03)."""
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
                sql.Literal(f"{round(1000 * ATTEMPT_TIMEOUT_S * SCALE)}ms")))
            cur.execute("SELECT count(*) FROM busy")
    finally:
        conn.rollback()


BACKOFF_FIXES = [
    fix("backoff_policy", naive=backoff_naive, fixed=backoff_bounded,
        contract="""
            Return the tenacity Retrying a job retries a failed database call with
            (psycopg2.OperationalError), raising the real error when it gives up (reraise=True).
            Production values, in seconds, multiplied by `scale` (the grader also runs it at
            1:1000): sleeps from BASE_S (1 s) doubling, each at most CAP_S (30 s); full jitter,
            every draw from `rng` (so --seed repeats it); at most ATTEMPTS (12) attempts; and
            succeeded or given up DEADLINE_S (300 s) after the first attempt, when each attempt
            may take up to ATTEMPT_TIMEOUT_S (20 s) before its own timeout fails it.
            The grader drives the policy on a clock it controls (tenacity's sleeps and its
            seconds since the first attempt), every draw at the top of its window: each sleep
            <= 30 s, at most 12 attempts, the real error raised; with attempts that each wait
            20 s for a lock, it must have given up by 300 s. It also draws twice with one seed
            (the sleeps must repeat) and once with another (they must differ).""",
        hints=("Three bounds: one on each sleep, one on the number of attempts, one on time. The\n"
               "time bound must leave room for the next sleep AND the next attempt.",
               "wait_full_jitter(rng, multiplier=BASE_S * scale, max=CAP_S * scale), and\n"
               "stop=stop_after_attempt(ATTEMPTS)\n"
               "     | stop_before_delay((DEADLINE_S - ATTEMPT_TIMEOUT_S) * scale):\n"
               "stop_before_delay counts the next sleep, stop_after_delay does not.")),
]

# The job's metrics: a sleep planned past the cap or the deadline is counted, and alerted on.
RETRY_PAST_BOUNDS = metric_alert("RetrySleepPastBounds", lambda values: [
    (bound, n) for bound in ("cap", "deadline")
    if (n := total(values, "pipeline_retry_sleeps_total", bound=bound))])


@scenario("backoff_calculation", "Backoff arithmetic: sleeps of centuries, overflow, wrong units, late stops",
          fixes=BACKOFF_FIXES)
def backoff_calculation(s):
    s.description(f"""
        A retry policy is arithmetic: the sleep after attempt n, a cap, when to stop. This job
        retries {ATTEMPTS} times from {BASE_S} s and must have succeeded or given up {DEADLINE_S} s after a
        failure; each attempt gives up by itself after {ATTEMPT_TIMEOUT_S} s (lock_timeout). Figures are
        in production seconds: sleeps are recorded, not slept, and the stops are timed on a
        clock the lab controls; the run marked 1:1000 is real and scaled (1 s = 1 ms).""")
    with s.conn.cursor() as cur:
        cur.execute("CREATE TABLE busy (id int)")
    s.conn.commit()
    proxy = s.proxy()
    params = s.via(proxy)
    counted = sleep_counter(s)
    s.trigger(f"""
        The database goes away (the proxy resets every connection) and retry loops run against
        it with tenacity's sleep intercepted, to record what they ask for: base * 2 ** attempt
        (hand-written, no cap), tenacity's default wait_exponential(), the hand-written backoff
        with a hand-written cap, min(cap, base * 2.0 ** attempt), in a loop that retries
        forever, and a setting in milliseconds. Last, a maintenance job holds a lock the job
        needs, each attempt waits for it until its timeout, and two time bounds are timed:
        stop_after_delay({DEADLINE_S}) and stop_before_delay({DEADLINE_S}).""")
    proxy.down()
    naive = sleeps_requested(wait_naive, params, 35, counted)  # 35 failed attempts: the 34 sleeps between them
    default = sleeps_requested(wait_exponential(), params, 31, counted)
    s.require(len(naive) == 34 and len(default) == 30,
              f"the outage landed: every attempt through the proxy failed ({len(naive)} of 34 and "
              f"{len(default)} of 30 sleeps asked for)")
    s.triggered_if(min(naive[29], default[-1]) > YEAR_S,
                   "after 30 failed attempts, both uncapped loops asked tenacity to sleep for years: "
                   f"{human(naive[29])} and {human(default[-1])}")
    for n in (10, 20, 30, 33):
        s.say(f"base * 2 ** attempt, after attempt {n}: asks to sleep {naive[n - 1]:,.0f} s = {human(naive[n - 1])}")
    top = wait_exponential().max
    s.say(f"tenacity's wait_exponential() has a default max of {top:.2g} s, about {top / YEAR_S:.2g} years;\n"
          f"after attempt 30 it asks for {human(default[-1])}.")
    s.say(f"After attempt 34, base * 2 ** attempt asks for {naive[33]:,.0f} s, and time.sleep refuses that:")
    with s.expect(OverflowError, label="OverflowError from time.sleep"):
        time.sleep(naive[33])  # past what time.sleep takes (~292 years): raises at once
    s.say("So an uncapped loop never reaches attempt 1024: it sleeps for centuries on the way. A loop\n"
          "capped by hand gets there: each sleep is 30 s, but the power is computed before min() caps it.")
    forever: list[float] = []
    started = time.monotonic()
    with s.expect(OverflowError, label="OverflowError inside the hand-capped wait"):
        Retrying(wait=wait_hand_capped, sleep=forever.append, before_sleep=counted, reraise=True)(ping_via, params)
    took = time.monotonic() - started
    s.measure("hand_capped_sleeps", len(forever), show=False,
              note="sleeps the hand-capped loop asked for before OverflowError")
    s.triggered_if(len(forever) == 1023 and max(forever) == CAP_S,
                   f"the retry-forever loop died at attempt 1024, after {len(forever)} sleeps of at most {CAP_S} s "
                   f"({human(sum(forever))} of sleeping in production; {took:.1f} s of real attempts here): "
                   "OverflowError, not the database error")
    naive_worst = s.measure("naive_worst_case_s", sum(naive[:ATTEMPTS - 1]), show=False,
                            note="seconds base * 2 ** attempt sleeps in its attempts", headline=True)
    s.triggered_if(naive_worst > DEADLINE_S, f"{ATTEMPTS} attempts of base * 2 ** attempt sleep {human(naive_worst)} "
                                             f"in all: past the {DEADLINE_S} s deadline")
    asked = sleeps_requested(wait_fixed(RETRY_DELAY_MS), params, counted=counted)  # a real run would hang 8 min
    s.measure("ms_as_seconds_sleep_s", asked[0] if asked else None, show=False,
              note="seconds tenacity asked to sleep for a 500 ms setting")
    s.triggered_if(asked == [RETRY_DELAY_MS], f"the setting said {RETRY_DELAY_MS} ms; between two failed attempts "
                                              f"tenacity asked to sleep {words(asked)} s: 1000x too long")
    holder, waiter = s.connect(), s.connect()
    with holder.cursor() as cur:
        cur.execute("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")  # held until the scenario ends
    late = {name: drive(capped_jitter_until(stop, TopOfWindow()), locked_out, waiter,
                        attempt_s=ATTEMPT_TIMEOUT_S, counted=counted)
            for name, stop in ((f"stop_after_delay({DEADLINE_S})", stop_after_delay(DEADLINE_S)),
                               (f"stop_before_delay({DEADLINE_S})", stop_before_delay(DEADLINE_S)))}
    s.say(f"On the lab's clock, every draw at the top of its window, each attempt {ATTEMPT_TIMEOUT_S} s:")
    s.table(["time bound", "attempts", "sleeps (s)", "gave up at (s)"],
            [[name, r["attempts"], f"{sum(r['sleeps']):,.0f}", f"{r['gave_up_at']:,.0f}"] for name, r in late.items()])
    s.triggered_if(all(isinstance(r["raised"], psycopg2.errors.LockNotAvailable) for r in late.values()),
                   f"every attempt waited for the lock until the server's lock_timeout ended it (55P03): "
                   f"{sum(r['attempts'] for r in late.values())} attempts")
    for name, r in late.items():
        s.measure(f"{name.split('(')[0]}_gave_up_at_s", r["gave_up_at"], show=False,
                  note=f"seconds after the first attempt that {name} gave up, on the lab's clock")
    s.triggered_if(all(r["gave_up_at"] > DEADLINE_S for r in late.values()),
                   f"both gave up past the {DEADLINE_S} s deadline: at "
                   + " and ".join(f"{r['gave_up_at']:,.0f} s" for r in late.values()))

    s.root_cause(f"""
        Nothing bounds base * 2 ** n: doubling 30 times is a factor of {2 ** 30:,}. Uncapped, a
        loop asks for years within 30 attempts, and from attempt 34 for more than time.sleep
        accepts. Capped by hand with min(cap, base * 2.0 ** n), it sleeps 30 s a time, and still
        dies at attempt 1024, because 2.0 ** 1024 is computed before min() caps it and no float
        holds it: OverflowError instead of the database error. tenacity's wait_exponential guards
        the overflow (it returns max), but its default max is about {top / YEAR_S:.2g} years.
        Units are not types: 500 meant milliseconds, tenacity reads seconds. And a deadline is
        not a stop: stop_after_delay is checked after an attempt fails, so the policy sleeps and
        tries again past it; stop_before_delay counts the next sleep but not the next attempt,
        which here may take {ATTEMPT_TIMEOUT_S} s.""",
        detect=RETRY_PAST_BOUNDS,
        runbook="""
            The job's retry policy planned a sleep longer than its cap or ending past the job's
            deadline: the job will hang or overrun its schedule instead of failing. Check the
            policy's cap, units and stop (stop_before_delay, leaving room for one attempt), then
            rerun the job.""")
    policy_for = s.fix("backoff_policy")
    seed, other_seed = s.rng.getrandbits(64), s.rng.getrandbits(64)
    with s.step("the policy's worst case: every jitter draw at the top of its window, sleeps recorded") as st:
        worst = drive(policy_for(TopOfWindow()), ping_via, params, counted=counted)
        seeded = [drive(policy_for(random.Random(n)), ping_via, params, counted=counted)
                  for n in (seed, seed, other_seed)]
        w, a, b = worst["sleeps"], seeded[0]["sleeps"], seeded[2]["sleeps"]
        shown = min(max(len(w), len(a), 1), ATTEMPTS - 1)
        rows = [[n, f"{naive[n - 1]:,.0f}", f"{w[n - 1]:,.1f}" if n <= len(w) else "-",
                 f"{a[n - 1]:,.1f}" if n <= len(a) else "-"] for n in range(1, shown + 1)]
        if max(len(w), len(a)) > shown:
            rows.append([f"{shown + 1}-{max(len(w), len(a))}", "", "(more sleeps)", ""])
        rows.append(["all sleeps", f"{sum(naive[:shown]):,.0f}", f"{sum(w):,.1f}", f"{sum(a):,.1f}"])
        s.table(["after attempt", "base*2**n (s)", "policy, worst (s)", "policy, drawn (s)"], rows)
        st.result = f"{worst['attempts']} attempts in the worst case"
    s.measure("policy_worst_case_s", round(sum(w), 3), show=False,
              note="seconds of sleeps of the policy, every draw at the top")
    s.measure("policy_worst_attempts", worst["attempts"], show=False,
              note="attempts of the policy in its worst case")
    s.measure("policy_longest_sleep_s", max(w, default=0), show=False,
              note="the longest sleep the policy asked for")
    runaway = " (still retrying: the lab stopped it)" if worst["attempts"] >= RUNAWAY_ATTEMPTS else ""
    s.recovered_if(worst["attempts"] <= ATTEMPTS and isinstance(worst["raised"], psycopg2.OperationalError),
                   f"the policy gives up after at most {ATTEMPTS} attempts and raises the database error: "
                   f"{worst['attempts']} attempts{runaway}, raised {type(worst['raised']).__name__}")
    s.recovered_if(max(w, default=0) <= CAP_S, f"every sleep within the {CAP_S} s cap: the longest asked for is "
                                               f"{max(w, default=0):,.1f} s")
    s.recovered_if(sum(w) <= DEADLINE_S, f"the worst case fits the {DEADLINE_S} s deadline: {sum(w):,.1f} s of sleeps"
                                         + (f" ({human(sum(w))})" if sum(w) >= 60 else ""))
    s.recovered_if(a == seeded[1]["sleeps"] and a != b and a != w[:len(a)],
                   "the sleeps are drawn from the generator the policy is given: one seed drew the same "
                   f"sleeps twice, another seed others, all below the worst case (after attempt 1: "
                   f"{words([round(x, 2) for x in a[:1] + seeded[1]['sleeps'][:1] + b[:1]])} s, "
                   f"worst {words(w[:1])} s)")
    with s.step("convert the millisecond setting once, where it is read") as st:
        asked = sleeps_requested(wait_fixed(RETRY_DELAY_MS / 1000), params, counted=counted)
        st.result = f"tenacity asks for {words(asked)} s"
    s.recovered_if(asked == [RETRY_DELAY_MS / 1000], "the sleep is 0.5 s, as configured")
    with s.step(f"the policy on the lab's clock against the lock: each attempt waits {ATTEMPT_TIMEOUT_S} s for "
                f"it, then fails; every draw at the top") as st:
        slow = drive(policy_for(TopOfWindow()), locked_out, waiter, attempt_s=ATTEMPT_TIMEOUT_S, counted=counted)
        st.result = (f"gave up after {slow['attempts']} attempts, {sum(slow['sleeps']):,.0f} s of sleeps, "
                     f"{slow['gave_up_at']:,.0f} s after the first attempt began")
    s.measure("policy_gave_up_at_s", slow["gave_up_at"], show=False,
              note="seconds after the first attempt that the policy gave up, on the lab's clock")
    s.recovered_if(isinstance(slow["raised"], psycopg2.errors.LockNotAvailable) and slow["gave_up_at"] <= DEADLINE_S,
                   f"given up within the {DEADLINE_S} s deadline, the slow attempts counted: at "
                   f"{slow['gave_up_at']:,.0f} s, raising {type(slow['raised']).__name__}")
    scaled = drive(policy_for(TopOfWindow(), scale=SCALE), locked_out, waiter, attempt_s=ATTEMPT_TIMEOUT_S * SCALE)
    s.recovered_if(len(scaled["sleeps"]) == len(slow["sleeps"]) and all(
        abs(x - y * SCALE) < 1e-9 for x, y in zip(scaled["sleeps"] + [scaled["gave_up_at"]],
                                                  slow["sleeps"] + [slow["gave_up_at"]])),
                   f"at 1:1000 it is the same policy: the same {len(scaled['sleeps'])} sleeps, each 1000 times "
                   f"shorter, and given up at {1000 * scaled['gave_up_at']:,.0f} ms")
    holder.rollback()
    outage = 0.04
    with s.step(f"the policy at 1:1000 against a real {1000 * outage:.0f} ms outage "
                f"(deadline {1000 * DEADLINE_S * SCALE:.0f} ms)") as st:
        policy = policy_for(random.Random(s.rng.getrandbits(64)), scale=SCALE)
        policy = policy.copy(stop=policy.stop | stop_before_delay(2 * DEADLINE_S * SCALE))  # the lab's bound
        s.thread(up_after, proxy, outage)
        started = time.monotonic()
        try:
            policy(ping_via, params)
            rode = True
        except psycopg2.OperationalError as exc:
            s.observe(exc, "The policy gave up before the outage ended:")
            rode = False
        took = time.monotonic() - started
        fixed_attempts = policy.statistics["attempt_number"]
        st.result = f"{'succeeded' if rode else 'gave up'} on attempt {fixed_attempts} after {1000 * took:.0f} ms"
    s.measure("fixed_policy_seconds", round(took, 3), show=False,
              note="seconds the policy took to ride out the outage")
    s.recovered_if(rode and fixed_attempts > 1, f"rode out the outage: succeeded on attempt {fixed_attempts}")

    s.prevention("""
        Let tenacity do the arithmetic and give it every bound: a cap on each sleep (max=), full
        jitter, a number of attempts AND a deadline that counts the next sleep and the next
        attempt (stop_before_delay, less one attempt's timeout). Carry units in names (_s, _ms)
        and convert once, where the setting is read.""",
        wait_full_jitter,
        lesson="Give every retry policy every bound: a cap per sleep, a number of attempts and a "
               "deadline that counts the next sleep and the next attempt.",
        questions=(
            "What is the longest your retry policy can sleep in all, and does it fit the job's "
            "deadline?",
            "Which of your retry settings are in milliseconds, and which library reads them "
            "as seconds?",
            "Is your retry loop's stop checked before the next sleep, or only after it?"))


# -- 4. non_transient --------------------------------------------------------------------------------
TRANSIENT_SQLSTATES = {
    "40001",  # serialization_failure: the transaction was rolled back, run it again
    "40P01",  # deadlock_detected: this transaction was the victim, run it again
    "57P01",  # admin_shutdown: the session was ended (server restart, pg_terminate_backend)
    "08000", "08003", "08006",  # connection_exception, ..._does_not_exist, connection_failure
}


def is_transient_naive(exc: BaseException) -> bool:
    """Naive: every exception is worth another attempt."""
    return True


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the same statement can succeed a moment later.

    Permanent: 22xxx (bad data), 23xxx (constraint), 42xxx (syntax,
    missing object), 08P01 (protocol violation), 57014 (cancelled:
    its timeout cancels it again): the same statement fails the same
    way on every attempt."""
    if not isinstance(exc, psycopg2.Error):
        return False
    # psycopg2 gives no SQLSTATE to a refused or lost connection, nor
    # to any error raised while logging in (53300 too many connections,
    # 57P03 starting up, and a wrong password alike), nor to a FATAL
    # error that closes the session (57P01): all retried, and the
    # policy's stop bounds the hopeless ones.
    if exc.pgcode is None:
        return isinstance(exc, psycopg2.OperationalError)
    return exc.pgcode in TRANSIENT_SQLSTATES


# Production: 5 attempts, 30 s apart. The fixed policy differs by one value: what it retries.
RETRY_EVERYTHING = Retrying(stop=stop_after_attempt(5), wait=wait_fixed(0.05), reraise=True)


def in_transaction(conn, fn, *args):
    """Run fn(cur, *args) and commit; roll back on any error so the connection stays usable."""
    with counted_attempt():
        try:
            with conn.cursor() as cur:
                fn(cur, *args)
            conn.commit()
        except Exception:
            if not conn.closed:  # a lost connection has nothing to roll back: keep its error, not rollback's
                conn.rollback()
            raise


def read_daily_report(cur) -> None:
    cur.execute("SELECT * FROM daily_report")  # the table was never created: 42P01, every time


def record_payment(cur, order_id: int) -> None:
    cur.execute("INSERT INTO payments (order_id, amount) VALUES (%s, 25)", (order_id,))  # not idempotent


def pay_and_refresh_naive(conn, report_params, order_id, policy) -> None:
    """Naive scope: one retry around the payment AND the refresh."""
    def pay_and_refresh() -> None:
        in_transaction(conn, record_payment, order_id)
        ping_via(report_params)  # the report's connection may fail
    policy(pay_and_refresh)


def pay_once_retry_refresh(conn, report_params, order_id, policy) -> None:
    """Fixed scope: the payment runs once; only the refresh is retried."""
    in_transaction(conn, record_payment, order_id)
    policy(ping_via, report_params)  # idempotent: safe to run twice


def transfer(cur, src: int, dst: int, amount: int, barrier=None) -> None:
    cur.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, src))
    if barrier is not None:
        barrier.wait()  # both transactions now hold their first row: each second UPDATE waits for the other
    cur.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, dst))


def transfer_worker(conn, src: int, dst: int, amount: int, barrier, out: dict, transient) -> None:
    """One transfer as one transaction, retried whole when it is transient (the deadlock victim's is)."""
    failed = []
    policy = RETRY_EVERYTHING.copy(retry=retry_if_exception(transient), wait=wait_fixed(0.02),
                                   before_sleep=lambda rs: failed.append(rs.outcome.exception()))
    for attempt in policy:
        with attempt:
            first = attempt.retry_state.attempt_number == 1
            in_transaction(conn, transfer, src, dst, amount, barrier if first else None)
    out[src] = {"attempts": policy.statistics["attempt_number"], "errors": failed, "at": time.time()}


def refund_repeated_charges(conn, order_id: int) -> list[int]:
    """Keep the first payment of the order, refund (delete) the ones a retry repeated."""
    with conn.cursor() as cur:
        cur.execute("DELETE FROM payments WHERE order_id = %s AND id > (SELECT min(id) FROM payments"
                    " WHERE order_id = %s) RETURNING id", (order_id, order_id))
        refunded = sorted(r[0] for r in cur.fetchall())
    conn.commit()
    return refunded


def blip_over_before_retry(proxy, seen: list):
    """A before_sleep hook: note the error; the network blip is over by the time the retry runs."""
    def hook(rs: RetryCallState) -> None:
        seen.append(rs.outcome.exception())
        proxy.up()
    return hook


def error_of(conn, *statements) -> Exception | None:
    """Run the statements in one transaction; return what the server raised (None if nothing)."""
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
        conn.commit()
    except psycopg2.Error as exc:
        if not conn.closed:
            conn.rollback()
        return exc
    return None


# What the contract names, in the order this scenario has a real server raise it: the SQLSTATE
# psycopg2 carries, or what happened where it carries none.
CONTRACT_ERRORS = ("42P01", "connection lost", "22P02", "23505", "57014", "40001", "session ended", "08P01")


def errors_a_server_raises(s) -> list[tuple[str, str | None, bool, Exception | None]]:
    """Make a real server raise each error the contract names. Returns (what happened, the
    SQLSTATE psycopg2 must carry, transient by the contract, the exception) per error."""
    conn = s.connect()
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE probe (id int PRIMARY KEY, v int NOT NULL)")
        cur.execute("INSERT INTO probe VALUES (1, 0)")
    conn.commit()
    caught = [("'twelve'::int", "22P02", False, error_of(conn, "SELECT 'twelve'::int")),
              ("duplicate key", "23505", False, error_of(conn, "INSERT INTO probe VALUES (1, 0)")),
              ("statement timeout", "57014", False,
               error_of(conn, "SET LOCAL statement_timeout = '20ms'", "SELECT pg_catalog.pg_sleep(5)"))]
    conn.close()  # each session goes as soon as its error is had: a run keeps to its share of the server
    # 40001: a REPEATABLE READ transaction updates a row another one changed after its snapshot
    first, other = s.connect(), s.connect(autocommit=True)
    first.set_session(isolation_level="REPEATABLE READ")
    db.scalar(first, "SELECT v FROM probe WHERE id = 1")  # the snapshot is taken here
    db.scalar(other, "UPDATE probe SET v = v + 1 WHERE id = 1 RETURNING v")
    caught.append(("update conflict", "40001", True,
                   error_of(first, "UPDATE probe SET v = v + 1 WHERE id = 1")))
    first.close()
    # 57P01: the server ends the session; the FATAL's SQLSTATE does not reach psycopg2
    victim = s.connect()
    pid = db.backend_pid(victim)
    victim.rollback()
    db.scalar(other, "SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and db.scalar(other, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                                    (pid,)):
        time.sleep(0.01)
    gone = not db.scalar(other, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
    ended = error_of(victim, "SELECT 1") if gone else None
    caught.append(("session ended", None, True, ended))
    other.close()
    # 08P01: one garbled message on the wire
    garbling = s.proxy()
    try:
        plain = s.connect(s.via(garbling), sslmode="disable")
    except psycopg2.OperationalError as exc:  # a server that accepts TLS only: no readable bytes
        caught.append(("TLS only", "08P01", False, exc))
    else:
        garbling.garble_next_query()
        caught.append(("garbled message", "08P01", False, error_of(plain, "SELECT 1")))
        plain.close()
    return caught


# The damage the naive scope leaves, as a scheduled check on the pipeline's own table finds it.
CHARGED_TWICE = sql_check("orders_charged_twice", "SELECT order_id, count(*) AS charges FROM payments\n"
                                                  "GROUP BY order_id HAVING count(*) > 1 ORDER BY order_id")


NON_TRANSIENT_FIXES = [
    fix("is_transient", naive=is_transient_naive, fixed=is_transient,
        contract="""
            Return True when `exc` is worth another attempt: the same statement can succeed a
            moment later. psycopg2 gives a lost or refused connection no SQLSTATE (exc.pgcode is
            None), nor any error raised while logging in, nor a session the server ended
            (57P01). Transient: those connection errors (psycopg2.OperationalError with no
            SQLSTATE), serialization failure 40001, deadlock 40P01. Permanent: 22xxx, 23xxx,
            42xxx, protocol violation 08P01 and statement cancelled 57014 (both are
            OperationalErrors too), and anything that is not a psycopg2 error.
            The grader makes a real server raise each of these and classifies each exception;
            then it retries with retry_if_exception(is_transient): a missing table (42P01) must
            fail on its first attempt, a dropped connection must be retried, and the victim of
            a real deadlock must succeed on its second attempt.""",
        hints=("A missing table stays missing. What does exc.pgcode say about it, and what does\n"
               "it say about a dropped connection?",
               "Return False for non-psycopg2 errors; for pgcode None, return whether it is an\n"
               "OperationalError; otherwise look pgcode up in a set of transient SQLSTATEs (an\n"
               "OperationalError with a SQLSTATE, 08P01 or 57014, is not transient for that).")),
    fix("pay_and_refresh", naive=pay_and_refresh_naive, fixed=pay_once_retry_refresh,
        contract="""
            Charge `order_id` once (in_transaction(conn, record_payment, order_id)), then refresh
            the report (ping_via(report_params)), whose connection may fail; retry with `policy`
            (a tenacity Retrying) only what is safe to run twice.
            The grader makes the report's connection fail once, after the payment committed:
            the order must be charged exactly once, and the refresh retried once.""",
        hints=("The payment has committed when the refresh fails. What does running the retry\n"
               "scope again do to it?",
               "Make the retry scope the refresh alone: charge first, then policy(ping_via,\n"
               "report_params).")),
]


@scenario("non_transient", "Retrying errors that can never succeed, and steps that must not repeat",
          fixes=NON_TRANSIENT_FIXES)
def non_transient(s):
    s.description("""
        Pipeline steps wrapped in a policy that retries every exception: 5 attempts, 50 ms apart
        (production: 30 s apart). Retrying is only safe for errors that can go away, and only
        for steps that can run twice.""")
    with s.conn.cursor() as cur:
        cur.execute("CREATE TABLE payments (id serial PRIMARY KEY, order_id int NOT NULL, amount int NOT NULL)")
        cur.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
        cur.execute("INSERT INTO accounts VALUES (1, 100), (2, 100)")
    s.conn.commit()
    proxy = s.proxy()
    report_params = s.via(proxy)

    s.trigger("""
        1) read a table that does not exist (42P01) under the retry-everything policy;
        2) charge order 42 (committed), then refresh a report over a connection that fails once,
           the two steps inside one retry scope.""")
    codes: list = []  # the SQLSTATE of each failed attempt the policy retried
    policy = RETRY_EVERYTHING.copy(before_sleep=lambda rs: codes.append(rs.outcome.exception().pgcode))
    started = time.monotonic()
    with job_metrics(s), s.expect(psycopg2.errors.UndefinedTable, sqlstate="42P01") as permanent:
        policy(in_transaction, s.conn, read_daily_report)
    wasted = s.measure("permanent_error_seconds_naive", round(time.monotonic() - started, 3), show=False,
                       note="seconds spent retrying the missing table")
    naive_attempts = s.measure("permanent_error_attempts_naive", policy.statistics["attempt_number"],
                               show=False, note="attempts at the missing table, retry-everything")
    asleep = policy.statistics["idle_for"]  # tenacity's own sum of the sleeps it took
    s.triggered_if(naive_attempts == 5 and codes == ["42P01"] * 4 and wasted >= asleep > 0,
                   f"the same 42P01 on all {naive_attempts} attempts, {wasted} s spent ({asleep:g} s of it "
                   "asleep between them), and the same error at the end")
    lost: list = []
    proxy.down()
    with job_metrics(s):
        pay_and_refresh_naive(s.conn, report_params, 42, RETRY_EVERYTHING.copy(
            before_sleep=blip_over_before_retry(proxy, lost)))
        unit_completed(s)  # the order charged, its report refreshed
    s.require(bool(lost), "the outage landed: the report's connection failed after the payment")
    s.observe(lost[0], "The report's connection failed after the payment; the policy re-ran the whole scope:")
    paid = s.measure("order_42_payments", db.scalar(s.conn, "SELECT count(*) FROM payments WHERE order_id = 42"),
                     show=False, note="times order 42 was charged", headline=True)
    s.conn.commit()
    s.triggered_if(paid == 2, f"order 42 was charged {paid} times: the retry re-ran the committed payment")

    s.root_cause("""
        "Retry everything" treats a missing table like a dropped connection. A permanent error
        (22xxx bad data, 23xxx constraint, 42xxx syntax or missing object) fails the same way on
        every attempt: retrying only adds delay before the same error. And the retry scope
        covered a step that had already committed: the report's connection failed AFTER the
        payment, so the retry charged again. Retry only transient errors, and only the smallest
        unit that is safe to run twice.""",
        detect=CHARGED_TWICE,
        runbook="""
            An order was charged more than once: a retry ran again a payment that had already
            committed. Refund the extra charges (keep the first of each order), then find the
            retry scope around the payment and narrow it to the step that failed.""")
    with s.step("refund the charge the retry repeated: order 42 keeps its first payment") as st:
        refunded = refund_repeated_charges(s.conn, 42)
        st.result = f"refunded payment(s) {words(refunded)}"
    charges = db.rows(s.conn, "SELECT id FROM payments WHERE order_id = 42 ORDER BY id")
    s.conn.commit()
    s.recovered_if(len(charges) == 1 and len(refunded) == paid - 1,
                   f"order 42 is charged once: its payment(s) {words([c[0] for c in charges])} left, "
                   f"{len(refunded)} refunded")
    transient = s.fix("is_transient")
    with s.step("a real server raises each error the contract names; is_transient(exc) classifies "
                "each exception as psycopg2 delivered it") as st:
        raised = [("missing table", "42P01", False, permanent.exc),
                  ("connection lost", None, True, lost[0])]
        from_server = errors_a_server_raises(s)
        tls_only = any(what == "TLS only" for what, _, _, _ in from_server)
        raised += [r for r in from_server if r[0] != "TLS only"]
        if tls_only:
            s.say("This server accepts TLS connections only: the proxy cannot garble a message it cannot\n"
                  "read, so 08P01 is not raised here.")
        verdicts = [(what, code, contract, exc, exc is not None and bool(transient(exc)))
                    for what, code, contract, exc in raised]
        s.table(["the server saw", "exception", "SQLSTATE", "contract", "is_transient"],
                [[what, type(exc).__name__ if exc is not None else "(nothing raised)",
                  getattr(exc, "pgcode", None) or "none", "retry" if contract else "never", words(got)]
                 for what, code, contract, exc, got in verdicts])
        wrong = [code or what for what, code, contract, exc, got in verdicts if exc is not None and got != contract]
        st.result = f"{len(verdicts) - len(wrong)} of {len(verdicts)} classified as the contract says"
    as_named = [code or what for what, code, _, exc, _ in verdicts
                if isinstance(exc, psycopg2.Error) and exc.pgcode == code
                and (code is not None or isinstance(exc, psycopg2.OperationalError))]
    named = [e for e in CONTRACT_ERRORS if e != "08P01" or not tls_only]
    missing = [e for e in named if e not in as_named]
    s.measure("contract_errors_raised", len(as_named), show=False,
              note="errors of the contract a real server raised in this run")
    s.recovered_if(as_named == named, "the server raised every error of the contract, each with its SQLSTATE "
                                      "(none for a lost or ended session)"
                   + (f"; not as expected: {', '.join(missing)}" if missing else ": " + ", ".join(as_named)))
    s.recovered_if(not wrong, f"is_transient agrees with the contract on all {len(verdicts)} errors"
                   + (f"; it disagrees on {', '.join(wrong)}" if wrong else ""))
    policy = RETRY_EVERYTHING.copy(retry=retry_if_exception(transient))
    with job_metrics(s), s.expect(psycopg2.errors.UndefinedTable, sqlstate="42P01"):
        policy(in_transaction, s.conn, read_daily_report)
    fixed_attempts = s.measure("permanent_error_attempts_fixed", policy.statistics["attempt_number"],
                               show=False, note="attempts at the missing table, is_transient")
    asleep = policy.statistics["idle_for"]
    s.recovered_if(fixed_attempts == 1 and asleep == 0, f"the permanent error fails on its first attempt: "
                                                        f"{fixed_attempts} attempt(s), {asleep:g} s asleep")
    with s.step("charge order 43 with pay_and_refresh; the report's connection fails once again") as st:
        proxy.down()
        refreshes: list = []
        policy = RETRY_EVERYTHING.copy(retry=retry_if_exception(transient),
                                       before_sleep=blip_over_before_retry(proxy, refreshes))
        try:
            with job_metrics(s):
                s.fix("pay_and_refresh")(s.conn, report_params, 43, policy)
                unit_completed(s)
            st.result = f"{len(refreshes)} failed attempt(s) retried"
        except psycopg2.Error as exc:
            s.observe(exc, "pay_and_refresh let the report's error out instead of retrying it:")
            st.result = "the refresh was not retried"
        proxy.up()
    paid = db.scalar(s.conn, "SELECT count(*) FROM payments WHERE order_id = 43")
    s.conn.commit()
    s.measure("order_43_payments", paid, show=False, note="times order 43 was charged")
    s.recovered_if(paid == 1 and len(refreshes) == 1,
                   f"order 43 is charged exactly once, the failed refresh retried: charged {paid} time(s), "
                   f"refresh retried {len(refreshes)} time(s)")
    with s.step("a real deadlock (40P01): two transfers lock the same two rows in opposite order") as st:
        a, b = s.connect(), s.connect()
        for conn in (a, b):
            try:
                with conn.cursor() as cur:
                    cur.execute("SET deadlock_timeout = '50ms'")  # default 1 s: detect it sooner
                conn.commit()
            except psycopg2.errors.InsufficientPrivilege:  # a superuser-only setting
                conn.rollback()
        barrier, out = s.barrier(2, timeout=10), {}
        with job_metrics(s):
            for w in [s.thread(transfer_worker, a, 1, 2, 10, barrier, out, transient),
                      s.thread(transfer_worker, b, 2, 1, 30, barrier, out, transient)]:
                w.join(10)
        if out:
            unit_completed(s, at=max(r["at"] for r in out.values()))
        deadlocks = [e for r in out.values() for e in r["errors"]]
        for e in deadlocks:
            s.observe(e, "the victim's first attempt (its transaction was rolled back, so it is safe to rerun):")
        victim = max((r["attempts"] for r in out.values()), default=0)
        st.result = (f"attempts: transfer 1->2: {words(out.get(1, {}).get('attempts'))}, "
                     f"2->1: {words(out.get(2, {}).get('attempts'))}")
    s.measure("deadlock_attempts", victim, show=False, note="attempts of the deadlock's victim")
    balances = db.rows(s.conn, "SELECT id, balance FROM accounts ORDER BY id")
    s.conn.commit()
    s.recovered_if(victim == 2 and [e.pgcode for e in deadlocks] == ["40P01"],
                   f"the deadlock victim (40P01, transient) succeeded on attempt {victim}")
    s.recovered_if(balances == [(1, 120), (2, 80)],
                   "balances: " + words({f"account {i}": v for i, v in balances}) + ": each transfer applied exactly once")

    s.prevention("""
        Retry only what can succeed next time (is_transient, with retry_if_exception) and only the
        unit that is safe to repeat: a whole transaction that rolled back, or an idempotent step;
        never a scope that contains a write that already committed.""",
        "TRANSIENT_SQLSTATES = {\n    " + ", ".join(f'"{c}"' for c in sorted(TRANSIENT_SQLSTATES)) + "}",
        "RETRY_TRANSIENT = RETRY_EVERYTHING.copy(\n    retry=retry_if_exception(is_transient))",
        lesson="Retry only errors that can go away, and only a unit that is safe to run twice.",
        questions=(
            "Which errors does your retry policy retry: every exception, or a list you could "
            "read out?",
            "Which step inside your retry scope has already committed when a later step fails?",
            "A deadlock victim's transaction was rolled back: what must your code run again, "
            "and from where?"))


# -- 5. poison_job ----------------------------------------------------------------------------------
QUEUE_JOBS = 8          # jobs 1..8 in the queue; job 1's payload kills the worker that runs it
POISON = "poison"       # the payload (a segfault, the OOM killer): the worker dies mid-job
MAX_ATTEMPTS = 3        # a job is tried at most this often, then dead-lettered
LEASE_S = 0.5           # a claim holds its job this long (production: minutes)
QUEUE_WORKERS = 2       # worker processes at once (the supervisor restarts a dead one)
MOST_KILLS = 2 * MAX_ATTEMPTS  # the lab's bound: a queue still losing workers after this is stopped
QUEUE_LIMIT_S = 60      # the lab's bound on one run of the queue, in seconds, whatever happens
POLL_S = 0.05           # an idle worker looks for work again this often
KILLED = -getattr(signal, "SIGKILL", signal.SIGTERM)  # exit code of a process killed by SIGKILL


def do_job(cur, job_id: int, payload: str) -> None:
    """The job's work: its one effect, a row in job_effects. The poison payload kills its worker
    first (the lab's stand-in for a segfault; FAILLAB_NO_FAULTS=1 disarms it)."""
    if payload == POISON and faults_enabled():
        os.kill(os.getpid(), -KILLED)  # no except, no finally, no rollback: the process is gone
    cur.execute("INSERT INTO job_effects (job_id, worker) VALUES (%s, %s)", (job_id, os.getpid()))


def take_job_naive(conn, work, worker: int):
    """Naive: claim and work in one transaction; count the attempt at
    the end. A worker killed mid-job takes its claim and its count
    with it: the server rolls both back."""
    with conn.cursor() as cur:
        cur.execute("SELECT id, payload FROM jobs WHERE state = 'queued'"
                    " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")
        row = cur.fetchone()
        if row is None:
            conn.commit()
            return None
        work(cur, *row)
        cur.execute("UPDATE jobs SET state = 'done',"
                    " attempts = attempts + 1 WHERE id = %s", (row[0],))
    conn.commit()
    return row[0]


def take_job_leased(conn, work, worker: int):
    """Fixed: a short committed claim counts the attempt and sets a
    lease; a job out of attempts whose lease ran out is dead-lettered
    with what is known; the work commits with its 'done', fenced by
    the attempt it was claimed under."""
    with conn.cursor() as cur:
        cur.execute("""
            WITH dead AS (
              UPDATE jobs SET state = 'dead'
              WHERE state = 'queued' AND attempts >= %(most)s
                AND lease_until < clock_timestamp()
              RETURNING id, payload, attempts, workers)
            INSERT INTO dead_jobs (job_id, payload, attempts, workers,
                                   error)
            SELECT id, payload, attempts, workers,
                   'lease expired, no worker came back'
            FROM dead""", {"most": MAX_ATTEMPTS})
        cur.execute("""
            UPDATE jobs SET attempts = attempts + 1,
              workers = workers || %(me)s,
              lease_until = clock_timestamp()
                            + make_interval(secs => %(lease)s)
            WHERE id = (
              SELECT id FROM jobs
              WHERE state = 'queued' AND attempts < %(most)s
                AND (lease_until IS NULL
                     OR lease_until < clock_timestamp())
              ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
            RETURNING id, payload, attempts""",
                    {"me": worker, "lease": LEASE_S,
                     "most": MAX_ATTEMPTS})
        claimed = cur.fetchone()
    conn.commit()  # the attempt is counted before the work starts
    if claimed is None:
        return None
    job_id, payload, attempt = claimed
    with conn.cursor() as cur:
        work(cur, job_id, payload)
        cur.execute("UPDATE jobs SET state = 'done', lease_until = NULL"
                    " WHERE id = %s AND attempts = %s", (job_id, attempt))
        if cur.rowcount == 0:  # the lease ran out and another took it
            conn.rollback()
            return None
    conn.commit()
    return job_id


def queue_worker(params: dict, take_job) -> None:
    """A worker process: take jobs until none is queued any more; poll while the queued ones are
    held by others."""
    conn = db.connect(params)
    while True:
        if take_job(conn, do_job, os.getpid()) is None:
            if not db.scalar(conn, "SELECT count(*) FROM jobs WHERE state = 'queued'"):
                conn.close()
                return
            conn.rollback()
            time.sleep(POLL_S)


def supervise(s, take_job) -> dict:
    """The process manager (systemd, Kubernetes): keep QUEUE_WORKERS workers running while jobs
    are queued, restart a worker that died, and record every exit code the OS reports, in
    worker_exits. The lab's bound: after MOST_KILLS kills, or QUEUE_LIMIT_S, it stops the workers
    (SIGTERM: exit code -15, told apart from the kills)."""
    alive, kills, stopped = [], 0, 0
    until = time.monotonic() + QUEUE_LIMIT_S

    def start():
        alive.append(s.spawn_many(queue_worker, s.params, take_job))

    for _ in range(QUEUE_WORKERS):
        start()
    while alive and kills < MOST_KILLS and time.monotonic() < until:
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout=0.5)
        for proc in [p for p in alive if p.exitcode is not None]:
            alive.remove(proc)
            kills += proc.exitcode == KILLED
            record_exit(s, proc)
            if proc.exitcode != 0 and db.scalar(s.conn, "SELECT count(*) FROM jobs WHERE state = 'queued'"):
                start()
            s.conn.commit()
    for proc in alive:  # the lab's bound was reached
        proc.terminate()
        proc.join(5)
        record_exit(s, proc)
        stopped += 1
    return {"kills": kills, "stopped": stopped}


def record_exit(s, proc) -> None:
    with s.conn.cursor() as cur:
        cur.execute("INSERT INTO worker_exits (pid, exit_code) VALUES (%s, %s)", (proc.pid, proc.exitcode))
    s.conn.commit()


def fill_queue(s) -> None:
    """A fresh queue: jobs 1..QUEUE_JOBS, job 1 the poison; no effect, no exit, no dead letter."""
    with s.conn.cursor() as cur:
        cur.execute("TRUNCATE jobs, job_effects, dead_jobs, worker_exits")
        cur.execute("INSERT INTO jobs (id, payload) SELECT i, CASE WHEN i = 1 THEN %s ELSE 'job ' || i END "
                    "FROM generate_series(1, %s) AS i", (POISON, QUEUE_JOBS))
    s.conn.commit()


def queue_state(s) -> dict:
    """What the queue's tables say after a run: each job's state, attempts and effects."""
    rows = db.rows(s.conn, "SELECT j.id, j.state, j.attempts, count(e.job_id) FROM jobs j "
                           "LEFT JOIN job_effects e ON e.job_id = j.id GROUP BY j.id ORDER BY j.id")
    dead = db.rows(s.conn, "SELECT job_id, attempts, workers, error FROM dead_jobs ORDER BY job_id")
    exits = dict(db.rows(s.conn, "SELECT pid, exit_code FROM worker_exits"))
    s.conn.commit()
    jobs = {i: {"state": st, "attempts": n, "effects": e} for i, st, n, e in rows}
    return {"jobs": jobs, "poison": jobs[1], "dead": dead, "exits": exits,
            "others_once": sum(1 for i, j in jobs.items() if i != 1 and j["state"] == "done" and j["effects"] == 1),
            "lost": [i for i, j in jobs.items() if j["state"] not in ("done", "dead")]}


def export_queue_metrics(s) -> None:
    """The queue's metrics after a run, as a SQL exporter reads them from its tables (the workers
    that wrote them may be dead): dead letters written (the run starts from an empty dead_jobs),
    and the server's time of the last job done."""
    with job_metrics(s):
        dead_letters_written(s, db.scalar(s.conn, "SELECT count(*) FROM dead_jobs"))
        last = db.scalar(s.conn, "SELECT extract(epoch FROM max(at))::float8 FROM job_effects")
        s.conn.commit()
        if last is not None:
            unit_completed(s, at=last)


WORKERS_KILLED_UNCOUNTED = sql_check("workers_killed_uncounted", """
    -- workers the OS reported killed (a signal: exit code < 0, the
    -- lab's own SIGTERM aside) against the failed attempts the queue
    -- counted (attempts of jobs not done, and retries of done ones)
    SELECT killed, counted FROM (
      SELECT (SELECT count(*) FROM worker_exits
              WHERE exit_code < 0 AND exit_code <> -15) AS killed,
             (SELECT coalesce(sum(attempts - (state = 'done')::int), 0)
              FROM jobs) AS counted) AS k
    WHERE killed > counted""")

POISON_FIXES = [
    fix("take_job", naive=take_job_naive, fixed=take_job_leased,
        contract="""
            Take the next queued job and run it: work(cur, job_id, payload) inside a
            transaction that also marks the job 'done' (jobs: id, payload, state 'queued',
            'done' or 'dead', attempts, workers int[], lease_until). `worker` is the process's
            pid. Return the job's id, or None when no job can be taken now.
            The worker may be killed (SIGKILL) inside work(): count each attempt in a short
            transaction of its own, committed before the work starts, with a lease of
            LEASE_S seconds (a killed worker's job is taken again once its lease ran out).
            A queued job with MAX_ATTEMPTS attempts whose lease ran out goes to dead_jobs
            (job_id, payload, attempts, workers, error) with state 'dead'.
            The grader runs 8 jobs on 2 worker processes, job 1's payload kills its worker:
            job 1 must end dead with exactly MAX_ATTEMPTS attempts, every other job done once.""",
        hints=("A killed worker's transaction is rolled back by the server. What else was in that\n"
               "transaction besides the work?",
               "Commit the claim first: UPDATE jobs SET attempts = attempts + 1, workers = workers\n"
               "|| worker, lease_until = now + LEASE_S WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED);\n"
               "before it, move jobs with attempts >= MAX_ATTEMPTS and an expired lease to dead_jobs.")),
]


@scenario("poison_job", "A poison job kills its worker, again and again", fixes=POISON_FIXES)
def poison_job(s):
    s.description(f"""
        A job queue in a table: {QUEUE_JOBS} jobs, {QUEUE_WORKERS} worker processes taking them with FOR UPDATE
        SKIP LOCKED, a process manager that restarts a worker that dies. A job is tried at most
        {MAX_ATTEMPTS} times, then parked in dead_jobs for a human. Job 1's payload kills the
        worker that runs it (a segfault in a native library, the OOM killer).""")
    with s.conn.cursor() as cur:
        cur.execute("CREATE TABLE jobs (id int PRIMARY KEY, payload text NOT NULL, "
                    "state text NOT NULL DEFAULT 'queued', attempts int NOT NULL DEFAULT 0, "
                    "workers int[] NOT NULL DEFAULT '{}', lease_until timestamptz)")
        cur.execute("CREATE TABLE job_effects (job_id int NOT NULL, worker int NOT NULL, "
                    "at timestamptz NOT NULL DEFAULT clock_timestamp())")
        cur.execute("CREATE TABLE dead_jobs (job_id int PRIMARY KEY, payload text, attempts int, "
                    "workers int[], error text, dead_at timestamptz DEFAULT clock_timestamp())")
        cur.execute("CREATE TABLE worker_exits (pid int, exit_code int, at timestamptz DEFAULT clock_timestamp())")
    s.conn.commit()
    fill_queue(s)

    s.trigger(f"""
        The workers claim and work in one transaction and count the attempt when the job is
        done (take_job_naive). Job 1 kills its worker with SIGKILL. The supervisor restarts dead
        workers; the lab stops the queue after {MOST_KILLS} kills ({MAX_ATTEMPTS} attempts were allowed).""")
    ran = supervise(s, take_job_naive)
    export_queue_metrics(s)
    st = queue_state(s)
    kills = s.measure("naive_workers_killed", ran["kills"], show=False, headline=True,
                      note="worker processes the OS reported killed by SIGKILL (exit code -9)")
    s.require(kills > 0, f"the poison landed: the OS reported {kills} worker(s) killed by SIGKILL")
    others = [j for i, j in st["jobs"].items() if i != 1]
    done = s.measure("naive_others_done", sum(j["state"] == "done" for j in others), show=False,
                     note="jobs 2-8 done when the lab stopped the queue")
    s.table(["jobs", "state", "attempts counted", "effects"],
            [["1 (poison)", st["poison"]["state"], st["poison"]["attempts"], st["poison"]["effects"]],
             [f"2-{QUEUE_JOBS}", f"{done} done", sum(j["attempts"] for j in others), sum(j["effects"] for j in others)]])
    s.measure("naive_poison_attempts", st["poison"]["attempts"], show=False,
              note="attempts job 1's row counts after the workers it killed")
    s.triggered_if(sum(j["attempts"] for j in others) == sum(j["effects"] for j in others) == done,
                   f"a job that ran to the end was counted: jobs 2-{QUEUE_JOBS}, {done} done, "
                   f"{sum(j['attempts'] for j in others)} attempts counted, {sum(j['effects'] for j in others)} "
                   "effects")
    s.say(f"Only {done} of the {QUEUE_JOBS - 1} other jobs got done: the queue takes the lowest id first, so\n"
          "every new worker took job 1 again; another job ran only while job 1 was held by a dying worker.")
    s.triggered_if(kills >= MOST_KILLS and st["poison"] == {"state": "queued", "attempts": 0, "effects": 0},
                   f"job 1 killed {kills} workers (exit code {KILLED} each), and its row still says "
                   f"'{st['poison']['state']}', attempts {st['poison']['attempts']}: it would be taken forever")
    s.triggered_if(not st["dead"], f"no dead letter: {len(st['dead'])} job(s) in dead_jobs, the maximum of "
                                   f"{MAX_ATTEMPTS} attempts never reached")

    s.root_cause(f"""
        The attempt counter lived in the transaction the poison killed. When a client dies, the
        server rolls its open transaction back: the claim (the row lock of FOR UPDATE), the work
        and the "attempts + 1" are all undone, so the job is queued again as if it had never been
        tried, and "at most {MAX_ATTEMPTS} attempts" never triggers. The process manager sees the
        kills (exit code {KILLED}); the queue sees nothing. Count the attempt in its own committed
        transaction, before the work, and let a lease say when a silent worker is gone.""",
                 detect=WORKERS_KILLED_UNCOUNTED,
                 runbook="""Workers are dying on a job that the queue does not count as failed: a poison job
                     is crash-looping the workers. Find the job the dead workers held (the oldest
                     queued job, the workers' last log lines), park it by hand, then fix how
                     attempts are counted.""")
    fill_queue(s)
    with s.step("the same queue, the same poison, with take_job() in the workers") as step:
        ran = supervise(s, s.fix("take_job"))
        export_queue_metrics(s)
        st = queue_state(s)
        step.result = (f"{ran['kills']} worker(s) killed, {ran['stopped']} stopped by the lab; "
                       f"job 1 {st['poison']['state']}")
    s.table(["dead job", "attempts", "its workers", "exit codes", "error"],
            [[j, n, words(workers), words([st["exits"].get(w) for w in workers]), e] for j, n, workers, e in st["dead"]])
    s.measure("fixed_workers_killed", ran["kills"], show=False, note="workers killed with the fix in place")
    s.measure("fixed_poison_attempts", st["poison"]["attempts"], show=False, note="attempts counted for job 1")
    dead = st["dead"][0] if st["dead"] else (None, None, [], None)
    s.recovered_if(st["poison"]["state"] == "dead" and st["poison"]["attempts"] == MAX_ATTEMPTS
                   and dead[:2] == (1, MAX_ATTEMPTS),
                   f"the poison job ends dead with exactly {MAX_ATTEMPTS} attempts: state "
                   f"'{st['poison']['state']}', {st['poison']['attempts']} attempts, {len(st['dead'])} dead letter(s)")
    s.recovered_if(len(dead[2]) == ran["kills"] == MAX_ATTEMPTS and all(st["exits"].get(w) == KILLED for w in dead[2]),
                   f"the dead letter names the {len(dead[2])} workers that took job 1, each reported "
                   f"killed by the OS (exit code {KILLED}); {ran['kills']} kill(s) in all")
    others = QUEUE_JOBS - 1
    s.recovered_if(st["others_once"] == others, f"every other job done exactly once: {st['others_once']} of {others}")
    s.recovered_if(not st["lost"] and ran["stopped"] == 0,
                   f"no job lost, and the queue emptied by itself: every job is done or dead "
                   f"({words(st['lost'] or 'none')} left), {ran['stopped']} worker(s) stopped by the lab")

    s.prevention(f"""
        Take a job in two transactions. The claim is short and committed: it counts the attempt,
        names the worker and sets a lease, so a killed worker leaves its count behind. The work
        commits together with its 'done', fenced by the attempt it was claimed under. A job whose
        lease ran out is taken again, until it has used its {MAX_ATTEMPTS} attempts: then it goes to the
        dead letters with what is known (its attempts, the workers that took it), not back to the
        workers. (Queue libraries do the same: an attempt counter written when the job is locked,
        a visibility timeout, a dead-letter queue.)""",
        lesson="Count a job's attempt in its own committed claim, before the work: a worker that "
               "dies takes its transaction with it, not the count.",
        questions=(
            "Where does your queue count attempts, and would the count survive a worker killed "
            "in the middle of the job?",
            "How would you notice that workers keep dying on the same job?",
            "Who reads your dead letters, and what must a dead letter say to be worth reading?"))

# -- 6. hung_attempt --------------------------------------------------------------------------------
ATTEMPT_DEADLINE_S = 0.5  # one attempt (connect, work, commit) may take this long (production: 30 s)
JOB_DEADLINE_S = 2.0      # the whole job, every attempt and sleep included (production: 5 min)
LAB_LIMIT_S = JOB_DEADLINE_S + 1  # the lab's own bound, past the deadline: then the network heals
UNIT_AMOUNT = 25
# A dead network (a host gone, packets dropped): the kernel gives up on the connection by itself.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 3, "tcp_user_timeout": 10_000}  # ms: unacknowledged data


class StallAtFirstCommit(Hooks):
    """The job's connections as the lab sees them: the proxy goes silent just before the first
    COMMIT, which still reaches the server. Records each connection's backend pid and its socket
    options as the OS reports them."""

    def __init__(self, proxy, seen: list):
        self.proxy, self.seen = proxy, seen

    def opened(self, conn, pid: int) -> None:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            options = (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                       sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18)))
        finally:
            sock.close()
        self.seen.append({"pid": pid, "keepalive": bool(options[0]), "user_timeout_ms": options[1]})

    def before_commit(self, conn) -> None:
        if len(self.seen) == 1:
            self.proxy.stall()


class CancelFromOutside(Instrumented):
    """The job's connection, whose cancel() the lab sends as pg_cancel_backend over its own
    session: psycopg2's cancel() holds the interpreter lock while it waits for the server's
    answer, and this lab's proxy is a thread of the same process, so it could never pass it on.
    The request reaches the server the same way."""

    def __init__(self, conn, hooks: StallAtFirstCommit, admin):
        super().__init__(conn, hooks)
        self._pid, self._admin = hooks.seen[-1]["pid"], admin

    def cancel(self) -> None:
        db.scalar(self._admin, "SELECT pg_cancel_backend(%s)", (self._pid,))


def add_to_ledger(cur, unit: str) -> None:
    """Naive: add the unit's amount; run twice, it is added twice."""
    cur.execute("INSERT INTO ledger (unit, amount) VALUES (%s, %s)",
                (unit, UNIT_AMOUNT))


def add_to_ledger_once(cur, unit: str) -> None:
    """Fixed: the unit's key first, in the same transaction: a unit an
    abandoned attempt did commit is skipped, not added again."""
    cur.execute("INSERT INTO applied_units (unit) VALUES (%s)"
                " ON CONFLICT DO NOTHING", (unit,))
    if cur.rowcount == 1:
        cur.execute("INSERT INTO ledger (unit, amount) VALUES (%s, %s)",
                    (unit, UNIT_AMOUNT))


def run_unit_unbounded(connect, apply, unit: str) -> None:
    """Naive: a stop and a wait, but nothing bounds one attempt:
    stop_after_delay is only checked between attempts."""
    for attempt in Retrying(
            stop=stop_after_attempt(3) | stop_after_delay(JOB_DEADLINE_S),
            wait=wait_fixed(0.1), reraise=True,
            retry=retry_if_exception_type(psycopg2.OperationalError)):
        with attempt:
            conn = connect()
            try:
                with conn.cursor() as cur:
                    apply(cur, unit)
                conn.commit()
            finally:
                conn.close()


def run_unit_with_deadline(connect, apply, unit: str) -> None:
    """Fixed: each attempt abandons its connection at its deadline
    (an attempt's outcome is then unknown: `apply` must be idempotent);
    keepalives and tcp_user_timeout let the kernel give up on a dead
    network; the stop counts the next sleep."""
    for attempt in Retrying(
            stop=stop_after_attempt(3)
            | stop_before_delay(JOB_DEADLINE_S - ATTEMPT_DEADLINE_S),
            wait=wait_fixed(0.1), reraise=True,
            retry=retry_if_exception_type(psycopg2.OperationalError)):
        with attempt:
            conn = connect(**KEEPALIVES)
            try:
                with abandon_after(conn, ATTEMPT_DEADLINE_S):
                    with conn.cursor() as cur:
                        apply(cur, unit)
                    conn.commit()
            finally:
                conn.close()


@contextlib.contextmanager
def abandon_after(conn, seconds: float):
    """Shut the connection's socket down if the block is still running
    after `seconds`: a read blocked on it fails at once. A cancel
    request needs the server to act on it; this needs nothing."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))

    def shut() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, shut)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        sock.close()


def timed_job(s, proxy, policy, apply, unit: str) -> dict:
    """Run the job in a thread (the lab's bound: LAB_LIMIT_S, then the network heals), recorded in
    job_runs as a scheduler records it. Returns how it ended, what the OS and the server saw."""
    seen: list = []
    params = s.via(proxy)
    out: dict = {}

    admin = s.connect(autocommit=True)  # the cancel's session: closed when the job has ended

    def connect(**libpq):
        return CancelFromOutside(db.connect(params, **libpq), StallAtFirstCommit(proxy, seen), admin)

    def job() -> None:
        try:
            policy(connect, apply, unit)
            out.update(seconds=time.monotonic() - started, outcome="done")
        except psycopg2.Error as exc:
            out.update(seconds=time.monotonic() - started, outcome="failed", error=exc)

    run_id = db.scalar(s.conn, "INSERT INTO job_runs (unit) VALUES (%s) RETURNING id", (unit,))
    s.conn.commit()
    started = time.monotonic()
    worker = s.thread(job, name="faillab-hung-job")
    worker.join(LAB_LIMIT_S)
    waited = time.monotonic() - started
    hung = worker.is_alive()
    server = db.rows(s.conn, "SELECT state, query FROM pg_stat_activity WHERE pid = %s",
                     (seen[0]["pid"] if seen else 0,))
    s.conn.commit()
    proxy.resume()
    worker.join(10)
    if not worker.is_alive():  # else teardown closes it, after the job
        admin.close()
    with s.conn.cursor() as cur:
        cur.execute("UPDATE job_runs SET finished_at = clock_timestamp(), outcome = %s WHERE id = %s",
                    (out.get("outcome", "hung"), run_id))
    s.conn.commit()
    return {**out, "hung": hung, "seconds": waited if hung else out.get("seconds", waited), "waited": waited,
            "server": server[0] if server else None, "seen": seen}


def job_sessions_left(s, pids: list[int]) -> list:
    """Sessions of the job still on the server idle in a transaction or holding a lock."""
    rows = db.rows(s.conn, """
        SELECT a.pid, a.state FROM pg_stat_activity a
        WHERE a.pid = ANY(%s) AND (a.state LIKE 'idle in transaction%%'
              OR EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid))""", (pids,))
    s.conn.commit()
    return rows


def gone(s, pid: int, seconds: float = 5.0) -> bool:
    """Wait (bounded) until the server no longer lists the backend."""
    deadline = time.monotonic() + seconds
    while db.scalar(s.conn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)):
        s.conn.commit()
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    s.conn.commit()
    return True


def ledger_of(s, unit: str) -> int:
    n = db.scalar(s.conn, "SELECT count(*) FROM ledger WHERE unit = %s", (unit,))
    s.conn.commit()
    return n


JOB_OVERRAN = sql_check("job_overran_deadline", sql.SQL("""
    -- the job's last run took longer than its deadline, or is still
    -- running past it
    SELECT id, unit, outcome,
           round(extract(epoch FROM coalesce(finished_at, clock_timestamp())
                                    - started_at)::numeric, 1) AS seconds
    FROM job_runs
    WHERE id = (SELECT max(id) FROM job_runs)
      AND coalesce(finished_at, clock_timestamp())
          > started_at + make_interval(secs => {deadline})""").format(
    deadline=sql.Literal(JOB_DEADLINE_S)))

HUNG_FIXES = [
    fix("run_unit", naive=run_unit_unbounded, fixed=run_unit_with_deadline,
        contract="""
            Run apply(cur, unit) and commit it, retried with a tenacity policy on
            psycopg2.OperationalError, over connections from connect(**libpq_keywords) (call
            it once per attempt; close each). The database may stop answering without closing
            the connection: no attempt may last longer than ATTEMPT_DEADLINE_S (abandon its
            connection: abandon_after), and the whole job must end within JOB_DEADLINE_S.
            Pass KEEPALIVES to connect, so the kernel also gives up on a dead network.
            The grader holds back the server's reply to the first COMMIT: the job must end
            within its deadline, the socket must carry SO_KEEPALIVE and TCP_USER_TIMEOUT.""",
        hints=("stop_after_delay is checked when an attempt has failed. What if the attempt never\n"
               "fails, and never returns?",
               "Wrap each attempt in abandon_after(conn, ATTEMPT_DEADLINE_S), connect with\n"
               "connect(**KEEPALIVES), and stop before JOB_DEADLINE_S - ATTEMPT_DEADLINE_S.")),
    fix("apply_unit", naive=add_to_ledger, fixed=add_to_ledger_once,
        contract="""
            Add UNIT_AMOUNT for `unit` to ledger (unit, amount) on the cursor `cur`; the caller
            commits. An attempt abandoned at its deadline may have committed already (its
            COMMIT reached the server, the reply did not come back): running apply again for
            the same unit must not add it twice. applied_units (unit PRIMARY KEY) is yours.
            The grader abandons an attempt whose COMMIT the server applied: ledger must hold
            the unit exactly once.""",
        hints=("After the deadline, you do not know whether the COMMIT happened. What must the\n"
               "retry find out first?",
               "INSERT INTO applied_units ... ON CONFLICT DO NOTHING, and add to the ledger only\n"
               "when cur.rowcount == 1: the key and the amount commit together.")),
]


@scenario("hung_attempt", "An attempt that hangs: the database stops answering, nothing closes",
          fixes=HUNG_FIXES)
def hung_attempt(s):
    s.description(f"""
        A job applies one unit of work (adds {UNIT_AMOUNT} to a ledger) and commits, retried by a
        tenacity policy: 3 attempts, 100 ms apart, stop after {JOB_DEADLINE_S:g} s (production: 5 min).
        Its connection goes through the fault proxy. The promise: the job ends within its
        deadline, and the unit is applied exactly once.""")
    with s.conn.cursor() as cur:
        cur.execute("CREATE TABLE ledger (unit text NOT NULL, amount int NOT NULL)")
        cur.execute("CREATE TABLE applied_units (unit text PRIMARY KEY)")
        cur.execute("CREATE TABLE job_runs (id serial PRIMARY KEY, unit text, outcome text, "
                    "started_at timestamptz DEFAULT clock_timestamp(), finished_at timestamptz)")
    s.conn.commit()
    proxy = s.proxy()

    s.trigger(f"""
        Just before the job's first COMMIT, the path to the server goes silent: the COMMIT
        still reaches the server, its reply never comes back, and nothing is closed (a
        stateful firewall that dropped the flow, a server frozen mid-reply). The lab waits
        {LAB_LIMIT_S:g} s, a second past the job's deadline, then heals the path.""")
    naive = timed_job(s, proxy, run_unit_unbounded, add_to_ledger, "unit-1")
    s.require(naive["hung"], f"the stall landed: the job's first attempt was still waiting after {LAB_LIMIT_S:g} s")
    state, query = naive["server"] or ("gone", "")
    s.measure("naive_waited_s", round(naive["seconds"], 1), show=False, headline=True,
              note="seconds the naive job's first attempt had waited when the lab stopped it")
    s.triggered_if(state == "idle" and query.strip().upper().startswith("COMMIT"),
                   f"meanwhile the server shows that session {state}, its last statement "
                   f"{query.strip()[:20]}; nothing runs, so no statement_timeout can fire")
    s.triggered_if(naive["seconds"] > JOB_DEADLINE_S and len(naive["seen"]) == 1,
                   f"the job waited {naive['seconds']:.1f} s, past its {JOB_DEADLINE_S:g} s deadline, in attempt "
                   f"{len(naive['seen'])}: the policy's stop is asked only after an attempt fails; it would "
                   "wait forever")

    s.root_cause("""
        A retry policy bounds attempts and sleeps, not one attempt. When the server stops
        answering without closing the connection, execute() and commit() wait in a socket read
        that nothing ends: statement_timeout is the server's, and the server is not running
        anything; TCP keepalives need an idle connection and minutes; a cancel request needs a
        server that acts on it (a stopped backend never does). Only the client can end the
        attempt: abandon the connection at a deadline. But then the attempt's outcome is
        unknown: here the COMMIT had landed. So the unit retried must be idempotent.""",
                 detect=JOB_OVERRAN,
                 runbook="""The job's last run overran its deadline or is still running: an attempt may be
                     hanging on a connection that no longer answers. Look at pg_stat_activity for the
                     job's sessions, end the hung process, and check whether its last unit was
                     applied before running it again.""")
    with s.step("the same stall, with run_unit() and apply_unit() in the job") as st:
        fixed = timed_job(s, proxy, s.fix("run_unit"), s.fix("apply_unit"), "unit-2")
        error = fixed.get("error")
        st.result = (f"{fixed.get('outcome', 'still waiting')} after {fixed['seconds']:.2f} s, "
                     f"{len(fixed['seen'])} attempt(s)" + (f": {type(error).__name__}" if error else ""))
    state, query = fixed["server"] or ("gone", "")
    s.recovered_if(state == "idle" and query.strip().upper().startswith("COMMIT"),
                   f"the abandoned attempt was ambiguous: the server had run its COMMIT (its session "
                   f"'{state}', last statement {query.strip()[:20]!r})")
    # the job's own clock, from the same start, agrees with the lab's: it ended before the lab's wait did
    timed = fixed["waited"] - 1 <= fixed["seconds"] <= fixed["waited"]
    s.recovered_if(not fixed["hung"] and fixed.get("outcome") == "done" and timed
                   and fixed["seconds"] <= JOB_DEADLINE_S,
                   f"the job ended within its {JOB_DEADLINE_S:g} s deadline: {fixed.get('outcome', 'still waiting')} "
                   f"after {fixed['seconds']:.2f} s")
    s.recovered_if(len(fixed["seen"]) == 2, f"the attempt abandoned at its deadline was retried on a new "
                                            f"connection: {len(fixed['seen'])} attempt(s) in all")
    applied = ledger_of(s, "unit-2")
    s.measure("fixed_ledger_rows", applied, show=False, note="times unit-2 is in the ledger")
    s.recovered_if(applied == 1, f"nothing applied twice: unit-2 is in the ledger {applied} time(s), though the "
                                 "abandoned attempt's COMMIT had landed")
    first = fixed["seen"][0] if fixed["seen"] else {"keepalive": False, "user_timeout_ms": 0, "pid": 0}
    s.recovered_if(first["keepalive"] and first["user_timeout_ms"] == KEEPALIVES["tcp_user_timeout"],
                   f"the OS reports the job's socket with SO_KEEPALIVE {words(first['keepalive'])} and "
                   f"TCP_USER_TIMEOUT {first['user_timeout_ms']} ms")
    with s.step("the path heals: the proxy passes on that the abandoned client is gone") as st:
        # behind a pooler the server session outlives the client (the pool keeps it, reset): what
        # counts is that none is left in a transaction or holding a lock
        sessions = [seen["pid"] for seen in naive["seen"] + fixed["seen"]]
        ended = db.behind_a_pooler(s.conn) or all(gone(s, pid) for pid in sessions)
        left = job_sessions_left(s, sessions)
        st.result = f"{len(sessions)} sessions of the job; {len(left)} left"
    s.recovered_if(ended and not left, f"no session of the job is left idle in a transaction or holding a lock "
                                       f"({words([f'{p} {st}' for p, st in left]) if left else 'none'})")

    s.prevention(f"""
        Bound every attempt, not only the policy: abandon the connection at a deadline
        ({ATTEMPT_DEADLINE_S:g} s here, from the client, since the server may not be listening), and let the
        kernel give up on a dead network (keepalives, tcp_user_timeout). An abandoned attempt is
        ambiguous, it may have committed: retry only a unit that is idempotent, keyed in the
        same transaction as its effect.""",
        abandon_after,
        "KEEPALIVES = {\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in KEEPALIVES.items()) + "}",
        lesson="Bound each attempt, not only the retries: abandon a connection that stopped "
               "answering, and make what you retry idempotent, since the abandoned attempt may "
               "have committed.",
        questions=(
            "How long can one of your database calls wait for a reply, and what would end it?",
            "When your client gives up on a COMMIT, how does the retry find out whether it "
            "happened?",
            "Which of your connections set keepalives or tcp_user_timeout, and to what?"))

if __name__ == "__main__":
    main()
