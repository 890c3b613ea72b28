"""A scenario's fixes as values: what runs in each slot, the negative control, the exercise.

A scenario declares its fixes next to it, like a tenacity policy is built from small values:

    fix("save_checkpoint", naive=save_checkpoint_naive, fixed=save_checkpoint_atomic,
        contract="...what the fix must guarantee...", hints=("a nudge", "the idea"))

Its recovery calls `s.fix("save_checkpoint")`, and Prevention prints the source of whatever that
slot held. Three things can be in a slot:
- the fixed code (a normal run): the scenario must pass;
- the naive code (`--control SLOT`, a negative control): the same fault must make it fail;
- a student's function (`--exercise ID`), loaded from a file the student owns, run under a time
  limit per call: the scenario's own verdicts grade it.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CALL_LIMIT_S = 20.0  # a student's function that has not returned by then is stopped and graded failed


@dataclass(frozen=True)
class Fix:
    slot: str  # the name a student's file defines
    naive: Callable
    fixed: Callable
    contract: str  # what the fix must guarantee: the docstring of the exercise's function
    hints: tuple[str, ...] = ()


def fix(slot: str, *, naive: Callable, fixed: Callable, contract: str, hints: tuple[str, ...] = ()) -> Fix:
    return Fix(slot, naive, fixed, textwrap.dedent(contract).strip(), tuple(textwrap.dedent(h).strip() for h in hints))


class TimeLimitExceeded(Exception):
    """A student's function did not return within its time limit."""


class _Expired(BaseException):
    """What the timer raises inside a student's function: not an Exception, so that an
    `except Exception` in a retry loop cannot swallow it. The wrapper turns it (and whatever the
    cancelled queries raised on the way out) into TimeLimitExceeded."""


@dataclass
class CallLog:
    """What a student's function did in this run: how often it ran, what left it, whether it
    was stopped. (What it caught is not traced: a trace function in the thread changes how the
    lessons' races run.)"""
    slot: str
    limit: float
    file: str = ""
    calls: int = 0
    stopped: bool = False  # a call of it in this process ran out of time
    in_processes: int = 0  # handed to worker processes, where it runs untraced, under the same limit
    raised: list = field(default_factory=list)  # [(exception, line in the student's file or None)]
    shared: object = None  # the run's processes' flag: set by the first call anywhere that ran out of time

    @property
    def expired(self) -> bool:
        """A call of it ran out of time in this run: here, or in a worker process."""
        return self.stopped or (self.shared is not None and self.shared.is_set())

    @expired.setter
    def expired(self, value: bool) -> None:
        self.stopped = value

    @property
    def timeout_message(self) -> str:
        return f"{self.slot}() did not return within {self.limit:g} s"

    def raised_here(self, exc: BaseException) -> tuple | None:
        return next(((e, line) for e, line in self.raised if e is exc), None)


@dataclass
class Slots:
    """What each slot of one scenario holds for this run, and why."""
    fixes: tuple[Fix, ...]
    mode: str = "fixed"  # "fixed", "control" or "exercise"
    held: dict[str, Callable] = field(default_factory=dict)
    control: tuple[str, ...] = ()
    logs: dict[str, CallLog] = field(default_factory=dict)  # exercise: what the student's code did
    crash: BaseException | None = None  # the unexpected error that ended the scenario, if any

    @classmethod
    def for_run(cls, fixes, control: tuple[str, ...] = (), student=None, on_timeout=None,
                limit: float = CALL_LIMIT_S) -> "Slots":
        held = {f.slot: f.fixed for f in fixes}
        mode, logs = "fixed", {}
        if control:
            for slot in control:
                held[slot] = next(f.naive for f in fixes if f.slot == slot)
            mode = "control"
        if student is not None:
            for f in fixes:
                logs[f.slot] = CallLog(f.slot, limit, getattr(student, "__file__", "") or "")
                held[f.slot] = time_limited(getattr(student, f.slot), limit, on_timeout, logs[f.slot])
            mode = "exercise"
        return cls(tuple(fixes), mode, held, tuple(control), logs)

    def __getitem__(self, slot: str) -> Callable:
        try:
            return self.held[slot]
        except KeyError:
            raise KeyError(f"no fix slot {slot!r}; declared: {', '.join(self.held) or 'none'}") from None

    def entered(self) -> int:
        """How often the student's code was entered so far (called, or handed to a process): a
        claim can depend on it only once it has run; 0 outside an exercise."""
        return sum(log.calls + log.in_processes for log in self.logs.values())

    def stopped(self) -> bool:
        """Whether a call of the student's code was stopped at its limit so far in this run."""
        return any(log.expired for log in self.logs.values())

    def describe(self) -> dict[str, str]:
        """slot -> the qualified name of what it held (for the journal)."""
        return {slot: _qualname(inspect.unwrap(fn)) for slot, fn in self.held.items()}

    def sources(self) -> list[str]:
        return [source_of(fn) for fn in self.held.values()]

    # -- an exercise's crash, told as the student's --------------------------------------------------
    def crash_heading(self, exc: BaseException) -> str:
        """The line above an unexpected error: the student's own, or the scenario's."""
        self.crash = exc
        log = self._timed_out(exc)
        if log is not None:
            return f"Your {log.timeout_message}: it was stopped, its queries cancelled."
        found = self.student_raised(exc)
        if found is not None:
            log, line = found
            return f"Your {log.slot}() raised an error of its own{_where(log.file, line)}:"
        return "The scenario itself failed with an error it did not expect:"

    def crash_claim(self) -> str | None:
        """The failed claim for a crash that came out of the student's code, in their words."""
        exc = self.crash
        if exc is None:
            return None
        log = self._timed_out(exc)
        if log is not None:
            return log.timeout_message
        found = self.student_raised(exc)
        if found is None:
            return None
        log, line = found
        from common.output import error_type, redact

        message = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else "")[:200]
        return f"your {log.slot}() raised {error_type(exc)}: {message}{_where(log.file, line)}"

    def student_raised(self, exc: BaseException) -> tuple[CallLog, int | None] | None:
        for log in self.logs.values():
            hit = log.raised_here(exc)
            if hit is not None:
                return log, hit[1]
        return None

    def _timed_out(self, exc: BaseException) -> CallLog | None:
        if isinstance(exc, TimeLimitExceeded):
            return next((log for log in self.logs.values() if log.timeout_message in str(exc)), None)
        return None


def _where(file: str, line: int | None) -> str:
    if not file:
        return ""
    from common.output import typed_path

    return f" ({typed_path(file)}, line {line})" if line else f" ({typed_path(file)})"


def source_of(fn: Callable) -> str:
    return textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# -- the time limit ---------------------------------------------------------------------------------
class _Watch:
    """The timer of one call: it raises _Expired in the caller's thread once the limit is past,
    again each second, until the call is disarmed (under a lock, so nothing is left pending)."""

    def __init__(self, seconds: float, on_timeout: Callable | None):
        self.ident, self.lock, self.done = threading.get_ident(), threading.Lock(), threading.Event()
        self.fired, self.on_timeout = False, on_timeout
        self.timer = threading.Timer(seconds, self._interrupt)
        self.timer.daemon = True
        self.timer.start()

    def _interrupt(self) -> None:
        first = True
        while not self.done.wait(0 if first else 1.0):
            self.fired = True  # before the cancel: what the cancelled query raises is the time-out's
            if first and self.on_timeout is not None:
                with contextlib.suppress(Exception):  # cancel the run's queries: a call in the server returns
                    self.on_timeout()
            first = False
            with self.lock:
                if self.done.is_set():
                    return
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.ident), ctypes.py_object(_Expired))

    def disarm(self) -> None:
        while True:  # an _Expired delivered while disarming is the one just cleared: disarm again
            try:
                with self.lock:
                    self.done.set()
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.ident), None)
                self.timer.cancel()
                return
            except _Expired:
                continue


def time_limited(fn: Callable, seconds: float, on_timeout: Callable | None = None,
                 log: CallLog | None = None) -> Callable:
    """Call fn in the caller's thread; if it has not returned after `seconds`, cancel the run's
    queries (on_timeout) and stop it: the call ends with TimeLimitExceeded, whatever the cancelled
    queries raised on the way out, and the function is not called again in this run (a second
    call would cost the room another limit). Written by hand: no well-kept library interrupts a
    call in its own thread, and a student's function must run in the thread the scenario gives
    it (a worker's, or the main one)."""
    log = log or CallLog(getattr(fn, "__name__", "fix"), seconds)
    filename = str(Path(log.file).resolve()) if log.file else ""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if log.expired:
            raise TimeLimitExceeded(f"{log.timeout_message} (stopped earlier in this run, not called again)")
        log.calls += 1
        watch = _Watch(seconds, on_timeout)
        returned = False
        try:
            result = fn(*args, **kwargs)
            returned = True
            return result
        except BaseException as exc:
            watch.disarm()
            if watch.fired and isinstance(exc, (Exception, _Expired)):  # a Ctrl-C stays a Ctrl-C
                log.expired = True
                raise TimeLimitExceeded(log.timeout_message) from None
            if isinstance(exc, Exception):  # not a Ctrl-C or SIGTERM: those are the run's, not the code's
                log.raised.append((exc, _student_line(exc, filename)))
            raise
        finally:
            watch.disarm()
            if returned and watch.fired:  # it returned, but only after its limit
                log.expired = True
                raise TimeLimitExceeded(log.timeout_message)

    call.__faillab_limited__ = True
    call.__faillab_log__ = log
    return call


def _student_line(exc: BaseException, filename: str) -> int | None:
    """The line of the student's file the exception last passed through."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if filename and tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def unwrap_for_process(value):
    """A worker process gets the student's function under the same limit: a picklable stand-in
    that wraps it with time_limited() there. A call that runs out of time in a process sets a flag
    all the run's processes share, so the grade names it and no process calls it again; handing
    it to a new process after that raises here, as a call would."""
    if not getattr(value, "__faillab_limited__", False):
        return value
    log = value.__faillab_log__
    if log.expired:
        raise TimeLimitExceeded(f"{log.timeout_message} (stopped earlier in this run, not given to a process again)")
    if log.shared is None:
        import multiprocessing

        log.shared = multiprocessing.get_context("spawn").Event()  # a spawned or fork-served process opens it by name
    log.in_processes += 1
    return _InProcess(inspect.unwrap(value), log.slot, log.limit, log.file, log.shared)


class _InProcess:
    """The student's function in a worker process: pickled by its module and name, with its limit
    and the run's shared flag. At its limit the call is stopped as in the main process; what the
    stop cancels is the queries of the connections it was handed (there is no admin connection in
    the process to cancel the run's)."""

    def __init__(self, fn: Callable, slot: str, limit: float, file: str, shared):
        self.fn, self.slot, self.limit, self.file, self.shared = fn, slot, limit, file, shared
        self.__wrapped__ = fn
        self.log = None  # this process's CallLog, made at the first call

    def __getstate__(self):
        return {**self.__dict__, "log": None}

    def __call__(self, *args, **kwargs):
        if self.log is None:
            self.log = CallLog(self.slot, self.limit, self.file, shared=self.shared)

        def stop() -> None:
            self.shared.set()
            for conn in args:  # a psycopg2 connection, or one the lab wraps: its query returns
                if callable(getattr(conn, "cursor", None)) and callable(getattr(conn, "cancel", None)):
                    with contextlib.suppress(Exception):
                        conn.cancel()

        return time_limited(self.fn, self.limit, stop, self.log)(*args, **kwargs)
