"""The one-process bot (local backend) SIGKILLed with jobs running and queued, then restarted.

Real ``python -m bot`` processes against the in-test fake Discord, the tiny model on the CPU,
the default SQLite journal. Before the journal, a kill left its users on "Generating…" for
ever, and their old Cancel button answered that the request "already finished". Here:

* a page delivered before the kill is not delivered again;
* the job that was running and the queued ones all run after the restart, each page
  delivered exactly once, every message ending on "Done";
* the queued jobs' status messages are edited again by the new process (through the
  interaction webhook: the new process never saw those interactions arrive);
* the old Cancel button of a resumed queued job cancels it: "Cancelled", and no page.
"""

# Polling is deliberate: the state watched belongs to another process; every wait is bounded.
# ruff: noqa: ASYNC110

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bot import texts
from bot.status import CANCEL_PREFIX
from tests.fake_discord import (
    CB_DEFERRED_MESSAGE,
    CB_UPDATE_MESSAGE,
    FakeDiscord,
    FakeInteraction,
    RecordedRequest,
)

CANCEL = "htmlbot:cancel:"  # the Cancel button's custom_id prefix

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
# Enough for a job to take a few seconds on a CPU with the tiny model (5-15 ms a token on
# a busy 2-core machine): the kill lands while one runs and others wait.
MAX_NEW_TOKENS = 1000
START_TIMEOUT_S = 120.0
PAGE_TIMEOUT_S = 120.0


def bot_env(fake: FakeDiscord, tmp_path: Path, model: Path) -> dict[str, str]:
    """The environment of both bot processes (the same, as for a restart)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "QUEUE_"))}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "DISCORD_TOKEN": fake.bot_token,
            "DISCORD_API_BASE": fake.api_base,
            "DISCORD_GATEWAY_URL": fake.gateway_url,
            "DEV_GUILD_ID": str(fake.guild.id),
            "RESULTS_DIR": str(tmp_path / "results"),
            "MODEL_BASE": str(model),
            "MODEL_DEVICE": "cpu",
            "ENGINE": "standard",
            "MAX_BATCH": "1",
            "MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
            "PAGE_MODE": "document",
            "PREVIEW": "off",
            "REGENERATE_EMPTY": "false",
            "QUEUE_EDIT_INTERVAL_S": "0.2",
            "EDITS_PER_SECOND": "50",
            "LOG_LEVEL": "INFO",
        }
    )
    return env


class BotProcess:
    """One ``python -m bot`` child; its log goes to a file (a pipe could fill and block it)."""

    def __init__(self, env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("wb") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot",
                cwd=self.cwd,  # no .env there
                env=self.env,
                stdout=log_file,
                stderr=log_file,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 30)

    async def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 60)

    async def cleanup(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture
async def bots(
    fake: FakeDiscord, tmp_path: Path, tiny_model_folder: Path
) -> AsyncIterator[Callable[[str], BotProcess]]:
    """``bots(name)``: a new bot process (not started) with the shared environment."""
    made: list[BotProcess] = []
    env = bot_env(fake, tmp_path, tiny_model_folder)

    def make(name: str) -> BotProcess:
        process = BotProcess(env, tmp_path, tmp_path / f"{name}.log")
        made.append(process)
        return process

    yield make
    for process in made:
        await process.cleanup()


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:  # noqa: ASYNC109
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def connected(fake: FakeDiscord, process: BotProcess, sessions_before: int) -> None:
    """Wait until ``process`` has a ready gateway session of its own (a new one)."""

    def ready() -> bool:
        assert process.process is not None
        if process.process.returncode is not None:
            raise AssertionError(f"the bot exited at start:\n{process.log[-3000:]}")
        return len(fake.sessions) > sessions_before and fake.sessions[-1].live

    await until(ready, START_TIMEOUT_S, "the bot to connect")


def status_edits(inter: FakeInteraction, since_seq: int = 0) -> list[RecordedRequest]:
    """Accepted edits of the interaction's @original message from request ``since_seq`` on."""
    return [
        r
        for r in inter.ok_requests
        if r.seq >= since_seq and r.method == "PATCH" and r.path.endswith("/messages/@original")
    ]


def job_id_of(inter: FakeInteraction) -> str:
    [custom_id] = [c for c in inter.custom_ids() if c.startswith(CANCEL_PREFIX)]
    return custom_id.removeprefix(CANCEL_PREFIX)


async def test_sigkilled_bot_resumes_running_and_queued_jobs(
    fake: FakeDiscord, tmp_path: Path, bots: Callable[[str], BotProcess]
) -> None:
    # Two CPU-bound processes and this fake share 2 cores: give the defer some slack (the
    # 3 s window itself is test_queue's business).
    fake.callback_window_s = 15.0
    first = bots("first")
    await first.start()
    await fake.wait_for_sync(timeout=START_TIMEOUT_S)
    await connected(fake, first, 0)

    ann, bob, cat, dan = (fake.user(n) for n in ("ann", "bob", "cat", "dan"))
    # Sent one after the other, so the fair order is this one: ann's second job comes last.
    order = [(ann, "a bakery"), (bob, "a florist"), (cat, "a cafe"), (dan, "a garage")]
    order.append((ann, "a bookshop"))
    inters: list[FakeInteraction] = []
    for user, prompt in order:
        inter = await fake.send_command("html", {"prompt": prompt}, user=user)
        await inter.wait_for_callback(timeout=20)
        assert inter.callback_type == CB_DEFERRED_MESSAGE
        inters.append(inter)
    done_before, running, *queued = inters

    # The kill lands once the first page is out, the second job is generating and the
    # others show their place in the queue.
    await done_before.wait_for_file(".html", timeout=PAGE_TIMEOUT_S)
    await until(
        lambda: (
            running.original_content.startswith(texts.GENERATING)
            and all(i.original_content.startswith("⏳ Queued: position") for i in queued)
        ),
        PAGE_TIMEOUT_S,
        "one job generating and three queued",
    )
    # The first page's delivery is journaled right after its upload; let that land.
    await asyncio.sleep(0.5)
    assert not running.html_files, "the running job finished before the kill"
    job_ids = {job_id_of(i): i for i in [running, *queued]}
    await first.kill()
    state_db = tmp_path / "results" / "htmlbot.sqlite3"
    assert state_db.exists()
    assert "Traceback" not in first.log, first.log[-3000:]

    since = len(fake.requests)
    sessions_before = len(fake.sessions)
    second = bots("second")
    await second.start()
    await connected(fake, second, sessions_before)

    # The new process picks up the status messages of the queued jobs (the last ones can't
    # have started yet: one job at a time, a few seconds each).
    await until(
        lambda: all(status_edits(i, since) for i in queued[1:]),
        START_TIMEOUT_S,
        "the new process to edit the queued jobs' messages",
    )
    assert "resuming 4 job(s) of the previous run and delivering 0 finished one(s)" in second.log

    # The old Cancel button of the last queued job (ann's second) works after the restart.
    cancelled = queued[-1]
    cancel_id = job_id_of(cancelled)
    press = await fake.press_button(f"{CANCEL_PREFIX}{cancel_id}", user=ann)
    await press.wait_for_callback(timeout=20)
    assert press.callback_type == CB_UPDATE_MESSAGE, press.contents
    assert texts.ALREADY_FINISHED not in press.visible_text
    assert cancelled.original_content == texts.CANCELLED
    assert cancelled.custom_ids(CANCEL) == []

    # Everything else is delivered, once.
    for inter in [running, *queued[:-1]]:
        await inter.wait_for_file(".html", timeout=PAGE_TIMEOUT_S)
    await until(
        lambda: all(i.original_content.startswith("✅ Done") for i in inters[:-1]),
        30,
        "the final edits",
    )
    await asyncio.sleep(1.5)  # any duplicate or late edit shows up meanwhile
    for inter in inters[:-1]:
        assert len(inter.html_files) == 1, (inter, inter.contents)
        assert inter.custom_ids(CANCEL) == [], inter.contents  # no Cancel left on a done job
    assert cancelled.html_files == [], cancelled.contents
    assert cancelled.original_content == texts.CANCELLED
    # The page delivered before the kill was not touched by the new process.
    assert [r for r in done_before.requests if r.seq >= since] == []
    # The resumed pages came through the new process (its webhook follow-ups).
    uploads = []
    for inter in [running, *queued[:-1]]:
        [upload] = [r for r in inter.ok_requests if r.files]
        assert upload.seq >= since
        uploads.append(upload.seq)
    # In their old order: the interrupted job first, then the queue as it was (one at a time).
    assert uploads == sorted(uploads)
    assert set(job_ids) == {job_id_of_done(i) for i in [running, *queued[:-1]]} | {cancel_id}

    # Discord refused nothing the new process sent, and it used only known routes.
    refused = [r for r in fake.requests[since:] if not r.ok]
    assert refused == [], refused[:5]
    assert not fake.unhandled_requests

    assert await second.stop() == 0, second.log[-3000:]
    log_text = second.log
    assert "shutdown complete" in log_text
    assert "Traceback" not in log_text, log_text[-3000:]
    assert fake.bot_token not in first.log + log_text


def job_id_of_done(inter: FakeInteraction) -> str:
    """The job id a finished job's message names (``/mypages page:<id>``)."""
    marker = "/mypages page:"
    content = inter.original_content
    assert marker in content, content
    return content.split(marker, 1)[1].split("`", 1)[0]
