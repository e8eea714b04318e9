"""The pad-token rule on tokenizers that mimic real families, built in fixtures."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from worker.engine.padding import apply_pad_token, check_pad_token, choose_pad_token, eos_ids

WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "[UNK]"]


def make_tokenizer(specials: list[str], **roles) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose special tokens follow the words, in the given order."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_special_tokens({"additional_special_tokens": specials})
    for role, token in roles.items():
        setattr(tok, role, token)
    return tok


def llama3_0():
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(251)]
    return make_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", *reserved],
                          bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def llama3_1():
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(8)]
    return make_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                           "<|eot_id|>", *reserved],
                          bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def qwen():
    return make_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                          eos_token="<|im_end|>", pad_token="<|endoftext|>")


def test_llama3_0_gets_highest_reserved_token():
    tok = llama3_0()
    assert tok.pad_token is None
    choice = choose_pad_token(tok)
    assert choice.token == "<|reserved_special_token_250|>"
    assert choice.token_id == tok.convert_tokens_to_ids("<|reserved_special_token_250|>")
    assert choice.token_id not in eos_ids(tok)


def test_llama3_1_gets_finetune_right_pad():
    tok = llama3_1()
    tok.pad_token = tok.eos_token  # the classic mistake: pad == eos
    choice = choose_pad_token(tok)
    assert choice.token == "<|finetune_right_pad_id|>"


def test_qwen_keeps_its_distinct_pad():
    tok = qwen()
    choice = choose_pad_token(tok)
    assert (choice.token, choice.reason) == ("<|endoftext|>", "kept the tokenizer's pad token")


def test_model_config_eos_counts_as_eos():
    tok = qwen()
    config = LlamaConfig(vocab_size=len(tok), eos_token_id=[tok.convert_tokens_to_ids("<|endoftext|>")])
    choice = choose_pad_token(tok, config)
    assert choice.token != "<|endoftext|>"
    assert choice.token_id not in eos_ids(tok, config)


def test_falls_back_to_unk_when_no_spare_special_token():
    tok = make_tokenizer(["<s>", "</s>"], bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    choice = choose_pad_token(tok)
    assert choice.token == "[UNK]" and not choice.added


def test_adds_a_token_and_resizes_embeddings_as_last_resort():
    tok = make_tokenizer(["<s>", "</s>"], bos_token="<s>", eos_token="</s>")
    tok.unk_token = None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    before = len(tok)
    choice = apply_pad_token(tok, model)
    assert choice.added
    assert len(tok) == before + 1
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert model.config.pad_token_id == tok.pad_token_id == choice.token_id
    assert tok.pad_token_id not in eos_ids(tok, model.config)


def test_apply_sets_tokenizer_model_and_generation_config_and_left_padding():
    tok = llama3_1()
    tok.padding_side = "right"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    choice = apply_pad_token(tok, model)
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert model.config.pad_token_id == choice.token_id
    assert model.generation_config.pad_token_id == choice.token_id
    assert tok.padding_side == "left"
    check_pad_token(tok, model.config)  # does not raise


def test_check_pad_token_names_the_collision():
    tok = llama3_1()
    tok.pad_token = "<|eot_id|>"
    with pytest.raises(ValueError, match=r"pad token <\|eot_id\|> equals EOS"):
        check_pad_token(tok)


def test_left_padding_puts_pads_before_the_prompt():
    tok = qwen()
    tok.padding_side = "right"
    batch = tok.pad({"input_ids": [[0 + 1, 2], [3]]}, padding=True, padding_side="left",
                    return_tensors="pt")
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[1, 2], [pad, 3]]
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1], [0, 1]]))
