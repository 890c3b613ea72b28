"""What a room reads, in figures: per scenario, the lines it prints in full and with --brief, the
widest line, the lines wider than 80 columns, the code lines the console had to wrap (code wider
than 74 columns), and the lines that look like a Python repr. Renders as a projector that is not a
terminal does (80 columns).

    .venv/bin/python bench/room.py                 # the four scripts, full and --brief
    .venv/bin/python bench/room.py --details       # and every offending line, by scenario
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common.lab import scripts  # noqa: E402
from test_room import WIDTH, _repr_failures, _width_failures, by_scenario  # noqa: E402


class Result:
    def __init__(self, stdout: str, journal: dict):
        self.stdout, self.journal = stdout, journal


def render(script: Path, *flags: str) -> Result:
    with tempfile.TemporaryDirectory() as folder:
        journal = Path(folder) / "j.json"
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR")}
        proc = subprocess.run([sys.executable, str(script), *flags, "--json", str(journal)], capture_output=True,
                              text=True, env=env, timeout=600, encoding="utf-8", errors="replace")
        return Result(proc.stdout, json.loads(journal.read_text(encoding="utf-8")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--details", action="store_true", help="print every offending line")
    args = p.parse_args(argv)
    print(f"{'script':27} {'scenario':21} {'full':>5} {'brief':>5} {'widest':>6} {'>80':>4} {'code>74':>7} {'repr':>4}")
    totals = [0, 0, 0, 0, 0]
    details = []
    for script in scripts():
        full, brief = render(script), render(script, "--brief")
        short, widths = by_scenario(full.stdout), by_scenario(brief.stdout)
        wide = _width_failures(full)
        reprs, _ = _repr_failures(full)
        for sid, lines in short.items():
            over = sum(len(ln) > WIDTH for ln in lines)
            code = sum("code wider" in x for x in wide.get(sid, []))
            row = [len(lines), len(widths.get(sid, [])), over, code, len(reprs.get(sid, []))]
            totals = [a + b for a, b in zip(totals, row)]
            print(f"{script.stem:27} {sid:21} {row[0]:5} {row[1]:5} {max(map(len, lines)):6} {over:4} {code:7} "
                  f"{row[4]:4}")
            details += [f"{script.name} [{sid}] {x}" for x in wide.get(sid, []) + reprs.get(sid, [])]
    print(f"{'total':49} {totals[0]:5} {totals[1]:5} {'':6} {totals[2]:4} {totals[3]:7} {totals[4]:4}")
    if args.details:
        print("\n".join(details))
    return 0


if __name__ == "__main__":
    sys.exit(main())
