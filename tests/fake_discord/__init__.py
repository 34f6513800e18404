"""An in-repo fake Discord (REST + gateway on 127.0.0.1) for end-to-end tests.

The real discord.py client connects to it (no mocks of discord.py): set the bot's
``DISCORD_API_BASE`` to :attr:`FakeDiscord.api_base`, ``DISCORD_GATEWAY_URL`` to
:attr:`FakeDiscord.gateway_url` and its token to :attr:`FakeDiscord.bot_token`.

What a test can do (all on the test's event loop):

* ``await fake.start()`` / ``await fake.stop()``; ``await fake.wait_until_ready()`` (a client
  identified and got READY + GUILD_CREATE); ``await fake.wait_for_sync()`` (the command
  payload); ``fake.sync_payloads`` / ``fake.commands``;
* ``fake.user(name, roles=...)`` makes a guild member; ``fake.mod_role`` has Manage Server;
* ``await fake.send_command(name, options, user=..., permissions=..., attachment_size_limit=...,
  age_s=..., in_guild=...)`` and ``await fake.press_button(custom_id, user=...)`` return a
  :class:`FakeInteraction` that tracks the callback, @original, follow-ups, files and every
  request, with ``wait_for_callback`` / ``wait_for_file`` / ``wait_for_request`` /
  ``wait_until``;
* ``fake.fail_next(method, path_regex, status=429|500|401|404|..., times=N, retry_after=...)``,
  ``fake.delay_next(...)`` (slow answers), ``fake.expire(interaction)`` (dead token);
* ``fake.requests`` (every request: time, method, path, JSON, multipart parts),
  ``fake.wait_for_request(...)``, ``fake.unhandled_requests``;
* sharding: ``FakeDiscord(shards=N, guilds=M)`` (``GET /gateway/bot`` recommends N shards;
  M guilds spread over the shards), ``fake.add_guild(name, shard=...)``,
  ``fake.guild_on_shard(i)``, ``fake.guilds``; each session's IDENTIFY ``shard`` is
  ``session.shard``; READY/GUILD_CREATE carry only that shard's guilds; interactions go to
  the session whose shard owns the guild (``send_command(..., guild=g)``; DMs: shard 0) and
  record it as ``FakeInteraction.shard_id``; ``await fake.wait_for_shards()`` waits until
  every shard is ready, ``fake.session_for(guild_id)`` is the routing rule.
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
    shard_of,
    snowflake,
    snowflake_on_shard,
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
    "shard_of",
    "snowflake",
    "snowflake_on_shard",
]
