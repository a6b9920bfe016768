"""A small Starlette app on sessionmw: notes, sync and async, streamed, in the background and
over a websocket."""

from .app import AsyncSession, Session, create_app

__all__ = ["AsyncSession", "Session", "create_app"]
