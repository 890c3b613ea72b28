"""A classroom on one server: runs take turns for their connection shares, and never take the
last slots. Against a private server with few slots (no timing is asserted: only order, counts
and outcomes)."""
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psycopg2
import pytest

from bench import classroom
from common import budget, db
from common.scenario import Skipped
from conftest import ROOT, clean_env, run_script

pytestmark = [pytest.mark.classroom, pytest.mark.xdist_group("classroom")]  # one private server, one temp-folder count


class Handle:
    """What budget.share and budget.room use of a scenario: the run's admin connection, name and
    console, say, measure, skip."""

    def __init__(self, params: dict, run_id: str):
        self.app = f"faillab:{run_id}"
        self.run = SimpleNamespace(admin=db.connect(params, autocommit=True, app=self.app),
                                   console=SimpleNamespace(wrapped=lambda text, **_: self.said.append(text)))
        self.params = db.conn_params(params, app=self.app)
        self.said: list[str] = []
        self.measurements: dict = {}

    def say(self, text: str) -> None:
        self.said.append(text)

    def measure(self, name, value, note="", show=True):
        self.measurements[name] = value

    def skip(self, reason: str) -> None:
        raise Skipped(reason)

    def open(self, n: int) -> list:
        return [psycopg2.connect(**self.params) for _ in range(n)]


def close_all(conns) -> None:
    for c in conns:
        c.close()


@pytest.fixture(scope="module")
def small_server():
    with classroom.private_server(max_connections=30) as params:
        yield params


@pytest.fixture
def handles(small_server, monkeypatch):
    """handles("a", "b") -> two runs' Handles on the small server, their sessions closed afterwards.
    These runs open only what the test opens: none may grow by more than one session unasked."""
    monkeypatch.setattr(budget, "RUN_PEAK", 1)
    made = []

    def make(*run_ids):
        made.extend(Handle(small_server, run_id) for run_id in run_ids)
        return made[-len(run_ids):]

    yield make
    for h in made:
        h.run.admin.close()


def outsider_connects(params: dict) -> bool:
    try:
        psycopg2.connect(**{**params, "user": classroom.OUTSIDER, "connect_timeout": 5}).close()
        return True
    except psycopg2.OperationalError:
        return False


def test_the_lab_leaves_the_reserved_slots_and_a_margin(handles):
    h, = handles("usable")
    most, lab_slots = budget.usable(h.run.admin)
    assert most == 30
    # superuser_reserved_connections = 3, margin 2, and 1 for a lab run that is starting
    assert lab_slots == 30 - 3 - budget.margin(30) - budget.STARTING == 24
    assert budget.margin(100) == 5
    assert budget.turns(lab_slots, 32) == 1 and budget.turns(100 - 3 - 5, 32) == 2


def test_a_share_is_scaled_to_the_headroom_and_an_outsider_still_connects(small_server, handles):
    h, = handles("scaled")
    others = [psycopg2.connect(**small_server, application_name="another client") for _ in range(8)]
    try:
        with budget.share(h, 32) as n:
            room = budget.headroom(h.run.admin, h.app)  # what the run saw, less what it was given
            assert 2 <= n < 32
            assert "room for" in " ".join(h.said) and h.measurements["share_connections"] == n
            opened = h.open(n)
            try:
                assert outsider_connects(small_server)  # the run took all it was given, not the last slots
                assert budget.headroom(h.run.admin, h.app)["mine"] == 1 + n  # its admin session, and n
            finally:
                close_all(opened)
        assert room["free"] >= 0
    finally:
        close_all(others)


def test_what_another_running_run_may_still_open_is_not_free(handles, monkeypatch):
    monkeypatch.setattr(budget, "RUN_PEAK", 13)
    me, = handles("me")
    alone = budget.headroom(me.run.admin, me.app)
    busy, = handles("busy")
    budget.room(busy)  # a run in a lesson, holding 1 session now, up to RUN_PEAK soon
    room = budget.headroom(me.run.admin, me.app)
    assert (room["growth"], room["free"]) == (12, alone["free"] - 1 - 12)
    opened = busy.open(4)
    assert budget.headroom(me.run.admin, me.app)["free"] == room["free"]  # what it opened was counted
    close_all(opened)


def test_what_an_admitted_run_has_not_opened_yet_is_not_free_for_the_next(handles):
    admitted, next_run = handles("admitted", "next")
    with budget.share(admitted, 5) as n:
        assert n == 5
        granted = budget.headroom(next_run.run.admin, next_run.app)
        assert granted["unopened"] == 5
        opened = admitted.open(3)
        room = budget.headroom(next_run.run.admin, next_run.app)
        assert (room["unopened"], room["in_use"]) == (2, granted["in_use"] + 3)  # 3 opened, 2 still to come
        assert room["free"] == granted["free"]  # opening what it was given takes nothing more
        close_all(opened)


def test_a_second_share_waits_for_the_first_then_runs(handles):
    first, second = handles("first", "second")
    order, granted = [], {}

    def second_run():
        with budget.share(second, 16) as n:
            order.append("second runs")
            granted["second"] = n

    with budget.share(first, 16) as n:
        granted["first"] = n
        opened = first.open(n)
        order.append("first runs")
        t = threading.Thread(target=second_run)
        t.start()
        while not second.said and t.is_alive():  # until it has said that it waits
            time.sleep(0.05)
        close_all(opened)
        order.append("first done")
    t.join(60)
    assert not t.is_alive()
    assert order == ["first runs", "first done", "second runs"]
    assert granted["first"] == 16 and granted["second"] >= 2
    assert second.said[0].startswith("Waiting for the classroom server")
    assert "turn came after" in second.said[-1] and second.measurements["share_wait_s"] >= 0


def test_runs_that_wait_are_served_in_the_order_they_came(handles):
    holder, early, late = handles("holder", "early", "late")
    order = []

    def wait_for_turn(h):
        with budget.share(h, 16):
            order.append(h.app)

    with budget.share(holder, 16):
        threads = []
        for h in (early, late):
            threads.append(threading.Thread(target=wait_for_turn, args=(h,)))
            threads[-1].start()
            while not h.said and threads[-1].is_alive():  # in line before the next one comes
                time.sleep(0.05)
    for t in threads:
        t.join(60)
    assert order == [early.app, late.app]
    assert "1 run(s) ahead in line" in late.said[0]


def test_a_run_that_connects_after_a_grant_waits_for_room_before_its_scenario(handles, monkeypatch):
    monkeypatch.setattr(budget, "RUN_PEAK", 3)
    monkeypatch.setattr(budget, "ROOM_SAY_AFTER_S", 0.0)
    holder, = handles("holder")
    order = []
    with budget.share(holder, 32) as n:
        opened = holder.open(n)  # all the room there was
        late, = handles("late")  # a script that starts now: the grant could not count it
        t = threading.Thread(target=lambda: (budget.room(late), order.append("late runs")))
        t.start()
        while not late.said and t.is_alive():
            time.sleep(0.05)
        order.append("holder done")
        close_all(opened)
    t.join(60)
    assert order == ["holder done", "late runs"]
    assert late.said[0].startswith("Waiting for the classroom server") and "room for up to 3 sessions" in late.said[0]
    assert "room for this scenario came after" in late.said[-1] and late.measurements["room_wait_s"] >= 0


def test_a_run_with_room_starts_its_scenario_at_once_and_silently(handles):
    me, = handles("me")
    budget.room(me)
    assert not me.said and "room_wait_s" not in me.measurements


def test_a_room_check_waits_behind_a_share_that_came_first(handles, monkeypatch):
    monkeypatch.setattr(budget, "ROOM_SAY_AFTER_S", 0.0)
    holder, storm, late = handles("holder", "storm", "late")
    order = []

    def storm_run():
        with budget.share(storm, 16):
            order.append("storm runs")

    def late_run():
        budget.room(late)  # there is room for it, but the storm waits already
        order.append("late runs")

    with budget.share(holder, 16):  # the only turn
        threads = []
        for h, fn in ((storm, storm_run), (late, late_run)):
            threads.append(threading.Thread(target=fn))
            threads[-1].start()
            while not h.said and threads[-1].is_alive():
                time.sleep(0.05)
        assert budget.headroom(late.run.admin, late.app)["free"] > 0 and order == []
    for t in threads:
        t.join(60)
    assert order == ["storm runs", "late runs"]
    assert "1 run(s) ahead in line" in late.said[0]


def test_a_script_waits_for_room_before_a_scenario_and_then_passes(small_server, handles, tmp_path):
    holder, = handles("holder")
    journal = tmp_path / "journal.json"
    with budget.share(holder, 64) as n:
        opened = holder.open(n)  # the whole room, then a student starts a script
        proc = subprocess.Popen([sys.executable, str(ROOT / "fail_idempotency_break.py"), "--only", "data_drift",
                                 "--json", str(journal)], env=clean_env(DATABASE_URL=classroom.url(small_server)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "Waiting for the classroom server" in line:
                break
        assert "Waiting for the classroom server" in "".join(seen), "".join(seen)
        assert "Description" not in "".join(seen)  # nothing of the scenario ran yet
        close_all(opened)
    out = "".join(seen) + proc.stdout.read()
    assert proc.wait(60) == 0, out[-2000:]
    record, = json.loads(journal.read_text())["scenarios"]
    assert record["status"] == "passed" and record["measurements"]["room_wait_s"] > 0, record
    assert "room for this scenario came after" in out


def test_a_line_that_cannot_move_loses_its_first_run_and_then_moves(small_server, handles, monkeypatch):
    monkeypatch.setattr(budget, "STUCK_S", 1.0)
    head, tail = handles("head", "tail")
    held = {head.app: head.open(4), tail.app: tail.open(4)}  # each waiter holds 5 sessions
    fillers = [psycopg2.connect(**small_server, application_name="another client") for _ in range(10)]
    events, results = [], {}

    def wait_for_turn(h, least):
        try:
            with budget.share(h, 32, least=least) as n:
                events.append(f"{h.app} runs")
                results[h.app] = n
        except budget.NoRoom as exc:
            events.append(f"{h.app} gives up")
            results[h.app] = str(exc)
            close_all(held[h.app] + [h.run.admin])  # the run ends: its sessions close

    try:
        threads = []
        for h, least in ((head, 8), (tail, 6)):  # 4 free: neither fits while both wait
            threads.append(threading.Thread(target=wait_for_turn, args=(h, least)))
            threads[-1].start()
            while not h.said and threads[-1].is_alive():
                time.sleep(0.05)
        for t in threads:
            t.join(60)
    finally:
        close_all(fillers + [c for conns in held.values() for c in conns])
    assert events == [f"{head.app} gives up", f"{tail.app} runs"]
    assert "too little room for this run beside the runs waiting behind it" in results[head.app]
    assert "the first in line" in results[head.app] and "1 behind" in results[head.app]
    assert results[tail.app] >= 6


def test_a_turn_that_never_comes_ends_as_no_room_with_the_figures(handles):
    holder, late = handles("holder", "late")
    with budget.share(holder, 16):
        with pytest.raises(budget.NoRoom, match="no room on the classroom server after .*max_connections 30"):
            with budget.share(late, 16, limit=0.5):
                pytest.fail("the late run was admitted while the holder kept the only turn")
    with budget.share(late, 16) as n:  # nothing of the late run's wait was left behind
        assert n == 16


def test_a_run_that_dies_gives_its_turn_back(handles):
    dead, next_run = handles("dead", "next")
    budget.share(dead, 16).__enter__()
    dead.run.admin.close()  # killed: its session ends, and with it every lock it held
    with budget.share(next_run, 16, limit=30) as n:
        assert n == 16


def test_a_place_in_line_is_what_the_waiters_own_session_shows(small_server, handles, monkeypatch):
    """A ticket counts only beside a heartbeat of the same session, and nobody marks another
    session busy: what a classmate's session holds is judged by the session that holds it."""
    monkeypatch.setattr(budget, "RUN_PEAK", 4)
    me, other = handles("me", "other")
    budget.room(other)  # busy in a lesson: counted as what it may still open
    alone = budget.headroom(me.run.admin, me.app)
    forger, = sessions_of(small_server, classroom.OUTSIDER, 1, application_name="faillab:forger")
    beater, = sessions_of(small_server, classroom.OUTSIDER, 1, application_name="faillab:beater")
    with forger.cursor() as cur:  # a ticket, and the beater's session marked busy by the forger
        cur.execute("SELECT pg_advisory_lock(%s, 1), pg_advisory_lock(%s, %s)",
                    (budget.WAITING_KEY, budget.ROOM_KEY, beater.info.backend_pid))
    with beater.cursor() as cur:  # a heartbeat, moved, but in another session than the ticket
        cur.execute("SELECT pg_advisory_lock_shared(%s, (extract(epoch FROM clock_timestamp())::bigint - %s)::int)",
                    (budget.HEARTBEAT_KEY, budget.BEAT_EPOCH))
    try:
        room = budget.headroom(me.run.admin, me.app)
        assert (room["ahead"], room["growth"]) == (0, alone["growth"]) and alone["growth"] > 0
        assert room["in_use"] == alone["in_use"] + 2  # their sessions count, as sessions
        with forger.cursor() as cur:  # the ticket's own session beats: now it is in line
            cur.execute("SELECT pg_advisory_lock_shared(%s, (extract(epoch FROM clock_timestamp())::bigint - %s)::int)",
                        (budget.HEARTBEAT_KEY, budget.BEAT_EPOCH))
        assert budget.headroom(me.run.admin, me.app)["ahead"] == 1
    finally:
        close_all([forger, beater])


def test_a_waiter_that_wakes_from_a_stop_goes_to_the_back_of_the_line(handles):
    holder, sleeper, later = handles("holder", "sleeper", "later")
    with budget.share(holder, 16):
        stopped = budget.Share(sleeper.run.admin, sleeper.app, 16, 16)
        queued = budget.Share(later.run.admin, later.app, 16, 16)
        try:
            assert not stopped.try_admit() and stopped.ticket is not None
            first = stopped.ticket
            stopped.beaten_at -= budget.STALE_S + 1  # as after Ctrl-Z: its heartbeat stood still
            assert not queued.try_admit() and queued.ticket > first
            assert not stopped.try_admit()
            assert stopped.ticket > queued.ticket  # behind the run that came while it slept
            assert budget.headroom(later.run.admin, later.app, queued.ticket)["ahead"] == 0
        finally:
            stopped.leave()
            queued.leave()


WAITER = """
import sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from test_classroom import Handle
from common import budget, cleanup
cleanup.arm_signals()  # a script's handlers: psycopg2 may lose a KeyboardInterrupt raised in its codec calls
h = Handle(dict(host="127.0.0.1", port=int(sys.argv[2]), dbname="postgres", user=sys.argv[3]), "waiter")
h.say = lambda text: print(text, flush=True)
try:
    with budget.share(h, 16):
        print("admitted", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_ends_a_wait_and_leaves_no_place_in_line(small_server, handles):
    holder, = handles("holder")
    with budget.share(holder, 16):
        proc = subprocess.Popen([sys.executable, "-c", WAITER, str(ROOT), str(small_server["port"]), "postgres"],
                                stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()
        assert first.startswith("Waiting for the classroom server"), first
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert out.strip().splitlines()[-1] == "interrupted"
    later, = handles("later")
    with budget.share(later, 16, limit=30) as n:  # the interrupted waiter is not ahead of anyone
        assert n == 16 and not later.said


# -- a hostile classroom, through the command line --------------------------------------------------
LESSON = ("fail_idempotency_break.py", "--only", "data_drift")  # one short scenario, up to RUN_PEAK sessions
WAIT = "60"  # FAILLAB_ROOM_WAIT of the runs below: far more than any of them needs, far less than a hang


def student(params: dict, name: str, *options: str) -> str:
    """A login role that may create schemas in the database (a student), made once per server."""
    conn = db.connect(params, autocommit=True)
    try:
        if not db.scalar(conn, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (name,)):
            with conn.cursor() as cur:
                cur.execute(psycopg2.sql.SQL("CREATE ROLE {} LOGIN " + " ".join(options)).format(
                    psycopg2.sql.Identifier(name)))
                cur.execute(psycopg2.sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                    psycopg2.sql.Identifier(params["dbname"]), psycopg2.sql.Identifier(name)))
    finally:
        conn.close()
    return name


def lesson(params: dict, tmp_path, user: str = "postgres", timeout: float = 150, **env):
    """The short lesson as `user` runs it on `params`'s server, waiting FAILLAB_ROOM_WAIT at most."""
    return run_script(*LESSON, env=clean_env(DATABASE_URL=classroom.url(params, user),
                                             **{budget.WAIT_LIMIT_VARIABLE: WAIT, **env}),
                      tmp_path=tmp_path, timeout=timeout)


def passed(result) -> None:
    assert result.returncode == 0 and result.journal, result.stdout[-2000:] + result.stderr[-2000:]
    record, = result.journal["scenarios"]
    assert record["status"] == "passed", record.get("reason")


def sessions_of(params: dict, user: str, n: int, **keywords) -> list:
    conns = [psycopg2.connect(**{**params, "user": user}, **keywords) for _ in range(n)]
    for c in conns:
        c.autocommit = True
    return conns


def test_a_session_that_squats_the_gates_does_not_stall_the_room(small_server, tmp_path):
    squatter, = sessions_of(small_server, classroom.OUTSIDER, 1, application_name="faillab:squatter")
    with squatter.cursor() as cur:  # every gate of the lab, held and never let go
        for key, sub in budget.GATES:
            cur.execute("SELECT pg_advisory_lock(%s, %s)", (key, sub))
    try:
        passed(lesson(small_server, tmp_path))
    finally:
        squatter.close()


def test_idle_sessions_named_like_lab_runs_are_not_runs(small_server, tmp_path):
    fakes = [psycopg2.connect(**{**small_server, "user": classroom.OUTSIDER}, application_name=f"faillab:{n:08x}")
             for n in range(4)]  # four "runs" that may grow to RUN_PEAK each: more than the lab's slots
    try:
        passed(lesson(small_server, tmp_path))
    finally:
        close_all(fakes)


def test_a_stopped_waiter_of_another_role_loses_its_place(small_server, handles, tmp_path):
    """Ctrl-Z on a run of bob's that waits in line: alice cannot see bob's query_start, but the
    server shows her bob's heartbeat, and it stops."""
    bob, alice = student(small_server, "bob"), student(small_server, "alice")
    holder, = handles("holder")
    with budget.share(holder, 16):  # the only turn on this server: bob's run waits in line for it
        waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(ROOT), str(small_server["port"]), bob],
                                  stdout=subprocess.PIPE, text=True)
        first = waiter.stdout.readline()
        assert first.startswith("Waiting for the classroom server"), first
        waiter.send_signal(signal.SIGSTOP)
    try:
        result = lesson(small_server, tmp_path, user=alice)
    finally:
        waiter.kill()
        waiter.communicate(timeout=30)
    passed(result)


def test_a_scenario_that_never_gets_room_is_not_run_and_fails(small_server, handles, tmp_path):
    holder, = handles("holder")
    with budget.share(holder, 64) as n:
        opened = holder.open(n)  # the whole room, for longer than the run waits
        try:
            result = lesson(small_server, tmp_path, **{budget.WAIT_LIMIT_VARIABLE: "2"})
        finally:
            close_all(opened)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    record, = result.journal["scenarios"]
    assert record["status"] == "failed" and record["cleaned"], record
    assert record["reason"].startswith("not run: no room on the classroom server after 2 s"), record["reason"]
    summary = result.stdout[result.stdout.index("Summary"):]
    assert "data_drift: not run: no room on the classroom server after 2 s" in " ".join(summary.split())


@pytest.mark.parametrize("max_connections, only, needed", [
    (10, LESSON, "max_connections 12"),  # a lone run: its scenarios hold up to RUN_PEAK sessions
    (20, ("fail_retry_exhaustion.py", "--only", "storm"), "max_connections 25"),  # a lone storm: 16 workers at least
])
def test_a_server_too_small_for_the_lesson_ends_at_once_with_the_size_it_needs(max_connections, only, needed,
                                                                               tmp_path):
    with classroom.private_server(max_connections=max_connections) as server:
        result = run_script(*only, env=clean_env(DATABASE_URL=classroom.url(server), **{budget.WAIT_LIMIT_VARIABLE: WAIT}),
                            tmp_path=tmp_path, timeout=150)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line, = result.stderr.strip().splitlines()
    assert line.startswith("error: the server is too small for") and needed in line, line
    assert "Waiting for the classroom server" not in result.stdout


@pytest.mark.parametrize("limit", ["ROLE", "DATABASE"])
def test_a_connection_limit_under_what_a_run_needs_ends_at_once(small_server, limit, tmp_path):
    params = small_server
    if limit == "ROLE":
        user = student(small_server, "carol", "CONNECTION LIMIT 3")
    else:
        user = student(small_server, "dave")
        conn = db.connect(small_server, autocommit=True)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_database WHERE datname = 'limited'")
            if not cur.fetchone()[0]:
                cur.execute("CREATE DATABASE limited CONNECTION LIMIT 3")
                cur.execute("GRANT CREATE ON DATABASE limited TO dave")
        conn.close()
        params = {**small_server, "dbname": "limited"}
    result = lesson(params, tmp_path, user=user)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line, = result.stderr.strip().splitlines()
    assert f"CONNECTION LIMIT 3" in line and f"CONNECTION LIMIT {budget.RUN_PEAK} or more" in line, line


def test_sessions_of_the_role_elsewhere_count_against_its_connection_limit(small_server, tmp_path):
    user = student(small_server, "erin", "CONNECTION LIMIT 7")
    own = sessions_of({**small_server, "dbname": "template1"}, user, 2)  # the student's psql, say
    try:
        result = lesson(small_server, tmp_path, user=user, **{budget.WAIT_LIMIT_VARIABLE: "2"})
    finally:
        close_all(own)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    record, = result.journal["scenarios"]
    assert record["reason"].startswith("not run: no room on the classroom server after 2 s"), record["reason"]
    assert "role CONNECTION LIMIT 7 (3 in use)" in record["reason"]
    assert "too many connections" not in result.stdout + result.stderr
    passed(lesson(small_server, tmp_path, user=user))  # once they close, it fits


def test_a_role_that_may_not_read_all_stats_counts_every_session(small_server):
    superuser = db.connect(small_server, autocommit=True)
    outsider = db.connect({**small_server, "user": classroom.OUTSIDER}, autocommit=True)
    try:
        seen_by_superuser = budget.headroom(superuser, "faillab:none")["in_use"]
        assert budget.headroom(outsider, "faillab:none")["in_use"] >= seen_by_superuser >= 2
    finally:
        superuser.close()
        outsider.close()


def test_several_students_on_one_small_server_all_pass_and_an_outsider_connects_throughout(tmp_path):
    """Three storms (35 sessions each at full size) and another lesson on a server of 40: the
    storms take turns, scaled to what is free, and an outside client connects all along. (The
    storm needs 16 workers at least; a waiting run holds 3 sessions: 40 is the smallest server
    on which three of them can wait at once and the first in line still fits.)"""
    with classroom.private_server(max_connections=40) as server:
        students = [classroom.Student(i) for i in range(1, 5)]
        lessons = ["fail_retry_exhaustion.py"] * 3 + ["fail_checkpoint_corruption.py"]
        with classroom.Sampler(server) as sampler, classroom.Probe(server) as probe:
            threads = [threading.Thread(target=classroom.student_loop,
                                        args=(st, server, tmp_path / str(st.number), (lesson,)))
                       for st, lesson in zip(students, lessons)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        conn = db.connect(server, autocommit=True)
        try:
            lab_slots = budget.usable(conn)[1]
        finally:
            conn.close()
    runs = [r for st in students for r in st.runs]
    assert [r.script for r in runs] == lessons
    for r in runs:
        verdicts = [(rec["id"], rec["status"], rec.get("reason")) for rec in r.scenarios]
        assert r.exit_code == 0 and verdicts, f"{r.script}: exit {r.exit_code}, {verdicts}\n{r.output[-2000:]}"
        assert all(status == "passed" for _, status, _ in verdicts), f"{r.script}: {verdicts}"
    waited = [rec["measurements"].get("share_wait_s") for r in runs for rec in r.scenarios if rec["id"] == "storm"]
    assert any(w is not None for w in waited), waited  # no storm had its full 32 at once: scaled or waited
    assert probe.tries >= 5 and not probe.refused, probe.refused[:3]
    assert sampler.peak_lab <= lab_slots + budget.STARTING  # past its slots by starting runs at most


def _shares() -> dict[str, int]:
    """The extra sessions each scenario that takes a share of the server asks for (budget.share)."""
    import fail_checkpoint_corruption as checkpoint
    import fail_idempotency_break as idempotency
    import fail_retry_exhaustion as retry

    return {"db_down": checkpoint.DB_DOWN_SESSIONS, "concurrent_access": checkpoint.RACE_SESSIONS,
            "refresh_lock_queue": idempotency.REFRESH_SESSIONS, "storm": retry.STORM_WORKERS + 1}


def test_every_scenario_holds_no_more_sessions_than_the_budget_counts_on_for_it():
    """The classroom's budget lets a run in when the server has room for RUN_PEAK sessions, plus a
    share for the scenarios that ask for one: a scenario that holds more (a worker that opens one
    connection more) takes room another student was promised. Measured by the server
    (pg_stat_activity, sampled), each scenario alone, on a private server removed afterwards."""
    before = set(Path(tempfile.gettempdir()).glob("labclass-*"))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "classroom.py"), "--cost", "--max-connections", "100"],
                         env=clean_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("fail_")]
    assert all(r[-3] == "0" for r in rows), [r for r in rows if r[-3] != "0"]  # every run passed
    peaks = {(r[0], r[1]): int(r[-2]) for r in rows}
    scenarios = [(script, i) for script in classroom.SCRIPTS for i in classroom.scenario_ids(script)]
    assert set(peaks) == set(scenarios) | {(script, "(whole") for script in classroom.SCRIPTS}
    shares = _shares()
    assert set(shares) <= {i for _, i in scenarios}
    over = {k: (p, budget.RUN_PEAK + shares.get(k[1], 0)) for k, p in peaks.items() if k[1] != "(whole"
            and p > budget.RUN_PEAK + shares.get(k[1], 0)}
    assert not over, over  # (script, scenario): (peak measured, sessions the budget counts on)
    assert all(p >= 2 for p in peaks.values())  # the run's admin session and its scenario's, at least
    assert peaks[("fail_retry_exhaustion.py", "storm")] > 32  # the storm's workers at once, with room for them
    assert set(Path(tempfile.gettempdir()).glob("labclass-*")) <= before  # nothing of its own is left