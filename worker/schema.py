"""The request schema (the contract's request fields) and its validation.

Shared by every layer: the client and the gateway validate before anything is queued, the
worker validates again (foreign producers exist), and the engine validates what it is given.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker.errors import InvalidRequest

MAX_PROMPT_CHARS = 1_000_000
MAX_METADATA_BYTES = 16_384
MAX_METADATA_DEPTH = 8


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


def _check_utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text is not valid UTF-8 (lone surrogate)") from exc
    return text


def _depth(value: Any, level: int = 0) -> int:
    """Nesting depth of ``value``, counted no further than one past the limit (so a
    thousands-deep document cannot exhaust the stack)."""
    if level > MAX_METADATA_DEPTH or not isinstance(value, dict | list):
        return level
    children = value.values() if isinstance(value, dict) else value
    return max((_depth(v, level + 1) for v in children), default=level + 1)


class GenerationRequest(BaseModel):
    """A generation request exactly as the contract states it."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    messages: list[Message] | None = Field(None, min_length=1, max_length=256)
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=100_000)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    stop: list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, lt=2**63)
    adapter: str | None = Field(None, min_length=1, max_length=128)
    priority: Literal["interactive", "bulk"] | None = None
    expires_in_s: float | None = Field(None, gt=0, le=30 * 24 * 3600)
    custom_id: str | None = Field(None, max_length=512)
    metadata: dict[str, Any] | None = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=256)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if any(not s for s in value):
                raise ValueError("stop strings must be non-empty")
            if any(len(s) > 256 for s in value):
                raise ValueError("stop strings must be at most 256 characters")
            for s in value:
                _check_utf8(s)
        return value or None

    @field_validator("prompt")
    @classmethod
    def _prompt_utf8(cls, value: str | None) -> str | None:
        return None if value is None else _check_utf8(value)

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        if _depth(value) > MAX_METADATA_DEPTH:
            raise ValueError(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")
        try:
            size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
        except (TypeError, ValueError, UnicodeEncodeError) as exc:
            raise ValueError("metadata must be JSON-serializable UTF-8") from exc
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes, more than {MAX_METADATA_BYTES}")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None:
            for m in self.messages:
                _check_utf8(m.content)
        return self

    @property
    def samples(self) -> bool:
        """Whether this request samples (temperature > 0) rather than decoding greedily."""
        return self.temperature > 0


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "request"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def validate_request(data: Any, *, max_new_tokens_limit: int | None = None) -> GenerationRequest:
    """Validate one request dict; raise ``InvalidRequest`` naming every bad field."""
    if isinstance(data, GenerationRequest):
        req = data
    elif not isinstance(data, dict):
        raise InvalidRequest(f"a request must be a JSON object, not {type(data).__name__}")
    else:
        try:
            req = GenerationRequest.model_validate(data)
        except ValidationError as exc:
            raise InvalidRequest(_describe(exc)) from None
    if max_new_tokens_limit is not None and req.max_new_tokens > max_new_tokens_limit:
        raise InvalidRequest(
            f"max_new_tokens: {req.max_new_tokens} is above the limit {max_new_tokens_limit}"
        )
    return req


def result_record(request_id: str, status: str, request: Any = None, *, job_id: str | None = None,
                  worker: str | None = None, model: str | None = None) -> dict[str, Any]:
    """A result with every contract field (the one definition of its shape), for ``request``
    as received (only well-typed ``custom_id``, ``adapter`` and ``metadata`` are echoed)."""
    body = request if isinstance(request, dict) else {}
    custom_id, adapter, metadata = body.get("custom_id"), body.get("adapter"), body.get("metadata")
    return {
        "id": request_id, "status": status,
        "custom_id": custom_id if isinstance(custom_id, str) else None,
        "text": None, "finish_reason": None, "usage": None, "timings": None, "batch": None,
        "worker": worker, "model": model, "adapter": adapter if isinstance(adapter, str) else None,
        "metadata": metadata if isinstance(metadata, dict) else None, "error": None,
        "job_id": job_id,
    }
