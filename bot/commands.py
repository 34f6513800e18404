"""Slash commands (/html, /queue, /mypages), the Cancel button, and error replies.

:class:`Commands` is handed the few services it uses (settings, the job queue, the status
board, the page store, delivery) and never sees the client that wires them. Handlers only
translate an interaction into queue calls and return: they never touch the model. /html
checks, queues (one Redis round trip with that backend) and defers, so it answers inside
Discord's 3-second window however busy the GPU is.

This module does not use ``from __future__ import annotations``: discord.py reads the
handlers' annotations, and ``Range[str, 1, max_chars]`` depends on the settings.
"""

import asyncio
import dataclasses
import logging
import random
import time
import unicodedata
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import discord
from discord import app_commands

from bot import texts
from bot.delivery import attachment_limit, send_page_followup, version_in_thread
from bot.errors import (
    BotError,
    InvalidPrompt,
    JobNotFound,
    NotAllowed,
    NotPermitted,
    QueueUnavailable,
    ResultNotFound,
    ShuttingDown,
)
from bot.guilds.command import member_role_ids
from bot.guilds.gate import GuildGate
from bot.guilds.model import GuildSettings
from bot.jobs import Job, JobState
from bot.metrics import Metrics
from bot.page_buttons import (
    INSTRUCTION_ID,
    INSTRUCTION_MAX,
    REFINE_MODAL_PREFIX,
    REFINE_PREFIX,
    REGENERATE_PREFIX,
    STYLE_PREFIX,
    RefineModal,
    modal_value,
    page_view,
    style_names,
)
from bot.queue import JobQueue, PageStore, QueueSnapshot
from bot.scheduler import format_duration
from bot.settings import Settings
from bot.status import CANCEL_PREFIX, StatusBoard, Ticket
from bot.store import StoredPage
from bot.threads import PageThreads
from bot.webhook import delivery_info_of
from model.page.restyle import restyle_stored
from model.types import PageMode, SamplingParams

log = logging.getLogger(__name__)

# Discord allows at most 6000 characters in a string option.
DISCORD_OPTION_MAX = 6000
# Bidirectional overrides and isolates: they can disguise text; never needed in a prompt.
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
QUEUE_LIST_MAX = 20
# An interaction older than this by its snowflake (a gateway replay after a reconnect can
# be a minute old), or from the future, means the host clock
# is off: its age is then measured from when it arrived, not from the clock.
MAX_PLAUSIBLE_AGE_S = 120.0
FUTURE_TOLERANCE_S = 2.0


def validate_prompt(prompt: str, max_chars: int) -> str:
    """The prompt, stripped; raises InvalidPrompt if empty, too long or holding control chars."""
    text = prompt.strip()
    if not text:
        raise InvalidPrompt(texts.EMPTY_PROMPT)
    if len(text) > max_chars:
        raise InvalidPrompt(texts.prompt_too_long(len(text), max_chars))
    for char in text:
        if char in "\n\t":
            continue
        if unicodedata.category(char) == "Cc" or char in _BIDI_CONTROLS:
            raise InvalidPrompt(texts.control_character(ord(char)))
    return text


def user_message_for(error: BaseException) -> str:
    """The one place where an exception becomes what the user reads."""
    original = getattr(error, "original", None) or getattr(error, "__cause__", None) or error
    if isinstance(error, BotError):
        original = error
    if isinstance(original, BotError):
        return texts.warning(str(original))
    if isinstance(error, app_commands.CommandOnCooldown):
        return texts.slow_down(error.retry_after)
    if isinstance(error, app_commands.CommandNotFound | app_commands.CommandSignatureMismatch):
        return texts.UNKNOWN_COMMAND
    if isinstance(error, app_commands.CheckFailure):
        return texts.NOT_HERE
    return texts.SOMETHING_WRONG


def token_age_s(snowflake_age_s: float) -> float:
    """How old an interaction was when it arrived, from its snowflake's age by our clock.

    Discord hands an interaction over within a second or so; an age far past that, or one
    from the future, says the host clock is off (a clock 14 minutes slow once dropped every
    job as expired, silently). Then the age is taken as zero, counted from the arrival (on
    the monotonic clock), and a warning is logged.
    """
    if -FUTURE_TOLERANCE_S <= snowflake_age_s <= MAX_PLAUSIBLE_AGE_S:
        return max(0.0, snowflake_age_s)
    log.warning(
        "an interaction's id says it is %.0f s old when it arrived: this host's clock seems "
        "off by about that much (check NTP); measuring the token's life from its arrival",
        snowflake_age_s,
    )
    return 0.0


def is_connection_closed(exc: BaseException, bot: Any = None) -> bool:
    """True when ``exc`` only says that the bot's connection to Discord is closed.

    That is expected while the bot shuts down (discord.py closes its HTTP session while
    handlers may still be talking to Discord), so it is logged without a traceback.
    """
    if isinstance(exc, RuntimeError) and "Session is closed" in str(exc):
        return True
    shutting_down = bool(getattr(bot, "shutting_down", False))
    return shutting_down and isinstance(exc, aiohttp.ClientError | OSError)


async def reply_ephemeral(interaction: discord.Interaction, text: str) -> None:
    """Answer ``interaction`` privately, whether or not it has been answered already."""
    if interaction.type is discord.InteractionType.autocomplete:
        return
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as exc:
        log.warning("could not send an error reply: %s %s", exc.status, exc.text)
    except Exception as exc:
        if not is_connection_closed(exc, interaction.client):
            raise
        log.info("could not send an error reply: the bot is shutting down (%s)", exc)


class Refused(app_commands.CheckFailure):
    """Wraps a BotError raised in a check, so discord.py routes it to ``on_error``."""

    def __init__(self, original: BotError) -> None:
        super().__init__(str(original))
        self.original = original


class HtmlCommandTree(app_commands.CommandTree):
    """The command tree: access rules in ``interaction_check``, errors in ``on_error``."""

    settings: Settings | None = None  # set by the client before the first interaction
    metrics: Metrics | None = None

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        if self.settings is not None:
            try:
                check_allowed(interaction, self.settings)
            except NotAllowed as exc:
                raise Refused(exc) from exc
        return True

    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError, /
    ) -> None:
        original = getattr(error, "original", error)
        if is_connection_closed(original, interaction.client):
            # Shutting down: nothing can reach Discord any more, not even an error reply.
            log.info("%s cut off by the shutdown: %s", _command_name(interaction), original)
            return
        if isinstance(original, BotError):
            log.info(
                "refused %s for user %s: %s",
                _command_name(interaction),
                interaction.user.id if interaction.user else "?",
                original,
            )
            if self.metrics is not None:
                self.metrics.rejected.labels(type(original).__name__).inc()
        elif isinstance(
            original, app_commands.CommandNotFound | app_commands.CommandSignatureMismatch
        ):
            # A command Discord still shows from an older version of the bot: no bug here.
            log.info("%s: %s", _command_name(interaction), original)
        elif not isinstance(error, app_commands.CheckFailure):
            log.error("command %s failed", _command_name(interaction), exc_info=original)
        await reply_ephemeral(interaction, user_message_for(error))


def _command_name(interaction: discord.Interaction) -> str:
    command = interaction.command
    return f"/{command.qualified_name}" if command is not None else "interaction"


def check_allowed(interaction: discord.Interaction, settings: Settings) -> None:
    """Raise NotAllowed unless the guild, channel and roles are allowed (empty = all)."""
    if settings.allowed_guild_ids and interaction.guild_id not in settings.allowed_guild_ids:
        raise NotAllowed(texts.NOT_IN_SERVER)
    if settings.allowed_channel_ids and interaction.channel_id not in settings.allowed_channel_ids:
        raise NotAllowed(texts.NOT_IN_CHANNEL)
    if settings.allowed_role_ids:
        # Member._roles holds the ids sent with the interaction; Member.roles would need the
        # guild's role cache, which a bot without the guilds intent doesn't have.
        role_ids = set(getattr(interaction.user, "_roles", ()) or ())
        if not role_ids & set(settings.allowed_role_ids):
            raise NotAllowed(texts.ROLE_NEEDED)


def is_admin(interaction: discord.Interaction) -> bool:
    """Members with Manage Server (or Administrator) see and cancel everyone's jobs."""
    permissions = interaction.permissions
    return bool(permissions.manage_guild or permissions.administrator)


Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


@dataclass
class Commands:
    """The slash commands and the Cancel button, given the services they use."""

    settings: Settings
    queue: JobQueue
    board: StatusBoard
    pages: PageStore
    sampling: SamplingParams
    page_mode: PageMode
    # Tickets of the jobs this process holds the interaction of, by job id.
    tickets: dict[str, Ticket]
    spawn: Spawn
    # Per-server settings and limits; None: only the env's (tests of the plain flow).
    gate: GuildGate | None = None
    # A page's later versions go to its thread; None: below the press (tests of the plain flow).
    threads: PageThreads | None = None

    def register(self, tree: app_commands.CommandTree[Any]) -> None:
        """Add /html, /queue and /mypages to ``tree``."""
        max_chars = min(self.settings.max_prompt_chars, DISCORD_OPTION_MAX)
        style_choices = [app_commands.Choice(name=name, value=name) for name in style_names()]
        commands = self

        @tree.command(name="html", description="Generate a web page from a description")
        @app_commands.describe(
            prompt="What the page should be, e.g. 'a landing page for a bakery'",
            style="A visual style for the page",
            private="Only you see the reply",
        )
        @app_commands.choices(style=style_choices)
        async def html(
            interaction: discord.Interaction,
            prompt: app_commands.Range[str, 1, max_chars],
            style: str | None = None,
            private: bool = False,
        ) -> None:
            await commands.handle_html(interaction, prompt, style, private)

        @tree.command(name="queue", description="Your queued pages (managers see everyone's)")
        async def queue(interaction: discord.Interaction) -> None:
            listing = await commands.queue_listing(interaction)
            await interaction.response.send_message(listing, ephemeral=True)

        @tree.command(name="mypages", description="Your last pages; pick one to get it again")
        @app_commands.describe(page="The page's id, as listed by /mypages without it")
        async def mypages(interaction: discord.Interaction, page: str | None = None) -> None:
            await commands.handle_mypages(interaction, page)

        @mypages.autocomplete("page")
        async def mypages_autocomplete(
            interaction: discord.Interaction, current: str
        ) -> list[app_commands.Choice[str]]:
            pages = await commands.pages.list(interaction.user.id)
            choices = []
            for item in pages:
                label = f"{item.filename} ({item.job_id})"[:100]
                if current.lower() in label.lower():
                    choices.append(app_commands.Choice(name=label, value=item.job_id))
            return choices[:25]

    async def handle_html(
        self, interaction: discord.Interaction, prompt: str, style: str | None, private: bool
    ) -> None:
        """Validate, queue, defer."""
        received = time.monotonic()
        settings = self.settings
        text = validate_prompt(prompt, settings.max_prompt_chars)
        if style is not None and style not in style_names():
            raise InvalidPrompt(texts.unknown_style(style))
        guild = await self._admit(interaction)
        # The token's life counts from the interaction's creation; its age is checked
        # against the arrival time so a wrong host clock can't expire every job.
        age_s = token_age_s(time.time() - interaction.created_at.timestamp())
        job = Job.create(
            user_id=interaction.user.id,
            prompt=text,
            style=style or (guild.default_style if guild else None),
            ttl_s=settings.interaction_ttl_s - age_s - (time.monotonic() - received),
            sampling=self.sampling,
            mode=guild.page_mode if guild and guild.page_mode else self.page_mode,
            safety=guild.safety if guild else settings.safety,
            user_name=str(interaction.user),
            guild_id=interaction.guild_id,
            channel_id=interaction.channel_id,
            private=private,
            delivery=delivery_info_of(interaction),
        )
        await self._enqueue(interaction, job)

    async def _enqueue(self, interaction: discord.Interaction, job: Job) -> None:
        """Queue ``job`` for ``interaction`` and defer it ("thinking"): its message then
        shows the job's place, progress and Cancel button until the page arrives."""
        ticket = Ticket(interaction=interaction)
        job.context = ticket
        self.tickets[job.job_id] = ticket
        # A refusal (QueueFull, UserLimitReached, QueueUnavailable) propagates to the tree's
        # on_error, which counts it in the rejected metric like every other BotError.
        try:
            position = await self.queue.submit(job)
        except BaseException:
            self.tickets.pop(job.job_id, None)
            raise
        try:
            await interaction.response.defer(ephemeral=job.private, thinking=True)
        except Exception as exc:
            if isinstance(exc, discord.HTTPException):
                # The interaction is gone (or Discord is down): nobody could get the page.
                log.warning("defer failed for job %s (%s); cancelling it", job.job_id, exc.status)
            elif is_connection_closed(exc, interaction.client):
                log.info("defer of job %s cut off by the shutdown; cancelling it", job.job_id)
            else:
                # Unknown outcome: the defer may have reached Discord, so the job stays and
                # its delivery tries after DEFER_WAIT_S. The tree's on_error logs it.
                raise
            # Settled, so nobody waits for this defer (the shutdown's message, the delivery).
            ticket.mark_defer_failed()
            await self.queue.cancel(job.job_id)
            return
        ticket.mark_deferred()
        await self._record_request(interaction)
        log.info(
            "job %s (%s) queued for user %s at position %d",
            job.job_id,
            job.kind,
            job.user_id,
            position,
        )
        # If the shutdown dropped the job while the defer was in flight, the board skips it
        # and the shutdown's message (waiting for this defer) tells the user.
        self.board.track(job)

    async def _admit(self, interaction: discord.Interaction) -> GuildSettings | None:
        """The server's settings if its limits let this request in (else their refusal)."""
        if self.gate is None:
            return None
        mine = await self.queue.pending(interaction.user.id)
        return await self.gate.admit(
            guild_id=interaction.guild_id,
            user_id=interaction.user.id,
            role_ids=member_role_ids(interaction),
            channel_id=interaction.channel_id,
            queued=sum(1 for job in mine if job.guild_id == interaction.guild_id),
        )

    async def _record_request(self, interaction: discord.Interaction) -> None:
        """Count a queued request against the server's daily limit and cooldown."""
        if self.gate is None:
            return
        try:
            await self.gate.record(interaction.guild_id, interaction.user.id)
        except QueueUnavailable:  # the job is queued: a missed count must not lose it
            log.warning("could not count a request of user %s", interaction.user.id)
        except ShuttingDown:  # the store closed while the defer was in flight
            log.info("shutting down: request of user %s not counted", interaction.user.id)

    async def queue_listing(self, interaction: discord.Interaction) -> str:
        """The /queue reply: the user's jobs, or everyone's for managers."""
        admin = is_admin(interaction)
        jobs = await self.queue.pending(None if admin else interaction.user.id)
        snapshot = await self.queue.snapshot()
        header = f"**Queue:** {snapshot.queued} waiting, {snapshot.running} generating."
        if not jobs:
            return header + ("" if admin else " You have no pending requests.")
        lines = [header]
        for job in jobs[:QUEUE_LIST_MAX]:
            lines.append(_job_line(job, snapshot, show_user=admin))
        if len(jobs) > QUEUE_LIST_MAX:
            lines.append(f"… and {len(jobs) - QUEUE_LIST_MAX} more.")
        return "\n".join(lines)

    async def handle_mypages(self, interaction: discord.Interaction, page: str | None) -> None:
        """List the user's kept pages, or send one of them again (privately)."""
        user_id = interaction.user.id
        if page is None:
            pages = await self.pages.list(user_id)
            if not pages:
                await interaction.response.send_message(texts.NO_PAGES_YET, ephemeral=True)
                return
            lines = [texts.PAGES_HEADER]
            for item in pages:
                prompt = discord.utils.escape_markdown(item.prompt[:60])
                lines.append(f"`{item.job_id}` **{item.filename}** {item.label} · {prompt}")
            await interaction.response.send_message("\n".join(lines), ephemeral=True)
            return
        stored = await self.pages.get(user_id, page.strip())
        if stored is None:
            raise ResultNotFound(texts.NO_SUCH_PAGE)
        await interaction.response.defer(ephemeral=True, thinking=True)
        data = await self.pages.read(stored)
        await send_stored_page(interaction, stored, data)

    async def handle_cancel(self, interaction: discord.Interaction, job_id: str) -> None:
        """The Cancel button: the requester or a manager cancels a queued or running job."""
        job = await self.queue.get(job_id)
        if job is None:
            raise JobNotFound(texts.ALREADY_FINISHED)
        if interaction.user.id != job.user_id and not is_admin(interaction):
            raise NotPermitted(texts.ONLY_OWNER_CANCELS)
        await self.queue.cancel(job_id)
        mention = None if interaction.user.id == job.user_id else interaction.user.mention
        text = texts.cancelled_by(mention)
        ticket = self.tickets.get(job_id)
        if ticket is None:
            await interaction.response.edit_message(content=text, view=None)
            return
        # No new status edits from now on. The button must be answered within 3 s, so
        # don't wait for a status edit in flight (it may be sleeping on a 429); if one
        # lands after our answer, put the cancelled text back once it has.
        ticket.final = True
        edits_before = ticket.edits
        await interaction.response.edit_message(content=text, view=None)
        ticket.shown = text
        log.info("job %s cancelled by user %s", job_id, interaction.user.id)
        if ticket.lock.locked():
            self.spawn(_reassert_cancelled(job, ticket, text, edits_before), f"recancel-{job_id}")

    # -- follow-ups of a delivered page (its buttons) -----------------------------------

    async def _owned_page(self, interaction: discord.Interaction, job_id: str) -> StoredPage:
        """The kept version ``job_id``, if it is the presser's (only the owner iterates)."""
        page = await self.pages.get_any(job_id)
        if page is None:
            raise ResultNotFound(texts.PAGE_GONE)
        if page.user_id != interaction.user.id:
            raise NotPermitted(texts.NOT_YOUR_PAGE)
        return page

    def _follow_up(
        self, interaction: discord.Interaction, page: StoredPage, *, kind: str, prompt: str
    ) -> Job:
        """A job continuing ``page`` (a new version of it), answering ``interaction``."""
        message = getattr(interaction, "message", None)
        private = bool(message is not None and message.flags.ephemeral)
        job = Job.create(
            user_id=interaction.user.id,
            prompt=prompt,
            ttl_s=self.settings.interaction_ttl_s,
            sampling=dataclasses.replace(self.sampling, seed=random.getrandbits(32)),
            mode=PageMode.COMPOSE if page.has_content else PageMode.DOCUMENT,
            safety=self.settings.safety,
            user_name=str(interaction.user),
            guild_id=interaction.guild_id,
            channel_id=interaction.channel_id,
            private=private,
            delivery=delivery_info_of(interaction),
            parent_job_id=page.job_id,
            kind=kind,
        )
        return job

    async def handle_regenerate(self, interaction: discord.Interaction, job_id: str) -> None:
        """Regenerate: the page's prompt again with a new seed, as its next version."""
        page = await self._owned_page(interaction, job_id)
        await self._admit(interaction)
        await self._enqueue(
            interaction, self._follow_up(interaction, page, kind="regenerate", prompt=page.prompt)
        )

    async def handle_refine_button(self, interaction: discord.Interaction, job_id: str) -> None:
        """Refine: ask for the instruction (a modal); its submit queues the refine."""
        await self._owned_page(interaction, job_id)
        await interaction.response.send_modal(RefineModal(job_id))

    async def handle_refine(
        self, interaction: discord.Interaction, job_id: str, instruction: str
    ) -> None:
        """The modal's submit: the model edits the current page as the instruction says."""
        text = validate_prompt(instruction, INSTRUCTION_MAX)
        page = await self._owned_page(interaction, job_id)
        await self._admit(interaction)
        job = self._follow_up(interaction, page, kind="refine", prompt=text)
        request = job.request
        request.description = page.prompt
        if page.has_content:
            request.source_content = await self.pages.read_content(page)
        else:
            request.source_page = (await self.pages.read(page)).decode("utf-8", "replace")
        await self._enqueue(interaction, job)

    async def handle_style(self, interaction: discord.Interaction, job_id: str, style: str) -> None:
        """The style switch: the same content in another theme, at once (no model)."""
        if style not in style_names():
            raise InvalidPrompt(texts.unknown_style(style))
        page = await self._owned_page(interaction, job_id)
        job = self._follow_up(interaction, page, kind="restyle", prompt=page.prompt)
        await interaction.response.defer(ephemeral=job.private, thinking=True)
        data = await self.pages.read(page)
        content = await self.pages.read_content(page)
        styled = await asyncio.to_thread(
            restyle_stored, data, content, style, safety=self.settings.safety
        )
        saved = await self.pages.save(
            user_id=page.user_id,
            job_id=job.job_id,
            filename=page.filename,
            data=styled.data,
            prompt=page.prompt,
            model=page.model,
            parent_job_id=page.job_id,
            kind="restyle",
            instruction=style,
            content=styled.content,
        )
        text = texts.restyled(page.filename, saved.label, style)
        view = page_view(job.job_id, style_names())
        thread_id, in_thread = await version_in_thread(
            self.threads,
            saved,
            job,
            filename=page.filename,
            data=styled.data,
            content=text,
            too_big=text,
            limit=attachment_limit(interaction),
            view=view,
        )
        if in_thread:
            assert thread_id is not None
            await interaction.followup.send(
                texts.done_in_thread(page.filename, saved.label, thread_id), wait=True
            )
            return
        await send_page_followup(
            interaction,
            filename=page.filename,
            data=styled.data,
            content=text,
            too_big=text,
            ephemeral=job.private,
            what=f"restyle {job.job_id}",
            view=view,
            posted=self.threads.recorder(saved, thread_id) if self.threads else None,
        )

    async def on_component(self, interaction: discord.Interaction) -> None:
        """Route button presses and selects by custom_id; errors become ephemeral replies."""
        data: Any = interaction.data or {}
        custom_id = str(data.get("custom_id", ""))
        chosen = str((data.get("values") or [""])[0])
        routes: list[tuple[str, Callable[[str], Coroutine[Any, Any, None]]]] = [
            (CANCEL_PREFIX, lambda rest: self.handle_cancel(interaction, rest)),
            (REGENERATE_PREFIX, lambda rest: self.handle_regenerate(interaction, rest)),
            (REFINE_PREFIX, lambda rest: self.handle_refine_button(interaction, rest)),
            (STYLE_PREFIX, lambda rest: self.handle_style(interaction, rest, chosen)),
        ]
        for prefix, handler in routes:
            if custom_id.startswith(prefix):
                await self._guarded(interaction, handler(custom_id.removeprefix(prefix)))
                return

    async def on_modal(self, interaction: discord.Interaction) -> None:
        """A submitted modal (the Refine instruction), by custom_id."""
        data: Any = interaction.data or {}
        custom_id = str(data.get("custom_id", ""))
        if custom_id.startswith(REFINE_MODAL_PREFIX):
            instruction = modal_value(data, INSTRUCTION_ID)
            job_id = custom_id.removeprefix(REFINE_MODAL_PREFIX)
            await self._guarded(interaction, self.handle_refine(interaction, job_id, instruction))

    async def _guarded(
        self, interaction: discord.Interaction, action: Coroutine[Any, Any, None]
    ) -> None:
        try:
            check_allowed(interaction, self.settings)
            await action
        except BotError as exc:
            action.close()
            await reply_ephemeral(interaction, user_message_for(exc))
        except Exception as exc:
            if is_connection_closed(exc, interaction.client):
                log.info("a button press was cut off by the shutdown: %s", exc)
                return
            log.exception("a button press failed")
            await reply_ephemeral(interaction, user_message_for(exc))


def _job_line(job: Job, snapshot: QueueSnapshot, *, show_user: bool) -> str:
    prompt = job.prompt if len(job.prompt) <= 60 else job.prompt[:57] + "…"
    prompt = discord.utils.escape_markdown(prompt)
    position = snapshot.positions.get(job.job_id)
    if job.state is JobState.RUNNING:
        tokens = snapshot.running_tokens.get(job.job_id, job.tokens_so_far)
        where = f"generating ({tokens} tokens)"
    elif position is not None:
        where = f"#{position}, about {format_duration(snapshot.eta_s(position))}"
    else:
        where = job.state.value
    who = f" · <@{job.user_id}>" if show_user else ""
    return f"`{job.job_id}` {where}{who} · {prompt}"


async def send_stored_page(interaction: discord.Interaction, page: StoredPage, data: bytes) -> None:
    """Send a kept page again, privately, as a follow-up of ``interaction``."""
    await send_page_followup(
        interaction,
        filename=page.filename,
        data=data,
        content=f"**{page.filename}** {page.label} · {page.model} · {page.generated_tokens} tokens",
        too_big=f"**{page.filename}** is too big for this server's upload limit.",
        ephemeral=True,
        what=f"resend {page.job_id}",
        # Any version sent again can be refined, regenerated or restyled again.
        view=page_view(page.job_id, style_names()),
    )


async def _reassert_cancelled(job: Job, ticket: Ticket, text: str, edits_before: int) -> None:
    async with ticket.lock:
        if ticket.edits == edits_before:
            return
        if ticket.dead:
            return
        try:
            await ticket.interaction.edit_original_response(content=text, view=None)
        except discord.HTTPException as exc:
            log.info("job %s: restoring the cancelled text failed: %s", job.job_id, exc.status)
        except Exception as exc:
            if not is_connection_closed(exc, ticket.interaction.client):
                raise
            log.info("job %s: restoring the cancelled text cut off by the shutdown", job.job_id)
