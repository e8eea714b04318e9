"""genqueue results as OpenAI response objects (``chat.completion``, ``text_completion``),
shared by the synchronous routes and the Batch output files."""

from __future__ import annotations

import hashlib
import time
from typing import Any

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
