"""GPU engine benchmark (run by bench/gpu.sh on one NVIDIA GPU; no download needed).

A Llama-3-architecture model (Llama-3.2-1B shapes) built from a config with random weights,
bf16, greedy, 64 prompts of mixed lengths (30-250 tokens). Random weights never emit EOS (EOS
is disabled anyway), so every row generates exactly its max_new_tokens.

1. Uniform: 64 new tokens each: one request at a time vs genqueue-style static batches
   (length-sorted, left-padded, attention mask, pad distinct from EOS, ``model.generate``) vs
   transformers' continuous batching (``generate_batch``).
2. Mixed: the same prompts, each with max_new_tokens drawn from 16/64/256 (seeded): genqueue's
   engine with its static scheduler vs its continuous scheduler (same requests, one process),
   vs transformers' continuous batching with the same per-request max_new_tokens, vs
   genqueue's vLLM backend (vLLM's engine stepped in this process, our admission policy; the
   model saved to a temporary folder first, then freed with everything the torch runs held on
   the GPU; skipped with a note when vLLM is not installed).

``--cpu-smoke`` runs the same code paths with a tiny model on the CPU in seconds.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import tempfile
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bench.schedulers import run_scheduler
from worker.engine.batching import Row, plan_batches
from worker.engine.padding import PadChoice
from worker.engine.steploop import StepLoopEngine


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--alone", type=int, default=8, help="requests timed one at a time")
    ap.add_argument("--sizes", default="8,16,32,64")
    ap.add_argument("--mixed-tokens", default="16,64,256", help="max_new_tokens drawn from")
    ap.add_argument("--mixed-sizes", default="16,32,64", help="genqueue batch sizes, mixed part")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny random model on the CPU, small sizes: proves the code paths")
    args = ap.parse_args()
    if args.cpu_smoke:
        args.requests, args.new_tokens, args.alone = 8, 8, 2
        args.sizes, args.mixed_tokens, args.mixed_sizes = "4", "4,8,16", "4"
    return args


def build_model(smoke: bool) -> tuple[LlamaForCausalLM, str, torch.dtype]:
    torch.manual_seed(0)
    if smoke:
        config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,  # head_dim
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,  # 64
                             max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                             pad_token_id=3, tie_word_embeddings=True)
        device, dtype = "cpu", torch.float32
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU (or --cpu-smoke)"
        config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                             max_position_embeddings=8192, rope_theta=500000.0,
                             bos_token_id=128000, eos_token_id=128009, pad_token_id=128004,
                             tie_word_embeddings=True)
        device, dtype = "cuda", torch.bfloat16
    return LlamaForCausalLM(config).to(device, dtype).eval(), device, dtype


def word(token_id: int) -> str:
    return f"t{token_id:06d}"


def id_tokenizer(vocab_size: int, pad: int, eos: int) -> PreTrainedTokenizerFast:
    """A tokenizer built in memory where the text ``"t000005 t000017"`` is the ids [5, 17]:
    genqueue's engine tokenizes, pads and decodes with it (no download). Fixed-width names:
    special tokens match inside words, so none may be a prefix of another."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({word(i): i for i in range(vocab_size)}, unk_token=word(0)))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=word(pad), eos_token=word(eos))


def genqueue_engine(model, pad: int, eos: int, dtype: torch.dtype) -> StepLoopEngine:
    """genqueue's engine around the random model; EOS disabled (as min_new_tokens does for
    ``generate``), batches bounded by rows only."""
    config = model.config
    engine = StepLoopEngine(model, id_tokenizer(config.vocab_size, pad, eos), backend="transformers",
                    model_name="random-llama3", dtype=str(dtype).removeprefix("torch."),
                    pad=PadChoice(token=word(pad), token_id=pad, reason="config pad"),
                    max_batch_tokens=10**9, max_prefill_tokens=16384)
    engine.eos_ids = frozenset()
    return engine


def cb_options(smoke: bool) -> dict:
    """Extra arguments for transformers' continuous batching: on the CPU a small KV cache (its
    default sizing is for a GPU's free memory); on a GPU its own defaults."""
    if not smoke:
        return {}
    from transformers import ContinuousBatchingConfig

    return {"continuous_batching_config": ContinuousBatchingConfig(
        block_size=32, num_blocks=256, max_batch_tokens=2048)}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[object, float]:
    synchronize()
    t0 = time.perf_counter()
    out = fn()
    synchronize()
    return out, time.perf_counter() - t0


def hf_continuous(model, prompts: list[list[int]], news: list[int], pad: int, options: dict,
                  timeout_s: float = 300.0) -> tuple[int, float]:
    """transformers' continuous batching with a max_new_tokens per request (its manager, as
    ``generate_batch`` uses it): (generated tokens, seconds from the first add to the last
    result; the manager's own warm-up, CUDA graph capture, runs before and is not timed)."""
    cfg = GenerationConfig(max_new_tokens=max(news), do_sample=False, pad_token_id=pad)
    kwargs = dict(options)
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        kwargs["workload_hints"] = WorkloadHints(max_prompt_length=max(map(len, prompts)),
                                                 max_generated_length=max(news),
                                                 num_requests=len(prompts))
    except ImportError:
        pass
    with model.continuous_batching_context_manager(generation_config=cfg, block=True, timeout=30,
                                                   **kwargs) as manager:
        synchronize()
        t0 = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=m) for p, m in zip(prompts, news, strict=True)]
        if any(i is None for i in ids):
            raise RuntimeError("the manager refused a request")
        done = {}
        while len(done) < len(ids):
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"{len(done)} of {len(ids)} done after {timeout_s} s")
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("the generation thread stopped")
                continue
            if result.is_finished():
                done[result.request_id] = result
        synchronize()
        secs = time.perf_counter() - t0
    errors = [r.error for r in done.values() if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return sum(len(r.generated_tokens) for r in done.values()), secs


class Report:
    """Prints each row as soon as it is measured (a timeout keeps what was printed)."""

    def __init__(self) -> None:
        self.alone: float | None = None

    def header(self, title: str) -> None:
        print(f"\n{title}\n{'setup':<52} {'tok/s':>10} {'vs alone':>9}  note", flush=True)

    def row(self, name: str, rate: float | None, note: str = "") -> None:
        if rate is None:
            print(f"{name:<52} {'-':>10} {'':>9}  {note}", flush=True)
            return
        vs = f"{rate / self.alone:>8.1f}x" if self.alone else f"{'':>9}"
        print(f"{name:<52} {rate:>10.1f} {vs}  {note}", flush=True)


def uniform_part(model, prompts: list[list[int]], args, pad: int, report: Report) -> None:
    """One at a time vs length-sorted static batches vs ``generate_batch``, args.new_tokens each."""
    new = args.new_tokens
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)
    device = model.device

    def static(batch: list[list[int]]) -> int:
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen)
        return (out.shape[1] - width) * len(batch)

    static(prompts[:2])  # warm-up
    report.header(f"1. uniform: {len(prompts)} prompts x {new} new tokens")
    tokens, secs = timed(lambda: sum(static([p]) for p in prompts[:args.alone]))
    report.alone = tokens / secs
    report.row("one at a time", report.alone)
    for size in map(int, args.sizes.split(",")):
        plan = plan_batches([Row(i, len(p), new) for i, p in enumerate(prompts)], size, 10**9)
        tokens, secs = timed(lambda plan=plan: sum(static([prompts[r.index] for r in b]) for b in plan))
        report.row(f"static batch {size} (length-sorted, generate)", tokens / secs)
    cfg = GenerationConfig(**gen)
    try:
        options = cb_options(args.cpu_smoke)
        model.generate_batch(inputs=prompts[:4], generation_config=cfg, **options)  # warm-up
        outputs, secs = timed(lambda: model.generate_batch(inputs=prompts, generation_config=cfg,
                                                           **options))
        done = sum(len(o.generated_tokens) for o in outputs.values()) if isinstance(outputs, dict) else 0
        report.row("transformers continuous batching (generate_batch)", done / secs)
    except Exception as exc:  # report, do not hide
        report.row("transformers continuous batching (generate_batch)", None,
                   f"unavailable: {type(exc).__name__}: {exc}"[:160])


def mixed_part(model, prompts: list[list[int]], args, pad: int, eos: int, dtype: torch.dtype,
               report: Report) -> list[dict]:
    """genqueue static vs continuous scheduler vs transformers' continuous batching, each
    prompt with its own max_new_tokens (drawn from args.mixed_tokens, seeded); the requests."""
    rng = random.Random(1)
    choices = [int(c) for c in args.mixed_tokens.split(",")]
    news = [rng.choice(choices) for _ in prompts]
    requests = [{"prompt": " ".join(map(word, p)), "max_new_tokens": m}
                for p, m in zip(prompts, news, strict=True)]
    engine = genqueue_engine(model, pad, eos, dtype)
    for i, r in enumerate(requests[:4]):
        assert engine.sequence(r).prompt_ids == prompts[i], "the id tokenizer does not round-trip"
    report.header(f"2. mixed: {len(prompts)} prompts, max_new_tokens from {choices} "
                  f"({sum(news)} tokens in all)")
    run_scheduler(engine, [{**r, "max_new_tokens": 4} for r in requests[:4]], "continuous")
    for size in map(int, args.mixed_sizes.split(",")):
        engine.max_batch_size = size
        runs = {}
        for mode in ("static", "continuous"):
            runs[mode] = run = run_scheduler(engine, requests, mode)
            assert run["tokens"] == sum(news), f"{mode}: {run['tokens']} tokens, not {sum(news)}"
            note = f"useful rows {run['useful']:.0%}, {run['steps']} steps"
            if mode == "continuous":
                same = sum(a["text"] == b["text"] for a, b in
                           zip(runs["static"]["results"], run["results"], strict=True))
                note += (f", {run['tok_s'] / runs['static']['tok_s']:.2f}x static, "
                         f"{same}/{len(requests)} texts as static")
                if dtype == torch.bfloat16:
                    note += " (bf16: may differ)"
            report.row(f"genqueue {run['mode']} scheduler, batch {size}", run["tok_s"], note)
    try:
        tokens, secs = hf_continuous(model, prompts, news, pad, cb_options(args.cpu_smoke))
        report.row("transformers continuous batching (per-request max)", tokens / secs,
                   f"{tokens} tokens")
    except Exception as exc:  # report, do not hide
        report.row("transformers continuous batching (per-request max)", None,
                   f"unavailable: {type(exc).__name__}: {exc}"[:160])
    return requests


def vllm_part(folder: str, dtype: torch.dtype, requests: list[dict], args, report: Report) -> None:
    """The mixed requests on genqueue's vLLM backend (the model saved in ``folder``), at each
    of ``args.mixed_sizes``."""
    from worker.engine import load_engine

    sizes = list(map(int, args.mixed_sizes.split(",")))
    try:  # half of the GPU: room for what CUDA and torch still hold after the runs above
        engine = load_engine(folder, backend="vllm", dtype=str(dtype).removeprefix("torch."),
                             max_batch_size=max(sizes), max_batch_tokens=10**9,
                             vllm_options={"gpu_memory_utilization": 0.5} if not args.cpu_smoke else {})
    except Exception as exc:  # report, do not hide
        report.row("genqueue vLLM backend", None, f"unavailable: {type(exc).__name__}: {exc}"[:160])
        return
    engine.eos_ids = frozenset()  # as for the step loop (the tokenizer's EOS still ends a row)
    try:
        run_scheduler(engine, [{**r, "max_new_tokens": 4} for r in requests[:4]], "continuous")
        for size in sizes:
            engine.max_batch_size = size
            run = run_scheduler(engine, requests, "continuous")
            report.row(f"genqueue vLLM backend, batch {size}", run["tok_s"],
                       f"{run['tokens']} tokens, {run['steps']} steps")
    except Exception as exc:  # report, do not hide
        report.row("genqueue vLLM backend", None, f"failed: {type(exc).__name__}: {exc}"[:160])


def main() -> None:
    args = parse_args()
    model, device, dtype = build_model(args.cpu_smoke)
    config = model.config
    rng = random.Random(0)
    low, high = (10, config.vocab_size) if args.cpu_smoke else (1000, 120000)
    prompts = [[rng.randrange(low, high) for _ in range(rng.randint(30, 250))]
               for _ in range(args.requests)]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run)"
    print(f"{name}  torch {torch.__version__}  model: Llama-3 arch, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f}B params, "
          f"{str(dtype).removeprefix('torch.')}", flush=True)
    report = Report()
    uniform_part(model, prompts, args, config.pad_token_id, report)
    requests = mixed_part(model, prompts, args, config.pad_token_id, config.eos_token_id, dtype,
                          report)
    if importlib.util.find_spec("vllm") is None:
        report.row("genqueue vLLM backend", None, "unavailable: vllm is not installed")
        return
    with tempfile.TemporaryDirectory(prefix="random-llama3-") as folder:
        model.save_pretrained(folder)
        id_tokenizer(config.vocab_size, config.pad_token_id, config.eos_token_id).save_pretrained(folder)
        del model  # the last reference (the step-loop engine ended with mixed_part)
        gc.collect()
        torch.cuda.empty_cache()  # vLLM checks the GPU's free memory when it starts
        vllm_part(folder, dtype, requests, args, report)


if __name__ == "__main__":
    main()
