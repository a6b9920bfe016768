"""The Flask example: JSON CRUD, a streamed listing, and routes that fail after writing.

Every view uses the global ``Session`` proxy; ``WSGISessionMiddleware`` gives each
request its own Session and commits it only when the response is a success
(``commit="on_success"``), so the failing routes leave nothing behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, abort, jsonify, request, stream_with_context
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session, sessionmaker

import sessionmw

from .models import Author, Base, Book

DEFAULT_DATABASE_URL = "sqlite:///flask_example.db"

#: One Session per request, wherever it is used from.
Session: scoped_session[OrmSession] = sessionmw.request_scoped(sessionmaker())


def create_app(database_url: str | None = None, **engine_options: Any) -> Flask:
    """Build the app on ``database_url`` (default: ``$DATABASE_URL`` or a SQLite file)."""
    url = database_url or os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    engine = create_engine(url, **engine_options)
    Base.metadata.create_all(engine)
    Session.session_factory.configure(bind=engine)

    app = Flask(__name__)
    app.config["ENGINE"] = engine
    sessionmw.wrap_wsgi_app(app, Session, commit="on_success")  # app.wsgi_app, wrapped

    @app.get("/authors")
    def list_authors() -> Any:
        authors = Session.scalars(select(Author).order_by(Author.id))
        return jsonify([a.to_json() for a in authors])

    @app.post("/authors")
    def create_author() -> Any:
        name = _field("name")
        author = Author(name=name)
        Session.add(author)
        Session.flush()  # written now: the duplicate check below sees it
        same = Session.scalar(
            select(func.count()).select_from(Author).where(func.lower(Author.name) == name.lower())
        )
        if same and same > 1:
            # Returned after writing: the middleware rolls the insert back.
            return jsonify(error=f"an author named {name!r} exists"), 409
        return jsonify(author.to_json()), 201

    @app.get("/authors/<int:author_id>")
    def get_author(author_id: int) -> Any:
        return jsonify(_author(author_id).to_json())

    @app.patch("/authors/<int:author_id>")
    def rename_author(author_id: int) -> Any:
        author = _author(author_id)
        author.name = _field("name")
        return jsonify(author.to_json())

    @app.delete("/authors/<int:author_id>")
    def delete_author(author_id: int) -> Any:
        Session.delete(_author(author_id))
        return "", 204

    @app.post("/authors/<int:author_id>/books")
    def add_book(author_id: int) -> Any:
        book = Book(title=_field("title"), author=_author(author_id))
        Session.add(book)
        Session.flush()
        return jsonify(book.to_json()), 201

    @app.get("/books/stream")
    def stream_books() -> Response:
        """One JSON line per book, read from the session while the response streams.

        Page by page, each page a query of its own: the commit before the first chunk
        ends the request's transaction, and with it any cursor still open (yield_per).
        """

        def lines() -> Iterator[str]:
            last = 0
            while True:
                page = Session.scalars(
                    select(Book).where(Book.id > last).order_by(Book.id).limit(100)
                ).all()
                if not page:
                    return
                for book in page:
                    yield json.dumps(book.to_json()) + "\n"
                last = page[-1].id

        return Response(stream_with_context(lines()), mimetype="application/x-ndjson")

    @app.post("/authors/<int:author_id>/fail")
    def fail_after_writing(author_id: int) -> Any:
        """Writes a book, then crashes: the client gets a 500 and the book is not kept."""
        Session.add(Book(title="never saved", author=_author(author_id)))
        Session.flush()
        raise RuntimeError("failed after writing")

    return app


def _field(name: str) -> str:
    data = request.get_json(silent=True)
    value = data.get(name) if isinstance(data, dict) else None
    if not isinstance(value, str) or not value.strip():
        abort(400, description=f"send JSON with a non-empty string {name!r}")
    return value.strip()


def _author(author_id: int) -> Author:
    author = Session.get(Author, author_id)
    if author is None:
        abort(404, description=f"no author {author_id}")
    return author
