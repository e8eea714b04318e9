"""The engine: a loaded model with its tokenizer rules, and one generation path.

No queue here. ``Engine.sequence`` validates and tokenizes a request once (a bad one raises
and fails alone); ``Engine.scheduler`` returns the step loop that runs sequences in lanes of
left-padded, attention-masked rows that join and leave between decode steps;
``Engine.generate(list)`` is that loop run to the end over a list, results in input order.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import structlog
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from worker.engine.grammar import Grammars
from worker.engine.loading import (
    load_adapters,
    load_model,
    model_context,
    neutralise_generation_config,
    select_adapter,
)
from worker.engine.padding import PadChoice, apply_pad_token, eos_ids
from worker.engine.policy import Limits
from worker.engine.prompts import encode
from worker.engine.running import FastDecodeBuffers
from worker.engine.sampling import RowSampler
from worker.engine.scheduler import OOM_ERRORS, Scheduler
from worker.engine.sequence import Sequence
from worker.engine.stopping import StopStrings
from worker.errors import GenqError, InvalidRequest, PromptTooLong
from worker.schema import GenerationRequest, result_record, validate_request
from worker.tokencount import special_pattern

__all__ = ["OOM_ERRORS", "Engine", "load_engine"]

log = structlog.get_logger(__name__)
SCHEDULERS = ("continuous", "static")


class Engine:
    """A loaded model plus the batching rules. Build one with ``load_engine``."""

    def __init__(self, model, tokenizer, *, backend: str, model_name: str, dtype: str,
                 pad: PadChoice, adapters: dict[str, str] | None = None,
                 max_batch_size: int = 32, max_batch_tokens: int = 32768,
                 max_prompt_tokens: int | None = None, max_seq_length: int | None = None,
                 max_new_tokens_limit: int = 2048,
                 max_prefill_tokens: int = 8192, max_bulk_prefill_tokens: int = 512,
                 max_bulk_pause_ms: int = 1000,
                 max_wait_ms_for_bucket: int = 30_000, scheduler: str = "continuous",
                 grammar_cache_size: int = 128, worker_name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.backend = backend
        self.model_name = model_name
        self.dtype = dtype
        self.pad = pad
        self.adapters = dict(adapters or {})
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.max_bulk_prefill_tokens = max_bulk_prefill_tokens
        self.max_bulk_pause_ms = max_bulk_pause_ms
        self.max_wait_ms_for_bucket = max_wait_ms_for_bucket
        self.max_new_tokens_limit = max_new_tokens_limit
        self.worker_name = worker_name
        # the model's context, capped by GENQ_MAX_SEQ_LENGTH and by what the backend accepts
        # (Unsloth cuts longer inputs to its max_seq_length)
        limits = (model_context(model.config), max_seq_length, getattr(model, "max_seq_length", None))
        self.context_length = min(int(limit) for limit in limits if limit)
        self.max_prompt_tokens = max_prompt_tokens
        self.eos_ids = frozenset(eos_ids(tokenizer, model.config) | _generation_eos(model))
        self.device = next(model.parameters()).device
        self.padding_side = "left"  # used by every prefill: Unsloth's for_training flips it
        self.fast_buffers = FastDecodeBuffers(model, enabled=backend == "unsloth"
                                              and self.device.type == "cuda")
        self.continuous_ok = _plain_kv_cache(model)
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; use one of {SCHEDULERS}")
        if scheduler == "continuous" and not self.continuous_ok:
            log.warning("continuous_unsupported", model=model_name,
                        reason="the model's cache has sliding-window or other non-plain layers")
            scheduler = "static"
        self.scheduler_mode = scheduler
        self._adapter: tuple[str | None] | None = None  # the adapter active now (None: base)
        self._special_tokens = special_pattern(tokenizer.added_tokens_decoder)  # user text splits
        self.grammar_cache_size = grammar_cache_size
        self._grammars: Grammars | None = None

    # -- public API -------------------------------------------------------------------

    def generate(self, requests: list[dict[str, Any]], *, is_cancelled=None,
                 scheduler: str | None = None) -> list[dict[str, Any]]:
        """Run every request; return results in the same order (``succeeded`` or ``failed``).

        ``is_cancelled`` (request ids -> flags) is polled every few decode steps; a
        cancelled row stops with ``finish_reason: cancelled`` and the text so far.
        """
        results: list[dict[str, Any] | None] = [None] * len(requests)
        loop = self.scheduler(scheduler)
        index: dict[str, int] = {}
        started = time.time()
        for i, raw in enumerate(requests):
            request_id = _request_id(raw)
            try:
                seq = self.sequence(raw, request_id, submitted_at=started)
            except GenqError as exc:
                results[i] = self.failed(request_id, raw, exc)
                continue
            loop.add(seq)
            index[seq.handle] = i
        iteration = 0
        while not loop.idle:
            finished = loop.step()
            iteration += 1
            if is_cancelled is not None and iteration % 4 == 0:
                rows = [*loop.running, *loop.waiting.values()]
                flags = is_cancelled([s.id for s in rows])
                finished += loop.stop([s.id for s, flag in zip(rows, flags, strict=True) if flag])
            for seq in finished:
                results[index[seq.handle]] = self.result(seq)
        return results  # type: ignore[return-value]

    def scheduler(self, mode: str | None = None) -> Scheduler:
        """A new step loop on this engine (``continuous`` or ``static``; default: settings)."""
        mode = mode or self.scheduler_mode
        if mode not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {mode!r}; use one of {SCHEDULERS}")
        if mode == "continuous" and not self.continuous_ok:
            mode = "static"
        return Scheduler(self, Limits(
            max_rows=self.max_batch_size, max_kv_tokens=self.max_batch_tokens,
            max_prefill_tokens=self.max_prefill_tokens,
            max_bulk_prefill_tokens=self.max_bulk_prefill_tokens,
            max_bulk_pause_s=self.max_bulk_pause_ms / 1000,
            max_wait_s=self.max_wait_ms_for_bucket / 1000, static=mode == "static"))

    def sequence(self, raw: Any, request_id: str | None = None, *, submitted_at: float | None = None,
                 expires_at: float | None = None, suspect: bool = False) -> Sequence:
        """Validate and tokenize one request, once; raises the ``GenqError`` it fails with."""
        request = self._validate(raw)
        ids = self._encode_one(request)
        self._check_length(len(ids), request.max_new_tokens)
        body = raw if isinstance(raw, dict) else {}
        spec = request.grammar_spec
        if request.logprobs:
            self.grammars  # noqa: B018 - token bytes are needed for the result: fail now if not
        return Sequence(
            id=request_id or _request_id(raw), request=request, prompt_ids=ids, body=body,
            submitted_at=time.time() if submitted_at is None else submitted_at,
            expires_at=expires_at, suspect=suspect, sampler=RowSampler.for_request(request),
            stops=StopStrings(request.stop) if request.stop else None,
            grammar=self.grammars.matcher(spec) if spec else None,
            logprobs=[] if request.logprobs else None)

    @property
    def grammars(self) -> Grammars:
        """Compiled ``response_format`` grammars and token bytes (built on first use)."""
        if self._grammars is None:
            out = self.model.get_output_embeddings()
            vocab = int(out.weight.shape[0]) if out is not None else int(self.model.config.vocab_size)
            try:
                self._grammars = Grammars(self.tokenizer, vocab, self.eos_ids,
                                          self.grammar_cache_size)
            except Exception as exc:  # noqa: BLE001 - llguidance raises plain exceptions
                raise InvalidRequest("response_format and logprobs: this model's tokenizer cannot "
                                     f"be read by llguidance ({exc})") from None
        return self._grammars

    @property
    def compiled_grammars(self) -> Grammars | None:
        """The grammar cache if a constrained or logprobs request has built it (metrics)."""
        return self._grammars

    def samples_of(self, seq: Sequence) -> list[Sequence]:
        """Rows for samples 1..n-1 of ``seq``'s request (none when ``n`` is 1)."""
        request = seq.request
        if request.sample_count == 1 or seq.samples:
            return []
        spec = request.grammar_spec
        return seq.siblings(lambda i: RowSampler.for_request(request, i),
                            lambda: self.grammars.matcher(spec) if spec else None)

    def prepare(self, request: dict[str, Any]) -> int:
        """Check one request as ``generate`` will; its prompt token count (no padding)."""
        return self.sequence(request).prompt_tokens

    def result(self, seq: Sequence) -> dict[str, Any]:
        """The contract's result for a finished sequence."""
        token_bytes = self.grammars.token_bytes if seq.logprobs is not None else None
        return seq.result(self.tokenizer, worker=self.worker_name, model=self.model_name,
                          token_bytes=token_bytes)

    def failed(self, request_id: str, body: Any, exc: GenqError) -> dict[str, Any]:
        """The result of a request that failed before it ran."""
        log.info("request_failed", request_id=request_id, code=exc.code, message=exc.message)
        return result_record(request_id, "failed", body, worker=self.worker_name,
                             model=self.model_name, error=exc.as_error())

    def select_adapter(self, adapter: str | None) -> None:
        """Make ``adapter`` (None: the base model) the active weights for the next forward."""
        if self._adapter != (adapter,):
            select_adapter(self.model, adapter, bool(self.adapters))
            self._adapter = (adapter,)

    # -- internals --------------------------------------------------------------------

    def _validate(self, raw: Any) -> GenerationRequest:
        body = {k: v for k, v in raw.items() if k != "id"} if isinstance(raw, dict) else raw
        request = validate_request(body, max_new_tokens_limit=self.max_new_tokens_limit)
        if request.adapter is not None and request.adapter not in self.adapters:
            raise InvalidRequest(f"adapter: no adapter {request.adapter!r} on this worker")
        return request

    def _encode_one(self, request: GenerationRequest) -> list[int]:
        try:
            return encode(self.tokenizer, [request], self._special_tokens)[0]
        except Exception as exc:
            raise InvalidRequest(f"the prompt cannot be rendered: {type(exc).__name__}: {exc}") from None

    def _check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens == 0:
            raise PromptTooLong("the prompt renders to no tokens")
        if self.max_prompt_tokens and prompt_tokens > self.max_prompt_tokens:
            raise PromptTooLong(
                f"prompt has {prompt_tokens} tokens; the limit is {self.max_prompt_tokens}")
        if prompt_tokens + max_new_tokens > self.context_length:
            raise PromptTooLong(
                f"prompt has {prompt_tokens} tokens + max_new_tokens {max_new_tokens} > "
                f"context {self.context_length}")


def _request_id(raw: Any) -> str:
    return str(raw.get("id") or uuid.uuid4()) if isinstance(raw, dict) else str(uuid.uuid4())


def _plain_kv_cache(model) -> bool:
    """Whether every layer's cache is a plain growing one (rows can be merged and cut)."""
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config transformers cannot build a cache for: no merging
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _generation_eos(model) -> set[int]:
    """EOS ids the generation config stops on (chat models list their turn-end token)."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(value, int):
        return {value}
    return {v for v in value or [] if isinstance(v, int)}


def load_engine(model: str = "demo", backend: str = "auto", dtype: str | None = None,
                adapters: dict[str, str] | None = None, **settings: Any) -> Engine:
    """Load a model with its tokenizer rules applied, ready for ``Engine.generate``.

    ``settings`` are any of the ``GENQ_`` settings in lower case (``max_batch_size``,
    ``max_batch_tokens``, ``max_prompt_tokens``, ``max_seq_length``, ``max_new_tokens_limit``,
    ``scheduler``, ``max_prefill_tokens``, ``cache_dir``, ``load_in_4bit``, ...); the rest
    default from the environment. The model's own generation config keeps only its token ids:
    each request's settings are the only ones applied.
    """
    from worker.ops.settings import Settings

    worker_name = settings.pop("worker_name", None)
    config = Settings(model=model, backend=backend, dtype=dtype, adapters=adapters or {}, **settings)
    loaded = load_model(config.model, config.backend, config.dtype, Path(config.cache_dir),
                        load_in_4bit=config.load_in_4bit, max_seq_length=config.max_seq_length)
    dropped = neutralise_generation_config(loaded.model)
    if dropped:
        log.info("generation_config_neutralised", model=loaded.model_name, dropped=dropped)
    pad = apply_pad_token(loaded.tokenizer, loaded.model)
    log.info("pad_token_chosen", token=pad.token, token_id=pad.token_id, reason=pad.reason,
             eos_ids=sorted(eos_ids(loaded.tokenizer, loaded.model.config)))
    load_adapters(loaded.model, config.adapters)
    return Engine(
        loaded.model, loaded.tokenizer, backend=loaded.backend, model_name=loaded.model_name,
        dtype=loaded.dtype, pad=pad, adapters=config.adapters,
        max_batch_size=config.max_batch_size, max_batch_tokens=config.max_batch_tokens,
        max_prompt_tokens=config.max_prompt_tokens, max_seq_length=config.max_seq_length,
        max_new_tokens_limit=config.max_new_tokens_limit,
        max_prefill_tokens=config.max_prefill_tokens,
        max_bulk_prefill_tokens=config.max_bulk_prefill_tokens,
        max_bulk_pause_ms=config.max_bulk_pause_ms,
        max_wait_ms_for_bucket=config.max_wait_ms_for_bucket, scheduler=config.scheduler,
        grammar_cache_size=config.grammar_cache_size, worker_name=worker_name,
    )
