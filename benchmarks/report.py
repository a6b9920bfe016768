"""Turn results.json into results.md (tables and target checks) and results.png.

    python benchmarks/report.py [benchmarks/results/results.json]   # redraw without re-running

Ratios to a reference are the median of per-repetition ratios: each repetition runs every
cell once, so pairing the two cells' samples of one repetition cancels most of the drift
of a shared machine, which a ratio of two medians would not.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

#: Targets from the project's issue.
MAX_NO_DB_OVERHEAD_US = 2.0
MAX_ONE_QUERY_RATIO = 1.03
CONCURRENCY = 50

ROLE_COLOURS = {
    "bare": "#9e9e9e",
    "reference": "#1f77b4",
    "sessionmw": "#2ca02c",
    "peer": "#ff7f0e",
}

Cells = dict[tuple[str, str, int], dict[str, Any]]

#: Invisible in the Markdown; docs/benchmarks.md includes the parts between them.
DOCS_MARK = "<!-- --8<-- [{}:{}] -->"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float]) -> float:
    """Half the interquartile range, relative to the median: robust to one disturbed batch."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / 2 / statistics.median(values) * 100


def _us(value: float) -> str:
    if value != value:  # NaN
        return "—"
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def paired_ratio(cell: dict[str, Any], ref: dict[str, Any]) -> float:
    pairs = [a / b for a, b in zip(cell["samples_us"], ref["samples_us"], strict=False) if b]
    return _median(pairs)


def paired_delta(cell: dict[str, Any], ref: dict[str, Any]) -> float:
    return _median([a - b for a, b in zip(cell["samples_us"], ref["samples_us"], strict=False)])


def index(results: dict[str, Any]) -> Cells:
    return {
        (c["variant"], c["handler"], c["concurrency"]): c
        for c in results.get("cells", [])
        if c["samples_us"]
    }


def _cell_text(cell: dict[str, Any] | None, error: str = "") -> str:
    if cell is None:
        return error or "—"
    return _with_spread(cell["samples_us"])


def _with_spread(values: list[float]) -> str:
    if len(values) < 2:
        return _us(_median(values))
    return f"{_us(_median(values))} ±{_spread(values):.0f}%"


def _ratio_text(cell: dict[str, Any] | None, ref: dict[str, Any] | None, is_ref: bool) -> str:
    if is_ref and cell is not None:
        return "1 (ref)"
    if cell is None or ref is None:
        return "—"
    return f"{paired_ratio(cell, ref):.3f}"


def group_table(results: dict[str, Any], cells: Cells, group: str) -> list[str]:
    rows = [v for v in results["variants"] if v["group"] == group]
    if not rows:
        return []
    asgi = rows[0]["kind"] == "asgi"
    head = "| variant | no DB µs/req | x ref | + µs over bare | 1 query µs/req | x ref |"
    rule = "|---|--:|--:|--:|--:|--:|"
    if asgi:
        head += f" no DB x{CONCURRENCY} | 1 query x{CONCURRENCY} | x ref |"
        rule += "--:|--:|--:|"
    lines = [head, rule]
    errors = {
        (c["variant"], c["handler"], c["concurrency"]): c["error"]
        for c in results.get("cells", [])
        if c["error"]
    }
    for v in rows:
        if v["unavailable"]:
            blanks = 8 if asgi else 5
            lines.append(f"| {v['label']} | unavailable ({v['unavailable']}) |" + " |" * blanks)
            continue
        key, ref, bare = v["key"], v["reference"], v["bare"]
        is_ref = v["role"] == "reference"
        ref_key = ref if v["role"] != "bare" else bare

        def get(k: str | None, handler: str, conc: int) -> dict[str, Any] | None:
            return cells.get((k, handler, conc)) if k else None

        def err(handler: str, conc: int, key: str = key) -> str:
            text = errors.get((key, handler, conc), "")
            return f"failed: {text}" if text else ""

        none1, one1 = get(key, "none", 1), get(key, "one", 1)
        over = "—"
        bare_cell = get(bare, "none", 1)
        if none1 and bare_cell and v["role"] != "bare":
            over = f"{paired_delta(none1, bare_cell):+.1f}"
        cols = [
            f"**{v['label']}**" if v["role"] == "sessionmw" else v["label"],
            _cell_text(none1, err("none", 1)),
            _ratio_text(none1, get(ref_key, "none", 1), is_ref),
            over,
            _cell_text(one1, err("one", 1)),
            _ratio_text(one1, get(ref, "one", 1), is_ref),
        ]
        if asgi:
            none50, one50 = get(key, "none", CONCURRENCY), get(key, "one", CONCURRENCY)
            cols += [
                _cell_text(none50, err("none", CONCURRENCY)),
                _cell_text(one50, err("one", CONCURRENCY)),
                _ratio_text(one50, get(ref, "one", CONCURRENCY), is_ref),
            ]
        lines.append("| " + " | ".join(cols) + " |")
    return lines


def check_targets(results: dict[str, Any], cells: Cells) -> list[tuple[str, str, str, bool]]:
    """(target, row, measured, met) for each check the issue asks for."""
    variants = {v["key"]: v for v in results["variants"] if not v["unavailable"]}
    checks: list[tuple[str, str, str, bool]] = []
    for v in variants.values():
        if v["role"] != "sessionmw":
            continue
        key, group = v["key"], v["group"]
        modes = [1] if v["kind"] == "wsgi" else [1, CONCURRENCY]
        bare = cells.get((v["bare"], "none", 1))
        mine = cells.get((key, "none", 1))
        if group != "FastAPI" and bare and mine:
            delta = paired_delta(mine, bare)
            checks.append(
                (
                    f"no DB: ≤ {MAX_NO_DB_OVERHEAD_US:g} µs over bare",
                    v["name"],
                    f"{delta:+.2f} µs",
                    delta <= MAX_NO_DB_OVERHEAD_US,
                )
            )
        peers = [p for p in variants.values() if p["group"] == group and p["role"] == "peer"]
        for conc in modes:
            suffix = "" if conc == 1 else f", x{conc}"
            mine = cells.get((key, "none", conc))
            if mine:
                beaten = _beaten_by(mine, peers, cells, "none", conc)
                checks.append(
                    (
                        f"no DB: cheapest session provider{suffix}",
                        v["name"],
                        "beaten by " + ", ".join(beaten) if beaten else "cheapest",
                        not beaten,
                    )
                )
            one = cells.get((key, "one", conc))
            ref = cells.get((v["reference"], "one", conc)) if v["reference"] else None
            if one and ref:
                ratio = paired_ratio(one, ref)
                checks.append(
                    (
                        f"1 query: ≤ {MAX_ONE_QUERY_RATIO:g} x hand-written{suffix}",
                        v["name"],
                        f"{ratio:.3f} x",
                        ratio <= MAX_ONE_QUERY_RATIO,
                    )
                )
            same = [p for p in peers if p["flavor"] == v["flavor"]]
            if one and same:
                beaten = _beaten_by(one, same, cells, "one", conc)
                checks.append(
                    (
                        f"1 query: faster than every {v['flavor']} peer{suffix}",
                        v["name"],
                        "slower than " + ", ".join(beaten) if beaten else "fastest",
                        not beaten,
                    )
                )
    return checks


def _beaten_by(
    mine: dict[str, Any], peers: list[dict[str, Any]], cells: Cells, handler: str, conc: int
) -> list[str]:
    """The peers that were faster, each with our paired ratio to it (1.004 x: a tie)."""
    beaten = []
    for peer in peers:
        theirs = cells.get((peer["key"], handler, conc))
        if theirs is not None:
            ratio = paired_ratio(mine, theirs)
            if ratio > 1:
                beaten.append(f"{peer['label']} ({ratio:.3f} x)")
    return beaten


def scaling_tables(results: dict[str, Any]) -> list[str]:
    scaling = results.get("scaling")
    if not scaling:
        return []
    names = {v["key"]: v["name"] for v in results["variants"]}
    lines = [
        "## Part 2: scaling",
        "",
        "### Concurrency (one-query handler, Starlette)",
        "",
        "µs per request from timing runs; the memory columns come from a separate pass "
        "under `tracemalloc` with exactly one round of that many requests in flight.",
        "",
        "| variant | in flight | µs/req | x at 1 | peak KiB | KiB per in-flight request "
        "| sessions left | connections left |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    base: dict[str, float] = {}
    for p in scaling["concurrency"]:
        if p["error"]:
            lines.append(f"| {names[p['variant']]} | {p['x']} | failed: {p['error']} |||||")
            continue
        median = _median(p["samples_us"])
        base.setdefault(p["variant"], median)
        lines.append(
            f"| {names[p['variant']]} | {p['x']} | {_with_spread(p['samples_us'])} "
            f"| {median / base[p['variant']]:.2f} | {p['peak_kib']:,.0f} "
            f"| {p['peak_kib'] / p['x']:.1f} | {p['sessions_left']} | {p['conns_left']} |"
        )
    lines += [
        "",
        "### Request count (no-DB handler, sequential, Starlette)",
        "",
        "| variant | requests | µs/req | peak KiB | retained KiB after | sessions left "
        "| connections left |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for p in scaling["growth"]:
        lines.append(
            f"| {names[p['variant']]} | {p['x']:,} | {_with_spread(p['samples_us'])} "
            f"| {p['peak_kib']:,.0f} | {p['retained_kib']:,.1f} | {p['sessions_left']} "
            f"| {p['conns_left']} |"
        )
    return [*lines, ""]


def server_table(results: dict[str, Any]) -> list[str]:
    servers = results.get("servers")
    if not servers:
        return []
    lines = [
        "## Part 3: real servers",
        "",
        "One worker process serving the one-query route on 127.0.0.1; the load generator "
        "(`benchmarks/loadgen.py`) runs in its own process with keep-alive connections, so "
        "on 2 cores it competes with the server for CPU: compare rows, not absolute numbers.",
        "",
        "| server | variant | connections | seconds | requests | req/s | p50 ms | p99 ms "
        "| errors | req/s x hand-written |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    refs = {(s["server"], s["flavor"]): s for s in servers if s["variant"] == "hand-written"}
    for s in servers:
        if s.get("error"):
            lines.append(f"| {s['server']} | {s['label']} | failed: {s['error']} |||||||")
            continue
        ref = refs.get((s["server"], s["flavor"]))
        ratio = f"{s['rps'] / ref['rps']:.3f}" if ref and ref.get("rps") else "—"
        lines.append(
            f"| {s['server']} | {s['label']} | {s['connections']} | {s['seconds']:.1f} "
            f"| {s['requests']:,} | {s['rps']:,.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} "
            f"| {s['errors']} | {ratio} |"
        )
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    cells = index(results)
    m, settings = results["machine"], results["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines = [
        "# sessionmw benchmarks",
        "",
        DOCS_MARK.format("start", "header"),
        f"{results['date']}, `{results['mode']}` run in {results.get('duration_s', 0):.0f} s. "
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}, load average {m['load']} at the "
        f"start. {m['python']}. sessionmw at {m['revision']}.",
        "",
        f"Versions: {versions}.",
        "",
        f"Each cell: median of {settings['reps']} repetitions of ~{settings['batch_s']:g} s "
        "batches, ± half the interquartile range. The repetitions of all cells are interleaved "
        "(shuffled round-robin). x ref: median of per-repetition ratios to the hand-written "
        "row of the same framework and flavor (sync or async); + µs over bare: the same for "
        "differences to the framework without any session handling. SQLite file, "
        "every engine with the same pool (20 + 40 overflow).",
        "",
        DOCS_MARK.format("end", "header"),
        "",
        DOCS_MARK.format("start", "tables"),
        "## Part 1: per-request cost, in process",
        "",
    ]
    for group, note in (
        ("Starlette", "Starlette app; peers that are plain middleware sit on the same app."),
        (
            "FastAPI",
            "FastAPI app; the no-DB route declares the variant's session dependency "
            "without using it (sessionmw: the README's `get_db` returning "
            "`request.state.db()`).",
        ),
        ("Flask", "Flask app called as a WSGI server would; sequential only."),
    ):
        table = group_table(results, cells, group)
        if table:
            lines += [f"### {group}", "", note, "", *table, ""]
    leftovers = results.get("leftovers", {})
    leaky = {k: v for k, v in leftovers.items() if any(v)}
    lines.append(
        "Sessions still registered / connections still checked out after part 1: "
        + (", ".join(f"{k}: {v[0]}/{v[1]}" for k, v in leaky.items()) if leaky else "none.")
    )
    lines.append("")
    checks = check_targets(results, cells)
    if checks:
        lines += ["## Targets", "", "| target | row | measured | met |", "|---|---|---|---|"]
        lines += [
            f"| {t} | {row} | {got} | {'yes' if ok else '**no**'} |" for t, row, got, ok in checks
        ]
        lines.append("")
    lines += scaling_tables(results)
    lines += server_table(results)
    lines.append(DOCS_MARK.format("end", "tables"))
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> bool:
    """Bars for part 1 (sequential), lines for the concurrency sweep; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return False
    cells = index(results)
    variants = [v for v in results["variants"] if (v["key"], "none", 1) in cells]
    names = [v["name"] for v in variants]
    fig, axes = plt.subplots(
        1, 3, figsize=(19, 8), gridspec_kw={"width_ratios": [1, 1, 1.1]}, layout="constrained"
    )
    for ax, handler, title, scale in (
        (axes[0], "none", "no-DB handler, sequential", "log"),
        (axes[1], "one", "one-query handler, sequential", "linear"),
    ):
        values = [
            _median(cells[(v["key"], handler, 1)]["samples_us"])
            if (v["key"], handler, 1) in cells
            else float("nan")
            for v in variants
        ]
        ax.barh(names, values, color=[ROLE_COLOURS[v["role"]] for v in variants])
        ax.set_xscale(scale)
        ax.invert_yaxis()
        ax.set_xlabel("µs per request" + (" (log scale)" if scale == "log" else ""))
        ax.set_title(title)
        for y, value in enumerate(values):
            if value == value:
                ax.text(value, y, f" {_us(value)}", va="center", fontsize=7)
        ax.tick_params(axis="y", labelsize=8)
    axes[1].tick_params(labelleft=False)
    axes[0].legend(
        handles=[Patch(color=c, label=role) for role, c in ROLE_COLOURS.items()],
        fontsize=8,
        loc="lower right",
    )
    ax = axes[2]
    points = (results.get("scaling") or {}).get("concurrency", [])
    by_key = {v["key"]: v for v in results["variants"]}
    for key in dict.fromkeys(p["variant"] for p in points):
        series = [
            (p["x"], _median(p["samples_us"]))
            for p in points
            if p["variant"] == key and p["samples_us"]
        ]
        if series:
            xs, ys = zip(*series, strict=True)
            v = by_key[key]
            style = "-" if v["flavor"] == "sync" else "--"
            ax.plot(xs, ys, style, marker="o", color=ROLE_COLOURS[v["role"]], label=v["name"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("µs per request (log scale)")
    ax.set_title("one-query handler vs concurrency")
    if points:
        ax.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"sessionmw benchmarks ({results['mode']} run): {m['cpu']}, {m['cores']} cores, "
        f"{m['python']}",
        fontsize=11,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    written = [out / "results.json"]
    (out / "results.md").write_text(markdown(results) + "\n")
    written.append(out / "results.md")
    if chart(results, out / "results.png"):
        written.append(out / "results.png")
    return written


if __name__ == "__main__":
    source = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).parent / "results" / "results.json"
    )
    print(", ".join(str(p) for p in write_report(json.loads(source.read_text()), source.parent)))
