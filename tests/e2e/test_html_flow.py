"""End to end: /html through the real bot, the real engine and the fake Discord."""

from __future__ import annotations

import asyncio
import io
import re
import zipfile
from typing import Any

import html5lib
import pytest

from model.prompting import STYLE_HINTS
from model.types import TextGenerator
from tests.bot.png import png_size
from tests.e2e.helpers import (
    ControlledEngine,
    FixedAnswer,
    StartBot,
    bot_errors,
    discord_problems,
)
from tests.fake_discord import (
    CB_DEFERRED_MESSAGE,
    CB_MESSAGE,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    FOLLOWUP_PATH,
    FakeDiscord,
)

CANCEL = "htmlbot:cancel:"  # the Cancel button's custom_id prefix

pytestmark = pytest.mark.timeout(120)


def parse_html(data: bytes) -> object:
    """Parse like a browser would; html5lib reports parse errors instead of raising."""
    parser = html5lib.HTMLParser(namespaceHTMLElements=False)
    return parser.parse(data.decode("utf-8"))


async def test_command_sync_payload(start_bot: StartBot, fake: FakeDiscord) -> None:
    run = await start_bot(max_prompt_chars=700)
    commands = {c["name"]: c for c in run.sync_payload}
    assert {"html", "queue"} <= set(commands)
    # Synced to the dev guild (instant), not globally.
    assert fake.sync_payloads[-1][0] == fake.guild.id
    for command in run.sync_payload:
        assert 1 <= len(command["description"]) <= 100, command
        assert command["name"] == command["name"].lower()
    html = commands["html"]
    options = {o["name"]: o for o in html["options"]}
    prompt = options["prompt"]
    assert prompt["type"] == 3 and prompt["required"] is True
    assert prompt["min_length"] == 1 and prompt["max_length"] == 700
    style = options["style"]
    assert style["type"] == 3 and not style.get("required", False)
    assert [c["value"] for c in style["choices"]] == list(STYLE_HINTS)
    private = options["private"]
    assert private["type"] == 5 and not private.get("required", False)
    for option in html["options"]:
        assert 1 <= len(option["description"]) <= 100, option


async def test_global_sync_without_dev_guild(start_bot: StartBot, fake: FakeDiscord) -> None:
    await start_bot(dev_guild_id=None)
    assert fake.sync_payloads[-1][0] is None
    assert "html" in {c["name"] for c in fake.commands[None]}


async def test_html_delivers_a_parseable_page(
    start_bot: StartBot, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    run = await start_bot()
    ann = fake.user("ann")
    inter = await fake.send_command(
        "html", {"prompt": "A landing page for a bakery!", "style": "retro"}, user=ann
    )
    await inter.wait_for_callback(timeout=3)
    assert inter.callback_type == CB_DEFERRED_MESSAGE
    assert inter.callback_latency is not None and inter.callback_latency < 3.0

    page = await inter.wait_for_file(".html", timeout=30)
    assert re.fullmatch(r"[a-z0-9-]+\.html", page.filename or "")
    assert "bakery" in (page.filename or "")
    tree = parse_html(page.data)
    assert tree.tag == "html"  # type: ignore[attr-defined]
    assert tree.find("body") is not None  # type: ignore[attr-defined]
    assert len(inter.html_files) == 1

    # The follow-up went out as multipart: payload_json + files[0].
    [followup] = [r for r in inter.ok_requests if r.files]
    assert followup.method == "POST" and re.search(FOLLOWUP_PATH, followup.path)
    assert [p.name for p in followup.parts] == ["payload_json", "files[0]"]
    summary = followup.json["content"]
    assert page.filename in summary and "tokens" in summary
    assert run.bot.model_name in summary

    # The deferred message ends marked done, without a Cancel button.
    await inter.wait_until(lambda i: "Done" in i.original_content)
    assert inter.original is not None
    assert not inter.original["flags"] & FLAG_LOADING
    assert inter.custom_ids(CANCEL) == []
    assert not fake.unhandled_requests
    assert discord_problems(caplog) == []
    assert bot_errors(caplog) == []


async def test_compose_mode_delivers_the_themed_page_of_the_models_words(
    start_bot: StartBot, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    """PAGE_MODE=compose end to end: the engine's form answer becomes a themed, safe page."""
    from tests.bot.fakes import fake_compose_answer

    prompt = "a pricing page for a yoga studio"
    await start_bot(FixedAnswer(fake_compose_answer(prompt)), page_mode="compose")
    inter = await fake.send_command("html", {"prompt": prompt, "style": "dark"})
    page = await inter.wait_for_file(".html", timeout=30)
    text = page.data.decode()
    assert text.count("$12.50") == 3  # the three plans the form asked for
    assert '<style data-theme="dark">' in text
    assert 'http-equiv="Content-Security-Policy"' in text  # SAFETY=standard, the default
    assert "Plan 1 name" not in text  # the form's questions never reach the page
    tree = parse_html(page.data)
    assert tree.find(".//title").text == "Yoga studio"  # type: ignore[attr-defined, union-attr]
    await inter.wait_until(lambda i: "Done" in i.original_content)
    assert bot_errors(caplog) == []


class _EmptyThenPage(FixedAnswer):
    """Answers an empty page first, then a real one: the bot must retry once, silently."""

    def __init__(self) -> None:
        super().__init__("<!DOCTYPE html><html><body></body></html>")
        self.seeds: list[int | None] = []

    def generate(self, requests: Any, progress: Any = None) -> Any:
        self.seeds.extend(r.sampling.seed for r in requests)
        results = super().generate(requests, progress)
        self.text = "<h1>Fresh bread</h1><p>" + "Baked every morning in Lyon. " * 10 + "</p>"
        return results


async def test_an_empty_page_is_generated_again_before_delivery(
    start_bot: StartBot, fake: FakeDiscord
) -> None:
    engine = _EmptyThenPage()
    await start_bot(engine, regenerate_empty=True)
    inter = await fake.send_command("html", {"prompt": "a landing page for a bakery"})
    page = await inter.wait_for_file(".html", timeout=30)
    assert b"Fresh bread" in page.data
    assert len(engine.seeds) == 2 and engine.seeds[0] != engine.seeds[1]
    assert len(inter.html_files) == 1  # the empty page was never sent


async def test_private_reply_is_ephemeral(start_bot: StartBot, fake: FakeDiscord) -> None:
    await start_bot()
    inter = await fake.send_command("html", {"prompt": "a secret page", "private": True})
    await inter.wait_for_file(".html", timeout=30)
    callback = inter.requests[0]
    assert callback.json["type"] == CB_DEFERRED_MESSAGE
    assert callback.json["data"]["flags"] & FLAG_EPHEMERAL
    file_request = next(r for r in inter.ok_requests if r.files)
    assert file_request.json["flags"] & FLAG_EPHEMERAL
    assert all(m["flags"] & FLAG_EPHEMERAL for m in inter.messages)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("   ", "empty"),
        ("x" * 101, "limit is 100"),
        ("a page\x07 that rings", "control character"),
        ("an \u202eevil page", "control character"),
    ],
    ids=["empty", "huge", "control", "bidi"],
)
async def test_bad_prompts_get_a_clear_private_answer(
    start_bot: StartBot, fake: FakeDiscord, prompt: str, expected: str
) -> None:
    run = await start_bot(max_prompt_chars=100)
    inter = await fake.send_command("html", {"prompt": prompt})
    await inter.wait_for_callback(timeout=3)
    assert inter.callback_type == CB_MESSAGE
    assert inter.is_ephemeral_reply()
    assert expected in inter.visible_text
    assert run.bot.scheduler.queued_count == 0 and run.bot.scheduler.running_count == 0
    assert inter.html_files == []


async def test_followup_429_then_200_delivers_once(start_bot: StartBot, fake: FakeDiscord) -> None:
    await start_bot()
    rule = fake.fail_next("POST", FOLLOWUP_PATH, status=429, times=1, retry_after=0.3)
    inter = await fake.send_command("html", {"prompt": "a rate limited page"})
    await inter.wait_for_file(".html", timeout=30)
    posts = [r for r in inter.requests if r.method == "POST" and re.search(FOLLOWUP_PATH, r.path)]
    assert [r.status for r in posts] == [429, 200]
    assert posts[1].time - posts[0].time >= 0.3  # retry_after honoured
    assert len(rule.hits) == 1
    assert len(inter.html_files) == 1


async def test_followup_500_then_200_delivers_once(start_bot: StartBot, fake: FakeDiscord) -> None:
    await start_bot()
    fake.fail_next("POST", FOLLOWUP_PATH, status=500, times=1)
    inter = await fake.send_command("html", {"prompt": "a page despite a hiccup"})
    await inter.wait_for_file(".html", timeout=30)
    posts = [r for r in inter.requests if r.method == "POST" and re.search(FOLLOWUP_PATH, r.path)]
    assert [r.status for r in posts] == [500, 200]
    assert len(inter.html_files) == 1


BIG_PAGE = (
    "<!DOCTYPE html><html><head><title>Big</title></head><body>"
    + "<p>A very repetitive paragraph about bread.</p>\n" * 2000
    + "</body></html>"
)


async def test_page_over_the_attachment_limit_is_zipped(
    start_bot: StartBot, fake: FakeDiscord
) -> None:
    await start_bot(FixedAnswer(BIG_PAGE))
    inter = await fake.send_command("html", {"prompt": "a big page"}, attachment_size_limit=20_000)
    archive = await inter.wait_for_file(".zip", timeout=30)
    assert inter.html_files == []
    assert len(archive.data) <= 20_000
    with zipfile.ZipFile(io.BytesIO(archive.data)) as zf:
        [name] = zf.namelist()
        assert name.endswith(".html")
        page = zf.read(name)
    assert len(page) > 20_000
    parse_html(page)


async def test_page_too_big_even_zipped_is_explained_and_kept(
    start_bot: StartBot, fake: FakeDiscord
) -> None:
    run = await start_bot(FixedAnswer(BIG_PAGE))
    ann = fake.user("ann")
    inter = await fake.send_command(
        "html", {"prompt": "a big page"}, user=ann, attachment_size_limit=200
    )
    await inter.wait_until(lambda i: "upload limit" in i.visible_text, timeout=30)
    assert inter.delivered_files == []
    assert len(await run.bot.store.list(ann.id)) == 1


async def test_upload_refused_is_explained_and_kept(start_bot: StartBot, fake: FakeDiscord) -> None:
    run = await start_bot()
    ann = fake.user("ann")
    fake.fail_next("POST", FOLLOWUP_PATH, status=413, times=1)
    inter = await fake.send_command("html", {"prompt": "a page Discord refuses"}, user=ann)
    await inter.wait_until(lambda i: "❌" in i.visible_text, timeout=30)
    assert "refused" in inter.visible_text and "/mypages" in inter.visible_text
    assert inter.html_files == []
    assert len(await run.bot.store.list(ann.id)) == 1


async def test_interaction_lost_before_defer_is_dropped(
    start_bot: StartBot, fake: FakeDiscord, real_engine: TextGenerator
) -> None:
    # The GPU is busy with another page, so the lost job waits in the queue: it must leave
    # the queue when its defer fails, not run later into a dead interaction.
    engine = ControlledEngine(real_engine)
    engine.hold()
    run = await start_bot(engine, max_batch=1)
    first = await fake.send_command("html", {"prompt": "the page that holds the GPU"})
    await first.wait_for_callback()
    await fake.wait_until(engine.busy.is_set, 5)
    fake.callback_window_s = 0.0  # Discord refuses every callback: "Unknown interaction"
    inter = await fake.send_command("html", {"prompt": "nobody will see this"})
    refused = await inter.wait_for_request("POST", r"/callback$", timeout=5)
    assert refused.status == 404 and refused.response["code"] == 10062
    await fake.wait_until(lambda: run.bot.scheduler.queued_count == 0, 5)
    engine.release()
    await first.wait_for_file(".html", timeout=30)
    await asyncio.sleep(0.5)
    assert engine.prompts == ["the page that holds the GPU"]  # never reached the engine
    assert [r.status for r in inter.requests] == [404]  # nothing sent to a dead interaction


async def test_page_arrives_with_a_png_preview(
    start_bot: StartBot, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    run = await start_bot(preview="on", preview_width=800, preview_height=600)
    assert run.bot.previewer is not None  # the real Chromium
    ann = fake.user("ann")
    inter = await fake.send_command("html", {"prompt": "a landing page for a bakery"}, user=ann)
    page = await inter.wait_for_file(".html", timeout=60)
    # One follow-up, one multipart body: payload_json, the page, then its preview.
    [followup] = [r for r in inter.ok_requests if r.files]
    assert re.search(FOLLOWUP_PATH, followup.path)
    assert [p.name for p in followup.parts] == ["payload_json", "files[0]", "files[1]"]
    html_part, png_part = followup.files
    assert html_part.filename == page.filename == "landing-bakery.html"
    assert png_part.filename == "landing-bakery.png"
    assert png_size(png_part.data) == (800, 600)
    assert png_part.content_type in (None, "image/png", "application/octet-stream")
    [message] = [m for m in inter.followups if m.get("attachments")]
    assert [a["filename"] for a in message["attachments"]] == [
        "landing-bakery.html",
        "landing-bakery.png",
    ]
    assert bot_errors(caplog) == []

    # /mypages sends the kept page again, without a preview.
    [stored] = await run.bot.store.list(ann.id)
    again = await fake.send_command("mypages", {"page": stored.job_id}, user=ann)
    await again.wait_for_file(".html", timeout=10)
    assert [p.filename for p in again.delivered_files] == ["landing-bakery.html"]
