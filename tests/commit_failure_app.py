"""A commit that fails after the handler returned, under each way of providing the session.

The same FastAPI endpoint everywhere: it adds a row whose foreign key is deferred (SQLite
checks it only at COMMIT, so the commit fails) and returns 201. Run as a script,
``python tests/commit_failure_app.py DIR fail|ok PROVIDER...``, it serves each provider's
app on uvicorn at 127.0.0.1, sends one request, stops the server (letting every cleanup
finish) and prints one JSON line: the status the client was told and the rows kept. With
``ok`` the row is valid: the control that shows each provider does commit.

A script, so that fastapi-sqla, which pins an older FastAPI, can run it from a virtualenv of
its own; each provider imports only what it needs. No ``from __future__ import annotations``:
FastAPI must see the endpoints' annotations as objects, imported inside the providers.
"""

import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Engine, ForeignKey, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "parents"

    id: Mapped[int] = mapped_column(primary_key=True)


class Child(Base):
    __tablename__ = "children"

    id: Mapped[int] = mapped_column(primary_key=True)
    # No parent 404 exists: the deferred check fails at COMMIT, not at the INSERT.
    parent_id: Mapped[int] = mapped_column(
        ForeignKey("parents.id", deferrable=True, initially="DEFERRED")
    )


@event.listens_for(Engine, "connect")
def _enforce_foreign_keys(connection: Any, _record: Any) -> None:
    connection.execute("PRAGMA foreign_keys = ON")


def engine_for(db_file: str) -> Engine:
    return create_engine(f"sqlite:///{db_file}")


#: The parent the endpoint's row points to: 404 makes the commit fail, 1 (created at start) not.
PARENT = {"fail": 404, "ok": 1}
parent_id = PARENT["fail"]


def write_and_answer_201(session: Session) -> dict[str, bool]:
    session.add(Child(parent_id=parent_id))
    return {"written": True}


def provide_sessionmw_on_success(db_file: str) -> Any:
    from fastapi import Depends, FastAPI, Request

    import sessionmw

    Db = sessionmw.request_scoped(sessionmaker(bind=engine_for(db_file)))

    def get_db(request: Request) -> Session:
        session: Session = request.state.db()
        return session

    app = FastAPI()
    app.add_middleware(sessionmw.ASGISessionMiddleware, session=Db, commit="on_success")
    app.post("/children", status_code=201)(
        lambda db=Depends(get_db): write_and_answer_201(db)  # noqa: B008
    )
    return app


def _yield_dependency(db_file: str) -> Callable[[], Iterator[Session]]:
    """FastAPI's tutorial dependency, with the commit after ``yield``."""
    local = sessionmaker(bind=engine_for(db_file))

    def get_db() -> Iterator[Session]:
        session = local()
        try:
            yield session
            session.commit()
        except Exception:
            session.rollback()
            raise
        finally:
            session.close()

    return get_db


def provide_fastapi_yield(db_file: str) -> Any:
    from fastapi import Depends, FastAPI

    get_db = _yield_dependency(db_file)
    app = FastAPI()
    app.post("/children", status_code=201)(
        lambda db=Depends(get_db): write_and_answer_201(db)  # noqa: B008
    )
    return app


def provide_fastapi_yield_function_scope(db_file: str) -> Any:
    """The same dependency with ``scope="function"``: its exit runs before the response."""
    from fastapi import Depends, FastAPI

    get_db = _yield_dependency(db_file)
    app = FastAPI()
    app.post("/children", status_code=201)(
        lambda db=Depends(get_db, scope="function"): write_and_answer_201(db)  # noqa: B008
    )
    return app


def provide_advanced_alchemy_autocommit(db_file: str) -> Any:
    from advanced_alchemy.extensions.fastapi import AdvancedAlchemy, SQLAlchemySyncConfig
    from fastapi import Depends, FastAPI

    app = FastAPI()
    config = SQLAlchemySyncConfig(engine_instance=engine_for(db_file), commit_mode="autocommit")
    alchemy = AdvancedAlchemy(config, app=app)
    app.post("/children", status_code=201)(
        lambda db=Depends(alchemy.provide_session()): write_and_answer_201(db)  # noqa: B008
    )
    return app


def provide_fastapi_sqla(db_file: str) -> Any:
    import os

    os.environ["SQLALCHEMY_URL"] = f"sqlite:///{db_file}"
    import fastapi_sqla  # type: ignore[import-not-found]  # its own virtualenv only
    from fastapi import FastAPI

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        await fastapi_sqla.startup()
        yield

    app = FastAPI(lifespan=lifespan)
    fastapi_sqla.setup_middlewares(app)

    def create(db: fastapi_sqla.Session) -> dict[str, bool]:
        return write_and_answer_201(db)

    app.post("/children", status_code=201)(create)
    return app


PROVIDERS: dict[str, Callable[[str], Any]] = {
    "sessionmw": provide_sessionmw_on_success,
    "fastapi-yield": provide_fastapi_yield,
    "fastapi-yield-function-scope": provide_fastapi_yield_function_scope,
    "advanced-alchemy": provide_advanced_alchemy_autocommit,
    "fastapi-sqla": provide_fastapi_sqla,
}


def post_once(app: Any) -> int:
    """Serve ``app`` on uvicorn, POST once, and stop the server after every cleanup ran."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start")
        time.sleep(0.02)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/children", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            status = int(response.status)
    except urllib.error.HTTPError as error:
        status = error.code
    server.should_exit = True  # a graceful stop waits for the request's cleanup to finish
    thread.join(30)
    return status


def run(provider: str, db_file: str, commit: str) -> dict[str, Any]:
    global parent_id
    parent_id = PARENT[commit]
    engine = engine_for(db_file)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Parent(id=1))
        session.commit()
    status = post_once(PROVIDERS[provider](db_file))
    with engine.connect() as connection:
        rows = connection.scalar(select(func.count()).select_from(Child))
    engine.dispose()
    return {"provider": provider, "commit": commit, "status": status, "rows": rows}


def main(directory: str, commit: str, *providers: str) -> None:
    for provider in providers:
        print(json.dumps(run(provider, f"{directory}/{provider}-{commit}.db", commit)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
