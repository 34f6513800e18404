"""The deferred message of each job: queue position, ETA and progress, kept current.

Each job's interaction has one message (``@original``). Each pass reads one
:class:`~bot.queue.QueueSnapshot` from the job queue (in process, or Redis shared by every
shard and worker) and edits a tracked job's message when what it
should say has changed, at most once per ``interval_s`` per job and at most
``edits_per_second`` in all, so a long queue does not run into Discord's rate limits. The
final edit (done, failed, cancelled) goes through the same per-job lock, so a late status
edit can never overwrite it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import discord

from bot import texts
from bot.errors import QueueUnavailable
from bot.jobs import Job
from bot.queue import JobQueue, QueueSnapshot
from bot.scheduler import format_duration

log = logging.getLogger(__name__)

CANCEL_PREFIX = "htmlbot:cancel:"


def cancel_custom_id(job_id: str) -> str:
    return f"{CANCEL_PREFIX}{job_id}"


def cancel_view(job_id: str) -> discord.ui.View:
    """A view holding only the Cancel button.

    The view is stopped before it is sent so discord.py does not keep one listener per
    message: presses are handled in ``HtmlBot.on_interaction`` by custom_id, which also
    works for messages sent before a restart.
    """
    view = discord.ui.View(timeout=None)
    view.add_item(
        discord.ui.Button(
            label="Cancel", style=discord.ButtonStyle.danger, custom_id=cancel_custom_id(job_id)
        )
    )
    view.stop()
    return view


# Discord's answers that mean an interaction token can no longer be used: 401 "Invalid
# Webhook Token" once it has expired, 404 "Unknown Webhook"/"Unknown interaction".
DEAD_TOKEN_STATUSES = (401, 404)


@dataclass(eq=False)
class Ticket:
    """The Discord side of a job: its interaction and the state of its message.

    ``deferred`` is set once Discord has acknowledged the defer; ``settled`` once the defer
    has been answered either way, so nobody waits for a defer that failed. ``dead`` means
    the token is unusable (the defer failed, or Discord answered 401/404 to a call made
    with it): nothing more is sent with it, since Discord counts every refused call toward
    its invalid-request limit.
    """

    interaction: Any  # discord.Interaction (Any so tests can pass a stand-in)
    deferred: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    shown: str | None = None
    last_edit: float = float("-inf")
    final: bool = False
    dead: bool = False
    edits: int = 0

    def mark_deferred(self) -> None:
        """Discord acknowledged the defer: the message exists and may be edited."""
        self.deferred.set()
        self.settled.set()

    def mark_defer_failed(self) -> None:
        """The defer was refused or never arrived: no message will ever exist."""
        self.final = True
        self.dead = True
        self.settled.set()

    async def wait_settled(self, limit_s: float) -> bool:
        """Wait up to ``limit_s`` for the defer's outcome; False if none came in time."""
        if self.deferred.is_set() or self.settled.is_set():
            return True
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            async with asyncio.timeout(limit_s):
                await self.settled.wait()
        except TimeoutError:
            return False
        return True


def ticket_of(job: Job) -> Ticket:
    ticket = job.context
    if not isinstance(ticket, Ticket):
        raise TypeError(f"job {job.job_id} has no ticket")
    return ticket


def status_text(job: Job, snapshot: QueueSnapshot) -> str | None:
    """What the job's message should say now; None when the snapshot does not hold it (it
    is being handed between queue and worker, or has just ended: the next pass will tell)."""
    tokens = snapshot.running_tokens.get(job.job_id)
    if tokens is not None:
        return texts.generating(max(tokens, job.tokens_so_far))
    position = snapshot.positions.get(job.job_id)
    if position is not None:
        eta = format_duration(snapshot.eta_s(position))
        return texts.queued(position, snapshot.queued, eta)
    return None


EditFn = Callable[[Job, str], Awaitable[None]]


class StatusBoard:
    """Keeps the tracked jobs' messages current (see the module docstring)."""

    def __init__(
        self,
        queue: JobQueue,
        *,
        interval_s: float,
        edits_per_second: float = 10.0,
        concurrency: int = 8,
        edit: EditFn | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.interval_s = interval_s
        self.edits_per_second = edits_per_second
        self._edit = edit or edit_status_message
        self._jobs: dict[str, Job] = {}
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.edits_sent = 0
        # A token bucket: edits_per_second on average, bursts of up to one second's worth.
        self._allowance = edits_per_second
        self._clock = clock
        self._refilled = clock()

    def track(self, job: Job) -> None:
        """Start keeping ``job``'s message current (its first edit goes out at once)."""
        self._jobs[job.job_id] = job
        self._wake.set()

    def untrack(self, job: Job) -> None:
        self._jobs.pop(job.job_id, None)

    def poke(self) -> None:
        """Something changed (a job started, progressed or left): look again soon."""
        self._wake.set()

    async def run(self) -> None:
        """Loop until :meth:`stop` (or until the task is cancelled)."""
        tick = min(1.0, self.interval_s)
        while not self._stopping:
            # Not asyncio.wait_for: on Python 3.11 it returns the event's result instead of
            # raising when a cancel arrives just as the event is set (CPython gh-86296),
            # and this loop would then outlive the one cancel meant to stop it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._wake.wait()
            if self._stopping:
                break
            self._wake.clear()
            try:
                await self.update_once()
            except QueueUnavailable:
                log.info("status pass skipped: the queue is unavailable")
            # Pace even when poked constantly: at most one pass per tick.
            await asyncio.sleep(tick / 2)

    def stop(self) -> None:
        """Make :meth:`run` return at its next step; no new status edits start."""
        self._stopping = True
        self._wake.set()

    async def update_once(self) -> int:
        """Start the edits that are due now, within the budget; returns how many."""
        if self._stopping or not self._jobs:
            return 0
        snapshot = await self.queue.snapshot()
        now = self._clock()
        due: list[tuple[float, Job, str]] = []
        for job_id, job in list(self._jobs.items()):
            ticket = job.context
            if job.state.terminal or not isinstance(ticket, Ticket) or ticket.final or ticket.dead:
                self._jobs.pop(job_id, None)
                continue
            if not ticket.deferred.is_set() or ticket.lock.locked():
                continue
            if now - ticket.last_edit < self.interval_s:
                continue
            text = status_text(job, snapshot)
            if text is not None and text != ticket.shown:
                due.append((ticket.last_edit, job, text))
        due.sort(key=lambda item: item[0])  # the longest-unchanged messages first
        self._allowance = min(
            self.edits_per_second,
            self._allowance + (now - self._refilled) * self.edits_per_second,
        )
        self._refilled = now
        budget = int(self._allowance)
        self._allowance -= min(len(due), budget)
        for _, job, text in due[:budget]:
            ticket_of(job).last_edit = now
            task = asyncio.create_task(self._send(job, text), name=f"status-{job.job_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return min(len(due), budget)

    async def _send(self, job: Job, text: str) -> None:
        ticket = ticket_of(job)
        async with self._sem, ticket.lock:
            if ticket.final or ticket.dead or job.state.terminal:
                return
            try:
                await self._edit(job, text)
            except discord.HTTPException as exc:
                if exc.status in DEAD_TOKEN_STATUSES:
                    # The token has expired (or the interaction is gone) and won't come
                    # back: no more edits. The job goes on; its page is kept for /mypages.
                    ticket.dead = True
                    log.warning(
                        "job %s: Discord refused its token (%s %s); no more status edits",
                        job.job_id,
                        exc.status,
                        exc.text,
                    )
                    return
                # A status line is not worth a retry: the next tick sends a fresh one.
                log.info("status edit for job %s failed: %s %s", job.job_id, exc.status, exc.text)
                return
            except Exception:
                log.exception("status edit for job %s failed", job.job_id)
                return
            ticket.shown = text
            ticket.edits += 1
            self.edits_sent += 1

    async def aclose(self) -> None:
        """Stop, and cancel the status edits in flight."""
        self.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def edit_status_message(job: Job, text: str) -> None:
    """Edit the job's deferred message to ``text`` with its Cancel button."""
    interaction = ticket_of(job).interaction
    await interaction.edit_original_response(content=text, view=cancel_view(job.job_id))
