"""Finished pages kept in Redis, so ``/mypages`` works from any bot shard.

Keys under ``{prefix}:``: ``page:{job_id}`` is a hash (``meta`` JSON, ``data`` bytes,
``user_id``, ``created_at``) that expires ``ttl_s`` after it was saved; ``pages:{user_id}``
is a sorted set of the user's job ids scored by save time, trimmed to the newest
``keep_per_user`` (the trimmed pages are deleted in the same script). A page bigger than
``max_bytes`` is refused with :class:`PageTooLarge` (an OSError, as a full disk would be):
Redis holds everything in memory, so one runaway page must not crowd out the queue.

Same API as the local ``bot.store.ResultStore``; ``StoredPage.path`` is None here, and
``read`` fetches the bytes. The pages are bytes: given a client that decodes replies (the
queue's), the store opens a second one to the same server that does not.
"""

from __future__ import annotations

import json
import re
from typing import Any

import redis.asyncio as aioredis

from bot.queue.redis_queue import reachable
from bot.store import StoredPage

_JOB_ID = re.compile(r"^[0-9a-f]{4,32}$")
DAY_S = 24 * 3600

# ARGV: 1 prefix, 2 ttl seconds, 3 keep per user, 4 job id, 5 user id, 6 meta, 7 data
# -> created_at (Redis time)
_SAVE = r"""
local P = ARGV[1]
local ttl, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
local id, uid = ARGV[4], ARGV[5]
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
local page = P .. ':page:' .. id
local index = P .. ':pages:' .. uid
redis.call('DEL', page)
redis.call('HSET', page, 'meta', ARGV[6], 'data', ARGV[7], 'user_id', uid, 'created_at', now)
redis.call('EXPIRE', page, ttl)
redis.call('ZADD', index, now, id)
redis.call('EXPIRE', index, ttl)
local old = redis.call('ZREVRANGE', index, keep, -1)
for _, gone in ipairs(old) do redis.call('DEL', P .. ':page:' .. gone) end
redis.call('ZREMRANGEBYRANK', index, 0, -(keep + 1))
return now
"""


class PageTooLarge(OSError):
    """The page is over the store's size cap; it is delivered but not kept."""


class RedisPageStore:
    """Per-user store of the last pages in Redis (see the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "htmlbot",
        ttl_s: float = 30 * DAY_S,
        max_bytes: int = 8 * 1024 * 1024,
        keep_per_user: int = 10,
    ) -> None:
        # Page bytes need a client that does not decode replies; given one that does (the
        # queue's), the store opens its own to the same server.
        self._own_client = bool(client.get_connection_kwargs().get("decode_responses"))
        if self._own_client:
            client = aioredis.Redis(
                connection_pool=aioredis.ConnectionPool(
                    connection_class=client.connection_pool.connection_class,
                    **{**client.get_connection_kwargs(), "decode_responses": False},
                )
            )
        self.client = client
        self.prefix = prefix
        self.ttl_s = max(1, round(ttl_s))
        self.max_bytes = max_bytes
        self.keep_per_user = keep_per_user
        self._save = client.register_script(_SAVE)

    @classmethod
    def from_settings(cls, settings: Any, client: aioredis.Redis) -> RedisPageStore:
        """A store configured by ``bot.settings.Settings`` (PAGES_TTL_DAYS...)."""
        return cls(
            client,
            prefix=settings.redis_prefix,
            ttl_s=settings.pages_ttl_days * DAY_S,
            max_bytes=settings.page_store_max_bytes,
            keep_per_user=settings.results_keep_per_user,
        )

    async def aclose(self) -> None:
        """Close the client this store opened (a client it was given is the giver's)."""
        if self._own_client:
            await self.client.aclose()

    def _page_key(self, job_id: str) -> str:
        return f"{self.prefix}:page:{job_id}"

    def _index_key(self, user_id: int) -> str:
        return f"{self.prefix}:pages:{int(user_id)}"

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
    ) -> StoredPage:
        """Keep the page (with its TTL) and drop the user's oldest beyond ``keep_per_user``.

        Raises PageTooLarge over ``max_bytes``, QueueUnavailable when Redis is down.
        """
        if not _JOB_ID.match(job_id):
            raise ValueError(f"bad job id {job_id!r}")
        if len(data) > self.max_bytes:
            raise PageTooLarge(
                f"page {job_id} is {len(data)} bytes, over the store's cap of {self.max_bytes}"
            )
        meta = {
            "job_id": job_id,
            "user_id": int(user_id),
            "filename": filename,
            "prompt": prompt,
            "model": model,
            "generated_tokens": generated_tokens,
            "seconds": round(seconds, 3),
            "warnings": list(warnings),
            "size": len(data),
        }
        encoded = json.dumps(meta, ensure_ascii=False)
        async with reachable():
            created = await self._save(
                keys=[],
                args=[
                    self.prefix,
                    self.ttl_s,
                    self.keep_per_user,
                    job_id,
                    int(user_id),
                    encoded,
                    data,
                ],
            )
        return _page(meta, float(created))

    async def list(self, user_id: int) -> list[StoredPage]:
        """The user's kept pages, newest first (expired ones leave the index here)."""
        index = self._index_key(user_id)
        async with reachable():
            ids = [_text(item) for item in await self.client.zrevrange(index, 0, -1)]
            if not ids:
                return []
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(self._page_key(job_id), "meta", "created_at")
            replies = await pipe.execute()
            pages: list[StoredPage] = []
            expired: list[str] = []
            for job_id, (meta, created) in zip(ids, replies, strict=True):
                if meta is None:
                    expired.append(job_id)
                else:
                    pages.append(_page(json.loads(meta), float(created)))
            if expired:
                await self.client.zrem(index, *expired)
        return pages

    async def get(self, user_id: int, job_id: str) -> StoredPage | None:
        """One of the user's pages, or None (also for ids of other users' pages)."""
        if not _JOB_ID.match(job_id):
            return None
        async with reachable():
            meta, created, owner = await self.client.hmget(
                self._page_key(job_id), "meta", "created_at", "user_id"
            )
        if meta is None or _text(owner) != str(int(user_id)):
            return None
        return _page(json.loads(meta), float(created or 0))

    async def read(self, page: StoredPage) -> bytes:
        """The page's bytes. Raises FileNotFoundError if it expired or was trimmed."""
        async with reachable():
            data = await self.client.hget(self._page_key(page.job_id), "data")
        if data is None:
            raise FileNotFoundError(f"page {page.job_id} is no longer kept")
        return data if isinstance(data, bytes) else str(data).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _page(meta: dict[str, Any], created_at: float) -> StoredPage:
    return StoredPage(
        job_id=str(meta["job_id"]),
        user_id=int(meta["user_id"]),
        filename=str(meta["filename"]),
        prompt=str(meta.get("prompt", "")),
        model=str(meta.get("model", "")),
        generated_tokens=int(meta.get("generated_tokens", 0)),
        seconds=float(meta.get("seconds", 0.0)),
        warnings=tuple(meta.get("warnings", ())),
        created_at=created_at,
        size=int(meta.get("size", 0)),
        path=None,
    )
