"""A run's share of the server's connections, so a classroom can share one server.

A room of laptops pointed at one server runs the same lessons; a scenario holds 2 to 6
sessions (RUN_PEAK) outside a share, but the retry storm opens 32 at once (`python bench/classroom.py
--cost` measures each). Three rules keep such a room on its feet:

- Never take the last slots. The lab leaves the reserved slots (superuser_reserved_connections,
  and reserved_connections from PostgreSQL 16 on), a margin (`margin()`) and the slots of runs
  that are starting (STARTING) free, so a client that is not part of the lab can always connect
  while the lab runs.
- Look before opening. Before each scenario a run waits until the server has room for RUN_PEAK
  sessions of its own (`room()`), in the same line as the shares. A run that connected after a
  share was granted (a script that just started) was not counted by that grant: it waits here
  rather than opening its scenario in the slots the share was given.
- Take turns. A run that needs many connections at once asks for a share. Admission is decided
  under a gate, a session-level advisory lock in the lab's own key space: the run measures the
  headroom (the usable slots minus every client session now, minus what admitted runs have not
  opened yet, minus what other lab runs may still open), and if there is room for at least
  `least` connections and one of the K turns is free, it takes the turn and a marker lock whose
  key records its peak. K is how many full shares the usable slots hold (at least 1), so a
  large server runs several storms at once and a small one runs them one by one.

A run with no room or no turn waits in line (a ticket lock, served in the order they came; a
waiter that stops polling loses its place), and says so with the time waited; after `limit`
seconds the scenario is skipped with the figures (never a hang; Ctrl-C ends the wait). Waiting
runs hold sessions too (a live run keeps its admin session): when the first in line cannot fit
beside what the runs behind it hold, and nothing else can change, the first in line gives its
place up (skipped) after STUCK_S, and the runs behind it go on. The locks are held on the run's admin connection and end
with its session, so a killed run never keeps its turn. Advisory locks belong to one
database: the runs of a room share turns when they use the same database (the one
DATABASE_URL the README gives the room).

Hand-written: no library offers a semaphore across clients of a plain PostgreSQL server;
advisory locks are the server's own tool for it.
"""
from __future__ import annotations

import contextlib
import time

from common import db

LAB_KEY = 0x6661696C     # 'fail': the first key of every advisory lock of the lab
GATE, FIRST_TURN = 0, 1  # second keys under LAB_KEY: the gate, then the K turns
MARKER_KEY = LAB_KEY + 1  # second key: turn << 16 | the run's peak sessions (one per admitted run)
WAITING_KEY = LAB_KEY + 2  # second key: the waiting run's ticket (a waiting run opens nothing)
RUN_PEAK = 6             # most sessions a lab run holds outside a share, its admin session
                         # included (bench/classroom.py --cost: 2 to 6, exhaustion's two replayers)
STARTING = 1             # a lab run that connects (its admin session) between a grant and its
                         # first room check: kept out of the lab's slots (the margin holds more)
POLL_S = 0.25
STUCK_S = 10.0           # a line that cannot move for this long loses its first run
STALE_S = 10.0           # a waiter whose last poll is older than this is not in the line any more
SAY_EVERY_S = 15.0
ROOM_SAY_AFTER_S = 1.0   # a room check says that it waits only when the wait is not a blink
WAIT_LIMIT_S = 300.0


def margin(max_connections: int) -> int:
    """Slots the lab leaves free for others, beyond the reserved ones: 2 of 30, 5 of 100."""
    return max(2, max_connections // 20)


def _lock(conn, key: int, sub: int) -> bool:
    return bool(db.scalar(conn, "SELECT pg_try_advisory_lock(%s, %s)", (key, sub)))


def _unlock(conn, key: int, sub: int) -> None:
    with contextlib.suppress(Exception):  # a broken session has released its locks already
        db.scalar(conn, "SELECT pg_advisory_unlock(%s, %s)", (key, sub))


def usable(conn) -> tuple[int, int]:
    """(max_connections, the slots the lab may use of them: max_connections minus the reserved
    slots, the margin and the starting runs' slots)."""
    settings = dict(db.rows(conn, "SELECT name, setting::int FROM pg_settings WHERE name IN "
                                  "('max_connections', 'superuser_reserved_connections', 'reserved_connections')"))
    most = settings["max_connections"]
    reserved = settings.get("superuser_reserved_connections", 0) + settings.get("reserved_connections", 0)
    return most, most - reserved - margin(most) - STARTING


# Client sessions of this database's server. Without pg_read_all_stats, backend_type is NULL on
# other users' rows; a row with a database is then counted (an autovacuum worker too: on the safe side).
SESSIONS = """
    SELECT a.application_name, count(*) FROM pg_stat_activity a
    WHERE a.datid IS NOT NULL AND coalesce(a.backend_type, 'client backend') = 'client backend'
    GROUP BY 1"""
MARKERS = """
    SELECT l.classid::int, l.objid::bigint, a.application_name,
           coalesce(now() - a.query_start > make_interval(secs => %s), false)
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid::int IN (%s, %s)
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"""


def headroom(conn, app: str, ticket: int | None = None) -> dict:
    """What a run named `app` may open now: the usable slots minus every client session, minus
    what admitted runs have not opened yet, minus what other running lab runs may still open;
    and how many runs wait ahead of `ticket` (all of them, without a ticket)."""
    most, lab_slots = usable(conn)
    sessions = dict(db.rows(conn, SESSIONS))
    admitted, waiting = {}, {}
    for key, sub, name, stale in db.rows(conn, MARKERS, (STALE_S, MARKER_KEY, WAITING_KEY)):
        if key == MARKER_KEY:
            admitted[name] = admitted.get(name, 0) + (sub & 0xFFFF)
        elif not stale:  # a waiter that stopped polling (suspended, say) does not hold the line up
            waiting[name] = sub
    unopened = sum(max(0, peak - sessions.get(name, 0)) for name, peak in admitted.items() if name != app)
    running = [n for n in sessions if n.startswith("faillab:") and n != app and n not in admitted and n not in waiting]
    growth = sum(max(0, RUN_PEAK - sessions[n]) for n in running)
    in_use = sum(sessions.values())
    return {"max_connections": most, "lab_slots": lab_slots, "in_use": in_use, "mine": sessions.get(app, 0),
            "unopened": unopened, "growth": growth, "free": lab_slots - in_use - unopened - growth,
            "storms": len(admitted) - (app in admitted),
            "ahead": sum(1 for name, t in waiting.items() if name != app and (ticket is None or t < ticket)),
            "behind": sum(1 for name, t in waiting.items() if name != app and ticket is not None and t > ticket),
            "next_ticket": max(waiting.values(), default=0) + 1}


def turns(lab_slots: int, connections: int) -> int:
    """K: how many runs may hold a share at once."""
    return max(1, lab_slots // (connections + RUN_PEAK))


class Share:
    """One run's place in the classroom: nothing, a ticket in the line, or a turn. Every lock it
    takes is a session lock on `conn`, released by `leave()` (or by the session's end). Without
    `turn` it is a room check: admitted with room for `least` and nobody ahead, without a turn."""

    def __init__(self, conn, app: str, connections: int, least: int, turn: bool = True):
        self.conn, self.app, self.connections, self.least, self.turn = conn, app, connections, least, turn
        self.granted, self.room = 0, {}
        self.ticket: int | None = None
        self.held: list[tuple[int, int]] = []
        self.stuck_since: float | None = None

    def try_admit(self) -> bool:
        """Under the gate: take a turn if this run is first in line, a turn is free and there is
        room for `least` connections; otherwise join the line (once) and return False."""
        if not _lock(self.conn, LAB_KEY, GATE):
            return False  # another run is deciding: look again at the next poll
        try:
            self.room = room = headroom(self.conn, self.app, self.ticket)
            if not self.turn:  # room for the rest of RUN_PEAK, beside what the run holds now
                self.least = max(0, self.connections - room["mine"])
            granted = min(self.connections, room["free"])
            if granted >= self.least and room["ahead"] == 0:
                if not self.turn:
                    return self._admitted(granted)
                for turn in range(FIRST_TURN, FIRST_TURN + turns(room["lab_slots"], self.connections)):
                    if self._take(LAB_KEY, turn):
                        self._take(MARKER_KEY, turn << 16 | min(room["mine"] + granted, 0xFFFF))
                        return self._admitted(granted)
            if self.ticket is None:
                self.ticket = room["next_ticket"]
                self._take(WAITING_KEY, self.ticket)
            self._watch_for_deadlock(room)
            return False
        finally:
            _unlock(self.conn, LAB_KEY, GATE)

    def _admitted(self, granted: int) -> bool:
        self.granted = granted
        self._give_back((WAITING_KEY, self.ticket))
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
        for lock in reversed(list(self.held)):
            self._give_back(lock)


def _wait(s, place: Share, limit: float, waiting: str, say, say_after: float = 0.0) -> float | None:
    """Poll until `place` is admitted; returns the seconds waited, or None when it never waited.
    Says (`say`) `waiting` with the figures after `say_after` seconds and every SAY_EVERY_S; skips the
    scenario after `limit` seconds, or when the line is stuck and this run is the first in it."""
    started, said_at = time.monotonic(), None
    while not place.try_admit():
        waited = time.monotonic() - started
        if waited >= say_after and (said_at is None or waited - said_at >= SAY_EVERY_S):
            say(f"Waiting for the classroom server ({waited:.0f} s so far): {waiting}; {_figures(place.room)}.")
            said_at = waited
        if waited >= limit:
            s.skip(f"no turn on the classroom server after {waited:.0f} s ({_figures(place.room)}); "
                   "run it again when fewer runs share the server")
        if place.stuck_for() >= STUCK_S:
            s.skip(f"the classroom server has too little room for this run beside the runs waiting behind it "
                   f"({_figures(place.room)}, {place.room['behind']} behind); this run, the first in line, gave "
                   f"its place up after {waited:.0f} s so that they can go on: run it again later")
        time.sleep(POLL_S)
    return None if said_at is None else time.monotonic() - started


def room(s, limit: float = WAIT_LIMIT_S) -> None:
    """Before a scenario: wait until the server has room for what the run may hold in it outside a
    share (RUN_PEAK sessions, counting those it holds), in line behind the runs that wait already.
    Silent unless the wait lasts ROOM_SAY_AFTER_S, and then said above the scenario's sections;
    skipped with the figures after `limit` seconds."""
    place = Share(s.run.admin, s.app, RUN_PEAK, RUN_PEAK, turn=False)

    def say(text: str) -> None:
        s.run.console.wrapped(text, hang="   ", style="dim")

    try:
        waited = _wait(s, place, limit, f"this run's next scenario needs room for up to {RUN_PEAK} sessions",
                       say, say_after=ROOM_SAY_AFTER_S)
        if waited is not None:
            say(f"Classroom server: room for this scenario came after {waited:.1f} s ({_figures(place.room)}).")
            s.measure("room_wait_s", round(waited, 1), show=False,
                      note="seconds this run waited for room on the shared server before the scenario")
    finally:
        place.leave()


@contextlib.contextmanager
def share(s, connections: int, least: int | None = None, limit: float = WAIT_LIMIT_S):
    """Wait for this run's turn to open `connections` extra connections at once on the server;
    yields how many it may open (at most `connections`, at least `least`, by default a quarter).
    Released on exit. After `limit` seconds without a turn the scenario is skipped, with figures.
    Runs that wait are served in the order they came."""
    least = max(1, min(connections, least if least is not None else max(2, connections // 4)))
    place = Share(s.run.admin, s.app, connections, least)
    started = time.monotonic()
    try:
        waited = _wait(s, place, limit, f"this run needs {least} to {connections} connections at once", s.say)
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
    return (f"max_connections {room['max_connections']}, {room['lab_slots']} for the lab, "
            f"{room['in_use']} in use, {room['free']} free, {room['storms']} other share(s) running, "
            f"{room['ahead']} run(s) ahead in line")
