"""HTTP status + provider error body → the mesh error tree, the same for every provider.

Both SDKs raise an ``APIStatusError`` with ``status_code``, the response headers and the body's
error ``type``/``code``/message; the class they pick varies by SDK version, the status does not,
so the mapping keys on the status and the provider's error type.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mesh.backends.base import Where
from mesh.backends.resilience import parse_retry_after
from mesh.errors import (
    AuthenticationFailed,
    BackendError,
    BadRequest,
    ContextTooLong,
    InsufficientBalance,
    Overloaded,
    RateLimited,
    ServerError,
)

# How providers word "the prompt does not fit": OpenAI/DeepSeek/vLLM/Kimi and Anthropic.
_TOO_LONG = re.compile(
    r"context[_ ]length|maximum context|context window|prompt is too long|too many tokens|exceeds the model",
    re.IGNORECASE,
)


def classify(
    status: int | None, *, message: str, error_type: str | None = None, code: str | None = None,
    headers: Mapping[str, str] | None = None, tier: str | None = None, endpoint: str | None = None,
) -> BackendError:
    where = Where(tier=tier, endpoint=endpoint, status=status)
    kind = f"{error_type or ''} {code or ''}".lower()
    text = f"HTTP {status}: {message}" if status else message
    if status == 429 or "rate_limit" in kind:
        return RateLimited(text, retry_after=parse_retry_after(headers), **where)
    if status in (503, 529) or "overloaded" in kind:
        return Overloaded(text, **where)
    if status == 402 or "insufficient" in kind or "billing" in kind:
        return InsufficientBalance(text, **where)
    if status in (401, 403) or "authentication" in kind or "permission" in kind:
        return AuthenticationFailed(text, **where)
    if "context_length" in kind or _TOO_LONG.search(message) and (status in (400, 413, 422) or status is None):
        return ContextTooLong(text, **where)
    if status is not None and 400 <= status < 500 and status not in (408, 409):
        return BadRequest(text, **where)
    return ServerError(text, **where)  # 5xx, 408/409, or an error event without a status
