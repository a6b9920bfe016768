"""The facts docs/comparison.md states about its peers, measured on a real server.

A commit that fails after the handler returned (a deferred foreign key, checked at COMMIT):
under a FastAPI yield dependency that commits after ``yield`` and under advanced-alchemy's
``autocommit`` the client is told 201 and the row is lost; sessionmw, the same dependency
with ``Depends(scope="function")`` and fastapi-sqla answer 500. The control run (a valid
row) shows every one of them commits. fastapi-sqla pins an older FastAPI and runs from the
benchmarks' virtualenv of its own when it exists (``benchmarks/network.py`` builds it).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "commit_failure_app.py"
FASTAPI_SQLA_VENV = Path(
    os.environ.get(
        "SESSIONMW_FASTAPI_SQLA_VENV",
        Path.home() / ".cache" / "sessionmw-benchmarks" / "fastapi-sqla-venv",
    )
)

#: provider -> (status, rows kept) when the commit fails, and when it succeeds
EXPECTED = {
    "sessionmw": {"fail": (500, 0), "ok": (201, 1)},
    "fastapi-yield": {"fail": (201, 0), "ok": (201, 1)},
    "fastapi-yield-function-scope": {"fail": (500, 0), "ok": (201, 1)},
    "advanced-alchemy": {"fail": (201, 0), "ok": (201, 1)},
    "fastapi-sqla": {"fail": (500, 0), "ok": (201, 1)},
}


def run(python: str, directory: Path, commit: str, providers: list[str]) -> dict[str, Any]:
    result = subprocess.run(
        [python, str(SCRIPT), str(directory), commit, *providers],
        cwd=directory,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # fastapi-sqla's structlog writes to stdout too: keep the script's own lines
    ours = [line for line in result.stdout.splitlines() if line.startswith('{"provider"')]
    lines = [json.loads(line) for line in ours]
    return {line["provider"]: (line["status"], line["rows"]) for line in lines}


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """provider -> commit -> (status, rows), every provider installed here."""
    directory = tmp_path_factory.mktemp("commit-failure")
    here = ["sessionmw", "fastapi-yield"]
    from fastapi import Depends

    if "scope" in inspect.signature(Depends).parameters:  # FastAPI 0.121 and later
        here.append("fastapi-yield-function-scope")
    if importlib.util.find_spec("advanced_alchemy") is not None:
        here.append("advanced-alchemy")
    found: dict[str, dict[str, Any]] = {}
    for commit in ("fail", "ok"):
        for provider, outcome in run(sys.executable, directory, commit, here).items():
            found.setdefault(provider, {})[commit] = outcome
        side_python = FASTAPI_SQLA_VENV / "bin" / "python"
        if side_python.exists():
            outcome = run(str(side_python), directory, commit, ["fastapi-sqla"])["fastapi-sqla"]
            found.setdefault("fastapi-sqla", {})[commit] = outcome
    return found


@pytest.mark.parametrize("provider", list(EXPECTED))
def test_a_commit_failing_after_the_handler(
    provider: str, measured: dict[str, dict[str, Any]]
) -> None:
    if provider not in measured:
        pytest.skip(f"{provider} is not installed here")
    assert measured[provider] == EXPECTED[provider]
