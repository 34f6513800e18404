"""How much each member used the bot in a server: pages today and their last request.

What the daily limit and the cooldown (``bot.limits``) are checked against. Days are UTC
days: everyone's count starts again at 00:00 UTC, which is also what a refusal's "the next
one in 3 h 12 min" counts down to. Both backends count in one atomic step per request
(an SQLite upsert; a Redis MULTI), so two shards recording at once both count.

The clock is the host's (injectable for tests); with Redis, shards whose clocks disagree by
a few seconds disagree about a cooldown by as much, which is harmless.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import redis.asyncio as aioredis

from bot.errors import ShuttingDown
from bot.guilds.model import MAX_COOLDOWN_S
from bot.guilds.sqlite import guild_db_path, open_database
from bot.queue.redis_queue import connect, reachable

Clock = Callable[[], float]
# A day's counter outlives its day by this much in Redis (clocks differ; it is garbage then).
_DAY_KEY_SLACK_S = 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS guild_usage (
    guild_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    day TEXT NOT NULL,
    pages INTEGER NOT NULL,
    last_request_at REAL NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);
"""


@dataclass(frozen=True)
class Usage:
    """One member's use of the bot in one server: pages today, last request (wall clock)."""

    pages_today: int = 0
    last_request_at: float | None = None


def utc_day(now: float) -> str:
    """The UTC day of the wall-clock time ``now``, as ``YYYY-MM-DD``."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def day_end(now: float) -> float:
    """When the UTC day of ``now`` ends (the next 00:00 UTC), as a wall-clock time."""
    start = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (start + timedelta(days=1)).timestamp()


class UsageStore(Protocol):
    """Per server and member: read the usage, or count one more request."""

    async def get(self, guild_id: int, user_id: int) -> Usage: ...

    async def record(self, guild_id: int, user_id: int) -> Usage:
        """Count one request now (a page today, and the last request time)."""
        ...

    async def aclose(self) -> None: ...


class SqliteUsage:
    """Usage in a SQLite table: one row per server and member, reset when its day passed."""

    def __init__(self, path: Path | str, clock: Clock = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._conn: aiosqlite.Connection | None = None
        # One statement at a time on the one connection: a burst of first requests opens one
        # connection, not one each (every aiosqlite connection is a thread, and one left
        # unclosed keeps the process alive), and aclose waits for the statement in flight.
        self._lock = asyncio.Lock()
        self._closed = False

    async def _connection(self) -> aiosqlite.Connection:
        """The connection, opened on first use; call with ``_lock`` held."""
        if self._closed:
            # A command still in flight at shutdown: reopening would leak the thread.
            raise ShuttingDown()
        if self._conn is None:
            conn = await open_database(self.path, _SCHEMA)
            # Yesterday's rows say nothing any more (a cooldown never spans a day).
            await conn.execute(
                "DELETE FROM guild_usage WHERE last_request_at < ?",
                (self.clock() - MAX_COOLDOWN_S - 86400,),
            )
            self._conn = conn
        return self._conn

    async def get(self, guild_id: int, user_id: int) -> Usage:
        async with self._lock:
            conn = await self._connection()
            async with conn.execute(
                "SELECT day, pages, last_request_at FROM guild_usage "
                "WHERE guild_id = ? AND user_id = ?",
                (guild_id, user_id),
            ) as cursor:
                row = await cursor.fetchone()
        if row is None:
            return Usage()
        day, pages, last = row
        return Usage(pages if day == utc_day(self.clock()) else 0, float(last))

    async def record(self, guild_id: int, user_id: int) -> Usage:
        now = self.clock()
        async with self._lock:
            conn = await self._connection()
            # One statement: a new day starts the count at 1, atomically.
            async with conn.execute(
                """INSERT INTO guild_usage (guild_id, user_id, day, pages, last_request_at)
                   VALUES (?, ?, ?, 1, ?)
                   ON CONFLICT (guild_id, user_id) DO UPDATE SET
                       pages = CASE WHEN day = excluded.day THEN pages + 1 ELSE 1 END,
                       day = excluded.day,
                       last_request_at = excluded.last_request_at
                   RETURNING pages""",
                (guild_id, user_id, utc_day(now), now),
            ) as cursor:
                row = await cursor.fetchone()
        assert row is not None
        return Usage(int(row[0]), now)

    async def aclose(self) -> None:
        """Close after the statement in flight; later calls raise ``ShuttingDown``."""
        async with self._lock:
            self._closed = True
            if self._conn is not None:
                await self._conn.close()
                self._conn = None


class RedisUsage:
    """Usage in Redis: a counter per server, member and UTC day (INCR, expiring after its
    day), and the last request time (expiring after the longest cooldown)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "htmlbot", clock: Clock = time.time):
        self.client = client
        self.prefix = prefix
        self.clock = clock

    def pages_key(self, guild_id: int, user_id: int, day: str) -> str:
        """The counter of one member's pages in one server on one UTC day."""
        return f"{self.prefix}:guild:{guild_id}:pages:{user_id}:{day}"

    def last_key(self, guild_id: int, user_id: int) -> str:
        """One member's last request time in one server."""
        return f"{self.prefix}:guild:{guild_id}:last:{user_id}"

    async def get(self, guild_id: int, user_id: int) -> Usage:
        day = utc_day(self.clock())
        async with reachable():
            pages, last = await self.client.mget(
                self.pages_key(guild_id, user_id, day), self.last_key(guild_id, user_id)
            )
        return Usage(int(pages or 0), float(last) if last is not None else None)

    async def record(self, guild_id: int, user_id: int) -> Usage:
        now = self.clock()
        key = self.pages_key(guild_id, user_id, utc_day(now))
        async with reachable(), self.client.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            # Relative, so Redis's clock can't disagree with ours about it.
            pipe.expire(key, int(day_end(now) - now) + _DAY_KEY_SLACK_S)
            pipe.set(self.last_key(guild_id, user_id), repr(now), ex=MAX_COOLDOWN_S)
            pages, _expiry, _set = await pipe.execute()
        return Usage(int(pages), now)

    async def aclose(self) -> None:
        return None  # the client is the queue's


def open_usage(settings: Any, redis_client: aioredis.Redis | None = None) -> UsageStore:
    """The usage store for ``QUEUE_BACKEND`` (beside the settings store)."""
    if settings.queue_backend == "redis":
        client = redis_client if redis_client is not None else connect(settings.redis_url)
        return RedisUsage(client, settings.redis_prefix)
    return SqliteUsage(guild_db_path(settings))
