"""Rules of the test suite itself under CI: missing shared data fails instead of skipping, and
the slowest tests are listed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CI_DURATIONS, SHARED_DATA, in_ci, require_shared


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1"])
def test_missing_shared_data_fails_under_ci(monkeypatch, tmp_path, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match=r"not found at .*absent.*CI always has"):
        require_shared(tmp_path / "absent")


@pytest.mark.parametrize("value", [None, "", "false", "0", "no"])
def test_missing_shared_data_skips_outside_ci(monkeypatch, tmp_path, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match=r"not found at .*absent"):
        require_shared(tmp_path / "absent")


@pytest.mark.parametrize("value", [None, "true"])
def test_present_shared_data_is_returned_either_way(monkeypatch, tmp_path, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    (tmp_path / "present.txt").write_text("x")
    assert require_shared(tmp_path / "present.txt") == tmp_path / "present.txt"
    assert require_shared(tmp_path) == tmp_path


def test_the_shared_data_fixture_follows_the_rule(shared_data):
    """Through the fixture the other modules use: it yields ../shared/data where present (under
    CI it is always present, or this test fails rather than skips)."""
    assert shared_data == SHARED_DATA and shared_data.is_dir()


def _pytest_run(ci: str | None, *args: str) -> str:
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci is not None:
        env["CI"] = ci
    # Itself one of this module's quick tests: the child run collects only it.
    here = Path(__file__)
    test = f"tests/{here.name}::test_present_shared_data_is_returned_either_way"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, test],
        cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_ci_runs_list_the_slowest_tests_and_local_runs_do_not():
    assert f"slowest {CI_DURATIONS} durations" in _pytest_run("True")
    assert "slowest" not in _pytest_run(None)
    assert "slowest 3 durations" in _pytest_run("true", "--durations=3")  # an explicit choice wins
