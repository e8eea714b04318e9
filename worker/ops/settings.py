"""Settings from the environment (prefix ``GENQ_``), one typed object for every layer."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REDIS_SCHEMES = ("redis://", "rediss://", "sentinel://", "unix://")


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "genqueue"


class Settings(BaseSettings):
    """Every knob genqueue reads. Secrets (API keys, passwords in URLs) only come from here."""

    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore")

    broker_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    result_url: SecretStr | None = None
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_tls: bool = False
    redis_ca_file: Path | None = None
    redis_cert_file: Path | None = None
    redis_key_file: Path | None = None
    model: str = "demo"
    adapters: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    backend: Literal["auto", "vllm", "unsloth", "transformers"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    load_in_4bit: bool = False
    max_batch_size: int | None = Field(None, ge=1)  # None: the backend's (engine.max_batch_size)
    max_batch_tokens: int = Field(32768, ge=1)
    batch_wait_ms: int = Field(50, ge=0)
    max_wait_ms_for_bucket: int = Field(30_000, ge=0)
    scheduler: Literal["continuous", "static"] = "continuous"
    max_prefill_tokens: int = Field(8192, ge=1)
    # None: the backend's (engine.max_bulk_prefill_tokens: 512; vLLM on a CPU: 256)
    max_bulk_prefill_tokens: int | None = Field(None, ge=1)
    max_bulk_pause_ms: int = Field(1000, ge=0)
    stall_timeout_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(2, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_seq_length: int | None = Field(None, ge=1)
    max_new_tokens_limit: int = Field(2048, ge=1)
    grammar_cache_size: int = Field(128, ge=1)  # compiled response_format grammars per worker
    max_pending: int = Field(100_000, ge=1)
    max_pending_per_key: int | None = Field(None, ge=1)
    max_prompt_chars: int = Field(1_000_000, ge=1)
    job_submit_timeout_s: float = Field(60.0, gt=0)
    result_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    visibility_timeout_s: int = Field(60, ge=2)
    pool_size: int | None = Field(None, ge=1)
    metrics_port: int | None = None
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    raw_token_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    key_weights: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    files_url: str | None = None
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_max_age_s: int = Field(24 * 3600, ge=1)
    webhook_allow_private: bool = False
    files_options: dict[str, Any] = Field(default_factory=dict)
    vllm_options: dict[str, Any] = Field(default_factory=dict)  # extra vLLM EngineArgs (JSON)
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    sync_timeout_s: float = Field(600.0, gt=0)
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    self_check: Literal["strict", "warn", "off"] = "strict"

    @field_validator("broker_url", "result_url", mode="before")
    @classmethod
    def _check_url(cls, value: object) -> object:
        """A Redis URL with its scheme: ``localhost:6379`` alone is refused in one line."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str) and not raw.startswith(REDIS_SCHEMES):
            from worker.ops.logging import mask_secrets

            shown = mask_secrets(raw) if "://" in raw else "<the value given>"
            if "@" not in raw and "://" not in raw:
                shown = raw
            raise ValueError(f"{shown!r} is not a Redis URL: write redis://HOST:PORT/DB "
                             "(rediss:// with TLS, sentinel://HOST:PORT;sentinel://HOST:PORT/DB, "
                             "unix:///path), e.g. redis://127.0.0.1:6379/0")
        return value

    @field_validator("adapters", mode="before")
    @classmethod
    def _parse_adapters(cls, value: object) -> object:
        """Accept ``name=path,name2=path2`` as well as a mapping."""
        if isinstance(value, str):
            pairs = [p.strip() for p in value.split(",") if p.strip()]
            out = {}
            for pair in pairs:
                name, sep, path = pair.partition("=")
                if not sep or not name.strip() or not path.strip():
                    raise ValueError(f"GENQ_ADAPTERS entry {pair!r} is not name=path")
                out[name.strip()] = path.strip()
            return out
        return value

    @field_validator("api_keys", "admin_keys", "raw_token_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: object) -> object:
        """Comma-separated; each key bare or ``name:key`` (see ``worker.ops.keys``)."""
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("key_weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: object) -> object:
        """``name=weight,name2=weight2``: a key's share of bulk admission (default 1)."""
        if isinstance(value, str):
            out = {}
            for pair in (p.strip() for p in value.split(",") if p.strip()):
                name, sep, weight = pair.partition("=")
                if not sep or not weight.strip().isdigit() or int(weight) < 1:
                    raise ValueError(f"GENQ_KEY_WEIGHTS entry {pair!r} is not name=positive-int")
                out[name.strip()] = int(weight)
            return out
        return value

    @property
    def files_root(self) -> str:
        """Where uploaded and generated files live: ``GENQ_FILES_URL``, else a local folder."""
        return self.files_url or str(self.cache_dir / "files")

    @property
    def result_backend_url(self) -> str:
        """The result store URL: ``GENQ_RESULT_URL``, else the broker URL."""
        url = self.result_url or self.broker_url
        return url.get_secret_value()

    def masked(self) -> dict[str, object]:
        """Effective settings with passwords and keys masked (for ``genq config``): every URL
        form that carries one (user info, ``password=`` and ``sentinel_kwargs`` queries)."""
        from worker.ops.logging import mask_secrets

        data = self.model_dump()
        data["broker_url"] = mask_secrets(self.broker_url.get_secret_value())
        data["result_url"] = mask_secrets(self.result_backend_url)
        data["api_keys"] = ["***"] * len(self.api_keys)
        data["admin_keys"] = ["***"] * len(self.admin_keys)
        data["webhook_secret"] = "***" if self.webhook_secret else "none (deliveries unsigned)"
        data["webhook_url"] = mask_secrets(self.webhook_url) if self.webhook_url else "none"
        data["cache_dir"] = str(self.cache_dir)
        for name in ("redis_ca_file", "redis_cert_file", "redis_key_file"):
            value = getattr(self, name)
            data[name] = str(value) if value else "none"
        data["files_url"] = mask_secrets(self.files_root)
        data["files_options"] = _mask_options(self.files_options)
        # the value each default resolves to, rather than null
        data["max_batch_size"] = self.max_batch_size or ("32 (step loop); vLLM: 64 on a CPU, "
                                                         "256 on a GPU")
        data["max_bulk_prefill_tokens"] = self.max_bulk_prefill_tokens or ("512; vLLM on a CPU: "
                                                                           "256")
        data["pool_size"] = self.pool_size or "the batch size"
        data["max_prompt_tokens"] = self.max_prompt_tokens or "the model's context length"
        data["max_seq_length"] = self.max_seq_length or "the model's context length"
        data["max_pending_per_key"] = self.max_pending_per_key or "no limit per key"
        data["metrics_port"] = self.metrics_port or "off (no metrics server)"
        if self.dtype in (None, "auto"):
            from worker.stack import count_gpus

            data["dtype"] = "bfloat16 (GPU)" if count_gpus() else "float32 (no GPU)"
        return data


SECRET_OPTION = ("key", "secret", "password", "token", "credential", "sas", "auth", "signature")


def _mask_options(value: Any, name: str = "") -> Any:
    """fsspec storage options with every credential-like value masked (``key``, ``secret``,
    ``token``...), at any depth; URLs with a password masked too."""
    from worker.ops.logging import mask_secrets

    if isinstance(value, dict):
        return {k: _mask_options(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_options(v, name) for v in value]
    if value is not None and any(s in name.lower() for s in SECRET_OPTION):
        return "***"
    return mask_secrets(value) if isinstance(value, str) else value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
