"""The Redis job queue against a real redis-server: codec, fairness, limits, leases, poison
jobs, expiry, deliveries, and Redis going away and coming back."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.errors import QueueFull, QueueUnavailable, UserLimitReached
from bot.jobs import DeliveryInfo, Job, JobState
from bot.queue.codec import CodecError, decode_job, encode_job
from bot.queue.redis_queue import DeliveryInProgress, RedisQueue, connect
from bot.queue.redis_source import RedisJobSource
from model.types import (
    FinishReason,
    GenerationResult,
    PageMode,
    SafetyPolicy,
    SamplingParams,
)
from tests.redis_server import RedisServer

TOKEN = "secret-interaction-token-" + "x" * 40


async def eventually(condition: Callable[[], bool], limit_s: float = 10.0) -> None:
    async with asyncio.timeout(limit_s):
        while not condition():  # noqa: ASYNC110 - polling plain state, there is no event
            await asyncio.sleep(0.02)


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_server.url)
    yield client
    await client.aclose()


def make_queue(client: aioredis.Redis, **overrides: Any) -> RedisQueue:
    """A queue under a fresh key prefix: tests share one server and never see each other."""
    values: dict[str, Any] = {
        "prefix": f"test-{secrets.token_hex(4)}",
        "max_total": 100,
        "max_per_user": 3,
        "lease_s": 30.0,
        "initial_job_seconds": 1.0,
        "delivery_margin_s": 0.1,
    }
    values.update(overrides)
    return RedisQueue(client, **values)


@pytest.fixture
def queue(client: aioredis.Redis) -> RedisQueue:
    return make_queue(client)


def new_job(user_id: int, prompt: str = "a page", ttl_s: float = 900.0, **fields: Any) -> Job:
    return Job.create(user_id=user_id, prompt=prompt, ttl_s=ttl_s, **fields)


def result_for(job: Job, total_s: float = 2.0) -> GenerationResult:
    return GenerationResult(
        request_id=job.job_id,
        text="<html></html>",
        finish_reason=FinishReason.HTML_COMPLETE,
        prompt_tokens=10,
        generated_tokens=20,
        time_to_first_token_s=0.1,
        total_s=total_s,
    )


async def take_one_by_one(queue: RedisQueue, worker: str = "w") -> list[Job]:
    taken: list[Job] = []
    while batch := await queue.take(worker, 1):
        taken.extend(batch)
    return taken


# -- codec -------------------------------------------------------------------------------


def full_job() -> Job:
    job = new_job(
        42,
        prompt="a bakery — with ünïcode",
        style="retro",
        sampling=SamplingParams(
            max_new_tokens=321, temperature=0.7, top_p=0.9, repetition_penalty=1.05, seed=7
        ),
        mode=PageMode.COMPOSE,
        safety=SafetyPolicy.STRICT,
        user_name="ann",
        guild_id=1234567890123456789,
        channel_id=987654321098765432,
        private=True,
        delivery=DeliveryInfo(
            application_id=11, token=TOKEN, interaction_id=22, shard_id=3, attachment_limit=4096
        ),
    )
    job.state = JobState.DONE
    job.tokens_so_far = 20
    job.attempts = 2
    job.regenerated = True
    job.error = "an error"
    job.cancel_note = "a note"
    job.result = result_for(job, total_s=1.2345678901234)
    job.request.cancel()
    return job


def test_codec_round_trips_every_field() -> None:
    job = full_job()
    fields = encode_job(job)
    assert all(isinstance(value, str) for value in fields.values())
    # The Redis-time stamps the scripts add, read back at Redis time 1000 = monotonic 50.
    fields.update(deadline="1300.5", submitted_at="990", started_at="995.25", finished_at="999")
    back = decode_job(fields, redis_now=1000.0, mono_now=50.0)

    assert back.request.prompt == job.request.prompt
    assert back.request.style == "retro"
    assert back.request.sampling == job.request.sampling
    assert back.request.mode is PageMode.COMPOSE
    assert back.request.safety is SafetyPolicy.STRICT
    assert back.request.request_id == job.job_id
    assert back.request.cancelled
    for name in (
        "user_id", "user_name", "guild_id", "channel_id", "private", "state",
        "tokens_so_far", "attempts", "regenerated", "error", "cancel_note", "result",
        "delivery",
    ):  # fmt: skip
        assert getattr(back, name) == getattr(job, name), name
    assert back.delivery is not None and back.delivery.token == TOKEN
    assert back.expires_at == pytest.approx(350.5)
    assert back.created_at == pytest.approx(40.0)
    assert back.started_at == pytest.approx(45.25)
    assert back.finished_at == pytest.approx(49.0)


def test_codec_leaves_out_what_is_none() -> None:
    job = new_job(5)
    fields = encode_job(job)
    for name in ("style", "seed", "guild_id", "channel_id", "error", "result", "delivery_token"):
        assert name not in fields
    back = decode_job(fields)
    assert back.request.style is None and back.request.sampling.seed is None
    assert back.guild_id is None and back.delivery is None and back.result is None
    assert not back.request.cancelled and back.state is JobState.QUEUED


def test_codec_errors_never_show_the_token() -> None:
    fields = encode_job(full_job())
    fields["delivery_interaction_id"] = "not a number " + TOKEN
    with pytest.raises(CodecError) as caught:
        decode_job(fields)
    assert TOKEN not in str(caught.value)
    del fields["prompt"]
    with pytest.raises(CodecError, match="prompt"):
        decode_job(fields)


async def test_the_token_is_never_logged(
    queue: RedisQueue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    job = full_job()
    job.state = JobState.QUEUED
    job.request.cancel_event.clear()
    await queue.submit(job)
    [taken] = await queue.take("w", 1)
    assert taken.delivery == job.delivery
    await queue.finish("w", taken, JobState.DONE)
    [(_, delivered)] = await queue.read_deliveries("bot", 10)
    logging.getLogger("test").info("delivering %r", delivered)
    assert job.job_id in caplog.text
    assert TOKEN not in caplog.text


# -- fairness, limits ------------------------------------------------------------------------


async def test_turns_follow_arrival_not_queue_emptiness(queue: RedisQueue) -> None:
    # The bug: A's first job ran at once, so A's queue emptied and A re-entered the turn
    # order first; A then got a 3rd page before B and C got their 2nd.
    a, b, c = 1, 2, 3
    await queue.submit(new_job(a, "A1"))
    assert [job.prompt for job in await queue.take("w", 1)] == ["A1"]
    prompts: dict[str, str] = {}
    for user, name in ((a, "A"), (b, "B"), (c, "C")):
        for index in (2, 3):
            job = new_job(user, f"{name}{index}")
            prompts[job.job_id] = job.prompt
            await queue.submit(job)
    snapshot = await queue.snapshot()
    taken = [job.prompt for job in await take_one_by_one(queue)]
    assert taken == ["B2", "C2", "A2", "B3", "C3", "A3"]
    # The positions users were shown are that same order.
    shown = sorted(snapshot.positions, key=snapshot.positions.__getitem__)
    assert [prompts[job_id] for job_id in shown] == taken


async def test_a_long_running_job_gives_no_claim_on_past_rounds(queue: RedisQueue) -> None:
    # A's first job runs all along while B and C go through rounds 1 to 3; A's next job
    # joins the round being served, behind C's job that waited in it.
    await queue.submit(new_job(1, "A1"))
    await queue.take("w", 1)
    for name, user in (("B", 2), ("C", 3)):
        for index in (1, 2, 3):
            await queue.submit(new_job(user, f"{name}{index}"))
    assert [job.prompt for job in await queue.take("w", 5)] == ["B1", "C1", "B2", "C2", "B3"]
    await queue.submit(new_job(1, "A2"))
    assert [job.prompt for job in await take_one_by_one(queue)] == ["C3", "A2"]


async def test_positions_match_take_order(queue: RedisQueue) -> None:
    jobs = [new_job(1, "X1"), new_job(1, "X2"), new_job(1, "X3"), new_job(2, "Y1")]
    positions = [await queue.submit(job) for job in jobs]
    # Y arrives last but waits behind one round of X only.
    assert positions == [1, 2, 3, 2]
    snapshot = await queue.snapshot()
    by_position = sorted(jobs, key=lambda job: snapshot.positions[job.job_id])
    taken = await take_one_by_one(queue)
    assert [job.job_id for job in taken] == [job.job_id for job in by_position]
    assert [job.prompt for job in taken] == ["X1", "Y1", "X2", "X3"]


async def test_per_user_limit_counts_queued_and_running(client: aioredis.Redis) -> None:
    queue = make_queue(client, max_per_user=2)
    await queue.submit(new_job(1))
    await queue.submit(new_job(1))
    with pytest.raises(UserLimitReached, match="the limit is 2"):
        await queue.submit(new_job(1))
    [running] = await queue.take("w", 1)
    with pytest.raises(UserLimitReached):
        await queue.submit(new_job(1))
    await queue.submit(new_job(2))  # another user is not limited
    assert await queue.finish("w", running, JobState.DONE)
    await queue.submit(new_job(1))
    assert len(await queue.pending(1)) == 2


async def test_total_bound_counts_queued_jobs(client: aioredis.Redis) -> None:
    queue = make_queue(client, max_total=3, initial_job_seconds=42.0)
    for user in (1, 2, 3):
        await queue.submit(new_job(user))
    with pytest.raises(QueueFull, match=r"queue is full \(3 requests\)") as caught:
        await queue.submit(new_job(4))
    assert caught.value.retry_after_s == pytest.approx(42.0)
    await queue.take("w", 1)  # a running job leaves room in the queue
    assert await queue.submit(new_job(4)) == 3


# -- cancel, requeue -------------------------------------------------------------------------


async def test_cancel_a_queued_job(queue: RedisQueue) -> None:
    keep, drop = new_job(1), new_job(2)
    await queue.submit(keep)
    await queue.submit(drop)
    cancelled = await queue.cancel(drop.job_id)
    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    assert await queue.get(drop.job_id) is None
    assert await queue.cancel(drop.job_id) is None
    assert await queue.cancel("deadbeef") is None
    assert (await queue.snapshot()).positions == {keep.job_id: 1}
    [(_, event)] = await queue.read_deliveries("bot")
    assert (event.job_id, event.state) == (drop.job_id, JobState.CANCELLED)
    assert [job.job_id for job in await take_one_by_one(queue)] == [keep.job_id]


async def test_cancel_a_running_job(queue: RedisQueue) -> None:
    job = new_job(1)
    await queue.submit(job)
    [running] = await queue.take("w", 1)
    assert await queue.progress("w", running, 3) == "ok"
    flagged = await queue.cancel(job.job_id)
    assert flagged is not None and flagged.state is JobState.RUNNING
    assert flagged.request.cancelled
    assert await queue.progress("w", running, 4) == "cancel"
    running.cancel_note = "stopped"
    assert await queue.finish("w", running, JobState.CANCELLED)
    assert await queue.pending() == []
    [(_, event)] = await queue.read_deliveries("bot")
    assert event.state is JobState.CANCELLED and event.cancel_note == "stopped"


async def test_requeue_front_keeps_the_place(queue: RedisQueue) -> None:
    first, second = new_job(1, "first"), new_job(2, "second")
    await queue.submit(first)
    await queue.submit(second)
    taken = await queue.take("w", 2)
    later = new_job(3, "later")
    await queue.submit(later)
    await queue.cancel(second.job_id)  # running: flagged, so it ends instead of requeueing
    assert await queue.requeue_front("other-worker", taken) == 0
    assert await queue.requeue_front("w", taken) == 1
    assert [job.prompt for job in await take_one_by_one(queue)] == ["first", "later"]


# -- workers: concurrency, leases, poison, expiry --------------------------------------------


async def test_two_workers_taking_at_once_never_share_a_job(queue: RedisQueue) -> None:
    jobs = [new_job(user) for user in range(20) for _ in range(2)]
    for job in jobs:
        await queue.submit(job)
    submitted = {job.job_id for job in jobs}
    loop = asyncio.get_running_loop()
    sources = [RedisJobSource(queue, loop, f"w{n}", lease_s=30.0, poll_s=0.01) for n in (1, 2)]
    barrier = threading.Barrier(2)

    def work(source: RedisJobSource) -> list[str]:
        barrier.wait()
        seen: list[str] = []
        while batch := source.take(3, wait_s=0.1):
            for job in batch:
                seen.append(job.job_id)
                job.result = result_for(job)
                assert source.finish(job, JobState.DONE)
        return seen

    first, second = await asyncio.gather(*(asyncio.to_thread(work, s) for s in sources))
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(submitted)
    assert await queue.pending() == []


async def test_a_busy_worker_leaves_an_idle_one_its_share(queue: RedisQueue) -> None:
    # A busy worker asks at every decode step, an idle one every poll: without a share,
    # the busy one took every new job while the other GPU sat idle.
    for user in range(2):
        await queue.submit(new_job(user))
    assert len(await queue.take("busy", 8)) == 2  # alone: it takes what it can
    assert await queue.take("idle", 8) == []  # nothing queued, but now it is seen live
    for user in range(2, 6):
        await queue.submit(new_job(user))
    # 4 queued + 2 running over 2 live workers: 3 each; "busy" runs 2 already.
    assert len(await queue.take("busy", 8)) == 1
    assert len(await queue.take("idle", 8)) == 3


async def test_a_silent_worker_loses_its_job_to_another(queue: RedisQueue) -> None:
    job = new_job(1)
    await queue.submit(job)
    [mine] = await queue.take("w1", 1, lease_s=0.3)
    assert await queue.take("w2", 1) == []  # the lease holds
    await asyncio.sleep(0.5)  # w1 reports nothing past its lease
    [theirs] = await queue.take("w2", 1, lease_s=30.0)
    assert theirs.job_id == job.job_id and theirs.attempts == 2
    assert await queue.progress("w1", mine, 10) == "lost"
    mine.result = result_for(mine)
    assert not await queue.finish("w1", mine, JobState.DONE)
    theirs.result = result_for(theirs)
    assert await queue.finish("w2", theirs, JobState.DONE)
    assert await queue.finish("w2", theirs, JobState.DONE)  # a retried finish
    events = await queue.read_deliveries("bot")
    assert [(e.job_id, e.state) for _, e in events] == [(job.job_id, JobState.DONE)]


async def test_progress_keeps_the_lease(queue: RedisQueue) -> None:
    await queue.submit(new_job(1))
    [job] = await queue.take("w1", 1, lease_s=0.4)
    for _ in range(4):
        await asyncio.sleep(0.2)
        assert await queue.progress("w1", job, 5, lease_s=0.4) == "ok"
    assert await queue.take("w2", 1) == []
    assert (await queue.snapshot()).running_tokens == {job.job_id: 5}


async def test_a_poison_job_fails_after_max_attempts(client: aioredis.Redis) -> None:
    queue = make_queue(client, max_attempts=2)
    job = new_job(1)
    await queue.submit(job)
    for worker in ("w1", "w2"):
        [taken] = await queue.take(worker, 1, lease_s=0.2)
        assert taken.job_id == job.job_id
        await asyncio.sleep(0.3)  # the worker died on it
    assert await queue.take("w3", 1) == []
    [(_, event)] = await queue.read_deliveries("bot")
    assert event.job_id == job.job_id and event.state is JobState.FAILED
    assert event.error is not None and "2 workers" in event.error
    assert await queue.pending() == []


async def test_jobs_that_would_expire_are_dropped_with_an_event(client: aioredis.Redis) -> None:
    queue = make_queue(client, initial_job_seconds=5.0, delivery_margin_s=1.0)
    doomed, fine = new_job(1, ttl_s=3.0), new_job(2, ttl_s=900.0)
    await queue.submit(doomed)
    await queue.submit(fine)
    assert [job.job_id for job in await queue.take("w", 2)] == [fine.job_id]
    [(_, event)] = await queue.read_deliveries("bot")
    assert (event.job_id, event.state) == (doomed.job_id, JobState.EXPIRED)
    # The measured speed counts, once there is one: a seed first, then the EWMA.
    await queue.seed_job_seconds(2000.0)
    await queue.submit(late := new_job(3, ttl_s=900.0))
    assert await queue.take("w", 1) == []
    assert await queue.get(late.job_id) is None


async def test_take_rebuilds_expiry_from_the_redis_deadline(queue: RedisQueue) -> None:
    job = new_job(1, ttl_s=600.0)
    await queue.submit(job)
    [taken] = await queue.take("w", 1)
    # The same deadline, as this process's monotonic clock (to within the round trips).
    assert taken.expires_at == pytest.approx(job.expires_at, abs=1.0)


async def test_snapshot_measures_speed_and_workers(queue: RedisQueue) -> None:
    assert (await queue.snapshot()).job_seconds == 1.0  # the initial guess
    await queue.seed_job_seconds(7.5)
    assert (await queue.snapshot()).job_seconds == 7.5
    for user in (1, 2):
        await queue.submit(new_job(user))
    first, second = await queue.take("w1", 2, max_batch=8)
    await queue.take("w2", 1, max_batch=4)
    first.result = result_for(first, total_s=4.0)
    await queue.finish("w1", first, JobState.DONE)
    second.result = result_for(second, total_s=2.0)
    await queue.finish("w1", second, JobState.DONE)
    snapshot = await queue.snapshot()
    assert snapshot.job_seconds == pytest.approx(4.0 + 0.3 * (2.0 - 4.0))
    assert snapshot.max_batch == 12


# -- deliveries ------------------------------------------------------------------------------


async def finished_jobs(queue: RedisQueue, count: int) -> list[str]:
    jobs = [new_job(user) for user in range(count)]
    for job in jobs:
        await queue.submit(job)
    for job in await queue.take("w", count):
        job.result = result_for(job)
        assert await queue.finish("w", job, JobState.DONE)
    return [job.job_id for job in jobs]


async def test_each_event_goes_to_one_bot(queue: RedisQueue) -> None:
    ids = await finished_jobs(queue, 6)
    got: dict[str, list[str]] = {"b1": [], "b2": []}
    while True:
        rounds = [(name, await queue.read_deliveries(name, count=2)) for name in got]
        if not any(entries for _, entries in rounds):
            break
        for name, entries in rounds:
            for entry_id, job in entries:
                got[name].append(job.job_id)
                await queue.mark_delivered(job.job_id, entry_id)
    assert got["b1"] and got["b2"]
    assert not set(got["b1"]) & set(got["b2"])
    assert sorted(got["b1"] + got["b2"]) == sorted(ids)


async def test_a_dead_bots_deliveries_are_reclaimed(
    client: aioredis.Redis, queue: RedisQueue
) -> None:
    ids = await finished_jobs(queue, 3)
    given = await queue.read_deliveries("dead", count=2)
    assert len(given) == 2
    # Restarted under the same name, it is given its own unacknowledged entries first,
    # each once, then the new one.
    again = make_queue(client, prefix=queue.prefix)
    history = [await again.read_deliveries("dead", count=1) for _ in range(2)]
    assert [e for [(e, _)] in history] == [e for e, _ in given]
    [(newer, third)] = await again.read_deliveries("dead", count=5)
    assert newer not in [e for e, _ in given]
    await again.mark_delivered(third.job_id, newer)
    assert await queue.reclaim_deliveries("alive", min_idle_ms=60_000) == []
    await asyncio.sleep(0.1)
    reclaimed = await queue.reclaim_deliveries("alive", min_idle_ms=50)
    assert sorted(job.job_id for _, job in reclaimed) == sorted(job.job_id for _, job in given)
    for entry_id, job in reclaimed:
        await queue.mark_delivered(job.job_id, entry_id)
    assert await queue.read_deliveries("alive") == []
    assert sorted([third.job_id, *(job.job_id for _, job in reclaimed)]) == sorted(ids)
    assert (await client.xpending(queue.key("events"), "bots"))["pending"] == 0


async def test_delivery_is_claimed_and_recorded_once(
    client: aioredis.Redis, queue: RedisQueue
) -> None:
    [job_id] = await finished_jobs(queue, 1)
    [(entry_id, _)] = await queue.read_deliveries("b1")
    assert await queue.claim_delivery(job_id, "b1")
    with pytest.raises(DeliveryInProgress):
        await queue.claim_delivery(job_id, "b2")  # b1 is sending it now: leave it pending
    assert await queue.claim_delivery(job_id, "b1")
    assert not await queue.delivered(job_id)
    await queue.mark_delivered(job_id, entry_id)
    assert await queue.delivered(job_id)
    assert not await queue.claim_delivery(job_id, "b1")
    assert not await queue.claim_delivery(job_id, "b2")
    pending = await client.xpending(queue.key("events"), "bots")
    assert pending["pending"] == 0


# -- Redis going away ------------------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def test_redis_down_then_back_with_the_same_client(own_server: RedisServer) -> None:
    client = connect(own_server.url)
    try:
        queue = make_queue(client)
        kept = new_job(1)
        await queue.submit(kept)
        own_server.stop(save=True)
        async with asyncio.timeout(2.0):
            with pytest.raises(QueueUnavailable, match="try again in a minute"):
                await queue.submit(new_job(2))
        async with asyncio.timeout(2.0):
            with pytest.raises(QueueUnavailable):
                await queue.snapshot()
        own_server.start()  # its data back, its script cache empty
        assert (await queue.snapshot()).positions == {kept.job_id: 1}
        assert await queue.submit(new_job(2)) == 2
        assert len(await queue.take("w", 2)) == 2
    finally:
        await client.aclose()


async def test_a_hung_redis_reads_as_unavailable(own_server: RedisServer) -> None:
    client = connect(own_server.url)
    try:
        queue = make_queue(client)
        await queue.submit(new_job(1))
        own_server.pause()
        try:
            async with asyncio.timeout(2.0):
                with pytest.raises(QueueUnavailable):
                    await queue.pending()
        finally:
            own_server.resume()
        assert len(await queue.pending()) == 1
    finally:
        await client.aclose()


async def test_a_worker_rides_out_a_redis_restart(own_server: RedisServer) -> None:
    client = connect(own_server.url)
    try:
        queue = make_queue(client)
        loop = asyncio.get_running_loop()
        source = RedisJobSource(queue, loop, "w1", lease_s=30.0, poll_s=0.02)
        await queue.submit(new_job(1))
        [job] = await asyncio.to_thread(source.take, 1, 1.0)
        own_server.stop(save=True)
        assert await asyncio.to_thread(source.take, 1, 0.3) == []  # no crash while down
        assert await asyncio.to_thread(source.progress, job, 5)
        job.result = result_for(job)
        finishing = asyncio.create_task(asyncio.to_thread(source.finish, job, JobState.DONE))
        await asyncio.sleep(1.0)
        assert not finishing.done()  # still retrying
        own_server.start()
        async with asyncio.timeout(10):
            assert await finishing
        [(_, event)] = await queue.read_deliveries("bot")
        assert event.job_id == job.job_id and event.result == job.result
    finally:
        await client.aclose()


async def test_redis_restarted_without_its_data_recreates_the_group(
    own_server: RedisServer,
) -> None:
    client = connect(own_server.url)
    try:
        queue = make_queue(client)
        await finished_jobs(queue, 1)
        assert len(await queue.read_deliveries("bot")) == 1
        own_server.restart(keep_data=False)
        assert await queue.read_deliveries("bot") == []
        await finished_jobs(queue, 1)
        assert len(await queue.read_deliveries("bot")) == 1
    finally:
        await client.aclose()


# -- the worker thread's source ----------------------------------------------------------------


async def test_source_reports_cancel_and_loss(queue: RedisQueue) -> None:
    loop = asyncio.get_running_loop()
    source = RedisJobSource(queue, loop, "w1", lease_s=0.3, progress_interval_s=0.0)
    await queue.submit(new_job(1))
    await queue.submit(new_job(2))
    first, second = await asyncio.to_thread(source.take, 2, 1.0)
    await queue.cancel(first.job_id)

    def reports_until(job: Job, done: Callable[[], bool]) -> bool:
        limit = time.monotonic() + 5
        while not done() and time.monotonic() < limit:
            if not source.progress(job, 1):
                return False
            time.sleep(0.02)
        return True

    # Cancel: the request's flag is set and the job is still ours.
    assert await asyncio.to_thread(reports_until, first, lambda: first.request.cancelled)
    assert first.request.cancelled
    assert await asyncio.to_thread(source.finish, first, JobState.CANCELLED)
    # Loss: another worker took it over after the lease ran out.
    await asyncio.sleep(0.5)
    [taken_over] = await queue.take("w2", 1)
    assert taken_over.job_id == second.job_id
    assert not await asyncio.to_thread(reports_until, second, lambda: False)
    assert second.request.cancelled
    assert not await asyncio.to_thread(source.finish, second, JobState.DONE)


async def test_source_take_waits_for_a_job_and_wakes(queue: RedisQueue) -> None:
    loop = asyncio.get_running_loop()
    source = RedisJobSource(queue, loop, "w1", lease_s=30.0, poll_s=0.05)
    waiting = asyncio.create_task(asyncio.to_thread(source.take, 4, 30.0))
    await asyncio.sleep(0.2)
    job = new_job(1)
    await queue.submit(job)
    async with asyncio.timeout(5):
        assert [taken.job_id for taken in await waiting] == [job.job_id]
    waiting = asyncio.create_task(asyncio.to_thread(source.take, 4, 30.0))
    await asyncio.sleep(0.1)
    source.wake()
    async with asyncio.timeout(5):
        assert await waiting == []


async def test_a_busy_engine_asks_redis_at_most_every_busy_poll(queue: RedisQueue) -> None:
    # The engine asks at every decode step; an empty answer holds further asks back a bit.
    loop = asyncio.get_running_loop()
    source = RedisJobSource(queue, loop, "w1", lease_s=30.0, busy_poll_s=0.3)
    assert await asyncio.to_thread(source.take, 4) == []
    job = new_job(1)
    await queue.submit(job)
    assert await asyncio.to_thread(source.take, 4) == []  # within busy_poll_s: not asked
    await asyncio.sleep(0.35)
    [taken] = await asyncio.to_thread(source.take, 4)
    assert taken.job_id == job.job_id
    # A waiting take (an idle worker) is never held back.
    later = new_job(2)
    await queue.submit(later)
    [waited] = await asyncio.to_thread(source.take, 4, 1.0)
    assert waited.job_id == later.job_id
