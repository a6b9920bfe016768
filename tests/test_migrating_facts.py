"""What docs/migrating.md says about SQLModel and about moving off a yield dependency.

SQLModel's ``Session`` works as the factory's class, but ``.exec()`` is SQLModel's own
method, which SQLAlchemy's ``scoped_session`` proxy does not forward: call the proxy to get
the request's real Session first. And under ``commit="on_success"`` a 2xx commits whatever
the request left dirty, which a yield dependency that never commits would have dropped.
(No ``from __future__ import annotations``: FastAPI reads the local endpoints' annotations.)
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import pytest
import sqlmodel
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import scoped_session, sessionmaker
from sqlmodel import Field, SQLModel, select

import sessionmw


class Hero(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'heroes.db'}")
    SQLModel.metadata.create_all(engine)
    yield engine
    engine.dispose()


def hero_names(engine: Engine) -> list[str]:
    with sqlmodel.Session(engine) as session:
        return list(session.exec(select(Hero.name).order_by(Hero.name)))


def app_on(Session: scoped_session[sqlmodel.Session]) -> FastAPI:
    def get_db(request: Request) -> sqlmodel.Session:
        session: sqlmodel.Session = request.state.db()  # the real Session: it has .exec()
        return session

    DB = Annotated[sqlmodel.Session, Depends(get_db)]
    app = FastAPI()
    app.add_middleware(sessionmw.ASGISessionMiddleware, session=Session, commit="on_success")

    @app.post("/heroes", status_code=201)
    def create(name: str, db: DB) -> dict[str, str]:
        db.add(Hero(name=name))  # no commit: "on_success" commits it with the 201
        return {"name": name}

    @app.get("/heroes")
    def names(db: DB) -> list[str]:
        return list(db.exec(select(Hero.name).order_by(Hero.name)))

    return app


def test_the_proxy_has_no_exec_the_session_has(engine: Engine) -> None:
    Session = sessionmw.request_scoped(sessionmaker(bind=engine, class_=sqlmodel.Session))
    with sessionmw.request_scope(Session):
        assert not hasattr(Session, "exec")
        session = Session()
        assert isinstance(session, sqlmodel.Session)
        session.add(Hero(name="Rusty-Man"))
        session.commit()
        assert [h.name for h in session.exec(select(Hero))] == ["Rusty-Man"]
    assert Session.registry.registry == {}


def test_sqlmodel_under_fastapi_and_its_test_client(engine: Engine) -> None:
    Session = sessionmw.request_scoped(sessionmaker(bind=engine, class_=sqlmodel.Session))
    with TestClient(app_on(Session)) as client:
        assert client.post("/heroes", params={"name": "Deadpond"}).status_code == 201
        assert client.post("/heroes", params={"name": "Spider-Boy"}).status_code == 201
        assert client.get("/heroes").json() == ["Deadpond", "Spider-Boy"]
    assert hero_names(engine) == ["Deadpond", "Spider-Boy"]
    assert Session.registry.registry == {}
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_yield_dependency_that_never_commits_drops_what_on_success_keeps(
    engine: Engine,
) -> None:
    local = sessionmaker(bind=engine, class_=sqlmodel.Session)

    def get_db() -> Iterator[sqlmodel.Session]:
        with local() as session:  # closed after the response: uncommitted work rolls back
            yield session

    app = FastAPI()

    @app.post("/heroes", status_code=201)
    def create(name: str, db: Annotated[sqlmodel.Session, Depends(get_db)]) -> dict[str, str]:
        db.add(Hero(name=name))
        return {"name": name}

    with TestClient(app) as client:
        assert client.post("/heroes", params={"name": "Dropped"}).status_code == 201
    assert hero_names(engine) == []

    Session = sessionmw.request_scoped(local)
    with TestClient(app_on(Session)) as client:
        assert client.post("/heroes", params={"name": "Kept"}).status_code == 201
    assert hero_names(engine) == ["Kept"]
