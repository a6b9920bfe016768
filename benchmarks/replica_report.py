"""Turn replicas.json into replicas.md: per latency, A against B, and where the reads went.

    python benchmarks/replica_report.py [benchmarks/results/replicas.json]   # no re-run

Figures are medians over rounds; B / A is the median of per-round ratios, since each round
runs A and then B on the same machine a few seconds apart.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

HONEST = (
    "On one machine with 2 cores, the primary and the replica share the CPU (with the "
    "server, the proxies and the load generator), so adding a replica cannot add capacity "
    "here; what the figures do show is the routing's own cost (C and B against A) and that "
    "the reads move to the replica (the transactions each PostgreSQL server counted)."
)

#: The ratios shown: (variant, base, what their difference is).
PAIRS = (
    ("B", "A", "the replica against the primary alone"),
    ("C", "A", "the routing's own cost"),
    ("B", "C", "reading on the standby rather than the primary"),
)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _runs(phase: dict[str, Any], variant: str) -> list[dict[str, Any]]:
    return [run for run in phase["runs"] if run["variant"] == variant]


def _ratio(phase: dict[str, Any], variant: str, base: str, field: str) -> str:
    """``variant`` / ``base`` of ``field``, paired by round: the median, then every round's."""
    one = {run["round"]: run.get(field, 0.0) for run in _runs(phase, variant)}
    other = {run["round"]: run.get(field, 0.0) for run in _runs(phase, base)}
    ratios = [one[n] / other[n] for n in sorted(one) if other.get(n)]
    rounds = ", ".join(f"{r:.3f}" for r in ratios)
    return f"**{_median(ratios):.3f} x** ({rounds})"


def _replica_share(runs: list[dict[str, Any]]) -> float:
    primary = sum(run["transactions"]["primary"] for run in runs)
    replica = sum(run["transactions"]["replica"] for run in runs)
    return replica / (primary + replica) if primary + replica else float("nan")


def phase_table(results: dict[str, Any], phase: dict[str, Any]) -> list[str]:
    rtt = phase["rtt_ms"]
    lines = [
        f"## {phase['delay_ms']:g} ms each way",
        "",
        f"`SELECT 1` round trip through the proxy: primary {rtt['primary']:.2f} ms, "
        f"replica {rtt['replica']:.2f} ms.",
        "",
        "| variant | req/s | p50 ms | p99 ms | errors | server CPU µs/req "
        "| transactions on primary | on replica | reads on replica |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for variant in results["variants"]:
        runs = _runs(phase, variant["key"])
        if not runs:
            continue
        lines.append(
            f"| **{variant['key']}** {variant['label']} "
            f"| {_median([r['rps'] for r in runs]):.0f} "
            f"| {_median([r['p50_ms'] for r in runs]):.1f} "
            f"| {_median([r['p99_ms'] for r in runs]):.1f} "
            f"| {sum(r['errors'] for r in runs)} "
            f"| {_median([r.get('server_cpu_us', float('nan')) for r in runs]):.0f} "
            f"| {_median([r['transactions']['primary'] for r in runs]):.0f} "
            f"| {_median([r['transactions']['replica'] for r in runs]):.0f} "
            f"| {_replica_share(runs):.1%} |"
        )
    lines += [
        "",
        "Paired by round (the median, then each round's ratio; rounds that straddle 1 "
        "say the difference is the machine's noise, not the variant's):",
        "",
        "| | req/s | p99 | server CPU per request |",
        "|---|---|---|---|",
    ]
    keys = {variant["key"] for variant in results["variants"]}
    for variant, base, meaning in PAIRS:
        if {variant, base} <= keys:
            lines.append(
                f"| {variant} / {base}: {meaning} | {_ratio(phase, variant, base, 'rps')} "
                f"| {_ratio(phase, variant, base, 'p99_ms')} "
                f"| {_ratio(phase, variant, base, 'server_cpu_us')} |"
            )
    lines += [
        "",
        "<details><summary>every run</summary>",
        "",
        "| round | variant | req/s | p50 ms | p99 ms | errors | CPU µs/req | on primary "
        "| on replica |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {run['round'] + 1} | {run['variant']} | {run['rps']:.0f} | {run['p50_ms']:.1f} "
        f"| {run['p99_ms']:.1f} | {run['errors']} | {run.get('server_cpu_us', float('nan')):.0f} "
        f"| {run['transactions']['primary']} "
        f"| {run['transactions']['replica']} |"
        for run in phase["runs"]
    ]
    return [*lines, "", "</details>", ""]


def markdown(results: dict[str, Any]) -> str:
    machine, settings = results["machine"], results["settings"]
    versions = ", ".join(f"{name} {v}" for name, v in results["versions"].items())
    pool = settings["pool"]
    lines = [
        "# Reads: the primary alone against the primary plus a streaming replica",
        "",
        f"{results['date']} · commit {machine['revision']} · {machine['cpu']}, "
        f"{machine['cores']} cores · load {machine['load']} at the start, "
        f"{machine.get('load_end', '?')} at the end · {results['mode']} run, "
        f"{results.get('duration_s', 0):.0f} s · {machine['python']} · {versions}",
        "",
        f"**Read this first.** {HONEST}",
        "",
        f"Each request of `GET /page` reads {settings['page']} rows by a range of the primary "
        f"key, anywhere in a table of {settings['rows']:,} rows, in a sync `def` Starlette "
        "endpoint (run in its thread pool) through `ASGISessionMiddleware`; uvicorn, 1 worker "
        f"({settings['uvicorn_stack']}). Every engine has a pool of {pool['pool_size']} + "
        f"{pool['max_overflow']}. **A** is `request_scoped(factory)`, **B** "
        "`request_scoped(factory, replicas=[replica])` over a `pg_basebackup -R` streaming "
        "replica of the same primary, **C** the same routing with its replica engine on the "
        "primary (a control: the routing without a second server). Every engine reaches "
        "its server through the benchmark's latency proxy. Load: "
        f"{settings['clients']} keep-alive clients for {settings['seconds']:g} s after "
        f"{settings['warmup']:g} s of warm-up, the variants one after the other "
        "(A B C A B C ...), "
        f"{settings['rounds']} round(s) per latency; figures are medians over rounds.",
        "",
        "*Transactions on primary / on replica* are each server's own count "
        "(`xact_commit + xact_rollback` of the benchmark's database in `pg_stat_database`) "
        "over a run, warm-up included, read "
        f"{settings['stats_settle_s']:g} s after it so that the server has published them. "
        "One request is one transaction, so they say where the reads went. *Server CPU "
        "µs/req* is the uvicorn process's user + system CPU time over the run divided by "
        "those transactions: on a shared machine it moves much less than req/s, so it is "
        "the closer measure of what the routing costs.",
        "",
    ]
    for phase in results["latencies"]:
        lines += phase_table(results, phase)
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    path = out / "replicas.md"
    path.write_text(markdown(results))
    return [path]


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results/replicas.json"
    written = write_report(json.loads(source.read_text()), source.parent)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
