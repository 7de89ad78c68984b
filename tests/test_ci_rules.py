"""Rules of the test suite itself under CI: missing shared data fails instead of skipping, and
the slowest tests are listed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import conftest
import pytest


def _set_ci(monkeypatch, value: str | None) -> None:
    """CI=value for the test; None: no CI variable at all."""
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1"])
def test_missing_shared_data_fails_under_ci(monkeypatch, tmp_path, value):
    _set_ci(monkeypatch, value)
    assert conftest.in_ci()
    with pytest.raises(pytest.fail.Exception, match=r"not found at .*absent.*CI always has"):
        conftest.require_shared(tmp_path / "absent")


@pytest.mark.parametrize("value", [None, "", "false", "0", "no"])
def test_missing_shared_data_skips_outside_ci(monkeypatch, tmp_path, value):
    _set_ci(monkeypatch, value)
    assert not conftest.in_ci()
    with pytest.raises(pytest.skip.Exception, match=r"not found at .*absent"):
        conftest.require_shared(tmp_path / "absent")


@pytest.mark.parametrize("value", [None, "true"])
def test_present_shared_data_is_returned_either_way(monkeypatch, tmp_path, value):
    _set_ci(monkeypatch, value)
    (tmp_path / "present.txt").write_text("x")
    assert conftest.require_shared(tmp_path / "present.txt") == tmp_path / "present.txt"
    assert conftest.require_shared(tmp_path) == tmp_path


def test_the_shared_data_fixture_follows_the_rule(shared_data):
    """Through the fixture the other modules use: it yields ../shared/data where present (under
    CI it is always present, or this test fails rather than skips)."""
    assert shared_data == conftest.SHARED_DATA and shared_data.is_dir()


def test_a_ci_run_lists_the_slowest_tests(monkeypatch):
    """One real run (its summary is pytest's): a child pytest of one quick test, with CI=True."""
    monkeypatch.setenv("CI", "True")
    here = Path(__file__)
    test = f"tests/{here.name}::test_present_shared_data_is_returned_either_way"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", test],
        cwd=here.parents[1], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"slowest {conftest.CI_DURATIONS} durations" in result.stdout


@pytest.mark.parametrize(
    ("ci", "given", "expected"),
    [("true", None, conftest.CI_DURATIONS), ("1", 3, 3), (None, None, None), ("false", None, None)],
)
def test_durations_are_set_only_under_ci_and_only_when_not_given(monkeypatch, ci, given, expected):
    _set_ci(monkeypatch, ci)
    config = SimpleNamespace(option=SimpleNamespace(durations=given))
    conftest.pytest_configure(config)
    assert config.option.durations == expected
