"""SQLAlchemy's scoped_session behaviour, as the reference chapter describes it, holds through
the middleware: the registry, Session(**kw), the proxied methods, query_property, remove()."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Query

import sessionmw
from tests.conftest import Tracker, assert_clean, count_rows, user_names
from tests.models import User
from tests.wsgi_helpers import Server


def run(Session: Any, handler: Any, commit: Any = "manual") -> Any:
    """Run ``handler`` inside one WSGI request through the middleware; return its result."""
    result: list[Any] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        result.append(handler())
        start_response("200 OK", [])
        return [b""]

    Server().get(sessionmw.WSGISessionMiddleware(app, Session, commit=commit))
    return result[0]


def test_registry_returns_the_same_session_until_remove(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    def handler() -> tuple[Any, ...]:
        first, again = Session(), Session()
        Session.remove()
        return first, again, Session()

    first, again, after_remove = run(Session, handler)
    assert first is again
    assert after_remove is not first
    assert len(tracker.created) == 2
    assert_clean(Session, engine)


def test_session_kwargs_when_one_exists_is_sqlalchemys_error(Session: Any, engine: Engine) -> None:
    def handler() -> Any:
        made = Session(autoflush=False)
        assert made.autoflush is False
        with pytest.raises(InvalidRequestError, match="already present"):
            Session(autoflush=True)
        return made

    run(Session, handler)
    assert_clean(Session, engine)


def test_proxied_methods_act_on_the_requests_session(Session: Any, engine: Engine) -> None:
    def handler() -> dict[str, Any]:
        me = Session()
        out: dict[str, Any] = {}
        alice, bob = User(name="alice"), User(name="bob")
        Session.add(alice)
        Session.add_all([bob])
        assert alice in Session
        assert alice in me
        Session.flush()
        out["execute"] = Session.execute(text("select count(*) from users")).scalar()
        out["scalar"] = Session.scalar(select(User.name).where(User.id == alice.id))
        out["scalars"] = Session.scalars(select(User.name).order_by(User.name)).all()
        out["get"] = Session.get(User, bob.id) is bob
        out["identity_map"] = len(Session.identity_map) == len(me.identity_map) == 2
        Session.info["request"] = "mine"
        out["info"] = me.info["request"]
        alice.name = "alicia"
        out["is_modified"] = Session.is_modified(alice)
        Session.expire(alice)  # discards the unflushed rename, reloads on access
        out["expired_reload"] = alice.name == "alice"
        Session.refresh(bob)
        with Session.no_autoflush:
            Session.add(User(name="carol"))
            out["no_autoflush"] = Session.scalar(select(User).where(User.name == "carol")) is None
        nested = Session.begin_nested()
        Session.add(User(name="in savepoint"))
        nested.rollback()
        merged = Session.merge(User(id=bob.id, name="robert"))
        out["merge"] = merged is bob and bob.name == "robert"
        Session.expunge(bob)
        out["expunge"] = bob not in me
        Session.commit()
        out["after_commit"] = Session.scalars(select(User.name).order_by(User.name)).all()
        Session.add(User(name="rolled back"))
        Session.rollback()
        Session.close()
        out["same_session"] = Session() is me
        return out

    out = run(Session, handler)
    assert out == {
        "execute": 2,
        "scalar": "alice",
        "scalars": ["alice", "bob"],
        "get": True,
        "identity_map": True,
        "info": "mine",
        "is_modified": True,
        "expired_reload": True,
        "no_autoflush": True,
        "merge": True,
        "expunge": True,
        "after_commit": ["alice", "bob", "carol"],
        "same_session": True,
    }
    # bob was expunged before the commit, so his merged rename stays out.
    assert user_names(engine) == {"alice", "bob", "carol"}
    assert_clean(Session, engine)


def test_query_property_gives_each_request_its_own_query(Session: Any, engine: Engine) -> None:
    # A subclass with a fresh name per run: the test runs once per database.
    Person: Any = type(f"Person{id(Session)}", (User,), {"query": Session.query_property()})

    with sessionmw.request_scope(Session):
        Session.add_all([User(name="a"), User(name="b")])
        Session.commit()

    def handler() -> tuple[Any, Any, int]:
        query = Person.query
        return query, query.session, query.count()

    first = run(Session, handler)
    second = run(Session, handler)
    assert isinstance(first[0], Query)
    assert first[1] is not second[1]
    assert first[2] == second[2] == 2
    assert_clean(Session, engine)


def test_remove_releases_the_connection_and_rolls_back(Session: Any, engine: Engine) -> None:
    def handler() -> tuple[int, int]:
        Session.add(User(name="uncommitted"))
        Session.flush()
        during = engine.pool.checkedout()
        Session.remove()
        return during, engine.pool.checkedout()

    assert run(Session, handler) == (1, 0)
    assert count_rows(engine, User) == 0
    assert_clean(Session, engine)
