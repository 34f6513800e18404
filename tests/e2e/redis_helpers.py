"""Running bots and workers on a real Redis for the end-to-end tests."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.helpers import BotRun, close_bot, default_settings
from tests.fake_discord import FakeDiscord
from tests.redis_server import RedisServer


def redis_settings(
    fake: FakeDiscord, tmp_path: Path, server: RedisServer, prefix: str, **overrides: Any
) -> Any:
    """Settings for a bot or worker on ``server`` under ``prefix`` (tests keep apart by it)."""
    values: dict[str, Any] = {
        "queue_backend": "redis",
        "redis_url": server.url,
        "redis_prefix": prefix,
        "worker_lease_s": 3.0,
    }
    values.update(overrides)
    return default_settings(fake, tmp_path, **values)


def new_prefix() -> str:
    return f"t{secrets.token_hex(4)}"


@dataclass
class WorkerRun:
    """``bot.gpu_worker.serve`` running as a task of this loop, until :meth:`stop`."""

    task: asyncio.Task[None]
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self, timeout_s: float = 30.0) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, timeout_s)


async def start_worker(settings: Any, engine: Any, max_batch: int = 4) -> WorkerRun:
    from bot.gpu_worker import serve

    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, engine, max_batch=max_batch, stop=stop))
    await asyncio.sleep(0)
    return WorkerRun(task=task, stop_event=stop)


async def start_redis_bot(fake: FakeDiscord, settings: Any) -> BotRun:
    """A connected bot with the Redis backend (no engine in its process)."""
    from bot.client import create_bot

    bot = create_bot(settings)
    await bot.__aenter__()
    task = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
    run = BotRun(bot=bot, task=task, fake=fake, settings=settings, engine=None)
    ready = asyncio.create_task(fake.wait_until_ready(timeout=20))
    await asyncio.wait([ready, task], timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        if task.done():
            task.result()
        raise TimeoutError("the bot did not connect within 20 s")
    return run


async def stop_redis_bot(run: BotRun) -> None:
    await close_bot(run)
    await run.bot.__aexit__(None, None, None)
