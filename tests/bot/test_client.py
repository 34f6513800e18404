"""HtmlBot end to end through the fake Discord, with a fake engine (fast, CPU).

These check the bot package's own wiring (commands, scheduler, worker, delivery, store);
tests/e2e/ has the full acceptance suite.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import time
import zipfile

import html5lib
import pytest

from bot.client import HtmlBot
from bot.jobs import Job, JobState
from model.types import FinishReason, GenerationRequest, GenerationResult
from tests.bot.conftest import StartBot, eventually
from tests.bot.fakes import BOOM, FakeEngine
from tests.fake_discord import (
    CALLBACK_PATH,
    CB_DEFERRED_MESSAGE,
    CB_MESSAGE,
    CB_UPDATE_MESSAGE,
    FLAG_EPHEMERAL,
    FOLLOWUP_PATH,
    ORIGINAL_PATH,
    FakeDiscord,
)
from tests.fake_discord.payloads import PERM_MANAGE_GUILD

CANCEL = "htmlbot:cancel:"  # the Cancel button's custom_id prefix

pytestmark = pytest.mark.timeout(60)


def cancel_id(bot: HtmlBot, user_id: int) -> str:
    [job] = bot.scheduler.pending(user_id)
    return f"htmlbot:cancel:{job.job_id}"


async def test_html_roundtrip(fake: FakeDiscord, start_bot: StartBot) -> None:
    bot = await start_bot(FakeEngine(tokens=5, token_delay_s=0.05))
    [(_, payload)] = fake.sync_payloads
    html_cmd = next(c for c in payload if c["name"] == "html")
    options = {o["name"]: o for o in html_cmd["options"]}
    assert options["prompt"]["required"] and options["prompt"]["max_length"] == 1000
    assert "dark" in [c["value"] for c in options["style"]["choices"]]
    assert options["private"]["type"] == 5
    assert {c["name"] for c in payload} == {"html", "queue", "mypages", "settings"}

    ann = fake.user("ann")
    inter = await fake.send_command("html", {"prompt": "A landing page for a bakery!"}, user=ann)
    part = await inter.wait_for_file(".html", timeout=10)
    assert inter.callback_type == CB_DEFERRED_MESSAGE
    assert inter.callback_latency is not None and inter.callback_latency < 3
    assert part.filename == "landing-bakery.html"
    tree = html5lib.parse(part.data, treebuilder="etree", namespaceHTMLElements=False)
    assert tree.find(".//h1") is not None
    await inter.wait_until(
        lambda i: bool(i.followups) and "Done" in (i.original or {}).get("content", "")
    )
    [followup] = inter.followups
    assert "fake-model" in followup["content"] and "5 tokens" in followup["content"]
    assert inter.custom_ids(CANCEL) == []  # the Cancel button is gone once done
    pages = await bot.list_pages(ann.id)
    assert [p.filename for p in pages] == ["landing-bakery.html"]
    assert bot.lag.max_lag_s < 0.5


async def test_status_edits_show_position_and_cancel_button(
    fake: FakeDiscord, start_bot: StartBot
) -> None:
    engine = FakeEngine(tokens=3)
    engine.release.clear()  # the GPU is busy
    bot = await start_bot(engine, max_batch=1)
    first = await fake.send_command("html", {"prompt": "first"}, user=fake.user("ann"))
    assert await asyncio.to_thread(engine.started.wait, 5)
    bob = fake.user("bob")
    second = await fake.send_command("html", {"prompt": "second"}, user=bob)
    await second.wait_until(lambda i: "position 1" in (i.original or {}).get("content", ""))
    assert second.custom_ids() == [cancel_id(bot, bob.id)]
    engine.release.set()
    await first.wait_for_file(".html", timeout=10)
    await second.wait_for_file(".html", timeout=10)


async def test_rejections_are_ephemeral_messages(fake: FakeDiscord, start_bot: StartBot) -> None:
    bot = await start_bot(FakeEngine(), max_prompt_chars=50)
    ann = fake.user("ann")
    cases = {
        "   ": "empty",
        "x" * 51: "limit is 50",
        "a page\x07 with a bell": "control character",
    }
    for prompt, expected in cases.items():
        inter = await fake.send_command("html", {"prompt": prompt}, user=ann)
        await inter.wait_for_callback()
        assert inter.callback_type == CB_MESSAGE
        assert inter.is_ephemeral_reply()
        assert expected in inter.visible_text
    assert bot.scheduler.pending() == []


async def test_per_user_limit_and_full_queue(fake: FakeDiscord, start_bot: StartBot) -> None:
    engine = FakeEngine()
    engine.release.clear()
    bot = await start_bot(engine, queue_max_per_user=1, queue_max_total=1, max_batch=1)
    ann, bob, cid = fake.user("ann"), fake.user("bob"), fake.user("cid")
    await (await fake.send_command("html", {"prompt": "one"}, user=ann)).wait_for_callback()
    assert await asyncio.to_thread(engine.started.wait, 5)
    again = await fake.send_command("html", {"prompt": "two"}, user=ann)
    await again.wait_for_callback()
    assert again.callback_type == CB_MESSAGE and "limit is 1" in again.visible_text
    await (await fake.send_command("html", {"prompt": "b"}, user=bob)).wait_for_callback()
    full = await fake.send_command("html", {"prompt": "c"}, user=cid)
    await full.wait_for_callback()
    assert full.is_ephemeral_reply() and "queue is full" in full.visible_text
    assert "try again in about" in full.visible_text
    # Each refusal is counted once, by reason.
    count = bot.metrics.registry.get_sample_value
    assert count("htmlbot_rejected_total", {"reason": "UserLimitReached"}) == 1
    assert count("htmlbot_rejected_total", {"reason": "QueueFull"}) == 1
    engine.release.set()


async def test_cancel_button_requester_other_user_and_manager(
    fake: FakeDiscord, start_bot: StartBot
) -> None:
    engine = FakeEngine()
    engine.release.clear()
    bot = await start_bot(engine, max_batch=1)
    ann, bob, eve = fake.user("ann"), fake.user("bob"), fake.user("eve")
    blocker = await fake.send_command("html", {"prompt": "blocker"}, user=eve)
    assert await asyncio.to_thread(engine.started.wait, 5)
    mine = await fake.send_command("html", {"prompt": "mine"}, user=ann)
    await mine.wait_until(lambda i: bool(i.custom_ids()))
    custom_id = cancel_id(bot, ann.id)

    press = await fake.press_button(custom_id, user=bob)
    await press.wait_for_callback()
    assert press.callback_type == CB_MESSAGE and "Only the person" in press.visible_text
    assert bot.scheduler.pending(ann.id)  # still queued

    press = await fake.press_button(custom_id, user=ann)
    await press.wait_for_callback()
    assert press.callback_type == CB_UPDATE_MESSAGE
    assert bot.scheduler.pending(ann.id) == []
    assert "Cancelled" in (mine.original or {}).get("content", "")

    # A manager may cancel someone else's running job.
    custom_id = cancel_id(bot, eve.id)
    press = await fake.press_button(custom_id, user=bob, permissions=PERM_MANAGE_GUILD)
    await press.wait_for_callback()
    assert press.callback_type == CB_UPDATE_MESSAGE
    engine.release.set()
    await blocker.wait_until(lambda i: "Cancelled" in (i.original or {}).get("content", ""))
    await asyncio.sleep(0.2)
    assert blocker.html_files == []


async def test_worker_exception_then_next_job_succeeds(
    fake: FakeDiscord, start_bot: StartBot
) -> None:
    await start_bot(FakeEngine(), max_batch=1)
    bad = await fake.send_command("html", {"prompt": f"{BOOM} page"}, user=fake.user("ann"))
    await bad.wait_until(lambda i: "failed" in (i.original or {}).get("content", ""))
    good = await fake.send_command("html", {"prompt": "fine page"}, user=fake.user("bob"))
    await good.wait_for_file(".html", timeout=10)


async def test_followup_429_then_200_is_retried(fake: FakeDiscord, start_bot: StartBot) -> None:
    await start_bot(FakeEngine())
    fake.fail_next("POST", FOLLOWUP_PATH, status=429, retry_after=0.3)
    inter = await fake.send_command("html", {"prompt": "bakery"}, user=fake.user("ann"))
    await inter.wait_for_file(".html", timeout=10)
    statuses = [r.status for r in inter.requests if r.method == "POST" and "callback" not in r.path]
    assert statuses == [429, 200]


async def test_expired_token_keeps_the_page_for_mypages(
    fake: FakeDiscord, start_bot: StartBot
) -> None:
    engine = FakeEngine()
    engine.release.clear()
    bot = await start_bot(engine)
    ann = fake.user("ann")
    inter = await fake.send_command("html", {"prompt": "bakery", "private": True}, user=ann)
    await inter.wait_for_callback()
    fake.expire(inter, status=404)
    engine.release.set()
    await eventually(lambda: bot.delivery.expired_deliveries == 1)
    assert inter.html_files == []
    [page] = await bot.list_pages(ann.id)

    listing = await fake.send_command("mypages", {}, user=ann)
    await listing.wait_for_callback()
    assert page.job_id in listing.visible_text and listing.is_ephemeral_reply()
    fetch = await fake.send_command("mypages", {"page": page.job_id}, user=ann)
    part = await fetch.wait_for_file(".html", timeout=10)
    assert part.data == page.path.read_bytes()
    # Someone else can't fetch it.
    other = await fake.send_command("mypages", {"page": page.job_id}, user=fake.user("bob"))
    await other.wait_for_callback()
    assert "No saved page" in other.visible_text


async def test_job_that_would_outlive_its_token_is_not_run(
    fake: FakeDiscord, start_bot: StartBot
) -> None:
    engine = FakeEngine()
    await start_bot(engine, interaction_ttl_s=60.0, initial_job_seconds=30.0)
    inter = await fake.send_command("html", {"prompt": "late"}, user=fake.user("ann"), age_s=40)
    await inter.wait_until(lambda i: "Not run" in (i.original or {}).get("content", ""))
    assert engine.calls == []


async def test_queue_lists_own_jobs_and_all_for_managers(
    fake: FakeDiscord, start_bot: StartBot
) -> None:
    engine = FakeEngine()
    engine.release.clear()
    bot = await start_bot(engine, max_batch=1)
    ann, bob = fake.user("ann"), fake.user("bob")
    await (await fake.send_command("html", {"prompt": "ann page"}, user=ann)).wait_for_callback()
    await (await fake.send_command("html", {"prompt": "bob page"}, user=bob)).wait_for_callback()
    mine = await fake.send_command("queue", {}, user=bob)
    await mine.wait_for_callback()
    assert "bob page" in mine.visible_text and "ann page" not in mine.visible_text
    assert mine.original is not None and mine.original["flags"] & FLAG_EPHEMERAL
    admin = await fake.send_command("queue", {}, user=fake.owner)
    await admin.wait_for_callback()
    assert "bob page" in admin.visible_text and "ann page" in admin.visible_text
    engine.release.set()
    assert bot.scheduler.running_count <= 1


async def test_big_page_is_zipped(fake: FakeDiscord, start_bot: StartBot) -> None:
    class BigEngine(FakeEngine):
        def _result(self, request, tokens, total):
            result = super()._result(request, tokens, total)
            filler = "<p>" + "lorem ipsum " * 2000 + "</p>"
            text = result.text.replace("</body>", filler + "</body>")
            return type(result)(**{**result.__dict__, "text": text})

    await start_bot(BigEngine())
    inter = await fake.send_command(
        "html", {"prompt": "big"}, user=fake.user("ann"), attachment_size_limit=8000
    )
    part = await inter.wait_for_file(".zip", timeout=10)
    with zipfile.ZipFile(io.BytesIO(part.data)) as archive:
        assert archive.namelist() == ["big.html"]


async def test_shutdown_tells_queued_users(fake: FakeDiscord, start_bot: StartBot) -> None:
    engine = FakeEngine()
    engine.release.clear()
    bot = await start_bot(engine, max_batch=1, shutdown_deadline_s=0.5)
    running = await fake.send_command("html", {"prompt": "running"}, user=fake.user("ann"))
    assert await asyncio.to_thread(engine.started.wait, 5)
    queued = await fake.send_command("html", {"prompt": "queued"}, user=fake.user("bob"))
    await queued.wait_for_callback()
    [queued_job] = bot.scheduler.pending(fake.user("bob").id)
    closing = asyncio.create_task(bot.close())
    await queued.wait_until(lambda i: "restarting" in (i.original or {}).get("content", ""))
    engine.release.set()  # the running job finishes within the deadline and is delivered
    await asyncio.wait_for(closing, 15)
    assert queued_job.state is JobState.CANCELLED
    assert running.html_files


async def test_300_interactions_from_50_users_each_get_exactly_one_answer(
    fake: FakeDiscord, start_bot: StartBot
) -> None:
    bot = await start_bot(
        FakeEngine(tokens=3, token_delay_s=0.002),
        max_batch=8,
        queue_max_per_user=4,
        queue_edit_interval_s=0.5,
    )
    users = [fake.user(f"user{i}") for i in range(50)]
    sends = [
        fake.send_command("html", {"prompt": f"page {n} of {user.username}"}, user=user)
        for n in range(6)
        for user in users
    ]
    interactions = await asyncio.gather(*sends)

    def answered(inter: object) -> bool:
        return inter.callback_type == CB_MESSAGE or bool(inter.html_files)  # type: ignore[attr-defined]

    # Polled, not re-checked after every request: checking 300 interactions' requests after
    # each of thousands of requests would take the event loop from the bot under test.
    deadline = time.monotonic() + 50
    while not all(answered(i) for i in interactions):
        assert time.monotonic() < deadline, "not every interaction was answered in 50 s"
        await asyncio.sleep(0.25)
    pages = rejected = 0
    for inter in interactions:
        assert inter.late_callbacks == 0
        assert inter.callback_latency is not None and inter.callback_latency < 3
        callbacks = [r for r in inter.requests if r.path.endswith("/callback")]
        assert len(callbacks) == 1
        if inter.callback_type == CB_MESSAGE:
            rejected += 1
            assert "limit is 4" in inter.visible_text and not inter.html_files
        else:
            pages += 1
            assert len(inter.html_files) == 1
    assert pages + rejected == 300 and pages >= 200
    await eventually(lambda: bot.scheduler.pending() == [])
    assert sum(len(call) for call in bot.engine.calls) == pages


async def test_allowed_channels_and_roles(fake: FakeDiscord, start_bot: StartBot) -> None:
    general, bots = fake.guild.channels
    await start_bot(
        FakeEngine(), allowed_channel_ids=(bots.id,), allowed_role_ids=(fake.mod_role.id,)
    )
    mod = fake.user("mod", roles=[fake.mod_role])
    wrong_channel = await fake.send_command("html", {"prompt": "x"}, user=mod, channel=general)
    await wrong_channel.wait_for_callback()
    assert wrong_channel.is_ephemeral_reply() and "channel" in wrong_channel.visible_text
    no_role = await fake.send_command("html", {"prompt": "x"}, user=fake.user("ann"), channel=bots)
    await no_role.wait_for_callback()
    assert no_role.is_ephemeral_reply() and "roles" in no_role.visible_text
    ok = await fake.send_command("html", {"prompt": "x"}, user=mod, channel=bots)
    await ok.wait_for_file(".html", timeout=10)


async def test_private_reply_is_ephemeral_and_the_token_is_never_logged(
    fake: FakeDiscord, start_bot: StartBot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await start_bot(FakeEngine())
    inter = await fake.send_command(
        "html", {"prompt": "secret page", "private": True}, user=fake.user("ann")
    )
    await inter.wait_for_file(".html", timeout=10)
    await inter.wait_until(lambda i: bool(i.followups))
    assert inter.is_ephemeral_reply()
    assert all(m["flags"] & FLAG_EPHEMERAL for m in inter.followups)
    assert fake.bot_token not in caplog.text


async def test_gateway_url_is_asked_from_a_custom_api_base(
    fake: FakeDiscord, start_bot: StartBot
) -> None:
    await start_bot(FakeEngine(), discord_gateway_url=None)
    assert [r for r in fake.requests if r.path.endswith("/gateway/bot")]
    inter = await fake.send_command("html", {"prompt": "x"}, user=fake.user("ann"))
    await inter.wait_for_file(".html", timeout=10)


async def test_cancel_answers_at_once_even_while_a_status_edit_sleeps_on_a_429(
    fake: FakeDiscord, start_bot: StartBot
) -> None:
    engine = FakeEngine()
    engine.release.clear()
    bot = await start_bot(engine, max_batch=1)
    eve, bob, ann = fake.user("eve"), fake.user("bob"), fake.user("ann")
    await fake.send_command("html", {"prompt": "blocker"}, user=eve)
    assert await asyncio.to_thread(engine.started.wait, 5)
    bobs = await fake.send_command("html", {"prompt": "bob"}, user=bob)
    anns = await fake.send_command("html", {"prompt": "ann"}, user=ann)
    await anns.wait_until(lambda i: "position 2" in (i.original or {}).get("content", ""))
    await bobs.wait_until(lambda i: bool(i.custom_ids()))
    # Ann's next status edit ("position 1") gets a 429 and discord.py sleeps on it.
    fake.fail_next("PATCH", ORIGINAL_PATH, status=429, retry_after=1.5, token=anns.token)
    await (await fake.press_button(cancel_id(bot, bob.id), user=bob)).wait_for_callback()
    await anns.wait_for_request("PATCH", ORIGINAL_PATH, predicate=lambda r: r.status == 429)

    press = await fake.press_button(cancel_id(bot, ann.id), user=ann)
    await press.wait_for_callback(timeout=1.0)  # not stuck behind the sleeping edit
    assert press.callback_latency is not None and press.callback_latency < 1.0
    # The late "position 1" edit lands, then the cancelled text is put back.
    await anns.wait_until(
        lambda i: (
            "position 1" in " ".join(i.contents)
            and "Cancelled" in (i.original or {}).get("content", "")
        ),
        timeout=10,
    )
    assert anns.custom_ids(CANCEL) == []
    engine.release.set()


async def test_unexpected_errors_get_a_generic_reply_and_a_logged_traceback(
    fake: FakeDiscord, start_bot: StartBot, caplog: pytest.LogCaptureFixture
) -> None:
    bot = await start_bot(FakeEngine())

    async def broken(user_id: int) -> list[object]:
        raise OSError("disk on fire: /srv/secret/path")

    bot.store.list = broken  # type: ignore[method-assign]
    inter = await fake.send_command("mypages", {}, user=fake.user("ann"))
    await inter.wait_for_callback()
    assert inter.is_ephemeral_reply()
    assert "Something went wrong" in inter.visible_text
    assert "secret" not in inter.visible_text
    errors = [r for r in caplog.records if r.name == "bot.commands" and r.levelname == "ERROR"]
    assert errors and errors[0].exc_info is not None


class ScriptedEngine(FakeEngine):
    """Answers each prompt with a fixed text and finish reason."""

    def __init__(self, answers: dict[str, tuple[str, FinishReason]]) -> None:
        super().__init__()
        self.answers = answers

    def _result(self, request: GenerationRequest, tokens: int, total: float) -> GenerationResult:
        text, reason = self.answers[request.prompt]
        result = super()._result(request, tokens, total)
        return dataclasses.replace(result, text=text, finish_reason=reason)


async def test_truncated_pages_say_so_and_empty_answers_fail_clearly(
    fake: FakeDiscord, start_bot: StartBot
) -> None:
    half_page = "<!DOCTYPE html><html><head><title>Shop</title></head><body><h1>Shop</h1><p>We"
    bot = await start_bot(
        ScriptedEngine({"cut": (half_page, FinishReason.LENGTH), "nothing": ("", FinishReason.EOS)})
    )
    cut = await fake.send_command("html", {"prompt": "cut"}, user=fake.user("ann"))
    part = await cut.wait_for_file(".html", timeout=10)
    assert part.data.rstrip().endswith(b"</html>")  # completed by model.html
    await cut.wait_until(lambda i: bool(i.followups))
    assert "truncated" in cut.followups[0]["content"]

    empty = await fake.send_command("html", {"prompt": "nothing"}, user=fake.user("bob"))
    await empty.wait_until(lambda i: "no usable web page" in (i.original or {}).get("content", ""))
    assert empty.html_files == []
    await eventually(lambda: _count(bot, "failed") == 1)
    # Counted once the delivery has finished (where the page went is recorded after the
    # upload the fake has already seen).
    await eventually(lambda: _count(bot, "done") == 1)


def _count(bot: HtmlBot, outcome: str) -> float:
    value = bot.metrics.registry.get_sample_value("htmlbot_jobs_total", {"outcome": outcome})
    return value or 0.0


async def test_shutdown_deadline_cancels_running_jobs_and_says_why(
    fake: FakeDiscord, start_bot: StartBot
) -> None:
    engine = FakeEngine(tokens=100_000, token_delay_s=0.001)
    bot = await start_bot(engine, max_batch=1, shutdown_deadline_s=0.3)
    running = await fake.send_command("html", {"prompt": "endless"}, user=fake.user("ann"))
    assert await asyncio.to_thread(engine.started.wait, 5)
    await running.wait_for_callback()
    await asyncio.wait_for(bot.close(), 20)
    assert "could not be finished in time" in (running.original or {}).get("content", "")
    assert running.html_files == []


async def test_metrics_endpoint_when_enabled(fake: FakeDiscord, start_bot: StartBot) -> None:
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bot = await start_bot(FakeEngine(), metrics_port=port)
    inter = await fake.send_command("html", {"prompt": "x"}, user=fake.user("ann"))
    await inter.wait_for_file(".html", timeout=10)
    await eventually(lambda: _count(bot, "done") == 1)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(scrape)
    assert 'htmlbot_jobs_total{outcome="done"} 1.0' in text
    assert "htmlbot_event_loop_lag_seconds" in text


async def test_shutdown_while_defers_are_in_flight_tells_everyone(
    fake: FakeDiscord, start_bot: StartBot, caplog: pytest.LogCaptureFixture
) -> None:
    # Discord accepts the defers at once but its answers reach the bot 1 s late, so
    # close() starts (and the scheduler drops these jobs) while the defers are in flight.
    engine = FakeEngine()
    engine.release.clear()
    bot = await start_bot(engine, max_batch=1, shutdown_deadline_s=2.0)
    running = await fake.send_command("html", {"prompt": "running"}, user=fake.user("ann"))
    assert await asyncio.to_thread(engine.started.wait, 5)
    fake.delay_next("POST", CALLBACK_PATH, seconds=1.0, times=4)
    burst = [
        await fake.send_command("html", {"prompt": f"p{k}"}, user=fake.user(f"u{k}"))
        for k in range(4)
    ]
    await eventually(lambda: all(i.callback_type for i in burst), 5)
    closing = asyncio.create_task(bot.close())
    await eventually(lambda: bot.scheduler.closed)  # the burst's jobs are dropped
    engine.release.set()  # the running job finishes within the deadline
    await asyncio.wait_for(closing, 20)
    assert running.html_files
    for inter in burst:
        assert inter.callback_type == CB_DEFERRED_MESSAGE
        assert "restarting" in (inter.original or {}).get("content", ""), inter.contents
    errors = [r for r in caplog.records if r.name.startswith("bot") and r.levelno >= logging.ERROR]
    assert errors == []


async def test_dead_token_gets_one_refused_status_edit_then_nothing(
    fake: FakeDiscord, start_bot: StartBot
) -> None:
    engine = FakeEngine(tokens=30, token_delay_s=0.05)  # 1.5 s of progress reports
    engine.release.clear()
    bot = await start_bot(engine, max_batch=1, queue_edit_interval_s=0.1)
    ann = fake.user("ann")
    await fake.send_command("html", {"prompt": "blocker"}, user=fake.user("eve"))
    assert await asyncio.to_thread(engine.started.wait, 5)
    inter = await fake.send_command("html", {"prompt": "bakery"}, user=ann)
    await inter.wait_until(lambda i: "position 1" in (i.original or {}).get("content", ""))
    fake.expire(inter)
    engine.release.set()  # the blocker, then ann's job: "Generating…", "N tokens so far"…
    await eventually(lambda: bot.delivery.expired_deliveries == 1)
    await asyncio.sleep(0.3)
    refused = [r for r in inter.requests if r.status == 401]
    assert len(refused) == 1 and refused[0].method == "PATCH", [r.content for r in refused]
    assert inter.html_files == []
    [page] = await bot.list_pages(ann.id)
    assert page.path.read_bytes().startswith(b"<!DOCTYPE html>")


class _RecordingBoard:
    def __init__(self) -> None:
        self.tracked: list[str] = []

    def track(self, job: Job) -> None:
        self.tracked.append(job.job_id)


def test_regenerate_queues_the_job_once_more_with_another_seed() -> None:
    from types import SimpleNamespace

    from bot.queue.local import LocalQueue
    from bot.scheduler import Scheduler, Throughput
    from model.types import SamplingParams

    scheduler = Scheduler(max_total=10, max_per_user=3, max_batch=4, throughput=Throughput(60))
    board = _RecordingBoard()
    backend = SimpleNamespace(scheduler=scheduler, source=LocalQueue(scheduler))
    bot = SimpleNamespace(backend=backend, board=board)
    job = Job.create(user_id=1, prompt="a bakery", ttl_s=900, sampling=SamplingParams(seed=5))
    scheduler.submit(job)
    [taken] = scheduler.take(1)
    scheduler.finish(taken, JobState.DONE)

    assert HtmlBot.regenerate(bot, job) is True  # type: ignore[arg-type]
    assert job.state is JobState.QUEUED and job.result is None
    assert job.request.sampling.seed != 5
    assert board.tracked == [job.job_id]
    assert scheduler.take(1) == [job]
    assert HtmlBot.regenerate(bot, job) is False  # only once

    other = Job.create(user_id=2, prompt="a bakery", ttl_s=900)
    scheduler.close()
    assert HtmlBot.regenerate(bot, other) is False  # shutting down: delivered as it is
    assert not other.regenerated
