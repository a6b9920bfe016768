"""OpenTelemetry spans for request scopes: ``tracing=True`` on a middleware.

Imported only when a middleware turns tracing on, so ``opentelemetry-api`` stays an
optional extra (``pip install "sessionmw[opentelemetry]"``).  Each request scope gets a
span, current while the app runs, so spans started inside it (the SQLAlchemy
instrumentation's statement spans, the app's own) are its children.  It carries events
for what the middleware did (``commit``, ``rollback``, ``remove``) and, once the request's
sessions are removed, its outcome, statement count and database time.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context, trace
from opentelemetry.trace import Span, Status, StatusCode

from .policy import describe
from .scope import RequestScope

__all__ = ["SPAN_NAME", "Tracing"]

SPAN_NAME = "sessionmw request"


class Tracing:
    """Where a middleware's spans go: the global tracer provider, or the one it was given."""

    __slots__ = ("tracer",)

    def __init__(self, provider: Any = None) -> None:
        if provider is None:
            self.tracer = trace.get_tracer("sessionmw")
        elif callable(getattr(provider, "get_tracer", None)):
            self.tracer = provider.get_tracer("sessionmw")
        else:
            raise TypeError(
                f"tracing= takes True (the global tracer provider) or a TracerProvider, "
                f"not {provider!r}"
            )

    def start(self, request: RequestScope) -> Span:
        """A span for ``request``, a child of the span current where it opens (the
        server's, with an ASGI or WSGI instrumentation outside the middleware)."""
        return self.tracer.start_span(
            SPAN_NAME, attributes={"sessionmw.request": describe(request)}
        )

    @staticmethod
    def activate(span: Span) -> object:
        """Make ``span`` current in this context; the token undoes it."""
        return context.attach(trace.set_span_in_context(span))

    @staticmethod
    def deactivate(token: object) -> None:
        context.detach(token)  # type: ignore[arg-type]

    @staticmethod
    def finish(span: Span, outcome: str, statements: int, db_time: float) -> None:
        span.add_event("remove")
        span.set_attributes(
            {
                "sessionmw.outcome": outcome,
                "sessionmw.statements": statements,
                "sessionmw.db_time_ms": round(db_time * 1000, 3),
            }
        )
        if outcome == "failed":
            span.set_status(Status(StatusCode.ERROR, "the request failed or its commit did"))
        span.end()
