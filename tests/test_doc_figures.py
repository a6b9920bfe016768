"""The benchmark figures the docs quote are those of the last runs in benchmarks/results/.

The comparison's "Cost" table copies the 2 ms-each-way ratios of the last networked run,
and the README's "where the sync gap comes from" table those of the last ``ending.py``
runs; these tests read both sides and fail as soon as a new run (or an edit) makes them
differ.
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
        ("uvicorn", '**sessionmw sync, "manual", @ends_in_thread**'),
        ("uvicorn", '**sessionmw sync, "on_success", @ends_in_thread**'),
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


#: The README's "where the sync gap comes from" table: pool -> the results file it quotes.
ENDING = {
    "5 + 10 (default)": ROOT / "benchmarks" / "results" / "ending.md",
    "60": ROOT / "benchmarks" / "results" / "ending-pool60.md",
}


def ending_rows(path: Path) -> dict[str, list[str]]:
    """row label -> its figures: x ref, then connection held and its three parts."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 9 and re.fullmatch(r"\d+\.\d+", cells[2]):
            rows[cells[0]] = [cells[2], cells[5].removesuffix(" ms"), *cells[6:9]]
    return rows


def test_the_readme_quotes_the_last_ending_run() -> None:
    readme = (ROOT / "README.md").read_text()
    for pool, path in ENDING.items():
        rows = ending_rows(path)
        hand = rows["hand-written: ends in the endpoint's thread"]
        manual, on_success = rows['sessionmw "manual"'], rows['sessionmw "on_success"']
        decorated = [rows[f'sessionmw "{p}", @ends_in_thread'] for p in ("manual", "on_success")]
        expected = {
            "hand-written": [hand[1], hand[0]],
            "the middleware": [
                manual[1],
                *manual[2:],
                on_success[1],
                *on_success[2:],
                manual[0],
                on_success[0],
            ],
            "`@ends_in_thread`": [
                decorated[0][1],
                decorated[1][1],
                decorated[0][0],
                decorated[1][0],
            ],
        }
        for who, figures in expected.items():
            row = next(
                line for line in readme.splitlines() if line.startswith(f"| {pool} | {who} |")
            )
            assert re.findall(r"\d+\.\d+", row) == figures, (pool, who)
