"""``HtmlBot``: the discord.py client that ties commands, the job queue, worker and delivery.

Run it as ``async with create_bot(settings, engine) as bot: await bot.start(token)``.
``setup_hook`` starts the worker thread (local backend) or the delivery reader (Redis), the
background tasks, picks up the jobs a previous run left, and syncs the commands; ``close``
shuts down gracefully (see :meth:`HtmlBot.close`).

With ``SHARD_COUNT`` set the client is discord.py's ``AutoShardedClient`` running
``SHARD_IDS``; several such processes share one Redis, and whichever reads a finished job
delivers it through the interaction's webhook (any process may use its token).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Coroutine
from typing import Any

import discord
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot import texts
from bot.backend import Backend, local_backend, process_name, redis_backend
from bot.commands import Commands, HtmlCommandTree
from bot.delivery import Delivery
from bot.errors import BotError, QueueUnavailable
from bot.guilds.command import SettingsCommand
from bot.guilds.gate import open_gate
from bot.jobs import Job, JobState
from bot.loopmon import LagMonitor
from bot.metrics import Metrics
from bot.preview import Previewer, find_chromium
from bot.queue import QueueSnapshot
from bot.settings import DEFAULT_API_BASE, Settings
from bot.status import StatusBoard, Ticket
from bot.store import StoredPage
from bot.threads import PageThreads
from bot.webhook import WebhookInteraction
from bot.worker import Worker
from model.types import SamplingParams

log = logging.getLogger(__name__)

# How long deliveries may take to finish once the worker has stopped, at shutdown.
DELIVERY_DRAIN_S = 15.0
# How long the background tasks (status board, lag monitor) get to end once cancelled.
BACKGROUND_STOP_S = 5.0
# Redis backend: finished jobs read per call, how long one read blocks, and how long a
# delivery may stay unacknowledged before another bot takes it over (its bot died).
DELIVERY_BATCH = 32
DELIVERY_BLOCK_MS = 1000
DELIVERY_RECLAIM_IDLE_MS = 60_000
DELIVERY_RECLAIM_EVERY_S = 15.0
REDIS_RETRY_S = 2.0
QUEUE_METRICS_EVERY_S = 5


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
    """The /html bot. ``engine`` (a TextGenerator or ContinuousGenerator) is needed with the
    local backend only: with Redis, ``python -m bot.worker`` processes run the model."""

    def __init__(
        self,
        settings: Settings,
        engine: Any = None,
        *,
        backend: Backend | None = None,
        **options: Any,
    ) -> None:
        point_at_discord(settings)
        # Interactions arrive whatever the intents; none are needed. No message of ours may
        # ping anyone, whatever a prompt or a page name contains.
        options.setdefault("allowed_mentions", discord.AllowedMentions.none())
        # addFilter ignores a filter already there, so this holds once per process.
        logging.getLogger("discord.state").addFilter(_GUILDS_NOTICE_FILTER)
        super().__init__(intents=discord.Intents.none(), **options)
        self.settings = settings
        self.engine = engine
        if engine is None and settings.queue_backend == "local" and backend is None:
            raise ValueError("QUEUE_BACKEND=local needs an engine in this process")
        self.model_name = str(getattr(engine, "model_name", "")) or _configured_model(settings)
        self.max_batch = settings.batch_size(engine)
        if backend is None:
            backend = (
                local_backend(settings, self.max_batch)
                if settings.queue_backend == "local"
                else redis_backend(settings)
            )
        self.backend = backend
        self.queue = backend.queue
        self.store = backend.pages
        self.scheduler = backend.scheduler  # local only (tests and metrics read it)
        self.throughput = backend.throughput
        self.tree = HtmlCommandTree(self)
        self.metrics = Metrics()
        self.tree.settings = settings
        self.tree.metrics = self.metrics
        self.previewer = make_previewer(settings)
        # An empty page is generated once more: put back in the local queue, or (Redis) a
        # copy with a new id, the finished job being out of the shared queue for good.
        regenerate: Any = None
        if settings.regenerate_empty:
            regenerate = (
                self.regenerate if backend.scheduler is not None else self.regenerate_shared
            )
        # A page's later versions go to a thread on its first message (bot.threads).
        self.threads = PageThreads(self, self.store)
        self.delivery = Delivery(
            self.store,
            self.metrics,
            model_name=self.model_name,
            previewer=self.previewer,
            regenerate=regenerate,
            threads=self.threads,
        )
        self.page_mode = settings.resolved_page_mode()
        self.board = StatusBoard(
            self.queue,
            interval_s=settings.queue_edit_interval_s,
            edits_per_second=settings.edits_per_second,
        )
        self.lag = LagMonitor()
        self.sampling = SamplingParams(
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature
        )
        self.tickets: dict[str, Ticket] = {}
        self.consumer = process_name(settings, "bot")
        self.worker: Worker | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[Any]] = []
        self._shutdown: asyncio.Task[None] | None = None
        scheduler = backend.scheduler
        # The shared queue's depth, refreshed every few seconds (Redis backend).
        self._queue_seen: QueueSnapshot | None = None
        if scheduler is not None:
            self.metrics.bind(
                lambda: scheduler.queued_count,
                lambda: scheduler.running_count,
                lambda: scheduler.throughput.tokens_per_second,
            )
            scheduler.add_expired_listener(self._on_expired_threadsafe)
        else:
            self.metrics.queue_depth.set_function(
                lambda: self._queue_seen.queued if self._queue_seen else 0
            )
            self.metrics.running.set_function(
                lambda: self._queue_seen.running if self._queue_seen else 0
            )
        # Per-server settings and limits (/settings), where the jobs live: SQLite or Redis.
        self.guild_gate = open_gate(
            settings, backend.redis.client if backend.redis is not None else None
        )
        self.commands = Commands(
            settings=settings,
            queue=self.queue,
            board=self.board,
            pages=self.store,
            sampling=self.sampling,
            page_mode=self.page_mode,
            tickets=self.tickets,
            spawn=self.spawn,
            gate=self.guild_gate,
            threads=self.threads,
        )
        self.commands.register(self.tree)
        SettingsCommand(self.guild_gate.settings, self.guild_gate.usage).register(self.tree)

    # -- start-up --------------------------------------------------------------------

    async def setup_hook(self) -> None:
        await self._resolve_gateway()
        loop = asyncio.get_running_loop()
        background = [
            asyncio.create_task(self.board.run(), name="htmlbot-status-board"),
            asyncio.create_task(self._watch_lag(), name="htmlbot-lag-monitor"),
        ]
        if self.backend.source is not None:
            await self._resume_local()
            self.worker = Worker(
                self.engine,
                self.backend.source,
                self,
                loop,
                max_batch=self.max_batch,
                throughput=self.throughput,
            )
            self.worker.start()
        else:
            background.append(
                asyncio.create_task(self._read_deliveries(), name="htmlbot-deliveries")
            )
            await self._resume_redis()
        self._background = background
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
        if self.settings.shard_ids and 0 not in self.settings.shard_ids:
            return  # one process syncs the commands: the one running shard 0
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
            await self.commands.on_component(interaction)
        elif interaction.type is discord.InteractionType.modal_submit:
            await self.commands.on_modal(interaction)

    async def _watch_lag(self) -> None:
        monitor = asyncio.create_task(self.lag.run(), name="htmlbot-lag")
        ticks = 0
        try:
            while True:
                await asyncio.sleep(1.0)
                self.metrics.loop_lag.set(self.lag.last_lag_s)
                ticks += 1
                if self.backend.scheduler is None and ticks % QUEUE_METRICS_EVERY_S == 0:
                    with contextlib.suppress(QueueUnavailable):
                        self._queue_seen = await self.queue.snapshot()
        finally:
            monitor.cancel()

    # -- jobs a previous run left -----------------------------------------------------

    def _adopt(self, job: Job) -> Ticket | None:
        """A ticket answering ``job`` through its webhook (None: no token was kept)."""
        ticket = self.tickets.get(job.job_id)
        if ticket is None:
            if job.delivery is None:
                return None
            ticket = Ticket(interaction=WebhookInteraction(self, job.delivery))
            ticket.mark_deferred()  # the job was queued after its defer went through
            self.tickets[job.job_id] = ticket
        job.context = ticket
        return ticket

    async def _resume_local(self) -> None:
        journal = self.backend.journal
        if journal is None:
            return
        jobs = await asyncio.to_thread(journal.load_unfinished)
        if not jobs:
            return
        waiting = [job for job in jobs if not job.state.terminal]
        finished = [job for job in jobs if job.state.terminal]
        log.info(
            "resuming %d job(s) of the previous run and delivering %d finished one(s)",
            len(waiting),
            len(finished),
        )
        for job in jobs:
            self._adopt(job)
        local: Any = self.queue  # a LocalQueue
        # restore() hands back the jobs it ended instead (cancelled before the kill, or
        # taken too often: maybe what killed the process): they are told like the rest.
        finished += local.restore(waiting)
        for job in waiting:
            if not job.state.terminal:
                self.board.track(job)
        for job in finished:
            self.job_finished(job)

    async def _resume_redis(self) -> None:
        # The status messages of this process's shards pick up again; their pages come
        # through the deliveries stream like any other.
        try:
            jobs = await self.queue.pending()
        except QueueUnavailable:
            log.warning("Redis is unavailable at start-up; pending status messages resume later")
            return
        mine = set(self.settings.shard_ids) or None
        adopted = 0
        for job in jobs:
            shard = job.delivery.shard_id if job.delivery is not None else 0
            if mine is not None and shard not in mine:
                continue
            if self._adopt(job) is not None:
                self.board.track(job)
                adopted += 1
        if adopted:
            log.info("picked up the status messages of %d pending job(s)", adopted)

    # -- worker reports (called on the loop) ------------------------------------------

    def job_started(self, job: Job) -> None:
        self.board.poke()

    def job_progress(self, job: Job) -> None:
        self.board.poke()

    def job_finished(self, job: Job) -> None:
        self.board.untrack(job)
        self.spawn(self._deliver_local(job), name=f"deliver-{job.job_id}")

    async def _deliver_local(self, job: Job) -> None:
        if not await self.delivery.finish(job):
            return  # regenerated: it is back in the queue
        self.tickets.pop(job.job_id, None)
        local: Any = self.queue  # a LocalQueue
        await local.record_delivered(job.job_id)

    def regenerate(self, job: Job) -> bool:
        """Queue a finished job once more with another seed (its page came out empty);
        False when it can't be (already regenerated, queue closed, cancelled)."""
        scheduler = self.backend.scheduler
        if scheduler is None or job.regenerated or scheduler.closed or job.request.cancelled:
            return False
        job.regenerated = True
        job.result = None
        job.request.sampling = dataclasses.replace(
            job.request.sampling, seed=random.getrandbits(32)
        )
        self.backend.source.requeue_front([job])  # type: ignore[union-attr]
        # The worker may have taken it again already; only a refused requeue cancels it.
        if job.state is JobState.CANCELLED:
            return False
        self.board.track(job)
        return True

    async def regenerate_shared(self, job: Job) -> bool:
        """The Redis backend's :meth:`regenerate`: the finished job can't go back into the
        shared queue, so a copy with a new id and another seed does, answering the same
        interaction; False when it can't be queued (already regenerated, refused)."""
        if job.regenerated or self.shutting_down:
            return False
        again = Job.create(
            user_id=job.user_id,
            prompt=job.prompt,
            style=job.style,
            ttl_s=job.expires_at - time.monotonic(),
            sampling=dataclasses.replace(job.request.sampling, seed=random.getrandbits(32)),
            mode=job.request.mode,
            safety=job.request.safety,
            user_name=job.user_name,
            guild_id=job.guild_id,
            channel_id=job.channel_id,
            private=job.private,
            delivery=job.delivery,
            regenerated=True,
        )
        try:
            await self.queue.submit(again)
        except BotError as exc:
            log.info("job %s: not generated again (%s)", job.job_id, exc)
            return False
        ticket = job.context
        again.context = ticket
        if isinstance(ticket, Ticket):
            self.tickets[again.job_id] = ticket
        self.board.track(again)
        log.info("job %s: generated again as %s", job.job_id, again.job_id)
        return True

    def _on_expired_threadsafe(self, job: Job) -> None:
        try:
            self.loop.call_soon_threadsafe(self.job_finished, job)
        except RuntimeError:
            log.debug("loop closed; could not report expired job %s", job.job_id)

    # -- deliveries from Redis ---------------------------------------------------------

    async def _read_deliveries(self) -> None:
        """Deliver the jobs that finished anywhere, each by exactly one bot."""
        redis = self.backend.redis
        last_reclaim = 0.0
        while not self.shutting_down:
            try:
                now = asyncio.get_running_loop().time()
                entries = []
                if now - last_reclaim >= DELIVERY_RECLAIM_EVERY_S:
                    last_reclaim = now
                    entries = await redis.reclaim_deliveries(
                        self.consumer, DELIVERY_RECLAIM_IDLE_MS
                    )
                entries += await redis.read_deliveries(
                    self.consumer, DELIVERY_BATCH, DELIVERY_BLOCK_MS
                )
            except QueueUnavailable:
                log.warning(
                    "Redis unavailable; deliveries wait (retrying in %.0f s)", REDIS_RETRY_S
                )
                await asyncio.sleep(REDIS_RETRY_S)
                continue
            for entry_id, job in entries:
                self.spawn(self._deliver_shared(entry_id, job), name=f"deliver-{job.job_id}")

    async def _deliver_shared(self, entry_id: str, job: Job) -> None:
        redis = self.backend.redis
        try:
            if not await redis.claim_delivery(job.job_id, self.consumer):
                await redis.mark_delivered(job.job_id, entry_id)  # delivered before: ack
                return
        except QueueUnavailable:
            return  # the entry stays pending; it comes back after the reclaim delay
        ticket = self._adopt(job)
        if ticket is None:
            log.error("job %s finished without a way to reach its user", job.job_id)
        else:
            self.board.untrack(job)
            await self.delivery.finish(job)
        self.tickets.pop(job.job_id, None)
        # Recorded, then acknowledged: a bot that dies in between leaves an entry another
        # bot reclaims and then only acknowledges.
        for _attempt in range(30):
            try:
                await redis.mark_delivered(job.job_id, entry_id)
                return
            except QueueUnavailable:
                await asyncio.sleep(REDIS_RETRY_S)
        log.error("job %s: could not record its delivery in Redis", job.job_id)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A task the bot keeps a reference to until it ends (and awaits at shutdown)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- stored pages -----------------------------------------------------------------

    async def list_pages(self, user_id: int) -> list[StoredPage]:
        return await self.store.list(user_id)

    # -- shutdown ---------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        """True from the moment :meth:`close` is called."""
        return self._shutdown is not None or self.is_closed()

    async def close(self) -> None:
        """Stop gracefully, then close the connection.

        New requests are refused. Local backend: queued jobs stay in the journal for the
        next start (their users are told) or, without a journal, are cancelled; running
        jobs get ``shutdown_deadline_s`` to finish before they are cancelled; deliveries in
        flight are awaited. Redis backend: jobs go on in the workers; another bot (or this
        one, restarted) delivers them. Then the gateway and HTTP session close.
        """
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._graceful_shutdown(), name="htmlbot-shutdown")
        try:
            await asyncio.shield(self._shutdown)
        finally:
            await super().close()

    async def _graceful_shutdown(self) -> None:
        if self.backend.scheduler is not None:
            await self._stop_local()
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
        await self.guild_gate.aclose()
        await self.backend.aclose()
        self.metrics.stop()
        log.info("shutdown complete")

    async def _stop_local(self) -> None:
        kept = self.backend.journal is not None
        local: Any = self.queue  # a LocalQueue
        dropped = local.close(resume_later=kept)
        if dropped:
            log.info(
                "shutting down: %s %d queued job(s)",
                "keeping" if kept else "cancelling",
                len(dropped),
            )
        for job in dropped:
            if not isinstance(job.context, Ticket):
                continue
            if kept:
                self.spawn(self._say_kept(job), name=f"kept-{job.job_id}")
            else:
                # Also for jobs whose defer is still in flight: finish() waits for it to
                # settle (DEFER_WAIT_S), and the deliveries are awaited before the HTTP
                # session closes, so an acknowledged interaction always gets this message.
                job.cancel_note = texts.SHUTDOWN_CANCELLED
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
                worker.cancel_running(note=texts.SHUTDOWN_STOPPED)
                if not await asyncio.to_thread(worker.join, 10.0):
                    log.error("the worker thread did not stop; leaving it behind")

    async def _say_kept(self, job: Job) -> None:
        """Tell a queued user that the restart keeps their place (not a final edit)."""
        ticket = job.context
        assert isinstance(ticket, Ticket)
        if not await ticket.wait_settled(5.0) or ticket.dead or ticket.final:
            return
        async with ticket.lock:
            try:
                await ticket.interaction.edit_original_response(
                    content=texts.SHUTDOWN_KEPT, view=None
                )
                ticket.shown = texts.SHUTDOWN_KEPT
            except discord.HTTPException as exc:
                log.info("job %s: could not say it is kept: %s", job.job_id, exc.status)


class ShardedHtmlBot(HtmlBot, discord.AutoShardedClient):
    """The bot on discord.py's AutoShardedClient (``SHARD_COUNT``/``SHARD_IDS``)."""


def create_bot(settings: Settings, engine: Any = None, **options: Any) -> HtmlBot:
    """The bot class the settings ask for: sharded when ``SHARD_COUNT`` is set."""
    if settings.shard_count is None:
        return HtmlBot(settings, engine, **options)
    options.setdefault("shard_count", settings.shard_count)
    if settings.shard_ids:
        options.setdefault("shard_ids", list(settings.shard_ids))
    return ShardedHtmlBot(settings, engine, **options)


def _configured_model(settings: Settings) -> str:
    """The configured model's name, without loading it (the Redis bot has no model)."""
    try:
        from model.spec import resolve_spec

        return resolve_spec(**settings.model_overrides()).name
    except Exception:  # a name is only for the summary line; the workers load the model
        return "model"
