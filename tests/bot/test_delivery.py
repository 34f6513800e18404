"""Delivery: retry policy against a real HTTP server, attachment fitting, file names."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import io
import json
import os
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest
from aiohttp import web

from bot.delivery import (
    DEFER_WAIT_S,
    Delivery,
    fit_attachment,
    send_page_followup,
    summary_line,
    with_retries,
)
from bot.errors import DeliveryExpired
from bot.jobs import Job, JobState
from bot.metrics import Metrics
from bot.status import Ticket
from bot.store import ResultStore
from model.naming import page_filename
from model.types import FinishReason, GenerationResult
from tests.bot.fakes import fake_page

BARE_429 = 4290


class Script:
    """An aiohttp server answering webhook POSTs with a scripted list of statuses."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.seen: list[int] = []
        self.filenames: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        self.seen.append(status)
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                if part.filename:  # type: ignore[union-attr]
                    self.filenames.append(part.filename)  # type: ignore[union-attr]
                    await part.read()  # type: ignore[union-attr]
        if status == BARE_429:
            # No Via and no Retry-After header: discord.py raises at once, and the wait
            # is only in the JSON body.
            return _json({"message": "slow down", "retry_after": 0.75}, 429)
        if status == 429:
            # Like Discord: the body and the header both say how long to wait; Via marks
            # it as Discord's own limit rather than a Cloudflare ban.
            body = {"message": "You are being rate limited.", "retry_after": 0.25, "global": False}
            return _json(body, 429, {"Retry-After": "0.25", "Via": "1.1 google"})
        if status >= 400:
            return _json({"message": "nope", "code": 0}, status)
        return _json(MESSAGE, 200)


MESSAGE = {
    "id": "1",
    "channel_id": "2",
    "content": "here",
    "type": 0,
    "attachments": [],
    "embeds": [],
    "mentions": [],
    "mention_roles": [],
    "pinned": False,
    "tts": False,
    "timestamp": "2026-01-01T00:00:00+00:00",
    "edited_timestamp": None,
    "flags": 0,
    "author": {"id": "123", "username": "hook", "discriminator": "0000", "avatar": None},
}


def _json(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> web.Response:
    # discord.py parses a body as JSON only for exactly this content type.
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Script, str]]:
    script = Script()
    app = web.Application()
    app.router.add_post("/api/v10/webhooks/{id}/{token}", script.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}/api/v10"
    monkeypatch.setattr(discord.http.Route, "BASE", base)
    yield script, base
    await runner.cleanup()


async def send_with_retries(script: Script, sleeps: list[float]) -> None:
    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async with aiohttp.ClientSession() as session:
        webhook = discord.Webhook.partial(123, "tok", session=session)

        async def send() -> Any:
            page = discord.File(io.BytesIO(b"<html></html>"), filename="page.html")
            return await webhook.send("here", file=page, wait=True)

        await with_retries(send, what="test", attempts=4, sleep=fake_sleep)


async def test_429_then_200_waits_retry_after(server: tuple[Script, str]) -> None:
    script, _ = server
    script.statuses = [429, 200]
    sleeps: list[float] = []
    await send_with_retries(script, sleeps)
    # discord.py itself honours a Discord 429 (it has Via) and sleeps the real 0.25 s;
    # either way the request is sent again and succeeds.
    assert script.seen == [429, 200]
    assert script.filenames == ["page.html", "page.html"]


async def test_429_without_via_is_retried_by_us_after_the_bodys_retry_after(
    server: tuple[Script, str],
) -> None:
    script, _ = server
    script.statuses = [BARE_429, 200]
    sleeps: list[float] = []
    await send_with_retries(script, sleeps)
    assert script.seen == [BARE_429, 200]
    assert sleeps == [0.75]


async def test_cloudflare_style_429_is_retried_by_us_after_retry_after() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    async def op() -> str:
        calls.append(1)
        if len(calls) == 1:
            response = FakeResponse(429, {"Retry-After": "2.5"})
            raise discord.HTTPException(response, {"message": "rate limited"})  # type: ignore[arg-type]
        return "ok"

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    assert await with_retries(op, what="t", sleep=fake_sleep) == "ok"
    assert sleeps == [2.5]


class FakeResponse:
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.reason = "test"
        self.headers = headers or {}


async def test_5xx_and_network_errors_are_retried_with_backoff_then_raised() -> None:
    # discord.py already retries 5xx a few times inside one call (with its own sleeps), so
    # this drives the outer policy with the errors discord.py raises in the end.
    errors: list[BaseException] = [
        discord.DiscordServerError(FakeResponse(502), "bad gateway"),  # type: ignore[arg-type]
        aiohttp.ClientConnectionError("reset"),
        discord.DiscordServerError(FakeResponse(503), "unavailable"),  # type: ignore[arg-type]
        discord.DiscordServerError(FakeResponse(500), "boom"),  # type: ignore[arg-type]
    ]
    sleeps: list[float] = []

    async def op() -> None:
        raise errors.pop(0)

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    with pytest.raises(discord.DiscordServerError):
        await with_retries(op, what="t", attempts=4, base_delay_s=1.0, sleep=fake_sleep)
    assert errors == []
    assert len(sleeps) == 3
    for attempt, slept in enumerate(sleeps):
        assert 0.5 * 2**attempt <= slept <= 2**attempt  # exponential, with jitter


@pytest.mark.parametrize("status", [401, 404])
async def test_dead_token_is_not_retried(server: tuple[Script, str], status: int) -> None:
    script, _ = server
    script.statuses = [status]
    sleeps: list[float] = []
    with pytest.raises(DeliveryExpired):
        await send_with_retries(script, sleeps)
    assert script.seen == [status] and sleeps == []


async def test_other_4xx_is_raised_at_once(server: tuple[Script, str]) -> None:
    script, _ = server
    script.statuses = [400]
    sleeps: list[float] = []
    with pytest.raises(discord.HTTPException):
        await send_with_retries(script, sleeps)
    assert sleeps == []


def test_fit_attachment_zips_when_over_the_limit() -> None:
    small = b"<html>" + b"a" * 100 + b"</html>"
    assert fit_attachment("x.html", small, 1000) is not None
    assert fit_attachment("x.html", small, 1000).filename == "x.html"  # type: ignore[union-attr]
    big = b"<html>" + b"lorem ipsum " * 5000 + b"</html>"
    zipped = fit_attachment("x.html", big, 10_000)
    assert zipped is not None and zipped.filename == "x.zip" and "zipped" in zipped.note
    with zipfile.ZipFile(io.BytesIO(zipped.data)) as archive:
        assert archive.read("x.html") == big
    random_bytes = os.urandom(50_000)
    assert fit_attachment("x.html", random_bytes, 1000) is None


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("A landing page for a bakery!", "landing-bakery.html"),
        ("../../etc/passwd", "etc-passwd.html"),
        ("Café crème ☕", "cafe-creme.html"),
        ("   ", "page.html"),
        ("<script>alert(1)</script>", "script-alert-1-script.html"),
    ],
)
def test_attachment_names_are_safe_slugs(prompt: str, expected: str) -> None:
    name = page_filename(prompt)
    assert name == expected
    assert "/" not in name and not name.startswith(".")


def test_summary_line() -> None:
    line = summary_line(
        filename="a.html", model="m", tokens=12, seconds=3.14159, warnings=("truncated",)
    )
    assert line == "**a.html** · m · 12 tokens · 3.1 s\n⚠️ truncated: cut off by the length limit"
    plain = summary_line(filename="a.html", model="m", tokens=1, seconds=1.0, warnings=())
    assert plain == "**a.html** · m · 1 tokens · 1.0 s"
    # A page kept by an older version may hold a flag this one doesn't know.
    old = summary_line(filename="a.html", model="m", tokens=1, seconds=1.0, warnings=("odd",))
    assert old.endswith("\n⚠️ odd")


class _Followup:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    async def send(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("followup")


class _Interaction:
    """Records every call the delivery makes with the job's token."""

    filesize_limit = 10 * 1024 * 1024

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.followup = _Followup(self.calls)

    async def edit_original_response(self, **kwargs: Any) -> None:
        self.calls.append("edit")


def _delivery(tmp_path: Path) -> Delivery:
    return Delivery(ResultStore(tmp_path), Metrics(), model_name="fake-model")


def _job(state: JobState) -> tuple[Job, _Interaction]:
    job = Job.create(user_id=7, prompt="a bakery", ttl_s=900)
    interaction = _Interaction()
    job.context = Ticket(interaction=interaction)
    job.state = state
    if state is JobState.DONE:
        job.result = GenerationResult(
            request_id=job.job_id,
            text=fake_page("a bakery"),
            finish_reason=FinishReason.HTML_COMPLETE,
            prompt_tokens=3,
            generated_tokens=9,
            time_to_first_token_s=0.1,
            total_s=0.5,
        )
    return job, interaction


@pytest.mark.parametrize("state", [JobState.CANCELLED, JobState.DONE])
async def test_finish_does_not_wait_for_a_defer_that_failed(
    tmp_path: Path, state: JobState
) -> None:
    delivery = _delivery(tmp_path)
    job, interaction = _job(state)
    job.context.mark_defer_failed()
    started = time.monotonic()
    await delivery.finish(job)
    assert time.monotonic() - started < DEFER_WAIT_S / 4
    assert interaction.calls == []  # nothing is sent with a token that never worked


async def test_finish_waits_for_a_defer_in_flight(tmp_path: Path) -> None:
    delivery = _delivery(tmp_path)
    job, interaction = _job(JobState.CANCELLED)
    job.cancel_note = "🔌 restarting"
    finishing = asyncio.create_task(delivery.finish(job))
    await asyncio.sleep(0.1)
    assert not finishing.done()
    job.context.mark_deferred()
    await asyncio.wait_for(finishing, 2)
    assert interaction.calls == ["edit"] and job.context.shown == "🔌 restarting"


async def test_a_dead_token_keeps_the_page_and_sends_nothing(tmp_path: Path) -> None:
    delivery = _delivery(tmp_path)
    job, interaction = _job(JobState.DONE)
    job.context.mark_deferred()
    job.context.dead = True  # a status edit got 401
    await delivery.finish(job)
    assert interaction.calls == []
    assert delivery.expired_deliveries == 1
    [page] = await delivery.store.list(7)
    assert page.job_id == job.job_id


def _empty_page_job() -> tuple[Job, _Interaction]:
    job, interaction = _job(JobState.DONE)
    assert job.result is not None
    job.result = dataclasses.replace(job.result, text="<!DOCTYPE html><html><body></body></html>")
    job.context.mark_deferred()
    return job, interaction


async def test_an_empty_page_is_generated_again_once_before_anyone_sees_it(
    tmp_path: Path,
) -> None:
    asked: list[str] = []

    def regenerate(job: Job) -> bool:
        asked.append(job.job_id)
        return not job.regenerated

    delivery = Delivery(
        ResultStore(tmp_path), Metrics(), model_name="fake-model", regenerate=regenerate
    )
    job, interaction = _empty_page_job()
    await delivery.finish(job)
    assert asked == [job.job_id]
    assert interaction.calls == []  # nothing sent: the job is queued again
    assert await delivery.store.list(7) == []

    # The second answer is empty too: it is delivered, flagged, not regenerated forever.
    job.regenerated = True
    await delivery.finish(job)
    assert asked == [job.job_id, job.job_id]
    assert interaction.calls == ["edit", "followup"]
    [page] = await delivery.store.list(7)
    assert "empty" in page.warnings


async def test_without_a_regenerator_an_empty_page_is_delivered_flagged(tmp_path: Path) -> None:
    delivery = _delivery(tmp_path)
    job, interaction = _empty_page_job()
    await delivery.finish(job)
    assert interaction.calls == ["edit", "followup"]


class _NoSpaceStore(ResultStore):
    """A store on a full disk: writing the page fails the way a full disk does."""

    def save(self, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("broken", ["full disk", "root is a file"])
async def test_a_page_that_cannot_be_kept_is_still_sent(
    tmp_path: Path, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    if broken == "full disk":
        store: ResultStore = _NoSpaceStore(tmp_path)
    else:
        blocker = tmp_path / "results"
        blocker.write_text("not a folder")  # mkdir under it fails with a real OSError
        store = ResultStore(blocker)
    delivery = Delivery(store, Metrics(), model_name="fake-model")
    job, interaction = _job(JobState.DONE)
    job.context.mark_deferred()
    await delivery.finish(job)
    assert interaction.calls == ["edit", "followup"]  # marked done, then the page itself
    assert "could not keep the page" in caplog.text
    done = delivery.metrics.registry.get_sample_value("htmlbot_jobs_total", {"outcome": "done"})
    assert done == 1


class _RecordingFollowup:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, **kwargs: Any) -> None:
        self.sent.append(kwargs)


class RecordingInteraction:
    """An interaction with upload limit ``limit`` whose follow-ups are recorded in
    ``followup.sent`` (what :func:`send_page_followup` needs)."""

    def __init__(self, limit: int) -> None:
        self.filesize_limit = limit
        self.followup = _RecordingFollowup()


async def test_send_page_followup_attaches_zips_or_explains() -> None:
    small = b"<html>" + b"a" * 100 + b"</html>"
    big = b"<html>" + b"lorem ipsum " * 5000 + b"</html>"
    for data, limit, expected in [(small, 1000, "x.html"), (big, 10_000, "x.zip")]:
        interaction = RecordingInteraction(limit)
        attached = await send_page_followup(
            interaction,
            filename="x.html",
            data=data,
            content="**x.html** · m",
            too_big="too big",
            ephemeral=True,
            what="t",
        )
        [sent] = interaction.followup.sent
        assert [a.filename for a in attached] == [f.filename for f in sent["files"]] == [expected]
        assert sent["content"].startswith("**x.html** · m") and sent["ephemeral"] is True
    interaction = RecordingInteraction(1000)
    attached = await send_page_followup(
        interaction,
        filename="x.html",
        data=os.urandom(50_000),
        content="**x.html**",
        too_big="too big",
        ephemeral=False,
        what="t",
    )
    assert attached == []
    assert interaction.followup.sent == [{"content": "too big", "ephemeral": False, "wait": True}]


class _DeadFollowup:
    """A follow-up webhook whose token died between the final edit and the upload."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    async def send(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("followup")
        raise discord.HTTPException(_Refused(401), {"message": "Invalid Webhook Token"})


class _Refused:
    def __init__(self, status: int) -> None:
        self.status = status
        self.reason = "refused"


class _EditRecorder(_Interaction):
    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.followup = _DeadFollowup(self.calls)  # type: ignore[assignment]

    async def edit_original_response(self, **kwargs: Any) -> None:
        await super().edit_original_response(**kwargs)
        self.texts.append(kwargs["content"])


async def test_a_token_that_dies_after_the_done_edit_still_says_where_the_page_is(
    tmp_path: Path,
) -> None:
    # Held-out run: "Done: x.html (below)" with nothing below and no pointer to /mypages.
    delivery = _delivery(tmp_path)
    job, _ = _job(JobState.DONE)
    interaction = _EditRecorder()
    job.context = Ticket(interaction=interaction)
    job.context.mark_deferred()
    await delivery.finish(job)
    assert interaction.calls == ["edit", "followup"]  # no retries with a dead token
    assert f"/mypages page:{job.job_id}" in interaction.texts[-1]
    [page] = await delivery.store.list(7)
    assert page.job_id == job.job_id
