"""The startup watcher of ``genq run`` and ``genq up`` (``Startup``), and how a loading model
is said (``loading_text``, also ``genq generate``'s)."""

from __future__ import annotations

import json
import time

import redis

from worker.queue.rediskeys import WORKERS_KEY

DEMO_CONVERSION_S = 20  # the demo model's one-time conversion on this kind of machine


class Startup:
    """What a starting fleet waits for, read from Redis: workers loading their model (the
    note ``genq:loading:<name>`` a loading worker keeps), workers ready (a fresh heartbeat), a
    worker that could not load its model (two lines). ``poll()`` returns the lines to print,
    each once; ``waiting()`` what is waited for now (None once a worker is ready)."""

    def __init__(self, r, expect_worker: bool = True):
        self.redis = r
        self.expect_worker = expect_worker  # we started one: "loading" rather than "no worker"
        self.started = time.monotonic()
        self.since: dict[str, float] = {}  # worker -> when it started loading (wall clock)
        self.said: set[tuple[str, str]] = set()
        self.ready: set[str] = set()
        self.loading: dict[str, dict] = {}
        self.failures: dict[str, list[str]] = {}
        self._polled = 0.0

    def _read(self) -> tuple[dict[str, dict], dict[str, dict]]:
        notes: dict[str, dict] = {}
        keys = list(self.redis.scan_iter("genq:loading:*", count=100))
        for raw in self.redis.mget(keys) if keys else []:
            try:
                note = json.loads(raw)
                notes[note["name"]] = note
            except (TypeError, ValueError, KeyError):
                continue
        alive: dict[str, dict] = {}
        now = time.time()
        for raw in self.redis.hvals(WORKERS_KEY):
            try:
                info = json.loads(raw)
                if now - float(info["at"]) < float(info.get("ttl", 15)):
                    alive[info["name"]] = info
            except (TypeError, ValueError, KeyError):
                continue
        return notes, alive

    def poll(self, every_s: float = 1.0) -> list[str]:
        if time.monotonic() - self._polled < every_s:
            return []
        self._polled = time.monotonic()
        try:
            notes, alive = self._read()
        except redis.RedisError:
            return []
        out = []
        for name, note in sorted(notes.items()):
            self.since.setdefault(name, float(note.get("since") or time.time()))
            if note.get("stage") == "failed" and name not in self.failures:
                self.failures[name] = list(note.get("error") or ["the model did not load"])
                out.append(f"worker {name} cannot load model {note.get('model')}:\n  "
                           + "\n  ".join(self.failures[name]))
            elif note.get("stage") == "loading" and (name, "loading") not in self.said:
                self.said.add((name, "loading"))
                out.append(f"worker {name}: {loading_text(note)}...")
        self.loading = {n: note for n, note in notes.items() if note.get("stage") == "loading"
                        and n not in alive}
        for name, info in sorted(alive.items()):
            if name in self.ready:
                continue
            self.ready.add(name)
            took = time.time() - self.since.get(name, time.time())
            when = f" in {took:.0f} s" if name in self.since else ""
            out.append(f"worker {name} ready{when}: {info.get('model')} on "
                       f"{info.get('backend')} ({info.get('device') or 'cpu'})")
        return out

    def waiting(self) -> str | None:
        """What the job waits for while no worker is ready; None once one is."""
        if self.ready:
            return None
        waited = time.monotonic() - self.started
        if self.loading:
            note = next(iter(self.loading.values()))
            return f"{loading_text(note)}: {waited:.0f} s"
        if self.expect_worker:
            return f"starting a worker: {waited:.0f} s"
        return f"waiting for a worker (none is alive; start one: genq worker): {waited:.0f} s"


def loading_text(note: dict) -> str:
    """``loading model SmolLM2-135M-Instruct (first run converts it, ~20 s)``."""
    text = f"loading model {note.get('display') or note.get('model')}"
    if note.get("converts"):
        text += f" (first run converts it, ~{DEMO_CONVERSION_S} s)"
    return text
