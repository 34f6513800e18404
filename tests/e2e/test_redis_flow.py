"""The Redis backend end to end: real bots and workers, a real redis-server, the fake Discord."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path

import pytest

from model.types import TextGenerator
from tests.e2e.helpers import bot_errors
from tests.e2e.redis_helpers import (
    new_prefix,
    redis_settings,
    start_redis_bot,
    start_worker,
    stop_redis_bot,
)
from tests.fake_discord import FakeDiscord
from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(180)


async def test_a_page_goes_through_redis_once(
    fake: FakeDiscord,
    tmp_path: Path,
    redis_server: RedisServer,
    real_engine: TextGenerator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = redis_settings(fake, tmp_path, redis_server, new_prefix())
    run = await start_redis_bot(fake, settings)
    worker = await start_worker(settings, real_engine)
    try:
        ann = fake.user("ann")
        inter = await fake.send_command("html", {"prompt": "a bakery"}, user=ann)
        page = await inter.wait_for_file(".html", timeout=30)
        assert page.data.lstrip().lower().startswith(b"<!doctype html")
        assert "/mypages page:" in inter.original_content
        await asyncio.sleep(1.0)  # nothing more may come
        assert Counter(f.filename for f in inter.html_files) == {page.filename: 1}
        listing = await fake.send_command("mypages", {}, user=ann)
        await listing.wait_for_callback(timeout=5)
        assert page.filename in listing.visible_text
    finally:
        await worker.stop()
        await stop_redis_bot(run)
    assert bot_errors(caplog) == []
