"""``/settings``: server admins set the bot's defaults and limits for their server.

``/settings show`` is for everyone: a member sees their own limits (and what they used
today); a member with Manage Server sees every setting and role override too.
``/settings set``, ``/settings role`` and ``/settings reset`` are for Manage Server only;
anyone else is refused with a message saying so. Values are parsed here (``30s``, ``5m``,
``unlimited``, ``#channel`` mentions, ``default``) and validated by the store.

The handlers return the reply's text (or raise a BotError, which the command tree's
``on_error`` turns into the reply); :meth:`SettingsCommand.register` adds the group to a
tree with callbacks that send the text privately.

This module does not use ``from __future__ import annotations``: discord.py reads the
callbacks' annotations.
"""

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import discord
from discord import app_commands

from bot.errors import NotAllowed, NotPermitted
from bot.guilds import texts
from bot.guilds.model import (
    FIELD_BY_LABEL,
    FIELDS,
    LABELS,
    LIMIT_FIELDS,
    GuildSettings,
    InvalidSetting,
    Limits,
)
from bot.guilds.store import GuildSettingsStore
from bot.guilds.usage import UsageStore, day_end
from bot.scheduler import format_duration

DEFAULT_WORDS = {"default", "reset"}
UNLIMITED_WORDS = {"unlimited", "none", "off", "no", "∞"}
NONE_WORDS = {"none", "off", "no"}
ALL_CHANNELS_WORDS = {"all", "any", "every", "none", "*"}
_DURATION = re.compile(r"(\d+)\s*(hours?|h|minutes?|mins?|m|seconds?|secs?|s)?", re.IGNORECASE)
_UNIT_S = {"h": 3600, "m": 60, "s": 1}
_CHANNEL = re.compile(r"<#(\d+)>|(\d+)")
RESET_ALL = "all"
RESET_ROLES = "roles"


def is_manager(interaction: Any) -> bool:
    """Manage Server (or Administrator): the same rule as ``bot.commands.is_admin``, kept
    here so that ``bot.commands`` can import this module without an import cycle."""
    permissions = interaction.permissions
    return bool(permissions.manage_guild or permissions.administrator)


def member_role_ids(interaction: Any) -> set[int]:
    """The member's role ids, with the server's @everyone role (its id is the server's).

    ``Member._roles`` holds the ids sent with the interaction (``Member.roles`` would need
    the guild's role cache, which a bot without the guilds intent doesn't have).
    """
    role_ids = {int(role_id) for role_id in (getattr(interaction.user, "_roles", ()) or ())}
    if interaction.guild_id is not None:
        role_ids.add(int(interaction.guild_id))
    return role_ids


# -- parsing what an admin typed ------------------------------------------------------------


def parse_value(name: str, text: str) -> Any:
    """The typed value of setting ``name`` from what an admin typed (validated later)."""
    word = text.strip().lower()
    label = LABELS.get(name, name)
    if name == "allowed_channel_ids":
        return parse_channels(text)
    if name in ("default_style", "page_mode"):
        return None if word in NONE_WORDS else word
    if name == "safety":
        return word
    if name == "pages_per_day":
        return None if word in UNLIMITED_WORDS else parse_whole(label, word)
    if name == "cooldown_s":
        return 0 if word in NONE_WORDS else parse_duration(label, word)
    return parse_whole(label, word)


def parse_whole(label: str, text: str) -> int:
    """A whole number, or InvalidSetting naming the setting."""
    if not re.fullmatch(r"\d{1,9}", text.strip()):
        raise InvalidSetting(texts.bad_number(label, text))
    return int(text)


def parse_duration(label: str, text: str) -> int:
    """Seconds from ``90``, ``30s``, ``5m``, ``1h``, ``1h 30m``."""
    text = text.strip()
    position, total = 0, 0
    for match in _DURATION.finditer(text):
        if text[position : match.start()].strip(" ,"):
            raise InvalidSetting(texts.bad_duration(label, text))
        unit = (match.group(2) or "s")[0].lower()
        total += int(match.group(1)) * _UNIT_S[unit]
        position = match.end()
    if position == 0 or text[position:].strip():
        raise InvalidSetting(texts.bad_duration(label, text))
    return total


def parse_channels(text: str) -> frozenset[int]:
    """Channel ids from ``<#id>`` mentions or plain ids; ``all`` (or nothing): every channel."""
    if text.strip().lower() in ALL_CHANNELS_WORDS or not text.strip():
        return frozenset()
    ids = set()
    for part in re.split(r"[\s,]+", text.strip()):
        match = _CHANNEL.fullmatch(part)
        if match is None:
            raise InvalidSetting(texts.bad_channels(part))
        ids.add(int(match.group(1) or match.group(2)))
    return frozenset(ids)


def field_of(label: str, allowed: Iterable[str] = FIELDS) -> str:
    """The field an admin named (by its label or its field name)."""
    allowed = tuple(allowed)
    word = label.strip().lower()
    name = FIELD_BY_LABEL.get(word, word)
    if name not in allowed:
        raise InvalidSetting(texts.unknown_field(label, [LABELS[n] for n in allowed]))
    return name


# -- showing settings -----------------------------------------------------------------------


def show_value(name: str, value: Any) -> str:
    """A setting's value as /settings shows it."""
    if name == "allowed_channel_ids":
        return texts.channel_mentions(value) if value else "all channels"
    if name in ("default_style", "page_mode"):
        return f"`{value}`" if value is not None else "the bot's default"
    if name == "safety":
        return f"`{value}`"
    if name == "pages_per_day":
        return "unlimited" if value is None else f"{value} a day"
    if name == "cooldown_s":
        return format_duration(value) if value else "none"
    return str(value)


def describe_limits(limits: Limits) -> list[str]:
    """One line per limit, saying which role granted it."""
    lines = []
    for name in LIMIT_FIELDS:
        role_id = limits.granted_by.get(name)
        source = f" (from <@&{role_id}>)" if role_id is not None else ""
        lines.append(f"· {LABELS[name]}: {show_value(name, getattr(limits, name))}{source}")
    return lines


def describe_settings(settings: GuildSettings) -> list[str]:
    """Every setting of a server, defaults marked, then the role overrides."""
    lines = ["**This server's settings**"]
    for name in FIELDS:
        marker = "" if name in settings.explicit else " · default"
        lines.append(f"· {LABELS[name]}: {show_value(name, getattr(settings, name))}{marker}")
    if settings.role_limits:
        lines.append("**Role limits** (a member gets the most generous of their roles')")
        for role_id, overrides in sorted(settings.role_limits.items()):
            parts = [
                f"{LABELS[name]} {show_value(name, overrides[name])}"
                for name in LIMIT_FIELDS
                if name in overrides
            ]
            lines.append(f"· <@&{role_id}>: {', '.join(parts)}")
    return lines


# -- the handlers ---------------------------------------------------------------------------


@dataclass
class SettingsCommand:
    """The /settings group, given the settings store and (for show) the usage store."""

    store: GuildSettingsStore
    usage: UsageStore | None = None
    clock: Callable[[], float] = time.time

    async def show(self, interaction: discord.Interaction) -> str:
        """Everyone: their limits here and today's use; managers: every setting too."""
        guild_id = _guild_id(interaction)
        settings = await self.store.get(guild_id)
        limits = settings.limits_for(member_role_ids(interaction))
        lines = ["**Your limits in this server**", *describe_limits(limits)]
        if self.usage is not None:
            usage = await self.usage.get(guild_id, interaction.user.id)
            if limits.pages_per_day is not None:
                now = self.clock()
                left = format_duration(day_end(now) - now)
                lines.append(
                    f"· today: {usage.pages_today} of {limits.pages_per_day} pages "
                    f"(the count starts again in {left})"
                )
        if settings.allowed_channel_ids:
            channels = show_value("allowed_channel_ids", settings.allowed_channel_ids)
            lines.append(f"· the bot answers in: {channels}")
        if is_manager(interaction):
            lines += ["", *describe_settings(settings)]
        return "\n".join(lines)

    async def set_value(self, interaction: discord.Interaction, label: str, value: str) -> str:
        """Manage Server: set one setting (``default``: back to the bot's default)."""
        guild_id = _admin_guild_id(interaction)
        name = field_of(label)
        if value.strip().lower() in DEFAULT_WORDS:
            settings = await self.store.reset(guild_id, name)
        else:
            settings = await self.store.update(guild_id, **{name: parse_value(name, value)})
        return texts.field_set(LABELS[name], show_value(name, getattr(settings, name)))

    async def set_role(
        self, interaction: discord.Interaction, role_id: int, label: str, value: str
    ) -> str:
        """Manage Server: one role's own value of one limit (``default``: drop it)."""
        guild_id = _admin_guild_id(interaction)
        name = field_of(label, LIMIT_FIELDS)
        if value.strip().lower() in DEFAULT_WORDS:
            await self.store.clear_role(guild_id, role_id, name)
            return texts.role_limit_cleared(role_id, LABELS[name])
        settings = await self.store.update_role(
            guild_id, role_id, **{name: parse_value(name, value)}
        )
        shown = show_value(name, settings.role_limits[role_id][name])
        return texts.role_limit_set(role_id, LABELS[name], shown)

    async def reset(self, interaction: discord.Interaction, label: str | None = None) -> str:
        """Manage Server: everything back to the defaults, or one setting, or ``roles``."""
        guild_id = _admin_guild_id(interaction)
        word = (label or RESET_ALL).strip().lower()
        if word == RESET_ALL:
            await self.store.reset(guild_id)
            return texts.RESET_ALL
        if word == RESET_ROLES:
            await self.store.reset(guild_id, roles=True)
            return texts.reset_fields(["every role's limits"])
        name = field_of(word)
        await self.store.reset(guild_id, name)
        return texts.reset_fields([LABELS[name]])

    def register(self, tree: app_commands.CommandTree[Any]) -> app_commands.Group:
        """Add the /settings group (show, set, role, reset) to ``tree``; returns the group."""
        handler = self
        field_choices = [app_commands.Choice(name=LABELS[n], value=LABELS[n]) for n in FIELDS]
        limit_choices = [app_commands.Choice(name=LABELS[n], value=LABELS[n]) for n in LIMIT_FIELDS]
        reset_choices = [
            app_commands.Choice(name=RESET_ALL, value=RESET_ALL),
            app_commands.Choice(name=RESET_ROLES, value=RESET_ROLES),
            *field_choices,
        ]
        group = app_commands.Group(
            name="settings", description="This server's settings for the bot", guild_only=True
        )

        @group.command(name="show", description="Your limits here (managers: every setting)")
        async def show(interaction: discord.Interaction) -> None:
            await _reply(interaction, await handler.show(interaction))

        @group.command(name="set", description="Change a setting (Manage Server)")
        @app_commands.describe(
            setting="Which setting",
            value="e.g. 5, 30s, unlimited, #channel #other, all, default",
        )
        @app_commands.choices(setting=field_choices)
        async def set_(interaction: discord.Interaction, setting: str, value: str) -> None:
            await _reply(interaction, await handler.set_value(interaction, setting, value))

        @group.command(name="role", description="A role's own limit (Manage Server)")
        @app_commands.describe(
            role="The role", limit="Which limit", value="e.g. 10, 0s, unlimited, default"
        )
        @app_commands.choices(limit=limit_choices)
        async def role(
            interaction: discord.Interaction, role: discord.Role, limit: str, value: str
        ) -> None:
            await _reply(interaction, await handler.set_role(interaction, role.id, limit, value))

        @group.command(name="reset", description="Back to the bot's defaults (Manage Server)")
        @app_commands.describe(setting="One setting, `roles`, or everything (the default)")
        @app_commands.choices(setting=reset_choices)
        async def reset(interaction: discord.Interaction, setting: str | None = None) -> None:
            await _reply(interaction, await handler.reset(interaction, setting))

        tree.add_command(group)
        return group


async def _reply(interaction: discord.Interaction, text: str) -> None:
    await interaction.response.send_message(text, ephemeral=True)


def _guild_id(interaction: discord.Interaction) -> int:
    if interaction.guild_id is None:
        raise NotAllowed(texts.GUILD_ONLY)
    return interaction.guild_id


def _admin_guild_id(interaction: discord.Interaction) -> int:
    guild_id = _guild_id(interaction)
    if not is_manager(interaction):
        raise NotPermitted(texts.MANAGERS_ONLY)
    return guild_id
