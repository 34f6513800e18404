"""What the per-server settings and limits say to users, in one block.

Kept here rather than in ``bot.texts`` while the feature is being wired in (that module
belongs to the commands); plain strings and small functions, no discord imports.
"""

from __future__ import annotations

from collections.abc import Iterable

# -- refusals of a request ----------------------------------------------------------------


def channel_mentions(channel_ids: Iterable[int]) -> str:
    return ", ".join(f"<#{channel_id}>" for channel_id in sorted(channel_ids))


def not_in_channel(allowed: Iterable[int]) -> str:
    return f"In this server the bot answers only in {channel_mentions(allowed)}."


def queued_limit(pending: int, limit: int) -> str:
    return (
        f"You have {pending} request(s) waiting in this server (your limit is {limit}). "
        "Wait for one to finish, or cancel one."
    )


def daily_limit(limit: int, next_in: str) -> str:
    if limit == 0:
        return f"Your roles allow no pages in this server; the day starts again in {next_in}."
    return f"You can make {limit} pages a day in this server; the next one in {next_in}."


def cooldown(retry_in: str) -> str:
    return f"Cooldown: try again in {retry_in}."


# -- /settings ------------------------------------------------------------------------------

GUILD_ONLY = "Server settings exist only in a server, not in direct messages."
MANAGERS_ONLY = "Only members with the Manage Server permission can change the bot's settings."
RESET_ALL = "All of this server's settings are back to the bot's defaults."


def reset_fields(names: Iterable[str]) -> str:
    return f"Back to the bot's default: {', '.join(names)}."


def field_set(name: str, shown: str) -> str:
    return f"**{name}** is now {shown}."


def role_limit_set(role_id: int, name: str, shown: str) -> str:
    return f"For <@&{role_id}>, **{name}** is now {shown}."


def role_limit_cleared(role_id: int, name: str) -> str:
    return f"<@&{role_id}> no longer overrides **{name}**: the server's value applies."


# -- validation -----------------------------------------------------------------------------


def unknown_field(name: str, known: Iterable[str]) -> str:
    return f"There is no setting {name!r}. Settings: {', '.join(known)}."


def bad_number(name: str, value: str) -> str:
    return f"{name} needs a whole number, got {value!r}."


def out_of_range(name: str, value: int, low: int, high: int) -> str:
    return f"{name} must be between {low} and {high}, got {value}."


def above_ceiling(name: str, value: int, ceiling: int) -> str:
    return (
        f"{name} can be at most {ceiling} on this bot (its operator's QUEUE_MAX_PER_USER), "
        f"got {value}."
    )


def bad_choice(name: str, value: str, choices: Iterable[str]) -> str:
    return f"{name} must be one of {', '.join(choices)}, got {value!r}."


def bad_duration(name: str, value: str) -> str:
    return f"{name} needs a duration such as 30, 30s, 5m or 1h, got {value!r}."


def bad_channels(value: str) -> str:
    return f"Expected channels as #mentions or ids (or `all`), got {value!r}."


def too_many_channels(count: int, limit: int) -> str:
    return f"At most {limit} allowed channels, got {count}."


def too_many_roles(limit: int) -> str:
    return f"At most {limit} roles can have their own limits; clear one first."
