"""The Redis page store against a real redis-server: round trip, size cap, TTL, trimming."""

from __future__ import annotations

import dataclasses
import json
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


async def refine(store: RedisPageStore, user_id: int, parent: str, **extra: Any) -> str:
    job_id = secrets.token_hex(4)
    await store.save(
        user_id=user_id,
        job_id=job_id,
        filename="p.html",
        data=b"<html>refined</html>",
        prompt="p",
        model="tiny",
        parent_job_id=parent,
        kind="refine",
        instruction="bluer",
        **extra,
    )
    return job_id


async def keys_of(client: aioredis.Redis, store: RedisPageStore) -> set[str]:
    return {key.decode() async for key in client.scan_iter(match=f"{store.prefix}:*")}


async def test_every_key_of_a_page_keeps_a_ttl(client: aioredis.Redis) -> None:
    store = make_store(client)
    v1 = await save(store, 3)
    v2 = await refine(store, 3, v1, content='{"title": "x"}')
    await store.set_message(3, v2, message_id=1, channel_id=2, thread_id=3)
    keys = await keys_of(client, store)
    assert keys == {
        f"{store.prefix}:page:{v1}",
        f"{store.prefix}:page:{v2}",
        f"{store.prefix}:versions:{v1}",
        f"{store.prefix}:pages:3",
    }
    for key in keys:
        ttl = await client.ttl(key)
        assert 0 < ttl <= TTL_S, key
    # A new version refreshes the TTL of the whole page, so it never expires in parts.
    await client.expire(f"{store.prefix}:page:{v1}", 100)
    await refine(store, 3, v2)
    assert await client.ttl(f"{store.prefix}:page:{v1}") > 100


async def test_trimming_deletes_the_keys(client: aioredis.Redis) -> None:
    store = make_store(client, keep_per_user=1, max_versions=2)
    v1 = await save(store, 4)
    v2 = await refine(store, 4, v1)
    v3 = await refine(store, 4, v2)  # v2 goes (v1 stays, the newest stays)
    assert await keys_of(client, store) == {
        f"{store.prefix}:page:{v1}",
        f"{store.prefix}:page:{v3}",
        f"{store.prefix}:versions:{v1}",
        f"{store.prefix}:pages:4",
    }
    assert await client.zrange(f"{store.prefix}:versions:{v1}", 0, -1, withscores=True) == [
        (v1.encode(), 1.0),
        (v3.encode(), 3.0),
    ]
    other = await save(store, 4)  # a second page: the first goes whole
    assert await keys_of(client, store) == {
        f"{store.prefix}:page:{other}",
        f"{store.prefix}:versions:{other}",
        f"{store.prefix}:pages:4",
    }


async def test_an_expired_version_leaves_the_history(client: aioredis.Redis) -> None:
    store = make_store(client)
    v1 = await save(store, 5)
    v2 = await refine(store, 5, v1)
    await client.delete(f"{store.prefix}:page:{v2}")
    [history] = await store.list_pages(5)
    assert [v.job_id for v in history.versions] == [v1]
    assert await client.zrange(f"{store.prefix}:versions:{v1}", 0, -1) == [v1.encode()]
    await client.delete(f"{store.prefix}:page:{v1}")
    assert await store.list_pages(5) == []
    assert await client.zcard(f"{store.prefix}:pages:5") == 0


async def test_pages_of_the_old_format_read_as_their_own_v1(client: aioredis.Redis) -> None:
    store = make_store(client)
    old = "01d00001"
    # What the store wrote before pages had versions: no page_id/version, no versions key.
    meta = {"job_id": old, "user_id": 6, "filename": "old.html", "prompt": "p", "model": "m"}
    await client.hset(
        f"{store.prefix}:page:{old}",
        mapping={
            "meta": json.dumps(meta),
            "data": b"<html>old</html>",
            "user_id": "6",
            "created_at": "1000.5",
        },
    )
    await client.zadd(f"{store.prefix}:pages:6", {old: 1000.5})
    [history] = await store.list_pages(6)
    page = history.first
    assert (page.job_id, page.page_id, page.version, page.kind) == (old, old, 1, "create")
    assert page.created_at == 1000.5 and await store.read(page) == b"<html>old</html>"
    assert await store.get_version(6, old, 1) == page
    assert await store.get_version(6, old, 2) is None
    v2 = await refine(store, 6, old)
    [history] = await store.list_pages(6)
    assert [(v.job_id, v.version) for v in history.versions] == [(old, 1), (v2, 2)]
    assert await client.ttl(f"{store.prefix}:versions:{old}") > 0
    assert await client.ttl(f"{store.prefix}:page:{old}") > 0  # given the page's TTL now


async def test_content_is_counted_against_the_cap(client: aioredis.Redis) -> None:
    store = make_store(client, max_bytes=100)
    v1 = await save(store, 1, b"x" * 60)
    with pytest.raises(PageTooLarge):
        await refine(store, 1, v1, content="y" * 90)
    assert len(await store.list(1)) == 1


async def test_content_reads_through_a_decoding_client(redis_server: RedisServer) -> None:
    decoding = connect(redis_server.url)
    store = make_store(decoding)
    try:
        v1 = await save(store, 1)
        v2 = await refine(store, 1, v1, content='{"title": "Pâte"}')
        page = await store.get(1, v2)
        assert page is not None and await store.read_content(page) == '{"title": "Pâte"}'
    finally:
        await store.aclose()
        await decoding.aclose()
