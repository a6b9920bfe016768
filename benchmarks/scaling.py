"""Part 2: does the cost per request stay flat as concurrency and request count grow?

Two sweeps, both in process on the Starlette apps of part 1:

* concurrency: 1, 10, 100 and 1000 requests in flight (``asyncio.gather``), one-query
  handler, sessionmw sync and async beside their hand-written references;
* request count: 10k and 100k sequential no-DB requests through sessionmw (and bare).

Timing runs and memory runs are separate passes: ``tracemalloc`` slows every allocation
several times over, so the µs come from runs without it and the peaks from runs with it.
After every pass the sessions left in ``Session.registry.registry`` and the connections
left checked out are counted; both must be 0.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from common import NO_DB, ONE_QUERY, Samples, asgi_batch
from variants import Built

CONCURRENCY_VARIANTS = (
    "starlette-hand-sync",
    "starlette-sessionmw-sync",
    "starlette-hand-async",
    "starlette-sessionmw-async",
)
GROWTH_VARIANTS = ("starlette-bare", "starlette-sessionmw-sync", "starlette-sessionmw-async")
LEVELS = (1, 10, 100, 1000)


@dataclass
class Point:
    variant: str
    x: int  # concurrency level, or number of sequential requests
    requests: int = 0
    samples: Samples = field(default_factory=Samples)
    peak_kib: float = 0.0
    retained_kib: float = 0.0
    sessions_left: int = 0
    conns_left: int = 0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "x": self.x,
            "requests": self.requests,
            "samples_us": [round(v, 3) for v in self.samples.values],
            "peak_kib": round(self.peak_kib, 1),
            "retained_kib": round(self.retained_kib, 1),
            "sessions_left": self.sessions_left,
            "conns_left": self.conns_left,
            "error": self.error,
        }


def _memory(
    loop: asyncio.AbstractEventLoop, run: Callable[[], Awaitable[float]]
) -> tuple[float, float]:
    """(Peak, retained) KiB above what was allocated before ``run``."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        loop.run_until_complete(run())
        peak = tracemalloc.get_traced_memory()[1]
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (peak - before) / 1024, (after - before) / 1024


def concurrency_sweep(
    loop: asyncio.AbstractEventLoop,
    built: dict[str, Built],
    *,
    reps: int,
    batch_s: float,
    log: Callable[[str], None] = print,
) -> list[Point]:
    points = [Point(k, level) for k in CONCURRENCY_VARIANTS if k in built for level in LEVELS]
    for point in points:  # warm up and size: whole rounds of ``level`` requests
        app = built[point.variant].app
        try:
            probe = max(point.x, 100)
            per_request = (
                loop.run_until_complete(asgi_batch(app, ONE_QUERY, probe, point.x)) / probe
            )
            rounds = max(1, int(batch_s / per_request) // point.x)
            point.requests = rounds * point.x
        except Exception as exc:
            point.error = f"{type(exc).__name__}: {exc}"[:120]
    for rep in range(reps):
        for point in points:
            if point.error:
                continue
            gc.collect()
            seconds = loop.run_until_complete(
                asgi_batch(built[point.variant].app, ONE_QUERY, point.requests, point.x)
            )
            point.samples.values.append(seconds / point.requests * 1e6)
        log(f"  concurrency sweep, repetition {rep + 1}/{reps}")
    for point in points:
        if not point.error:
            point.sessions_left, point.conns_left = built[point.variant].leftovers()
    for point in points:  # the memory pass: one round of ``level`` requests in flight
        if point.error:
            continue
        ready = built[point.variant]
        point.peak_kib, point.retained_kib = _memory(
            loop, partial(asgi_batch, ready.app, ONE_QUERY, point.x, point.x)
        )
        sessions, conns = ready.leftovers()
        point.sessions_left = max(point.sessions_left, sessions)
        point.conns_left = max(point.conns_left, conns)
    return points


def growth_sweep(
    loop: asyncio.AbstractEventLoop,
    built: dict[str, Built],
    *,
    counts: tuple[int, ...],
    reps: int,
    log: Callable[[str], None] = print,
) -> list[Point]:
    points = [Point(k, n, n) for k in GROWTH_VARIANTS if k in built for n in counts]
    for rep in range(reps):
        for point in points:
            gc.collect()
            seconds = loop.run_until_complete(asgi_batch(built[point.variant].app, NO_DB, point.x))
            point.samples.values.append(seconds / point.x * 1e6)
            ready = built[point.variant]
            point.sessions_left, point.conns_left = ready.leftovers()
        log(f"  request-count sweep, repetition {rep + 1}/{reps}")
    for point in points:
        ready = built[point.variant]
        point.peak_kib, point.retained_kib = _memory(
            loop, partial(asgi_batch, ready.app, NO_DB, point.x)
        )
        sessions, conns = ready.leftovers()
        point.sessions_left = max(point.sessions_left, sessions)
        point.conns_left = max(point.conns_left, conns)
    return points
