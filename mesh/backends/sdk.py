"""What the two official SDKs share at the mesh's edge: turning their exceptions into the mesh
error tree, and bounding a whole (streamed) call by one deadline.

Both SDKs run with ``max_retries=0``: retrying is the gateway's job, so every attempt is seen.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anthropic
import httpx2
import openai
import pydantic

from mesh.backends.base import Where
from mesh.backends.status import classify
from mesh.backends.tiers import TierConfig
from mesh.errors import BackendError, BackendTimeout, MalformedResponse, StreamCut, Unreachable

_STATUS_ERRORS = (openai.APIStatusError, anthropic.APIStatusError)
_TIMEOUTS = (openai.APITimeoutError, anthropic.APITimeoutError, httpx2.TimeoutException, TimeoutError)
_CONNECTION = (openai.APIConnectionError, anthropic.APIConnectionError, httpx2.TransportError)
_GARBAGE = (json.JSONDecodeError, pydantic.ValidationError, openai.APIResponseValidationError,
            anthropic.APIResponseValidationError)


@dataclass
class CallState:
    """How far a call got: a connection lost after the first event is a cut stream, not an outage."""

    events: int = 0


def _error_fields(exc: Exception) -> tuple[str | None, str | None, str]:
    """(type, code, message) from either SDK's error body."""
    body = getattr(exc, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(err, dict):
        code = err.get("code")
        return err.get("type"), str(code) if code is not None else None, str(err.get("message") or exc)
    return getattr(exc, "type", None), getattr(exc, "code", None), str(getattr(exc, "message", exc))


@asynccontextmanager
async def sdk_call(tier: TierConfig, timeout: float) -> AsyncIterator[CallState]:
    """Run one SDK call under a total deadline; re-raise whatever it throws as a ``BackendError``."""
    state = CallState()
    where = Where(tier=tier.name, endpoint=tier.endpoint)
    try:
        async with asyncio.timeout(timeout):
            yield state
    except BackendError as exc:  # raised by the adapter's own checks: say where
        exc.tier, exc.endpoint = exc.tier or tier.name, exc.endpoint or tier.endpoint
        raise
    except _STATUS_ERRORS as exc:
        etype, code, message = _error_fields(exc)
        status = exc.status_code if 400 <= exc.status_code else None  # an error event inside a 200 stream
        raise classify(status, message=message, error_type=etype, code=code, headers=exc.response.headers,
                       tier=tier.name, endpoint=tier.endpoint) from exc
    except _TIMEOUTS as exc:
        raise BackendTimeout(f"no complete answer within {timeout:g}s", **where) from exc
    except _CONNECTION as exc:
        if state.events:
            raise StreamCut(f"the stream broke after {state.events} events: {exc}", **where) from exc
        raise Unreachable(f"cannot reach {tier.base_url}: {exc}", **where) from exc
    except (openai.APIError, anthropic.APIError) as exc:  # an error event in the stream
        etype, code, message = _error_fields(exc)
        raise classify(None, message=message, error_type=etype, code=code, tier=tier.name,
                       endpoint=tier.endpoint) from exc
    except _GARBAGE as exc:
        raise MalformedResponse(f"the endpoint's answer is not a valid response: {exc!r}"[:500], **where) from exc
