"""The Redis backend end to end: real bots and workers, a real redis-server, the fake Discord.

The acceptance tests of the shared queue: a worker SIGKILLed mid-batch, a bot restarted
(gracefully or not) with 20 jobs queued, Redis restarted and stopped under load, two bot
shards with one worker, and the Cancel button on queued and running jobs. Each checks
what users get (one page per interaction, the texts of their messages) and what Redis
holds (leases, states, delivery records).
"""

# Polling is deliberate: the state watched lives in Redis, other threads and processes.

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.gateway import DiscordWebSocket

from model.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ProgressCallback,
    TextGenerator,
)
from tests.e2e.helpers import ControlledEngine, ShortAnswers, bot_errors
from tests.e2e.redis_helpers import (
    RedisView,
    WorkerProcess,
    abandon_bot,
    job_id_of,
    new_prefix,
    redis_settings,
    start_redis_bot,
    start_worker,
    stop_redis_bot,
    wait_for,
    wait_job_id,
)
from tests.fake_discord import (
    CB_DEFERRED_MESSAGE,
    CB_MESSAGE,
    CB_UPDATE_MESSAGE,
    COMMANDS_PATH,
    FakeDiscord,
    FakeInteraction,
)
from tests.redis_server import RedisServer

CANCEL = "htmlbot:cancel:"  # the Cancel button's custom_id prefix

pytestmark = pytest.mark.timeout(180)

# Tokens of an answer that takes the tiny model a few seconds on a CPU (~0.3 ms a token
# in a batch of 4): a kill or a Redis outage lands inside the batch.
LONG_ANSWER = 1500
QUEUE_UNAVAILABLE = "The queue is unavailable right now; please try again in a minute."


@pytest.fixture
async def view(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A fresh prefix and a direct look at its keys in Redis."""
    found = RedisView(redis_server, new_prefix())
    yield found
    await found.aclose()


def worker_settings(fake: FakeDiscord, tmp_path: Path, server: RedisServer, prefix: str) -> Any:
    return redis_settings(fake, tmp_path, server, prefix, results_dir=tmp_path / "worker")


async def send_html(
    fake: FakeDiscord, prompt: str, user_name: str, **options: Any
) -> FakeInteraction:
    inter = await fake.send_command(
        "html", {"prompt": prompt}, user=fake.user(user_name), **options
    )
    await inter.wait_for_callback(timeout=5)
    return inter


async def wait_pages(inters: list[FakeInteraction], timeout_s: float) -> None:
    for inter in inters:
        await inter.wait_for_file(".html", timeout=timeout_s)


def page_counts(inters: list[FakeInteraction]) -> list[int]:
    return [len(inter.html_files) for inter in inters]


async def test_a_page_goes_through_redis_once(
    fake: FakeDiscord,
    tmp_path: Path,
    redis_server: RedisServer,
    real_engine: TextGenerator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = redis_settings(fake, tmp_path, redis_server, new_prefix())
    run = await start_redis_bot(fake, settings)
    worker = await start_worker(settings, real_engine)
    try:
        ann = fake.user("ann")
        inter = await fake.send_command("html", {"prompt": "a bakery"}, user=ann)
        page = await inter.wait_for_file(".html", timeout=30)
        assert page.data.lstrip().lower().startswith(b"<!doctype html")
        assert "/mypages page:" in inter.original_content
        await asyncio.sleep(1.0)  # nothing more may come
        assert Counter(f.filename for f in inter.html_files) == {page.filename: 1}
        listing = await fake.send_command("mypages", {}, user=ann)
        await listing.wait_for_callback(timeout=5)
        assert str(page.filename) in listing.visible_text
    finally:
        await worker.stop()
        await stop_redis_bot(run)
    assert bot_errors(caplog) == []


async def test_a_worker_killed_mid_batch_loses_nothing(
    fake: FakeDiscord,
    tmp_path: Path,
    redis_server: RedisServer,
    real_engine: TextGenerator,
    tiny_model_folder: Path,
    view: RedisView,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    # Long enough answers that a batch takes seconds, so the kill lands inside it.
    settings = redis_settings(fake, tmp_path, redis_server, view.prefix, max_new_tokens=LONG_ANSWER)
    run = await start_redis_bot(fake, settings)
    doomed = WorkerProcess.start(
        redis_server,
        view.prefix,
        tiny_model_folder,
        tmp_path / "doomed",
        name="doomed",
        max_new_tokens=LONG_ANSWER,
        max_batch=4,
        lease_s=3.0,
    )
    worker = None
    try:
        # Eight jobs queued before any worker runs: each worker takes a batch of four.
        inters = [await send_html(fake, f"page {i}", f"user{i % 4}") for i in range(8)]
        assert all(i.callback_type == CB_DEFERRED_MESSAGE for i in inters)
        job_ids = [await wait_job_id(i) for i in inters]

        async def doomed_mid_batch() -> bool:
            running = await view.running()
            if len(running) < 4 or set(running.values()) != {"doomed"}:
                return False
            jobs = [await view.job(job_id) for job_id in running]
            return all(int(job.get("tokens_so_far", "0")) > 0 for job in jobs)

        await wait_for(doomed_mid_batch, 60, "the worker process to run a batch")
        held = set(await view.running())
        worker = await start_worker(
            worker_settings(fake, tmp_path, redis_server, view.prefix), real_engine
        )

        async def both_busy() -> bool:
            return len(await view.running()) == 8

        await wait_for(both_busy, 20, "the second worker to take the other batch")
        running = await view.running()
        other = running[next(job_id for job_id in job_ids if job_id not in held)]
        assert other != "doomed"
        assert doomed.kill() == -9
        assert not any(i.html_files for i in inters)  # the kill came before any page

        await wait_pages(inters, timeout_s=90)
        await asyncio.sleep(1.0)  # room for a second (wrong) delivery
        assert page_counts(inters) == [1] * 8
        for job_id in job_ids:
            job = await view.job(job_id)
            assert job["state"] == "done", job
            assert job["worker"] == other, job  # the survivor finished every job
            # The killed worker's jobs were taken over once their lease ran out.
            assert job["attempts"] == ("2" if job_id in held else "1"), job
            assert await view.delivered(job_id)
    finally:
        doomed.ensure_stopped()
        if worker is not None:
            await worker.stop()
        await stop_redis_bot(run)
    assert bot_errors(caplog) == []


@pytest.mark.parametrize("how", ["closed", "killed"])
async def test_a_restarted_bot_delivers_its_20_queued_jobs_once(
    how: str,
    fake: FakeDiscord,
    tmp_path: Path,
    redis_server: RedisServer,
    real_engine: TextGenerator,
    view: RedisView,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    def bot_settings(name: str) -> Any:
        return redis_settings(
            fake, tmp_path, redis_server, view.prefix, queue_max_per_user=5, worker_name=name
        )

    old = await start_redis_bot(fake, bot_settings("bot-before"))
    inters = [await send_html(fake, f"page {i}", f"user{i % 4}") for i in range(20)]
    assert all(i.callback_type == CB_DEFERRED_MESSAGE for i in inters)
    job_ids = [await wait_job_id(i) for i in inters]  # the old bot's status edits
    assert len(set(job_ids)) == 20
    # Two more whose tokens die while no bot runs: their pages must be kept instead.
    late = [await send_html(fake, f"late page {i}", "late") for i in range(2)]
    late_ids = [await wait_job_id(i) for i in late]
    assert sorted(await view.queued()) == sorted(job_ids + late_ids)
    if how == "closed":
        await stop_redis_bot(old)
    else:
        await abandon_bot(old)
    restart = len(fake.requests)
    for inter in late:
        fake.expire(inter)

    new = await start_redis_bot(fake, bot_settings("bot-after"))
    worker = None
    try:

        def edited_since_restart(inter: FakeInteraction) -> bool:
            return any(
                r.seq >= restart and r.method == "PATCH" and "Queued" in (r.content or "")
                for r in inter.ok_requests
            )

        # Before any worker runs: the new bot picked up every status message.
        await fake.wait_until(lambda: all(edited_since_restart(i) for i in inters), timeout=15)
        worker = await start_worker(
            worker_settings(fake, tmp_path, redis_server, view.prefix),
            ShortAnswers(real_engine, max_new_tokens=8),
        )
        await wait_pages(inters, timeout_s=60)
        await asyncio.sleep(1.0)  # room for a second (wrong) delivery
        assert page_counts(inters) == [1] * 20
        for inter, job_id in zip(inters, job_ids, strict=True):
            assert job_id in inter.original_content  # the Done text names the job
            assert await view.delivered(job_id)

        async def late_ones_ended() -> bool:
            return all([await view.delivered(job_id) for job_id in late_ids])

        await wait_for(late_ones_ended, 20, "the jobs with dead tokens to be handled")
        assert [i.html_files for i in late] == [[], []]
        listing = await fake.send_command("mypages", {}, user=fake.user("late"))
        await listing.wait_for_callback(timeout=5)
        assert all(job_id in listing.visible_text for job_id in late_ids), listing.visible_text
    finally:
        if worker is not None:
            await worker.stop()
        await stop_redis_bot(new)
    assert bot_errors(caplog) == []


async def test_redis_restarted_and_stopped_under_load(
    fake: FakeDiscord,
    tmp_path: Path,
    redis_server: RedisServer,
    real_engine: TextGenerator,
    view: RedisView,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = redis_settings(fake, tmp_path, redis_server, view.prefix, max_new_tokens=LONG_ANSWER)
    run = await start_redis_bot(fake, settings)
    worker = await start_worker(
        worker_settings(fake, tmp_path, redis_server, view.prefix), real_engine, max_batch=2
    )
    try:
        inters = [await send_html(fake, f"page {i}", f"user{i}") for i in range(4)]
        assert all(i.callback_type == CB_DEFERRED_MESSAGE for i in inters)
        job_ids = [await wait_job_id(i) for i in inters]

        async def some_running() -> bool:
            return bool(await view.running())

        await wait_for(some_running, 20, "a job to run")
        # A restart that keeps the data (as with persistence), the jobs running meanwhile.
        await asyncio.to_thread(redis_server.restart, keep_data=True)
        await wait_for(some_running, 20, "a job to run after the restart")
        in_flight = [i for i in inters if not i.html_files]
        assert in_flight, "every page went out before the outage: nothing was tested"
        # Then an outage of a few seconds: new requests are refused clearly.
        await asyncio.to_thread(redis_server.stop, save=True)
        try:
            refused = await fake.send_command(
                "html", {"prompt": "during the outage"}, user=fake.user("eve")
            )
            await refused.wait_for_callback(timeout=5)
            assert refused.callback_type == CB_MESSAGE
            assert refused.is_ephemeral_reply()
            assert QUEUE_UNAVAILABLE in refused.original_content
            await asyncio.sleep(3.0)
            assert not run.task.done() and not worker.task.done()
        finally:
            await asyncio.to_thread(redis_server.start)

        await wait_pages(inters, timeout_s=90)
        await asyncio.sleep(1.0)  # room for a second (wrong) delivery
        assert page_counts(inters) == [1, 1, 1, 1]
        for job_id in job_ids:
            assert await view.delivered(job_id)
        # Both reconnected by themselves: a new request goes through.
        again = await send_html(fake, "after the outage", "eve")
        assert again.callback_type == CB_DEFERRED_MESSAGE
        await again.wait_for_file(".html", timeout=60)
        assert not run.task.done() and not worker.task.done()
    finally:
        await worker.stop()
        await stop_redis_bot(run)
    assert bot_errors(caplog) == []


@pytest.fixture
async def sharded_fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    """A fake Discord recommending 2 shards, with 2 guilds (one on each)."""
    server = FakeDiscord(shards=2, guilds=2)
    await server.start()
    # As the ``fake`` fixture: discord.py's class-level URLs are put back after the test.
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)
    yield server
    await server.stop()


async def test_two_shard_processes_share_one_queue_and_the_pages(
    sharded_fake: FakeDiscord,
    tmp_path: Path,
    redis_server: RedisServer,
    real_engine: TextGenerator,
    view: RedisView,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    fake = sharded_fake

    def shard_settings(shard: int) -> Any:
        return redis_settings(
            fake,
            tmp_path / f"shard{shard}",
            redis_server,
            view.prefix,
            dev_guild_id=None,  # global commands: both guilds see them
            shard_count=2,
            shard_ids=(shard,),
            worker_name=f"bot-shard{shard}",
        )

    guilds = [fake.guild_on_shard(0), fake.guild_on_shard(1)]
    # Shard 1's process first: it is connected (so its setup is over) and synced nothing.
    second = await start_redis_bot(fake, shard_settings(1))
    await fake.wait_until_ready(shard=1)
    assert fake.find_requests("PUT", COMMANDS_PATH) == []
    first = await start_redis_bot(fake, shard_settings(0))
    await fake.wait_for_shards(2)
    await fake.wait_for_sync()
    assert len(fake.find_requests("PUT", COMMANDS_PATH)) == 1
    worker = await start_worker(
        worker_settings(fake, tmp_path, redis_server, view.prefix), real_engine
    )
    try:
        ann = fake.user("ann", guild=guilds[0])
        fake.user("ann", guild=guilds[1])
        inters = []
        for shard, prompt in enumerate(["a bakery", "a garden"]):
            inter = await fake.send_command(
                "html", {"prompt": prompt}, user=ann, guild=guilds[shard]
            )
            await inter.wait_for_callback(timeout=5)
            assert inter.shard_id == shard  # handled by that shard's process
            assert inter.callback_type == CB_DEFERRED_MESSAGE
            inters.append(inter)
        await wait_pages(inters, timeout_s=60)
        await asyncio.sleep(1.0)  # room for a second (wrong) delivery
        assert page_counts(inters) == [1, 1]
        bakery_id = job_id_of(inters[0])

        # Pages live in Redis: shard 1 lists (and sends again) the page made on shard 0.
        listing = await fake.send_command("mypages", {}, user=ann, guild=guilds[1])
        await listing.wait_for_callback(timeout=5)
        assert listing.shard_id == 1
        assert str(inters[0].html_files[0].filename) in listing.visible_text
        assert bakery_id in listing.visible_text
        again = await fake.send_command("mypages", {"page": bakery_id}, user=ann, guild=guilds[1])
        resent = await again.wait_for_file(".html", timeout=10)
        assert resent.data == inters[0].html_files[0].data
    finally:
        await worker.stop()
        await stop_redis_bot(first)
        await stop_redis_bot(second)
    assert bot_errors(caplog) == []


async def test_cancel_button_on_a_queued_and_a_running_job(
    fake: FakeDiscord,
    tmp_path: Path,
    redis_server: RedisServer,
    real_engine: TextGenerator,
    view: RedisView,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = redis_settings(fake, tmp_path, redis_server, view.prefix, max_new_tokens=LONG_ANSWER)
    run = await start_redis_bot(fake, settings)
    # One job at a time: the second one waits in the queue behind the first. Each batch
    # starts a second late, so a fast machine can't finish the long page before the press.
    engine = ControlledEngine(real_engine, delay_s=1.0)
    worker = await start_worker(
        worker_settings(fake, tmp_path, redis_server, view.prefix), engine, max_batch=1
    )
    try:
        running = await send_html(fake, "a long page", "ann")
        running_id = await wait_job_id(running)
        await running.wait_until(lambda i: "Generating" in i.original_content, timeout=20)
        queued = await send_html(fake, "a page that waits", "bob")
        queued_id = await wait_job_id(queued)
        await queued.wait_until(lambda i: "Queued" in i.original_content, timeout=10)

        # Queued: gone from the queue at once, and the message says so.
        press = await fake.press_button(f"htmlbot:cancel:{queued_id}", user=fake.user("bob"))
        await press.wait_for_callback(timeout=3)
        assert press.callback_type == CB_UPDATE_MESSAGE
        assert "Cancelled" in queued.original_content
        assert queued.custom_ids(CANCEL) == []
        assert queued_id not in await view.queued()
        assert (await view.job(queued_id))["state"] == "cancelled"

        # Running: the worker stops it at its next progress report.
        press = await fake.press_button(f"htmlbot:cancel:{running_id}", user=fake.user("ann"))
        await press.wait_for_callback(timeout=3)
        assert press.callback_type == CB_UPDATE_MESSAGE

        async def stopped() -> bool:
            return (await view.job(running_id)).get("state") == "cancelled"

        await wait_for(stopped, 20, "the worker to stop the cancelled job")
        job = await view.job(running_id)
        assert int(job["tokens_so_far"]) < LONG_ANSWER, job  # stopped, not finished
        assert await view.running() == {}
        await wait_for(lambda: view.delivered(running_id), 10, "the cancel to be told")
        await asyncio.sleep(1.0)  # room for a (wrong) late page or edit
        for inter in (queued, running):
            assert inter.html_files == []
            assert "Cancelled" in inter.original_content
            assert inter.custom_ids(CANCEL) == []
    finally:
        await worker.stop()
        await stop_redis_bot(run)
    assert bot_errors(caplog) == []


class EmptyFirst:
    """An engine whose first answer to each prompt is an empty page, the next a full one."""

    model_name = "empty-first"

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.seeds: list[int | None] = []

    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        results = []
        for request in requests:
            self.seen[request.prompt] += 1
            self.seeds.append(request.sampling.seed)
            body = "" if self.seen[request.prompt] == 1 else "<h1>Bakery</h1><p>Fresh bread.</p>"
            results.append(
                GenerationResult(
                    request_id=request.request_id,
                    text=f"<!DOCTYPE html><html><head><title>Bakery</title></head>"
                    f"<body>{body}</body></html>",
                    finish_reason=FinishReason.HTML_COMPLETE,
                    prompt_tokens=10,
                    generated_tokens=20,
                    time_to_first_token_s=0.01,
                    total_s=0.1,
                )
            )
        return results


async def test_an_empty_page_is_generated_again_through_redis(
    fake: FakeDiscord, tmp_path: Path, redis_server: RedisServer
) -> None:
    settings = redis_settings(fake, tmp_path, redis_server, new_prefix(), regenerate_empty=True)
    engine = EmptyFirst()
    run = await start_redis_bot(fake, settings)
    worker = await start_worker(settings, engine)
    try:
        inter = await fake.send_command("html", {"prompt": "a bakery"}, user=fake.user("ann"))
        page = await inter.wait_for_file(".html", timeout=30)
        assert b"Fresh bread" in page.data  # the second answer, not the empty first one
        await asyncio.sleep(0.5)
        assert len(inter.html_files) == 1
        assert engine.seen["a bakery"] == 2 and engine.seeds[0] != engine.seeds[1]
    finally:
        await worker.stop()
        await stop_redis_bot(run)
