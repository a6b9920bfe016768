"""Part 1: per-request cost of every variant, in process, interleaved.

Every (variant, handler, concurrency) is a *cell*. Each cell is warmed up and sized so one
batch lasts about ``batch_s``; then the repetitions run round-robin over all cells in a
shuffled order, so a burst of noise from the rest of the machine lands on every row alike
instead of on whichever variant happened to run at that moment. The median of the
repetitions is reported, with their spread.
"""

from __future__ import annotations

import asyncio
import gc
import random
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

from common import (
    ITEM_NAME,
    NO_DB,
    ONE_QUERY,
    Samples,
    asgi_batch,
    asgi_check,
    wsgi_batch,
    wsgi_check,
)
from variants import VARIANTS, Built, Variant

#: How many requests the concurrent ASGI runs keep in flight (asyncio.gather).
CONCURRENCY = 50


@dataclass
class Cell:
    variant: Variant
    handler: str  # NO_DB or ONE_QUERY
    concurrency: int
    requests: int = 0
    samples: Samples = field(default_factory=Samples)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant.key,
            "handler": "none" if self.handler == NO_DB else "one",
            "concurrency": self.concurrency,
            "requests": self.requests,
            "samples_us": [round(v, 3) for v in self.samples.values],
            "error": self.error,
        }


def reason(exc: BaseException) -> str:
    """One short line for the table: the exception's type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:120] if text else type(exc).__name__


def build_all(
    loop: asyncio.AbstractEventLoop, db: Path, only: str | None
) -> tuple[dict[str, Built], dict[str, str]]:
    """Build and check every variant; a failing one is recorded, never raised."""
    built: dict[str, Built] = {}
    unavailable: dict[str, str] = {}
    for variant in VARIANTS:
        if only and only not in variant.key:
            continue
        try:
            ready = variant.build(db)
            for path, body in ((NO_DB, b"ok"), (ONE_QUERY, ITEM_NAME.encode())):
                if variant.kind == "asgi":
                    loop.run_until_complete(asgi_check(ready.app, path, body))
                else:
                    wsgi_check(ready.app, path, body)
        except Exception as exc:
            if isinstance(exc, ImportError):
                unavailable[variant.key] = f"cannot import {exc.name}" if exc.name else reason(exc)
            else:
                unavailable[variant.key] = reason(exc)
                traceback.print_exc()
            continue
        built[variant.key] = ready
    return built, unavailable


def _batch(
    loop: asyncio.AbstractEventLoop, cell: Cell, app: Any, requests: int, timeout: float
) -> float:
    if cell.variant.kind == "wsgi":
        return wsgi_batch(app, cell.handler, requests)
    coro = asgi_batch(app, cell.handler, requests, cell.concurrency)
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


def plan(built: dict[str, Built]) -> list[Cell]:
    cells = []
    for variant in VARIANTS:
        if variant.key not in built:
            continue
        handlers = [NO_DB] if variant.role == "bare" else [NO_DB, ONE_QUERY]
        levels = [1, CONCURRENCY] if variant.kind == "asgi" else [1]
        cells += [Cell(variant, h, c) for h in handlers for c in levels]
    return cells


def run_cells(
    loop: asyncio.AbstractEventLoop,
    built: dict[str, Built],
    cells: list[Cell],
    *,
    reps: int,
    batch_s: float,
    warmup_s: float,
    log: Any = print,
) -> None:
    """Warm up and size each cell, then run the repetitions round-robin."""
    for cell in cells:
        app = built[cell.variant.key].app
        step = max(cell.concurrency, 20)
        try:
            done, elapsed, last = 0, 0.0, 0.0
            while elapsed < warmup_s or done < 3 * step:
                last = _batch(loop, cell, app, step, 60)
                elapsed += last
                done += step
            per_request = last / step
            wanted = int(batch_s / per_request)
            cell.requests = max(step, wanted - wanted % cell.concurrency)
        except Exception as exc:
            cell.error = reason(exc)
            log(f"  {cell.variant.name} {cell.handler} x{cell.concurrency}: {cell.error}")
    order = [c for c in cells if not c.error]
    shuffle = random.Random(20240601)
    for rep in range(reps):
        shuffle.shuffle(order)
        started = perf_counter()
        for cell in order:
            if cell.error:
                continue
            gc.collect()
            try:
                seconds = _batch(loop, cell, built[cell.variant.key].app, cell.requests, 120)
            except Exception as exc:
                cell.error = reason(exc)
                continue
            cell.samples.values.append(seconds / cell.requests * 1e6)
        log(f"  repetition {rep + 1}/{reps}: {perf_counter() - started:.1f} s")
