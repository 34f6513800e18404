"""Fixtures for the end-to-end tests: the real bot against the fake Discord.

The model is a tiny random Llama with a small byte-level BPE tokenizer, both built in the
test run and saved once per session, then loaded through ``model.loading`` like any local
base model and run by the real ``model.engine.Engine``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.gateway import DiscordWebSocket

from model.types import TextGenerator
from tests.e2e.helpers import (
    BotRun,
    ControlledEngine,
    StartBot,
    build_tiny_model,
    close_bot,
    default_settings,
)
from tests.fake_discord import FakeDiscord


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(folder)
    return folder


@pytest.fixture(scope="session")
def loaded_model(tiny_model_folder: Path) -> Any:
    from model.loading import load_model
    from model.spec import resolve_spec

    return load_model(resolve_spec(base=str(tiny_model_folder), device="cpu"))


@pytest.fixture
def real_engine(loaded_model: Any) -> TextGenerator:
    from model.engine import Engine

    return Engine(loaded_model)


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    # The bot points discord.py's class-level REST base and gateway URL at the fake;
    # monkeypatch puts the real ones back after the test.
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)
    yield server
    await server.stop()


@pytest.fixture
async def start_bot(
    fake: FakeDiscord, tmp_path: Path, real_engine: TextGenerator
) -> AsyncIterator[StartBot]:
    """``await start_bot(engine=None, **settings)``: a connected bot with synced commands."""
    runs: list[BotRun] = []

    async def start(engine: Any = None, **overrides: Any) -> BotRun:
        from bot.client import HtmlBot

        settings = default_settings(fake, tmp_path, **overrides)
        engine = engine if engine is not None else real_engine
        bot = HtmlBot(settings, engine)
        await bot.__aenter__()
        task = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
        run = BotRun(bot=bot, task=task, fake=fake, settings=settings, engine=engine)
        runs.append(run)
        ready = asyncio.create_task(_ready_and_synced(fake))
        await asyncio.wait([ready, task], timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            if task.done():
                task.result()  # the bot's start-up error
            raise TimeoutError("the bot did not connect and sync within 20 s")
        run.sync_payload = ready.result()
        return run

    yield start
    for run in runs:
        if isinstance(run.engine, ControlledEngine):
            run.engine.release()
        await close_bot(run)
        await run.bot.__aexit__(None, None, None)


async def _ready_and_synced(fake: FakeDiscord) -> list[dict[str, Any]]:
    payload = await fake.wait_for_sync(timeout=20)
    await fake.wait_until_ready(timeout=20)
    return payload
