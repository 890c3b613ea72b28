"""The handle a scenario function gets (see CONTRACT.md), and the registry of scenarios.

A script declares scenarios with `@scenario(id, title)`; each function receives a `Scenario`:
its private schema and connections, its six sections, and the checks that become its verdicts.
Everything it starts (connections, proxies, roles, threads, processes, files) is registered
here, so that cleanup can end it.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import multiprocessing
import os
import random
import re
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from psycopg2 import sql

from common import config, output
from common.db import SCHEMA_PREFIX
from common.output import SECTIONS

_REGISTRY: list["ScenarioSpec"] = []


@dataclass
class ScenarioSpec:
    id: str
    title: str
    fn: object
    fixes: tuple = ()  # common.fixes.Fix values: the slots its recovery runs through s.fix()


def scenario(scenario_id: str, title: str, fixes=()):
    """Register a scenario function and the fixes it declares; scripts list them in reading order."""
    def register(fn):
        if all(s.id != scenario_id for s in _REGISTRY):
            _REGISTRY.append(ScenarioSpec(scenario_id, title, fn, tuple(fixes)))
        return fn
    return register


class Unfinished(Exception):
    """A scenario stopped early because a check it depends on failed."""


class Skipped(Exception):
    """The scenario cannot run here (a server version, a missing facility); its reason is shown."""


@dataclass
class Check:
    phase: str  # "triggered" or "recovered"
    ok: bool
    claim: str
    yours: bool = False  # an exercise's recovery claim made after the student's code ran (see Scenario.make_check)
    after_stop: bool = False  # ... and after a call of it was stopped at its time limit


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
    student: object = None  # the student's exercise module, whose functions fill the fix slots


class Scenario:
    """The handle a scenario function gets. Sections only move forward, as the reader does."""

    def __init__(self, run: Run, spec: ScenarioSpec, index: int, slots=None):
        from common.fixes import Slots

        self.run = run
        self.slots = slots or Slots.for_run(spec.fixes)
        self.id = spec.id
        self.title = spec.title
        self.schema = f"{SCHEMA_PREFIX}{run.run_id}_{spec.id}"[:63]
        self.app = f"faillab:{run.run_id}"
        self.rng = random.Random(f"{run.args.seed}:{spec.id}")
        self.seed = run.args.seed
        self.checks: list[Check] = []
        self.observed: list[dict] = []
        self.measurements: dict[str, object] = {}
        self._section = -1
        self._step = 0
        self._said = 0  # texts said in the current section (the presenter's mode shows the first)
        self.paused = 0.0  # seconds spent waiting for Enter (--pause): not the scenario's time
        self.lesson = ""  # the lesson in one line, and questions for discussion (see prevention)
        self.questions: tuple[str, ...] = ()
        self.headline = ""  # the figure the lab's summary shows (see measure)
        self._stack = contextlib.ExitStack()
        self._workers: list = []  # threads and processes, stopped before anything else
        self._gates: list = []  # barriers and events, released so no worker waits forever
        self._stopping = False  # set by teardown: from then on a worker's error is expected
        self.worker_errors: list[tuple[str, BaseException]] = []  # a worker's unexpected error fails the run
        self._tmpdir: Path | None = None
        self._fork_server = False  # started by spawn_many(), stopped at teardown
        self.conn = None
        from common.metrics import Metrics

        self.metrics = Metrics()  # what the pipeline counts: the naive run's and the fixed run's apart
        self.detector = None  # the check the root cause shows (common.detect)
        self.detection: dict | None = None  # what it returned on the broken state, then after the fix

    # -- what scenarios use: the fixes --------------------------------------------------------------
    def fix(self, slot: str):
        """What the slot holds in this run: the fixed code, the naive code (a negative control) or
        a student's function (an exercise). The recovery calls the fix only through here."""
        return self.slots[slot]

    # -- what scenarios use: metrics --------------------------------------------------------------
    @property
    def metrics_phase(self) -> str:
        """Whose metrics the pipeline counts now: the naive run's until the recovery starts."""
        return "naive" if self.phase == "triggered" else "fixed"

    def counter(self, name: str, doc: str, labels=()):
        """A prometheus_client Counter in the registry of the run under way (naive or fixed)."""
        return self.metrics.metric(self.metrics_phase, "counter", name, doc, labels)

    def gauge(self, name: str, doc: str, labels=()):
        """A prometheus_client Gauge in the registry of the run under way (naive or fixed)."""
        return self.metrics.metric(self.metrics_phase, "gauge", name, doc, labels)

    # -- what scenarios use: the database --------------------------------------------------------
    @property
    def params(self) -> dict:
        """Connection parameters (picklable) for this scenario's schema: hand them to workers."""
        from common import db

        return db.conn_params(self.run.params, schema=self.schema, app=self.app)

    @property
    def server_version_num(self) -> int:
        return self.run.server_version_num

    def connect(self, params: dict | None = None, autocommit: bool = False, **overrides):
        """A new connection into this scenario's schema, closed at teardown."""
        from common import db

        conn = db.connect(self.params, autocommit=autocommit, **{**(params or {}), **overrides})
        self._stack.callback(_close_quietly, conn)
        return conn

    def proxy(self, **kw):
        """A FaultProxy in front of the server the run's admin connection reached, as libpq
        resolved it (pgpass, service file, Unix socket, multi-host, TLS); closed at teardown."""
        from common.faults import FaultProxy

        return self._stack.enter_context(FaultProxy.in_front_of(self.run.admin, **kw))

    def via(self, proxy) -> dict:
        """This scenario's connection parameters, routed through a proxy (and logging in as the
        admin connection did)."""
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
        from common.cleanup import signals_deferred

        if self._tmpdir is None:
            with signals_deferred():  # a Ctrl-C between making the folder and keeping its name would leak it
                self._tmpdir = Path(tempfile.mkdtemp(prefix=f"faillab-{self.run.run_id}-{self.id}-"))
        return self._tmpdir

    def spawn(self, target, *args, method: str = "spawn") -> multiprocessing.Process:
        """Start a worker process (spawned, so it works the same on every OS); killed at teardown."""
        from common.cleanup import signals_deferred
        from common.fixes import unwrap_for_process

        proc = multiprocessing.get_context(method).Process(
            target=unwrap_for_process(target), args=tuple(unwrap_for_process(a) for a in args), daemon=True)
        with signals_deferred():  # a Ctrl-C in start() would cut the pickled arguments short
            proc.start()
        self._workers.append(proc)
        return proc

    def spawn_many(self, target, *args) -> multiprocessing.Process:
        """spawn() for a scenario that starts dozens of short workers one after another: where the
        OS can fork (not Windows), each is forked from a server process that imported the lesson
        once, instead of being a fresh interpreter that imports it again (most of a short worker's
        time). The worker itself is the same: fresh module state, pickled arguments, its exit code.
        The fork server is this scenario's and stops at teardown."""
        import json
        from multiprocessing import forkserver, spawn

        from common import forkmain

        if "forkserver" not in multiprocessing.get_all_start_methods():
            return self.spawn(target, *args)
        if not self._fork_server:
            main = {k: v for k, v in spawn.get_preparation_data("main").items() if k.startswith("init_main_")}
            modules = {getattr(f, "__module__", None) for f in (target, *args) if callable(f)} - {None, "__main__"}
            forkserver.set_forkserver_preload(["common.forkmain", *sorted(modules)])  # a student's module too
            os.environ[forkmain.MAIN_VARIABLE] = json.dumps(main)  # the server's environment, read once
            try:
                forkserver.ensure_running()
            except OSError:  # no room for its socket: start them the slow way
                return self.spawn(target, *args)
            finally:
                os.environ.pop(forkmain.MAIN_VARIABLE, None)
            self._fork_server = True
            self._stack.callback(_stop_fork_server)
        return self.spawn(target, *args, method="forkserver")

    def thread(self, target, *args, name: str | None = None) -> threading.Thread:
        """Start a worker thread; joined at teardown (workers must end on their own). A worker that
        fails because teardown ended its work (a broken barrier, a terminated backend) ends quietly;
        any other failure of a worker is shown as usual, and fails the scenario (runner)."""
        def run():
            try:
                target(*args)
            except Exception as exc:
                if not self._stopping:
                    self.worker_errors.append((threading.current_thread().name, exc))
                    raise

        t = threading.Thread(target=run, name=name or f"faillab-{self.id}", daemon=True)
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

        self._stopping = True
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
        _checkpoint()
        target = SECTIONS.index(name)
        if target < self._section:
            raise RuntimeError(f"section {name!r} after {SECTIONS[self._section]!r}: sections only move forward")
        if target > self._section:
            self._section = target
            self._said = 0
            if self.run.args.pause and sys.stdin.isatty():  # instructor mode: one section at a time
                waited = time.perf_counter()
                self.run.console.stream.write(self.run.console.text(f"   (Enter for {self.run.console.label(name)}) "))
                self.run.console.stream.flush()
                sys.stdin.readline()
                self.paused += time.perf_counter() - waited  # the room's thinking is not the scenario's time
            self.run.console.section(name)

    @property
    def _current(self) -> str:
        return SECTIONS[max(self._section, 0)]

    @property
    def _brief(self) -> bool:
        return bool(getattr(self.run.console, "brief", False))

    def say(self, text: str, style: str | None = None, essential: bool | None = None) -> None:
        """A paragraph in the current section, reflowed to the terminal. In the presenter's mode
        (--brief) a section shows the first paragraph of its first text only, unless `essential`
        says otherwise (True: show all of it; False: never in brief)."""
        _checkpoint()
        console, section = self.run.console, self._current
        first = self._said == 0
        self._said += 1
        console.block(section, "prose", text=textwrap.dedent(text).strip("\n"), style=style)
        if not self._brief:
            console.prose(text, style=style, section=section)
        elif essential or (essential is None and first):
            console.prose(text, style=style, section=section, first_only=not essential)

    def description(self, text: str) -> None:
        self._enter("description")
        self.say(text)

    def trigger(self, text: str) -> None:
        self._enter("trigger")
        self.say(text)

    def root_cause(self, text: str, detect=None, runbook: str = "") -> None:
        """Why it happened, and how an operator finds it: `detect` is a detector (common.detect,
        or a function of a connection). It runs now, against the broken state, and must fire; it
        runs again at the end of the recovery, and must be quiet. `runbook` is the handout's entry
        for the on-call: what the alert means and the first response."""
        self._enter("root_cause")
        self.say(text)
        if detect is None:
            return
        from common import detect as detectors

        self.detector = detectors.as_detector(detect)
        text, lang = self.detector.show(self)
        self.say(f"How to detect it ({detectors.describe(self.detector)}):", essential=False)
        self.code(text, lang=lang)
        self.metrics.sample("naive")
        found = self.detector.probe(self, "naive")
        self.detection = {"check": self.detector.name, "kind": self.detector.kind, "shown": text,
                          "fired": bool(found), "found_broken": detectors.summary(found),
                          "quiet_after_fix": None, "found_after_fix": None,
                          "runbook": " ".join(textwrap.dedent(runbook).split())}
        self._show_found(found)
        self._check("triggered", bool(found), f"the detector {self.detector.name} fires on the broken state")

    def detect_again(self) -> bool:
        """Run the root cause's detector against the recovered state, as a recovery step: it must
        be quiet. `prevention()` does this when the scenario has not."""
        from common import detect as detectors

        with self.step(f"Run the {detectors.describe(self.detector)} again") as st:
            self.metrics.sample("fixed")
            found = self.detector.probe(self, "fixed")
            st.result = "quiet: it finds nothing" if not found else f"it still fires: {len(found)} found"
        self.detection.update(quiet_after_fix=not found, found_after_fix=detectors.summary(found))
        if found:
            self._show_found(found)
        return self._check("recovered", not found,
                           f"the detector {self.detector.name} is quiet after the recovery")

    def _show_found(self, found: list) -> None:
        from common import detect as detectors

        what = detectors.describe(self.detector)  # named here too: the presenter's mode shows only this
        if found:
            self.say(f"The {what} fired: {len(found)} found.", essential=True)
            self.code("\n".join(detectors.summary(found)), lang="text")
        else:
            self.say(f"The {what} found nothing.", essential=True)

    def prevention(self, text: str, *code, lesson: str | None = None, questions=()) -> None:
        """The design that prevents it, then the source of every fix slot as this run held it (what
        the checks ran), then any `code` items: functions (their real source) or text (SQL, settings).
        `lesson` is the scenario's lesson in one line (default: the first sentence of `text`);
        `questions` are two or three questions for discussion (the handout ends with both)."""
        if self.detection is not None and self.detection["quiet_after_fix"] is None:
            self.detect_again()
        self._enter("prevention")
        self.lesson = " ".join((lesson or first_sentence(text)).split())
        self.questions = tuple(" ".join(q.split()) for q in questions)
        console = self.run.console
        if self._brief:  # the presenter's mode: the one-line lesson and where the fix is
            self._said += 1
            console.block("prevention", "prose", text=textwrap.dedent(text).strip("\n"))
            console.prose(self.lesson, section="prevention")
            names = [f"{f.slot}()" for f in self.slots.fixes]
            if names:
                console.prose(f"(The fix: {', '.join(names)}; the full run shows its code.)", style="dim",
                              section="prevention")
        else:
            self.say(text)
        if self.slots.mode != "fixed":
            what = "the naive code" if self.slots.mode == "control" else "your code"
            self.say(f"(This run held {what} in the fix slot(s); the lesson's fix is shown by a normal run.)",
                     essential=True)
        shown = [(source, "python") for source in self.slots.sources()] + [
            (inspect.getsource(item), "python") if callable(item) else (item, None) for item in code]
        for n, (text, lang) in enumerate(shown):
            if n and not self._brief:
                self.run.console.line(section="prevention")  # one blank line between two pieces of code
            self.code(text, lang=lang)

    def code(self, text: str, lang: str | None = None) -> None:
        """Code, shown as is (never reflowed); `lang` (python, sql) marks it in the handout, guessed
        when not given. The presenter's mode leaves code to the full run."""
        text = textwrap.dedent(text).strip("\n")
        self.run.console.block(self._current, "code", text=text, lang=lang or guess_language(text))
        if not self._brief:
            self.run.console.code(text, section=self._current)

    def table(self, headers, rows) -> None:
        headers = [str(h) for h in headers]
        rows = [[output.cell(c) for c in r] for r in rows]
        self.run.console.block(self._current, "table", headers=headers, rows=rows)
        self.run.console.table(headers, rows, self._current)

    def bars(self, pairs, unit: str = "", width: int = 40) -> None:
        pairs = list(pairs)
        self.run.console.block(self._current, "bars", pairs=[[str(n), v] for n, v in pairs], unit=unit)
        self.run.console.bars(pairs, width=width, unit=unit, section=self._current)

    def measure(self, name: str, value, note: str = "", show: bool = True, headline: bool = False):
        """Record a figure (journal `measurements`) and print it, unless `show` is False (a figure
        already on screen in a table or a sentence); returns the value. `headline` marks the
        figure the lab's summary shows for this scenario (default: the damage, *_before)."""
        self.measurements[name] = value
        if headline:
            self.headline = name
        self.run.console.block(self._current, "measure", name=name, value=output.words(value), note=note, shown=show)
        if show:
            text = f"{name} = {output.words(value)}" + (f"  ({note})" if note else "")
            self.run.console.wrapped(text, output.PROSE, output.PROSE + "  ", "bold", self._current)
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
        since = self.slots.entered()  # the error is the student's only if their code ran inside
        caught = Caught()
        want = label or " or ".join(t.__name__ for t in types) + (f" (SQLSTATE {sqlstate})" if sqlstate else "")
        try:
            yield caught
        except types as exc:
            caught.exc = exc
            state = getattr(exc, "pgcode", None)
            if sqlstate and state != sqlstate:
                self.observe(exc)
                self._check(phase, False, f"{want} raised, but SQLSTATE was {state}", since)
                return
            self.observe(exc)
            self._check(phase, True, f"{want} raised", since)
            return
        self._check(phase, False, f"{want} expected, nothing was raised", since)

    def observe(self, exc: BaseException, note: str = "") -> None:
        """Show and record a real exception caught by the scenario's own code."""
        if self._section < SECTIONS.index("error"):
            self._enter("error")
        if note:
            self.say(note, essential=False)
        self.run.console.exception(exc, self._current, brief=self._brief)
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
        if not self._check(self.phase, bool(ok), claim):
            raise Unfinished(claim)

    def skip(self, reason: str) -> None:
        """Stop: this scenario cannot work here. Recorded as skipped with the reason, not failed."""
        raise Skipped(reason)

    def make_check(self, phase: str, ok: bool, claim: str, since: int = 0) -> Check:
        """A check, told apart for an exercise's grade: a recovery claim is the student's when
        their code ran before it (since `since` entries: inside an expect block), not when it is a
        step of the lesson's own that their code cannot have touched."""
        yours = phase == "recovered" and self.slots.entered() > since
        return Check(phase, ok, claim, yours, yours and self.slots.stopped())

    def _check(self, phase: str, ok: bool, claim: str, since: int = 0) -> bool:
        _checkpoint()
        self.checks.append(self.make_check(phase, ok, claim, since))
        self.metrics.sample(self.metrics_phase)
        console = self.run.console
        console.block(self._current, "check", ok=ok, claim=claim)
        console.wrapped(f"{console.check_mark(ok)} {claim}", output.PROSE, output.PROSE + "  ", "ok" if ok else "bad",
                        self._current)
        return ok

    @contextlib.contextmanager
    def step(self, text: str):
        """A numbered recovery step, printed as it starts, with its result when it ends."""
        self._enter("recovery")
        self.run.console.step_break()  # --pause: a long section is shown a step at a time
        self._step += 1
        console, number = self.run.console, self._step
        number_w = len(f"{number}. ")
        console.wrapped(f"{number}. {text}", output.PROSE, output.PROSE + " " * number_w, "bold", "recovery")
        block = console.block("recovery", "step", number=number, text=text)  # before what the step shows
        box = StepResult()
        started, paused = time.perf_counter(), self.paused
        yield box
        took = time.perf_counter() - started - (self.paused - paused)
        block.update(result=box.result or "done", seconds=round(took, 3))
        self.metrics.sample(self.metrics_phase)
        console.wrapped(f"→ {box.result or 'done'}  ({took:.2f}\u00a0s)", output.PROSE + " " * number_w,
                        output.PROSE + " " * (number_w + 2), None, "recovery")

    @property
    def phase(self) -> str:
        """The verdict the scenario is working toward now: "triggered" until recovery starts."""
        return "recovered" if self._section >= SECTIONS.index("recovery") else "triggered"

    def verdicts(self) -> tuple[bool, bool]:
        trig = [c.ok for c in self.checks if c.phase == "triggered"]
        rec = [c.ok for c in self.checks if c.phase == "recovered"]
        return (bool(trig) and all(trig), bool(rec) and all(rec))


def first_sentence(text: str) -> str:
    """The first sentence of a text's first paragraph (a period, then a capital), or all of it."""
    para = " ".join(textwrap.dedent(text).strip().split("\n\n")[0].split())
    end = re.search(r"(?<=[\w)\]\"'`])[.!?](?=\s+[A-Z(`\"'])", para)
    return para[:end.end()] if end else para


_SQL_START = re.compile(r"\s*(--|SELECT|WITH|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|BEGIN|COMMIT|SET|SHOW|"
                        r"GRANT|REVOKE|EXPLAIN|TRUNCATE|COPY|VACUUM|ANALYZE|LOCK|DO|CALL)\b", re.IGNORECASE)


def guess_language(text: str) -> str:
    """python, sql or text: for the handout's fenced code blocks."""
    if _SQL_START.match(text):
        return "sql"
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return "text"
    return "python" if re.search(r"^\s*(def|class|import|from|@|\w+\s*=|return|with|for|if)\b", text, re.M) else "text"


class Caught:
    exc: BaseException | None = None


class StepResult:
    result: str = ""


def _close_quietly(conn) -> None:
    with contextlib.suppress(Exception):
        conn.close()


def _checkpoint() -> None:
    """Where a scenario's text or a claim is printed: a signal whose exception was lost is raised."""
    from common.cleanup import raise_if_signalled

    raise_if_signalled()


def _stop_fork_server() -> None:
    from multiprocessing import forkserver

    with contextlib.suppress(OSError, ChildProcessError):
        forkserver._forkserver._stop()  # closes its "alive" pipe and waits for it to exit
    # multiprocessing made a pymp-* folder for the server's socket and removes it only when the
    # process exits: the scenario made it, so its teardown runs that removal now (and only once).
    from multiprocessing import process, util

    for finalizer in list(util._finalizer_registry.values()):
        if getattr(finalizer, "_callback", None) is util._remove_temp_dir:
            finalizer()
    process.current_process()._config.pop("tempdir", None)


def _kill_process(proc) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(5)


