"""Settings: env parsing, one line per problem naming the variable, secrets never echoed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from bot.settings import Settings, SettingsError, load_settings

TOKEN = "MTIz.secret-token-value.xyz"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(Settings.model_fields):
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    monkeypatch.setenv("ALLOWED_GUILD_IDS", "1, 2,3")
    monkeypatch.setenv("ALLOWED_ROLE_IDS", "")
    monkeypatch.setenv("METRICS_PORT", "")
    monkeypatch.setenv("MODEL_ADAPTER", "none")
    monkeypatch.setenv("MODEL_BASE", " ")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    settings = load_settings()
    assert settings.discord_token.get_secret_value() == TOKEN
    assert settings.allowed_guild_ids == (1, 2, 3)
    assert settings.allowed_role_ids == ()
    assert settings.metrics_port is None
    assert settings.log_level == "DEBUG"
    assert settings.discord_api_base == "https://discord.com/api/v10"
    assert settings.interaction_ttl_s == 900
    assert settings.model_overrides() == {
        "preset": None,
        "base": None,
        "adapter": "none",
        "quantization": None,
    }
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("variable", "default", "other", "bad"),
    [("KV_CACHE", "bf16", "fp8", "int4"), ("SPECULATION", "refine", "off", "maybe")],
)
def test_engine_choices_reach_the_engine_config_and_a_bad_one_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, default: str, other: str, bad: str
) -> None:
    from bot.__main__ import engine_config

    field = variable.lower()
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    assert getattr(engine_config(load_settings()), field) == default
    monkeypatch.setenv(variable, other)
    assert getattr(engine_config(load_settings()), field) == other
    monkeypatch.setenv(variable, bad)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).startswith(f"{variable}: ")
    assert f"'{default}'" in str(info.value) and f"'{other}'" in str(info.value)


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"DISCORD_TOKEN={TOKEN}\nMAX_BATCH=4\n")
    settings = load_settings()
    assert settings.max_batch == 4


def test_missing_token_is_one_line_naming_the_variable() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value) == "DISCORD_TOKEN is required but not set (environment or .env)"


def test_each_error_names_its_variable_and_hides_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "Bot " + TOKEN)
    monkeypatch.setenv("QUEUE_MAX_TOTAL", "lots")
    monkeypatch.setenv("MAX_BATCH", "0")
    monkeypatch.setenv("ALLOWED_CHANNEL_IDS", "12,general")
    monkeypatch.setenv("DISCORD_API_BASE", "discord.com")
    monkeypatch.setenv("DISCORD_GATEWAY_URL", "http://x")
    monkeypatch.setenv("LOG_LEVEL", "loud")
    monkeypatch.setenv("METRICS_PORT", "99999")
    with pytest.raises(SettingsError) as info:
        load_settings()
    lines = str(info.value).splitlines()
    names = [line.split()[0].rstrip(":") for line in lines]
    assert sorted(names) == sorted(
        [
            "DISCORD_TOKEN",
            "QUEUE_MAX_TOTAL",
            "MAX_BATCH",
            "ALLOWED_CHANNEL_IDS",
            "DISCORD_API_BASE",
            "DISCORD_GATEWAY_URL",
            "LOG_LEVEL",
            "METRICS_PORT",
        ]
    )
    assert TOKEN not in str(info.value)
    assert any("whitespace" in line for line in lines if line.startswith("DISCORD_TOKEN"))
    assert any("'general'" in line for line in lines)


def test_direct_construction_for_tests() -> None:
    values: dict[str, Any] = {
        "discord_token": "x",
        "discord_api_base": "http://127.0.0.1:1/api/v10/",
        "discord_gateway_url": "ws://127.0.0.1:1/gw",
        "allowed_guild_ids": (5,),
        "_env_file": None,
    }
    settings = Settings(**values)
    assert settings.discord_api_base == "http://127.0.0.1:1/api/v10"
    assert settings.allowed_guild_ids == (5,)


def test_env_example_lists_every_setting_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    keys = set(re.findall(r"^([A-Z0-9_]+)=", example, re.MULTILINE))
    assert keys == {name.upper() for name in Settings.model_fields}
    (tmp_path / ".env").write_text(example)
    with pytest.raises(SettingsError, match="DISCORD_TOKEN"):
        load_settings()  # the example leaves the token empty
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    settings = load_settings()
    assert settings.metrics_port is None and settings.model_preset is None


def test_preview_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    settings = load_settings()
    assert (settings.preview, settings.preview_chromium) == ("auto", None)
    assert (settings.preview_width, settings.preview_height) == (1280, 800)
    assert settings.preview_timeout_s == 15
    fake = tmp_path / "my-chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PREVIEW", "ON")
    monkeypatch.setenv("PREVIEW_CHROMIUM", str(fake))
    monkeypatch.setenv("PREVIEW_WIDTH", "640")
    assert load_settings().preview == "on" and load_settings().preview_width == 640


def test_preview_on_without_chromium_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium here
    monkeypatch.setenv("PREVIEW", "auto")
    assert load_settings().preview == "auto"  # auto: fine, just no previews
    monkeypatch.setenv("PREVIEW", "on")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).startswith("PREVIEW is on but no Chromium was found")
    assert "PREVIEW_CHROMIUM" in str(info.value)
    monkeypatch.setenv("PREVIEW_CHROMIUM", str(tmp_path / "nope"))
    monkeypatch.setenv("PREVIEW", "off")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).startswith("PREVIEW_CHROMIUM is '")
    assert "not an executable file" in str(info.value)


class _EngineWithSlots:
    """Stands in for the continuous engine: only its slot count matters here."""

    def __init__(self, slots: int) -> None:
        self.slots = slots


def test_max_batch_auto_follows_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.settings import AUTO_MAX_BATCH, STANDARD_MAX_BATCH

    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    monkeypatch.setenv("MAX_BATCH", "")
    auto = load_settings()
    assert auto.max_batch is None
    assert auto.batch_size(object()) == STANDARD_MAX_BATCH == 8  # the standard engine
    assert auto.batch_size(_EngineWithSlots(5)) == 5  # a small card's KV cache
    assert auto.batch_size(_EngineWithSlots(300)) == AUTO_MAX_BATCH == 64
    monkeypatch.setenv("MAX_BATCH", "12")
    explicit = load_settings()
    assert explicit.batch_size(_EngineWithSlots(300)) == 12
    assert explicit.batch_size(object()) == 12
    monkeypatch.setenv("MAX_BATCH", "0")
    with pytest.raises(SettingsError, match="MAX_BATCH"):
        load_settings()


def test_page_mode_defaults_to_the_presets_and_safety_to_standard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from model.types import PageMode, SafetyPolicy

    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    monkeypatch.setenv("PAGE_MODE", "")
    monkeypatch.setenv("CPU_THREADS", "")
    settings = load_settings()
    assert settings.page_mode is None and settings.cpu_threads is None
    assert settings.resolved_page_mode() is PageMode.COMPOSE  # the embedded smollm2
    assert settings.safety is SafetyPolicy.STANDARD
    monkeypatch.setenv("MODEL_PRESET", "codellama-html")
    assert load_settings().resolved_page_mode() is PageMode.DOCUMENT
    monkeypatch.setenv("PAGE_MODE", "compose")
    monkeypatch.setenv("SAFETY", "strict")
    monkeypatch.setenv("CPU_THREADS", "2")
    settings = load_settings()
    assert settings.resolved_page_mode() is PageMode.COMPOSE
    assert settings.safety is SafetyPolicy.STRICT and settings.cpu_threads == 2


@pytest.mark.parametrize(
    ("name", "value"), [("PAGE_MODE", "webpage"), ("SAFETY", "paranoid"), ("CPU_THREADS", "0")]
)
def test_page_settings_errors_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()
