"""Tables the tests write to: a unique name, and a deferred foreign key that fails at COMMIT."""

from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)


class Note(Base):
    __tablename__ = "user_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Checked at COMMIT, not at INSERT: a note for a missing user fails the commit itself.
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", deferrable=True, initially="DEFERRED")
    )
    body: Mapped[str] = mapped_column(String(200))
