"""The bot's queue backend, chosen by ``QUEUE_BACKEND``: what the client is handed.

``local``: one in-process scheduler that the bot's own worker thread serves, its jobs
journaled in SQLite (``STATE_DB``), pages in files (``RESULTS_DIR``). ``redis``: the queue,
the pages and the deliveries in Redis (``REDIS_URL``), served by ``python -m bot.worker``
processes; this process needs no model.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from bot.queue import JobQueue, JobSource, PageStore
from bot.scheduler import Scheduler, Throughput
from bot.settings import Settings
from bot.store import ResultStore

log = logging.getLogger(__name__)


def process_name(settings: Settings, role: str) -> str:
    """``WORKER_NAME``, or ``<role>-<host>-<pid>``: unique per process, readable in logs."""
    return settings.worker_name or f"{role}-{socket.gethostname()}-{os.getpid()}"


@dataclass
class Backend:
    """The queue, the page store and (local) the worker's side of the queue."""

    kind: str
    queue: JobQueue
    pages: PageStore
    throughput: Throughput | None = None
    # local only: what the in-process worker takes jobs from, the scheduler and the journal
    source: JobSource | None = None
    scheduler: Scheduler | None = None
    journal: Any = None
    # redis only: the RedisQueue (deliveries are read from it)
    redis: Any = None

    async def aclose(self) -> None:
        closer = getattr(self.pages, "aclose", None)
        if closer is not None:
            await closer()
        if self.redis is not None:
            await self.redis.aclose()
        if self.journal is not None:
            self.journal.close()


def local_backend(settings: Settings, max_batch: int) -> Backend:
    """The in-process scheduler with its SQLite journal and the file page store."""
    from bot.queue.journal import JobJournal
    from bot.queue.local import LocalQueue

    throughput = Throughput(settings.initial_job_seconds)
    scheduler = Scheduler(
        max_total=settings.queue_max_total,
        max_per_user=settings.queue_max_per_user,
        max_batch=max_batch,
        throughput=throughput,
        delivery_margin_s=settings.delivery_margin_s,
    )
    journal = JobJournal(settings.state_db_path)
    queue = LocalQueue(scheduler, journal)
    pages = ResultStore(settings.results_dir, settings.results_keep_per_user)
    return Backend(
        kind="local",
        queue=queue,
        pages=pages,
        throughput=throughput,
        source=queue,
        scheduler=scheduler,
        journal=journal,
    )


def redis_backend(settings: Settings) -> Backend:
    """The shared queue and page store in Redis (connections open on first use)."""
    from bot.queue.redis_pages import RedisPageStore
    from bot.queue.redis_queue import RedisQueue

    queue = RedisQueue.from_settings(settings)
    pages = RedisPageStore.from_settings(settings, queue.client)
    return Backend(kind="redis", queue=queue, pages=pages, redis=queue)
