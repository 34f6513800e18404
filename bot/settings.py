"""The bot's settings: one typed object read from the environment and ``.env``.

Every field is an environment variable of the same name in upper case (``DISCORD_TOKEN``,
``QUEUE_MAX_TOTAL``...). :func:`load_settings` turns pydantic's validation errors into
:class:`SettingsError`, whose message names each offending variable on its own line and
never echoes a secret value.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.preview import CHROMIUM_NAMES, find_chromium

# MAX_BATCH's defaults live with the engines (model.build); re-exported for older callers.
from model.build import AUTO_MAX_BATCH as AUTO_MAX_BATCH
from model.build import STANDARD_MAX_BATCH as STANDARD_MAX_BATCH
from model.build import batch_size
from model.types import PageMode, SafetyPolicy

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://discord.com/api/v10"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

IdList = Annotated[tuple[int, ...], NoDecode]


class SettingsError(Exception):
    """The settings are invalid; the message has one line per problem, naming the variable."""


class Settings(BaseSettings):
    """Everything ``python -m bot`` can be configured with (see ``.env.example``)."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        # Our own fields start with "model_"; pydantic reserves that prefix by default.
        protected_namespaces=(),
    )

    # Discord
    discord_token: SecretStr
    discord_api_base: str = DEFAULT_API_BASE
    discord_gateway_url: str | None = None
    dev_guild_id: int | None = None
    allowed_guild_ids: IdList = ()
    allowed_channel_ids: IdList = ()
    allowed_role_ids: IdList = ()

    # Model
    model_preset: str | None = None
    model_base: str | None = None
    model_adapter: str | None = None
    model_quantization: str | None = None
    model_device: str | None = None
    # "standard": model.engine.Engine (batched generate); "continuous":
    # model.fast.FastEngine (jobs join between decode steps; fastest on a GPU);
    # "auto": continuous on CUDA, standard on CPU (where the simple loop is as fast).
    engine: Literal["auto", "standard", "continuous"] = "auto"
    # The continuous engine's KV cache: "bf16" (the model's dtype) or "fp8" (E4M3 with a
    # scale per token and head: half the bytes a decode step reads, twice the slots).
    kv_cache: Literal["bf16", "fp8"] = "bf16"
    # Speculative decoding in the continuous engine (model.fast.speculative): "refine" jobs
    # draft from the page they rewrite, "all" document jobs draft from their own text, "off".
    speculation: Literal["refine", "all", "off"] = "refine"
    max_new_tokens: int = Field(default=1536, ge=16, le=32768)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    # "compose": the model writes the content, the project's themes the page; "document":
    # the model writes the whole page. Unset: the preset's (smollm2: compose, else document).
    page_mode: PageMode | None = None
    # torch threads when the model runs on a CPU; unset: all cores but one (model.threads).
    cpu_threads: int | None = Field(default=None, ge=1, le=512)

    # Queue and worker. QUEUE_BACKEND=local: the queue, worker thread and journal live in this
    # process (jobs journaled in STATE_DB, so a restart resumes them). redis: any number of
    # bots (shards) and GPU workers (``python -m bot.worker``) share one queue at REDIS_URL.
    queue_backend: Literal["local", "redis"] = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every key this bot writes starts with it: several bots can share one Redis.
    redis_prefix: str = "htmlbot"
    # The local backend's job journal (SQLite); unset: RESULTS_DIR/htmlbot.sqlite3.
    state_db: Path | None = None
    # A worker that reports nothing on a running job for this long (killed, hung, cut off)
    # loses it: another worker takes it over. Progress reports renew it every second or so.
    worker_lease_s: float = Field(default=30.0, ge=2.0, le=3600.0)
    # A name for this worker in logs and in Redis; unset: host name and process id.
    worker_name: str | None = None
    # Pages kept in Redis (QUEUE_BACKEND=redis): a page over the cap is not kept there.
    pages_ttl_days: float = Field(default=30.0, gt=0)
    page_store_max_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Sharding (discord.py's AutoShardedBot): SHARD_COUNT shards in all, SHARD_IDS the ones
    # this process runs (empty: all of them). Unset SHARD_COUNT: one plain connection.
    shard_count: int | None = Field(default=None, ge=1, le=4096)
    shard_ids: IdList = ()
    queue_max_total: int = Field(default=1000, ge=1)
    queue_max_per_user: int = Field(default=3, ge=1)
    # None ("auto"): see batch_size().
    max_batch: int | None = Field(default=None, ge=1, le=256)
    max_prompt_chars: int = Field(default=1000, ge=1, le=6000)
    interaction_ttl_s: float = Field(default=900.0, gt=0)
    queue_edit_interval_s: float = Field(default=5.0, gt=0)
    edits_per_second: float = Field(default=10.0, gt=0)
    initial_job_seconds: float = Field(default=60.0, gt=0)
    delivery_margin_s: float = Field(default=10.0, ge=0)
    shutdown_deadline_s: float = Field(default=30.0, ge=0)

    # Output, logs, metrics
    results_dir: Path = Path("results")
    results_keep_per_user: int = Field(default=10, ge=1)
    # What a page may do: "standard" (inline scripts, no remote loads or form posts: a CSP),
    # "strict" (scripts and handlers removed too), "off" (the page as the model wrote it).
    safety: SafetyPolicy = SafetyPolicy.STANDARD
    # A page that comes out empty is generated once more (another seed) before delivery.
    regenerate_empty: bool = True
    log_level: str = "INFO"
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"

    # PNG preview of each page (bot/preview.py). PREVIEW_CHROMIUM comes first: PREVIEW's
    # check reads it.
    preview_chromium: str | None = None
    preview: Literal["auto", "on", "off"] = "auto"
    preview_timeout_s: float = Field(default=15.0, gt=0, le=300)
    preview_width: int = Field(default=1280, ge=64, le=4096)
    preview_height: int = Field(default=800, ge=64, le=4096)

    @field_validator("discord_token")
    @classmethod
    def _token_shape(cls, value: SecretStr) -> SecretStr:
        token = value.get_secret_value().strip()
        if not token:
            raise ValueError("is empty; set it to your bot's token from the Developer Portal")
        if any(ch.isspace() for ch in token):
            raise ValueError("contains whitespace; paste the token alone, without 'Bot '")
        return SecretStr(token)

    @field_validator(
        "allowed_guild_ids", "allowed_channel_ids", "allowed_role_ids", "shard_ids", mode="before"
    )
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",")]
            ids = []
            for part in parts:
                if not part:
                    continue
                if not part.isdigit():
                    raise ValueError(f"expected comma-separated numeric ids, got {part!r}")
                ids.append(int(part))
            return tuple(ids)
        return value

    @field_validator(
        "dev_guild_id",
        "metrics_port",
        "max_batch",
        "page_mode",
        "cpu_threads",
        "shard_count",
        "state_db",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator(
        "model_preset",
        "model_base",
        "model_adapter",
        "model_quantization",
        "model_device",
        "discord_gateway_url",
        "preview_chromium",
        "worker_name",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("discord_api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("discord_gateway_url")
    @classmethod
    def _gateway(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("ws://", "wss://")):
            raise ValueError("must start with ws:// or wss://")
        return value

    @field_validator("preview_chromium")
    @classmethod
    def _chromium_exists(cls, value: str | None) -> str | None:
        if value is not None and find_chromium(value) is None:
            raise ValueError(f"is {value!r}, which is not an executable file or a command on PATH")
        return value

    @field_validator("preview", mode="before")
    @classmethod
    def _preview_mode(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("preview")
    @classmethod
    def _preview_needs_chromium(cls, value: str, info: ValidationInfo) -> str:
        # A PREVIEW_CHROMIUM that failed its own check is reported on its own line.
        configured = info.data.get("preview_chromium")
        if value == "on" and "preview_chromium" in info.data and not find_chromium(configured):
            raise ValueError(
                "is on but no Chromium was found: install chromium, set PREVIEW_CHROMIUM "
                f"to its path (looked for {', '.join(CHROMIUM_NAMES)} on PATH), or set "
                "PREVIEW=auto or off"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("shard_ids")
    @classmethod
    def _shards_in_range(cls, value: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        count = info.data.get("shard_count")
        if value and count is None:
            raise ValueError("is set but SHARD_COUNT is not; set SHARD_COUNT too")
        if count is not None and any(shard >= count for shard in value):
            raise ValueError(f"holds a shard id of {count} or more (SHARD_COUNT is {count})")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
        return level

    def batch_size(self, engine: Any) -> int:
        """How many jobs the worker runs together (``model.build.batch_size``)."""
        return batch_size(engine, self.max_batch)

    def model_overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``model.spec.resolve_spec`` (``None`` means the default)."""
        overrides: dict[str, Any] = {
            "preset": self.model_preset,
            "base": self.model_base,
            "adapter": self.model_adapter,
            "quantization": self.model_quantization,
        }
        if self.model_device:
            overrides["device"] = self.model_device
        return overrides

    @property
    def state_db_path(self) -> Path:
        """Where the local backend journals its jobs."""
        return self.state_db if self.state_db is not None else self.results_dir / "htmlbot.sqlite3"

    def resolved_page_mode(self) -> PageMode:
        """PAGE_MODE, or the model preset's mode when it is unset (no model is loaded)."""
        if self.page_mode is not None:
            return self.page_mode
        from model.spec import resolve_spec

        return resolve_spec(**self.model_overrides()).page_mode


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, each naming the environment variable; values are not echoed."""
    lines = []
    for item in error.errors():
        name = str(item["loc"][0]).upper() if item["loc"] else "SETTINGS"
        if item["type"] == "missing":
            lines.append(f"{name} is required but not set (environment or .env)")
            continue
        message = str(item["msg"])
        message = message.removeprefix("Value error, ")
        lines.append(
            f"{name} {message}"
            if message.startswith(("is ", "must ", "contains "))
            else f"{name}: {message}"
        )
    return "\n".join(lines)


def load_settings(**values: Any) -> Settings:
    """Build :class:`Settings` from the environment (and ``values``), or raise SettingsError."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None
