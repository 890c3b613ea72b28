"""Plumbing shared by the fail_*.py scripts: configuration, the embedded server, the private
schema, output, the scenario API, cleanup, the runner and fault injection. No module here knows
any scenario.

A script's first import is `import common`, so the first thing that runs is the signal set-up
below: from then on Ctrl-C, SIGTERM and SIGHUP end the script with 130. During the heavy imports
a signal is only recorded (psycopg2's C initialisation would swallow a KeyboardInterrupt raised
inside it); right after them the script exits 130, before anything exists that would need
cleaning. After them Ctrl-C is a KeyboardInterrupt again (a script ends with 130 however far
it got, its `finally` blocks run), and SIGTERM or SIGHUP exit 130 until the runner arms its
own handlers, which turn them into an exception as well. Only the script's own process gets these handlers: not a test suite importing common,
not a worker process started by a scenario.
"""
import _signal  # the C module: importing `signal` takes long enough to be interrupted itself
import sys as _sys

_pending: list[int] = []
_SIGNALS = [_signal.SIGINT, _signal.SIGTERM] + ([_signal.SIGHUP] if hasattr(_signal, "SIGHUP") else [])


def _imported_by_a_script() -> bool:
    """True when the module running as __main__ imports us from its top level (a script)."""
    mp = _sys.modules.get("multiprocessing")
    if mp is not None and mp.parent_process() is not None:
        return False
    frame = _sys._getframe(2)  # past this function and this module's own frame
    while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
        frame = frame.f_back  # the import machinery
    return (frame is not None and frame.f_code.co_name == "<module>"
            and frame.f_globals.get("__name__") == "__main__")


def _record(signum, frame) -> None:
    _pending.append(signum)


def _exit_130(signum, frame) -> None:
    _pending.append(signum)  # kept: should the exception be lost (see cleanup.on_signal), arming exits
    raise SystemExit(130)


def _interrupt(signum, frame) -> None:
    _pending.append(signum)
    raise KeyboardInterrupt


def _quiet_interrupt(kind, value, tb) -> None:
    """A Ctrl-C nobody caught (before the runner's handlers, or in a tool without them) has
    unwound every `finally` by now: end with 130 instead of a traceback."""
    if issubclass(kind, KeyboardInterrupt):
        for stream in (_sys.stdout, _sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        import os

        os._exit(130)
    _previous_hook(kind, value, tb)


_previous_hook = _sys.excepthook


def exit_if_interrupted() -> None:
    """Exit 130 when a signal was recorded during start-up."""
    if _pending:
        raise SystemExit(130)


_guarded = False
if _imported_by_a_script():
    try:
        for _sig in _SIGNALS:
            _signal.signal(_sig, _record)
        _guarded = True
    except ValueError:  # not the main thread: signals are not this import's to handle
        pass

# The heavy imports, while a signal is only recorded: psycopg2 (C init), psutil, tenacity.
import psycopg2  # noqa: E402,F401
import psycopg2.errors  # noqa: E402,F401
import psycopg2.extras  # noqa: E402,F401
import psutil  # noqa: E402,F401
import tenacity  # noqa: E402,F401

from common.runner import main  # noqa: E402
from common.scenario import Scenario, scenario  # noqa: E402

from common.cleanup import CHILDREN_LOG, watch_writes  # noqa: E402

if not _guarded and CHILDREN_LOG in _sys.modules["os"].environ:
    watch_writes()  # a child process of a run (a scenario's worker): what it creates is the run's too

if _guarded:
    exit_if_interrupted()
    # From here on Ctrl-C is a KeyboardInterrupt, as in any Python program (so a tool built on
    # common can catch it), ending with 130 if nothing does; SIGTERM and SIGHUP exit 130.
    _signal.signal(_signal.SIGINT, _interrupt)
    for _sig in _SIGNALS[1:]:
        _signal.signal(_sig, _exit_130)
    _sys.excepthook = _quiet_interrupt

__all__ = ["Scenario", "main", "scenario"]
