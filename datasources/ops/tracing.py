"""OpenTelemetry spans for the proxy call, the lease wait, the refresh and each upstream attempt.

Off unless ``DATASOURCES["TRACING"]`` is true (docs/tracing.md). Off, every call here returns a
shared no-op object after one module-level check: opentelemetry is not even imported. On, spans
go to the global tracer provider (set by ``opentelemetry-instrument`` or the host project); if
nothing set one, an SDK provider exporting OTLP over HTTP is installed, configured by the
standard ``OTEL_*`` environment variables.

Call sites use ``with tracing.span(name, {...}) as span:`` and ``span.set(key, value)`` /
``span.fail(error_type)`` later, or :func:`start` + ``span.end()`` where a ``with`` block does
not fit. Both are plain objects over OpenTelemetry's contextvars-based context, so they work the
same in threads and in asyncio code (``async with`` too).

What goes into attributes is chosen by the call sites and never includes a secret, a query
string or a URL path (paths can carry identifiers and, for some APIs, credentials: Telegram's
``/bot<token>/``); :func:`error_code` keeps only well-formed OAuth error codes.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from django.core.signals import setting_changed
from django.dispatch import receiver

logger = logging.getLogger(__name__)

#: Span names (stable: dashboards and tests use them).
PROXY = "datasources.proxy"
LEASE_WAIT = "datasources.lease_wait"
REFRESH = "datasources.refresh"
#: The upstream attempt is an HTTP client span, named by the semantic conventions: the method.

Attributes = Mapping[str, str | bool | int | float]

_UNRESOLVED = object()
#: The tracer when tracing is on, None when off, _UNRESOLVED until the first span.
_tracer: Any = _UNRESOLVED
_propagate = False
_trust_incoming = False
_resolving = threading.Lock()


class NoopSpan:
    """What every call returns when tracing is off."""

    __slots__ = ()

    def __enter__(self) -> NoopSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    async def __aenter__(self) -> NoopSpan:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def set(self, key: str, value: str | bool | int | float | None) -> None:
        pass

    def fail(self, error_type: str) -> None:
        pass

    def end(self) -> None:
        pass


NOOP = NoopSpan()


class Span:
    """An OpenTelemetry span; as a context manager it is current inside the block, and an
    exception leaving the block marks it failed with the exception's class name (never its
    message: messages can quote what they failed on)."""

    __slots__ = ("_failed", "_span", "_token")

    def __init__(self, span: Any) -> None:
        self._span = span
        self._token = None
        self._failed = False

    def __enter__(self) -> Span:
        from opentelemetry import context, trace

        self._token = context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from opentelemetry import context

        if exc_type is not None and not self._failed:
            self.fail(exc_type.__name__)
        if self._token is not None:
            context.detach(self._token)
            self._token = None
        self._span.end()

    async def __aenter__(self) -> Span:
        return self.__enter__()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self.__exit__(exc_type, exc, tb)

    def set(self, key: str, value: str | bool | int | float | None) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def fail(self, error_type: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._failed = True
        self._span.set_attribute("error.type", error_type)
        self._span.set_status(Status(StatusCode.ERROR))

    def end(self) -> None:
        self._span.end()


def enabled() -> bool:
    tracer = _tracer if _tracer is not _UNRESOLVED else _resolve()
    return tracer is not None


def span(
    name: str,
    attributes: Attributes | None = None,
    *,
    client: bool = False,
    parent_headers: Mapping[str, str] | None = None,
) -> Span | NoopSpan:
    """A span to use as ``with``/``async with`` block (current inside it). ``client``: an
    outgoing HTTP call (SpanKind.CLIENT). ``parent_headers``: the caller's request headers,
    used for its ``traceparent`` only when TRACING_TRUST_INCOMING is on and no span is current.
    """
    tracer = _tracer if _tracer is not _UNRESOLVED else _resolve()
    if tracer is None:
        return NOOP
    return Span(_start(tracer, name, attributes, client, parent_headers))


def start(name: str, attributes: Attributes | None = None) -> Span | NoopSpan:
    """A span started now and ended by ``.end()`` (not made current): for a stretch of time that
    a ``with`` block cannot enclose, such as the lease wait inside the decision loop."""
    tracer = _tracer if _tracer is not _UNRESOLVED else _resolve()
    if tracer is None:
        return NOOP
    return Span(_start(tracer, name, attributes, False, None))


def inject(headers: MutableMapping[str, str]) -> None:
    """Add ``traceparent``/``tracestate`` for the current span to headers sent upstream, when
    TRACING_PROPAGATE is on (they reach a third party: off by default)."""
    if not _propagate or not enabled():
        return
    from opentelemetry import propagate

    for name in [n for n in headers if n.lower() in ("traceparent", "tracestate")]:
        del headers[name]  # the caller's own, replaced by ours
    propagate.inject(headers)


def upstream_attempt(method: str, base_url: str, attempt: int) -> Span | NoopSpan:
    """The HTTP client span of one attempt upstream (semantic conventions: named by the method;
    server address and port, no URL path or query)."""
    if not enabled():
        return NOOP
    parts = urlsplit(base_url)
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "server.address": parts.hostname or "",
        "server.port": parts.port or (443 if parts.scheme == "https" else 80),
        "url.scheme": parts.scheme,
        "datasources.attempt": attempt,
    }
    if attempt > 1:
        attributes["http.request.resend_count"] = attempt - 1
    return span(method, attributes, client=True)


def answered(span: Span | NoopSpan, status: int) -> None:
    """Record an HTTP answer's status on a client span (4xx and 5xx are errors for a client)."""
    span.set("http.response.status_code", status)
    if status >= 400:
        span.fail(str(status))


def refresh(grant_type: str, token_url: str, situation: str) -> Span | NoopSpan:
    """The span of one call to the token endpoint (its host only: no path, no parameters)."""
    if not enabled():
        return NOOP
    return span(
        REFRESH,
        {
            "datasources.grant_type": grant_type,
            "datasources.situation": situation,
            "server.address": urlsplit(token_url).hostname or "",
        },
    )


_OAUTH_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def error_code(code: object) -> str:
    """An OAuth error code fit for an attribute: the code when it is a plain identifier
    (``invalid_grant``), else ``other`` (a provider could put anything in that field)."""
    return code if isinstance(code, str) and _OAUTH_CODE.fullmatch(code) else "other"


def _start(tracer: Any, name: str, attributes, client: bool, parent_headers) -> Any:
    from opentelemetry import trace

    parent = None
    current = trace.get_current_span().get_span_context()
    if parent_headers is not None and _trust_incoming and not current.is_valid:
        from opentelemetry import propagate

        parent = propagate.extract(parent_headers)
    kind = trace.SpanKind.CLIENT if client else trace.SpanKind.INTERNAL
    return tracer.start_span(name, context=parent, kind=kind, attributes=attributes)


def _resolve() -> Any:
    """Read the settings once (the first span of a process, or after :func:`reset`); under a
    lock, so that the threads of a fresh worker install one SDK provider, not one each."""
    with _resolving:
        return _tracer if _tracer is not _UNRESOLVED else _resolve_locked()


def _resolve_locked() -> Any:
    global _tracer, _propagate, _trust_incoming
    from ..conf import app_settings

    if not app_settings.TRACING:
        _tracer = None
        return None
    try:
        from opentelemetry import trace
    except ImportError:  # the system check says so (datasources.E006)
        logger.warning("DATASOURCES TRACING is on but opentelemetry-api is not installed")
        _tracer = None
        return None
    _install_sdk_if_unset(trace)
    _propagate = bool(app_settings.TRACING_PROPAGATE)
    _trust_incoming = bool(app_settings.TRACING_TRUST_INCOMING)
    _tracer = trace.get_tracer("datasources")
    return _tracer


def _install_sdk_if_unset(trace: Any) -> None:
    """With nothing configured (no ``opentelemetry-instrument``, no provider set by the host
    project), install the SDK with an OTLP/HTTP exporter read from the OTEL_* variables."""
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning(
            "DATASOURCES TRACING is on but no tracer provider is configured and the OTLP "
            "exporter is not installed (pip install 'django-oauth2-datasources[otel]'): "
            "spans are dropped"
        )
        return
    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def reset() -> None:
    """Read the settings again at the next span (tests, setting_changed)."""
    global _tracer
    _tracer = _UNRESOLVED


@receiver(setting_changed)
def _settings_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "DATASOURCES":
        reset()
