"""Speed and memory of the suite as a workshop runs it, against the budget. Prints figures; it
asserts nothing (the machines are noisy: a timed test would only be flaky).

    python bench/suite.py              # 5 warm runs, 2 cold, every script
    python bench/suite.py --quick      # 1 run each: checks that the benchmark works
    python bench/suite.py --runs 9 --only fail_retry_exhaustion.py

Warm: the embedded server's data folder exists (the usual case after the first run). Cold: a
fresh data folder, so the server is initialised too. Nothing configured: the embedded default.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BUDGET = {"loop": 20.0, "script": 6.0, "list": 0.5, "memory_mb": 300.0}
CONFIG_VARS = ("DATABASE_URL", "DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD",
               "PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSERVICE")


def environment(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env["FAILLAB_DATA_DIR"] = str(data_dir)
    return env


def measure(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB of the process tree, exit code), polling every 20 ms."""
    started = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc] + proc.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    return time.perf_counter() - started, peak / 2**20, proc.returncode


def run_loop(scripts: list[str], env: dict) -> float:
    """Wall seconds of the workshop's loop, `for s in fail_*.py; do python "$s"; done`: nothing
    watches the scripts meanwhile (measure()'s polling would take CPU from them on a small machine)."""
    started = time.perf_counter()
    for script in scripts:
        subprocess.run([sys.executable, script], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def server_start(env: dict) -> float:
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from common import embedded; "
            "t = time.perf_counter(); embedded.acquire(); print(time.perf_counter() - t); embedded.release()")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(ROOT)], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def stop_servers_in(env: dict) -> None:
    sys.path.insert(0, str(ROOT))
    from common import embedded

    os.environ["FAILLAB_DATA_DIR"] = env["FAILLAB_DATA_DIR"]
    embedded.stop_server()


def stop_servers(tmp: Path) -> None:
    """The servers of the benchmark's own data folders linger after the last script; stop them now."""
    sys.path.insert(0, str(ROOT))
    from common import embedded

    for folder in tmp.iterdir():
        os.environ["FAILLAB_DATA_DIR"] = str(folder)
        embedded.stop_server()
        deadline = time.monotonic() + 5
        while embedded.watchdog_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)  # its watchdog notices and exits
    shutil.rmtree(tmp, ignore_errors=True)


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description="benchmark the suite")
    parser.add_argument("--runs", type=int, default=5, help="warm runs per figure (default 5)")
    parser.add_argument("--cold", type=int, default=2, help="cold runs (fresh data folder) (default 2)")
    parser.add_argument("--quick", action="store_true", help="one run of each figure")
    parser.add_argument("--only", help="comma-separated scripts to measure (default: every fail_*.py)")
    args = parser.parse_args()
    runs, cold = (1, 1) if args.quick else (args.runs, args.cold)
    scripts = args.only.split(",") if args.only else sorted(p.name for p in ROOT.glob("fail_*.py"))
    rows, failures = [], []
    tmp = tempfile.mkdtemp(prefix="labbench-")
    try:
        warm_env = environment(Path(tmp) / "warm")

        def row(name, values, budget=None, unit="s"):
            worst = max(values)
            verdict = "" if budget is None else ("ok" if statistics.median(values) <= budget else "OVER")
            rows.append((name, spread(values), unit, "" if budget is None else f"{budget:g}", verdict))
            return worst

        cold_starts = []
        for n in range(cold):
            cold_starts.append(server_start(environment(Path(tmp) / f"cold{n}")))
        if cold_starts:
            row("embedded server start, cold (initdb)", cold_starts)
        server_start(warm_env)  # initialise the warm folder once, untimed
        warm_starts = []
        for _ in range(runs):
            stop_servers_in(warm_env)
            warm_starts.append(server_start(warm_env))
        row("embedded server start, warm (folder exists, server stopped)", warm_starts)
        row("--list start-up", [measure([sys.executable, s, "--list"], warm_env)[0]
                                for s in scripts for _ in range(runs)], BUDGET["list"])
        peaks = []
        for script in scripts:
            times = []
            for _ in range(runs):
                seconds, peak, code = measure([sys.executable, script], warm_env)
                times.append(seconds)
                peaks.append(peak)
                if code != 0:
                    failures.append(f"{script} exited {code}")
            row(f"{script}, warm", times, BUDGET["script"])
        loops = [run_loop(scripts, warm_env) for _ in range(runs)]
        row(f"whole loop of {len(scripts)} script(s), warm", loops, BUDGET["loop"])
        cold_loops = [run_loop(scripts, environment(Path(tmp) / f"coldloop{n}")) for n in range(cold)]
        if cold_loops:
            row(f"whole loop of {len(scripts)} script(s), cold", cold_loops)
        row("peak memory of one script (process tree)", peaks, BUDGET["memory_mb"], "MB")
    finally:
        stop_servers(Path(tmp))
    print(f"benchmark {time.strftime('%Y-%m-%d')} on {platform.node()}: {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
          f"{runs} warm run(s), {cold} cold; median (min-max)")
    widths = [max(len(str(r[i])) for r in rows + [("figure", "value", "unit", "budget", "")]) for i in range(5)]
    for r in [("figure", "value", "unit", "budget", "")] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    for failure in failures:
        print(f"warning: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
