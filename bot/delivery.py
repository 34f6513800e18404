"""Turning a finished job into what the user sees.

A page goes out as a follow-up with a ``.html`` attachment named from the prompt, a PNG
preview of it when a :class:`~bot.preview.Previewer` is configured (and both fit), plus a
one-line summary; the page is zipped when it exceeds the interaction's attachment limit. Every
page is first saved in the :class:`~bot.store.ResultStore`, so a page whose interaction
token has expired (Discord answers 401/404) is not lost: the user fetches it with
``/mypages``. Discord's 429 and 5xx answers are retried, honouring ``retry_after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import logging
import random
import time
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import discord

from bot import texts
from bot.errors import DeliveryExpired, QueueUnavailable
from bot.jobs import Job, JobState
from bot.metrics import Metrics
from bot.page_buttons import page_view, style_names
from bot.preview import Previewer
from bot.queue import PageStore
from bot.status import DEAD_TOKEN_STATUSES, Ticket, ticket_of
from bot.threads import PageThreads
from bot.versions import StoredPage
from model.errors import ModelError
from model.naming import page_filename
from model.page.result import WARNING_TEXT, PageWarning

log = logging.getLogger(__name__)

T = TypeVar("T")

# Wait this long for the defer to complete before giving up on a job's message.
DEFER_WAIT_S = 10.0
DEFAULT_ATTACHMENT_LIMIT = 10 * 1024 * 1024
# A preview may only use the token's remaining lifetime less this (the upload needs time).
PREVIEW_SEND_MARGIN_S = 5.0
# Not worth starting a render with less time than this.
PREVIEW_MIN_S = 1.0

# Kept under these names for the callers and tests that know them.
EXPIRED_TEXT = texts.EXPIRED
SHUTDOWN_TEXT = texts.SHUTDOWN_CANCELLED
SHUTDOWN_STOPPED_TEXT = texts.SHUTDOWN_STOPPED


def summary_line(
    *,
    filename: str,
    model: str,
    tokens: int,
    seconds: float,
    warnings: tuple[str, ...],
    version: str = "",
) -> str:
    """``**bakery.html** · smollm2 · 812 tokens · 14.2 s``, then one line per page flag:
    ``⚠️ truncated: cut off by the length limit``."""
    name = f"**{filename}** {version}" if version else f"**{filename}**"
    parts = [name, model, f"{tokens} tokens", f"{seconds:.1f} s"]
    lines = [" · ".join(parts)]
    for warning in warnings:
        try:
            meaning: str | None = WARNING_TEXT[PageWarning(warning)]
        except (ValueError, KeyError):  # a flag this version does not know (an old page)
            meaning = None
        lines.append(f"⚠️ {warning}: {meaning}" if meaning else f"⚠️ {warning}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Attachment:
    """What to attach: a file name and its bytes, plus a note for the user (or '')."""

    filename: str
    data: bytes
    note: str = ""

    def to_file(self) -> discord.File:
        return discord.File(io.BytesIO(self.data), filename=self.filename)


def fit_attachment(filename: str, data: bytes, limit: int) -> Attachment | None:
    """The page as is, or zipped when over ``limit`` bytes; None when even the zip is too big."""
    if len(data) <= limit:
        return Attachment(filename, data)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr(filename, data)
    zipped = buffer.getvalue()
    if len(zipped) <= limit:
        stem = filename.rsplit(".", 1)[0]
        return Attachment(
            f"{stem}.zip",
            zipped,
            note=f"The page ({_mb(len(data))}) is over this server's upload limit: zipped.",
        )
    return None


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def retry_after_of(exc: discord.HTTPException) -> float | None:
    """Seconds Discord asked us to wait, from the 429's headers or its JSON body."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    for key in ("Retry-After", "X-RateLimit-Reset-After"):
        value = headers.get(key)
        if value is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                pass
    # discord.py does not keep the parsed body, but aiohttp caches the raw one.
    body = getattr(response, "_body", None)
    if body:
        try:
            data = json.loads(body)
            return max(0.0, float(data["retry_after"]))
        except (ValueError, KeyError, TypeError):
            pass
    return None


async def with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    attempts: int = 5,
    base_delay_s: float = 1.0,
    max_delay_s: float = 60.0,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> T:
    """Run ``operation``, retrying 429 (after ``retry_after``), 5xx and network errors.

    401 and 404 mean the interaction token is dead: :class:`DeliveryExpired` at once.
    Other 4xx are raised as they are.
    """
    for attempt in range(1, attempts + 1):
        delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        try:
            return await operation()
        except discord.HTTPException as exc:
            if exc.status in DEAD_TOKEN_STATUSES:
                message = f"{what}: Discord answered {exc.status} ({exc.text})"
                raise DeliveryExpired(message) from exc
            if exc.status == 429:
                asked = retry_after_of(exc)
                delay = asked if asked is not None else delay
            elif exc.status < 500:
                raise
            if attempt == attempts:
                raise
            log.warning(
                "%s: Discord answered %s; retry %d in %.1f s", what, exc.status, attempt, delay
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if attempt == attempts:
                raise
            log.warning("%s: %s; retry %d in %.1f s", what, type(exc).__name__, attempt, delay)
        await sleep(delay)
    raise AssertionError("unreachable")


def attachment_limit(interaction: Any) -> int:
    """The interaction's upload limit in bytes (Discord's default when it names none)."""
    return int(getattr(interaction, "filesize_limit", 0) or DEFAULT_ATTACHMENT_LIMIT)


async def send_page_followup(
    interaction: Any,
    *,
    filename: str,
    data: bytes,
    content: str,
    too_big: str,
    ephemeral: bool,
    what: str,
    limit: int | None = None,
    preview: bytes | None = None,
    view: discord.ui.View | None = None,
    posted: Callable[[Any], Awaitable[None]] | None = None,
    attempts: int = 5,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> list[Attachment]:
    """Send a page as a follow-up of ``interaction``: :func:`post_page` through the
    interaction's webhook. ``posted`` gets the message Discord made (to record where the
    version is)."""

    async def followup(**kwargs: Any) -> Any:
        return await interaction.followup.send(ephemeral=ephemeral, wait=True, **kwargs)

    attachments, message = await post_page(
        followup,
        filename=filename,
        data=data,
        content=content,
        too_big=too_big,
        limit=attachment_limit(interaction) if limit is None else limit,
        what=what,
        preview=preview,
        view=view,
        attempts=attempts,
        sleep=sleep,
    )
    if posted is not None:
        await posted(message)
    return attachments


async def post_page(
    send: Callable[..., Awaitable[Any]],
    *,
    filename: str,
    data: bytes,
    content: str,
    too_big: str,
    limit: int,
    what: str,
    preview: bytes | None = None,
    view: discord.ui.View | None = None,
    attempts: int = 5,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> tuple[list[Attachment], Any]:
    """Send a page with ``send`` (a follow-up, or a message in a thread): the one way pages go
    out.

    The page is attached as it is, or zipped when over ``limit``; the message is ``content``
    plus the attachment's note. When even the zip is too big, ``too_big`` is sent instead,
    without a file. ``preview`` (PNG bytes) goes along as ``<stem>.png`` when page and
    preview fit ``limit`` together; it is the first thing dropped. Retries as
    :func:`with_retries` does. Returns what was attached (empty: nothing was) and the message.
    """
    attachment = fit_attachment(filename, data, limit)
    text = too_big if attachment is None else f"{content}\n{attachment.note}".strip()
    attachments = [attachment] if attachment is not None else []
    if attachment is not None and preview is not None:
        if len(attachment.data) + len(preview) <= limit:
            stem = filename.rsplit(".", 1)[0]
            attachments.append(Attachment(f"{stem}.png", preview))
        else:
            log.info("%s: the preview does not fit the upload limit; sending the page alone", what)

    async def send_once() -> Any:
        kwargs: dict[str, Any] = {"content": text}
        if view is not None and attachments:
            kwargs["view"] = view  # the page's buttons go with the page, not a refusal
        if attachments:
            kwargs["files"] = [a.to_file() for a in attachments]  # fresh Files each attempt
        return await send(**kwargs)

    message = await with_retries(send_once, what=what, attempts=attempts, sleep=sleep)
    return attachments, message


@contextlib.contextmanager
def _live_token(ticket: Ticket, what: str) -> Iterator[None]:
    """Guard a call made with the ticket's token: :class:`DeliveryExpired` at once, without
    calling Discord, when the token is known to be dead; marks it dead when Discord says so."""
    if ticket.dead:
        raise DeliveryExpired(f"{what}: the token is dead")
    try:
        yield
    except DeliveryExpired:
        ticket.dead = True
        raise


def build_page_for(job: Job) -> Any:
    """``model.page.page_from_result`` for the job's result, in the job's page mode, style
    and safety policy (blocking: run it in a thread)."""
    from model.page import page_from_result

    assert job.result is not None
    request = job.request
    return page_from_result(
        job.result,
        prompt=job.page_prompt,
        mode=request.mode,
        style=request.style,
        safety=request.safety,
    )


async def version_in_thread(
    threads: PageThreads | None,
    saved: StoredPage | None,
    job: Job,
    *,
    filename: str,
    data: bytes,
    content: str,
    too_big: str,
    limit: int,
    view: discord.ui.View | None,
    preview: bytes | None = None,
    attempts: int = 5,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> tuple[int | None, bool]:
    """Where version ``saved`` (made by ``job``) goes: ``(thread, True)`` when it was just
    posted in its page's thread (the caller points the press's message at it); else
    ``(thread, False)``: the caller sends it as a follow-up of the press, inside ``thread``
    when the press was there, or below it when ``thread`` is None (a first version, a private
    page, a DM, no threads configured, none to be had, or the thread refused the post)."""
    if threads is None or saved is None or job.parent_job_id is None:
        return None, False
    if job.private or job.guild_id is None:
        return None, False
    thread_id = await threads.thread_for(saved)
    if thread_id is None or thread_id == job.channel_id:
        return thread_id, False
    what = f"job {job.job_id} in thread {thread_id}"
    try:
        _attachments, message = await post_page(
            lambda **kwargs: threads.post(thread_id, **kwargs),
            filename=filename,
            data=data,
            content=content,
            too_big=too_big,
            limit=limit,
            what=what,
            preview=preview,
            view=view,
            attempts=attempts,
            sleep=sleep,
        )
    except (discord.HTTPException, DeliveryExpired) as exc:
        log.warning("%s: could not post (%s); sending it below the press", what, exc)
        return None, False
    await threads.record(saved, message, thread_id)
    return thread_id, True


class Delivery:
    """Sends each job's outcome to its interaction (see the module docstring)."""

    def __init__(
        self,
        store: PageStore,
        metrics: Metrics,
        *,
        model_name: str,
        regenerate: Callable[[Job], bool | Awaitable[bool]] | None = None,
        previewer: Previewer | None = None,
        threads: PageThreads | None = None,
        attempts: int = 5,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.store = store
        # Where a page's later versions go (its thread); None: always below the press.
        self.threads = threads
        self.metrics = metrics
        self.model_name = model_name
        # Called once for a page that came out empty: True when the job was queued again.
        self.regenerate = regenerate
        self.previewer = previewer
        self.attempts = attempts
        self._sleep = sleep
        self.expired_deliveries = 0

    async def finish(self, job: Job) -> bool:
        """Tell the job's user how it ended: the page, an error, or that it was cancelled.

        False when instead the job went back to the queue (an empty page, generated once
        more): it will end again, and be told then.
        """
        ticket = ticket_of(job)
        # Only a defer still in flight is waited for: a failed one settles the ticket at once.
        if not await ticket.wait_settled(DEFER_WAIT_S):
            log.warning("job %s ended but its interaction was never deferred", job.job_id)
        latency = time.monotonic() - job.created_at
        try:
            if job.state is JobState.DONE:
                outcome = await self._deliver_page(job, ticket)
                if outcome == "again":
                    return False
                if outcome == "sent":
                    tokens = job.result.generated_tokens if job.result else 0
                    self.metrics.job_done(latency, tokens)
            elif job.state is JobState.FAILED:
                self.metrics.job_failed()
                await self.final_edit(job, texts.failed(job.error))
            elif job.state is JobState.CANCELLED:
                self.metrics.job_cancelled()
                await self.final_edit(job, job.cancel_note or texts.CANCELLED)
            elif job.state is JobState.EXPIRED:
                self.metrics.job_expired()
                await self.final_edit(job, EXPIRED_TEXT)
        except DeliveryExpired as exc:
            self.expired_deliveries += 1
            log.warning(
                "job %s: could not reach the user, the token has expired: %s", job.job_id, exc
            )
        except discord.HTTPException as exc:
            log.error("job %s: delivery failed: %s %s", job.job_id, exc.status, exc.text)
        except Exception:
            log.exception("job %s: delivery failed", job.job_id)
        return True

    async def _deliver_page(self, job: Job, ticket: Ticket) -> str:
        """Build, keep and send the page: "sent", "failed" (there was no page to send) or
        "again" (it came out empty and was queued once more)."""
        result = job.result
        assert result is not None
        try:
            page = await asyncio.to_thread(build_page_for, job)
        except Exception as exc:
            if not isinstance(exc, ModelError):
                log.exception("job %s: building the page failed", job.job_id)
            job.state = JobState.FAILED
            self.metrics.job_failed()
            await self.final_edit(job, texts.NO_PAGE)
            return "failed"
        if PageWarning.EMPTY in page.warnings and await self._regenerated(job):
            # One more try with another seed before anyone sees an empty page.
            log.info("job %s: the page came out empty; generating it again", job.job_id)
            return "again"
        filename = page_filename(job.page_prompt)
        warnings = tuple(str(w) for w in page.warnings)
        # Keep it before sending anything: an expired token must not lose the page.
        try:
            saved = await self.store.save(
                user_id=job.user_id,
                job_id=job.job_id,
                filename=filename,
                data=page.data,
                prompt=job.page_prompt,
                model=self.model_name,
                generated_tokens=result.generated_tokens,
                seconds=result.total_s,
                warnings=warnings,
                parent_job_id=job.parent_job_id,
                kind=job.kind,
                instruction=job.prompt if job.kind == "refine" else None,
                content=page.content,
            )
            kept = True
            label = saved.label
        except (OSError, QueueUnavailable) as exc:
            saved = None
            # A full or read-only disk, a page over the store's cap, Redis away: the user
            # still gets the page now.
            log.error("job %s: could not keep the page (%s); sending it anyway", job.job_id, exc)
            kept = False
            label = ""
        summary = summary_line(
            filename=filename,
            model=self.model_name,
            tokens=result.generated_tokens,
            seconds=result.total_s,
            warnings=warnings,
            version=label,
        )
        preview = None if ticket.dead else await self.render_preview(job, page.data)
        await self.send_page(
            job, filename, page.data, summary, preview=preview, kept=kept, saved=saved
        )
        return "sent"

    async def _regenerated(self, job: Job) -> bool:
        if self.regenerate is None:
            return False
        again = self.regenerate(job)
        return await again if inspect.isawaitable(again) else again

    async def render_preview(self, job: Job, data: bytes) -> bytes | None:
        """The page's PNG preview, or None (no previewer, no time left, or it failed)."""
        if self.previewer is None:
            return None
        what = f"job {job.job_id}"
        # Never let a slow render cost the page its interaction token.
        left_s = job.expires_at - time.monotonic() - PREVIEW_SEND_MARGIN_S
        if left_s < PREVIEW_MIN_S:
            log.warning("%s: no preview: the interaction token expires too soon", what)
            return None
        timeout_s = min(self.previewer.timeout_s, left_s)
        return await self.previewer.try_render(data, what=what, timeout_s=timeout_s)

    async def send_page(
        self,
        job: Job,
        filename: str,
        data: bytes,
        summary: str,
        *,
        preview: bytes | None = None,
        kept: bool = True,
        saved: StoredPage | None = None,
    ) -> None:
        """Mark the deferred message done, then send the page (and its preview) as a follow-up.

        In that order because Discord turns the first follow-up after a "thinking" defer
        into the deferred message itself; once edited, the follow-up is a message of its
        own, so the page arrives as a new message at the bottom of the channel. ``kept``:
        whether the page is in the store (``/mypages`` can send it again). A later version
        of a page (``saved``, the stored version) goes to the page's thread instead, with a
        pointer in the job's message (see ``bot.threads``).
        """
        ticket = ticket_of(job)
        interaction = ticket.interaction
        limit = attachment_limit(interaction)
        where = (
            f"It is kept for you: `/mypages page:{job.job_id}` in a server with a higher limit, "
            "or ask for a smaller page."
            if kept
            else "Ask for a smaller page."
        )
        too_big = (
            f"{summary}\nThe page is {_mb(len(data))}, more than this server's upload limit "
            f"({_mb(limit)}) even zipped. {where}"
        )
        view = page_view(job.job_id, style_names()) if kept else None
        thread_id, in_thread = await version_in_thread(
            self.threads,
            saved,
            job,
            filename=filename,
            data=data,
            content=summary,
            too_big=too_big,
            limit=limit,
            view=view,
            preview=preview,
            attempts=self.attempts,
            sleep=self._sleep,
        )
        if in_thread:
            # Posted with the bot's token: this edit may find the job's token dead, harmlessly.
            assert thread_id is not None
            label = saved.label if saved is not None else ""
            with contextlib.suppress(discord.HTTPException, DeliveryExpired):
                await self.final_edit(job, texts.done_in_thread(filename, label, thread_id))
            return
        try:
            await self.final_edit(job, texts.done(filename, job.job_id, kept=kept))
        except discord.HTTPException as exc:
            log.info("job %s: marking the message done failed: %s", job.job_id, exc)
        what = f"job {job.job_id} follow-up"
        try:
            with _live_token(ticket, what):
                await send_page_followup(
                    interaction,
                    filename=filename,
                    data=data,
                    content=summary,
                    too_big=too_big,
                    limit=limit,
                    preview=preview,
                    # Refine / Regenerate / style need the kept page: no buttons without it.
                    view=view,
                    ephemeral=job.private,
                    what=what,
                    posted=self.threads.recorder(saved, thread_id) if self.threads else None,
                    attempts=self.attempts,
                    sleep=self._sleep,
                )
        except discord.HTTPException as exc:
            log.error("job %s: sending the page failed: %s %s", job.job_id, exc.status, exc.text)
            with contextlib.suppress(discord.HTTPException, DeliveryExpired):
                await self.final_edit(
                    job, texts.upload_refused(exc.status, job.job_id, kept=kept), force=True
                )

    async def final_edit(self, job: Job, text: str, *, force: bool = False) -> None:
        """Replace the job's message with ``text`` (no Cancel button), once unless ``force``.

        Raises DeliveryExpired, without calling Discord, when the token is known to be dead.
        """
        ticket = ticket_of(job)
        async with ticket.lock:
            if ticket.final and not force:
                return
            ticket.final = True

            async def edit() -> None:
                await ticket.interaction.edit_original_response(content=text, view=None)

            what = f"job {job.job_id} final edit"
            with _live_token(ticket, what):
                await with_retries(edit, what=what, attempts=self.attempts, sleep=self._sleep)
            ticket.shown = text
