"""One small app per framework for ``tests/test_server_matrix.py``, each served by a real
production server in a process of its own, on PostgreSQL.

Every app has the same routes, behind sessionmw's middleware with ``commit="on_success"``
and the global, request-scoped ``Session`` (a sync ``scoped_session`` over psycopg); the
ASGI apps that run on asyncio also serve the same routes under ``/a/`` with an
``async_scoped_session`` over asyncpg:

==========================  =================================================  ===========
route                       what it does                                       answer
==========================  =================================================  ===========
``GET /read``               counts the users                                   200
``POST /write/NAME``        writes user NAME                                   201, kept
``POST /write404/NAME``     writes, then answers 404                           404, gone
``POST /crash/NAME``        writes, then raises                                500, gone
``POST /commitfail/NAME``   writes a note whose deferred FK fails at COMMIT    500, gone
``GET /stream/NAME``        writes, then streams lines, a query per line       200, kept
``GET /abandon/NAME``       writes, then streams a long slow body (the client  200, kept
                            hangs up after the first chunk)
``GET /_state``             the registries' sizes and the pools' checked-out   200
                            connections
==========================  =================================================  ===========

Configured by the environment: ``DATABASE_URL`` (``postgresql+psycopg://...``),
``MATRIX_APP_NAME`` (the ``application_name`` of every connection, to find them in
``pg_stat_activity``) and ``MATRIX_ASYNC`` (``"0"``: no async session, e.g. under trio,
where asyncpg cannot run). The factories are loaded by the servers, e.g.
``uvicorn --factory tests.matrix_apps:starlette_app`` or
``gunicorn 'tests.matrix_apps:flask_app()'``; framework imports stay inside them, so a
server only imports the framework it serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import ModuleType
from typing import Any

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession as AsyncOrmSession
from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session, sessionmaker

import sessionmw
from tests.models import Note, User

#: Lines of ``/stream``: each one a query through the request's session.
STREAM_LINES = 20
#: ``/abandon``: at most this many chunks of ``ABANDON_CHUNK`` bytes, ``ABANDON_PAUSE`` s apart
#: (under a second in all when a server never notices that the client went away).
ABANDON_CHUNKS = 100
ABANDON_CHUNK = 16 * 1024
ABANDON_PAUSE = 0.004
#: A user id that never exists: the note's deferred foreign key fails at COMMIT.
MISSING_USER = 10**9

Session: scoped_session[OrmSession] = sessionmw.request_scoped(sessionmaker())
AsyncSession: async_scoped_session[AsyncOrmSession] = sessionmw.request_scoped(
    async_sessionmaker(expire_on_commit=False)
)

_engines: dict[str, Any] = {}


def stream_body() -> bytes:
    """What ``/stream`` sends, in full."""
    return "".join(f"{n}\n" for n in range(STREAM_LINES)).encode() + b"end\n"


def _configure(use_async: bool | None = None) -> bool:
    """Bind the sessions to the database (once per process); whether the async one is on."""
    if use_async is None:
        use_async = os.environ.get("MATRIX_ASYNC", "1") == "1"
    if "sync" not in _engines:
        url = os.environ["DATABASE_URL"]
        name = os.environ.get("MATRIX_APP_NAME", "sessionmw-matrix")
        pool = {"pool_size": 10, "max_overflow": 20, "pool_timeout": 10, "pool_pre_ping": True}
        engine = create_engine(url, connect_args={"application_name": name}, **pool)
        Session.session_factory.configure(bind=engine)
        _engines["sync"] = engine
        if use_async:
            aengine = create_async_engine(
                url.replace("+psycopg://", "+asyncpg://", 1),
                connect_args={"server_settings": {"application_name": name}},
                **pool,
            )
            AsyncSession.session_factory.configure(bind=aengine)
            _engines["async"] = aengine
    return "async" in _engines


def state() -> dict[str, int]:
    """What ``/_state`` answers: every registry and every pool, sync and async."""
    aengine = _engines.get("async")
    return {
        "registry": len(Session.registry.registry),
        "checkedout": _engines["sync"].pool.checkedout(),
        "async registry": len(AsyncSession.registry.registry),
        "async checkedout": aengine.sync_engine.pool.checkedout() if aengine else 0,
    }


# --- what the routes do, once for the sync session and once for the async one -----------------


def read() -> dict[str, int]:
    return {"users": Session.scalar(select(func.count()).select_from(User)) or 0}


def write(name: str) -> dict[str, str]:
    Session.add(User(name=name))
    Session.flush()
    return {"name": name}


def write_dangling(name: str) -> dict[str, str]:
    """Flushes fine; the deferred foreign key fails at COMMIT, after the view returned."""
    write(name)
    Session.add(Note(user_id=MISSING_USER, body="dangling"))
    Session.flush()
    return {"name": name}


def crash(name: str) -> None:
    write(name)
    raise RuntimeError(f"{name}: failed after writing")


def lines() -> Iterator[bytes]:
    """The body of ``/stream``: a query through the request's session per line."""
    for n in range(STREAM_LINES):
        value = Session.scalar(text("select cast(:n as integer)"), {"n": n})
        yield f"{value}\n".encode()
    yield b"end\n"


def long_body() -> Iterator[bytes]:
    """The body of ``/abandon``: long and slow, a query per chunk, so the client leaves
    while the server is still making it."""
    for n in range(ABANDON_CHUNKS):
        Session.execute(text("select 1"))
        yield bytes([48 + n % 10]) * ABANDON_CHUNK
        time.sleep(ABANDON_PAUSE)


async def aread() -> dict[str, int]:
    return {"users": await AsyncSession.scalar(select(func.count()).select_from(User)) or 0}


async def awrite(name: str) -> dict[str, str]:
    AsyncSession.add(User(name=name))
    await AsyncSession.flush()
    return {"name": name}


async def awrite_dangling(name: str) -> dict[str, str]:
    await awrite(name)
    AsyncSession.add(Note(user_id=MISSING_USER, body="dangling"))
    await AsyncSession.flush()
    return {"name": name}


async def acrash(name: str) -> None:
    await awrite(name)
    raise RuntimeError(f"{name}: failed after writing")


async def alines() -> AsyncIterator[bytes]:
    for n in range(STREAM_LINES):
        value = await AsyncSession.scalar(text("select cast(:n as integer)"), {"n": n})
        yield f"{value}\n".encode()
    yield b"end\n"


async def along_body() -> AsyncIterator[bytes]:
    for n in range(ABANDON_CHUNKS):
        await AsyncSession.execute(text("select 1"))
        yield bytes([48 + n % 10]) * ABANDON_CHUNK
        await asyncio.sleep(ABANDON_PAUSE)


def _dumps(data: Any) -> bytes:
    return json.dumps(data).encode()


# --- Starlette (uvicorn, hypercorn asyncio and trio, granian ASGI, gunicorn's ASGI worker) ----


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    use_async = _configure()

    # Plain ``def`` endpoints run in Starlette's thread pool; their bodies too.
    def s_read(request: Request) -> Response:
        return JSONResponse(read())

    def s_write(request: Request) -> Response:
        return JSONResponse(write(request.path_params["name"]), status_code=201)

    def s_write404(request: Request) -> Response:
        write(request.path_params["name"])
        return JSONResponse({"error": "not found"}, status_code=404)

    def s_crash(request: Request) -> Response:
        crash(request.path_params["name"])
        raise AssertionError("unreachable")

    def s_commitfail(request: Request) -> Response:
        return JSONResponse(write_dangling(request.path_params["name"]), status_code=201)

    def s_stream(request: Request) -> Response:
        write(request.path_params["name"])
        return StreamingResponse(lines(), media_type="text/plain")

    def s_abandon(request: Request) -> Response:
        write(request.path_params["name"])
        return StreamingResponse(long_body(), media_type="text/plain")

    async def a_read(request: Request) -> Response:
        return JSONResponse(await aread())

    async def a_write(request: Request) -> Response:
        return JSONResponse(await awrite(request.path_params["name"]), status_code=201)

    async def a_write404(request: Request) -> Response:
        await awrite(request.path_params["name"])
        return JSONResponse({"error": "not found"}, status_code=404)

    async def a_crash(request: Request) -> Response:
        await acrash(request.path_params["name"])
        raise AssertionError("unreachable")

    async def a_commitfail(request: Request) -> Response:
        return JSONResponse(await awrite_dangling(request.path_params["name"]), status_code=201)

    async def a_stream(request: Request) -> Response:
        await awrite(request.path_params["name"])
        return StreamingResponse(alines(), media_type="text/plain")

    async def a_abandon(request: Request) -> Response:
        await awrite(request.path_params["name"])
        return StreamingResponse(along_body(), media_type="text/plain")

    async def s_state(request: Request) -> Response:
        return JSONResponse(state())

    handlers: dict[str, Callable[..., Any]] = {
        "read": s_read,
        "write": s_write,
        "write404": s_write404,
        "crash": s_crash,
        "commitfail": s_commitfail,
        "stream": s_stream,
        "abandon": s_abandon,
    }
    ahandlers: dict[str, Callable[..., Any]] = {
        "read": a_read,
        "write": a_write,
        "write404": a_write404,
        "crash": a_crash,
        "commitfail": a_commitfail,
        "stream": a_stream,
        "abandon": a_abandon,
    }
    tables = [("", handlers)] + ([("/a", ahandlers)] if use_async else [])
    routes = [Route("/_state", s_state)]
    for prefix, table in tables:
        for kind, handler in table.items():
            if kind == "read":
                routes.append(Route(f"{prefix}/read", handler))
            else:
                method = "GET" if kind in ("stream", "abandon") else "POST"
                routes.append(Route(f"{prefix}/{kind}/{{name}}", handler, methods=[method]))
    middleware = [Middleware(sessionmw.ASGISessionMiddleware, session=Session, commit="on_success")]
    if use_async:
        middleware.append(
            Middleware(
                sessionmw.ASGISessionMiddleware,
                session=AsyncSession,
                commit="on_success",
                state_key="adb",
            )
        )
    return Starlette(routes=routes, middleware=middleware)


# --- Flask (gunicorn sync, gthread, gevent; eventlet; granian WSGI; WsgiToAsgi on uvicorn) -----


def _bare_flask() -> Any:
    from flask import Flask, Response, jsonify

    flask = Flask(__name__)

    @flask.get("/read")
    def f_read() -> Any:
        return jsonify(read())

    @flask.post("/write/<name>")
    def f_write(name: str) -> Any:
        return jsonify(write(name)), 201

    @flask.post("/write404/<name>")
    def f_write404(name: str) -> Any:
        write(name)
        return jsonify(error="not found"), 404

    @flask.post("/crash/<name>")
    def f_crash(name: str) -> Any:
        crash(name)

    @flask.post("/commitfail/<name>")
    def f_commitfail(name: str) -> Any:
        return jsonify(write_dangling(name)), 201

    @flask.get("/stream/<name>")
    def f_stream(name: str) -> Any:
        write(name)
        return Response(lines(), mimetype="text/plain")

    @flask.get("/abandon/<name>")
    def f_abandon(name: str) -> Any:
        write(name)
        return Response(long_body(), mimetype="text/plain")

    @flask.get("/_state")
    def f_state() -> Any:
        return jsonify(state())

    return flask


def flask_app() -> Any:
    """Flask behind ``WSGISessionMiddleware``: for WSGI servers."""
    _configure(use_async=False)
    flask = _bare_flask()
    flask.wsgi_app = sessionmw.WSGISessionMiddleware(flask.wsgi_app, Session, commit="on_success")
    return flask


def flask_asgi() -> Any:
    """Flask behind asgiref's ``WsgiToAsgi`` behind ``ASGISessionMiddleware``: for uvicorn."""
    from asgiref.wsgi import WsgiToAsgi

    _configure(use_async=False)
    return sessionmw.ASGISessionMiddleware(
        WsgiToAsgi(_bare_flask()), session=Session, commit="on_success"
    )


def serve_eventlet(port: int) -> None:
    """Flask on eventlet's own WSGI server (gunicorn 26 removed its eventlet worker).

    Call it after ``eventlet.monkey_patch()``, before anything else is imported::

        python -c "import eventlet; eventlet.monkey_patch(); import tests.matrix_apps as m; \\
                   m.serve_eventlet(8000)"
    """
    import eventlet
    import eventlet.wsgi

    app = flask_app()
    eventlet.wsgi.server(eventlet.listen(("127.0.0.1", port)), app, log_output=False, max_size=200)


# --- Django (WSGI under gunicorn, ASGI under uvicorn) ---------------------------------------


def _django() -> Any:
    """Configure Django once, with the routes below as its URLconf."""
    import django
    from django.conf import settings
    from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
    from django.urls import path

    def d_read(request: Any) -> Any:
        return JsonResponse(read())

    def d_write(request: Any, name: str) -> Any:
        return JsonResponse(write(name), status=201)

    def d_write404(request: Any, name: str) -> Any:
        write(name)
        return JsonResponse({"error": "not found"}, status=404)

    def d_crash(request: Any, name: str) -> Any:
        crash(name)

    def d_commitfail(request: Any, name: str) -> Any:
        return JsonResponse(write_dangling(name), status=201)

    def d_stream(request: Any, name: str) -> Any:
        write(name)
        return StreamingHttpResponse(lines(), content_type="text/plain")

    def d_abandon(request: Any, name: str) -> Any:
        write(name)
        return StreamingHttpResponse(long_body(), content_type="text/plain")

    async def da_read(request: Any) -> Any:
        return JsonResponse(await aread())

    async def da_write(request: Any, name: str) -> Any:
        return JsonResponse(await awrite(name), status=201)

    async def da_write404(request: Any, name: str) -> Any:
        await awrite(name)
        return JsonResponse({"error": "not found"}, status=404)

    async def da_crash(request: Any, name: str) -> Any:
        await acrash(name)

    async def da_commitfail(request: Any, name: str) -> Any:
        return JsonResponse(await awrite_dangling(name), status=201)

    async def da_stream(request: Any, name: str) -> Any:
        await awrite(name)
        return StreamingHttpResponse(alines(), content_type="text/plain")

    async def da_abandon(request: Any, name: str) -> Any:
        await awrite(name)
        return StreamingHttpResponse(along_body(), content_type="text/plain")

    def d_state(request: Any) -> Any:
        return HttpResponse(_dumps(state()), content_type="application/json")

    urlconf = ModuleType("matrix_urls")  # Django caches resolvers by URLconf: hashable
    urlconf.urlpatterns = [
        path("_state", d_state),
        path("read", d_read),
        path("write/<str:name>", d_write),
        path("write404/<str:name>", d_write404),
        path("crash/<str:name>", d_crash),
        path("commitfail/<str:name>", d_commitfail),
        path("stream/<str:name>", d_stream),
        path("abandon/<str:name>", d_abandon),
        path("a/read", da_read),
        path("a/write/<str:name>", da_write),
        path("a/write404/<str:name>", da_write404),
        path("a/crash/<str:name>", da_crash),
        path("a/commitfail/<str:name>", da_commitfail),
        path("a/stream/<str:name>", da_stream),
        path("a/abandon/<str:name>", da_abandon),
    ]

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="sessionmw-matrix",
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=urlconf,
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
            DATABASES={},
            USE_TZ=True,
            LOGGING_CONFIG=None,
        )
        django.setup()


def django_wsgi() -> Any:
    from django.core.wsgi import get_wsgi_application

    _configure(use_async=False)
    _django()
    return sessionmw.WSGISessionMiddleware(get_wsgi_application(), Session, commit="on_success")


def django_asgi() -> Any:
    from django.core.asgi import get_asgi_application

    _configure()
    _django()
    inner = sessionmw.ASGISessionMiddleware(
        get_asgi_application(), session=AsyncSession, commit="on_success", state_key="adb"
    )
    return sessionmw.ASGISessionMiddleware(inner, session=Session, commit="on_success")


# --- Litestar (uvicorn) ----------------------------------------------------------------------


def litestar_app() -> Any:
    from litestar import Litestar, MediaType, Response, get, post
    from litestar.middleware import DefineMiddleware
    from litestar.response import Stream

    _configure()

    @get("/read", sync_to_thread=True)
    def l_read() -> dict[str, int]:
        return read()

    @post("/write/{name:str}", status_code=201, sync_to_thread=True)
    def l_write(name: str) -> dict[str, str]:
        return write(name)

    @post("/write404/{name:str}", sync_to_thread=True)
    def l_write404(name: str) -> Response[dict[str, str]]:
        write(name)
        return Response({"error": "not found"}, status_code=404)

    @post("/crash/{name:str}", sync_to_thread=True)
    def l_crash(name: str) -> None:
        crash(name)

    @post("/commitfail/{name:str}", status_code=201, sync_to_thread=True)
    def l_commitfail(name: str) -> dict[str, str]:
        return write_dangling(name)

    @get("/stream/{name:str}", sync_to_thread=True, media_type=MediaType.TEXT)
    def l_stream(name: str) -> Stream:
        write(name)
        return Stream(lines())

    @get("/abandon/{name:str}", sync_to_thread=True, media_type=MediaType.TEXT)
    def l_abandon(name: str) -> Stream:
        write(name)
        return Stream(long_body())

    @get("/a/read")
    async def la_read() -> dict[str, int]:
        return await aread()

    @post("/a/write/{name:str}", status_code=201)
    async def la_write(name: str) -> dict[str, str]:
        return await awrite(name)

    @post("/a/write404/{name:str}")
    async def la_write404(name: str) -> Response[dict[str, str]]:
        await awrite(name)
        return Response({"error": "not found"}, status_code=404)

    @post("/a/crash/{name:str}")
    async def la_crash(name: str) -> None:
        await acrash(name)

    @post("/a/commitfail/{name:str}", status_code=201)
    async def la_commitfail(name: str) -> dict[str, str]:
        return await awrite_dangling(name)

    @get("/a/stream/{name:str}", media_type=MediaType.TEXT)
    async def la_stream(name: str) -> Stream:
        await awrite(name)
        return Stream(alines())

    @get("/a/abandon/{name:str}", media_type=MediaType.TEXT)
    async def la_abandon(name: str) -> Stream:
        await awrite(name)
        return Stream(along_body())

    @get("/_state")
    async def l_state() -> dict[str, int]:
        return state()

    return Litestar(
        route_handlers=[
            l_read,
            l_write,
            l_write404,
            l_crash,
            l_commitfail,
            l_stream,
            l_abandon,
            la_read,
            la_write,
            la_write404,
            la_crash,
            la_commitfail,
            la_stream,
            la_abandon,
            l_state,
        ],
        middleware=[
            DefineMiddleware(sessionmw.ASGISessionMiddleware, session=Session, commit="on_success"),
            DefineMiddleware(
                sessionmw.ASGISessionMiddleware,
                session=AsyncSession,
                commit="on_success",
                state_key="adb",
            ),
        ],
        logging_config=None,
        # The annotations are strings (``from __future__ import annotations``) naming
        # classes imported in this function: tell Litestar where to find them.
        signature_namespace={"Response": Response, "Stream": Stream},
    )
