"""Detectors are proven like fixes: they fire on the broken state and are quiet after the fix.

Uses the fixture script tests/fixtures/fail_detect.py, run as a user runs it: one detector of
each form that works, one that never fires and one that fires after the fix too."""
from __future__ import annotations

import sys

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, run_script
from promtool import Unavailable, promtool

FIXTURE = "tests/fixtures/fail_detect.py"
sys.path.insert(0, str(ROOT / "alerts"))


@pytest.fixture(scope="module")
def journal(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detect")
    result = run_script(FIXTURE, "--metrics", str(folder / "metrics"), tmp_path=folder)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    return result, folder


@pytest.mark.parametrize("scenario_id, check", [
    ("sql_detector", "duplicate_keys"), ("python_detector", "files_with_duplicates"),
    ("metric_detector", "JobGaveUp")])
def test_a_working_detector_fires_then_is_quiet(journal, scenario_id, check):
    record = journal[0].scenario(scenario_id)
    assert record["status"] == "passed"
    detection = record["detection"]
    assert detection["check"] == check and detection["fired"] is True and detection["quiet_after_fix"] is True
    assert detection["found_broken"] and detection["found_after_fix"] == []
    assert "How to detect it" in record["sections"]["root_cause"] and " fired: " in record["sections"]["root_cause"]
    assert "Run the" in record["sections"]["recovery"] and "quiet" in record["sections"]["recovery"]


def test_a_detector_that_never_fires_fails_the_scenario(journal):
    record = journal[0].scenario("blind_detector")
    assert record["status"] == "failed" and record["triggered"] is False
    assert "the detector never_fires fires on the broken state" in record["reason"]
    assert record["detection"]["fired"] is False


def test_a_detector_that_fires_after_the_fix_fails_the_scenario(journal):
    record = journal[0].scenario("stuck_detector")
    assert record["status"] == "failed" and record["triggered"] is True and record["recovered"] is False
    assert "the detector always_fires is quiet after the recovery" in record["reason"]
    assert record["detection"]["quiet_after_fix"] is False


def test_a_scenario_without_a_detector_fails_however_well_it_recovered(journal):
    record = journal[0].scenario("no_detector")
    assert record["triggered"] is True and record["recovered"] is True and record["cleaned"] is True
    assert record["status"] == "failed" and record["reason"].startswith("no detector ran")
    assert record["detection"] is None


def test_the_sql_shown_is_the_sql_run(journal):
    record = journal[0].scenario("sql_detector")
    assert "SELECT k, count(*) FROM t GROUP BY k HAVING count(*) > 1" in record["sections"]["root_cause"]
    assert record["detection"]["found_broken"] == ["1, 2"]


def test_metrics_are_written_naive_and_fixed_apart_and_parse(journal):
    folder = journal[1] / "metrics" / "fail_detect"
    naive = (folder / "metric_detector.naive.prom").read_text()
    fixed = (folder / "metric_detector.fixed.prom").read_text()
    def values(text):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples if not s.name.endswith("_created")}
    assert values(naive) == {("pipeline_attempts_total", (("outcome", "gave_up"),)): 2.0,
                             ("pipeline_attempts_total", (("outcome", "ok"),)): 3.0}
    assert values(fixed) == {("pipeline_attempts_total", (("outcome", "ok"),)): 5.0}
    assert not (folder / "sql_detector.naive.prom").exists(), "a scenario that counts nothing writes nothing"


def test_the_alert_rule_fires_on_the_naive_series_and_not_on_the_fixed(journal, tmp_path):
    import subprocess

    import generate

    try:
        tool = promtool()
    except Unavailable as exc:
        pytest.skip(str(exc))
    rules = ROOT / "tests" / "fixtures" / "alerts" / "fail_detect.rules.yml"
    (tmp_path / rules.name).write_text(rules.read_text())
    text = generate.test_document(journal[0].journal, rules.parent)
    (tmp_path / "fail_detect.test.yml").write_text(text)
    got = subprocess.run([tool, "test", "rules", "fail_detect.test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert got.returncode == 0, got.stdout + got.stderr
    doc = yaml.safe_load(text)  # and the test can fail: the fixed run's series where the naive run's were
    doc["tests"][0]["input_series"] = doc["tests"][1]["input_series"]
    (tmp_path / "fail_detect.test.yml").write_text(yaml.safe_dump(doc))
    got = subprocess.run([tool, "test", "rules", "fail_detect.test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert got.returncode != 0


def test_metrics_folder_that_is_a_file_is_refused_at_start(tmp_path):
    (tmp_path / "taken").write_text("x")
    result = run_script(FIXTURE, "--metrics", str(tmp_path / "taken"), tmp_path=tmp_path, journal=False)
    assert result.returncode == 2 and "--metrics" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_presenters_mode_keeps_the_detector_and_its_verdicts(tmp_path):
    result = run_script(FIXTURE, "--only", "sql_detector", "--brief", tmp_path=tmp_path)
    said = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "The SQL check duplicate_keys fired: 1 found." in said
    assert "the detector duplicate_keys fires on the broken state" in said
    assert "the detector duplicate_keys is quiet after the recovery" in said
