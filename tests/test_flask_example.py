"""The Flask example through Flask's test client: CRUD, streaming, and the routes that fail."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select

from examples.flask_app import Session, create_app
from examples.flask_app.models import Author, Book


class BufferedClient(FlaskClient):
    """Reads and closes each response, as a WSGI server does."""

    def open(self, *args: Any, **kw: Any) -> Any:
        kw.setdefault("buffered", True)
        return super().open(*args, **kw)


@pytest.fixture
def app(tmp_path: Any) -> Iterator[Flask]:
    app = create_app(f"sqlite:///{tmp_path / 'flask.db'}")
    app.test_client_class = BufferedClient
    yield app
    app.config["ENGINE"].dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def rows(app: Flask, model: Any) -> list[Any]:
    engine: Engine = app.config["ENGINE"]
    with engine.connect() as conn:
        return list(conn.execute(select(model.__table__).order_by(model.id)))


def assert_clean(app: Flask) -> None:
    assert Session.registry.registry == {}
    assert app.config["ENGINE"].pool.checkedout() == 0


def test_crud(app: Flask, client: FlaskClient) -> None:
    created = client.post("/authors", json={"name": "Ursula"})
    assert created.status_code == 201
    author_id = created.json["id"]  # type: ignore[index]
    assert client.post(f"/authors/{author_id}/books", json={"title": "Lathe"}).status_code == 201
    assert client.get(f"/authors/{author_id}").json == {
        "id": author_id,
        "name": "Ursula",
        "books": ["Lathe"],
    }
    assert client.patch(f"/authors/{author_id}", json={"name": "U. K."}).status_code == 200
    assert [r.name for r in rows(app, Author)] == ["U. K."]
    assert client.delete(f"/authors/{author_id}").status_code == 204
    assert rows(app, Author) == rows(app, Book) == []
    assert client.get(f"/authors/{author_id}").status_code == 404
    assert_clean(app)


def test_bad_input_is_a_400_and_writes_nothing(app: Flask, client: FlaskClient) -> None:
    assert client.post("/authors", data="not json").status_code == 400
    assert client.post("/authors", json={"name": "  "}).status_code == 400
    assert client.post("/authors/1/books", json={"title": "orphan"}).status_code == 404
    assert rows(app, Author) == []
    assert_clean(app)


def test_409_after_writing_keeps_nothing(app: Flask, client: FlaskClient) -> None:
    assert client.post("/authors", json={"name": "Ann"}).status_code == 201
    conflict = client.post("/authors", json={"name": "ANN"})
    assert conflict.status_code == 409
    assert [r.name for r in rows(app, Author)] == ["Ann"]
    assert_clean(app)


def test_route_failing_after_writing_is_a_500_and_keeps_nothing(
    app: Flask, client: FlaskClient
) -> None:
    author_id = client.post("/authors", json={"name": "Ann"}).json["id"]  # type: ignore[index]
    assert client.post(f"/authors/{author_id}/fail").status_code == 500
    assert rows(app, Book) == []
    assert_clean(app)


def test_streamed_listing_reads_while_streaming(app: Flask, client: FlaskClient) -> None:
    author_id = client.post("/authors", json={"name": "Ann"}).json["id"]  # type: ignore[index]
    for n in range(250):
        client.post(f"/authors/{author_id}/books", json={"title": f"book {n}"})
    response = client.get("/books/stream")
    lines = response.get_data(as_text=True).splitlines()
    assert len(lines) == 250
    assert lines[-1] == '{"id": 250, "title": "book 249", "author_id": 1}'
    assert_clean(app)


def test_stream_abandoned_before_the_end(app: Flask) -> None:
    client = app.test_client()
    author_id = client.post("/authors", json={"name": "Ann"}).json["id"]  # type: ignore[index]
    for n in range(5):
        client.post(f"/authors/{author_id}/books", json={"title": f"b{n}"})
    response = client.get("/books/stream", buffered=False)
    first = next(iter(response.response))
    assert first.startswith(b'{"id": 1')
    assert len(Session.registry.registry) == 1
    # committed before the first chunk left: the connection is back, the session stays
    assert app.config["ENGINE"].pool.checkedout() == 0
    response.close()
    assert_clean(app)


def test_unclosed_response_leaks_no_token_and_is_removed_when_collected(app: Flask) -> None:
    client = app.test_client()
    response = client.get("/authors", buffered=False)
    assert response.status_code == 200
    assert len(Session.registry.registry) == 1
    with pytest.raises(Exception, match="No request scope"):
        Session()  # the test's own context holds no token
    with pytest.warns(ResourceWarning, match="never closed"):  # noqa: PT031
        del response
        gc.collect()
    assert_clean(app)
