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
