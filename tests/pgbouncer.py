"""A throwaway PgBouncer in transaction pooling mode in front of the test PostgreSQL server.

PgBouncer refuses to run as root, so when the tests run as root it switches to the
server's unprivileged OS user (its own ``-u``).  It listens on 127.0.0.1 on a free port,
serves every database of the server (``* =``), trusts the ``postgres`` user as the server
does, and keeps a small server pool per database so that many clients share few backends.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.postgres import PostgresServer
from tests.servers import free_port

DEBIAN_PATH = Path("/usr/sbin/pgbouncer")
POOL_SIZE = 10  # server connections per database and user


def find_pgbouncer() -> Path | None:
    found = shutil.which("pgbouncer")
    if found:
        return Path(found)
    return DEBIAN_PATH if DEBIAN_PATH.exists() else None


def config(server: PostgresServer, directory: Path, port: int) -> str:
    return f"""\
[databases]
* = host=127.0.0.1 port={server.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "userlist.txt"}
admin_users = postgres
pool_mode = transaction
; each transaction on the next idle server connection, as under load
server_round_robin = 1
default_pool_size = {POOL_SIZE}
max_client_conn = 500
logfile = {directory / "pgbouncer.log"}
"""


@dataclass
class PgBouncer:
    directory: Path
    port: int
    process: subprocess.Popen[bytes]

    def url(self, driver: str = "psycopg", database: str = "postgres") -> str:
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def answers(self) -> bool:
        """True once a query goes through PgBouncer to the server."""
        if self.process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited: {self.log()}")
        conninfo = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        try:
            with psycopg.connect(conninfo, connect_timeout=2, prepare_threshold=None) as conn:
                conn.execute("select 1")
        except psycopg.OperationalError:
            return False
        return True

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_pgbouncer(server: PostgresServer, timeout: float = 30.0) -> PgBouncer | str:
    """Start PgBouncer in front of ``server``, or say why not."""
    binary = find_pgbouncer()
    if binary is None:
        return "PgBouncer is not installed (apt-get install pgbouncer)"
    directory = Path(tempfile.mkdtemp(prefix="sessionmw-pgbouncer-"))
    port = free_port()
    (directory / "userlist.txt").write_text('"postgres" ""\n')
    (directory / "pgbouncer.ini").write_text(config(server, directory, port))
    server.hand_over(directory, *directory.iterdir())
    command = [str(binary), "--quiet", str(directory / "pgbouncer.ini")]  # logs to its logfile
    if server.user:
        command[1:1] = ["-u", server.user]
    bouncer = PgBouncer(directory, port, subprocess.Popen(command, stdout=subprocess.DEVNULL))
    deadline = time.monotonic() + timeout
    try:
        while not bouncer.answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not answer in {timeout} s: {bouncer.log()}")
            time.sleep(0.1)
    except RuntimeError as exc:
        bouncer.stop()
        return str(exc)
    return bouncer
