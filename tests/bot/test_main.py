"""`python -m bot`: one-line start-up errors; a full run serves a page, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from bot.__main__ import RedactingFilter
from tests.fake_discord import FakeDiscord

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def bot_env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISCORD_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "RESULTS_DIR": str(tmp_path)})
    env.update(values)
    return env


async def run_bot(tmp_path: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        cwd=tmp_path,  # no .env there
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_missing_token_is_one_line(tmp_path: Path) -> None:
    process = await run_bot(tmp_path, bot_env(tmp_path))
    _out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert err.decode().strip() == (
        "error: DISCORD_TOKEN is required but not set (environment or .env)"
    )


async def test_preview_on_without_chromium_stops_at_start_up(tmp_path: Path) -> None:
    env = bot_env(tmp_path, DISCORD_TOKEN="x", PREVIEW="on", PATH=str(tmp_path))  # no chromium
    env.pop("PREVIEW_CHROMIUM", None)
    process = await run_bot(tmp_path, env)
    _out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    [line] = err.decode().strip().splitlines()
    assert line.startswith("error: PREVIEW is on but no Chromium was found: install chromium")


async def test_rejected_token_is_one_line_without_traceback_or_token(tmp_path: Path) -> None:
    async with FakeDiscord() as fake:
        env = bot_env(
            tmp_path,
            DISCORD_TOKEN="not-the-right-token",
            DISCORD_API_BASE=fake.api_base,
            DISCORD_GATEWAY_URL=fake.gateway_url,
        )
        process = await run_bot(tmp_path, env)
        _out, err = await asyncio.wait_for(process.communicate(), 60)
    text = err.decode()
    assert process.returncode == 3
    assert "Traceback" not in text and "not-the-right-token" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: DISCORD_TOKEN was rejected by Discord")


async def test_model_that_cannot_load_is_one_line(tmp_path: Path) -> None:
    async with FakeDiscord() as fake:
        env = bot_env(
            tmp_path,
            DISCORD_TOKEN=fake.bot_token,
            DISCORD_API_BASE=fake.api_base,
            DISCORD_GATEWAY_URL=fake.gateway_url,
            MODEL_BASE=str(tmp_path / "no-such-model"),
        )
        process = await run_bot(tmp_path, env)
        _out, err = await asyncio.wait_for(process.communicate(), 90)
    text = err.decode()
    assert process.returncode == 4, text[-2000:]
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1].startswith("error: model: ")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["standard", "continuous"])
async def test_full_run_serves_a_page_and_stops_on_sigterm(tmp_path: Path, engine: str) -> None:
    from tests.e2e.helpers import build_tiny_model

    model_dir = tmp_path / "tiny"
    await asyncio.to_thread(build_tiny_model, model_dir)
    async with FakeDiscord() as fake:
        env = bot_env(
            tmp_path,
            DISCORD_TOKEN=fake.bot_token,
            DISCORD_API_BASE=fake.api_base,
            DISCORD_GATEWAY_URL=fake.gateway_url,
            DEV_GUILD_ID=str(fake.guild.id),
            MODEL_BASE=str(model_dir),
            MODEL_DEVICE="cpu",
            ENGINE=engine,
            MAX_NEW_TOKENS="32",
            LOG_LEVEL="DEBUG",
        )
        process = await run_bot(tmp_path, env)
        try:
            await fake.wait_for_sync(timeout=90)
            await fake.wait_until_ready(timeout=30)
            inter = await fake.send_command("html", {"prompt": "a bakery"}, user=fake.user("ann"))
            await inter.wait_for_callback(timeout=5)
            part = await inter.wait_for_file(".html", timeout=60)
            assert part.filename == "bakery.html" and part.data
            process.send_signal(signal.SIGTERM)
            _out, err = await asyncio.wait_for(process.communicate(), 60)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    log_text = err.decode()
    assert process.returncode == 0, log_text[-3000:]
    # The engine asked for is the one that served (the page alone can't tell them apart).
    mode = "continuous" if engine == "continuous" else "batch"
    # MAX_BATCH unset: 8 for the standard engine, the continuous engine's slots (8 on a CPU).
    assert f"worker started ({mode} mode, max batch 8)" in log_text
    assert "SIGTERM received: shutting down" in log_text
    assert "shutdown complete" in log_text
    assert fake.bot_token not in log_text
    assert "Traceback" not in log_text


def test_redacting_filter_hides_the_token() -> None:
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "token is %s, ok", ("s3cr3t-token",), None
    )
    assert RedactingFilter("s3cr3t-token").filter(record)
    assert record.getMessage() == "token is [redacted], ok"
