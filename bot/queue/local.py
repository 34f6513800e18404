"""The local backend: one process, the in-memory :class:`~bot.scheduler.Scheduler`, journaled.

:class:`LocalQueue` is both sides of the queue at once: the bot's :class:`~bot.queue.JobQueue`
(coroutines over the thread-safe scheduler) and the worker thread's
:class:`~bot.queue.JobSource` (blocking calls). Each transition is written to the
:class:`~bot.queue.journal.JobJournal` when there is one, so a restarted bot can
:meth:`~LocalQueue.restore` what a kill interrupted.

Write order matters, since the loop and the worker thread journal the same job: a job is
journaled *before* the scheduler can hand it to the worker (and forgotten if the scheduler
refuses it), so its "started" row can never be overwritten by a late "submitted" one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from bot.jobs import Job, JobState
from bot.queue import QueueSnapshot
from bot.queue.journal import JobJournal
from bot.scheduler import Scheduler, Throughput

log = logging.getLogger(__name__)

# A job that was running at this many kills in a row is failed, not run again: it may be
# what kills the process (poison protection, as the Redis backend's max_attempts).
MAX_ATTEMPTS = 3
RESTART_FAILED = (
    "The bot restarted several times while making this page, so it was given up. "
    "Please try again, perhaps with a shorter prompt."
)
PRUNE_EVERY = 256  # deliveries between two prunes of the journal


class LocalQueue:
    """The in-process queue (both protocols), journaled when ``journal`` is given."""

    def __init__(
        self,
        scheduler: Scheduler,
        journal: JobJournal | None = None,
        *,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.scheduler = scheduler
        self.journal = journal
        self.max_attempts = max_attempts
        self._delivered = 0
        # Expired and cancelled-before-take jobs leave the queue inside take(): journal them.
        scheduler.add_expired_listener(self._record_finished)
        scheduler.add_dropped_listener(self._record_finished)

    @property
    def throughput(self) -> Throughput:
        return self.scheduler.throughput

    # -- JobQueue (the event loop) -----------------------------------------------------

    async def submit(self, job: Job) -> int:
        """Queue ``job``; its 1-based position. Raises QueueFull, UserLimitReached,
        ShuttingDown (nothing stays in the journal then)."""
        if self.journal is None:
            return self.scheduler.submit(job)
        return await asyncio.to_thread(self._submit_journaled, job)

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now (journaled), or flag a running one for the engine."""
        job = self.scheduler.cancel(job_id)
        if job is None or self.journal is None:
            return job
        if job.state is JobState.CANCELLED:
            await asyncio.to_thread(self.journal.record_finished, job)
        else:
            await asyncio.to_thread(self.journal.record_cancel_requested, job.job_id)
        return job

    async def get(self, job_id: str) -> Job | None:
        """A pending (queued or running) job."""
        return self.scheduler.get(job_id)

    async def pending(self, user_id: int | None = None) -> list[Job]:
        """Running jobs, then queued ones in take order; one user's if given."""
        return self.scheduler.pending(user_id)

    async def snapshot(self) -> QueueSnapshot:
        """Positions, counts, running jobs' tokens and the measured job time."""
        jobs = self.scheduler.pending()
        positions = self.scheduler.positions()
        running = {job.job_id: job.tokens_so_far for job in jobs if job.state is JobState.RUNNING}
        return QueueSnapshot(
            positions=positions,
            running_tokens=running,
            queued=len(positions),
            running=len(running),
            job_seconds=self.throughput.job_seconds,
            max_batch=self.scheduler.max_batch,
        )

    async def record_delivered(self, job_id: str) -> None:
        """The user has been told the job's outcome (page sent, or the final message)."""
        if self.journal is None:
            return
        await asyncio.to_thread(self.journal.record_delivered, job_id)
        self._delivered += 1
        if self._delivered % PRUNE_EVERY == 0:  # the journal must not grow for ever
            await asyncio.to_thread(self.journal.prune)

    def close(self, *, resume_later: bool = False) -> list[Job]:
        """Take no more jobs; returns the queued ones, now CANCELLED, to tell their users.

        With ``resume_later`` their journal rows stay queued, so the next start runs them
        (a planned restart); otherwise they are journaled as cancelled.
        """
        dropped = self.scheduler.close()
        if not resume_later:
            for job in dropped:
                self._record_finished(job)
        return dropped

    # -- restart -----------------------------------------------------------------------

    def restore(self, jobs: Iterable[Job]) -> list[Job]:
        """Put the journal's unfinished jobs back; returns the finished ones to deliver.

        Queued and running jobs (as :meth:`JobJournal.load_unfinished` orders them) are
        queued again in that order, past the per-user limit and the total bound. A job that
        was already started ``max_attempts`` times is failed instead, and one whose cancel
        was requested is cancelled; both are returned with the finished ones, to be told.
        """
        requeue: list[Job] = []
        finished: list[Job] = []
        for job in jobs:
            if job.state.terminal:
                finished.append(job)
            elif job.request.cancelled:  # its user cancelled it just before the kill
                job.state = JobState.CANCELLED
                job.finished_at = self.scheduler.clock()
                self._record_finished(job)
                finished.append(job)
            elif job.attempts >= self.max_attempts:
                log.warning(
                    "job %s was running at %d restarts; failing it", job.job_id, job.attempts
                )
                job.state = JobState.FAILED
                job.error = RESTART_FAILED
                job.finished_at = self.scheduler.clock()
                self._record_finished(job)
                finished.append(job)
            else:
                job.tokens_so_far = 0
                job.result = None
                requeue.append(job)
        self.scheduler.restore(requeue)
        if self.journal is not None:
            for job in requeue:
                self.journal.record_submitted(job, self.scheduler.order_key(job.job_id))
        log.info(
            "restored %d queued or running job(s) and %d undelivered result(s)",
            len(requeue),
            len(finished),
        )
        return finished

    # -- JobSource (the worker thread) -------------------------------------------------

    def take(self, max_count: int, wait_s: float = 0.0) -> list[Job]:
        """Up to ``max_count`` jobs in fair order, now RUNNING (journaled)."""
        jobs = self.scheduler.take(max_count, wait_s)
        if self.journal is not None:
            for job in jobs:
                self.journal.record_started(job)
        return jobs

    def progress(self, job: Job, tokens: int) -> bool:
        """Record ``tokens`` generated so far; False once the job was cancelled.

        Not journaled (too frequent, and a restart runs the job from the start anyway).
        The worker records job times and seeds in :attr:`throughput` itself.
        """
        job.tokens_so_far = tokens
        return not job.request.cancelled

    def finish(self, job: Job, state: JobState) -> bool:
        """``job`` ended (``result``/``error`` set): journaled. Always True: in one process
        nobody else can own the job."""
        self.scheduler.finish(job, state)
        self._record_finished(job)
        return True

    def requeue_front(self, jobs: Iterable[Job]) -> None:
        """Running jobs go back to their old places at the head of the queue."""
        jobs = list(jobs)
        self.scheduler.requeue_front(jobs)
        if self.journal is None:
            return
        for job in jobs:
            if job.state is JobState.QUEUED:
                self.journal.record_submitted(job, self.scheduler.order_key(job.job_id))
            else:  # cancelled meanwhile, or the queue is closing
                self.journal.record_finished(job)

    def wake(self) -> None:
        """Wake a ``take`` that is waiting (used when stopping)."""
        self.scheduler.wake()

    def seed_job_seconds(self, seconds: float) -> None:
        """How long a job takes, measured by the engine's warm-up (until a job finishes)."""
        self.throughput.seed_job_seconds(seconds)

    def seed_rate(self, tokens_per_second_per_job: float, expected_tokens: int) -> None:
        """One sequence's tokens/s (and the tokens a job makes), until a job finishes."""
        self.throughput.seed_rate(tokens_per_second_per_job, expected_tokens)

    # -- internals ---------------------------------------------------------------------

    def _submit_journaled(self, job: Job) -> int:
        assert self.journal is not None
        if self.scheduler.get(job.job_id) is not None:
            # Before journaling: forget() below must not drop the pending job's row.
            raise ValueError(f"duplicate job id {job.job_id}")
        self.journal.record_submitted(job)
        try:
            position = self.scheduler.submit(job)
        except BaseException:
            self.journal.forget(job.job_id)
            raise
        key = self.scheduler.order_key(job.job_id)
        if key is not None:  # None: already taken by the worker
            self.journal.set_order(job.job_id, key)
        return position

    def _record_finished(self, job: Job) -> None:
        if self.journal is not None:
            self.journal.record_finished(job)
