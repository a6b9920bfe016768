"""Work per request, counted: what each way of providing a Session costs, without noise.

Part 1 times requests in microseconds, and on a shared 2-core machine its repetitions
spread by ±20%: more than the differences it is asked to tell apart (a few microseconds
with no database work, 3% with one query).  Counting does not spread.  For both routes
of every part 1 variant this counts, per request:

- **bytecode instructions** and Python frames entered (calls, and resumptions of
  coroutines and generators), with ``sys.settrace``: fast, anywhere, and able to say
  which function they go to (``--functions``); work inside C functions is not counted;
- **machine instructions**, all of them (Python, C, SQLite), with Valgrind's callgrind,
  collected only while the measured requests run; slower (a few minutes), and only where
  ``valgrind`` is installed (``apt install valgrind``).

The same code counts the same, run after run; machine instructions also follow memory
layout and string hashes, by up to about 1% between otherwise alike runs.  Instructions
stand in for CPU time; the network, the disk and the other processes are what they leave
out::

    python benchmarks/work.py                          # writes benchmarks/results/work.md
    python benchmarks/work.py --functions flask-sessionmw --route /one
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

from common import (  # noqa: E402
    NO_DB,
    ONE_QUERY,
    asgi_batch,
    make_database,
    sessionmw_revision,
    wsgi_batch,
)
from variants import VARIANTS, Built, Variant, bare_for, reference_for  # noqa: E402

ROUTES = (NO_DB, ONE_QUERY)
WARM_UP = 200
#: Requests traced per route; every one does the same work, so a few suffice.
TRACED = 40
#: Requests run under callgrind per route (its warm-up is shorter: it runs ~50x slower).
MACHINE = 40
MACHINE_WARM_UP = 40
#: String hash seeds, one callgrind run each: a row's figure is their median.  Each seed
#: lays the process's dicts out anew, which moves a row by up to ~1%.
SEEDS = (0, 1, 2)


@dataclass
class Count:
    """Per request to one route."""

    frames: float = 0.0
    bytecodes: float = 0.0
    machine: float | None = None
    by_function: dict[str, float] = field(default_factory=dict)


@dataclass
class Counts:
    """A variant's counts on both routes, or why it has none."""

    routes: dict[str, Count] = field(default_factory=dict)
    error: str = ""


class Tracer:
    """A ``sys.settrace`` hook that counts frames and bytecodes in this thread."""

    def __init__(self) -> None:
        self.frames = 0
        self.bytecodes = 0
        #: Bytecodes by function (``file:function``), for ``--functions``.
        self.by_function: Counter[str] = Counter()

    def _frame(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
        self.frames += 1
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        code = frame.f_code
        where = f"{code.co_filename.rsplit('/', 2)[-1]}:{code.co_qualname}"
        by_function = self.by_function

        def local(frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
            if event == "opcode":
                self.bytecodes += 1
                by_function[where] += 1
            return local

        return local

    def __enter__(self) -> Tracer:
        sys.settrace(self._frame)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


def _serve(
    built: Built,
    variant: Variant,
    route: str,
    warm_up: int,
    requests: int,
    around: Callable[[Callable[[], None]], None],
) -> None:
    """Warm up, then run ``requests`` requests to ``route`` inside ``around``."""
    app = built.app
    if variant.kind == "wsgi":
        wsgi_batch(app, route, warm_up)
        _settle_heap()
        around(lambda: wsgi_batch(app, route, requests))
        return
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asgi_batch(app, route, warm_up))
        _settle_heap()
        around(lambda: loop.run_until_complete(asgi_batch(app, route, requests)))
    finally:
        loop.run_until_complete(built.dispose())
        loop.close()


def _settle_heap() -> None:
    """Collect, then freeze what survived: the collections the measured requests trigger
    then scan only what those requests allocate, not a heap that differs from one variant
    (and one run) to the next.  Otherwise whether an older generation's collection falls
    inside the measured requests moved a row by up to 9%."""
    gc.collect()
    gc.freeze()


def _build(variant: Variant, database: Path) -> Built | str:
    try:
        return variant.build(database)
    except Exception as exc:  # a missing or broken peer: its row says why
        return f"unavailable ({type(exc).__name__}: {exc})"[:120]


def trace(variant: Variant, database: Path) -> Counts:
    """Count frames and bytecodes of ``TRACED`` requests to each route."""
    counts = Counts()
    for route in ROUTES:
        built = _build(variant, database)
        if isinstance(built, str):
            return Counts(error=built)
        tracer = Tracer()

        def traced(batch: Callable[[], None], tracer: Tracer = tracer) -> None:
            with tracer:
                batch()

        _serve(built, variant, route, WARM_UP, TRACED, traced)
        sessions, connections = built.leftovers()
        if sessions or connections:
            return Counts(error=f"left {sessions} sessions and {connections} connections")
        counts.routes[route] = Count(
            tracer.frames / TRACED,
            tracer.bytecodes / TRACED,
            by_function={where: n / TRACED for where, n in tracer.by_function.items()},
        )
    return counts


def _collected(batch: Callable[[], None]) -> None:
    """Run ``batch`` inside ``functools.reduce``: callgrind collects only in there."""
    functools.reduce(lambda _first, _second: batch(), (0, 0))


def machine_child(key: str, route: str, database: Path) -> int:
    """The process callgrind runs: one variant, one route."""
    variant = next(v for v in VARIANTS if v.key == key)
    built = _build(variant, database)
    if isinstance(built, str):
        print(built, file=sys.stderr)
        return 1
    _serve(built, variant, route, MACHINE_WARM_UP, MACHINE, _collected)
    return 0


def machine_count(key: str, route: str, database: Path, seed: int) -> float | None:
    """Machine instructions per request, or ``None`` if callgrind did not report them."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--toggle-collect=functools_reduce",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        key,
        route,
        str(database),
    ]
    env = {**os.environ, "PYTHONHASHSEED": str(seed)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or found is None:
        print(f"callgrind failed for {key} {route}: {done.stderr[-500:]}", file=sys.stderr)
        return None
    return int(found.group(1)) / MACHINE


def report(counts: dict[str, Counts], machine: bool, seeds: tuple[int, ...] = SEEDS) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Work per request, counted",
        "",
        f"{now}, sessionmw at {sessionmw_revision()}, `python benchmarks/work.py`. "
        f"CPython {platform.python_version()}, one SQLite file, the variants of part 1.",
        "",
        f"**bytecodes**: Python bytecode instructions executed per request in the thread "
        f"that serves it ({TRACED} requests under `sys.settrace`); work inside C functions "
        "is not in them. **frames**: Python frames entered per request (calls, and "
        "resumptions of coroutines and generators). **machine**: every machine instruction "
        f"of the process per request, Python, C and SQLite alike ({MACHINE} requests under "
        f"callgrind, the median of runs with PYTHONHASHSEED {', '.join(map(str, seeds))}), "
        "except those of other threads (aiosqlite's). **+ over "
        "bare**: the difference from the framework's bare row, what the session machinery "
        "adds. **x hand-written**: the ratio to the hand-written row of the same flavor. "
        "Every request is counted after a warm-up, a collection and `gc.freeze()`, and the "
        "same code counts the same. Machine instructions also follow the process's memory "
        "layout: four hash seeds spread Flask's hand-written one-query row over 0.9% and "
        "Starlette's bare no-DB row over 0.3%, hence the median over seeds. A difference "
        "of 1% or less between rows may be layout, not code.",
        "",
    ]
    if not machine:
        lines += ["Machine instructions: not counted (no `valgrind` on this machine).", ""]
    for group in ("Starlette", "FastAPI", "Flask"):
        lines += _group_table(group, counts, machine)
    return "\n".join(lines)


def _cost(count: Count, machine: bool) -> float:
    return count.machine if machine and count.machine is not None else count.bytecodes


def _group_table(group: str, counts: dict[str, Counts], machine: bool) -> list[str]:
    rows = [v for v in VARIANTS if v.group == group]
    bare = counts[next(v.key for v in rows if v.role == "bare")].routes[NO_DB]
    providers = [v for v in rows if v.role in ("sessionmw", "peer") and not counts[v.key].error]
    cheapest = min(
        providers, key=lambda v: _cost(counts[v.key].routes[NO_DB], machine), default=None
    )
    lines = [
        f"### {group}",
        "",
        "| variant | no DB: frames | bytecodes | + over bare | machine | + over bare "
        "| 1 query: bytecodes | machine | x hand-written |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for variant in rows:
        measured = counts[variant.key]
        label = f"**{variant.label}**" if variant.role == "sessionmw" else variant.label
        if variant is cheapest:
            label += " (cheapest provider)"
        if measured.error:
            lines.append(f"| {label} | {measured.error} |" + " |" * 8)
            continue
        none, one = measured.routes[NO_DB], measured.routes[ONE_QUERY]
        reference = reference_for(variant)
        ratio = "—"
        if variant.role == "reference":
            ratio = "1 (ref)"
        elif reference is not None and variant.role != "bare" and not counts[reference.key].error:
            theirs = counts[reference.key].routes[ONE_QUERY]
            ratio = f"{_cost(one, machine) / _cost(theirs, machine):.3f}"
        lines.append(
            f"| {label} | {none.frames:,.0f} | {none.bytecodes:,.0f} "
            f"| {none.bytecodes - bare.bytecodes:+,.0f} "
            f"| {_machine(none.machine)} | {_machine(none.machine, bare.machine, plus=True)} "
            f"| {one.bytecodes:,.0f} | {_machine(one.machine)} | {ratio} |"
        )
    lines.append("")
    return lines


def _machine(value: float | None, base: float | None = 0.0, plus: bool = False) -> str:
    if value is None or base is None:
        return "—"
    return f"{value - base:+,.0f}" if plus else f"{value:,.0f}"


def print_functions(key: str, route: str) -> int:
    """Where a variant's bytecodes go beyond those of its bare row (no DB) or of its
    hand-written row (1 query), by function."""
    variant = next((v for v in VARIANTS if v.key == key), None)
    if variant is None:
        print(f"no variant {key!r}; one of: {', '.join(v.key for v in VARIANTS)}")
        return 2
    base = (reference_for(variant) if route == ONE_QUERY else None) or bare_for(variant)
    with tempfile.TemporaryDirectory() as directory:
        database = make_database(Path(directory))
        mine, theirs = trace(variant, database), trace(base, database)
    if mine.error or theirs.error:
        print(mine.error or theirs.error)
        return 1
    a, b = mine.routes[route], theirs.routes[route]
    places = {*a.by_function, *b.by_function}
    extra = {w: a.by_function.get(w, 0) - b.by_function.get(w, 0) for w in places}
    print(f"{variant.name} minus {base.name}, {route}:")
    for where, n in sorted(extra.items(), key=lambda item: -abs(item[1])):
        if abs(n) >= 0.5:
            print(f"{n:+8.1f}  {where}")
    print(f"{a.bytecodes - b.bytecodes:+8.1f}  in all")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "work.md")
    parser.add_argument(
        "--functions",
        metavar="KEY",
        help="only print, by function, where a variant's bytecodes go beyond its bare "
        "row's (KEY as in variants.py, e.g. flask-sessionmw)",
    )
    parser.add_argument(
        "--route",
        choices=ROUTES,
        default=NO_DB,
        help=f"with --functions: {ONE_QUERY} compares with the hand-written row instead",
    )
    parser.add_argument("--no-machine", action="store_true", help="skip callgrind")
    parser.add_argument(
        "--seeds",
        type=lambda text: tuple(int(seed) for seed in text.split(",")),
        default=SEEDS,
        help=f"hash seeds of the callgrind runs, e.g. 0,1,2 (default {','.join(map(str, SEEDS))})",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        key, route, database = args.child
        return machine_child(key, route, Path(database))
    if args.functions:
        return print_functions(args.functions, args.route)
    machine = not args.no_machine and shutil.which("valgrind") is not None
    # The same path every run: the database's URL is a string that SQLAlchemy hashes.
    directory = Path(tempfile.gettempdir()) / "sessionmw-work"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    try:
        database = make_database(directory)
        counts = {v.key: trace(v, database) for v in VARIANTS}
        if machine:
            cells = [(v.key, r) for v in VARIANTS if not counts[v.key].error for r in ROUTES]
            jobs = [(key, route, seed) for key, route in cells for seed in args.seeds]
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                found = list(pool.map(lambda job: machine_count(*job[:2], database, job[2]), jobs))
            for key, route in cells:
                values = [
                    value
                    for job, value in zip(jobs, found, strict=True)
                    if job[:2] == (key, route) and value is not None
                ]
                counts[key].routes[route].machine = statistics.median(values) if values else None
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    for variant in VARIANTS:
        measured = counts[variant.key]
        figures = "  ".join(
            f"{route} {c.bytecodes:7.0f} {c.machine or 0:10.0f}"
            for route, c in measured.routes.items()
        )
        print(f"{variant.name:55s} {figures}{measured.error}")
    args.out.write_text(report(counts, machine, args.seeds))
    raw = {
        key: {
            "error": value.error,
            **{r: [c.frames, c.bytecodes, c.machine] for r, c in value.routes.items()},
        }
        for key, value in counts.items()
    }
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
