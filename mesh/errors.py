"""The one exception tree of Mesh.

Like httpx, callers catch broadly (``MeshError``) or narrowly (``RateLimited``). Every layer raises
only exceptions from this module, wrapping the library error it came from as ``__cause__``.

Whether trying the same thing again later may succeed is a property of the class (``retryable``,
marked ``[R]`` below), never set on an instance: ``retryable(exc)`` answers it for any exception
(an exception from outside the tree — a bug — counts as retryable: a redelivery may run elsewhere).

    MeshError
    ├── ConfigError
    │   └── SimulationNotAllowed       a simulated tier or answer without MESH_ALLOW_SIM=1
    ├── ContractError                  wire contracts and plans
    │   ├── CodecError                 bytes that are not a Mesh envelope
    │   │   ├── UnsupportedVersion
    │   │   ├── MessageTooLarge
    │   │   └── DecodeLimitExceeded    more objects than its size allows (an amplification attack)
    │   ├── SchemaViolation            a well-formed envelope whose body fails validation
    │   ├── ForgedEvent                a valid event on a subject whose role cannot have emitted it
    │   ├── PlanInvalid                cyclic, unknown role, unknown dependency, too large
    │   ├── OptionInvalid              a goal option that is unknown or out of range
    │   ├── GoalTooLarge               a goal too large for its goal state to fit the server's max_payload
    │   └── OutputInvalid              a model's answer that is not the structured output asked for
    ├── BusError [R]                   NATS
    │   ├── NotConnected
    │   ├── PermissionDenied       (not [R]) the server refused the user a publish or subscription
    │   ├── ProvisioningError
    │   ├── PublishError
    │   │   ├── PayloadRefused         (not [R]) above the server's max_payload: refused before sending
    │   │   └── NoStreamForSubject     (not [R]) no stream takes the subject (a role nobody serves)
    │   ├── BlobNotFound               no object under that digest in the object store
    │   ├── GoalNotFound               no goal state under that goal id
    │   └── EmbeddedServerError
    ├── BackendError                   model I/O
    │   ├── RetryableBackendError [R]
    │   │   ├── RateLimited            (retry_after)
    │   │   ├── Overloaded
    │   │   ├── BackendTimeout
    │   │   ├── ServerError
    │   │   ├── StreamCut
    │   │   ├── MalformedResponse
    │   │   └── Unreachable            (connection refused, DNS, TLS)
    │   ├── PermanentBackendError
    │   │   ├── AuthenticationFailed
    │   │   ├── BadRequest
    │   │   ├── ContextTooLong
    │   │   └── InsufficientBalance
    │   ├── CircuitOpen
    │   ├── BudgetExceeded
    │   └── AllTiersFailed             every tier failed, none with a retryable error
    │       └── AllTiersUnavailable [R]  every tier failed, at least one with a retryable error
    ├── ToolError
    │   ├── ToolRefused
    │   ├── PathRefused
    │   └── ToolTimeout
    ├── LedgerError
    │   ├── QueryRefused
    │   │   └── ResultTooLarge         a query whose answer would exceed the result byte cap
    │   ├── LedgerBusy [R]             every query slot is taken
    │   └── LedgerVersionError
    ├── RouterError                    routing models: training, evaluation, publishing
    │   └── ModelRejected              a corrupt or incompatible router model (the current one stays)
    ├── NodeSpecError
    ├── GoalCancelled
    └── RequestRefused                 the gateway refuses an HTTP request (status + error type)
"""

from __future__ import annotations

from typing import ClassVar


class MeshError(Exception):
    """Base of every error Mesh raises on purpose."""

    retryable: ClassVar[bool] = False


def retryable(exc: BaseException) -> bool:
    """Whether a later attempt at the same work may succeed: the class's say for a ``MeshError``; any
    other exception is a bug or a library error that escaped its wrapping, which another delivery
    (maybe on another node) may not meet again."""
    return exc.retryable if isinstance(exc, MeshError) else True


class ConfigError(MeshError):
    """Configuration is missing or invalid."""


class SimulationNotAllowed(ConfigError):
    """A tier is (or answered as) a simulator while ``MESH_ALLOW_SIM`` is not set: outside the embedded
    default, fabricated answers must never pass as real work. Not retryable: it is the mesh's setup."""

    def __init__(self, tier: str, why: str) -> None:
        super().__init__(f"tier {tier!r} is simulated ({why}); set MESH_ALLOW_SIM=1 to allow simulated "
                         "backends, or configure a real endpoint for it (docs/BACKENDS.md)")
        self.tier = tier


# --- contracts -------------------------------------------------------------------------------


class ContractError(MeshError):
    """A message or plan breaks the wire contract."""


class CodecError(ContractError):
    """Bytes that cannot be decoded as a Mesh envelope (not msgpack, truncated, wrong shape)."""


class UnsupportedVersion(CodecError):
    """The envelope's schema major version is not one this release understands."""

    def __init__(self, version: str, supported: str) -> None:
        super().__init__(
            f"unsupported schema version {version!r}: this release speaks major version "
            f"{supported.split('.')[0]} (schema {supported}); upgrade the reader or downgrade the writer"
        )
        self.version = version
        self.supported = supported


class MessageTooLarge(CodecError):
    """A message exceeds the configured size limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class DecodeLimitExceeded(CodecError):
    """Bytes that would decode into more objects than their size allows: refused part-way through decoding,
    so a small hostile message cannot cost a large heap (``mesh.contracts.codec``)."""

    def __init__(self, size: int, objects: int) -> None:
        super().__init__(f"message of {size} bytes holds more than {objects} maps and arrays, the most a "
                         f"message of its size may hold; refused before decoding the rest")
        self.size = size
        self.objects = objects


class SchemaViolation(ContractError):
    """A well-formed envelope whose body does not validate against its model."""


class ForgedEvent(ContractError):
    """A valid event on a subject whose role cannot have emitted it (a worker's report about another
    role's step, a goal-level event or dispatch not from the planner)."""


class PlanInvalid(ContractError):
    """A plan DAG that cannot be executed: cyclic, unknown role or dependency, too large."""


class OptionInvalid(ContractError):
    """A goal option that is not in the registry (``mesh/contracts/options.py``) or not of its type and range."""


class GoalTooLarge(ContractError):
    """A goal whose JSON leaves no room in its goal state (one KV value, never claim-checked) for the plan and
    steps: refused before it is sent, since no planner could store it."""


class OutputInvalid(ContractError):
    """A model's answer that is not the structured output asked for (not JSON, truncated, fails its schema)."""


# --- bus -------------------------------------------------------------------------------------


class BusError(MeshError):
    """A NATS operation failed."""

    retryable = True


class NotConnected(BusError):
    """The bus is not connected (never was, or closed)."""


class PermissionDenied(BusError):
    """The NATS server refused this connection's user a publish or a subscription that its permissions do
    not allow. The server drops such a request (no reply, no "no responders"), so without this the caller
    would only see a timeout. Not retryable: only a change of the user's permissions, or of what the caller
    asks, can help."""

    retryable = False

    def __init__(self, who: str, operation: str, subject: str, doing: str, hint: str = "") -> None:
        verb = "subscribe to" if operation == "subscription" else "publish to"
        super().__init__(f"{who} may not {verb} {subject} (refused by the NATS server) while {doing}"
                         + (f"; {hint}" if hint else ""))
        self.who = who
        self.operation = operation
        self.subject = subject


class ProvisioningError(BusError):
    """Streams, consumers, KV buckets or object stores could not be created or do not match."""


class NotProvisioned(ProvisioningError):
    """A stream or bucket a node needs is missing (or does not take its role): the admin's ``mesh provision``
    has not run for this mesh. Nodes do not create streams, so retrying cannot help until it does."""

    retryable = False


class PublishError(BusError):
    """A publish was not acknowledged by JetStream."""


class PayloadRefused(PublishError):
    """A message above the server's ``max_payload``: refused before it was sent, so no retry can help."""

    retryable = False


class NoStreamForSubject(PublishError):
    """No stream takes the subject (JetStream answered "no responders"): nothing would ever consume it.
    Retrying cannot help until the topology changes (a role gets workers and is provisioned)."""

    retryable = False


class BlobNotFound(BusError):
    """The object store has no object under the requested sha256 digest."""


class GoalNotFound(BusError):
    """The goals bucket has no state for the goal (a replica may lag a fresh write: retryable)."""


class EmbeddedServerError(BusError):
    """The embedded nats-server could not be found, started or stopped."""


# --- backends --------------------------------------------------------------------------------


class BackendError(MeshError):
    """A model backend call failed. ``tier`` and ``endpoint`` say where, when known."""

    def __init__(self, message: str, *, tier: str | None = None, endpoint: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.tier = tier
        self.endpoint = endpoint
        self.status = status


class RetryableBackendError(BackendError):
    """Worth another try after a delay."""

    retryable = True


class RateLimited(RetryableBackendError):
    """HTTP 429. ``retry_after`` (seconds) is what the server asked for, if it said."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class Overloaded(RetryableBackendError):
    """HTTP 503 / 529: the service is overloaded."""


class BackendTimeout(RetryableBackendError):
    """The call exceeded its timeout."""


class ServerError(RetryableBackendError):
    """HTTP 5xx."""


class StreamCut(RetryableBackendError):
    """A streamed response ended before its final event."""


class MalformedResponse(RetryableBackendError):
    """The backend answered with something that is not a valid response (garbage, bad JSON)."""


class Unreachable(RetryableBackendError):
    """The endpoint could not be reached at all (connection refused, DNS, TLS): no HTTP answer."""


class PermanentBackendError(BackendError):
    """Retrying the same request will fail the same way."""


class AuthenticationFailed(PermanentBackendError):
    """HTTP 401/403: the key is missing, wrong or lacks permission."""


class BadRequest(PermanentBackendError):
    """HTTP 400/404/422: the request itself is wrong."""


class ContextTooLong(PermanentBackendError):
    """The prompt does not fit the model's context window."""


class InsufficientBalance(PermanentBackendError):
    """HTTP 402: the account has no credit left."""


class CircuitOpen(BackendError):
    """The endpoint's circuit breaker is open; the call was not attempted."""


class BudgetExceeded(BackendError):
    """The call would exceed the goal's remaining budget; it was not attempted."""


class AllTiersFailed(BackendError):
    """Every tier in the fallback order failed; ``errors`` holds each tier's last error."""

    def __init__(self, message: str, errors: dict[str, BackendError]) -> None:
        super().__init__(message)
        self.errors = errors

    @staticmethod
    def of(message: str, errors: dict[str, BackendError]) -> AllTiersFailed:
        """``AllTiersUnavailable`` when any tier's error was retryable (trying later may work), else this."""
        cls = AllTiersUnavailable if any(e.retryable for e in errors.values()) else AllTiersFailed
        return cls(message, errors)


class AllTiersUnavailable(AllTiersFailed):
    """Every tier failed, at least one of them for a reason that may pass (rate limits, outages)."""

    retryable = True


# --- tools, ledger, nodes ----------------------------------------------------------------------


class ToolError(MeshError):
    """A tool call failed; the workspace is unchanged."""


class ToolRefused(ToolError):
    """The role may not call this tool, or the command is not on its allowlist."""


class PathRefused(ToolError):
    """A path escapes the workspace or names something that is not a regular file or folder."""


class ToolTimeout(ToolError):
    """A tool exceeded its time limit and was stopped."""


class WorkspaceConflict(ToolError):
    """A step's inputs carry workspaces that changed the same file differently."""


class LedgerError(MeshError):
    """A ledger operation failed."""


class QueryRefused(LedgerError):
    """A ledger query the service will not run or answer: not a single read-only SELECT over the ledger,
    over its time limit, or revealing the database's settings."""


class ResultTooLarge(QueryRefused):
    """A query whose answer exceeds the result byte cap: refused as a whole, never cut short silently."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the query's result exceeds the limit of {limit} bytes (as JSON) and was refused; "
                         "select fewer rows or columns (LIMIT, WHERE, aggregates)")
        self.limit = limit


class LedgerBusy(LedgerError):
    """Every query slot of the ledger service is taken; a later attempt may get one."""

    retryable = True


class LedgerVersionError(LedgerError):
    """The ledger file's schema version is newer than this release understands."""


class RouterError(MeshError):
    """A router model could not be trained, evaluated or published."""


class ModelRejected(RouterError):
    """A router model is corrupt or incompatible (feature version, classes, outputs); it is not used."""


class NodeSpecError(MeshError):
    """A role spec in ``nodes/*.toml`` is invalid."""


class GoalCancelled(MeshError):
    """The goal was cancelled; the current step stops before its next model or tool call."""


class RequestRefused(MeshError):
    """An HTTP request the gateway refuses before it reaches the bus. ``status`` is the HTTP status and
    ``type`` the OpenAI-style error type every gateway error body carries; ``extra`` adds fields to it."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 code: str | None = None, **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.extra = extra


class UnknownGoal(MeshError):
    """A client asked about a goal the mesh has no state for."""


class ApprovalNotPending(MeshError):
    """A decision for an approval gate that is not pending (never requested, already decided, or its goal
    has ended): refused, and nothing changes."""


class NoResponders(BusError):
    """A request found no service listening on its subject."""


class ServiceError(MeshError):
    """A service endpoint refused (code 400) or failed (500) a request; travels in the micro protocol's
    ``Nats-Service-Error`` / ``-Code`` headers."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(description)
        self.code = code
