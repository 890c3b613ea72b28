"""The whole lab in one command: every fail_*.py in order, each as a subprocess with its own
journal, then one summary of all scenarios, one exit status, and optionally one combined journal
(--json) and one combined handout (--report).

Each script runs exactly as `python fail_X.py` would (same interpreter, the terminal passed
through, so --pause works), so the lab adds nothing a script does not already do; it reads the
scripts' journals, never their text.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from common import output

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("fail_checkpoint_corruption.py", "fail_idempotency_break.py", "fail_retry_exhaustion.py",
         "fail_logging_failure.py")  # the README's order: checkpoints, loads, retries, logging
FORWARDED = (signal.SIGTERM,) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())
INTERRUPTED = threading.Event()  # a Ctrl-C reached the lab: no further script starts
PASSED_ON = ("--seed", "--ascii", "--verbose", "--keep", "--pause", "--brief")  # flags every script takes


def scripts(root: Path = ROOT) -> list[Path]:
    """The lesson scripts: the README's four in its order, then any other fail_*.py by name."""
    found = {p.name: p for p in root.glob("fail_*.py")}
    return [found[n] for n in ORDER if n in found] + [found[n] for n in sorted(found) if n not in ORDER]


def parse_args(argv) -> argparse.Namespace:
    from common.runner import SEED, Parser

    p = Parser(prog="lab.py", description="Run the whole failure lab: every fail_*.py in order, "
               "then one summary of all scenarios.")
    p.add_argument("--list", action="store_true", help="print each script's scenarios; needs no database")
    p.add_argument("--progress", action="store_true",
                   help="list all exercises with their state (not started, started, passed) and the next command")
    p.add_argument("--exercise-dir", metavar="DIR", help="with --progress: the folder of your exercise files "
                   "(default: ./exercises)")
    p.add_argument("--only", metavar="SCRIPT[,SCRIPT...]",
                   help="run only these scripts (a name like retry matches fail_retry_exhaustion.py)")
    p.add_argument("--json", metavar="PATH", help="write one combined journal (the scripts' journals) to PATH")
    p.add_argument("--report", metavar="PATH", help="write one Markdown handout of the whole lab to PATH")
    p.add_argument("--seed", type=SEED, help="passed to every script")
    for flag, what in (("--ascii", "ASCII labels"), ("--verbose", "full stack traces"),
                       ("--keep", "keep the private schemas"),
                       ("--pause", "wait for Enter before each section, and each step of a long one"),
                       ("--brief", "presenter's mode: the essentials of each section")):
        p.add_argument(flag, action="store_true", help=f"passed to every script: {what}")
    args = p.parse_args(argv)
    if args.exercise_dir and not args.progress:
        p.error("--exercise-dir works with --progress")
    return args


def selected(args) -> list[Path]:
    every = scripts()
    if not args.only:
        return every
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    chosen = [s for s in every if any(w == s.name or w == s.stem or w in s.stem for w in wanted)]
    unknown = [w for w in wanted if not any(w == s.name or w == s.stem or w in s.stem for s in every)]
    if unknown or not chosen:
        sys.stderr.write(f"error: no script matches {', '.join(unknown) or args.only}; scripts: "
                         f"{', '.join(s.name for s in every)}\n")
        sys.exit(2)
    return chosen


def passed_on(args) -> list[str]:
    out = []
    for flag in PASSED_ON:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is True:
            out.append(flag)
        elif value not in (None, False):
            out += [flag, str(value)]
    return out


def run_one(script: Path, flags: list[str], folder: Path, stdout=None) -> tuple[int, dict | None]:
    """Run one script as a user would, with its journal in `folder`; (exit code, journal)."""
    journal = folder / f"{script.stem}.json"
    proc = subprocess.Popen([sys.executable, str(script), *flags, "--json", str(journal)], cwd=os.getcwd(),
                            stdout=stdout)
    # SIGTERM or SIGHUP to the lab goes to the script, which cleans up and exits 130
    forwarded = {sig: signal.signal(sig, lambda n, f: proc.send_signal(n)) for sig in FORWARDED}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                # Ctrl-C at a terminal reached the script too (one process group); a SIGINT sent to
                # the lab alone (an IDE's stop button) did not: pass it on. A second one is harmless:
                # the script is already cleaning up.
                INTERRUPTED.set()
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGINT)
                continue
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
    data = None
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(journal.read_text(encoding="utf-8"))
    return code, data


def lab_exit_code(codes: list[int]) -> int:
    """One status for the lab: interrupted, else could not start, else some scenario failed, else 0."""
    for worst in (130, 2, 1):
        if worst in codes:
            return worst
    return 1 if any(codes) else 0


def main(argv=None) -> None:
    from common.cleanup import guard_standard_streams
    from common.runner import output_path_problem, write_output

    guard_standard_streams()  # `lab.py --progress | head`: a reader that leaves ends the output, not the lab
    args = parse_args(sys.argv[1:] if argv is None else argv)
    chosen = selected(args)
    if args.list or args.progress:
        listings = []
        for script in chosen:
            listing = subprocess.run([sys.executable, str(script), "--list"], capture_output=True, text=True)
            listings.append((script, listing.stdout.splitlines()))
        if args.list:
            for script, lines in listings:
                print(script.name)
                sys.stdout.write("".join(f"   {ln}\n" for ln in lines))
            sys.exit(0)
        from common import exercise
        exercises = [(str(script), [(ln.split()[0], ln.split(None, 1)[1].replace("[exercise]", "").strip())
                                    for ln in lines if "[exercise]" in ln]) for script, lines in listings]
        sys.exit(exercise.show_progress(output.Console(sys.stdout, ascii_only=True if args.ascii else None),
                                        Path(args.exercise_dir or "exercises"), exercises))
    for flag, value in (("--json", args.json), ("--report", args.report)):
        problem = output_path_problem(flag, value)  # before the run, not after twenty minutes of it
        if problem:
            sys.stderr.write(output.redact(f"error: {problem}\n"))
            sys.exit(2)
    shown = sys.stderr if args.json == "-" else sys.stdout  # the journal alone on stdout, when asked
    console = output.Console(shown, ascii_only=True if args.ascii else None)
    if args.pause and sys.stdin.isatty() and shown.isatty():
        console.page()
    started_at, t0 = datetime.now(timezone.utc), time.perf_counter()
    flags = passed_on(args)
    journals, codes = [], []
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="faillab-lab-") as folder:
        for n, script in enumerate(chosen, 1):
            try:
                if n > 1 and console.pager:  # --pause: the last summary stays until the room is ready
                    console.wait("the next script")
                console.header(f"Lab {n} of {len(chosen)}: {script.name}")
                shown.flush()
            except KeyboardInterrupt:  # between two scripts: nothing of the next one has started
                interrupted = True
                break
            code, journal = run_one(script, flags, Path(folder), stdout=sys.stderr if args.json == "-" else None)
            codes.append(code)
            if journal is not None:
                journals.append(journal)
            if code in (2, 130) or INTERRUPTED.is_set():  # no database, bad flags, or Ctrl-C: stop here
                interrupted = interrupted or INTERRUPTED.is_set()
                break
    exit_code = 130 if interrupted else lab_exit_code(codes)
    seconds = time.perf_counter() - t0
    if interrupted:
        console.pager = False
    console.wait_before("the lab summary")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over: the summary and files are written whole
    summary(console, journals, seconds, skipped=[s.name for s in chosen[len(codes):]],
            interrupted=exit_code == 130)
    lab = {"lab": True, "started_at": started_at.strftime("%Y-%m-%dT%H:%M:%SZ"), "seconds": round(seconds, 3),
           "exit_code": exit_code, "scripts": journals}
    if args.json:
        text = output.redact(json.dumps(lab, indent=2, default=str))
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            exit_code = write_output("--json", args.json, text + "\n", exit_code)
    if args.report:
        from common import report
        exit_code = write_output("--report", args.report, output.redact(report.render_lab(lab)), exit_code)
        if exit_code != 2:
            console.line(f"handout of the whole lab written to {args.report}")
    sys.exit(exit_code)


def summary(console: output.Console, journals: list[dict], seconds: float, skipped: list[str],
            interrupted: bool = False) -> None:
    """All scenarios of the lab in one table: verdicts, seconds, the headline figure of each; then
    one line of counts and where to look."""
    from common.report import headline_parts
    from common.runner import control_note, tally

    mark = console.check_mark
    rows, records = [], []
    for j in journals:
        for r in j["scenarios"]:
            verdicts = " ".join(mark(r[v]) if not (v == "cleaned" and r.get("kept")) else "kept"
                                for v in ("triggered", "recovered", "cleaned"))
            name, value = headline_parts(r)
            status = "not run" if r["status"] == "interrupted" and (r.get("reason") or "").startswith("not run") \
                else r["status"]
            rows.append([Path(j["script"]).stem.split("_")[1], r["id"], verdicts, status,
                         f"{r['seconds']:.1f}", name, value])
            records.append(r)
    console.header(f"Lab summary: {len(rows)} scenario(s) in {len(journals)} script(s)")
    console.table(["script", "scenario", "t r c", "status", "s", "headline figure", "naive → fixed"], rows)
    ok = all(r["status"] in ("passed", "skipped") for r in records) and not skipped
    console.line()
    console.wrapped("t r c: triggered, recovered, cleaned; naive → fixed: the figure under the naive code, "
                    "then after the fix", "   ", "   ")
    for name in skipped:
        console.line(f"   not run: {name}" + (" (interrupted)" if interrupted else ""), "bad")
    console.line(f"{tally(records)}  ({seconds:.1f} s)", "ok" if ok else "bad")
    note = control_note(records)
    if note:
        console.wrapped(note, "   ", "   ", "bold")
    if records and not interrupted:
        console.wrapped("What to look at: scroll up to any scenario (its number and id are in its title) "
                        f"for the real error ({console.label('error')}), how it was recovered and proven "
                        f"({console.label('recovery')}) and the fixed code ({console.label('prevention')}); "
                        "--report lab.md writes all of it as a handout; "
                        "exit status " + ("0: every scenario passed." if ok else "1: see the failed rows above."),
                        "   ", "   ")
