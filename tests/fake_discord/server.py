"""A fake Discord: REST (``/api/v10``) and a gateway websocket on 127.0.0.1.

The real discord.py client talks to it: point ``discord.http.Route.BASE`` at
:attr:`FakeDiscord.api_base` and the gateway at :attr:`FakeDiscord.gateway_url`. Tests drive it
from the same event loop: inject slash commands and button presses, wait for requests, make
routes fail, expire interaction tokens, and read back every request with its JSON body and
multipart parts.

Behaviour follows Discord's documented semantics where the bot can observe them:

* an interaction must be answered within ``callback_window_s`` (3 s) and only once
  (later: 404 ``Unknown interaction`` 10062 / 400 ``already been acknowledged`` 40060);
* webhook calls with an expired or unknown token get 401 ``Invalid Webhook Token`` (50027)
  or, if asked, 404 ``Unknown Webhook`` (10015); tokens expire ``token_ttl_s`` after the
  interaction's creation time (15 minutes, like Discord);
* after a deferred (``thinking``) response the first follow-up replaces the loading message;
* files over the interaction's ``attachment_size_limit`` get 413 (code 40005);
* a 429 carries ``retry_after`` in the body, ``Retry-After`` and a ``Via`` header
  (discord.py treats a 429 without ``Via`` as a Cloudflare ban).
"""

# Test helpers take a timeout argument on purpose: every wait in a test must be bounded.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .commands import (
    OPT_CHANNEL,
    OPT_MENTIONABLE,
    OPT_ROLE,
    OPT_USER,
    build_options,
    split_command_path,
    validate_command,
)
from .components import (
    BUTTON,
    CHANNEL_SELECT,
    MENTIONABLE_SELECT,
    ROLE_SELECT,
    USER_SELECT,
    check_select_values,
    find_component,
    modal_submit_components,
    validate_message_components,
    validate_modal,
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
    attachment_payload,
    iso_now,
    shard_of,
    snowflake,
    snowflake_on_shard,
    snowflake_time,
)
from .records import (
    CB_AUTOCOMPLETE,
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
    RequestPredicate,
    request_matcher,
)

log = logging.getLogger(__name__)

API_PREFIX = "/api/v10"
GATEWAY_PATH = "/gateway-ws/"

# Gateway opcodes.
OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_PRESENCE = 3
OP_RESUME = 6
OP_RECONNECT = 7
OP_REQUEST_MEMBERS = 8
OP_INVALID_SESSION = 9
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11

# Regular expressions for the routes tests usually target (match RecordedRequest.path).
CALLBACK_PATH = r"^/interactions/\d+/[^/]+/callback$"
FOLLOWUP_PATH = r"^/webhooks/\d+/[^/]+$"
ORIGINAL_PATH = r"^/webhooks/\d+/[^/]+/messages/@original$"
WEBHOOK_MESSAGE_PATH = r"^/webhooks/\d+/[^/]+/messages/[^/]+$"
COMMANDS_PATH = r"^/applications/\d+(/guilds/\d+)?/commands$"

RECORD = web.RequestKey("record", RecordedRequest)

# Where a component lives, for press_button / choose: a message dict, the interaction
# whose messages to search, a message id, or None (the newest message carrying it).
MessageTarget = dict[str, Any] | FakeInteraction | int | None


class DiscordError(Exception):
    """Raised inside handlers: becomes a Discord-shaped JSON error response."""

    def __init__(self, status: int, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass
class DelayRule:
    """Answer the next ``remaining`` matching requests ``seconds`` late."""

    match: RequestPredicate
    seconds: float
    remaining: int
    hits: list[RecordedRequest] = field(default_factory=list)


@dataclass
class GatewaySession:
    """One gateway connection; ``shard`` is the ``[shard_id, shard_count]`` it identified
    with (None: an unsharded client), kept across a RESUME."""

    ws: web.WebSocketResponse
    compress: bool
    session_id: str | None = None
    seq: int = 0
    identify: dict[str, Any] | None = None
    shard: tuple[int, int] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    history: list[dict[str, Any]] = field(default_factory=list)
    _zlib: Any = field(default_factory=zlib.compressobj)

    @property
    def live(self) -> bool:
        """READY (or RESUMED) and still connected."""
        return self.ready.is_set() and not self.ws.closed

    @property
    def shard_id(self) -> int | None:
        return None if self.shard is None else self.shard[0]

    def owns(self, guild_id: int | None) -> bool:
        """Whether this session receives ``guild_id``'s events (None: a DM)."""
        return self.shard is None or shard_of(guild_id, self.shard[1]) == self.shard[0]


class FakeDiscord:
    """The fake server. ``await start()`` before the client logs in, ``await stop()`` after.

    Typical use::

        fake = FakeDiscord()
        await fake.start()
        # bot: Route.BASE = fake.api_base, gateway = fake.gateway_url, token = fake.bot_token
        await fake.wait_until_ready()
        inter = await fake.send_command("html", {"prompt": "a bakery"}, user=fake.user("ann"))
        await inter.wait_for_file(".html")

    Sharding: ``shards`` is the shard count ``GET /gateway/bot`` recommends (what an
    ``AutoShardedClient`` without ``shard_count`` uses), ``guilds`` how many guilds the bot is
    in (the first is :attr:`guild`; with several shards the guilds are spread over them, one
    after the other). A session that identifies with ``shard: [id, count]`` gets only its
    guilds in READY and GUILD_CREATE, and only their interactions (DMs: shard 0); when no
    session identified with a shard, everything goes to the newest one.
    """

    def __init__(
        self,
        *,
        bot_token: str = "fake-bot-token",
        callback_window_s: float = 3.0,
        token_ttl_s: float = 900.0,
        heartbeat_interval_ms: int = 41250,
        heartbeat_ack_delay_s: float = 0.1,
        shards: int = 1,
        guilds: int = 1,
    ) -> None:
        if shards < 1 or guilds < 1:
            raise ValueError("shards and guilds must be at least 1")
        self.bot_token = bot_token
        self.shards = shards
        self.callback_window_s = callback_window_s
        self.token_ttl_s = token_ttl_s
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_ack_delay_s = heartbeat_ack_delay_s

        self.application_id = snowflake()
        self.bot_user = FakeUser(id=self.application_id, username="htmlbot", bot=True)
        self.owner = FakeUser(id=snowflake(), username="owner")
        self.users: dict[int, FakeUser] = {u.id: u for u in (self.bot_user, self.owner)}
        self.guilds: list[FakeGuild] = []
        self.guild = self.add_guild("Fake Guild")
        self.mod_role = self.guild.role("Moderator")
        self.admin_role = self.guild.role("Admin")
        for _ in range(guilds - 1):
            self.add_guild()
        self.dm_channels: dict[int, FakeChannel] = {}  # by user id

        self.requests: list[RecordedRequest] = []
        # Index for FakeInteraction.requests: tests poll it, and the load test has thousands.
        self.requests_by_token: dict[str, list[RecordedRequest]] = {}
        self.failures: list[FailureRule] = []
        self.delays: list[DelayRule] = []
        self.interactions: dict[int, FakeInteraction] = {}
        self._by_token: dict[str, FakeInteraction] = {}
        self.messages: dict[int, dict[str, Any]] = {}
        # Application commands as registered: None = global, else the guild id.
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.sync_payloads: list[tuple[int | None, list[dict[str, Any]]]] = []
        self.sessions: list[GatewaySession] = []
        self.gateway_received: list[dict[str, Any]] = []

        self._seq = 0
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._ws_tasks: set[asyncio.Task[Any]] = set()
        self._ack_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def api_base(self) -> str:
        """Value for ``DISCORD_API_BASE`` (discord.py's ``Route.BASE``)."""
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        """Value for ``DISCORD_GATEWAY_URL``."""
        return f"ws://127.0.0.1:{self._port}{GATEWAY_PATH}"

    async def start(self) -> str:
        """Listen on a free port of 127.0.0.1; returns :attr:`api_base`."""
        app = web.Application(middlewares=[self._middleware], client_max_size=256 * 1024 * 1024)
        # Discord's resume_gateway_url has no trailing slash; accept both forms.
        app.router.add_get(GATEWAY_PATH, self._gateway)
        app.router.add_get(GATEWAY_PATH.rstrip("/"), self._gateway)
        self._add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        log.debug("fake discord listening on %s", self.base_url)
        return self.api_base

    async def stop(self) -> None:
        for task in list(self._ack_tasks):
            task.cancel()
        for s in self.sessions:
            if not s.ws.closed:
                await s.ws.close(code=1001, message=b"fake discord stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ test controls

    def add_guild(self, name: str | None = None, *, shard: int | None = None) -> FakeGuild:
        """A new guild the bot is in (roles @everyone, Moderator, Admin; channels general,
        bots; members the bot and :attr:`owner`), whose id lands on ``shard`` of
        :attr:`shards` (default: the next shard after the previous guild's).

        Add guilds before the client connects: READY lists the guilds of the moment.
        """
        shard = len(self.guilds) % self.shards if shard is None else shard
        guild_id = snowflake_on_shard(shard, self.shards)
        admin = FakeRole(id=snowflake(), name="Admin", permissions=PERM_ADMINISTRATOR, position=2)
        mod = FakeRole(
            id=snowflake(),
            name="Moderator",
            permissions=DEFAULT_MEMBER_PERMISSIONS | PERM_MANAGE_GUILD,
            position=1,
        )
        self.owner.role_ids.append(admin.id)
        guild = FakeGuild(
            id=guild_id,
            name=name or f"Fake Guild {len(self.guilds) + 1}",
            owner_id=self.owner.id,
            roles=[
                FakeRole(id=guild_id, name="@everyone", permissions=DEFAULT_MEMBER_PERMISSIONS),
                mod,
                admin,
            ],
            channels=[
                FakeChannel(id=snowflake(), name="general", guild_id=guild_id, position=0),
                FakeChannel(id=snowflake(), name="bots", guild_id=guild_id, position=1),
            ],
            members=[self.bot_user, self.owner],
        )
        self.guilds.append(guild)
        return guild

    def guild_on_shard(self, shard: int) -> FakeGuild:
        """The first guild whose events go to ``shard`` (of :attr:`shards`)."""
        for guild in self.guilds:
            if shard_of(guild.id, self.shards) == shard:
                return guild
        raise LookupError(f"no guild on shard {shard} of {self.shards}")

    def user(
        self,
        name: str,
        *,
        roles: list[FakeRole] | None = None,
        permissions: int | None = None,
        guild: FakeGuild | None = None,
    ) -> FakeUser:
        """The member called ``name``, created on first use; a member of ``guild`` (default:
        :attr:`guild`) from then on. Users are global: the same one can be in many guilds."""
        guild = guild or self.guild
        u = next((u for u in self.users.values() if u.username == name), None)
        if u is None:
            u = FakeUser(id=snowflake(), username=name)
            if permissions is not None:
                u.permissions = permissions
            self.users[u.id] = u
        if roles:
            u.role_ids.extend(r.id for r in roles if r.id not in u.role_ids)
        if u not in guild.members:
            guild.members.append(u)
        return u

    def member_permissions(self, user: FakeUser, guild: FakeGuild | None = None) -> int:
        """The member's resolved permissions in ``guild`` (default: :attr:`guild`), as
        Discord computes them (no overwrites)."""
        guild = guild or self.guild
        if user.id == guild.owner_id:
            return ALL_PERMISSIONS
        perms = guild.everyone_role.permissions | user.permissions
        for role in guild.roles:
            if role.id in user.role_ids:
                perms |= role.permissions
        return ALL_PERMISSIONS if perms & PERM_ADMINISTRATOR else perms

    def guild_by_id(self, guild_id: int) -> FakeGuild | None:
        return next((g for g in self.guilds if g.id == guild_id), None)

    @property
    def channel(self) -> FakeChannel:
        """The default text channel."""
        return self.guild.channels[0]

    def fail_next(
        self,
        method: str | None = None,
        path: str | None = None,
        *,
        status: int,
        times: int = 1,
        retry_after: float = 1.0,
        is_global: bool = False,
        token: str | None = None,
        predicate: RequestPredicate | None = None,
        body: dict[str, Any] | None = None,
    ) -> FailureRule:
        """Answer the next ``times`` matching requests with ``status`` (429, 500, 401, 404...).

        ``path`` is a regular expression searched in the path relative to the API base
        (see the ``*_PATH`` constants). A 429 gets ``retry_after`` seconds.
        """
        rule = FailureRule(
            match=request_matcher(method, path, token=token, predicate=predicate),
            status=status,
            remaining=times,
            retry_after=retry_after,
            is_global=is_global,
            body=body,
        )
        self.failures.append(rule)
        return rule

    def delay_next(
        self,
        method: str | None = None,
        path: str | None = None,
        *,
        seconds: float,
        times: int = 1,
        predicate: RequestPredicate | None = None,
    ) -> DelayRule:
        """Answer the next ``times`` matching requests ``seconds`` late (after acting on them).

        Models a slow network or a slow Discord: e.g. a defer that Discord accepted but
        whose answer the bot has not seen yet.
        """
        rule = DelayRule(
            match=request_matcher(method, path, predicate=predicate),
            seconds=seconds,
            remaining=times,
        )
        self.delays.append(rule)
        return rule

    def expire(self, interaction: FakeInteraction, *, status: int = 401) -> None:
        """Expire the interaction's token now: webhook calls get 401 (or 404) from now on."""
        if status not in (401, 404):
            raise ValueError("Discord answers 401 or 404 for a dead token")
        interaction.expired_status = status

    async def wait_until_ready(
        self, timeout: float = 10.0, *, shard: int | None = None
    ) -> GatewaySession:
        """Wait until a client identified and got READY + GUILD_CREATE; returns the newest
        such session (with ``shard``: the one that identified as that shard id)."""
        async with asyncio.timeout(timeout):
            while True:
                for s in reversed(self.sessions):
                    if s.live and (shard is None or s.shard_id == shard):
                        return s
                await self._wait_changed()

    async def wait_for_shards(
        self, count: int | None = None, timeout: float = 10.0
    ) -> dict[int, GatewaySession]:
        """Wait until shards ``0..count-1`` (default :attr:`shards`) each have a ready
        session, from one client or several; returns them by shard id."""
        count = self.shards if count is None else count
        async with asyncio.timeout(timeout):
            while True:
                found = {s.shard_id: s for s in self.sessions if s.live and s.shard is not None}
                if all(i in found for i in range(count)):
                    return {i: found[i] for i in range(count)}
                await self._wait_changed()

    async def session_for(self, guild_id: int | None, timeout: float = 10.0) -> GatewaySession:
        """The ready session that receives ``guild_id``'s events (None: DMs, shard 0).

        Once any session identified with a shard, the one whose shard owns the guild
        (``(guild_id >> 22) % shard_count``), waiting for it to connect; before that, the
        newest ready session (an unsharded client gets everything).
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    live = [s for s in reversed(self.sessions) if s.live]
                    if any(s.shard is not None for s in live):
                        owner = next((s for s in live if s.shard and s.owns(guild_id)), None)
                        if owner is not None:
                            return owner
                    elif live:
                        return live[0]
                    await self._wait_changed()
        except TimeoutError:
            shards = [s.shard for s in self.sessions if s.live]
            raise TimeoutError(
                f"no ready gateway session owns guild {guild_id} within {timeout}s "
                f"(ready sessions' shards: {shards})"
            ) from None

    async def wait_for_sync(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait for the first successful bulk command sync; returns the payload it sent."""
        r = await self.wait_for_request("PUT", COMMANDS_PATH, ok=True, timeout=timeout)
        assert isinstance(r.json, list)
        return r.json

    async def wait_for_request(
        self,
        method: str | None = None,
        path: str | None = None,
        *,
        timeout: float = 5.0,
        since: int = 0,
        ok: bool | None = None,
        status: int | None = None,
        predicate: RequestPredicate | None = None,
    ) -> RecordedRequest:
        """The first answered request (with ``seq >= since``) that matches; waits for it.

        Raises ``TimeoutError`` with the recent requests in the message.
        """
        match = request_matcher(method, path, ok=ok, status=status, predicate=predicate)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for r in self.requests[since:]:
                        if r.status and match(r):
                            return r
                    await self._wait_changed()
        except TimeoutError:
            recent = "\n  ".join(repr(r) for r in self.requests[-15:])
            raise TimeoutError(
                f"no {method or '*'} {path or '*'} request within {timeout}s; recent:\n  {recent}"
            ) from None

    def find_requests(
        self,
        method: str | None = None,
        path: str | None = None,
        *,
        ok: bool | None = None,
        predicate: RequestPredicate | None = None,
    ) -> list[RecordedRequest]:
        match = request_matcher(method, path, ok=ok, predicate=predicate)
        return [r for r in self.requests if r.status and match(r)]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``condition()`` holds, re-checking after every request or event."""
        async with asyncio.timeout(timeout):
            while not condition():
                await self._wait_changed()

    @property
    def unhandled_requests(self) -> list[RecordedRequest]:
        """Requests to routes the fake doesn't know (a sign the bot uses an unexpected API)."""
        return [r for r in self.requests if r.route == "unhandled"]

    # ----- injecting interactions

    async def send_command(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        user: FakeUser | None = None,
        channel: FakeChannel | None = None,
        in_guild: bool = True,
        permissions: int | None = None,
        attachment_size_limit: int = DEFAULT_ATTACHMENT_SIZE_LIMIT,
        age_s: float = 0.0,
        locale: str = "en-US",
        guild: FakeGuild | None = None,
        client_checks: bool = False,
    ) -> FakeInteraction:
        """Dispatch an APPLICATION_COMMAND interaction for the registered command ``name``.

        ``options`` maps option names to values, typed by the registered command. A command
        with subcommands is named with its path, ``send_command("settings set", {...})``
        (a group: ``"settings limits set"``), or takes the nested form
        ``send_command("settings", {"set": {...}})``; either way the payload nests the
        options as Discord does (type 2 group / type 1 subcommand, each with ``options``).
        USER / CHANNEL / ROLE / MENTIONABLE options take a :class:`FakeUser`,
        :class:`FakeChannel` or :class:`FakeRole` (or an id of one) and fill
        ``data.resolved`` (users + members / channels / roles), so discord.py hands the
        handler a Member, a channel, a Role. Option names must be registered and required
        options given (LookupError / ValueError). ``client_checks=True`` also refuses
        (ValueError) the values a Discord client would not send: a wrong type, a value
        outside the choices, a length or number out of range; off by default, so a test can
        send an over-long prompt to test the bot's own checks.

        ``age_s`` back-dates the interaction (its id, hence discord.py's
        ``Interaction.created_at``/``expires_at``, and the token expiry in the fake).
        ``permissions`` overrides the member's resolved permissions. ``guild`` (default
        :attr:`guild`; ``channel``'s guild when that is given) is where the command is used:
        ``user`` becomes its member, and the interaction goes to the shard that owns it.
        """
        if channel is not None and channel.guild_id is not None:
            guild = guild or self.guild_by_id(channel.guild_id)
        guild = guild or self.guild
        user = user or self.user("user", guild=guild)
        if in_guild and user not in guild.members:
            guild.members.append(user)
        root, *path = name.split()
        command, scope = self._find_command(root, guild if in_guild else None)
        registered = command.get("options") or []
        path, values = split_command_path(registered, path, dict(options or {}))
        resolved: dict[str, dict[str, Any]] = {}
        where = guild if in_guild else None

        def resolve(spec: dict[str, Any], value: Any) -> str:
            return self._resolve_option(spec, value, where, user, resolved)

        opts = build_options(registered, path, values, resolve, client_checks=client_checks)
        data: dict[str, Any] = {"id": command["id"], "name": root, "type": 1}
        if opts:
            data["options"] = opts
        if resolved:
            data["resolved"] = resolved
        if scope is not None:
            data["guild_id"] = str(scope)
        return await self._send_interaction(
            2,
            data,
            user=user,
            channel=channel,
            guild=where,
            permissions=permissions,
            attachment_size_limit=attachment_size_limit,
            age_s=age_s,
            locale=locale,
        )

    def _resolve_option(
        self,
        spec: dict[str, Any],
        value: Any,
        guild: FakeGuild | None,
        user: FakeUser | None,
        resolved: dict[str, dict[str, Any]],
    ) -> str:
        """The wire value (a snowflake string) of a USER/CHANNEL/ROLE/MENTIONABLE option,
        adding the object to ``resolved`` as Discord does."""
        otype, name = spec["type"], spec["name"]
        target = self._lookup_mentionable(value, guild) if otype != OPT_CHANNEL else value
        if otype == OPT_CHANNEL:
            target = self._channel_by_id(value) if isinstance(value, int) else value
            if not isinstance(target, FakeChannel):
                raise ValueError(f"option {name!r} takes a FakeChannel, not {value!r}")
            allowed = spec.get("channel_types")
            if allowed and target.type not in allowed:
                raise ValueError(
                    f"option {name!r} takes channel types {allowed}, not {target.type}"
                )
            if guild is not None and target.guild_id != guild.id:
                raise ValueError(f"channel {target.name!r} is not in guild {guild.name!r}")
            perms = (
                self.member_permissions(user, guild)
                if user is not None and guild is not None
                else DEFAULT_MEMBER_PERMISSIONS
            )
            entry = target.payload() | {"permissions": str(perms)}
            entry.pop("permission_overwrites", None)
            resolved.setdefault("channels", {})[str(target.id)] = entry
        elif isinstance(target, FakeRole):
            if otype not in (OPT_ROLE, OPT_MENTIONABLE):
                raise ValueError(f"option {name!r} (type {otype}) cannot take a role")
            resolved.setdefault("roles", {})[str(target.id)] = target.payload()
        elif isinstance(target, FakeUser):
            if otype not in (OPT_USER, OPT_MENTIONABLE):
                raise ValueError(f"option {name!r} (type {otype}) cannot take a user")
            resolved.setdefault("users", {})[str(target.id)] = target.payload()
            if guild is not None and target in guild.members:
                member = guild.member_payload(
                    target, permissions=self.member_permissions(target, guild)
                )
                for key in ("user", "deaf", "mute"):  # a partial member, as in resolved
                    member.pop(key, None)
                resolved.setdefault("members", {})[str(target.id)] = member
        else:
            raise ValueError(f"option {name!r} (type {otype}) cannot take {value!r}")
        return str(target.id)

    def _lookup_mentionable(self, value: Any, guild: FakeGuild | None) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            return value
        roles = guild.roles if guild is not None else []
        found = self.users.get(value) or next((r for r in roles if r.id == value), None)
        if found is None:
            raise LookupError(f"no user or role {value} known to the fake")
        return found

    async def press_button(
        self,
        custom_id: str,
        *,
        user: FakeUser,
        message: MessageTarget = None,
        message_id: int | None = None,
        permissions: int | None = None,
        age_s: float = 0.0,
    ) -> FakeInteraction:
        """Dispatch a MESSAGE_COMPONENT interaction: ``user`` presses the button ``custom_id``.

        The message is ``message`` (a message dict, a :class:`FakeInteraction`: the newest of
        its visible messages that carries the button, or a message id; ``message_id`` is the
        older spelling), else the newest message carrying that custom_id. LookupError if the
        component is missing or not a button, ValueError if it is disabled. Anyone may press
        it (an ephemeral message is only visible to its user on real Discord, so tests of
        "someone else" should use a public reply).
        """
        found, component = self._component_target(custom_id, message or message_id)
        if component.get("type") != BUTTON:
            raise LookupError(f"component {custom_id!r} is not a button: {component!r}")
        if component.get("disabled"):
            raise ValueError(f"button {custom_id!r} is disabled")
        data = {"custom_id": custom_id, "component_type": BUTTON}
        return await self._send_component(data, found, user, permissions, age_s)

    async def choose(
        self,
        message: MessageTarget,
        custom_id: str,
        values: list[str] | list[Any],
        *,
        user: FakeUser,
        permissions: int | None = None,
        age_s: float = 0.0,
    ) -> FakeInteraction:
        """Dispatch a MESSAGE_COMPONENT interaction: ``user`` picks ``values`` in the select
        menu ``custom_id`` (``data.component_type`` 3 and ``data.values``, as Discord sends).

        ``message`` is found as for :meth:`press_button` (a message dict, a
        :class:`FakeInteraction`, a message id, or None: the newest message carrying the
        select). The values are checked as the client checks them (offered options,
        ``min_values``..``max_values``, not disabled): ValueError otherwise. A user, role,
        mentionable or channel select takes FakeUser / FakeRole / FakeChannel objects (or
        ids) and sends ``data.resolved`` with them.
        """
        found, component = self._component_target(custom_id, message)
        ctype = int(component.get("type") or 0)
        guild = self._guild_of_message(found)
        resolved: dict[str, dict[str, Any]] = {}
        if ctype in (USER_SELECT, ROLE_SELECT, MENTIONABLE_SELECT, CHANNEL_SELECT):
            spec_type = {
                USER_SELECT: OPT_USER,
                ROLE_SELECT: OPT_ROLE,
                MENTIONABLE_SELECT: OPT_MENTIONABLE,
                CHANNEL_SELECT: OPT_CHANNEL,
            }[ctype]
            spec = {"name": custom_id, "type": spec_type}
            if component.get("channel_types"):
                spec["channel_types"] = component["channel_types"]
            wire = [self._resolve_option(spec, v, guild, user, resolved) for v in values]
        else:
            wire = [str(v) for v in values]
        check_select_values(component, wire)
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": ctype, "values": wire}
        if resolved:
            data["resolved"] = resolved
        return await self._send_component(data, found, user, permissions, age_s)

    async def submit_modal(
        self,
        interaction: FakeInteraction,
        values: dict[str, str | list[str]] | None = None,
        *,
        user: FakeUser | None = None,
        permissions: int | None = None,
        age_s: float = 0.0,
    ) -> FakeInteraction:
        """Dispatch the MODAL_SUBMIT interaction (type 5) for the modal the bot opened in
        answer to ``interaction`` (its ``interaction.modal``).

        ``values`` maps the modal's text inputs' custom_ids to what the user typed (a
        select inside a label: a list of values); inputs left out keep their prefilled
        ``value`` or "". ``data`` is ``{"custom_id": <the modal's>, "components": [...]}``
        with each answer in the action row (type 1) or label (type 18) it had, as Discord
        sends it. A modal opened from a message component also carries that ``message``
        (so the bot may answer with UPDATE_MESSAGE / DEFERRED_UPDATE, and "@original" is
        that message until it sends a new response). ``user`` must be the one who opened
        it (default); a modal is submitted once. ValueError for what the client would not
        submit (unknown inputs, a required one left empty, a length out of range).
        """
        modal = interaction.modal
        if modal is None:
            raise LookupError(f"the bot opened no modal for {interaction!r}")
        if interaction.modal_submit is not None:
            raise ValueError("this modal was already submitted (Discord closes it)")
        opener = self.users[interaction.user_id]
        if user is not None and user.id != opener.id:
            raise ValueError("only the user who opened a modal can submit it")
        components = modal_submit_components(modal, dict(values or {}))
        data = {"custom_id": modal["custom_id"], "components": components}
        message = None
        if interaction.type == 3 and "message" in interaction.payload:
            message = self.messages.get(int(interaction.payload["message"]["id"]))
        guild = self.guild_by_id(interaction.guild_id) if interaction.guild_id else None
        channel = self._channel_by_id(interaction.channel_id) if guild is not None else None
        submit = await self._send_interaction(
            5,
            data,
            user=opener,
            channel=channel,
            guild=guild,
            permissions=permissions,
            attachment_size_limit=interaction.attachment_size_limit,
            age_s=age_s,
            locale=str(interaction.payload.get("locale") or "en-US"),
            message=message,
        )
        interaction.modal_submit = submit
        return submit

    def _component_target(
        self, custom_id: str, message: MessageTarget
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The live message carrying ``custom_id`` and that component (LookupError if none)."""
        if isinstance(message, FakeInteraction):
            candidates = message.messages
        elif isinstance(message, dict):
            candidates = [m for m in [self.messages.get(int(message["id"]))] if m is not None]
        elif isinstance(message, int):
            candidates = [m for m in [self.messages.get(message)] if m is not None]
        else:
            candidates = list(self.messages.values())
        for found in reversed(candidates):
            component = find_component(found.get("components") or [], custom_id)
            if component is not None:
                return found, component
        raise LookupError(f"no message carries a component {custom_id!r}")

    def _guild_of_message(self, message: dict[str, Any]) -> FakeGuild | None:
        channel_id = int(message["channel_id"])
        channel = next(
            (c for g in self.guilds for c in self._channels_of(g) if c.id == channel_id), None
        )
        return self.guild_by_id(channel.guild_id) if channel and channel.guild_id else None

    async def _send_component(
        self,
        data: dict[str, Any],
        message: dict[str, Any],
        user: FakeUser,
        permissions: int | None,
        age_s: float,
    ) -> FakeInteraction:
        guild = self._guild_of_message(message)
        channel = self._channel_by_id(int(message["channel_id"])) if guild else None
        return await self._send_interaction(
            3,
            data,
            user=user,
            channel=channel,
            guild=guild,
            permissions=permissions,
            attachment_size_limit=DEFAULT_ATTACHMENT_SIZE_LIMIT,
            age_s=age_s,
            message=message,
        )

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a DISPATCH event to the ready session that owns ``data["guild_id"]`` (see
        :meth:`session_for`; no guild id: shard 0, or the newest unsharded session)."""
        guild_id = data.get("guild_id")
        session = await self.session_for(int(guild_id) if guild_id else None)
        await self._send_dispatch(session, event, data)

    async def reconnect_gateway(self, *, shard: int | None = None) -> None:
        """Ask the client to reconnect (op 7); it should RESUME. ``shard``: that shard's
        session (default: the newest ready one)."""
        session = await self.wait_until_ready(shard=shard)
        await self._send(session, {"op": OP_RECONNECT, "d": None})

    # ------------------------------------------------------------------ internals: helpers

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_changed(self) -> None:
        # Wake on the next request/event, or after a short poll interval for conditions on
        # state outside the fake (the bot's own bookkeeping).
        # (asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
        # cancellation by which an enclosing asyncio.timeout() ends a test's wait.)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await self._changed.wait()

    def _find_command(
        self, name: str, guild: FakeGuild | None
    ) -> tuple[dict[str, Any], int | None]:
        # Guild commands exist only in their guild; a DM sees global commands only.
        for scope in [guild.id, None] if guild is not None else [None]:
            for cmd in self.commands.get(scope, []):
                if cmd["name"] == name and cmd.get("type", 1) == 1:
                    return cmd, scope
        raise LookupError(f"command {name!r} was never registered (synced: {self.commands!r})")

    async def _send_interaction(
        self,
        itype: int,
        data: dict[str, Any],
        *,
        user: FakeUser,
        channel: FakeChannel | None,
        guild: FakeGuild | None,
        permissions: int | None,
        attachment_size_limit: int,
        age_s: float,
        locale: str = "en-US",
        message: dict[str, Any] | None = None,
    ) -> FakeInteraction:
        session = await self.session_for(guild.id if guild is not None else None)
        created = time.time() - age_s
        iid = snowflake(created)
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(96)
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(self.application_id),
            "type": itype,
            "data": data,
            "token": token,
            "version": 1,
            "locale": locale,
            "app_permissions": str(DEFAULT_MEMBER_PERMISSIONS),
            "entitlements": [],
            "attachment_size_limit": attachment_size_limit,
        }
        if guild is not None:
            channel = channel or guild.channels[0]
            perms = self.member_permissions(user, guild) if permissions is None else permissions
            payload.update(
                guild_id=str(guild.id),
                guild={"id": str(guild.id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                channel_id=str(channel.id),
                channel=channel.payload() | {"permissions": str(perms)},
                member=guild.member_payload(user, permissions=perms),
                authorizing_integration_owners={"0": str(guild.id)},
                context=0,
            )
        else:
            channel = self._dm_channel(user)
            payload.update(
                channel_id=str(channel.id),
                channel=channel.payload(),
                user=user.payload(),
                authorizing_integration_owners={"0": str(user.id)},
                context=1,
            )
        if message is not None:
            payload["message"] = message
        inter = FakeInteraction(
            self,
            id=iid,
            token=token,
            type=itype,
            user_id=user.id,
            guild_id=guild.id if guild is not None else None,
            channel_id=channel.id,
            payload=payload,
            created_wall=snowflake_time(iid),
            attachment_size_limit=attachment_size_limit,
        )
        if message is not None:
            # For component interactions "@original" is the message the button is on.
            inter.original_message_id = int(message["id"])
        self.interactions[iid] = inter
        self._by_token[token] = inter
        inter.shard_id = session.shard_id
        inter.sent_at = asyncio.get_running_loop().time()
        await self._send_dispatch(session, "INTERACTION_CREATE", payload)
        return inter

    def _dm_channel(self, user: FakeUser) -> FakeChannel:
        if user.id not in self.dm_channels:
            self.dm_channels[user.id] = FakeChannel(
                id=snowflake(), name="", guild_id=None, type=1, recipient=user
            )
        return self.dm_channels[user.id]

    def _new_message(
        self,
        body: dict[str, Any],
        files: list[Part],
        *,
        channel_id: int,
        message_type: int,
        interaction: FakeInteraction | None,
        flags: int = 0,
    ) -> dict[str, Any]:
        self._check_components(body.get("components"), int(body.get("flags") or 0))
        mid = snowflake()
        message: dict[str, Any] = {
            "id": str(mid),
            "type": message_type,
            "channel_id": str(channel_id),
            "author": self.bot_user.payload(),
            "content": body.get("content") or "",
            "timestamp": iso_now(),
            "edited_timestamp": None,
            "tts": bool(body.get("tts", False)),
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": body.get("embeds") or [],
            "components": _with_component_ids(body.get("components") or []),
            "pinned": False,
            "flags": (int(body.get("flags") or 0) | flags),
        }
        if interaction is not None:
            message["webhook_id"] = str(self.application_id)
            message["application_id"] = str(self.application_id)
            message["interaction_metadata"] = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": self.users[interaction.user_id].payload(),
                "authorizing_integration_owners": interaction.payload.get(
                    "authorizing_integration_owners", {}
                ),
            }
            if interaction.guild_id is not None:
                message["guild_id"] = str(interaction.guild_id)
        message["attachments"] = self._attachments(message, body, files)
        self.messages[mid] = message
        return message

    @staticmethod
    def _check_components(components: list[dict[str, Any]] | None, flags: int) -> None:
        errors = validate_message_components(components or [], flags)
        if errors:
            raise DiscordError(400, "Invalid Form Body: " + "; ".join(errors), 50035)

    def _attachments(
        self, message: dict[str, Any], body: dict[str, Any], files: list[Part]
    ) -> list[dict[str, Any]]:
        """Apply Discord's attachment rules: ``attachments`` lists what to keep plus new files."""
        existing = {a["id"]: a for a in message.get("attachments", [])}
        new_by_index = {}
        for part in files:
            m = re.fullmatch(r"files\[(\d+)\]|file(\d*)", part.name)
            index = next((g for g in m.groups() if g), "0") if m else part.name
            new_by_index[str(index)] = part
        channel_id = int(message["channel_id"])

        def make(part: Part) -> dict[str, Any]:
            return attachment_payload(
                snowflake(), part.filename or "file", len(part.data), part.content_type, channel_id
            )

        if "attachments" not in body:
            return list(existing.values()) + [make(p) for p in files]
        out = []
        for spec in body.get("attachments") or []:
            sid = str(spec.get("id"))
            if sid in existing:
                out.append(existing[sid])
            elif sid in new_by_index:
                out.append(make(new_by_index.pop(sid)))
        return out + [make(p) for p in new_by_index.values()]

    def _edit_message(
        self, message: dict[str, Any], body: dict[str, Any], files: list[Part]
    ) -> dict[str, Any]:
        if "components" in body:
            flags = body.get("flags") if body.get("flags") is not None else message["flags"]
            self._check_components(body["components"], int(flags or 0))
        for key in ("content", "embeds", "allowed_mentions"):
            if key in body:
                message[key] = (
                    body[key] if body[key] is not None else ("" if key == "content" else [])
                )
        if "components" in body:
            message["components"] = _with_component_ids(body["components"] or [])
        if "flags" in body and body["flags"] is not None:
            keep = message["flags"] & FLAG_EPHEMERAL
            message["flags"] = int(body["flags"]) | keep
        if files or "attachments" in body:
            message["attachments"] = self._attachments(message, body, files)
        message["flags"] &= ~FLAG_LOADING
        message["edited_timestamp"] = iso_now()
        return message

    # ------------------------------------------------------------------ internals: HTTP

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if request.path.rstrip("/") == GATEWAY_PATH.rstrip("/"):
            return await handler(request)
        loop = asyncio.get_running_loop()
        path = (
            request.path[len(API_PREFIX) :] if request.path.startswith(API_PREFIX) else request.path
        )
        self._seq += 1
        record = RecordedRequest(
            seq=self._seq,
            time=loop.time(),
            method=request.method,
            path=path,
            query=dict(request.query),
            headers=dict(request.headers),
        )
        resource = request.match_info.route.resource
        record.route = (
            f"{request.method} {resource.canonical[len(API_PREFIX) :]}"
            if resource is not None and request.match_info.http_exception is None
            else "unhandled"
        )
        token = request.match_info.get("token")
        if token:
            record.token = token
        if "interaction_id" in request.match_info:
            record.interaction_id = int(request.match_info["interaction_id"])
        await _read_body(request, record)
        request[RECORD] = record
        self.requests.append(record)
        if record.token:
            self.requests_by_token.setdefault(record.token, []).append(record)

        response: web.StreamResponse
        rule = next((f for f in self.failures if f.remaining > 0 and f.match(record)), None)
        if rule is not None:
            rule.remaining -= 1
            rule.hits.append(record)
            record.injected = True
            response = _injected_response(rule)
        elif record.route == "unhandled":
            log.warning("fake discord: unhandled %s %s", request.method, path)
            response = _error(404, "404: Not Found", 0)
        else:
            try:
                response = await handler(request)
            except DiscordError as exc:
                response = _error(exc.status, exc.message, exc.code)
        record.status = response.status
        if isinstance(response, web.Response) and response.body is not None:
            with contextlib.suppress(ValueError, TypeError):
                record.response = json.loads(response.body)  # type: ignore[arg-type]
        self._notify()
        delay = next((d for d in self.delays if d.remaining > 0 and d.match(record)), None)
        if delay is not None:
            # Discord has acted on the request; only the answer is slow to come back.
            delay.remaining -= 1
            delay.hits.append(record)
            await asyncio.sleep(delay.seconds)
        return response

    def _add_routes(self, app: web.Application) -> None:
        r = app.router
        p = API_PREFIX
        r.add_get(p + "/users/@me", self._get_me)
        r.add_get(p + "/users/{user_id}", self._get_user)
        r.add_post(p + "/users/@me/channels", self._create_dm)
        r.add_get(p + "/oauth2/applications/@me", self._get_application)
        r.add_get(p + "/applications/@me", self._get_application)
        r.add_get(p + "/gateway", self._get_gateway)
        r.add_get(p + "/gateway/bot", self._get_gateway_bot)
        for path in (
            "/applications/{app_id}/commands",
            "/applications/{app_id}/guilds/{guild_id}/commands",
        ):
            r.add_get(p + path, self._get_commands)
            r.add_put(p + path, self._put_commands)
            r.add_post(p + path, self._post_command)
        r.add_post(p + "/interactions/{interaction_id}/{token}/callback", self._callback)
        r.add_post(p + "/webhooks/{app_id}/{token}", self._followup)
        msg = p + "/webhooks/{app_id}/{token}/messages/{message_id}"
        r.add_get(msg, self._get_webhook_message)
        r.add_patch(msg, self._edit_webhook_message)
        r.add_delete(msg, self._delete_webhook_message)
        r.add_get(p + "/channels/{channel_id}", self._get_channel)
        r.add_post(p + "/channels/{channel_id}/messages", self._channel_message)
        r.add_post(
            p + "/channels/{channel_id}/messages/{message_id}/threads", self._thread_from_message
        )
        r.add_post(p + "/channels/{channel_id}/threads", self._thread_without_message)
        r.add_get(p + "/guilds/{guild_id}", self._get_guild)
        r.add_get(p + "/guilds/{guild_id}/members/{user_id}", self._get_member)

    def _auth(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bot {self.bot_token}":
            raise DiscordError(401, "401: Unauthorized", 0)

    async def _get_me(self, request: web.Request) -> web.Response:
        self._auth(request)
        return _json(
            self.bot_user.payload() | {"verified": True, "mfa_enabled": False, "locale": "en-US"}
        )

    async def _get_user(self, request: web.Request) -> web.Response:
        self._auth(request)
        user = self.users.get(int(request.match_info["user_id"]))
        if user is None:
            raise DiscordError(404, "Unknown User", 10013)
        return _json(user.payload())

    async def _create_dm(self, request: web.Request) -> web.Response:
        self._auth(request)
        body = request[RECORD].json or {}
        user = self.users.get(int(body.get("recipient_id", 0)))
        if user is None:
            raise DiscordError(400, "Invalid Recipient(s)", 50033)
        return _json(self._dm_channel(user).payload())

    async def _get_application(self, request: web.Request) -> web.Response:
        self._auth(request)
        return _json(
            {
                "id": str(self.application_id),
                "name": self.bot_user.username,
                "icon": None,
                "description": "",
                "summary": "",
                "type": None,
                "bot": self.bot_user.payload(),
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": secrets.token_hex(32),
                "owner": self.owner.payload(),
                "flags": 0,
                "team": None,
                "hook": True,
                "redirect_uris": [],
                "interactions_endpoint_url": None,
                "tags": [],
                "approximate_guild_count": len(self.guilds),
                "integration_types_config": {"0": {}},
            }
        )

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return _json({"url": self.gateway_url.rstrip("/")})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        self._auth(request)
        return _json(
            {
                "url": self.gateway_url.rstrip("/"),
                "shards": self.shards,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 14400000,
                    "max_concurrency": 1,
                },
            }
        )

    def _check_app(self, request: web.Request) -> int | None:
        self._auth(request)
        if int(request.match_info["app_id"]) != self.application_id:
            raise DiscordError(403, "Missing Access", 50001)
        guild_id = request.match_info.get("guild_id")
        if guild_id is not None and self.guild_by_id(int(guild_id)) is None:
            raise DiscordError(403, "Missing Access", 50001)
        return int(guild_id) if guild_id is not None else None

    def _register(self, scope: int | None, cmd: dict[str, Any]) -> dict[str, Any]:
        errors = validate_command(cmd)
        if errors:
            raise DiscordError(400, "Invalid Form Body: " + "; ".join(errors), 50035)
        old = next((c for c in self.commands.get(scope, []) if c["name"] == cmd["name"]), None)
        out = dict(cmd)
        out.setdefault("type", 1)
        out["id"] = old["id"] if old else str(snowflake())
        out["application_id"] = str(self.application_id)
        out["version"] = str(snowflake())
        # Discord takes the permission bits as a number or a string and answers a string.
        perms = out.get("default_member_permissions")
        out["default_member_permissions"] = None if perms is None else str(perms)
        out.setdefault("nsfw", False)
        out.setdefault("options", [])
        if scope is not None:
            out["guild_id"] = str(scope)
        return out

    async def _get_commands(self, request: web.Request) -> web.Response:
        scope = self._check_app(request)
        return _json(self.commands.get(scope, []))

    async def _put_commands(self, request: web.Request) -> web.Response:
        scope = self._check_app(request)
        body = request[RECORD].json
        if not isinstance(body, list):
            raise DiscordError(400, "Invalid Form Body", 50035)
        names = [c.get("name") for c in body]
        if len(names) != len(set(names)):
            raise DiscordError(400, "Invalid Form Body: duplicate command names", 50035)
        registered = [self._register(scope, c) for c in body]
        self.commands[scope] = registered
        self.sync_payloads.append((scope, body))
        return _json(registered)

    async def _post_command(self, request: web.Request) -> web.Response:
        scope = self._check_app(request)
        cmd = self._register(scope, request[RECORD].json or {})
        current = [c for c in self.commands.get(scope, []) if c["name"] != cmd["name"]]
        self.commands[scope] = [*current, cmd]
        return _json(cmd, status=201)

    def _interaction_for_webhook(self, request: web.Request) -> FakeInteraction:
        """Resolve ``/webhooks/{app_id}/{token}``; raise Discord's errors for dead tokens."""
        if int(request.match_info["app_id"]) != self.application_id:
            raise DiscordError(404, "Unknown Webhook", 10015)
        inter = self._by_token.get(request.match_info["token"])
        if inter is None:
            raise DiscordError(401, "Invalid Webhook Token", 50027)
        expired = time.time() - inter.created_wall > self.token_ttl_s
        if inter.expired_status is not None or expired:
            if inter.expired_status == 404:
                raise DiscordError(404, "Unknown Webhook", 10015)
            raise DiscordError(401, "Invalid Webhook Token", 50027)
        if inter.callback_type is None:
            raise DiscordError(404, "Unknown Webhook", 10015)
        return inter

    def _check_size(self, inter: FakeInteraction, files: list[Part]) -> None:
        total = sum(len(p.data) for p in files)
        if total > inter.attachment_size_limit:
            raise DiscordError(413, "Request entity too large", 40005)

    async def _callback(self, request: web.Request) -> web.Response:
        record: RecordedRequest = request[RECORD]
        inter = self.interactions.get(int(request.match_info["interaction_id"]))
        if inter is None or inter.token != request.match_info["token"]:
            raise DiscordError(404, "Unknown interaction", 10062)
        if inter.callback_type is not None:
            raise DiscordError(400, "Interaction has already been acknowledged.", 40060)
        if record.time - inter.sent_at > self.callback_window_s or inter.expired_status:
            inter.late_callbacks += 1
            raise DiscordError(404, "Unknown interaction", 10062)
        body = record.json or {}
        ctype = body.get("type")
        data = body.get("data") or {}
        files = record.files
        self._check_size(inter, files)
        channel_id = inter.channel_id
        message: dict[str, Any] | None = None
        if ctype == CB_MESSAGE:
            message = self._new_message(
                data, files, channel_id=channel_id, message_type=20, interaction=inter
            )
            inter.original_message_id = int(message["id"])
        elif ctype == CB_DEFERRED_MESSAGE:
            message = self._new_message(
                {"flags": data.get("flags", 0)},
                [],
                channel_id=channel_id,
                message_type=20,
                interaction=inter,
                flags=FLAG_LOADING,
            )
            inter.original_message_id = int(message["id"])
        elif ctype in (CB_DEFERRED_UPDATE, CB_UPDATE_MESSAGE):
            # Only for a component's message: a component interaction, or a modal submit
            # whose modal was opened from a component.
            if not (inter.type == 3 or (inter.type == 5 and "message" in inter.payload)):
                raise DiscordError(400, "Interaction response type not allowed", 50035)
            if ctype == CB_UPDATE_MESSAGE and inter.original is not None:
                message = self._edit_message(inter.original, data, files)
        elif ctype == CB_MODAL:
            # A modal answers a command or a component, never a modal submit (or a ping).
            if inter.type not in (2, 3):
                raise DiscordError(400, "Interaction response type not allowed", 50035)
            errors = validate_modal(data)
            if errors:
                raise DiscordError(400, "Invalid Form Body: " + "; ".join(errors), 50035)
            inter.modal = {
                "custom_id": data["custom_id"],
                "title": data["title"],
                "components": _with_component_ids(data["components"]),
            }
        elif ctype == CB_AUTOCOMPLETE:
            pass
        else:
            raise DiscordError(400, "Invalid Form Body: unknown callback type", 50035)
        inter.callback_type = ctype
        inter.callback_at = record.time
        if record.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        flags = message["flags"] if message else 0
        out: dict[str, Any] = {
            "interaction": {
                "id": str(inter.id),
                "type": inter.type,
                "response_message_loading": ctype == CB_DEFERRED_MESSAGE,
                "response_message_ephemeral": bool(flags & FLAG_EPHEMERAL),
            },
            "resource": {"type": ctype},
        }
        if message is not None:
            out["interaction"]["response_message_id"] = message["id"]
            if ctype in (CB_MESSAGE, CB_UPDATE_MESSAGE):
                out["resource"]["message"] = message
        return _json(out)

    async def _followup(self, request: web.Request) -> web.Response:
        record: RecordedRequest = request[RECORD]
        inter = self._interaction_for_webhook(request)
        body = record.json or {}
        self._check_size(inter, record.files)
        original = inter.original
        if (
            inter.callback_type == CB_DEFERRED_MESSAGE
            and original is not None
            and original["flags"] & FLAG_LOADING
            and not inter.followup_ids
        ):
            # Discord: the first follow-up after a "thinking" defer replaces the loading
            # message (and keeps its ephemerality).
            message = self._edit_message(original, body, record.files)
        else:
            message = self._new_message(
                body, record.files, channel_id=inter.channel_id, message_type=0, interaction=inter
            )
        inter.followup_ids.append(int(message["id"]))
        if record.query.get("wait") in ("1", "true", "True"):
            return _json(message)
        return web.Response(status=204)

    def _webhook_message(self, request: web.Request, inter: FakeInteraction) -> dict[str, Any]:
        mid = request.match_info["message_id"]
        message_id = inter.original_message_id if mid == "@original" else int(mid)
        if message_id is None or (
            message_id != inter.original_message_id and message_id not in inter.followup_ids
        ):
            raise DiscordError(404, "Unknown Message", 10008)
        message = self.messages.get(message_id)
        if message is None:
            raise DiscordError(404, "Unknown Message", 10008)
        return message

    async def _get_webhook_message(self, request: web.Request) -> web.Response:
        inter = self._interaction_for_webhook(request)
        return _json(self._webhook_message(request, inter))

    async def _edit_webhook_message(self, request: web.Request) -> web.Response:
        record: RecordedRequest = request[RECORD]
        inter = self._interaction_for_webhook(request)
        message = self._webhook_message(request, inter)
        self._check_size(inter, record.files)
        return _json(self._edit_message(message, record.json or {}, record.files))

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        inter = self._interaction_for_webhook(request)
        message = self._webhook_message(request, inter)
        mid = int(message["id"])
        del self.messages[mid]
        inter.deleted_ids.append(mid)
        return web.Response(status=204)

    @staticmethod
    def _channels_of(guild: FakeGuild) -> list[FakeChannel]:
        return [*guild.channels, *guild.threads]

    def _channel_by_id(self, channel_id: int) -> FakeChannel:
        for c in [
            *(c for g in self.guilds for c in self._channels_of(g)),
            *self.dm_channels.values(),
        ]:
            if c.id == channel_id:
                return c
        raise DiscordError(404, "Unknown Channel", 10003)

    def thread_of(self, message: dict[str, Any] | int) -> FakeChannel | None:
        """The thread started from ``message`` (a message dict or id), if any."""
        mid = int(message["id"]) if isinstance(message, dict) else message
        return next((t for g in self.guilds for t in g.threads if t.id == mid), None)

    def thread_messages(self, thread: FakeChannel | int) -> list[dict[str, Any]]:
        """The messages posted in ``thread`` (or any channel), oldest first."""
        cid = thread.id if isinstance(thread, FakeChannel) else thread
        return [m for m in self.messages.values() if int(m["channel_id"]) == cid]

    async def _thread_from_message(self, request: web.Request) -> web.Response:
        """``POST /channels/{id}/messages/{message_id}/threads``: a public thread whose id is
        the message's (as on Discord); the message gets ``thread`` and the HAS_THREAD flag."""
        self._auth(request)
        parent = self._channel_by_id(int(request.match_info["channel_id"]))
        message = self.messages.get(int(request.match_info["message_id"]))
        if message is None or int(message["channel_id"]) != parent.id:
            raise DiscordError(404, "Unknown Message", 10008)
        if parent.guild_id is None or parent.is_thread:
            raise DiscordError(400, "Cannot execute action on this channel type", 50024)
        if message["flags"] & FLAG_EPHEMERAL:
            raise DiscordError(400, "Cannot execute action on this message", 50083)
        if self.thread_of(message) is not None:
            raise DiscordError(400, "A thread has already been created for this message", 160004)
        thread = self._new_thread(parent, request[RECORD].json or {}, int(message["id"]), 11)
        message["thread"] = thread.payload()
        message["flags"] |= FLAG_HAS_THREAD
        await self.dispatch("THREAD_CREATE", thread.payload() | {"newly_created": True})
        return _json(thread.payload(), status=201)

    async def _thread_without_message(self, request: web.Request) -> web.Response:
        """``POST /channels/{id}/threads``: a thread not started from a message (type 12,
        private, unless the body says 11)."""
        self._auth(request)
        parent = self._channel_by_id(int(request.match_info["channel_id"]))
        if parent.guild_id is None or parent.is_thread:
            raise DiscordError(400, "Cannot execute action on this channel type", 50024)
        body = request[RECORD].json or {}
        thread = self._new_thread(parent, body, snowflake(), int(body.get("type") or 12))
        await self.dispatch("THREAD_CREATE", thread.payload() | {"newly_created": True})
        return _json(thread.payload(), status=201)

    def _new_thread(
        self, parent: FakeChannel, body: dict[str, Any], thread_id: int, thread_type: int
    ) -> FakeChannel:
        name = str(body.get("name") or "")
        if not 1 <= len(name) <= 100:
            raise DiscordError(400, "Invalid Form Body: name must be 1-100 characters", 50035)
        if thread_type not in (11, 12):
            raise DiscordError(400, "Invalid Form Body: thread type must be 11 or 12", 50035)
        guild = self.guild_by_id(int(parent.guild_id or 0))
        assert guild is not None
        thread = FakeChannel(
            id=thread_id,
            name=name,
            guild_id=guild.id,
            type=thread_type,
            parent_id=parent.id,
            owner_id=self.bot_user.id,
            auto_archive_duration=int(body.get("auto_archive_duration") or 1440),
        )
        guild.threads.append(thread)
        return thread

    async def _get_channel(self, request: web.Request) -> web.Response:
        self._auth(request)
        return _json(self._channel_by_id(int(request.match_info["channel_id"])).payload())

    async def _channel_message(self, request: web.Request) -> web.Response:
        self._auth(request)
        record: RecordedRequest = request[RECORD]
        channel = self._channel_by_id(int(request.match_info["channel_id"]))
        if sum(len(p.data) for p in record.files) > DEFAULT_ATTACHMENT_SIZE_LIMIT:
            raise DiscordError(413, "Request entity too large", 40005)
        message = self._new_message(
            record.json or {}, record.files, channel_id=channel.id, message_type=0, interaction=None
        )
        if channel.is_thread:
            channel.message_count += 1
            message["position"] = channel.message_count - 1
        return _json(message)

    async def _get_guild(self, request: web.Request) -> web.Response:
        self._auth(request)
        guild = self.guild_by_id(int(request.match_info["guild_id"]))
        if guild is None:
            raise DiscordError(404, "Unknown Guild", 10004)
        payload = guild.payload()
        for key in ("members", "channels", "threads", "presences", "voice_states"):
            payload.pop(key, None)
        return _json(payload)

    async def _get_member(self, request: web.Request) -> web.Response:
        self._auth(request)
        guild = self.guild_by_id(int(request.match_info["guild_id"]))
        if guild is None:
            raise DiscordError(404, "Unknown Guild", 10004)
        user = self.users.get(int(request.match_info["user_id"]))
        if user is None or user not in guild.members:
            raise DiscordError(404, "Unknown Member", 10007)
        return _json(guild.member_payload(user))

    # ------------------------------------------------------------------ internals: gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await ws.prepare(request)
        session = GatewaySession(ws=ws, compress=request.query.get("compress") == "zlib-stream")
        self.sessions.append(session)
        task = asyncio.current_task()
        if task is not None:
            self._ws_tasks.add(task)
        try:
            await self._send(
                session, {"op": OP_HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms}}
            )
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await self._on_gateway_message(session, json.loads(msg.data))
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await self._on_gateway_message(session, json.loads(msg.data.decode()))
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
        finally:
            if task is not None:
                self._ws_tasks.discard(task)
            self._notify()
        return ws

    async def _send(self, session: GatewaySession, payload: dict[str, Any]) -> None:
        if session.ws.closed:
            return
        text = json.dumps(payload, separators=(",", ":"))
        if session.compress:
            data = session._zlib.compress(text.encode()) + session._zlib.flush(zlib.Z_SYNC_FLUSH)
            await session.ws.send_bytes(data)
        else:
            await session.ws.send_str(text)

    async def _ack_later(self, session: GatewaySession) -> None:
        await asyncio.sleep(self.heartbeat_ack_delay_s)
        await self._send(session, {"op": OP_HEARTBEAT_ACK})

    async def _send_dispatch(
        self, session: GatewaySession, event: str, data: dict[str, Any]
    ) -> None:
        session.seq += 1
        payload = {"op": OP_DISPATCH, "t": event, "s": session.seq, "d": data}
        session.history.append(payload)
        await self._send(session, payload)

    async def _on_gateway_message(self, session: GatewaySession, msg: dict[str, Any]) -> None:
        self.gateway_received.append(msg)
        op = msg.get("op")
        raw = msg.get("d")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if op == OP_HEARTBEAT:
            # Answer after a network-like delay, not instantly: discord.py's keep-alive thread
            # records the send time only after the loop has sent the beat, so an ACK that
            # arrives first (same loop, busy CPU) reads as "websocket is 41s behind".
            task = asyncio.create_task(self._ack_later(session))
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)
        elif op == OP_IDENTIFY:
            await self._identify(session, data)
        elif op == OP_RESUME:
            await self._resume(session, data)
        elif op == OP_REQUEST_MEMBERS:
            await self._request_members(session, data)
        elif op == OP_PRESENCE:
            pass
        else:
            log.warning("fake discord: unexpected gateway op %s", op)

    async def _identify(self, session: GatewaySession, data: dict[str, Any]) -> None:
        if data.get("token") != self.bot_token:
            await session.ws.close(code=4004, message=b"Authentication failed.")
            return
        shard = data.get("shard")
        if shard is not None:
            valid = isinstance(shard, list) and len(shard) == 2 and 0 <= shard[0] < shard[1]
            if not valid:
                await session.ws.close(code=4010, message=b"Invalid shard.")
                return
            session.shard = (int(shard[0]), int(shard[1]))
        session.identify = data
        session.session_id = secrets.token_hex(16)
        # Discord sends each shard only its own guilds: unavailable in READY, then one
        # GUILD_CREATE each (discord.py's shard_ready waits for them).
        mine = [g for g in self.guilds if session.owns(g.id)]
        ready = {
            "v": 10,
            "user": self.bot_user.payload() | {"verified": True, "mfa_enabled": False},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in mine],
            "session_id": session.session_id,
            "resume_gateway_url": self.gateway_url.rstrip("/"),
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "user_settings": {},
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "session_type": "normal",
            "auth": {},
            "_trace": ['["fake-discord-gateway",{"micros":0}]'],
        }
        if session.shard is not None:
            ready["shard"] = list(session.shard)
        await self._send_dispatch(session, "READY", ready)
        for guild in mine:
            await self._send_dispatch(session, "GUILD_CREATE", guild.payload())
        session.ready.set()
        self._notify()

    async def _resume(self, session: GatewaySession, data: dict[str, Any]) -> None:
        old = next((s for s in self.sessions if s.session_id == data.get("session_id")), None)
        if old is None or data.get("token") != self.bot_token:
            await self._send(session, {"op": OP_INVALID_SESSION, "d": False})
            return
        # The new connection carries on the old session (and its shard): replay what was
        # missed.
        session.session_id, session.seq, session.history = old.session_id, old.seq, old.history
        session.identify, session.shard = old.identify, old.shard
        old.session_id = None
        for event in [e for e in session.history if e["s"] > (data.get("seq") or 0)]:
            await self._send(session, event)
        await self._send_dispatch(session, "RESUMED", {"_trace": ["fake-discord-gateway"]})
        session.ready.set()
        self._notify()

    async def _request_members(self, session: GatewaySession, data: dict[str, Any]) -> None:
        """Op 8: one GUILD_MEMBERS_CHUNK per requested guild this session owns (Discord
        ignores guilds of other shards), filtered by ``user_ids`` or a name ``query``."""
        raw = data.get("guild_id")
        guild_ids = raw if isinstance(raw, list) else [raw]
        user_ids = {int(u) for u in data.get("user_ids") or []}
        query = str(data.get("query") or "").lower()
        limit = int(data.get("limit") or 0)
        for guild_id in guild_ids:
            guild = self.guild_by_id(int(guild_id)) if guild_id is not None else None
            if guild is None or not session.owns(guild.id):
                continue
            members = [
                m
                for m in guild.members
                if (not user_ids or m.id in user_ids) and m.username.lower().startswith(query)
            ]
            if limit:
                members = members[:limit]
            await self._send_dispatch(
                session,
                "GUILD_MEMBERS_CHUNK",
                {
                    "guild_id": str(guild.id),
                    "members": [guild.member_payload(m) for m in members],
                    "chunk_index": 0,
                    "chunk_count": 1,
                    "not_found": [str(u) for u in user_ids - {m.id for m in members}],
                    "nonce": data.get("nonce"),
                },
            )


async def _read_body(request: web.Request, record: RecordedRequest) -> None:
    ctype = request.content_type
    if ctype.startswith("multipart/"):
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            assert isinstance(part, aiohttp.BodyPartReader)
            data = await part.read(decode=False)
            p = Part(
                name=part.name or "",
                filename=part.filename,
                content_type=part.headers.get(aiohttp.hdrs.CONTENT_TYPE),
                data=bytes(data),
            )
            record.parts.append(p)
            if p.name == "payload_json":
                record.json = json.loads(p.data)
    elif request.can_read_body:
        raw = await request.read()
        if raw:
            try:
                record.json = json.loads(raw)
            except ValueError:
                record.json = raw.decode("utf-8", "replace")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response with exactly ``Content-Type: application/json``, as Discord sends it.

    (discord.py only decodes JSON when the header is exactly that, without a charset.)
    """
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={**(headers or {}), "Content-Type": "application/json"},
    )


def _error(status: int, message: str, code: int) -> web.Response:
    return _json({"message": message, "code": code}, status=status)


def _injected_response(rule: FailureRule) -> web.Response:
    if rule.status == 429:
        body = rule.body or {
            "message": "You are being rate limited.",
            "retry_after": rule.retry_after,
            "global": rule.is_global,
        }
        headers = {
            "Retry-After": str(max(1, round(rule.retry_after))),
            "X-RateLimit-Scope": "global" if rule.is_global else "user",
            "Via": "1.1 google",
        }
        if rule.is_global:
            headers["X-RateLimit-Global"] = "true"
        return _json(body, status=429, headers=headers)
    defaults = {
        401: ("401: Unauthorized", 0),
        403: ("Missing Permissions", 50013),
        404: ("Unknown Webhook", 10015),
        413: ("Request entity too large", 40005),
        500: ("500: Internal Server Error", 0),
        502: ("502: Bad Gateway", 0),
        503: ("503: Service Unavailable", 0),
    }
    message, code = defaults.get(rule.status, (f"{rule.status}: Error", 0))
    return _json(rule.body or {"message": message, "code": code}, status=rule.status)


def _with_component_ids(components: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Echo components like Discord does: each gets a numeric ``id`` if it has none."""
    counter = iter(range(1, 1000))

    def walk(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for c in items:
            c = dict(c)
            c.setdefault("id", next(counter))
            if "components" in c:
                c["components"] = walk(c["components"])
            for key in ("component", "accessory"):  # a label's input, a section's button
                if isinstance(c.get(key), dict):
                    [c[key]] = walk([c[key]])
            out.append(c)
        return out

    return walk(components)
