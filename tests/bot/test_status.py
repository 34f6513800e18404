"""The status board's loop stops when asked, whatever it was doing at that moment."""

from __future__ import annotations

import asyncio
import contextlib

import discord
import pytest

from bot.jobs import Job
from bot.queue.local import LocalQueue
from bot.scheduler import Scheduler, Throughput
from bot.status import StatusBoard, Ticket

pytestmark = pytest.mark.timeout(30)


def _board() -> StatusBoard:
    sched = Scheduler(max_total=10, max_per_user=5, max_batch=2, throughput=Throughput(10.0))
    return StatusBoard(LocalQueue(sched), interval_s=5.0)


async def _ended(task: asyncio.Task[None], limit_s: float = 1.0) -> bool:
    done, _ = await asyncio.wait([task], timeout=limit_s)
    if not done:  # clean up a loop that survived, so the test fails instead of hanging
        task.cancel()
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(limit_s):
                await task
    return bool(done)


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
async def test_cancel_stops_the_loop_even_when_poked_at_the_same_moment(steps: int) -> None:
    # On Python 3.11, asyncio.wait_for returned the event's result instead of raising when
    # the cancel came while the event had just been set (CPython gh-86296): run() looped
    # on and HtmlBot.close() waited for it forever.
    board = _board()
    task = asyncio.create_task(board.run())
    for _ in range(3):
        await asyncio.sleep(0)  # run() now waits for its wake event
    board.poke()
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    assert await _ended(task)
    assert task.cancelled()


async def test_stop_ends_the_loop_without_a_cancel() -> None:
    board = _board()
    task = asyncio.create_task(board.run())
    await asyncio.sleep(0.05)
    board.stop()
    assert await _ended(task)
    assert not task.cancelled() and task.exception() is None
    assert await board.update_once() == 0  # no new edits once stopped


class _Response:
    """What discord.HTTPException reads from an aiohttp response."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.reason = "refused"


@pytest.mark.parametrize("status", [401, 404])
async def test_a_refused_token_gets_no_more_status_edits(status: int) -> None:
    sched = Scheduler(max_total=10, max_per_user=5, max_batch=2, throughput=Throughput(10.0))
    tried: list[str] = []

    async def edit(job: Job, text: str) -> None:
        tried.append(text)
        raise discord.HTTPException(_Response(status), {"message": "Invalid Webhook Token"})

    now = [100.0]
    board = StatusBoard(LocalQueue(sched), interval_s=0.2, edit=edit, clock=lambda: now[0])
    job = Job.create(user_id=1, prompt="p", ttl_s=900)
    job.context = Ticket(interaction=None)
    job.context.mark_deferred()
    sched.submit(job)
    board.track(job)
    for _ in range(5):  # the text never shows, so without the fix each pass retries it
        await board.update_once()
        await asyncio.gather(*board._tasks)
        now[0] += 1.0
    assert len(tried) == 1
    assert job.context.dead and not job.context.final
