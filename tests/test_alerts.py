"""The alert rules in alerts/: valid, and proven on series from real runs.

promtool checks every rules file and runs the rule tests (alerts/*test*.yml), whose input series
a real run of each lesson recorded: each alert must fire on the naive run and be quiet on the
fixed one. The generator is run again here and must reproduce the checked-in tests.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, clean_env
from promtool import Unavailable, promtool

ALERTS = ROOT / "alerts"
sys.path.insert(0, str(ALERTS))


@pytest.fixture(scope="module")
def tool():
    try:
        return promtool()
    except Unavailable as exc:
        pytest.skip(str(exc))


def rule_tests():
    return sorted(ALERTS.glob("*test*.yml"))


def test_every_rules_file_is_valid(tool):
    files = sorted(ALERTS.glob("*.rules.yml"))
    assert files, "no alert rules in alerts/"
    got = subprocess.run([tool, "check", "rules", *map(str, files)], capture_output=True, text=True)
    assert got.returncode == 0, got.stdout + got.stderr


def test_rule_tests_pass(tool):
    files = rule_tests()
    assert files, "no rule tests in alerts/"
    got = subprocess.run([tool, "test", "rules", *map(str, files)], capture_output=True, text=True, cwd=ALERTS)
    assert got.returncode == 0, got.stdout + got.stderr


def test_a_rule_test_can_fail(tool, tmp_path):
    """The rule tests really test: with the naive and fixed series swapped, every test fails."""
    for path in rule_tests():
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        naive = [t for t in doc["tests"] if "naive" in t["name"]]
        fixed = [t for t in doc["tests"] if "fixed" in t["name"]]
        for a, b in zip(naive, fixed):
            a["input_series"], b["input_series"] = b["input_series"], a["input_series"]
        swapped = tmp_path / path.name
        swapped.write_text(yaml.safe_dump(doc), encoding="utf-8")
        for rules in ALERTS.glob("*.rules.yml"):
            (tmp_path / rules.name).write_text(rules.read_text(encoding="utf-8"), encoding="utf-8")
        got = subprocess.run([tool, "test", "rules", str(swapped)], capture_output=True, text=True, cwd=tmp_path)
        assert got.returncode != 0, f"{path.name}: the tests pass with the naive and fixed series swapped"


@pytest.mark.parametrize("test_file", [p.name for p in rule_tests()])
def test_generator_reproduces_the_checked_in_series(tool, test_file, tmp_path):
    """A fresh run writes the same tests: the series in alerts/ are what the lesson records."""
    script = ROOT / (test_file.split(".")[0] + ".py")
    got = subprocess.run([sys.executable, str(ALERTS / "generate.py"), "--check", str(script)],
                         capture_output=True, text=True, env=clean_env(), timeout=600)
    assert got.returncode == 0, got.stdout + got.stderr
