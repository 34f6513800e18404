"""Iterating on a delivered page through its buttons, and per-server limits, end to end.

The real bot (local backend) and the tiny real model against the fake Discord: Regenerate,
Refine (a modal) and the style switch each make the next version of the page; only its
owner may use them; /mypages lists the versions; /settings limits are enforced and told.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from model.types import GenerationRequest, GenerationResult, ProgressCallback, TextGenerator
from tests.e2e.helpers import StartBot
from tests.fake_discord import FakeDiscord, FakeInteraction

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
