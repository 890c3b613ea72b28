"""The scenario runner and command line shared by every fail_*.py (see CONTRACT.md).

A script declares scenarios with `@scenario(id, title)` and ends with `main()`. Each scenario
function receives a `Scenario`: its private schema and connections, its six sections, and the
checks that become its verdicts. The runner builds and tears down everything around it, so a
scenario body holds only the lesson.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from psycopg2 import sql

from common import config, output
from common.output import SECTIONS

_REGISTRY: list["ScenarioSpec"] = []


@dataclass
class ScenarioSpec:
    id: str
    title: str
    fn: object


def scenario(scenario_id: str, title: str):
    """Register a scenario function; scripts list them in reading order."""
    def register(fn):
        if all(s.id != scenario_id for s in _REGISTRY):
            _REGISTRY.append(ScenarioSpec(scenario_id, title, fn))
        return fn
    return register


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, turned into an exception so every `finally` runs (like Ctrl-C)."""


class Unfinished(Exception):
    """A scenario stopped early because a check it depends on failed."""


@dataclass
class Check:
    phase: str  # "triggered" or "recovered"
    ok: bool
    claim: str


@dataclass
class Run:
    """What every scenario of one run shares."""
    script: str
    args: argparse.Namespace
    console: output.Console
    target: config.Target
    params: dict
    run_id: str
    admin: object  # autocommit connection used for schemas
    server_version: str = ""
    server_version_num: int = 0
    kept: list = field(default_factory=list)


class Scenario:
    """The handle a scenario function gets. Sections only move forward, as the reader does."""

    def __init__(self, run: Run, spec: ScenarioSpec, index: int):
        self.run = run
        self.id = spec.id
        self.title = spec.title
        self.schema = f"{config_prefix()}{run.run_id}_{spec.id}"[:63]
        self.app = f"faillab:{run.run_id}"
        self.rng = random.Random(f"{run.args.seed}:{spec.id}")
        self.seed = run.args.seed
        self.checks: list[Check] = []
        self.observed: list[dict] = []
        self.measurements: dict[str, object] = {}
        self._section = -1
        self._step = 0
        self._stack = contextlib.ExitStack()
        self._workers: list = []  # threads and processes, stopped before anything else
        self._gates: list = []  # barriers and events, released so no worker waits forever
        self._tmpdir: Path | None = None
        self.conn = None

    # -- what scenarios use: the database --------------------------------------------------------
    @property
    def params(self) -> dict:
        """Connection parameters (picklable) for this scenario's schema: hand them to workers."""
        return {**self.run.params, "options": f"-c search_path={self.schema}",
                "application_name": self.app, "connect_timeout": config.CONNECT_TIMEOUT_S}

    @property
    def server_version_num(self) -> int:
        return self.run.server_version_num

    def connect(self, params: dict | None = None, autocommit: bool = False, **overrides):
        """A new connection into this scenario's schema, closed at teardown."""
        import psycopg2

        conn = psycopg2.connect(**{**self.params, **(params or {}), **overrides})
        conn.autocommit = autocommit
        self._stack.callback(_close_quietly, conn)
        return conn

    def proxy(self, **kw):
        """A FaultProxy in front of the server, closed at teardown."""
        from common.faults import FaultProxy

        p = self.run.params
        host = p.get("host") or os.environ.get("PGHOST") or "localhost"
        port = p.get("port") or os.environ.get("PGPORT") or 5432
        return self._stack.enter_context(FaultProxy(str(host), int(port), **kw))

    def via(self, proxy) -> dict:
        """This scenario's connection parameters, routed through a proxy."""
        return proxy.params(self.params)

    def role(self, suffix: str, connection_limit: int = -1) -> dict | None:
        """A login role of this scenario's own (for a CONNECTION LIMIT, say), allowed into its schema
        and its tables, dropped at teardown. Returns the connection parameters to log in as it
        (its password is masked in all output), or None when this run's role may not create roles:
        the scenario says so and takes its fallback."""
        import secrets

        from common import db

        if not db.scalar(self.run.admin, "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"):
            return None
        name, password = f"{self.schema}_{suffix}"[:63], secrets.token_urlsafe(16)
        output.redact.add(password)
        db.create_role(self.run.admin, name, password, connection_limit)
        self._stack.callback(db.drop_role, self.run.admin, name)
        with self.run.admin.cursor() as cur:
            cur.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA {s} TO {r}; "
                                "GRANT ALL ON ALL TABLES IN SCHEMA {s} TO {r}; "
                                "GRANT ALL ON ALL SEQUENCES IN SCHEMA {s} TO {r}")
                        .format(s=sql.Identifier(self.schema), r=sql.Identifier(name)))
        return {"user": name, "password": password}

    def tables(self, *names: str) -> None:
        from common import schema
        schema.create_tables(self.conn, *names)

    @property
    def tmpdir(self) -> Path:
        """A private folder for files; removed at teardown."""
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix=f"faillab-{self.run.run_id}-{self.id}-"))
        return self._tmpdir

    def spawn(self, target, *args) -> multiprocessing.Process:
        """Start a worker process (spawned, so it works the same on every OS); killed at teardown."""
        proc = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
        proc.start()
        self._workers.append(proc)
        return proc

    def thread(self, target, *args, name: str | None = None) -> threading.Thread:
        """Start a worker thread; joined at teardown (workers must end on their own)."""
        t = threading.Thread(target=target, args=args, name=name or f"faillab-{self.id}", daemon=True)
        t.start()
        self._workers.append(t)
        return t

    def barrier(self, parties: int, timeout: float = 30) -> threading.Barrier:
        """A threading.Barrier that teardown breaks, so an interrupted run never hangs on it."""
        b = threading.Barrier(parties, timeout=timeout)
        self._gates.append(b)
        return b

    def event(self) -> threading.Event:
        """A threading.Event that teardown sets, so an interrupted run never hangs on it."""
        e = threading.Event()
        self._gates.append(e)
        return e

    def _stop_workers(self, admin, interrupted: bool) -> None:
        """Release gates, end this run's database work if interrupted, then stop every worker."""
        from common import db

        for gate in self._gates:
            gate.abort() if isinstance(gate, threading.Barrier) else gate.set()
        if interrupted:  # a worker blocked in a query (a lock, pg_sleep) returns at once
            with contextlib.suppress(Exception):
                db.end_other_backends(admin)
        # Interrupted: workers are daemons that end with the process; do not let them hold the exit.
        deadline = time.monotonic() + (0.5 if interrupted else 3)
        for w in self._workers:
            if isinstance(w, threading.Thread):
                w.join(max(0.0, deadline - time.monotonic()))
            else:
                _kill_process(w)

    def on_cleanup(self, fn, *args) -> None:
        self._stack.callback(fn, *args)

    # -- what scenarios use: the six sections -----------------------------------------------------
    def _enter(self, name: str) -> None:
        target = SECTIONS.index(name)
        if target < self._section:
            raise RuntimeError(f"section {name!r} after {SECTIONS[self._section]!r}: sections only move forward")
        if target > self._section:
            self._section = target
            if self.run.args.pause and sys.stdin.isatty():  # instructor mode: one section at a time
                self.run.console.stream.write(self.run.console.text(f"   (Enter for {self.run.console.label(name)}) "))
                self.run.console.stream.flush()
                sys.stdin.readline()
            self.run.console.section(name)

    @property
    def _current(self) -> str:
        return SECTIONS[max(self._section, 0)]

    def say(self, text: str, style: str | None = None) -> None:
        """A paragraph in the current section."""
        for para in textwrap.dedent(text).strip("\n").split("\n"):
            self.run.console.line("   " + para if para.strip() else "", style, self._current)

    def description(self, text: str) -> None:
        self._enter("description")
        self.say(text)

    def trigger(self, text: str) -> None:
        self._enter("trigger")
        self.say(text)

    def root_cause(self, text: str, detect: str | None = None) -> None:
        self._enter("root_cause")
        self.say(text)
        if detect:
            self.say("How to detect it:")
            self.code(detect)

    def prevention(self, text: str, *code) -> None:
        """The design that prevents it; `code` items are functions (their real source is shown) or text."""
        self._enter("prevention")
        self.say(text)
        for item in code:
            self.code(inspect.getsource(item) if callable(item) else item)

    def code(self, text: str) -> None:
        for line in textwrap.dedent(text).strip("\n").splitlines():
            self.run.console.line("      " + line, "dim", self._current)

    def table(self, headers, rows) -> None:
        self.run.console.table(list(headers), [list(r) for r in rows], self._current)

    def bars(self, pairs, unit: str = "", width: int = 40) -> None:
        self.run.console.bars(list(pairs), width=width, unit=unit, section=self._current)

    def measure(self, name: str, value, note: str = ""):
        """Record a figure (journal `measurements`) and print it; returns the value."""
        self.measurements[name] = value
        self.run.console.line(f"   {name} = {value}" + (f"  ({note})" if note else ""), "bold", self._current)
        return value

    # -- what scenarios use: errors and checks ----------------------------------------------------
    @contextlib.contextmanager
    def expect(self, *types, sqlstate: str | None = None, label: str = ""):
        """Run the naive code; it must raise one of `types` (with `sqlstate`, if given).

        The error is shown and recorded. Before recovery it is evidence that the failure was
        triggered; during recovery (a fix refusing bad input) it counts toward `recovered`.
        Any other exception propagates and fails the scenario."""
        if self._section < SECTIONS.index("error"):
            self._enter("error")
        phase = "triggered" if self._section <= SECTIONS.index("root_cause") else "recovered"
        caught = Caught()
        want = label or " or ".join(t.__name__ for t in types) + (f" (SQLSTATE {sqlstate})" if sqlstate else "")
        try:
            yield caught
        except types as exc:
            caught.exc = exc
            state = getattr(exc, "pgcode", None)
            if sqlstate and state != sqlstate:
                self.observe(exc)
                self._check(phase, False, f"{want} raised, but SQLSTATE was {state}")
                return
            self.observe(exc)
            self._check(phase, True, f"{want} raised")
            return
        self._check(phase, False, f"{want} expected, nothing was raised")

    def observe(self, exc: BaseException, note: str = "") -> None:
        """Show and record a real exception caught by the scenario's own code."""
        if self._section < SECTIONS.index("error"):
            self._enter("error")
        if note:
            self.say(note)
        self.run.console.exception(exc, self._current)
        self.observed.append({"type": output.error_type(exc), "sqlstate": getattr(exc, "pgcode", None),
                              "message": output.redact(str(exc).strip())[:500]})

    def triggered_if(self, ok: bool, claim: str) -> bool:
        """Assert something about the failure (a measured bad state counts as the failure)."""
        if self._section < SECTIONS.index("error"):
            self._enter("error")
        return self._check("triggered", bool(ok), claim)

    def recovered_if(self, ok: bool, claim: str) -> bool:
        """Assert something about the recovered state."""
        return self._check("recovered", bool(ok), claim)

    def require(self, ok: bool, claim: str) -> None:
        """A check the rest of the scenario depends on: stop the scenario if it fails."""
        if not self._check("recovered" if self._section >= SECTIONS.index("recovery") else "triggered",
                           bool(ok), claim):
            raise Unfinished(claim)

    def _check(self, phase: str, ok: bool, claim: str) -> bool:
        self.checks.append(Check(phase, ok, claim))
        mark = self.run.console.check_mark(ok)
        self.run.console.line(f"   {mark} {claim}", "ok" if ok else "bad", self._current)
        return ok

    @contextlib.contextmanager
    def step(self, text: str):
        """A numbered recovery step, printed as it starts, with its result when it ends."""
        self._enter("recovery")
        self._step += 1
        self.run.console.line(f"   {self._step}. {text}", "bold", "recovery")
        box = StepResult()
        started = time.perf_counter()
        yield box
        took = time.perf_counter() - started
        self.run.console.line(f"      → {box.result or 'done'}  ({took:.2f} s)", None, "recovery")

    def verdicts(self) -> tuple[bool, bool]:
        trig = [c.ok for c in self.checks if c.phase == "triggered"]
        rec = [c.ok for c in self.checks if c.phase == "recovered"]
        return (bool(trig) and all(trig), bool(rec) and all(rec))


class Caught:
    exc: BaseException | None = None


class StepResult:
    result: str = ""


def config_prefix() -> str:
    from common.db import SCHEMA_PREFIX
    return SCHEMA_PREFIX


def _close_quietly(conn) -> None:
    with contextlib.suppress(Exception):
        conn.close()


def _kill_process(proc) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(5)


# -- running one scenario ------------------------------------------------------------------------
def run_scenario(run: Run, spec: ScenarioSpec, index: int) -> dict:
    from common import db

    console = run.console
    s = Scenario(run, spec, index)
    console.header(f"Scenario {index}: {spec.title}  [{spec.id}]")
    console.captured = {}
    threads_before = {t.ident for t in threading.enumerate()}
    started = time.perf_counter()
    status, reason, interrupted = "passed", None, None
    try:
        db.create_schema(run.admin, s.schema)
        s.conn = s.connect()
        spec.fn(s)
    except Unfinished as exc:
        reason = f"stopped early: {exc}"
    except (KeyboardInterrupt, Interrupted) as exc:
        status, reason, interrupted = "interrupted", "interrupted by signal", exc
    except Exception as exc:  # an error the scenario did not expect: show it, fail the scenario
        reason = f"unexpected {output.error_type(exc)}: {output.redact(str(exc).strip())[:300]}"
        console.line()
        console.line("   The scenario itself failed with an error it did not expect:", "bad", "error")
        console.exception(exc, "error")
    finally:
        cleaned, leftovers = teardown(run, s, threads_before, interrupted=status != "passed" or reason is not None)
    triggered, recovered = s.verdicts()
    if status == "passed" and not (triggered and recovered and cleaned):
        status = "failed"
        reason = reason or "; ".join(
            [c.claim for c in s.checks if not c.ok] + [f"left behind: {x}" for x in leftovers]) or "no checks ran"
    seconds = time.perf_counter() - started
    marks = "  ".join(f"{name} {console.check_mark(ok)}" for name, ok in
                      (("triggered", triggered), ("recovered", recovered), ("cleaned", cleaned)))
    console.line()
    console.line(f"   {marks}  {seconds:.1f} s" + (f"  -- {status}: {reason}" if status != "passed" else ""),
                 "ok" if status == "passed" else "bad")
    sections = {k: "\n".join(v) for k, v in (console.captured or {}).items()}
    console.captured = None
    record = {"id": spec.id, "title": spec.title, "status": status, "triggered": triggered,
              "recovered": recovered, "cleaned": cleaned, "observed_errors": s.observed,
              "measurements": s.measurements,
              "checks": [{"phase": c.phase, "ok": c.ok, "claim": c.claim} for c in s.checks],
              "sections": {k: sections.get(k, "") for k in SECTIONS}, "seconds": round(seconds, 3)}
    if reason:
        record["reason"] = reason
    if interrupted is not None:
        raise _ScenarioInterrupted(record) from interrupted
    return record


class _ScenarioInterrupted(BaseException):
    def __init__(self, record):
        self.record = record


def teardown(run: Run, s: Scenario, threads_before: set, interrupted: bool) -> tuple[bool, list[str]]:
    """Release everything the scenario made, measure that nothing is left, drop its schema."""
    from common import db

    leftovers: list[str] = []
    with _signals_deferred():
        try:
            s._stop_workers(run.admin, interrupted)
            s._stack.close()
        except Exception as exc:
            leftovers.append(f"cleanup error {output.error_type(exc)}: {exc}")
        if s._tmpdir is not None:
            shutil.rmtree(s._tmpdir, ignore_errors=True)
            if s._tmpdir.exists():
                leftovers.append(f"folder {s._tmpdir}")
        if not interrupted:  # the verdict needs the measurement; an interrupted run only needs to end
            leftovers += _leftovers(run, s, threads_before)
        if run.args.keep:
            with contextlib.suppress(Exception):  # an untagged schema is never swept as debris
                db.mark_kept(run.admin, s.schema)
            run.kept.append(s.schema)
        else:
            try:
                db.end_other_backends(run.admin)  # nothing of this run may hold a lock on the schema
                db.drop_schema(run.admin, s.schema)
                if db.schema_exists(run.admin, s.schema):
                    leftovers.append(f"schema {s.schema}")
            except Exception as exc:
                leftovers.append(f"schema {s.schema} ({output.error_type(exc)})")
    return not leftovers, leftovers


def _leftovers(run: Run, s: Scenario, threads_before: set) -> list[str]:
    """Threads, child processes and database sessions the scenario started and did not end."""
    from common import db, embedded
    import psutil

    deadline = time.monotonic() + 3
    while True:
        extra = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    found = [f"thread {t.name}" for t in extra]
    watchdog = embedded.watchdog_pid()
    children = [p for p in psutil.Process().children(recursive=True)
                if p.pid != watchdog and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(_cmdline(p))]
    found += [f"process {p.pid}" for p in children]
    with contextlib.suppress(Exception):
        deadline = time.monotonic() + 2  # a closed connection's backend takes a moment to exit
        while (left := db.scalar(run.admin, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                                 "AND pid <> pg_backend_pid()", (s.app,))) and time.monotonic() < deadline:
            time.sleep(0.02)
        if left:
            found.append(f"{left} open connection(s)")
    return found


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


@contextlib.contextmanager
def _signals_deferred():
    """Cleanup is short; a second Ctrl-C during it must not cut it in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    for sig in _SIGNALS:
        signal.signal(sig, lambda n, f: pending.append(n))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if pending:
            raise Interrupted(pending[0])


_SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


# -- the command line -----------------------------------------------------------------------------
def parse_args(argv, doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    p.add_argument("--list", action="store_true", help="print scenario ids and titles; needs no database")
    p.add_argument("--only", metavar="ID[,ID...]", help="run only these scenarios")
    p.add_argument("--json", metavar="PATH", help="write the journal to PATH ('-' for standard output)")
    p.add_argument("--keep", action="store_true", help="keep the private schemas for inspection")
    p.add_argument("--ascii", action="store_true", help="ASCII section labels instead of emoji")
    p.add_argument("--verbose", action="store_true", help="full stack traces")
    p.add_argument("--seed", type=int, default=1, help="seed for every random choice (default 1)")
    p.add_argument("--pause", action="store_true", help="on a terminal, wait for Enter before each section")
    p.add_argument("--report", metavar="PATH", help="write the run as a Markdown handout to PATH")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """Entry point of every fail_*.py: sys.exit with the contract's exit code."""
    config.quiet_library_warnings()
    module = sys.modules["__main__"]
    script = Path(getattr(module, "__file__", "fail.py")).name
    args = parse_args(sys.argv[1:] if argv is None else argv, module.__doc__)
    journal_to_stdout = args.json == "-"
    stream = sys.stderr if journal_to_stdout else sys.stdout
    with contextlib.suppress(Exception):
        stream.reconfigure(errors="replace")  # never crash on a console that cannot show a character
    console = output.Console(stream, ascii_only=True if args.ascii else None, verbose=args.verbose)
    if args.list:
        for spec in _REGISTRY:
            print(f"{spec.id:24} {spec.title}")
        sys.exit(0)
    selected = list(_REGISTRY)
    if args.only:
        wanted = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [w for w in wanted if w not in {s.id for s in _REGISTRY}]
        if unknown:
            _fail_start(f"unknown scenario id(s): {', '.join(unknown)}; see --list")
        selected = [s for s in _REGISTRY if s.id in wanted]
    for sig in _SIGNALS[1:]:
        signal.signal(sig, _raise_interrupted)
    code = 0
    try:
        code = _run(script, args, console, selected)
    except (KeyboardInterrupt, Interrupted):
        code = 130
    sys.exit(code)


def _fail_start(message: str) -> None:
    sys.stderr.write(output.redact(f"error: {message}\n"))
    sys.exit(2)


def _run(script: str, args, console: output.Console, selected: list[ScenarioSpec]) -> int:
    from common import db
    import psycopg2

    started_at = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    for warning in config.load_dotenv_files():
        sys.stderr.write(f"warning: {warning}\n")
    records: list[dict] = []
    exit_code = 0
    run = None
    target = None
    with contextlib.ExitStack() as stack:
        try:
            with _signals_deferred():
                try:
                    target, params, admin = stack.enter_context(db.open_target())
                except (config.ConfigError, db.StartupError) as exc:
                    _fail_start(str(exc))
            display = config.describe(params)
            run_id = db.new_run_id()
            run = Run(script, args, console, target, params, run_id, admin)
            with admin.cursor() as cur:
                cur.execute("SET application_name = %s", (f"faillab:{run_id}",))
            run.server_version = db.scalar(admin, "SHOW server_version").split()[0]
            run.server_version_num = int(db.scalar(admin, "SHOW server_version_num"))
            try:
                swept = db.sweep_dead_runs(admin)
                probe = f"{db.SCHEMA_PREFIX}{run_id}_probe"
                db.create_schema(admin, probe)
                db.drop_schema(admin, probe)
            except psycopg2.errors.InsufficientPrivilege as exc:
                _fail_start(f"the role cannot create a schema in {display}: {str(exc).strip()} "
                            "(GRANT CREATE ON DATABASE ... TO the role, or use another database)")
            console.header(f"{script}: {len(selected)} scenario(s), run {run_id}")
            kind = "embedded default server (nothing configured)" if target.mode == "embedded" \
                else f"configured by {target.mode}"
            console.line(f"   target: {display}  [{kind}]")
            console.line(f"   server: PostgreSQL {run.server_version}; private schemas {db.SCHEMA_PREFIX}{run_id}_*")
            if swept:
                console.line(f"   removed {len(swept)} schema(s) left by killed runs: {', '.join(swept)}", "dim")
            for index, spec in enumerate(selected, 1):
                records.append(run_scenario(run, spec, index))
        except _ScenarioInterrupted as stop:
            records.append(stop.record)
            exit_code = 130
        except (KeyboardInterrupt, Interrupted):
            exit_code = 130
    if run is not None and args.keep and run.kept:
        console.line()
        console.line("Kept for inspection (--keep):", "bold")
        console.line("   open psql on the same server:  python code/init_schemas.py --psql")
        for name in run.kept:
            console.line(f"   SET search_path TO {name}; \\dt")
        console.line(f"   drop them when done:  DROP SCHEMA {run.kept[0]} CASCADE;  (and the others)")
    for spec in selected[len(records):]:
        if exit_code == 130:
            records.append({"id": spec.id, "title": spec.title, "status": "interrupted", "triggered": False,
                            "recovered": False, "cleaned": True, "observed_errors": [], "measurements": {},
                            "sections": {}, "seconds": 0, "reason": "not run: interrupted"})
    if exit_code == 0 and any(r["status"] != "passed" for r in records):
        exit_code = 1
    summary(console, records, time.perf_counter() - t0)
    journal = {
        "script": script, "run_id": run.run_id if run else None,
        "started_at": started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(time.perf_counter() - t0, 3), "exit_code": exit_code,
        "database": {"mode": target.mode if target else None,
                     "server_version": run.server_version if run else None,
                     "target": output.redact(config.describe(run.params)) if run else None},
        "scenarios": records,
    }
    if args.json:
        text = output.redact(json.dumps(journal, indent=2, default=str))
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    if args.report:
        from common import report
        Path(args.report).write_text(output.redact(report.render(journal)), encoding="utf-8")
        console.line(f"handout written to {args.report}")
    return exit_code


def summary(console: output.Console, records: list[dict], seconds: float) -> None:
    if not records:
        return
    console.header("Summary")
    mark = console.check_mark
    console.table(["scenario", "triggered", "recovered", "cleaned", "status", "seconds"],
                  [[r["id"], mark(r["triggered"]), mark(r["recovered"]), mark(r["cleaned"]), r["status"],
                    f"{r['seconds']:.1f}"] for r in records])
    passed = sum(r["status"] == "passed" for r in records)
    console.line()
    console.line(f"{passed} passed, {len(records) - passed} failed  ({seconds:.1f} s)",
                 "ok" if passed == len(records) else "bad")
