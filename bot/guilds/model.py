"""One server's settings: what they are, their defaults, validation, and their stored form.

A server stores only what its admins changed; everything else follows the bot's environment
(``bot.settings.Settings``), so an operator who raises ``QUEUE_MAX_PER_USER`` raises it for
every server that never set its own. Each setting is stored as one field holding JSON, and a
role's override of one limit as one more field (``role:<role id>:<limit>``): a change is one
field written, never a read-modify-write of the whole record, in SQLite and Redis alike.

Values are validated on the way in (:func:`validate`, raising :class:`InvalidSetting` with
a message for the admin) and again on the way out, so a stored value the bot no longer
accepts (say, a queued-jobs limit above a lowered ``QUEUE_MAX_PER_USER``) falls back to the
default with a warning instead of breaking the server.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bot.errors import BotError
from bot.guilds import texts
from model.prompting import STYLE_HINTS
from model.types import PageMode, SafetyPolicy

log = logging.getLogger(__name__)

LIMIT_FIELDS = ("max_queued", "pages_per_day", "cooldown_s")
FIELDS = ("allowed_channel_ids", "default_style", "page_mode", "safety", *LIMIT_FIELDS)
# What admins type and read (in /settings and in error messages), by field.
LABELS = {
    "allowed_channel_ids": "channels",
    "default_style": "style",
    "page_mode": "page_mode",
    "safety": "safety",
    "max_queued": "queued",
    "pages_per_day": "pages_per_day",
    "cooldown_s": "cooldown",
}
FIELD_BY_LABEL = {label: name for name, label in LABELS.items()}

MAX_COOLDOWN_S = 24 * 3600  # also how long the last request time is kept
MAX_PAGES_PER_DAY = 10_000
MAX_CHANNELS = 50
MAX_ROLE_OVERRIDES = 50
ROLE_PREFIX = "role:"


class InvalidSetting(BotError):
    """A value an admin gave for a setting is not acceptable; the message says why."""


@dataclass(frozen=True)
class GuildDefaults:
    """What a server that set nothing gets: the bot's environment settings.

    ``max_queued`` is also the ceiling of every server's and role's queued-jobs limit: the
    queue itself refuses a user past ``QUEUE_MAX_PER_USER``, whatever a server says.
    """

    max_queued: int = 3
    safety: SafetyPolicy = SafetyPolicy.STANDARD
    page_mode: PageMode | None = None
    default_style: str | None = None
    pages_per_day: int | None = None
    cooldown_s: int = 0

    @classmethod
    def from_settings(cls, settings: Any) -> GuildDefaults:
        """The defaults of ``bot.settings.Settings`` (QUEUE_MAX_PER_USER, SAFETY, PAGE_MODE)."""
        return cls(
            max_queued=settings.queue_max_per_user,
            safety=SafetyPolicy(settings.safety),
            page_mode=settings.page_mode,
        )


@dataclass(frozen=True)
class Limits:
    """The limits one member gets, and which role granted each (absent: the server's)."""

    max_queued: int
    pages_per_day: int | None  # None: unlimited
    cooldown_s: int
    granted_by: Mapping[str, int] = field(default_factory=dict)


RoleLimits = Mapping[str, int | None]


@dataclass(frozen=True)
class GuildSettings:
    """One server's effective settings (stored changes over the defaults).

    ``allowed_channel_ids`` empty: every channel. ``page_mode`` None: the bot's mode (the
    model preset's). ``pages_per_day`` None: unlimited. ``role_limits``: role id -> the limits
    that role sets (a subset of ``LIMIT_FIELDS``; ``pages_per_day`` may be None, unlimited).
    ``explicit``: the fields this server set (the rest are the defaults).
    """

    guild_id: int
    allowed_channel_ids: frozenset[int] = frozenset()
    default_style: str | None = None
    page_mode: PageMode | None = None
    safety: SafetyPolicy = SafetyPolicy.STANDARD
    max_queued: int = 3
    pages_per_day: int | None = None
    cooldown_s: int = 0
    role_limits: Mapping[int, RoleLimits] = field(default_factory=dict)
    explicit: frozenset[str] = frozenset()

    @classmethod
    def defaults(cls, guild_id: int, defaults: GuildDefaults) -> GuildSettings:
        """A server that set nothing."""
        return cls(
            guild_id=guild_id,
            default_style=defaults.default_style,
            page_mode=defaults.page_mode,
            safety=defaults.safety,
            max_queued=defaults.max_queued,
            pages_per_day=defaults.pages_per_day,
            cooldown_s=defaults.cooldown_s,
        )

    def channel_allowed(self, channel_id: int | None) -> bool:
        """Whether the bot takes requests in ``channel_id`` in this server."""
        return not self.allowed_channel_ids or channel_id in self.allowed_channel_ids

    def limits_for(self, role_ids: Iterable[int]) -> Limits:
        """The member's limits: per limit, the most generous of their roles that set it,
        else the server's. A role may set a stricter limit than the server's, too."""
        values: dict[str, int | None] = {
            "max_queued": self.max_queued,
            "pages_per_day": self.pages_per_day,
            "cooldown_s": self.cooldown_s,
        }
        granted: dict[str, int] = {}
        for name in LIMIT_FIELDS:
            best: tuple[float, int] | None = None
            for role_id in sorted(set(role_ids)):
                overrides = self.role_limits.get(role_id, {})
                if name not in overrides:
                    continue
                score = generosity(name, overrides[name])
                if best is None or score > best[0]:
                    best = (score, role_id)
            if best is not None:
                values[name] = self.role_limits[best[1]][name]
                granted[name] = best[1]
        max_queued, cooldown = values["max_queued"], values["cooldown_s"]
        assert max_queued is not None and cooldown is not None  # validated: never None
        return Limits(
            max_queued=max_queued,
            pages_per_day=values["pages_per_day"],
            cooldown_s=cooldown,
            granted_by=granted,
        )


def generosity(name: str, value: int | None) -> float:
    """Bigger is more generous: more queued jobs, more pages (None: unlimited), less cooldown."""
    if name == "pages_per_day" and value is None:
        return math.inf
    assert value is not None
    return -value if name == "cooldown_s" else value


# -- validation -----------------------------------------------------------------------------


def validate(name: str, value: Any, defaults: GuildDefaults) -> Any:
    """``value`` normalised for the setting ``name``, or InvalidSetting saying why."""
    label = LABELS.get(name)
    if label is None:
        raise InvalidSetting(texts.unknown_field(name, LABELS.values()))
    if name == "allowed_channel_ids":
        return _channels(value)
    if name == "default_style":
        if value is None:
            return None
        return _choice(label, value, list(STYLE_HINTS))
    if name == "page_mode":
        if value is None:
            return None
        return PageMode(_choice(label, value, [mode.value for mode in PageMode]))
    if name == "safety":
        return SafetyPolicy(_choice(label, value, [policy.value for policy in SafetyPolicy]))
    return validate_limit(name, value, defaults)


def validate_limit(name: str, value: Any, defaults: GuildDefaults) -> int | None:
    """A limit's value (the server's or a role's), normalised, or InvalidSetting."""
    label = LABELS.get(name, name)
    if name == "pages_per_day" and value is None:
        return None
    if name not in LIMIT_FIELDS:
        raise InvalidSetting(texts.unknown_field(name, [LABELS[n] for n in LIMIT_FIELDS]))
    number = _whole(label, value)
    if name == "max_queued":
        if number > defaults.max_queued:
            raise InvalidSetting(texts.above_ceiling(label, number, defaults.max_queued))
        return _in_range(label, number, 1, defaults.max_queued)
    if name == "pages_per_day":
        return _in_range(label, number, 0, MAX_PAGES_PER_DAY)
    return _in_range(label, number, 0, MAX_COOLDOWN_S)


def _whole(label: str, value: Any) -> int:
    # bool is an int to Python, never to an admin; 3.0 is fine, 3.5 is not.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSetting(texts.bad_number(label, str(value)))
    if isinstance(value, float) and not value.is_integer():
        raise InvalidSetting(texts.bad_number(label, str(value)))
    return int(value)


def _in_range(label: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidSetting(texts.out_of_range(label, value, low, high))
    return value


def _choice(label: str, value: Any, choices: Collection[str]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise InvalidSetting(texts.bad_choice(label, str(value), choices))
    return text


def _channels(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidSetting(texts.bad_channels(str(value)))
    ids = set()
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            raise InvalidSetting(texts.bad_channels(str(item)))
        ids.add(item)
    if len(ids) > MAX_CHANNELS:
        raise InvalidSetting(texts.too_many_channels(len(ids), MAX_CHANNELS))
    return frozenset(ids)


# -- the stored form ------------------------------------------------------------------------


def role_key(role_id: int, name: str) -> str:
    """The stored field of one role's override of one limit."""
    return f"{ROLE_PREFIX}{role_id}:{name}"


def encode(value: Any) -> str:
    """A validated value as the JSON stored for it."""
    if isinstance(value, frozenset | set):
        return json.dumps(sorted(value))
    if isinstance(value, PageMode | SafetyPolicy):
        return json.dumps(value.value)
    return json.dumps(value)


def decode(guild_id: int, raw: Mapping[str, str], defaults: GuildDefaults) -> GuildSettings:
    """The settings of a server from its stored fields; bad fields are skipped, logged."""
    settings = GuildSettings.defaults(guild_id, defaults)
    changes: dict[str, Any] = {}
    roles: dict[int, dict[str, int | None]] = {}
    for key, text in sorted(raw.items()):
        try:
            value = json.loads(text)
            if key.startswith(ROLE_PREFIX):
                role_text, _, name = key.removeprefix(ROLE_PREFIX).partition(":")
                role_id = int(role_text)
                roles.setdefault(role_id, {})[name] = validate_limit(name, value, defaults)
            else:
                changes[key] = validate(key, value, defaults)
        except (ValueError, InvalidSetting) as exc:
            # json's and int()'s errors are ValueErrors too.
            log.warning("guild %s: ignoring its stored setting %s (%s)", guild_id, key, exc)
    return replace(settings, **changes, role_limits=roles, explicit=frozenset(changes))
