"""The models the live workers serve, and the adapter a request's ``model`` names: the base
model's id (or none) runs the base model, ``base:adapter`` or the adapter's name that adapter."""

from __future__ import annotations

from typing import Any

from worker.errors import ModelNotFound

# the demo model's two names (``GENQ_MODEL=demo``; workers report the display name). Not
# imported from worker.engine.demo: importing worker.engine loads torch, the gateway must not.
DEMO_NAME, DEMO_ID = "demo", "SmolLM2-135M-Instruct"


def served(owner, settings) -> dict[str, list[str]]:
    """Base model id -> its adapters, from the live workers' heartbeats; with no worker alive,
    what this gateway's settings name (``GENQ_MODEL``, ``GENQ_ADAPTERS``): requests may be
    queued before any worker starts (scale from zero), for the model the deployment runs."""
    return bases_of(owner.store.workers(), settings)


def bases_of(fleet: list[dict[str, Any]], settings) -> dict[str, list[str]]:
    """``served`` for the heartbeats ``fleet`` already read."""
    out: dict[str, set[str]] = {}
    for w in fleet:
        if isinstance(w.get("model"), str):
            out.setdefault(w["model"], set()).update(
                a for a in w.get("adapters") or () if isinstance(a, str))
    if not out:
        base = DEMO_ID if settings.model == DEMO_NAME else settings.model
        out[base] = set(settings.adapters)
    return {base: sorted(adapters) for base, adapters in sorted(out.items())}


def resolve_model(model: str | None, bases: dict[str, list[str]]) -> str | None:
    """The adapter a request's ``model`` selects (None: the base model), or ``ModelNotFound``.
    A base answers to its id (``demo`` too for the demo model), an adapter to ``base:name``
    and to its name."""
    if not model:
        return None
    names = {alias: base for base in bases for alias in _aliases(base)}
    if model in names:
        return None
    for base, adapters in bases.items():
        for alias in _aliases(base):
            if model.startswith(alias + ":") and model[len(alias) + 1:] in adapters:
                return model[len(alias) + 1:]
    if any(model in adapters for adapters in bases.values()):
        return model
    known = sorted(set(names) | {a for adapters in bases.values() for a in adapters})
    raise ModelNotFound(f"the model {model!r} does not exist here; served: "
                        f"{', '.join(known)[:400]} (GET /v1/models)")


def _aliases(base: str) -> tuple[str, ...]:
    return (base, DEMO_NAME) if base == DEMO_ID else (base,)


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "genqueue"}
