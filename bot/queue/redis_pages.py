"""Finished pages kept in Redis, so ``/mypages`` works from any bot shard.

Each kept page is a version of a page (``bot.versions``); the keys and the scripts that keep
them consistent are in ``bot.queue.redis_page_scripts``. A version is saved by one script,
which numbers it after the newest version of its parent's page (so concurrent refines get
distinct, consecutive numbers), refreshes the TTL (``ttl_s``) of every key of the page, and
trims: the user's pages past ``keep_per_user`` go whole, and each page keeps at most
``max_versions`` versions (the first always among them). A page bigger than ``max_bytes`` is
refused with :class:`PageTooLarge` (an OSError, as a full disk would be): Redis holds
everything in memory, so one runaway page must not crowd out the queue.

Same API as the local ``bot.store.ResultStore``; ``StoredPage.path`` is None here, and
``read`` fetches the bytes. The pages are bytes: given a client that decodes replies (the
queue's), the store opens a second one to the same server that does not.
"""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from bot.queue.redis_page_scripts import SAVE, SET_MESSAGE
from bot.queue.redis_queue import reachable
from bot.versions import (
    MAX_VERSIONS,
    PageHistory,
    StoredPage,
    group_pages,
    newest_first,
    page_from_meta,
    version_meta,
)

_JOB_ID = re.compile(r"^[0-9a-f]{4,32}$")
DAY_S = 24 * 3600
# The hash fields a version is read from (``data`` and ``content`` only when asked for).
_FIELDS = (
    "meta",
    "created_at",
    "user_id",
    "page_id",
    "version",
    "message_id",
    "channel_id",
    "thread_id",
)


class PageTooLarge(OSError):
    """The page is over the store's size cap; it is delivered but not kept."""


class RedisPageStore:
    """Per-user store of the last pages and their versions in Redis (see the module doc)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "htmlbot",
        ttl_s: float = 30 * DAY_S,
        max_bytes: int = 8 * 1024 * 1024,
        keep_per_user: int = 10,
        max_versions: int = MAX_VERSIONS,
    ) -> None:
        if max_versions < 2:
            raise ValueError("max_versions must keep the first version and the newest")
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
        self.max_versions = max_versions
        self._save = client.register_script(SAVE)
        self._set_message = client.register_script(SET_MESSAGE)

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

    def _versions_key(self, page_id: str) -> str:
        return f"{self.prefix}:versions:{page_id}"

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
        parent_job_id: str | None = None,
        kind: str = "create",
        instruction: str | None = None,
        content: str | None = None,
    ) -> StoredPage:
        """Keep a version: the next one of the parent's page, or v1 of a new page.

        ``parent_job_id`` names the version this one was made from; if the user has no such
        version (expired, trimmed, or never theirs) the result starts a page of its own.
        Saving a job id again replaces that version in place. Raises PageTooLarge over
        ``max_bytes`` (page and content together), QueueUnavailable when Redis is down.
        """
        if not _JOB_ID.match(job_id):
            raise ValueError(f"bad job id {job_id!r}")
        size = len(data) + len(content.encode() if content is not None else b"")
        if size > self.max_bytes:
            raise PageTooLarge(
                f"page {job_id} is {size} bytes, over the store's cap of {self.max_bytes}"
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
            **version_meta(
                parent_job_id=parent_job_id, kind=kind, instruction=instruction, content=content
            ),
        }
        encoded = json.dumps(meta, ensure_ascii=False)
        async with reachable():
            created, page_id, version = await self._save(
                keys=[],
                args=[
                    self.prefix,
                    self.ttl_s,
                    self.keep_per_user,
                    self.max_versions,
                    job_id,
                    int(user_id),
                    parent_job_id or "",
                    encoded,
                    data,
                    "1" if content is not None else "0",
                    content or "",
                ],
            )
        meta.update(page_id=_text(page_id), version=int(version))
        return page_from_meta(meta, created_at=float(created), path=None)

    async def list(self, user_id: int) -> list[StoredPage]:
        """The user's kept versions, one entry each, newest first (expired ones leave the
        index here)."""
        return newest_first(await self._versions(user_id))

    async def list_pages(self, user_id: int) -> builtins.list[PageHistory]:
        """The user's pages, newest (last saved to) first, each with its versions in order."""
        return group_pages(await self._versions(user_id))

    async def get(self, user_id: int, job_id: str) -> StoredPage | None:
        """One of the user's versions, or None (also for ids of other users' pages)."""
        page = await self.get_any(job_id)
        return page if page is not None and page.user_id == int(user_id) else None

    async def get_version(self, user_id: int, page_id: str, version: int) -> StoredPage | None:
        """Version ``version`` of the user's page ``page_id``, or None."""
        if not _JOB_ID.match(page_id):
            return None
        async with reachable():
            ids = await self.client.zrangebyscore(self._versions_key(page_id), version, version)
        # A page saved before versions existed has no versions key: it is its own v1.
        candidates = [_text(item) for item in ids] or ([page_id] if version == 1 else [])
        for job_id in candidates:
            page = await self.get(user_id, job_id)
            if page is not None and (page.page_id, page.version) == (page_id, version):
                return page
        return None

    async def get_page(self, user_id: int, page_id: str) -> PageHistory | None:
        """The user's page ``page_id`` with its versions in order, or None."""
        if not _JOB_ID.match(page_id):
            return None
        async with reachable():
            ids = await self.client.zrange(self._versions_key(page_id), 0, -1)
            # A page saved before versions existed has no versions key: it is its own v1.
            job_ids = [_text(item) for item in ids] or [page_id]
            pipe = self.client.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hmget(self._page_key(job_id), _FIELDS)
            replies = await pipe.execute()
        versions = [
            page
            for page in map(_page, replies)
            if page is not None and page.user_id == int(user_id) and page.page_id == page_id
        ]
        return group_pages(versions)[0] if versions else None

    async def get_any(self, job_id: str) -> StoredPage | None:
        """A version whoever owns it (``user_id`` is the owner): for the owner check of the
        buttons under a page, where the caller decides who may do what. None if not kept."""
        if not _JOB_ID.match(job_id):
            return None
        async with reachable():
            reply = await self.client.hmget(self._page_key(job_id), _FIELDS)
        return _page(reply)

    async def read(self, page: StoredPage) -> bytes:
        """The page's bytes. Raises FileNotFoundError if it expired or was trimmed."""
        async with reachable():
            data = await self.client.hget(self._page_key(page.job_id), "data")
        if data is None:
            raise FileNotFoundError(f"page {page.job_id} is no longer kept")
        return data if isinstance(data, bytes) else str(data).encode()

    async def read_content(self, page: StoredPage) -> str | None:
        """The structured content kept with a compose page (JSON text), or None if there is
        none (not a compose page, or expired or trimmed meanwhile)."""
        if not page.has_content:
            return None
        async with reachable():
            content = await self.client.hget(self._page_key(page.job_id), "content")
        return None if content is None else _text(content)

    async def set_message(
        self,
        user_id: int,
        job_id: str,
        *,
        message_id: int | None = None,
        channel_id: int | None = None,
        thread_id: int | None = None,
    ) -> StoredPage | None:
        """Record where a version was posted (the ids given; the others stay as they were).
        The updated version, or None if the user has no such version."""
        if not _JOB_ID.match(job_id):
            return None
        given = {"message_id": message_id, "channel_id": channel_id, "thread_id": thread_id}
        pairs: list[Any] = []
        for name, value in given.items():
            if value is not None:
                pairs += [name, int(value)]
        async with reachable():
            done = await self._set_message(
                keys=[], args=[self.prefix, job_id, int(user_id), *pairs]
            )
        return await self.get(user_id, job_id) if done else None

    async def _versions(self, user_id: int) -> builtins.list[StoredPage]:
        """Every kept version of the user's pages; drops index entries whose keys expired."""
        index = self._index_key(user_id)
        async with reachable():
            page_ids = [_text(item) for item in await self.client.zrevrange(index, 0, -1)]
            if not page_ids:
                return []
            pipe = self.client.pipeline(transaction=False)
            for page_id in page_ids:
                pipe.zrange(self._versions_key(page_id), 0, -1)
            members = await pipe.execute()
            # A page saved before versions existed has no versions key: it is its own v1.
            wanted = [
                (page_id, [_text(item) for item in ids] or [page_id])
                for page_id, ids in zip(page_ids, members, strict=True)
            ]
            pipe = self.client.pipeline(transaction=False)
            for _, job_ids in wanted:
                for job_id in job_ids:
                    pipe.hmget(self._page_key(job_id), _FIELDS)
            replies = iter(await pipe.execute())
            pages: list[StoredPage] = []
            cleanup = self.client.pipeline(transaction=False)
            gone_pages: list[str] = []
            for page_id, job_ids in wanted:
                expired = []
                for job_id in job_ids:
                    page = _page(next(replies))
                    if page is None:
                        expired.append(job_id)
                    elif page.user_id == int(user_id):
                        pages.append(page)
                if expired:
                    cleanup.zrem(self._versions_key(page_id), *expired)
                if len(expired) == len(job_ids):
                    gone_pages.append(page_id)
            if gone_pages:
                cleanup.zrem(index, *gone_pages)
            if gone_pages or len(cleanup):
                await cleanup.execute()
        return pages


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _page(reply: Sequence[Any]) -> StoredPage | None:
    """A version from its hash fields (``_FIELDS`` order), or None if the key is gone."""
    fields = dict(zip(_FIELDS, reply, strict=True))
    if fields["meta"] is None:
        return None
    meta = json.loads(fields.pop("meta"))
    created = fields.pop("created_at")
    fields.pop("user_id")  # the meta has it too
    meta.update({name: _text(value) for name, value in fields.items() if value is not None})
    return page_from_meta(meta, created_at=float(_text(created or 0)), path=None)
