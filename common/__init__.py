"""Plumbing shared by the fail_*.py scripts: configuration, the embedded server, the private
schema, output, the scenario API, cleanup, the runner and fault injection. No module here knows
any scenario.

A script's first import is `import common`, so the first thing that runs is the signal set-up
below: from then on Ctrl-C, SIGTERM and SIGHUP end the script with 130. During the heavy imports
a signal is only recorded (psycopg2's C initialisation would swallow a KeyboardInterrupt raised
inside it); right after them the script exits 130, before anything exists that would need
cleaning. Until the runner arms its own handlers, a later signal exits 130 at once for the same
reason. Only the script's own process gets these handlers: not a test suite importing common,
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
    raise SystemExit(130)


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

if _guarded:
    exit_if_interrupted()
    for _sig in _SIGNALS:
        _signal.signal(_sig, _exit_130)

__all__ = ["Scenario", "main", "scenario"]
