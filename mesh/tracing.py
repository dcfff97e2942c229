"""OpenTelemetry traces: one trace per goal across every process, spans after the GenAI conventions.

Two things live here, and nothing else in Mesh touches OpenTelemetry:

- **Propagation**, always on and free: the W3C ``traceparent`` that messages published from the
  current task continue (``current``/``adopt``). The bus puts it on every envelope it sends
  (``Bus._encode``), so a goal's tasks and events carry the goal's trace id whether or not anything
  is exported. A goal's trace context lives in its state (``GoalState.traceparent``, set when the
  planner first takes the goal), so re-drives and restarted nodes continue the same trace.
- **Export**, only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set at ``configure`` (node start):
  then the SDK is imported and spans go out over OTLP/HTTP through a batching processor. Otherwise
  the SDK is never imported, ``span`` returns one shared no-op object and ``record`` returns at once —
  the step path builds no span and no attribute dict (callers test ``on()`` first).

The spans (docs/TRACING.md): ``invoke_workflow mesh`` (the goal, the root), ``plan <role>`` (the
planner asking for a plan), ``invoke_agent <role>`` (one step attempt on a worker), ``chat <model>``
(one model call attempt), ``execute_tool <tool>`` (one tool call). The goal span of a day-long goal is
never held open in a process: its trace and span ids are chosen when the goal is first planned and
kept in the goal state; every other span of the goal names it as parent, from whichever process and
however many restarts later, and the planner that finishes the goal records the goal span itself once,
with its true start (the state's ``started_at``) and end, under those same ids.
"""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self

if TYPE_CHECKING:  # the SDK is imported only when exporting (``configure`` with the endpoint set)
    from opentelemetry.sdk.trace import Span as SdkSpan
    from opentelemetry.sdk.trace import Tracer, TracerProvider

# The GenAI semantic conventions these spans follow: the first standalone release of
# open-telemetry/semantic-conventions-genai (it continues the gen_ai conventions of semantic-conventions
# v1.41.0, where they lived before). Sent as the instrumentation scope's schema URL and version.
GENAI_SEMCONV_VERSION = "0.1.0"
GENAI_SEMCONV_URL = f"https://github.com/open-telemetry/semantic-conventions-genai/releases/tag/v{GENAI_SEMCONV_VERSION}"
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
SCOPE = "mesh"

Kind = Literal["internal", "client"]
Attributes = Mapping[str, str | bool | int | float]

# The tracestate of a context started here, with no span behind its parent id: a goal submitted with it
# gets a root goal span; one submitted inside a caller's trace (the gateway adopts a request's traceparent)
# gets a goal span that is a child of the caller's span.
FRESH_STATE = "mesh=root"

# The traceparent messages and spans started from this task continue (None: a fresh trace each).
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("mesh_traceparent", default=None)
# The span being recorded in this task, when exporting (``active`` hands it out to add attributes).
_active: contextvars.ContextVar[_Span | None] = contextvars.ContextVar("mesh_span", default=None)
# Ids the next span must take (the goal span: chosen at planning, recorded at the end).
_forced: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("mesh_span_ids", default=None)

_tracer: Tracer | None = None
_provider: TracerProvider | None = None


# --- W3C trace context (no SDK) -----------------------------------------------------------------


def new_traceparent() -> str:
    """A fresh sampled W3C traceparent: version-trace_id-parent_id-flags."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def parse(traceparent: str | None) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a well-formed traceparent, else None."""
    parts = (traceparent or "").split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    return (trace_id, span_id, flags) if trace_id and span_id else None


def format_traceparent(trace_id: int, span_id: int, flags: int = 1) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def valid(traceparent: str | None) -> str | None:
    """A well-formed traceparent, rewritten from its parsed ids (so nothing else from outside, such as a
    line break in an HTTP header, travels on); None for anything else."""
    parsed = parse(traceparent)
    return None if parsed is None else format_traceparent(*parsed)


def goal_traceparent(submission: Mapping[str, str]) -> tuple[str, str | None]:
    """The goal span's context and its parent span id, from the trace context of the message that
    submitted the goal: the same trace id (so the submitter's trace holds the goal), a new span id — the
    goal span's, recorded when the goal ends; its parent is the submitter's span when the submitter was
    inside a trace (no ``FRESH_STATE``), else none (the goal span is the trace's root)."""
    parsed = parse(submission.get("traceparent"))
    if parsed is None:
        return new_traceparent(), None
    own = format_traceparent(parsed[0], int.from_bytes(os.urandom(8), "big") or 1, parsed[2])
    return own, None if submission.get("tracestate") == FRESH_STATE else f"{parsed[1]:016x}"


def trace_context() -> dict[str, str]:
    """The trace context of a message published now: the task's current one, else a fresh trace."""
    current = _current.get()
    return {"traceparent": current} if current else {"traceparent": new_traceparent(), "tracestate": FRESH_STATE}


def current() -> str | None:
    """The traceparent a message published from this task continues."""
    return _current.get()


# --- spans --------------------------------------------------------------------------------------


def on() -> bool:
    """Whether spans are exported (``configure`` found the OTLP endpoint)."""
    return _tracer is not None


class _NoSpan:
    """The span when nothing is exported: one shared object, every method a no-op."""

    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        return None

    def set(self, key: str, value: str | bool | float | None) -> None:
        return None

    def update(self, attributes: Attributes) -> None:
        return None


NO_SPAN = _NoSpan()


class adopt(_NoSpan):
    """Continue ``traceparent`` (no span) for messages and spans started inside the block. Also what ``span``
    returns for a span with a parent when nothing is exported: only the parent's context is continued."""

    __slots__ = ("_token", "_traceparent")

    def __init__(self, traceparent: str | None) -> None:
        self._traceparent = traceparent
        self._token: contextvars.Token[str | None] | None = None

    def __enter__(self) -> Self:
        if self._traceparent is not None:
            self._token = _current.set(self._traceparent)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._token is not None:
            _current.reset(self._token)


class _Span(_NoSpan):
    """A recorded span; while open it is the parent of spans and messages started in its task."""

    __slots__ = ("_attributes", "_kind", "_name", "_parent", "_span", "_tokens")

    def __init__(self, name: str, kind: Kind, attributes: Attributes | None, parent: str | None) -> None:
        self._name, self._kind, self._attributes, self._parent = name, kind, attributes, parent
        self._span: SdkSpan | None = None
        self._tokens: tuple[contextvars.Token[str | None], contextvars.Token[_Span | None]] | None = None

    def __enter__(self) -> Self:
        self._span = _start(self._name, self._kind, self._attributes, self._parent or _current.get())
        ctx = self._span.get_span_context()
        self._tokens = (_current.set(format_traceparent(ctx.trace_id, ctx.span_id, int(ctx.trace_flags))),
                        _active.set(self))
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        assert self._span is not None and self._tokens is not None
        if e is not None:
            self.set("error.type", type(e).__name__)
            _fail(self._span, f"{type(e).__name__}: {e}"[:500])
        self._span.end()
        _current.reset(self._tokens[0])
        _active.reset(self._tokens[1])

    def set(self, key: str, value: str | bool | float | None) -> None:
        if value is not None and self._span is not None:
            self._span.set_attribute(key, value)

    def update(self, attributes: Attributes) -> None:
        if self._span is not None:
            self._span.set_attributes(dict(attributes))


def span(name: str, *, kind: Kind = "internal", attributes: Attributes | None = None,
         parent: str | None = None) -> _NoSpan:
    """A span around a block, child of ``parent`` (a traceparent) or of the task's current context.
    Not exporting: the shared no-op object — or, given a ``parent``, only that context is continued."""
    if _tracer is None:
        return NO_SPAN if parent is None else adopt(parent)
    return _Span(name, kind, attributes, parent)


def active() -> _NoSpan:
    """The span being recorded in this task (attributes learnt on the way: the route, the usage)."""
    return _active.get() or NO_SPAN


def record(name: str, *, start_ns: int, end_ns: int | None = None, kind: Kind = "internal",
           attributes: Attributes | None = None, parent: str | None = None, ids: str | None = None,
           error: str | None = None) -> None:
    """A span already over (a model call reported after the fact, the goal at its end). ``ids``: the
    traceparent whose trace and span ids the span takes (the goal span's, chosen long before); its parent
    is then ``parent`` if given (a span id, in the same trace), else none. Not exporting: returns at once."""
    if _tracer is None:
        return
    forced = parse(ids) if ids else None
    token = _forced.set((forced[0], forced[1])) if forced else None
    if forced:
        parent = format_traceparent(forced[0], int(parent, 16), forced[2]) if parent else None
    try:
        sdk_span = _start(name, kind, attributes, parent if forced else parent or _current.get(), start_ns)
    finally:
        if token is not None:
            _forced.reset(token)
    if error is not None:
        _fail(sdk_span, error)
    sdk_span.end(end_time=end_ns or time.time_ns())


def _start(name: str, kind: Kind, attributes: Attributes | None, parent: str | None,
           start_ns: int | None = None) -> SdkSpan:
    from opentelemetry import trace

    assert _tracer is not None
    context = None
    if (parsed := parse(parent)) is not None:
        remote = trace.SpanContext(parsed[0], parsed[1], is_remote=True, trace_flags=trace.TraceFlags(parsed[2]))
        context = trace.set_span_in_context(trace.NonRecordingSpan(remote))
    started = _tracer.start_span(name, context=context, attributes=attributes,
                                 kind=trace.SpanKind.CLIENT if kind == "client" else trace.SpanKind.INTERNAL,
                                 start_time=start_ns)
    return started  # type: ignore[return-value]  # the SDK tracer makes SDK spans


def _fail(sdk_span: SdkSpan, description: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    sdk_span.set_status(Status(StatusCode.ERROR, description))


# --- set-up --------------------------------------------------------------------------------------


def configure(service: str, instance: str) -> bool:
    """Start exporting when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the exporter reads it and the other
    ``OTEL_EXPORTER_OTLP_*`` / ``OTEL_BSP_*`` variables itself); returns whether it does. Once per
    process, at start; ``shutdown`` flushes at exit."""
    global _tracer, _provider
    if _tracer is not None or not os.environ.get(ENDPOINT_ENV):
        return _tracer is not None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class Ids(RandomIdGenerator):
        """Random ids, except for a span whose ids were chosen before (the goal span)."""

        def generate_span_id(self) -> int:
            forced = _forced.get()
            return forced[1] if forced else super().generate_span_id()

        def generate_trace_id(self) -> int:
            forced = _forced.get()
            return forced[0] if forced else super().generate_trace_id()

    _provider = TracerProvider(resource=Resource.create({"service.name": service, "service.instance.id": instance}),
                               id_generator=Ids())
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = _provider.get_tracer(SCOPE, GENAI_SEMCONV_VERSION, schema_url=GENAI_SEMCONV_URL)  # type: ignore[assignment]
    return True


def shutdown() -> None:
    """Export what is still queued and stop exporting (a node's last act)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


# --- attribute names shared by the roles ---------------------------------------------------------


def provider_name(kind: str, model: str, base_url: str | None) -> str:
    """``gen_ai.provider.name`` of a tier: the well-known value its endpoint or model names."""
    where = f"{model} {base_url or ''}".lower()
    if kind == "anthropic" or "anthropic" in where or "claude" in where:
        return "anthropic"
    for needle, name in (("deepseek", "deepseek"), ("moonshot", "moonshot_ai"), ("kimi", "moonshot_ai"),
                         ("mistral", "mistral_ai"), ("x.ai", "x_ai"), ("grok", "x_ai"), ("groq", "groq")):
        if needle in where:
            return name
    return "openai"  # the OpenAI API or one compatible with it (vLLM, llama.cpp's server)
