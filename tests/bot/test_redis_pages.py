"""The Redis page store against a real redis-server: round trip, size cap, TTL, trimming."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.queue.redis_pages import PageTooLarge, RedisPageStore
from bot.queue.redis_queue import connect
from tests.redis_server import RedisServer

TTL_S = 3600


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_server.url, decode_responses=False)
    yield client
    await client.aclose()


def make_store(client: aioredis.Redis, **overrides: Any) -> RedisPageStore:
    values: dict[str, Any] = {
        "prefix": f"test-{secrets.token_hex(4)}",
        "ttl_s": TTL_S,
        "max_bytes": 4096,
        "keep_per_user": 3,
    }
    values.update(overrides)
    return RedisPageStore(client, **values)


async def save(store: RedisPageStore, user_id: int, data: bytes = b"<html></html>") -> str:
    job_id = secrets.token_hex(4)
    await store.save(
        user_id=user_id,
        job_id=job_id,
        filename=f"{job_id}.html",
        data=data,
        prompt="a bakery — ünïcode",
        model="tiny",
        generated_tokens=12,
        seconds=1.23456,
        warnings=("truncated",),
    )
    return job_id


async def test_a_page_round_trips(client: aioredis.Redis) -> None:
    store = make_store(client)
    data = "<html><body>pâte</body></html>".encode() + bytes(range(256))
    job_id = await save(store, 7, data)
    page = await store.get(7, job_id)
    assert page is not None
    assert (page.job_id, page.user_id, page.filename) == (job_id, 7, f"{job_id}.html")
    assert (page.prompt, page.model, page.generated_tokens) == ("a bakery — ünïcode", "tiny", 12)
    assert page.seconds == pytest.approx(1.235) and page.warnings == ("truncated",)
    assert page.size == len(data) and page.path is None and page.created_at > 0
    assert await store.read(page) == data
    assert await store.list(7) == [page]
    assert await store.get(8, job_id) is None  # another user's id
    assert await store.get(7, "../etc") is None


async def test_a_decoding_client_is_fine_too(redis_server: RedisServer) -> None:
    # The bot hands the queue's client (decode_responses=True) to the store.
    decoding = connect(redis_server.url)
    store = make_store(decoding)
    try:
        data = bytes(range(256))  # not UTF-8
        page = await store.get(1, await save(store, 1, data))
        assert page is not None and await store.read(page) == data
    finally:
        await store.aclose()
        await decoding.aclose()


async def test_a_page_over_the_cap_is_refused(client: aioredis.Redis) -> None:
    store = make_store(client, max_bytes=100)
    with pytest.raises(PageTooLarge) as caught:
        await save(store, 1, b"x" * 101)
    assert isinstance(caught.value, OSError)
    assert await store.list(1) == []
    await save(store, 1, b"x" * 100)
    assert len(await store.list(1)) == 1


async def test_pages_and_the_index_expire(client: aioredis.Redis) -> None:
    store = make_store(client)
    job_id = await save(store, 3)
    for key in (f"{store.prefix}:page:{job_id}", f"{store.prefix}:pages:3"):
        ttl = await client.ttl(key)
        assert 0 < ttl <= TTL_S, key
    # A page whose key expired leaves the listing (and the index) too.
    await client.delete(f"{store.prefix}:page:{job_id}")
    assert await store.list(3) == []
    assert await client.zcard(f"{store.prefix}:pages:3") == 0


async def test_only_the_newest_pages_are_kept(client: aioredis.Redis) -> None:
    store = make_store(client, keep_per_user=2)
    ids = [await save(store, 5) for _ in range(4)]
    other = await save(store, 6)
    listed = await store.list(5)
    assert [page.job_id for page in listed] == [ids[3], ids[2]]
    gone = await store.get(5, ids[0])
    assert gone is None
    assert not await client.exists(f"{store.prefix}:page:{ids[0]}")
    with pytest.raises(FileNotFoundError):
        await store.read(dataclasses.replace(listed[0], job_id=ids[1]))  # a trimmed page
    assert [page.job_id for page in await store.list(6)] == [other]
