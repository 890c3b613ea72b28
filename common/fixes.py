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
import textwrap
import threading
from dataclasses import dataclass, field
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


@dataclass
class Slots:
    """What each slot of one scenario holds for this run, and why."""
    fixes: tuple[Fix, ...]
    mode: str = "fixed"  # "fixed", "control" or "exercise"
    held: dict[str, Callable] = field(default_factory=dict)
    control: tuple[str, ...] = ()

    @classmethod
    def for_run(cls, fixes, control: tuple[str, ...] = (), student=None, on_timeout=None,
                limit: float = CALL_LIMIT_S) -> "Slots":
        held = {f.slot: f.fixed for f in fixes}
        mode = "fixed"
        if control:
            for slot in control:
                held[slot] = next(f.naive for f in fixes if f.slot == slot)
            mode = "control"
        if student is not None:
            for f in fixes:
                held[f.slot] = time_limited(getattr(student, f.slot), limit, on_timeout)
            mode = "exercise"
        return cls(tuple(fixes), mode, held, tuple(control))

    def __getitem__(self, slot: str) -> Callable:
        try:
            return self.held[slot]
        except KeyError:
            raise KeyError(f"no fix slot {slot!r}; declared: {', '.join(self.held) or 'none'}") from None

    def describe(self) -> dict[str, str]:
        """slot -> the qualified name of what it held (for the journal)."""
        return {slot: _qualname(inspect.unwrap(fn)) for slot, fn in self.held.items()}

    def sources(self) -> list[str]:
        return [source_of(fn) for fn in self.held.values()]


def source_of(fn: Callable) -> str:
    return textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# -- the time limit ---------------------------------------------------------------------------------
def time_limited(fn: Callable, seconds: float, on_timeout: Callable | None = None) -> Callable:
    """Call fn in the caller's thread; if it has not returned after `seconds`, cancel the run's
    queries (on_timeout) and raise TimeLimitExceeded inside it, again each second until it ends.
    Written by hand: no well-kept library interrupts a call in its own thread, and a student's
    function must run in the thread the scenario gives it (a worker's, or the main one)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        ident, done = threading.get_ident(), threading.Event()

        def interrupt():
            first = True
            while not done.wait(0 if first else 1.0):
                if first and on_timeout is not None:
                    with contextlib.suppress(Exception):
                        on_timeout()
                first = False
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(
                    type("TimeLimitExceeded", (TimeLimitExceeded,), {"__module__": __name__,
                        "__init__": lambda self: TimeLimitExceeded.__init__(
                            self, f"{fn.__name__}() did not return within {seconds:g} s")})))

        timer = threading.Timer(seconds, interrupt)
        timer.daemon = True
        timer.start()
        try:
            return fn(*args, **kwargs)
        finally:
            done.set()
            timer.cancel()

    call.__faillab_limited__ = True
    return call


def unwrap_for_process(value):
    """A worker process gets the student's function itself (picklable by module and name)."""
    return inspect.unwrap(value) if getattr(value, "__faillab_limited__", False) else value
