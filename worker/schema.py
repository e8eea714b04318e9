"""The request schema (the contract's request fields) and its validation.

Shared by every layer: the client and the gateway validate before anything is queued, the
worker validates again (foreign producers exist), and the engine validates what it is given.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.errors import InvalidRequest
from worker.lifecycle import STATUSES
from worker.structured import check_format

MAX_PROMPT_CHARS = 1_000_000
MAX_METADATA_BYTES = 16_384
MAX_METADATA_DEPTH = 8


def _not_bool(value: Any) -> Any:
    """JSON ``true``/``false`` are not numbers (pydantic would read ``true`` as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class Message(BaseModel):
    """One chat turn."""

    model_config = STRICT

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


class JsonSchemaSpec(BaseModel):
    """OpenAI's ``json_schema`` object: a name, the schema, and ``strict`` (always enforced)."""

    model_config = STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = Field(None, max_length=4096)


class ResponseFormat(BaseModel):
    """What the output must be: ``text`` (anything), ``json_object``, ``json_schema`` (OpenAI's
    shapes) or ``regex`` (genqueue's: the whole output matches ``pattern``)."""

    model_config = STRICT

    type: Literal["text", "json_object", "json_schema", "regex"]
    json_schema: JsonSchemaSpec | None = None
    pattern: str | None = Field(None, min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _enforceable(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type json_schema, and only there")
        if (self.type == "regex") != (self.pattern is not None):
            raise ValueError("'pattern' is required with type regex, and only there")
        check_format(self.spec)  # ValueError naming what llguidance cannot enforce
        return self

    @property
    def spec(self) -> dict[str, Any]:
        """The format as plain JSON, exactly as given."""
        return self.model_dump(by_alias=True, exclude_none=True)


# a temperature below this is greedy decoding (vLLM's _SAMPLING_EPS): dividing logits by a
# smaller one overflows to inf and the sampling distribution to NaN
GREEDY_BELOW = 1e-5
MAX_TEMPERATURE = 2.0  # OpenAI's limit, and vLLM's: refused at enqueue, never in a worker


class GenerationRequest(BaseModel):
    """A generation request exactly as the contract states it. Numbers are finite (no NaN
    or Infinity anywhere, metadata included) and never booleans."""

    model_config = STRICT

    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    messages: list[Message] | None = Field(None, min_length=1, max_length=256)
    max_new_tokens: Int = Field(256, ge=1)
    temperature: Float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    top_k: Int | None = Field(None, ge=0, le=100_000)
    repetition_penalty: Float | None = Field(None, gt=0.0, le=10.0)
    stop: list[str] | None = Field(None, max_length=4)
    seed: Int | None = Field(None, ge=0, lt=2**63)
    adapter: str | None = Field(None, min_length=1, max_length=128)
    priority: Literal["interactive", "bulk"] | None = None
    expires_in_s: Float | None = Field(None, gt=0, le=30 * 24 * 3600)
    custom_id: str | None = Field(None, max_length=512)
    metadata: dict[str, Any] | None = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=256)
    raw_special_tokens: bool | None = None
    webhook_url: str | None = Field(None, min_length=8, max_length=2048,
                                    pattern=r"^https?://[^\s/?#]+([/?#]\S*)?$")
    response_format: ResponseFormat | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    n: Int | None = Field(None, ge=1, le=16)

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
            size = len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8"))
        except ValueError as exc:
            if "JSON compliant" in str(exc):
                raise ValueError("metadata holds NaN or Infinity, which is not JSON") from exc
            raise ValueError("metadata must be JSON-serializable UTF-8") from exc
        except (TypeError, UnicodeEncodeError) as exc:
            raise ValueError("metadata must be JSON-serializable UTF-8") from exc
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes, more than {MAX_METADATA_BYTES}")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.messages is not None:
            for m in self.messages:
                _check_utf8(m.content)
        return self

    @property
    def prompt_chars(self) -> int:
        """Characters of prompt text: the prompt, or every message's content."""
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(m.content) for m in self.messages or ())

    @property
    def grammar_spec(self) -> dict[str, Any] | None:
        """The ``response_format`` that constrains the output, or None (absent or text)."""
        fmt = self.response_format
        return None if fmt is None or fmt.type == "text" else fmt.spec

    @property
    def sample_count(self) -> int:
        """How many samples (``n``) the request asks for."""
        return self.n or 1

    @property
    def samples(self) -> bool:
        """Whether this request samples rather than decoding greedily: a temperature below
        ``GREEDY_BELOW`` is greedy (its limit), as in vLLM, on every backend."""
        return self.temperature >= GREEDY_BELOW


# OpenAI's names sent to genqueue's request: its message names genqueue's
OPENAI_NAMES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}


def error_message(err: dict[str, Any], loc: tuple | list) -> str:
    """A validation error's message, ``loc`` its place in the request: OpenAI's
    ``max_tokens`` is told genqueue's name (every native path: HTTP, ``genq``, the client)."""
    if err.get("type") == "extra_forbidden" and len(loc) == 1 and loc[0] in OPENAI_NAMES:
        return (f"OpenAI's name: genqueue's request takes {OPENAI_NAMES[loc[0]]} (the OpenAI "
                f"routes, /v1/chat/completions and /v1/completions, take {loc[0]})")
    return str(err.get("msg")).removeprefix("Value error, ")


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "request"
        parts.append(f"{loc}: {error_message(err, err['loc'])}")
    return "; ".join(parts)


def validate_request(data: Any, *, max_new_tokens_limit: int | None = None,
                     max_prompt_chars: int | None = None) -> GenerationRequest:
    """Validate one request dict; raise ``InvalidRequest`` naming every bad field.
    ``max_prompt_chars`` caps the prompt text (all messages together) before any tokenizing."""
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
    if max_prompt_chars is not None and req.prompt_chars > max_prompt_chars:
        raise InvalidRequest(f"prompt: {req.prompt_chars} characters, more than the limit "
                             f"{max_prompt_chars} (GENQ_MAX_PROMPT_CHARS)")
    return req


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class BatchInfo(BaseModel):
    """The running batch a request was admitted into: its rows, and the padding of its prefill."""

    size: int
    pad_fraction: float


class TopLogprob(BaseModel):
    """One candidate token at a position: its text, log-probability and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    """A generated token (OpenAI's shape) with the most likely candidates at its position."""

    top_logprobs: list[TopLogprob]


class Choice(BaseModel):
    """One of the ``n`` samples of a request."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


class Result(BaseModel):
    """A result exactly as the contract states it: the one definition of its shape, used by
    the engine, the workers, the result store and the gateway."""

    id: str
    status: Literal[STATUSES]
    custom_id: str | None = None
    text: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: dict[str, float | None] | None = None
    batch: BatchInfo | None = None
    worker: str | None = None
    model: str | None = None
    adapter: str | None = None
    metadata: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    logprobs: list[TokenLogprob] | None = None  # when asked: one entry per generated token
    choices: list[Choice] | None = None  # n > 1: every sample (``text`` is the first's)


def result_record(request_id: str, status: str, request: Any = None, *, job_id: str | None = None,
                  worker: str | None = None, model: str | None = None,
                  **fields: Any) -> dict[str, Any]:
    """A ``Result`` as stored (plus the internal ``job_id``) for ``request`` as received (only
    well-typed ``custom_id``, ``adapter`` and ``metadata`` are echoed); ``fields`` fill the
    rest (``text``, ``usage``, ``error``...), checked against the model."""
    body = request if isinstance(request, dict) else {}
    custom_id, adapter, metadata = body.get("custom_id"), body.get("adapter"), body.get("metadata")
    result = Result(
        id=request_id, status=status, worker=worker, model=model,
        custom_id=custom_id if isinstance(custom_id, str) else None,
        adapter=adapter if isinstance(adapter, str) else None,
        metadata=metadata if isinstance(metadata, dict) else None, **fields)
    return {**result.model_dump(), "job_id": job_id}
