"""Where server settings live: SQLite (local backend) or a Redis hash (Redis backend).

Both backends keep the same thing, a server's stored fields (``bot.guilds.model``: one
JSON value per setting, one per role override), so validation and merging with the
defaults live once, in :class:`GuildSettingsStore`, and the tests run against both. Every
read goes to the backend (no cache): with Redis, a change made through one shard is seen by
all of them at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import redis.asyncio as aioredis

from bot.errors import ShuttingDown
from bot.guilds import texts
from bot.guilds.model import (
    FIELDS,
    LABELS,
    LIMIT_FIELDS,
    MAX_ROLE_OVERRIDES,
    ROLE_PREFIX,
    GuildDefaults,
    GuildSettings,
    InvalidSetting,
    decode,
    encode,
    role_key,
    validate,
    validate_limit,
)
from bot.guilds.sqlite import guild_db_path, open_database
from bot.queue.redis_queue import connect, reachable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS guild_settings (
    guild_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (guild_id, key)
);
"""


class FieldBackend(Protocol):
    """A server's stored fields (name -> JSON text)."""

    async def load(self, guild_id: int) -> dict[str, str]: ...

    async def write(self, guild_id: int, put: Mapping[str, str], delete: Collection[str]) -> None:
        """Set ``put`` and remove ``delete``, as one change."""
        ...

    async def clear(self, guild_id: int) -> None: ...

    async def aclose(self) -> None: ...


class SqliteFields:
    """The fields in a SQLite table (see ``bot.guilds.sqlite`` for the file)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one transaction at a time on the one connection
        self._closed = False

    async def _connection(self) -> aiosqlite.Connection:
        """The connection, opened on first use; call with ``_lock`` held."""
        if self._closed:
            # A command still in flight at shutdown: reopening would leak the thread.
            raise ShuttingDown()
        if self._conn is None:
            self._conn = await open_database(self.path, _SCHEMA)
        return self._conn

    async def load(self, guild_id: int) -> dict[str, str]:
        async with self._lock:
            conn = await self._connection()
            async with conn.execute(
                "SELECT key, value FROM guild_settings WHERE guild_id = ?", (guild_id,)
            ) as cursor:
                return {str(key): str(value) async for key, value in cursor}

    async def write(self, guild_id: int, put: Mapping[str, str], delete: Collection[str]) -> None:
        now = time.time()
        async with self._lock:
            conn = await self._connection()
            await conn.execute("BEGIN IMMEDIATE")
            try:
                await conn.executemany(
                    """INSERT INTO guild_settings (guild_id, key, value, updated_at)
                       VALUES (?, ?, ?, ?)
                       ON CONFLICT (guild_id, key) DO UPDATE SET
                           value = excluded.value, updated_at = excluded.updated_at""",
                    [(guild_id, key, value, now) for key, value in put.items()],
                )
                await conn.executemany(
                    "DELETE FROM guild_settings WHERE guild_id = ? AND key = ?",
                    [(guild_id, key) for key in delete],
                )
            except BaseException:
                await conn.rollback()
                raise
            await conn.commit()

    async def clear(self, guild_id: int) -> None:
        async with self._lock:
            conn = await self._connection()
            await conn.execute("DELETE FROM guild_settings WHERE guild_id = ?", (guild_id,))

    async def aclose(self) -> None:
        """Close after the transaction in flight; later calls raise ``ShuttingDown``."""
        async with self._lock:
            self._closed = True
            if self._conn is not None:
                await self._conn.close()
                self._conn = None


class RedisFields:
    """The fields in one hash per server, ``<REDIS_PREFIX>:guild:<id>:settings``.

    Redis being down raises QueueUnavailable, like every other Redis call of the bot.
    """

    def __init__(self, client: aioredis.Redis, prefix: str = "htmlbot") -> None:
        self.client = client
        self.prefix = prefix

    def key(self, guild_id: int) -> str:
        """The hash of one server's settings."""
        return f"{self.prefix}:guild:{guild_id}:settings"

    async def load(self, guild_id: int) -> dict[str, str]:
        async with reachable():
            raw = await self.client.hgetall(self.key(guild_id))
        return {_text(key): _text(value) for key, value in raw.items()}

    async def write(self, guild_id: int, put: Mapping[str, str], delete: Collection[str]) -> None:
        async with reachable(), self.client.pipeline(transaction=True) as pipe:
            if put:
                mapping: dict[Any, Any] = dict(put)
                pipe.hset(self.key(guild_id), mapping=mapping)
            if delete:
                pipe.hdel(self.key(guild_id), *delete)
            await pipe.execute()

    async def clear(self, guild_id: int) -> None:
        async with reachable():
            await self.client.delete(self.key(guild_id))

    async def aclose(self) -> None:
        # The client is shared with the queue, which closes it.
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GuildSettingsStore:
    """Each server's settings over the bot's defaults, on either backend.

    ``get`` never fails for a server that set nothing (it gets the defaults); ``update``,
    ``update_role`` and ``reset`` validate first and raise :class:`InvalidSetting` (a
    BotError: its message is fit for the admin) before anything is written.
    """

    def __init__(self, backend: FieldBackend, defaults: GuildDefaults) -> None:
        self.backend = backend
        self.defaults = defaults

    async def get(self, guild_id: int) -> GuildSettings:
        """The server's settings (the defaults where it set nothing)."""
        return decode(guild_id, await self.backend.load(guild_id), self.defaults)

    async def update(self, guild_id: int, **changes: Any) -> GuildSettings:
        """Set some of ``bot.guilds.model.FIELDS``; returns the settings after the change."""
        put = {
            name: encode(validate(name, value, self.defaults)) for name, value in changes.items()
        }
        await self.backend.write(guild_id, put, ())
        return await self.get(guild_id)

    async def update_role(self, guild_id: int, role_id: int, **limits: Any) -> GuildSettings:
        """Set some of one role's limits (``LIMIT_FIELDS``; ``pages_per_day=None``:
        unlimited for that role)."""
        put = {
            role_key(role_id, name): encode(validate_limit(name, value, self.defaults))
            for name, value in limits.items()
        }
        current = await self.get(guild_id)
        if role_id not in current.role_limits and len(current.role_limits) >= MAX_ROLE_OVERRIDES:
            raise InvalidSetting(texts.too_many_roles(MAX_ROLE_OVERRIDES))
        await self.backend.write(guild_id, put, ())
        return await self.get(guild_id)

    async def clear_role(self, guild_id: int, role_id: int, *limits: str) -> GuildSettings:
        """Drop one role's overrides of ``limits`` (none given: all of them)."""
        for name in limits:
            if name not in LIMIT_FIELDS:
                raise InvalidSetting(texts.unknown_field(name, [LABELS[n] for n in LIMIT_FIELDS]))
        names = limits or LIMIT_FIELDS
        await self.backend.write(guild_id, {}, [role_key(role_id, name) for name in names])
        return await self.get(guild_id)

    async def reset(self, guild_id: int, *fields: str, roles: bool = False) -> GuildSettings:
        """Back to the defaults: the given fields (and every role override if ``roles``),
        or, given neither, everything this server set."""
        if not fields and not roles:
            await self.backend.clear(guild_id)
            return await self.get(guild_id)
        for name in fields:
            if name not in FIELDS:
                raise InvalidSetting(texts.unknown_field(name, LABELS.values()))
        delete = list(fields)
        if roles:
            stored = await self.backend.load(guild_id)
            delete += [key for key in stored if key.startswith(ROLE_PREFIX)]
        await self.backend.write(guild_id, {}, delete)
        return await self.get(guild_id)

    async def aclose(self) -> None:
        """Close the backend's connection (the Redis client is the queue's to close)."""
        await self.backend.aclose()


def open_guild_settings(
    settings: Any, redis_client: aioredis.Redis | None = None
) -> GuildSettingsStore:
    """The store for ``QUEUE_BACKEND``: a SQLite file next to STATE_DB, or Redis under
    REDIS_PREFIX (``redis_client``: the queue's, so no second connection pool)."""
    defaults = GuildDefaults.from_settings(settings)
    backend: FieldBackend
    if settings.queue_backend == "redis":
        client = redis_client if redis_client is not None else connect(settings.redis_url)
        backend = RedisFields(client, settings.redis_prefix)
    else:
        backend = SqliteFields(guild_db_path(settings))
    return GuildSettingsStore(backend, defaults)
