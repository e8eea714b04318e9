"""Model loading: the ``unsloth`` and ``transformers`` backends, ``auto``, and LoRA adapters.

Unsloth must be imported before transformers (it patches it), so ``auto`` and ``unsloth``
try it first. On a machine without an accelerator Unsloth runs through its own CPU backend.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from worker.engine.demo import DEMO_ID, DEMO_NAME, demo_model_dir

log = structlog.get_logger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
GENERATION_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@dataclass
class Loaded:
    """A loaded model and tokenizer, and how they were loaded."""

    model: object
    tokenizer: object
    backend: str
    model_name: str
    dtype: str


def resolve_model(model: str, cache_dir: Path) -> tuple[str, str]:
    """(path or hub id to load, display name); ``demo`` becomes the converted folder."""
    if model == DEMO_NAME:
        return str(demo_model_dir(cache_dir)), DEMO_ID
    return model, model


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded here, for a reason the user fixes (an unreachable hub, a
    gated or unknown id, a missing folder): ``lines`` says what happened, then what to do."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what}\n{fix}")
        self.lines = [what, fix]


def check_model(model: str, cache_dir: Path) -> None:
    """Fail early and once, in two lines, when ``model`` cannot be had: a folder that is not
    there, a Hugging Face id that is unknown, gated without ``HF_TOKEN``, or not cached while
    the hub cannot be reached. A cached model passes; otherwise one HEAD request for its
    ``config.json`` (no retries, ``HF_HUB_ETAG_TIMEOUT``) asks the hub, and the backend then
    downloads and loads the model as usual."""
    if model == DEMO_NAME:
        return
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not any((folder / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise ModelUnavailable(
                f"GENQ_MODEL={model}: the folder has no config.json (nor adapter_config.json)",
                "give a Hugging Face model folder (save_pretrained), a LoRA adapter folder, "
                "or a Hugging Face id like HuggingFaceTB/SmolLM2-135M-Instruct")
        return
    import httpx
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    from worker.ops.logging import adopt_library_loggers

    adopt_library_loggers()
    hub = urlsplit(constants.ENDPOINT).netloc
    try:
        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return
        if constants.is_offline_mode():
            raise ModelUnavailable(
                f"cannot load {model}: HF_HUB_OFFLINE is set and it is not in the local cache",
                "unset HF_HUB_OFFLINE to download it once, or copy a downloaded "
                "~/.cache/huggingface here, or give GENQ_MODEL a local folder")
        get_hf_file_metadata(hf_hub_url(model, "config.json"), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError:
        raise ModelUnavailable(
            f"{model} is a gated model: this machine has no token with access to it",
            f"accept its terms at https://huggingface.co/{model}, then set HF_TOKEN to a "
            "read token of that account (https://huggingface.co/settings/tokens)") from None
    except (RepositoryNotFoundError, HFValidationError):
        if model.startswith((".", "/", "~")) or model.count("/") > 1:  # meant as a folder
            raise ModelUnavailable(f"GENQ_MODEL={model}: no such folder",
                                   "give the path of a model folder, or a Hugging Face id like "
                                   "HuggingFaceTB/SmolLM2-135M-Instruct") from None
        raise ModelUnavailable(
            f"{model} is not a model on the Hugging Face hub (or it is private)",
            "check the id (org/name), give a local folder, or set HF_TOKEN for a private "
            "model") from None
    except RemoteEntryNotFoundError:
        raise ModelUnavailable(
            f"{model} has no config.json on the Hugging Face hub: not a transformers model",
            "give the id of a transformers model (org/name), or a local model folder") from None
    except (HfHubHTTPError, httpx.TransportError) as exc:  # 5xx, 429; DNS, refused, timeout
        status = getattr(getattr(exc, "response", None), "status_code", None)
        reason = f"answered {status}" if status else f"cannot be reached from here ({exc})"
        raise ModelUnavailable(
            f"cannot download {model}: {hub} {reason}, and the model is not in the local cache",
            f"download it where the network works (`hf download {model}`, then copy "
            "~/.cache/huggingface over), give GENQ_MODEL a local folder, or set HTTPS_PROXY "
            "if this network needs a proxy") from None


def adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter folder, or None if ``path`` is not one."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text())["base_model_name_or_path"]


def model_context(config) -> int:
    """The context a model config declares (``max_position_embeddings``; 4096 if it has none)."""
    return int(getattr(config, "max_position_embeddings", None) or 4096)


def neutralise_generation_config(model) -> dict[str, object]:
    """Give ``model`` a generation config holding only its token ids (bos, eos, pad, decoder
    start), so no checkpoint default (penalties, sampling, suppressed tokens, lengths) applies
    anywhere, ``model.generate`` included; returns the dropped settings that would have
    changed generation."""
    from transformers import GenerationConfig

    current = getattr(model, "generation_config", None)
    if current is None:
        return {}
    # transformers 5 leaves unset fields None (4.x fills its defaults, which to_diff_dict omits)
    defaults = getattr(current, "_get_default_generation_params", dict)()
    dropped = {key: value for key, value in current.to_diff_dict().items()
               if key not in GENERATION_TOKEN_IDS and not key.startswith(("_", "transformers_"))
               and value not in (None, False) and value != defaults.get(key)}
    model.generation_config = GenerationConfig(**{
        key: getattr(current, key) for key in GENERATION_TOKEN_IDS
        if getattr(current, key, None) is not None})
    return dropped


def _torch_dtype(dtype: str | None):
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {DTYPES}")
    return getattr(torch, dtype)


def unsloth_available() -> bool:
    """Whether ``import unsloth`` works here (imports it, which also patches transformers)."""
    try:
        with quiet():
            import unsloth  # noqa: F401
    except Exception as exc:  # a broken torchvision raises RuntimeError, not ImportError
        log.info("unsloth_unavailable", error=f"{type(exc).__name__}: {exc}")
        return False
    return True


@contextmanager
def quiet():
    """What libraries print while they load (banners, progress bars) goes to the debug log;
    their loggers go through ours (``adopt_library_loggers``) before and after."""
    from transformers.utils import logging as hf_logging

    from worker.ops.logging import StdoutToLog, adopt_library_loggers

    hf_logging.disable_progress_bar()
    adopt_library_loggers()
    try:
        with redirect_stdout(StdoutToLog(log)):
            yield
    finally:  # what loaded inside (vLLM, Unsloth, peft) set its loggers up as well
        adopt_library_loggers()


def load_model(model: str, backend: str, dtype: str | None, cache_dir: Path,
               load_in_4bit: bool = False, max_seq_length: int | None = None) -> Loaded:
    """Load ``model`` with the chosen backend; ``auto`` prefers unsloth, else transformers."""
    if backend not in ("auto", "unsloth", "transformers"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend in ("auto", "unsloth") and not unsloth_available():
        if backend == "unsloth":
            raise RuntimeError("backend 'unsloth' requested but unsloth cannot be imported")
        backend = "transformers"
    path, name = resolve_model(model, cache_dir)
    torch_dtype = _torch_dtype(dtype)
    if backend in ("auto", "unsloth"):
        try:
            with quiet():
                loaded = _load_unsloth(path, name, torch_dtype, load_in_4bit, max_seq_length)
        except Exception as exc:
            if backend == "unsloth":
                raise
            log.warning("unsloth_load_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            log.info("backend_selected", backend="unsloth", model=name, dtype=loaded.dtype)
            return loaded
    with quiet():
        loaded = _load_transformers(path, name, torch_dtype)
    log.info("backend_selected", backend="transformers", model=name, dtype=loaded.dtype)
    return loaded


def _load_unsloth(path, name, torch_dtype, load_in_4bit, max_seq_length) -> Loaded:
    """Unsloth truncates longer inputs to its ``max_seq_length`` and RoPE-scales the model
    when it exceeds the config's context, so it gets the context, or less if asked."""
    from transformers import AutoConfig  # unsloth_available() imported unsloth before it
    from unsloth import FastLanguageModel

    context = model_context(AutoConfig.from_pretrained(adapter_base(path) or path))
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path,
        dtype=torch_dtype,
        load_in_4bit=load_in_4bit,
        max_seq_length=min(context, max_seq_length or context),
        use_exact_model_name=True,
    )
    FastLanguageModel.for_inference(model)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap the tokenizer
    return Loaded(model, tokenizer, "unsloth", name, str(model.dtype).removeprefix("torch."))


def _load_transformers(path, name, torch_dtype) -> Loaded:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = adapter_base(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(base or path, dtype=torch_dtype).to(device)
    if base is not None:  # GENQ_MODEL is itself a LoRA folder: merge it into its base
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    model.eval()
    return Loaded(model, tokenizer, "transformers", name, str(model.dtype).removeprefix("torch."))


def load_adapters(model, adapters: dict[str, str]) -> None:
    """Load each named LoRA adapter once (transformers' PEFT integration, both backends), then
    every tensor of its file through peft, as ``PeftModel.from_pretrained`` does: transformers
    alone leaves some (DoRA's magnitudes, ``modules_to_save`` copies) at their initial values.
    An adapter whose file and modules do not match key for key is refused (ModelUnavailable)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    for name, path in adapters.items():
        try:
            model.load_adapter(path, adapter_name=name)
            weights = {key.removeprefix("base_model.model."): value  # PeftModel's prefix
                       for key, value in load_peft_weights(path, device=str(model.device)).items()}
            expected = set(get_peft_model_state_dict(model, adapter_name=name))
            given = set(weights)
            if expected == given:
                set_peft_model_state_dict(model, weights, adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - whatever transformers or peft raise loading it
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise ModelUnavailable(f"adapter {name!r} ({path}) cannot load: {why}"[:500],
                                   ADAPTER_FIX) from None
        if expected != given:
            raise ModelUnavailable(f"adapter {name!r} ({path}) does not match the model: " + "; ".join(
                f"{len(keys)} {what} (e.g. {min(keys)})" for keys, what in (
                    (expected - given, "of its tensors missing from its file"),
                    (given - expected, "tensors in its file that fit none of its modules")) if keys),
                ADAPTER_FIX)
        log.info("adapter_loaded", adapter=name, path=path)
    if adapters:
        model.disable_adapters()


ADAPTER_FIX = ("give GENQ_ADAPTERS a complete PEFT adapter folder (adapter_config.json and "
               "adapter_model.safetensors, from save_pretrained) trained on this GENQ_MODEL")


def select_adapter(model, adapter: str | None, loaded: bool) -> None:
    """Make ``adapter`` (or the base model, for None) the active weights for the next batch:
    its LoRA layers and its ``modules_to_save`` copies, while modules other adapters wrap pass
    through to the base module (transformers' ``set_adapter`` raises on those instead)."""
    if not loaded:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            own = adapter is not None and module.check_set_adapter([adapter]) is not None
            if own:
                module.set_adapter(adapter, inference_mode=True)
            module.enable_adapters(own)
        elif isinstance(module, BaseTunerLayer):
            if adapter is not None:
                module.set_adapter(adapter)
            module.enable_adapters(adapter is not None)
