"""The local backend: both queue protocols over the scheduler, journaled, and a restart."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.errors import UserLimitReached
from bot.jobs import DeliveryInfo, Job, JobState
from bot.queue import JobQueue, JobSource
from bot.queue.journal import JobJournal
from bot.queue.local import LocalQueue
from bot.scheduler import Scheduler, Throughput
from model.types import FinishReason, GenerationResult, SamplingParams


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scheduler(
    *, max_per_user: int = 10, job_s: float = 60.0, clock: Clock | None = None
) -> Scheduler:
    return Scheduler(
        max_total=100,
        max_per_user=max_per_user,
        max_batch=2,
        throughput=Throughput(initial_job_seconds=job_s),
        delivery_margin_s=5.0,
        clock=time.monotonic if clock is None else clock,
    )


def make_queue(path: Path | None, **kwargs: object) -> LocalQueue:
    journal = None if path is None else JobJournal(path)
    return LocalQueue(scheduler(**kwargs), journal)  # type: ignore[arg-type]


def job(user: int, prompt: str, ttl: float = 900.0, max_new_tokens: int = 600) -> Job:
    return Job.create(
        user_id=user,
        prompt=prompt,
        ttl_s=ttl,
        sampling=SamplingParams(max_new_tokens=max_new_tokens),
        delivery=DeliveryInfo(application_id=1, token=f"token-{prompt}", interaction_id=user),
    )


def result_for(item: Job, total_s: float = 3.0) -> GenerationResult:
    return GenerationResult(
        request_id=item.job_id,
        text=f"<html>{item.prompt}</html>",
        finish_reason=FinishReason.HTML_COMPLETE,
        prompt_tokens=10,
        generated_tokens=100,
        time_to_first_token_s=0.1,
        total_s=total_s,
    )


def test_it_is_both_sides_of_the_queue() -> None:
    queue = make_queue(None)
    bot_side: JobQueue = queue
    worker_side: JobSource = queue
    assert bot_side is worker_side


async def test_submit_take_progress_finish_and_snapshot(tmp_path: Path) -> None:
    queue = make_queue(tmp_path / "j.db")
    a1, a2, b1 = job(1, "a1"), job(1, "a2"), job(2, "b1")
    assert [await queue.submit(item) for item in (a1, a2, b1)] == [1, 2, 2]
    assert [j.prompt for j in await queue.pending()] == ["a1", "b1", "a2"]
    assert queue.take(1) == [a1]
    assert queue.progress(a1, 40)
    snap = await queue.snapshot()
    assert snap.positions == {b1.job_id: 1, a2.job_id: 2}
    assert snap.running_tokens == {a1.job_id: 40}
    assert (snap.queued, snap.running, snap.max_batch) == (2, 1, 2)
    assert snap.job_seconds == queue.throughput.job_seconds
    a1.result = result_for(a1, total_s=7.0)
    assert queue.finish(a1, JobState.DONE)
    assert a1.state is JobState.DONE and await queue.get(a1.job_id) is None
    assert [j.prompt for j in await queue.pending(1)] == ["a2"]


async def test_a_refused_job_leaves_nothing_in_the_journal(tmp_path: Path) -> None:
    queue = make_queue(tmp_path / "j.db", max_per_user=1)
    await queue.submit(job(1, "a1"))
    with pytest.raises(UserLimitReached):
        await queue.submit(job(1, "a2"))
    assert [j.prompt for j in JobJournal(tmp_path / "j.db").load_unfinished()] == ["a1"]


async def test_a_duplicate_id_keeps_the_pending_jobs_row(tmp_path: Path) -> None:
    queue = make_queue(tmp_path / "j.db")
    item = job(1, "a1")
    await queue.submit(item)
    with pytest.raises(ValueError, match="duplicate"):
        await queue.submit(item)
    assert len(JobJournal(tmp_path / "j.db").load_unfinished()) == 1


async def test_cancel_a_queued_or_a_running_job(tmp_path: Path) -> None:
    queue = make_queue(tmp_path / "j.db")
    running, queued = job(1, "r"), job(2, "q")
    await queue.submit(running)
    await queue.submit(queued)
    queue.take(1)
    assert await queue.cancel(queued.job_id) is queued
    assert queued.state is JobState.CANCELLED
    assert await queue.cancel(running.job_id) is running
    assert running.state is JobState.RUNNING and not queue.progress(running, 5)  # stop it
    assert await queue.cancel("nope") is None
    states = {j.prompt: j.state for j in JobJournal(tmp_path / "j.db").load_unfinished()}
    assert states == {"r": JobState.RUNNING, "q": JobState.CANCELLED}


async def test_jobs_dropped_inside_take_are_journaled(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path / "j.db", clock=clock, job_s=10.0)
    doomed, flagged, fine = job(1, "doomed", ttl=20.0), job(2, "flagged"), job(3, "fine")
    doomed.expires_at = clock.now + 12.0  # a job takes 10 s, plus a 5 s delivery margin
    for item in (doomed, flagged, fine):
        await queue.submit(item)
    flagged.request.cancel()  # cancelled without the queue knowing
    assert queue.take(5) == [fine]
    states = {j.prompt: j.state for j in JobJournal(tmp_path / "j.db").load_unfinished()}
    assert states == {
        "fine": JobState.RUNNING,
        "doomed": JobState.EXPIRED,
        "flagged": JobState.CANCELLED,
    }


async def test_a_killed_process_resumes_its_jobs_in_order(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    first = make_queue(path)
    jobs = {
        name: job(user, name)
        for user, name in [
            (1, "a1"),
            (1, "a2"),
            (1, "a3"),
            (2, "b1"),
            (2, "b2"),
            (3, "c1"),
            (4, "d1"),
        ]
    }
    for item in jobs.values():
        await first.submit(item)
    running = first.take(3)  # a1, b1, c1
    assert [j.prompt for j in running] == ["a1", "b1", "c1"]
    done = jobs["b1"]
    done.result = result_for(done)
    first.finish(done, JobState.DONE)  # finished, but the bot dies before delivering it
    await first.cancel(jobs["d1"].job_id)  # cancelled: its user must still be told
    await first.cancel(jobs["c1"].job_id)  # running: only flagged when the process dies
    old_order = [j.job_id for j in await first.pending()]
    assert [jobs_name(jobs, i) for i in old_order] == ["a1", "c1", "a2", "b2", "a3"]
    old_order.remove(jobs["c1"].job_id)
    zombie = first  # killed: nothing finished, closed or flushed (its connection stays open)

    second = make_queue(path)
    assert second.journal is not None
    loaded = second.journal.load_unfinished()
    to_deliver = second.restore(loaded)
    assert [j.job_id for j in await second.pending()] == old_order
    restored = {j.prompt: j for j in await second.pending()}
    assert all(j.state is JobState.QUEUED and j.tokens_so_far == 0 for j in restored.values())
    assert restored["a1"].attempts == 1  # it was running once already
    assert restored["a2"].delivery == jobs["a2"].delivery  # the token to answer with
    assert [(j.prompt, j.state) for j in to_deliver] == [
        ("c1", JobState.CANCELLED),
        ("b1", JobState.DONE),
        ("d1", JobState.CANCELLED),
    ]
    assert to_deliver[1].result == done.result
    # The restored jobs run in the old order; a newcomer still joins the current round.
    assert [j.prompt for j in second.take(1)] == ["a1"]
    await second.submit(job(9, "z1"))
    assert [j.prompt for j in second.take(10)] == ["z1", "a2", "b2", "a3"]

    for item in to_deliver:
        await second.record_delivered(item.job_id)
    assert zombie.journal is not None and second is not None
    third = JobJournal(path).load_unfinished()  # killed again: delivered ones stay delivered
    assert sorted(j.prompt for j in third) == ["a1", "a2", "a3", "b2", "z1"]
    assert all(j.state is JobState.RUNNING for j in third)


def jobs_name(jobs: dict[str, Job], job_id: str) -> str:
    return next(name for name, item in jobs.items() if item.job_id == job_id)


async def test_a_job_running_at_every_restart_is_given_up(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    item = job(1, "poison")
    queue = make_queue(path)
    await queue.submit(item)
    for _ in range(3):  # taken, then the process dies: three times
        queue = make_queue(path)
        assert queue.journal is not None
        assert queue.restore(queue.journal.load_unfinished()) == []
        assert [j.prompt for j in queue.take(1)] == ["poison"]
    queue = make_queue(path)
    assert queue.journal is not None
    [failed] = queue.restore(queue.journal.load_unfinished())
    assert failed.state is JobState.FAILED and failed.error and "restarted" in failed.error
    assert await queue.pending() == []


async def test_requeued_jobs_keep_their_place_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    queue = make_queue(path)
    for user, name in [(1, "a1"), (2, "b1"), (1, "a2")]:
        await queue.submit(job(user, name))
    taken = queue.take(2)
    queue.requeue_front(taken)  # out of memory
    assert [j.prompt for j in await queue.pending()] == ["a1", "b1", "a2"]
    restarted = make_queue(path)
    assert restarted.journal is not None
    rows = restarted.journal.load_unfinished()
    assert [(j.prompt, j.state) for j in rows] == [
        ("a1", JobState.QUEUED),
        ("b1", JobState.QUEUED),
        ("a2", JobState.QUEUED),
    ]


async def test_close_cancels_the_queued_jobs_or_keeps_them_for_the_next_start(
    tmp_path: Path,
) -> None:
    for resume_later, expected in ((False, JobState.CANCELLED), (True, JobState.QUEUED)):
        path = tmp_path / f"{resume_later}.db"
        queue = make_queue(path)
        item = job(1, "a1")
        await queue.submit(item)
        assert queue.close(resume_later=resume_later) == [item]
        assert item.state is JobState.CANCELLED  # in this process, it won't run
        [row] = JobJournal(path).load_unfinished()
        assert row.state is expected


def test_a_warm_up_seeds_the_eta() -> None:
    queue = make_queue(None)
    queue.seed_job_seconds(8.0)
    assert queue.throughput.job_seconds == 8.0
    queue.seed_rate(100.0, 500)  # a running job's first tokens/s
    assert queue.throughput.job_seconds == 5.0
    queue.throughput.record_job(9.0)
    queue.seed_rate(1.0, 500)  # measured now: seeds no longer apply
    assert queue.throughput.job_seconds == 9.0


KILLED_CHILD = """
import asyncio, os, signal, sys
from bot.jobs import Job, JobState
from bot.queue.journal import JobJournal
from bot.queue.local import LocalQueue
from bot.scheduler import Scheduler, Throughput

async def main():
    queue = LocalQueue(
        Scheduler(max_total=10, max_per_user=5, max_batch=2, throughput=Throughput(60.0)),
        JobJournal(sys.argv[1]),
    )
    for user, prompt in [(1, "a1"), (1, "a2"), (2, "b1"), (3, "c1")]:
        await queue.submit(Job.create(user_id=user, prompt=prompt, ttl_s=900.0))
    queue.take(2)
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_a_sigkilled_process_is_resumed(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    child = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL and "ready" in child.stdout, child.stderr
    queue = make_queue(path)
    assert queue.journal is not None
    assert queue.restore(queue.journal.load_unfinished()) == []
    assert [(j.prompt, j.attempts) for j in queue.scheduler.pending()] == [
        ("a1", 1),
        ("b1", 1),
        ("c1", 0),
        ("a2", 0),
    ]
