"""The token, the scopefunc, request_scope and the refusals (docs/lifecycle.md, rules 5 and 8)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session, sessionmaker

import sessionmw
from tests.conftest import Tracker, assert_clean, count_rows
from tests.models import User


def test_current_request_outside_a_scope_names_the_fix() -> None:
    with pytest.raises(sessionmw.NoRequestScopeError) as info:
        sessionmw.current_request()
    message = str(info.value)
    assert "WSGISessionMiddleware" in message
    assert "ASGISessionMiddleware" in message
    assert "request_scope" in message


def test_session_proxy_outside_a_scope_raises_instead_of_making_a_session(
    Session: Any, tracker: Tracker
) -> None:
    with pytest.raises(sessionmw.NoRequestScopeError):
        Session.execute(text("select 1"))
    assert tracker.created == []


def test_request_scope_tokens_are_distinct_and_hashed_by_identity() -> None:
    seen = []
    for _ in range(3):
        with sessionmw.request_scope() as scope:
            assert sessionmw.current_request() is scope
            assert scope.kind == "script"
            assert scope.raw is None
            seen.append(scope)
    assert len({id(s) for s in seen}) == 3
    assert len(set(seen)) == 3
    assert seen[0] != seen[1]


def test_request_scope_gives_a_fresh_session_and_removes_it(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    with sessionmw.request_scope(Session):
        first = Session()
        assert Session() is first
        Session.add(User(name="kept"))
        Session.commit()
        Session.add(User(name="dropped"))
        Session.flush()
        assert engine.pool.checkedout() == 1
    with sessionmw.request_scope(Session):
        assert Session() is not first
    assert count_rows(engine, User) == 1
    assert len(tracker.created) == 2
    assert_clean(Session, engine, tracker)


def test_request_scope_removes_on_exception(Session: Any, engine: Engine, tracker: Tracker) -> None:
    def fail() -> None:
        with sessionmw.request_scope(Session):
            Session.add(User(name="lost"))
            Session.flush()
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail()
    assert count_rows(engine, User) == 0
    assert_clean(Session, engine, tracker)


def test_nested_request_scope_is_a_child_with_its_own_session(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    with sessionmw.request_scope(Session) as outer:
        parent_session = Session()
        with sessionmw.request_scope(Session) as child:
            assert child.parent is outer
            assert child.kind == outer.kind
            assert sessionmw.current_request() is child
            assert Session() is not parent_session
            assert len(Session.registry.registry) == 2
        assert sessionmw.current_request() is outer
        assert Session() is parent_session
        assert len(Session.registry.registry) == 1
    assert len(tracker.created) == 2
    assert_clean(Session, engine, tracker)


def test_request_scope_object_cannot_be_entered_twice(Session: Any) -> None:
    scope = sessionmw.request_scope(Session)
    with scope, pytest.raises(RuntimeError, match="already open"), scope:
        pass


@pytest.mark.anyio
async def test_sync_request_scope_refuses_an_async_session(AsyncSession: Any) -> None:
    with pytest.raises(TypeError, match="async with"), sessionmw.request_scope(AsyncSession):
        pass


def test_set_rollback_marks_the_innermost_scope() -> None:
    with sessionmw.request_scope() as outer:
        with sessionmw.request_scope() as child:
            sessionmw.set_rollback()
            assert child.rollback
        assert not outer.rollback
        sessionmw.set_rollback()
        assert outer.rollback
        sessionmw.set_rollback(False)
        assert not outer.rollback
    with pytest.raises(sessionmw.NoRequestScopeError):
        sessionmw.set_rollback()


def test_token_does_not_outlive_the_scope_in_a_reused_thread(Session: Any) -> None:
    seen: list[Any] = []

    def job() -> None:
        with sessionmw.request_scope(Session):
            seen.append(Session())
        try:
            sessionmw.current_request()
        except sessionmw.NoRequestScopeError:
            seen.append("clean")

    worker = threading.Thread(target=lambda: (job(), job()))
    worker.start()
    worker.join()
    assert seen[1] == seen[3] == "clean"
    assert seen[0] is not seen[2]


def test_request_scoped_returns_sqlalchemys_own_objects(engine: Engine) -> None:
    sync = sessionmw.request_scoped(sessionmaker(bind=engine))
    assert type(sync) is scoped_session
    assert sync.registry.scopefunc is sessionmw.current_request  # type: ignore[attr-defined]
    asynchronous = sessionmw.request_scoped(async_sessionmaker())
    assert type(asynchronous) is async_scoped_session
    with pytest.raises(TypeError, match="sessionmaker"):
        sessionmw.request_scoped(OrmSession)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda f: scoped_session(f), "thread-local"),
        (lambda f: scoped_session(f, scopefunc=threading.get_ident), "scopefunc="),
        (lambda f: async_scoped_session(async_sessionmaker(), asyncio.current_task), "scopefunc="),
        (lambda f: f, "not sessionmaker"),
        (lambda f: f(), "not "),
    ],
)
def test_wrong_kind_of_scoped_session_is_refused_with_the_fix(
    engine: Engine, make: Any, expected: str
) -> None:
    wrong = make(sessionmaker(bind=engine))
    for build in (
        lambda: sessionmw.WSGISessionMiddleware(lambda e, s: [], wrong),
        lambda: sessionmw.ASGISessionMiddleware(lambda s, r, se: None, session=wrong),  # type: ignore[arg-type, return-value]
        lambda: sessionmw.request_scope(wrong),
    ):
        with pytest.raises((TypeError, ValueError)) as info:
            build()
        assert expected in str(info.value)
        assert "request_scoped(sessionmaker(bind=engine))" in str(info.value)


@pytest.mark.anyio
async def test_async_request_scope_removes_async_and_sync_sessions(
    AsyncSession: Any, Session: Any, engine: Engine, tracker: Tracker
) -> None:
    async with sessionmw.request_scope(AsyncSession, Session):
        await AsyncSession.execute(text("select 1"))
        Session.execute(text("select 1"))
        assert len(AsyncSession.registry.registry) == 1
    assert AsyncSession.registry.registry == {}
    assert len(tracker.created) == 2
    assert_clean(Session, engine, tracker)


@pytest.mark.anyio
async def test_gathered_children_share_a_session_unless_each_opens_a_child_scope(
    AsyncSession: Any, engine: Engine, tracker: Tracker
) -> None:
    async with sessionmw.request_scope(AsyncSession):
        parent = AsyncSession()

        async def inherit() -> Any:
            return AsyncSession()

        async def own() -> Any:
            async with sessionmw.request_scope(AsyncSession):
                await AsyncSession.execute(text("select 1"))
                await asyncio.sleep(0)
                return AsyncSession()

        inherited = await asyncio.gather(inherit(), inherit())
        owned = await asyncio.gather(own(), own(), own())
        # Inherited children share the request's Session: not safe for concurrent use.
        assert all(s is parent for s in inherited)
        # A child scope each: three Sessions, none the parent's, all removed already.
        assert len({id(s) for s in owned}) == 3
        assert parent not in owned
        assert len(AsyncSession.registry.registry) == 1
    assert AsyncSession.registry.registry == {}
    assert len(tracker.created) == 4
    assert tracker.closed_once()


@pytest.mark.anyio
async def test_concurrent_use_of_an_inherited_session_is_refused_by_sqlalchemy(
    AsyncSession: Any,
) -> None:
    async with sessionmw.request_scope(AsyncSession):

        async def query() -> None:
            await AsyncSession.execute(text("select 1"))

        results = await asyncio.gather(*(query() for _ in range(5)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, Exception)]
        assert errors
        assert all("concurrent" in str(e) or "in progress" in str(e) for e in errors), errors
    assert AsyncSession.registry.registry == {}


def test_request_scope_removes_every_session_when_one_close_fails(
    Session: Any, engine: Engine, tmp_path: Any
) -> None:
    from sqlalchemy import create_engine

    class FailingClose(OrmSession):
        def close(self) -> None:
            super().close()
            raise RuntimeError("close failed")

    other_engine = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    Failing = sessionmw.request_scoped(sessionmaker(bind=other_engine, class_=FailingClose))

    def use_both() -> None:
        with sessionmw.request_scope(Failing, Session):
            Failing.execute(text("select 1"))
            Session.execute(text("select 1"))

    with pytest.raises(RuntimeError, match="close failed"):
        use_both()
    assert Failing.registry.registry == {}
    assert_clean(Session, engine)
    other_engine.dispose()
