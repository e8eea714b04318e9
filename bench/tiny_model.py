"""A tiny random-weight Llama with the demo tokenizer: real code paths, no download, fast (the
control-plane benchmark and the plumbing tests run on it)."""

from __future__ import annotations

from pathlib import Path


def tiny_llama(tokenizer):
    """A 2-layer random-weight Llama (seed 0) for ``tokenizer``'s vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(cache_dir: Path, out: Path) -> Path:
    """``tiny_llama`` with the demo model's tokenizer (from ``cache_dir``) saved to ``out``."""
    from transformers import AutoTokenizer

    from worker.engine.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir(cache_dir))
    tiny_llama(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
