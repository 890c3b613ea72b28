"""Retries that give up, storm, miscalculate, or retry the wrong thing.

Retries are how a pipeline survives a transient fault, and how it turns a blip into an outage.
Each scenario breaks a retry policy for real: connection failures come from a fault proxy in
front of PostgreSQL, server errors from PostgreSQL itself, and every figure printed is measured
during the run. Every retry is a tenacity policy, so where the fix is a better policy, naive and
fixed differ by one value.
Waits are scaled down to milliseconds (1 s in production = 1 ms here unless said otherwise); the
output says what the production values would be.

Run: python fail_retry_exhaustion.py [--only ID] [--json PATH] [--seed N] [--keep] [--ascii]
"""
from __future__ import annotations

import contextlib
import itertools
import random
import time

import psycopg2
import psycopg2.errors
from psycopg2 import sql
from tenacity import (RetryCallState, RetryError, Retrying, retry_if_exception, retry_if_exception_type,
                      stop_after_attempt, stop_after_delay, stop_before_delay, wait_exponential, wait_fixed,
                      wait_random_exponential)

from common import db, main, scenario, schema

JOB = "nightly_orders"
SOURCE_ROWS = 100
BATCH_SIZE = 10


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
    conn = psycopg2.connect(**params)
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
    return loaded, runs


def timeline(s, started: float):
    """A tenacity before_sleep hook: one line per failed attempt, as it happens."""
    def before_sleep(rs: RetryCallState) -> None:
        exc = rs.outcome.exception()
        s.say(f"attempt {rs.attempt_number}  t={1000 * (time.monotonic() - started):5.0f} ms  "
              f"sleep {1000 * rs.next_action.sleep:4.0f} ms  {type(exc).__name__}: {first_line(exc)}")
    return before_sleep


def first_line(exc: BaseException, width: int = 60) -> str:
    """The first line of an error, without libpq's 'connection to server at ... failed:' preamble."""
    text = (str(exc).strip().splitlines() or [repr(exc)])[0].split(" failed: ", 1)[-1]
    return text if len(text) <= width else text[:width - 3] + "..."


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


def run_unit_dead_letter(params: dict, dlq, unit: str) -> int:
    """Fixed: on exhaustion, park the unit with its real cause and exit with a clear status."""
    try:
        LOAD_POLICY(load_batch_via, params, unit)
        return 0
    except RetryError as exc:
        cause = exc.last_attempt.exception()  # the real error; str(exc) only names its class
        with dlq.cursor() as cur:
            cur.execute("INSERT INTO dead_letter (job, unit, error_type, error, attempts) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (job, unit) DO UPDATE SET "
                        "error_type = excluded.error_type, error = excluded.error, "
                        "attempts = dead_letter.attempts + excluded.attempts, replayed_at = NULL",
                        (JOB, unit, type(cause).__name__, str(cause).strip(), exc.last_attempt.attempt_number))
        dlq.commit()
        return EXIT_TEMPFAIL


def replay_dead_letters(conn) -> list[str]:
    """Replay each parked unit and mark it replayed in the SAME transaction: exactly once."""
    done = []
    while True:
        with conn.cursor() as cur:
            cur.execute("SELECT unit FROM dead_letter WHERE job = %s AND replayed_at IS NULL "
                        "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED", (JOB,))
            row = cur.fetchone()
            if row is None:
                conn.commit()
                return done
            load_batch(cur, row[0])
            cur.execute("UPDATE dead_letter SET replayed_at = clock_timestamp() WHERE job = %s AND unit = %s",
                        (JOB, row[0]))
        conn.commit()
        done.append(row[0])


@scenario("exhaustion", "Retries run out while the database is still down")
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
    policy_s = round(time.monotonic() - started, 3)
    exc = caught.exc
    cause = exc.last_attempt.exception()
    s.say(f"attempt {exc.last_attempt.attempt_number}  t={1000 * policy_s:5.0f} ms  no sleep: "
          f"stop_after_attempt(5) gives up and raises {type(exc).__name__}")
    s.measure("policy_seconds", policy_s)
    attempts = s.measure("attempts_before_giving_up", exc.last_attempt.attempt_number)
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

    s.root_cause(f"""
        A retry policy is a bet that the fault is shorter than the policy. The outage outlived it
        (5 attempts took {policy_s:.2f} s here; 15 s of sleeps in production), and tenacity raised
        RetryError. Its message names only the cause's class ("raised OperationalError"); a job
        that logs str(exc) and exits 1 leaves no record of which unit failed, nor why, nor a way
        to redo just that unit.""",
        detect="SELECT job, unit, attempts, error_type, failed_at FROM dead_letter\n"
               "WHERE replayed_at IS NULL ORDER BY failed_at;   -- alert when this is not empty")

    with s.step("run the unit again with the dead-letter policy (database still down for the job)") as st:
        status = run_unit_dead_letter(params, s.conn, unit)  # s.conn does not go through the proxy
        st.result = f"exit status {status} (EX_TEMPFAIL: 'try again later'), {unit} parked in dead_letter"
    parked = db.rows(s.conn, "SELECT unit, error_type, attempts, error FROM dead_letter WHERE job = %s", (JOB,))
    s.table(["unit", "error_type", "attempts", "error"], [[u, t, n, first_line(e)] for u, t, n, e in parked])
    s.recovered_if(status == EXIT_TEMPFAIL and [row[:3] for row in parked] == [(unit, "OperationalError", 5)]
                   and "RetryError" not in parked[0][3],
                   "the job exits with EX_TEMPFAIL; the unit is parked with its real error and 5 attempts")
    with s.step("the database comes back: replay the dead letters, twice") as st:
        proxy.up()
        s.measure("outage_seconds", round(time.monotonic() - down_at, 3),
                  f"longer than the {policy_s} s the policy lasted")
        replay_conn = s.connect(params)
        first, second = replay_dead_letters(replay_conn), replay_dead_letters(replay_conn)
        st.result = f"first replay: {first}; second replay: {second} (nothing left to do)"
    loaded, runs = batch_state(s.conn, unit)
    pending = db.scalar(s.conn, "SELECT count(*) FROM dead_letter WHERE replayed_at IS NULL")
    s.measure("unit_runs", runs)
    s.recovered_if(loaded == BATCH_SIZE and runs == 1 and pending == 0,
                   f"{unit}: {loaded} rows equal to source, ran exactly once, no dead letter pending")

    s.prevention("""
        Expect exhaustion: catch RetryError, keep the real cause (exc.last_attempt.exception(), or
        reraise=True), park the unit where the outage does not reach (here a table written over a
        connection that bypasses the proxy; in production often a separate database or queue),
        and exit with a status the scheduler understands. Replay marks the dead letter in the
        same transaction as the work: both commit or neither does, and a second replay finds
        nothing left to do.""",
        run_unit_dead_letter, replay_dead_letters)


# -- 2. storm --------------------------------------------------------------------------------------
STORM_WORKERS = 32
STORM_SLOTS = 16        # sessions left for the job when the database comes back
STORM_OUTAGE_S = 0.28   # production: a 30 s failover. Ends 70 ms before the lockstep retry at +350 ms
STORM_BASE_S = 0.05     # production: 1 s
STORM_CAP_S = 0.8       # production: 60 s
STORM_HOLD_S = 0.08     # each worker's batch keeps its session this long
STORM_WINDOW_S = 0.05


class wait_full_jitter(wait_random_exponential):
    """tenacity's full jitter, drawing from a random.Random of its own.

    wait_random_exponential draws from the module-level `random`, which all threads share: which
    worker gets which number would depend on thread scheduling, so --seed could not repeat a run
    (and random.seed() would reseed everyone's generator). One generator per worker, seeded from
    the scenario's rng in worker order, makes each worker's waits a function of --seed."""

    def __init__(self, rng: random.Random, **kw):
        super().__init__(**kw)
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        high = wait_exponential.__call__(self, retry_state)
        return self.rng.uniform(self.min, high)


def peak_in_window(times: list[float], width: float = STORM_WINDOW_S) -> int:
    """The most events in any window of `width` seconds (a sliding window over sorted times)."""
    times, peak, lo = sorted(times), 0, 0
    for hi, t in enumerate(times):
        while times[lo] < t - width:
            lo += 1
        peak = max(peak, hi - lo + 1)
    return peak


def first_login(params: dict, rng: random.Random):
    """A worker's first session, before the outage. Copies of this script or other users may fill the
    server's max_connections for a moment: retry (jittered) until there is room. Not measured."""
    return Retrying(wait=wait_full_jitter(rng, multiplier=0.01, max=0.2), stop=stop_after_delay(10),
                    retry=retry_if_exception_type(psycopg2.OperationalError), reraise=True)(psycopg2.connect, **params)


def storm_worker(params: dict, policy: str, wait, barrier, logins: list, out: dict, i: int) -> None:
    """One pipeline worker: holds its own connection, loses it, reconnects under `wait`, writes its batch.
    Appends the time of every login it sends to `logins`."""
    state = {"conn": first_login(params, random.Random(i)), "attempts": 0, "errors": []}

    def write_batch() -> None:
        state["attempts"] += 1
        try:
            if state["conn"] is None:
                logins.append(time.monotonic())
                state["conn"] = psycopg2.connect(**params)
            with state["conn"].cursor() as cur:
                cur.execute("INSERT INTO storm_done (policy, worker, attempts) VALUES (%s, %s, %s)",
                            (policy, i, state["attempts"]))
                cur.execute("SELECT pg_sleep(%s)", (STORM_HOLD_S,))
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
        Retrying(wait=wait, stop=stop_after_delay(5), reraise=True,
                 retry=retry_if_exception_type(psycopg2.OperationalError))(write_batch)
        out[i] = {"done": time.monotonic(), "attempts": state["attempts"], "errors": state["errors"]}
    finally:
        if state["conn"] is not None:
            state["conn"].close()


def run_storm(s, admin, role: dict | None, policy: str, wait_for) -> dict:
    """One run of the outage under one wait policy: connect the workers, take the database away, count."""
    proxy = s.proxy()
    params = {**s.via(proxy), **(role or {})}
    if role:
        set_connection_limit(admin, role["user"], STORM_WORKERS)
    barrier = s.barrier(STORM_WORKERS + 1, timeout=20)
    logins: list[float] = []
    out: dict = {}
    threads = [s.thread(storm_worker, params, policy, wait_for(i), barrier, logins, out, i, name=f"faillab-storm-{i}")
               for i in range(STORM_WORKERS)]
    barrier.wait()
    # While it is down, other clients take the free slots: when it comes back only STORM_SLOTS are
    # left. PostgreSQL checks CONNECTION LIMIT at login only, so the live sessions are not touched.
    if role:
        set_connection_limit(admin, role["user"], STORM_SLOTS)
    else:
        proxy.max_connections = STORM_SLOTS
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
    up_at = time.monotonic()  # taken before up(): a login sent in between is counted as reaching it
    proxy.up()
    for t in threads:
        t.join(10)
    # Login times are taken by the workers as they send them: the proxy, a Python thread on a busy
    # machine, may accept a burst later than it was sent, which is not what jitter is about.
    sent = sorted(t - lost_at for t in logins)
    reached = [t for t in sent if t >= up_at - lost_at]
    # psycopg2 gives a refused login no SQLSTATE (pgcode is None): the server's FATAL message is how
    # to tell 53300 from a dropped connection. Without the role, the proxy's resets after up() are it.
    refusals = sorted(((when, e) for r in out.values() for when, e in r["errors"]
                       if ("too many connections for role" in str(e) if role else when >= up_at)),
                      key=lambda pair: pair[0])
    return {"refusals": [e for _, e in refusals],
            "rejected": len(refusals) if role else proxy.count("over_cap", lost_at),
            "attempts": len(sent), "times": sent, "peak_all": peak_in_window(sent), "peak": peak_in_window(reached),
            "recovered": len(out), "recovery_s": max((r["done"] for r in out.values()), default=lost_at) - lost_at}


def set_connection_limit(admin, role: str, limit: int) -> None:
    with admin.cursor() as cur:
        cur.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(sql.Identifier(role), sql.Literal(limit)))


def histogram(series: list[list[float]], bucket: float = 0.05, width: int = 24) -> list[list[str]]:
    """One row per `bucket` seconds, one text bar per series: the series side by side."""
    buckets = int(max(max(ts, default=0) for ts in series) / bucket) + 1
    counts = [[sum(1 for t in ts if k * bucket <= t < (k + 1) * bucket) for k in range(buckets)] for ts in series]
    top = max(max(c) for c in counts) or 1
    return [[f"{round(1000 * k * bucket):4d} ms"] + [("█" * round(width * c[k] / top)).ljust(width) + f" {c[k]:3d}"
                                                     for c in counts] for k in range(buckets)]


@scenario("storm", "Retry storm: every worker reconnects at the same moment")
def storm(s):
    s.description(f"""
        {STORM_WORKERS} pipeline workers (threads), each with its own connection through the proxy. When
        the connection drops, a worker reconnects with exponential backoff, {1000 * STORM_BASE_S:.0f} ms doubling
        to {1000 * STORM_CAP_S:.0f} ms (production: 1 s doubling to 60 s), writes its batch (holding a session
        for {1000 * STORM_HOLD_S:.0f} ms) and is done.""")
    with s.conn.cursor() as cur:
        cur.execute("CREATE TABLE storm_done (policy text NOT NULL, worker int NOT NULL, attempts int NOT NULL, "
                    "done_at timestamptz DEFAULT clock_timestamp())")
    s.conn.commit()
    admin = s.connect(autocommit=True)
    role = s.role("w", connection_limit=STORM_WORKERS)  # None if we may not create roles
    if role:
        s.say(f"The workers log in as a role of their own, {role['user']}; while the database is down its\n"
              f"CONNECTION LIMIT drops to {STORM_SLOTS} (other clients took the free slots; PostgreSQL checks\n"
              "the limit at login only), so every login refused after the outage is a real 53300.")
    else:
        s.say("This role may not create roles (neither rolsuper nor rolcreaterole), so the limit of\n"
              f"{STORM_SLOTS} sessions is enforced by the proxy instead (max_connections): it resets the excess.")
    s.trigger(f"""
        A barrier lines the {STORM_WORKERS} workers up; the proxy drops every connection at once and
        refuses new ones for {1000 * STORM_OUTAGE_S:.0f} ms (production: a 30 s failover); then only
        {STORM_SLOTS} sessions are free. First run: exponential backoff without jitter (wait_exponential).""")
    nj = run_storm(s, admin, role, "no jitter", lambda i: wait_exponential(multiplier=STORM_BASE_S, max=STORM_CAP_S))
    if nj["refusals"]:
        s.observe(nj["refusals"][0], "The first login refused after the database came back:")
    s.measure("no_jitter_attempts", nj["attempts"])
    s.measure("no_jitter_peak_50ms", nj["peak"], "logins sent once the database was back, busiest 50 ms")
    s.measure("no_jitter_rejections", nj["rejected"])
    s.measure("no_jitter_recovery_s", round(nj["recovery_s"], 3), "until the last worker wrote its batch")
    s.triggered_if(nj["rejected"] > 0,
                   f"the wall of logins met {STORM_SLOTS} free sessions: {nj['rejected']} refused "
                   f"({nj['peak']} logins in the busiest 50 ms)")

    lockstep = ", ".join(f"+{1000 * t:.0f}" for t in itertools.accumulate(
        backoff_schedule(wait_exponential(multiplier=STORM_BASE_S, max=STORM_CAP_S), 6)))
    s.root_cause(f"""
        Backoff without jitter is a schedule every worker shares: they all lost the connection at
        the same moment, so they all retry at {lockstep} ms... in lockstep. The database
        comes back to a wall of logins at once; the excess is refused, and the refused workers
        retry together again. Full jitter draws each sleep uniformly from [0, window], so the
        same workers arrive spread over the window. (M. Brooker, "Exponential Backoff And
        Jitter", AWS Architecture Blog, 2015: with 100 clients contending for one resource,
        jitter cut the total calls by more than half.)""",
        detect="-- refused logins: 'too many connections' (SQLSTATE 53300) in the server log;\n"
               "-- logins per second: log_connections = on. Live, sessions per role:\n"
               "SELECT usename, count(*) FROM pg_stat_activity GROUP BY 1 ORDER BY 2 DESC;")
    seeds = [s.rng.getrandbits(64) for _ in range(STORM_WORKERS)]
    with s.step("the same outage again, with full jitter (wait_random_exponential, seeded per worker)") as st:
        fj = run_storm(s, admin, role, "full jitter", lambda i: wait_full_jitter(
            random.Random(seeds[i]), multiplier=STORM_BASE_S, max=STORM_CAP_S))
        st.result = f"{fj['peak']} logins in the busiest 50 ms (was {nj['peak']}), {fj['rejected']} refused"
    s.table(["policy", "attempts", "peak 50 ms: logins", "peak 50 ms: all", "refused", "all recovered after"],
            [[name, r["attempts"], r["peak"], r["peak_all"], r["rejected"], f"{1000 * r['recovery_s']:.0f} ms"]
             for name, r in (("no jitter", nj), ("full jitter", fj))])
    s.say("Connection attempts per 50 ms after the loss (the database is back at "
          f"{1000 * STORM_OUTAGE_S:.0f} ms):")
    s.table(["after the loss", "no jitter", "full jitter"], histogram([nj["times"], fj["times"]]))
    s.say(f"""
        Unlike Brooker's contended writes, most attempts here meet a database that is down, and
        full jitter sleeps half as long on average: it made {fj['attempts']} attempts to no jitter's
        {nj['attempts']}. Those cost the server nothing: nothing answers them (in production, a dead
        host's kernel refuses them). What jitter removes is the wall of logins when the database
        comes back; in exchange, the last worker may come back a little later.""")
    s.measure("full_jitter_attempts", fj["attempts"])
    s.measure("full_jitter_peak_50ms", fj["peak"])
    s.measure("full_jitter_rejections", fj["rejected"])
    s.measure("full_jitter_recovery_s", round(fj["recovery_s"], 3))
    s.measure("no_jitter_peak_50ms_all", nj["peak_all"], "attempts refused while it was down included")
    s.measure("full_jitter_peak_50ms_all", fj["peak_all"])
    done = {policy: (rows, workers) for policy, rows, workers in db.rows(
        s.conn, "SELECT policy, count(*), count(DISTINCT worker) FROM storm_done GROUP BY 1")}
    s.recovered_if(2 * fj["peak"] <= nj["peak"],
                   f"full jitter cut the busiest 50 ms at least 2x: {nj['peak']} -> {fj['peak']} logins")
    s.recovered_if(fj["rejected"] < nj["rejected"], f"refused logins: {nj['rejected']} -> {fj['rejected']}")
    once_each = (STORM_WORKERS, STORM_WORKERS)  # (rows, distinct workers)
    s.recovered_if(done == {"no jitter": once_each, "full jitter": once_each}
                   and nj["recovered"] == fj["recovered"] == STORM_WORKERS,
                   f"each of the {STORM_WORKERS} workers wrote its batch exactly once under both policies "
                   f"(storm_done rows, workers: {done})")

    s.prevention("""
        Jitter every backoff that many clients share: full jitter with a cap, so clients that
        failed together do not retry together. For a repeatable run (--seed), give each worker
        its own generator.""",
        wait_full_jitter, "Retrying(wait=wait_full_jitter(rng, multiplier=1, max=60),  # production: 1 s .. 60 s\n"
                          "         stop=stop_after_attempt(12) | stop_before_delay(300),\n"
                          "         retry=retry_if_exception(is_transient))")


# -- 3. backoff_calculation ------------------------------------------------------------------------
BASE_S, CAP_S = 1, 30   # production backoff: 1 s doubling, at most 30 s per sleep
ATTEMPTS = 12
DEADLINE_S = 300        # the job must have succeeded or given up 5 min after a failure
SCALE = 0.001           # real runs in this scenario: 1 s of production = 1 ms
RETRY_DELAY_MS = 500    # a setting in milliseconds, as config files often have
STOP_LIMIT_S, STOP_SLEEP_S = 0.15, 0.10  # attempt 2 fails at ~0.10 s, 50 ms inside the limit; a third comes at ~0.20 s


def wait_naive(retry_state: RetryCallState) -> float:
    """The hand-written backoff: base * 2 ** attempt, nothing else."""
    return BASE_S * 2.0 ** retry_state.attempt_number


def human(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:,.2f} s"


def fixed_policy(rng: random.Random, scale: float = 1.0) -> Retrying:
    """Capped full jitter, bounded by attempts AND by a deadline that counts the next sleep."""
    return Retrying(wait=wait_full_jitter(rng, multiplier=BASE_S * scale, max=CAP_S * scale),
                    stop=stop_after_attempt(ATTEMPTS) | stop_before_delay(DEADLINE_S * scale),
                    retry=retry_if_exception_type(psycopg2.OperationalError), reraise=True)


def ping_via(params: dict) -> None:
    """One attempt: connect (through the proxy) and run a query."""
    conn = psycopg2.connect(**params)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        conn.close()


def sleeps_requested(wait, params: dict, attempts: int = 2) -> list[float]:
    """The sleeps tenacity asks for in a real retry loop whose every attempt fails (the proxy is
    down); its sleep is intercepted, so asking for years costs nothing."""
    asked: list[float] = []
    with contextlib.suppress(psycopg2.OperationalError):  # the last attempt's error, expected
        Retrying(wait=wait, stop=stop_after_attempt(attempts), sleep=asked.append, reraise=True)(ping_via, params)
    return asked


def up_after(proxy, seconds: float) -> None:
    time.sleep(seconds)
    proxy.up()


@scenario("backoff_calculation", "Backoff arithmetic: sleeps of years, overflow, wrong units, late stops")
def backoff_calculation(s):
    s.description(f"""
        A retry policy is arithmetic: the sleep after attempt n, a cap, when to stop. This job
        retries {ATTEMPTS} times from {BASE_S} s and must have succeeded or given up {DEADLINE_S} s after a
        failure. Figures are in production seconds, except the two stop timings, which run in real
        seconds; the final run is scaled 1:1000 (1 s = 1 ms).""")
    proxy = s.proxy()
    params = s.via(proxy)
    s.trigger("""
        Ask the hand-written base * 2 ** attempt for its sleep at attempt 1024 of a loop that
        retries forever. Then the database goes away (the proxy resets every connection) and retry
        loops run against it with tenacity's sleep intercepted, to record what they ask for:
        base * 2 ** attempt, tenacity's default wait_exponential(), and a setting in milliseconds.
        Last, stop_after_delay is timed against the same outage, with real sleeps.""")
    with s.expect(OverflowError):
        backoff_schedule(wait_naive, 1025)  # attempt 1024 of a retry-forever loop: 2.0 ** 1024
    proxy.down()
    naive = sleeps_requested(wait_naive, params, 31)  # 31 failed attempts: the 30 sleeps between them
    default = sleeps_requested(wait_exponential(), params, 31)
    for n in (10, 20, 30):
        s.say(f"base * 2 ** attempt, after attempt {n}: asked to sleep {naive[n - 1]:,.0f} s = {human(naive[n - 1])}")
    s.say(f"tenacity wait_exponential() (default max={wait_exponential().max:.3g} s), after attempt 30: "
          f"asked to sleep {human(default[-1])}")
    s.triggered_if(len(naive) == len(default) == 30 and min(naive[-1], default[-1]) > 365 * 86400,
                   "after 30 failed attempts, both loops asked tenacity to sleep for years")
    naive_worst = s.measure("naive_worst_case_s", sum(naive[:ATTEMPTS - 1]), f"{ATTEMPTS} attempts")
    s.triggered_if(naive_worst > DEADLINE_S, f"worst case {human(naive_worst)} blows past the "
                                             f"{DEADLINE_S} s deadline")
    asked = sleeps_requested(wait_fixed(RETRY_DELAY_MS), params)  # a real run would hang here for 8 min
    s.measure("ms_as_seconds_sleep_s", asked[0] if asked else None, f"the setting said {RETRY_DELAY_MS} ms")
    s.triggered_if(asked == [RETRY_DELAY_MS], f"between two failed attempts tenacity asked to sleep "
                                              f"{asked[0] if asked else '?'} s: 1000x too long")
    limit, nap = STOP_LIMIT_S, STOP_SLEEP_S
    policy = Retrying(stop=stop_after_delay(limit), wait=wait_fixed(nap), reraise=True)
    started = time.monotonic()
    with s.expect(psycopg2.OperationalError):
        policy(ping_via, params)
    took = time.monotonic() - started
    late = s.measure("stop_after_delay_attempts", policy.statistics["attempt_number"])
    s.measure("stop_after_delay_overshoot_s", round(took - limit, 3), f"limit {limit} s, sleeps of {nap} s")
    s.triggered_if(late == 3 and took > limit, f"stop_after_delay({limit}) slept past its limit: "
                                               f"attempt {late} came at {took:.3f} s")

    s.root_cause("""
        Nothing bounds base * 2 ** n: doubling 30 times is a factor of a billion, and a loop that
        retries forever reaches 2.0 ** 1024, which no float holds: the loop dies of OverflowError
        instead of the database error. tenacity's wait_exponential guards the overflow (it returns
        max), but its default max is effectively infinite.
        Units are not types: 500 meant milliseconds, tenacity reads seconds. And stop_after_delay
        is checked after an attempt fails: the policy sleeps first and notices later, so it
        overruns its limit by up to one whole sleep.""",
        detect="-- log every retry with its attempt number and planned sleep (before_sleep); alert when\n"
               "-- a planned sleep exceeds the cap or the sum of sleeps exceeds the job's deadline")
    with s.step(f"cap ({CAP_S} s) and full jitter: the sleeps asked for in {ATTEMPTS} attempts") as st:
        capped = sleeps_requested(wait_exponential(multiplier=BASE_S, max=CAP_S), params, ATTEMPTS)
        drawn = sleeps_requested(fixed_policy(random.Random(s.rng.getrandbits(64))).wait, params, ATTEMPTS)
        rows = [[n, f"{w:,.0f}", f"{c:,.0f}", f"{d:5.1f} of 0-{c:,.0f}"]
                for n, (w, c, d) in enumerate(zip(naive, capped, drawn), 1)]
        rows.append(["worst case", f"{naive_worst:,.0f}", f"{sum(capped):,.0f}",
                     f"{sum(drawn):5.1f} of {sum(capped):,.0f}"])
        rows.append(["deadline", DEADLINE_S, DEADLINE_S, DEADLINE_S])
        s.table(["after attempt", "naive (s)", "capped (s)", "capped + full jitter (s, drawn)"], rows)
        st.result = f"worst case: naive {human(naive_worst)}, capped {human(sum(capped))}"
    s.measure("capped_worst_case_s", sum(capped))
    guarded = backoff_schedule(wait_exponential(multiplier=BASE_S, max=CAP_S), 1025)[-1]
    s.recovered_if(len(capped) == ATTEMPTS - 1 and sum(capped) <= DEADLINE_S and guarded == CAP_S,
                   f"capped worst case {sum(capped):.0f} s fits the deadline; attempt 1024 sleeps {guarded} s")
    with s.step("convert the millisecond setting once, where it is read") as st:
        asked = sleeps_requested(wait_fixed(RETRY_DELAY_MS / 1000), params)
        st.result = f"tenacity asks for {asked[0] if asked else '?'} s"
    s.recovered_if(asked == [RETRY_DELAY_MS / 1000], "the sleep is 0.5 s, as configured")
    with s.step(f"stop_before_delay({limit}): same sleeps, same outage") as st:
        policy = Retrying(stop=stop_before_delay(limit), wait=wait_fixed(nap), reraise=True)
        started = time.monotonic()
        with s.expect(psycopg2.OperationalError):
            policy(ping_via, params)
        bounded = time.monotonic() - started
        early = policy.statistics["attempt_number"]
        st.result = f"gave up after attempt {early}, at {bounded:.3f} s: the next sleep would have crossed the limit"
    s.measure("stop_before_delay_attempts", early)
    s.measure("stop_before_delay_seconds", round(bounded, 3))
    s.recovered_if(early == 2 and bounded <= limit, f"stop_before_delay stays within {limit} s ({bounded:.3f} s)")
    outage = 0.04
    with s.step(f"the fixed policy, scaled, against a real {1000 * outage:.0f} ms outage "
                f"(deadline {1000 * DEADLINE_S * SCALE:.0f} ms)") as st:
        policy = fixed_policy(random.Random(s.rng.getrandbits(64)), scale=SCALE)
        s.thread(up_after, proxy, outage)
        started = time.monotonic()
        policy(ping_via, params)
        took = time.monotonic() - started
        fixed_attempts = policy.statistics["attempt_number"]
        st.result = f"succeeded on attempt {fixed_attempts} after {1000 * took:.0f} ms"
    s.measure("fixed_policy_seconds", round(took, 3))
    s.recovered_if(fixed_attempts > 1 and took <= DEADLINE_S * SCALE,
                   f"rode out the outage in {fixed_attempts} attempts, within the deadline")

    s.prevention("""
        Let tenacity do the arithmetic and give it every bound: a cap on each sleep (max=), full
        jitter, a number of attempts AND a deadline that counts the next sleep (stop_before_delay).
        Carry units in names (_s, _ms) and convert once, where the setting is read.""",
        fixed_policy)


# -- 4. non_transient --------------------------------------------------------------------------------
TRANSIENT_SQLSTATES = {
    "40001",  # serialization_failure: the transaction was rolled back, run it again
    "40P01",  # deadlock_detected: this transaction was the victim, run it again
    "53300",  # too_many_connections
    "57P01",  # admin_shutdown: the server is restarting
    "57P03",  # cannot_connect_now: the server is starting up
}


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the same statement can succeed a moment later.

    Permanent: 22xxx (bad data), 23xxx (constraint), 42xxx (syntax, missing object): the same
    statement fails the same way on every attempt."""
    if not isinstance(exc, psycopg2.Error):
        return False
    # A refused or lost connection has no SQLSTATE. In psycopg2 neither has any error raised while
    # logging in: a wrong password is retried too, until the policy stops.
    if exc.pgcode is None:
        return isinstance(exc, psycopg2.OperationalError)
    return exc.pgcode.startswith("08") or exc.pgcode in TRANSIENT_SQLSTATES  # 08xxx: connection exception


# Production: 5 attempts, 30 s apart. The fixed policy differs by one value: what it retries.
RETRY_EVERYTHING = Retrying(stop=stop_after_attempt(5), wait=wait_fixed(0.05), reraise=True)
RETRY_TRANSIENT = RETRY_EVERYTHING.copy(retry=retry_if_exception(is_transient))


def in_transaction(conn, fn, *args):
    """Run fn(cur, *args) and commit; roll back on any error so the connection stays usable."""
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


def pay_and_refresh_naive(conn, report_params: dict, order_id: int) -> None:
    """Naive scope: the caller retries this whole function, the committed payment included."""
    in_transaction(conn, record_payment, order_id)
    ping_via(report_params)  # refresh the report over the network: the connection may fail


def pay_once_retry_refresh(conn, report_params: dict, order_id: int, policy: Retrying = RETRY_TRANSIENT) -> None:
    """Fixed scope: the payment runs once; only the idempotent refresh is retried."""
    in_transaction(conn, record_payment, order_id)
    policy(ping_via, report_params)


def transfer(cur, src: int, dst: int, amount: int, barrier=None) -> None:
    cur.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, src))
    if barrier is not None:
        barrier.wait()  # both transactions now hold their first row: each second UPDATE waits for the other
    cur.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, dst))


def transfer_worker(conn, src: int, dst: int, amount: int, barrier, out: dict) -> None:
    """One transfer as one transaction, retried whole when it is transient (the deadlock victim's is)."""
    failed = []
    policy = RETRY_TRANSIENT.copy(wait=wait_fixed(0.02), before_sleep=lambda rs: failed.append(rs.outcome.exception()))
    for attempt in policy:
        with attempt:
            first = attempt.retry_state.attempt_number == 1
            in_transaction(conn, transfer, src, dst, amount, barrier if first else None)
    out[src] = {"attempts": policy.statistics["attempt_number"], "errors": failed}


def blip_over_before_retry(proxy, seen: list):
    """A before_sleep hook: note the error; the network blip is over by the time the retry runs."""
    def hook(rs: RetryCallState) -> None:
        seen.append(rs.outcome.exception())
        proxy.up()
    return hook


@scenario("non_transient", "Retrying errors that can never succeed, and steps that must not repeat")
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
    with s.expect(psycopg2.errors.UndefinedTable, sqlstate="42P01") as permanent:
        policy(in_transaction, s.conn, read_daily_report)
    wasted = s.measure("permanent_error_seconds_naive", round(time.monotonic() - started, 3))
    naive_attempts = s.measure("permanent_error_attempts_naive", policy.statistics["attempt_number"])
    s.triggered_if(naive_attempts == 5 and codes == ["42P01"] * 4,
                   f"the same 42P01 on all {naive_attempts} attempts, {wasted} s spent, and the same error at the end")
    lost: list = []
    proxy.down()
    RETRY_EVERYTHING.copy(before_sleep=blip_over_before_retry(proxy, lost))(pay_and_refresh_naive, s.conn,
                                                                            report_params, 42)
    if lost:
        s.observe(lost[0], "The report's connection failed after the payment; the policy re-ran the whole function:")
    paid = s.measure("order_42_payments", db.scalar(s.conn, "SELECT count(*) FROM payments WHERE order_id = 42"))
    s.triggered_if(paid == 2, f"order 42 was charged {paid} times: the retry re-ran the committed payment")

    s.root_cause("""
        "Retry everything" treats a missing table like a dropped connection. A permanent error
        (22xxx bad data, 23xxx constraint, 42xxx syntax or missing object) fails the same way on
        every attempt: retrying only adds delay before the same error. And the retry scope
        covered a step that had already committed: the report's connection failed AFTER the
        payment, so the retry charged again. Retry only transient errors, and only the smallest
        unit that is safe to run twice.""",
        detect="SELECT order_id, count(*) FROM payments GROUP BY 1 HAVING count(*) > 1;")
    with s.step("classify the errors this run really raised: is_transient(exc)") as st:
        seen = [permanent.exc] + lost[:1]
        s.table(["error", "SQLSTATE", "is_transient"],
                [[type(e).__name__, e.pgcode, is_transient(e)] for e in seen if e is not None])
        st.result = "retry the connection loss, not the missing table"
    started = time.monotonic()
    policy = RETRY_TRANSIENT.copy()
    with s.expect(psycopg2.errors.UndefinedTable, sqlstate="42P01"):
        policy(in_transaction, s.conn, read_daily_report)
    fixed_attempts = s.measure("permanent_error_attempts_fixed", policy.statistics["attempt_number"])
    s.recovered_if(fixed_attempts == 1, f"the permanent error fails fast: 1 attempt, "
                                        f"{1000 * (time.monotonic() - started):.0f} ms")
    with s.step("charge order 43 with the narrow scope; the report's connection fails once again") as st:
        proxy.down()
        policy = RETRY_TRANSIENT.copy(before_sleep=blip_over_before_retry(proxy, lost))
        pay_once_retry_refresh(s.conn, report_params, 43, policy)
        refresh_attempts = policy.statistics["attempt_number"]
        st.result = f"report refreshed on attempt {refresh_attempts}"
    paid = db.scalar(s.conn, "SELECT count(*) FROM payments WHERE order_id = 43")
    s.measure("order_43_payments", paid)
    s.recovered_if(paid == 1 and refresh_attempts == 2,
                   f"order 43 charged {paid} time, while the refresh was retried once")
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
        for w in [s.thread(transfer_worker, a, 1, 2, 10, barrier, out),
                  s.thread(transfer_worker, b, 2, 1, 30, barrier, out)]:
            w.join(10)
        deadlocks = [e for r in out.values() for e in r["errors"]]
        for e in deadlocks:
            s.observe(e, "the victim's first attempt (its transaction was rolled back, so it is safe to rerun):")
        victim = max((r["attempts"] for r in out.values()), default=0)
        st.result = f"attempts: transfer 1->2: {out.get(1, {}).get('attempts')}, 2->1: {out.get(2, {}).get('attempts')}"
    s.measure("deadlock_attempts", victim)
    balances = db.rows(s.conn, "SELECT id, balance FROM accounts ORDER BY id")
    s.recovered_if(victim == 2 and [e.pgcode for e in deadlocks] == ["40P01"] and all(map(is_transient, deadlocks)),
                   f"the deadlock victim (40P01, transient) succeeded on attempt {victim}")
    s.recovered_if(balances == [(1, 120), (2, 80)], f"balances {balances}: each transfer applied exactly once")

    s.prevention("""
        Retry only what can succeed next time (is_transient, with retry_if_exception) and only the
        unit that is safe to repeat: a whole transaction that rolled back, or an idempotent step;
        never a scope that contains a write that already committed.""",
        is_transient, "RETRY_TRANSIENT = RETRY_EVERYTHING.copy(retry=retry_if_exception(is_transient))",
        pay_once_retry_refresh)


if __name__ == "__main__":
    main()
