"""Record a shape's steps, replay it with a fault at each one, check the invariants.

The harness is the server: it calls the middleware with raw ASGI messages (or a raw
WSGI environ and its own ``start_response``), plays the client, and decides what the
client saw.  A run is bounded by a timeout; after it the invariants are read from the
database, the pools and the registries (:func:`check`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import io
import os
import random
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from tests.faults.probe import (
    APP_ERROR,
    CANCEL,
    CANCEL_SCOPE,
    DB_ERROR,
    DISCONNECT,
    EARLY_CLOSE,
    INVALIDATE,
    InjectedAppError,
    Probe,
    Step,
    current_probe,
    faults_at,
    step,
)
from tests.faults.shapes import Run, Shape, current_run
from tests.faults.world import World

#: Seconds a run may take before it counts as hung.
TIMEOUT = 10.0
#: Runs per (shape, session kind) on PostgreSQL, unless the whole space is asked for.
PG_SAMPLE = 10
FULL_ENV = "SESSIONMW_FAULTS_FULL"
SEED_ENV = "SESSIONMW_FAULTS_SEED"
#: Print each recorded step list and each run with its problems, to stderr.
TRACE_ENV = "SESSIONMW_FAULTS_TRACE"


# -- what the client saw --------------------------------------------------------------


@dataclass
class Outcome:
    run: Run
    #: The status the client received (the server's own 500 when the app failed
    #: before starting a response); ``None``: it got none.
    status: int | None = None
    escaped: str | None = None
    hung: bool = False
    #: How many steps were recorded when the client had the whole response.
    completed_at: int | None = None
    #: SQLAlchemy's graceful closes of terminated aiosqlite connections left pending.
    abandoned_closes: int = 0


class _Client:
    """What both clients share: the status they got, and leaving at any moment."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.gone = False
        self.changed = asyncio.Event()

    def leave(self) -> None:
        self.gone = True
        self.changed.set()

    async def wait_until(self, done: Callable[[], bool]) -> None:
        """Until the client leaves or ``done()``: what a server's receive waits for."""
        while not (self.gone or done()):
            self.changed.clear()
            await self.changed.wait()


class HttpClient(_Client):
    """Sends an empty body, reads the response; may leave after some body chunks."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.pending: list[dict[str, Any]] = [
            {"type": "http.request", "body": b"", "more_body": False}
        ]
        self.abandon_after = shape.abandon_after
        self.chunks = 0
        self.complete = False

    async def receive(self) -> dict[str, Any]:
        if self.pending and not self.gone:
            return self.pending.pop(0)
        await self.wait_until(lambda: self.complete)
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.gone:
            raise OSError("the client has gone")
        if message["type"] == "http.response.start":
            assert self.status is None, "a second http.response.start"
            self.status = message["status"]
            return
        assert message["type"] == "http.response.body"
        assert self.status is not None
        assert not self.complete, "a body message after the last one"
        self.chunks += 1
        if not message.get("more_body", False):
            self.complete = True
            self.changed.set()
        elif self.abandon_after is not None and self.chunks >= self.abandon_after:
            self.leave()


class WebSocketClient(_Client):
    """Connects, sends one message, waits for the answer, closes normally."""

    def __init__(self) -> None:
        super().__init__()
        self.script = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hi"}]
        self.answered = False
        self.closed = False

    async def receive(self) -> dict[str, Any]:
        if self.gone:
            return {"type": "websocket.disconnect", "code": 1006}
        if self.script:
            return self.script.pop(0)
        await self.wait_until(lambda: self.answered or self.closed)
        return {"type": "websocket.disconnect", "code": 1006 if self.gone else 1000}

    async def send(self, message: dict[str, Any]) -> None:
        if self.gone or self.closed:
            raise OSError("the client has gone")
        if message["type"] == "websocket.accept":
            self.status = 101
        elif message["type"] == "websocket.send":
            self.answered = True
        elif message["type"] == "websocket.close":
            self.closed = True
        self.changed.set()


def _asgi_scope(shape: Shape) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": shape.kind,
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws" if shape.kind == "websocket" else "http",
        "path": f"/{shape.name}",
        "raw_path": f"/{shape.name}".encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    if shape.kind == "http":
        scope["method"] = "POST"
    else:
        scope["subprotocols"] = []
    return scope


# -- the ASGI server ------------------------------------------------------------------


def wrap_asgi(app: Any) -> Any:
    """The inner app, its call and its return each a step."""

    async def probed(scope: Any, receive: Any, send: Any) -> None:
        probe = current_probe.get()
        assert probe is not None
        run = current_run.get()

        async def app_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                run.app_status = message["status"]
            await send(message)

        await probe.ahit("app")
        await app(scope, receive, app_send)
        run.app_returned = True
        run.done_at = len(probe.steps)
        await probe.ahit("app_return")

    return probed


async def serve_asgi(
    world: World,
    probe: Probe,
    run: Run | None = None,
    timeout: float | None = TIMEOUT,  # noqa: ASYNC109 - the harness bounds the run
    alone: bool = True,
) -> Outcome:
    """One request, start to end, with the harness as server and client.  ``alone``:
    no other request runs meanwhile, so every task started since is this request's."""
    shape = world.shape
    client: Any = WebSocketClient() if shape.kind == "websocket" else HttpClient(shape)
    run = run or Run()
    outcome = Outcome(run)

    async def receive() -> dict[str, Any]:
        fault = await probe.ahit("receive")
        if fault == DISCONNECT:
            client.leave()
        message: dict[str, Any] = await client.receive()
        if fault == APP_ERROR:
            raise InjectedAppError(f"the app failed after receiving {message['type']}")
        return message

    async def send(message: dict[str, Any]) -> None:
        fault = await probe.ahit(f"send:{message['type']}")
        if fault == DISCONNECT:
            client.leave()
        await client.send(message)
        if outcome.completed_at is None and getattr(client, "complete", False):
            outcome.completed_at = len(probe.steps)
        if fault == APP_ERROR:
            raise InjectedAppError(f"the app failed after sending {message['type']}")

    async def request() -> None:
        current_probe.set(probe)
        current_run.set(run)
        with anyio.CancelScope() as scope:
            probe.bind_task(scope)
            try:
                await world.app(_asgi_scope(shape), receive, send)
            finally:
                probe.ended = True
        if scope.cancelled_caught:
            outcome.escaped = "cancelled by its cancel scope"

    before = asyncio.all_tasks()
    task = asyncio.ensure_future(request())
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        outcome.hung = True
        task.cancel()
        await asyncio.wait({task}, timeout=TIMEOUT)
    # Tasks the request started and left running (asyncio.gather does not wait for the
    # other children once one has failed): their child scopes end when they do.
    strays = asyncio.all_tasks() - before - {asyncio.current_task()} if alone else set()
    graceful = {t for t in strays if is_graceful_close(t)}
    if graceful:
        # SQLAlchemy's attempt to close an aiosqlite connection terminated by a
        # cancellation: it waits for a thread that was stopped, and never ends.
        strays -= graceful
        outcome.abandoned_closes = len(graceful)
    if strays:
        _, still = await asyncio.wait(strays, timeout=timeout)
        outcome.hung = outcome.hung or bool(still)
    if task.done() and outcome.escaped is None:
        if task.cancelled():
            outcome.escaped = "CancelledError"
        elif task.exception() is not None:
            outcome.escaped = repr(task.exception())
            if client.status is None and not client.gone:
                client.status = 500  # what the server answers for an app that failed
    outcome.status = client.status
    return outcome


def is_graceful_close(task: asyncio.Task[Any]) -> bool:
    return "_terminate_graceful_close" in getattr(task.get_coro(), "__qualname__", "")


# -- the WSGI server ------------------------------------------------------------------


class _ProbedBody:
    """The app's response iterable, each ``next`` and its ``close`` a step."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.chunks = iter(body)

    def __iter__(self) -> _ProbedBody:
        return self

    def __next__(self) -> bytes:
        step("app", "next")
        return next(self.chunks)  # type: ignore[no-any-return]

    def close(self) -> None:
        try:
            step("app", "close")
        finally:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
            _app_done()


def _app_done() -> None:
    probe = current_probe.get()
    if probe is not None:
        current_run.get().done_at = len(probe.steps)


def wrap_wsgi(app: Any) -> Any:
    def probed(environ: dict[str, Any], start_response: Any) -> Any:
        step("app", "call")

        def app_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            step("app", "start_response")
            current_run.get().app_status = int(status[:3])
            return start_response(status, headers, exc_info)

        body = app(environ, app_start_response)
        if isinstance(body, list):
            _app_done()  # no app code runs after a list
            return body
        return _ProbedBody(body)

    return probed


def _environ() -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_LENGTH": "0",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def serve_wsgi(world: World, probe: Probe, run: Run | None = None) -> Outcome:
    """One request the way a WSGI server makes it: call, iterate, close.  The status
    reaches the client with the first non-empty chunk (or the end of the body)."""
    run = run or Run()
    outcome = Outcome(run)
    current_probe.set(probe)
    current_run.set(run)
    pending: list[str] = []
    gone: list[bool] = []

    def send_headers() -> None:
        if outcome.status is None and pending and not gone:
            outcome.status = int(pending[-1][:3])

    def fail(reason: str) -> None:
        """What the server sees when the client went away: an OSError, no response."""
        gone.append(True)
        raise OSError(reason)

    def write(data: bytes) -> None:
        if step("server", "write") == DISCONNECT:
            fail("the client has gone")
        send_headers()

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        if step("server", "start_response") == DISCONNECT:
            fail("the client has gone")
        if exc_info is not None and outcome.status is not None:
            raise exc_info[1].with_traceback(exc_info[2])
        pending.append(status)
        return write

    try:
        body = world.app(_environ(), start_response)
    except Exception as exc:
        outcome.escaped = repr(exc)
        if outcome.status is None and not gone:
            outcome.status = 500  # the server's own error page
        probe.ended = True
        return outcome
    chunks = 0
    try:
        iterator = iter(body)
        while True:
            if step("server", "next") == EARLY_CLOSE:
                break
            try:
                chunk = next(iterator)
            except StopIteration:
                send_headers()
                outcome.completed_at = len(probe.steps)
                break
            if chunk:
                send_headers()
                chunks += 1
                if world.shape.abandon_after is not None and chunks >= world.shape.abandon_after:
                    break
    except Exception as exc:
        outcome.escaped = repr(exc)
        if outcome.status is None and not gone:
            outcome.status = 500
    finally:
        close = getattr(body, "close", None)
        try:
            if close is not None:
                close()
        except Exception as exc:
            outcome.escaped = outcome.escaped or repr(exc)
        probe.ended = True
    return outcome


# -- the invariants -------------------------------------------------------------------


def check(world: World, probe: Probe, outcome: Outcome) -> list[str]:
    """Every lifecycle invariant, read from the database, the pools and the registries."""
    return check_world(world) + check_request(world, probe, outcome, world.rows())


def check_world(world: World) -> list[str]:
    """What no request may leave behind: Sessions, connections, transactions."""
    problems: list[str] = []
    if world.registries():
        problems.append(f"registry not empty: {world.registries()} Session(s) left")
    if world.checked_out():
        problems.append(f"pool: {world.checked_out()} connection(s) still checked out")
    problems.extend(world.leftovers())
    return problems


def check_request(world: World, probe: Probe, outcome: Outcome, rows: Counter[str]) -> list[str]:
    """What the client saw against what the database holds, for one request."""
    shape = world.shape
    run = outcome.run
    problems: list[str] = []
    if outcome.hung:
        problems.append(f"hang: the request did not finish within {TIMEOUT:.0f} s")
    if probe.late_sessions:
        problems.append(f"a Session was created after the request ended ({probe.late_sessions})")
    present = {n for n in rows if rows[n]}

    def kept(name: str) -> bool:
        return run.row(name) in present

    twice = sorted(n for n, count in rows.items() if count > 1 and n.startswith(run.tag))
    if twice:
        problems.append(f"rows written twice: {twice}")
    status = outcome.status
    if shape.kind == "http" and status is not None:
        if 200 <= status < 300:
            missing = [n for n in (*shape.auto, *shape.manual) if not kept(n)]
            if missing:
                problems.append(f"{status} sent but {missing} not in the database")
        elif status >= 400:
            partial = shape.partial if not world.twophase else ()
            left = [n for n in shape.auto if kept(n) and n not in partial]
            if left:
                problems.append(f"{status} sent but {left} committed")
    if shape.kind == "websocket":
        for name in shape.auto:
            if kept(name) and not run.app_returned:
                problems.append(f"{name} committed though the websocket app failed")
            if run.app_returned and outcome.escaped is None and not kept(name):
                problems.append(f"the websocket ended normally but {name} was not committed")
    fired = probe.fired
    if (
        outcome.escaped is not None
        and fired is not None
        and probe.fault in (DB_ERROR, INVALIDATE)
        and outcome.completed_at is not None
        and not shape.after  # no work of the app's own after the response
        and probe.steps.index(fired) >= outcome.completed_at
    ):
        problems.append(
            f"the response was complete, then a database failure at {fired} reached the "
            f"server: {outcome.escaped}"
        )
    if (
        shape.commit == "manual"  # the middleware settles nothing: the app's answer stands
        and fired is not None
        and probe.fault in (DB_ERROR, INVALIDATE)
        and run.done_at is not None
        and run.app_status is not None
        and probe.steps.index(fired) >= run.done_at
        and status not in (None, run.app_status)
    ):
        problems.append(
            f"the app answered {run.app_status} and was done, then a database failure at "
            f"{fired} turned that into {status}"
        )
    lost = sorted(n for n in run.confirmed if not kept(n))
    if lost:
        problems.append(f"the app's commit of {lost} returned but the rows are missing")
    for name in shape.callbacks:
        ran = run.callbacks[name]
        if ran > 1:
            problems.append(f"on_commit callback of {name} ran {ran} times")
        if bool(ran) != kept(name):
            state = "ran" if ran else "did not run"
            row = "is missing" if ran else "was committed"
            problems.append(f"on_commit callback of {name} {state} but its row {row}")
    return problems


def baseline_problems(world: World, outcome: Outcome) -> list[str]:
    """The recording run, with no fault, must end the way the shape says."""
    if outcome.escaped is not None:
        return [f"without a fault the request failed: {outcome.escaped}"]
    if outcome.status != world.shape.status:
        return [f"without a fault the status was {outcome.status}, not {world.shape.status}"]
    return []


@dataclass(frozen=True)
class Known:
    """A failure outside the middleware, seen by the harness: counted, not a violation."""

    where: str
    faults: frozenset[str]
    problem: str
    why: str

    def matches(self, where: str, step: Step, fault: str, problem: str) -> bool:
        return (
            where.startswith(self.where)
            and step.kind == "db"
            and fault in self.faults
            and problem.startswith(self.problem)
        )


KNOWN = (
    Known(
        "asgi/async/sqlite",
        frozenset({CANCEL, CANCEL_SCOPE}),
        "the database",
        "SQLAlchemy terminates an aiosqlite connection whose statement was cancelled: it "
        "stops aiosqlite's thread, and the graceful close it started in a task may wait "
        "for that thread forever, holding the sqlite3 connection open with its lock",
    ),
)


# -- exploring the space --------------------------------------------------------------


@dataclass
class Violation:
    where: str
    step: Step | None
    fault: str | None
    problems: list[str]

    def __str__(self) -> str:
        at = f"at {self.step} with {self.fault}" if self.step else "without a fault"
        return f"{self.where} {at}: " + "; ".join(self.problems)


@dataclass
class Report:
    where: str
    steps: list[Step] = field(default_factory=list)
    runs: int = 0
    unreached: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    #: Runs that showed only a failure outside the middleware (:data:`KNOWN`).
    known: int = 0


@dataclass
class Totals:
    """Every run of this pytest process, for the terminal summary."""

    shapes: set[str] = field(default_factory=set)
    steps: int = 0
    faults: set[str] = field(default_factory=set)
    runs: int = 0
    unreached: int = 0
    violations: int = 0
    known: int = 0
    by_backend: dict[str, int] = field(default_factory=dict)

    def add(self, report: Report, shape: Shape, backend: str, faults: set[str]) -> None:
        self.shapes.add(shape.name)
        self.steps += len(report.steps)
        self.faults |= faults
        self.runs += report.runs
        self.unreached += len(report.unreached)
        self.violations += len(report.violations)
        self.known += report.known
        self.by_backend[backend] = self.by_backend.get(backend, 0) + report.runs


TOTALS = Totals()


def plan(steps: list[Step], protocol: str, sample: int | None, seed: str) -> list[tuple[Step, str]]:
    """Every (step, fault) pair, or a seeded sample of them."""
    space = [(s, f) for s in steps for f in faults_at(s, protocol)]
    if sample is None or len(space) <= sample:
        return space
    chosen = set(random.Random(seed).sample(range(len(space)), sample))
    return [pair for index, pair in enumerate(space) if index in chosen]


def sample_size(backend: str) -> int | None:
    """All of the space on SQLite; a seeded sample on PostgreSQL unless asked for all."""
    if backend == "sqlite" or os.environ.get(FULL_ENV) == "1":
        return None
    return PG_SAMPLE


def seed() -> str:
    return os.environ.get(SEED_ENV, "0")


async def _serve_wsgi_in(pool: concurrent.futures.Executor, world: World, probe: Probe) -> Outcome:
    """A WSGI run in a thread of ``pool``, bounded by a timeout like an ASGI run."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    future = loop.run_in_executor(pool, context.run, serve_wsgi, world, probe)
    try:
        return await asyncio.wait_for(asyncio.shield(future), TIMEOUT)
    except asyncio.TimeoutError:
        return Outcome(Run(), hung=True)


async def explore(world: World, backend: str) -> Report:
    """Record the shape's steps, then replay it with each fault at each step (or a
    seeded sample of them), checking every invariant after every run."""
    protocol = world.protocol
    kind = "async" if world.is_async else "sync"
    report = Report(f"{protocol}/{kind}/{backend} {world.shape.name}")
    wrap = wrap_asgi if protocol == "asgi" else wrap_wsgi
    pool = concurrent.futures.ThreadPoolExecutor(1)

    async def serve(probe: Probe) -> Outcome:
        if protocol == "asgi":
            return await serve_asgi(world, probe)
        return await _serve_wsgi_in(pool, world, probe)

    pairs: list[tuple[Step, str]] = []
    world.build(wrap, {})
    try:
        await world.reset()
        recorder = Probe(protocol)
        outcome = await serve(recorder)
        report.steps = recorder.steps
        if os.environ.get(TRACE_ENV):
            print("STEPS", " ".join(map(str, recorder.steps)), file=sys.stderr)
        problems = baseline_problems(world, outcome) + check(world, recorder, outcome)
        problems += await world.reset()
        if problems:
            report.violations.append(Violation(report.where, None, None, problems))
            return report
        pairs = plan(recorder.steps, protocol, sample_size(backend), f"{seed()}:{report.where}")
        for target, fault in pairs:
            probe = Probe(protocol, target, fault)
            outcome = await serve(probe)
            report.runs += 1
            if probe.fired is None:
                report.unreached.append(f"{target} {fault}")
            problems = check(world, probe, outcome) + await world.reset()
            if os.environ.get(TRACE_ENV):
                print("RUN", target, fault, outcome.abandoned_closes, problems, file=sys.stderr)
            known = [
                p for p in problems if any(k.matches(report.where, target, fault, p) for k in KNOWN)
            ]
            report.known += bool(known)
            if known:
                await world.relocate()
            problems = [p for p in problems if p not in known]
            if not problems:
                continue
            report.violations.append(Violation(report.where, target, fault, problems))
            if outcome.hung:  # its thread may never come back
                pool.shutdown(wait=False)
                pool = concurrent.futures.ThreadPoolExecutor(1)
            del outcome, probe
            await world.close()
            world.scrub()
            world.build(wrap, {})
            stuck = await world.reset()
            if stuck:
                report.violations.append(
                    Violation(report.where, target, fault, ["left for good: " + "; ".join(stuck)])
                )
                break
    finally:
        await world.close()
        pool.shutdown(wait=False)
        TOTALS.add(report, world.shape, backend, {f for _, f in pairs})
    return report


def describe(report: Report) -> str:
    lines = [
        f"{report.where}: {len(report.steps)} steps, {report.runs} runs, "
        f"{len(report.violations)} violations, {report.known} known, "
        f"{len(report.unreached)} not reached"
    ]
    lines += [f"  VIOLATION {v}" for v in report.violations]
    return "\n".join(lines)
