"""The engine: one request-side surface over a backend that owns the model and its KV cache.

No queue here. ``Engine.sequence`` validates and tokenizes a request once (a bad one raises
and fails alone); ``Engine.scheduler`` returns the backend's step loop, which takes sequences
(``add``), runs one step at a time (``step`` returns the requests that finished) and ends
requests early (``stop``, ``expire``); ``Engine.generate(list)`` is that loop run to the end
over a list, results in input order. Two backends implement it:

- ``StepLoopEngine`` (``worker.engine.steploop``): our own loop over a torch model, through
  Unsloth or plain transformers (left-padded, attention-masked lanes);
- ``VllmEngine`` (``worker.engine.vllm_engine``): vLLM's engine stepped in-process (paged
  KV, prefix caching, chunked prefill), our policy deciding which requests enter it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog

from worker.engine.grammar import Grammars
from worker.engine.padding import PadChoice
from worker.engine.policy import Limits
from worker.engine.prompts import encode
from worker.engine.sequence import Sequence
from worker.errors import GenqError, InvalidRequest, PromptTooLong
from worker.schema import GenerationRequest, result_record, validate_request
from worker.tokencount import special_pattern

__all__ = ["BACKENDS", "Engine", "load_engine"]

log = structlog.get_logger(__name__)
SCHEDULERS = ("continuous", "static")
BACKENDS = ("auto", "vllm", "unsloth", "transformers")


class Engine:
    """A loaded model behind the request-side rules every backend shares. Build one with
    ``load_engine``; a backend subclass supplies ``scheduler`` and each row's own state."""

    backend: str

    def __init__(self, tokenizer, config, *, model, model_name: str, model_path: str, dtype: str,
                 pad: PadChoice, device, context_length: int, eos_ids: frozenset[int],
                 vocab_size: int, adapters: dict[str, str] | None = None,
                 max_batch_size: int = 32, max_batch_tokens: int = 32768,
                 max_prompt_tokens: int | None = None, max_new_tokens_limit: int = 2048,
                 max_prefill_tokens: int = 8192, max_bulk_prefill_tokens: int = 512,
                 max_bulk_pause_ms: int = 1000, max_wait_ms_for_bucket: int = 30_000,
                 scheduler: str = "continuous", grammar_cache_size: int = 128,
                 worker_name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config  # the model's Hugging Face config
        self.model_name = model_name
        self.model_path = model_path
        self.dtype = dtype
        self.pad = pad
        self.device = device
        self.context_length = context_length
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self.adapters = dict(adapters or {})
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.max_bulk_prefill_tokens = max_bulk_prefill_tokens
        self.max_bulk_pause_ms = max_bulk_pause_ms
        self.max_wait_ms_for_bucket = max_wait_ms_for_bucket
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens_limit = max_new_tokens_limit
        self.worker_name = worker_name
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; use one of {SCHEDULERS}")
        self.scheduler_mode = scheduler
        self.padding_side = "left"  # used by every prefill: Unsloth's for_training flips it
        self._special_tokens = special_pattern(tokenizer.added_tokens_decoder)  # user text splits
        self.grammar_cache_size = grammar_cache_size
        self._grammars: Grammars | None = None

    # -- public API -------------------------------------------------------------------

    def generate(self, requests: list[dict[str, Any]], *, is_cancelled=None,
                 scheduler: str | None = None, on_finished=None) -> list[dict[str, Any]]:
        """Run every request; return results in the same order (``succeeded`` or ``failed``).

        ``is_cancelled`` (request ids -> flags) is polled every few steps; a cancelled row
        stops with ``finish_reason: cancelled`` and the text so far. ``on_finished(n)`` is
        called with how many requests have finished so far, after each step that ends some.
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
            if finished and on_finished is not None:
                on_finished(sum(r is not None for r in results))
        return results  # type: ignore[return-value]

    def scheduler(self, mode: str | None = None):
        """A new step loop on this engine (``continuous`` or ``static``; default: settings)."""
        raise NotImplementedError

    def limits(self, static: bool = False) -> Limits:
        """The admission budgets from this engine's settings."""
        return Limits(
            max_rows=self.max_batch_size, max_kv_tokens=self.max_batch_tokens,
            max_prefill_tokens=self.max_prefill_tokens,
            max_bulk_prefill_tokens=self.max_bulk_prefill_tokens,
            max_bulk_pause_s=self.max_bulk_pause_ms / 1000,
            max_wait_s=self.max_wait_ms_for_bucket / 1000, static=static)

    def sequence(self, raw: Any, request_id: str | None = None, *, submitted_at: float | None = None,
                 expires_at: float | None = None, suspect: bool = False) -> Sequence:
        """Validate and tokenize one request, once; raises the ``GenqError`` it fails with."""
        request = self._validate(raw)
        ids = self._encode_one(request)
        self._check_length(len(ids), request.max_new_tokens)
        if request.logprobs:
            self.grammars  # noqa: B018 - token bytes are needed for the result: fail now if not
        state = self.row_state(request)
        spec = request.grammar_spec
        return Sequence(
            id=request_id or _request_id(raw), request=request, prompt_ids=ids,
            body=raw if isinstance(raw, dict) else {},
            submitted_at=time.time() if submitted_at is None else submitted_at,
            expires_at=expires_at, suspect=suspect, logprobs=[] if request.logprobs else None,
            closer=self.grammars.closer(spec, request.max_new_tokens) if spec else None, **state)

    def row_state(self, request: GenerationRequest, sample: int = 0) -> dict[str, Any]:
        """The backend's own per-row fields of a new ``Sequence`` (sampler, stops, grammar)."""
        return {}

    @property
    def grammars(self) -> Grammars:
        """Compiled ``response_format`` grammars and token bytes (built on first use)."""
        if self._grammars is None:
            try:
                self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids,
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
        if seq.request.sample_count == 1 or seq.samples:
            return []
        return seq.siblings(lambda i: self.row_state(seq.request, i))

    def prepare(self, request: dict[str, Any]) -> int:
        """Check one request as ``generate`` will; its prompt token count (no padding)."""
        return self.sequence(request).prompt_tokens

    def result(self, seq: Sequence) -> dict[str, Any]:
        """The contract's result for a finished sequence (a constrained row the budget cut
        is closed first: ``Sequence.close_cut``)."""
        for row in seq.samples or [seq]:
            row.close_cut()
        token_bytes = self.grammars.token_bytes if seq.logprobs is not None else None
        return seq.result(self.tokenizer, worker=self.worker_name, model=self.model_name,
                          token_bytes=token_bytes)

    def failed(self, request_id: str, body: Any, exc: GenqError) -> dict[str, Any]:
        """The result of a request that failed before it ran."""
        log.info("request_failed", request_id=request_id, code=exc.code, message=exc.message)
        return result_record(request_id, "failed", body, worker=self.worker_name,
                             model=self.model_name, error=exc.as_error())

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


def generation_eos(generation_config) -> set[int]:
    """EOS ids a generation config stops on (chat models list their turn-end token)."""
    value = getattr(generation_config, "eos_token_id", None)
    if isinstance(value, int):
        return {value}
    return {v for v in value or [] if isinstance(v, int)}


def engine_settings(config) -> dict[str, Any]:
    """The admission settings every backend's ``Engine`` takes from ``Settings`` (a setting
    left unset keeps the ``Engine``'s default, or the one its backend gives)."""
    return config.model_dump(exclude_none=True, include={
        "max_batch_size", "max_batch_tokens", "max_prompt_tokens", "max_new_tokens_limit",
        "max_prefill_tokens", "max_bulk_prefill_tokens", "max_bulk_pause_ms",
        "max_wait_ms_for_bucket", "grammar_cache_size"})


def load_engine(model: str = "demo", backend: str = "auto", dtype: str | None = None,
                adapters: dict[str, str] | None = None, **settings: Any) -> Engine:
    """Load a model with its tokenizer rules applied, ready for ``Engine.generate``.

    ``backend``: ``vllm``, ``unsloth``, ``transformers``, or ``auto`` (vLLM when it is
    installed and loads the model, else Unsloth, else transformers; the reason is logged).
    ``settings`` are any of the ``GENQ_`` settings in lower case (``max_batch_size``,
    ``max_batch_tokens``, ``max_prompt_tokens``, ``max_seq_length``, ``max_new_tokens_limit``,
    ``scheduler``, ``max_prefill_tokens``, ``cache_dir``, ``load_in_4bit``, ``vllm_options``,
    ...); the rest default from the environment. The model's own generation config keeps only
    its token ids: each request's settings are the only ones applied.
    """
    from worker.ops.settings import Settings

    worker_name = settings.pop("worker_name", None)
    config = Settings(model=model, backend=backend, dtype=dtype, adapters=adapters or {}, **settings)
    from worker.engine.loading import check_model

    check_model(config.model, config.cache_dir)  # two lines, once, before any backend tries
    if config.backend in ("auto", "vllm"):
        from worker.engine.loading import ModelUnavailable
        from worker.engine.vllm_engine import STEP_LOOP_FIX, load_vllm_engine, vllm_unusable

        reason = vllm_unusable(config)
        if reason is None:
            try:
                return load_vllm_engine(config, worker_name)
            except ModelUnavailable as exc:  # an adapter vLLM cannot load
                if config.backend == "vllm":
                    raise
                reason = exc.lines[0]
            except Exception as exc:
                if config.backend == "vllm":
                    raise
                reason = f"vLLM could not load the model: {type(exc).__name__}: {str(exc)[:300]}"
        if config.backend == "vllm":  # the worker exits, and is not restarted (EX_MODEL_UNAVAILABLE)
            raise ModelUnavailable(f"GENQ_BACKEND=vllm, but {reason}", STEP_LOOP_FIX)
        log.info("vllm_not_used", reason=reason)
    from worker.engine.steploop import load_step_loop_engine

    return load_step_loop_engine(config, worker_name)
