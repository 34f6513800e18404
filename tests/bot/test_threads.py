"""bot.threads: a page's thread is found, started once, or given up on, never losing a version.

Discord is faked at its edge (the HTTP call that starts a thread); the page store is the real
file store. The end-to-end flow (v2 in the thread, presses inside it) is in
tests/e2e/test_page_followups.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import discord
import pytest

from bot.store import ResultStore
from bot.threads import ALREADY_HAS_THREAD, THREAD_NAME_MAX, PageThreads, thread_name


def http_error(status: int, code: int, message: str) -> discord.HTTPException:
    response = SimpleNamespace(status=status, reason=message)
    return discord.HTTPException(
        response,  # type: ignore[arg-type]
        {"code": code, "message": message},
    )


class StartingHttp:
    """``start_thread_with_message`` answering with ``outcome`` (a thread id or an error)."""

    def __init__(self, outcome: int | discord.HTTPException) -> None:
        self.outcome = outcome
        self.calls: list[tuple[int, int, str]] = []

    async def start_thread_with_message(
        self, channel_id: int, message_id: int, *, name: str, **_: Any
    ) -> dict[str, Any]:
        self.calls.append((channel_id, message_id, name))
        if isinstance(self.outcome, discord.HTTPException):
            raise self.outcome
        return {"id": str(self.outcome)}


def threads_with(http: StartingHttp, store: ResultStore) -> PageThreads:
    client: Any = SimpleNamespace(http=http)
    return PageThreads(client, store)


async def posted_page(store: ResultStore, *, message_id: int | None = 555) -> Any:
    v1 = await store.save(
        user_id=7, job_id="aaaa0001", filename="bakery.html", data=b"<p>v1</p>", prompt="a bakery",
        model="m",
    )  # fmt: skip
    if message_id is not None:
        await store.set_message(7, "aaaa0001", message_id=message_id, channel_id=42)
    v2 = await store.save(
        user_id=7, job_id="aaaa0002", filename="bakery.html", data=b"<p>v2</p>", prompt="a bakery",
        model="m", parent_job_id="aaaa0001", kind="regenerate",
    )  # fmt: skip
    return v1, v2


def test_thread_names_fit_discord_and_say_what_the_page_is() -> None:
    assert thread_name("bakery.html", "a   landing page\nfor a bakery") == (
        "bakery.html · a landing page for a bakery"
    )
    long = thread_name("shop.html", "word " * 100)
    assert len(long) == THREAD_NAME_MAX and long.endswith("…")
    assert thread_name("shop.html", "  ") == "shop.html"


async def test_the_first_follow_up_starts_the_thread_and_later_ones_reuse_it(
    tmp_path: Path,
) -> None:
    store = ResultStore(tmp_path)
    _v1, v2 = await posted_page(store)
    http = StartingHttp(999)
    threads = threads_with(http, store)
    assert await threads.thread_for(v2) == 999
    assert await threads.thread_for(v2) == 999
    assert http.calls == [(42, 555, "bakery.html · a bakery")]  # started once
    history = await store.get_page(7, "aaaa0001")
    assert history is not None and history.first.thread_id == 999


async def test_a_thread_another_process_started_is_the_message_id(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    _v1, v2 = await posted_page(store)
    exists = http_error(400, ALREADY_HAS_THREAD, "A thread has already been created")
    threads = threads_with(StartingHttp(exists), store)
    assert await threads.thread_for(v2) == 555


@pytest.mark.parametrize(
    ("status", "code"), [(403, 50013), (400, 50024), (404, 10008)], ids=["perm", "dm", "gone"]
)
async def test_no_thread_to_be_had_means_none(tmp_path: Path, status: int, code: int) -> None:
    store = ResultStore(tmp_path)
    _v1, v2 = await posted_page(store)
    threads = threads_with(StartingHttp(http_error(status, code, "no")), store)
    assert await threads.thread_for(v2) is None
    history = await store.get_page(7, "aaaa0001")
    assert history is not None and history.first.thread_id is None


async def test_a_page_whose_message_nobody_recorded_gets_no_thread(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    _v1, v2 = await posted_page(store, message_id=None)
    http = StartingHttp(999)
    assert await threads_with(http, store).thread_for(v2) is None
    assert http.calls == []


async def test_recording_where_a_version_went(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    _v1, v2 = await posted_page(store)
    threads = threads_with(StartingHttp(999), store)
    message = SimpleNamespace(id=777, channel=SimpleNamespace(id=999))
    await threads.record(v2, message, 999)
    kept = await store.get(7, "aaaa0002")
    assert kept is not None
    assert (kept.message_id, kept.channel_id, kept.thread_id) == (777, 999, 999)
    await threads.record(None, message, 999)  # a version that was not kept: nothing to do


async def test_a_store_failure_while_recording_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Where a version went is a convenience: a store that fails must not fail the delivery
    # (the page is already posted), and it must say so.
    store = ResultStore(tmp_path)
    _v1, v2 = await posted_page(store)

    async def broken(*_: Any, **__: Any) -> None:
        raise aiohttp.ClientError("redis away")

    threads = threads_with(StartingHttp(999), store)
    threads.pages = SimpleNamespace(set_message=broken)  # type: ignore[assignment]
    record = threads.recorder(v2, None)
    with caplog.at_level("WARNING", logger="bot.threads"):
        await record(SimpleNamespace(id=1, channel=SimpleNamespace(id=2)))
    assert "could not record its message" in caplog.text and "redis away" in caplog.text
