"""Prompt validation, error-to-message mapping, status pacing, metrics."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from discord import app_commands

from bot.commands import user_message_for, validate_prompt
from bot.errors import InvalidPrompt, QueueFull, UserLimitReached
from bot.jobs import Job, JobState
from bot.metrics import Metrics
from bot.scheduler import Scheduler, Throughput
from bot.status import StatusBoard, Ticket


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "empty"),
        (" \n\t ", "empty"),
        ("x" * 101, "101 characters long; the limit is 100"),
        ("a\x00b", "U+0000"),
        ("ring the \x07 bell", "U+0007"),
        ("escape \x1b[31m red", "U+001B"),
        ("sneaky \u202e txt", "U+202E"),
    ],
)
def test_bad_prompts_are_refused_with_a_reason(prompt: str, message: str) -> None:
    with pytest.raises(InvalidPrompt, match=message.replace("[", r"\[").replace("+", r"\+")):
        validate_prompt(prompt, max_chars=100)


@pytest.mark.parametrize(
    "prompt",
    ["a landing page for a bakery", "  padded  ", "line one\nline two", "café 🍰 page", "x" * 100],
)
def test_good_prompts_pass_stripped(prompt: str) -> None:
    assert validate_prompt(prompt, max_chars=100) == prompt.strip()


def test_user_messages_come_from_one_place() -> None:
    assert user_message_for(UserLimitReached("You already have 3")) == "⚠️ You already have 3"
    full = QueueFull("The queue is full.", retry_after_s=30)
    wrapped = app_commands.CommandInvokeError.__new__(app_commands.CommandInvokeError)
    wrapped.original = full
    assert user_message_for(wrapped) == "⚠️ The queue is full."
    internal = user_message_for(KeyError("secret internals"))
    assert "secret" not in internal and "went wrong" in internal


def _tracked_job(board: StatusBoard, sched: Scheduler, user: int) -> Job:
    job = Job.create(user_id=user, prompt=f"p{user}", ttl_s=900)
    job.context = Ticket(interaction=None)
    job.context.deferred.set()
    sched.submit(job)
    board.track(job)
    return job


async def test_status_edits_are_paced_and_never_overwrite_the_final_text() -> None:
    sched = Scheduler(max_total=100, max_per_user=5, max_batch=2, throughput=Throughput(10.0))
    sent: list[tuple[str, str]] = []

    async def edit(job: Job, text: str) -> None:
        sent.append((job.job_id, text))

    now = [100.0]
    board = StatusBoard(sched, interval_s=0.3, edits_per_second=5, edit=edit, clock=lambda: now[0])
    jobs = [_tracked_job(board, sched, user) for user in range(12)]
    assert board.update_once() == 5  # the budget: 5 edits a second
    await _settle(board)
    assert len(sent) == 5
    assert "position 1 of 12" in sent[0][1]
    assert board.update_once() == 0  # nothing left in the bucket, and too soon anyway

    now[0] += 0.35
    jobs[0].context.final = True  # e.g. cancelled: its message must not change again
    sched.take(1)
    count = board.update_once()
    await _settle(board)
    assert count == 1  # 0.35 s refills 1.75 edits' worth
    assert all(job_id != jobs[0].job_id for job_id, _ in sent[5:])

    # Once every message shows its current text, nothing more is sent.
    board.edits_per_second = 100
    for _ in range(3):
        now[0] += 0.35
        board.update_once()
        await _settle(board)
    now[0] += 0.35
    assert board.update_once() == 0
    for job in jobs:
        job.state = JobState.DONE
    board.update_once()
    assert board._jobs == {}


async def _settle(board: StatusBoard) -> None:
    await asyncio.gather(*board._tasks)


def test_metrics_served_on_a_local_port() -> None:
    metrics = Metrics()
    metrics.bind(lambda: 3, lambda: 1, lambda: 42.5)
    metrics.job_done(2.0, 100)
    metrics.job_failed()
    metrics.serve(0)
    try:
        assert metrics.port is not None
        url = f"http://127.0.0.1:{metrics.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        metrics.stop()
    assert "htmlbot_queue_depth 3.0" in text
    assert "htmlbot_tokens_per_second 42.5" in text
    assert 'htmlbot_jobs_total{outcome="done"} 1.0' in text
    assert 'htmlbot_jobs_total{outcome="failed"} 1.0' in text
    assert "htmlbot_job_latency_seconds_count 1.0" in text
