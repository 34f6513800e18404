"""``python -m bot.worker``: one GPU worker serving the shared Redis queue.

Run one per GPU, on any number of machines, all with the same ``REDIS_URL`` (and model
settings). The worker loads the model, warms it up, then takes jobs from Redis in fair
order and runs them through the same engine and worker thread as the one-process bot,
continuous batching included; it never talks to Discord (no token needed): finished jobs
go back to Redis, and the bots deliver them.

SIGTERM/SIGINT: no new jobs; running ones get ``SHUTDOWN_DEADLINE_S`` to finish, then go
back to the queue for another worker. A worker killed outright (SIGKILL, OOM, power) stops
renewing its jobs' leases; after ``WORKER_LEASE_S`` another worker takes them over.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

from bot.backend import process_name
from bot.errors import QueueUnavailable
from bot.jobs import Job
from bot.settings import Settings, SettingsError, load_settings
from bot.worker import Worker

log = logging.getLogger("bot.worker")

EXIT_SETTINGS = 2
EXIT_MODEL = 4
EXIT_REDIS = 6
# The worker never uses the Discord token; the settings type asks for one.
NO_TOKEN = "not-needed-by-the-worker"
REDIS_WAIT_S = 60.0


class LogSink:
    """The worker's reports, where no Discord client listens: the log."""

    def job_started(self, job: Job) -> None:
        log.debug("job %s started", job.job_id)

    def job_progress(self, job: Job) -> None:
        pass

    def job_finished(self, job: Job) -> None:
        log.info("job %s %s (%d tokens)", job.job_id, job.state.value, job.tokens_so_far)


def worker_settings() -> Settings:
    """The settings, without requiring DISCORD_TOKEN (raises SettingsError)."""
    try:
        return load_settings()
    except SettingsError as exc:
        if "DISCORD_TOKEN" not in str(exc):
            raise
        return load_settings(discord_token=NO_TOKEN)


async def wait_for_redis(queue: Any, limit_s: float = REDIS_WAIT_S) -> None:
    """Return once Redis answers; raise QueueUnavailable after ``limit_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while True:
        try:
            await queue.ping()
            return
        except QueueUnavailable:
            if loop.time() >= deadline:
                raise
            log.warning("Redis is not answering yet; retrying")
            await asyncio.sleep(2.0)


async def serve(
    settings: Settings,
    engine: Any = None,
    *,
    max_batch: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Load the model (unless ``engine`` is given) and serve Redis until SIGINT/SIGTERM,
    or until ``stop`` is set when one is given (then no signal handler is installed)."""
    from bot.queue.redis_queue import RedisQueue
    from bot.queue.redis_source import RedisJobSource

    name = process_name(settings, "worker")
    queue = RedisQueue.from_settings(settings)
    await wait_for_redis(queue)
    if engine is None:
        from bot.__main__ import engine_config
        from model.build import build_engine
        from model.spec import resolve_spec

        spec = resolve_spec(**settings.model_overrides())
        log.info("worker %s: loading %s", name, spec.name)
        built = await asyncio.to_thread(build_engine, spec, engine_config(settings))
        engine, batch = built.engine, built.batch_size
        log.info(
            "worker %s: %s engine on %s, batch %d, loaded in %.1f s (warm-up %.1f s)",
            name,
            built.kind,
            built.device,
            batch,
            built.load_seconds,
            built.warmup_seconds,
        )
    else:
        batch = max_batch or settings.batch_size(engine)
    loop = asyncio.get_running_loop()
    source = RedisJobSource(queue, loop, name, settings.worker_lease_s, max_batch=batch)
    worker = Worker(engine, source, LogSink(), loop, max_batch=batch)
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                break
    worker.start()
    log.info("worker %s: serving %s", name, settings.redis_url.split("@")[-1])
    try:
        await stop.wait()
    finally:
        await stop_worker(worker, source, settings.shutdown_deadline_s)
        await queue.aclose()


async def stop_worker(worker: Worker, source: Any, deadline_s: float) -> None:
    """Take no more jobs; let the running ones finish for ``deadline_s``, then hand them
    back to the queue (another worker finishes them) and stop."""
    worker.stop()
    if not await asyncio.to_thread(worker.join, deadline_s):
        running = worker.running_jobs()
        log.warning("stopping: handing %d running job(s) back to the queue", len(running))
        await asyncio.to_thread(source.requeue_front, running)
        worker.cancel_running()
        if not await asyncio.to_thread(worker.join, 10.0):
            log.error("the worker thread did not stop; leaving it behind")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bot.worker``; returns the exit status."""
    from bot.__main__ import configure_logging, print_settings_error

    try:
        settings = worker_settings()
    except SettingsError as exc:
        print_settings_error(exc)
        return EXIT_SETTINGS
    configure_logging(settings)
    if settings.queue_backend != "redis":
        print(
            "error: QUEUE_BACKEND is not redis: a standalone worker serves the Redis queue "
            "(the one-process bot runs its own worker)",
            file=sys.stderr,
        )
        return EXIT_SETTINGS
    from model.errors import ModelError

    try:
        asyncio.run(serve(settings))
    except QueueUnavailable:
        print(f"error: Redis at {settings.redis_url} did not answer", file=sys.stderr)
        return EXIT_REDIS
    except ModelError as exc:
        print(f"error: model: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except KeyboardInterrupt:
        return 130
    return 0
