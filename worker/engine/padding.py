"""The pad-token rule and left padding: the one bug genqueue exists to never have.

A pad equal to EOS makes finished rows and padding indistinguishable; right padding puts pads
between the prompt and the answer. So on load we pick a pad distinct from every EOS, in the
order ``unsloth_zoo.pad_token.fix_pad_token`` uses, and every batch is padded on the left.
"""

from __future__ import annotations

from dataclasses import dataclass

# Known pad-like tokens, most specific first (Llama 3.1, Llama 4, Gemma/Mistral Nemo, ...).
KNOWN_PADS = (
    "<|finetune_right_pad_id|>",
    "<|finetune_right_pad|>",
    "<pad>",
    "[PAD]",
    "<PAD>",
    "<|endoftext|>",
    "<fim_pad>",
)
# Prefixes of reserved tokens that a model never generates; the highest id wins
# (Llama 3.0: <|reserved_special_token_250|>, 128255).
RESERVED_PREFIXES = ("<|reserved", "<|placeholder", "<|dummy_", "[control", "<unused", "<SPECIAL_")
ADDED_PAD = "<|genq_pad|>"


@dataclass(frozen=True)
class PadChoice:
    """The chosen pad token and why; ``added`` means the embeddings must grow."""

    token: str
    token_id: int
    reason: str
    added: bool = False


def eos_ids(tokenizer, model_config=None) -> set[int]:
    """Every EOS id the tokenizer or model config declares (the generation config's extra
    stop ids are left out: Qwen's pad ``<|endoftext|>`` is legitimately listed there)."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(model_config, "eos_token_id", None)):
        if isinstance(value, int) and not isinstance(value, bool):
            ids.add(value)
        elif isinstance(value, (list, tuple, set)):
            ids.update(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return ids


def _usable(token_id: int | None, bad: set[int], vocab_size: int) -> bool:
    return token_id is not None and token_id >= 0 and token_id < vocab_size and token_id not in bad


def choose_pad_token(tokenizer, model_config=None) -> PadChoice:
    """Pick a pad token distinct from every EOS id; never changes the tokenizer.

    Order: the current pad if valid; a known pad token; the highest-id reserved token;
    unk; the model config's pad id; else a new token (the caller resizes embeddings).
    """
    bad = eos_ids(tokenizer, model_config)
    vocab_size = len(tokenizer)
    if model_config is not None and getattr(model_config, "vocab_size", None):
        vocab_size = min(vocab_size, model_config.vocab_size)
    current = tokenizer.pad_token_id
    if tokenizer.pad_token is not None and _usable(current, bad, vocab_size):
        return PadChoice(tokenizer.pad_token, current, "kept the tokenizer's pad token")

    vocab = tokenizer.get_vocab()
    for token in KNOWN_PADS:
        token_id = vocab.get(token)
        if _usable(token_id, bad, vocab_size):
            return PadChoice(token, token_id, f"known pad token {token}")

    reserved = [
        (token_id, token)
        for token, token_id in tokenizer.get_added_vocab().items()
        if token.startswith(RESERVED_PREFIXES) and _usable(token_id, bad, vocab_size)
    ]
    if reserved:
        token_id, token = max(reserved)
        return PadChoice(token, token_id, f"highest reserved token {token}")

    if tokenizer.unk_token is not None and _usable(tokenizer.unk_token_id, bad, vocab_size):
        return PadChoice(tokenizer.unk_token, tokenizer.unk_token_id, "unk token")

    config_pad = getattr(model_config, "pad_token_id", None)
    if isinstance(config_pad, int) and _usable(config_pad, bad, vocab_size):
        token = tokenizer.convert_ids_to_tokens(config_pad)
        return PadChoice(token, config_pad, "model config's pad id")

    return PadChoice(ADDED_PAD, len(tokenizer), "no spare token: added one", added=True)


def apply_pad_token(tokenizer, model=None) -> PadChoice:
    """Choose the pad, then set it on the tokenizer, model config and generation config.

    Adds a token and resizes the embeddings only as a last resort.
    """
    config = getattr(model, "config", None)
    choice = choose_pad_token(tokenizer, config)
    if choice.added:
        tokenizer.add_special_tokens({"pad_token": choice.token})
        if model is not None:
            model.resize_token_embeddings(len(tokenizer))
        choice = PadChoice(choice.token, tokenizer.convert_tokens_to_ids(choice.token),
                           choice.reason, added=True)
    else:
        tokenizer.pad_token = choice.token
    tokenizer.padding_side = "left"
    if model is not None:
        model.config.pad_token_id = choice.token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = choice.token_id
    return choice


def check_pad_token(tokenizer, model_config=None) -> None:
    """Raise ``ValueError`` if the tokenizer's pad is missing or equals an EOS id."""
    bad = eos_ids(tokenizer, model_config)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token")
    if tokenizer.pad_token_id in bad:
        raise ValueError(f"pad token {tokenizer.pad_token} equals EOS")
