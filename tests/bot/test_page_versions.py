"""Page versions, the same contract for both page stores: files (local) and a real Redis."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.queue import PageStore
from bot.queue.redis_pages import RedisPageStore
from bot.queue.redis_queue import connect
from bot.store import ResultStore
from bot.versions import StoredPage
from tests.redis_server import RedisServer

MakeStore = Callable[..., PageStore]


@pytest.fixture(params=["files", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    """Builds a store of the parametrized kind: ``make_store(keep_per_user=, max_versions=)``."""
    if request.param == "files":

        def files(**limits: Any) -> PageStore:
            return ResultStore(tmp_path / secrets.token_hex(4), **limits)

        yield files
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = connect(server.url, decode_responses=False)

    def redis(**limits: Any) -> PageStore:
        return RedisPageStore(client, prefix=f"test-{secrets.token_hex(4)}", ttl_s=3600, **limits)

    yield redis
    await client.aclose()


async def save(
    store: PageStore,
    user_id: int = 1,
    *,
    parent: StoredPage | str | None = None,
    kind: str | None = None,
    instruction: str | None = None,
    content: str | None = None,
    job_id: str | None = None,
    data: bytes | None = None,
) -> StoredPage:
    job_id = job_id or secrets.token_hex(4)
    parent_id = parent.job_id if isinstance(parent, StoredPage) else parent
    return await store.save(
        user_id=user_id,
        job_id=job_id,
        filename="page.html",
        data=data if data is not None else f"<html>{job_id}</html>".encode(),
        prompt="a bakery",
        model="tiny",
        parent_job_id=parent_id,
        kind=kind or ("create" if parent is None else "refine"),
        instruction=instruction,
        content=content,
    )


async def test_a_new_page_is_its_own_v1(make_store: MakeStore) -> None:
    store = make_store()
    page = await save(store)
    assert (page.page_id, page.version, page.label) == (page.job_id, 1, "v1")
    assert (page.kind, page.parent_job_id, page.instruction) == ("create", None, None)
    assert not page.has_content and page.message_id is None
    assert await store.get(1, page.job_id) == page


async def test_follow_ups_are_the_next_versions_of_the_page(make_store: MakeStore) -> None:
    store = make_store()
    v1 = await save(store)
    v2 = await save(store, parent=v1, instruction="make the header blue")
    v3 = await save(store, parent=v1, kind="regenerate")  # from v1 again: still the next one
    v4 = await save(store, parent=v2, kind="restyle", instruction="midnight")
    assert [v.version for v in (v1, v2, v3, v4)] == [1, 2, 3, 4]
    assert {v.page_id for v in (v1, v2, v3, v4)} == {v1.job_id}
    assert (v2.parent_job_id, v2.kind, v2.instruction) == (
        v1.job_id,
        "refine",
        "make the header blue",
    )
    assert (v4.parent_job_id, v4.kind, v4.instruction) == (v2.job_id, "restyle", "midnight")
    for version in (v1, v2, v3, v4):
        assert await store.get(1, version.job_id) == version
        assert await store.get_version(1, v1.job_id, version.version) == version
        assert await store.read(version) == f"<html>{version.job_id}</html>".encode()
    assert await store.get_version(1, v1.job_id, 5) is None
    assert await store.get_version(2, v1.job_id, 1) is None  # another user
    # ``list`` keeps one entry per version, newest first.
    assert [p.job_id for p in await store.list(1)] == [v.job_id for v in (v4, v3, v2, v1)]
    [history] = await store.list_pages(1)
    assert history.page_id == v1.job_id and history.versions == (v1, v2, v3, v4)
    assert (history.first, history.latest, history.version(3)) == (v1, v4, v3)
    assert await store.get_page(1, v1.job_id) == history
    assert await store.get_page(2, v1.job_id) is None  # another user
    assert await store.get_page(1, v2.job_id) is None  # a version, not a page
    assert await store.get_page(1, "../etc") is None


async def test_concurrent_refines_get_distinct_consecutive_numbers(make_store: MakeStore) -> None:
    store = make_store()
    v1 = await save(store)
    refines = await asyncio.gather(*(save(store, parent=v1) for _ in range(8)))
    assert sorted(page.version for page in refines) == list(range(2, 10))
    [history] = await store.list_pages(1)
    assert [v.version for v in history.versions] == list(range(1, 10))
    assert {v.job_id for v in history.versions} == {v1.job_id} | {p.job_id for p in refines}


async def test_pages_are_listed_by_their_last_version(make_store: MakeStore) -> None:
    store = make_store()
    a = await save(store)
    b = await save(store)
    other = await save(store, user_id=2)
    assert [h.page_id for h in await store.list_pages(1)] == [b.job_id, a.job_id]
    a2 = await save(store, parent=a)  # refining the older page makes it the newest
    pages = await store.list_pages(1)
    assert [h.page_id for h in pages] == [a.job_id, b.job_id]
    assert pages[0].versions == (a, a2) and pages[1].versions == (b,)
    assert [h.page_id for h in await store.list_pages(2)] == [other.job_id]
    assert await store.list_pages(3) == []


async def test_trimming_counts_pages_and_drops_them_whole(make_store: MakeStore) -> None:
    store = make_store(keep_per_user=2)
    a = await save(store)
    a_versions = [a, await save(store, parent=a), await save(store, parent=a)]
    b = await save(store)
    c = await save(store)  # the third page: the oldest one (a) goes, all its versions
    assert [h.page_id for h in await store.list_pages(1)] == [c.job_id, b.job_id]
    for version in a_versions:
        assert await store.get(1, version.job_id) is None
        assert await store.get_any(version.job_id) is None
        with pytest.raises(FileNotFoundError):
            await store.read(version)
    b2 = await save(store, parent=b)  # b is now the newest page, so c is older than it
    d = await save(store)
    assert [h.page_id for h in await store.list_pages(1)] == [d.job_id, b.job_id]
    assert [v.job_id for v in (await store.list_pages(1))[1].versions] == [b.job_id, b2.job_id]


async def test_versions_past_the_cap_go_oldest_first_but_never_v1(make_store: MakeStore) -> None:
    store = make_store(max_versions=3)
    v1 = await save(store)
    made = [v1]
    for _ in range(4):
        made.append(await save(store, parent=made[-1]))
    [history] = await store.list_pages(1)
    assert [v.version for v in history.versions] == [1, 4, 5]
    assert await store.get(1, made[1].job_id) is None and await store.get(1, made[2].job_id) is None
    # Numbers are never reused after a drop.
    v6 = await save(store, parent=v1)
    assert v6.version == 6
    [history] = await store.list_pages(1)
    assert [v.version for v in history.versions] == [1, 5, 6]


async def test_the_message_is_recorded_after_the_send(make_store: MakeStore) -> None:
    store = make_store()
    v1 = await save(store)
    v2 = await save(store, parent=v1)
    [history] = await store.list_pages(1)
    assert history.posted is None
    first = await store.set_message(1, v1.job_id, message_id=11, channel_id=22, thread_id=33)
    assert first is not None and (first.message_id, first.channel_id, first.thread_id) == (
        11,
        22,
        33,
    )
    # Only the ids given change.
    moved = await store.set_message(1, v1.job_id, message_id=2**62 + 1)
    assert moved is not None and (moved.message_id, moved.channel_id, moved.thread_id) == (
        2**62 + 1,
        22,
        33,
    )
    assert await store.get(1, v1.job_id) == moved
    assert await store.set_message(2, v1.job_id, message_id=5) is None  # not the owner
    assert await store.set_message(1, "00000000", message_id=5) is None  # no such version
    assert await store.set_message(1, "../x", message_id=5) is None
    [history] = await store.list_pages(1)
    assert history.posted == moved
    await store.set_message(1, v2.job_id, message_id=44, thread_id=33)
    [history] = await store.list_pages(1)
    assert history.posted is not None and history.posted.job_id == v2.job_id


async def test_content_round_trips(make_store: MakeStore) -> None:
    store = make_store()
    content = json.dumps({"title": "Pâtisserie ünï", "sections": [{"h": "menu", "items": [1]}]})
    v1 = await save(store, content=content)
    assert v1.has_content and await store.read_content(v1) == content
    restyled = await save(store, parent=v1, kind="restyle", instruction="paper", content=content)
    assert await store.read_content(restyled) == content
    plain = await save(store, parent=v1)
    assert not plain.has_content and await store.read_content(plain) is None
    # Listing does not carry the content, only whether there is some.
    listed = {p.job_id: p for p in await store.list(1)}
    assert listed[v1.job_id].has_content and not listed[plain.job_id].has_content
    assert await store.read_content(listed[v1.job_id]) == content
    # The same job saved again without content drops it.
    again = await save(store, job_id=v1.job_id)
    assert not again.has_content and await store.read_content(again) is None


async def test_get_any_gives_the_owner_and_get_keeps_pages_private(make_store: MakeStore) -> None:
    store = make_store()
    mine = await save(store, user_id=7)
    found = await store.get_any(mine.job_id)
    assert found == mine and found is not None and found.user_id == 7
    assert await store.get(8, mine.job_id) is None
    assert await store.get_any("00000000") is None and await store.get_any("../etc") is None


async def test_a_parent_that_is_not_the_users_starts_a_page(make_store: MakeStore) -> None:
    store = make_store()
    theirs = await save(store, user_id=2)
    page = await save(store, user_id=1, parent=theirs)
    assert (page.page_id, page.version) == (page.job_id, 1)
    assert page.parent_job_id == theirs.job_id and page.kind == "refine"  # kept for the record
    gone = await save(store, user_id=1, parent="0123abcd")  # trimmed or expired meanwhile
    assert (gone.page_id, gone.version) == (gone.job_id, 1)
    [their_page] = await store.list_pages(2)
    assert their_page.versions == (theirs,)


async def test_saving_a_job_again_replaces_its_version_in_place(make_store: MakeStore) -> None:
    store = make_store()
    v1 = await save(store)
    v2 = await save(store, parent=v1)
    again = await save(store, parent=v1, job_id=v2.job_id, data=b"<html>new</html>")
    assert (again.page_id, again.version) == (v1.job_id, 2)
    assert await store.read(again) == b"<html>new</html>"
    [history] = await store.list_pages(1)
    assert [v.job_id for v in history.versions] == [v1.job_id, v2.job_id]


async def test_an_unknown_kind_is_refused_before_anything_is_kept(make_store: MakeStore) -> None:
    store = make_store()
    with pytest.raises(ValueError, match="kind"):
        await save(store, kind="remix")
    assert await store.list(1) == []
