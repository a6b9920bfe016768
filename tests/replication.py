"""A throwaway PostgreSQL primary with a streaming hot-standby replica, for replica tests.

The primary is a test server (see ``tests.postgres``) that allows replication from
127.0.0.1; the replica is ``pg_basebackup -R`` of it, so it streams from the primary and
answers read-only queries.  Tests can stop and start the replica, pause its replay (to see
stale reads on purpose) and wait until it has caught up.  Both run as the ``postgres`` OS
user when the tests run as root, and both directories go away at the end.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from tests.postgres import PostgresServer, start_server, stop_server
from tests.servers import free_port

PRIMARY_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "hot_standby": "on",  # copied into the replica's configuration by pg_basebackup
    # With commits acknowledged only once their WAL is written, the primary's current LSN
    # covers every commit a test has seen return, so waiting for it is waiting for them.
    "synchronous_commit": "on",
}
REPLICATION_HBA = ["host replication postgres 127.0.0.1/32 trust"]

_databases = itertools.count()


def query(server: PostgresServer, sql: str, database: str = "postgres") -> Any:
    """The first column of the first row of ``sql`` (autocommit: DDL and functions alike)."""
    conninfo = f"host=127.0.0.1 port={server.port} user=postgres dbname={database}"
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        cursor = conn.execute(sql)
        row = cursor.fetchone() if cursor.description else None
    return None if row is None else row[0]


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class ReplicationPair:
    primary: PostgresServer
    replica: PostgresServer

    def stop_replica(self) -> None:
        self.replica.stop()

    def start_replica(self) -> None:
        """Start the replica; ``pg_ctl -w`` returns once it accepts read-only connections."""
        self.replica.start()

    def replica_running(self) -> bool:
        status = self.replica.run_tool(
            "pg_ctl", "status", "-D", str(self.replica.datadir), check=False
        )
        return status.returncode == 0

    def pause_replay(self, timeout: float = 30.0) -> None:
        """Stop applying WAL on the replica; returns once the replica reports it paused."""
        query(self.replica, "select pg_wal_replay_pause()")
        wait_for(
            lambda: query(self.replica, "select pg_get_wal_replay_pause_state()") == "paused",
            timeout,
            "the replica to pause replay",
        )

    def resume_replay(self) -> None:
        query(self.replica, "select pg_wal_replay_resume()")

    def wait_for_replay(self, timeout: float = 30.0) -> None:
        """Wait until the replica has replayed everything the primary has written so far."""
        target = query(self.primary, "select pg_current_wal_lsn()")

        def replayed() -> bool:
            lag = query(
                self.replica, f"select pg_wal_lsn_diff('{target}', pg_last_wal_replay_lsn())"
            )
            return lag is not None and lag <= 0

        wait_for(replayed, timeout, f"the replica to replay up to {target}")

    def create_database(self) -> str:
        """A new database on the primary, there on the replica too when this returns."""
        name = f"repl_{os.getpid()}_{next(_databases)}_{secrets.token_hex(3)}"
        query(self.primary, f"create database {name}")
        self.wait_for_replay()
        return name

    def drop_database(self, name: str) -> None:
        """Drop it on the primary; the replica drops it, and its connections, on replay."""
        query(self.primary, f"drop database {name} with (force)")


@dataclass
class ReplicatedDatabase:
    """One test's database: written on the primary, readable on the replica."""

    pair: ReplicationPair
    name: str

    def primary_url(self, driver: str = "psycopg") -> str:
        return self.pair.primary.url(driver, self.name)

    def replica_url(self, driver: str = "psycopg") -> str:
        return self.pair.replica.url(driver, self.name)


def start_pair() -> ReplicationPair | str:
    """Start a primary and its replica, or say why not."""
    primary = start_server(PRIMARY_SETTINGS, REPLICATION_HBA)
    if isinstance(primary, str):
        return primary
    directory = Path(tempfile.mkdtemp(prefix="sessionmw-replica-"))
    replica = PostgresServer(primary.bindir, directory, free_port(), primary.user)
    try:
        replica.hand_over(directory)
        replica.run_tool(
            "pg_basebackup",
            "--host=127.0.0.1",
            f"--port={primary.port}",
            "--username=postgres",
            f"--pgdata={replica.datadir}",
            "--write-recovery-conf",  # standby.signal and primary_conninfo: a streaming standby
            "--wal-method=stream",
            "--checkpoint=fast",
        )
        # The copied configuration is the primary's: the replica listens elsewhere.
        replica.configure({"port": str(replica.port), "unix_socket_directories": f"'{directory}'"})
        replica.start()
    except (subprocess.SubprocessError, OSError) as exc:
        log = directory / "server.log"
        detail = log.read_text()[-2000:] if log.exists() else ""
        stderr = getattr(exc, "stderr", "") or ""
        replica.stop()
        shutil.rmtree(directory, ignore_errors=True)
        stop_server(primary)
        return f"the PostgreSQL replica did not start: {exc} {stderr} {detail}"
    return ReplicationPair(primary, replica)


def stop_pair(pair: ReplicationPair) -> None:
    stop_server(pair.replica)
    stop_server(pair.primary)
