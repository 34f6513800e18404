"""The worker thread's side of the Redis queue: :class:`RedisJobSource`.

The GPU worker's thread (``bot.worker.Worker``) calls blocking methods; the Redis client is
asyncio, on the worker process's event loop. Each call runs its coroutine on that loop and
waits for it with a timeout, so Redis being slow or down never hangs the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import RedisError

from bot.errors import QueueUnavailable
from bot.jobs import Job, JobState
from bot.queue.redis_queue import Progress, RedisQueue

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Lease:
    """What the source knows of one job it took."""

    last_report: float = -math.inf
    report: concurrent.futures.Future[Progress] | None = None
    lost: bool = False


class RedisJobSource:
    """The worker thread's blocking :class:`~bot.queue.JobSource` over a RedisQueue.

    The coroutines run on ``loop`` (the process's event loop, in another thread); this
    side waits for them with a timeout. Redis being down never raises here: take returns
    nothing and retries, progress keeps the job running, finish retries for up to
    ``finish_retry_s`` (a finished page must not be lost to a Redis restart).
    """

    def __init__(
        self,
        queue: RedisQueue,
        loop: asyncio.AbstractEventLoop,
        worker_name: str,
        lease_s: float,
        *,
        max_batch: int = 1,
        poll_s: float = 0.1,
        busy_poll_s: float = 0.05,
        progress_interval_s: float = 1.0,
        call_timeout_s: float = 5.0,
        finish_retry_s: float = 180.0,
    ) -> None:
        self.queue = queue
        self.loop = loop
        self.worker = worker_name
        self.lease_s = lease_s
        self.max_batch = max_batch
        self.poll_s = poll_s
        # A running engine asks for more work at every decode step (~10 ms on a GPU): one
        # Redis round trip each time would cost a few percent of its speed. After an empty
        # answer it asks again no sooner than this (a new job waits at most that much more).
        self.busy_poll_s = busy_poll_s
        self._last_empty = float("-inf")
        self.progress_interval_s = progress_interval_s
        self.call_timeout_s = call_timeout_s
        self.finish_retry_s = finish_retry_s
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._outage_since: float | None = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.call_timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise QueueUnavailable() from None
        except RedisError as exc:
            # Redis answered with an error (out of memory, busy script...): as good as down
            # for the worker, which retries; never a crash of its thread.
            log.warning("worker %s: Redis error %s: %s", self.worker, type(exc).__name__, exc)
            raise QueueUnavailable() from exc

    def _unavailable(self, what: str) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("worker %s: Redis is unreachable (%s); retrying", self.worker, what)

    def _available(self) -> None:
        if self._outage_since is not None:
            log.info(
                "worker %s: Redis is back after %.1f s",
                self.worker,
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None

    def take(self, max_count: int, wait_s: float = 0.0) -> list[Job]:
        """Up to ``max_count`` jobs, polling every ``poll_s`` for up to ``wait_s``."""
        started = time.monotonic()
        if wait_s <= 0 and started - self._last_empty < self.busy_poll_s:
            return []
        deadline = started + wait_s
        while True:
            try:
                jobs = self._call(
                    self.queue.take(
                        self.worker, max_count, lease_s=self.lease_s, max_batch=self.max_batch
                    )
                )
            except QueueUnavailable:
                self._unavailable("take")
            else:
                self._available()
                if jobs:
                    with self._lock:
                        for job in jobs:
                            self._leases[job.job_id] = _Lease(last_report=time.monotonic())
                    return jobs
            now = time.monotonic()
            self._last_empty = now
            remaining = deadline - now
            if remaining <= 0:
                return []
            if self._wake.wait(min(self.poll_s, remaining)):
                self._wake.clear()
                return []

    def progress(self, job: Job, tokens: int) -> bool:
        """Report ``tokens`` (at most once per ``progress_interval_s``; never waits on Redis).

        The answer of a report is read at the next call: "cancel" sets the request's cancel
        flag (the job is still ours); "lost" does too and makes this return False from then on.
        """
        job.tokens_so_far = tokens
        with self._lock:
            lease = self._leases.setdefault(job.job_id, _Lease())
            report = lease.report
            if report is not None and report.done():
                lease.report = None
                self._apply(job, lease, report)
            if lease.lost:
                return False
            now = time.monotonic()
            if lease.report is None and now - lease.last_report >= self.progress_interval_s:
                lease.last_report = now
                lease.report = asyncio.run_coroutine_threadsafe(
                    self.queue.progress(self.worker, job.job_id, tokens, lease_s=self.lease_s),
                    self.loop,
                )
        return True

    def _apply(self, job: Job, lease: _Lease, report: concurrent.futures.Future[Progress]) -> None:
        try:
            outcome = report.result()
        except (QueueUnavailable, RedisError):
            self._unavailable("progress")
            return
        except Exception:
            log.exception("progress report of job %s failed", job.job_id)
            return
        self._available()
        if outcome == "cancel":
            job.request.cancel()
        elif outcome == "lost":
            log.warning("worker %s lost job %s (its lease ran out)", self.worker, job.job_id)
            job.request.cancel()
            lease.lost = True

    def finish(self, job: Job, state: JobState) -> bool:
        """Record the job's end, retrying while Redis is down; False if it is not ours."""
        with self._lock:
            lease = self._leases.pop(job.job_id, None)
        if lease is not None and lease.lost:
            return False
        job.state = state
        job.finished_at = time.monotonic()
        give_up = time.monotonic() + self.finish_retry_s
        while True:
            try:
                done = self._call(self.queue.finish(self.worker, job, state))
            except QueueUnavailable:
                self._unavailable("finish")
                if time.monotonic() > give_up:
                    log.error("gave up recording the end of job %s: Redis is down", job.job_id)
                    return False
                time.sleep(0.5)
                continue
            self._available()
            if not done:
                log.warning("job %s was taken over by another worker", job.job_id)
            return done

    def requeue_front(self, jobs: Iterable[Job]) -> None:
        """Back to the head of the queue (after an out-of-memory). If Redis is down, their
        leases run out and they come back anyway."""
        jobs = list(jobs)
        with self._lock:
            for job in jobs:
                self._leases.pop(job.job_id, None)
        try:
            self._call(self.queue.requeue_front(self.worker, jobs))
        except QueueUnavailable:
            self._unavailable("requeue")
            return
        for job in jobs:
            job.state = JobState.QUEUED
            job.tokens_so_far = 0

    def wake(self) -> None:
        """End a waiting take now (used when stopping)."""
        self._wake.set()

    def seed_job_seconds(self, seconds: float) -> None:
        """Tell every bot how long a job takes here (after warm-up), for their ETAs."""
        try:
            self._call(self.queue.seed_job_seconds(seconds))
        except QueueUnavailable:
            self._unavailable("seed")
