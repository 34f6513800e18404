"""JSON payload builders shaped like Discord's API v10 objects.

Only the fields discord.py reads (plus the ones Discord always sends) are filled in; the
shapes follow https://discord.com/developers/docs (users, guilds, members, roles, channels,
messages, interactions).
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

DISCORD_EPOCH_MS = 1420070400000

# Permission bits used by the fake (https://discord.com/developers/docs/topics/permissions).
PERM_ADMINISTRATOR = 1 << 3
PERM_MANAGE_GUILD = 1 << 5
PERM_VIEW_CHANNEL = 1 << 10
PERM_SEND_MESSAGES = 1 << 11
PERM_EMBED_LINKS = 1 << 14
PERM_ATTACH_FILES = 1 << 15
PERM_READ_MESSAGE_HISTORY = 1 << 16
PERM_USE_APPLICATION_COMMANDS = 1 << 31
DEFAULT_MEMBER_PERMISSIONS = (
    PERM_VIEW_CHANNEL
    | PERM_SEND_MESSAGES
    | PERM_EMBED_LINKS
    | PERM_ATTACH_FILES
    | PERM_READ_MESSAGE_HISTORY
    | PERM_USE_APPLICATION_COMMANDS
)
ALL_PERMISSIONS = (1 << 50) - 1

# Discord's default for a guild without boosts is 10 MiB.
DEFAULT_ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024

_counter = itertools.count()
_counter_lock = threading.Lock()


def snowflake(at: float | None = None) -> int:
    """A new, unique snowflake whose timestamp is ``at`` (epoch seconds, default now).

    discord.py derives ``Interaction.created_at`` / ``expires_at`` from the id, so the
    timestamp part matters.
    """
    ms = int((time.time() if at is None else at) * 1000) - DISCORD_EPOCH_MS
    with _counter_lock:
        inc = next(_counter) & 0xFFF
    return (ms << 22) | (1 << 17) | inc


def shard_of(guild_id: int | None, shard_count: int) -> int:
    """The shard that receives a guild's events: ``(guild_id >> 22) % shard_count``; DMs
    (``None``) go to shard 0 (https://discord.com/developers/docs/events/gateway#sharding)."""
    return 0 if guild_id is None else (guild_id >> 22) % shard_count


def snowflake_on_shard(shard_id: int, shard_count: int) -> int:
    """A new snowflake (for a guild) that lands on ``shard_id`` of ``shard_count``.

    The shard comes from the timestamp bits, so the timestamp moves ahead by less than
    ``shard_count`` milliseconds.
    """
    if not 0 <= shard_id < shard_count:
        raise ValueError(f"shard {shard_id} is not in 0..{shard_count - 1}")
    value = snowflake()
    ms = value >> 22
    return value + (((shard_id - ms) % shard_count) << 22)


def snowflake_time(value: int) -> float:
    """Epoch seconds encoded in a snowflake."""
    return ((value >> 22) + DISCORD_EPOCH_MS) / 1000


def iso_now(at: float | None = None) -> str:
    """An ISO-8601 timestamp as Discord writes them."""
    return dt.datetime.fromtimestamp(time.time() if at is None else at, dt.UTC).isoformat()


@dataclass
class FakeUser:
    """A Discord user known to the fake server."""

    id: int
    username: str
    bot: bool = False
    role_ids: list[int] = field(default_factory=list)
    permissions: int = DEFAULT_MEMBER_PERMISSIONS

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "username": self.username,
            "global_name": self.username.title(),
            "discriminator": "0",
            "avatar": None,
            "public_flags": 0,
            "flags": 0,
        }
        if self.bot:
            data["bot"] = True
        return data

    def member_payload(
        self, *, permissions: int | None = None, roles: list[int] | None = None
    ) -> dict[str, Any]:
        """The member object; ``roles`` (default: all of the user's) lists the role ids of
        the guild it is sent for."""
        data: dict[str, Any] = {
            "user": self.payload(),
            "nick": None,
            "avatar": None,
            "roles": [str(r) for r in (self.role_ids if roles is None else roles)],
            "joined_at": iso_now(),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }
        if permissions is not None:
            # Only interaction payloads carry the member's resolved permissions.
            data["permissions"] = str(permissions)
        return data


@dataclass
class FakeRole:
    id: int
    name: str
    permissions: int
    position: int = 0

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }


THREAD_TYPES = (10, 11, 12)  # announcement, public and private threads


@dataclass
class FakeChannel:
    """A guild text channel, a DM (type 1) or a thread (types 10-12, with ``parent_id``)."""

    id: int
    name: str
    guild_id: int | None
    type: int = 0  # GUILD_TEXT; 1 = DM; 11 = public thread, 12 = private thread
    position: int = 0
    recipient: FakeUser | None = None
    parent_id: int | None = None  # threads: the channel it belongs to
    owner_id: int | None = None  # threads: who started it
    auto_archive_duration: int = 1440
    message_count: int = 0
    created: str = field(default_factory=iso_now)

    @property
    def is_thread(self) -> bool:
        return self.type in THREAD_TYPES

    def thread_payload(self) -> dict[str, Any]:
        """A thread channel object, as Discord sends it."""
        return {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild_id),
            "parent_id": str(self.parent_id),
            "owner_id": str(self.owner_id),
            "name": self.name,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "message_count": self.message_count,
            "total_message_sent": self.message_count,
            "member_count": 1,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": self.auto_archive_duration,
                "archive_timestamp": self.created,
                "locked": False,
                "create_timestamp": self.created,
            },
        }

    def payload(self) -> dict[str, Any]:
        if self.is_thread:
            return self.thread_payload()
        if self.type == 1:
            return {
                "id": str(self.id),
                "type": 1,
                "last_message_id": None,
                "flags": 0,
                "recipients": [self.recipient.payload()] if self.recipient else [],
            }
        return {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": self.position,
            "permission_overwrites": [],
            "nsfw": False,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "parent_id": None,
            "flags": 0,
        }


@dataclass
class FakeGuild:
    id: int
    name: str
    owner_id: int
    roles: list[FakeRole]
    channels: list[FakeChannel]
    members: list[FakeUser]
    threads: list[FakeChannel] = field(default_factory=list)

    @property
    def everyone_role(self) -> FakeRole:
        return self.roles[0]

    def role(self, name: str) -> FakeRole:
        """The guild's role called ``name`` (``Moderator``, ``Admin``, ``@everyone``...)."""
        for role in self.roles:
            if role.name == name:
                return role
        raise LookupError(f"guild {self.name!r} has no role {name!r}")

    def member_roles(self, user: FakeUser) -> list[int]:
        """The user's role ids that belong to this guild."""
        mine = {role.id for role in self.roles}
        return [r for r in user.role_ids if r in mine]

    def member_payload(self, user: FakeUser, *, permissions: int | None = None) -> dict[str, Any]:
        """``user`` as a member of this guild (only this guild's roles)."""
        return user.member_payload(permissions=permissions, roles=self.member_roles(user))

    def payload(self) -> dict[str, Any]:
        """The full GUILD_CREATE payload."""
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": [r.payload() for r in self.roles],
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "application_id": None,
            "system_channel_id": str(self.channels[0].id) if self.channels else None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "max_members": 500000,
            "vanity_url_code": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "joined_at": iso_now(),
            "large": False,
            "unavailable": False,
            "member_count": len(self.members),
            "voice_states": [],
            "members": [self.member_payload(m) for m in self.members],
            "channels": [c.payload() for c in self.channels],
            "threads": [t.payload() for t in self.threads],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }


def attachment_payload(
    attachment_id: int, filename: str, size: int, content_type: str | None, channel_id: int
) -> dict[str, Any]:
    url = f"https://cdn.discordapp.com/attachments/{channel_id}/{attachment_id}/{filename}"
    data: dict[str, Any] = {
        "id": str(attachment_id),
        "filename": filename,
        "size": size,
        "url": url,
        "proxy_url": url.replace("cdn.discordapp.com", "media.discordapp.net"),
    }
    if content_type:
        data["content_type"] = content_type
    return data
