"""The job queue between the slash commands and the worker thread.

Bounded (``max_total`` queued jobs), with a per-user limit of pending jobs, and fair:
users take turns (round-robin), so one user with many jobs can't starve the others. A job
whose interaction token would expire before its page could be delivered is dropped at the
moment it would be taken, so it never reaches the GPU.

The scheduler is shared by the event loop (submit, cancel, positions) and the worker thread
(take), so every method is thread-safe and none of them awaits. Listeners are called in the
thread that caused the change; the bot's listener marshals to the loop itself.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from bot.errors import QueueFull, ShuttingDown, UserLimitReached
from bot.jobs import Job, JobState

log = logging.getLogger(__name__)

Clock = Callable[[], float]
JobListener = Callable[[Job], None]


class Throughput:
    """Measured speed of the worker, for ETAs and for the expiry check.

    ``job_seconds`` is a moving average of how long one job takes in the engine (its
    batch-mates run alongside it, so ``max_batch`` jobs finish in about that time).
    Before the first measurement it is ``initial_job_seconds``. ``tokens_per_second`` is
    the aggregate rate (all sequences together) over the last ``window_s`` seconds.
    """

    def __init__(
        self,
        initial_job_seconds: float,
        alpha: float = 0.3,
        window_s: float = 30.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._alpha = alpha
        self._window_s = window_s
        self._clock = clock
        self._started = clock()
        self._generated: deque[tuple[float, int]] = deque()
        self.job_seconds = initial_job_seconds
        self.samples = 0

    def record_job(self, seconds: float) -> None:
        """One job's generation time (from batch start to its result)."""
        with self._lock:
            if self.samples == 0:
                self.job_seconds = seconds
            else:
                self.job_seconds += self._alpha * (seconds - self.job_seconds)
            self.samples += 1

    def record_tokens(self, tokens: int) -> None:
        """Tokens just generated (a finished batch's, or one finished job's)."""
        now = self._clock()
        with self._lock:
            # Pruned here too: with metrics off nobody reads the rate, and the window must
            # not grow by one entry per job for the life of the bot.
            self._drop_old_locked(now)
            self._generated.append((now, tokens))

    @property
    def tokens_per_second(self) -> float:
        now = self._clock()
        with self._lock:
            self._drop_old_locked(now)
            total = sum(tokens for _, tokens in self._generated)
        span = min(self._window_s, now - self._started)
        return total / span if span > 0 else 0.0

    def _drop_old_locked(self, now: float) -> None:
        while self._generated and self._generated[0][0] < now - self._window_s:
            self._generated.popleft()


class Scheduler:
    """A bounded, fair, cancellable job queue (see the module docstring)."""

    def __init__(
        self,
        *,
        max_total: int,
        max_per_user: int,
        max_batch: int,
        throughput: Throughput,
        delivery_margin_s: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.max_total = max_total
        self.max_per_user = max_per_user
        self.max_batch = max_batch
        self.throughput = throughput
        self.delivery_margin_s = delivery_margin_s
        self._clock = clock
        self._cond = threading.Condition()
        # user id -> that user's queued jobs; the dict's order is the turn order.
        self._queues: OrderedDict[int, deque[Job]] = OrderedDict()
        self._queued: dict[str, Job] = {}
        self._running: dict[str, Job] = {}
        self._closed = False
        self._expired_listeners: list[JobListener] = []

    # -- listeners ---------------------------------------------------------------------

    def add_expired_listener(self, listener: JobListener) -> None:
        """Called (in the taking thread) for each job dropped because its token would expire."""
        self._expired_listeners.append(listener)

    # -- loop side ---------------------------------------------------------------------

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns its 1-based position. Raises QueueFull, UserLimitReached."""
        with self._cond:
            if self._closed:
                raise ShuttingDown("The bot is shutting down and takes no new requests.")
            pending = self._pending_count(job.user_id)
            if pending >= self.max_per_user:
                raise UserLimitReached(
                    f"You already have {pending} request(s) pending (the limit is "
                    f"{self.max_per_user}). Wait for one to finish, or cancel one."
                )
            if len(self._queued) >= self.max_total:
                retry = self._retry_after_locked()
                raise QueueFull(
                    f"The queue is full ({self.max_total} requests). Please try again in "
                    f"about {format_duration(retry)}.",
                    retry_after_s=retry,
                )
            if job.job_id in self._queued or job.job_id in self._running:
                raise ValueError(f"duplicate job id {job.job_id}")
            job.state = JobState.QUEUED
            self._queues.setdefault(job.user_id, deque()).append(job)
            self._queued[job.job_id] = job
            position = self._positions_locked()[job.job_id]
            self._cond.notify_all()
        log.debug("queued job %s for user %s at position %d", job.job_id, job.user_id, position)
        return position

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job. Returns it, or None if it is not pending.

        A queued job leaves the queue at once (state CANCELLED). A running job gets its
        request's cancel flag set; the engine stops it at the next step and the worker
        reports it with finish_reason=cancelled.
        """
        with self._cond:
            job = self._queued.pop(job_id, None)
            if job is not None:
                self._remove_from_queue_locked(job)
                self._cancel_queued_locked(job)
                return job
            job = self._running.get(job_id)
            if job is not None:
                job.request.cancel()
            return job

    def get(self, job_id: str) -> Job | None:
        """A pending (queued or running) job by id."""
        with self._cond:
            return self._queued.get(job_id) or self._running.get(job_id)

    def pending(self, user_id: int | None = None) -> list[Job]:
        """Running jobs, then queued ones in the order they will run; one user's if given."""
        with self._cond:
            order = list(self._running.values()) + self._order_locked()
        return [job for job in order if user_id is None or job.user_id == user_id]

    def positions(self) -> dict[str, int]:
        """1-based queue position of every queued job (the order :meth:`take` will follow)."""
        with self._cond:
            return self._positions_locked()

    def eta_s(self, position: int) -> float:
        """Rough seconds until the job at ``position`` is finished, from measured speed."""
        rounds = math.ceil(position / max(self.max_batch, 1)) + 1
        return rounds * self.throughput.job_seconds

    @property
    def queued_count(self) -> int:
        with self._cond:
            return len(self._queued)

    @property
    def running_count(self) -> int:
        with self._cond:
            return len(self._running)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> list[Job]:
        """Take no more jobs; returns the queued ones, now CANCELLED, so users can be told."""
        with self._cond:
            self._closed = True
            dropped = self._order_locked()
            for job in dropped:
                self._cancel_queued_locked(job)
            self._queues.clear()
            self._queued.clear()
            self._cond.notify_all()
        return dropped

    # -- worker side -------------------------------------------------------------------

    def take(self, max_count: int, wait_s: float = 0.0) -> list[Job]:
        """Up to ``max_count`` jobs, one per user per turn; marks them RUNNING.

        Waits up to ``wait_s`` for a first job. Jobs whose token would expire before
        delivery are dropped here (state EXPIRED) and reported to the expired listeners.
        """
        taken: list[Job] = []
        expired: list[Job] = []
        # Real time for the wait, whatever clock the expiry check uses.
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                now = self._clock()
                while len(taken) < max_count and self._queues and not self._closed:
                    job = self._pop_next_locked()
                    if job.request.cancelled:
                        job.state = JobState.CANCELLED
                        continue
                    if now + self.throughput.job_seconds + self.delivery_margin_s > job.expires_at:
                        job.state = JobState.EXPIRED
                        job.finished_at = now
                        expired.append(job)
                        continue
                    job.state = JobState.RUNNING
                    job.started_at = now
                    job.attempts += 1
                    self._running[job.job_id] = job
                    taken.append(job)
                remaining = deadline - time.monotonic()
                if taken or self._closed or remaining <= 0:
                    break
                self._cond.wait(remaining)
        for job in expired:
            log.info("dropped job %s: its interaction token would expire first", job.job_id)
            for listener in self._expired_listeners:
                listener(job)
        return taken

    def finish(self, job: Job, state: JobState) -> None:
        """Mark a running job finished (DONE, FAILED or CANCELLED)."""
        with self._cond:
            self._running.pop(job.job_id, None)
            job.state = state
            job.finished_at = self._clock()

    def requeue_front(self, jobs: Iterable[Job]) -> None:
        """Put running jobs back at the head of the queue (after an out-of-memory)."""
        with self._cond:
            for job in reversed(list(jobs)):
                self._running.pop(job.job_id, None)
                if self._closed or job.request.cancelled:
                    job.state = JobState.CANCELLED
                    continue
                job.state = JobState.QUEUED
                job.tokens_so_far = 0
                self._queues.setdefault(job.user_id, deque()).appendleft(job)
                self._queues.move_to_end(job.user_id, last=False)
                self._queued[job.job_id] = job
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake a worker blocked in :meth:`take` (used when stopping)."""
        with self._cond:
            self._cond.notify_all()

    # -- internals (hold the lock) -------------------------------------------------------

    def _pending_count(self, user_id: int) -> int:
        queued = len(self._queues.get(user_id, ()))
        running = sum(1 for job in self._running.values() if job.user_id == user_id)
        return queued + running

    def _pop_next_locked(self) -> Job:
        user_id, queue = next(iter(self._queues.items()))
        job = queue.popleft()
        self._queued.pop(job.job_id, None)
        if queue:
            self._queues.move_to_end(user_id)  # this user's next job waits for everyone else
        else:
            del self._queues[user_id]
        return job

    def _cancel_queued_locked(self, job: Job) -> None:
        # A queued job that leaves the queue unrun: cancel()d, or dropped by close().
        job.state = JobState.CANCELLED
        job.finished_at = self._clock()
        job.request.cancel()

    def _remove_from_queue_locked(self, job: Job) -> None:
        queue = self._queues.get(job.user_id)
        if queue is None:
            return
        try:
            queue.remove(job)
        except ValueError:
            return
        if not queue:
            del self._queues[job.user_id]

    def _order_locked(self) -> list[Job]:
        # Simulates take(): turn r serves every user's r-th job, in turn order.
        queues = list(self._queues.values())
        order: list[Job] = []
        depth = max((len(queue) for queue in queues), default=0)
        for turn in range(depth):
            for queue in queues:
                if turn < len(queue):
                    order.append(queue[turn])
        return order

    def _positions_locked(self) -> dict[str, int]:
        return {job.job_id: index for index, job in enumerate(self._order_locked(), start=1)}

    def _retry_after_locked(self) -> float:
        # Roughly when one slot frees up: the next batch finishing.
        return max(5.0, self.throughput.job_seconds)


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min``, ``1 h 5 min``: for ETAs shown to users."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"
