"""The per-server limit policy: may this member make a request here, now?

:func:`check_request` is pure: it is given the server's settings, the member's roles, the
channel, and what the member has going (jobs waiting, pages today, last request), and
either returns the limits that applied or raises a refusal whose message says which limit
was hit and when it lets go. Counting pages and requests is ``bot.guilds.usage``'s.

The checks, in order: the channel, the jobs waiting, the pages today, the cooldown. The
queued-jobs limit counts only this server's jobs; the queue's own ``QUEUE_MAX_PER_USER`` (a
ceiling for every server's limit) still counts them all.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from bot.errors import BotError, NotAllowed, UserLimitReached
from bot.guilds import texts
from bot.guilds.model import GuildSettings, Limits
from bot.guilds.usage import Usage, day_end
from bot.scheduler import format_duration


class DailyLimitReached(BotError):
    """The member made their pages for the day in this server; ``retry_after_s``: until
    the UTC day ends."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CoolingDown(BotError):
    """The member's last request here was less than the cooldown ago."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def check_request(
    settings: GuildSettings,
    *,
    role_ids: Iterable[int],
    channel_id: int | None,
    queued: int,
    usage: Usage,
    now: float | None = None,
) -> Limits:
    """The member's limits if the request may go ahead; else NotAllowed (channel),
    UserLimitReached (jobs waiting), DailyLimitReached or CoolingDown.

    ``queued``: the member's pending jobs in this server; ``usage``: their pages today and
    last request (``UsageStore.get``); ``now``: wall-clock time (default: now).
    """
    now = time.time() if now is None else now
    if not settings.channel_allowed(channel_id):
        raise NotAllowed(texts.not_in_channel(settings.allowed_channel_ids))
    limits = settings.limits_for(role_ids)
    if queued >= limits.max_queued:
        raise UserLimitReached(texts.queued_limit(queued, limits.max_queued))
    if limits.pages_per_day is not None and usage.pages_today >= limits.pages_per_day:
        wait = day_end(now) - now
        raise DailyLimitReached(
            texts.daily_limit(limits.pages_per_day, format_duration(wait)), wait
        )
    if limits.cooldown_s and usage.last_request_at is not None:
        wait = usage.last_request_at + limits.cooldown_s - now
        if wait > 0:
            raise CoolingDown(texts.cooldown(format_duration(wait)), wait)
    return limits
