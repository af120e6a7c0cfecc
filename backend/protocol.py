"""Typed bodies of Label Studio's ML-backend protocol (as Label Studio 1.23 sends them) and our answers."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class SetupRequest(_Open):
    project: Optional[str] = Field(None, description="'<project id>.<created timestamp>'")
    schema_: str = Field("", alias="schema", description="The project's label config (XML)")
    hostname: Optional[str] = Field(None, description="Label Studio's address as it sees itself")
    access_token: Optional[str] = Field(None, description="The project creator's legacy token")
    extra_params: Optional[Any] = None


class SetupResponse(BaseModel):
    model_version: str


class PredictParams(_Open):
    context: Optional[dict[str, Any]] = Field(None, description="Interactive context: {'result': [regions]}")


class PredictRequest(_Open):
    # Any number: Retrieve Predictions sends every selected task not yet predicted in one request.
    tasks: list[dict[str, Any]]
    project: Optional[str] = None
    label_config: str = ""
    params: PredictParams = Field(default_factory=PredictParams)


class Prediction(_Open):
    result: list[dict[str, Any]]
    score: Optional[float] = None
    model_version: str


class PredictResponse(BaseModel):
    # Per task: a prediction, or an empty list when there is none now (handed off to the worker,
    # nothing to predict, or failed: see /jobs and the logs). Label Studio saves nothing for [].
    results: list[Prediction | list[Prediction]]


class WebhookRequest(_Open):
    action: str = ""
    project: Optional[dict[str, Any]] = None
    tasks: Optional[list[dict[str, Any]]] = None


class WebhookResponse(BaseModel):
    status: str
    enqueued: int = 0


class HealthResponse(BaseModel):
    status: str = Field(..., description="UP, DEGRADED (no worker listening) or DOWN (Redis unreachable)")
    model_class: str = "HybridGL"
    model_version: Optional[str] = None
    redis: str
    workers: list[dict[str, Any]] = []
    queues: dict[str, int] = {}
    problems: list[str] = []
    cache: dict[str, dict[str, Any]] = Field(
        {}, description="Shared image-index cache per store (index, embedding): bytes, budget, entries, hits, "
                        "misses, hit_rate, evictions, refused")


class JobStatusResponse(BaseModel):
    id: str
    status: str = Field(..., description="queued, started, finished, failed, scheduled (retry pending), or gone")
    queue: Optional[str] = None
    description: Optional[str] = None
    reason: Optional[str] = None
    result: Optional[Any] = None
    enqueued_at: Optional[str] = None
    ended_at: Optional[str] = None


class ErrorResponse(BaseModel):
    error: str
