"""Promises that only a real server can break, each checked through one.

1. Litestar on uvicorn: sync ``Stream`` bodies whose clients go away leave no Session and no
   connection behind; the generator's thread, still running after its request ended, gets
   ``NoRequestScopeError`` instead of a fresh Session nobody removes.
2. gunicorn: a file returned through ``environ["wsgi.file_wrapper"]`` still goes out with
   ``sendfile()`` behind the middleware, and its session is settled and removed.
3. Two PostgreSQL databases behind two stacked middlewares, ``twophase=True``: a commit that
   fails in either database leaves no write in the other (uvicorn + Starlette, gunicorn +
   Flask), no prepared transaction and no connection idle in transaction.
4. The WSGI commit point, on wsgiref's and Werkzeug's servers: a request that fails after
   ``start_response`` and before its first chunk rolls back; ``start_response`` only records.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx
import pytest
from sqlalchemy import Engine, create_engine, func, make_url, select, text
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

import sessionmw
from tests.conftest import Tracker, assert_clean, user_names
from tests.models import Base, User
from tests.promise_apps import (
    APPLICATION_NAME,
    FAILING_VARIANTS,
    SUCCEEDING_VARIANTS,
    PromiseBase,
    Row,
    commit_point_app,
)
from tests.promise_litestar import StreamProbe, litestar_stream_app
from tests.servers import answering, free_port, uvicorn_server, wait_until, werkzeug_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _settles(check: Any, timeout: float) -> bool:
    """``wait_until`` that answers instead of raising, so the assertion can say what it saw."""
    try:
        wait_until(check, timeout=timeout)
    except AssertionError:
        return False
    return True


@contextmanager
def server_process(command: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[str]:
    """A server in a process of its own, up once ``/_state`` answers; its output goes to ``log``."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONPATH": pythonpath},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"

    with answering(process, base, log) as url:
        yield url


def drained(base: str) -> dict[str, int]:
    """The server's registry and pool, once they are empty or after 10 s of waiting."""
    seen: dict[str, int] = {}

    def empty() -> bool:
        seen.update(httpx.get(f"{base}/_state", timeout=5).json())
        return seen == {"registry": 0, "checkedout": 0}

    _settles(empty, timeout=10)
    return seen


# --- 1. Litestar on uvicorn: abandoned sync streams ------------------------------------------

CLIENTS = 5


async def _abandon_streams(base: str, probe: StreamProbe) -> list[bytes]:
    """Each client reads the first chunk of its stream, then hangs up, once the generator's
    thread is busy with the next chunk (which waits for the request to end before it touches
    the session): hanging up before that hand-over would leave no code running after it."""

    async def one(n: int) -> bytes:
        name = f"c{n}"
        async with (
            httpx.AsyncClient(base_url=base, timeout=10) as client,
            client.stream("GET", "/stream", params={"name": name}) as response,
        ):
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                handed_over = await asyncio.to_thread(probe.event("waiting", name).wait, 10)
                assert handed_over, f"{name}: the next chunk never went to a worker thread"
                return chunk
        raise AssertionError("the stream ended before its first chunk")

    return await asyncio.gather(*(one(n) for n in range(CLIENTS)))


def test_litestar_sync_streams_abandoned_on_uvicorn_leave_no_session(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'litestar.db'}")
    Session: Any = sessionmw.request_scoped(sessionmaker(bind=engine))
    probe = StreamProbe()

    def late_steps() -> list[tuple[str, int, BaseException | None]]:
        return [step for step in list(probe.steps) if step[1] >= 1]

    try:
        with uvicorn_server(litestar_stream_app(Session, probe)) as base:
            first = asyncio.run(_abandon_streams(base, probe))
            assert all(chunk.startswith(b"chunk 0") for chunk in first), first
            # Each generator's thread takes its next step only after its request has ended.
            wait_until(
                lambda: len(late_steps()) >= CLIENTS,
                what="every abandoned generator to take its step after its request ended",
            )
            clean = _settles(
                lambda: not Session.registry.registry and engine.pool.checkedout() == 0,
                timeout=2,
            )
            left = (len(Session.registry.registry), engine.pool.checkedout())
            assert clean, (
                f"{left[0]} Sessions in the registry and {left[1]} connections checked out "
                f"after {CLIENTS} abandoned streams: the generators' threads made new "
                f"Sessions for requests that had ended"
            )
            errors = [exc for _, _, exc in late_steps()]
            assert all(isinstance(exc, sessionmw.NoRequestScopeError) for exc in errors), errors
            message = str(errors[0])
            assert "ended" in message, message
            assert "request_scope(" in message, message
    finally:
        registry = Session.registry.registry
        for session in list(registry.values()):  # what today's code leaks: no SAWarning later
            session.close()
        registry.clear()
        engine.dispose()


# --- 2. gunicorn: sendfile through wsgi.file_wrapper -----------------------------------------

#: gunicorn's config (``-c``): its worker records every os.sendfile() call, one line each.
GUNICORN_RECORDS_SENDFILE = '''
import os


def post_fork(server, worker):
    """Record every os.sendfile() call of this worker in $SENDFILE_LOG (socket.sendfile uses it)."""
    real_sendfile = os.sendfile
    log_path = os.environ["SENDFILE_LOG"]

    def recording_sendfile(*args, **kwargs):
        sent = real_sendfile(*args, **kwargs)
        with open(log_path, "a") as log:
            log.write(f"{sent}\\n")
        return sent

    os.sendfile = recording_sendfile
'''


class SendfileServer:
    def __init__(self, base: str, sendfile_log: Path, content: bytes, engine: Engine) -> None:
        self.base = base
        self.sendfile_log = sendfile_log
        self.content = content
        self.engine = engine

    def sendfile_calls(self) -> int:
        if not self.sendfile_log.exists():
            return 0
        return len(self.sendfile_log.read_text().splitlines())

    def get(self, path: str, **params: str) -> tuple[int, bytes, int]:
        """Status, body and how many os.sendfile() calls the worker made for it."""
        before = self.sendfile_calls()
        response = httpx.get(f"{self.base}{path}", params=params, timeout=10)
        # The sync worker serves one request at a time: once /_state answers, the file's
        # request has finished, its sendfile calls recorded.
        httpx.get(f"{self.base}/_state", timeout=5)
        return response.status_code, response.content, self.sendfile_calls() - before


@pytest.fixture(scope="module")
def sendfile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SendfileServer]:
    directory = tmp_path_factory.mktemp("sendfile")
    content = os.urandom(300_000)
    (directory / "payload.bin").write_bytes(content)
    (directory / "gunicorn_conf.py").write_text(GUNICORN_RECORDS_SENDFILE)
    url = f"sqlite:///{directory / 'sendfile.db'}"
    engine = create_engine(url, poolclass=NullPool)
    Base.metadata.create_all(engine)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        str(directory / "gunicorn_conf.py"),
        "-w",
        "1",
        "-k",
        "sync",
        "-b",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "tests.promise_apps:sendfile_app()",
    ]
    env = {
        "DATABASE_URL": url,
        "SENDFILE_PATH": str(directory / "payload.bin"),
        "SENDFILE_LOG": str(directory / "sendfile.log"),
    }
    with server_process(command, env, port, directory / "gunicorn.log") as base:
        yield SendfileServer(base, directory / "sendfile.log", content, engine)
    engine.dispose()


def test_gunicorn_sends_a_file_wrapper_with_sendfile_without_middleware(
    sendfile_server: SendfileServer,
) -> None:
    """The control: this gunicorn, this config, this file do go out through sendfile()."""
    status, body, calls = sendfile_server.get("/bare/file")
    assert (status, body == sendfile_server.content) == (200, True)
    assert calls > 0, "gunicorn did not use sendfile even without the middleware"


@pytest.mark.parametrize("path", ["/plain/file", "/flask/file"])
def test_gunicorn_sends_a_file_wrapper_with_sendfile_through_the_middleware(
    sendfile_server: SendfileServer, path: str
) -> None:
    name = f"download{path.replace('/', '-')}"
    status, body, calls = sendfile_server.get(path, name=name)
    state = drained(sendfile_server.base)
    observed = {
        "status": status,
        "body is the file": body == sendfile_server.content,
        "server state": state,
    }
    assert observed == {
        "status": 200,
        "body is the file": True,
        "server state": {"registry": 0, "checkedout": 0},
    }
    assert calls > 0, (
        f"gunicorn did not use sendfile for {path} behind WSGISessionMiddleware "
        f"(os.sendfile calls: {calls}): the middleware hid the wsgi.file_wrapper"
    )
    if path == "/flask/file":  # commit="on_success": the write before the file is kept
        assert name in user_names(sendfile_server.engine)


# --- 3. Two PostgreSQL databases, stacked middlewares, two-phase commit ----------------------

BAD_REQUESTS = 100
GOOD_REQUESTS = 20
CONCURRENCY = 10


async def _post_all(base: str, paths: list[str]) -> list[int]:
    """POST each path, ``CONCURRENCY`` at a time, each on a connection of its own: a server
    closes the connection after an app that raised, which a reused connection would see as
    an error instead of the status."""
    limits = httpx.Limits(max_connections=CONCURRENCY)
    headers = {"Connection": "close"}
    async with httpx.AsyncClient(
        base_url=base, timeout=30, limits=limits, headers=headers
    ) as client:
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def one(path: str) -> int:
            async with semaphore:
                return (await client.post(path)).status_code

        return await asyncio.gather(*(one(p) for p in paths))


def _tags(engine: Engine, prefix: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(select(Row.tag).where(Row.tag.startswith(prefix))))


def _pg_leftovers(engine: Engine, databases: list[str]) -> dict[str, int]:
    """Prepared transactions, and the app's connections idle in transaction, in ``databases``."""
    with engine.connect() as conn:
        prepared = conn.scalar(
            text("select count(*) from pg_prepared_xacts where database = any(:dbs)"),
            {"dbs": databases},
        )
        idle = conn.scalar(
            text(
                "select count(*) from pg_stat_activity where application_name = :app "
                "and datname = any(:dbs) and state like 'idle in transaction%'"
            ),
            {"app": APPLICATION_NAME, "dbs": databases},
        )
    return {"prepared transactions": int(prepared or 0), "idle in transaction": int(idle or 0)}


def _roll_back_prepared(url: str) -> None:
    """Leave no prepared transaction behind: the database could not be dropped."""
    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        gids = conn.scalars(
            text("select gid from pg_prepared_xacts where database = current_database()")
        ).all()
        for gid in gids:
            conn.execute(text(f"ROLLBACK PREPARED '{gid}'"))
    admin.dispose()


def _two_db_command(server: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "tests.promise_apps:two_db_starlette_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-w",
        "1",
        "-k",
        "gthread",
        "--threads",
        str(CONCURRENCY),
        "-b",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "tests.promise_apps:two_db_flask_app()",
    ]


@pytest.mark.parametrize("failing", ["outer", "inner"])
@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_two_databases_commit_together_or_not_at_all(
    pg_url: str, second_pg_url: str, tmp_path: Path, server: str, failing: str
) -> None:
    """db_a's middleware is the outer one, db_b's the inner one; ``failing`` picks whose
    deferred foreign key fails at commit. Either way neither database keeps the request's row.

    (Before the fix the inner middleware committed first: a failing outer database left every
    row in the inner one. A failing inner database happened to roll the outer one back.)"""
    urls = {"a": pg_url, "b": second_pg_url}
    engines = {name: create_engine(url, poolclass=NullPool) for name, url in urls.items()}
    for engine in engines.values():
        PromiseBase.metadata.create_all(engine)
    databases = [str(make_url(url).database) for url in urls.values()]
    fail = "a" if failing == "outer" else "b"
    port = free_port()
    env = {"DB_A_URL": pg_url, "DB_B_URL": second_pg_url, "TWOPHASE": "1"}
    try:
        with server_process(
            _two_db_command(server, port), env, port, tmp_path / "server.log"
        ) as base:
            bad = asyncio.run(
                _post_all(base, [f"/write/bad-{n}?fail={fail}" for n in range(BAD_REQUESTS)])
            )
            good = asyncio.run(
                _post_all(base, [f"/write/good-{n}?fail=" for n in range(GOOD_REQUESTS)])
            )
            state = drained(base)
            leftovers = _pg_leftovers(engines["a"], databases)  # while its connections are open
        observed = {
            "failing requests' statuses": dict(Counter(bad)),
            "failing requests' rows kept": {n: len(_tags(e, "bad-")) for n, e in engines.items()},
            "good requests' statuses": dict(Counter(good)),
            "good requests' rows kept": {n: len(_tags(e, "good-")) for n, e in engines.items()},
            "server state": state,
            **leftovers,
        }
        assert observed == {
            "failing requests' statuses": {500: BAD_REQUESTS},
            "failing requests' rows kept": {"a": 0, "b": 0},
            "good requests' statuses": {201: GOOD_REQUESTS},
            "good requests' rows kept": {"a": GOOD_REQUESTS, "b": GOOD_REQUESTS},
            "server state": {"registry": 0, "checkedout": 0},
            "prepared transactions": 0,
            "idle in transaction": 0,
        }
    finally:
        for name, engine in engines.items():
            engine.dispose()
            _roll_back_prepared(urls[name])


# --- 4. The WSGI commit point on wsgiref's and Werkzeug's servers ----------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def wsgiref_server(app: Any) -> Iterator[str]:
    """The standard library's reference server, one request at a time, in a thread."""
    server = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


SERVERS = {"wsgiref": wsgiref_server, "werkzeug": werkzeug_server}


def _serve_one(server: str, app: Any, Session: Any, name: str) -> int:
    with SERVERS[server](app) as base:
        status = httpx.get(f"{base}/write/{name}", timeout=10).status_code
        wait_until(lambda: not Session.registry.registry, what="the request's session removed")
    return status


@pytest.mark.parametrize("server", ["wsgiref", "werkzeug"])
@pytest.mark.parametrize("variant", FAILING_VARIANTS)
def test_wsgi_request_failing_before_its_first_chunk_keeps_no_row(
    Session: Any, engine: Engine, tracker: Tracker, server: str, variant: str
) -> None:
    status = _serve_one(server, commit_point_app(variant, Session), Session, "ghost")
    kept = user_names(engine)
    assert (status, kept) == (500, set()), (
        f"{variant} on {server}: answered {status} and kept {sorted(kept)}; "
        f"the commit happened in start_response, before the request had succeeded"
    )
    assert_clean(Session, engine, tracker)


@pytest.mark.parametrize("server", ["wsgiref", "werkzeug"])
@pytest.mark.parametrize("variant", SUCCEEDING_VARIANTS)
def test_wsgi_request_that_succeeds_keeps_its_row(
    Session: Any, engine: Engine, tracker: Tracker, server: str, variant: str
) -> None:
    status = _serve_one(server, commit_point_app(variant, Session), Session, "kept")
    assert (status, user_names(engine)) == (200, {"kept"})
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(User)) == 1
    assert_clean(Session, engine, tracker)
