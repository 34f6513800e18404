"""End to end: the queue as users see it (positions, cancel, fairness, limits, failures).

The engine is the real one wrapped in :class:`ControlledEngine`, which stalls or fails on
cue so the queue's behaviour can be observed while "the GPU is busy".
"""

# Polling is deliberate: the state watched belongs to other threads (the worker, the
# engine) or to the bot, which offers no awaitable for it; every wait is bounded.
# ruff: noqa: ASYNC109, ASYNC110

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from model.types import TextGenerator
from tests.e2e.helpers import BotRun, ControlledEngine, StartBot, close_bot
from tests.fake_discord import (
    CALLBACK_PATH,
    CB_DEFERRED_MESSAGE,
    CB_MESSAGE,
    CB_UPDATE_MESSAGE,
    FLAG_EPHEMERAL,
    FakeDiscord,
    FakeInteraction,
)

CANCEL = "htmlbot:cancel:"  # the Cancel button's custom_id prefix
log = logging.getLogger(__name__)

pytestmark = pytest.mark.timeout(120)

CANCEL_RE = re.compile(r"^htmlbot:cancel:(.+)$")


def cancel_id(inter: FakeInteraction) -> str:
    ids = [c for c in inter.custom_ids() if CANCEL_RE.match(c)]
    assert ids, f"no Cancel button on {inter.messages}"
    return ids[0]


async def wait_cancel_button(inter: FakeInteraction, timeout: float = 5.0) -> str:
    await inter.wait_until(
        lambda i: any(CANCEL_RE.match(c) for c in i.custom_ids()), timeout=timeout
    )
    return cancel_id(inter)


async def running_and_held(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator, **settings: Any
) -> tuple[BotRun, ControlledEngine]:
    engine = ControlledEngine(real_engine)
    engine.hold()
    run = await start_bot(engine, **settings)
    return run, engine


async def wait_engine_busy(engine: ControlledEngine, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not engine.busy.is_set():
            await asyncio.sleep(0.01)


async def test_defer_within_3s_while_gpu_busy_and_many_wait(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    run, engine = await running_and_held(
        start_bot, fake, real_engine, queue_max_total=1000, queue_max_per_user=3, max_batch=2
    )
    first = await fake.send_command("html", {"prompt": "the page that holds the GPU"})
    await wait_engine_busy(engine)
    users = [fake.user(f"user{i}") for i in range(50)]
    interactions = await asyncio.gather(
        *(
            fake.send_command("html", {"prompt": f"page {k} of {u.username}"}, user=u)
            for k in range(3)
            for u in users
        )
    )
    await fake.wait_until(
        lambda: all(i.callback_type is not None for i in interactions), timeout=10
    )
    latencies = [i.callback_latency for i in interactions]
    assert all(i.callback_type == CB_DEFERRED_MESSAGE for i in interactions)
    assert all(i.late_callbacks == 0 for i in interactions)
    worst = max(lat for lat in latencies if lat is not None)
    log.warning("150 defers while the GPU is busy: slowest %.2f s", worst)
    assert worst < 3.0
    assert run.bot.scheduler.queued_count == 150
    assert engine.prompts == ["the page that holds the GPU"]

    # Shutting down tells every queued user, and the running job still finishes. (Wait until
    # the bot has seen every defer succeed: a shutdown racing a defer is another test.)
    await fake.wait_until(
        lambda: all(j.context.deferred.is_set() for j in run.bot.scheduler.pending()), 10
    )
    engine.release()
    closing = time.monotonic()
    await close_bot(run)
    closed_in = time.monotonic() - closing
    await first.wait_for_file(".html", timeout=10)
    told = [i for i in interactions if "restarting" in i.original_content]
    delivered = [i for i in interactions if i.html_files]
    others = [
        [(r.method, r.status, r.content) for r in i.requests]
        for i in interactions
        if i not in told and i not in delivered
    ]
    assert len(told) + len(delivered) == 150, (closed_in, others[:3])
    assert all(i.custom_ids(CANCEL) == [] for i in told)


async def test_queue_position_edits(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    run, engine = await running_and_held(start_bot, fake, real_engine, max_batch=1)
    a, b, c = fake.user("ann"), fake.user("bob"), fake.user("cid")
    ia = await fake.send_command("html", {"prompt": "page a"}, user=a)
    await wait_engine_busy(engine)
    ib = await fake.send_command("html", {"prompt": "page b"}, user=b)
    ic = await fake.send_command("html", {"prompt": "page c"}, user=c)

    def showing(text: str) -> Callable[[FakeInteraction], bool]:
        return lambda i: text in i.original_content

    await ic.wait_until(showing("position 2"))
    await ib.wait_until(showing("position 1"))
    assert cancel_id(ic).startswith("htmlbot:cancel:")
    await ia.wait_until(showing("Generating"))
    held_since = time.monotonic()
    await asyncio.sleep(1.0)  # several edit intervals while nothing changes
    edits_while_held = [r for r in ic.ok_requests if r.method == "PATCH" and held_since <= r.time]

    engine.allow(1)  # a finishes; b runs (and is held); c moves up
    await ia.wait_for_file(".html", timeout=30)
    await ic.wait_until(showing("position 1"))
    await ib.wait_until(showing("Generating"))
    engine.release()
    for inter in (ib, ic):
        await inter.wait_for_file(".html", timeout=30)

    # c's message went position 2 -> position 1 -> done, with edits only on change.
    history = [t for t in ic.contents if "position" in t]
    assert "position 2" in history[0] and "position 1" in history[-1], history
    # Nothing changed while held (same position, same ETA: it moves only when a job ends),
    # so no edit went out however many edit intervals passed.
    assert run.settings.queue_edit_interval_s * 4 < 1.0
    assert edits_while_held == [], [r.content for r in edits_while_held]
    assert all(len(i.html_files) == 1 for i in (ia, ib, ic))


async def test_cancel_by_requester_while_queued(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    run, engine = await running_and_held(start_bot, fake, real_engine, max_batch=1)
    a, b = fake.user("ann"), fake.user("bob")
    ia = await fake.send_command("html", {"prompt": "page a"}, user=a)
    await wait_engine_busy(engine)
    ib = await fake.send_command("html", {"prompt": "page b"}, user=b)
    button = await wait_cancel_button(ib)

    press = await fake.press_button(button, user=b)
    await press.wait_for_callback(timeout=3)
    assert press.callback_type == CB_UPDATE_MESSAGE
    assert "Cancelled" in ib.original_content
    assert ib.custom_ids(CANCEL) == []
    assert run.bot.scheduler.queued_count == 0

    engine.release()
    await ia.wait_for_file(".html", timeout=30)
    await asyncio.sleep(0.5)  # room for any (wrong) late edit or delivery
    assert ib.html_files == []
    assert "Cancelled" in ib.original_content
    assert "page b" not in engine.prompts  # dropped before reaching the engine


async def test_cancel_by_requester_while_generating(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    run, engine = await running_and_held(start_bot, fake, real_engine, max_batch=1)
    a = fake.user("ann")
    ia = await fake.send_command("html", {"prompt": "page a"}, user=a)
    await wait_engine_busy(engine)
    button = await wait_cancel_button(ia)

    press = await fake.press_button(button, user=a)
    await press.wait_for_callback(timeout=3)
    # The engine sees the cancel flag and stops; nothing is delivered.
    async with asyncio.timeout(5):
        while engine.busy.is_set():
            await asyncio.sleep(0.01)
    await fake.wait_until(lambda: run.bot.scheduler.running_count == 0, timeout=5)
    await asyncio.sleep(0.3)
    assert ia.html_files == []
    assert "Cancelled" in ia.original_content

    # The worker still serves the next request.
    engine.release()
    again = await fake.send_command("html", {"prompt": "page a again"}, user=a)
    await again.wait_for_file(".html", timeout=30)


async def test_cancel_by_someone_else_is_refused_but_a_manager_may(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    _run, engine = await running_and_held(start_bot, fake, real_engine, max_batch=1)
    a, b, c = fake.user("ann"), fake.user("bob"), fake.user("cid")
    manager = fake.user("mod", roles=[fake.mod_role])
    ia = await fake.send_command("html", {"prompt": "page a"}, user=a)
    await wait_engine_busy(engine)
    ic = await fake.send_command("html", {"prompt": "page c"}, user=c)
    button_a = await wait_cancel_button(ia)
    button_c = await wait_cancel_button(ic)

    press = await fake.press_button(button_a, user=b)
    await press.wait_for_callback(timeout=3)
    assert press.callback_type == CB_MESSAGE and press.is_ephemeral_reply()
    assert "Only the person who asked" in press.visible_text
    assert "Cancelled" not in ia.original_content

    by_manager = await fake.press_button(button_c, user=manager)
    await by_manager.wait_for_callback(timeout=3)
    assert by_manager.callback_type == CB_UPDATE_MESSAGE
    assert "Cancelled by" in ic.original_content

    engine.release()
    await ia.wait_for_file(".html", timeout=30)  # a's job went on
    assert len(ia.html_files) == 1 and ic.html_files == []


async def test_flooding_user_does_not_starve_another(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    engine = ControlledEngine(real_engine, delay_s=0.3)
    await start_bot(engine, max_batch=1, queue_max_per_user=5)
    flooder, other = fake.user("flooder"), fake.user("other")
    floods = [
        await fake.send_command("html", {"prompt": f"flood {k}"}, user=flooder) for k in range(8)
    ]
    await fake.wait_until(lambda: all(i.callback_type for i in floods), timeout=5)
    refused = [i for i in floods if i.callback_type == CB_MESSAGE]
    assert len(refused) == 3
    assert all(i.is_ephemeral_reply() and "limit" in i.visible_text for i in refused)

    mine = await fake.send_command("html", {"prompt": "just one page"}, user=other)
    await mine.wait_for_file(".html", timeout=30)
    accepted = [i for i in floods if i.callback_type == CB_DEFERRED_MESSAGE]
    delivered_before = [i for i in accepted if i.html_files]
    # Round-robin: at most the flooder's running job and one more go before ours, and most
    # of the flooder's backlog is still waiting (no timing bound: CI machines vary).
    assert len(delivered_before) <= 2, [i.contents for i in accepted]
    assert len(accepted) - len(delivered_before) >= 3
    for inter in accepted:
        await inter.wait_for_file(".html", timeout=30)


async def test_queue_full_is_told_with_a_retry_hint(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    run, engine = await running_and_held(
        start_bot, fake, real_engine, max_batch=1, queue_max_total=2, queue_max_per_user=10
    )
    a, b = fake.user("ann"), fake.user("bob")
    await fake.send_command("html", {"prompt": "running"}, user=a)
    await wait_engine_busy(engine)
    queued = [await fake.send_command("html", {"prompt": f"q{k}"}, user=a) for k in range(2)]
    for inter in queued:  # queued (journaled) once deferred
        await inter.wait_for_callback(timeout=3)
    full = await fake.send_command("html", {"prompt": "one too many"}, user=b)
    await full.wait_for_callback(timeout=3)
    assert all(q.callback_type == CB_DEFERRED_MESSAGE for q in queued)
    assert full.callback_type == CB_MESSAGE and full.is_ephemeral_reply()
    assert "full" in full.visible_text.lower()
    assert re.search(r"try again in about \S+", full.visible_text)
    assert run.bot.scheduler.queued_count == 2


async def test_worker_exception_then_next_job_succeeds(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    engine = ControlledEngine(real_engine)
    engine.fail_next(1)
    await start_bot(engine, max_batch=1)
    a, b = fake.user("ann"), fake.user("bob")
    failed = await fake.send_command("html", {"prompt": "unlucky page"}, user=a)
    await failed.wait_until(lambda i: "❌" in i.original_content, timeout=10)
    assert "internal error" in failed.visible_text
    assert failed.html_files == [] and failed.custom_ids(CANCEL) == []

    ok = await fake.send_command("html", {"prompt": "lucky page"}, user=b)
    await ok.wait_for_file(".html", timeout=30)
    again = await fake.send_command("html", {"prompt": "unlucky page, again"}, user=a)
    await again.wait_for_file(".html", timeout=30)


async def test_expired_token_keeps_the_result(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    run, engine = await running_and_held(start_bot, fake, real_engine, max_batch=1)
    a = fake.user("ann")
    inter = await fake.send_command("html", {"prompt": "a page nobody waits for"}, user=a)
    await inter.wait_for_callback(timeout=3)
    await wait_engine_busy(engine)
    fake.expire(inter)
    expired_at = asyncio.get_running_loop().time()
    await asyncio.sleep(1.0)  # several status-edit intervals while the job still runs
    engine.release()

    # Kept on disk although Discord refuses every call with this token.
    async with asyncio.timeout(10):
        while not await run.bot.store.list(a.id):
            await asyncio.sleep(0.05)
    [stored] = await run.bot.store.list(a.id)
    kept = await run.bot.store.read(stored)
    assert kept.lstrip().lower().startswith(b"<!doctype html")
    await asyncio.sleep(0.5)
    assert inter.html_files == []
    refused = [r for r in inter.requests if r.status and r.time >= expired_at]
    assert refused and all(r.status == 401 for r in refused)
    # A dead token stays dead: no retrying it. Discord counts every 401 toward its
    # invalid-request limit (10,000 per 10 minutes, then an IP ban).
    status_edits = [r for r in refused if r.method == "PATCH" and "Done" not in (r.content or "")]
    assert len(status_edits) <= 1, [r.content for r in refused]
    assert len([r for r in refused if r.files]) <= 1

    # The user gets it again, privately, with /mypages.
    again = await fake.send_command("mypages", {"page": stored.job_id}, user=a)
    page = await again.wait_for_file(".html", timeout=10)
    assert page.data == kept
    assert all(r.json.get("flags", 0) & FLAG_EPHEMERAL for r in again.ok_requests if r.files)


async def test_job_that_would_expire_is_not_run(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    _run, engine = await running_and_held(
        start_bot,
        fake,
        real_engine,
        max_batch=1,
        interaction_ttl_s=1.5,
        delivery_margin_s=0.0,
    )
    a, b = fake.user("ann"), fake.user("bob")
    first = await fake.send_command("html", {"prompt": "long running"}, user=a)
    await wait_engine_busy(engine)
    doomed = await fake.send_command("html", {"prompt": "too late"}, user=b)
    await doomed.wait_for_callback(timeout=3)
    await asyncio.sleep(2.0)  # b's token would now expire before delivery
    engine.release()
    await doomed.wait_until(lambda i: "Not run" in i.original_content, 10)
    assert "too late" not in engine.prompts
    assert doomed.html_files == []
    await first.wait_for_file(".html", timeout=30)


async def test_queue_command_lists_own_jobs_and_managers_see_all(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    _run, engine = await running_and_held(start_bot, fake, real_engine, max_batch=1)
    a, b = fake.user("ann"), fake.user("bob")
    manager = fake.user("boss", roles=[fake.mod_role])
    await fake.send_command("html", {"prompt": "ann's running page"}, user=a)
    await wait_engine_busy(engine)
    for queued in [
        await fake.send_command("html", {"prompt": "bob's queued page"}, user=b),
        await fake.send_command("html", {"prompt": "ann's queued page"}, user=a),
    ]:
        await queued.wait_for_callback(timeout=3)  # queued once deferred

    mine = await fake.send_command("queue", user=a)
    await mine.wait_for_callback(timeout=3)
    assert mine.is_ephemeral_reply()
    text = mine.visible_text
    assert "ann's running page" in text and "ann's queued page" in text
    assert "bob's queued page" not in text

    everyone = await fake.send_command("queue", user=manager)
    await everyone.wait_for_callback(timeout=3)
    assert "bob's queued page" in everyone.visible_text
    assert f"<@{b.id}>" in everyone.visible_text


async def test_shutdown_during_a_burst_leaves_nobody_waiting(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    """Every interaction Discord saw acknowledged must end with a message, even when the
    bot shuts down while its defers are still in flight."""
    run, engine = await running_and_held(start_bot, fake, real_engine, max_batch=1)
    first = await fake.send_command("html", {"prompt": "running"})
    await wait_engine_busy(engine)
    # Discord accepts these defers at once but its answers reach the bot late, so the
    # shutdown starts while the bot still waits for them.
    fake.delay_next("POST", CALLBACK_PATH, seconds=1.0, times=10)
    burst = [
        await fake.send_command("html", {"prompt": f"p{k}"}, user=fake.user(f"u{k}"))
        for k in range(10)
    ]
    await fake.wait_until(lambda: all(i.callback_type for i in burst), 5)
    engine.release()
    await close_bot(run)
    await first.wait_for_file(".html", timeout=10)
    await asyncio.sleep(0.5)
    silent = [
        i.contents
        for i in burst
        if i.callback_type == CB_DEFERRED_MESSAGE and not i.html_files and not i.contents
    ]
    assert silent == [], f"{len(silent)} deferred interactions were never answered"
