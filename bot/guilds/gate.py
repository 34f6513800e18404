"""The per-server checks of one request, as the request handlers call them.

``admit`` before queuing (read the server's settings and the member's usage, apply
``bot.limits.check_request``); ``record`` once the job is queued (so a refused or failed
submit doesn't count). The settings ``admit`` returns carry the server's default style, page
mode and safety policy for the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from bot.guilds.model import GuildSettings
from bot.guilds.store import GuildSettingsStore, open_guild_settings
from bot.guilds.usage import Usage, UsageStore, open_usage
from bot.limits import check_request


@dataclass
class GuildGate:
    """The settings store and the usage counters, and the check that uses both."""

    settings: GuildSettingsStore
    usage: UsageStore
    clock: Callable[[], float] = field(default=time.time)

    async def admit(
        self,
        *,
        guild_id: int | None,
        user_id: int,
        role_ids: Iterable[int],
        channel_id: int | None,
        queued: int,
    ) -> GuildSettings | None:
        """The server's settings if the request may go ahead (None in a DM: no server
        limits apply); else the refusal of ``check_request``. ``queued``: the member's
        pending jobs in this server."""
        if guild_id is None:
            return None
        settings = await self.settings.get(guild_id)
        usage = await self.usage.get(guild_id, user_id)
        check_request(
            settings,
            role_ids=role_ids,
            channel_id=channel_id,
            queued=queued,
            usage=usage,
            now=self.clock(),
        )
        return settings

    async def record(self, guild_id: int | None, user_id: int) -> Usage | None:
        """Count an accepted request (a page today, the cooldown's start)."""
        if guild_id is None:
            return None
        return await self.usage.record(guild_id, user_id)

    async def aclose(self) -> None:
        """Close the SQLite connections (a Redis client is the queue's to close)."""
        await self.settings.aclose()
        await self.usage.aclose()


def open_gate(settings: Any, redis_client: aioredis.Redis | None = None) -> GuildGate:
    """Both stores for ``QUEUE_BACKEND`` (SQLite next to STATE_DB, or Redis under
    REDIS_PREFIX through ``redis_client``, the queue's client)."""
    return GuildGate(
        settings=open_guild_settings(settings, redis_client),
        usage=open_usage(settings, redis_client),
    )
