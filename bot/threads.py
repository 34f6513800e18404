"""One conversation per page: its later versions go to a thread started on its first message.

A page's v1 arrives as a follow-up of the ``/html`` interaction, in the channel. The first
Refine, Regenerate or style switch starts a public thread on the first posted version's
message (on Discord such a thread has the message's id) and every later version of the page
is posted there, each with its own buttons, so the page's history reads top to bottom in one
place while the channel keeps one message per page. A press inside the thread is answered in
the thread anyway; a press in the channel gets its status there and, once the version is in
the thread, a line pointing to it.

Where a thread can't be had (a private page, a DM, a message nobody recorded, no permission
to start threads or to post in them) the version goes out as before: a follow-up of the
press, in the same channel. Nothing here may lose a version: every failure falls back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import discord

from bot.queue import PageStore
from bot.versions import StoredPage

log = logging.getLogger(__name__)

THREAD_NAME_MAX = 100  # Discord's limit
THREAD_ARCHIVE_MINUTES: Literal[1440] = 1440  # a day of quiet before Discord hides it
ALREADY_HAS_THREAD = 160004  # "A thread has already been created for this message"


def thread_name(filename: str, prompt: str) -> str:
    """The thread's title: the page's file name and the start of its prompt, 1-100 chars."""
    words = " ".join(prompt.split())
    name = f"{filename} · {words}" if words else filename
    if len(name) > THREAD_NAME_MAX:
        name = name[: THREAD_NAME_MAX - 1].rstrip() + "…"
    return name or "page"


def posted_channel_id(message: Any) -> int | None:
    """The channel (or thread) id of a message discord.py returned, None if it has none."""
    channel_id = getattr(message, "channel_id", None)
    if channel_id is None:
        channel_id = getattr(getattr(message, "channel", None), "id", None)
    return int(channel_id) if channel_id else None


class PageThreads:
    """Finds (or starts) a page's thread and records where each version was posted."""

    def __init__(self, client: discord.Client, pages: PageStore) -> None:
        self.client = client
        self.pages = pages

    async def record(self, version: StoredPage | None, message: Any, thread_id: int | None) -> None:
        """Remember that ``version`` went out as ``message`` (in ``thread_id`` when not None)."""
        if version is None or message is None or getattr(message, "id", None) is None:
            return
        try:
            await self.pages.set_message(
                version.user_id,
                version.job_id,
                message_id=int(message.id),
                channel_id=posted_channel_id(message),
                thread_id=thread_id,
            )
        except Exception as exc:  # where it was posted is a convenience; the page is kept
            log.warning("page %s: could not record its message: %s", version.job_id, exc)

    def recorder(
        self, version: StoredPage | None, thread_id: int | None
    ) -> Callable[[Any], Awaitable[None]]:
        """:meth:`record` for a message not sent yet (``send_page_followup``'s ``posted``)."""

        async def record(message: Any) -> None:
            await self.record(version, message, thread_id)

        return record

    async def thread_for(self, version: StoredPage) -> int | None:
        """The thread ``version``'s page continues in: the one it has, or one started now on
        its first posted version's message. None: there is none to be had (see the module
        docstring); the caller posts where the press was."""
        try:
            history = await self.pages.get_page(version.user_id, version.page_id)
        except Exception as exc:
            log.warning("page %s: could not read its versions: %s", version.page_id, exc)
            return None
        if history is None:
            return None
        for kept in history.versions:
            if kept.thread_id:
                return kept.thread_id
        root = next((kept for kept in history.versions if kept.message_id), None)
        if root is None or root.message_id is None or root.channel_id is None:
            return None
        thread_id = await self._start(root.channel_id, root.message_id, root)
        if thread_id is not None:
            try:
                await self.pages.set_message(
                    root.user_id,
                    root.job_id,
                    message_id=root.message_id,
                    channel_id=root.channel_id,
                    thread_id=thread_id,
                )
            except Exception as exc:
                log.warning("page %s: could not record its thread: %s", root.page_id, exc)
        return thread_id

    async def _start(self, channel_id: int, message_id: int, root: StoredPage) -> int | None:
        try:
            # The raw route: a partial message (all a webhook-delivered page gives us) has no
            # guild attached, which discord.py's create_thread insists on.
            thread = await self.client.http.start_thread_with_message(
                channel_id,
                message_id,
                name=thread_name(root.filename, root.prompt),
                auto_archive_duration=THREAD_ARCHIVE_MINUTES,
            )
        except discord.HTTPException as exc:
            if exc.code == ALREADY_HAS_THREAD:
                # Another shard (or an earlier try) started it: it has the message's id.
                return message_id
            # No permission, a DM, an ephemeral or deleted message: post where the press was.
            log.info(
                "page %s: no thread on message %s: %s %s",
                root.page_id,
                message_id,
                exc.status,
                exc.text,
            )
            return None
        return int(thread["id"])

    async def post(self, thread_id: int, **kwargs: Any) -> Any:
        """Send a message in the thread (``discord.abc.Messageable.send``'s arguments)."""
        return await self.client.get_partial_messageable(thread_id).send(**kwargs)
