"""Iterating on a delivered page through its buttons, and per-server limits, end to end.

The real bot (local backend) and the tiny real model against the fake Discord: Regenerate,
Refine (a modal) and the style switch each make the next version of the page; only its
owner may use them; /mypages lists the versions; /settings limits (per role too) are
enforced and told. Also: a refine refined again, a refine whose token dies (kept for
/mypages), and Regenerate pressed on an old message after a restart of a Redis-backend bot.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
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
from tests.fake_discord.components import custom_ids
from tests.fake_discord.payloads import snowflake
from tests.fake_discord.records import Part
from tests.model.test_refine_restyle import visible_text
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


@dataclass
class Version:
    """A version as the user finds it: the message it came in and its page."""

    message: dict[str, Any]
    page: Part

    @property
    def channel_id(self) -> int:
        return int(self.message["channel_id"])

    @property
    def text(self) -> str:
        return str(self.message.get("content") or "")


def posted_version(fake: FakeDiscord, pressed: FakeInteraction, label: str) -> Version | None:
    """Version ``label`` made by ``pressed``: a follow-up of it, or a post in a thread."""
    for request in fake.find_requests("POST", ok=True):
        pages = [part for part in request.files if (part.filename or "").endswith(".html")]
        if not pages or label not in (request.content or ""):
            continue
        in_thread = re.search(r"/channels/\d+/messages$", request.path) is not None
        if in_thread or any(request is mine for mine in pressed.requests):
            message = fake.messages.get(int(request.response["id"]))
            if message is not None:
                return Version(message, pages[0])
    return None


async def next_version(
    fake: FakeDiscord, pressed: FakeInteraction, label: str, wait_s: float = 60
) -> Version:
    """Wait for version ``label`` of the page ``pressed`` continues, with its buttons."""
    found: list[Version] = []

    def arrived() -> bool:
        version = posted_version(fake, pressed, label)
        if version is None or not version.message.get("components"):
            return False
        found.append(version)
        return True

    try:
        await fake.wait_until(arrived, timeout=wait_s)
    except TimeoutError:
        recent = "\n  ".join(f"{r!r} {r.content!r}" for r in fake.requests[-12:])
        raise AssertionError(f"{label} never arrived; recent requests:\n  {recent}") from None
    return found[-1]


def versions_posted(fake: FakeDiscord, label: str) -> int:
    """How many pages labelled ``label`` Discord accepted, anywhere."""
    return sum(
        1
        for request in fake.find_requests("POST", ok=True)
        if label in (request.content or "")
        and any((part.filename or "").endswith(".html") for part in request.files)
    )


def buttons(message: dict[str, Any], prefix: str) -> list[str]:
    return [c for c in custom_ids(message.get("components") or []) if c.startswith(prefix)]


async def test_regenerate_refine_and_restyle_make_versions_of_one_page(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    engine = Recording(real_engine)
    await start_bot(engine)
    ann, bob = fake.user("ann"), fake.user("bob")
    first = await fake.send_command("html", {"prompt": "a bakery in Lyon"}, user=ann)
    await delivered(first)
    [regen] = page_ids(first, "htmlbot:regen:")
    v1_message = first.followups[-1]
    assert "v1" in v1_message["content"]
    assert int(v1_message["channel_id"]) == fake.channel.id

    # Someone else's page: refused, privately, and nothing is queued.
    theirs = await fake.press_button(regen, user=bob, message=first)
    await theirs.wait_for_callback(timeout=5)
    assert theirs.is_ephemeral_reply() and "Only the person who made" in theirs.visible_text
    assert len(engine.requests) == 1

    # The first follow-up starts the page's thread on v1's message and posts v2 there.
    again = await fake.press_button(regen, user=ann, message=first)
    v2 = await next_version(fake, again, "v2")
    thread = fake.thread_of(v1_message)
    assert thread is not None and thread.parent_id == fake.channel.id
    assert "bakery" in thread.name
    assert v2.channel_id == thread.id
    await again.wait_until(lambda i: f"<#{thread.id}>" in i.visible_text, timeout=10)
    assert again.html_files == []  # the page is in the thread, not twice
    assert engine.requests[-1].prompt == "a bakery in Lyon"
    assert engine.requests[-1].sampling.seed != engine.requests[0].sampling.seed

    # Refine pressed on v2 inside the thread: answered there, v3 made from v2.
    [refine_v2] = buttons(v2.message, "htmlbot:refine:")
    submitted = await open_refine(fake, v2.message, ann, "add a section about hours")
    assert submitted.channel_id == thread.id
    v3 = await next_version(fake, submitted, "v3")
    assert v3.channel_id == thread.id
    refined = engine.requests[-1]
    assert refined.prompt == "add a section about hours"
    assert refined.description == "a bakery in Lyon"
    assert refined.source_page == v2.page.data.decode("utf-8")
    assert refine_v2.removeprefix("htmlbot:refine:") != regen.removeprefix("htmlbot:regen:")

    # The style switch on the refined version: v4, same words, another theme, no model.
    asked = len(engine.requests)
    [style_v3] = buttons(v3.message, "htmlbot:style:")
    restyled = await fake.choose(v3.message, style_v3, ["dark"], user=ann)
    v4 = await next_version(fake, restyled, "v4")
    assert len(engine.requests) == asked
    assert v4.channel_id == thread.id and "dark" in v4.text
    v3_html, v4_html = v3.page.data.decode("utf-8"), v4.page.data.decode("utf-8")
    assert v4_html != v3_html and visible_text(v4_html) == visible_text(v3_html)
    pages_in_thread = [
        m["id"]
        for m in fake.thread_messages(thread)
        if any(a["filename"].endswith(".html") for a in m.get("attachments") or [])
    ]
    assert pages_in_thread == [v.message["id"] for v in (v2, v3, v4)]

    listing = await fake.send_command("mypages", {}, user=ann)
    await listing.wait_for_callback(timeout=5)
    for label in ("v1", "v2", "v3", "v4"):
        assert label in listing.visible_text


async def test_without_thread_permission_versions_come_below_the_press(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    await start_bot(real_engine)
    ann = fake.user("ann")
    first = await fake.send_command("html", {"prompt": "a ski school"}, user=ann)
    await delivered(first)
    fake.fail_next(
        "POST", r"/messages/\d+/threads$", status=403, times=5,
        body={"message": "Missing Permissions", "code": 50013},
    )  # fmt: skip
    [regen] = page_ids(first, "htmlbot:regen:")
    again = await fake.press_button(regen, user=ann, message=first)
    v2 = await next_version(fake, again, "v2")
    assert v2.channel_id == fake.channel.id and again.html_files  # a follow-up, as before
    assert fake.thread_of(first.followups[-1]) is None


async def test_a_private_page_gets_no_thread(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    await start_bot(real_engine)
    ann = fake.user("ann")
    first = await fake.send_command("html", {"prompt": "a diary", "private": True}, user=ann)
    await delivered(first)
    [regen] = page_ids(first, "htmlbot:regen:")
    again = await fake.press_button(regen, user=ann, message=first)
    v2 = await next_version(fake, again, "v2")
    assert again.html_files and v2.message["flags"] & 64  # ephemeral, below the press
    assert fake.find_requests("POST", r"/threads$") == []


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
    fake: FakeDiscord,
    message: FakeInteraction | dict[str, Any],
    user: FakeUser,
    instruction: str,
    **kw: Any,
) -> FakeInteraction:
    """Press the Refine button on ``message`` (an interaction's, or a message in a thread)
    and submit its modal with ``instruction``."""
    [refine] = (
        page_ids(message, "htmlbot:refine:")
        if isinstance(message, FakeInteraction)
        else buttons(message, "htmlbot:refine:")
    )
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
    v2 = await next_version(fake, second, "v2")
    assert engine.requests[-1].source_page == v1.data.decode("utf-8")
    # v2's message carries buttons of its own version, not v1's.
    assert buttons(v2.message, "htmlbot:refine:") != page_ids(first, "htmlbot:refine:")

    third = await open_refine(fake, v2.message, ann, "add a footer with the address")
    v3 = await next_version(fake, third, "v3")
    assert v3.channel_id == v2.channel_id  # the same thread
    last = engine.requests[-1]
    assert last.prompt == "add a footer with the address"
    assert last.description == "a florist in Nantes"
    assert last.source_page == v2.page.data.decode("utf-8")
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
    # The thread needs no interaction token: the version still reaches it.
    v2 = await next_version(fake, submitted, "v2", wait_s=10)
    assert fake.thread_of(first.followups[-1]) is not None
    assert v2.channel_id == fake.thread_of(first.followups[-1]).id  # type: ignore[union-attr]
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
        await next_version(fake, again, "v2")
        await asyncio.sleep(1.0)  # room for a second (wrong) delivery
        assert versions_posted(fake, "v2") == 1
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
    await next_version(fake, pressed, "v2")
    assert len(engine.requests) == 2
