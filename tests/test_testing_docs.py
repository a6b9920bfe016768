"""The testing page's suite (docs/testing.md) runs as a project's tests would, under both
isolations, and type-checks under ``mypy --strict``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent


TITLED_BLOCK = re.compile(r'^```python title="([\w.]+)"\n(.*?)^```', re.DOTALL | re.MULTILINE)


@pytest.fixture
def docs_suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files of docs/testing.md, written out as a project's test suite."""
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    files = dict(TITLED_BLOCK.findall((ROOT / "docs" / "testing.md").read_text()))
    assert {"conftest.py", "test_notes.py", "test_notes_async.py"} <= set(files)
    for name, source in files.items():
        (pytester.path / name).write_text(source)
    return sorted(files)


@pytest.mark.parametrize("isolation", ["savepoint", "truncate"])
def test_the_testing_page_suite_passes(
    docs_suite: list[str], pytester: pytest.Pytester, isolation: str
) -> None:
    """TestClient, ASGITransport, anyio, the async schema and the seeded rows, as documented."""
    result = pytester.runpytest_subprocess(
        "-p", "anyio", "-q", "-p", "no:cacheprovider", "-o", f"sessionmw_isolation={isolation}"
    )
    result.assert_outcomes(passed=5)
    engine = create_engine(f"sqlite:///{pytester.path / 'testing.db'}")
    with engine.connect() as conn:  # the seeded row is all that is left
        assert list(conn.scalars(text("select text from notes"))) == ["welcome"]
    engine.dispose()


def test_the_testing_page_suite_type_checks(
    docs_suite: list[str], pytester: pytest.Pytester
) -> None:
    """User test code that uses the plugin's helpers passes ``mypy --strict``."""
    pytest.importorskip("mypy")
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--python-version", "3.10", *docs_suite],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
