"""Per-server settings for admins: the settings themselves, their stores, usage counters,
the ``/settings`` command (``bot.guilds.command``) and the gate /html calls
(``bot.guilds.gate``); the limit policy is ``bot.limits``."""

from bot.guilds.model import (
    FIELDS,
    LIMIT_FIELDS,
    GuildDefaults,
    GuildSettings,
    InvalidSetting,
    Limits,
)

__all__ = [
    "FIELDS",
    "LIMIT_FIELDS",
    "GuildDefaults",
    "GuildSettings",
    "InvalidSetting",
    "Limits",
]
