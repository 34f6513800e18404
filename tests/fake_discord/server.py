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
    FLAG_LOADING,
    FailureRule,
    FakeInteraction,
    Part,
    RecordedRequest,
    RequestPredicate,
    _collect_custom_ids,
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

_OPTION_TYPES = {bool: 5, int: 4, float: 10, str: 3}


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
    ) -> FakeInteraction:
        """Dispatch an APPLICATION_COMMAND interaction for the registered command ``name``.

        ``options`` maps option names to values; their types come from the registered
        command (str, int, bool, float otherwise). ``age_s`` back-dates the interaction
        (its id, hence discord.py's ``Interaction.created_at``/``expires_at``, and the token
        expiry in the fake). ``permissions`` overrides the member's resolved permissions.
        ``guild`` (default :attr:`guild`; ``channel``'s guild when that is given) is where
        the command is used: ``user`` becomes its member, and the interaction goes to the
        shard that owns it.
        """
        if channel is not None and channel.guild_id is not None:
            guild = guild or self.guild_by_id(channel.guild_id)
        guild = guild or self.guild
        user = user or self.user("user", guild=guild)
        if in_guild and user not in guild.members:
            guild.members.append(user)
        command, scope = self._find_command(name, guild if in_guild else None)
        opts = []
        registered = {o["name"]: o for o in command.get("options", [])}
        for key, value in (options or {}).items():
            otype = registered.get(key, {}).get("type") or _OPTION_TYPES.get(type(value), 3)
            opts.append({"name": key, "type": otype, "value": value})
        data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1}
        if opts:
            data["options"] = opts
        if scope is not None:
            data["guild_id"] = str(scope)
        return await self._send_interaction(
            2,
            data,
            user=user,
            channel=channel,
            guild=guild if in_guild else None,
            permissions=permissions,
            attachment_size_limit=attachment_size_limit,
            age_s=age_s,
            locale=locale,
        )

    async def press_button(
        self,
        custom_id: str,
        *,
        user: FakeUser,
        message_id: int | None = None,
        permissions: int | None = None,
        age_s: float = 0.0,
    ) -> FakeInteraction:
        """Dispatch a MESSAGE_COMPONENT interaction: ``user`` presses the button ``custom_id``.

        The message is the newest one carrying that custom_id unless ``message_id`` is given.
        Anyone may press it (an ephemeral message is only visible to its user on real
        Discord, so tests of "someone else" should use a public reply).
        """
        message = self._find_component_message(custom_id, message_id)
        channel_id = int(message["channel_id"])
        channel = next((c for g in self.guilds for c in g.channels if c.id == channel_id), None)
        guild = self.guild_by_id(channel.guild_id) if channel and channel.guild_id else None
        data = {"custom_id": custom_id, "component_type": 2}
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

    def _find_component_message(self, custom_id: str, message_id: int | None) -> dict[str, Any]:
        candidates = (
            [self.messages[message_id]] if message_id is not None else list(self.messages.values())
        )
        for message in reversed(candidates):
            found: list[str] = []
            _collect_custom_ids(message.get("components") or [], found)
            if custom_id in found:
                return message
        raise LookupError(f"no message carries a component {custom_id!r}")

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
        errors = _validate_command(cmd)
        if errors:
            raise DiscordError(400, "Invalid Form Body: " + "; ".join(errors), 50035)
        old = next((c for c in self.commands.get(scope, []) if c["name"] == cmd["name"]), None)
        out = dict(cmd)
        out.setdefault("type", 1)
        out["id"] = old["id"] if old else str(snowflake())
        out["application_id"] = str(self.application_id)
        out["version"] = str(snowflake())
        out.setdefault("default_member_permissions", None)
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
            if inter.type != 3:
                raise DiscordError(400, "Interaction response type not allowed", 50035)
            if ctype == CB_UPDATE_MESSAGE and inter.original is not None:
                message = self._edit_message(inter.original, data, files)
        elif ctype in (CB_MODAL, CB_AUTOCOMPLETE):
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

    def _channel_by_id(self, channel_id: int) -> FakeChannel:
        for c in [*(c for g in self.guilds for c in g.channels), *self.dm_channels.values()]:
            if c.id == channel_id:
                return c
        raise DiscordError(404, "Unknown Channel", 10003)

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
            out.append(c)
        return out

    return walk(components)


# Discord's documented limits for application commands.
_NAME_RE = re.compile(r"^[-_'\w]{1,32}$")


def _validate_command(cmd: dict[str, Any]) -> list[str]:
    """The checks Discord applies to a command payload (a 400 in real life)."""
    errors = []
    name = cmd.get("name", "")
    if not _NAME_RE.match(name) or (cmd.get("type", 1) == 1 and name != name.lower()):
        errors.append(f"name {name!r} invalid")
    if cmd.get("type", 1) == 1 and not 1 <= len(cmd.get("description") or "") <= 100:
        errors.append(f"{name}: description must be 1-100 characters")
    options = cmd.get("options") or []
    if len(options) > 25:
        errors.append(f"{name}: more than 25 options")
    seen_optional = False
    for opt in options:
        oname = opt.get("name", "")
        if not _NAME_RE.match(oname) or oname != oname.lower():
            errors.append(f"{name}.{oname}: name invalid")
        if not 1 <= len(opt.get("description") or "") <= 100:
            errors.append(f"{name}.{oname}: description must be 1-100 characters")
        if opt.get("required"):
            if seen_optional:
                errors.append(f"{name}.{oname}: required options must come first")
        else:
            seen_optional = True
        choices = opt.get("choices") or []
        if len(choices) > 25:
            errors.append(f"{name}.{oname}: more than 25 choices")
        for key in ("min_length", "max_length"):
            if key in opt and not 0 <= int(opt[key]) <= 6000:
                errors.append(f"{name}.{oname}: {key} out of range 0-6000")
    return errors
