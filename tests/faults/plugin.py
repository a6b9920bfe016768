"""The harness's pytest side: the opt-in broken middleware, and the count of runs."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.faults import mutants
from tests.faults.harness import TOTALS

MUTANT_ENV = "SESSIONMW_FAULTS_MUTANT"


@pytest.fixture
def fault_mutant(monkeypatch: pytest.MonkeyPatch) -> str | None:
    """``SESSIONMW_FAULTS_MUTANT=<name>`` runs the harness against a deliberately broken
    middleware (:mod:`tests.faults.mutants`), to show that it catches the break."""
    name = os.environ.get(MUTANT_ENV) or None
    if name is not None:
        mutants.apply(name, monkeypatch)
    return name


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TOTALS.runs:
        return
    backends = ", ".join(f"{b}: {n}" for b, n in sorted(TOTALS.by_backend.items()))
    mutant = os.environ.get(MUTANT_ENV)
    terminalreporter.write_line(
        f"fault injection: {TOTALS.runs} runs ({backends}) over {len(TOTALS.shapes)} shapes, "
        f"{TOTALS.steps} recorded steps, {len(TOTALS.faults)} fault kinds; "
        f"{TOTALS.violations} violations, {TOTALS.known} known outside the middleware, "
        f"{TOTALS.unreached} faults not reached" + (f"; mutant: {mutant}" if mutant else "")
    )
