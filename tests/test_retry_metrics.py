"""fail_retry_exhaustion.py: what the retry lesson's pipelines count, as production scrapes it.

One run of the scenarios whose job makes attempts, writes dead letters or completes units, with
--metrics DIR; the files it writes are parsed with prometheus_client's own parser, and each figure
must equal what the run's journal measured by other means (the proxy's refused connections, the
server's rows, the policy's own statistics).
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from conftest import assert_passed, clean_env, run_script, scraped

SCRIPT = "fail_retry_exhaustion.py"
IDS = ["exhaustion", "non_transient", "poison_job"]


@pytest.fixture(scope="module")
def metrics_run(embedded_params, tmp_path_factory):
    folder = tmp_path_factory.mktemp("retry-metrics")
    result = run_script(SCRIPT, "--only", ",".join(IDS), "--metrics", str(folder / "metrics"), env=clean_env(),
                        tmp_path=folder)
    assert_passed(result, embedded_params, IDS)
    return result, folder / "metrics" / Path(SCRIPT).stem


def attempts(samples: dict, outcome: str) -> float:
    return samples.get(("pipeline_attempts_total", (("outcome", outcome),)), 0.0)


def run_window(result) -> tuple[float, float]:
    """The run's span on the wall clock, from its journal: a last success must fall inside."""
    started = datetime.fromisoformat(result.journal["started_at"].replace("Z", "+00:00")).timestamp()
    return started - 1, started + result.journal["seconds"] + 1  # the journal's start is to the second


def test_exhaustion_counts_the_attempts_the_proxy_refused_and_the_unit_it_parked(metrics_run):
    result, folder = metrics_run
    m = result.scenario("exhaustion")["measurements"]
    naive, fixed = scraped(folder, "exhaustion", "naive"), scraped(folder, "exhaustion", "fixed")
    # every attempt of each job during the outage was refused by the proxy: all transient; the
    # fixed job's one ok attempt is the next unit, run once the database is up
    assert attempts(naive, "transient") == m["naive_job_attempts"] == 5 and attempts(naive, "ok") == 0
    assert attempts(fixed, "transient") == m["fixed_job_attempts"] == 5 and attempts(fixed, "ok") == 1
    assert fixed[("pipeline_units_total", (("outcome", "loaded"),))] == 1
    # the naive job lost its unit and wrote no dead letter; the fixed one parked it in one
    assert naive[("pipeline_units_total", (("outcome", "lost"),))] == 1
    assert naive[("pipeline_dead_letters_total", ())] == 0
    assert fixed[("pipeline_dead_letters_total", ())] == fixed[("pipeline_units_total", (("outcome", "parked"),))] == 1
    # no unit completed in the naive run; the replay completed the parked one in the fixed run
    assert naive[("pipeline_last_success_timestamp_seconds", ())] == 0
    assert m["unit_runs"] == 1
    low, high = run_window(result)
    assert low <= fixed[("pipeline_last_success_timestamp_seconds", ())] <= high


def test_non_transient_counts_each_attempt_by_what_the_server_raised(metrics_run):
    result, folder = metrics_run
    m = result.scenario("non_transient")["measurements"]
    naive, fixed = scraped(folder, "non_transient", "naive"), scraped(folder, "non_transient", "fixed")
    # naive: the missing table on every attempt; the payment ran once per pass of the scope, the
    # refresh failed once (the blip) and then succeeded
    assert attempts(naive, "permanent") == m["permanent_error_attempts_naive"] == 5
    assert attempts(naive, "transient") == m["order_42_payments"] - 1 == 1
    assert attempts(naive, "ok") == m["order_42_payments"] + 1
    # fixed: the missing table once; the payment once, its refresh failed once then succeeded; two
    # transfers, the deadlock's victim one attempt more
    assert attempts(fixed, "permanent") == m["permanent_error_attempts_fixed"] == 1
    assert attempts(fixed, "transient") == 1 + (m["deadlock_attempts"] - 1) == 2
    assert attempts(fixed, "ok") == m["order_43_payments"] + 1 + 2
    low, high = run_window(result)
    for samples in (naive, fixed):
        assert samples[("pipeline_dead_letters_total", ())] == 0  # this job parks nothing
        assert low <= samples[("pipeline_last_success_timestamp_seconds", ())] <= high


def test_poison_job_counts_the_dead_letter_and_the_last_job_done(metrics_run):
    result, folder = metrics_run
    m = result.scenario("poison_job")["measurements"]
    naive, fixed = scraped(folder, "poison_job", "naive"), scraped(folder, "poison_job", "fixed")
    # naive: the poison retried forever, no dead letter; jobs done only if one slipped past it
    assert m["naive_poison_attempts"] == 0 and naive[("pipeline_dead_letters_total", ())] == 0
    low, high = run_window(result)
    last = naive[("pipeline_last_success_timestamp_seconds", ())]
    assert (last == 0) if m["naive_others_done"] == 0 else (low <= last <= high), (m, last)
    # fixed: the poison parked in one dead letter after its attempts; the other jobs done
    assert m["fixed_poison_attempts"] == 3 and fixed[("pipeline_dead_letters_total", ())] == 1
    assert low <= fixed[("pipeline_last_success_timestamp_seconds", ())] <= high
    assert fixed[("pipeline_last_success_timestamp_seconds", ())] >= last
