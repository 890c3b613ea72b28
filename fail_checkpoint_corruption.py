"""Checkpoints that lie: corruption, a store that goes down, racing workers, a killed run.

The pipeline under test copies 3,000 rows from `source_rows` to `target_rows` in batches of 500
and records a checkpoint after each batch: the last id copied, the rows done and a checksum of
everything up to that id. A checkpoint is only worth something if it describes the data exactly.
Each scenario breaks that for real, measures the damage, recovers, and ends with the same
proof: target equals source by count and checksum, every id exactly once.

Run: python fail_checkpoint_corruption.py [--only ID] [--json PATH] [--keep] [--ascii]
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import psutil
import psycopg2
import psycopg2.errors
from psycopg2 import sql
from tenacity import (Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential)

from common import db, main, scenario, schema
from common.faults import SlowDisk

SOURCE_ROWS = 3_000
BATCH = 500
JOB = "orders_copy"
LEASE_S = 0.3  # production: 30 s to 5 min, a few heartbeats long


# -- the pipeline, shared by every scenario ----------------------------------------------------
def copy_batch(cur, after_id: int, table: str = "target_rows") -> int | None:
    """Copy the next batch after `after_id`; return the last id copied (None when done)."""
    cur.execute(sql.SQL("INSERT INTO {} (id, payload, amount) SELECT id, payload, amount FROM source_rows "
                        "WHERE id > %s ORDER BY id LIMIT %s RETURNING id").format(sql.Identifier(table)),
                (after_id, BATCH))
    ids = [r[0] for r in cur.fetchall()]
    return max(ids) if ids else None


def prefix_checksum(cur, table: str, last_id: int) -> str:
    """md5 of every (id, amount) up to last_id: what a checkpoint claims about the data."""
    cur.execute(sql.SQL("SELECT coalesce(md5(string_agg(id || ':' || amount, ',' ORDER BY id)), '') "
                        "FROM {} WHERE id <= %s").format(sql.Identifier(table)), (last_id,))
    return cur.fetchone()[0]


def set_checkpoint(cur, last_id: int, **extra) -> None:
    """Move the checkpoint row and append the move to checkpoint_history."""
    cur.execute("SELECT count(*) FROM source_rows WHERE id <= %s", (last_id,))
    rows_done = cur.fetchone()[0]
    checksum = prefix_checksum(cur, "source_rows", last_id)
    cur.execute("INSERT INTO checkpoints (job, last_id, rows_done, checksum) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (job) DO UPDATE SET last_id = excluded.last_id, rows_done = excluded.rows_done, "
                "checksum = excluded.checksum, version = checkpoints.version + 1, updated_at = clock_timestamp()",
                (JOB, last_id, rows_done, checksum))
    cur.execute("INSERT INTO checkpoint_history (job, last_id, rows_done, checksum) VALUES (%s, %s, %s, %s)",
                (JOB, last_id, rows_done, checksum))
    for column, value in extra.items():
        cur.execute(sql.SQL("UPDATE checkpoints SET {} = %s WHERE job = %s").format(sql.Identifier(column)),
                    (value, JOB))


def read_checkpoint(conn) -> int:
    return db.scalar(conn, "SELECT coalesce(max(last_id), 0) FROM checkpoints WHERE job = %s", (JOB,)) or 0


def fresh_pipeline(s, sink: str = "target_rows") -> None:
    """The known starting state: 3,000 source rows, an empty target, no checkpoint."""
    s.tables("source_rows", "target_rows", "checkpoints", "checkpoint_history")
    with s.conn.cursor() as cur:
        cur.execute("TRUNCATE target_rows, checkpoints, checkpoint_history")
        if sink != "target_rows":  # an append-only sink with no key, as many warehouse tables are
            cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (id integer, payload text, amount numeric(12,2))")
                        .format(sql.Identifier(sink)))
            cur.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(sink)))
    s.conn.commit()
    if not db.scalar(s.conn, "SELECT count(*) FROM source_rows"):
        schema.seed_source(s.conn, SOURCE_ROWS)


def damage(conn, table: str = "target_rows") -> dict:
    """What is wrong with the copy, by query: ids missing, ids present more than once."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT (SELECT count(*) FROM source_rows s WHERE NOT EXISTS "
                            "   (SELECT 1 FROM {t} t WHERE t.id = s.id)), "
                            "(SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) n FROM {t} GROUP BY id) d)")
                    .format(t=sql.Identifier(table)))
        missing, duplicated = cur.fetchone()
    return {"missing": missing, "duplicated": int(duplicated)}


def prove_exactly_once(s, table: str = "target_rows") -> None:
    """The proof every scenario ends with: same count and checksum as the source, no gap, no duplicate."""
    s.conn.rollback()
    source = db.fingerprint(s.conn, "source_rows", "id", ["id", "payload", "amount"])
    target = db.fingerprint(s.conn, table, "id", ["id", "payload", "amount"])
    found = damage(s.conn, table)
    s.table(["", "rows", "checksum (md5)"], [["source_rows", source[0], source[1]], [table, target[0], target[1]]])
    s.recovered_if(source == target, f"{table} equals source_rows by count and checksum")
    s.recovered_if(found == {"missing": 0, "duplicated": 0},
                   f"every id exactly once (missing {found['missing']}, duplicated {found['duplicated']})")


# -- 1. corruption --------------------------------------------------------------------------------
def save_checkpoint_naive(path: Path, state: dict, slow: float = 0.0) -> None:
    """Overwrites the file in place: between open() and the last write, there is no valid checkpoint."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(state, SlowDisk(f, slow) if slow else f)


def save_checkpoint_atomic(path: Path, state: dict, slow: float = 0.0) -> None:
    """Write a temp file, fsync it, then os.replace: readers see the old file or the new, never half."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, SlowDisk(f, slow) if slow else f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint_worker(saver_name: str, path: str, state: dict) -> None:
    """Runs in a child process that the scenario kills mid-write."""
    globals()[saver_name](Path(path), state, slow=0.01)


def kill_mid_write(s, saver, path: Path, state: dict) -> int:
    """Start a process that saves a checkpoint to a slow disk, SIGKILL it halfway; return the
    bytes it had written (the file it was writing is left as the kill found it)."""
    proc = s.spawn(write_checkpoint_worker, saver.__name__, str(path), state)
    watched = path.with_suffix(".tmp") if saver is save_checkpoint_atomic else path
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if watched.exists() and watched.stat().st_size > 40:
            break
        time.sleep(0.005)
    proc.kill()  # SIGKILL: no finally, no flush, no atexit; what is on disk is what stays
    proc.join(5)
    return watched.stat().st_size if watched.exists() else 0


def run_naive_file_job(s, path: Path) -> None:
    """Saves the file checkpoint BEFORE the batch commits; the batch holding poison_id fails."""
    last_id = 0
    with s.conn.cursor() as cur:
        while True:
            next_id = min(last_id + BATCH, SOURCE_ROWS)
            if last_id >= SOURCE_ROWS:
                break
            save_checkpoint_naive(path, {"job": JOB, "last_id": next_id})  # too early
            copy_batch(cur, last_id)  # raises for the poisoned batch
            s.conn.commit()
            last_id = next_id


@scenario("corruption", "Checkpoint corruption")
def corruption(s):
    fresh_pipeline(s)
    path = s.tmpdir / "checkpoint.json"
    s.description(f"""
        A batch job copies {SOURCE_ROWS:,} rows in batches of {BATCH} and keeps its checkpoint in a JSON
        file, {{"job": ..., "last_id": ...}}. On restart it resumes after last_id. The checkpoint must
        describe data that is really committed, and must survive a crash at any instant.""")
    s.trigger("""
        (a) A process saving the checkpoint is killed (SIGKILL) halfway through writing the file,
            which it overwrites in place. Then the job restarts and reads it.
        (b) The job saves the checkpoint before the batch commits. A row violating a CHECK constraint
            makes batch 3 fail; an operator fixes the row and restarts the job from the checkpoint.""")

    # (a) torn write: a real kill, a real half-written file, a real parse error
    save_checkpoint_naive(path, {"job": JOB, "last_id": 1000})
    big_state = {"job": JOB, "last_id": 1500, "batches": [[i, i + BATCH] for i in range(0, SOURCE_ROWS, BATCH)] * 4}
    torn = kill_mid_write(s, save_checkpoint_naive, path, big_state)
    s.measure("torn_file_bytes", torn, f"of {len(json.dumps(big_state))}")
    with s.expect(json.JSONDecodeError):
        json.loads(path.read_text(encoding="utf-8"))

    # (b) valid JSON, wrong content: the checkpoint ran ahead of the data
    with s.conn.cursor() as cur:
        cur.execute("ALTER TABLE target_rows ADD CONSTRAINT amount_not_negative CHECK (amount >= 0)")
        cur.execute("UPDATE source_rows SET amount = -amount WHERE id = 1203")  # the poison row
    s.conn.commit()
    with s.expect(psycopg2.errors.CheckViolation, sqlstate="23514"):
        run_naive_file_job(s, path)
    s.conn.rollback()
    with s.conn.cursor() as cur:
        cur.execute("UPDATE source_rows SET amount = -amount WHERE id = 1203")  # the operator's fix
    s.conn.commit()
    resume_from = json.loads(path.read_text(encoding="utf-8"))["last_id"]
    s.say(f"The checkpoint parses fine and says last_id = {resume_from}. The job resumes from there.")
    with s.conn.cursor() as cur:
        last = resume_from
        while (last := copy_batch(cur, last)) is not None:
            pass
    s.conn.commit()
    found = damage(s.conn)
    gap = db.scalar(s.conn, "SELECT min(id) || '-' || max(id) FROM source_rows s "
                            "WHERE NOT EXISTS (SELECT 1 FROM target_rows t WHERE t.id = s.id)")
    s.measure("rows_missing_before", found["missing"], f"ids {gap}, silently skipped")
    s.triggered_if(found["missing"] == BATCH, f"the resumed job finished 'successfully' with {BATCH} rows missing")

    s.root_cause("""
        (a) open(path, "w") truncates the file first; until the last write lands there is no valid
            checkpoint on disk at all, so any crash in that window destroys the only copy.
        (b) The checkpoint claimed rows that were never committed. A checkpoint written outside the
            transaction of the data it describes can run ahead of it (rows skipped) or fall behind
            it (rows copied twice).""", detect="""
        -- a checkpoint is valid only if the target really holds what it claims (checksum up to last_id)
        SELECT last_id, checksum = (SELECT md5(string_agg(id || ':' || amount, ',' ORDER BY id))
                                    FROM target_rows WHERE id <= last_id) AS valid
        FROM checkpoint_history ORDER BY seq DESC;""")

    with s.step("Validate the file checkpoint against the target (shape, then checksum)") as st:
        with s.conn.cursor() as cur:
            claimed = prefix_checksum(cur, "source_rows", resume_from)
            actual = prefix_checksum(cur, "target_rows", resume_from)
        st.result = f"last_id {resume_from}: checksum {'matches' if claimed == actual else 'does NOT match'} the target"
        s.recovered_if(claimed != actual, "validation rejects the checkpoint that ran ahead of the data")
    with s.step("Derive the last valid checkpoint from the target itself (longest gap-free prefix)") as st:
        valid_id = db.scalar(s.conn, "SELECT coalesce(min(s.id) - 1, max(s.id)) FROM source_rows s "
                                     "WHERE NOT EXISTS (SELECT 1 FROM target_rows t WHERE t.id = s.id)")
        st.result = f"last valid last_id = {valid_id}"
    with s.step(f"Rewind: delete target rows after {valid_id} and store that checkpoint, in one transaction") as st:
        with s.conn.cursor() as cur:
            cur.execute("DELETE FROM target_rows WHERE id > %s", (valid_id,))
            st.result = f"{cur.rowcount} rows removed"
            set_checkpoint(cur, valid_id)
        s.conn.commit()
    with s.step("Re-run with the checkpoint committed in the same transaction as each batch") as st:
        batches = run_job_transactional(s.conn)
        st.result = f"{batches} batches"
    prove_exactly_once(s)
    with s.step("Kill the atomic saver mid-write too: the previous checkpoint must survive") as st:
        save_checkpoint_atomic(path, {"job": JOB, "last_id": 1000})
        torn = kill_mid_write(s, save_checkpoint_atomic, path, big_state)
        survived = json.loads(path.read_text(encoding="utf-8"))
        st.result = (f"killed with {torn} of {len(json.dumps(big_state))} bytes in checkpoint.tmp; "
                     f"checkpoint.json still parses: last_id = {survived['last_id']}")
        s.recovered_if(0 < torn < len(json.dumps(big_state)) and survived["last_id"] == 1000,
                       "killed mid-write, the atomic saver left the previous checkpoint intact")
    s.measure("rows_missing_after", damage(s.conn)["missing"])

    s.prevention("""
        Keep the checkpoint in the database, in the same transaction as the batch it describes: both
        commit or neither does. When it must be a file, never overwrite in place: temp file, fsync,
        os.replace. On resume, validate before trusting, and fall back to what the data proves.""",
                 run_job_transactional, save_checkpoint_atomic)


def run_job_transactional(conn, after_commit=lambda last_id: None) -> int:
    """The fixed job: each batch and its checkpoint commit together, so they can never disagree."""
    batches = 0
    with conn.cursor() as cur:
        while (last_id := copy_batch(cur, read_checkpoint(conn))) is not None:
            set_checkpoint(cur, last_id)
            conn.commit()  # batch + checkpoint: one atomic step
            batches += 1
            after_commit(last_id)
    conn.commit()
    return batches


# -- 2. db_down -------------------------------------------------------------------------------------
def run_job_naive_store(data_conn, store_conn, sink: str, after_data_commit=lambda last_id: None) -> None:
    """Data on one connection, checkpoint on another: two commits, two separate fates."""
    with data_conn.cursor() as data, store_conn.cursor() as store:
        last_id = read_checkpoint(store_conn)
        while (new_last := copy_batch(data, last_id, sink)) is not None:
            data_conn.commit()
            after_data_commit(new_last)  # the fault-injection point
            set_checkpoint(store, new_last)
            store_conn.commit()  # fails if the store went down after the data commit
            last_id = new_last


@scenario("db_down", "Checkpoint store down")
def db_down(s):
    fresh_pipeline(s, sink="sink_rows")
    proxy = s.proxy()
    s.description("""
        The job writes data to the warehouse and its checkpoint to a checkpoint store (here: the
        same PostgreSQL, reached through a fault-injecting proxy). If the store goes away, the job
        must neither lose its place nor copy anything twice.""")
    s.trigger("""
        After batch 3 commits its data, the proxy drops every connection and refuses new ones. The
        naive job's checkpoint write fails. The store comes back; the job is restarted.""")
    data_conn = s.connect()
    store_conn = s.connect(s.via(proxy))

    def outage_after_batch_3(last_id):  # the store disappears between data commit and checkpoint write
        if last_id == 3 * BATCH:
            proxy.down()

    with s.expect(psycopg2.OperationalError):
        run_job_naive_store(data_conn, store_conn, "sink_rows", after_data_commit=outage_after_batch_3)
    proxy.up()
    store_conn = s.connect(s.via(proxy))
    s.say(f"The store is back. The last checkpoint it holds: last_id = {read_checkpoint(store_conn)}. Restarting.")
    run_job_naive_store(data_conn, store_conn, "sink_rows")
    found = damage(s.conn, "sink_rows")
    s.measure("rows_duplicated_before", found["duplicated"])
    s.triggered_if(found["duplicated"] == BATCH, f"the restart copied batch 3 ({BATCH} rows) a second time")

    s.root_cause("""
        Data and checkpoint were committed separately. The data commit succeeded; the checkpoint
        commit never happened. The restart trusted the older checkpoint and re-copied a batch that
        was already in. Any process can die between two commits; only one commit is atomic.""", detect="""
        SELECT id, count(*) FROM sink_rows GROUP BY id HAVING count(*) > 1;      -- duplicates
        SELECT max(id) FROM sink_rows;  -- vs checkpoints.last_id: data ahead of its checkpoint""")

    with s.step("Remove the duplicates: keep one row per id, in one transaction") as st:
        with s.conn.cursor() as cur:
            cur.execute("DELETE FROM sink_rows a USING sink_rows b WHERE a.id = b.id AND a.ctid > b.ctid")
            st.result = f"{cur.rowcount} duplicate rows deleted"
        s.conn.commit()
    prove_exactly_once(s, "sink_rows")
    with s.step("Start over the right way: target with a key, checkpoint in the data's transaction") as st:
        with s.conn.cursor() as cur:
            cur.execute("TRUNCATE target_rows, checkpoints")
        s.conn.commit()
        st.result = "empty target_rows, no checkpoint"
    def outage_for_300ms(last_id):
        if last_id == 3 * BATCH:
            proxy.down()
            s.thread(restore_after, proxy, 0.3)

    with s.step("Run the fixed job through the proxy; the store fails after batch 3, for 0.3 s") as st:
        attempts = run_job_resilient(lambda: s.connect(s.via(proxy)), after_commit=outage_for_300ms)
        st.result = (f"finished after {attempts} connection attempts; "
                     f"{proxy.count('down')} refused by the outage")
        s.measure("reconnect_attempts", attempts)
        s.recovered_if(attempts > 1, "the job reconnected (tenacity) and resumed instead of dying")
    prove_exactly_once(s)
    s.prevention("""
        One transaction per batch for data and checkpoint, and on any connection error: reconnect with
        bounded, jittered backoff (tenacity) and resume from the committed checkpoint. Whether the
        lost COMMIT landed or not, the checkpoint read after reconnecting says exactly where the data is.""",
                 run_job_resilient)


def run_job_resilient(connect, after_commit=lambda last_id: None) -> int:
    """Reconnect and resume from the committed checkpoint; data and checkpoint commit together."""
    retrying = Retrying(retry=retry_if_exception_type(psycopg2.OperationalError),
                        stop=stop_after_attempt(20),  # bounded: an outage longer than that is a page, not a loop
                        wait=wait_random_exponential(multiplier=0.01, max=0.2),  # prod: ~0.5 s up to 30 s
                        reraise=True)
    for attempt in retrying:
        with attempt:
            conn = connect()
            try:
                run_job_transactional(conn, after_commit)  # resumes from the committed checkpoint
            finally:
                conn.close()
    return attempt.retry_state.attempt_number


def restore_after(proxy, seconds: float) -> None:
    time.sleep(seconds)
    proxy.up()


# -- 3. concurrent_access -------------------------------------------------------------------------
def worker_naive(params, sink, start, proceed, name):
    """Read the checkpoint, copy the next batch, write the checkpoint: three steps, no lock."""
    conn = psycopg2.connect(**params)
    try:
        with conn.cursor() as cur:
            last_id = read_checkpoint(conn)
            conn.commit()
            start.wait()  # both workers have read the same checkpoint
            if name == "B":
                proceed.wait(30)  # B is the slow one: it writes after A has moved on
            new_last = copy_batch(cur, last_id, sink)
            set_checkpoint(cur, new_last)
            conn.commit()
            if name == "A":  # A, fast, takes one more batch before B finishes
                new_last = copy_batch(cur, read_checkpoint(conn), sink)
                set_checkpoint(cur, new_last)
                conn.commit()
                proceed.set()
    finally:
        conn.close()


def worker_locked(params, sink, start, batches):
    """SELECT ... FOR UPDATE: claim the checkpoint row, copy, move it, commit; the other worker waits."""
    conn = psycopg2.connect(**params)
    try:
        start.wait()
        with conn.cursor() as cur:
            for _ in range(batches):
                cur.execute("SELECT last_id FROM checkpoints WHERE job = %s FOR UPDATE", (JOB,))
                new_last = copy_batch(cur, cur.fetchone()[0], sink)
                set_checkpoint(cur, new_last)
                conn.commit()
    finally:
        conn.close()


def worker_compare_and_set(params, sink, start, batches, losses):
    """Optimistic: read last_id and version, copy, and move the checkpoint only if the version is unchanged."""
    conn = psycopg2.connect(**params)
    try:
        with conn.cursor() as cur:
            for _ in range(batches):
                for attempt in Retrying(retry=retry_if_exception_type(LostRace), stop=stop_after_attempt(20),
                                        wait=wait_random_exponential(multiplier=0.002, max=0.02), reraise=True):
                    with attempt:
                        cur.execute("SELECT last_id, version FROM checkpoints WHERE job = %s", (JOB,))
                        last_id, version = cur.fetchone()
                        if version == 0:  # the race, every run: neither writes before both have read
                            start.wait()
                        new_last = copy_batch(cur, last_id, sink)
                        cur.execute("UPDATE checkpoints SET last_id = %s, version = version + 1 "
                                    "WHERE job = %s AND version = %s", (new_last, JOB, version))
                        if cur.rowcount == 0:  # someone moved it first: undo our copy and try again
                            conn.rollback()
                            losses.append(1)
                            raise LostRace()
                        conn.commit()
    finally:
        conn.close()


class LostRace(Exception):
    """Compare-and-set found a newer version: our batch was rolled back and will be retried."""


@scenario("concurrent_access", "Concurrent checkpoint access")
def concurrent_access(s):
    fresh_pipeline(s, sink="sink_rows")
    s.description("""
        Two workers share one job and one checkpoint, each with its own connection (a scheduler
        started the job twice, or a deploy overlapped). Each batch must be copied by exactly one
        worker, and the checkpoint must only move forward.""")
    s.trigger("""
        Both workers read the checkpoint at the same moment (a barrier makes the race happen every
        run), both copy "the next batch", both write the checkpoint. Worker A is fast and takes a
        second batch; worker B, slower, writes its checkpoint last.""")
    start, proceed = s.barrier(2), s.event()
    _join([s.thread(worker_naive, s.params, "sink_rows", start, proceed, name) for name in ("A", "B")])
    found = damage(s.conn, "sink_rows")
    moves = [r[0] for r in db.rows(s.conn, "SELECT last_id FROM checkpoint_history ORDER BY seq")]
    backwards = sum(1 for a, b in zip(moves, moves[1:]) if b < a)
    s.measure("rows_duplicated", found["duplicated"], "both workers copied batch 1")
    s.measure("checkpoint_moves", " -> ".join(map(str, moves)))
    s.measure("checkpoint_moved_backwards", backwards)
    s.triggered_if(found["duplicated"] == BATCH, f"batch 1 was copied twice ({BATCH} duplicate rows)")
    s.triggered_if(backwards == 1 and read_checkpoint(s.conn) == BATCH,
                   f"lost update: the checkpoint went back from {2 * BATCH} to {BATCH}")

    s.root_cause("""
        Read-modify-write without a lock: both workers decided from the same snapshot. The database
        did what each asked; nothing made the second writer notice the first (a lost update).""",
                 detect="""
        SELECT seq, last_id, last_id < lag(last_id) OVER (ORDER BY seq) AS moved_backwards
        FROM checkpoint_history WHERE job = 'orders_copy' ORDER BY seq;""")

    batches = SOURCE_ROWS // BATCH // 2
    with s.step("Fix 1, pessimistic: SELECT ... FOR UPDATE on the checkpoint row, same race") as st:
        _reset(s)
        start = s.barrier(2)
        _join([s.thread(worker_locked, s.params, "sink_rows", start, batches) for _ in range(2)])
        found = damage(s.conn, "sink_rows")
        st.result = f"missing {found['missing']}, duplicated {found['duplicated']}, checkpoint {read_checkpoint(s.conn)}"
        s.recovered_if(found == {"missing": 0, "duplicated": 0} and read_checkpoint(s.conn) == SOURCE_ROWS,
                       "row lock: each batch copied exactly once, checkpoint at the end")
    with s.step("Fix 2, optimistic: compare-and-set on checkpoints.version, same race") as st:
        _reset(s)
        start, losses = s.barrier(2), []
        _join([s.thread(worker_compare_and_set, s.params, "sink_rows", start, batches, losses) for _ in range(2)])
        found = damage(s.conn, "sink_rows")
        s.measure("compare_and_set_conflicts", len(losses), "each one rolled back and retried")
        st.result = f"missing {found['missing']}, duplicated {found['duplicated']}, {len(losses)} lost races retried"
        s.recovered_if(found == {"missing": 0, "duplicated": 0} and len(losses) >= 1,
                       "compare-and-set: the loser noticed, rolled back its batch and retried")
    with s.step("Fix 3, let the database refuse: REPEATABLE READ, two writers of one row") as st:
        _reset(s)
        first, second = s.connect(), s.connect()
        for c in (first, second):
            c.set_session(isolation_level="REPEATABLE READ")
            read_checkpoint(c)  # both snapshots taken
        with first.cursor() as cur:
            set_checkpoint(cur, BATCH)
        first.commit()
        with s.expect(psycopg2.errors.SerializationFailure, sqlstate="40001"):
            with second.cursor() as cur:
                set_checkpoint(cur, BATCH)
        second.rollback()
        st.result = "the second writer got 40001; it must retry from a fresh snapshot"
    with s.step("Run the whole job with two locked workers racing into target_rows") as st:
        _reset(s)
        start = s.barrier(2)
        _join([s.thread(worker_locked, s.params, "target_rows", start, batches) for _ in range(2)])
        st.result = f"checkpoint at {read_checkpoint(s.conn)}"
    prove_exactly_once(s)
    s.prevention("""
        Make "read checkpoint, do batch, move checkpoint" one transaction that holds the checkpoint
        row (FOR UPDATE, or an advisory lock per job), or check the version when you write it, or run
        it at REPEATABLE READ/SERIALIZABLE and retry 40001. Never two unguarded writers.""",
                 worker_locked, worker_compare_and_set)


def _reset(s) -> None:
    with s.conn.cursor() as cur:
        cur.execute("TRUNCATE sink_rows, target_rows, checkpoints, checkpoint_history")
        cur.execute("INSERT INTO checkpoints (job) VALUES (%s)", (JOB,))
    s.conn.commit()


def _join(threads) -> None:
    for t in threads:
        t.join(60)


# -- 4. interrupted_recovery ----------------------------------------------------------------------
def claim_naive(conn, owner: str) -> bool:
    """Start only if nobody is running: a dead owner blocks the job forever."""
    with conn.cursor() as cur:
        cur.execute("UPDATE checkpoints SET status = 'in_progress', owner = %s, heartbeat = now() "
                    "WHERE job = %s AND status <> 'in_progress'", (owner, JOB))
        claimed = cur.rowcount == 1
    conn.commit()
    return claimed


def claim_with_lease(conn, owner: str, lease_s: float) -> bool:
    """Take the job if it is free, or if its owner's lease expired; compare-and-set on version."""
    with conn.cursor() as cur:
        cur.execute("SELECT status, owner, heartbeat < now() - make_interval(secs => %s), version "
                    "FROM checkpoints WHERE job = %s", (lease_s, JOB))
        status, old_owner, expired, version = cur.fetchone()
        if status == "in_progress" and not expired and owner_alive(old_owner):
            conn.commit()
            return False
        cur.execute("UPDATE checkpoints SET status = 'in_progress', owner = %s, heartbeat = now(), "
                    "version = version + 1 WHERE job = %s AND version = %s", (owner, JOB, version))
        claimed = cur.rowcount == 1  # 0: another restarter won the takeover
    conn.commit()
    return claimed


def owner_alive(owner: str | None) -> bool:
    """owner is "host:pid:start-time"; a pid alone could have been reused by another process."""
    try:
        host, pid, stamp = owner.split(":", 2)
        return host == socket.gethostname() and repr(psutil.Process(int(pid)).create_time()) == stamp
    except (AttributeError, ValueError, psutil.Error):
        return False


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time()!r}"


def leased_worker(params) -> None:
    """The job as a real process: claims the job, copies batches with heartbeats; batch 3 is slow."""
    conn = psycopg2.connect(**params)
    with conn.cursor() as cur:
        # Without this, a backend whose client died sleeps on, holding its locks, until it next
        # talks to the client (PostgreSQL 14+ checks the socket at this interval).
        cur.execute("SET client_connection_check_interval = '50ms'")
    claim_naive(conn, owner_id())
    with conn.cursor() as cur:
        while (last_id := read_checkpoint(conn)) < SOURCE_ROWS:
            new_last = copy_batch(cur, last_id)
            if last_id == 2 * BATCH:
                cur.execute("SELECT pg_sleep(30)")  # batch 3 is slow: the scenario kills us in here
            set_checkpoint(cur, new_last)
            cur.execute("UPDATE checkpoints SET heartbeat = now() WHERE job = %s", (JOB,))
            conn.commit()


def worker_backends(s) -> int:
    """Backends of this scenario that are sleeping inside batch 3 (the worker's)."""
    return db.scalar(s.conn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                             "AND pid <> pg_backend_pid() AND query LIKE 'SELECT pg_sleep%%'", (s.app,))


def wait_for(s, condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        s.conn.rollback()  # a new transaction sees fresh pg_stat_activity
        if condition() or time.monotonic() > deadline:
            s.conn.rollback()
            return condition()
        time.sleep(0.02)


@scenario("interrupted_recovery", "Recovery of an interrupted run")
def interrupted_recovery(s):
    fresh_pipeline(s)
    with s.conn.cursor() as cur:
        cur.execute("INSERT INTO checkpoints (job) VALUES (%s)", (JOB,))
    s.conn.commit()
    s.description("""
        The job runs as its own process and marks its run in the checkpoint row: status
        'in_progress', its owner, a heartbeat. Batches commit with their checkpoint. A restart after
        a crash must resume where the dead run stopped: not refuse, not start over.""")
    s.trigger("The job process is killed with SIGKILL in the middle of batch 3 (no cleanup can run).")
    proc = s.spawn(leased_worker, s.params)
    s.require(wait_for(s, lambda: worker_backends(s) == 1, 20), "the worker process is inside batch 3")
    proc.kill()  # SIGKILL on POSIX, TerminateProcess on Windows
    proc.join(5)
    s.measure("worker_exit_code", proc.exitcode, "negative: killed by that signal")
    s.require(wait_for(s, lambda: worker_backends(s) == 0, 5),
              "the server noticed the dead client and rolled back its open batch")
    with s.conn.cursor() as cur:
        cur.execute("SELECT status, owner, last_id FROM checkpoints WHERE job = %s", (JOB,))
        status, owner, last_id = cur.fetchone()
    s.conn.commit()
    s.table(["status", "owner (dead)", "last_id"], [[status, owner.rsplit(":", 1)[0], last_id]])
    s.triggered_if(status == "in_progress" and not owner_alive(owner), "the run is left 'in_progress', held by a dead owner")
    claimed = claim_naive(s.conn, owner_id())
    s.measure("naive_restart_claimed", claimed)
    s.triggered_if(not claimed, "naive restart refuses: 'already running', forever")
    with s.expect(psycopg2.errors.UniqueViolation, sqlstate="23505", label="forced restart from zero: UniqueViolation"):
        with s.conn.cursor() as cur:
            copy_batch(cur, 0)  # "just start over": batch 1 is already in
    s.conn.rollback()

    s.root_cause("""
        A lease without an expiry is a lock that dies with its holder. The killed process could not
        clear 'in_progress'. Starting over ignores the committed checkpoint (rows 1-1000 are in), and
        only the primary key stopped it from duplicating them.""", detect="""
        SELECT job, owner, heartbeat, now() - heartbeat AS silent_for FROM checkpoints
        WHERE status = 'in_progress' AND heartbeat < now() - interval '5 minutes';  -- stale lease""")

    with s.step(f"Wait until the heartbeat is older than the lease ({LEASE_S} s here; minutes in production)") as st:
        time.sleep(LEASE_S)
        st.result = f"owner alive: {owner_alive(owner)}"
    with s.step("Take the run over with compare-and-set on the version") as st:
        won = claim_with_lease(s.conn, owner_id(), LEASE_S)
        st.result = f"claimed: {won}"
        s.recovered_if(won, "stale lease detected and taken over")
    with s.step("Resume from the last committed checkpoint") as st:
        resumed_from = read_checkpoint(s.conn)
        batches = run_job_transactional(s.conn)
        with s.conn.cursor() as cur:
            cur.execute("UPDATE checkpoints SET status = 'done', owner = NULL WHERE job = %s", (JOB,))
        s.conn.commit()
        st.result = f"resumed after id {resumed_from}, {batches} batches copied"
        s.recovered_if(resumed_from == 2 * BATCH, f"resumed at {2 * BATCH}: batch 3 was rolled back with the process")
    prove_exactly_once(s)
    s.prevention("""
        Leases expire: record owner and heartbeat, renew the heartbeat with each batch, and let a
        restart take over a lease that is stale or whose owner is gone, atomically (compare-and-set).
        Resume from the checkpoint committed with the data, never from zero.""", claim_with_lease)


if __name__ == "__main__":
    main()
