"""Running bots and workers on a real Redis for the end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.helpers import BotRun, close_bot, default_settings
from tests.fake_discord import FakeDiscord, FakeInteraction
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


# -- a real worker process --------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class WorkerProcess:
    """``python -m bot.worker`` in a child process, its output in ``log_path``."""

    process: subprocess.Popen[bytes]
    name: str
    log_path: Path

    @classmethod
    def start(
        cls,
        server: RedisServer,
        prefix: str,
        model_folder: Path,
        folder: Path,
        *,
        name: str,
        max_new_tokens: int,
        max_batch: int = 4,
        lease_s: float = 3.0,
    ) -> WorkerProcess:
        """Start one; it runs in ``folder`` (no ``.env`` there) with only these settings."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("DISCORD_", "REDIS_", "MODEL_", "QUEUE_", "WORKER_"))
        }
        env.update(
            QUEUE_BACKEND="redis",
            REDIS_URL=server.url,
            REDIS_PREFIX=prefix,
            MODEL_BASE=str(model_folder),
            MODEL_DEVICE="cpu",
            ENGINE="standard",
            MAX_NEW_TOKENS=str(max_new_tokens),
            MAX_BATCH=str(max_batch),
            WORKER_LEASE_S=str(lease_s),
            WORKER_NAME=name,
            HF_HUB_OFFLINE="1",
            CPU_THREADS="1",
            PYTHONPATH=str(REPO_ROOT),
        )
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / f"{name}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "bot.worker"],
                cwd=folder,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        return cls(process=process, name=name, log_path=log_path)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> int:
        """SIGKILL it (nothing runs on its side: no finish, no requeue); its exit status."""
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait(timeout=10)

    def ensure_stopped(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


# -- looking into Redis -------------------------------------------------------------------------


class RedisView:
    """Reads the queue's keys directly (what the tests check, not what the bot says)."""

    def __init__(self, server: RedisServer, prefix: str) -> None:
        from bot.queue.redis_queue import connect

        self.client = connect(server.url)
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    async def running(self) -> dict[str, str]:
        """Running job id -> the worker holding its lease."""
        ids = await self.client.zrange(self.key("running"), 0, -1)
        out: dict[str, str] = {}
        for member in ids:
            job_id = str(member)
            out[job_id] = str(await self.client.hget(self.key(f"job:{job_id}"), "worker") or "")
        return out

    async def queued(self) -> list[str]:
        return [str(job_id) for job_id in await self.client.zrange(self.key("queue"), 0, -1)]

    async def job(self, job_id: str) -> dict[str, str]:
        return {
            str(k): str(v)
            for k, v in (await self.client.hgetall(self.key(f"job:{job_id}"))).items()
        }

    async def delivered(self, job_id: str) -> bool:
        return bool(await self.client.exists(self.key(f"delivered:{job_id}")))

    async def aclose(self) -> None:
        await self.client.aclose()


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str, every_s: float = 0.1
) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(every_s)


JOB_ID_RE = re.compile(r"/mypages page:([0-9a-f]{8})")


def job_id_of(inter: FakeInteraction) -> str:
    """The job id the bot's messages name (the Done text, or its status edits' Cancel button)."""
    found = JOB_ID_RE.search(inter.original_content)
    if found:
        return found.group(1)
    for custom_id in inter.custom_ids():
        if custom_id.startswith("htmlbot:cancel:"):
            return custom_id.removeprefix("htmlbot:cancel:")
    for request in inter.ok_requests:
        body = json.dumps(request.json or {})
        match = re.search(r"htmlbot:cancel:([0-9a-f]{8})", body)
        if match:
            return match.group(1)
    raise AssertionError(f"no job id in the messages of {inter}: {inter.contents}")


def _has_job_id(inter: FakeInteraction) -> bool:
    try:
        job_id_of(inter)
    except AssertionError:
        return False
    return True


async def wait_job_id(inter: FakeInteraction, timeout_s: float = 10.0) -> str:
    """The job id of ``inter``, once a status edit (its Cancel button) or the Done text
    named it."""
    await inter.wait_until(_has_job_id, timeout=timeout_s)
    return job_id_of(inter)


async def abandon_bot(run: BotRun) -> None:
    """Leave a bot as a SIGKILL would: no graceful close (no shutdown steps, no last
    edits), its tasks gone and its connections to Discord and Redis dropped."""
    bot = run.bot
    tasks = [run.task, *bot._background, *bot._tasks]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # The gateway socket goes with the HTTP session (aiohttp closes its connections).
    await bot.http.close()
    await bot.backend.aclose()
    await run.fake.wait_until(lambda: not any(s.live for s in run.fake.sessions), timeout=10)
