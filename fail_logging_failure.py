"""Logging failures: logs that vanish, lose their correlation, flood the store, or do not parse.

When a pipeline fails, its logs are the evidence, and the logging system tends to fail at the
same moment. Each scenario breaks structured logging for real, with the standard `logging`
module (handlers, filters, QueueHandler/QueueListener, contextvars), and then counts: events
the job emitted against events found in the log store (the `pipeline_log` table), by run id.

    python3 fail_logging_failure.py [--only storage,correlation,volume,structured_parsing]
"""
from __future__ import annotations

import common  # noqa: F401,I001  first: the lab's signal handlers are installed from the first instant

import contextlib
import contextvars
import errno
import io
import json
import logging
import logging.handlers
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import psycopg2
import psycopg2.errors
from psycopg2 import sql
from psycopg2.extras import execute_values
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from common import Scenario, db, main, scenario
from common.detect import metric_alert, sql_check
from common.faults import Hooks, faults_enabled, hooked_cursor
from common.fixes import TimeLimitExceeded, fix, time_limited
from common.metrics import total
from common.output import words

# -- the fixture: one small job, the same in every run ---------------------------------------------
RECORDS = 3_000          # the job's input: records 1..RECORDS
EVENT_EVERY = 25         # it logs one progress event per 25 records (122 events a run)
STEP_WORK_S = 0.0005     # the job's work per progress step (production: seconds to minutes)
BATCH_SIZE = 500         # the fixed sink: at most this many events per INSERT
# The run id that every event carries; `correlation` shows why it has to be a ContextVar.
CORRELATION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)


# -- the job's events and the log store, shared by every scenario -----------------------------------
@dataclass
class JobReport:
    """The job's own account of one run: what it emitted is what the store must hold, and how long
    its slowest logging call held it up."""
    run_id: str
    emitted: int = 0
    records_done: int = 0
    finished: bool = False
    seconds: float = 0.0
    slowest_log_s: float = 0.0
    errors: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def next_event_id(self) -> str:
        with self._lock:
            self.emitted += 1
            return f"{self.run_id}-{self.emitted:05d}"


def log_event(log: logging.Logger, report: JobReport, level: int, message: str, *args,
              exc_info=None, **fields) -> None:
    """Emit one structured event with a unique event id, count it as emitted, and time the call:
    the job's own view of what logging costs it."""
    started = time.perf_counter()
    log.log(level, message, *args, exc_info=exc_info,
            extra={"event_id": report.next_event_id(), "fields": fields})
    took = time.perf_counter() - started
    with report._lock:
        report.slowest_log_s = max(report.slowest_log_s, took)


@contextlib.contextmanager
def running(report: JobReport):
    """One run of a job: everything it logs carries its run id (a ContextVar), and it is timed."""
    token = CORRELATION_ID.set(report.run_id)
    started = time.perf_counter()
    try:
        yield report
        report.finished = True
    finally:
        report.seconds = time.perf_counter() - started
        CORRELATION_ID.reset(token)


INSERT_EVENTS = """
    INSERT INTO pipeline_log (logged_at, level, logger, message, correlation_id, fields)
    SELECT (e->>'time')::timestamptz, e->>'level', e->>'logger', e->>'message', e->>'correlation_id', e->'fields'
    FROM (VALUES %s) AS batch (e)
    ON CONFLICT ((fields->>'event_id')) DO NOTHING"""


def insert_events(cur, lines: list[str]) -> int:
    """One INSERT for a batch of JSON lines (PostgreSQL parses them as jsonb); returns rows inserted."""
    execute_values(cur, INSERT_EVENTS, [(line,) for line in lines], template="(%s::jsonb)",
                   page_size=max(1, len(lines)))
    return cur.rowcount


def create_log_store(s: Scenario) -> None:
    """pipeline_log (common/schema.py), plus a unique event id: what makes a replay idempotent."""
    s.tables("pipeline_log")
    with s.conn.cursor() as cur:
        cur.execute("CREATE UNIQUE INDEX pipeline_log_event_id ON pipeline_log ((fields->>'event_id'))")
    s.conn.commit()


def connect_log_store(s: Scenario, proxy=None, statements: Counter | None = None):
    """A connection to the log store. synchronous_commit=off: a log row is not worth a WAL flush of
    its own (a server crash may lose the last few ms of logs, never consistency); it also keeps this
    lab's timings about the design, not about this machine's disk. lock_timeout: a writer waits for a
    stalled store, never forever. `statements`, when given, counts what the connection sends, by
    first word (lab instrumentation, outside the handler: a cursor class of the lab's own)."""
    extra = {"cursor_factory": hooked_cursor(CountByFirstWord(statements))} if statements is not None else {}
    conn = s.connect(s.via(proxy) if proxy else None, **extra)
    with conn.cursor() as cur:
        cur.execute("SET synchronous_commit = off; SET lock_timeout = '10s'")
    conn.commit()
    return conn


class CountByFirstWord(Hooks):
    """Counts each statement a connection sends by its first word (INSERT, SET), failed ones too."""

    def __init__(self, counts: Counter):
        self.counts = counts

    def before_execute(self, conn, text: str) -> None:
        self.counts[(text[:40].split() or [""])[0].upper()] += 1


def within_call_limit(s: Scenario, fn):
    """fn, stopped like one call of a fix slot when it overruns the run's call limit: a job whose
    handler or filter (graded code, say) never returns is stopped and fails its claims, never left
    hanging. Its queries are cancelled first."""
    return time_limited(fn, s.run.args.call_limit, lambda: db.cancel_other_backends(s.run.admin))


def run_totals(conn, run_id: str) -> tuple[int, int, int]:
    """(rows, distinct event ids, bytes) that one run has in the log store."""
    [(rows, distinct, size)] = db.rows(conn, """
        SELECT count(*), count(DISTINCT fields->>'event_id'), coalesce(sum(pg_catalog.pg_column_size(p.*)), 0)
        FROM pipeline_log p WHERE correlation_id = %s""", (run_id,))
    return rows, distinct, int(size)


def export_run(s: Scenario, job: str, report: JobReport) -> None:
    """What production exports once a run ends: the job's own count of the events it emitted (a
    gauge the job sets as it exits, e.g. through a Pushgateway), and the store's count of the run's
    rows (a gauge a SQL exporter reads from pipeline_log). Alerts compare the two."""
    stored, _, _ = run_totals(s.conn, report.run_id)
    s.gauge("pipeline_log_events_emitted", "Events a run of the job emitted", ["job"]).labels(job).set(report.emitted)
    s.gauge("pipeline_log_events_stored", "Rows of a run in the log store", ["job"]).labels(job).set(stored)


def records_dropped(s: Scenario, job: str, reason: str):
    """The job's own counter of the log records its logging dropped, by reason (store_failed,
    file_failed, format_failed, unparseable, rejected_by_store), counted where each is lost: in a
    handler's handleError, or where a loader sets a line aside. The series exists from the run's
    start, at 0, so an alert on its increase sees the first drop."""
    return s.counter("pipeline_log_records_dropped_total", "Log records the job's logging dropped, by reason",
                     ["job", "reason"]).labels(job, reason)


def events_lost(values: dict) -> list:
    """The alert LogEventsLost, read from the run's metrics: emitted and not stored."""
    lost = total(values, "pipeline_log_events_emitted") - total(values, "pipeline_log_events_stored")
    return [("events emitted and not stored", int(lost))] if lost > 0 else []


LOG_EVENTS_LOST = metric_alert("LogEventsLost", events_lost)


STALL_GRACE_S = 5.0  # a stall no writer has waited out yet holds on this much longer, then gives up


@dataclass
class Stall:
    """A stall of the log store, measured by the server: how long it was meant to hold, the most
    of the store's sessions seen blocked by it at once (at least one: the stall met a writer), and
    the longest an INSERT waited on it, as pg_stat_activity times the blocked statement. `settled`
    is set once a writer waits on it or it is over."""
    seconds: float
    thread: threading.Thread | None = None
    waiting: int = 0
    insert_waited_s: float = 0.0  # the blocked INSERT's own duration, last seen while it waited
    locked_at: float = 0.0  # time.monotonic() when the lock was taken: the stall's start
    settled: threading.Event = field(default_factory=threading.Event)

    def wait(self) -> "Stall":
        if self.thread is not None:
            self.thread.join()
        return self

    def meets_a_writer(self) -> bool:
        """Wait until a writer waits on the stall, or the stall is over; return whether one did."""
        self.settled.wait(self.seconds + STALL_GRACE_S + 1)
        return self.waiting >= 1


# The sessions the stall blocks, and how long the longest INSERT among them has been running:
# a blocked statement's query_start is when it began to wait (its lock is its first step).
# clock_timestamp(), not now(): the locker's transaction started before any of them.
BLOCKED_BY_ME = r"""
    SELECT pg_stat_clear_snapshot();  -- read afresh: a transaction keeps its first view of it
    SELECT count(*), coalesce(max(extract(epoch FROM clock_timestamp() - query_start))
                              FILTER (WHERE query ~* '^\s*insert\M'), 0)::float8
    FROM pg_stat_activity
    WHERE application_name = current_setting('application_name') AND wait_event_type = 'Lock'
      AND pg_backend_pid() = ANY (pg_blocking_pids(pid))"""


def stall_store(s: Scenario, seconds: float) -> Stall:
    """The store stalls for real: another session takes a SHARE lock on pipeline_log (as a
    migration or a REINDEX does), so every INSERT waits for it. A lab thread watches the sessions
    it blocks, and releases it once an INSERT has waited `seconds` at the statement (as the
    server times it), so the writer meets the whole stall however late it arrives (a TLS login
    on a busy machine); a stall no INSERT waits out holds STALL_GRACE_S longer at most."""
    stall, locker, release = Stall(seconds, settled=s.event()), s.connect(), s.event()
    with locker.cursor() as cur:
        cur.execute("LOCK TABLE pipeline_log IN SHARE MODE")
    stall.locked_at = time.monotonic()

    def hold():
        started = stall.locked_at  # not the thread's start: a busy machine may run it later
        while not release.is_set():  # teardown sets it: an interrupted run does not wait
            [(blocked, waited)] = db.rows(locker, BLOCKED_BY_ME)
            stall.waiting = max(stall.waiting, int(blocked))
            stall.insert_waited_s = max(stall.insert_waited_s, float(waited))
            if stall.waiting:
                stall.settled.set()
            if stall.insert_waited_s >= seconds or time.monotonic() - started >= seconds + STALL_GRACE_S:
                break
            release.wait(0.01)
        locker.rollback()
        locker.close()
        stall.settled.set()

    stall.thread = s.thread(hold, name="faillab-stall")
    return stall


# -- the handlers: naive (synchronous) and fixed (queue -> listener -> batches) ----------------------
class DatabaseHandler(logging.Handler):
    """Naive: one INSERT and one COMMIT per record, in the thread that
    logs. On failure the standard library's default applies: the record
    is dropped, and a traceback goes to stderr (Handler.handleError)."""

    def __init__(self, connect):
        super().__init__()
        self.connect = connect  # returns a new connection to the log store
        self.conn = None
        self.setFormatter(JsonFormatter())  # one JSON object per line

    def emit(self, record):
        try:
            self.write([self.format(record)])
        except Exception:
            self.handleError(record)

    def write(self, lines: list[str]) -> int:
        if self.conn is None or self.conn.closed:
            self.conn = self.connect()
        try:
            with self.conn.cursor() as cur:
                inserted = insert_events(cur, lines)
            self.conn.commit()
            return inserted
        except psycopg2.Error:
            if not self.conn.closed:
                self.conn.rollback()
            raise

    def close(self):
        if self.conn is not None:
            self.conn.close()
        super().close()


class ReraisingDatabaseHandler(DatabaseHandler):
    """Naive #2: 'a log line must never be lost', so a failed write re-raises into the caller: the job."""

    def handleError(self, record):
        raise  # the store's own error, raised inside the job's logging call


def store_retry() -> Retrying:
    """3 quick attempts (production: 5, exponential from 0.5 s to 30 s);
    behind the queue the job never waits for them."""
    return Retrying(
        stop=stop_after_attempt(3), wait=wait_fixed(0.01), reraise=True,
        retry=retry_if_exception_type(
            (psycopg2.OperationalError, psycopg2.InterfaceError)))


class BatchingDatabaseHandler(DatabaseHandler):
    """Fixed sink, behind a queue listener: one INSERT per batch, retried;
    a batch the store still refuses goes to a local spool file, replayed
    when the store is back. `dropped` counts what even the spool refused:
    alert on it."""

    def __init__(self, connect, spool: Path | None = None,
                 batch_size: int = BATCH_SIZE):
        super().__init__(connect)
        self.spool, self.batch_size = spool, batch_size
        self.buffer: list[str] = []
        self.dropped = 0

    def emit(self, record):
        try:
            self.buffer.append(self.format(record))
        except Exception:
            self.handleError(record)
        if len(self.buffer) >= self.batch_size:
            self.flush()

    def flush(self):
        batch, self.buffer = self.buffer, []
        if batch:
            try:
                store_retry()(self.write, batch)
            except psycopg2.Error:
                self.spool_lines(batch)

    def spool_lines(self, batch: list[str]) -> None:
        try:
            if self.spool is None:
                raise OSError("no spool file configured")
            with open(self.spool, "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in batch))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            self.dropped += len(batch)
            sys.stderr.write(f"logging: {len(batch)} lost: {exc}\n")

    def close(self):
        try:
            self.flush()
        finally:
            super().close()


class BatchingQueueListener(logging.handlers.QueueListener):
    """Hands records to its handlers and flushes them whenever the queue
    runs dry: batches grow while the store is slow and shrink to a single
    record when the job is quiet (a group commit)."""

    def handle(self, record):
        super().handle(record)
        if self.queue.empty():
            for handler in self.handlers:
                handler.flush()


class ListenedQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler that owns its listener: close() lets the listener
    drain the queue, then stops it and closes the listener's handlers."""
    listener: logging.handlers.QueueListener | None = None

    def close(self):
        # taken first: a close interrupted half-way (Ctrl-C) and run again
        # at exit by logging.shutdown must not stop the listener twice
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.stop()  # returns once the queue is drained
            for handler in listener.handlers:
                handler.close()
        super().close()


def store_handler_sync(connect, spool: Path | None) -> logging.Handler:
    """Naive: one INSERT and one COMMIT per record, in the job's thread;
    a failed write is dropped (handleError). No spool."""
    return DatabaseHandler(connect)


def store_handler_queued(connect, spool: Path | None) -> logging.Handler:
    """Fixed: the job's thread only formats the record and puts it on a
    queue (put() never waits); a listener thread writes batches,
    retried, and spools what the store still refuses."""
    records: queue.SimpleQueue = queue.SimpleQueue()
    to_queue = ListenedQueueHandler(records)
    to_queue.setFormatter(JsonFormatter())  # the JSON line, built once
    sink = BatchingDatabaseHandler(connect, spool=spool)
    sink.setFormatter(logging.Formatter("%(message)s"))  # already JSON
    to_queue.listener = BatchingQueueListener(records, sink)
    to_queue.listener.start()
    return to_queue


STORE_HANDLER = fix(
    "store_handler", naive=store_handler_sync, fixed=store_handler_queued,
    contract="""
        Return a logging.Handler that gets every record the job logs into the log store.
        connect() returns a new psycopg2 connection to the store; insert_events(cursor, lines)
        inserts a batch of JSON lines (one event each; JsonFormatter makes them), then commit.
        spool is a local file path (or None) for what the store refuses: one JSON line per
        event, which replay_spool(conn, spool) loads later; close() of your handler is called
        when the job ends and must leave nothing running.
        It must guarantee: the job's logging call never waits for the store; no event is lost
        (stored, or spooled and then replayed); events reach the store while the job runs, in
        batches (one INSERT for many events), not one round trip per event.
        The grader stalls the store (a lock) and, in `storage`, then drops it; it checks the
        job's slowest logging call, that an INSERT waited the whole stall (the server times
        it), that stored == emitted with no duplicate after the replay, and, in `volume`, the
        INSERTs counted.""",
    hints=("""
        The job's thread must never talk to the database. Which class of logging.handlers hands
        a record to another thread, and which one runs that thread?""", """
        Return a QueueHandler (JsonFormatter on it) whose QueueListener thread feeds a sink that
        buffers lines and writes them with insert_events when the queue runs dry, retries, and
        appends what still fails to `spool`; close() stops the listener and closes the sink.
        BatchingDatabaseHandler, BatchingQueueListener and ListenedQueueHandler do each part."""))


def check_spool(path: Path) -> None:
    """Pre-flight, before the job starts: a real write, flushed and fsynced (a blank line, which the
    replay skips). Writing is the only sure way to learn that a disk is full."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def replay_spool(conn, spool: Path) -> int:
    """Load the spooled events; returns the rows inserted. Safe
    to run twice: the unique event id makes the store skip what it
    already holds (ON CONFLICT DO NOTHING)."""
    text = spool.read_text(encoding="utf-8") if spool.exists() else ""
    lines = [line for line in text.split("\n") if line.strip()]
    with conn.cursor() as cur:
        inserted = insert_events(cur, lines) if lines else 0
    conn.commit()
    return inserted


def spooled_event_ids(spool: Path) -> list[str | None]:
    """The event id of each spooled line (None for a line that is no event of JsonFormatter's)."""
    ids = []
    for line in (spool.read_text(encoding="utf-8") if spool.exists() else "").split("\n"):
        if line.strip():
            try:
                ids.append(str(json.loads(line)["fields"]["event_id"]))
            except (ValueError, KeyError, TypeError):
                ids.append(None)
    return ids


def event_ids(conn, run_id: str) -> set[str]:
    """The event ids one run has in the log store."""
    return {e for e, in db.rows(conn, "SELECT fields->>'event_id' FROM pipeline_log WHERE correlation_id = %s",
                                (run_id,))}


class CountsDrops:
    """Lab instrumentation, mixed into a handler from outside: count the records it dropped (and the
    kind of event each was) and keep the first error, then do what the standard library does
    (Handler.handleError prints '--- Logging error ---' to stderr and carries on). `dropped_total`,
    when set, is the job's counter (records_dropped): production counts its drops right here."""
    failed = 0
    dropped_kinds: tuple = ()
    first_error: BaseException | None = None
    dropped_total = None

    def handleError(self, record):
        self.failed += 1
        if self.dropped_total is not None:
            self.dropped_total.inc()
        self.dropped_kinds += (getattr(record, "fields", {}).get("kind"),)
        self.first_error = self.first_error or sys.exc_info()[1]
        super().handleError(record)


class WatchedFile(CountsDrops, logging.FileHandler):
    pass


class WatchedDatabaseHandler(CountsDrops, DatabaseHandler):
    pass


# == 1. storage =====================================================================================
STALL_AT = 500                 # the log store stalls here (a lock held by another session) ...
STALL_S = 1.0                  # ... for this long
OUTAGE_AT = 1_500              # then the log database drops here
FULL_DISK = Path("/dev/full")  # Linux: every write to it fails with a real ENOSPC


def run_job(log, report: JobReport, faults: dict) -> None:
    """The pipeline: process the records, log a progress event every EVENT_EVERY of them.
    `faults` maps a record number to the fault injected there."""
    with running(report):
        log_event(log, report, logging.INFO, "job started", records=RECORDS)
        total = 0
        for i in range(1, RECORDS + 1):
            if i in faults:
                faults[i]()
            total += i * 7919 % 10_000
            report.records_done = i
            if i % EVENT_EVERY == 0:
                time.sleep(STEP_WORK_S)
                log_event(log, report, logging.INFO, "progress: %d of %d records", i, RECORDS, record=i, total=total)
        log_event(log, report, logging.INFO, "job finished", records_done=report.records_done,
                  events_emitted=report.emitted + 1)  # this event included


def events_before(record: int) -> int:
    """The events run_job emits before it reaches `record`: 'job started', then one per EVENT_EVERY."""
    return 1 + (record - 1) // EVENT_EVERY


LONGEST_PAUSE = """
    SELECT lag((fields->>'record')::int) OVER w, logged_at - lag(logged_at) OVER w
    FROM pipeline_log WHERE correlation_id = %s WINDOW w AS (ORDER BY id)
    ORDER BY 2 DESC NULLS LAST LIMIT 1"""  # the event after which a run's events paused longest
LAST_STORED_RECORD = "SELECT max((fields->>'record')::int) FROM pipeline_log WHERE correlation_id = %s"

INCOMPLETE_RUNS = """
    -- runs whose story is incomplete: no 'job finished' event,
    -- or fewer events than it announced
    SELECT correlation_id, count(*) AS stored,
           max((fields->>'events_emitted')::int) AS announced
    FROM pipeline_log GROUP BY correlation_id
    HAVING max((fields->>'events_emitted')::int) IS DISTINCT FROM count(*)"""


@scenario("storage", "The log store fails: events vanish, or the job dies with it", fixes=[STORE_HANDLER])
def storage(s: Scenario):
    s.description(f"""
        The job processes {RECORDS:,} records and logs a structured event (JSON) every {EVENT_EVERY}
        records, plus 'job started' and 'job finished', to the table pipeline_log: one INSERT and
        one COMMIT per event, in the job's thread. A local JSON Lines file is the fallback sink.
        Wanted: every event the job emits is in the store, and logging never stops or slows the job.""")
    create_log_store(s)
    proxy = s.proxy()
    through_proxy = lambda: connect_log_store(s, proxy)  # noqa: E731  (the log store, behind the fault proxy)
    stalls: list[Stall] = []

    def outage() -> None:
        """The outage lands on a write the stall holds, if the stall still lasts: however slowly
        the handler logged in, it has an INSERT in the server when its connection drops."""
        for stall in stalls:
            stall.meets_a_writer()
        proxy.down()

    faults = {STALL_AT: lambda: stalls.append(stall_store(s, STALL_S)), OUTAGE_AT: outage}
    store = WatchedDatabaseHandler(through_proxy)
    store.dropped_total = records_dropped(s, "storage.default", "store_failed")
    fallback = WatchedFile(FULL_DISK, encoding="utf-8") if FULL_DISK.exists() else None
    if fallback:
        fallback.dropped_total = records_dropped(s, "storage.default", "file_failed")
    disk = (f"The fallback file is {FULL_DISK}: every write to it fails with a real ENOSPC." if fallback else
            f"No {FULL_DISK} on this OS: the full-disk fallback is left out here, not simulated.")
    s.trigger(f"""
        At record {STALL_AT:,} the store stalls for {STALL_S:g} s: another session holds a lock on
        pipeline_log (as a migration does), so every INSERT waits. At record {OUTAGE_AT:,} (once an
        INSERT waits on the stall, if it still lasts) the fault proxy drops the log database's
        connection and refuses new ones until the job ends. {disk}
        Run 1: the standard library's defaults (Handler.handleError). Run 2: a handler that
        re-raises, under the outage alone.""")

    default = JobReport(new_run_id(s, "default"))
    with contextlib.redirect_stderr(io.StringIO()) as stderr:  # where handleError writes
        with job_logger("storage.default", *([store, fallback] if fallback else [store])) as log:
            run_job(log, default, faults)
    stalled = stalls.pop().wait()
    default_stored, _, _ = run_totals(s.conn, default.run_id)
    s.require(store.first_error is not None, "run 1: the log store refused events")
    s.observe(store.first_error,
              note="Run 1: the database handler's first error (handleError printed it; the record is dropped):")
    file_dropped = 0  # what the fallback file dropped, where there is one
    if fallback:
        s.require(fallback.first_error is not None, "run 1: the fallback file refused them too")
        s.observe(fallback.first_error, note="... and the fallback file's (handleError again):")
        file_dropped = s.measure("fallback_file_dropped", fallback.failed, show=False)
        s.triggered_if(file_dropped == default.emitted,
                       f"the fallback file refused all {file_dropped} of the {default.emitted} events")
        s.triggered_if(getattr(fallback.first_error, "errno", None) == errno.ENOSPC,
                       "its error is ENOSPC (errno 28): the disk is full")
    logging_errors = show_logging_errors(s, stderr.getvalue(), "one per event each sink dropped")

    proxy.up()
    strict = JobReport(new_run_id(s, "strict"))
    s.say("Run 2, the handler that re-raises:")
    with job_logger("storage.strict", ReraisingDatabaseHandler(through_proxy)) as log:
        with s.expect(psycopg2.OperationalError, label="run 2: the job's own logging call"):
            run_job(log, strict, {OUTAGE_AT: proxy.down})
    strict_stored, _, _ = run_totals(s.conn, strict.run_id)

    lost, strict_lost = default.emitted - default_stored, strict.emitted - strict_stored
    s.table(["run", "finished", "records", "job time", "slowest call", "emitted", "stored", "lost"],
            [["1 default", words(default.finished), f"{default.records_done:,}", f"{default.seconds:.2f} s",
              f"{default.slowest_log_s:.2f} s", default.emitted, default_stored, lost],
             ["2 re-raise", words(strict.finished), f"{strict.records_done:,}", f"{strict.seconds:.2f} s",
              "(died)", strict.emitted, strict_stored, strict_lost]])
    s.measure("emitted_before", default.emitted, show=False)
    s.measure("stored_before", default_stored, show=False)
    s.measure("lost_before", lost, show=False)
    s.measure("naive_slowest_log_s", round(default.slowest_log_s, 3), show=False)
    s.measure("logging_errors_on_stderr", logging_errors, show=False)
    s.measure("strict_died_at_record", strict.records_done, show=False)
    s.triggered_if(default.finished and lost > 0,
                   f"run 1 finished 'successfully' and lost {lost} of {default.emitted} events")
    s.measure("naive_stall_insert_waited_s", round(stalled.insert_waited_s, 3), show=False)
    s.triggered_if(stalled.waiting >= 1 and stalled.insert_waited_s >= STALL_S,
                   f"run 1: an INSERT waited {stalled.insert_waited_s:.2f} s at the statement (the "
                   f"server's pg_stat_activity), the whole {STALL_S:g} s stall ...")
    s.triggered_if(default.slowest_log_s >= STALL_S / 2,
                   f"... and held one logging call, and so the job, {default.slowest_log_s:.2f} s")
    [(paused_after, pause)] = db.rows(s.conn, LONGEST_PAUSE, (default.run_id,))
    s.triggered_if(paused_after == STALL_AT,
                   f"run 1's own timestamps place it: the job paused {pause.total_seconds():.2f} s after "
                   f"the event of record {paused_after:,}")
    s.triggered_if(logging_errors == lost + file_dropped,
                   f"stderr got one '--- Logging error ---' per event a sink dropped: "
                   f"{logging_errors} = {lost} + {file_dropped}")
    s.triggered_if(not strict.finished and strict.records_done == OUTAGE_AT,
                   f"run 2 died at record {strict.records_done:,} of {RECORDS:,}: a logging outage became a job outage")
    before_outage, last = events_before(OUTAGE_AT), OUTAGE_AT - EVENT_EVERY
    reached = [db.scalar(s.conn, LAST_STORED_RECORD, (r.run_id,)) for r in (default, strict)]
    s.triggered_if([default_stored, strict_stored] == [before_outage] * 2,
                   f"each run's store holds the {before_outage} events emitted before the outage "
                   f"at record {OUTAGE_AT:,} ...")
    s.triggered_if(reached == [last] * 2, f"... and none from it on: the last is record {last:,}")
    s.triggered_if(strict_lost == 1, "run 2 lost only the event whose logging call raised: "
                                     f"{strict_stored} of {strict.emitted} stored")

    export_run(s, "storage.default", default)
    export_run(s, "storage.strict", strict)
    s.root_cause("""
        The standard library's Handler.handleError exists so that logging never crashes a program:
        it prints '--- Logging error ---' to stderr and drops the record. That is the right default,
        but nobody reads stderr of a batch job, so the evidence disappears in silence exactly when the
        database is down. Re-raising is worse: the log store becomes a single point of failure of the
        job. And a synchronous handler puts every INSERT on the job's own clock: a store that stalls
        stalls the job. The local fallback shares the fate of the disk; ENOSPC drops it too.""",
                 detect=LOG_EVENTS_LOST, runbook="""
        LogEventsLost: a run emitted more events than the log store holds, so its story has gaps.
        First response: find the runs (the query below), check the log store's health and the
        sink's spool, replay the spool; the run's own outcome is not in question, its record is.""")
    s.say("Which runs, from the store alone (their last event announces how many they emitted):")
    s.code(INCOMPLETE_RUNS)
    incomplete = db.rows(s.conn, INCOMPLETE_RUNS)
    s.table(["correlation_id", "stored", "announced"], [[run, n, words(said)] for run, n, said in incomplete])
    s.triggered_if({run for run, _, _ in incomplete} == {default.run_id, strict.run_id},
                   "the query flags both damaged runs, and nothing else")

    spool = s.tmpdir / "pipeline_log.spool.jsonl"
    with s.step("Pre-flight: check the spool file can really be written before the job starts") as st:
        if fallback:
            with s.expect(OSError, label="the pre-flight write to the full disk") as refused:
                check_spool(FULL_DISK)
            s.recovered_if(getattr(refused.exc, "errno", None) == errno.ENOSPC,
                           "it is ENOSPC (errno 28): the full disk is found before the job starts")
        check_spool(spool)
        st.result = f"{spool.name} in the run's temp folder is writable"

    proxy.up()
    fixed = JobReport(new_run_id(s, "fixed"))
    with s.step(f"Run the job again with the fixed handler (Prevention shows it), the same stall at record "
                f"{STALL_AT:,} and outage at {OUTAGE_AT:,}") as st:
        def job_and_its_logging():
            with job_logger("storage.fixed", s.fix("store_handler")(through_proxy, spool)) as log:
                run_job(log, fixed, faults)

        try:
            within_call_limit(s, job_and_its_logging)()
        except TimeLimitExceeded as exc:
            s.observe(exc, note="The job and its logging did not end within the time limit:")
        stalled_fixed = stalls.pop().wait() if stalls else Stall(STALL_S)
        held = event_ids(s.conn, fixed.run_id)  # once its close() returned: stored live ...
        spooled_ids = spooled_event_ids(spool)  # ... and spooled
        stored_live, spooled = len(held), len(spooled_ids)
        already = sum(e in held for e in spooled_ids)  # spooled, and yet stored already
        # Its drops: what neither the store nor the spool holds (the fixed sink counts the same in
        # its `dropped`, a batch the spool refused; read here from the store and the file, so any
        # handler in the slot is counted alike).
        neither = max(0, fixed.emitted - (stored_live + spooled - already))
        records_dropped(s, "storage.fixed", "store_failed").inc(neither)
        st.result = f"its logging closed with {stored_live} events stored and {spooled} spooled"
    s.recovered_if(stored_live + spooled - already == fixed.emitted,
                   f"when its logging closed, each event was stored or spooled, once: {stored_live} "
                   f"+ {spooled} - {already} in both = {fixed.emitted} emitted")
    with s.step("The store is back: replay the spool, then replay it again (as after a crash mid-replay)") as st:
        proxy.up()
        replay_conn = s.connect(s.via(proxy))
        first, second = replay_spool(replay_conn, spool), replay_spool(replay_conn, spool)
        replay_conn.close()
        spool.unlink(missing_ok=True)
        st.result = f"first replay inserted {first}, second {second} (ON CONFLICT skipped them all); spool removed"
    stored, distinct, _ = run_totals(s.conn, fixed.run_id)
    s.recovered_if(first == spooled - already and second == 0,
                   f"the replay inserted exactly the {first} spooled events the store "
                   f"lacked; run again, {second}")
    if already:
        s.say(f"""
            Of the {fixed.emitted} events, {stored_live} were stored live + {spooled} spooled =
            {stored_live + spooled}, yet the store holds {stored}:
            {already} spooled events were already stored. The outage cut the reply to their batch's
            COMMIT, so the handler could not know whether it had committed (the COMMIT's outcome was
            unknown), and it spooled them to be safe; the replay's ON CONFLICT skipped them.""")
    else:
        s.say(f"""
            Of the {fixed.emitted} events, {stored_live} were stored live + {spooled} spooled = {stored}.
            No spooled event was in the store already: the batch the outage cut had not reached its
            COMMIT (it was waiting on the stalled store: at most {stalled_fixed.waiting} session(s) waited
            on the lock at once), so the server rolled it back and no COMMIT outcome was in doubt.""")
    still_incomplete = {run for run, _, _ in db.rows(s.conn, INCOMPLETE_RUNS)}
    export_run(s, "storage.fixed", fixed)
    s.measure("fixed_job_seconds", round(fixed.seconds, 3), show=False)
    s.measure("fixed_slowest_log_s", round(fixed.slowest_log_s, 4), show=False)
    s.measure("stall_waiting_sessions", stalled_fixed.waiting, show=False)
    s.measure("emitted_after", fixed.emitted, show=False)
    s.measure("stored_live_after", stored_live, show=False)
    s.measure("spooled_after", spooled, show=False)
    s.measure("spooled_already_stored", already, show=False)
    s.measure("second_replay_inserted", second, show=False)
    s.measure("stored_after", stored, show=False)
    lost_after = s.measure("lost_after", fixed.emitted - stored, show=False)
    s.recovered_if(fixed.finished and fixed.records_done == RECORDS, f"the job finished all {RECORDS:,} records")
    slowest_ms, bound_ms = 1000 * fixed.slowest_log_s, 1000 * STALL_S / 4  # as printed: what is compared
    s.recovered_if(slowest_ms < bound_ms,
                   f"the stalled store did not hold the job up: its slowest logging call took "
                   f"{slowest_ms:.1f} ms (at most {bound_ms:.0f}; the stall lasted {STALL_S:g} s)")
    waited = s.measure("stall_insert_waited_s", round(stalled_fixed.insert_waited_s, 3), show=False)
    s.recovered_if(stalled_fixed.waiting >= 1 and waited >= STALL_S,
                   f"the handler wrote while the job ran: an INSERT waited {waited:.2f} s at the "
                   f"statement (the server's pg_stat_activity), the whole {STALL_S:g} s stall")
    s.recovered_if(lost_after == 0, f"none lost: stored == emitted ({stored} of {fixed.emitted})")
    s.recovered_if(distinct == stored and second == 0, f"no duplicate: {distinct} distinct event ids in {stored} rows")
    s.recovered_if(fixed.run_id not in still_incomplete, "the detection query does not flag the fixed run")

    s.prevention("""
        Put a QueueHandler in front of the store so the job only enqueues; let a listener thread write
        batches with retries, spool what still fails to a local file checked at start-up, and replay
        the spool idempotently (a unique event id + ON CONFLICT DO NOTHING). Alert on the sink's
        `dropped` counter and on runs whose stored count differs from the count they announced.
        The queue here is unbounded, so a long outage costs memory: production code bounds it, and
        then a full queue drops a record through handleError, which the same alerts must see.""",
                 ListenedQueueHandler, BatchingQueueListener, BatchingDatabaseHandler, replay_spool,
                 lesson="Logging must never stop or slow the job: the job only enqueues; batch, retry and spool "
                        "behind the queue, and count what is stored against what the run announced.",
                 questions=("Run 1 exited 0. What would have told you that events were missing, and when?",
                            "Why is a handler that re-raises worse than one that drops?",
                            "What does the unbounded queue cost in a long outage, and how would you bound it?"))


# == 2. correlation =================================================================================
CHUNKS, EVENTS_PER_CHUNK = 6, 5   # each run fans 6 chunks out to a shared thread pool
RUN_EVENTS = 2 + CHUNKS * EVENTS_PER_CHUNK  # a run's events: 'run started', the chunks', 'run finished'


class GlobalRunId:
    """Naive #1: one slot for the whole process; the last run to start overwrites it for everyone."""
    value = None

    def set(self, value):
        self.value = value

    def get(self):
        return self.value


class ThreadLocalRunId(GlobalRunId, threading.local):
    """Naive #2: the same slot, one per thread; the pool's worker threads never see what the run's
    thread set."""


def run_id_holder_thread_local():
    """Naive: the run id in a threading.local, one value per thread."""
    return ThreadLocalRunId()


def run_id_holder_contextvar():
    """Fixed: the run id in a ContextVar, declared once at module level:
    one value per context; a copied context takes it to a pool thread."""
    return CORRELATION_ID


def submit_plain(pool: ThreadPoolExecutor, fn, *args):
    """Naive: the task runs in the worker thread's own context, which
    every task of that thread shares."""
    return pool.submit(fn, *args)


def submit_in_context(pool: ThreadPoolExecutor, fn, *args):
    """Fixed: the task runs in a copy of the submitter's context: it sees
    the submitter's run id, and what it sets dies with the copy."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


class CorrelationFilter(logging.Filter):
    """Stamps each record with the current run id, read from `source` (a
    holder: .get()). On the logger, it runs in the thread that logs, even
    in front of a QueueHandler."""

    def __init__(self, source=CORRELATION_ID):
        super().__init__()
        self.source = source

    def filter(self, record):
        if getattr(record, "correlation_id", None) is None:
            record.correlation_id = self.source.get()
        return True


def run_overlapping(s: Scenario, design: str, holder, submit) -> int:
    """Two runs at once, sharing one worker pool, each setting its id in `holder` where it starts;
    returns the events they emitted. Each event also records its true run, passed explicitly."""
    both_started = s.barrier(2)
    sink = store_handler_queued(lambda: connect_log_store(s), None)
    with job_logger("correlation", sink, correlation=holder) as log, \
            ThreadPoolExecutor(3, thread_name_prefix="faillab-pool") as pool:

        def chunk(report: JobReport, c: int) -> None:  # a unit of work, run by the shared pool
            for n in range(EVENTS_PER_CHUNK):
                log_event(log, report, logging.INFO, "chunk %d: step %d", c, n, run=report.run_id, design=design,
                          chunk=c)

        def one_run(run_id: str) -> int:
            report = JobReport(run_id)
            holder.set(run_id)
            both_started.wait()  # both ids are set before either run logs: they overlap, for sure
            log_event(log, report, logging.INFO, "run started", run=run_id, design=design)
            for future in [submit(pool, chunk, report, c) for c in range(CHUNKS)]:
                future.result()
            log_event(log, report, logging.INFO, "run finished", run=run_id, design=design,
                      events=report.emitted + 1)  # this event included
            return report.emitted

        with ThreadPoolExecutor(2, thread_name_prefix="faillab-run") as runs:
            return sum(runs.map(one_run, scheduled(s, new_run_id(s, "run-A"), new_run_id(s, "run-B"))))


def run_after_a_task_that_set_it(s: Scenario, design: str, holder, submit) -> int:
    """One pool thread, two runs one after the other. Run A's task sets the run id itself (the
    workaround people reach for when the id does not arrive); then run B, whose id is set where it
    starts, hands the same thread its task. Returns the events emitted (each records its true run)."""
    sink = store_handler_queued(lambda: connect_log_store(s), None)
    run_a, run_b = (JobReport(run_id) for run_id in scheduled(s, new_run_id(s, "run-A"), new_run_id(s, "run-B")))
    with job_logger("correlation.leak", sink, correlation=holder) as log, \
            ThreadPoolExecutor(1, thread_name_prefix="faillab-pool") as pool:

        def task(report: JobReport, sets_id: bool) -> None:
            if sets_id:
                holder.set(report.run_id)
            for n in range(EVENTS_PER_CHUNK):
                log_event(log, report, logging.INFO, "task step %d", n, run=report.run_id, design=design)

        def start(report: JobReport, sets_id: bool) -> None:
            holder.set(report.run_id)
            submit(pool, task, report, sets_id).result()
            log_event(log, report, logging.INFO, "run finished", run=report.run_id, design=design,
                      events=report.emitted + 1)

        contextvars.copy_context().run(start, run_a, True)
        contextvars.copy_context().run(start, run_b, False)
    return run_a.emitted + run_b.emitted


def scheduled(s: Scenario, *run_ids: str) -> tuple[str, ...]:
    """The scheduler's record of the runs it starts (job_runs), which the log is checked against."""
    with s.conn.cursor() as cur:
        cur.executemany("INSERT INTO job_runs (run_id) VALUES (%s)", [(r,) for r in run_ids])
    s.conn.commit()
    return run_ids


def rows_without_run_id(conn) -> list:
    """Naive check: log rows that carry no run id."""
    return db.rows(conn, """
        SELECT '(no run id)', count(*) FROM pipeline_log
        WHERE correlation_id IS NULL HAVING count(*) > 0""")


def runs_whose_story_breaks(conn) -> list:
    """Every run the scheduler started whose rows in the log differ
    from the count its 'run finished' event announced (rows missing,
    or another run's rows), skipping acknowledged runs; then the rows
    that belong to no run the scheduler knows."""
    return db.rows(conn, """
        WITH story AS (
            SELECT r.run_id, count(l.id) AS stored,
                   max((l.fields->>'events')::int) FILTER (
                       WHERE l.message = 'run finished') AS announced
            FROM job_runs r
            LEFT JOIN pipeline_log l ON l.correlation_id = r.run_id
            WHERE NOT r.acknowledged
            GROUP BY r.run_id)
        SELECT run_id, stored, announced FROM story
        WHERE stored IS DISTINCT FROM announced
        UNION ALL
        SELECT '(no run id)', count(*), NULL FROM pipeline_log l
        WHERE NOT EXISTS (SELECT FROM job_runs r
                          WHERE r.run_id = l.correlation_id)
        HAVING count(*) > 0""")


MISLABELLED = """
    SELECT fields->>'design' AS design, count(*) AS rows,
           count(*) FILTER (WHERE correlation_id IS NULL) AS no_run_id,
           count(*) FILTER (WHERE correlation_id <> fields->>'run')
               AS other_runs_id
    FROM pipeline_log GROUP BY 1 ORDER BY min(id)"""

ONE_RUN_STORY = """
    SELECT to_char(logged_at, 'HH24:MI:SS.MS') AS at, level, message,
           fields->>'chunk' AS chunk
    FROM pipeline_log WHERE correlation_id = %s
    ORDER BY logged_at, id"""

CORRELATION_FIXES = [
    fix("find_broken_stories", naive=rows_without_run_id, fixed=runs_whose_story_breaks,
        contract="""
            The scheduled check: return one row per problem it finds in the log store (an empty
            list when all is well), the run id first. job_runs (run_id, acknowledged) lists every
            run the scheduler started; each run's last event, message 'run finished', announces
            in fields->>'events' how many events the run emitted, itself included.
            It must find: every run whose rows in pipeline_log are missing or not all its own
            (other runs' rows carry its id), unless acknowledged, and the rows no known run can
            claim (no run id). The grader runs it on the broken log, where it must name every
            damaged run, and after the fix, where it must find nothing.""",
        hints=("""
            A row with no run id is easy to find. But which damage leaves every row with an id?
            Compare each run's rows with what the run itself says it emitted.""", """
            Start from job_runs (a run with no rows at all must show up: LEFT JOIN pipeline_log),
            GROUP BY the run and compare count(l.id) with the 'run finished' event's events
            field; add the rows whose correlation_id matches no run (UNION ALL).""")),
    fix("run_id_holder", naive=run_id_holder_thread_local, fixed=run_id_holder_contextvar,
        contract="""
            Return the object that holds the current run's id: the job calls .set(run_id) where
            a run starts, and a logging.Filter calls .get() in whatever thread logs, including
            the pool threads that run the run's tasks (submitted with submit_task).
            It must guarantee: two runs that overlap in one process, sharing one thread pool,
            each see only their own id; a value set inside a task never reaches another run.
            The grader runs two overlapping runs on a shared pool, then two runs one after the
            other on a single pool thread, and checks that every stored row carries the id of the
            run that logged it (each event also records its true run).""",
        hints=("""
            A global is one value per process, a threading.local one per thread; neither follows
            a run into a pool thread. Which standard module is about values per context?""", """
            contextvars.ContextVar has .set() and .get(); declare it once at module level (the
            lesson's CORRELATION_ID is one) and return it.""")),
    fix("submit_task", naive=submit_plain, fixed=submit_in_context,
        contract="""
            Submit fn(*args) to the ThreadPoolExecutor `pool` and return its Future, so that the
            task sees the submitter's run id (held in a ContextVar) and whatever the task sets
            stays with the task.
            It must guarantee: every event a task logs carries the id of the run that submitted
            it, whichever pool thread runs it and whatever an earlier task of that thread set.
            The grader checks every row of two overlapping runs on a shared pool, and of a run
            whose task follows, on the same pool thread, a task that set another run's id.""",
        hints=("""
            pool.submit runs fn in the worker thread's own context: the submitter's ContextVar
            values are not there, and one task's values stay for the next. What can carry a
            context across?""", """
            contextvars.copy_context() takes a copy of the caller's context; submit its .run
            with fn and args: pool.submit(contextvars.copy_context().run, fn, *args).""")),
]


@scenario("correlation", "Overlapping runs: log rows lose their run id or carry the other run's",
          fixes=CORRELATION_FIXES)
def correlation(s: Scenario):
    s.description(f"""
        A run sets its correlation id where it starts, then fans {CHUNKS} chunks out to a shared
        ThreadPoolExecutor; every event ({RUN_EVENTS} a run) gets the id from a
        logging.Filter. Two runs overlap, as when a retry starts before the slow run ends.
        Wanted: every row in pipeline_log carries its own run's id, so one query tells one run's story.""")
    create_log_store(s)
    with s.conn.cursor() as cur:
        cur.execute("CREATE TABLE job_runs (run_id text PRIMARY KEY, "
                    "acknowledged boolean NOT NULL DEFAULT false)")
    s.conn.commit()
    s.trigger("""
        Run the two overlapping runs three times, changing only where the id lives: a global variable,
        a threading.local, and a ContextVar with tasks submitted to the pool as they are. Then, with
        the ContextVar, run A's task sets the id itself on a single pool thread, and run B's task
        follows on that thread. Each event also records its true run, so a query can tell right
        from wrong.""")
    emitted = {design: run_overlapping(s, design, holder, submit_plain) for design, holder in
               [("global variable", GlobalRunId()), ("threading.local", ThreadLocalRunId()),
                ("ContextVar, plain submit", CORRELATION_ID)]}
    leak = "ContextVar, set in a task"
    emitted[leak] = run_after_a_task_that_set_it(s, leak, CORRELATION_ID, submit_plain)
    counts = {design: rest for design, *rest in db.rows(s.conn, MISLABELLED)}
    totals = [sum(emitted.values())] + [sum(counts[d][k] for d in emitted) for k in range(3)]
    s.table(["design", "emitted", "rows", "no run id", "other run's id"],
            [[d, emitted[d], *counts[d]] for d in emitted] + [["total", *totals]])
    global_rows, _, global_wrong = counts["global variable"]
    local_rows, local_missing, _ = counts["threading.local"]
    plain_rows, plain_missing, plain_wrong = counts["ContextVar, plain submit"]
    leak_rows, _, leaked = counts[leak]
    s.measure("global_other_runs_id", global_wrong, show=False)
    s.measure("thread_local_no_run_id", local_missing, show=False)
    s.measure("contextvar_plain_no_run_id", plain_missing, show=False)
    s.measure("contextvar_leaked_other_runs_id", leaked, show=False)
    all_emitted, all_rows, no_run_id, others_id = totals
    s.measure("emitted_before", all_emitted, show=False)
    lost = s.measure("lost_before", no_run_id + others_id, show=False)
    in_pool = 2 * (RUN_EVENTS - 2)  # both runs' events logged in pool threads
    s.triggered_if(global_wrong == global_rows // 2 > 0,
                   f"global variable: {global_wrong} of {global_rows} rows carry the other run's id (a whole run's)")
    s.triggered_if(local_missing == in_pool,
                   f"threading.local: {local_missing} of {local_rows} rows have no run id at all (each one a "
                   "pool thread logged)")
    if not threads_inherit_context():  # 3.14+ can give a new thread its starter's context
        s.triggered_if([plain_missing, plain_wrong] == [in_pool, 0],
                       f"ContextVar, plain submit: {plain_missing} of {plain_rows} rows have no run id "
                       "(each one a pool thread logged)")
    s.triggered_if(leaked == EVENTS_PER_CHUNK,
                   f"set inside a task: all {leaked} of run B's task events carry run A's id (of {leak_rows} rows)")
    [(rows, wrong)] = db.rows(s.conn, "SELECT count(*), count(*) FILTER (WHERE correlation_id "
                                      "IS DISTINCT FROM fields->>'run') FROM pipeline_log")
    s.triggered_if(all_rows == all_emitted == rows,
                   f"the sink lost nothing: {all_rows} rows stored of {all_emitted} events emitted")
    s.triggered_if(lost == wrong, f"in all, {lost} of the {rows} rows do not carry their own run's id "
                                  "(the total row; no run id, or another's)")

    s.root_cause("""
        A global holds one value for the whole process: the run that starts last relabels the other
        run's events. A threading.local holds one value per thread: the pool's worker threads never
        set it, so their events carry none. Even a ContextVar is not enough on its own: pool.submit
        runs each task in the worker thread's own context, not the submitter's, and every task that
        thread runs shares it: it starts without a run id, and a value one task sets stays there for
        the next task, whichever run submitted it (the last row). contextvars.copy_context().run gives
        each task a copy of the submitter's context, thrown away when the task ends. (asyncio tasks
        and asyncio.to_thread copy the context; loop.run_in_executor and pool.submit do not.)""",
                 detect=s.fix("find_broken_stories"), runbook="""
        Broken run stories: a run's rows in the log are missing or carry another run's id, so no
        query tells that run's story. First response: the correlation id is not reaching every
        thread (check how work is submitted to pools); acknowledge the damaged runs as a known
        gap, and move the rows no run can claim aside, so the check watches new runs again.""")
    flagged = {row[0] for row in s.fix("find_broken_stories")(s.conn)}
    with s.step("Acknowledge the runs the check named (a known gap), and move the rows no run "
                "can claim to pipeline_log_orphans") as st:
        with s.conn.cursor() as cur:
            cur.execute("UPDATE job_runs SET acknowledged = true WHERE run_id = ANY(%s)",
                        (sorted(flagged),))
            acknowledged = cur.rowcount
            cur.execute("""
                CREATE TABLE pipeline_log_orphans (LIKE pipeline_log);
                WITH moved AS (DELETE FROM pipeline_log l WHERE NOT EXISTS
                    (SELECT FROM job_runs r WHERE r.run_id = l.correlation_id) RETURNING l.*)
                INSERT INTO pipeline_log_orphans SELECT * FROM moved""")
            orphans = cur.rowcount
        s.conn.commit()
        st.result = f"{acknowledged} runs acknowledged, {orphans} rows moved"
    s.recovered_if([acknowledged, orphans] == [len(flagged - {"(no run id)"}), no_run_id],
                   f"{acknowledged} runs acknowledged, each one the check named; {orphans} rows moved, "
                   "the rows with no run id")
    unseen = db.rows(s.conn, """
        SELECT DISTINCT l.fields->>'run'
        FROM (SELECT * FROM pipeline_log UNION ALL SELECT * FROM pipeline_log_orphans) l
        JOIN job_runs r ON r.run_id = l.fields->>'run' AND NOT r.acknowledged
        WHERE l.correlation_id IS DISTINCT FROM l.fields->>'run'""")
    s.recovered_if(not unseen, "every run whose story broke was named by the check and acknowledged "
                               "(by each event's true run, which the lab records)")

    fixed, fixed_leak = "fixed, overlapping", "fixed, one pool thread"
    holder, submit = s.fix("run_id_holder")(), s.fix("submit_task")
    with s.step("The fixed holder and submit (Prevention shows them): the two overlapping runs, "
                "then the two runs on one pool thread") as st:
        fixed_emitted = run_overlapping(s, fixed, holder, submit)
        leak_emitted = run_after_a_task_that_set_it(s, fixed_leak, holder, submit)
        logged = fixed_emitted + leak_emitted
        st.result = f"{logged} events logged"
    per_run = db.rows(s.conn, """
        SELECT fields->>'design', fields->>'run', count(*), count(*) FILTER (WHERE correlation_id = fields->>'run')
        FROM pipeline_log WHERE fields->>'design' IN (%s, %s) GROUP BY 1, 2 ORDER BY min(id)""", (fixed, fixed_leak))
    s.table(["design", "run", "rows", "carrying their own run id"], per_run)
    own = sum(mine for design, _, _, mine in per_run if design == fixed)
    leak_own = sum(mine for design, _, _, mine in per_run if design == fixed_leak)
    s.measure("emitted_after", fixed_emitted, show=False)
    s.measure("stored_after", own, show=False)
    lost_after = s.measure("lost_after", fixed_emitted - own, show=False)
    leaked_after = s.measure("leaked_after", leak_emitted - leak_own, show=False)
    s.recovered_if(Counter(design for design, *_ in per_run) == {fixed: 2, fixed_leak: 2} and lost_after == 0,
                   f"overlapping runs: {own} of {fixed_emitted} rows carry their own run's id")
    s.recovered_if(leaked_after == 0 and leak_emitted == 2 * (EVENTS_PER_CHUNK + 1),  # and a "run finished" each
                   f"one pool thread: {leak_own} of {leak_emitted} rows carry their own run's id; "
                   "nothing a task set reached the next run")
    s.recovered_if(sum(n for *_, n, _ in per_run) == logged, f"each of the {logged} events is one row, no more")

    story = db.rows(s.conn, ONE_RUN_STORY, (per_run[0][1],))
    s.recovered_if(len(story) == RUN_EVENTS,
                   f"one query tells one run's whole story: {len(story)} rows, each event of the run")
    s.say("The operator's query for that story (first and last rows shown):")
    s.code(ONE_RUN_STORY.replace("%s", f"'{per_run[0][1]}'"))
    s.table(["at", "level", "message", "chunk"], [[at, level, msg, words(c)] for at, level, msg, c in
                                                  story[:3] + story[-2:]])
    s.prevention("""
        Keep the run id in a ContextVar, set it where the run starts, let a Filter on the logger copy it
        into every record (so it runs in the thread that logs, even in front of a QueueHandler), and
        submit pool work through contextvars.copy_context().run.""", CorrelationFilter,
                 lesson="Keep the run id in a ContextVar and run every pool task in a copy of its "
                        "submitter's context.",
                 questions=("Under each naive design, which rows would the query for run A's story miss?",
                            "Why does setting the id inside the task not fix it, and what does it break?",
                            "Which APIs copy the context for you, and which do not?"))


# == 3. volume ======================================================================================
STORM_RECORDS = 1_250    # records in the error storm, 4 in 5 of them bad (1,000 errors)
KEEP_PER_ERROR = 3       # full samples (with traceback) kept per distinct error
STORM_STALL_S = STALL_S  # in the fixed run the store also stalls, from the first record


BAD_RECORD = (ValueError, KeyError, ZeroDivisionError)  # the three ways a record is bad


def parse_amount(i: int) -> float:
    """The step that fails in the storm: 4 records in 5 are bad, in three different ways."""
    if i % 5 == 0:
        return i * 7919 % 10_000 / 100
    if i % 5 in (1, 2):
        return float(f"{i}.00.0")      # ValueError: could not convert string to float
    if i % 5 == 3:
        return {"amount": 1}["customer_id"]  # KeyError
    return i / (i % 5 - 4)             # ZeroDivisionError


def error_key(exc: BaseException) -> str:
    """What makes two errors 'the same': the type and the line that
    raised it, not the message (which carries the record id)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code if tb else None
    where = f"{Path(code.co_filename).name}:{tb.tb_lineno}" if tb else "?"
    return f"{type(exc).__name__} at {where}"


class ErrorStormFilter(logging.Filter):
    """On the logger, so in the job's thread, before any formatting: the
    first `keep` records of each distinct error pass with their
    traceback; the rest are only counted, and drain() hands out one
    summary per error. At most `max_distinct` errors are tracked (a cap
    on memory); beyond it, new errors share one bucket."""
    OVER_CAP = "other errors (over the cap)"

    def __init__(self, keep: int = KEEP_PER_ERROR, max_distinct=50):
        super().__init__()
        self.keep, self.max_distinct = keep, max_distinct
        self.seen: Counter = Counter()
        self.lock = threading.Lock()

    def filter(self, record):
        if not record.exc_info:
            return True
        key = error_key(record.exc_info[1])
        with self.lock:
            full = len(self.seen) >= self.max_distinct
            if key not in self.seen and full:
                key = self.OVER_CAP
            self.seen[key] += 1
            count = self.seen[key]
        fields = getattr(record, "fields", {})
        record.fields = {**fields, "error_key": key}
        return count <= self.keep

    def drain(self) -> list[tuple[str, int]]:
        """(error, records suppressed) per error over `keep`; the window
        starts again."""
        with self.lock:
            out = [(k, n - self.keep) for k, n in self.seen.items()
                   if n > self.keep]
            self.seen.clear()
        return out


class KeepEveryRecord(logging.Filter):
    """Naive: no storm filter; every error passes with its traceback."""

    def drain(self) -> list[tuple[str, int]]:
        return []  # nothing was suppressed


def storm_filter_none(keep: int) -> logging.Filter:
    """Naive: every error record is stored, traceback and all."""
    return KeepEveryRecord()


def storm_filter_sampling(keep: int) -> logging.Filter:
    """Fixed: `keep` samples per distinct error, the rest counted."""
    return ErrorStormFilter(keep=keep)


def run_storm(log, report: JobReport, storm) -> None:
    """The error storm: every bad record is logged as an ERROR with its full traceback; the storm
    filter's summaries are logged at the end (production: every minute, and at shutdown)."""
    with running(report):
        for i in range(1, STORM_RECORDS + 1):
            try:
                parse_amount(i)
            except BAD_RECORD as exc:
                report.errors[error_key(exc)] += 1
                log_event(log, report, logging.ERROR, "record %d rejected", i, exc_info=exc, record=i)
            report.records_done = i
        for key, suppressed in storm.drain():
            log_event(log, report, logging.WARNING, "same error x %s suppressed", f"{suppressed:,}",
                      error_key=key, suppressed=suppressed)


def export_errors(s: Scenario, job: str, run_id: str) -> None:
    """A SQL exporter's view of one run in the log store: rows that carry a traceback, and how
    many distinct errors they are about."""
    [(rows, distinct)] = db.rows(s.conn, """
        SELECT count(*), count(DISTINCT fields->'exception'->>'type')
        FROM pipeline_log WHERE correlation_id = %s AND fields ? 'exception'""", (run_id,))
    s.gauge("pipeline_log_error_rows", "Log rows with a traceback, per run", ["job"]).labels(job).set(rows)
    s.gauge("pipeline_log_distinct_errors", "Distinct errors among them", ["job"]).labels(job).set(distinct)


def error_flood(values: dict) -> list:
    """The alert LogErrorFlood: more than 10 traceback rows per distinct error."""
    rows, errors = total(values, "pipeline_log_error_rows"), total(values, "pipeline_log_distinct_errors")
    return [(f"{int(rows)} traceback rows", f"{int(errors)} distinct errors")] if rows > 10 * errors else []


LOG_ERROR_FLOOD = metric_alert("LogErrorFlood", error_flood)


def redundant_rows(conn, run_id: str, keep: int = KEEP_PER_ERROR) -> int:
    """Traceback rows of one run beyond the first `keep` of their error type: the flood."""
    return int(db.scalar(conn, """
        SELECT coalesce(sum(n - %s), 0) FROM (
            SELECT count(*) AS n FROM pipeline_log WHERE correlation_id = %s AND fields ? 'exception'
            GROUP BY fields->'exception'->>'type') per_error
        WHERE n > %s""", (keep, run_id, keep)))


VOLUME_FIXES = [
    STORE_HANDLER,
    fix("storm_filter", naive=storm_filter_none, fixed=storm_filter_sampling,
        contract=f"""
            Return a logging.Filter for the job's logger, with a method drain() that returns a
            list of (error, records suppressed) pairs and starts counting again. Errors are
            records with exc_info; use error_key(exc) to tell them apart (type and raising line).
            It must guarantee: each distinct error is on record with its true count: at most
            `keep` rows with a traceback per distinct error, plus one summary per error from
            drain() for the rest; records without exc_info always pass.
            The grader runs a storm of {STORM_RECORDS:,} records, 4 in 5 bad in three ways, and checks
            the bytes stored (a tenth of the naive design's at most), that no traceback row is
            redundant, and each error's kept + suppressed against its true count.""",
        hints=("""
            The first few copies of an error are evidence; the next thousand are noise, but their
            number is not. Count per error_key, let the first `keep` through.""", """
            filter() returns True for records without exc_info; for errors, count per
            error_key(record.exc_info[1]) and return count <= keep; drain() returns (key,
            count - keep) for every key over keep, then clears the counts (see ErrorStormFilter).""")),
]


@scenario("volume", "An error storm floods the log store and slows the job", fixes=VOLUME_FIXES)
def volume(s: Scenario):
    s.description(f"""
        A feed of {STORM_RECORDS:,} records arrives where 4 in 5 are bad, in three ways. The job logs
        each rejected record as an ERROR with its full traceback, through a handler that inserts one
        row and commits, in the job's thread. Wanted: the job's speed does not depend on its error
        rate or on the store's, and each distinct error is on record with its true count.""")
    create_log_store(s)
    s.trigger("""
        Run the storm twice: logging to nowhere (the baseline), then naive. The lab's log
        connections use synchronous_commit=off, as log stores often do, so what is timed is the
        design, not this machine's disk; a lab cursor counts the INSERT statements.""")
    baseline = JobReport(new_run_id(s, "nolog"))
    with job_logger("volume.nolog", logging.NullHandler()) as log:
        run_storm(log, baseline, KeepEveryRecord())
    naive, naive_statements = JobReport(new_run_id(s, "naive")), Counter()
    with job_logger("volume.naive", DatabaseHandler(lambda: connect_log_store(s, statements=naive_statements))) as log:
        run_storm(log, naive, KeepEveryRecord())
    naive_rows, _, naive_bytes = run_totals(s.conn, naive.run_id)
    bad = sum(naive.errors.values())
    redundant = s.measure("redundant_rows_before", redundant_rows(s.conn, naive.run_id), show=False)
    share = (naive.seconds - baseline.seconds) / naive.seconds
    s.measure("nolog_job_seconds", round(baseline.seconds, 3), show=False)
    s.measure("naive_job_seconds", round(naive.seconds, 3), show=False)
    s.measure("naive_rows", naive_rows, show=False)
    s.measure("naive_insert_statements", naive_statements["INSERT"], show=False)
    s.measure("naive_bytes", naive_bytes, show=False)
    pct = s.measure("naive_logging_share_pct", round(100 * share, 1), show=False)
    kinds = sorted({key.split(" at ")[0] for key in naive.errors})
    s.triggered_if([bad, kinds] == [STORM_RECORDS * 4 // 5, sorted(e.__name__ for e in BAD_RECORD)],
                   f"the feed's {bad:,} bad records (4 in 5) failed in {len(kinds)} ways: {', '.join(kinds)}")
    s.triggered_if(naive_rows == bad == naive_statements["INSERT"],
                   f"{bad:,} bad records wrote {naive_rows:,} rows in {naive_statements['INSERT']:,} INSERTs, "
                   f"each row with a full traceback, for {len(naive.errors)} distinct errors")
    s.triggered_if(redundant == bad - KEEP_PER_ERROR * len(naive.errors) > 0,
                   f"{redundant:,} of those rows repeat an error already on record (all but the first "
                   f"{KEEP_PER_ERROR} of each)")
    spent = 100 * (1 - baseline.seconds / naive.seconds)  # the share the two printed times give
    s.triggered_if(50 < pct <= 100 and abs(pct - spent) < 0.06,  # pct: rounded to 0.1
                   f"the job spent {pct:.0f}% of its time logging "
                   f"({naive.seconds:.2f} s vs {baseline.seconds:.3f} s without logging)")

    export_errors(s, "volume.naive", naive.run_id)
    s.root_cause("""
        Logging cost is per record: format a traceback, a round trip for the INSERT, another for the
        COMMIT, all in the job's thread. In an error storm that cost multiplies by the error count, so
        the job is slowest exactly when it is already in trouble (and stops dead when the store
        stalls), and the store fills with hundreds of copies of the same three errors, burying the
        one new error an operator needs to see.""", detect=LOG_ERROR_FLOOD, runbook="""
        LogErrorFlood: a run stored more than 10 traceback rows per distinct error. First response:
        the job is failing on bad input, and its logging is likely slowing it: look at the few
        distinct errors (one sample each), fix or quarantine the input, and check the store's size.""")

    fixed, statements = JobReport(new_run_id(s, "fixed")), Counter()
    with s.step(f"Same storm with the fixed handler and storm filter (Prevention shows them), and a harder "
                f"store: it stalls for {STORM_STALL_S:g} s from the first record (a lock)") as st:
        storm = s.fix("storm_filter")(KEEP_PER_ERROR)
        stall = stall_store(s, STORM_STALL_S)
        handler = s.fix("store_handler")(lambda: connect_log_store(s, statements=statements), None)

        def job_and_its_logging():
            with job_logger("volume.fixed", handler, filters=[storm]) as log:
                run_storm(log, fixed, storm)

        try:
            within_call_limit(s, job_and_its_logging)()
        except TimeLimitExceeded as exc:
            s.observe(exc, note="The job and its logging did not end within the time limit:")
        all_stored = time.monotonic() - stall.locked_at  # from the store's stall on
        stall.wait()
        fixed_rows, _, fixed_bytes = run_totals(s.conn, fixed.run_id)
        inserts = statements["INSERT"]
        st.result = f"everything stored after {all_stored:.2f} s"
    waited = s.measure("stall_insert_waited_s", round(stall.insert_waited_s, 3), show=False)
    s.recovered_if(stall.waiting >= 1 and waited >= STORM_STALL_S,
                   f"the stall landed: an INSERT waited {waited:.2f} s at the statement (the "
                   f"server's pg_stat_activity), the whole {STORM_STALL_S:g} s stall")
    slowest_ms, bound_ms = 1000 * fixed.slowest_log_s, 1000 * STORM_STALL_S / 4  # as printed: what is compared
    s.table(["design", "job time", "slowest call", "rows", "INSERTs", "bytes"],
            [["naive (no stall)", f"{naive.seconds:.3f} s", f"{1000 * naive.slowest_log_s:.1f} ms",
              f"{naive_rows:,}", f"{naive_statements['INSERT']:,}", f"{naive_bytes:,}"],
             [f"fixed ({STORM_STALL_S:g} s stall)", f"{fixed.seconds:.3f} s", f"{slowest_ms:.1f} ms",
              f"{fixed_rows:,}", f"{inserts:,}", f"{fixed_bytes:,}"]])
    recorded = db.rows(s.conn, """
        SELECT fields->>'error_key', count(*) FILTER (WHERE fields ? 'exception'),
               coalesce(sum((fields->>'suppressed')::int), 0)
        FROM pipeline_log WHERE correlation_id = %s AND fields ? 'error_key' GROUP BY 1 ORDER BY 1""",
                       (fixed.run_id,))
    on_record = {k: kept + sup for k, kept, sup in recorded}
    s.table(["distinct error", "true count", "rows with traceback", "suppressed", "on record"],
            [[k, fixed.errors[k], kept, sup, on_record[k]] for k, kept, sup in recorded])
    summaries = db.scalar(s.conn, "SELECT count(*) FROM pipeline_log WHERE correlation_id = %s "
                          "AND fields ? 'suppressed'", (fixed.run_id,))
    samples = sum(kept for _, kept, _ in recorded)
    s.recovered_if([fixed_rows, samples, summaries] == [samples + summaries, KEEP_PER_ERROR * len(fixed.errors),
                                                        len(fixed.errors)],
                   f"the fixed run's {fixed_rows} rows: {samples} with a traceback ({KEEP_PER_ERROR} per error) "
                   f'+ {summaries} summaries ("same error x N suppressed"), one per error')
    miscounted = sum(on_record.get(k) != n for k, n in fixed.errors.items())
    s.measure("fixed_job_seconds", round(fixed.seconds, 3), show=False)
    s.measure("fixed_slowest_log_s", round(fixed.slowest_log_s, 4), show=False)
    s.measure("fixed_all_stored_seconds", round(all_stored, 3), show=False)
    s.measure("fixed_rows", fixed_rows, show=False)
    s.measure("fixed_insert_statements", inserts, show=False)
    s.measure("fixed_bytes", fixed_bytes, show=False)
    s.measure("stall_waiting_sessions", stall.waiting, show=False)
    s.measure("errors_miscounted_after", miscounted, show=False)
    redundant_after = s.measure("redundant_rows_after", redundant_rows(s.conn, fixed.run_id), show=False)
    export_errors(s, "volume.fixed", fixed.run_id)
    s.recovered_if(slowest_ms < bound_ms,
                   f"the stalled store did not hold the job up: the job's slowest logging call "
                   f"({slowest_ms:.1f} ms) stayed under {bound_ms:.0f} ms")
    s.recovered_if(fixed.seconds < naive.seconds,
                   "the job ran faster than the naive one, stall and all")
    s.recovered_if(inserts * 3 <= fixed_rows,
                   "batched: 3 rows or more per INSERT (what queued during the stall went in one)")
    s.recovered_if(fixed_bytes * 10 < naive_bytes and redundant_after == 0,
                   "under a tenth of the naive design's bytes; no redundant traceback row")
    s.recovered_if(len(recorded) == len(fixed.errors) and miscounted == 0,
                   f"all {len(fixed.errors)} distinct errors on record, each with its true count")

    s.prevention("""
        Keep the job's logging cost constant: hand records to a QueueHandler, write them in batches from
        a listener thread (the store_handler of the storage lesson), and let a filter on the logger keep
        a few samples of each distinct error (by type and raising line) and count the rest, published as
        one summary per window.""", ErrorStormFilter,
                 lesson="An error storm must cost neither the job's time nor the store's space: queue, batch, "
                        "and keep a few samples of each distinct error with its true count.",
                 questions=("How would a fourth, new error stand out in this store, and in the naive one?",
                            "What is lost when 997 copies of an error are only counted?",
                            "What decides the size of a batch here, and when it is written?"))


# == 4. structured_parsing ==========================================================================
FEED_EVENTS = 350        # events written to a JSON Lines file
# What real feeds put in a log line, one kind every 10th event.
TRICKY = [
    ("quote", 'customer "ACME" renamed', {}),
    ("newline", "address rejected:\n12 Main St", {}),
    ("backslash", r"file C:\data\in.csv read", {}),
    ("traceback", "row rejected", {}),  # logged with a real exception
    ("nan", "ratio computed", {"ratio": float("nan")}),
    ("infinity", "rate computed", {"rate": float("inf")}),
    ("nul", "vendor code read", {"code": "AB\x00"}),  # a C string, NUL and all
    ("not_serializable", "amount parsed", {"amount": Decimal("12.50")}),
    ("unicode", "café, Zürich, 東京", {}),
]


def run_feed(log, report: JobReport) -> None:
    """A feed job whose events carry what real data carries (TRICKY, every 10th event)."""
    with running(report):
        for i in range(1, FEED_EVENTS + 1):
            plain = ("plain", f"record {i} parsed", {})
            kind, message, fields = TRICKY[(i // 10) % len(TRICKY)] if i % 10 == 0 else plain
            exc = None
            if kind == "traceback":
                try:
                    int(f"{i}x")
                except ValueError as caught:
                    exc = caught
            log_event(log, report, logging.ERROR if exc else logging.INFO, message, exc_info=exc,
                      kind=kind, record=i, **fields)


def event_fields(record: logging.LogRecord) -> dict:
    event_id = getattr(record, "event_id", None)
    return {**({"event_id": event_id} if event_id else {}), **getattr(record, "fields", {})}


def event_time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")


def traceback_text(exc_info) -> str:
    return "".join(traceback.format_exception(*exc_info)).rstrip("\n")


def format_event_concat(record: logging.LogRecord) -> str:
    """Naive: JSON assembled from strings. Quotes, backslashes and
    newlines of the message or the traceback are pasted in raw; the
    fields go through json.dumps with no fallback."""
    line = ('{"time": "' + event_time(record) + '", "level": "'
            + record.levelname + '", "logger": "' + record.name
            + '", "message": "' + record.getMessage()
            + '", "correlation_id": "'
            + str(getattr(record, "correlation_id", None))
            + '", "fields": ' + json.dumps(event_fields(record)))
    if record.exc_info:
        line += ', "traceback": "' + traceback_text(record.exc_info) + '"'
    return line + "}"


def format_event_json(record: logging.LogRecord) -> str:
    """Fixed: one JSON object per line, whatever the record holds."""
    try:
        fields = event_fields(record)
        if record.exc_info:
            etype, exc, _ = record.exc_info
            fields["exception"] = {
                "type": getattr(etype, "__name__", str(etype)),
                "message": str(exc),
                "traceback": traceback_text(record.exc_info)}
        run_id = getattr(record, "correlation_id", None)
        event = {"time": event_time(record), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage(),
                 "correlation_id": run_id, "fields": fields}
        # json_safe: NaN, infinities and NUL, which jsonb refuses, become
        # text; allow_nan=False is a tripwire in case one slips through
        return json.dumps(json_safe(event), default=json_fallback,
                          ensure_ascii=False, allow_nan=False)
    except Exception as exc:  # raising here would drop the record
        fields = {"format_error": f"{type(exc).__name__}: {exc}"}
        if getattr(record, "event_id", None) is not None:
            fields["event_id"] = str(record.event_id)
        run_id = getattr(record, "correlation_id", None)
        return json.dumps(json_safe({
            "time": event_time(record), "level": record.levelname,
            "logger": record.name, "message": str(record.msg),
            "correlation_id": None if run_id is None else str(run_id),
            "fields": fields}), ensure_ascii=False)


def json_safe(value):
    """What jsonb cannot hold, made text: NaN and infinities become
    strings, NUL (\\u0000 in JSON) becomes U+FFFD."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else (
            "Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_fallback(obj):
    """For what json cannot encode (Decimal, datetime, set, any object):
    text, never an exception."""
    if isinstance(obj, (set, frozenset)):
        return sorted(json_safe(str(x)) for x in obj)
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    try:
        return json_safe(str(obj))
    except Exception:
        return f"<unprintable {type(obj).__name__}>"


class JsonFormatter(logging.Formatter):
    """The formatter every handler of this lesson uses: format_event_json."""

    def format(self, record):
        return format_event_json(record)


class FunctionFormatter(logging.Formatter):
    """A Formatter whose format() is a function of the record (a fix slot). Once that function has
    overrun its time limit, every later record fails at once with the same error: a function that
    never returns costs one limit, not one per record."""

    def __init__(self, format_event):
        super().__init__()
        self.format_event, self.overran = format_event, None

    def format(self, record):
        if self.overran is not None:
            raise self.overran
        try:
            return self.format_event(record)
        except TimeLimitExceeded as exc:
            self.overran = exc
            raise


def read_lines_naive(path: Path) -> tuple[list, list]:
    """Naive: json.loads on every line; the first bad line stops the
    whole read. Returns the (line number, text) of every line."""
    with open(path, encoding="utf-8", newline="\n") as f:
        lines = [(n, line.rstrip("\n")) for n, line in enumerate(f, 1)]
    for _, text in lines:
        json.loads(text)
    return lines, []


def refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (PostgreSQL jsonb refuses it)")


def refuse_nul(value) -> None:
    """Raise ValueError if a string in the parsed value holds NUL."""
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("NUL (\\u0000) is not text (jsonb refuses it)")
    if isinstance(value, dict):
        for k, v in value.items():
            refuse_nul(k)
            refuse_nul(v)
    elif isinstance(value, list):
        for v in value:
            refuse_nul(v)


def read_lines_tolerant(path: Path) -> tuple[list, list]:
    """Fixed: each line is parsed on its own; a bad line is set aside
    with its number and the error, and the read goes on. It refuses
    what jsonb refuses too: NaN, Infinity and \\u0000."""
    good, quarantine = [], []
    with open(path, encoding="utf-8", errors="replace",
              newline="\n") as f:  # a lone \r is no line end
        for lineno, line in enumerate(f, 1):
            text = line.rstrip("\n")
            if not text.strip():
                continue
            try:
                parsed = json.loads(text, parse_constant=refuse_constant)
                refuse_nul(parsed)
                good.append((lineno, text))
            except ValueError as exc:  # JSONDecodeError is a ValueError
                quarantine.append((lineno, exc, text))
    return good, quarantine


def python_parses(path: Path) -> tuple[list[tuple[int, str]], list[int]]:
    """What Python's own json.loads accepts (NaN and Infinity included): (line, text) parsed and
    the numbers of the lines it cannot parse."""
    parsed, unparseable = [], []
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
                parsed.append((lineno, line.rstrip("\n")))
            except ValueError:
                unparseable.append(lineno)
    return parsed, unparseable


def load_lines(conn, lines: list[tuple[int, str]]) -> tuple[int, list[tuple[int, Exception]]]:
    """Load the lines in one INSERT; if jsonb refuses one, load them one by one instead, each in its
    own savepoint, so a refused line is set aside and the others still load."""
    stored, rejected = 0, []
    with conn.cursor() as cur:
        cur.execute("SAVEPOINT batch")
        try:
            stored = insert_events(cur, [text for _, text in lines]) if lines else 0
            lines = []  # all in: nothing left to do line by line
        except psycopg2.DataError:
            cur.execute("ROLLBACK TO SAVEPOINT batch")
        for lineno, text in lines:
            cur.execute("SAVEPOINT line")
            try:
                stored += insert_events(cur, [text])
                cur.execute("RELEASE SAVEPOINT line")
            except psycopg2.DataError as exc:
                cur.execute("ROLLBACK TO SAVEPOINT line")
                rejected.append((lineno, exc))
    conn.commit()
    return stored, rejected


def write_feed(s: Scenario, name: str, format_event) -> tuple[JobReport, Path, WatchedFile, str]:
    """Run the feed job into a JSON Lines file with this formatter; returns the job's report, the
    file, its handler (which counts what logging dropped) and what logging wrote to stderr."""
    report = JobReport(new_run_id(s, name))
    path = s.tmpdir / f"feed-{name}.jsonl"
    sink = WatchedFile(path, encoding="utf-8")
    sink.setFormatter(FunctionFormatter(format_event))
    sink.dropped_total = records_dropped(s, f"parsing.{name}", "format_failed")
    with contextlib.redirect_stderr(io.StringIO()) as stderr, job_logger(f"parsing.{name}", sink) as log:
        run_feed(log, report)
    if isinstance(sink.first_error, OSError):  # the file could not be written (a full disk): not the formatter
        raise sink.first_error
    return report, path, sink, stderr.getvalue()


PARSING_FIXES = [
    fix("format_event", naive=format_event_concat, fixed=format_event_json,
        contract="""
            Return one line of JSON (no newline in it) for the logging record: time
            (event_time(record)), level, logger, message (record.getMessage()), correlation_id and
            fields (event_fields(record): the event id and the event's own fields), plus the
            exception as a field when record.exc_info is set.
            It must guarantee: every record gives exactly one line that json.loads parses and
            PostgreSQL's jsonb accepts, whatever the message and fields hold (quotes, newlines,
            backslashes, tracebacks, NaN, Infinity, NUL, Decimal, unicode); it never raises
            (a formatter that raises inside a handler loses the record).
            The grader writes a feed of 350 events, every 10th a tricky one, reads it with the
            reader, loads it into jsonb, and checks: 100% of the lines parse, no record dropped,
            every event stored, and quotes, newlines, backslashes and unicode kept exactly.""",
        hints=("""
            Never build JSON by pasting strings. What does json.dumps do with a Decimal, with
            float('nan'), with '\\x00'? Try each, then try loading the result into jsonb.""", """
            Build a dict and json.dumps it once, with default=str (or json_fallback) for what JSON
            cannot encode; before that, turn NaN and infinities into strings and NUL into another
            character (json_safe does both); put the traceback in a field.""")),
    fix("read_lines", naive=read_lines_naive, fixed=read_lines_tolerant,
        contract="""
            Read a JSON Lines file and return (good, quarantine): good is a list of (line number,
            text) for the lines that can be loaded, quarantine a list of (line number, error,
            text) for the ones that cannot. Skip blank lines.
            It must guarantee: a bad line never stops the read; a line is good only if jsonb
            will accept it (jsonb refuses NaN, Infinity and the NUL character, which Python's
            json accepts).
            The grader reads a file with broken lines and checks that exactly the lines json.loads
            or jsonb refuse are quarantined, by number, and that every good line loads.""",
        hints=("""
            Parse each line on its own and catch the error. Then ask what Python accepts that
            PostgreSQL does not: json.loads('NaN') works.""", """
            json.loads(text, parse_constant=f) calls f for NaN and Infinity: raise ValueError
            there; then look for NUL in the parsed strings (refuse_nul).""")),
]




@scenario("structured_parsing", "JSON log lines that break their readers", fixes=PARSING_FIXES)
def structured_parsing(s: Scenario):
    s.description(f"""
        A feed job writes {FEED_EVENTS} structured events to a JSON Lines file; a loader reads the file
        and loads each event into pipeline_log, whose fields column is jsonb. Every 10th event carries
        what real data carries: {', '.join(kind for kind, _, _ in TRICKY)}.
        Wanted: every line parses, every event loads, and a bad line never stops the load.""")
    create_log_store(s)
    s.trigger("The formatter builds each line by concatenating strings, with json.dumps for the fields only.")
    naive, naive_file, sink, stderr = write_feed(s, "naive", format_event_concat)
    s.require(isinstance(sink.first_error, TypeError), "the naive formatter raised TypeError on some records")
    s.observe(sink.first_error, note="Writing: a Decimal in the fields, inside the formatter (the record is lost):")
    show_logging_errors(s, stderr)
    dropped = sink.failed
    s.triggered_if(set(sink.dropped_kinds) == {"not_serializable"},
                   f"the formatter lost only events holding a Decimal: {dropped} of them")
    with s.expect(json.JSONDecodeError, label="Reading: json.loads, at the first broken line,"):
        read_lines_naive(naive_file)
    parseable, unparseable = python_parses(naive_file)
    with s.expect(psycopg2.errors.InvalidTextRepresentation, sqlstate="22P02",
                  label="Loading: the batch INSERT (jsonb refuses NaN: 22P02)"):
        with s.conn.cursor() as cur:  # Loading: one INSERT for every line Python accepted
            insert_events(cur, [text for _, text in parseable])
    s.conn.rollback()
    stored_before, rejected = load_lines(s.conn, parseable)  # measured line by line
    records_dropped(s, "parsing.naive", "unparseable").inc(len(unparseable))
    records_dropped(s, "parsing.naive", "rejected_by_store").inc(len(rejected))
    untranslatable = [exc for _, exc in rejected if exc.pgcode == "22P05"]
    if untranslatable:
        s.observe(untranslatable[0], note="... and, line by line, the \\u0000 of a NUL (22P05):")
    by_state = Counter(exc.pgcode for _, exc in rejected)
    lines = len(parseable) + len(unparseable)
    s.table(["what", "count"], [["events emitted", naive.emitted],
                                ["lost in the formatter (TypeError)", dropped],
                                ["lines in the file", lines],
                                ["lines json.loads cannot parse", len(unparseable)],
                                ["lines jsonb rejects: NaN, Infinity (22P02)", by_state["22P02"]],
                                ["lines jsonb rejects: \\u0000 (22P05)", by_state["22P05"]],
                                ["events stored", stored_before]])
    s.measure("emitted_before", naive.emitted, show=False)
    s.measure("lost_in_formatter", dropped, show=False)
    s.measure("lines_unparseable_before", len(unparseable), show=False)
    s.measure("rows_rejected_before", len(rejected), show=False)
    s.measure("stored_before", stored_before, show=False)
    lost = s.measure("lost_before", naive.emitted - stored_before, show=False)
    s.triggered_if(lines > naive.emitted - dropped,
                   f"the file has {lines} lines for the {naive.emitted - dropped} events written: a "
                   "newline or a traceback breaks an event into several")
    s.triggered_if(stored_before == len(parseable) - sum(by_state.values()),
                   f"stored: the {stored_before} lines that both json.loads and jsonb accept")
    s.triggered_if(dropped > 0 and lost > 0 and unparseable
                   and by_state["22P02"] and by_state["22P05"],
                   f"{lost} of {naive.emitted} events never reached the store (emitted - stored)")
    in_store, _, _ = run_totals(s.conn, naive.run_id)
    s.triggered_if(naive.emitted - in_store == lost, f"the store holds {in_store} of the naive run's events: "
                                                     f"{lost} short, as the alert's gauges will say")
    text_of = dict(parseable)
    refused_kinds = {state: {json.loads(text_of[n])["fields"]["kind"] for n, exc in rejected if exc.pgcode == state}
                     for state in by_state}
    s.triggered_if(refused_kinds == {"22P02": {"nan", "infinity"}, "22P05": {"nul"}},
                   "jsonb refused exactly the NaN and Infinity events (22P02) and the NUL ones (22P05)")

    export_run(s, "parsing.naive", naive)
    s.root_cause("""
        JSON built by concatenation is only JSON while the text has no quote, backslash or newline; a
        message or a traceback breaks the line, and a multi-line traceback becomes several lines. Python's
        json.dumps raises TypeError on a Decimal or a datetime, inside the handler, so the record is
        dropped. And json.dumps writes NaN and Infinity by default, and a NUL as \\u0000, which Python
        reads back happily but PostgreSQL's jsonb refuses (22P02, 22P05): one such line fails a whole
        batch load.""",
                 detect=LOG_EVENTS_LOST, runbook="""
        LogEventsLost (the same alert as for a failing store): a run's events did not all reach the
        store. Here the store is healthy: look for '--- Logging error ---' on the job's stderr (the
        formatter dropped records) and for the loader's quarantined lines and rejects (22P02, 22P05).""")
    s.say("Which lines: the reader of the fix (read_lines, in Prevention) names each one by number, "
          "including what json.loads accepts and jsonb refuses.")

    read_lines = s.fix("read_lines")
    with s.step("Read the old file with the reader (Prevention shows it): quarantine bad lines with their "
                "numbers") as st:
        try:
            good_old, quarantine = read_lines(naive_file)
        except ValueError as exc:  # the naive reader: the first bad line stops it
            s.observe(exc, note="The reader stopped at a bad line:")
            good_old, quarantine = [], None
        if quarantine is not None:
            first_of_each = {}  # reason -> (line, the text around where the parser stopped)
            for n, exc, text in quarantine:
                at = getattr(exc, "pos", None)
                if at is None:
                    at = max(text.find(token) for token in ("NaN", "Infinity", "\\u0000"))
                first_of_each.setdefault(getattr(exc, "msg", str(exc)), (n, text[max(0, at - 18):at + 18]))
            s.table(["line", "reason", "text where it breaks"], [(n, why, at) for why, (n, at) in first_of_each.items()])
        _, rejected_old = load_lines(s.conn, good_old)  # the events are there already: ON CONFLICT skips them
        st.result = (f"{len(quarantine)} lines quarantined, {len(good_old)} passed; jsonb rejects "
                     f"{len(rejected_old)} of those" if quarantine is not None else "the read stopped")
    refused = set(unparseable) | {n for n, _ in rejected}
    s.recovered_if(quarantine is not None and {n for n, _, _ in quarantine} == refused,
                   f"the reader read past its bad lines and set aside exactly the {len(refused)} that "
                   "json.loads or jsonb refuse, by number")
    s.recovered_if(quarantine is not None and not rejected_old, "every line the reader passed loads into jsonb")
    s.recovered_if(len(good_old) + len(quarantine or []) == lines,
                   f"it read each of the {lines} lines once: {len(good_old)} passed + "
                   f"{len(quarantine or [])} quarantined")

    with s.step("Write the same feed with the fixed formatter (Prevention shows it)") as st:
        fixed, fixed_file, fixed_sink, _ = write_feed(s, "fixed", s.fix("format_event"))
        dropped_after = fixed_sink.failed
        st.result = f"{fixed.emitted} events, {dropped_after} dropped by logging"
    with s.step("Read it with the reader and load it into jsonb") as st:
        try:
            good, quarantine_after = read_lines(fixed_file)
        except ValueError as exc:
            s.observe(exc, note="The reader stopped at a bad line:")
            good, quarantine_after = [], [None]
        stored_after, rejected_after = load_lines(s.conn, good)
        records_dropped(s, "parsing.fixed", "unparseable").inc(len(quarantine_after))
        records_dropped(s, "parsing.fixed", "rejected_by_store").inc(len(rejected_after))
        st.result = (f"{len(good)} lines passed, {len(quarantine_after)} quarantined; {stored_after} loaded, "
                     f"{len(rejected_after)} rejected by jsonb")
    stored, distinct, _ = run_totals(s.conn, fixed.run_id)
    tricky = db.rows(s.conn, "SELECT fields->>'kind', message FROM pipeline_log WHERE correlation_id = %s "
                     "AND fields->>'kind' <> 'plain'", (fixed.run_id,))
    kept = dict(tricky)
    originals = {kind: message for kind, message, _ in TRICKY}
    s.measure("emitted_after", fixed.emitted, show=False)
    s.measure("dropped_after", dropped_after, show=False)
    s.measure("lines_unparseable_after", len(quarantine_after), show=False)
    s.measure("rows_rejected_after", len(rejected_after), show=False)
    s.measure("stored_after", stored, show=False)
    s.measure("lost_after", fixed.emitted - stored, show=False)
    export_run(s, "parsing.fixed", fixed)
    s.recovered_if(dropped_after == 0, "no record dropped by the formatter (no '--- Logging error ---')")
    s.recovered_if(len(good) == fixed.emitted and not quarantine_after,
                   f"100% of the {len(good)} lines parse, one event per line")
    s.recovered_if(stored_after == stored == distinct == fixed.emitted == FEED_EVENTS and not rejected_after,
                   f"all {stored} of {fixed.emitted} events loaded into jsonb")
    s.recovered_if(kept == originals, "quotes, newlines, backslashes and unicode survive the round trip exactly")
    s.recovered_if(len(tricky) == FEED_EVENTS // 10, f"... in all {len(tricky)} tricky events, every 10th")
    naive_file.unlink()
    fixed_file.unlink()

    s.prevention("""
        Build log lines with json.dumps only: default= for what JSON cannot encode, NaN, infinities and
        NUL made text first (json_safe), the exception as a field, one object per line. allow_nan=False
        never fires here, since json_safe already converted every non-finite float; it is a tripwire,
        and if it did fire, format() would raise inside the handler and logging would drop the record
        (handleError), the very loss this lesson is about: so the formatter catches any error and
        writes the event with a format_error field instead. Read with a tolerant reader that
        quarantines a bad line (and what jsonb would refuse) and goes on.""", json_safe, json_fallback, refuse_constant, refuse_nul,
                 lesson="Build log lines with json.dumps only, make what jsonb refuses text first, never let "
                        "the formatter raise, and read with a reader that quarantines bad lines and goes on.",
                 questions=("Python reads NaN back; PostgreSQL refuses it. Where else do two JSON readers "
                            "disagree?",
                            "Why must a formatter never raise, and what should it write instead?",
                            "What should happen to a quarantined line afterwards, and who is told?"))


# -- 5. lost_on_kill --------------------------------------------------------------------------------
KILL_BATCHES = 10        # the job's run: batches 1..10, each committed on its own
KILL_AFTER = 4           # the lab kills the job (SIGKILL, as the OOM killer does) after batch 4
CHECKS_PER_BATCH = 7     # diagnostic records the job logs per batch, before it commits
LOG_BUFFER = 10          # MemoryHandler capacity: records held in the process before a flush
KILL_SIGNAL = getattr(signal, "SIGKILL", signal.SIGTERM)  # as the OOM killer sends it
KILLED_BY_SIGKILL = -KILL_SIGNAL  # what the OS reports as the exit code


class Stamp(logging.Filter):
    """Every record of a run carries its run id and a sequence number (1, 2, 3...): a record
    that is lost leaves a gap, so the loss is measured, not guessed."""

    def __init__(self, run_id: str):
        super().__init__()
        self.run_id, self.seq = run_id, 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id, record.seq = self.run_id, self.next_seq()
        return True


INSERT_JOB_LOG = ("INSERT INTO job_log (run_id, seq, level, message, event, batch)"
                  " VALUES (%s, %s, %s, %s, %s, %s)")


class JobLogHandler(logging.Handler):
    """The log store: one row of job_log per record, over a connection of its own."""

    def __init__(self, conn):
        super().__init__()
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        with self.conn.cursor() as cur:
            cur.execute(INSERT_JOB_LOG, (record.run_id, record.seq, record.levelname, record.getMessage(),
                                         getattr(record, "event", None), getattr(record, "batch", None)))
        self.conn.commit()


def load_rows(cur, run_id: str, batch: int) -> None:
    cur.execute("INSERT INTO batches (run_id, batch) VALUES (%s, %s)", (run_id, batch))


def commit_batch_naive(conn, log, stamp, batch: int) -> None:
    """Naive: commit the batch, then log that it committed, through
    the same buffered handler as every other record."""
    with conn.cursor() as cur:
        load_rows(cur, stamp.run_id, batch)
    conn.commit()
    log.info("batch %s committed", batch,
             extra={"event": "batch_committed", "batch": batch})


def commit_batch_with_event(conn, log, stamp, batch: int) -> None:
    """Fixed: the event that proves the batch is a row of the batch's
    own transaction: committed with it or rolled back with it, never
    waiting in a buffer. Diagnostics stay buffered."""
    with conn.cursor() as cur:
        load_rows(cur, stamp.run_id, batch)
        cur.execute(INSERT_JOB_LOG, (
            stamp.run_id, stamp.next_seq(), "INFO",
            f"batch {batch} committed", "batch_committed", batch))
    conn.commit()


def batch_job(params: dict, run_id: str, commit_batch, report, go, pause_after: int) -> None:
    """The job, in a process of its own: per batch, CHECKS_PER_BATCH diagnostic records, then
    commit_batch. Its records go through a MemoryHandler (flushed every LOG_BUFFER records, or at
    ERROR). Lab instrumentation: after each batch it reports its last sequence number on `report`,
    and after `pause_after` it waits for `go` (the lab kills it there)."""
    conn, store = db.connect(params), db.connect(params)
    stamp = Stamp(run_id)
    log = logging.getLogger(f"{LOGGER_PREFIX}.lost_on_kill")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addFilter(stamp)
    log.addHandler(logging.handlers.MemoryHandler(LOG_BUFFER, logging.ERROR, JobLogHandler(store)))
    for batch in range(1, KILL_BATCHES + 1):
        for row in range(1, CHECKS_PER_BATCH + 1):
            log.info("batch %s: check %s passed", batch, row, extra={"batch": batch})
        commit_batch(conn, log, stamp, batch)
        report.send(("committed", batch, stamp.seq))
        if batch == pause_after:
            go.wait(60)
    logging.shutdown()


def record_log_gap(conn, run_id: str) -> tuple:
    """At the next start: count the sequence numbers a run never
    stored, below its last stored one, and keep the count where an
    operator looks (log_gaps)."""
    with conn.cursor() as cur:
        cur.execute("""
            INSERT INTO log_gaps
              (run_id, lost, first_missing, last_missing)
            SELECT %(run)s, count(*), min(n), max(n)
            FROM generate_series(1, (SELECT max(seq) FROM job_log
                                     WHERE run_id = %(run)s)) AS n
            WHERE NOT EXISTS (SELECT 1 FROM job_log
                              WHERE run_id = %(run)s AND seq = n)
            RETURNING lost, first_missing, last_missing""",
                    {"run": run_id})
        gap = cur.fetchone()
    conn.commit()
    return gap


def run_and_kill(s, run_id: str, commit_batch) -> dict:
    """Run the job in a process, kill it (SIGKILL) once batch KILL_AFTER has committed, and measure:
    the exit code the OS reports, what the job had emitted (its last report), what is stored."""
    ctx = multiprocessing.get_context("spawn")
    reports, report = ctx.Pipe(duplex=False)
    go = ctx.Event()
    proc = s.spawn(batch_job, s.params, run_id, commit_batch, report, go, KILL_AFTER)
    emitted, deadline = 0, time.monotonic() + 60
    while time.monotonic() < deadline and reports.poll(max(0.0, deadline - time.monotonic())):
        _, batch, emitted = reports.recv()
        if batch == KILL_AFTER:
            break
    if faults_enabled():
        proc.kill()  # SIGKILL: no handler, no flush, no atexit
    else:
        go.set()  # FAILLAB_NO_FAULTS: the job runs to its end
    proc.join(60)
    stored, committed = db.rows(s.conn, "SELECT (SELECT count(*) FROM job_log WHERE run_id = %(r)s), "
                                        "(SELECT count(*) FROM batches WHERE run_id = %(r)s)", {"r": run_id})[0]
    s.conn.commit()
    return {"exit": proc.exitcode, "emitted": emitted, "stored": stored, "committed": committed,
            "lost": emitted - stored}


EVENTS_MISSING = """
    SELECT b.batch FROM batches b
    WHERE b.run_id = {run}
      AND NOT EXISTS (SELECT 1 FROM job_log l
                      WHERE l.run_id = b.run_id AND l.batch = b.batch
                        AND l.event = 'batch_committed')
    ORDER BY b.batch"""
LAST_RUN = "(SELECT run_id FROM batches\n                      ORDER BY committed_at DESC LIMIT 1)"
BATCHES_WITHOUT_EVENT = sql_check("batches_without_event", sql.SQL(
    "\n    -- the last run's committed batches whose event is not in the log" + EVENTS_MISSING
).format(run=sql.SQL(LAST_RUN)))


def events_missing(conn, run_id: str) -> list[int]:
    """The batches of one run that committed without their event in job_log (the anti-join)."""
    found = [b for b, in db.rows(conn, sql.SQL(EVENTS_MISSING).format(run=sql.Literal(run_id)))]
    conn.commit()
    return found


LOST_ON_KILL_FIXES = [
    fix("commit_batch", naive=commit_batch_naive, fixed=commit_batch_with_event,
        contract="""
            Commit one batch (load_rows(cur, stamp.run_id, batch) inside a transaction on
            `conn`) and record its event: a row of job_log (INSERT_JOB_LOG: run_id, seq, level,
            message, event 'batch_committed', batch), whose seq is stamp.next_seq(). `log` is the
            job's logger: its records wait in a MemoryHandler of LOG_BUFFER records before they
            reach job_log. The job is killed (SIGKILL) right after a batch committed.
            The grader kills it after batch 4: every committed batch must have its event in
            job_log, and the records lost must show as a gap of sequence numbers.""",
        hints=("What happens to the records still in the MemoryHandler's buffer when the process\n"
               "is killed? Which record must never be among them?",
               "Write the event yourself, with cur.execute(INSERT_JOB_LOG, ...), in the batch's\n"
               "transaction, before the commit: then it commits with the batch or not at all.")),
]


@scenario("lost_on_kill", "A killed job takes its buffered log records with it", fixes=LOST_ON_KILL_FIXES)
def lost_on_kill(s: Scenario):
    s.description(f"""
        A job commits {KILL_BATCHES} batches; before each commit it logs {CHECKS_PER_BATCH} diagnostic records, and
        after it, the event "batch N committed", which the operators' dashboard reads to show
        progress. Records go through a logging.handlers.MemoryHandler that writes to the log
        store (job_log) every {LOG_BUFFER} records: one INSERT per record would slow the job. Every
        record carries the run id and a sequence number.""")
    with s.conn.cursor() as cur:
        cur.execute("CREATE TABLE batches (run_id text, batch int, committed_at timestamptz "
                    "DEFAULT clock_timestamp(), PRIMARY KEY (run_id, batch))")
        cur.execute("CREATE TABLE job_log (run_id text, seq int, level text, message text, event text, "
                    "batch int, PRIMARY KEY (run_id, seq))")
        cur.execute("CREATE TABLE log_gaps (run_id text PRIMARY KEY, lost int, first_missing int, "
                    "last_missing int, found_at timestamptz DEFAULT clock_timestamp())")
    s.conn.commit()

    s.trigger(f"""
        The job runs in a process of its own; once batch {KILL_AFTER} has committed, the lab kills it
        with SIGKILL, as the OOM killer does: no exception, no finally, no atexit, no flush.""")
    naive_run = new_run_id(s, "naive")
    r = run_and_kill(s, naive_run, commit_batch_naive)
    s.measure("naive_exit_code", r["exit"], show=False, note="the killed job's exit code, as the OS reports it")
    s.require(killed_by(r["exit"]) is KILL_SIGNAL, f"the kill landed: the OS reports exit code {r['exit']} "
                                                   f"(killed by signal {KILL_SIGNAL:d})")
    s.table(["run", "batches committed", "records emitted", "stored", "lost"],
            [[naive_run, r["committed"], r["emitted"], r["stored"], r["lost"]]])
    s.measure("naive_records_lost", r["lost"], show=False, headline=True,
              note="records the job emitted (its last sequence number) that job_log does not hold")
    missing = events_missing(s.conn, naive_run)
    gap = record_log_gap(s.conn, naive_run)
    s.triggered_if([r["committed"], r["emitted"]] == [KILL_AFTER, KILL_AFTER * (CHECKS_PER_BATCH + 1)],
                   f"the kill came after batch {KILL_AFTER}: {r['committed']} batches committed, "
                   f"{r['emitted']} records emitted")
    s.triggered_if(r["lost"] == r["emitted"] % LOG_BUFFER > 0,
                   f"{r['lost']} records died in the buffer with the process: all it held since its "
                   f"last flush (one every {LOG_BUFFER})")
    s.triggered_if(missing == [KILL_AFTER],
                   f"among them the event of committed batch {words(missing)}: the batch is in, its event is not")
    s.triggered_if(gap[0] == 0, f"the log shows no gap ({gap[0]} sequence numbers missing below the "
                                f"last stored one): the lost tail is invisible")

    s.root_cause(f"""
        A MemoryHandler (or a QueueHandler's queue) keeps records in the process until it flushes.
        SIGKILL ends the process at once: no logging.shutdown(), no atexit, no flush, so whatever
        the buffer held is gone, and those are the last records, the ones that tell what the job
        was doing when it died. The event "batch {KILL_AFTER} committed" was among them: the batch is in
        the database, the dashboard says it never happened. A buffer is fine for diagnostics; an
        event that proves progress must be as durable as the progress itself.""",
                 detect=BATCHES_WITHOUT_EVENT,
                 runbook="""Batches are committed but their events are missing from the log: the job was
                     probably killed with records in its buffer. Trust the batches table over the
                     log, check the kernel log for the OOM killer, and move progress events into
                     the batch's transaction.""")
    fixed_run = new_run_id(s, "fixed")
    with s.step("the same job and the same kill, with commit_batch() committing each batch") as st:
        r = run_and_kill(s, fixed_run, s.fix("commit_batch"))
        st.result = f"exit code {r['exit']}; {r['committed']} batches committed, {r['lost']} records lost"
    s.require(killed_by(r["exit"]) is KILL_SIGNAL, f"the kill landed again: exit code {r['exit']}")
    missing = events_missing(s.conn, fixed_run)
    s.recovered_if(r["committed"] == KILL_AFTER and not missing,
                   f"every committed batch has its event: {r['committed']} batches, "
                   f"{len(missing)} without one (the anti-join is empty)")
    with s.step("at the next start: record_log_gap() counts what the killed run never stored") as st:
        gap = record_log_gap(s.conn, fixed_run)
        st.result = f"log_gaps: {gap[0]} records lost, the last of them sequence number {words(gap[2])}"
    s.measure("fixed_records_lost", r["lost"], show=False, note="diagnostic records lost on the kill, with the fix")
    s.recovered_if(r["lost"] < LOG_BUFFER,
                   f"the loss is bounded by the buffer: {r['lost']} records lost, fewer than {LOG_BUFFER}")
    s.recovered_if(gap[0] == r["lost"],
                   f"the loss is counted where an operator sees it: log_gaps says {gap[0]}, the job "
                   f"emitted {r['emitted']} and job_log holds {r['stored']}")
    s.recovered_if(gap[2] == r["emitted"] - 1,
                   f"the gap ends at {words(gap[2])}, just below the last batch's event ({r['emitted']}), "
                   "which committed with its batch")

    s.prevention("""
        Sort what a job logs into what proves progress and what explains it. An event that says
        "batch committed" is data: write it in the batch's own transaction (or unbuffered, to a
        collector outside the process), so it exists exactly when the batch does. Diagnostics may
        wait in a buffer to keep the job fast; a kill then loses at most a buffer's worth, and
        sequence numbers make that loss a gap the next start counts.""",
        record_log_gap,
        lesson="A buffered log dies with its process: write the events that prove progress in "
               "the transaction they describe, and number the rest so a loss shows as a gap.",
        questions=(
            "Which of your job's log lines does someone read as proof that work was done?",
            "How many records can your logging hold in memory, and what would a SIGKILL take "
            "with it?",
            "How would you know that a log is missing its last records, and not just quiet?"))


# -- plumbing: dedicated loggers, run ids, captured stderr -----------------------------------------------
LOGGER_PREFIX = "faillab.logging_failure"


@contextlib.contextmanager
def job_logger(name: str, *handlers: logging.Handler, correlation=CORRELATION_ID, filters=()):
    """A dedicated logger (never the root; propagate=False) with these handlers, the correlation
    filter and `filters`. On exit every filter and handler is removed and each handler closed, so
    nothing outlives the run."""
    log = logging.getLogger(f"{LOGGER_PREFIX}.{name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    on_logger = [CorrelationFilter(correlation), *filters]
    for f in on_logger:
        log.addFilter(f)
    for handler in handlers:
        log.addHandler(handler)
    try:
        yield log
    finally:
        for f in on_logger:
            log.removeFilter(f)
        for handler in handlers:
            log.removeHandler(handler)
            with contextlib.suppress(Exception):  # a file on a full disk fails even to close
                handler.close()


def killed_by(exitcode: int | None) -> signal.Signals | None:
    """The signal that ended a process, read from its exit code (multiprocessing reports -N)."""
    with contextlib.suppress(ValueError):
        return signal.Signals(-exitcode) if exitcode is not None and exitcode < 0 else None
    return None


def threads_inherit_context() -> bool:
    """Whether a new thread starts in a copy of its starter's context (sys.flags.thread_inherit_context,
    Python 3.14+), measured: a thread started where a ContextVar is set reads it."""
    probe: contextvars.ContextVar[str | None] = contextvars.ContextVar("probe", default=None)
    seen = []

    def start_one() -> None:
        probe.set("the starter's")
        thread = threading.Thread(target=lambda: seen.append(probe.get()), name="faillab-probe")
        thread.start()
        thread.join()

    contextvars.copy_context().run(start_one)
    return seen == ["the starter's"]


def new_run_id(s: Scenario, label: str) -> str:
    return f"{label}-{s.rng.randrange(16 ** 6):06x}"


def show_logging_errors(s: Scenario, captured: str, why: str = "") -> int:
    """Show the essentials of the first '--- Logging error ---' block on stderr; return how many."""
    blocks = captured.split("--- Logging error ---")[1:]
    if blocks:
        lines = blocks[0].strip().splitlines()
        call_stack = lines.index("Call stack:") if "Call stack:" in lines else len(lines)
        keep = [lines[0], "  ...", lines[call_stack - 1]] + [x for x in lines if x.startswith(("Message:", "Args"))]
        s.say(f"stderr received {len(blocks)} x '--- Logging error ---'" + (f" ({why})" if why else "")
              + "; the first one, trimmed:")
        s.code("\n".join(["--- Logging error ---"] + keep))
    return len(blocks)


if __name__ == "__main__":
    main()
