"""The benchmark works (its figures are read by people, not asserted: the machines are noisy)."""
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, clean_env


@pytest.mark.slow
def test_benchmark_quick_mode_prints_every_figure():
    before = set(Path(tempfile.gettempdir()).glob("labbench-*"))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--quick", "--only",
                          "fail_checkpoint_corruption.py"], env=clean_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for figure in ("embedded server start, cold", "embedded server start, warm", "--list start-up",
                   "fail_checkpoint_corruption.py, warm", "whole loop of 1 script(s), warm",
                   "whole loop of 1 script(s), cold", "peak memory"):
        assert figure in out.stdout, out.stdout
    assert set(Path(tempfile.gettempdir()).glob("labbench-*")) == before  # its data folders are removed


def test_the_mutation_benchmark_mutates_each_scenarios_own_section():
    """bench/mutate.py draws a scenario's mutants from its section of the lesson (from its heading
    to the next): every scenario has one, in the lesson's order, with its function inside it."""
    from bench.mutate import regions
    from conftest import lesson_scenarios
    from common.lab import ORDER

    for script in ORDER:
        found = regions(ROOT / script)
        ids = [i for s, i in lesson_scenarios() if s == script]
        assert list(found) == ids, (script, list(found))
        lines = (ROOT / script).read_text(encoding="utf-8").splitlines()
        spans = list(found.values())
        assert all(a < b for (_, a), (b, _) in zip(spans, spans[1:]))  # sections do not overlap
        for scenario_id, (first, last) in found.items():
            assert any(line.startswith(f"def {scenario_id}(s") for line in lines[first - 1:last]), scenario_id
