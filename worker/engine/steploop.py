"""The step-loop engine: our own backend over a torch model (Unsloth or plain transformers).

``StepLoopEngine.scheduler`` returns the step loop (``worker.engine.scheduler``) that runs
sequences in lanes of left-padded, attention-masked rows that join and leave between decode
steps; the engine owns the model, its pad rule and the active LoRA adapter. It is the
reference the vLLM backend is checked against, and the fallback where vLLM cannot run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from worker.engine.engine import SCHEDULERS, Engine, engine_settings, generation_eos
from worker.engine.loading import (
    load_adapters,
    load_model,
    model_context,
    neutralise_generation_config,
    select_adapter,
)
from worker.engine.padding import PadChoice, apply_pad_token, eos_ids
from worker.engine.running import FastDecodeBuffers
from worker.engine.sampling import RowSampler
from worker.engine.scheduler import Scheduler
from worker.engine.stopping import StopStrings
from worker.schema import GenerationRequest

log = structlog.get_logger(__name__)
STEP_LOOP_ROWS = 32  # GENQ_MAX_BATCH_SIZE's default here: every row pads to the longest


class StepLoopEngine(Engine):
    """A torch model (Unsloth or transformers) run by our step loop."""

    def __init__(self, model, tokenizer, *, backend: str, model_name: str, dtype: str,
                 pad: PadChoice, max_seq_length: int | None = None, scheduler: str = "continuous",
                 **settings: Any):
        # the model's context, capped by GENQ_MAX_SEQ_LENGTH and by what the backend accepts
        # (Unsloth cuts longer inputs to its max_seq_length)
        limits = (model_context(model.config), max_seq_length, getattr(model, "max_seq_length", None))
        out = model.get_output_embeddings()
        self.continuous_ok = _plain_kv_cache(model)
        if scheduler == "continuous" and not self.continuous_ok:
            log.warning("continuous_unsupported", model=model_name,
                        reason="the model's cache has sliding-window or other non-plain layers")
            scheduler = "static"
        super().__init__(
            tokenizer, model.config, model=model, model_name=model_name,
            model_path=str(getattr(model, "name_or_path", "")), dtype=dtype, pad=pad,
            device=next(model.parameters()).device,
            context_length=min(int(limit) for limit in limits if limit),
            eos_ids=frozenset(eos_ids(tokenizer, model.config)
                              | generation_eos(getattr(model, "generation_config", None))),
            vocab_size=int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size),
            scheduler=scheduler, **settings)
        self.backend = backend
        self.fast_buffers = FastDecodeBuffers(model, enabled=backend == "unsloth"
                                              and self.device.type == "cuda")
        self._adapter: tuple[str | None] | None = None  # the adapter active now (None: base)

    def scheduler(self, mode: str | None = None) -> Scheduler:
        """A new step loop on this engine (``continuous`` or ``static``; default: settings)."""
        mode = mode or self.scheduler_mode
        if mode not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {mode!r}; use one of {SCHEDULERS}")
        if mode == "continuous" and not self.continuous_ok:
            mode = "static"
        return Scheduler(self, self.limits(static=mode == "static"))

    def row_state(self, request: GenerationRequest, sample: int = 0) -> dict[str, Any]:
        """The row's sampler, stop strings and grammar matcher (each row its own)."""
        spec = request.grammar_spec
        return {"sampler": RowSampler.for_request(request, sample),
                "stops": StopStrings(request.stop) if request.stop else None,
                "grammar": self.grammars.matcher(spec) if spec else None}

    def select_adapter(self, adapter: str | None) -> None:
        """Make ``adapter`` (None: the base model) the active weights for the next forward."""
        if self._adapter != (adapter,):
            select_adapter(self.model, adapter, bool(self.adapters))
            self._adapter = (adapter,)


def _plain_kv_cache(model) -> bool:
    """Whether every layer's cache is a plain growing one (rows can be merged and cut)."""
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config transformers cannot build a cache for: no merging
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def load_step_loop_engine(config, worker_name: str | None = None) -> StepLoopEngine:
    """Load ``config.model`` through Unsloth (``auto``, ``unsloth``) or transformers, with the
    pad rule applied and the adapters loaded, for our step loop."""
    loaded = load_model(config.model, config.backend, config.dtype, Path(config.cache_dir),
                        load_in_4bit=config.load_in_4bit, max_seq_length=config.max_seq_length)
    dropped = neutralise_generation_config(loaded.model)
    if dropped:
        log.info("generation_config_neutralised", model=loaded.model_name, dropped=dropped)
    pad = apply_pad_token(loaded.tokenizer, loaded.model)
    log.info("pad_token_chosen", token=pad.token, token_id=pad.token_id, reason=pad.reason,
             eos_ids=sorted(eos_ids(loaded.tokenizer, loaded.model.config)))
    load_adapters(loaded.model, config.adapters)
    return StepLoopEngine(
        loaded.model, loaded.tokenizer, backend=loaded.backend, model_name=loaded.model_name,
        dtype=loaded.dtype, pad=pad, adapters=config.adapters, max_seq_length=config.max_seq_length,
        scheduler=config.scheduler, worker_name=worker_name,
        **{**engine_settings(config), "max_batch_size": config.max_batch_size or STEP_LOOP_ROWS})

