"""Turn network.json into network.md (tables per latency, target checks) and network.png.

    python benchmarks/net_report.py [benchmarks/results/network.json]   # redraw, no re-run

Ratios to the hand-written row are paired by round: each round runs every row once, so
the median of per-round ratios cancels most of the drift of a shared machine.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DB_PATH, NO_DB_PATH = "/one", "/none"

#: Targets from the issue, for every sessionmw row at every latency.
MIN_RPS_RATIO = 0.95
MAX_DB_P99_RATIO = 1.1
MAX_NO_DB_P99_RATIO = 1.2

LATENCY_COLOURS = ("#9ecae1", "#4292c6", "#08519c", "#08306b")

#: Invisible in the Markdown; docs/benchmarks.md includes the parts between them.
DOCS_MARK = "<!-- --8<-- [{}:{}] -->"


@dataclass
class Cell:
    """One row at one latency, over its rounds."""

    runs: int
    rps: float
    p50: float
    p99: float
    nodb_p99: float
    errors: int
    conns: int
    rps_x: float | None = None
    p99_x: float | None = None
    nodb_p99_x: float | None = None


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _good(run: dict[str, Any]) -> bool:
    return not run.get("error") and run.get(DB_PATH, {}).get("requests", 0) > 0


def aggregate(results: dict[str, Any]) -> dict[tuple[float, str], Cell]:
    refs = {r["key"]: r["reference"] for r in results["rows"]}
    cells: dict[tuple[float, str], Cell] = {}
    for phase in results.get("latencies", []):
        delay = phase["delay_ms"]
        by_round = {(run["round"], run["row"]): run for run in phase["runs"]}
        keys = dict.fromkeys(run["row"] for run in phase["runs"])
        for key in keys:
            mine = [run for run in phase["runs"] if run["row"] == key]
            good = [run for run in mine if _good(run)]
            if not good:
                continue
            cell = Cell(
                runs=len(good),
                rps=statistics.mean(run[DB_PATH]["rps"] for run in good),
                p50=_median([run[DB_PATH]["p50_ms"] for run in good]),
                p99=_median([run[DB_PATH]["p99_ms"] for run in good]),
                nodb_p99=_median([run[NO_DB_PATH]["p99_ms"] for run in good]),
                errors=sum(
                    run.get(DB_PATH, {}).get("errors", 0) + run.get(NO_DB_PATH, {}).get("errors", 0)
                    for run in mine
                ),
                conns=sum(run.get("pg_connections_opened", 0) for run in mine),
            )
            ref = refs.get(key)
            if ref:
                pairs = [
                    (run, by_round[(run["round"], ref)])
                    for run in good
                    if (run["round"], ref) in by_round and _good(by_round[(run["round"], ref)])
                ]
                if pairs:
                    cell.rps_x = _median([a[DB_PATH]["rps"] / b[DB_PATH]["rps"] for a, b in pairs])
                    cell.p99_x = _median(
                        [a[DB_PATH]["p99_ms"] / b[DB_PATH]["p99_ms"] for a, b in pairs]
                    )
                    cell.nodb_p99_x = _median(
                        [a[NO_DB_PATH]["p99_ms"] / b[NO_DB_PATH]["p99_ms"] for a, b in pairs]
                    )
            cells[(delay, key)] = cell
    return cells


def _x(value: float | None, is_ref: bool) -> str:
    if is_ref:
        return "1 (ref)"
    return "—" if value is None else f"{value:.2f}"


def _cell(text: str) -> str:
    """Free text (an error from a server's log) made safe for a table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _server(row: dict[str, Any]) -> str:
    if row["venv"] != "main":
        return f"uvicorn ({row['venv']} venv)"
    return row["server"]


def _label(row: dict[str, Any]) -> str:
    return f"**{row['label']}**" if row["role"] == "sessionmw" else row["label"]


def latency_table(results: dict[str, Any], cells: dict[tuple[float, str], Cell], delay: float):
    lines = [
        "| server | variant | DB req/s | x ref | DB p50 ms | DB p99 ms | x ref "
        "| no-DB p99 ms | x ref | errors | new PG conns |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in results["rows"]:
        if row["unavailable"]:
            lines.append(
                f"| {_server(row)} | {row['label']} | {_cell(row['unavailable'])} |||||||||"
            )
            continue
        cell = cells.get((delay, row["key"]))
        if cell is None:
            lines.append(f"| {_server(row)} | {row['label']} | every run failed |||||||||")
            continue
        is_ref = row["role"] == "reference"
        lines.append(
            f"| {_server(row)} | {_label(row)} | {cell.rps:,.0f} | {_x(cell.rps_x, is_ref)} "
            f"| {cell.p50:.1f} | {cell.p99:.1f} | {_x(cell.p99_x, is_ref)} "
            f"| {cell.nodb_p99:.1f} | {_x(cell.nodb_p99_x, is_ref)} | {cell.errors} "
            f"| {cell.conns} |"
        )
    return lines


def check_targets(
    results: dict[str, Any], cells: dict[tuple[float, str], Cell]
) -> list[tuple[float, str, list[tuple[str, bool]], bool]]:
    """(latency, row, [(measured, met) per target], all met) for every sessionmw row."""
    checks = []
    for phase in results.get("latencies", []):
        delay = phase["delay_ms"]
        for row in results["rows"]:
            if row["role"] != "sessionmw":
                continue
            name = f"{row['group']}: {row['label']}"
            cell = cells.get((delay, row["key"]))
            if row["unavailable"] or cell is None or cell.rps_x is None:
                why = row["unavailable"] or "no measurement or no reference"
                checks.append((delay, name, [(_cell(why), False)] * 3, False))
                continue
            assert cell.p99_x is not None
            assert cell.nodb_p99_x is not None
            got = [
                (f"{cell.rps_x:.2f}", cell.rps_x >= MIN_RPS_RATIO),
                (f"{cell.p99_x:.2f}", cell.p99_x <= MAX_DB_P99_RATIO),
                (f"{cell.nodb_p99_x:.2f}", cell.nodb_p99_x <= MAX_NO_DB_P99_RATIO),
            ]
            checks.append((delay, name, got, all(ok for _, ok in got)))
    return checks


def noise_floor(results: dict[str, Any], cells: dict[tuple[float, str], Cell]) -> list[str]:
    """The A/A control: a second, identical hand-written server, compared like any row."""
    parts = []
    for row in results["rows"]:
        if row["role"] != "control":
            continue
        for phase in results.get("latencies", []):
            cell = cells.get((phase["delay_ms"], row["key"]))
            if cell is None or cell.rps_x is None:
                continue
            parts.append(
                f"{phase['delay_ms']:g} ms: {cell.rps_x:.2f} / {cell.p99_x:.2f} / "
                f"{cell.nodb_p99_x:.2f}"
            )
    if not parts:
        return []
    return [
        "**Noise floor.** The A/A row is a second server running the very same hand-written "
        "app, measured like every other row; its ratios (DB req/s / DB p99 / no-DB p99 x "
        "ref) are what chance alone gives in this run: " + "; ".join(parts) + ". A target "
        "missed by less than that is not a measured difference.",
        "",
    ]


def summary_table(results: dict[str, Any], cells: dict[tuple[float, str], Cell]) -> list[str]:
    delays = [p["delay_ms"] for p in results.get("latencies", [])]
    lines = [
        "| server | variant | " + " | ".join(f"{d:g} ms" for d in delays) + " |",
        "|---|---|" + "--:|" * len(delays),
    ]
    for row in results["rows"]:
        if row["unavailable"]:
            continue
        values = []
        for d in delays:
            cell = cells.get((d, row["key"]))
            if cell is None:
                values.append("failed")
            elif row["role"] == "reference":
                values.append(f"{cell.rps:,.0f} req/s")
            else:
                values.append(_x(cell.rps_x, False))
        lines.append(f"| {_server(row)} | {_label(row)} | " + " | ".join(values) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    cells = aggregate(results)
    m, s = results["machine"], results["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    pool = s["pool"]
    rtts = ", ".join(
        f"{p['delay_ms']:g} ms each way: {p['rtt_ms']:.2f} ms" for p in results["latencies"]
    )
    lines = [
        "# Networked benchmarks",
        "",
        DOCS_MARK.format("start", "header"),
        f"{results['date']}, `{results['mode']}` run in {results.get('duration_s', 0):.0f} s "
        f"(`python benchmarks/network.py{' --quick' if results['mode'] == 'quick' else ''}`). "
        f"sessionmw at {m['revision']}. Machine: {m['cpu']}, {m['cores']} cores, {m['os']}, "
        f"load average {m['load']} at the start"
        + (f" and {m['load_end']} at the end" if "load_end" in m else "")
        + f". {m['python']}.",
        "",
        f"Versions: {versions}.",
        "",
    ]
    side = results.get("side_versions")
    if side:
        lines += [
            "fastapi-sqla's virtualenv (it pins FastAPI < 0.142): "
            + ", ".join(f"{k} {v}" for k, v in side.items())
            + ".",
            "",
        ]
    lines += [
        "**Set-up.** PostgreSQL on 127.0.0.1, reached over TCP through `latency_proxy.py`, "
        "which delays every chunk by the given time in each direction (a delay, not a "
        "throttle). Measured `SELECT 1` round trip through it: "
        f"{rtts} (PostgreSQL directly: {results['direct_rtt_ms']:.2f} ms). "
        "One server process per row, all started at once: uvicorn (1 worker, "
        f"{s.get('uvicorn_stack', 'asyncio + h11')}) serving FastAPI apps whose "
        "endpoints are `def` for a sync Session (psycopg 3) and `async def` for an "
        "AsyncSession (asyncpg); gunicorn gthread (1 worker, "
        f"{s['gunicorn_threads']} threads) serving Flask apps. The load generator "
        f"(`loadgen.py`, its own process) keeps {s['db_clients']} keep-alive clients on the "
        f"database route (`/one`: one primary-key SELECT) and, at the same time, "
        f"{s['nodb_clients']} on a route that never touches the database (`/none`, "
        "`async def` on uvicorn): its p99 is the event loop's lag under that load. "
        f"Each run: {s['warmup']:g} s warm-up, then {s['seconds']:g} s measured; "
        f"{s['rounds']} round(s) per latency, every row once per round in a shuffled order. "
        f"Every engine: pool_size={pool['pool_size']}, max_overflow={pool['max_overflow']}, "
        "every connection through the proxy.",
        "",
        "**x ref**: the median over rounds of the ratio to the hand-written row of the same "
        "server and flavor (sync with sync, async with async) in the same round. DB req/s: "
        "mean over rounds; p50 and p99: median over rounds. **new PG conns**: connections the "
        "proxy accepted during the row's runs (0 once a pool is warm). All processes share "
        "the same cores: compare rows, not absolute figures with other machines.",
        "",
        DOCS_MARK.format("end", "header"),
        "",
        DOCS_MARK.format("start", "tables"),
        "## Networked targets",
        "",
        f"Every sessionmw row at every latency: DB req/s ≥ {MIN_RPS_RATIO:g} x hand-written, "
        f"DB p99 ≤ {MAX_DB_P99_RATIO:g} x, no-DB p99 under load ≤ {MAX_NO_DB_P99_RATIO:g} x.",
        "",
        "| latency | row | DB req/s x ref | DB p99 x ref | no-DB p99 x ref | met |",
        "|--:|---|--:|--:|--:|---|",
    ]
    checks = check_targets(results, cells)
    for delay, name, got, ok in checks:
        cols = [f"{text} {'✓' if met else '**✗**'}" for text, met in got]
        lines.append(
            f"| {delay:g} ms | {name} | " + " | ".join(cols) + f" | {'yes' if ok else '**no**'} |"
        )
    met = sum(ok for *_, ok in checks)
    lines += ["", f"{met} of {len(checks)} rows meet all three targets.", ""]
    lines += noise_floor(results, cells)
    lines += [
        "## Networked DB throughput, x hand-written",
        "",
        "The hand-written rows show their req/s; the others their ratio to it.",
        "",
        *summary_table(results, cells),
        "",
    ]
    for phase in results["latencies"]:
        delay = phase["delay_ms"]
        lines += [
            f"## Networked, {delay:g} ms each way",
            "",
            f"`SELECT 1` round trip through the proxy: {phase['rtt_ms']:.2f} ms."
            + (
                f" The proxy used {phase['proxy_cpu_percent']:.0f} % of a core meanwhile."
                if "proxy_cpu_percent" in phase
                else ""
            ),
            "",
            *latency_table(results, cells, delay),
            "",
        ]
    notes = list(results.get("notes", []))
    if notes:
        lines += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    lines.append(DOCS_MARK.format("end", "tables"))
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> bool:
    """DB req/s, DB p99 and no-DB p99 per row, one bar per latency; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cells = aggregate(results)
    rows = [r for r in results["rows"] if not r["unavailable"]]
    delays = [p["delay_ms"] for p in results["latencies"]]
    if not rows or not delays:
        return False
    names = [
        f"{r['label']}" + (" (fastapi-sqla venv)" if r["venv"] != "main" else "")
        if r["server"] == "uvicorn"
        else f"Flask: {r['label']}"
        for r in rows
    ]
    fig, axes = plt.subplots(1, 3, figsize=(19, 0.42 * len(rows) * len(delays) / 2 + 3),
                             layout="constrained", sharey=True)  # fmt: skip
    height = 0.8 / len(delays)
    for ax, attr, title in (
        (axes[0], "rps", "DB route: req/s (higher is better)"),
        (axes[1], "p99", "DB route: p99 ms (lower is better)"),
        (axes[2], "nodb_p99", "no-DB route under load: p99 ms (event-loop lag)"),
    ):
        for i, delay in enumerate(delays):
            values = [
                getattr(cells[(delay, r["key"])], attr)
                if (delay, r["key"]) in cells
                else float("nan")
                for r in rows
            ]
            ys = [y + (i - (len(delays) - 1) / 2) * height for y in range(len(rows))]
            ax.barh(ys, values, height=height, color=LATENCY_COLOURS[i % 4],
                    label=f"{delay:g} ms each way")  # fmt: skip
            for y, value in zip(ys, values, strict=True):
                if value == value:
                    text = f" {value:,.0f}" if attr == "rps" else f" {value:.1f}"
                    ax.text(value, y, text, va="center", fontsize=6)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), names, fontsize=8)
    for tick, row in zip(axes[0].get_yticklabels(), rows, strict=True):
        if row["role"] == "sessionmw":
            tick.set_fontweight("bold")
        elif row["role"] in ("reference", "control"):
            tick.set_color("#1f77b4")
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=8, loc="lower right")
    m = results["machine"]
    fig.suptitle(
        f"sessionmw networked benchmark ({results['mode']} run, {results['date']}): "
        f"PostgreSQL through a latency proxy, {results['settings']['db_clients']} + "
        f"{results['settings']['nodb_clients']} clients; {m['cores']} cores, {m['python']}; "
        "bold: sessionmw, blue: hand-written",
        fontsize=10,
    )
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    written = [out / "network.json"]
    (out / "network.md").write_text(markdown(results) + "\n")
    written.append(out / "network.md")
    if chart(results, out / "network.png"):
        written.append(out / "network.png")
    return written


if __name__ == "__main__":
    source = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).parent / "results" / "network.json"
    )
    print(", ".join(str(p) for p in write_report(json.loads(source.read_text()), source.parent)))
