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
* components: ``fake.press_button(custom_id, user=..., message=...)`` and
  ``fake.choose(message, custom_id, values, user=...)`` (a select menu; ``message`` is a
  message dict, a FakeInteraction, a message id or None) send MESSAGE_COMPONENT
  interactions; what a Discord client would not let a user do (an unknown option, a
  disabled button, too many values) raises; components a bot sends are checked as the API
  checks them (400 otherwise). ``inter.component(custom_id)`` reads one back;
* modals: a MODAL callback is kept as ``inter.modal`` (custom_id, title, components);
  ``await fake.submit_modal(inter, {input_custom_id: text})`` sends the MODAL_SUBMIT
  (``inter.modal_submit``), carrying the component's message when the modal was opened
  from one (then UPDATE_MESSAGE / DEFERRED_UPDATE edit that message);
* command groups: ``send_command("settings set", {...})`` or
  ``send_command("settings", {"set": {...}})`` nest the options as Discord does;
  USER / CHANNEL / ROLE / MENTIONABLE options take FakeUser / FakeChannel / FakeRole and
  fill ``data.resolved``; registered commands are validated (nesting, names, types);
* threads: ``POST /channels/{id}/messages/{mid}/threads`` and ``/channels/{id}/threads``
  make FakeChannel threads (``guild.threads``, ``fake.thread_of(message)``), messages sent
  into them are in ``fake.thread_messages(thread)``;
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

from .commands import (
    OPT_BOOLEAN,
    OPT_CHANNEL,
    OPT_INTEGER,
    OPT_MENTIONABLE,
    OPT_NUMBER,
    OPT_ROLE,
    OPT_STRING,
    OPT_SUB_COMMAND,
    OPT_SUB_COMMAND_GROUP,
    OPT_USER,
)
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
    CB_MODAL,
    CB_UPDATE_MESSAGE,
    FLAG_EPHEMERAL,
    FLAG_HAS_THREAD,
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
    MessageTarget,
)

__all__ = [
    "ALL_PERMISSIONS",
    "CALLBACK_PATH",
    "CB_DEFERRED_MESSAGE",
    "CB_DEFERRED_UPDATE",
    "CB_MESSAGE",
    "CB_MODAL",
    "CB_UPDATE_MESSAGE",
    "COMMANDS_PATH",
    "DEFAULT_ATTACHMENT_SIZE_LIMIT",
    "DEFAULT_MEMBER_PERMISSIONS",
    "FLAG_EPHEMERAL",
    "FLAG_HAS_THREAD",
    "FLAG_LOADING",
    "FOLLOWUP_PATH",
    "OPT_BOOLEAN",
    "OPT_CHANNEL",
    "OPT_INTEGER",
    "OPT_MENTIONABLE",
    "OPT_NUMBER",
    "OPT_ROLE",
    "OPT_STRING",
    "OPT_SUB_COMMAND",
    "OPT_SUB_COMMAND_GROUP",
    "OPT_USER",
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
    "MessageTarget",
    "Part",
    "RecordedRequest",
    "request_matcher",
    "shard_of",
    "snowflake",
    "snowflake_on_shard",
]
