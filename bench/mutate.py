"""Mutation testing of the lessons, scenario by scenario, with cosmic-ray.

    .venv/bin/python bench/mutate.py                       # every lesson, 12 mutants a scenario
    .venv/bin/python bench/mutate.py fail_retry_exhaustion.py --scenario storm --sample 40
    .venv/bin/python bench/mutate.py --all                 # every mutant (hours)

It needs cosmic-ray (`.venv/bin/pip install cosmic-ray`), which the lab does not.

cosmic-ray makes small changes to a lesson's code (an operator, a constant, a comparison, a
removed statement); each mutant is run as a user runs the scenario (`--only ID --seed 1`), and a
mutant the run still passes has survived: a change of the code that no check noticed. A scenario's
code is its section of the lesson file (from its `# -- N. id` heading to the next heading): the
scenario function, its naive and fixed code, its detector and its helpers.

It works in a copy of the project (cosmic-ray edits the file on disk), so the checkout and any
run in progress are never touched. A sample is drawn with --seed, so a run can be repeated. It
prints the score of each scenario and every survivor (line and diff); --json writes them too.
This is a benchmark, not a test: survivors are read and judged, not failed on.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADING = re.compile(r"^# (?:--|==) (\d+)\. (\w+) [-=]+\s*$")
END = re.compile(r"^# (?:--|==) (?!\d+\.)")  # a heading that is no scenario's (plumbing): a region ends
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "exercises", "*.json", ".pytest_cache")


def regions(path: Path) -> dict[str, tuple[int, int]]:
    """Each scenario's section of a lesson file: first and last line (1-based, inclusive)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, current = {}, None
    for number, line in enumerate(lines, 1):
        heading = HEADING.match(line)
        if heading or (current and END.match(line)):
            if current:
                found[current[0]] = (current[1], number - 1)
            current = (heading.group(2), number) if heading else None
    if current:
        found[current[0]] = (current[1], len(lines))
    return found


def cosmic(*args, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("cosmic-ray")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True)


def need_cosmic_ray() -> None:
    try:
        import cosmic_ray  # noqa: F401
    except ImportError:
        sys.exit("bench/mutate.py needs cosmic-ray, which the lab itself does not: "
                 f"{Path(sys.executable).name} -m pip install cosmic-ray")


def mutate_scenario(work: Path, script: str, scenario_id: str, span: tuple[int, int], sample: int | None,
                    rng: random.Random, timeout: float) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    config, session = work / f"{scenario_id}.toml", work / f"{scenario_id}.sqlite"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{script}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{sys.executable} {script} --only {scenario_id} --seed 1"\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n', encoding="utf-8")
    got = cosmic("init", str(config), str(session), cwd=work)
    if got.returncode != 0:
        raise RuntimeError(f"cosmic-ray init failed: {got.stderr[-2000:]}")
    with use_db(str(session), WorkDB.Mode.open) as db:
        inside = [item for item in db.pending_work_items
                  if all(span[0] <= m.start_pos[0] <= span[1] for m in item.mutations)]
        chosen = {item.job_id for item in (inside if sample is None else rng.sample(inside, min(sample, len(inside))))}
        skipped = WorkResult(worker_outcome=WorkerOutcome.SKIPPED)
        db.set_multiple_results([item.job_id for item in db.pending_work_items if item.job_id not in chosen], skipped)
    started = time.perf_counter()
    got = cosmic("exec", str(config), str(session), cwd=work)
    if got.returncode != 0:
        raise RuntimeError(f"cosmic-ray exec failed: {got.stderr[-2000:]}")
    tried, survivors = 0, []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if item.job_id not in chosen:
                continue
            tried += 1
            if result.worker_outcome == WorkerOutcome.NORMAL and not result.is_killed:
                m = item.mutations[0]
                survivors.append({"line": m.start_pos[0], "operator": m.operator_name,
                                  "diff": "\n".join(x for x in (result.diff or "").splitlines()
                                                    if x.startswith(("+", "-")) and not x.startswith(("+++", "---")))})
    return {"script": script, "scenario": scenario_id, "lines": list(span), "mutants_in_section": len(inside),
            "tried": tried, "killed": tried - len(survivors), "survived": len(survivors),
            "score": round((tried - len(survivors)) / tried, 3) if tried else None,
            "seconds": round(time.perf_counter() - started, 1), "survivors": sorted(survivors, key=lambda s: s["line"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("scripts", nargs="*", help="lesson scripts (default: every fail_*.py)")
    p.add_argument("--scenario", help="only this scenario id")
    p.add_argument("--sample", type=int, default=12, help="mutants drawn per scenario (default 12)")
    p.add_argument("--all", action="store_true", help="every mutant of each section, no sample")
    p.add_argument("--seed", type=int, default=1, help="seed of the sample (default 1)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a mutant's run may take (default 120)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = p.parse_args(argv)
    if not args.all and args.sample < 1:
        p.error("--sample must be 1 or more")
    need_cosmic_ray()
    scripts = [Path(s).name for s in args.scripts] or sorted(x.name for x in ROOT.glob("fail_*.py"))
    results = []
    with tempfile.TemporaryDirectory(prefix="faillab-mutate-") as folder:
        work = Path(folder) / "lab"
        shutil.copytree(ROOT, work, ignore=COPY_IGNORE)
        for script in scripts:
            for scenario_id, span in regions(work / script).items():
                if args.scenario and scenario_id != args.scenario:
                    continue
                rng = random.Random(f"{args.seed}:{script}:{scenario_id}")
                r = mutate_scenario(work, script, scenario_id, span, None if args.all else args.sample, rng,
                                    args.timeout)
                results.append(r)
                print(f"{script:32} {scenario_id:22} killed {r['killed']:3} of {r['tried']:3} "
                      f"(section: {r['mutants_in_section']} mutants)  score {r['score']}  {r['seconds']} s",
                      flush=True)
                for s in r["survivors"]:
                    print(f"    survived: line {s['line']} {s['operator']}\n" +
                          "\n".join(f"        {x}" for x in s["diff"].splitlines()))
    tried = sum(r["tried"] for r in results)
    killed = sum(r["killed"] for r in results)
    print(f"\nin all: {killed} of {tried} mutants killed" + (f" ({killed / tried:.0%})" if tried else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
