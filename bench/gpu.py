"""GPU engine benchmark (run by bench/gpu.sh on one NVIDIA GPU; no download needed).

A Llama-3-architecture model (Llama-3.2-1B shapes) built from a config with random weights,
bf16, greedy, 64 prompts of mixed lengths (30-250 tokens), 64 new tokens each:
one request at a time vs genqueue-style static batches (length-sorted, left-padded,
attention mask, pad distinct from EOS) vs transformers' continuous batching (generate_batch).
Random weights never emit EOS, so every row generates exactly max_new_tokens.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from worker.engine.batching import Row, plan_batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--alone", type=int, default=8, help="requests timed one at a time")
    ap.add_argument("--sizes", default="8,16,32,64")
    args = ap.parse_args()

    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=128000, eos_token_id=128009, pad_token_id=128004,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 120000) for _ in range(rng.randint(30, 250))]
               for _ in range(args.requests)]
    pad, new = config.pad_token_id, args.new_tokens
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)

    def static(batch: list[list[int]]) -> int:
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), **gen)
        return (out.shape[1] - width) * len(batch)

    def timed(fn) -> tuple[int, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = fn()
        torch.cuda.synchronize()
        return tokens, time.perf_counter() - t0

    static(prompts[:2])  # warm-up
    rows = []
    tokens, secs = timed(lambda: sum(static([p]) for p in prompts[:args.alone]))
    alone = tokens / secs
    rows.append(("one at a time", alone))
    for size in map(int, args.sizes.split(",")):
        plan = plan_batches([Row(i, len(p), new) for i, p in enumerate(prompts)], size, 10**9)
        tokens, secs = timed(lambda plan=plan: sum(static([prompts[r.index] for r in b]) for b in plan))
        rows.append((f"static batch {size} (length-sorted)", tokens / secs))
    cfg = GenerationConfig(**gen)
    try:
        model.generate_batch(inputs=prompts[:4], generation_config=cfg)  # warm-up
        outputs, secs = timed(lambda: model.generate_batch(inputs=prompts, generation_config=cfg))
        done = sum(len(o.generated_tokens) for o in outputs.values()) if isinstance(outputs, dict) else 0
        rows.append(("continuous batching (generate_batch)", done / secs))
    except Exception as exc:  # report, do not hide
        rows.append((f"continuous batching failed: {type(exc).__name__}: {exc}"[:100], 0.0))

    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"model: Llama-3 arch, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, bf16")
    print(f"{'setup':<45} {'tok/s':>10} {'vs alone':>9}")
    for name, rate in rows:
        print(f"{name:<45} {rate:>10.1f} {rate / alone:>8.1f}x")


if __name__ == "__main__":
    main()
