"""The job queue in Redis, shared by any number of bot shards and GPU workers.

Why sorted sets and Lua for the queue, Streams for the deliveries:

* **Fair order and positions need a sorted structure.** Users take turns by arrival
  ("virtual rounds": a job's round is one more than its user's previous job's, but never less
  than the round being served), and the bot shows every queued job its position. A sorted
  set scored ``round * 2**21 + seq`` gives both: ZPOPMIN takes in fair order, ZRANK + 1 is
  the position, and a job put back after an out-of-memory keeps its old score. A Stream is
  an append-only log in arrival order: it can neither reorder by round nor say where a
  job stands, and XAUTOCLAIM hands over whole entries, not a place in line.
* **One script per transition keeps each invariant atomic.** Submit checks the per-user
  limit and the total bound and enqueues in one step; take reclaims lost leases, drops
  cancelled and expiring jobs, and leases the rest in one step; finish counts only for the
  worker that holds the lease. The scripts run inside Redis, so no two bots or workers ever
  see half a transition, and the clock of every rule is Redis's own ``TIME``, never a
  host's (a bot whose clock is off can't expire anyone's job).
* **The lease is a score renewed by the progress reports that exist anyway.** A running job
  sits in a second sorted set scored by its lease deadline; every progress report (which the
  worker sends for the status line regardless) pushes the deadline on. A worker that dies
  stops reporting, and the next take by any worker finds the job past its deadline and
  queues it again: the visibility timeout of a message queue, with no heartbeat of our own.
* **Deliveries are a Stream with a consumer group.** That part *is* a log: each terminal
  job is appended once to ``events``; bots read it with XREADGROUP (each entry goes to one
  bot), record ``delivered:{id}`` before XACK (the idempotency key: a page is sent once),
  and XAUTOCLAIM gives the entries of a bot that died to another.

Keys and the scripts themselves: ``bot.queue.redis_scripts``. The job hash format:
``bot.queue.codec``. Every call raises :class:`~bot.errors.QueueUnavailable` when Redis
can't be reached, within about a second (one-second socket timeouts); the
client reconnects by itself once Redis is back, and re-sends the scripts after a restart.

The worker thread's blocking view of a :class:`RedisQueue` is
:class:`bot.queue.redis_source.RedisJobSource`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot import texts
from bot.errors import QueueFull, QueueUnavailable, UserLimitReached
from bot.jobs import Job, JobState
from bot.queue import QueueSnapshot
from bot.queue import redis_scripts as scripts
from bot.queue.codec import decode_job, encode_job, encode_result
from bot.scheduler import format_duration

log = logging.getLogger(__name__)

Progress = Literal["ok", "cancel", "lost"]

GROUP = "bots"
DAY_S = 24 * 3600
# Blocking reads must end before the socket timeout, or they read as an outage.
MAX_BLOCK_MS = 500
# A bot holds a delivery this long before another may take it over (claim_delivery).
DELIVERY_CLAIM_S = 90
POISON_ERROR = (
    "This request stopped {attempts} workers in a row, so it was dropped. "
    "Please try a different prompt."
)


class DeliveryInProgress(QueueUnavailable):
    """Another bot claimed this delivery moments ago; the entry stays pending for now.

    A QueueUnavailable, so a caller that leaves entries pending when Redis is down does
    the right thing with it too.
    """


def connect(url: str, *, decode_responses: bool = True, timeout_s: float = 1.0) -> aioredis.Redis:
    """An asyncio client whose calls fail within about a second when Redis is down or hung.

    A call that can't connect is retried once: that hides the first call after a Redis
    restart, which finds its pooled connection closed and succeeds on a new one. Page bytes
    need ``decode_responses=False``.
    """
    return aioredis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        # Not on timeouts: a Redis that did not answer in time won't answer a second time.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1, (RedisConnectionError,)),
    )


@contextlib.asynccontextmanager
async def reachable() -> AsyncIterator[None]:
    """Turn redis-py's connection and timeout errors into QueueUnavailable."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise QueueUnavailable() from exc


def _redis_time(reply: Sequence[Any]) -> float:
    return float(reply[0]) + float(reply[1]) / 1e6


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    # A Lua HGETALL reply, [k1, v1, k2, v2...], as a dict.
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _sort_key(fields: dict[str, str]) -> tuple[int, float]:
    # Running jobs first (oldest first), then queued ones in take order.
    if fields.get("state") == JobState.RUNNING.value:
        return (0, float(fields.get("started_at", "0")))
    return (1, float(fields.get("score", "0")))


class RedisQueue:
    """The bot's JobQueue and the workers' operations, on one Redis (see the module doc)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "htmlbot",
        max_total: int = 1000,
        max_per_user: int = 3,
        lease_s: float = 30.0,
        initial_job_seconds: float = 60.0,
        delivery_margin_s: float = 10.0,
        max_attempts: int = 3,
        terminal_ttl_s: int = DAY_S,
        alpha: float = 0.3,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.max_total = max_total
        self.max_per_user = max_per_user
        self.lease_s = lease_s
        self.initial_job_seconds = initial_job_seconds
        self.delivery_margin_s = delivery_margin_s
        self.max_attempts = max_attempts
        self.terminal_ttl_s = terminal_ttl_s
        self.alpha = alpha
        # Registered once; redis-py sends EVALSHA and loads a script again after a restart.
        self._submit = client.register_script(scripts.PRELUDE + scripts.SUBMIT)
        self._take = client.register_script(scripts.PRELUDE + scripts.TAKE)
        self._progress = client.register_script(scripts.PRELUDE + scripts.PROGRESS)
        self._finish = client.register_script(scripts.PRELUDE + scripts.FINISH)
        self._cancel = client.register_script(scripts.PRELUDE + scripts.CANCEL)
        self._requeue = client.register_script(scripts.PRELUDE + scripts.REQUEUE)
        self._claim = client.register_script(scripts.PRELUDE + scripts.CLAIM_DELIVERY)
        # Consumer -> where its next read starts: an entry id while it re-reads the entries
        # it was given before a restart, then ">" (new entries).
        self._history: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: Any, client: aioredis.Redis | None = None) -> RedisQueue:
        """A queue configured by ``bot.settings.Settings`` (a new client for REDIS_URL)."""
        return cls(
            client or connect(settings.redis_url),
            prefix=settings.redis_prefix,
            max_total=settings.queue_max_total,
            max_per_user=settings.queue_max_per_user,
            lease_s=settings.worker_lease_s,
            initial_job_seconds=settings.initial_job_seconds,
            delivery_margin_s=settings.delivery_margin_s,
        )

    def key(self, name: str) -> str:
        """The full name of one of this queue's keys."""
        return f"{self.prefix}:{name}"

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()

    async def ping(self) -> None:
        """Raises QueueUnavailable unless Redis answers."""
        async with reachable():
            await self.client.ping()

    async def _run(self, script: Any, *args: Any) -> Any:
        async with reachable():
            return await script(keys=[], args=[self.prefix, self.terminal_ttl_s, *args])

    # -- the bot's side (bot.queue.JobQueue) -------------------------------------------

    async def submit(self, job: Job) -> int:
        """Queue ``job``; its 1-based position. Raises UserLimitReached, QueueFull."""
        fields = encode_job(job)
        flat = [item for pair in fields.items() for item in pair]
        ttl_s = job.expires_at - time.monotonic()
        outcome, value = await self._run(
            self._submit,
            job.job_id,
            job.user_id,
            repr(ttl_s),
            self.max_per_user,
            self.max_total,
            repr(self.initial_job_seconds),
            *flat,
        )
        if outcome == "user_limit":
            raise UserLimitReached(texts.user_limit(int(value), self.max_per_user))
        if outcome == "full":
            retry = max(5.0, float(value))
            raise QueueFull(
                texts.queue_full(self.max_total, format_duration(retry)), retry_after_s=retry
            )
        if outcome == "dup":
            raise ValueError(f"duplicate job id {job.job_id}")
        job.state = JobState.QUEUED
        log.debug("queued job %s for user %s at position %s", job.job_id, job.user_id, value)
        return int(value)

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now (CANCELLED, event sent), or flag a running one for its
        worker (it stops at its next progress report); None if the job is not pending."""
        reply = await self._run(self._cancel, job_id)
        if reply[0] == "gone":
            return None
        return decode_job(_pairs(reply[2]), redis_now=float(reply[1]))

    async def get(self, job_id: str) -> Job | None:
        """A pending (queued or running) job, or None."""
        jobs = await self._load([job_id])
        return jobs[0] if jobs else None

    async def pending(self, user_id: int | None = None) -> list[Job]:
        """Running jobs, then queued ones in take order; one user's if given."""
        async with reachable():
            if user_id is not None:
                members = await self.client.smembers(self.key(f"user:{user_id}"))
                ids = [str(member) for member in members]
            else:
                pipe = self.client.pipeline(transaction=False)
                pipe.zrange(self.key("running"), 0, -1)
                pipe.zrange(self.key("queue"), 0, -1)
                running, queued = await pipe.execute()
                ids = [*running, *queued]
        return await self._load(ids)

    async def _load(self, ids: Sequence[str]) -> list[Job]:
        # The pending jobs among ``ids``, in pending() order.
        if not ids:
            return []
        async with reachable():
            pipe = self.client.pipeline(transaction=False)
            pipe.time()
            for job_id in ids:
                pipe.hgetall(self.key(f"job:{job_id}"))
            now_reply, *hashes = await pipe.execute()
        now = _redis_time(now_reply)
        live = [h for h in hashes if h.get("state") in (JobState.QUEUED, JobState.RUNNING)]
        live.sort(key=_sort_key)
        return [decode_job(fields, redis_now=now) for fields in live]

    async def snapshot(self) -> QueueSnapshot:
        """Positions, counts and the measured speed, in one round trip (plus running tokens)."""
        async with reachable():
            pipe = self.client.pipeline(transaction=False)
            pipe.zrange(self.key("queue"), 0, -1)
            pipe.zrange(self.key("running"), 0, -1)
            pipe.hgetall(self.key("stats"))
            pipe.hgetall(self.key("workers"))
            pipe.time()
            queued, running, stats, workers, now_reply = await pipe.execute()
            tokens: dict[str, int] = {}
            if running:
                pipe = self.client.pipeline(transaction=False)
                for job_id in running:
                    pipe.hget(self.key(f"job:{job_id}"), "tokens_so_far")
                for job_id, value in zip(running, await pipe.execute(), strict=True):
                    tokens[job_id] = int(value or 0)
        now = _redis_time(now_reply)
        return QueueSnapshot(
            positions={job_id: index for index, job_id in enumerate(queued, start=1)},
            running_tokens=tokens,
            queued=len(queued),
            running=len(running),
            job_seconds=self._job_seconds(stats),
            max_batch=max(1, self._live_batch(workers, now)),
        )

    def _job_seconds(self, stats: dict[str, str]) -> float:
        if int(stats.get("samples", 0)) > 0:
            return float(stats["job_seconds"])
        if "seed" in stats:
            return float(stats["seed"])
        return self.initial_job_seconds

    def _live_batch(self, workers: dict[str, str], now: float) -> int:
        # Workers seen lately (take is called at least every few seconds by a live one).
        horizon = max(60.0, 3 * self.lease_s)
        total = 0
        for value in workers.values():
            batch, seen = value.split()
            if now - float(seen) <= horizon:
                total += int(batch)
        return total

    async def job_seconds(self) -> float:
        """How long one job takes, measured over all workers (or the seed, or the guess)."""
        async with reachable():
            stats = await self.client.hgetall(self.key("stats"))
        return self._job_seconds({str(key): str(value) for key, value in stats.items()})

    async def seed_job_seconds(self, seconds: float) -> None:
        """A worker's estimate after warm-up; used until the first job is measured."""
        async with reachable():
            await self.client.hset(self.key("stats"), "seed", repr(float(seconds)))

    # -- the workers' side ---------------------------------------------------------------

    async def take(
        self,
        worker: str,
        max_count: int,
        *,
        lease_s: float | None = None,
        max_batch: int | None = None,
    ) -> list[Job]:
        """Up to ``max_count`` jobs in fair order, leased to ``worker`` (now RUNNING).

        Reclaims jobs whose lease ran out first (failing those taken ``max_attempts`` times),
        and drops cancelled jobs and jobs that would expire before delivery (events sent).
        Each job's ``expires_at`` is a monotonic time of this process, from the Redis deadline.
        """
        lease = self.lease_s if lease_s is None else lease_s
        now, hashes = await self._run(
            self._take,
            worker,
            max_count,
            repr(lease),
            repr(self.delivery_margin_s),
            self.max_attempts,
            repr(self.initial_job_seconds),
            max_count if max_batch is None else max_batch,
            POISON_ERROR.format(attempts=self.max_attempts),
        )
        redis_now = float(now)
        return [decode_job(_pairs(flat), redis_now=redis_now) for flat in hashes]

    async def progress(
        self, worker: str, job: Job | str, tokens: int, *, lease_s: float | None = None
    ) -> Progress:
        """Renew ``worker``'s lease on the job and store its tokens.

        "ok"; "cancel": a cancel was asked for (stop it, its finish still counts); "lost":
        the lease ran out and the job went back to the queue (stop it, drop the result).
        """
        job_id = job if isinstance(job, str) else job.job_id
        lease = self.lease_s if lease_s is None else lease_s
        reply = await self._run(self._progress, worker, job_id, int(tokens), repr(lease))
        return reply

    async def finish(self, worker: str, job: Job, state: JobState) -> bool:
        """Record the end of ``worker``'s job (result, error, note) and send its event.

        False when ``worker`` no longer holds it (its lease ran out, another took it over):
        then nothing is recorded. A retried finish that had been recorded returns True.
        """
        if not state.terminal:
            raise ValueError(f"finish needs a terminal state, not {state}")
        fields: dict[str, str] = {
            "tokens_so_far": str(job.tokens_so_far),
            "regenerated": "1" if job.regenerated else "0",
        }
        if job.result is not None:
            fields["result"] = encode_result(job.result)
        if job.error is not None:
            fields["error"] = job.error
        if job.cancel_note is not None:
            fields["cancel_note"] = job.cancel_note
        sample = ""
        if state is JobState.DONE and job.result is not None and job.result.total_s > 0:
            sample = repr(job.result.total_s)
        flat = [item for pair in fields.items() for item in pair]
        done = await self._run(
            self._finish, worker, job.job_id, state.value, sample, repr(self.alpha), *flat
        )
        return bool(done)

    async def requeue_front(self, worker: str, jobs: Iterable[Job | str]) -> int:
        """``worker``'s running jobs back to the queue at their old place (after an OOM);
        cancelled ones end instead. Returns how many went back."""
        ids = [job if isinstance(job, str) else job.job_id for job in jobs]
        if not ids:
            return 0
        return int(await self._run(self._requeue, worker, *ids))

    # -- deliveries: the events stream -----------------------------------------------------

    async def _ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.key("events"), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_deliveries(
        self, consumer: str, count: int = 10, block_ms: int = 0
    ) -> list[tuple[str, Job]]:
        """Terminal jobs to deliver, each handed to one consumer of the group ``bots``.

        A consumer's first reads return the entries it had been given but not acknowledged
        (a restarted bot picks up where it stopped); then new ones, waiting up to
        ``block_ms`` (at most MAX_BLOCK_MS; 0: no wait). Entries whose job hash is gone are
        acknowledged and skipped.
        """
        async with reachable():
            await self._ensure_group()
            while True:
                # Its own history first, from "0" on (each entry once), then new entries.
                start = self._history.get(consumer, "0")
                block = min(block_ms, MAX_BLOCK_MS) if start == ">" and block_ms > 0 else None
                try:
                    reply = await self.client.xreadgroup(
                        GROUP, consumer, {self.key("events"): start}, count=count, block=block
                    )
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    # Redis lost its data (restarted without persistence): start again.
                    await self._ensure_group()
                    self._history.pop(consumer, None)
                    continue
                entries = _stream_entries(reply)
                if start != ">":
                    if not entries:
                        self._history[consumer] = ">"
                        continue
                    self._history[consumer] = entries[-1][0]
                return await self._entries_to_jobs(entries)

    async def reclaim_deliveries(
        self, consumer: str, min_idle_ms: int, count: int = 100
    ) -> list[tuple[str, Job]]:
        """Entries another consumer was given but has not acknowledged for ``min_idle_ms``
        (it died): now ``consumer``'s, to deliver (XAUTOCLAIM)."""
        claimed: list[tuple[str, dict[str, str] | None]] = []
        async with reachable():
            await self._ensure_group()
            cursor = "0-0"
            for _ in range(100):  # bounded: a stream of at most 100 * count entries a call
                reply = await self.client.xautoclaim(
                    self.key("events"), GROUP, consumer, min_idle_ms, cursor, count=count
                )
                cursor, entries = str(reply[0]), reply[1]
                claimed.extend((str(entry_id), fields) for entry_id, fields in entries)
                if cursor == "0-0" or len(claimed) >= count:
                    break
        return await self._entries_to_jobs(claimed)

    async def _entries_to_jobs(
        self, entries: Sequence[tuple[str, dict[str, str] | None]]
    ) -> list[tuple[str, Job]]:
        if not entries:
            return []
        async with reachable():
            pipe = self.client.pipeline(transaction=False)
            pipe.time()
            for _, fields in entries:
                pipe.hgetall(self.key(f"job:{(fields or {}).get('job', '-')}"))
            now_reply, *hashes = await pipe.execute()
            now = _redis_time(now_reply)
            out: list[tuple[str, Job]] = []
            gone: list[str] = []
            for (entry_id, _), fields in zip(entries, hashes, strict=True):
                if fields:
                    out.append((entry_id, decode_job(fields, redis_now=now)))
                else:
                    gone.append(entry_id)  # trimmed entry, or a job hash past its TTL
            if gone:
                await self.client.xack(self.key("events"), GROUP, *gone)
        return out

    async def claim_delivery(self, job_id: str, consumer: str) -> bool:
        """True: ``consumer`` delivers this job now. False: it was delivered already (ack).

        Raises DeliveryInProgress when another consumer claimed it less than
        DELIVERY_CLAIM_S ago (a slow delivery whose entry was reclaimed): leave the entry
        pending; by its next reclaim it is delivered (False) or that claim has lapsed (True).
        """
        claimed = int(await self._run(self._claim, consumer, job_id, DELIVERY_CLAIM_S))
        if claimed < 0:
            raise DeliveryInProgress()
        return claimed == 1

    async def mark_delivered(self, job_id: str, entry_id: str) -> None:
        """Record the delivery (the idempotency key), then acknowledge the entry."""
        async with reachable():
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.key(f"delivered:{job_id}"), "1", ex=self.terminal_ttl_s)
            pipe.delete(self.key(f"delivering:{job_id}"))
            pipe.xack(self.key("events"), GROUP, entry_id)
            await pipe.execute()

    async def ack_delivery(self, entry_id: str) -> None:
        """Acknowledge an entry without delivering (its job was delivered already)."""
        async with reachable():
            await self.client.xack(self.key("events"), GROUP, entry_id)

    async def delivered(self, job_id: str) -> bool:
        """Whether the job's page was delivered (recorded by mark_delivered)."""
        async with reachable():
            return bool(await self.client.exists(self.key(f"delivered:{job_id}")))


def _stream_entries(reply: Any) -> list[tuple[str, dict[str, str] | None]]:
    # XREADGROUP replies: [[stream, [(id, fields), ...]]] (RESP2) or {stream: [[...]]} (RESP3).
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (item[1] for item in reply)
    out: list[tuple[str, dict[str, str] | None]] = []
    for entries in streams:
        if (
            entries
            and isinstance(entries[0], list)
            and entries[0]
            and isinstance(entries[0][0], list | tuple)
        ):
            entries = entries[0]  # RESP3 nests once more
        out.extend((str(entry_id), fields or None) for entry_id, fields in entries)
    return out


# -- the worker thread's side ----------------------------------------------------------------
