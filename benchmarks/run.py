"""Run the benchmark suite and write benchmarks/results/{results.md,results.png,results.json}.

    python benchmarks/run.py            # everything, 3-4 minutes on 2 cores
    python benchmarks/run.py --quick    # a smoke run, under a minute

Part 1 (``measure.py``) times every variant in process; part 2 (``scaling.py``) sweeps
concurrency and request count; part 3 (``servers.py``) puts uvicorn and gunicorn in front
of the apps and a load generator in another process. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PACKAGES, RESULTS, machine, make_database, version
from measure import build_all, plan, run_cells
from report import write_report
from scaling import concurrency_sweep, growth_sweep
from variants import VARIANTS, bare_for, reference_for


@dataclass(frozen=True)
class Settings:
    """How long to measure; ``--quick`` trades precision for a run under a minute."""

    reps: int
    batch_s: float
    warmup_s: float
    scaling_reps: int
    scaling_batch_s: float
    growth_counts: tuple[int, ...]
    growth_reps: int
    server_seconds: float


FULL = Settings(11, 0.15, 0.1, 3, 0.15, (10_000, 100_000), 2, 3.0)
QUICK = Settings(3, 0.03, 0.02, 1, 0.03, (1_000, 10_000), 1, 1.0)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (< 60 s)")
    parser.add_argument("--reps", type=int, help="repetitions per measurement")
    parser.add_argument("--batch-seconds", type=float, help="length of one timed batch")
    parser.add_argument("--only", help="only the variants whose key contains this text")
    parser.add_argument("--no-scaling", action="store_true", help="skip part 2")
    parser.add_argument(
        "--servers",
        choices=("auto", "yes", "no"),
        default="auto",
        help="part 3, real servers: 'auto' runs it except with --quick or --only",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    return Settings(
        reps=args.reps or base.reps,
        batch_s=args.batch_seconds or base.batch_s,
        warmup_s=base.warmup_s,
        scaling_reps=base.scaling_reps,
        scaling_batch_s=base.scaling_batch_s,
        growth_counts=base.growth_counts,
        growth_reps=base.growth_reps,
        server_seconds=base.server_seconds,
    )


def variant_rows(unavailable: dict[str, str], only: str | None) -> list[dict[str, Any]]:
    rows = []
    for v in VARIANTS:
        if only and only not in v.key:
            continue
        ref = reference_for(v)
        rows.append(
            {
                "key": v.key,
                "group": v.group,
                "label": v.label,
                "name": v.name,
                "flavor": v.flavor,
                "role": v.role,
                "kind": v.kind,
                "reference": ref.key if ref else None,
                "bare": bare_for(v).key,
                "unavailable": unavailable.get(v.key, ""),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = settings_for(args)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": {p: version(p) for p in PACKAGES},
        "settings": settings.__dict__,
    }
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    with tempfile.TemporaryDirectory(prefix="sessionmw-bench-") as tmp:
        db = make_database(Path(tmp))
        print("part 1: building and checking the variants")
        built, unavailable = build_all(loop, db, args.only)
        gc.collect()
        gc.freeze()  # what is built stays: each batch's gc.collect() then costs nothing
        for key, why in unavailable.items():
            print(f"  {key}: unavailable ({why})")
        results["variants"] = variant_rows(unavailable, args.only)
        cells = plan(built)
        print(f"part 1: {len(cells)} measurements x {settings.reps} repetitions")
        run_cells(
            loop,
            built,
            cells,
            reps=settings.reps,
            batch_s=settings.batch_s,
            warmup_s=settings.warmup_s,
        )
        results["cells"] = [c.as_dict() for c in cells]
        results["leftovers"] = {k: list(b.leftovers()) for k, b in built.items()}
        if not args.no_scaling:
            print("part 2: scaling")
            conc = concurrency_sweep(
                loop, built, reps=settings.scaling_reps, batch_s=settings.scaling_batch_s
            )
            growth = growth_sweep(
                loop, built, counts=settings.growth_counts, reps=settings.growth_reps
            )
            results["scaling"] = {
                "concurrency": [p.as_dict() for p in conc],
                "growth": [p.as_dict() for p in growth],
            }
        for ready in built.values():
            loop.run_until_complete(ready.dispose())
    loop.close()
    if args.servers == "yes" or (args.servers == "auto" and not args.quick and not args.only):
        print("part 3: real servers")
        from servers import run_servers

        results["servers"] = run_servers(seconds=settings.server_seconds)
    results["duration_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    written = write_report(results, args.out)
    print(f"done in {results['duration_s']:.0f} s: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
