"""Fault injection: a TCP proxy between the scripts and PostgreSQL, and hooks on what a connection sends.

Toxiproxy is the reference design, but it is a Go binary that PyPI does not ship, so this small
threaded proxy is written by hand. It binds 127.0.0.1 only and forwards to the server's TCP port
or Unix socket. `FaultProxy.in_front_of(conn)` puts it in front of the server an open connection
really reached, as libpq resolved it (a password from ~/.pgpass, a service file, the one host of a
multi-host URL that answered, a Unix socket, TLS or not), so the connections that go through it
reach the same server, as the same user, with the same TLS as the user's own connection.

Told to go `down()`, it drops every open connection and resets each new one (the client sees a
real connection error); `up()` restores service; `latency` delays each new connection;
`max_connections` rejects connections beyond a cap. Every attempt is recorded with its time, so
a scenario can count exactly what the server would have seen.

The proxy keeps TLS end to end: it forwards bytes, and `params()` keeps the server's host name
for libpq's certificate check (`sslmode=verify-full`) while `hostaddr` routes to the proxy. A
connection that used no TLS (a Unix socket, where libpq never uses it whatever PGSSLMODE says, or
a server without TLS) goes through the proxy without TLS too.

`FAILLAB_NO_FAULTS=1` in the environment turns every fault of the proxy into a no-op (`down()`,
`latency`, `max_connections`): the proxy only forwards. It exists to prove a
scenario honest: when its fault does not land, the scenario must fail fast, naming the claim
that did not hold, instead of passing or hanging.

The hooks let a scenario act at an exact statement of the code under test without touching its
code: `hooked_cursor(hooks)` is a cursor class whose cursors report each statement, by its text,
before it runs and after it ran (or the error it raised); `Instrumented(conn, hooks)` is the
connection the code under test is handed, whose cursors do so and whose commits and rollbacks
are reported too. A scenario's `Hooks` subclass says what happens at which statement: the proxy
goes down, another worker is awaited, a statement is counted.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from common import db, output


def faults_enabled() -> bool:
    """False when FAILLAB_NO_FAULTS=1: every injected fault is then a no-op (read at each use)."""
    return os.environ.get("FAILLAB_NO_FAULTS", "") not in ("1", "true", "yes")


@dataclass
class Attempt:
    at: float  # time.monotonic()
    outcome: str  # "forwarded", "down", "over_cap", "upstream_error"


@dataclass(frozen=True)
class Upstream:
    """Where a connection really went, and how to log in there again through the proxy."""
    family: int  # socket.AF_UNIX, AF_INET or AF_INET6
    address: object  # the socket file's path, or the (host, port, ...) tuple of the peer
    route: dict  # libpq keywords for a connection through the proxy (but hostaddr and port)


def upstream_of(conn) -> Upstream:
    """What libpq resolved for `conn`: the peer of its socket (the one host of a multi-host list
    that answered, the socket file of a Unix-socket host, the address a name resolved to) and the
    user, database, password (from the URL, PGPASSWORD or ~/.pgpass alike) and TLS it logged in
    with. Nothing is parsed again, so a service file or a PG* variable cannot point elsewhere."""
    info = conn.info
    s = socket.socket(fileno=info.socket)  # libpq's own socket, only looked at: detached, never closed
    try:
        family, address = s.family, s.getpeername()
    finally:
        s.detach()
    host = info.host or ""
    route = {"user": info.user, "dbname": info.dbname}
    if info.password:
        output.redact.add(info.password)
        route["password"] = info.password  # ~/.pgpass names the server's host and port, not the proxy's
    # libpq checks the certificate against `host`: a TCP host name stays, a socket becomes loopback
    route["host"] = "127.0.0.1" if family == socket.AF_UNIX or not host or host.startswith(("/", "@")) else host
    # One TCP connection per attempt, with the TLS the user's own connection had: "allow" and
    # "prefer" would retry a refused login with the other choice (a second connection the proxy
    # would count), and "require" over a socket, which libpq ignores, would fail through the proxy.
    sslmode = info.dsn_parameters.get("sslmode", "")
    route["sslmode"] = (sslmode if sslmode in ("verify-ca", "verify-full") else "require") if info.ssl_in_use \
        else "disable"
    return Upstream(family, address, route)


class FaultProxy:
    def __init__(self, upstream_host: str = "", upstream_port: int = 0, *, latency: float = 0.0,
                 max_connections: int | None = None, upstream: Upstream | None = None):
        if upstream is None:  # a host (a socket folder) and a port, as a libpq user names them
            host, port = str(upstream_host), int(upstream_port)
            upstream = Upstream(socket.AF_UNIX, f"{host}/.s.PGSQL.{port}", {}) if host.startswith("/") else \
                Upstream(socket.AF_UNSPEC, (host, port), {})
        self.upstream = upstream
        self.latency = latency
        self.max_connections = max_connections
        self.attempts: list[Attempt] = []
        self.is_down = False
        self._silent: set[socket.socket] = set()  # client sockets whose path has gone silent (stall)
        self._garble_next = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self.port: int | None = None

    @classmethod
    def in_front_of(cls, conn, **kw) -> "FaultProxy":
        """A proxy to the server `conn` reached, as libpq resolved it (see upstream_of)."""
        return cls(upstream=upstream_of(conn), **kw)

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "FaultProxy":
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop, "faillab-proxy-accept")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stopping.set()
        self._drop_all()
        deadline = time.monotonic() + 2
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    @property
    def threads_alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    # -- faults -------------------------------------------------------------------------------
    def down(self) -> None:
        """Drop open connections; reset new ones until up(). A no-op under FAILLAB_NO_FAULTS."""
        if not faults_enabled():
            return
        self.is_down = True
        self._drop_all()

    def up(self) -> None:
        self.is_down = False

    def stall(self) -> None:
        """The path goes silent on the connections open now, and nothing is closed: what a client
        sends still reaches the server, the server's replies are held back, and a client that
        hangs up is not passed on (a firewall that dropped the flow). resume() heals it. A no-op
        under FAILLAB_NO_FAULTS."""
        if faults_enabled():
            with self._lock:
                self._silent = set(self._open)

    def resume(self) -> None:
        self._silent = set()

    def garble_next_query(self) -> None:
        """Replace the NUL that ends the next whole simple-Query message a client sends: the
        server finds no end to its text and answers ERROR 08P01 ("invalid string in message"),
        and the session stays usable. Needs readable bytes (no TLS). A no-op under
        FAILLAB_NO_FAULTS."""
        self._garble_next = faults_enabled()

    def params(self, base: dict) -> dict:
        """Connection parameters that reach the server through this proxy. libpq checks the
        server's certificate against `host`, so a TCP host name stays as it was and `hostaddr`
        sends the connection here; a Unix socket (or no host at all) becomes 127.0.0.1. A proxy
        made by in_front_of() also logs in as its connection did (user, database, password, TLS)."""
        if self.upstream.route:
            return {**base, **self.upstream.route, "hostaddr": "127.0.0.1", "port": self.port}
        host = str(base.get("host") or os.environ.get("PGHOST") or "")
        routed = {"hostaddr": "127.0.0.1", "port": self.port}
        if not host or host.startswith("/") or "," in host:
            routed["host"] = "127.0.0.1"
        return {**base, **routed}

    def count(self, outcome: str | None = None, since: float = 0.0) -> int:
        return sum(1 for a in list(self.attempts) if a.at >= since and (outcome is None or a.outcome == outcome))

    # -- plumbing -----------------------------------------------------------------------------
    def _garbled(self, data: bytes) -> bytes:
        if self._garble_next and _whole_query(data):
            self._garble_next = False
            return data[:-1] + b" "
        return data

    def _spawn(self, fn, name, *args) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _drop_all(self) -> None:
        with self._lock:
            for s in list(self._open):
                _reset(s)
            self._open.clear()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._lock:
                active = len(self._open) // 2
            if self.is_down:
                self.attempts.append(Attempt(now, "down"))
                _reset(client)
            elif self.max_connections is not None and active >= self.max_connections and faults_enabled():
                self.attempts.append(Attempt(now, "over_cap"))
                _reset(client)
            else:
                self._spawn(self._serve, "faillab-proxy-conn", client, now)

    def _connect_upstream(self) -> socket.socket:
        family, address = self.upstream.family, self.upstream.address
        if family == socket.AF_UNSPEC:
            return socket.create_connection(address, timeout=5)
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.settimeout(5)
            s.connect(address)
            s.settimeout(None)
        except OSError:
            s.close()
            raise
        return s

    def _serve(self, client: socket.socket, at: float) -> None:
        if self.latency and faults_enabled():
            time.sleep(self.latency)
        try:
            upstream = self._connect_upstream()
        except OSError:
            self.attempts.append(Attempt(at, "upstream_error"))
            _reset(client)
            return
        self.attempts.append(Attempt(at, "forwarded"))
        with self._lock:
            if self.is_down or self._stopping.is_set():
                _reset(client)
                _reset(upstream)
                return
            self._open.update((client, upstream))
        pair = {client: upstream, upstream: client}
        hung_up = False  # the client hung up while the path was silent: the server learns it on resume()
        try:
            while not self._stopping.is_set():
                silent = client in self._silent
                if hung_up and not silent:
                    return
                watch = [] if hung_up else [client] if silent else [client, upstream]
                readable, _, _ = select.select(watch, [], [], 0.05 if silent or hung_up else 0.2)
                for s in readable:
                    data = s.recv(65536)
                    if not data and silent:
                        hung_up = True
                    elif not data:
                        return
                    else:
                        pair[s].sendall(self._garbled(data) if s is client else data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._open.discard(client)
                self._open.discard(upstream)
            _reset(client)
            _reset(upstream)


def _whole_query(data: bytes) -> bool:
    """One complete simple-Query message: 'Q', its length, text ending in NUL."""
    return data[:1] == b"Q" and data.endswith(b"\0") and len(data) >= 5 and \
        struct.unpack("!i", data[1:5])[0] == len(data) - 1


def _reset(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer gets an immediate connection error, not a wait."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


# -- hooks on the statements a connection sends ---------------------------------------------------
class Hooks:
    """What the lab sees of a connection it hands to the code under test (all no-ops here); a
    scenario's subclass acts at the points it cares about."""

    def opened(self, conn, pid: int) -> None: ...  # pid: the server's (db.backend_pid), not libpq's
    def before_execute(self, conn, text: str) -> None: ...
    def after_execute(self, conn, text: str) -> None: ...
    def before_commit(self, conn) -> None: ...
    def after_end(self, conn, committed: bool) -> None: ...
    def failed(self, conn, exc: Exception) -> None: ...  # a psycopg2.Error of a statement or a COMMIT


def statement_text(query, cursor) -> str:
    """The text of what execute() was given: a str, bytes, or a psycopg2.sql.Composable."""
    if isinstance(query, sql.Composable):
        return query.as_string(cursor)
    return query.decode(errors="replace") if isinstance(query, bytes) else str(query)


def hooked_cursor(hooks: Hooks, base: type = psycopg2.extensions.cursor) -> type:
    """A cursor class (a subclass of `base`, for a cursor_factory) whose every execute() reports to
    `hooks`: before_execute and after_execute with the statement's text, failed with its error."""

    class HookedCursor(base):
        def execute(self, query, vars=None):
            text = statement_text(query, self)
            hooks.before_execute(self.connection, text)
            try:
                result = super().execute(query, vars)
            except psycopg2.Error as exc:
                hooks.failed(self.connection, exc)
                raise
            hooks.after_execute(self.connection, text)
            return result
    return HookedCursor


class Instrumented:
    """A connection as the lab hands it over: every call goes to the real psycopg2 connection;
    its statements (from a cursor of any class), commits and rollbacks are reported to `hooks`,
    from outside the code under test. The hooks learn its backend's pid from the server
    (db.backend_pid), once, before the code under test gets it."""

    def __init__(self, conn, hooks: Hooks):
        self._conn, self._hooks = conn, hooks
        pid = db.backend_pid(conn)
        conn.rollback()  # a fresh connection: end the transaction that SELECT opened, nothing else
        conn.cursor_factory = hooked_cursor(hooks, conn.cursor_factory or psycopg2.extensions.cursor)
        hooks.opened(conn, pid)

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def cursor(self, name=None, cursor_factory=None, *args, **kwargs):
        if cursor_factory is not None:  # a class the caller names reports too
            cursor_factory = hooked_cursor(self._hooks, cursor_factory)
        return self._conn.cursor(name, cursor_factory, *args, **kwargs)

    def commit(self) -> None:
        self._hooks.before_commit(self._conn)
        try:
            self._conn.commit()
        except psycopg2.Error as exc:
            self._hooks.failed(self._conn, exc)
            raise
        self._hooks.after_end(self._conn, True)

    def rollback(self) -> None:
        self._conn.rollback()
        self._hooks.after_end(self._conn, False)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        self.commit() if exc_type is None else self.rollback()
        return False
