"""The gateway's HTTP contracts (Mesh API): request and response bodies. ``mesh.spec.openapi`` renders them
into the OpenAPI document the gateway serves and ``schemas/`` keeps.

Requests refuse unknown fields (``extra="forbid"``): a misspelt budget field is a 400 naming it, not a
goal that silently runs with the default.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mesh.contracts.models import FreeForm, PendingApproval


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetRequest(_Request):
    """Limits asked for; a field left out takes the mesh default, capped by the caller's token."""

    max_tokens: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    max_wall_seconds: float | None = Field(default=None, gt=0)


class GoalRequest(_Request):
    """Body of ``POST /v1/goals`` (JSON, or the ``goal`` field of a multipart upload with a ``workspace``
    tar.gz beside it)."""

    brief: str = Field(min_length=1, max_length=100_000, description="The goal, e.g. \"Build me a login system\".")
    constraints: list[str] = Field(default_factory=list, description="Pinned into every step's context.")
    budget: BudgetRequest = Field(default_factory=BudgetRequest)
    options: FreeForm = Field(default_factory=dict, description="Goal options (backend hints).")


class CancelRequest(_Request):
    reason: str = Field(default="cancelled through the gateway", max_length=2_000)


class DecisionRequest(_Request):
    """Body of ``POST /v1/goals/{id}/approvals/{gate}``: a person's decision on a pending gate."""

    decision: Literal["approve", "reject"]
    note: str = Field(default="", max_length=4000, description="Kept with the decision; a rejection's note is the "
                                                                "feedback (the next plan's prompt, a revision's review).")


class DecisionAnswer(BaseModel):
    """Answer of ``POST /v1/goals/{id}/approvals/{gate}``: 200 ``applied`` once the planner applied it, 202
    ``sent`` when no planner answered within the gateway's wait (the command is durable and will be applied)."""

    goal_id: str
    gate: str
    decision: Literal["approve", "reject"]
    by: str
    status: Literal["applied", "sent"]


class ApprovalList(BaseModel):
    """``GET /v1/approvals``: every pending gate of every running goal, oldest request first."""

    approvals: list[PendingApproval]


class GoalAccepted(BaseModel):
    """Answer of ``POST /v1/goals`` (202; 200 when an ``Idempotency-Key`` replayed an earlier submission)."""

    goal_id: str
    replayed: bool = Field(default=False, description="True when the Idempotency-Key named an earlier goal.")
    status_url: str
    events_url: str


class GoalSummary(BaseModel):
    """One goal in ``GET /v1/goals``."""

    goal_id: str
    status: str
    brief: str
    submitter: str | None = None
    steps: int
    steps_completed: int
    total_tokens: int
    cost_usd: float
    started_at: datetime
    finished_at: datetime | None = None


class GoalList(BaseModel):
    goals: list[GoalSummary]


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, not_found_error, "
                                  "request_too_large, rate_limit_error, position_expired, timeout, server_error")
    code: str | None = None
    param: str | None = None
    model_config = ConfigDict(extra="allow")  # e.g. goal_id on a 504, earliest_seq on a 410


class ErrorBody(BaseModel):
    """Every 4xx/5xx of the gateway, in OpenAI's error format."""

    error: ErrorDetail
