"""Fixtures: the real HtmlBot against the in-repo fake Discord, with a fake engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.gateway import DiscordWebSocket

from bot.client import HtmlBot
from bot.settings import Settings
from tests.fake_discord import FakeDiscord

StartBot = Callable[..., Awaitable[HtmlBot]]


async def eventually(condition: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Wait until ``condition()`` holds (for state that changes without a request)."""
    async with asyncio.timeout(limit_s):
        while not condition():  # noqa: ASYNC110 - polling plain state, there is no event
            await asyncio.sleep(0.02)


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord(callback_window_s=3.0)
    await server.start()
    # HtmlBot sets these process-wide; monkeypatch restores them after the test.
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)
    yield server
    await server.stop()


def bot_settings(fake: FakeDiscord, results_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "discord_token": fake.bot_token,
        "discord_api_base": fake.api_base,
        "discord_gateway_url": fake.gateway_url,
        "dev_guild_id": fake.guild.id,
        "results_dir": results_dir,
        "queue_edit_interval_s": 0.2,
        "initial_job_seconds": 1.0,
        "delivery_margin_s": 0.5,
        "shutdown_deadline_s": 5.0,
        # The fake engines answer in the request's mode; document pages are the smaller ones.
        "page_mode": "document",
        # Previews cost a Chromium run each: only the tests about them turn them on.
        "preview": "off",
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def start_bot(fake: FakeDiscord, tmp_path: Path) -> AsyncIterator[StartBot]:
    started: list[tuple[HtmlBot, asyncio.Task[None]]] = []

    async def start(engine: Any, **overrides: Any) -> HtmlBot:
        settings = bot_settings(fake, tmp_path / "results", **overrides)
        bot = HtmlBot(settings, engine)
        await bot.__aenter__()
        task = asyncio.create_task(bot.start(fake.bot_token))
        started.append((bot, task))
        ready = asyncio.create_task(fake.wait_until_ready())
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()
        await ready
        await fake.wait_for_sync()
        return bot

    yield start
    for bot, task in started:
        await bot.close()
        await asyncio.wait_for(task, 15)
