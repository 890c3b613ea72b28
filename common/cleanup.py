"""Cleanup: end everything a scenario started, prove nothing is left, and keep a second Ctrl-C
from cutting that short. SIGTERM and SIGHUP become an exception, like Ctrl-C, so every
`finally` runs.
"""
from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import time

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
        if run.args.keep:
            with contextlib.suppress(Exception):  # an untagged schema is never swept as debris
                db.mark_kept(run.admin, s.schema)
            run.kept.append(s.schema)
        else:
            try:
                db.end_other_backends(run.admin)  # nothing of this run may hold a lock on the schema
                db.drop_schema(run.admin, s.schema)
                if db.schema_exists(run.admin, s.schema):
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


