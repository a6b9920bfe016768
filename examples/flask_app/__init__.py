"""A small Flask app on sessionmw: authors and their books, as JSON."""

from .app import Session, create_app

__all__ = ["Session", "create_app"]
