"""genqueue results as OpenAI response objects (``chat.completion``, ``text_completion``),
shared by the synchronous routes and the Batch output files; and OpenAI's error object."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from fastapi.responses import JSONResponse

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               409: "conflict_error", 429: "rate_limit_error"}
FINISH = {"stop": "stop", "stop_sequence": "stop", "length": "length", "cancelled": "stop",
          "expired": "length"}


def fingerprint(result: dict[str, Any]) -> str:
    """``system_fingerprint``: the model and worker configuration that produced the text."""
    seed = f"{result.get('model')}|{result.get('adapter')}".encode()
    return "fp_genq_" + hashlib.sha256(seed).hexdigest()[:10]


def usage(result: dict[str, Any]) -> dict[str, int]:
    u = result.get("usage") or {"prompt_tokens": 0, "completion_tokens": 0}
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


def choices(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A result's samples: its ``choices`` (``n`` > 1), else the one it has."""
    return result.get("choices") or [{"index": 0, "text": result["text"],
                                      "finish_reason": result.get("finish_reason"),
                                      "logprobs": result.get("logprobs")}]


def finish(choice: dict[str, Any]) -> str:
    return FINISH.get(choice.get("finish_reason") or "", "stop")


def chat_completion(result: dict[str, Any], model: str, created: int | None = None) -> dict:
    """A succeeded result as OpenAI's ``chat.completion``."""
    return {
        "id": f"chatcmpl-{result['id']}", "object": "chat.completion",
        "created": created or int(time.time()), "model": model,
        "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"],
                                                      "refusal": None},
                     "logprobs": None if c.get("logprobs") is None else {
                         "content": c["logprobs"], "refusal": None},
                     "finish_reason": finish(c)} for c in choices(result)],
        "usage": usage(result), "system_fingerprint": fingerprint(result),
    }


def text_completion(result: dict[str, Any], model: str, created: int | None = None) -> dict:
    """A succeeded result as OpenAI's ``text_completion``."""
    return {
        "id": f"cmpl-{result['id']}", "object": "text_completion",
        "created": created or int(time.time()), "model": model,
        "choices": [{"index": c["index"], "text": c["text"],
                     "logprobs": legacy_logprobs(c.get("logprobs")), "finish_reason": finish(c)}
                    for c in choices(result)],
        "usage": usage(result), "system_fingerprint": fingerprint(result),
    }


def legacy_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Log-probabilities in the legacy completions' shape (parallel lists, candidates as a
    token -> logprob object, each token's character offset in the text)."""
    if entries is None:
        return None
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def error_object(status: int, message: str, code: str | None, param: str | None = None) -> dict:
    """OpenAI's ``{"error": {...}}`` for an HTTP status (also sent as a stream's last event)."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error(status: int, message: str, code: str | None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error response, with the status the SDKs map to their exceptions (422 becomes
    400: ``BadRequestError``)."""
    status = 400 if status == 422 else status
    return JSONResponse(error_object(status, message, code, param), status_code=status,
                        headers=headers)
