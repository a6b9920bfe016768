"""Where a variant's extra time per request goes, against another variant: a cProfile diff.

    python benchmarks/hotpath.py starlette-sessionmw-sync          # vs its hand-written row
    python benchmarks/hotpath.py flask-sessionmw --handler none --against flask-bare

Both variants serve the same requests under cProfile; the table lists, per request, the
functions whose call counts differ (or that belong to sessionmw), with their own time.
cProfile inflates every call several times over, so read the call counts and the ranking,
not the absolute µs: the wall-clock difference is what run.py measures.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import NO_DB, ONE_QUERY, asgi_batch, make_database, wsgi_batch
from variants import VARIANTS, Variant, bare_for, reference_for

Profile = dict[str, tuple[float, float]]  # function -> (calls per request, own µs per request)


def _short(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{filename}:{line}({name})" if line else name


def profile(variant: Variant, handler: str, db: Path, requests: int) -> Profile:
    app = variant.build(db).app
    loop = asyncio.new_event_loop()

    def run(n: int) -> Any:
        if variant.kind == "wsgi":
            return wsgi_batch(app, handler, n)
        return loop.run_until_complete(asgi_batch(app, handler, n))

    run(max(requests // 5, 200))  # warm-up: imports, pool, statement caches
    profiler = cProfile.Profile()
    profiler.enable()
    run(requests)
    profiler.disable()
    loop.close()
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    raw = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    return {
        _short(key): (calls / requests, own / requests * 1e6)
        for key, (_, calls, own, _, _) in raw.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", help="a variant key, e.g. starlette-sessionmw-sync")
    parser.add_argument("--against", help="the variant to compare with (default: its reference)")
    parser.add_argument("--handler", choices=("one", "none"), default="one")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    by_key = {v.key: v for v in VARIANTS}
    subject = by_key[args.variant]
    handler = ONE_QUERY if args.handler == "one" else NO_DB
    if args.against:
        other = by_key[args.against]
    else:
        ref = reference_for(subject) if handler == ONE_QUERY else None
        other = ref or bare_for(subject)
    with tempfile.TemporaryDirectory() as tmp:
        db = make_database(Path(tmp))
        base = profile(other, handler, db, args.requests)
        mine = profile(subject, handler, db, args.requests)
    rows = []
    for name in set(base) | set(mine):
        calls_a, own_a = base.get(name, (0.0, 0.0))
        calls_b, own_b = mine.get(name, (0.0, 0.0))
        if abs(calls_a - calls_b) > 1e-6 or "sessionmw" in name:
            rows.append((own_b - own_a, name, calls_a, calls_b, own_a, own_b))
    rows.sort(reverse=True)
    total_a = sum(c for c, _ in base.values())
    total_b = sum(c for c, _ in mine.values())
    print(f"{subject.key} vs {other.key}, {handler}: {total_b - total_a:+.0f} calls per request")
    print(f"{'function':<72} {'calls/req':>15} {'own µs/req (profiled)':>24}")
    for _, name, calls_a, calls_b, own_a, own_b in rows[: args.top]:
        print(f"{name[-72:]:<72} {calls_a:6.2f} → {calls_b:6.2f} {own_a:9.2f} → {own_b:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
