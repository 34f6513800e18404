"""Self-tests of the fake Discord: a bare discord.py client (no bot code) against it."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import discord
import html5lib
import pytest
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from tests.fake_discord import (
    CALLBACK_PATH,
    CB_DEFERRED_MESSAGE,
    CB_DEFERRED_UPDATE,
    CB_MODAL,
    CB_UPDATE_MESSAGE,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    FOLLOWUP_PATH,
    ORIGINAL_PATH,
    PERM_MANAGE_GUILD,
    FakeDiscord,
)

pytestmark = pytest.mark.timeout(60)

PAGE = b"<!DOCTYPE html><html><head><title>t</title></head><body><p>hi</p></body></html>"


class CancelView(discord.ui.View):
    def __init__(self, job: str) -> None:
        super().__init__(timeout=None)
        button: discord.ui.Button[CancelView] = discord.ui.Button(
            label="Cancel", style=discord.ButtonStyle.danger, custom_id=f"t:cancel:{job}"
        )
        button.callback = self.cancel  # type: ignore[method-assign]
        self.add_item(button)
        self.pressed_by: list[int] = []

    async def cancel(self, interaction: discord.Interaction) -> None:
        self.pressed_by.append(interaction.user.id)
        await interaction.response.send_message("cancelled", ephemeral=True)


class MiniBot(discord.Client):
    """A minimal bot built only on discord.py, to check the fake speaks its protocol."""

    def __init__(
        self, guild_id: int, behaviour: Callable[..., Awaitable[None]], *, in_guild: bool = True
    ) -> None:
        super().__init__(intents=discord.Intents.default())
        self.tree = app_commands.CommandTree(self)
        self.guild_obj: discord.Object | None = discord.Object(guild_id) if in_guild else None
        self.behaviour = behaviour
        self.errors: list[BaseException] = []
        self.views: list[CancelView] = []

        @app_commands.command(name="html", description="Make a web page")
        @app_commands.describe(prompt="What the page should be", private="Only you see it")
        @app_commands.choices(
            style=[app_commands.Choice(name=s, value=s) for s in ("dark", "retro")]
        )
        async def html(
            interaction: discord.Interaction,
            prompt: app_commands.Range[str, 1, 1500],
            style: str | None = None,
            private: bool = False,
        ) -> None:
            try:
                await self.behaviour(self, interaction, prompt, style, private)
            except Exception as exc:
                self.errors.append(exc)
                raise

        self.tree.add_command(html, guild=self.guild_obj)

    async def setup_hook(self) -> None:
        await self.tree.sync(guild=self.guild_obj)


async def default_behaviour(
    bot: MiniBot, interaction: discord.Interaction, prompt: str, style: str | None, private: bool
) -> None:
    await interaction.response.defer(thinking=True, ephemeral=private)
    view = CancelView("1")
    bot.views.append(view)
    await interaction.edit_original_response(content="queued, position 1", view=view)
    await interaction.followup.send(
        f"done: {prompt}", file=discord.File(io.BytesIO(PAGE), filename="page.html")
    )


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord(callback_window_s=3.0)
    await server.start()
    # What the bot does with DISCORD_API_BASE / DISCORD_GATEWAY_URL; restored afterwards.
    monkeypatch.setattr(discord.http.Route, "BASE", server.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(server.gateway_url))
    yield server
    await server.stop()


@pytest.fixture
async def run_bot(
    fake: FakeDiscord,
) -> AsyncIterator[Callable[..., Awaitable[MiniBot]]]:
    started: list[tuple[MiniBot, asyncio.Task[None]]] = []

    async def start(
        behaviour: Callable[..., Awaitable[None]] = default_behaviour, *, in_guild: bool = True
    ) -> MiniBot:
        bot = MiniBot(fake.guild.id, behaviour, in_guild=in_guild)
        task = asyncio.create_task(bot.start(fake.bot_token))
        started.append((bot, task))
        ready = asyncio.create_task(fake.wait_until_ready())
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()  # raises the client's error
        await ready
        return bot

    yield start
    for bot, task in started:
        await bot.close()
        await asyncio.wait_for(task, 10)


def discord_problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("discord")
        and r.levelno >= logging.WARNING
        and "voice will NOT be supported" not in r.getMessage()
    ]


async def test_sync_defer_edit_followup_roundtrip(
    fake: FakeDiscord, run_bot: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bot = await run_bot()
    payload = await fake.wait_for_sync()
    assert [c["name"] for c in payload] == ["html"]
    options = {o["name"]: o for o in payload[0]["options"]}
    assert options["prompt"]["required"] is True
    assert options["prompt"]["max_length"] == 1500
    assert [c["value"] for c in options["style"]["choices"]] == ["dark", "retro"]
    assert fake.commands[fake.guild.id][0]["name"] == "html"

    ann = fake.user("ann")
    inter = await fake.send_command("html", {"prompt": "a bakery", "style": "dark"}, user=ann)
    part = await inter.wait_for_file(".html", timeout=10)

    assert inter.callback_type == CB_DEFERRED_MESSAGE
    assert inter.callback_latency is not None and inter.callback_latency < 3
    assert part.filename == "page.html" and part.data == PAGE
    html5lib.parse(part.data, treebuilder="etree", namespaceHTMLElements=False)
    # The edit made the original a normal message with the Cancel button.
    original = inter.original
    assert original is not None
    assert original["content"] == "queued, position 1"
    assert not original["flags"] & FLAG_LOADING
    assert inter.custom_ids() == ["t:cancel:1"]
    # The follow-up is a separate message carrying the attachment.
    [followup] = inter.followups
    assert followup["content"] == "done: a bakery"
    assert followup["attachments"][0]["filename"] == "page.html"
    routes = [r.route for r in inter.requests]
    assert routes == [
        "POST /interactions/{interaction_id}/{token}/callback",
        "PATCH /webhooks/{app_id}/{token}/messages/{message_id}",
        "POST /webhooks/{app_id}/{token}",
    ]
    assert not fake.unhandled_requests
    assert not bot.errors
    assert discord_problems(caplog) == []


async def test_button_press_by_someone_else(fake: FakeDiscord, run_bot: Any) -> None:
    bot = await run_bot()
    await fake.wait_for_sync()
    ann, bob = fake.user("ann"), fake.user("bob")
    inter = await fake.send_command("html", {"prompt": "x"}, user=ann)
    await inter.wait_for_file(".html", timeout=10)

    press = await fake.press_button("t:cancel:1", user=bob)
    await press.wait_for_callback()
    assert bot.views[0].pressed_by == [bob.id]
    assert press.payload["message"]["id"] == str(inter.original_message_id)
    assert press.payload["member"]["user"]["id"] == str(bob.id)
    assert press.original is not None and press.original["content"] == "cancelled"


async def test_followup_without_edit_replaces_loading_message(
    fake: FakeDiscord, run_bot: Any
) -> None:
    async def behaviour(bot: MiniBot, interaction: discord.Interaction, *args: Any) -> None:
        await interaction.response.defer(thinking=True, ephemeral=True)
        await interaction.followup.send("here", file=discord.File(io.BytesIO(PAGE), "a.html"))

    await run_bot(behaviour)
    await fake.wait_for_sync()
    inter = await fake.send_command("html", {"prompt": "x", "private": True})
    await inter.wait_for_file()
    assert inter.followups == []
    assert inter.original is not None and inter.original["content"] == "here"
    assert inter.is_ephemeral_reply()
    assert inter.original["flags"] & FLAG_EPHEMERAL


async def test_429_then_success_is_retried_by_discord_py(
    fake: FakeDiscord, run_bot: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await run_bot()
    await fake.wait_for_sync()
    rule = fake.fail_next("POST", FOLLOWUP_PATH, status=429, times=1, retry_after=0.2)
    inter = await fake.send_command("html", {"prompt": "x"})
    await inter.wait_for_file(timeout=10)
    followups = [r for r in inter.requests if r.method == "POST" and "/webhooks/" in r.path]
    assert [r.status for r in followups] == [429, 200]
    assert followups[1].time - followups[0].time >= 0.2
    assert rule.remaining == 0 and len(rule.hits) == 1
    assert any("rate limited" in p for p in discord_problems(caplog))


async def test_expired_token_gets_401(fake: FakeDiscord, run_bot: Any) -> None:
    gate = asyncio.Event()

    async def behaviour(bot: MiniBot, interaction: discord.Interaction, *args: Any) -> None:
        await interaction.response.defer()
        await gate.wait()
        await interaction.followup.send("late")

    bot = await run_bot(behaviour)
    await fake.wait_for_sync()
    inter = await fake.send_command("html", {"prompt": "x"})
    await inter.wait_for_callback()
    fake.expire(inter)
    gate.set()
    r = await inter.wait_for_request("POST", FOLLOWUP_PATH)
    assert r.status == 401 and r.response == {"message": "Invalid Webhook Token", "code": 50027}
    await fake.wait_until(lambda: bool(bot.errors))
    assert isinstance(bot.errors[0], discord.HTTPException) and bot.errors[0].status == 401


async def test_old_interaction_token_expires_by_age(fake: FakeDiscord, run_bot: Any) -> None:
    seen: list[discord.Interaction] = []

    async def behaviour(bot: MiniBot, interaction: discord.Interaction, *args: Any) -> None:
        seen.append(interaction)
        await interaction.response.defer()
        await interaction.followup.send("x")

    bot = await run_bot(behaviour)
    await fake.wait_for_sync()
    inter = await fake.send_command("html", {"prompt": "x"}, age_s=901)
    await fake.wait_until(lambda: bool(bot.errors))
    # discord.py sees the age through the snowflake, and Discord refuses the webhook.
    assert seen[0].is_expired()
    assert [r.status for r in inter.requests] == [200, 401]


async def test_late_callback_is_refused(fake: FakeDiscord, run_bot: Any) -> None:
    fake.callback_window_s = 0.2

    async def behaviour(bot: MiniBot, interaction: discord.Interaction, *args: Any) -> None:
        await asyncio.sleep(0.4)
        await interaction.response.defer()

    bot = await run_bot(behaviour)
    await fake.wait_for_sync()
    inter = await fake.send_command("html", {"prompt": "x"})
    r = await inter.wait_for_request("POST", CALLBACK_PATH)
    assert r.status == 404 and r.response["code"] == 10062
    assert inter.late_callbacks == 1 and inter.callback_type is None
    await fake.wait_until(lambda: bool(bot.errors))
    assert isinstance(bot.errors[0], discord.NotFound)


async def test_server_error_then_success(fake: FakeDiscord, run_bot: Any) -> None:
    await run_bot()
    await fake.wait_for_sync()
    fake.fail_next("PATCH", ORIGINAL_PATH, status=500, times=1)
    inter = await fake.send_command("html", {"prompt": "x"})
    await inter.wait_for_file(timeout=10)
    edits = [r.status for r in inter.requests if r.method == "PATCH"]
    assert edits == [500, 200]


async def test_gateway_resume_replays_and_keeps_working(fake: FakeDiscord, run_bot: Any) -> None:
    await run_bot()
    await fake.wait_for_sync()
    first_id = fake.sessions[-1].session_id
    await fake.reconnect_gateway()
    await fake.wait_until(lambda: len(fake.sessions) == 2 and fake.sessions[1].ready.is_set())
    assert fake.sessions[1].session_id == first_id
    assert any(m.get("op") == 6 for m in fake.gateway_received)
    inter = await fake.send_command("html", {"prompt": "after resume"})
    await inter.wait_for_file(timeout=10)


async def test_wrong_token_is_rejected(fake: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.default())
    with pytest.raises(discord.LoginFailure):
        await client.login("wrong-token")
    await client.close()
    assert fake.requests[-1].status == 401


async def test_too_big_attachment_gets_413(fake: FakeDiscord, run_bot: Any) -> None:
    async def behaviour(bot: MiniBot, interaction: discord.Interaction, *args: Any) -> None:
        await interaction.response.defer()
        try:
            await interaction.followup.send(file=discord.File(io.BytesIO(b"x" * 2000), "a.html"))
        except discord.HTTPException as exc:
            await interaction.followup.send(f"too big ({exc.status})")

    await run_bot(behaviour)
    await fake.wait_for_sync()
    inter = await fake.send_command("html", {"prompt": "x"}, attachment_size_limit=1000)
    await inter.wait_until(lambda i: "too big (413)" in i.visible_text)
    assert inter.html_files == []


async def test_second_response_is_refused_like_discord(fake: FakeDiscord, run_bot: Any) -> None:
    async def behaviour(bot: MiniBot, interaction: discord.Interaction, *args: Any) -> None:
        await interaction.response.defer()
        # Bypass discord.py's own "already responded" guard to see Discord's answer.
        interaction.response._response_type = None
        await interaction.response.send_message("again")

    bot = await run_bot(behaviour)
    await fake.wait_for_sync()
    inter = await fake.send_command("html", {"prompt": "x"})
    await fake.wait_until(lambda: bool(bot.errors))
    assert [r.status for r in inter.requests] == [200, 400]
    assert inter.requests[1].response["code"] == 40060


async def test_multipart_parts_and_unknown_routes_are_recorded(
    fake: FakeDiscord, run_bot: Any
) -> None:
    async def behaviour(bot: MiniBot, interaction: discord.Interaction, *args: Any) -> None:
        await interaction.response.defer()
        files = [
            discord.File(io.BytesIO(PAGE), "a.html"),
            discord.File(io.BytesIO(b"PNG"), "a.png"),
        ]
        await interaction.followup.send("two files", files=files)
        await bot.http.request(discord.http.Route("GET", "/no/such/route"))

    bot = await run_bot(behaviour)
    await fake.wait_for_sync()
    inter = await fake.send_command("html", {"prompt": "x"})
    await fake.wait_until(lambda: bool(bot.errors))
    followup = next(r for r in inter.requests if r.files)
    assert [(p.name, p.filename) for p in followup.parts] == [
        ("payload_json", None),
        ("files[0]", "a.html"),
        ("files[1]", "a.png"),
    ]
    assert followup.files[1].data == b"PNG"
    assert followup.json["content"] == "two files"
    assert [a["filename"] for a in inter.messages[-1]["attachments"]] == ["a.html", "a.png"]
    assert [r.path for r in fake.unhandled_requests] == ["/no/such/route"]
    assert isinstance(bot.errors[0], discord.NotFound)


async def test_dm_interaction_carries_a_user_not_a_member(fake: FakeDiscord, run_bot: Any) -> None:
    seen: list[discord.Interaction] = []

    async def behaviour(bot: MiniBot, interaction: discord.Interaction, *args: Any) -> None:
        seen.append(interaction)
        await interaction.response.send_message("hi", ephemeral=True)

    await run_bot(behaviour, in_guild=False)
    await fake.wait_for_sync()
    assert fake.sync_payloads[-1][0] is None  # a global command: usable in DMs
    inter = await fake.send_command("html", {"prompt": "x"}, in_guild=False)
    await inter.wait_for_callback()
    assert "member" not in inter.payload and "user" in inter.payload
    assert seen and seen[0].guild_id is None and isinstance(seen[0].user, discord.User)


async def test_original_response_get_and_delete(fake: FakeDiscord, run_bot: Any) -> None:
    fetched: list[discord.InteractionMessage] = []

    async def behaviour(bot: MiniBot, interaction: discord.Interaction, *args: Any) -> None:
        await interaction.response.send_message("first")
        fetched.append(await interaction.original_response())
        await interaction.delete_original_response()

    bot = await run_bot(behaviour)
    await fake.wait_for_sync()
    inter = await fake.send_command("html", {"prompt": "x"})
    await inter.wait_for_request("DELETE", timeout=5)
    assert not bot.errors
    assert fetched[0].content == "first" and fetched[0].id == inter.deleted_ids[0]
    assert inter.original is None
    assert [r.method for r in inter.requests] == ["POST", "GET", "DELETE"]


# ---------------------------------------------------------------------- sharding


class ShardedMiniBot(discord.AutoShardedClient):
    """An AutoShardedClient with one global command that answers with its guild id."""

    def __init__(self, *, sync: bool = True, **options: Any) -> None:
        # No intents beyond guilds: like the bot, which needs none for interactions.
        super().__init__(intents=discord.Intents.none(), guild_ready_timeout=0.2, **options)
        self.tree = app_commands.CommandTree(self)
        self.sync = sync
        self.seen: list[int | None] = []  # guild ids of the interactions it received
        self.shards_ready: list[int] = []

        @app_commands.command(name="where", description="Say where it was used")
        async def where(interaction: discord.Interaction) -> None:
            self.seen.append(interaction.guild_id)
            await interaction.response.send_message(f"guild {interaction.guild_id}")

        self.tree.add_command(where)

    async def setup_hook(self) -> None:
        if self.sync:
            await self.tree.sync()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        # discord.py waits 5 s between two shards' IDENTIFYs (Discord's identify rate limit,
        # which the fake doesn't enforce); the tests need not wait.
        return None

    async def on_shard_ready(self, shard_id: int) -> None:
        self.shards_ready.append(shard_id)


@pytest.fixture
async def sharded_fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord(shards=2, guilds=2)
    await server.start()
    monkeypatch.setattr(discord.http.Route, "BASE", server.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(server.gateway_url))
    yield server
    await server.stop()


@pytest.fixture
async def start_sharded(
    sharded_fake: FakeDiscord,
) -> AsyncIterator[Callable[..., Awaitable[ShardedMiniBot]]]:
    started: list[tuple[ShardedMiniBot, asyncio.Task[None]]] = []

    async def start(**options: Any) -> ShardedMiniBot:
        bot = ShardedMiniBot(**options)
        task = asyncio.create_task(bot.start(sharded_fake.bot_token))
        started.append((bot, task))
        ready = asyncio.create_task(bot.wait_until_ready())
        await asyncio.wait([ready, task], timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()  # raises the client's error
        assert ready.done(), "the client never became ready"
        return bot

    yield start
    for bot, task in started:
        await bot.close()
        await asyncio.wait_for(task, 10)


def receiving_shards(caplog: pytest.LogCaptureFixture, interaction_id: int) -> list[int]:
    """The shard ids whose websocket received INTERACTION_CREATE ``interaction_id``, from
    discord.py's own gateway log records (``For Shard ID %s: WebSocket Event: %s``)."""
    shards = []
    for record in caplog.records:
        args = record.args
        if record.name == "discord.gateway" and isinstance(args, tuple) and len(args) == 2:
            shard_id, msg = args
            if not (isinstance(shard_id, int) and isinstance(msg, dict)):
                continue
            if msg.get("t") == "INTERACTION_CREATE" and msg["d"]["id"] == str(interaction_id):
                shards.append(shard_id)
    return shards


@pytest.mark.parametrize("shard_count", [2, None], ids=["shard_count=2", "recommended"])
async def test_auto_sharded_client_gets_each_shard_ready_with_its_guilds(
    sharded_fake: FakeDiscord,
    start_sharded: Any,
    caplog: pytest.LogCaptureFixture,
    shard_count: int | None,
) -> None:
    caplog.set_level(logging.DEBUG, logger="discord.gateway")
    fake = sharded_fake
    options = {"shard_count": 2, "shard_ids": [0, 1]} if shard_count else {}
    bot = await start_sharded(**options)
    sessions = await fake.wait_for_shards(timeout=10)
    await fake.wait_for_sync()

    # Without a shard_count, discord.py takes the fake's recommendation.
    asked = fake.find_requests("GET", r"^/gateway/bot$")
    assert bool(asked) == (shard_count is None)
    assert bot.shard_count == 2 and sorted(bot.shards) == [0, 1]
    assert sorted(bot.shards_ready) == [0, 1]
    assert sorted(s.shard for s in fake.sessions if s.shard) == [(0, 2), (1, 2)]
    first, second = fake.guild_on_shard(0), fake.guild_on_shard(1)
    assert [first, second] == fake.guilds  # the guilds are spread over the shards
    for shard_id, guild in ((0, first), (1, second)):
        [ready] = [e["d"] for e in sessions[shard_id].history if e["t"] == "READY"]
        assert ready["shard"] == [shard_id, 2]
        assert [g["id"] for g in ready["guilds"]] == [str(guild.id)]
        creates = [e["d"]["id"] for e in sessions[shard_id].history if e["t"] == "GUILD_CREATE"]
        assert creates == [str(guild.id)]
        cached = bot.get_guild(guild.id)
        assert cached is not None and cached.shard_id == shard_id

    for shard_id, guild in ((0, first), (1, second)):
        user = fake.user("ann", guild=guild)
        inter = await fake.send_command("where", guild=guild, user=user)
        await inter.wait_for_callback()
        assert inter.shard_id == shard_id
        assert receiving_shards(caplog, inter.id) == [shard_id]
        assert inter.original_content == f"guild {guild.id}"
        assert inter.payload["member"]["user"]["id"] == str(user.id)
    dm = await fake.send_command("where", in_guild=False, user=fake.user("ann"))
    await dm.wait_for_callback()
    assert dm.shard_id == 0 and receiving_shards(caplog, dm.id) == [0]
    assert bot.seen == [first.id, second.id, None]


async def test_two_clients_with_one_shard_each_get_only_their_guilds(
    sharded_fake: FakeDiscord, start_sharded: Any
) -> None:
    fake = sharded_fake
    zero = await start_sharded(shard_count=2, shard_ids=[0])
    one = await start_sharded(shard_count=2, shard_ids=[1], sync=False)
    await fake.wait_for_shards(timeout=10)
    await fake.wait_for_sync()
    first, second = fake.guild_on_shard(0), fake.guild_on_shard(1)
    assert [g.id for g in zero.guilds] == [first.id]
    assert [g.id for g in one.guilds] == [second.id]

    for guild, expected in ((second, 1), (first, 0), (second, 1)):
        inter = await fake.send_command("where", guild=guild)
        await inter.wait_for_callback()
        assert inter.shard_id == expected
    # Each process sees only the interactions of the guilds its shard owns.
    assert zero.seen == [first.id]
    assert one.seen == [second.id, second.id]


async def test_a_resumed_shard_keeps_its_guilds(
    sharded_fake: FakeDiscord, start_sharded: Any
) -> None:
    fake = sharded_fake
    bot = await start_sharded(shard_count=2)
    await fake.wait_for_shards(timeout=10)
    await fake.wait_for_sync()
    old = fake.sessions[:]
    await fake.reconnect_gateway(shard=1)
    await fake.wait_until(lambda: any(s.live and s not in old and s.shard for s in fake.sessions))
    resumed = next(s for s in fake.sessions if s not in old)
    assert resumed.shard == (1, 2) and any(m.get("op") == 6 for m in fake.gateway_received)
    inter = await fake.send_command("where", guild=fake.guild_on_shard(1))
    await inter.wait_for_callback()
    assert inter.shard_id == 1 and bot.seen == [fake.guild_on_shard(1).id]


async def test_identify_with_an_invalid_shard_is_closed_4010(sharded_fake: FakeDiscord) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(sharded_fake.gateway_url + "?v=10&encoding=json") as ws,
    ):
        hello = await ws.receive_json(timeout=5)
        assert hello["op"] == 10
        identify = {"token": sharded_fake.bot_token, "intents": 0, "shard": [2, 2]}
        await ws.send_json({"op": 2, "d": identify})
        message = await ws.receive(timeout=5)
    assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 4010


async def test_an_unsharded_client_gets_every_guild(fake: FakeDiscord, run_bot: Any) -> None:
    second = fake.add_guild("Second")
    bot = await run_bot(in_guild=False)  # a global command: usable in both guilds
    await fake.wait_for_sync()
    [ready] = [e["d"] for e in fake.sessions[-1].history if e["t"] == "READY"]
    assert [g["id"] for g in ready["guilds"]] == [str(fake.guild.id), str(second.id)]
    assert "shard" not in ready
    inter = await fake.send_command("html", {"prompt": "x"}, guild=second)
    await inter.wait_for_file(timeout=10)
    assert inter.shard_id is None and inter.guild_id == second.id
    assert inter.payload["channel_id"] == str(second.channels[0].id)
    assert sorted(g.id for g in bot.guilds) == sorted([fake.guild.id, second.id])


# ---------------------------------------------------------------------- components, modals,
# command groups, threads


class RefineModal(discord.ui.Modal, title="Refine the page"):
    """A modal like the bot's Refine: one paragraph input in an action row, one in a label."""

    instruction: discord.ui.TextInput[RefineModal] = discord.ui.TextInput(
        label="What should change?",
        style=discord.TextStyle.paragraph,
        custom_id="instruction",
        max_length=200,
    )

    def __init__(self, bot: ComponentsBot, answer: str) -> None:
        super().__init__(custom_id="t:refine-modal")
        self.bot = bot
        self.answer = answer  # "update": edit the page's message; else defer + follow-up
        self.note: discord.ui.TextInput[RefineModal] = discord.ui.TextInput(
            custom_id="note", required=False, default="none"
        )
        self.add_item(discord.ui.Label(text="A note", component=self.note))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        self.bot.submitted.append((interaction, self.instruction.value, self.note.value))
        if self.answer == "silent":
            return  # the test answers it itself
        if self.answer == "update":
            await interaction.response.edit_message(content=f"v2: {self.instruction.value}")
        elif self.answer == "defer-edit":
            await interaction.response.defer()  # DEFERRED_UPDATE: the page's message
            await interaction.edit_original_response(content=f"v3: {self.instruction.value}")
        else:
            await interaction.response.defer(thinking=True)
            await interaction.followup.send(f"refined: {self.instruction.value}")

    async def on_error(self, interaction: discord.Interaction, error: Exception, /) -> None:  # type: ignore[override]
        self.bot.errors.append(error)


class PageView(discord.ui.View):
    """What the bot will put under a page: Refine, Regenerate and a style select."""

    def __init__(self, bot: ComponentsBot, modal_answer: str = "update") -> None:
        super().__init__(timeout=None)
        self.bot = bot
        self.modal_answer = modal_answer

    @discord.ui.button(label="Refine", custom_id="t:refine")
    async def refine(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.send_modal(RefineModal(self.bot, self.modal_answer))

    @discord.ui.button(label="Regenerate", custom_id="t:regen")
    async def regen(
        self, interaction: discord.Interaction, button: discord.ui.Button[PageView]
    ) -> None:
        await interaction.response.send_message("regenerating", ephemeral=True)

    @discord.ui.select(
        custom_id="t:style",
        placeholder="Style",
        options=[discord.SelectOption(label=s, value=s) for s in ("plain", "dark", "retro")],
    )
    async def style(
        self, interaction: discord.Interaction, select: discord.ui.Select[PageView]
    ) -> None:
        self.bot.styles.append(list(select.values))
        for option in select.options:
            option.default = option.value in select.values
        await interaction.response.edit_message(content=f"style {select.values[0]}", view=self)


class ComponentsBot(discord.Client):
    """``/page`` (a message with a PageView), ``/ask`` (a modal straight from a command),
    ``/thread`` (a message and a thread under it) and ``/settings`` as a group."""

    def __init__(self, guild_id: int) -> None:
        super().__init__(intents=discord.Intents.default())
        self.tree = app_commands.CommandTree(self)
        self.guild_obj = discord.Object(guild_id)
        self.errors: list[BaseException] = []
        self.styles: list[list[str]] = []
        self.submitted: list[tuple[discord.Interaction, str, str]] = []
        self.settings_calls: list[tuple[str, dict[str, Any]]] = []
        self.threads: list[discord.Thread] = []

        @app_commands.command(name="page", description="Send a page with buttons")
        async def page(interaction: discord.Interaction, answer: str = "update") -> None:
            await interaction.response.send_message("v1", view=PageView(self, answer))

        @app_commands.command(name="ask", description="Open the refine modal")
        async def ask(interaction: discord.Interaction, answer: str = "defer") -> None:
            await interaction.response.send_modal(RefineModal(self, answer))

        @app_commands.command(name="silent", description="Never answers")
        async def silent(interaction: discord.Interaction) -> None:
            return None

        @app_commands.command(name="thread", description="A message with a thread")
        async def thread(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("v1")
            message = await interaction.original_response()
            try:
                made = await message.create_thread(name="page versions")
                self.threads.append(made)
                await made.send("v2")
                await message.create_thread(name="again")
            except discord.HTTPException as exc:
                self.errors.append(exc)

        self.tree.add_command(page, guild=self.guild_obj)
        self.tree.add_command(ask, guild=self.guild_obj)
        self.tree.add_command(thread, guild=self.guild_obj)
        self.tree.add_command(silent, guild=self.guild_obj)
        self.tree.add_command(self._settings_group(), guild=self.guild_obj)

    def _settings_group(self) -> app_commands.Group:
        settings = app_commands.Group(
            name="settings",
            description="Server settings",
            default_permissions=discord.Permissions(manage_guild=True),
        )
        channels = app_commands.Group(name="channels", description="Allowed channels")
        settings.add_command(channels)
        calls = self.settings_calls

        @settings.command(name="show", description="Show the settings")
        async def show(interaction: discord.Interaction) -> None:
            calls.append(("show", {}))
            await interaction.response.send_message("settings", ephemeral=True)

        @settings.command(name="set", description="Change a setting")
        @app_commands.choices(
            setting=[app_commands.Choice(name=s, value=s) for s in ("cooldown", "style")]
        )
        async def set_(interaction: discord.Interaction, setting: str, value: str) -> None:
            calls.append(("set", {"setting": setting, "value": value}))
            await interaction.response.send_message(f"{setting}={value}", ephemeral=True)

        @settings.command(name="role", description="A limit for a role")
        async def role(
            interaction: discord.Interaction,
            role: discord.Role,
            limit: str,
            value: app_commands.Range[int, 0, 100],
        ) -> None:
            calls.append(("role", {"role": role, "limit": limit, "value": value}))
            await interaction.response.send_message(f"{role.name}: {limit}={value}")

        @settings.command(name="exempt", description="Exempt a member")
        async def exempt(interaction: discord.Interaction, member: discord.Member) -> None:
            calls.append(("exempt", {"member": member}))
            await interaction.response.send_message(f"exempt {member.name}")

        @settings.command(name="reset", description="Reset settings")
        async def reset(interaction: discord.Interaction, what: str | None = None) -> None:
            calls.append(("reset", {"what": what}))
            await interaction.response.send_message(f"reset {what or 'all'}")

        @channels.command(name="add", description="Allow a channel")
        async def add(interaction: discord.Interaction, channel: discord.TextChannel) -> None:
            calls.append(("channels add", {"channel": channel}))
            await interaction.response.send_message(f"allowed #{channel.name}")

        return settings

    async def setup_hook(self) -> None:
        await self.tree.sync(guild=self.guild_obj)


@pytest.fixture
async def components_bot(fake: FakeDiscord) -> AsyncIterator[ComponentsBot]:
    bot = ComponentsBot(fake.guild.id)
    task = asyncio.create_task(bot.start(fake.bot_token))
    ready = asyncio.create_task(fake.wait_until_ready())
    await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
    await ready
    await fake.wait_for_sync()
    yield bot
    await bot.close()
    await asyncio.wait_for(task, 10)


def sent_options(inter: Any) -> Any:
    return inter.payload["data"].get("options")


async def test_group_commands_are_registered_nested(
    fake: FakeDiscord, components_bot: ComponentsBot
) -> None:
    [settings] = [c for c in fake.commands[fake.guild.id] if c["name"] == "settings"]
    subs = {o["name"]: o for o in settings["options"]}
    assert subs["channels"]["type"] == 2 and subs["show"]["type"] == 1
    assert [o["type"] for o in subs["channels"]["options"]] == [1]
    role_opts = {o["name"]: o["type"] for o in subs["role"]["options"]}
    assert role_opts == {"role": 8, "limit": 3, "value": 4}
    assert settings["default_member_permissions"] == str(PERM_MANAGE_GUILD)


async def test_subcommands_send_nested_options_as_discord_does(
    fake: FakeDiscord, components_bot: ComponentsBot
) -> None:
    bot = components_bot
    admin = fake.user("root", roles=[fake.admin_role])
    a = await fake.send_command("settings set", {"setting": "cooldown", "value": "30s"}, user=admin)
    await a.wait_for_callback()
    b = await fake.send_command("settings", {"set": {"setting": "style", "value": "dark"}})
    await b.wait_for_callback()
    show = await fake.send_command("settings show")
    await show.wait_for_callback()
    reset = await fake.send_command("settings reset", {"what": "limits"})
    await reset.wait_for_callback()

    assert sent_options(a) == [
        {
            "name": "set",
            "type": 1,
            "options": [
                {"name": "setting", "type": 3, "value": "cooldown"},
                {"name": "value", "type": 3, "value": "30s"},
            ],
        }
    ]
    assert sent_options(b)[0]["options"][0]["value"] == "style"
    assert sent_options(show) == [{"name": "show", "type": 1, "options": []}]
    assert [c for c, _ in bot.settings_calls] == ["set", "set", "show", "reset"]
    assert bot.settings_calls[0][1] == {"setting": "cooldown", "value": "30s"}
    assert bot.settings_calls[1][1] == {"setting": "style", "value": "dark"}
    assert bot.settings_calls[3][1] == {"what": "limits"}
    assert a.original_content == "cooldown=30s" and not bot.errors


async def test_role_user_and_channel_options_resolve_to_objects(
    fake: FakeDiscord, components_bot: ComponentsBot
) -> None:
    bot = components_bot
    mod = fake.user("mia", roles=[fake.mod_role])
    role = await fake.send_command(
        "settings role", {"role": fake.mod_role, "limit": "jobs", "value": 3}
    )
    await role.wait_for_callback()
    member = await fake.send_command("settings exempt", {"member": mod})
    await member.wait_for_callback()
    bots = fake.guild.channels[1]
    channel = await fake.send_command("settings channels add", {"channel": bots})
    await channel.wait_for_callback()

    data = role.payload["data"]
    assert data["options"][0]["options"][0] == {
        "name": "role",
        "type": 8,
        "value": str(fake.mod_role.id),
    }
    assert data["resolved"]["roles"][str(fake.mod_role.id)]["name"] == "Moderator"
    resolved_member = member.payload["data"]["resolved"]["members"][str(mod.id)]
    assert "user" not in resolved_member and resolved_member["roles"] == [str(fake.mod_role.id)]
    assert sent_options(channel) == [
        {
            "name": "channels",
            "type": 2,
            "options": [
                {
                    "name": "add",
                    "type": 1,
                    "options": [{"name": "channel", "type": 7, "value": str(bots.id)}],
                }
            ],
        }
    ]
    got_role = bot.settings_calls[0][1]["role"]
    assert isinstance(got_role, discord.Role) and got_role.id == fake.mod_role.id
    assert bot.settings_calls[0][1]["value"] == 3
    got_member = bot.settings_calls[1][1]["member"]
    assert isinstance(got_member, discord.Member) and got_member.name == "mia"
    assert [r.id for r in got_member.roles if not r.is_default()] == [fake.mod_role.id]
    got_channel = bot.settings_calls[2][1]["channel"]
    assert isinstance(got_channel, discord.TextChannel) and got_channel.id == bots.id
    assert role.original_content == "Moderator: jobs=3" and not bot.errors


async def test_commands_a_discord_client_would_not_send_are_refused(
    fake: FakeDiscord, components_bot: ComponentsBot
) -> None:
    sent = len(fake.interactions)
    with pytest.raises(ValueError, match="required"):
        await fake.send_command("settings set", {"setting": "cooldown"})
    with pytest.raises(ValueError, match="choices"):
        await fake.send_command(
            "settings set", {"setting": "colour", "value": "x"}, client_checks=True
        )
    with pytest.raises(LookupError, match="subcommand"):
        await fake.send_command("settings nope")
    with pytest.raises(ValueError, match="pick one subcommand"):
        await fake.send_command("settings")
    with pytest.raises(ValueError, match="out of range|max_value"):
        await fake.send_command(
            "settings role",
            {"role": fake.mod_role, "limit": "j", "value": 101},
            client_checks=True,
        )
    with pytest.raises(ValueError, match="cannot take 3"):
        await fake.send_command(
            "settings set", {"setting": "style", "value": 3}, client_checks=True
        )
    with pytest.raises(ValueError, match="cannot take a user"):
        await fake.send_command(
            "settings role", {"role": fake.user("ann"), "limit": "j", "value": 1}
        )
    with pytest.raises(LookupError, match="no option"):
        await fake.send_command("settings show", {"extra": 1})
    assert len(fake.interactions) == sent
    # Without client_checks, what only a modified client sends still goes out (a bot
    # must check its options itself).
    odd = await fake.send_command("settings set", {"setting": "colour", "value": "x"})
    await odd.wait_for_callback()
    assert components_bot.settings_calls[-1] == ("set", {"setting": "colour", "value": "x"})


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ([{"type": 1, "name": "a", "description": "d"},
          {"type": 3, "name": "b", "description": "d"}], "mixed"),
        ([{"type": 2, "name": "g", "description": "d",
           "options": [{"type": 3, "name": "s", "description": "d"}]}], "only subcommands"),
        ([{"type": 1, "name": "s", "description": "d",
           "options": [{"type": 1, "name": "t", "description": "d"}]}], "cannot hold"),
        ([{"type": 1, "name": "s", "description": "", "options": []}], "description"),
        ([{"type": 5, "name": "b", "description": "d",
           "choices": [{"name": "x", "value": True}]}], "take choices"),
        ([{"type": 4, "name": "n", "description": "d",
           "choices": [{"name": "x", "value": "1"}]}], "does not fit"),
        ([{"type": 12, "name": "n", "description": "d"}], "unknown option type"),
    ],
)  # fmt: skip
async def test_invalid_command_shapes_are_refused_like_the_api(
    fake: FakeDiscord, options: list[dict[str, Any]], error: str
) -> None:
    client = discord.Client(intents=discord.Intents.none())
    await client.login(fake.bot_token)
    try:
        command = {"name": "bad", "description": "a command", "type": 1, "options": options}
        with pytest.raises(discord.HTTPException) as info:
            await client.http.bulk_upsert_guild_commands(
                fake.application_id, fake.guild.id, [command]
            )
    finally:
        await client.close()
    assert info.value.status == 400 and info.value.code == 50035
    assert error in info.value.text
    assert fake.guild.id not in fake.commands


async def page_message(fake: FakeDiscord, answer: str = "update") -> Any:
    inter = await fake.send_command("page", {"answer": answer}, user=fake.user("ann"))
    await inter.wait_for_callback()
    return inter


async def test_choose_in_a_string_select(fake: FakeDiscord, components_bot: ComponentsBot) -> None:
    page = await page_message(fake)
    ann = fake.user("ann")
    assert page.custom_ids() == ["t:refine", "t:regen", "t:style"]
    pick = await fake.choose(page, "t:style", ["retro"], user=ann)
    await pick.wait_for_callback()

    assert pick.payload["data"] == {
        "custom_id": "t:style",
        "component_type": 3,
        "values": ["retro"],
    }
    assert pick.payload["message"]["id"] == str(page.original_message_id)
    assert components_bot.styles == [["retro"]]
    # UPDATE_MESSAGE edited the page's own message, default option included.
    assert page.original_content == "style retro"
    select = page.component("t:style")
    assert select is not None
    assert [o["value"] for o in select["options"] if o.get("default")] == ["retro"]
    # By message dict and by id too; what the client would not allow is refused.
    again = await fake.choose(page.original, "t:style", ["dark"], user=ann)
    await again.wait_for_callback()
    assert components_bot.styles[-1] == ["dark"]
    with pytest.raises(ValueError, match="offers"):
        await fake.choose(page.original_message_id, "t:style", ["neon"], user=ann)
    with pytest.raises(ValueError, match="1-1 values"):
        await fake.choose(page, "t:style", ["dark", "retro"], user=ann)
    with pytest.raises(ValueError, match="not a select"):
        await fake.choose(page, "t:regen", ["x"], user=ann)
    with pytest.raises(LookupError, match="not a button"):
        await fake.press_button("t:style", user=ann, message=page)


async def test_refine_modal_submitted_updates_the_page_message(
    fake: FakeDiscord, components_bot: ComponentsBot
) -> None:
    bot = components_bot
    page = await page_message(fake, "update")
    ann = fake.user("ann")
    press = await fake.press_button("t:refine", user=ann, message=page)
    await press.wait_for_callback()

    assert press.callback_type == CB_MODAL
    modal = press.modal
    assert modal is not None
    assert modal["custom_id"] == "t:refine-modal" and modal["title"] == "Refine the page"
    row, label = modal["components"]
    assert row["type"] == 1 and row["components"][0]["custom_id"] == "instruction"
    assert row["components"][0]["style"] == 2
    assert label["type"] == 18 and label["component"]["custom_id"] == "note"

    submit = await fake.submit_modal(press, {"instruction": "make the header blue"})
    await submit.wait_for_callback()
    assert submit.type == 5
    data = submit.payload["data"]
    assert data["custom_id"] == "t:refine-modal"
    assert data["components"] == [
        {
            "type": 1,
            "id": row["id"],
            "components": [
                {
                    "type": 4,
                    "id": row["components"][0]["id"],
                    "custom_id": "instruction",
                    "value": "make the header blue",
                }
            ],
        },
        {
            "type": 18,
            "id": label["id"],
            "component": {
                "type": 4,
                "id": label["component"]["id"],
                "custom_id": "note",
                "value": "none",
            },
        },
    ]
    assert submit.payload["message"]["id"] == str(page.original_message_id)
    assert [(s[1], s[2]) for s in bot.submitted] == [("make the header blue", "none")]
    # The modal came from the page's button: UPDATE_MESSAGE edits the page's message.
    assert submit.callback_type == CB_UPDATE_MESSAGE
    assert page.original_content == "v2: make the header blue"
    assert press.modal_submit is submit
    with pytest.raises(ValueError, match="already submitted"):
        await fake.submit_modal(press, {"instruction": "again"})
    assert not bot.errors


async def test_modal_from_a_command_defers_and_follows_up(
    fake: FakeDiscord, components_bot: ComponentsBot
) -> None:
    bot = components_bot
    ann, bob = fake.user("ann"), fake.user("bob")
    ask = await fake.send_command("ask", {"answer": "defer"}, user=ann)
    await ask.wait_for_callback()
    assert ask.modal is not None and ask.original is None
    with pytest.raises(ValueError, match="opened"):
        await fake.submit_modal(ask, {"instruction": "x"}, user=bob)
    with pytest.raises(ValueError, match="required"):
        await fake.submit_modal(ask, {"note": "only a note"})
    with pytest.raises(ValueError, match="1-200|0-200"):
        await fake.submit_modal(ask, {"instruction": "x" * 201})
    with pytest.raises(ValueError, match="no inputs"):
        await fake.submit_modal(ask, {"colour": "x"})

    submit = await fake.submit_modal(ask, {"instruction": "add pricing"}, user=ann)
    await submit.wait_until(lambda i: "refined: add pricing" in i.visible_text)
    assert submit.callback_type == CB_DEFERRED_MESSAGE
    assert "message" not in submit.payload
    assert submit.payload["member"]["user"]["id"] == str(ann.id)
    assert bot.submitted[0][1] == "add pricing" and not bot.errors


async def raw_callback(fake: FakeDiscord, inter: Any, body: dict[str, Any]) -> int:
    """Answer ``inter`` ourselves (the bot left it unanswered); returns the HTTP status."""
    url = f"{fake.api_base}/interactions/{inter.id}/{inter.token}/callback"
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as response:
        return response.status


async def test_modal_callbacks_are_checked_like_discord(
    fake: FakeDiscord, components_bot: ComponentsBot
) -> None:
    ask = await fake.send_command("ask", {"answer": "silent"})
    await ask.wait_for_callback()
    assert ask.modal is not None
    submit = await fake.submit_modal(ask, {"instruction": "x"})
    await fake.wait_until(lambda: bool(components_bot.submitted))
    # A modal submit cannot open another modal, nor update a message it did not come from.
    assert await raw_callback(fake, submit, {"type": 9, "data": ask.modal}) == 400
    assert await raw_callback(fake, submit, {"type": 7, "data": {"content": "x"}}) == 400
    assert await raw_callback(fake, submit, {"type": 4, "data": {"content": "ok"}}) == 204
    assert submit.original_content == "ok"

    silent = await fake.send_command("silent")
    bad_title = {"custom_id": "m", "title": "x" * 46, "components": ask.modal["components"]}
    assert await raw_callback(fake, silent, {"type": 9, "data": bad_title}) == 400
    two_inputs = {
        "custom_id": "m",
        "title": "t",
        "components": [{"type": 1, "components": ask.modal["components"][0]["components"] * 2}],
    }
    assert await raw_callback(fake, silent, {"type": 9, "data": two_inputs}) == 400
    assert silent.modal is None and silent.callback_type is None
    good = {"custom_id": "m", "title": "t", "components": ask.modal["components"][:1]}
    assert await raw_callback(fake, silent, {"type": 9, "data": good}) == 204
    assert silent.modal is not None and silent.modal["custom_id"] == "m"


async def test_invalid_message_components_get_400(
    fake: FakeDiscord, components_bot: ComponentsBot
) -> None:
    silent = await fake.send_command("silent")
    twice = {"type": 2, "style": 1, "label": "A", "custom_id": "same"}
    cases = [
        [{"type": 1, "components": [twice, twice]}],  # duplicate custom_id
        [{"type": 2, "style": 1, "label": "A", "custom_id": "a"}],  # not in an action row
        [{"type": 1, "components": [{"type": 3, "custom_id": "s", "options": []}]}],
    ]
    for components in cases:
        body = {"type": 4, "data": {"content": "x", "components": components}}
        assert await raw_callback(fake, silent, body) == 400
    assert silent.callback_type is None


async def test_threads_from_a_message(fake: FakeDiscord, components_bot: ComponentsBot) -> None:
    bot = components_bot
    inter = await fake.send_command("thread")
    await fake.wait_until(lambda: bool(bot.errors))
    message = inter.original
    assert message is not None
    thread = fake.thread_of(message)
    assert thread is not None and thread.id == int(message["id"])
    assert thread.parent_id == inter.channel_id and thread.name == "page versions"
    assert message["thread"]["id"] == str(thread.id)
    assert [m["content"] for m in fake.thread_messages(thread)] == ["v2"]
    assert bot.threads[0].id == thread.id and bot.threads[0].parent_id == inter.channel_id
    # A message has one thread: the second create_thread is refused.
    [error] = bot.errors
    assert isinstance(error, discord.HTTPException) and error.code == 160004
    created = fake.find_requests("POST", r"^/channels/\d+/messages/\d+/threads$")
    assert [r.status for r in created] == [201, 400]
    await fake.wait_until(lambda: bot.get_channel(thread.id) is not None)


async def test_modal_from_a_button_defers_the_update_then_edits_the_page(
    fake: FakeDiscord, components_bot: ComponentsBot
) -> None:
    page = await page_message(fake, "defer-edit")
    press = await fake.press_button("t:refine", user=fake.user("ann"), message=page)
    await press.wait_for_callback()
    submit = await fake.submit_modal(press, {"instruction": "add a footer"})
    await submit.wait_for_request("PATCH", ORIGINAL_PATH, ok=True)
    assert submit.callback_type == CB_DEFERRED_UPDATE
    assert submit.original_message_id == page.original_message_id
    assert page.original_content == "v3: add a footer"
    assert not components_bot.errors
