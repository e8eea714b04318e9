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


def chat_completion(result: dict[str, Any], model: str, created: int | None = None) -> dict:
    """A succeeded result as OpenAI's ``chat.completion``."""
    return {
        "id": f"chatcmpl-{result['id']}", "object": "chat.completion",
        "created": created or int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"],
                                             "refusal": None},
                     "logprobs": None,
                     "finish_reason": FINISH.get(result.get("finish_reason") or "", "stop")}],
        "usage": usage(result), "system_fingerprint": fingerprint(result),
    }


def text_completion(result: dict[str, Any], model: str, created: int | None = None) -> dict:
    """A succeeded result as OpenAI's ``text_completion``."""
    return {
        "id": f"cmpl-{result['id']}", "object": "text_completion",
        "created": created or int(time.time()), "model": model,
        "choices": [{"index": 0, "text": result["text"], "logprobs": None,
                     "finish_reason": FINISH.get(result.get("finish_reason") or "", "stop")}],
        "usage": usage(result), "system_fingerprint": fingerprint(result),
    }
