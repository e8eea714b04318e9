"""Waiting for a chat request's final record (async polling: nothing blocks the event loop),
and cancelling it when its client goes away."""

from __future__ import annotations

import asyncio
import time

import anyio
import structlog
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from worker.lifecycle import FINAL

log = structlog.get_logger(__name__)

CLIENT_ERRORS = {"prompt_too_long", "invalid_request"}  # a failed result's code -> 400, else 500


async def wait_final(request: Request, owner, rid: str, timeout_s: float) -> dict | None:
    """Poll until the request is final (None past ``timeout_s``); a client that goes away
    meanwhile cancels it (a task waits for the server's ``http.disconnect``)."""
    deadline = time.monotonic() + timeout_s
    gone = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.ensure_future(watch())
    try:
        delay = 0.01
        while not gone.is_set():
            result = await run_in_threadpool(owner.get, rid)
            if result["status"] in FINAL:
                return result
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.25)
    finally:
        watcher.cancel()
    await cancel_quietly(owner, rid)
    return None


async def cancel_quietly(owner, rid: str) -> None:
    """Cancel ``rid`` even while the calling task is being cancelled."""
    with anyio.CancelScope(shield=True):
        try:
            await run_in_threadpool(owner.cancel, rid)
        except Exception as exc:  # Redis gone: the request runs to its end
            log.warning("cancel_failed", request_id=rid, error=f"{type(exc).__name__}: {exc}")
