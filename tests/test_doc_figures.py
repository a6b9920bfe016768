"""The benchmark figures docs/comparison.md quotes are those of benchmarks/results/network.md.

The comparison's "Cost" table copies the 2 ms-each-way ratios of the last networked run;
this reads both and fails as soon as a new run (or an edit) makes them differ.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NETWORK = ROOT / "benchmarks" / "results" / "network.md"
COMPARISON = ROOT / "docs" / "comparison.md"

#: comparison row -> the network.md rows (server, variant) whose "x ref" it quotes, in order
COST_ROWS = {
    "uvicorn, sync `def` endpoints": [
        ("uvicorn", '**sessionmw sync, "manual"**'),
        ("uvicorn", '**sessionmw sync, "on_success"**'),
        ("uvicorn", "Depends, tutorial def get_db (sync)"),
        ("uvicorn", "advanced-alchemy sync"),
        ("uvicorn (fastapi-sqla venv)", "fastapi-sqla sync"),
    ],
    "uvicorn, `async def` endpoints": [
        ("uvicorn", '**sessionmw async, "manual"**'),
        ("uvicorn", '**sessionmw async, "on_success"**'),
        ("uvicorn", "advanced-alchemy async"),
    ],
    "gunicorn gthread, Flask": [
        ("gunicorn", '**sessionmw, "manual"**'),
        ("gunicorn", '**sessionmw, "on_success"**'),
        ("gunicorn", "Flask-SQLAlchemy"),
    ],
}
A_A = ("uvicorn", "hand-written sync, a second server (A/A)")


def ratios_at_2ms() -> dict[tuple[str, str], str]:
    """(server, variant) -> the DB req/s "x ref" column of the 2 ms table."""
    section = NETWORK.read_text().split("## Networked, 2 ms each way", 1)[1]
    ratios = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 11 and re.fullmatch(r"\d+\.\d+", cells[3]):
            ratios[(cells[0], cells[1])] = cells[3]
    return ratios


def test_the_cost_table_quotes_the_last_networked_run() -> None:
    ratios = ratios_at_2ms()
    text = COMPARISON.read_text()
    for label, sources in COST_ROWS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert re.findall(r"\d+\.\d+", row) == [ratios[source] for source in sources], label
    assert f"lands at {ratios[A_A]}" in text
