"""A scenario's metrics, as its pipeline would export them to Prometheus (prometheus_client).

Each scenario has two registries: the naive run's (everything before the recovery starts) and
the fixed run's (the recovery). A lesson's pipeline counts into the registry of the phase it
runs in, through `Scenario.counter()` and `Scenario.gauge()`. After every step the values are
sampled, so a run leaves a short series per metric: the journal keeps it (`metrics`), `--metrics
DIR` writes each registry in the text format node_exporter's textfile collector reads, and the
alert rules in alerts/ are unit-tested with promtool on series generated from a real run
(alerts/generate.py).
"""
from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile

PHASES = ("naive", "fixed")
METRIC_TYPES = {"counter": Counter, "gauge": Gauge}


class Metrics:
    def __init__(self):
        self.registries = {p: CollectorRegistry() for p in PHASES}
        self.series: dict[str, list[dict[str, float]]] = {p: [] for p in PHASES}
        self._made: dict[tuple, object] = {}

    def metric(self, phase: str, kind: str, name: str, doc: str, labels=()):
        """The phase's counter or gauge `name`, made on first use (prometheus_client refuses a
        second registration of one name in a registry, so a lesson asks here every time)."""
        key = (phase, name)
        if key not in self._made:
            self._made[key] = METRIC_TYPES[kind](name, doc, tuple(labels), registry=self.registries[phase])
        return self._made[key]

    def used(self) -> bool:
        return bool(self._made)

    def sample(self, phase: str) -> None:
        """Append the phase's current values to its series (one scrape), unless nothing changed."""
        if not self.used():
            return
        values = values_of(self.registries[phase])
        if not self.series[phase] or self.series[phase][-1] != values:
            self.series[phase].append(values)

    def write(self, folder: Path, stem: str) -> list[Path]:
        """Write `<stem>.naive.prom` and `<stem>.fixed.prom` (the textfile collector's format)."""
        written = []
        folder.mkdir(parents=True, exist_ok=True)
        for phase in PHASES:
            path = folder / f"{stem}.{phase}.prom"
            write_to_textfile(str(path), self.registries[phase])
            written.append(path)
        return written


def series_name(name: str, labels: dict) -> str:
    """A sample as PromQL writes it: name{label="value",...}, labels sorted."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def values_of(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample of the registry by series name; a counter's _created timestamp is left out
    (it changes on every run and no alert reads it)."""
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[series_name(sample.name, sample.labels)] = float(sample.value)
    return out


def total(values: dict[str, float], name: str, **labels) -> float:
    """The sum of the samples of metric `name` (all its series, or those with these labels)."""
    got = 0.0
    for series, value in values.items():
        base, _, rest = series.partition("{")
        if base == name and all(f'{k}="{_escape(v)}"' in rest for k, v in labels.items()):
            got += value
    return got


def promtool_tests(journal: dict, rules: dict[str, dict]) -> dict:
    """A promtool rule-test document from a run's journal: for every scenario whose detector is
    an alert, one test on the naive run's series, where the alert must fire, and one on the fixed
    run's, where it must not. `rules` maps alert names to their rules (for `for:`, labels and the
    metrics its expression reads: the input series).

    The series: one sample a minute, starting from zero (the exporter before the job's first
    step), then the run's samples in order; the last value is held for the rule's `for:`, and
    the alert is evaluated then. Rules aggregate their series away (sum(), max()), so an alert's
    labels are the rule's own; annotations are plain text (no templates), so they are known too.
    Only the series the rule's expression names are given: others (a last-success timestamp) may
    change from run to run, and the rule does not read them."""
    tests = []
    for record in journal.get("scenarios", []):
        detection = record.get("detection") or {}
        if detection.get("kind") != "metric" or not record.get("metrics"):
            continue
        alert = detection["check"]
        rule = rules[alert]
        hold = _minutes(rule.get("for", "0m"))
        for phase, fires in (("naive", True), ("fixed", False)):
            samples = record["metrics"][phase]
            names = sorted({n for sample in samples for n in sample if _read_by(rule, n)})
            end = len(samples) + hold
            series = [{"series": n, "values": " ".join(
                _number(v) for v in [0.0] + [sample.get(n, 0.0) for sample in samples] +
                [samples[-1].get(n, 0.0)] * hold)} for n in names]
            tests.append({
                "name": f"{record['id']}: {alert} {'fires on the naive run' if fires else 'is quiet on the fixed run'}",
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [{"eval_time": f"{end}m", "alertname": alert,
                                     "exp_alerts": [{"exp_labels": dict(rule.get("labels") or {}),
                                                     "exp_annotations": dict(rule.get("annotations") or {})}]
                                     if fires else []}],
            })
    return {"rule_files": [f"{Path(journal['script']).stem}.rules.yml"], "evaluation_interval": "1m",
            "tests": tests}


def _read_by(rule: dict, series: str) -> bool:
    """Whether the rule's expression names the series' metric: only those are its input (another
    metric of the job, a timestamp say, would make the tests differ from run to run)."""
    return re.search(rf"\b{re.escape(series.partition('{')[0])}\b", str(rule.get("expr", ""))) is not None


def _minutes(duration: str) -> int:
    """Whole minutes in a Prometheus duration such as 2m, 90s or 1h (rounded up)."""
    seconds = sum(int(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+)([smh])", str(duration)))
    return -(-seconds // 60)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
