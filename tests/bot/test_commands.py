"""Prompt validation, error-to-message mapping, status pacing, metrics."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import discord
import pytest
from discord import app_commands

from bot.client import HtmlBot
from bot.commands import token_age_s, user_message_for, validate_prompt
from bot.errors import InvalidPrompt, QueueFull, UserLimitReached
from bot.jobs import Job, JobState
from bot.metrics import Metrics
from bot.queue.local import LocalQueue
from bot.scheduler import Scheduler, Throughput
from bot.settings import Settings
from bot.status import StatusBoard, Ticket
from tests.bot.fakes import FakeEngine


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
    job.context.mark_deferred()
    sched.submit(job)
    board.track(job)
    return job


async def test_status_edits_are_paced_and_never_overwrite_the_final_text() -> None:
    sched = Scheduler(max_total=100, max_per_user=5, max_batch=2, throughput=Throughput(10.0))
    sent: list[tuple[str, str]] = []

    async def edit(job: Job, text: str) -> None:
        sent.append((job.job_id, text))

    now = [100.0]
    board = StatusBoard(
        LocalQueue(sched), interval_s=0.3, edits_per_second=5, edit=edit, clock=lambda: now[0]
    )
    jobs = [_tracked_job(board, sched, user) for user in range(12)]
    assert await board.update_once() == 5  # the budget: 5 edits a second
    await _settle(board)
    assert len(sent) == 5
    assert "position 1 of 12" in sent[0][1]
    assert await board.update_once() == 0  # nothing left in the bucket, and too soon anyway

    now[0] += 0.35
    jobs[0].context.final = True  # e.g. cancelled: its message must not change again
    sched.take(1)
    count = await board.update_once()
    await _settle(board)
    assert count == 1  # 0.35 s refills 1.75 edits' worth
    assert all(job_id != jobs[0].job_id for job_id, _ in sent[5:])

    # Once every message shows its current text, nothing more is sent.
    board.edits_per_second = 100
    for _ in range(3):
        now[0] += 0.35
        await board.update_once()
        await _settle(board)
    now[0] += 0.35
    assert await board.update_once() == 0
    for job in jobs:
        job.state = JobState.DONE
    await board.update_once()
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


class _Response:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def is_done(self) -> bool:
        return False

    async def defer(self, **kwargs: object) -> None:
        self.calls += 1
        raise self.error

    async def send_message(self, *args: object, **kwargs: object) -> None:
        self.calls += 1
        raise self.error


class _Interaction:
    """Just what /html and the tree's error handler read, with every call failing."""

    type = discord.InteractionType.application_command
    guild_id = 1
    channel_id = 2
    id = 11
    application_id = 12
    token = "interaction-token"

    def __init__(self, client: HtmlBot, error: Exception) -> None:
        self.client = client
        self.created_at = datetime.now(UTC)
        self.user = SimpleNamespace(id=3, mention="<@3>")
        self.response = _Response(error)
        self.command = client.tree.get_command("html")


@pytest.fixture
async def idle_bot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[HtmlBot]:
    """An HtmlBot that never connects (HtmlBot sets these class attributes); its server
    settings database is closed after the test."""
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    settings = Settings(
        discord_token="x",  # type: ignore[arg-type]
        discord_api_base="http://127.0.0.1:9/api/v10",
        results_dir=tmp_path,
        preview="off",
        _env_file=None,  # type: ignore[call-arg]
    )
    bot = HtmlBot(settings, FakeEngine())
    yield bot
    await bot.guild_gate.aclose()


def _closed_errors() -> list[Exception]:
    # What discord.py raises once its HTTP session is closed, or while it closes.
    return [RuntimeError("Session is closed"), aiohttp.ServerDisconnectedError()]


@pytest.mark.parametrize("error", _closed_errors())
async def test_a_defer_cut_off_by_the_shutdown_is_expected(
    idle_bot: HtmlBot,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    monkeypatch.setattr(HtmlBot, "shutting_down", True)
    interaction = _Interaction(idle_bot, error)
    await idle_bot.commands.handle_html(interaction, "a bakery", None, False)  # type: ignore[arg-type]
    assert await idle_bot.queue.pending() == []  # nobody could get the page: not run
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("error", _closed_errors())
async def test_errors_from_a_closed_session_are_logged_without_a_traceback(
    idle_bot: HtmlBot,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    monkeypatch.setattr(HtmlBot, "shutting_down", True)
    interaction = _Interaction(idle_bot, error)
    wrapped = app_commands.CommandInvokeError(interaction.command, error)  # type: ignore[arg-type]
    await idle_bot.tree.on_error(interaction, wrapped)  # type: ignore[arg-type]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert interaction.response.calls == 0  # no error reply tried: it could not get out


async def test_other_errors_still_get_a_traceback_and_a_reply(
    idle_bot: HtmlBot, caplog: pytest.LogCaptureFixture
) -> None:
    interaction = _Interaction(idle_bot, aiohttp.ServerDisconnectedError())  # not shutting down
    wrapped = app_commands.CommandInvokeError(
        interaction.command,  # type: ignore[arg-type]
        ValueError("a bug"),
    )
    with pytest.raises(aiohttp.ServerDisconnectedError):
        # The error reply fails too, and that is not hidden either.
        await idle_bot.tree.on_error(interaction, wrapped)  # type: ignore[arg-type]
    errors = [r for r in caplog.records if r.name == "bot.commands" and r.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info is not None


def test_no_guilds_intent_notice_at_start(
    idle_bot: HtmlBot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The bot needs no intents; discord.py's warning about it would show at every start.
    assert not idle_bot.intents.guilds
    caplog.set_level(logging.INFO)
    HtmlBot(idle_bot.settings, FakeEngine())
    assert [r.getMessage() for r in caplog.records if r.name.startswith("discord")] == []


def test_token_age_trusts_a_plausible_snowflake_and_warns_on_clock_skew(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert token_age_s(1.5) == 1.5
    assert token_age_s(-0.5) == 0.0  # a little clock jitter: no warning
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    # A host clock 14 minutes fast made every interaction look 840 s old: every job was
    # dropped as expired, silently. Now its age counts from its arrival, with a warning.
    assert token_age_s(840.0) == 0.0
    assert token_age_s(-600.0) == 0.0  # a slow clock: from the future
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("clock" in w for w in warnings)


def test_an_unknown_or_stale_command_gets_a_plain_answer() -> None:
    stale = app_commands.CommandNotFound("oldname", [])
    text = user_message_for(stale)
    assert "went wrong" not in text and "not (or no longer)" in text
    mismatch = app_commands.CommandSignatureMismatch.__new__(app_commands.CommandSignatureMismatch)
    assert user_message_for(mismatch) == text


async def test_a_stale_command_is_answered_without_a_traceback(
    idle_bot: HtmlBot, caplog: pytest.LogCaptureFixture
) -> None:
    interaction = _Interaction(idle_bot, RuntimeError("unused"))
    replies: list[str] = []

    async def send_message(text: str, **kwargs: object) -> None:
        replies.append(text)

    interaction.response.send_message = send_message  # type: ignore[attr-defined]
    interaction.response.is_done = lambda: False  # type: ignore[attr-defined]
    await idle_bot.tree.on_error(interaction, app_commands.CommandNotFound("old", []))  # type: ignore[arg-type]
    assert replies and "not (or no longer)" in replies[0]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
