"""The preview in delivery: both files in one follow-up, the limit, and failures that leave
the page alone (through the fake Discord, with fake "chromium" scripts; the real Chromium
is in test_preview.py and tests/e2e)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest

from bot.delivery import Delivery, send_page_followup
from bot.jobs import Job
from bot.metrics import Metrics
from bot.preview import Previewer
from bot.store import ResultStore
from tests.bot.conftest import StartBot
from tests.bot.fakes import FakeEngine
from tests.bot.test_delivery import RecordingInteraction
from tests.bot.test_preview import fake_chromium
from tests.fake_discord import FOLLOWUP_PATH, FakeDiscord

pytestmark = pytest.mark.timeout(60)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 992  # 1000 bytes


async def _send(limit: int, data: bytes) -> list[str]:
    interaction = RecordingInteraction(limit)
    await send_page_followup(
        interaction,
        filename="bakery.html",
        data=data,
        content="**bakery.html**",
        too_big="too big",
        ephemeral=False,
        what="t",
        preview=PNG,
    )
    [sent] = interaction.followup.sent
    return [f.filename for f in sent.get("files", [])]


async def test_page_and_preview_go_together_and_the_preview_is_dropped_first() -> None:
    page = b"<html>" + b"a" * 994 + b"</html>"  # 1007 bytes
    assert await _send(10_000, page) == ["bakery.html", "bakery.png"]
    assert await _send(2007, page) == ["bakery.html", "bakery.png"]  # exactly the limit
    assert await _send(2006, page) == ["bakery.html"]  # the page alone still fits
    big = b"<html>" + b"lorem ipsum " * 5000 + b"</html>"
    assert await _send(10_000, big) == ["bakery.zip", "bakery.png"]


class _CountingPreviewer(Previewer):
    def __init__(self) -> None:
        super().__init__("unused", timeout_s=15.0)
        self.calls = 0

    async def try_render(self, html: bytes, *, what: str, timeout_s: float | None = None) -> Any:
        self.calls += 1
        return PNG


async def test_no_preview_when_the_token_is_about_to_expire(tmp_path: Path) -> None:
    previewer = _CountingPreviewer()
    delivery = Delivery(ResultStore(tmp_path), Metrics(), model_name="m", previewer=previewer)
    job = Job.create(user_id=1, prompt="a bakery", ttl_s=900)
    assert await delivery.render_preview(job, b"<p>x</p>") == PNG
    job.expires_at = time.monotonic() + 3  # less than the upload margin plus a render
    assert await delivery.render_preview(job, b"<p>x</p>") is None
    assert previewer.calls == 1


async def test_a_hanging_chromium_costs_the_preview_not_the_page(
    fake: FakeDiscord, start_bot: StartBot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = fake_chromium(tmp_path, "sleep 60")
    bot = await start_bot(
        FakeEngine(), preview="on", preview_chromium=str(script), preview_timeout_s=0.5
    )
    assert bot.previewer is not None and bot.previewer.binary == str(script)
    inter = await fake.send_command("html", {"prompt": "a bakery"})
    page = await inter.wait_for_file(".html", timeout=10)
    assert page.filename == "bakery.html"
    assert inter.files_named(".png") == []
    [followup] = [r for r in inter.ok_requests if r.files]
    assert [p.filename for p in followup.files] == ["bakery.html"]
    assert any("no preview: Chromium took over 0.5 s" in r.getMessage() for r in caplog.records)


async def test_no_chromium_with_preview_auto_delivers_without_one(
    fake: FakeDiscord,
    start_bot: StartBot,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium on it
    with caplog.at_level(logging.INFO, logger="bot.client"):
        bot = await start_bot(FakeEngine(), preview="auto")
    assert bot.previewer is None
    assert any("no Chromium found" in r.getMessage() for r in caplog.records)
    inter = await fake.send_command("html", {"prompt": "a bakery"})
    await inter.wait_for_file(".html", timeout=10)
    posts = [r for r in inter.ok_requests if r.files]
    assert [[p.filename for p in r.files] for r in posts] == [["bakery.html"]]
    assert posts[0].method == "POST" and re.search(FOLLOWUP_PATH, posts[0].path)
