"""An in-repo fake Discord (REST + gateway on 127.0.0.1) for end-to-end tests.

The real discord.py client connects to it; see :class:`FakeDiscord`.
"""

from .payloads import (
    ALL_PERMISSIONS,
    DEFAULT_ATTACHMENT_SIZE_LIMIT,
    DEFAULT_MEMBER_PERMISSIONS,
    PERM_ADMINISTRATOR,
    PERM_MANAGE_GUILD,
    FakeChannel,
    FakeGuild,
    FakeRole,
    FakeUser,
    snowflake,
)
from .records import (
    CB_DEFERRED_MESSAGE,
    CB_DEFERRED_UPDATE,
    CB_MESSAGE,
    CB_UPDATE_MESSAGE,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    FailureRule,
    FakeInteraction,
    Part,
    RecordedRequest,
    request_matcher,
)
from .server import (
    CALLBACK_PATH,
    COMMANDS_PATH,
    FOLLOWUP_PATH,
    ORIGINAL_PATH,
    WEBHOOK_MESSAGE_PATH,
    DelayRule,
    FakeDiscord,
)

__all__ = [
    "ALL_PERMISSIONS",
    "CALLBACK_PATH",
    "CB_DEFERRED_MESSAGE",
    "CB_DEFERRED_UPDATE",
    "CB_MESSAGE",
    "CB_UPDATE_MESSAGE",
    "COMMANDS_PATH",
    "DEFAULT_ATTACHMENT_SIZE_LIMIT",
    "DEFAULT_MEMBER_PERMISSIONS",
    "FLAG_EPHEMERAL",
    "FLAG_LOADING",
    "FOLLOWUP_PATH",
    "ORIGINAL_PATH",
    "PERM_ADMINISTRATOR",
    "PERM_MANAGE_GUILD",
    "WEBHOOK_MESSAGE_PATH",
    "DelayRule",
    "FailureRule",
    "FakeChannel",
    "FakeDiscord",
    "FakeGuild",
    "FakeInteraction",
    "FakeRole",
    "FakeUser",
    "Part",
    "RecordedRequest",
    "request_matcher",
    "snowflake",
]
