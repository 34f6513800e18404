"""Where jobs wait: one interface on each side of the queue, two backends.

The bot side (slash commands, the status board, delivery) uses a :class:`JobQueue`; the GPU
worker uses a :class:`JobSource`. ``QUEUE_BACKEND=local`` gives both from one in-process
:class:`~bot.scheduler.Scheduler` (journaled in SQLite, so a restart resumes its jobs);
``QUEUE_BACKEND=redis`` keeps the queue in Redis, shared by any number of bot shards and GPU
workers (``bot.queue.redis_queue``).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from bot.jobs import Job, JobState

if TYPE_CHECKING:
    from bot.versions import PageHistory, StoredPage


@dataclass(frozen=True)
class QueueSnapshot:
    """The queue as one status pass sees it (positions are 1-based, in take order)."""

    positions: dict[str, int] = field(default_factory=dict)
    # Tokens generated so far by each running job (what the status line shows).
    running_tokens: dict[str, int] = field(default_factory=dict)
    queued: int = 0
    running: int = 0
    job_seconds: float = 60.0  # how long one job takes, measured (for ETAs)
    max_batch: int = 1  # jobs that run side by side, over all workers

    def eta_s(self, position: int) -> float:
        """Rough seconds until the job at ``position`` is finished."""
        rounds = -(-position // max(self.max_batch, 1)) + 1
        return rounds * self.job_seconds


class JobQueue(Protocol):
    """The bot's side: every method may raise ``QueueUnavailable`` (Redis down)."""

    async def submit(self, job: Job) -> int:
        """Queue ``job``; its 1-based position. Raises QueueFull, UserLimitReached..."""
        ...

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now, or ask the engine to stop a running one; None if gone."""
        ...

    async def get(self, job_id: str) -> Job | None:
        """A pending (queued or running) job."""
        ...

    async def pending(self, user_id: int | None = None) -> list[Job]:
        """Running jobs, then queued ones in take order; one user's if given."""
        ...

    async def snapshot(self) -> QueueSnapshot: ...


class JobSource(Protocol):
    """The worker's side. Called from the worker thread: every method blocks."""

    def take(self, max_count: int, wait_s: float = 0.0) -> list[Job]:
        """Up to ``max_count`` jobs in fair order, now RUNNING (waits up to ``wait_s``)."""
        ...

    def progress(self, job: Job, tokens: int) -> bool:
        """Record progress (and keep the job's lease); False: stop it (cancelled or lost)."""
        ...

    def finish(self, job: Job, state: JobState) -> bool:
        """``job`` ended (``result``/``error`` set); False if another worker owns it now."""
        ...

    def requeue_front(self, jobs: Iterable[Job]) -> None:
        """Running jobs go back to the head of the queue (after an out-of-memory)."""
        ...

    def wake(self) -> None:
        """Wake a ``take`` that is waiting (used when stopping)."""
        ...


class PageStore(Protocol):
    """Finished pages kept for ``/mypages``: files (local) or Redis (shared by all shards).

    Each kept page is one version of a page (``bot.versions``): ``save`` with a
    ``parent_job_id`` adds the next version to the parent's page. Only the owner's user id
    reads a version, except through ``get_any`` (the owner check of the page's buttons).
    """

    async def save(
        self,
        *,
        user_id: int,
        job_id: str,
        filename: str,
        data: bytes,
        prompt: str,
        model: str,
        generated_tokens: int = 0,
        seconds: float = 0.0,
        warnings: tuple[str, ...] = (),
        parent_job_id: str | None = None,
        kind: str = "create",
        instruction: str | None = None,
        content: str | None = None,
    ) -> StoredPage:
        """Keep a version (v1 of a new page, or the next version of the parent's page)."""
        ...

    async def list(self, user_id: int) -> list[StoredPage]:
        """The user's versions, one entry each, newest first."""
        ...

    async def list_pages(self, user_id: int) -> builtins.list[PageHistory]:
        """The user's pages, newest first, each with its versions in order."""
        ...

    async def get(self, user_id: int, job_id: str) -> StoredPage | None: ...

    async def get_version(self, user_id: int, page_id: str, version: int) -> StoredPage | None: ...

    async def get_page(self, user_id: int, page_id: str) -> PageHistory | None:
        """One of the user's pages with its versions in order."""
        ...

    async def get_any(self, job_id: str) -> StoredPage | None:
        """A version whoever owns it (``user_id`` says who): the caller decides."""
        ...

    async def read(self, page: StoredPage) -> bytes: ...

    async def read_content(self, page: StoredPage) -> str | None:
        """A compose page's structured content (JSON text), None if none was kept."""
        ...

    async def set_message(
        self,
        user_id: int,
        job_id: str,
        *,
        message_id: int | None = None,
        channel_id: int | None = None,
        thread_id: int | None = None,
    ) -> StoredPage | None:
        """Record where a version was posted; None if the user has no such version."""
        ...
