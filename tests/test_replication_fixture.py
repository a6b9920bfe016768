"""The primary/replica pair the replica tests stand on: a real streaming hot standby."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from tests.replication import ReplicatedDatabase, ReplicationPair

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def engines(replicated_database: ReplicatedDatabase) -> Iterator[tuple[Engine, Engine]]:
    """(primary, replica) engines on the test's database, with a table made on the primary."""
    primary = create_engine(replicated_database.primary_url(), poolclass=NullPool)
    replica = create_engine(replicated_database.replica_url(), poolclass=NullPool)
    with primary.begin() as conn:
        conn.execute(text("create table notes (title text primary key)"))
    replicated_database.pair.wait_for_replay()
    yield primary, replica
    primary.dispose()
    replica.dispose()


def titles(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text("select title from notes")))


def write(engine: Engine, title: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("insert into notes values (:title)"), {"title": title})


def test_the_replica_is_in_recovery_and_the_primary_is_not(
    engines: tuple[Engine, Engine],
) -> None:
    primary, replica = engines
    with primary.connect() as conn:
        assert conn.scalar(text("select pg_is_in_recovery()")) is False
    with replica.connect() as conn:
        assert conn.scalar(text("select pg_is_in_recovery()")) is True


def test_the_replica_refuses_writes(engines: tuple[Engine, Engine]) -> None:
    _, replica = engines
    with pytest.raises(DBAPIError, match="read-only transaction"):
        write(replica, "on the replica")


def test_a_row_written_on_the_primary_appears_on_the_replica(
    engines: tuple[Engine, Engine], pg_replication: ReplicationPair
) -> None:
    primary, replica = engines
    write(primary, "replicated")
    pg_replication.wait_for_replay()
    assert titles(replica) == {"replicated"}


def test_with_replay_paused_the_replica_stays_behind(
    engines: tuple[Engine, Engine], pg_replication: ReplicationPair
) -> None:
    primary, replica = engines
    pg_replication.pause_replay()
    write(primary, "while paused")
    assert titles(primary) == {"while paused"}
    assert titles(replica) == set()
    with pytest.raises(TimeoutError):
        pg_replication.wait_for_replay(timeout=1)
    pg_replication.resume_replay()
    pg_replication.wait_for_replay()
    assert titles(replica) == {"while paused"}


def test_a_stopped_replica_catches_up_when_started(
    engines: tuple[Engine, Engine], pg_replication: ReplicationPair
) -> None:
    primary, replica = engines
    pg_replication.stop_replica()
    assert not pg_replication.replica_running()
    with pytest.raises(OperationalError):
        titles(replica)
    write(primary, "while stopped")
    pg_replication.start_replica()
    pg_replication.wait_for_replay()
    assert titles(replica) == {"while stopped"}
