"""Logging failures: logs that vanish, lose their correlation, flood the store, or do not parse.

When a pipeline fails, its logs are the evidence, and the logging system tends to fail at the same
moment. Each scenario breaks structured logging for real, with the standard `logging` module
(handlers, filters, QueueHandler/QueueListener, contextvars), and then counts: events the job
emitted against events found in the log store (the `pipeline_log` table), by correlation id.

    python3 fail_logging_failure.py [--only storage,correlation,volume,structured_parsing]
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import json
import logging
import logging.handlers
import math
import os
import queue
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import psycopg2
import psycopg2.errors
from psycopg2.extras import execute_values
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from common import Scenario, db, main, scenario

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
    """The job's own account of one run: what it emitted is what the store must hold."""
    run_id: str
    emitted: int = 0
    records_done: int = 0
    finished: bool = False
    seconds: float = 0.0
    errors: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def next_event_id(self) -> str:
        with self._lock:
            self.emitted += 1
            return f"{self.run_id}-{self.emitted:05d}"


def log_event(log: logging.Logger, report: JobReport, level: int, message: str, *args,
              exc_info=None, **fields) -> None:
    """Emit one structured event with a unique event id, and count it as emitted."""
    log.log(level, message, *args, exc_info=exc_info,
            extra={"event_id": report.next_event_id(), "fields": fields})


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


def connect_log_store(s: Scenario, proxy=None):
    """A connection to the log store. synchronous_commit=off: a log row is not worth a WAL flush of
    its own (a server crash may lose the last few ms of logs, never consistency); it also keeps this
    lab's timings about the design, not about this machine's disk."""
    conn = s.connect(s.via(proxy) if proxy else None)
    with conn.cursor() as cur:
        cur.execute("SET synchronous_commit = off")
    conn.commit()
    return conn


def run_totals(conn, run_id: str) -> tuple[int, int, int]:
    """(rows, distinct event ids, bytes) that one run has in the log store."""
    [(rows, distinct, size)] = db.rows(conn, """
        SELECT count(*), count(DISTINCT fields->>'event_id'), coalesce(sum(pg_column_size(p.*)), 0)
        FROM pipeline_log p WHERE correlation_id = %s""", (run_id,))
    return rows, distinct, int(size)


# == 1. storage =====================================================================================
OUTAGE_AT = 1_500              # the log database drops here
FULL_DISK = Path("/dev/full")  # Linux: every write to it fails with a real ENOSPC


def run_job(log, report: JobReport, outage) -> None:
    """The pipeline: process the records, log a progress event every EVENT_EVERY of them.
    `outage` is the fault, injected at record OUTAGE_AT."""
    with running(report):
        log_event(log, report, logging.INFO, "job started", records=RECORDS)
        total = 0
        for i in range(1, RECORDS + 1):
            if i == OUTAGE_AT:
                outage()
            total += i * 7919 % 10_000
            report.records_done = i
            if i % EVENT_EVERY == 0:
                time.sleep(STEP_WORK_S)
                log_event(log, report, logging.INFO, "progress: %d of %d records", i, RECORDS, record=i, total=total)
        log_event(log, report, logging.INFO, "job finished", records_done=report.records_done,
                  events_emitted=report.emitted + 1)  # this event included


class CountsDrops:
    """Mixin: count the records a handler dropped and keep the first error, then do what the
    standard library does (Handler.handleError prints '--- Logging error ---' and carries on)."""
    failed = 0
    first_error: BaseException | None = None

    def handleError(self, record):
        self.failed += 1
        self.first_error = self.first_error or sys.exc_info()[1]
        super().handleError(record)


class FileSink(CountsDrops, logging.FileHandler):
    pass


class DatabaseHandler(CountsDrops, logging.Handler):
    """Naive #1: one INSERT and one COMMIT per record, in the job's thread. On failure the
    standard library's default applies: the record is dropped, a traceback goes to stderr."""

    def __init__(self, connect):
        super().__init__()
        self.connect = connect  # returns a new connection to the log store
        self.conn = None
        self.setFormatter(JsonFormatter())  # one JSON object per line (see structured_parsing)

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
    """3 quick attempts (production: 5, exponential from 0.5 s to 30 s); behind the queue the job
    never waits for them."""
    return Retrying(stop=stop_after_attempt(3), wait=wait_fixed(0.01), reraise=True,
                    retry=retry_if_exception_type((psycopg2.OperationalError, psycopg2.InterfaceError)))


class BatchingDatabaseHandler(DatabaseHandler):
    """Fixed: runs behind a QueueListener. One INSERT per batch, retried; a batch the store still
    refuses is appended to a local spool file, to be replayed when the store is back."""

    def __init__(self, connect, spool: Path | None = None, batch_size: int = BATCH_SIZE):
        super().__init__(connect)
        self.spool, self.batch_size = spool, batch_size
        self.buffer: list[str] = []
        self.spooled = 0

    def emit(self, record):
        try:
            self.buffer.append(self.format(record))
            if len(self.buffer) >= self.batch_size:
                self.flush()
        except Exception:
            self.handleError(record)

    def flush(self):
        batch, self.buffer = self.buffer, []
        if not batch:
            return
        try:
            store_retry()(self.write, batch)
        except psycopg2.Error as exc:
            self.first_error = self.first_error or exc
            self.spool_lines(batch)

    def spool_lines(self, batch: list[str]) -> None:
        if self.spool is None:
            self.failed += len(batch)
            return
        try:
            with open(self.spool, "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in batch))
                f.flush()
                os.fsync(f.fileno())
            self.spooled += len(batch)
        except OSError as exc:
            self.failed += len(batch)
            self.first_error = self.first_error or exc

    def close(self):
        try:
            self.flush()
        finally:
            super().close()


class BatchingQueueListener(logging.handlers.QueueListener):
    """Hands records to its handlers and flushes them whenever the queue runs dry: batches grow in a
    storm and shrink to a single record when the job is quiet (a group commit)."""

    def handle(self, record):
        super().handle(record)
        if self.queue.empty():
            for handler in self.handlers:
                handler.flush()


@contextlib.contextmanager
def queued_logger(name: str, sink: logging.Handler, filters=(), correlation=CORRELATION_ID):
    """Fixed wiring: logger -> QueueHandler (formats the JSON in the job's thread, never blocks on
    I/O) -> a listener thread -> `sink`. On exit the listener drains the queue, then the sink closes."""
    records: queue.SimpleQueue = queue.SimpleQueue()
    to_queue = logging.handlers.QueueHandler(records)
    to_queue.setFormatter(JsonFormatter())
    for f in filters:
        to_queue.addFilter(f)
    sink.setFormatter(logging.Formatter("%(message)s"))  # the record already is the JSON line
    listener = BatchingQueueListener(records, sink)
    listener.start()
    try:
        with job_logger(name, to_queue, correlation=correlation) as log:
            yield log
    finally:
        listener.stop()
        sink.close()


def check_spool(path: Path) -> None:
    """Pre-flight, before the job starts: a real write, flushed and fsynced (a blank line, which the
    replay skips). Writing is the only sure way to learn that a disk is full."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def replay_spool(conn, spool: Path) -> int:
    """Write the spooled events to the store; returns the rows inserted. Safe to run twice: the
    unique event id makes the store skip what it already holds (ON CONFLICT DO NOTHING)."""
    lines = [line for line in spool.read_text(encoding="utf-8").split("\n") if line.strip()]
    with conn.cursor() as cur:
        inserted = insert_events(cur, lines) if lines else 0
    conn.commit()
    return inserted


INCOMPLETE_RUNS = """
    -- runs whose story is incomplete: no 'job finished' event, or fewer events than it announced
    SELECT correlation_id, count(*) AS stored, max((fields->>'events_emitted')::int) AS announced
    FROM pipeline_log GROUP BY correlation_id
    HAVING max((fields->>'events_emitted')::int) IS DISTINCT FROM count(*)"""


@scenario("storage", "The log store fails: events vanish, or the job dies with it")
def storage(s: Scenario):
    s.description(f"""
        The job processes {RECORDS:,} records and logs a structured event (JSON) every {EVENT_EVERY}
        records, plus 'job started' and 'job finished', to the table pipeline_log: one INSERT and
        one COMMIT per event, in the job's thread. A local JSON Lines file is the fallback sink.
        Wanted: every event the job emits is in the store, and logging never kills the job.""")
    create_log_store(s)
    proxy = s.proxy()
    through_proxy = lambda: connect_log_store(s, proxy)  # noqa: E731  (the log store, behind the fault proxy)
    store = DatabaseHandler(through_proxy)
    fallback = FileSink(FULL_DISK, encoding="utf-8") if FULL_DISK.exists() else None
    disk = (f"The fallback file is {FULL_DISK}: every write to it fails with a real ENOSPC." if fallback else
            f"No {FULL_DISK} on this OS: the full-disk fallback is left out here, not simulated.")
    s.trigger(f"""
        At record {OUTAGE_AT:,} the fault proxy drops the log database's connection and refuses new
        ones until the job ends. {disk}
        Run 1: the standard library's defaults (Handler.handleError). Run 2: a handler that re-raises.""")

    default = JobReport(new_run_id(s, "default"))
    with contextlib.redirect_stderr(io.StringIO()) as stderr:  # where handleError writes
        with job_logger("storage.default", *([store, fallback] if fallback else [store])) as log:
            run_job(log, default, outage=proxy.down)
    default_stored, _, _ = run_totals(s.conn, default.run_id)
    s.require(store.first_error is not None, "run 1: the log store refused events")
    s.observe(store.first_error,
              note="Run 1: the database handler's first error (handleError printed it; the record is dropped):")
    if fallback:
        s.require(fallback.first_error is not None, "run 1: the fallback file refused them too")
        s.observe(fallback.first_error, note="... and the fallback file's (handleError again):")
    logging_errors = show_logging_errors(s, stderr.getvalue())

    proxy.up()
    strict = JobReport(new_run_id(s, "strict"))
    s.say("Run 2, the handler that re-raises:")
    with job_logger("storage.strict", ReraisingDatabaseHandler(through_proxy)) as log:
        with s.expect(psycopg2.OperationalError, label="run 2: the job's own logging call"):
            run_job(log, strict, outage=proxy.down)
    strict_stored, _, _ = run_totals(s.conn, strict.run_id)

    s.table(["run", "job finished", "records done", "job time", "events emitted", "stored", "lost"],
            [["1 stdlib default", default.finished, f"{default.records_done:,}", f"{default.seconds:.3f} s",
              default.emitted, default_stored, default.emitted - default_stored],
             ["2 re-raising handler", strict.finished, f"{strict.records_done:,}", f"{strict.seconds:.3f} s",
              strict.emitted, strict_stored, strict.emitted - strict_stored]])
    s.measure("emitted_before", default.emitted)
    s.measure("stored_before", default_stored)
    lost = s.measure("lost_before", default.emitted - default_stored, "run 1: lost while the job reported success")
    s.measure("logging_errors_on_stderr", logging_errors)
    s.measure("strict_died_at_record", strict.records_done)
    s.triggered_if(default.finished and lost > 0,
                   f"run 1 finished 'successfully' and lost {lost} of {default.emitted} events")
    if fallback:
        s.measure("fallback_file_dropped", fallback.failed)
        s.triggered_if(getattr(fallback.first_error, "errno", None) == errno.ENOSPC,
                       f"the fallback file refused all {fallback.failed} events: ENOSPC (errno 28)")
    s.triggered_if(not strict.finished and strict.records_done == OUTAGE_AT,
                   f"run 2 died at record {strict.records_done:,} of {RECORDS:,}: a logging outage became a job outage")

    s.root_cause("""
        The standard library's Handler.handleError exists so that logging never crashes a program:
        it prints '--- Logging error ---' to stderr and drops the record. That is the right default,
        but nobody reads stderr of a batch job, so the evidence disappears in silence exactly when the
        database is down. Re-raising is worse: the log store becomes a single point of failure of the
        job. A synchronous handler also puts every INSERT on the job's own clock.
        The local fallback shares the fate of the disk; ENOSPC drops it too.""", detect=INCOMPLETE_RUNS)
    incomplete = db.rows(s.conn, INCOMPLETE_RUNS)
    s.table(["correlation_id", "stored", "announced"], incomplete)
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
    sink = BatchingDatabaseHandler(through_proxy, spool=spool)
    with s.step(f"Run the job again, same outage at record {OUTAGE_AT:,}: QueueHandler -> listener thread -> "
                "batched INSERTs, retried, then spooled") as st:
        with queued_logger("storage.fixed", sink) as log:
            run_job(log, fixed, outage=proxy.down)
        stored_live, _, _ = run_totals(s.conn, fixed.run_id)
        st.result = (f"job finished in {fixed.seconds:.3f} s; {stored_live} events stored live, "
                     f"{sink.spooled} spooled, {sink.failed} dropped")
    with s.step("The store is back: replay the spool, then replay it again (as after a crash mid-replay)") as st:
        proxy.up()
        replay_conn = s.connect(s.via(proxy))
        first, second = replay_spool(replay_conn, spool), replay_spool(replay_conn, spool)
        spool.unlink()
        st.result = f"first replay inserted {first}, second inserted {second} (ON CONFLICT skipped them); spool removed"
    stored, distinct, _ = run_totals(s.conn, fixed.run_id)
    still_incomplete = {run for run, _, _ in db.rows(s.conn, INCOMPLETE_RUNS)}
    s.measure("fixed_job_seconds", round(fixed.seconds, 3), f"run 1, synchronous: {default.seconds:.3f} s")
    s.measure("emitted_after", fixed.emitted)
    s.measure("spooled_after", sink.spooled)
    s.measure("second_replay_inserted", second)
    s.measure("stored_after", stored)
    s.measure("lost_after", fixed.emitted - stored)
    s.recovered_if(fixed.finished and fixed.records_done == RECORDS, f"the job finished all {RECORDS:,} records")
    s.recovered_if(stored == fixed.emitted and sink.failed == 0,
                   f"stored == emitted: {stored} == {fixed.emitted}, none lost")
    s.recovered_if(distinct == stored and second == 0, f"no duplicate: {distinct} distinct event ids in {stored} rows")
    s.recovered_if(fixed.run_id not in still_incomplete, "the detection query does not flag the fixed run")
    s.recovered_if(not spool.exists(), "the spool was replayed and removed")

    s.prevention("""
        Put a QueueHandler in front of the store so the job only enqueues; let a listener thread write
        batches with retries, spool what still fails to a local file checked at start-up, and replay
        the spool idempotently (a unique event id + ON CONFLICT DO NOTHING). Alert on the handler's
        drop counter and on runs whose stored count differs from the count they announced.""",
                 BatchingDatabaseHandler, replay_spool)


# == 2. correlation =================================================================================
CHUNKS, EVENTS_PER_CHUNK = 6, 5   # each run fans 6 chunks out to a shared thread pool


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


class CorrelationFilter(logging.Filter):
    """Stamps each record with the current run id, read from `source`: a naive holder above, or the
    ContextVar (the fix). Put it on the logger: it then runs in the thread that logs, even in front of
    a QueueHandler."""

    def __init__(self, source=CORRELATION_ID):
        super().__init__()
        self.source = source

    def filter(self, record):
        if getattr(record, "correlation_id", None) is None:
            record.correlation_id = self.source.get()
        return True


def submit_plain(pool: ThreadPoolExecutor, fn, *args):
    return pool.submit(fn, *args)


def submit_in_context(pool: ThreadPoolExecutor, fn, *args):
    """Run fn in a copy of the caller's context: the worker thread sees the caller's run id."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


def run_overlapping(s: Scenario, design: str, holder, submit) -> int:
    """Two runs at once, sharing one worker pool, each setting its id in `holder` where it starts;
    returns the events they emitted. Each event also records its true run, passed explicitly."""
    both_started = s.barrier(2)
    sink = BatchingDatabaseHandler(lambda: connect_log_store(s))
    with queued_logger("correlation", sink, correlation=holder) as log, \
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
            log_event(log, report, logging.INFO, "run finished", run=run_id, design=design)
            return report.emitted

        with ThreadPoolExecutor(2, thread_name_prefix="faillab-run") as runs:
            return sum(runs.map(one_run, [new_run_id(s, "run-A"), new_run_id(s, "run-B")]))


MISLABELLED = """
    SELECT fields->>'design' AS design, count(*) AS rows,
           count(*) FILTER (WHERE correlation_id IS NULL) AS no_run_id,
           count(*) FILTER (WHERE correlation_id <> fields->>'run') AS other_runs_id
    FROM pipeline_log GROUP BY 1 ORDER BY min(id)"""

ONE_RUN_STORY = """
    SELECT to_char(logged_at, 'HH24:MI:SS.MS') AS at, level, message, fields->>'chunk' AS chunk
    FROM pipeline_log WHERE correlation_id = %s ORDER BY logged_at, id"""


@scenario("correlation", "Overlapping runs: log rows lose their run id or carry the other run's")
def correlation(s: Scenario):
    s.description(f"""
        A run sets its correlation id where it starts, then fans {CHUNKS} chunks out to a shared
        ThreadPoolExecutor; every event ({2 + CHUNKS * EVENTS_PER_CHUNK} a run) gets the id from a
        logging.Filter. Two runs overlap, as when a retry starts before the slow run ends.
        Wanted: every row in pipeline_log carries its own run's id, so one query tells one run's story.""")
    create_log_store(s)
    s.trigger("""
        Run the two overlapping runs three times, changing only where the id lives: a global variable,
        a threading.local, and a ContextVar with tasks submitted to the pool as they are.
        Each event also records its true run (passed explicitly), so a query can tell right from wrong.""")
    emitted = {design: run_overlapping(s, design, holder, submit_plain) for design, holder in
               [("global variable", GlobalRunId()), ("threading.local", ThreadLocalRunId()),
                ("ContextVar, plain submit", CORRELATION_ID)]}
    counts = {design: rest for design, *rest in db.rows(s.conn, MISLABELLED)}
    s.table(["design", "events emitted", "rows", "no run id", "other run's id"],
            [[d, emitted[d], *counts[d]] for d in emitted])
    global_rows, _, global_wrong = counts["global variable"]
    local_rows, local_missing, _ = counts["threading.local"]
    plain_rows, plain_missing, plain_wrong = counts["ContextVar, plain submit"]
    s.measure("global_other_runs_id", global_wrong)
    s.measure("thread_local_no_run_id", local_missing)
    s.measure("contextvar_plain_no_run_id", plain_missing)
    s.measure("emitted_before", emitted["global variable"] + emitted["threading.local"])
    s.measure("lost_before", sum(counts["global variable"][1:]) + sum(counts["threading.local"][1:]),
              "global + threading.local rows without their own run id")
    s.triggered_if(global_wrong > 0, f"global variable: {global_wrong} of {global_rows} rows carry the other run's id")
    s.triggered_if(local_missing > 0, f"threading.local: {local_missing} of {local_rows} rows have no run id at all")
    if not getattr(sys.flags, "thread_inherit_context", False):  # 3.14+ can give a new thread its starter's context
        s.triggered_if(plain_missing + plain_wrong > 0,
                       f"ContextVar, plain submit: {plain_missing + plain_wrong} of {plain_rows} rows lack their id")

    s.root_cause("""
        A global holds one value for the whole process: the run that starts last relabels the other
        run's events. A threading.local holds one value per thread: the pool's worker threads never
        set it, so their events carry None. Even a ContextVar is not enough on its own: a pool thread
        runs each task in its own context, not the submitter's. (asyncio copies the context into each
        task and asyncio.to_thread does too; loop.run_in_executor and pool.submit do not.)""",
                 detect=MISLABELLED)

    fixed = "ContextVar + copy_context"
    with s.step("ContextVar, set per run, read by a logging.Filter; tasks run in contextvars.copy_context()") as st:
        fixed_emitted = run_overlapping(s, fixed, CORRELATION_ID, submit_in_context)
        _, missing, wrong = {design: rest for design, *rest in db.rows(s.conn, MISLABELLED)}[fixed]
        st.result = f"{missing} rows without a run id, {wrong} with the other run's id"
    per_run = db.rows(s.conn, """
        SELECT fields->>'run', count(*), count(*) FILTER (WHERE correlation_id = fields->>'run')
        FROM pipeline_log WHERE fields->>'design' = %s GROUP BY 1 ORDER BY 1""", (fixed,))
    s.table(["run", "rows", "rows carrying their own run id"], per_run)
    own = sum(mine for _, _, mine in per_run)
    s.measure("emitted_after", fixed_emitted)
    s.measure("stored_after", own, "rows carrying their own run id")
    s.measure("lost_after", fixed_emitted - own)
    s.recovered_if(len(per_run) == 2 and all(rows == mine for _, rows, mine in per_run),
                   "both runs: 100% of their rows carry their own run id")
    s.recovered_if(own == fixed_emitted and missing == 0 and wrong == 0,
                   f"{own} of {fixed_emitted} events, none mislabelled")

    story = db.rows(s.conn, ONE_RUN_STORY, (per_run[0][0],))
    s.say(f"The operator's query for one run's whole story ({len(story)} rows; first and last shown):")
    s.code(ONE_RUN_STORY.replace("%s", repr(per_run[0][0])))
    s.table(["at", "level", "message", "chunk"], story[:3] + story[-2:])
    s.prevention("""
        Keep the run id in a ContextVar, set it where the run starts, let a Filter on the logger copy it
        into every record (so it runs in the thread that logs, even in front of a QueueHandler), and
        submit pool work through contextvars.copy_context().run.""", CorrelationFilter, submit_in_context)


# == 3. volume ======================================================================================
STORM_RECORDS = 1_250    # records in the error storm, 4 in 5 of them bad (1,000 errors)
KEEP_PER_ERROR = 3       # full samples (with traceback) kept per distinct error


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
    """What makes two errors 'the same': the type and the line that raised it, not the message
    (which carries the record id, so no two messages are alike)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb else "?"
    return f"{type(exc).__name__} at {where}"


class ErrorStormFilter(logging.Filter):
    """Fixed, on the QueueHandler (so in the job's thread, before any formatting): the first `keep`
    records of each distinct error pass with their traceback; the rest are only counted, and drain()
    hands out one summary per error ("same error x 1,997 suppressed"). At most `max_distinct` errors
    are tracked, a cap on memory; beyond it, new errors share one bucket."""
    OVER_CAP = "other errors (over the cap)"

    def __init__(self, keep: int = KEEP_PER_ERROR, max_distinct: int = 50):
        super().__init__()
        self.keep, self.max_distinct = keep, max_distinct
        self.seen: Counter = Counter()
        self.lock = threading.Lock()

    def filter(self, record):
        if not record.exc_info:
            return True
        key = error_key(record.exc_info[1])
        with self.lock:
            if key not in self.seen and len(self.seen) >= self.max_distinct:
                key = self.OVER_CAP
            self.seen[key] += 1
            count = self.seen[key]
        record.fields = {**getattr(record, "fields", {}), "error_key": key}
        return count <= self.keep

    def drain(self) -> list[tuple[str, int]]:
        """(error, records suppressed) per error over `keep`; the window starts again."""
        with self.lock:
            out = [(k, n - self.keep) for k, n in self.seen.items() if n > self.keep]
            self.seen.clear()
        return out


def run_storm(log, report: JobReport, storm: ErrorStormFilter | None = None) -> None:
    """The error storm: every bad record is logged as an ERROR with its full traceback."""
    with running(report):
        for i in range(1, STORM_RECORDS + 1):
            try:
                parse_amount(i)
            except (ValueError, KeyError, ZeroDivisionError) as exc:
                report.errors[error_key(exc)] += 1
                log_event(log, report, logging.ERROR, "record %d rejected", i, exc_info=exc, record=i)
            report.records_done = i
        if storm is not None:  # production: every minute, and at shutdown
            for key, suppressed in storm.drain():
                log_event(log, report, logging.WARNING, "same error x %s suppressed", f"{suppressed:,}",
                          error_key=key, suppressed=suppressed)


def redundant_rows(conn, run_id: str, keep: int = KEEP_PER_ERROR) -> int:
    """Traceback rows of one run beyond the first `keep` of their error type: the flood."""
    return int(db.scalar(conn, """
        SELECT coalesce(sum(n - %s), 0) FROM (
            SELECT count(*) AS n FROM pipeline_log WHERE correlation_id = %s AND fields ? 'exception'
            GROUP BY fields->'exception'->>'type') per_error
        WHERE n > %s""", (keep, run_id, keep)))


@scenario("volume", "An error storm floods the log store and slows the job")
def volume(s: Scenario):
    s.description(f"""
        A feed of {STORM_RECORDS:,} records arrives where 4 in 5 are bad, in three ways. The job logs
        each rejected record as an ERROR with its full traceback, through a handler that inserts one
        row and commits, in the job's thread. Wanted: the job's speed does not depend on its error
        rate, and each distinct error is on record with its true count.""")
    create_log_store(s)
    s.trigger("""
        Run the storm three times: logging to nowhere (the baseline), then naive, then fixed. The lab's
        log connections use synchronous_commit=off, as log stores often do, so what is timed is the
        design, not this machine's disk.""")
    baseline = JobReport(new_run_id(s, "nolog"))
    with job_logger("volume.nolog", logging.NullHandler()) as log:
        run_storm(log, baseline)
    naive = JobReport(new_run_id(s, "naive"))
    with job_logger("volume.naive", DatabaseHandler(lambda: connect_log_store(s))) as log:
        run_storm(log, naive)
    naive_rows, _, naive_bytes = run_totals(s.conn, naive.run_id)
    bad = sum(naive.errors.values())
    redundant = s.measure("redundant_rows_before", redundant_rows(s.conn, naive.run_id),
                          f"traceback rows beyond the first {KEEP_PER_ERROR} of their error")
    share = (naive.seconds - baseline.seconds) / naive.seconds
    s.measure("nolog_job_seconds", round(baseline.seconds, 3))
    s.measure("naive_job_seconds", round(naive.seconds, 3))
    s.measure("naive_rows", naive_rows)
    s.measure("naive_bytes", naive_bytes)
    s.measure("naive_logging_share_pct", round(100 * share, 1), "of the job's run time spent logging")
    s.triggered_if(naive_rows == bad, f"{bad:,} bad records wrote {naive_rows:,} rows, each with a full traceback, "
                                      f"for {len(naive.errors)} distinct errors")
    s.triggered_if(redundant > 0, f"{redundant:,} of those rows repeat an error already on record")
    s.triggered_if(share > 0.5, f"the job spent {100 * share:.0f}% of its time logging "
                                f"({naive.seconds:.2f} s vs {baseline.seconds:.3f} s without logging)")

    s.root_cause("""
        Logging cost is per record: format a traceback, a round trip for the INSERT, another for the
        COMMIT, all in the job's thread. In an error storm that cost multiplies by the error count, so
        the job is slowest exactly when it is already in trouble, and the store fills with hundreds of
        copies of the same three errors, burying the one new error an operator needs to see.""", detect="""
        -- the errors flooding the log, by type, in the last hour
        SELECT fields->'exception'->>'type' AS error, count(*), pg_size_pretty(sum(pg_column_size(p.*)))
        FROM pipeline_log p WHERE level = 'ERROR' AND logged_at > now() - interval '1 hour'
        GROUP BY 1 ORDER BY 2 DESC""")

    storm = ErrorStormFilter(keep=KEEP_PER_ERROR)
    fixed = JobReport(new_run_id(s, "fixed"))
    with s.step(f"Same storm: QueueHandler + listener with batched INSERTs (execute_values), keep "
                f"{KEEP_PER_ERROR} samples per distinct error, count the rest") as st:
        started = time.perf_counter()
        sink = BatchingDatabaseHandler(lambda: connect_log_store(s))
        with queued_logger("volume.fixed", sink, filters=[storm]) as log:
            run_storm(log, fixed, storm)
        all_stored = time.perf_counter() - started
        fixed_rows, _, fixed_bytes = run_totals(s.conn, fixed.run_id)
        st.result = f"job {fixed.seconds:.3f} s, everything stored after {all_stored:.3f} s; {fixed_rows} rows"
    s.table(["design", "job run time", "log rows", "log bytes"],
            [["naive: row per record", f"{naive.seconds:.3f} s", f"{naive_rows:,}", f"{naive_bytes:,}"],
             ["fixed: queue + batch + dedup", f"{fixed.seconds:.3f} s", f"{fixed_rows:,}", f"{fixed_bytes:,}"]])
    s.say("Job run time (ms):")
    s.bars([("naive", round(naive.seconds * 1000, 1)), ("fixed", round(fixed.seconds * 1000, 1))], unit=" ms")
    s.say("Bytes written to the log store (KiB):")
    s.bars([("naive", round(naive_bytes / 1024, 1)), ("fixed", round(fixed_bytes / 1024, 1))], unit=" KiB")
    recorded = db.rows(s.conn, """
        SELECT fields->>'error_key', count(*) FILTER (WHERE fields ? 'exception'),
               coalesce(sum((fields->>'suppressed')::int), 0)
        FROM pipeline_log WHERE correlation_id = %s AND fields ? 'error_key' GROUP BY 1 ORDER BY 1""",
                       (fixed.run_id,))
    s.table(["distinct error", "true count", "rows with traceback", "suppressed", "on record"],
            [[k, fixed.errors[k], kept, sup, kept + sup] for k, kept, sup in recorded])
    on_record = {k: kept + sup for k, kept, sup in recorded}
    miscounted = sum(on_record.get(k) != n for k, n in fixed.errors.items())
    s.measure("fixed_job_seconds", round(fixed.seconds, 3))
    s.measure("fixed_all_stored_seconds", round(all_stored, 3))
    s.measure("job_speedup", round(naive.seconds / fixed.seconds, 1), "naive run time / fixed run time")
    s.measure("fixed_rows", fixed_rows)
    s.measure("fixed_bytes", fixed_bytes)
    s.measure("errors_miscounted_after", miscounted)
    redundant_after = s.measure("redundant_rows_after", redundant_rows(s.conn, fixed.run_id))
    s.recovered_if(fixed.seconds < naive.seconds,
                   f"the job is {naive.seconds / fixed.seconds:.0f}x faster under the same storm")
    s.recovered_if(fixed_bytes * 10 < naive_bytes and redundant_after == 0,
                   f"{fixed_bytes:,} bytes instead of {naive_bytes:,}; no redundant traceback row")
    s.recovered_if(len(recorded) == len(fixed.errors) and miscounted == 0,
                   f"all {len(fixed.errors)} distinct errors on record, each with its true count")

    s.prevention("""
        Keep the job's logging cost constant: hand records to a QueueHandler, write them in batches from
        a listener thread, and let a filter in front of the queue keep a few samples of each distinct
        error (by type and raising line) and count the rest, published as one summary per window.""",
                 ErrorStormFilter, BatchingQueueListener)


# == 4. structured_parsing ==========================================================================
FEED_EVENTS = 350        # events written to a JSON Lines file
# What real feeds put in a log line, one kind every 10th event.
TRICKY = [
    ("quote", 'customer "ACME" renamed', {}),
    ("newline", "address rejected:\n12 Main St", {}),
    ("backslash", r"file C:\data\in.csv read", {}),
    ("traceback", "row rejected", {}),  # logged with a real exception
    ("nan", "ratio computed", {"ratio": float("nan")}),
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


class ConcatJsonFormatter(logging.Formatter):
    """Naive: JSON assembled from strings. Quotes, backslashes and newlines in the message or the
    traceback are pasted in raw; the fields go through json.dumps with no fallback."""

    def format(self, record):
        line = ('{"time": "' + event_time(record) + '", "level": "' + record.levelname
                + '", "logger": "' + record.name + '", "message": "' + record.getMessage()
                + '", "correlation_id": "' + str(getattr(record, "correlation_id", None))
                + '", "fields": ' + json.dumps(event_fields(record)))
        if record.exc_info:
            line += ', "traceback": "' + self.formatException(record.exc_info) + '"'
        return line + "}"


class JsonFormatter(logging.Formatter):
    """Fixed: one JSON object per line, whatever the record holds. json.dumps escapes quotes and
    newlines; `default=` turns what JSON cannot encode into text; NaN and infinities become strings
    (allow_nan=False would refuse them); the exception is a field, not raw text."""

    def format(self, record):
        fields = event_fields(record)
        if record.exc_info:
            etype, exc, _ = record.exc_info
            fields["exception"] = {"type": getattr(etype, "__name__", str(etype)), "message": str(exc),
                                   "traceback": self.formatException(record.exc_info)}
        event = {"time": event_time(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), "correlation_id": getattr(record, "correlation_id", None),
                 "fields": fields}
        return json.dumps(json_safe(event), default=json_fallback, ensure_ascii=False,
                          allow_nan=False, separators=(",", ":"))


def json_safe(value):
    """NaN and infinities, which jsonb refuses, become strings; NUL, which jsonb text cannot hold, too."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_fallback(obj):
    """For what json cannot encode (Decimal, datetime, set, any object): text, never an exception."""
    if isinstance(obj, (set, frozenset)):
        return sorted(map(str, obj))
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    try:
        return str(obj)
    except Exception:
        return f"<unprintable {type(obj).__name__}>"


def read_lines_naive(path: Path) -> list[dict]:
    """Naive: json.loads on every line; the first bad line stops the whole read."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (PostgreSQL jsonb refuses it)")


def read_lines_tolerant(path: Path, strict: bool = True) -> tuple[list[tuple[int, str]],
                                                                  list[tuple[int, ValueError, str]]]:
    """Fixed: each line is parsed on its own; a bad line is quarantined with its line number and the
    error, and the read goes on. `strict` also refuses NaN/Infinity, as jsonb will."""
    good, quarantine = [], []
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        for lineno, line in enumerate(f, 1):
            text = line.rstrip("\n")
            if not text.strip():
                continue
            try:
                json.loads(text, parse_constant=refuse_constant if strict else None)
                good.append((lineno, text))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                quarantine.append((lineno, exc, text))
    return good, quarantine


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


@scenario("structured_parsing", "JSON log lines that break their readers")
def structured_parsing(s: Scenario):
    s.description(f"""
        A feed job writes {FEED_EVENTS} structured events to a JSON Lines file; a loader reads the file
        and loads each event into pipeline_log, whose fields column is jsonb. Every 10th event carries
        what real data carries: {', '.join(kind for kind, _, _ in TRICKY)}.
        Wanted: every line parses, every event loads, and a bad line never stops the load.""")
    create_log_store(s)
    s.trigger("The formatter builds each line by concatenating strings, with json.dumps for the fields only.")
    naive = JobReport(new_run_id(s, "naive"))
    naive_file = s.tmpdir / "feed-naive.jsonl"
    sink = FileSink(naive_file, encoding="utf-8")
    sink.setFormatter(ConcatJsonFormatter())
    with contextlib.redirect_stderr(io.StringIO()) as stderr, job_logger("parsing.naive", sink) as log:
        run_feed(log, naive)
    s.require(isinstance(sink.first_error, TypeError), "the naive formatter raised TypeError on some records")
    s.observe(sink.first_error, note="Writing: a Decimal in the fields, inside the formatter (the record is lost):")
    show_logging_errors(s, stderr.getvalue())
    with s.expect(json.JSONDecodeError, label="Reading: json.loads, at the first broken line,"):
        read_lines_naive(naive_file)
    parseable, unparseable = read_lines_tolerant(naive_file, strict=False)  # what Python's json accepts
    with s.expect(psycopg2.errors.InvalidTextRepresentation, sqlstate="22P02",
                  label="Loading: the batch INSERT (jsonb refuses NaN: 22P02)"):
        with s.conn.cursor() as cur:  # Loading: one INSERT for every line Python accepted
            insert_events(cur, [text for _, text in parseable])
    s.conn.rollback()
    stored_before, rejected = load_lines(s.conn, parseable)  # measured line by line
    s.table(["what", "count"], [["events emitted", naive.emitted], ["lost in the formatter (TypeError)", sink.failed],
                                ["lines in the file", len(parseable) + len(unparseable)],
                                ["lines json.loads cannot parse", len(unparseable)],
                                ["lines jsonb rejects (NaN)", len(rejected)], ["events stored", stored_before]])
    s.measure("emitted_before", naive.emitted)
    s.measure("lost_in_formatter", sink.failed)
    s.measure("lines_unparseable_before", len(unparseable))
    s.measure("rows_rejected_before", len(rejected))
    s.measure("stored_before", stored_before)
    lost = s.measure("lost_before", naive.emitted - stored_before)
    s.triggered_if(lost > 0 and unparseable and rejected,
                   f"{lost} of {naive.emitted} events never reached the store")

    s.root_cause("""
        JSON built by concatenation is only JSON while the text has no quote, backslash or newline; a
        message or a traceback breaks the line, and a multi-line traceback becomes several lines. Python's
        json.dumps raises TypeError on a Decimal or a datetime, inside the handler, so the record is
        dropped. And json.dumps writes NaN by default, which Python reads back happily but which is not
        JSON: PostgreSQL's jsonb refuses it (22P02), and one such line fails a whole batch load.""",
                 detect='python3 -c \'import json,sys; [json.loads(l) for l in open(sys.argv[1])]\' feed.jsonl')

    with s.step("Read the old file with the tolerant reader: quarantine bad lines with their numbers") as st:
        _, quarantine = read_lines_tolerant(naive_file)
        first_of_each = {}  # reason -> (line, the text around where the parser stopped)
        for n, exc, text in quarantine:
            at = getattr(exc, "pos", text.find("NaN"))  # a JSONDecodeError knows where it stopped
            first_of_each.setdefault(getattr(exc, "msg", str(exc)), (n, text[max(0, at - 18):at + 18]))
        s.table(["line", "reason", "text where it breaks"], [(n, why, at) for why, (n, at) in first_of_each.items()])
        st.result = f"{len(quarantine)} lines quarantined (NaN included), the rest readable; the load goes on"
    s.recovered_if({n for n, _, _ in quarantine} == {n for n, _, _ in unparseable} | {n for n, _ in rejected},
                   f"the reader set aside exactly the {len(quarantine)} lines json.loads or jsonb refused, by number")
    fixed = JobReport(new_run_id(s, "fixed"))
    fixed_file = s.tmpdir / "feed-fixed.jsonl"
    with s.step("Write the same feed with the fixed JsonFormatter (json.dumps, default=, allow_nan=False)") as st:
        fixed_sink = FileSink(fixed_file, encoding="utf-8")
        fixed_sink.setFormatter(JsonFormatter())
        with job_logger("parsing.fixed", fixed_sink) as log:
            run_feed(log, fixed)
        st.result = f"{fixed.emitted} events, {fixed_sink.failed} dropped"
    with s.step("Read it with the tolerant reader and load it line by line into jsonb") as st:
        good, quarantine_after = read_lines_tolerant(fixed_file)
        stored_after, rejected_after = load_lines(s.conn, good)
        st.result = (f"{len(good)} lines parsed, {len(quarantine_after)} quarantined; {stored_after} loaded, "
                     f"{len(rejected_after)} rejected by jsonb")
    stored, distinct, _ = run_totals(s.conn, fixed.run_id)
    kept = dict(db.rows(s.conn, "SELECT fields->>'kind', message FROM pipeline_log WHERE correlation_id = %s "
                        "AND fields->>'kind' <> 'plain'", (fixed.run_id,)))
    originals = {kind: message for kind, message, _ in TRICKY}
    s.measure("emitted_after", fixed.emitted)
    s.measure("lines_unparseable_after", len(quarantine_after))
    s.measure("rows_rejected_after", len(rejected_after))
    s.measure("stored_after", stored)
    s.measure("lost_after", fixed.emitted - stored)
    s.recovered_if(len(good) == fixed.emitted and not quarantine_after,
                   f"100% of the {len(good)} lines parse, one event per line")
    s.recovered_if(stored == distinct == fixed.emitted and not rejected_after, f"all {stored} events loaded into jsonb")
    s.recovered_if(kept == originals, "quotes, newlines, backslashes and unicode survive the round trip exactly")
    naive_file.unlink()
    fixed_file.unlink()

    s.prevention("""
        Build log lines with json.dumps only: default= for what JSON cannot encode, NaN and infinities
        mapped to strings (allow_nan=False catches any that slip through), the exception as a field,
        one object per line. Read with a tolerant reader that quarantines a bad line and goes on.""",
                 JsonFormatter, json_safe, read_lines_tolerant)


# -- plumbing: dedicated loggers, run ids, captured stderr -----------------------------------------------
LOGGER_PREFIX = "faillab.logging_failure"


@contextlib.contextmanager
def job_logger(name: str, *handlers: logging.Handler, correlation=CORRELATION_ID):
    """A dedicated logger (never the root; propagate=False) with these handlers and the correlation
    filter. On exit every handler is removed and closed, so nothing outlives the run."""
    log = logging.getLogger(f"{LOGGER_PREFIX}.{name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    stamp = CorrelationFilter(correlation)
    log.addFilter(stamp)
    for handler in handlers:
        log.addHandler(handler)
    try:
        yield log
    finally:
        log.removeFilter(stamp)
        for handler in handlers:
            log.removeHandler(handler)
            with contextlib.suppress(Exception):  # a file on a full disk fails even to close
                handler.close()


def new_run_id(s: Scenario, label: str) -> str:
    return f"{label}-{s.rng.randrange(16 ** 6):06x}"


def show_logging_errors(s: Scenario, captured: str) -> int:
    """Show the essentials of the first '--- Logging error ---' block on stderr; return how many."""
    blocks = captured.split("--- Logging error ---")[1:]
    if blocks:
        lines = blocks[0].strip().splitlines()
        call_stack = lines.index("Call stack:") if "Call stack:" in lines else len(lines)
        keep = [lines[0], "  ...", lines[call_stack - 1]] + [x for x in lines if x.startswith(("Message:", "Args"))]
        s.say(f"stderr received {len(blocks)} x '--- Logging error ---'; the first one, trimmed:")
        s.code("\n".join(["--- Logging error ---"] + keep))
    return len(blocks)


if __name__ == "__main__":
    main()
