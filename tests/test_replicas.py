"""Reads to a streaming replica, writes to the primary, and read-your-writes across requests.

Everything runs on a real primary and a real ``pg_basebackup -R`` replica; where a
statement ran is asked of the database (``pg_is_in_recovery()``), never of a mock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool
from starlette.testclient import TestClient

import sessionmw
from sessionmw.routing import RETRY_REPLICA_AFTER, RoutingSession
from tests import replica_apps
from tests.models import Base, User
from tests.replication import ReplicatedDatabase
from tests.servers import uvicorn_server, wait_until, werkzeug_server

VARIANTS = ["asgi-sync", "asgi-async", "wsgi"]


class Routed:
    """One variant's app over a primary and a replica, and the way to reach it."""

    def __init__(self, variant: str, database: ReplicatedDatabase, **options: Any) -> None:
        self.variant = variant
        self.database = database
        primary = create_engine(database.primary_url())
        Base.metadata.create_all(primary)
        database.pair.wait_for_replay()
        #: Sync engines to count checked-out connections on (sync variants).
        self.engines: list[Engine] = []
        lag = options.pop("max_replica_lag", None)
        if variant == "asgi-async":
            primary.dispose()
            self.Session: Any = sessionmw.request_scoped(
                async_sessionmaker(
                    create_async_engine(database.primary_url("asyncpg"), poolclass=NullPool)
                ),
                replicas=[create_async_engine(database.replica_url("asyncpg"), poolclass=NullPool)],
                max_replica_lag=lag,
            )
            self.app = replica_apps.async_starlette(self.Session, **options)
        else:
            replica = create_engine(database.replica_url())
            self.engines = [primary, replica]
            self.Session = sessionmw.request_scoped(
                sessionmaker(bind=primary), replicas=[replica], max_replica_lag=lag
            )
            make = replica_apps.sync_starlette if variant == "asgi-sync" else replica_apps.flask
            self.app = make(self.Session, **options)

    @property
    def is_async(self) -> bool:
        return self.variant == "asgi-async"

    def client(self) -> Any:
        if self.variant == "wsgi":
            return httpx.Client(
                transport=httpx.WSGITransport(app=self.app, raise_app_exceptions=False),
                base_url="http://testserver",
            )
        return TestClient(self.app, raise_server_exceptions=False)

    def rows(self) -> set[str]:
        engine = create_engine(self.database.primary_url(), poolclass=NullPool)
        with engine.connect() as connection:
            return set(connection.scalars(select(User.name)))

    def assert_clean(self) -> None:
        assert self.Session.registry.registry == {}
        for engine in self.engines:
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]

    def close(self) -> None:
        for engine in self.engines:
            engine.dispose()


@pytest.fixture(params=VARIANTS)
def routed(
    request: pytest.FixtureRequest, replicated_database: ReplicatedDatabase
) -> Iterator[Any]:
    made: list[Routed] = []

    def make(**options: Any) -> Routed:
        made.append(Routed(request.param, replicated_database, **options))
        return made[-1]

    yield make
    for one in made:
        one.close()


def test_safe_methods_read_from_the_replica_and_writes_pin_the_primary(routed: Any) -> None:
    app = routed()
    with app.client() as client:
        assert client.get("/where").json() == {"replica": True}
        assert client.get("/pinned").json() == {"before": True, "replica": False}
        assert client.get("/lock-then-where").json() == {"replica": False}
        assert "set-cookie" not in client.get("/lock-then-where").headers  # a lock, no write
        assert client.get("/where").json() == {"replica": True}
        assert client.post("/where").json() == {"replica": False}
        assert client.options("/where").status_code in (200, 405)  # routed, or refused by router
        response = client.get("/write-then-where", params={"name": "writer"})
        assert response.json() == {"replica": False}
        assert "sessionmw_primary=" in response.headers["set-cookie"]
        # The marker: this client's reads go to the primary for the next seconds.
        assert client.get("/where").json() == {"replica": False}
    assert app.rows() == {"writer"}  # the flushed write committed on the primary
    app.assert_clean()


def test_a_committed_write_sends_the_clients_reads_to_the_primary(routed: Any) -> None:
    """Replay paused: the writer reads its write back, another client (and the writer once
    its window is over) reads the replica's older state."""
    app = routed(read_your_writes=2.0)
    pair = app.database.pair
    pair.pause_replay()
    try:
        with app.client() as writer, app.client() as other:
            created = writer.post("/users/alice")
            assert created.status_code == 201
            assert "sessionmw_primary=" in created.headers["set-cookie"]
            assert "HttpOnly" in created.headers["set-cookie"]
            assert writer.get("/users/alice").json() == {"found": True, "replica": False}
            assert other.get("/users/alice").json() == {"found": False, "replica": True}
            # A read sets no marker: the other client stays on the replica.
            assert "set-cookie" not in other.get("/users/alice").headers

            marker = writer.cookies["sessionmw_primary"]
            expired = str(int(time.time() * 1000) - 1)
            far_future = str(int(time.time() * 1000) + 3_600_000)
            for value in (expired, far_future, "primary", ""):
                forged = other.get("/users/alice", headers={"cookie": f"sessionmw_primary={value}"})
                assert forged.json() == {"found": False, "replica": True}, value
            fresh = other.get("/users/alice", headers={"cookie": f"sessionmw_primary={marker}"})
            assert fresh.json() == {"found": True, "replica": False}

            time.sleep(2.2)  # the window is over: the writer reads the replica again
            reread = writer.get("/users/alice", headers={"cookie": f"sessionmw_primary={marker}"})
            assert reread.json() == {"found": False, "replica": True}
    finally:
        pair.resume_replay()
    pair.wait_for_replay()
    with app.client() as client:
        assert client.get("/users/alice").json() == {"found": True, "replica": True}
    app.assert_clean()


def test_read_your_writes_zero_sets_no_marker(routed: Any) -> None:
    app = routed(read_your_writes=0)
    with app.client() as client:
        response = client.post("/users/bob")
        assert response.status_code == 201
        assert "set-cookie" not in response.headers
    assert app.rows() == {"bob"}


def test_a_failed_request_sets_no_marker(routed: Any) -> None:
    """The marker promises a committed write; a request whose write rolled back has none."""
    app = routed()
    with app.client() as client:
        assert client.post("/users/carol").status_code == 201
        try:
            duplicate = client.post("/users/carol")  # unique name: the commit fails
        except IntegrityError:  # in-process WSGI: the server would answer 500
            assert app.variant == "wsgi"
        else:
            assert duplicate.status_code == 500
            assert "set-cookie" not in duplicate.headers
        assert client.get("/where").json() == {"replica": False}  # the first write's marker
    with app.client() as other:
        assert other.get("/where").json() == {"replica": True}
    app.assert_clean()


def test_a_lagging_replica_is_skipped_and_used_again_once_it_caught_up(routed: Any) -> None:
    app = routed(max_replica_lag=0.5)
    pair = app.database.pair
    with app.client() as client:
        assert client.get("/where").json() == {"replica": True}
        pair.pause_replay()
        try:
            # A write the replica receives but does not replay: it falls behind.
            engine = create_engine(app.database.primary_url(), poolclass=NullPool)
            with engine.begin() as connection:
                connection.execute(text("insert into users (name) values ('lag')"))
            time.sleep(1.6)  # more than max_replica_lag, and a lag check is due
            assert client.get("/where").json() == {"replica": False}
        finally:
            pair.resume_replay()
        pair.wait_for_replay()
        time.sleep(1.1)  # the next lag check sees it caught up
        assert client.get("/where").json() == {"replica": True}
    app.assert_clean()


def test_scripts_use_the_primary_unless_told(replicated_database: ReplicatedDatabase) -> None:
    primary = create_engine(replicated_database.primary_url())
    replica = create_engine(replicated_database.replica_url())
    Session = sessionmw.request_scoped(sessionmaker(bind=primary), replicas=[replica])
    try:
        with sessionmw.request_scope(Session):
            assert Session.execute(replica_apps.ON_REPLICA).scalar() is False
        with sessionmw.request_scope(Session, reads="replica"):
            assert Session.execute(replica_apps.ON_REPLICA).scalar() is True
            sessionmw.use_primary()
            assert Session.execute(replica_apps.ON_REPLICA).scalar() is False
        assert Session.registry.registry == {}
        assert primary.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert replica.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        primary.dispose()
        replica.dispose()


@pytest.mark.anyio
async def test_async_scripts_use_the_primary_unless_told(
    replicated_database: ReplicatedDatabase,
) -> None:
    primary = create_async_engine(replicated_database.primary_url("asyncpg"), poolclass=NullPool)
    replica = create_async_engine(replicated_database.replica_url("asyncpg"), poolclass=NullPool)
    Session = sessionmw.request_scoped(async_sessionmaker(primary), replicas=[replica])
    async with sessionmw.request_scope(Session):
        assert (await Session.execute(replica_apps.ON_REPLICA)).scalar() is False
    async with sessionmw.request_scope(Session, reads="replica"):
        assert (await Session.execute(replica_apps.ON_REPLICA)).scalar() is True
    assert Session.registry.registry == {}


@pytest.mark.parametrize("variant", VARIANTS)
def test_replica_stopped_mid_load_no_5xx_and_back_after_restart(
    variant: str, replicated_database: ReplicatedDatabase
) -> None:
    """300 GETs at 50 concurrent; the replica stops after the first 100: every request
    still answers 200, reads go on through the primary, and once the replica is back it
    serves reads again."""
    app = Routed(variant, replicated_database)
    pair = replicated_database.pair
    server = werkzeug_server(app.app) if variant == "wsgi" else uvicorn_server(app.app)
    answers: list[tuple[int, bool | None]] = []
    with server as base:

        async def load() -> None:
            limits = httpx.Limits(max_connections=50)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
                gate = asyncio.Semaphore(50)
                stopped = threading.Event()

                async def one() -> None:
                    async with gate:
                        response = await client.get("/where")
                    body = response.json() if response.status_code == 200 else {}
                    answers.append((response.status_code, body.get("replica")))
                    if len(answers) == 100:  # stop it while 50 requests are in flight
                        threading.Thread(
                            target=lambda: (pair.stop_replica(), stopped.set()), daemon=True
                        ).start()

                await asyncio.gather(*(one() for _ in range(300)))
                await asyncio.to_thread(stopped.wait, 60)

        asyncio.run(load())
        statuses = [status for status, _ in answers]
        assert statuses.count(200) == 300, statuses
        assert all(replica for _, replica in answers[:100])  # served by the replica
        assert not any(replica for _, replica in answers[-20:])  # by then, by the primary
        # After the stop every read came from the primary.
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/where").json() == {"replica": False}
            pair.start_replica()
            time.sleep(RETRY_REPLICA_AFTER)
            wait_until(
                lambda: client.get("/where").json() == {"replica": True},
                timeout=15,
                what="reads to reach the restarted replica",
            )
            assert all(client.get("/where").status_code == 200 for _ in range(10))
    app.assert_clean()
    app.close()


def test_statements_are_logged_with_where_they_went(
    replicated_database: ReplicatedDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    app = Routed("asgi-sync", replicated_database)
    caplog.set_level(logging.DEBUG, logger="sessionmw")
    with app.client() as client:
        client.get("/where")
        client.post("/where")
    routes = [r.getMessage() for r in caplog.records if "pg_is_in_recovery" in r.getMessage()]
    assert routes[0].endswith(replicated_database.replica_url().replace("psycopg", "psycopg"))
    assert routes[1].endswith("-> the primary")
    app.close()


def test_without_replicas_nothing_changes(tmp_path: Any) -> None:
    factory = sessionmaker(bind=create_engine(f"sqlite:///{tmp_path}/db.sqlite"))
    Session = sessionmw.request_scoped(factory)
    assert Session.session_factory is factory
    assert not issubclass(Session.session_factory.class_, RoutingSession)


def test_replicas_of_the_wrong_kind_are_refused(tmp_path: Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/db.sqlite")
    with pytest.raises(TypeError, match="create_engine"):
        sessionmw.request_scoped(sessionmaker(bind=engine), replicas=[async_engine])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="create_async_engine"):
        sessionmw.request_scoped(async_sessionmaker(async_engine), replicas=[engine])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="binds="):
        sessionmw.request_scoped(sessionmaker(binds={User: engine}), replicas=[engine])
    with pytest.raises(ValueError, match="max_replica_lag"):
        sessionmw.request_scoped(sessionmaker(bind=engine), max_replica_lag=1.0)
    with pytest.raises(ValueError, match="max_replica_lag"):
        sessionmw.request_scoped(sessionmaker(bind=engine), replicas=[engine], max_replica_lag=-1)
    Session = sessionmw.request_scoped(sessionmaker(bind=engine), replicas=[engine])
    with pytest.raises(ValueError, match="read_your_writes"):
        sessionmw.ASGISessionMiddleware(lambda *a: None, Session, read_your_writes=-1)  # type: ignore[arg-type, return-value]
    with pytest.raises(ValueError, match="cookie name"):
        sessionmw.WSGISessionMiddleware(
            lambda *a: [],
            Session,
            read_your_writes_cookie="a;b",  # type: ignore[arg-type, return-value]
        )


def test_the_routed_session_keeps_the_users_session_class(
    replicated_database: ReplicatedDatabase,
) -> None:
    class AppSession(OrmSession):
        def hello(self) -> str:
            return "hello"

    engine = create_engine(replicated_database.primary_url(), poolclass=NullPool)
    replica = create_engine(replicated_database.replica_url(), poolclass=NullPool)
    Session = sessionmw.request_scoped(
        sessionmaker(bind=engine, class_=AppSession), replicas=[replica]
    )
    with sessionmw.request_scope(Session):
        session = Session()
        assert isinstance(session, AppSession)
        assert session.hello() == "hello"
