"""A run's share of the server's connections, so a classroom can share one server.

A room of laptops pointed at one server runs the same lessons; a scenario holds 2 to 6
sessions (RUN_PEAK) outside a share, but the retry storm opens 32 at once (`python bench/classroom.py
--cost` measures each). Three rules keep such a room on its feet:

- Never take the last slots. The lab leaves the reserved slots (superuser_reserved_connections,
  and reserved_connections from PostgreSQL 16 on), a margin (`margin()`) and the slots of runs
  that are starting (STARTING) free, so a client that is not part of the lab can always connect
  while the lab runs. The role's and the database's CONNECTION LIMIT are counted too (`pools()`).
- Look before opening. Before each scenario a run waits until the server has room for RUN_PEAK
  sessions of its own (`room()`), in the same line as the shares, and then marks itself busy
  until its next room check (what it may still open is not free for the others).
- Take turns. A run that needs many connections at once asks for a share. Admission is decided
  under a gate: the run measures the headroom (the usable slots minus every client session now,
  minus what busy and admitted runs have not opened yet), and if there is room for at least
  `least` connections and one of the K turns is free, it takes the turn and a marker lock whose
  key records its peak. K is how many full shares the usable slots hold (at least 1), so a
  large server runs several storms at once and a small one runs them one by one.

A run with no room or no turn waits in line (a ticket lock, served in the order they came), and
says so with the time waited. A place in line is judged only by what the server shows every role
about the waiter's own session (pg_locks): its ticket, and a heartbeat lock whose key is the
server's clock, which the waiter moves while it polls. Nobody can move it for another session; a
waiter whose heartbeat stops (suspended with Ctrl-Z, say) is passed after STALE_S, and when it
wakes it goes to the back. Session names (application_name) and what pg_stat_activity hides from
other roles decide nothing. The gate is several advisory locks: a lab run holds them for the
instant of a decision, so one held across GATE_HOLD_S by the same session is not a lab run
deciding, and the run decides under the others.

Waiting has a limit (WAIT_LIMIT_S, or FAILLAB_ROOM_WAIT seconds): a scenario that never got room
raises NoRoom, and the runner fails it "not run" (never a hang, never a pass; Ctrl-C ends the
wait). Waiting runs hold sessions too (a live run keeps its admin session): when the first in
line cannot fit beside what the runs behind it hold, and nothing else can change, the first in
line gives its place up (NoRoom) after STUCK_S, and the runs behind it go on. A server that can
never hold what a run needs (too few connections, or a CONNECTION LIMIT under it) raises
CannotWait at once, with the size it needs. The locks are held on the run's admin connection
and end with its session, so a killed run never keeps its turn. Advisory locks belong to one
database: the runs of a room share turns when they use the same database (the one DATABASE_URL
the README gives the room).

Hand-written: no library offers a semaphore across clients of a plain PostgreSQL server;
advisory locks are the server's own tool for it.
"""
from __future__ import annotations

import contextlib
import os
import time

from common import db

LAB_KEY = 0x6661696C     # 'fail': the first key of every advisory lock of the lab
GATE, FIRST_TURN = 0, 1  # second keys under LAB_KEY: the first gate, then the K turns
MARKER_KEY = LAB_KEY + 1  # second key: turn << 16 | the run's peak sessions (one per admitted run)
WAITING_KEY = LAB_KEY + 2  # second key: the waiting run's ticket (a waiting run opens nothing)
GATE_KEY = LAB_KEY + 3   # second keys 0 and 1: the other two gates
HEARTBEAT_KEY = LAB_KEY + 4  # second key: the server's clock (BEAT_EPOCH s) at a waiter's last beat (shared)
ROOM_KEY = LAB_KEY + 5   # second key: the backend pid of a run busy in a scenario (after its room check)
GATES = ((LAB_KEY, GATE), (GATE_KEY, 0), (GATE_KEY, 1))
RUN_PEAK = 6             # most sessions a lab run holds outside a share, its admin session
                         # included (bench/classroom.py --cost: 2 to 6, exhaustion's two replayers)
STARTING = 1             # a lab run that connects (its admin session) between a grant and its
                         # first room check: kept out of the lab's slots (the margin holds more)
POLL_S = 0.25
STUCK_S = 10.0           # a line that cannot move for this long loses its first run
STALE_S = 10             # a waiter whose heartbeat is older than this is not in the line any more
BEAT_S = 1.0             # a waiter moves its heartbeat this often (the server's clock, in seconds)
BEAT_EPOCH = 1_700_000_000  # heartbeat keys count seconds from here: they fit a 32-bit key until 2084
GATE_HOLD_S = 3.0        # a gate held this long by one session, seen GATE_SEEN times, is squatted
GATE_SEEN = 4
SAY_EVERY_S = 15.0
ROOM_SAY_AFTER_S = 1.0   # a room check says that it waits only when the wait is not a blink
WAIT_LIMIT_S = 300.0
WAIT_LIMIT_VARIABLE = "FAILLAB_ROOM_WAIT"  # seconds a scenario may wait for room, instead of WAIT_LIMIT_S


class NoRoom(Exception):
    """The scenario waited its limit (or gave its place up) and never got room: not run."""


class CannotWait(Exception):
    """No wait can help: the server (or the role, or the database) can never hold what the run
    needs, or the wait limit is not a number. One line that says what to change."""


def wait_limit() -> float:
    """FAILLAB_ROOM_WAIT seconds, else WAIT_LIMIT_S."""
    text = os.environ.get(WAIT_LIMIT_VARIABLE, "").strip()
    if not text:
        return WAIT_LIMIT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 86400:
        raise CannotWait(f"{WAIT_LIMIT_VARIABLE}={text!r} is not a number of seconds from 0 to 86400 "
                         f"(unset it for the default, {WAIT_LIMIT_S:.0f})")
    return value


def margin(max_connections: int) -> int:
    """Slots the lab leaves free for others, beyond the reserved ones: 2 of 30, 5 of 100."""
    return max(2, max_connections // 20)


def smallest_server(need: int, reserved: int) -> int:
    """The smallest max_connections that leaves the lab `need` slots."""
    most = need
    while most - reserved - margin(most) - STARTING < need:
        most += 1
    return most


def _lock(conn, key: int, sub: int) -> bool:
    return bool(db.scalar(conn, "SELECT pg_catalog.pg_try_advisory_lock(%s, %s)", (key, sub)))


def _unlock(conn, key: int, sub: int) -> None:
    with contextlib.suppress(Exception):  # a broken session has released its locks already
        db.scalar(conn, "SELECT pg_catalog.pg_advisory_unlock(%s, %s)", (key, sub))


SETTINGS = """
    SELECT s.name, s.setting::int FROM pg_catalog.pg_settings s
    WHERE s.name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections')"""
# The role's and the database's own limits (neither binds a superuser), the clock the heartbeats
# count, and this session's pid.
LIMITS = """
    SELECT r.rolname, r.rolconnlimit, r.rolsuper, d.datname, d.datconnlimit,
           (extract(epoch FROM pg_catalog.clock_timestamp())::bigint - %s)::int, pg_catalog.pg_backend_pid()
    FROM pg_catalog.pg_roles r, pg_catalog.pg_database d
    WHERE r.rolname = session_user AND d.datname = pg_catalog.current_database()"""


def usable(conn) -> tuple[int, int]:
    """(max_connections, the slots the lab may use of them: max_connections minus the reserved
    slots, the margin and the starting runs' slots)."""
    most, reserved = _server(conn)
    return most, most - reserved - margin(most) - STARTING


def _server(conn) -> tuple[int, int]:
    settings = dict(db.rows(conn, SETTINGS))
    reserved = settings.get("superuser_reserved_connections", 0) + settings.get("reserved_connections", 0)
    return settings["max_connections"], reserved


# Client sessions of the server, by name, and whether they are of this run's role and database.
# Without pg_read_all_stats, backend_type is NULL on other users' rows; a row with a database is
# then counted (an autovacuum worker too: on the safe side).
SESSIONS = """
    SELECT a.application_name, a.usesysid = r.oid, a.datid = d.oid, count(*)
    FROM pg_catalog.pg_stat_activity a, pg_catalog.pg_roles r, pg_catalog.pg_database d
    WHERE r.rolname = session_user AND d.datname = pg_catalog.current_database()
      AND a.datid IS NOT NULL AND coalesce(a.backend_type, 'client backend') = 'client backend'
    GROUP BY 1, 2, 3"""
# The lab's locks in this database: pg_locks shows every role who holds what, and no session can
# take a lock in another's name.
MARKERS = """
    SELECT l.pid, l.classid::int, l.objid::bigint, a.application_name, a.usesysid = r.oid
    FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid,
         pg_catalog.pg_roles r
    WHERE r.rolname = session_user AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.classid::int IN (%s, %s, %s, %s)
      AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())"""


def headroom(conn, app: str, ticket: int | None = None) -> dict:
    """What a run named `app` may open now: in each pool (the server's usable slots, the role's and
    the database's CONNECTION LIMIT), the slots minus the sessions in it, minus what busy and
    admitted runs have not opened yet; the least of them is `free`. And how many live waiters are
    ahead of `ticket` (all of them, without a ticket)."""
    most, reserved = _server(conn)
    lab_slots = most - reserved - margin(most) - STARTING
    role, role_limit, superuser, database, db_limit, now, me = db.rows(conn, LIMITS, (BEAT_EPOCH,))[0]
    sessions, in_use, in_role, in_db, mine = {}, 0, 0, 0, 0
    for name, my_role, my_db, n in db.rows(conn, SESSIONS):
        sessions[name] = sessions.get(name, 0) + n
        in_use += n
        in_role += n if my_role else 0
        in_db += n if my_db else 0
        mine += n if name == app and my_role else 0
    shares, busy, beats, tickets, of_my_role = {}, {}, {}, {}, {}
    for pid, key, sub, name, my_role in db.rows(conn, MARKERS, (MARKER_KEY, WAITING_KEY, HEARTBEAT_KEY, ROOM_KEY)):
        if pid == me:
            continue
        of_my_role[name] = of_my_role.get(name, False) or bool(my_role)
        if key == MARKER_KEY:
            shares[name] = shares.get(name, 0) + (sub & 0xFFFF)
        elif key == ROOM_KEY and sub == pid:  # only a run's own pid: nobody marks another busy
            busy[name] = RUN_PEAK
        elif key == HEARTBEAT_KEY:
            beats[pid] = max(beats.get(pid, sub), sub)
        elif key == WAITING_KEY:
            tickets[pid] = sub
    # in line: a ticket whose own session moved its heartbeat lately (a stopped waiter does not)
    waiting = [t for pid, t in tickets.items() if now - beats.get(pid, now - STALE_S - 1) <= STALE_S]
    unopened = {name: max(0, peak - sessions.get(name, 0)) for name, peak in shares.items() if name != app}
    growth = {name: max(0, peak - sessions.get(name, 0)) for name, peak in busy.items()
              if name != app and name not in shares}
    pending = {**unopened, **growth}
    pools = [("server", lab_slots, in_use, sum(pending.values()))]
    if role_limit >= 0 and not superuser:
        pools.append(("role", role_limit, in_role, sum(n for name, n in pending.items() if of_my_role.get(name))))
    if db_limit >= 0 and not superuser:
        pools.append(("database", db_limit, in_db, sum(pending.values())))
    free = {kind: slots - used - owed for kind, slots, used, owed in pools}
    return {"max_connections": most, "reserved": reserved, "lab_slots": lab_slots, "in_use": in_use, "mine": mine,
            "unopened": sum(unopened.values()), "growth": sum(growth.values()), "free": min(free.values()),
            "pools": {kind: (slots, used) for kind, slots, used, _ in pools}, "role": role, "database": database,
            "storms": len(shares) - (app in shares),
            "ahead": sum(1 for t in waiting if ticket is None or t < ticket),
            "behind": sum(1 for t in waiting if ticket is not None and t > ticket),
            "next_ticket": max(tickets.values(), default=0) + 1}


def turns(lab_slots: int, connections: int) -> int:
    """K: how many runs may hold a share at once."""
    return max(1, lab_slots // (connections + RUN_PEAK))


def too_small(room: dict, need: int, what: str) -> str | None:
    """Why no wait can give `need` sessions at once (what this run holds counted), or None."""
    role_limit = room["pools"].get("role", (None,))[0]
    db_limit = room["pools"].get("database", (None,))[0]
    if room["lab_slots"] < need:
        return (f"the server is too small for {what}: it needs {need} sessions at once, and max_connections "
                f"{room['max_connections']} leaves the lab {room['lab_slots']} ({room['reserved']} reserved, "
                f"{margin(room['max_connections'])} kept free for other clients, {STARTING} for a run that starts); "
                f"use a server with max_connections {smallest_server(need, room['reserved'])} or more")
    if role_limit is not None and role_limit < need:
        return (f"the role {room['role']} may open {role_limit} sessions (CONNECTION LIMIT {role_limit}), and "
                f"{what} needs {need} at once: ALTER ROLE {room['role']} CONNECTION LIMIT {need} or more (-1: no "
                "limit), or use another role")
    if db_limit is not None and db_limit < need:
        return (f"the database {room['database']} takes {db_limit} sessions (CONNECTION LIMIT {db_limit}), and "
                f"{what} needs {need} at once: ALTER DATABASE {room['database']} CONNECTION LIMIT {need} or more "
                "(-1: no limit), or use another database")
    return None


# Gates a run found held by one session across GATE_HOLD_S: gate -> (pid, first seen, times seen).
# Kept for the whole run, so that a squatter costs its wait once, not once per scenario.
_GATE_HOLDERS: dict[tuple[int, int], tuple[int, float, int]] = {}
GATE_LOCKS = "SELECT " + ", ".join(["pg_catalog.pg_try_advisory_lock(%s, %s)"] * len(GATES))
GATE_HOLDER_PIDS = """
    SELECT l.classid::int, l.objid::bigint, l.pid FROM pg_catalog.pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())"""


def _squatted(gate: tuple[int, int], pid: int | None) -> bool:
    """Record that `pid` holds `gate` now; True once it has held it through GATE_HOLD_S (a lab run
    holds a gate for the instant of one decision)."""
    now = time.monotonic()
    seen = _GATE_HOLDERS.get(gate)
    if pid is None or seen is None or seen[0] != pid:
        _GATE_HOLDERS[gate] = (pid, now, 1)
        return False
    _GATE_HOLDERS[gate] = seen = (pid, seen[1], seen[2] + 1)
    return seen[2] >= GATE_SEEN and now - seen[1] >= GATE_HOLD_S


def enter_gates(conn) -> list[tuple[int, int]] | None:
    """Take every gate that is free; the taken ones, or None (and nothing held) when a gate is
    held by a run deciding now. A gate squatted by a session that is not deciding is passed by."""
    got = db.rows(conn, GATE_LOCKS, [n for gate in GATES for n in gate])[0]
    taken = [gate for gate, ok in zip(GATES, got) if ok]
    for gate in taken:
        _GATE_HOLDERS.pop(gate, None)
    if len(taken) == len(GATES):
        return taken
    holders = {(key, sub): pid for key, sub, pid in db.rows(conn, GATE_HOLDER_PIDS)}
    blocked = [gate for gate in GATES if gate not in taken]
    if all([_squatted(gate, holders.get(gate)) for gate in blocked]):  # every one observed
        return taken
    leave_gates(conn, taken)
    return None


def leave_gates(conn, taken: list[tuple[int, int]]) -> None:
    for gate in taken:
        _unlock(conn, *gate)


class Share:
    """One run's place in the classroom: nothing, a ticket in the line, or a turn. Every lock it
    takes is a session lock on `conn`, released by `leave()` (or by the session's end). Without
    `turn` it is a room check: admitted with room for `least` and nobody ahead, without a turn."""

    def __init__(self, conn, app: str, connections: int, least: int, turn: bool = True, what: str = "this run"):
        self.conn, self.app, self.connections, self.least, self.turn = conn, app, connections, least, turn
        self.what = what
        self.granted, self.room = 0, {}
        self.ticket: int | None = None
        self.beat: int | None = None  # the heartbeat lock held (shared), while in line
        self.beaten_at = 0.0
        self.held: list[tuple[int, int]] = []
        self.stuck_since: float | None = None

    def try_admit(self) -> bool:
        """Under the gates: take a turn if this run is first in line, a turn is free and there is
        room for `least` connections; otherwise join the line (once) and return False."""
        self._keep_place()
        gates = enter_gates(self.conn)
        if gates is None:
            return False  # another run is deciding: look again at the next poll
        try:
            self.room = room = headroom(self.conn, self.app, self.ticket)
            if not self.turn:  # room for the rest of RUN_PEAK, beside what the run holds now
                self.least = max(0, self.connections - room["mine"])
            need = room["mine"] + self.least
            why = too_small(room, need, self.what)
            if why:
                raise CannotWait(why)
            granted = min(self.connections, room["free"])
            if granted >= self.least and room["ahead"] == 0:
                if not self.turn:
                    return self._admitted(granted)
                for turn in range(FIRST_TURN, FIRST_TURN + turns(room["lab_slots"], self.connections)):
                    if self._take(LAB_KEY, turn):
                        self._take(MARKER_KEY, turn << 16 | min(room["mine"] + granted, 0xFFFF))
                        return self._admitted(granted)
            if self.ticket is None and self._take(WAITING_KEY, room["next_ticket"]):
                self.ticket = room["next_ticket"]
                self._beat()
            self._watch_for_deadlock(room)
            return False
        finally:
            leave_gates(self.conn, gates)

    def _keep_place(self) -> None:
        """Move the heartbeat. A run that could not (stopped past STALE_S) has been passed by the
        line: it goes to the back, with a new ticket at the next decision."""
        if self.ticket is None:
            return
        since = time.monotonic() - self.beaten_at
        if since > STALE_S:
            self._give_back((WAITING_KEY, self.ticket))
            self._drop_beat()
            self.ticket = None
        elif since >= BEAT_S:
            self._beat()

    def _beat(self) -> None:
        (beat, ok), = db.rows(self.conn, "SELECT b, pg_catalog.pg_try_advisory_lock_shared(%s, b) FROM (SELECT "
                                         "(extract(epoch FROM pg_catalog.clock_timestamp())::bigint - %s)::int AS b) x",
                              (HEARTBEAT_KEY, BEAT_EPOCH))
        if ok:  # (held exclusively by someone else, this second does not count: the next one will)
            self._drop_beat()
            self.beat, self.beaten_at = beat, time.monotonic()

    def _drop_beat(self) -> None:
        if self.beat is not None:
            with contextlib.suppress(Exception):
                db.scalar(self.conn, "SELECT pg_catalog.pg_advisory_unlock_shared(%s, %s)", (HEARTBEAT_KEY, self.beat))
            self.beat = None

    def _admitted(self, granted: int) -> bool:
        self.granted = granted
        self._give_back((WAITING_KEY, self.ticket))
        self._drop_beat()
        if not self.turn:  # busy until the next room check: what it may still open is not free
            _busy(self.conn)
        return True

    def _watch_for_deadlock(self, room: dict) -> None:
        """The line is stuck when this run is first in it and does not fit, no share runs, no other
        lab run is busy, and runs wait behind it: what they hold (a live run keeps its admin
        session) changes only when they run, and they run only after it. Then this run is the one
        to leave (see `stuck_for`); the runs behind it may need less."""
        stuck = (room["storms"] == 0 and room["unopened"] == 0 and room["growth"] == 0
                 and room["free"] < self.least and room["ahead"] == 0 and room["behind"] > 0)
        if not stuck:
            self.stuck_since = None
        elif self.stuck_since is None:
            self.stuck_since = time.monotonic()

    def stuck_for(self) -> float:
        return 0.0 if self.stuck_since is None else time.monotonic() - self.stuck_since

    def _take(self, key: int, sub: int) -> bool:
        if _lock(self.conn, key, sub):
            self.held.append((key, sub))
            return True
        return False

    def _give_back(self, lock) -> None:
        if lock in self.held:
            self.held.remove(lock)
            _unlock(self.conn, *lock)

    def leave(self) -> None:
        self._drop_beat()
        for lock in reversed(list(self.held)):
            self._give_back(lock)


# Admin connections (by id) busy in a scenario: the pid their ROOM_KEY lock names.
_BUSY: dict[int, int] = {}


def _busy(conn) -> None:
    pid = db.scalar(conn, "SELECT pg_catalog.pg_backend_pid()")
    if _lock(conn, ROOM_KEY, pid):
        _BUSY[id(conn)] = pid


def _idle(conn) -> None:
    pid = _BUSY.pop(id(conn), None)
    if pid is not None:
        _unlock(conn, ROOM_KEY, pid)


def _wait(place: Share, limit: float, waiting: str, say, say_after: float = 0.0) -> float | None:
    """Poll until `place` is admitted; returns the seconds waited, or None when it never waited.
    Says (`say`) `waiting` with the figures after `say_after` seconds and every SAY_EVERY_S; raises
    NoRoom after `limit` seconds, or when the line is stuck and this run is the first in it."""
    started, said_at = time.monotonic(), None
    while not place.try_admit():
        waited = time.monotonic() - started
        if waited >= say_after and (said_at is None or waited - said_at >= SAY_EVERY_S):
            say(f"Waiting for the classroom server ({waited:.0f} s so far): {waiting}; {_figures(place.room)}.")
            said_at = waited
        if waited >= limit:
            raise NoRoom(f"no room on the classroom server after {waited:.0f} s ({_figures(place.room)}); "
                         "run it again when fewer runs share the server")
        if place.stuck_for() >= STUCK_S:
            raise NoRoom(f"no room on the classroom server after {waited:.0f} s: too little room for this run "
                         f"beside the runs waiting behind it ({_figures(place.room)}, {place.room['behind']} "
                         "behind); this run, the first in line, gave its place up so that they can go on: run it "
                         "again later")
        time.sleep(POLL_S)
    return None if said_at is None else time.monotonic() - started


def room(s, limit: float | None = None) -> None:
    """Before a scenario: wait until the server has room for what the run may hold in it outside a
    share (RUN_PEAK sessions, counting those it holds), in line behind the runs that wait already;
    then mark the run busy until its next room check. Silent unless the wait lasts
    ROOM_SAY_AFTER_S, and then said above the scenario's sections; NoRoom after `limit` seconds."""
    limit = wait_limit() if limit is None else limit
    _idle(s.run.admin)
    place = Share(s.run.admin, s.app, RUN_PEAK, RUN_PEAK, turn=False, what="a run of the lab")

    def say(text: str) -> None:
        s.run.console.wrapped(text, hang="   ", style="dim")

    try:
        waited = _wait(place, limit, f"this run's next scenario needs room for up to {RUN_PEAK} sessions",
                       say, say_after=ROOM_SAY_AFTER_S)
        if waited is not None:
            say(f"Classroom server: room for this scenario came after {waited:.1f} s ({_figures(place.room)}).")
            s.measure("room_wait_s", round(waited, 1), show=False,
                      note="seconds this run waited for room on the shared server before the scenario")
    finally:
        place.leave()


@contextlib.contextmanager
def share(s, connections: int, least: int | None = None, limit: float | None = None):
    """Wait for this run's turn to open `connections` extra connections at once on the server;
    yields how many it may open (at most `connections`, at least `least`, by default a quarter).
    Released on exit. NoRoom after `limit` seconds without a turn, CannotWait when the server can
    never give `least`. Runs that wait are served in the order they came."""
    limit = wait_limit() if limit is None else limit
    least = max(1, min(connections, least if least is not None else max(2, connections // 4)))
    place = Share(s.run.admin, s.app, connections, least, what="this scenario")
    started = time.monotonic()
    try:
        waited = _wait(place, limit, f"this run needs {least} to {connections} connections at once", s.say)
        if waited is not None or place.granted < connections:
            s.say(f"Classroom server: this run's turn came after {time.monotonic() - started:.1f} s, with room "
                  f"for {place.granted} of its {connections} connections ({_figures(place.room)}).")
            s.measure("share_wait_s", round(time.monotonic() - started, 1), show=False,
                      note="seconds this run waited for its turn on the shared server")
            s.measure("share_connections", place.granted, show=False,
                      note="connections the share granted this scenario")
        yield place.granted
    finally:
        place.leave()


def _figures(room: dict) -> str:
    if not room:
        return "another run was deciding"
    limits = "".join(f", {kind} CONNECTION LIMIT {slots} ({used} in use)"
                     for kind, (slots, used) in room["pools"].items() if kind != "server")
    return (f"max_connections {room['max_connections']}, {room['lab_slots']} for the lab, "
            f"{room['in_use']} in use{limits}, {room['free']} free, {room['storms']} other share(s) running, "
            f"{room['ahead']} run(s) ahead in line")
