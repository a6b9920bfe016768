"""A throwaway PostgreSQL server for the test session.

initdb and the server refuse to run as root, and pytest-postgresql starts them as the
current user, so when the tests run as root (CI does) the server is started as the
unprivileged ``postgres`` user with ``runuser``.  It listens on 127.0.0.1 on a free port
and on a Unix socket in its temporary directory, and is stopped when the tests end.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.servers import free_port

REQUIRE_ENV = "SESSIONMW_REQUIRE_POSTGRES"


def find_bindir() -> Path | None:
    """Where ``pg_ctl`` lives: $PG_BINDIR, Debian's layout, or the PATH."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


@dataclass
class PostgresServer:
    bindir: Path
    directory: Path
    port: int
    user: str | None  # the OS user the server runs as, when we are root

    @property
    def datadir(self) -> Path:
        return self.directory / "data"

    def url(self, driver: str = "psycopg", database: str = "postgres") -> str:
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def run_tool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one of the server's programs (pg_ctl, initdb, ...) as the server's OS user."""
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def init(self, settings: Mapping[str, str] | None = None, hba: Sequence[str] = ()) -> None:
        """initdb, then the test settings, then ``settings`` and ``hba`` lines on top."""
        self.datadir.mkdir(parents=True)
        self.hand_over(self.directory, self.datadir)
        self.run_tool(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        defaults = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.directory}'",
            "max_connections": "300",
            "max_prepared_transactions": "50",  # two-phase commit across databases
            # A test server: durability buys nothing here and costs seconds.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        self.configure({**defaults, **(settings or {})}, hba)

    def hand_over(self, *paths: Path) -> None:
        """Give ``paths`` to the server's OS user: the server writes there."""
        if self.user:
            entry = pwd.getpwnam(self.user)
            for path in paths:
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def configure(self, settings: Mapping[str, str], hba: Sequence[str] = ()) -> None:
        """Append to postgresql.conf (a later line wins) and to pg_hba.conf (read on start)."""
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        with open(self.datadir / "pg_hba.conf", "a") as rules:
            rules.writelines(f"{line}\n" for line in hba)

    def start(self) -> None:
        self.run_tool(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.datadir),
            "-l",
            str(self.directory / "server.log"),
        )

    def stop(self, mode: str = "fast") -> None:
        self.run_tool("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.datadir), check=False)

    def restart(self) -> None:
        self.run_tool(
            "pg_ctl",
            "restart",
            "-w",
            "-m",
            "fast",
            "-D",
            str(self.datadir),
            "-l",
            str(self.directory / "server.log"),
        )


def start_server(
    settings: Mapping[str, str] | None = None, hba: Sequence[str] = ()
) -> PostgresServer | str:
    """Start a server, or say why not (the tests are then skipped, unless CI requires them)."""
    bindir = find_bindir()
    if bindir is None:
        return "PostgreSQL is not installed (apt-get install postgresql, or set PG_BINDIR)"
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    directory = Path(tempfile.mkdtemp(prefix="sessionmw-pg-"))
    server = PostgresServer(bindir, directory, free_port(), user)
    try:
        server.init(settings, hba)
        server.start()
    except (subprocess.SubprocessError, OSError) as exc:
        log = directory / "server.log"
        detail = log.read_text()[-2000:] if log.exists() else ""
        stderr = getattr(exc, "stderr", "") or ""
        shutil.rmtree(directory, ignore_errors=True)
        return f"PostgreSQL did not start: {exc} {stderr} {detail}"
    return server


def stop_server(server: PostgresServer) -> None:
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)
