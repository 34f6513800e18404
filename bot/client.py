"""``HtmlBot``: the discord.py client that ties commands, scheduler, worker and delivery.

Run it as ``async with HtmlBot(settings, engine) as bot: await bot.start(token)``.
``setup_hook`` starts the worker thread and the background tasks and syncs the commands;
``close`` shuts down gracefully (see :meth:`HtmlBot.close`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Coroutine
from typing import Any

import discord
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.commands import HtmlCommandTree, on_component, register_commands
from bot.delivery import (
    SHUTDOWN_STOPPED_TEXT,
    SHUTDOWN_TEXT,
    Delivery,
    send_page_followup,
)
from bot.jobs import Job, JobState
from bot.loopmon import LagMonitor
from bot.metrics import Metrics
from bot.preview import Previewer, find_chromium
from bot.scheduler import Scheduler, Throughput
from bot.settings import DEFAULT_API_BASE, Settings
from bot.status import StatusBoard, Ticket
from bot.store import ResultStore, StoredPage
from bot.worker import Worker
from model.types import SamplingParams

log = logging.getLogger(__name__)

# How long deliveries may take to finish once the worker has stopped, at shutdown.
DELIVERY_DRAIN_S = 15.0
# How long the background tasks (status board, lag monitor) get to end once cancelled.
BACKGROUND_STOP_S = 5.0


GUILDS_INTENT_NOTICE = "Guilds intent seems to be disabled"


class _DropGuildsIntentNotice(logging.Filter):
    """Drops discord.py's warning that the guilds intent is off.

    The bot asks for no intents on purpose: interactions arrive without any, and the
    guilds intent would make Discord send (and discord.py cache) every guild the bot is
    in. discord.py warns about it at every start, which only trains people to ignore
    warnings.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return GUILDS_INTENT_NOTICE not in record.getMessage()


_GUILDS_NOTICE_FILTER = _DropGuildsIntentNotice()


def make_previewer(settings: Settings) -> Previewer | None:
    """The page previewer ``PREVIEW`` asks for; None when it is off or finds no Chromium."""
    if settings.preview == "off":
        return None
    binary = find_chromium(settings.preview_chromium)
    if binary is None:
        if settings.preview == "on":
            # The settings refuse PREVIEW=on without Chromium; it went away since.
            log.error("PREVIEW=on but Chromium is gone; pages go out without a preview image")
        else:
            log.info("PREVIEW=auto: no Chromium found; pages go out without a preview image")
        return None
    log.info("page previews: %s at %dx%d", binary, settings.preview_width, settings.preview_height)
    return Previewer(
        binary,
        width=settings.preview_width,
        height=settings.preview_height,
        timeout_s=settings.preview_timeout_s,
    )


def point_at_discord(settings: Settings) -> None:
    """Send discord.py's REST calls to ``settings.discord_api_base``.

    discord.py keeps the base URL in a class attribute, so this holds for the whole process.
    """
    Route.BASE = settings.discord_api_base


class HtmlBot(discord.Client):
    """The /html bot. ``engine`` is a TextGenerator or a ContinuousGenerator."""

    def __init__(self, settings: Settings, engine: Any, **options: Any) -> None:
        point_at_discord(settings)
        # Interactions arrive whatever the intents; none are needed. No message of ours may
        # ping anyone, whatever a prompt or a page name contains.
        options.setdefault("allowed_mentions", discord.AllowedMentions.none())
        # addFilter ignores a filter already there, so this holds once per process.
        logging.getLogger("discord.state").addFilter(_GUILDS_NOTICE_FILTER)
        super().__init__(intents=discord.Intents.none(), **options)
        self.settings = settings
        self.engine = engine
        self.model_name = str(getattr(engine, "model_name", "model"))
        self.tree = HtmlCommandTree(self)
        self.metrics = Metrics()
        self.throughput = Throughput(settings.initial_job_seconds)
        self.max_batch = settings.batch_size(engine)
        self.scheduler = Scheduler(
            max_total=settings.queue_max_total,
            max_per_user=settings.queue_max_per_user,
            max_batch=self.max_batch,
            throughput=self.throughput,
            delivery_margin_s=settings.delivery_margin_s,
        )
        self.store = ResultStore(settings.results_dir, settings.results_keep_per_user)
        self.previewer = make_previewer(settings)
        self.delivery = Delivery(
            self.store,
            self.metrics,
            model_name=self.model_name,
            previewer=self.previewer,
            regenerate=self.regenerate if settings.regenerate_empty else None,
        )
        self.page_mode = settings.resolved_page_mode()
        self.board = StatusBoard(
            self.scheduler,
            interval_s=settings.queue_edit_interval_s,
            edits_per_second=settings.edits_per_second,
        )
        self.lag = LagMonitor()
        self.sampling = SamplingParams(
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature
        )
        self.worker: Worker | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[Any]] = []
        self._shutdown: asyncio.Task[None] | None = None
        self.metrics.bind(
            lambda: self.scheduler.queued_count,
            lambda: self.scheduler.running_count,
            lambda: self.throughput.tokens_per_second,
        )
        self.scheduler.add_expired_listener(self._on_expired_threadsafe)
        register_commands(self)

    # -- start-up --------------------------------------------------------------------

    async def setup_hook(self) -> None:
        await self._resolve_gateway()
        loop = asyncio.get_running_loop()
        self.worker = Worker(self.engine, self.scheduler, self, loop, max_batch=self.max_batch)
        self.worker.start()
        self._background = [
            asyncio.create_task(self.board.run(), name="htmlbot-status-board"),
            asyncio.create_task(self._watch_lag(), name="htmlbot-lag-monitor"),
        ]
        if self.settings.metrics_port is not None:
            try:
                self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
            except OSError as exc:
                # Metrics are optional: a taken port must not keep the bot from serving.
                log.error(
                    "METRICS_PORT %d on %s unusable (%s); metrics are off",
                    self.settings.metrics_port,
                    self.settings.metrics_host,
                    exc,
                )
        await self._sync_commands()

    async def _resolve_gateway(self) -> None:
        url = self.settings.discord_gateway_url
        if url is None and self.settings.discord_api_base != DEFAULT_API_BASE:
            # A custom REST base without a gateway URL: ask it, as a real client would.
            _shards, url, _limits = await self.http.get_bot_gateway()
        if url is not None:
            # Like Route.BASE, discord.py reads this class attribute when connecting.
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)

    async def _sync_commands(self) -> None:
        try:
            if self.settings.dev_guild_id is not None:
                guild = discord.Object(id=self.settings.dev_guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                log.info("synced %d commands to dev guild %s", len(synced), guild.id)
            else:
                synced = await self.tree.sync()
                log.info("synced %d global commands (may take a while to appear)", len(synced))
        except discord.HTTPException as exc:
            # The bot still answers commands registered earlier; don't die over it.
            log.error("command sync failed: %s %s", exc.status, exc.text)

    async def on_ready(self) -> None:
        log.info("connected as %s; serving %s", self.user, self.model_name)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        if interaction.type is discord.InteractionType.component:
            await on_component(self, interaction)

    async def _watch_lag(self) -> None:
        monitor = asyncio.create_task(self.lag.run(), name="htmlbot-lag")
        try:
            while True:
                await asyncio.sleep(1.0)
                self.metrics.loop_lag.set(self.lag.last_lag_s)
        finally:
            monitor.cancel()

    # -- worker reports (called on the loop) ------------------------------------------

    def job_started(self, job: Job) -> None:
        self.board.poke()

    def job_progress(self, job: Job) -> None:
        self.board.poke()

    def job_finished(self, job: Job) -> None:
        self.board.untrack(job)
        self.spawn(self.delivery.finish(job), name=f"deliver-{job.job_id}")

    def regenerate(self, job: Job) -> bool:
        """Queue a finished job once more with another seed (its page came out empty);
        False when it can't be (already regenerated, queue closed, cancelled)."""
        if job.regenerated or self.scheduler.closed or job.request.cancelled:
            return False
        job.regenerated = True
        job.result = None
        job.request.sampling = dataclasses.replace(
            job.request.sampling, seed=random.getrandbits(32)
        )
        self.scheduler.requeue_front([job])
        if job.state is not JobState.QUEUED:
            return False
        self.board.track(job)
        return True

    def _on_expired_threadsafe(self, job: Job) -> None:
        try:
            self.loop.call_soon_threadsafe(self.job_finished, job)
        except RuntimeError:
            log.debug("loop closed; could not report expired job %s", job.job_id)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A task the bot keeps a reference to until it ends (and awaits at shutdown)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- stored pages -----------------------------------------------------------------

    async def list_pages(self, user_id: int) -> list[StoredPage]:
        return await asyncio.to_thread(self.store.list, user_id)

    async def get_page(self, user_id: int, job_id: str) -> StoredPage | None:
        return await asyncio.to_thread(self.store.get, user_id, job_id)

    async def read_page(self, page: StoredPage) -> bytes:
        return await asyncio.to_thread(self.store.read, page)

    async def delivery_send_stored(
        self, interaction: discord.Interaction, page: StoredPage, data: bytes
    ) -> None:
        """Send a kept page again, privately, as a follow-up of ``interaction``."""
        await send_page_followup(
            interaction,
            filename=page.filename,
            data=data,
            content=f"**{page.filename}** · {page.model} · {page.generated_tokens} tokens",
            too_big=f"**{page.filename}** is too big for this server's upload limit.",
            ephemeral=True,
            what=f"resend {page.job_id}",
        )

    # -- shutdown ---------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        """True from the moment :meth:`close` is called."""
        return self._shutdown is not None or self.is_closed()

    async def close(self) -> None:
        """Stop gracefully, then close the connection.

        New requests are refused; queued users are told; running jobs get
        ``shutdown_deadline_s`` to finish before they are cancelled; deliveries in flight
        are awaited; then the gateway and HTTP session close.
        """
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._graceful_shutdown(), name="htmlbot-shutdown")
        try:
            await asyncio.shield(self._shutdown)
        finally:
            await super().close()

    async def _graceful_shutdown(self) -> None:
        dropped = self.scheduler.close()
        if dropped:
            log.info("shutting down: telling %d queued user(s)", len(dropped))
        for job in dropped:
            if isinstance(job.context, Ticket):
                # Also for jobs whose defer is still in flight: finish() waits for it to
                # settle (DEFER_WAIT_S), and the deliveries are awaited before the HTTP
                # session closes, so an acknowledged interaction always gets this message.
                job.cancel_note = SHUTDOWN_TEXT
                self.spawn(self.delivery.finish(job), name=f"bye-{job.job_id}")
        worker = self.worker
        if worker is not None:
            worker.stop()
            await asyncio.to_thread(worker.join, self.settings.shutdown_deadline_s)
            if worker.alive:
                log.warning(
                    "running jobs did not finish in %.0f s; cancelling them",
                    self.settings.shutdown_deadline_s,
                )
                worker.cancel_running(note=SHUTDOWN_STOPPED_TEXT)
                if not await asyncio.to_thread(worker.join, 10.0):
                    log.error("the worker thread did not stop; leaving it behind")
        # Let reports already posted by the worker run, then wait for the deliveries.
        await asyncio.sleep(0)
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=DELIVERY_DRAIN_S)
            for task in pending:
                task.cancel()
        # The stop flag ends the board's loop even if a cancel were lost on the way.
        self.board.stop()
        for task in self._background:
            task.cancel()
        if self._background:
            _done, stuck = await asyncio.wait(self._background, timeout=BACKGROUND_STOP_S)
            for task in stuck:
                log.error("background task %s did not stop; leaving it behind", task.get_name())
        await self.board.aclose()
        self.metrics.stop()
        log.info("shutdown complete")
