"""The job queue between the slash commands and the worker thread.

Bounded (``max_total`` queued jobs), with a per-user limit of pending jobs, and fair:
users take turns by arrival ("virtual rounds", the same rule as the Redis backend). Each job
gets ``round = max(current_round, round of the user's previous job + 1)``, where
``current_round`` is the round of the job taken last, and jobs run in ``(round, arrival)``
order. A user whose first job ran at once is therefore not a round ahead of the users who
came next (their first jobs join the current round), and a user whose queue empties keeps
their place instead of going to the end of a turn order: no user's job waits behind more
than one round of the others'. A job whose interaction token would expire before its page
could be delivered is dropped at the moment it would be taken, so it never reaches the GPU.

The scheduler is shared by the event loop (submit, cancel, positions) and the worker thread
(take), so every method is thread-safe and none of them awaits. Listeners are called in the
thread that caused the change; the bot's listener marshals to the loop itself.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable

from bot import texts
from bot.errors import QueueFull, ShuttingDown, UserLimitReached
from bot.jobs import Job, JobState

log = logging.getLogger(__name__)

Clock = Callable[[], float]
JobListener = Callable[[Job], None]
# (round, arrival sequence): the order jobs are taken in.
OrderKey = tuple[int, int]


class Throughput:
    """Measured speed of the worker, for ETAs and for the expiry check.

    ``job_seconds`` is a moving average of how long one job takes in the engine (its
    batch-mates run alongside it, so ``max_batch`` jobs finish in about that time).
    Before the first measurement it is ``initial_job_seconds``, or a seed from the speed
    seen so far (:meth:`seed_rate`: the engine's warm-up, or a running job's first tokens/s),
    since a fixed guess can be several times off. ``tokens_per_second`` is the aggregate
    rate (all sequences together) over the last ``window_s`` seconds.
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
        self.seeded = False

    @property
    def measured(self) -> bool:
        """Whether a job has finished: from then on seeds are ignored."""
        return self.samples > 0

    def seed_rate(self, tokens_per_second_per_job: float, expected_tokens: int) -> bool:
        """Estimate ``job_seconds`` as ``expected_tokens / tokens_per_second_per_job``.

        ``tokens_per_second_per_job`` is one sequence's speed (not the aggregate) with its
        batch-mates running; ``expected_tokens`` the tokens a job generates (at most its
        ``max_new_tokens``). Used only while no job has finished; a later seed replaces an
        earlier one. Returns whether the estimate changed.
        """
        if tokens_per_second_per_job <= 0 or expected_tokens <= 0:
            return False
        return self.seed_job_seconds(expected_tokens / tokens_per_second_per_job)

    def seed_job_seconds(self, seconds: float) -> bool:
        """Set ``job_seconds`` from an estimate (e.g. a warm-up job) until one is measured."""
        if not seconds > 0 or math.isinf(seconds):
            return False
        with self._lock:
            if self.samples:
                return False
            self.job_seconds = seconds
            self.seeded = True
            return True

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
        self.clock = clock
        self._cond = threading.Condition()
        # Queued jobs as (round, seq, job id), kept sorted: the take order.
        self._order: list[tuple[int, int, str]] = []
        self._keys: dict[str, OrderKey] = {}  # queued and running jobs' places
        self._queued: dict[str, Job] = {}
        self._running: dict[str, Job] = {}
        self._queued_per_user: Counter[int] = Counter()
        self._current_round = 0
        self._seq = 0
        # Round of each user's newest queued or taken job, and of their newest taken one.
        # Entries below the current round change nothing (max() ignores them): pruned.
        self._last_round: dict[int, int] = {}
        self._taken_round: dict[int, int] = {}
        self._closed = False
        self._expired_listeners: list[JobListener] = []
        self._dropped_listeners: list[JobListener] = []

    # -- listeners ---------------------------------------------------------------------

    def add_expired_listener(self, listener: JobListener) -> None:
        """Called (in the taking thread) for each job dropped because its token would expire."""
        self._expired_listeners.append(listener)

    def add_dropped_listener(self, listener: JobListener) -> None:
        """Called (in the taking thread) for each queued job skipped at take time because its
        request had been cancelled without :meth:`cancel` (its state is now CANCELLED)."""
        self._dropped_listeners.append(listener)

    # -- loop side ---------------------------------------------------------------------

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns its 1-based position. Raises QueueFull, UserLimitReached."""
        with self._cond:
            if self._closed:
                raise ShuttingDown(texts.SHUTTING_DOWN)
            pending = self._pending_count(job.user_id)
            if pending >= self.max_per_user:
                raise UserLimitReached(texts.user_limit(pending, self.max_per_user))
            if len(self._queued) >= self.max_total:
                retry = self._retry_after_locked()
                raise QueueFull(
                    texts.queue_full(self.max_total, format_duration(retry)), retry_after_s=retry
                )
            if job.job_id in self._keys:
                raise ValueError(f"duplicate job id {job.job_id}")
            last = self._last_round.get(job.user_id, self._current_round - 1)
            self._enqueue_locked(job, (max(self._current_round, last + 1), self._next_seq()))
            position = self._position_locked(job.job_id)
            self._cond.notify_all()
        log.debug("queued job %s for user %s at position %d", job.job_id, job.user_id, position)
        return position

    def restore(self, jobs: Iterable[Job]) -> None:
        """Queue jobs again in the given order (a restart), past the limits that guard submit.

        Each job's round follows the virtual-round rule and never goes below the previous
        restored job's, so they are taken in exactly this order (among themselves) while new
        users still join the current round. Ids already pending are skipped.
        """
        with self._cond:
            if self._closed:
                raise ShuttingDown(texts.SHUTTING_DOWN)
            floor = self._current_round
            for job in jobs:
                if job.job_id in self._keys:
                    log.warning("not restoring job %s: already pending", job.job_id)
                    continue
                job.started_at = None
                last = self._last_round.get(job.user_id, self._current_round - 1)
                floor = max(floor, self._current_round, last + 1)
                self._enqueue_locked(job, (floor, self._next_seq()))
            self._cond.notify_all()

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job. Returns it, or None if it is not pending.

        A queued job leaves the queue at once (state CANCELLED). A running job gets its
        request's cancel flag set; the engine stops it at the next step and the worker
        reports it with finish_reason=cancelled.
        """
        with self._cond:
            job = self._queued.get(job_id)
            if job is not None:
                self._dequeue_locked(job)
                self._keys.pop(job_id, None)
                self._forget_round_locked(job.user_id)
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
            return {job_id: index for index, (_, _, job_id) in enumerate(self._order, start=1)}

    def order_key(self, job_id: str) -> OrderKey | None:
        """A pending job's place, ``(round, arrival sequence)``; None if not pending."""
        with self._cond:
            return self._keys.get(job_id)

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
                self._keys.pop(job.job_id, None)
                self._cancel_queued_locked(job)
            self._order.clear()
            self._queued.clear()
            self._queued_per_user.clear()
            self._cond.notify_all()
        return dropped

    # -- worker side -------------------------------------------------------------------

    def take(self, max_count: int, wait_s: float = 0.0) -> list[Job]:
        """Up to ``max_count`` jobs in fair order; marks them RUNNING.

        Waits up to ``wait_s`` for a first job. Jobs whose token would expire before
        delivery are dropped here (state EXPIRED) and reported to the expired listeners.
        """
        taken: list[Job] = []
        expired: list[Job] = []
        dropped: list[Job] = []
        # Real time for the wait, whatever clock the expiry check uses.
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                now = self.clock()
                while len(taken) < max_count and self._order and not self._closed:
                    job = self._pop_next_locked()
                    if job.request.cancelled:
                        job.state = JobState.CANCELLED
                        job.finished_at = now
                        self._keys.pop(job.job_id, None)
                        dropped.append(job)
                        continue
                    if now + self.throughput.job_seconds + self.delivery_margin_s > job.expires_at:
                        job.state = JobState.EXPIRED
                        job.finished_at = now
                        self._keys.pop(job.job_id, None)
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
        for job in dropped:
            for listener in self._dropped_listeners:
                listener(job)
        for job in expired:
            log.info("dropped job %s: its interaction token would expire first", job.job_id)
            for listener in self._expired_listeners:
                listener(job)
        return taken

    def finish(self, job: Job, state: JobState) -> None:
        """Mark a running job finished (DONE, FAILED or CANCELLED)."""
        with self._cond:
            self._running.pop(job.job_id, None)
            self._keys.pop(job.job_id, None)
            job.state = state
            job.finished_at = self.clock()

    def requeue_front(self, jobs: Iterable[Job]) -> None:
        """Put running jobs back in the queue at the place they had (after an out-of-memory).

        Their old ``(round, arrival)`` keys put them ahead of everything that came later, so
        they run next; a job the scheduler never saw goes to the very front.
        """
        with self._cond:
            for job in jobs:
                self._running.pop(job.job_id, None)
                key = self._keys.pop(job.job_id, None)
                if self._closed or job.request.cancelled:
                    job.state = JobState.CANCELLED
                    continue
                if key is None:
                    first = self._order[0][0] if self._order else self._current_round
                    key = (min(first, self._current_round), -self._next_seq())
                job.tokens_so_far = 0
                self._enqueue_locked(job, key, new_round=False)
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake a worker blocked in :meth:`take` (used when stopping)."""
        with self._cond:
            self._cond.notify_all()

    # -- internals (hold the lock) -------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _pending_count(self, user_id: int) -> int:
        running = sum(1 for job in self._running.values() if job.user_id == user_id)
        return self._queued_per_user[user_id] + running

    def _enqueue_locked(self, job: Job, key: OrderKey, *, new_round: bool = True) -> None:
        job.state = JobState.QUEUED
        bisect.insort(self._order, (key[0], key[1], job.job_id))
        self._keys[job.job_id] = key
        self._queued[job.job_id] = job
        self._queued_per_user[job.user_id] += 1
        if new_round:
            self._last_round[job.user_id] = max(self._last_round.get(job.user_id, key[0]), key[0])

    def _dequeue_locked(self, job: Job) -> None:
        key = self._keys[job.job_id]
        index = bisect.bisect_left(self._order, (key[0], key[1], job.job_id))
        del self._order[index]
        self._queued.pop(job.job_id, None)
        self._drop_user_count_locked(job.user_id)

    def _drop_user_count_locked(self, user_id: int) -> None:
        self._queued_per_user[user_id] -= 1
        if self._queued_per_user[user_id] <= 0:
            del self._queued_per_user[user_id]

    def _pop_next_locked(self) -> Job:
        round_, _, job_id = self._order.pop(0)
        job = self._queued.pop(job_id)
        self._drop_user_count_locked(job.user_id)
        self._taken_round[job.user_id] = max(self._taken_round.get(job.user_id, round_), round_)
        if round_ > self._current_round:
            self._current_round = round_
            self._prune_rounds_locked()
        return job

    def _forget_round_locked(self, user_id: int) -> None:
        # A cancelled job gives its round back: the user's next job takes the round after
        # their newest remaining (or already taken) job, not after the cancelled one.
        mine = [
            self._keys[job.job_id][0] for job in self._queued.values() if job.user_id == user_id
        ]
        newest = max(mine, default=self._taken_round.get(user_id))
        if newest is None:
            self._last_round.pop(user_id, None)
        else:
            self._last_round[user_id] = newest

    def _prune_rounds_locked(self) -> None:
        for rounds in (self._last_round, self._taken_round):
            for user_id in [user for user, r in rounds.items() if r < self._current_round]:
                del rounds[user_id]

    def _cancel_queued_locked(self, job: Job) -> None:
        # A queued job that leaves the queue unrun: cancel()d, or dropped by close().
        job.state = JobState.CANCELLED
        job.finished_at = self.clock()
        job.request.cancel()

    def _order_locked(self) -> list[Job]:
        return [self._queued[job_id] for _, _, job_id in self._order]

    def _position_locked(self, job_id: str) -> int:
        key = self._keys[job_id]
        return bisect.bisect_left(self._order, (key[0], key[1], job_id)) + 1

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
