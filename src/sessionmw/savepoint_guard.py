"""Watch the savepoints of a shared test connection; refuse what production would not do.

Under savepoint isolation every session of a test shares one connection and holds a
savepoint of it.  Savepoints nest: ending one ends every savepoint begun after it, and
rolling one back undoes whatever was released into it.  In production each session has
a connection and a transaction of its own, so two cases give another outcome:

* a session ends its transaction while a session that began after it is still open
  (child scopes of an ``asyncio.gather``, stacked middlewares on one engine);
* a session rolls back after another session committed writes inside its savepoint
  (a child scope that commits an audit row, then the request fails).

The guard raises :class:`OverlappingSessionsError` before the SQL of such a step runs,
with the fix in the message, and remembers it so that the test fails even if the app
swallows the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.orm import Session

__all__ = ["OverlappingSessionsError", "SavepointGuard"]

_FIX = (
    "In production each session has its own connection and transaction; under savepoint "
    "isolation all of the test's sessions share one connection. Run this test with separate "
    "connections, as in production: mark it "
    '@pytest.mark.sessionmw_isolation("truncate") (or set `sessionmw_isolation = truncate` '
    "in the pytest ini file for every test)."
)

_OUT_OF_ORDER = (
    "sessionmw.testing: a session ended its transaction ({name}) while {count} session(s) "
    "that began after it on the test's connection were still open ({open}): savepoints "
    "end last-in-first-out. " + _FIX
)

_LOST_COMMIT = (
    "sessionmw.testing: a session rolled back its transaction ({name}) after another "
    "session committed writes inside it on the test's connection; the rollback would undo "
    "that commit, which production keeps. End the first session's transaction (commit, "
    "rollback, or leave its request_scope) before the other one begins, or use separate "
    "connections. " + _FIX
)

#: Statements that change nothing: reads and transaction control.
_READS = frozenset({"SELECT", "SAVEPOINT", "RELEASE", "ROLLBACK", "SHOW", "PRAGMA", "EXPLAIN"})


class OverlappingSessionsError(RuntimeError):
    """Sessions of one test overlap in a way one shared connection cannot reproduce."""


@dataclass
class _Frame:
    """One live savepoint of the shared connection."""

    name: str
    #: The Session that began it (``None`` until known, or when begun outside a Session).
    owner: Session | None = None
    #: A statement that writes ran while this was the innermost savepoint.
    wrote: bool = False
    #: Another session committed writes into this savepoint.
    holds_commit: bool = False
    #: For messages only.
    label: str = field(default="")


class SavepointGuard:
    """Keeps the stack of live savepoints of one connection and checks each one's end."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.frames: list[_Frame] = []
        #: Every refusal, in order: the test fails with the first one.
        self.violations: list[str] = []

    def attach(self) -> None:
        conn = self.connection
        event.listen(conn, "release_savepoint", self._released)
        event.listen(conn, "rollback_savepoint", self._rolled_back)
        event.listen(conn, "before_cursor_execute", self._statement)
        event.listen(Session, "after_begin", self._session_began)

    def detach(self) -> None:
        conn = self.connection
        event.remove(conn, "release_savepoint", self._released)
        event.remove(conn, "rollback_savepoint", self._rolled_back)
        event.remove(conn, "before_cursor_execute", self._statement)
        event.remove(Session, "after_begin", self._session_began)

    # -- listeners ---------------------------------------------------------------

    def _session_began(self, session: Session, transaction: Any, conn: Connection) -> None:
        if conn is not self.connection:
            return
        nested = conn.get_nested_transaction()
        name = getattr(nested, "_savepoint", None)
        for frame in self.frames:
            if frame.name == name and frame.owner is None:
                frame.owner = session

    def _statement(self, conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        words = statement.split(None, 2)
        verb = words[0].upper() if words else ""
        if verb == "SAVEPOINT" and len(words) == 2:  # the savepoint event has no name yet
            self.frames.append(_Frame(words[1], label=words[1]))
        elif self.frames and verb not in _READS:
            self.frames[-1].wrote = True

    def _released(self, conn: Connection, name: str, context: Any) -> None:
        index = self._end(name)
        if index is None:
            return
        frame = self.frames.pop(index)
        if index:
            parent = self.frames[index - 1]
            foreign = frame.owner is None or frame.owner is not parent.owner
            parent.holds_commit |= frame.holds_commit or (frame.wrote and foreign)
            parent.wrote |= frame.wrote

    def _rolled_back(self, conn: Connection, name: str, context: Any) -> None:
        index = self._end(name)
        if index is None:
            return
        frame = self.frames.pop(index)
        if frame.holds_commit:
            self._refuse(_LOST_COMMIT.format(name=frame.label))

    # -- checks ------------------------------------------------------------------

    def _end(self, name: str) -> int | None:
        """The position of savepoint ``name``; refuse if savepoints begun after it live on."""
        index = next((i for i, f in enumerate(self.frames) if f.name == name), None)
        if index is None:
            return None
        above = self.frames[index + 1 :]
        if above:
            frame = self.frames.pop(index)  # SQLAlchemy forgets it either way
            self._refuse(
                _OUT_OF_ORDER.format(
                    name=frame.label,
                    count=len(above),
                    open=", ".join(f.label for f in above),
                )
            )
        return index

    def _refuse(self, message: str) -> None:
        self.violations.append(message)
        raise OverlappingSessionsError(message)
