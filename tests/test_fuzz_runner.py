"""`make fuzz`'s runner (scripts/fuzz.py) for a few seconds: it runs the
properties under the fuzz profile until its budget is spent, and a
property that fails stops it with the seed that replays the failure. (The
properties themselves run derandomized in every `make test`: that is
fuzz's short version.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow


def fuzz(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts/fuzz.py"), *args], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_runner_fuzzes_until_its_budget_is_spent():
    result = fuzz("--seconds", "6", "--examples", "30", "libs/common/tests/test_properties_auth.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 property files" in result.stdout and "no failure" in result.stdout


def test_a_failing_property_stops_the_run_with_its_seed(tmp_path):
    failing = tmp_path / "test_properties_failing.py"
    failing.write_text(
        "from hypothesis import given, strategies as st\n\n"
        "@given(st.integers())\n"
        "def test_small(n):\n"
        "    assert n < 1000\n"
    )
    result = fuzz("--seconds", "30", "--seed", "7", str(failing))
    assert result.returncode == 1
    assert "fuzz: FAILED" in result.stdout and "--hypothesis-seed=" in result.stdout
    assert "n=1000" in result.stdout  # hypothesis's shrunk example, printed
