"""Static security scan: bandit finds no medium- or high-severity issue in the shipped packages."""

from __future__ import annotations

import importlib.util
import subprocess  # nosec B404  # runs the bandit scanner only
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a whole-tree static scan (about 3 s), not a unit of the code
def test_bandit_reports_no_medium_or_high_findings():
    if importlib.util.find_spec("bandit") is None:
        pytest.fail("bandit is not installed: pip install -c constraints.txt -e '.[dev]'")
    result = subprocess.run(  # nosec B603  # fixed argv, no shell
        [sys.executable, "-m", "bandit", "-q", "-r", "consumer", "schemas", "-ll"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"bandit findings (fix, or justify with '# nosec BXXX  # reason'):\n{result.stdout}{result.stderr[-2000:]}"
    )
