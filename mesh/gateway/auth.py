"""Who is calling, what they may spend, and how often: bearer tokens, budget caps, rate and size limits.

Tokens live in ``MESH_GATEWAY_TOKENS_FILE`` (TOML), hashed at rest (sha256 of the token: tokens are 32
random bytes, so a fast hash is safe; `mesh gateway token NAME` makes one)::

    [[token]]
    name = "ci"                 # recorded on every goal it submits (Goal.submitter)
    sha256 = "9f86d0…"
    max_cost_usd = 5.0          # per-goal caps: a goal asking for more is refused (403);
    max_tokens = 500000         # a goal that asks nothing gets the mesh default, lowered to the cap
    max_steps = 100
    max_wall_seconds = 3600
    requests_per_minute = 120   # per gateway replica (optional; default MESH_GATEWAY_RATE_PER_MINUTE)

Without a tokens file the gateway serves loopback only, as the anonymous principal ``local``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mesh import tracing
from mesh.contracts import Budget
from mesh.contracts.http import BudgetRequest
from mesh.errors import ConfigError, RequestRefused

# Reachable without a token: liveness and the documents that say how to authenticate.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/.well-known/agent-card.json", "/.well-known/agent.json",
                          "/"})
# The dashboard's page shells and assets hold no data (what they show comes from /v1/ui/…, with a token).
PUBLIC_PREFIXES = ("/ui/",)
CAP_FIELDS = ("max_tokens", "max_cost_usd", "max_steps", "max_wall_seconds")


class TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,128}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_tokens: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    max_wall_seconds: float | None = Field(default=None, gt=0)
    requests_per_minute: float | None = Field(default=None, gt=0)


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    name: str
    caps: BudgetRequest = field(default_factory=BudgetRequest)
    requests_per_minute: float | None = None

    def budget(self, asked: BudgetRequest) -> Budget:
        """The goal's budget: what was asked, else the default, never above a cap (asking above one is a 403)."""
        budget = Budget()
        for name in CAP_FIELDS:
            want, cap = getattr(asked, name), getattr(self.caps, name)
            if cap is not None and want is not None and want > cap:
                raise RequestRefused(f"budget {name}={want} exceeds token {self.name!r}'s cap of {cap}",
                                     status=403, type="permission_error", code="budget_cap", param=f"budget.{name}")
            value = want if want is not None else getattr(budget, name)
            setattr(budget, name, value if cap is None or (value is not None and value <= cap) else cap)
        return budget


LOCAL = Principal("local")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "mesh_" + secrets.token_urlsafe(32)


class TokenStore:
    """The configured tokens, looked up by the hash of what the caller presents."""

    def __init__(self, entries: list[TokenEntry]) -> None:
        self._by_hash = {e.sha256: e for e in entries}

    @classmethod
    def load(cls, path: Path | None) -> TokenStore:
        if path is None:
            return cls([])
        try:
            raw = tomllib.loads(path.read_text())
            entries = [TokenEntry.model_validate(t) for t in raw.get("token", [])]
        except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ConfigError(f"gateway tokens file {path}: {exc}") from exc
        if not entries:
            raise ConfigError(f"gateway tokens file {path} defines no [[token]]")
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ConfigError(f"gateway tokens file {path}: token names must be unique")
        return cls(entries)

    def __bool__(self) -> bool:
        return bool(self._by_hash)

    def principal(self, authorization: str | None) -> Principal:
        if not self._by_hash:
            return LOCAL
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestRefused("missing bearer token (Authorization: Bearer <token>)", status=401,
                                 type="authentication_error", code="missing_token")
        digest = hash_token(token.strip())
        entry = next((e for h, e in self._by_hash.items() if hmac.compare_digest(h, digest)), None)
        if entry is None:
            raise RequestRefused("invalid bearer token", status=401, type="authentication_error",
                                 code="invalid_token")
        caps = BudgetRequest(**{f: getattr(entry, f) for f in CAP_FIELDS})
        return Principal(entry.name, caps, entry.requests_per_minute)


def require_safe_bind(host: str, tokens: TokenStore) -> None:
    """Refuse to serve a non-loopback address without tokens: anyone who could reach it could spend."""
    if tokens:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConfigError(f"refusing to bind the gateway to {host} without tokens: set MESH_GATEWAY_TOKENS_FILE "
                          "(see docs/GATEWAY.md) or bind 127.0.0.1")


class RateLimiter:
    """A token bucket per principal (per gateway replica): ``rate`` requests a minute, bursts up to it."""

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens left, at)

    def take(self, who: Principal) -> None:
        rate = who.requests_per_minute or self.per_minute
        now = time.monotonic()
        left, at = self._buckets.get(who.name, (rate, now))
        left = min(rate, left + (now - at) * rate / 60.0)
        if left < 1.0:
            self._buckets[who.name] = (left, now)
            wait = (1.0 - left) * 60.0 / rate
            raise RequestRefused(f"rate limit of {rate:g} requests a minute exceeded for {who.name!r}",
                                 status=429, type="rate_limit_error", code="rate_limited",
                                 retry_after=round(wait, 3))
        self._buckets[who.name] = (left - 1.0, now)


def error_body(exc: RequestRefused) -> dict[str, object]:
    return {"error": {"message": str(exc), "type": exc.type, "code": exc.code, "param": exc.extra.get("param"),
                      **{k: v for k, v in exc.extra.items() if k != "param"}}}


async def send_refusal(send: Send, exc: RequestRefused) -> None:
    headers = [(b"content-type", b"application/json")]
    if "retry_after" in exc.extra:
        headers.append((b"retry-after", str(max(1, round(float(str(exc.extra["retry_after"]))))).encode()))
    if exc.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="mesh"'))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(error_body(exc)).encode()})


class GuardMiddleware:
    """Size limit, authentication and rate limit for every route (Mesh API, OpenAI, A2A, MCP alike), before
    any body is read: a refused request never reaches a handler, let alone the bus. The principal is put on
    ``scope["state"]["principal"]``."""

    def __init__(self, app: ASGIApp, *, tokens: TokenStore, limiter: RateLimiter, max_body: int) -> None:
        self.app, self.tokens, self.limiter, self.max_body = app, tokens, limiter, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            length = int(headers.get("content-length") or 0)
            if length > self.max_body:
                raise RequestRefused(f"request body of {length} bytes exceeds the limit of {self.max_body}",
                                     status=413, type="request_too_large", code="body_too_large")
            if scope["path"] in PUBLIC_PATHS or scope["path"].startswith(PUBLIC_PREFIXES):
                who = LOCAL if not self.tokens else Principal("anonymous")
            else:
                who = self.tokens.principal(headers.get("authorization"))
                self.limiter.take(who)
        except ValueError:
            await send_refusal(send, RequestRefused("Content-Length is not a number"))
            return
        except RequestRefused as exc:
            await send_refusal(send, exc)
            return
        scope.setdefault("state", {})["principal"] = who
        # A caller inside a trace of its own: the goals it submits join that trace (mesh/tracing.py).
        with tracing.adopt(tracing.valid(headers.get("traceparent"))):
            await self.app(scope, self._limited(receive), send)

    def _limited(self, receive: Receive) -> Receive:
        """A chunked body has no Content-Length: count it as it arrives."""
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise RequestRefused(f"request body exceeds the limit of {self.max_body} bytes", status=413,
                                         type="request_too_large", code="body_too_large")
            return message

        return limited
