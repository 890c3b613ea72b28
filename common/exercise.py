"""Exercises: the student's file, hints, and the grade (the scenario's own verdicts).

`--exercise ID` writes the starting file once (never over the student's work) and says what to
do; the same command then grades it: the scenario runs with the student's functions in its fix
slots (see common.fixes), and a grade line follows its verdicts.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import shlex
import sys
import textwrap
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
    command = " ".join(shlex.quote(a) for a in [_relative(sys.executable), _relative(sys.argv[0]), "--exercise", spec.id] +
                       (["--exercise-dir", args.exercise_dir] if args.exercise_dir != "exercises" else []))
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
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "x", encoding="utf-8") as f:  # "x": never over a student's work
                f.write(starting_file(script, spec.id, spec.title, spec.fixes, command))
        except OSError as exc:
            _exit(2, f"error: cannot write the exercise file {path}: {exc.strerror or exc}\n", sys.stderr)
        console.line(f"Exercise {spec.id}: {spec.title}", "bold")
        console.line(f"   your file:  {path.resolve()}")
        console.line(f"   edit:       {', '.join(f.slot + '()' for f in spec.fixes)}  (the contract is in each docstring)")
        console.line(f"   grade it:   {command}")
        console.line(f"   hints:      {command} --hint   (then --hint 2; --solution shows the reference)")
        _exit(0)
    try:
        module = load_student_module(path, spec.fixes)
    except ExerciseError as exc:
        _exit(2, f"error: {exc}\n", sys.stderr)
    console.line(f"Grading {path} against scenario {spec.id}", "bold")
    return module, [spec]


def grade(console: output.Console, record: dict) -> None:
    """The grade line: which claims held, which failed, and what was measured."""
    held = [c["claim"] for c in record.get("checks", []) if c["ok"]]
    failed = [c["claim"] for c in record.get("checks", []) if not c["ok"]]
    console.header("Grade: " + ("PASSED, your fix holds under the real fault" if record["status"] == "passed"
                                else "NOT YET, the fault still breaks your code"))
    for ok, claim in [(True, c) for c in held] + [(False, c) for c in failed]:
        console.wrapped(f"{console.check_mark(ok)} {claim}", indent="   ", hang="     ", style="ok" if ok else "bad")
    if not record.get("cleaned", True):
        console.wrapped(f"{console.check_mark(False)} cleanup: {record.get('reason', '')}", indent="   ",
                        hang="     ", style="bad")
    if record.get("measurements"):
        console.wrapped("measured: " + "; ".join(f"{k} {output.words(v)}" for k, v in record["measurements"].items()),
                        indent="   ", hang="     ")


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
            "then --hint 2; the reference solution: --solution.\n"
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
    too) and check that it defines every slot."""
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
        raise ExerciseError(f"{path} does not import: {type(exc).__name__}: {exc}") from exc
    missing = [f.slot for f in fixes if not callable(getattr(module, f.slot, None))]
    if missing:
        raise ExerciseError(f"{path} must define {', '.join(missing)}")
    return module
