"""Exercises: the student's file, hints, and the grade (the scenario's own verdicts).

`--exercise ID` writes the starting file once (never over the student's work) and says what to
do; the same command then grades it: the scenario runs with the student's functions in its fix
slots (see common.fixes), and a grade line follows its verdicts.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import inspect
import io
import json
import os
import shlex
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

from common import output
from common.fixes import Fix, source_of
from common.scenario import _REGISTRY


class ExerciseError(Exception):
    """The exercise file cannot be used (does not import, lacks a function): exit 2."""


def prepare(script: str, args, console: output.Console):
    """Resolve --exercise: print hints or the solution, or write the starting file (then exit 0);
    else load the student's module. Returns (module, [spec]) for the grading run."""
    spec = next((s for s in _REGISTRY if s.id == args.exercise), None)
    if spec is None or not spec.fixes:
        with_exercise = ", ".join(s.id for s in _REGISTRY if s.fixes)
        _exit(2, f"error: no exercise {args.exercise!r}; exercises: {with_exercise}\n", sys.stderr)
    path = exercise_path(Path(args.exercise_dir), script, spec.id)
    folder = ["--exercise-dir", args.exercise_dir] if args.exercise_dir != "exercises" else []
    command = " ".join(shlex.quote(a) for a in [_relative(sys.executable), _relative(sys.argv[0]), "--exercise", spec.id] +
                       folder)
    if args.solution:
        console.line(f"Reference solution of {spec.id} ({script}), ready to paste into {path}:", "bold")
        console.line()
        for ln in reference_file(script, spec).splitlines():
            console.line(ln)
        _exit(0)
    if args.hint:
        for f in spec.fixes:
            console.line(f"Hints for {f.slot}():", "bold")
            for level, hint in enumerate(f.hints[:args.hint], 1):
                console.line(f"  {level}. " + hint.replace("\n", "\n     "))
            if args.hint > len(f.hints):
                console.line(f"  (no more hints; the reference solution: {command} --solution)")
        _exit(0)
    moved = restart(path) if args.restart else None
    if moved:
        record_grade(Path(args.exercise_dir), script, spec.id, None)
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "x", encoding="utf-8") as f:  # "x": never over a student's work
                f.write(starting_file(script, spec.id, spec.title, spec.fixes, command))
        except OSError as exc:
            _exit(2, f"error: cannot write the exercise file {path}: {exc.strerror or exc}\n", sys.stderr)
        lab = Path(sys.argv[0]).resolve().parent / "lab.py"
        console.line(f"Exercise {spec.id}: {spec.title}", "bold")
        if moved:
            for ln in unbroken_lines("started again; your previous file is kept as".split() +
                                     [output.typed_path(str(moved))], console.width, "   ", "   "):
                console.line(ln)
        for label, text in (("your file:", output.typed_path(str(path))),
                            ("edit:", f"{', '.join(f.slot + '()' for f in spec.fixes)}  (the contract is in each "
                                      "docstring)"),
                            ("grade it:", command),
                            ("hints:", f"{command} --hint   (then --hint 2; --solution shows the reference)"),
                            ("progress:", " ".join(shlex.quote(a) for a in [
                                _relative(sys.executable), _relative(str(lab) if lab.exists() else sys.argv[0]),
                                "--progress", *folder]))):
            console.wrapped(f"{label:<11} {text}", "   ", " " * 15)  # a long path breaks after a '/'
        console.wrapped("Only the functions your file defines itself are graded: the lesson's own fixes, which "
                        "the import line brings in, do not count.", "   ", "   ", "dim")
        _exit(0)
    try:
        module = load_student_module(path, spec.fixes)
    except ExerciseError as exc:
        _exit(2, f"error: {exc}\n", sys.stderr)
    console.wrapped(f"Grading {output.typed_path(str(path))} against scenario {spec.id}", "", "   ", "bold")
    return module, [spec]


def grade(console: output.Console, record: dict, reports: dict | None = None) -> None:
    """The grade, spoken to the student: the lesson's demonstration apart from their verdicts,
    what their code did with the fault, logging's own error reports counted, the figures as the
    lesson shows them."""
    checks = record.get("checks", [])
    lesson = [c for c in checks if c["phase"] == "triggered"]
    recovery = [c for c in checks if c["phase"] == "recovered"]
    yours = [c for c in recovery if c.get("yours", True)]
    passed = record["status"] == "passed"
    console.header("Grade: " + ("PASSED, your fix holds under the real fault" if passed
                                else "NOT YET, the fault still breaks your code"))
    for title, group in (("The lesson's demonstration (its naive code, before yours ran):", lesson),
                         ("The lesson's own recovery steps (before your code ran, or without it):",
                          [c for c in recovery if not c.get("yours", True)])):
        if group:
            console.line(f"   {title}", "dim")
            for c in group:
                console.wrapped(f"{console.check_mark(c['ok'])} {c['claim']}", indent="     ", hang="       ",
                                style="dim")
    console.line("   Your code, under the same fault:", "bold")
    for c in yours or [{"ok": False, "claim": "no claim about your code was checked: the scenario stopped before"}]:
        if c["ok"] and c.get("after_stop"):  # what the lab did once your code was stopped: no tick of yours
            console.wrapped(f"{'-' if console.ascii else '·'} {c['claim']} (not credited: checked after your code "
                            "was stopped at its time limit)", indent="     ", hang="       ", style="dim")
            continue
        console.wrapped(f"{console.check_mark(c['ok'])} {c['claim']}", indent="     ", hang="       ",
                        style="ok" if c["ok"] else "bad")
    if not record.get("cleaned", True):
        console.wrapped(f"{console.check_mark(False)} cleanup: {record.get('reason', '')}", indent="     ",
                        hang="       ", style="bad")
    did = record.get("student") or {}
    if did:
        console.line("   What your code did:", "bold")
        for slot, info in did.items():
            console.wrapped(f"{slot}(): {info['summary']}", indent="     ", hang="       ")
    faults = _faults_met(record)
    if faults and not passed and any(not c["ok"] for c in yours) and did and \
            all(not info["raised"] and not info["timed_out"] for info in did.values()):
        console.wrapped(f"The fault was real ({faults}, as the demonstration shows) and your code raised "
                        "nothing: it caught the error and went on, or never noticed the damage. The claims "
                        "above say what that cost.", indent="   ", hang="   ", style="bad")
    if reports and reports.get("count"):
        console.wrapped(f"logging printed {reports['count']} '--- Logging error ---' report(s) of its own on stderr "
                        "(Handler.handleError: each one a record a handler dropped); the first, trimmed:",
                        indent="   ", hang="     ", style="bad")
        console.code("\n".join(reports["first"]), indent="     ")
    demonstration, yours_measured = _figures(record)
    for title, figures, style in (("The demonstration measured:", demonstration, "dim"),
                                  ("Measured with your code:", yours_measured, None)):
        if figures:
            console.line(f"   {title}", style)
            for text in figures:
                console.wrapped(text, indent="     ", hang="         ", style=style)


def _figures(record: dict) -> tuple[list[str], list[str]]:
    """The figures as the lesson showed them (`name = value  (note)`), split by where they were
    measured: before the recovery (the lesson's naive code), or in it (the student's)."""
    where, shown = {}, {}
    for section, blocks in (record.get("blocks") or {}).items():
        for b in blocks:
            if b["kind"] == "measure":
                where[b["name"]], shown[b["name"]] = section, b
    lesson, yours = [], []
    for name, value in (record.get("measurements") or {}).items():
        b = shown.get(name, {})
        text = f"{name} = {b.get('value') or output.words(value)}" + (f"  ({b['note']})" if b.get("note") else "")
        (yours if where.get(name) in ("recovery", "prevention") else lesson).append(text)
    return lesson, yours


def what_the_code_did(slots) -> dict:
    """slot -> what the student's function did in this run, in words, for the grade and the journal."""
    out = {}
    for slot, log in slots.logs.items():
        parts = []
        if log.calls:
            parts.append(f"called {log.calls} time{'s' if log.calls != 1 else ''} here")
        if log.in_processes:
            parts.append(f"handed to {log.in_processes} worker process(es), where it ran under the same time limit")
        if not parts:
            parts.append("never called (the scenario stopped before it)")
        for exc, line in _distinct(log.raised):
            parts.append(f"it raised {_fault(exc)}{_at(line)}, which left your function")
        if log.expired:
            parts.append(f"it did not return within {log.limit:g} s: stopped, its queries cancelled, "
                         "and not called again in this run")
        if log.calls and not log.raised and not log.expired:
            parts.append("it returned normally every time: nothing it raised reached the scenario")
        out[slot] = {"calls": log.calls, "processes": log.in_processes, "timed_out": log.expired,
                     "raised": [output.error_type(e) for e, _ in log.raised], "summary": "; ".join(parts)}
    return out


def _faults_met(record: dict) -> str:
    """The faults the lesson's demonstration really raised (its Error section), in words."""
    seen = []
    for e in [b for b in (record.get("blocks") or {}).get("error", []) if b["kind"] == "error"]:
        words = _fault_words(e["type"], e.get("sqlstate"))
        if words not in seen:
            seen.append(words)
    return "; ".join(seen[:3])


def _fault_words(kind: str, state: str | None) -> str:
    what = {"08": "a lost connection", "40": "a transaction rolled back", "57": "a statement cancelled or "
            "a server shut down", "23": "a constraint violated", "53": "a server out of resources",
            "42": "a statement the server refused", "55": "an object in use"}.get((state or "")[:2])
    if what is None and kind.endswith(("OperationalError", "InterfaceError")):
        what = "a lost connection"
    return f"{what}, {kind}" if what else kind


def _distinct(pairs):
    seen, out = set(), []
    for exc, line in pairs:
        key = (type(exc), line)
        if key not in seen:
            seen.add(key)
            out.append((exc, line))
    return out[:4]


def _fault(exc: BaseException) -> str:
    text = output.redact(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    return _fault_words(output.error_type(exc), getattr(exc, "pgcode", None)) + (f" ({text[:120]})" if text else "")


def _at(line: int | None) -> str:
    return f" at line {line}" if line else ""


@contextlib.contextmanager
def logging_reports():
    """While a student's code is graded, the standard library's '--- Logging error ---' reports
    (Handler.handleError, one per dropped record) are counted, not printed: the grade says how
    many and shows the first, trimmed, as the lesson does. Where the lesson itself collects them
    (stderr redirected), they go there as before."""
    import logging

    real, original = sys.stderr, logging.Handler.handleError
    tally, lock = {"count": 0, "first": []}, threading.Lock()

    def handle_error(self, record):
        if sys.stderr is not real or not logging.raiseExceptions:
            return original(self, record)
        buffer = io.StringIO()
        with contextlib.redirect_stderr(buffer):
            original(self, record)
        text = buffer.getvalue()
        if "--- Logging error ---" not in text:
            real.write(text)
            return None
        with lock:
            tally["count"] += 1
            if not tally["first"]:
                tally["first"] = trimmed_logging_error(text)
        return None

    logging.Handler.handleError = handle_error
    try:
        yield tally
    finally:
        logging.Handler.handleError = original


def trimmed_logging_error(text: str) -> list[str]:
    """One '--- Logging error ---' report in a few lines: the exception, where, the message."""
    lines = [ln for ln in text.split("--- Logging error ---", 1)[1].strip().splitlines()]
    stack = lines.index("Call stack:") if "Call stack:" in lines else len(lines)
    return ["--- Logging error ---", _exception_line(lines[:stack])] + \
        [ln for ln in lines if ln.startswith(("Message:", "Arguments:"))]


def _exception_line(traceback: list[str]) -> str:
    """The raised exception's first line (its type and message) in a printed traceback: the first
    line at the margin after the last 'Traceback' header. A message may go on over more lines, or
    end in a newline (as every psycopg2 connection loss does): the line before 'Call stack:' is then
    a continuation, or blank."""
    headers = [i for i, ln in enumerate(traceback) if ln.startswith("Traceback (most recent call last)")]
    after = traceback[headers[-1] + 1:] if headers else traceback
    return next((ln for ln in after if ln.strip() and not ln[0].isspace()),
                next((ln for ln in reversed(traceback) if ln.strip()), ""))


# -- progress ---------------------------------------------------------------------------------------
PROGRESS_FILE = ".progress.json"


def _progress(folder: Path) -> dict:
    try:
        return json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def record_grade(folder: Path, script: str, scenario_id: str, status: str | None) -> None:
    """Remember the last grade of an exercise (with its file's digest, to tell an edit since);
    None forgets it (the exercise started again)."""
    path = exercise_path(folder, script, scenario_id)
    key = f"{Path(script).stem}/{scenario_id}"
    state = _progress(folder)
    if status is None and key not in state:
        return
    with contextlib.suppress(OSError):
        if status is None:
            del state[key]
        else:
            state[key] = {"status": status, "graded_at": time.strftime("%Y-%m-%d %H:%M"), "digest": _digest(path)}
        tmp = folder / (PROGRESS_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, folder / PROGRESS_FILE)


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def exercise_state(folder: Path, script: str, scenario_id: str) -> tuple[str, str]:
    """(state, its last grade): not started, started (never graded), passed or not yet (at its
    last grade, with when, and whether the file was edited since)."""
    path = exercise_path(folder, script, scenario_id)
    if not path.exists():
        return "not started", ""
    last = _progress(folder).get(f"{Path(script).stem}/{scenario_id}")
    if not last:
        return "started", ""
    edited = ", edited since" if last.get("digest") != _digest(path) else ""
    return ("passed" if last["status"] == "passed" else "not yet"), f"{last['graded_at'][5:]}{edited}"


def show_progress(console: output.Console, folder: Path, scripts: list[tuple[str, list[tuple[str, str]]]],
                  interpreter: str | None = None) -> int:
    """Every exercise with its state, and the next command to type. Returns the exit code (0)."""
    rows, first_open = [], None
    for script, exercises in scripts:
        for scenario_id, title in exercises:
            state, when = exercise_state(folder, script, scenario_id)
            rows.append([Path(script).stem.split("_")[1], scenario_id, state, when])
            if first_open is None and state != "passed":
                first_open = (script, scenario_id, state)
    console.header(f"Exercises in {output.typed_path(str(folder))}: "
                   f"{sum(r[2] == 'passed' for r in rows)} of {len(rows)} passed at their last grade")
    console.table(["script", "exercise", "state", "last grade"], rows)
    console.line()
    if first_open is None:
        console.line("   Every exercise passed at its last grade.", "ok")
        return 0
    script, scenario_id, state = first_open
    command = [shlex.quote(a) for a in [interpreter or _relative(sys.executable), _relative(script),
                                        "--exercise", scenario_id] +
               (["--exercise-dir", str(folder)] if str(folder) != "exercises" else [])]
    what = "start it" if state == "not started" else "grade it again once you have edited it"
    console.line(f"   next ({what}):", "bold")
    for ln in unbroken_lines(command, console.width, "      ", "         "):
        console.line(ln)
    console.wrapped("to start one again from the naive code, add --restart: your file is moved aside, "
                    "never deleted", "   ", "   ", "dim")
    return 0


def unbroken_lines(words: list[str], width: int, indent: str, hang: str) -> list[str]:
    """Words wrapped to the width between them, never inside one: a path or a command's argument
    broken after a '/' could no longer be copied whole. (A word wider than a line keeps a line of
    its own.)"""
    lines = [indent + words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) > width:
            lines.append(hang + word)
        else:
            lines[-1] += " " + word
    return lines


def restart(path: Path) -> Path | None:
    """Move the student's file aside (never delete it) so the starting file can be written again."""
    if not path.exists():
        return None
    n = 1
    while (aside := path.with_name(f"{path.stem}.old-{n}.py")).exists():
        n += 1
    try:
        os.rename(path, aside)
    except OSError as exc:
        _exit(2, f"error: cannot move {path} aside: {exc.strerror or exc}\n", sys.stderr)
    return aside


def _exit(code: int, text: str = "", stream=None) -> None:
    if text:
        (stream or sys.stdout).write(output.redact(text))
    sys.exit(code)


def _relative(path: str) -> str:
    """A path as the user would type it here: relative when it is below the current folder."""
    absolute = Path(os.path.abspath(path))  # not resolve(): a venv's python is a symlink, keep its name
    try:
        return str(absolute.relative_to(Path(os.path.abspath(os.getcwd()))))
    except ValueError:
        return str(absolute)


def exercise_path(folder: Path, script: str, scenario_id: str) -> Path:
    return folder / Path(script).stem / f"{scenario_id}.py"


def starting_file(script: str, scenario_id: str, title: str, fixes: tuple[Fix, ...], command: str) -> str:
    """The student's starting file: the naive code of every slot, renamed to the slot, with the
    contract as its docstring; the lesson's helpers are imported from the script itself."""
    module = Path(script).stem
    head = (f'"""Exercise: {title}  ({script}, scenario {scenario_id})\n\n'
            "Rewrite the function(s) below so that they meet their contract. Each one starts as the\n"
            "naive code of the lesson. Grade your work with the command that wrote this file:\n\n"
            f"    {command}\n\n"
            "The scenario then runs for real, against PostgreSQL, with your code in place of the\n"
            "lesson's fix and under the same fault; its verdicts are your grade. Hints: add --hint,\n"
            "then --hint 2; the reference solution: --solution. Only the functions this file\n"
            "defines are graded: the lesson's own fixes, which the import line brings in, do not\n"
            "count, so keep every function below, under its name.\n"
            '"""\n'
            f"from {module} import *  # noqa: F401,F403  the lesson's helpers, constants and imports\n")
    bodies = [_renamed(f.naive, f.slot, f.contract) for f in fixes]
    return head + "".join("\n\n" + b for b in bodies)


def reference_file(script: str, spec) -> str:
    """The lesson's fixed code, renamed to the slots: a file that passes the exercise."""
    return (f"from {Path(script).stem} import *  # noqa: F401,F403\n" +
            "".join("\n\n" + _renamed(f.fixed, f.slot, f.contract) for f in spec.fixes))


def _renamed(fn: Callable, name: str, contract: str) -> str:
    """fn's source with its name replaced by `name` and its docstring by the contract."""
    src = source_of(fn)
    lines = src.splitlines()
    node = ast.parse(src).body[0]
    indent = " " * (node.body[0].col_offset if node.body else 4)
    width = output.NARROW - len(output.CODE) - len(indent)  # Prevention shows it unbroken in 80 columns
    text = []
    for i, paragraph in enumerate(contract.split("\n\n")):
        text += ([""] if i else []) + textwrap.wrap(" ".join(paragraph.split()), width,
                                                     initial_indent="" if i else '"""')
    doc = [indent + ln if ln else "" for ln in text]
    if len(doc) > 1:
        doc.append(indent + '"""')
    else:
        doc[0] += '"""'
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str):
        lines[first.lineno - 1:first.end_lineno] = doc
    else:
        lines[first.lineno - 1:first.lineno - 1] = doc
    def_line = node.lineno - 1 + len(getattr(node, "decorator_list", []))
    lines[def_line] = lines[def_line].replace(f"def {fn.__name__}(", f"def {name}(", 1)
    return "\n".join(lines) + "\n"


def load_student_module(path: Path, fixes: tuple[Fix, ...]):
    """Import the student's file as a module of its own name (so worker processes can import it
    too) and check that it defines every slot itself: a name that came in with the lesson's
    `import *` (the lesson's own fix, or a misspelt slot's) is not the student's work."""
    path = path.resolve()  # its functions' code then names this file, which the grade points into
    name, folder = path.stem, str(path.parent)  # a worker process imports it by this name
    if folder not in sys.path:
        sys.path.append(folder)
    sys.modules.pop(name, None)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ExerciseError(f"{output.typed_path(str(path))} does not import: {type(exc).__name__}: {exc}") from exc
    missing = [f.slot for f in fixes if not _defined_in(getattr(module, f.slot, None), module)]
    if missing:
        names = ", ".join(f"{m}()" for m in missing)
        raise ExerciseError(f"{output.typed_path(str(path))} does not define {names} itself: write "
                            f"{'it' if len(missing) == 1 else 'them'} in that file, named exactly so "
                            "(--restart writes the starting file again)")
    return module


def _defined_in(value, module) -> bool:
    """Whether `value` is a function or class written in the module's own file."""
    if not callable(value):
        return False
    if inspect.isclass(value):
        return value.__module__ == module.__name__
    code = getattr(inspect.unwrap(value), "__code__", None)
    return code is not None and os.path.abspath(code.co_filename) == os.path.abspath(module.__file__)
