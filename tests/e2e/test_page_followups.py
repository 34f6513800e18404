"""Iterating on a delivered page through its buttons, and per-server limits, end to end.

The real bot (local backend) and the tiny real model against the fake Discord: Regenerate,
Refine (a modal) and the style switch each make the next version of the page; only its
owner may use them; /mypages lists the versions; /settings limits (per role too) are
enforced and told. Also: a refine refined again, a refine whose token dies (kept for
/mypages), and Regenerate pressed on an old message after a restart of a Redis-backend bot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from model.types import GenerationRequest, GenerationResult, ProgressCallback, TextGenerator
from tests.e2e.helpers import ControlledEngine, StartBot
from tests.e2e.redis_helpers import (
    new_prefix,
    redis_settings,
    start_redis_bot,
    start_worker,
    stop_redis_bot,
)
from tests.fake_discord import FakeDiscord, FakeInteraction, FakeRole, FakeUser
from tests.fake_discord.payloads import snowflake
from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)


class Recording:
    """The real engine, keeping every request it was given."""

    def __init__(self, inner: TextGenerator) -> None:
        self.inner = inner
        self.requests: list[GenerationRequest] = []

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        self.requests.extend(requests)
        return self.inner.generate(requests, progress)


def page_ids(inter: FakeInteraction, prefix: str) -> list[str]:
    return inter.custom_ids(prefix)


async def delivered(inter: FakeInteraction) -> Any:
    page = await inter.wait_for_file(".html", timeout=60)
    await inter.wait_until(lambda i: bool(i.custom_ids("htmlbot:regen:")), timeout=10)
    return page


async def test_regenerate_refine_and_restyle_make_versions_of_one_page(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    engine = Recording(real_engine)
    await start_bot(engine)
    ann, bob = fake.user("ann"), fake.user("bob")
    first = await fake.send_command("html", {"prompt": "a bakery in Lyon"}, user=ann)
    await delivered(first)
    [regen] = page_ids(first, "htmlbot:regen:")
    [refine] = page_ids(first, "htmlbot:refine:")
    [style] = page_ids(first, "htmlbot:style:")
    assert "v1" in first.followups[-1]["content"]

    # Someone else's page: refused, privately, and nothing is queued.
    theirs = await fake.press_button(regen, user=bob, message=first)
    await theirs.wait_for_callback(timeout=5)
    assert theirs.is_ephemeral_reply() and "Only the person who made" in theirs.visible_text
    assert len(engine.requests) == 1

    again = await fake.press_button(regen, user=ann, message=first)
    await delivered(again)
    assert "v2" in again.followups[-1]["content"]
    assert engine.requests[-1].prompt == "a bakery in Lyon"
    assert engine.requests[-1].sampling.seed != engine.requests[0].sampling.seed

    opened = await fake.press_button(refine, user=ann, message=first)
    await opened.wait_for_callback(timeout=5)
    assert opened.modal is not None
    submitted = await fake.submit_modal(opened, {"instruction": "add a section about hours"})
    await delivered(submitted)
    refined = engine.requests[-1]
    assert refined.prompt == "add a section about hours"
    assert refined.description == "a bakery in Lyon" and refined.source_page
    assert "v3" in submitted.followups[-1]["content"]

    asked = len(engine.requests)
    restyled = await fake.choose(first, style, ["dark"], user=ann)
    page = await delivered(restyled)
    assert len(engine.requests) == asked  # no model for a style switch
    assert "v4" in restyled.visible_text and "dark" in restyled.visible_text
    assert page.data.lstrip().lower().startswith(b"<!doctype html")

    listing = await fake.send_command("mypages", {}, user=ann)
    await listing.wait_for_callback(timeout=5)
    for label in ("v1", "v2", "v3", "v4"):
        assert label in listing.visible_text


async def test_a_server_limit_is_enforced_and_explained(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    await start_bot(real_engine)
    admin = fake.user("boss", roles=[fake.mod_role])
    member = fake.user("cat")
    refused = await fake.send_command(
        "settings set", {"setting": "pages_per_day", "value": "1"}, user=member
    )
    await refused.wait_for_callback(timeout=5)
    assert "Manage Server" in refused.visible_text
    changed = await fake.send_command(
        "settings set", {"setting": "pages_per_day", "value": "1"}, user=admin
    )
    await changed.wait_for_callback(timeout=5)
    assert "1" in changed.visible_text

    made = await fake.send_command("html", {"prompt": "a shop"}, user=member)
    await made.wait_for_file(".html", timeout=60)
    over = await fake.send_command("html", {"prompt": "another shop"}, user=member)
    await over.wait_for_callback(timeout=5)
    assert over.is_ephemeral_reply()
    assert "a day" in over.visible_text and "next one in" in over.visible_text


async def open_refine(
    fake: FakeDiscord, message: FakeInteraction, user: FakeUser, instruction: str, **kw: Any
) -> FakeInteraction:
    """Press the Refine button on ``message`` and submit its modal with ``instruction``."""
    [refine] = page_ids(message, "htmlbot:refine:")
    opened = await fake.press_button(refine, user=user, message=message)
    await opened.wait_for_callback(timeout=5)
    assert opened.modal is not None, opened.visible_text
    return await fake.submit_modal(opened, {"instruction": instruction}, **kw)


async def test_a_refined_page_can_be_refined_again_from_its_own_buttons(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    engine = Recording(real_engine)
    await start_bot(engine)
    ann = fake.user("ann")
    first = await fake.send_command("html", {"prompt": "a florist in Nantes"}, user=ann)
    v1 = await delivered(first)

    second = await open_refine(fake, first, ann, "make the header green")
    v2 = await delivered(second)
    assert "v2" in second.followups[-1]["content"]
    assert engine.requests[-1].source_page == v1.data.decode("utf-8")
    # v2's message carries buttons of its own version, not v1's.
    assert page_ids(second, "htmlbot:refine:") != page_ids(first, "htmlbot:refine:")

    third = await open_refine(fake, second, ann, "add a footer with the address")
    await delivered(third)
    assert "v3" in third.followups[-1]["content"]
    last = engine.requests[-1]
    assert last.prompt == "add a footer with the address"
    assert last.description == "a florist in Nantes"
    assert last.source_page == v2.data.decode("utf-8")
    assert len(engine.requests) == 3


async def test_a_refine_whose_token_dies_is_kept_for_mypages(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    engine = ControlledEngine(real_engine)
    run = await start_bot(engine)
    ann = fake.user("ann")
    first = await fake.send_command("html", {"prompt": "a tea room"}, user=ann)
    await delivered(first)
    engine.hold()
    submitted = await open_refine(fake, first, ann, "add a price list")
    await submitted.wait_for_callback(timeout=5)
    assert submitted.deferred
    await asyncio.to_thread(engine.busy.wait, 10)  # the refine is in the model now
    fake.expire(submitted)
    engine.release()

    async def kept() -> bool:
        pages = await run.bot.commands.pages.list(ann.id)
        return any(p.label == "v2" for p in pages)

    deadline = asyncio.get_running_loop().time() + 30
    while not await kept():
        assert asyncio.get_running_loop().time() < deadline, "the refined page was not kept"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # room for a (wrong) retry with the dead token
    assert submitted.html_files == []
    refused = [i for i, r in enumerate(submitted.requests) if r.status in (401, 404)]
    assert refused, "the bot never tried the dead token"
    assert submitted.requests[refused[0] + 1 :] == []

    listing = await fake.send_command("mypages", {}, user=ann)
    await listing.wait_for_callback(timeout=5)
    assert "v2" in listing.visible_text and "v1" in listing.visible_text


async def settings_reply(
    fake: FakeDiscord, command: str, options: dict[str, Any], user: FakeUser
) -> str:
    inter = await fake.send_command(command, options, user=user)
    await inter.wait_for_callback(timeout=5)
    return inter.visible_text


async def test_a_role_limit_is_enforced_and_explained(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    await start_bot(real_engine)
    vip = FakeRole(id=snowflake(), name="VIP", permissions=0, position=2)
    fake.guild.roles.append(vip)
    admin = fake.user("boss", roles=[fake.mod_role])
    dee, eve = fake.user("dee", roles=[vip]), fake.user("eve")
    told = await settings_reply(
        fake, "settings set", {"setting": "pages_per_day", "value": "1"}, admin
    )
    assert "1 a day" in told
    told = await settings_reply(
        fake, "settings role", {"role": vip, "limit": "pages_per_day", "value": "2"}, admin
    )
    assert f"<@&{vip.id}>" in told and "2 a day" in told

    made = {}
    for user, count in ((dee, 2), (eve, 1)):
        for n in range(count):
            inter = await fake.send_command("html", {"prompt": f"shop {n}"}, user=user)
            await inter.wait_for_file(".html", timeout=60)
        over = await fake.send_command("html", {"prompt": "one too many"}, user=user)
        await over.wait_for_callback(timeout=5)
        assert over.is_ephemeral_reply() and over.html_files == []
        made[user.username] = over.visible_text
    assert "You can make 2 pages a day" in made["dee"] and "next one in" in made["dee"]
    assert "You can make 1 pages a day" in made["eve"] and "next one in" in made["eve"]


async def test_regenerate_works_after_a_restart_of_the_redis_bot(
    fake: FakeDiscord, tmp_path: Path, redis_server: RedisServer, real_engine: TextGenerator
) -> None:
    prefix = new_prefix()
    settings = redis_settings(fake, tmp_path, redis_server, prefix)
    engine = Recording(real_engine)
    worker = await start_worker(
        redis_settings(fake, tmp_path, redis_server, prefix, results_dir=tmp_path / "worker"),
        engine,
    )
    run = await start_redis_bot(fake, settings)
    try:
        ann = fake.user("ann")
        first = await fake.send_command("html", {"prompt": "a cycling club"}, user=ann)
        await delivered(first)
        [regen] = page_ids(first, "htmlbot:regen:")
        await stop_redis_bot(run)
        run = await start_redis_bot(fake, settings)

        again = await fake.press_button(regen, user=ann, message=first)
        await delivered(again)
        await asyncio.sleep(1.0)  # room for a second (wrong) delivery
        assert len(again.html_files) == 1
        assert "v2" in again.followups[-1]["content"]
        assert [r.prompt for r in engine.requests] == ["a cycling club"] * 2
        assert len(first.html_files) == 1
    finally:
        await worker.stop()
        await stop_redis_bot(run)


async def test_a_version_sent_again_by_mypages_can_be_refined_again(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    engine = Recording(real_engine)
    await start_bot(engine)
    ann = fake.user("ann")
    first = await fake.send_command("html", {"prompt": "a flower shop"}, user=ann)
    await delivered(first)
    [regen] = page_ids(first, "htmlbot:regen:")
    job_id = regen.removeprefix("htmlbot:regen:")
    again = await fake.send_command("mypages", {"page": job_id}, user=ann)
    await again.wait_for_file(".html", timeout=10)
    await again.wait_until(lambda i: bool(i.custom_ids("htmlbot:regen:")), timeout=10)
    assert page_ids(again, "htmlbot:regen:") == [regen]  # the same version's buttons
    assert "v1" in again.visible_text
    pressed = await fake.press_button(regen, user=ann, message=again)
    await delivered(pressed)
    assert "v2" in pressed.followups[-1]["content"]
    assert len(engine.requests) == 2
