"""Detectors: the check an operator runs on a schedule to find a failure (CONTRACT.md).

A detector is a value, like a fix: what it shows (the SQL, the function or the alert rule) is
what it runs. A scenario names it in its root cause; it runs there against the broken state,
where it must fire (return something), and again at the end of the recovery, where it must be
quiet (return nothing). Three forms:
- `sql_check(name, query)`: a query against the pipeline's tables or the server's views; the
  rows it returns are the alert.
- `python_check(fn)`: `fn(conn)` returns the offending items (a file check, or a check a student
  writes in an exercise); its source is what the lesson shows.
- `metric_alert(alert, fires)`: a Prometheus alerting rule from alerts/<script>.rules.yml over
  the pipeline's metrics. The run evaluates `fires(values)` on the metrics its pipeline counted
  (naive run, then fixed run); promtool proves the rule itself on series from a real run.
"""
from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common import config

ALERTS = config.PROJECT_ROOT / "alerts"


@dataclass(frozen=True)
class Detector:
    name: str
    kind: str  # "sql", "python" or "metric"
    probe: Callable  # probe(scenario, phase) -> list of what it found; empty means quiet
    show: Callable  # show(scenario) -> (text, lang): what the lesson prints
    alert: str | None = None


def sql_check(name: str, query) -> Detector:
    """A scheduled SQL check: it fires when the query returns rows."""
    def probe(s, phase):
        from common import db

        conn = s.connect(autocommit=True)
        try:
            return db.rows(conn, query)
        finally:
            conn.close()

    def show(s):
        from psycopg2 import sql as pgsql

        if isinstance(query, pgsql.Composable):
            return query.as_string(s.run.admin), "sql"
        return str(query), "sql"

    return Detector(name, "sql", probe, show)


def python_check(fn: Callable, name: str | None = None) -> Detector:
    """A check written in Python: `fn(conn)` returns what it found (empty: nothing wrong)."""
    from common.fixes import source_of

    def probe(s, phase):
        conn = s.connect(autocommit=True)
        try:
            return list(fn(conn) or [])
        finally:
            conn.close()

    def show(s):
        try:
            return source_of(fn), "python"
        except (OSError, TypeError):
            return f"{name or getattr(fn, '__name__', 'check')}(conn)", "python"

    return Detector(name or getattr(fn, "__name__", "check"), "python", probe, show)


def metric_alert(alert: str, fires: Callable[[dict], list]) -> Detector:
    """A Prometheus alert: `fires(values)` reads the phase's metrics (series name -> value, see
    common.metrics) and returns the offending series; the rule shown is the one promtool tests."""
    def probe(s, phase):
        from common.metrics import values_of

        return list(fires(values_of(s.metrics.registries[phase])) or [])

    def show(s):
        script = Path(getattr(sys.modules["__main__"], "__file__", s.run.script)).resolve()
        return rule_text(script.stem, alert, script.parent / "alerts"), "yaml"

    return Detector(alert, "metric", probe, show, alert=alert)


def rules_file(script_stem: str, folder: Path = ALERTS) -> Path:
    return folder / f"{script_stem}.rules.yml"


def rules(path: Path) -> dict[str, dict]:
    """The alerting rules of a rules file, by alert name."""
    import yaml

    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {r["alert"]: r for g in doc.get("groups", []) for r in g.get("rules", []) if "alert" in r}


def rule_text(script_stem: str, alert: str, folder: Path = ALERTS) -> str:
    """The rule as the rules file writes it, lines and comments as they are (what promtool tests),
    for the lesson to show."""
    path = rules_file(script_stem, folder)
    if alert not in rules(path):
        raise LookupError(f"no alert {alert!r} in {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() in (f"- alert: {alert}", f"- alert: '{alert}'",
                                                                     f'- alert: "{alert}"'))
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    return textwrap.dedent("\n".join(lines[start:end])).strip()


def as_detector(value) -> Detector:
    """A Detector as is; a function (a fix slot's check, say) as a python_check."""
    if isinstance(value, Detector):
        return value
    if callable(value):
        return python_check(value, name=getattr(value, "__name__", None))
    raise TypeError(f"not a detector: {value!r} (a check that is only shown proves nothing: "
                    "use sql_check, python_check or metric_alert)")


def summary(found: list, most: int = 5) -> list[str]:
    """What a probe returned, a line an item, for the lesson and the journal."""
    lines = [", ".join(str(c) for c in item) if isinstance(item, (tuple, list)) else str(item)
             for item in found[:most]]
    if len(found) > most:
        lines.append(f"... and {len(found) - most} more")
    return lines


def describe(detector: Detector) -> str:
    return {"sql": "SQL check", "python": "check", "metric": "alert"}[detector.kind] + f" {detector.name}"

