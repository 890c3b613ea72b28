"""The scenario runner and command line shared by every fail_*.py (see CONTRACT.md).

A script ends with `main()`: it parses the flags, finds the database (or starts the embedded
one), runs the selected scenarios one by one, each in its own private schema, prints the
verdicts, writes the journal (and the handout), and exits with the contract's code.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import stat
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import config, output
from common.cleanup import (SIGNALS, Interrupted, arm_signals, footprint, guard_standard_streams, liveness,
                            raise_if_signalled, signal_handled, signalled,
                            signals_deferred, sweep, teardown, watch_writes)
from common.output import SECTIONS
from common.scenario import _REGISTRY, Check, Run, Scenario, ScenarioSpec, Skipped, Unfinished


# -- running one scenario ------------------------------------------------------------------------
def slots_for(run: Run, spec: ScenarioSpec):
    """What the scenario's fix slots hold in this run: the fixes, a control's naive code, or the
    student's functions."""
    from common import db, fixes

    control = tuple(f.slot for f in spec.fixes if run.args.control and
                    (run.args.control == ["all"] or f.slot in run.args.control))
    return fixes.Slots.for_run(spec.fixes, control=control, student=run.student,
                               on_timeout=lambda: db.cancel_other_backends(run.admin),
                               limit=run.args.call_limit)


def run_scenario(run: Run, spec: ScenarioSpec, index: int) -> dict:
    from common import budget, db

    console = run.console
    s = Scenario(run, spec, index, slots_for(run, spec))
    console.header(f"Scenario {index} of {len(_REGISTRY)}: {spec.title}  [{spec.id}]")
    if s.slots.mode == "control":
        console.wrapped(f"negative control: the naive code is back in {', '.join(s.slots.control)}; "
                        "this run must fail", style="bad")
    console.captured, console.blocks = {}, {}
    before = footprint(run)  # what exists now: a leak is what the scenario adds to it
    waited_before = console.waited  # Enter pressed inside a section (--pause) is the room's time too
    started = time.perf_counter()
    status, reason, interrupted, cannot_wait = "passed", None, None, None
    try:
        budget.room(s)  # on a shared server: wait until it has room for this scenario's sessions
        db.create_schema(run.admin, s.schema)
        s.conn = s.connect()
        spec.fn(s)
        raise_if_signalled()  # a signal whose exception the scenario's code lost on the way
    except Skipped as exc:
        status, reason = "skipped", str(exc)
        console.wrapped(f"skipped: {exc}", hang="     ", style="bold")
    except budget.NoRoom as exc:  # a shared server that had no room for it: not run, and not a pass
        reason = f"not run: {exc}"
    except budget.CannotWait as exc:  # no wait can help on this server: cleaned, then exit 2
        status, reason, cannot_wait = "failed", f"not run: {exc}", exc
    except Unfinished as exc:
        reason = f"stopped early: {exc}"
        s.checks.append(s.make_check(s.phase, False, reason))  # whatever passed before, this phase did not end
    except (KeyboardInterrupt, Interrupted) as exc:
        status, reason, interrupted = "interrupted", "interrupted by signal", exc
        signal_handled()
    except db.StartupError:  # a name somebody else took: the run cannot go on (exit 2), after cleanup
        raise
    except Exception as exc:
        if signalled():  # a signal came, and this error took the place of its exception (see on_signal)
            status, reason, interrupted = "interrupted", "interrupted by signal", exc
            signal_handled()
        else:  # an error the scenario did not expect: show it, fail the scenario
            reason = f"unexpected {output.error_type(exc)}: {output.redact(str(exc).strip())[:300]}"
            s.checks.append(s.make_check(s.phase, False, reason))  # a crash fails its phase, whatever passed before
            console.line()
            console.line("   " + s.slots.crash_heading(exc), "bad", "error")  # the student's own error, as theirs
            console.exception(exc, "error")
    finally:
        cleaned, leftovers = teardown(run, s, before, stop_hard=status != "passed" or reason is not None,
                                      interrupted=interrupted is not None)
    if signalled():  # a signal whose exception was lost, and then a skip or an early stop: still a stop
        status, reason, interrupted = "interrupted", "interrupted by signal", Interrupted(0)
        signal_handled()
    if cannot_wait is not None:
        _fail_start(str(cannot_wait))
    for name, exc in s.worker_errors if status == "passed" else ():  # a worker that crashed: no pass
        claim = f"unexpected {output.error_type(exc)} in worker {name}: {output.redact(str(exc).strip())[:300]}"
        s.checks.append(s.make_check(s.phase, False, claim))
        reason = reason or claim
    reason = student_verdicts(s, reason)
    triggered, recovered = s.verdicts()
    if status == "skipped" and (failed := [c.claim for c in s.checks if not c.ok]):
        status, reason = "failed", "; ".join(failed + [f"then skipped: {reason}"])  # a skip hides no failure
    if status == "passed" and not (triggered and recovered and cleaned):
        status = "failed"
        reason = reason or "; ".join(c.claim for c in s.checks if not c.ok)
    if status == "passed" and s.detection is None:  # CONTRACT: every scenario runs its detector
        status, reason = "failed", "no detector ran: the root cause names no check to fire on the failure"
    if leftovers:  # measured after every outcome: a skip or an interrupt that leaks says what it left
        status = "failed" if status == "skipped" else status
        reason = "; ".join(filter(None, [reason, f"left behind: {', '.join(leftovers)}"]))
    reason = reason or ("no checks ran" if status == "failed" else None)
    paused = s.paused + console.waited - waited_before
    seconds = time.perf_counter() - started - paused  # waiting for Enter is the room's time
    kept = run.args.keep and s.schema in run.kept
    marks = "  ".join(f"{name} {console.check_mark(ok)}" for name, ok in
                      (("triggered", triggered), ("recovered", recovered)))
    marks += f"  kept {s.schema}" if kept else f"  cleaned {console.check_mark(cleaned)}"
    console.line()
    console.wrapped(f"{marks}  {seconds:.1f}\u00a0s" + (f"  -- {status}: {reason}" if status != "passed" else ""),
                    hang="      ", style="ok" if status == "passed" else "bad")
    sections = {k: "\n".join(v) for k, v in (console.captured or {}).items()}
    blocks = console.blocks or {}
    console.captured = console.blocks = None
    record = {"id": spec.id, "number": index, "title": spec.title, "status": status, "triggered": triggered,
              "recovered": recovered, "cleaned": cleaned, "observed_errors": s.observed,
              "measurements": s.measurements, "fixes": s.slots.describe(), "mode": s.slots.mode,
              "checks": [{"phase": c.phase, "ok": c.ok, "claim": c.claim} |
                         ({"yours": c.yours, "after_stop": c.after_stop} if s.slots.mode == "exercise" else {})
                         for c in s.checks],
              "sections": {k: sections.get(k, "") for k in SECTIONS}, "seconds": round(seconds, 3),
              "paused_seconds": round(paused, 3), "blocks": {k: blocks.get(k, []) for k in SECTIONS}, "headline": headline(s),
              "lesson": s.lesson, "questions": list(s.questions), "detection": s.detection}
    if s.metrics.used():
        record["metrics"] = s.metrics.series
        if run.args.metrics:
            s.metrics.write(Path(run.args.metrics) / Path(run.script).stem, spec.id)
    if s.slots.mode == "exercise":
        from common import exercise
        record["student"] = exercise.what_the_code_did(s.slots)
    if kept:
        record["kept"] = s.schema
    if reason:
        record["reason"] = reason
    if interrupted is not None:
        raise _ScenarioInterrupted(record) from interrupted
    return record


def student_verdicts(s: Scenario, reason: str | None) -> str | None:
    """In an exercise, a crash out of the student's code is a failed claim in their words, and a
    call stopped at its time limit fails the scenario by that name, even when the scenario caught
    what the stop raised (a cancelled query, say). Returns the reason, reworded the same way."""
    if s.slots.mode != "exercise":
        return reason
    claim = s.slots.crash_claim()
    if claim and reason:
        for c in s.checks:
            if c.claim == reason:
                c.claim, c.yours = claim, True
        reason = claim
    for log in s.slots.logs.values():
        if log.expired and not any(log.timeout_message in c.claim for c in s.checks):
            s.checks.append(Check("recovered", False, log.timeout_message, yours=True))
    return reason


class _ScenarioInterrupted(BaseException):
    def __init__(self, record):
        self.record = record


# -- the command line -----------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (the contract's one clear message, exit 2)."""

    def error(self, message: str):
        self.exit(2, output.redact(f"{self.prog}: error: {message} (see --help)\n"))


def bounded(convert, low, high, what: str):
    """An argparse type: a number `convert` reads (int, float), from low to high; inf and nan never."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:  # also false for nan
            shown = (lambda v: f"{v:g}") if convert is float else str
            raise argparse.ArgumentTypeError(f"{text} is out of range ({shown(low)} to {shown(high)})")
        return value
    return parse


def integer(low: int, high: int):
    return bounded(int, low, high, "a whole number")


def seconds(low: float, high: float):
    return bounded(float, low, high, "a number of seconds")


SEED = integer(0, 2 ** 63 - 1)
EXERCISE_FLAGS = ("--exercise-dir", "--hint", "--solution", "--call-limit", "--restart")


def parse_args(argv, doc: str) -> argparse.Namespace:
    p = Parser(description=(doc or "").strip().splitlines()[0] if doc else None)
    p.add_argument("--list", action="store_true", help="print scenario ids and titles; needs no database")
    p.add_argument("--only", metavar="ID[,ID...]", help="run only these scenarios")
    p.add_argument("--json", metavar="PATH", help="write the journal to PATH ('-' for standard output)")
    p.add_argument("--keep", action="store_true", help="keep the private schemas for inspection")
    p.add_argument("--ascii", action="store_true", help="ASCII section labels instead of emoji")
    p.add_argument("--verbose", action="store_true", help="full stack traces")
    p.add_argument("--seed", type=SEED, default=1, help="seed for every random choice (default 1)")
    p.add_argument("--pause", action="store_true",
                   help="on a terminal, wait for Enter before each section, and before each step of a long one")
    p.add_argument("--report", metavar="PATH", help="write the run as a Markdown handout to PATH")
    p.add_argument("--metrics", metavar="DIR",
                   help="write each scenario's metrics, naive run and fixed run apart, into DIR/<script>/ "
                        "in the format of node_exporter's textfile collector")
    p.add_argument("--brief", action="store_true",
                   help="presenter's mode: each section's essentials only (the error, the measured damage, "
                        "the proof, the lesson); the handout stays complete")
    g = p.add_argument_group("exercises and proofs")
    g.add_argument("--exercise", metavar="ID", help="write the exercise of scenario ID into your folder; "
                   "run the same command again to grade your code")
    g.add_argument("--progress", action="store_true",
                   help="list this script's exercises with their state and the next command to type")
    g.add_argument("--exercise-dir", metavar="DIR",
                   help="with --exercise or --progress: the folder of your exercise files (default: ./exercises)")
    g.add_argument("--hint", nargs="?", type=integer(1, 99), const=1, metavar="LEVEL",
                   help="with --exercise: print the hints up to LEVEL (default 1)")
    g.add_argument("--solution", action="store_true", help="with --exercise: print the reference solution")
    g.add_argument("--restart", action="store_true",
                   help="with --exercise: start again from the naive code; your file is moved aside, never deleted")
    g.add_argument("--call-limit", type=seconds(0.5, 3600), metavar="SECONDS",
                   help="with --exercise: stop a call of your code after SECONDS (default 20)")
    g.add_argument("--control", metavar="SLOT[,SLOT...]", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                   help="negative control: put the naive code back in these fix slots ('all' for every slot); "
                        "the scenario must then fail")
    args = p.parse_args(argv)
    if not args.exercise:  # an exercise flag alone would run the whole script: say so instead
        given = [f for f in EXERCISE_FLAGS if getattr(args, f[2:].replace("-", "_")) not in (None, False)
                 and not (f == "--exercise-dir" and args.progress)]
        if given:
            p.error(f"{given[0]} works with --exercise ID (see --list for the ids)")
    if args.control == []:
        p.error("--control names no fix slot")
    if args.exercise and args.control:
        p.error("--control and --exercise do not go together (an exercise's slots hold your code)")
    args.exercise_dir = args.exercise_dir or "exercises"
    args.call_limit = 20.0 if args.call_limit is None else args.call_limit
    return args


def main(argv=None) -> None:
    """Entry point of every fail_*.py: sys.exit with the contract's exit code."""
    config.quiet_library_warnings()
    guard_standard_streams()  # a closed pipe, closed stdout or full disk silences output, never crashes
    module = sys.modules["__main__"]
    script = Path(getattr(module, "__file__", "fail.py")).name
    args = parse_args(sys.argv[1:] if argv is None else argv, module.__doc__)
    journal_to_stdout = args.json == "-"
    stream = sys.stderr if journal_to_stdout else sys.stdout
    with contextlib.suppress(Exception):
        stream.reconfigure(errors="replace")  # never crash on a console that cannot show a character
    console = output.Console(stream, ascii_only=True if args.ascii else None, verbose=args.verbose,
                             brief=args.brief)
    if args.pause and sys.stdin.isatty() and stream.isatty():
        console.page()
    if args.list:
        for spec in _REGISTRY:
            print(f"{spec.id:24} {spec.title}" + ("  [exercise]" if spec.fixes else ""))
        sys.exit(0)
    selected = list(_REGISTRY)
    student = None
    if args.progress:
        from common import exercise
        sys.exit(exercise.show_progress(console, Path(args.exercise_dir), [(getattr(module, "__file__", script), [
            (s.id, s.title) for s in _REGISTRY if s.fixes])]))
    if args.exercise:
        from common import exercise
        student, selected = exercise.prepare(script, args, console)  # exits when there is nothing to grade
    if args.only is not None:  # "--only ''" names nothing, like "--only ,"
        wanted = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [w for w in wanted if w not in {s.id for s in _REGISTRY}]
        if unknown:
            _fail_start(f"unknown scenario id(s): {', '.join(unknown)}; see --list")
        selected = [s for s in _REGISTRY if s.id in wanted]
        if not selected:
            _fail_start("--only names no scenario; see --list")
    if args.control and args.control != ["all"]:
        slots = {f.slot for spec in selected for f in spec.fixes}
        unknown = [c for c in args.control if c not in slots]
        if unknown:
            _fail_start(f"no fix slot {', '.join(unknown)} in the selected scenarios; slots: "
                        f"{', '.join(sorted(slots)) or 'none'}")
    check_output_paths(args)
    arm_signals()
    watch_writes(run=True)  # from now on, every file the run creates is known: a scenario's leak is named
    code = 0
    try:
        code = _run(script, args, console, selected, student)
    except (KeyboardInterrupt, Interrupted):
        code = 130
        signal_handled()
    for sig in SIGNALS:  # all is cleaned and written: a signal now must not turn the exit into a crash
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


def check_output_paths(args) -> None:
    """--json and --report must be writable before the run starts, and --metrics a folder that is
    or can be made: exit 2 otherwise."""
    if args.metrics:
        folder = Path(args.metrics)
        if folder.exists() and not folder.is_dir():
            _fail_start(f"--metrics {args.metrics} is not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _fail_start(f"--metrics {args.metrics} cannot be made: {exc.strerror or exc}")
    for flag, value in (("--json", args.json), ("--report", args.report)):
        problem = output_path_problem(flag, value)
        if problem:
            _fail_start(problem)


def output_path_problem(flag: str, value: str | None) -> str | None:
    """Why the journal or handout could not be written to `value`, or None. Only a regular file
    (or /dev/null) will do: a FIFO or a terminal would block the run before it starts or after
    it ends, a folder or a device cannot hold it. Nothing is opened that could block."""
    if not value or value == "-":
        return None
    path = Path(value)
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return f"{flag} {value}: {exc.strerror or exc}"
    if st is not None and stat.S_ISDIR(st.st_mode):
        return f"{flag} {value} is a folder: name a file"
    if st is not None and not stat.S_ISREG(st.st_mode) and not _is_devnull(path):
        return f"{flag} {value} is not a regular file (a FIFO, socket or device): name a file, or '-' for standard output"
    if not path.parent.is_dir():
        return f"{flag} {value}: the folder {path.parent} does not exist"
    if st is not None and not stat.S_ISREG(st.st_mode):
        return None  # /dev/null
    try:  # a regular file, or none yet: opening it cannot block
        if st is not None:
            with open(path, "a", encoding="utf-8"):
                pass
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            path.unlink(missing_ok=True)
    except OSError as exc:
        return f"{flag} {value} cannot be written: {exc.strerror or exc}"
    return None


def _is_devnull(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.path.samefile(path, os.devnull)
    return False


def write_file(path: str, text: str) -> None:
    """Write a journal or handout without ever blocking: O_NONBLOCK makes a FIFO put in the
    path's place meanwhile fail at once (ENXIO) instead of waiting for a reader, and anything but
    a regular file (or /dev/null) is refused."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o666)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) and not _is_devnull(Path(path)):
            raise OSError(errno.EINVAL, "not a regular file")
        if stat.S_ISREG(st.st_mode):
            os.ftruncate(fd, 0)
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def _fail_start(message: str) -> None:
    sys.stderr.write(output.redact(f"error: {message}\n"))
    sys.exit(2)


def _run(script: str, args, console: output.Console, selected: list[ScenarioSpec], student=None) -> int:
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
            with signals_deferred():
                try:
                    target, params, admin = stack.enter_context(db.open_target())
                except (config.ConfigError, db.StartupError) as exc:
                    _fail_start(str(exc))
            display = config.describe(params)
            run_id = db.new_run_id()
            run = Run(script, args, console, target, params, run_id, admin, student=student)
            with admin.cursor() as cur:
                cur.execute("SET application_name = %s", (f"faillab:{run_id}",))
            stack.enter_context(liveness(admin, run_id))  # this run is alive while its locks are held
            run.server_version = db.scalar(admin, "SHOW server_version").split()[0]
            run.server_version_num = int(db.scalar(admin, "SHOW server_version_num"))
            try:
                swept = sweep(admin, run_id)
                probe = f"{db.SCHEMA_PREFIX}{run_id}_probe"
                db.create_schema(admin, probe)
                db.drop_schema(admin, probe)
            except psycopg2.errors.InsufficientPrivilege as exc:
                _fail_start(f"the role cannot create a schema in {display}: {str(exc).strip()} "
                            "(GRANT CREATE ON DATABASE ... TO the role, or use another database)")
            console.header(f"{script}: {len(selected)} scenario(s), run {run_id}")
            kind = "embedded default server (nothing configured)" if target.mode == "embedded" \
                else f"configured by {target.mode}"
            # the kind stays in one piece (no-break spaces), the URL breaks only if it must
            console.wrapped(f"target: {display}  [{kind.replace(' ', chr(0xA0))}]", "", hang="        ")
            console.line(f"server: PostgreSQL {run.server_version}; private schemas {db.SCHEMA_PREFIX}{run_id}_*")
            if swept:
                console.wrapped(f"removed {len(swept)} thing(s) left by killed runs: {', '.join(swept)}",
                                "   ", hang="     ", style="dim")
            reports = None
            if student is not None:  # logging's own error reports are counted for the grade
                from common import exercise
                reports = stack.enter_context(exercise.logging_reports())
            for spec in selected:
                raise_if_signalled()
                records.append(run_scenario(run, spec, _REGISTRY.index(spec) + 1))
                if student is not None:
                    exercise.grade(console, records[-1], reports)
                    exercise.record_grade(Path(args.exercise_dir), script, spec.id, records[-1]["status"])
        except _ScenarioInterrupted as stop:
            records.append(stop.record)
            exit_code = 130
        except db.StartupError as exc:  # e.g. a name this run was about to create was taken first
            _fail_start(str(exc))
        except (KeyboardInterrupt, Interrupted):
            exit_code = 130
            signal_handled()  # no echo of it may land in the summary
    if exit_code == 130:  # a second Ctrl-C (the lab passes one on too) must not cut the summary and journal short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        console.pager = False  # nor wait for an Enter nobody will press
    if run is not None and args.keep and run.kept:
        console.line()
        keep_hint(console, run.kept)
    for spec in selected[len(records):]:
        if exit_code == 130:
            records.append({"id": spec.id, "title": spec.title, "status": "interrupted", "triggered": False,
                            "recovered": False, "cleaned": True, "observed_errors": [], "measurements": {},
                            "sections": {}, "seconds": 0, "reason": "not run: interrupted"})
    if exit_code == 0 and any(r["status"] not in ("passed", "skipped") for r in records):
        exit_code = 1  # a skip (a server that cannot show this lesson) says why and fails nothing
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
            exit_code = write_output("--json", args.json, text + "\n", exit_code)
    if args.report:
        from common import report
        exit_code = write_output("--report", args.report, output.redact(report.render(journal)), exit_code)
        if exit_code != 2:
            console.line(f"handout written to {args.report}")
    return exit_code


def write_output(flag: str, path: str, text: str, exit_code: int) -> int:
    """Write the journal or handout; a disk that fails now (full, gone) is one line and exit 2."""
    try:
        write_file(path, text)
        return exit_code
    except OSError as exc:
        sys.stderr.write(f"error: {flag} {path} could not be written: {exc.strerror or exc}\n")
        return 2


def keep_hint(console: output.Console, kept: list[str]) -> None:
    """How to look at the kept schemas and how to drop each, with the interpreter that runs now."""
    init = Path(__file__).resolve().parent.parent / "code" / "init_schemas.py"
    console.line()
    console.line("Kept for inspection (--keep):", "bold")
    console.line("   open psql on the same server:")
    console.line(f"      {output.typed_path(sys.executable)} {output.typed_path(str(init))} --psql")
    console.line("   look inside, e.g.:")
    console.line(f"      SET search_path TO {kept[0]}; \\dt")
    console.line("   drop them when done:")
    for name in kept:
        console.line(f"      DROP SCHEMA {name} CASCADE;")


DAMAGE = ("lost", "missing", "duplicat", "refused", "rejected", "wrong", "extra", "skipped", "blocked", "twice",
          "torn", "over", "no_run_id", "unparseable")  # words of a figure that measures damage


def headline(s: Scenario) -> dict | None:
    """The scenario's headline figure: the one it marked, else the damage it measured (a figure
    named *_before, with its *_after when there is one), else its first figure."""
    names = list(s.measurements)
    if not names:
        return None
    damage = [n for n in names if any(w in n for w in DAMAGE)]
    name = s.headline or next((n for n in damage if n.endswith("_before")), None) or \
        next(iter(damage), None) or next((n for n in names if n.endswith("_before")), names[0])
    after = name[:-len("_before")] + "_after" if name.endswith("_before") else None
    figure = {"name": name, "value": output.words(s.measurements[name])}
    if after in s.measurements:
        figure["after"] = output.words(s.measurements[after])
    return figure


def tally(records: list[dict]) -> str:
    """`2 passed, 1 failed, 1 interrupted, 2 not run`: a scenario that never started is not a failure."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "interrupted": 0, "not run": 0}
    for r in records:
        not_run = r["status"] == "interrupted" and (r.get("reason") or "").startswith("not run")
        counts["not run" if not_run else r["status"] if r["status"] in counts else "failed"] += 1
    return ", ".join(f"{n} {word}" for word, n in counts.items() if n or word in ("passed", "failed"))


def control_note(records: list[dict]) -> str | None:
    """A negative control is meant to fail: say so, and whether it failed the way it must."""
    controls = [r for r in records if r.get("mode") == "control"]
    if not controls:
        return None
    as_meant = [r for r in controls if r["triggered"] and not r["recovered"] and r["cleaned"]]
    if len(as_meant) == len(controls):
        return ("negative control: the naive code failed, as it must (the fault landed, the recovery "
                "claims broke, cleanup ran). This failure, and exit status 1, are the expected outcome.")
    return ("negative control: not the expected outcome: a control must trigger the fault, fail its "
            "recovery and clean up (" + ", ".join(r["id"] for r in controls if r not in as_meant) + " did not)")


def summary(console: output.Console, records: list[dict], seconds: float) -> None:
    if not records:
        return
    console.wait_before("the summary")
    console.header("Summary")
    mark = console.check_mark
    console.table(["scenario", "triggered", "recovered", "cleaned", "status", "seconds"],
                  [[r["id"], mark(r["triggered"]), mark(r["recovered"]),
                    "kept" if r.get("kept") else mark(r["cleaned"]), r["status"],
                    f"{r['seconds']:.1f}"] for r in records])
    passed = sum(r["status"] in ("passed", "skipped") for r in records)
    for r in records:
        if (r.get("reason") or "").startswith("not run: no room"):  # a wait that failed says why here too
            console.wrapped(f"{r['id']}: {r['reason']}", hang="   ", style="bad")
    console.line()
    console.line(f"{tally(records)}  ({seconds:.1f} s)", "ok" if passed == len(records) else "bad")
    note = control_note(records)
    if note:
        console.wrapped(note, "   ", "   ", "bold")
