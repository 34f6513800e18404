"""Per-server settings: the same tests on the SQLite store and on a real Redis; validation;
role limits; the /settings handlers with stand-in interactions."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import discord
import pytest
from discord import app_commands

from bot.errors import NotAllowed, NotPermitted, QueueUnavailable, ShuttingDown
from bot.guilds.command import SettingsCommand, parse_channels, parse_duration
from bot.guilds.model import GuildDefaults, GuildSettings, InvalidSetting
from bot.guilds.sqlite import guild_db_path
from bot.guilds.store import (
    GuildSettingsStore,
    RedisFields,
    SqliteFields,
    open_guild_settings,
)
from bot.guilds.usage import SqliteUsage
from bot.queue.redis_queue import connect
from bot.settings import Settings
from model.types import PageMode, SafetyPolicy
from tests.redis_server import RedisServer

GUILD = 1000
OTHER_GUILD = 2000
DEFAULTS = GuildDefaults(max_queued=4, safety=SafetyPolicy.STRICT, page_mode=None)

MakeStore = Callable[..., Awaitable[GuildSettingsStore]]


@pytest.fixture(params=["sqlite", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    """Opens stores on one backend's data: a second call sees what the first wrote (as a
    restarted bot would)."""
    opened: list[GuildSettingsStore] = []
    clients: list[Any] = []
    prefix = f"test-{secrets.token_hex(4)}"

    async def make(defaults: GuildDefaults = DEFAULTS) -> GuildSettingsStore:
        if request.param == "sqlite":
            backend: Any = SqliteFields(tmp_path / "guilds.sqlite3")
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            client = connect(server.url)
            clients.append(client)
            backend = RedisFields(client, prefix)
        store = GuildSettingsStore(backend, defaults)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.aclose()
    for client in clients:
        await client.aclose()


async def test_a_server_that_set_nothing_gets_the_env_defaults(make_store: MakeStore) -> None:
    store = await make_store()
    settings = await store.get(GUILD)
    assert settings.guild_id == GUILD
    assert settings.max_queued == 4
    assert settings.safety is SafetyPolicy.STRICT
    assert settings.pages_per_day is None and settings.cooldown_s == 0
    assert settings.allowed_channel_ids == frozenset()
    assert settings.explicit == frozenset() and settings.role_limits == {}


async def test_changes_are_kept_per_server_and_survive_a_restart(make_store: MakeStore) -> None:
    store = await make_store()
    updated = await store.update(
        GUILD,
        allowed_channel_ids=[11, 12],
        default_style="dark",
        page_mode="compose",
        safety="off",
        max_queued=2,
        pages_per_day=5,
        cooldown_s=30,
    )
    assert updated.allowed_channel_ids == {11, 12}
    assert updated.page_mode is PageMode.COMPOSE and updated.safety is SafetyPolicy.OFF
    assert (updated.max_queued, updated.pages_per_day, updated.cooldown_s) == (2, 5, 30)
    assert "cooldown_s" in updated.explicit
    assert (await store.get(OTHER_GUILD)).max_queued == 4  # other servers untouched

    again = await (await make_store()).get(GUILD)
    assert again == updated


async def test_unset_fields_follow_the_env(make_store: MakeStore) -> None:
    store = await make_store()
    await store.update(GUILD, cooldown_s=10)
    # The operator lowers QUEUE_MAX_PER_USER and restarts: the server never set its own.
    restarted = await make_store(GuildDefaults(max_queued=2, safety=SafetyPolicy.STANDARD))
    settings = await restarted.get(GUILD)
    assert (settings.max_queued, settings.safety, settings.cooldown_s) == (
        2,
        SafetyPolicy.STANDARD,
        10,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_queued": 5}, "queued can be at most 4"),
        ({"max_queued": 0}, "queued must be between 1 and 4"),
        ({"max_queued": True}, "queued needs a whole number"),
        ({"pages_per_day": 2.5}, "pages_per_day needs a whole number"),
        ({"pages_per_day": -1}, "between 0 and 10000"),
        ({"cooldown_s": 90_000}, "cooldown must be between 0 and 86400"),
        ({"default_style": "neon"}, "style must be one of modern"),
        ({"safety": "lax"}, "safety must be one of strict, standard, off"),
        ({"page_mode": "poem"}, "page_mode must be one of document, compose"),
        ({"allowed_channel_ids": "general"}, "Expected channels"),
        ({"allowed_channel_ids": list(range(1, 60))}, "At most 50"),
        ({"colour": "red"}, "There is no setting 'colour'"),
    ],
)
async def test_bad_values_are_refused_with_a_reason_and_nothing_is_written(
    make_store: MakeStore, changes: dict[str, Any], message: str
) -> None:
    store = await make_store()
    with pytest.raises(InvalidSetting, match=message):
        # The good change that comes with the bad one is not kept either.
        await store.update(GUILD, **{"cooldown_s": 5, **changes})
    assert await store.get(GUILD) == GuildSettings.defaults(GUILD, DEFAULTS)


async def test_reset_one_field_the_roles_or_everything(make_store: MakeStore) -> None:
    store = await make_store()
    await store.update(GUILD, max_queued=1, cooldown_s=60, default_style="retro")
    await store.update_role(GUILD, 7, pages_per_day=None)
    await store.update_role(GUILD, 8, cooldown_s=0)

    settings = await store.reset(GUILD, "max_queued")
    assert settings.max_queued == 4 and settings.cooldown_s == 60
    assert "max_queued" not in settings.explicit

    settings = await store.reset(GUILD, roles=True)
    assert settings.role_limits == {} and settings.default_style == "retro"

    await store.update_role(GUILD, 7, max_queued=2)
    settings = await store.reset(GUILD)
    assert settings == GuildSettings.defaults(GUILD, DEFAULTS)
    assert settings.explicit == frozenset() and settings.role_limits == {}

    with pytest.raises(InvalidSetting, match="no setting 'colour'"):
        await store.reset(GUILD, "colour")


async def test_role_limits_give_the_most_generous_of_a_members_roles(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    await store.update(GUILD, max_queued=1, pages_per_day=3, cooldown_s=120)
    await store.update_role(GUILD, 7, pages_per_day=10, cooldown_s=30)  # "supporters"
    await store.update_role(GUILD, 8, pages_per_day=None)  # "staff": unlimited pages
    await store.update_role(GUILD, 9, pages_per_day=1, cooldown_s=300)  # "new": stricter
    settings = await store.get(GUILD)
    assert settings.role_limits == {
        7: {"pages_per_day": 10, "cooldown_s": 30},
        8: {"pages_per_day": None},
        9: {"pages_per_day": 1, "cooldown_s": 300},
    }

    plain = settings.limits_for([])
    assert (plain.max_queued, plain.pages_per_day, plain.cooldown_s) == (1, 3, 120)
    assert plain.granted_by == {}

    supporter = settings.limits_for([7, 9])
    assert (supporter.pages_per_day, supporter.cooldown_s) == (10, 30)
    assert supporter.granted_by == {"pages_per_day": 7, "cooldown_s": 7}

    assert settings.limits_for([7, 8]).pages_per_day is None  # unlimited beats any number
    newcomer = settings.limits_for([9, 12345])  # a role with no overrides changes nothing
    assert (newcomer.pages_per_day, newcomer.cooldown_s) == (1, 300)

    settings = await store.clear_role(GUILD, 7, "cooldown_s")
    assert settings.role_limits[7] == {"pages_per_day": 10}
    settings = await store.clear_role(GUILD, 8)
    assert 8 not in settings.role_limits
    with pytest.raises(InvalidSetting, match="queued can be at most 4"):
        await store.update_role(GUILD, 7, max_queued=9)


async def test_a_stored_value_the_bot_no_longer_accepts_falls_back_to_the_default(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = await make_store()
    await store.update(GUILD, max_queued=4, cooldown_s=15)
    await store.update_role(GUILD, 7, max_queued=4)
    await store.backend.write(GUILD, {"default_style": "{not json", "role:x:cooldown_s": "1"}, ())
    lowered = await make_store(GuildDefaults(max_queued=2))
    with caplog.at_level(logging.WARNING, logger="bot.guilds.model"):
        settings = await lowered.get(GUILD)
    assert settings.max_queued == 2 and settings.cooldown_s == 15
    assert settings.role_limits == {}
    assert settings.default_style is None
    assert len([r for r in caplog.records if "ignoring" in r.getMessage()]) == 4


async def test_redis_down_is_queue_unavailable() -> None:
    client = connect("redis://127.0.0.1:9/0", timeout_s=0.2)
    store = GuildSettingsStore(RedisFields(client, "down"), DEFAULTS)
    with pytest.raises(QueueUnavailable):
        await store.get(GUILD)
    with pytest.raises(QueueUnavailable):
        await store.update(GUILD, cooldown_s=1)
    await client.aclose()


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(
        discord_token="x",  # type: ignore[arg-type]
        results_dir=tmp_path,
        queue_max_per_user=6,
        safety=SafetyPolicy.STANDARD,
        _env_file=None,  # type: ignore[call-arg]
        **values,
    )


async def test_the_store_follows_the_queue_backend(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    local = _settings(tmp_path, state_db=tmp_path / "db" / "state.sqlite3")
    assert guild_db_path(local) == tmp_path / "db" / "state-guilds.sqlite3"
    store = open_guild_settings(local)
    assert isinstance(store.backend, SqliteFields)
    assert (await store.update(GUILD, max_queued=6)).max_queued == 6
    await store.aclose()
    assert guild_db_path(local).exists()

    shared = _settings(tmp_path, queue_backend="redis", redis_url=redis_server.url)
    client = connect(redis_server.url)
    store = open_guild_settings(shared, client)
    assert isinstance(store.backend, RedisFields) and store.backend.client is client
    assert store.backend.key(GUILD) == f"htmlbot:guild:{GUILD}:settings"
    assert (await store.get(GUILD)).max_queued == 6
    await client.aclose()


def _names(folder: Path, pattern: str) -> list[str]:
    return [path.name for path in folder.glob(pattern)]


async def test_a_corrupt_file_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "guilds.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    store = GuildSettingsStore(SqliteFields(path), DEFAULTS)
    assert (await store.update(GUILD, cooldown_s=3)).cooldown_s == 3
    await store.aclose()
    assert _names(tmp_path, "guilds.sqlite3.corrupt-*")
    assert "not a usable database" in caplog.text
    # Settings and usage share the file.
    usage = SqliteUsage(path)
    assert (await usage.record(GUILD, 5)).pages_today == 1
    await usage.aclose()


async def test_sqlite_stores_close_after_the_statement_in_flight(tmp_path: Path) -> None:
    """A request counted while the shutdown closes the store (its defer was in flight)
    finishes, and one after it raises ShuttingDown instead of reopening the file (which
    would leave a connection thread keeping the process alive)."""
    path = tmp_path / "guilds.sqlite3"
    usage = SqliteUsage(path)
    fields = SqliteFields(path)
    await usage.record(GUILD, 5)  # both open their connection
    await fields.write(GUILD, {"style": "minimal"}, [])
    counted = asyncio.create_task(usage.record(GUILD, 5))
    loaded = asyncio.create_task(fields.load(GUILD))
    await asyncio.sleep(0)  # both statements are under way
    await asyncio.gather(usage.aclose(), fields.aclose())
    assert (await counted).pages_today == 2
    assert await loaded == {"style": "minimal"}
    with pytest.raises(ShuttingDown):
        await usage.record(GUILD, 5)
    with pytest.raises(ShuttingDown):
        await usage.get(GUILD, 5)
    with pytest.raises(ShuttingDown):
        await fields.load(GUILD)
    assert usage._conn is None and fields._conn is None


# -- /settings ------------------------------------------------------------------------------


class _Response:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bool]] = []

    async def send_message(self, content: str, *, ephemeral: bool = False) -> None:
        self.sent.append((content, ephemeral))


def _interaction(
    *, admin: bool = False, roles: tuple[int, ...] = (), guild_id: int | None = GUILD
) -> Any:
    """What the handlers read from an interaction: guild, channel, member, permissions."""
    return SimpleNamespace(
        guild_id=guild_id,
        channel_id=55,
        user=SimpleNamespace(id=42, _roles=list(roles)),
        permissions=discord.Permissions(manage_guild=admin),
        response=_Response(),
    )


@pytest.fixture
async def command(make_store: MakeStore) -> SettingsCommand:
    return SettingsCommand(await make_store())


async def test_members_are_refused_changes_with_a_clear_message(
    command: SettingsCommand,
) -> None:
    member = _interaction()
    for call in (
        command.set_value(member, "cooldown", "10s"),
        command.set_role(member, 7, "pages_per_day", "5"),
        command.reset(member),
    ):
        with pytest.raises(NotPermitted, match="Manage Server"):
            await call
    assert (await command.store.get(GUILD)).explicit == frozenset()
    with pytest.raises(NotAllowed, match="only in a server"):
        await command.show(_interaction(guild_id=None))
    administrator = _interaction()
    administrator.permissions = discord.Permissions(administrator=True)
    assert "10 s" in await command.set_value(administrator, "cooldown", "10")


async def test_admins_set_values_as_typed(command: SettingsCommand) -> None:
    admin = _interaction(admin=True)
    assert await command.set_value(admin, "queued", "2") == "**queued** is now 2."
    assert "1 h 30 min" in await command.set_value(admin, "cooldown", "1h 30m")
    assert "unlimited" in await command.set_value(admin, "pages_per_day", "unlimited")
    reply = await command.set_value(admin, "channels", "<#11>, 12")
    assert "<#11>, <#12>" in reply
    assert "`dark`" in await command.set_value(admin, "style", "Dark")
    settings = await command.store.get(GUILD)
    assert settings.max_queued == 2 and settings.cooldown_s == 5400
    assert settings.allowed_channel_ids == {11, 12} and settings.default_style == "dark"

    assert "all channels" in await command.set_value(admin, "channels", "all")
    assert "**queued** is now 4" in await command.set_value(admin, "queued", "default")
    assert "queued" not in (await command.store.get(GUILD)).explicit

    for label, value, message in [
        ("cooldown", "5x", "needs a duration"),
        ("queued", "many", "needs a whole number"),
        ("queued", "9", "at most 4"),
        ("colour", "red", "no setting 'colour'"),
        ("channels", "#general", "Expected channels"),
    ]:
        with pytest.raises(InvalidSetting, match=message):
            await command.set_value(admin, label, value)


async def test_role_limits_through_the_command(command: SettingsCommand) -> None:
    admin = _interaction(admin=True)
    await command.set_value(admin, "pages_per_day", "3")
    reply = await command.set_role(admin, 7, "pages_per_day", "20")
    assert reply == "For <@&7>, **pages_per_day** is now 20 a day."
    with pytest.raises(InvalidSetting, match="no setting 'style'"):
        await command.set_role(admin, 7, "style", "dark")

    member = _interaction(roles=(7,))
    shown = await command.show(member)
    assert "pages_per_day: 20 a day (from <@&7>)" in shown
    assert "This server's settings" not in shown  # members see only their own limits
    assert "pages_per_day: 3 a day\n" in await command.show(_interaction()) + "\n"

    reply = await command.set_role(admin, 7, "pages_per_day", "default")
    assert "no longer overrides" in reply
    assert 7 not in (await command.store.get(GUILD)).role_limits


async def test_everyone_role_is_the_servers_id(command: SettingsCommand) -> None:
    admin = _interaction(admin=True)
    await command.set_role(admin, GUILD, "cooldown", "0")  # @everyone
    await command.set_value(admin, "cooldown", "1m")
    assert f"cooldown: none (from <@&{GUILD}>)" in await command.show(_interaction())


async def test_admins_see_every_setting_and_reset(command: SettingsCommand, tmp_path: Path) -> None:
    admin = _interaction(admin=True)
    await command.set_value(admin, "safety", "standard")
    await command.set_role(admin, 7, "queued", "1")
    # 2024-05-01 20:48 UTC: the day ends in 3 h 12 min.
    command.clock = lambda: 1714596480.0
    command.usage = SqliteUsage(tmp_path / "usage.sqlite3", clock=command.clock)
    await command.set_value(admin, "pages_per_day", "5")
    await command.usage.record(GUILD, 42)
    shown = await command.show(admin)
    assert "· safety: `standard`\n" in shown  # set: no "default" marker
    assert "· style: the bot's default · default" in shown
    assert "· <@&7>: queued 1" in shown
    assert "today: 1 of 5 pages (the count starts again in 3 h 12 min)" in shown

    assert "pages_per_day" in await command.reset(admin, "pages_per_day")
    assert "role" in await command.reset(admin, "roles")
    assert (await command.store.get(GUILD)).role_limits == {}
    assert "All of this server's settings" in await command.reset(admin)
    assert (await command.store.get(GUILD)).explicit == frozenset()
    await command.usage.aclose()


async def test_register_adds_the_group_whose_callbacks_reply_privately(
    command: SettingsCommand,
) -> None:
    client = discord.Client(intents=discord.Intents.none())
    tree: app_commands.CommandTree[Any] = app_commands.CommandTree(client)
    group = command.register(tree)
    assert tree.get_command("settings") is group
    assert sorted(c.name for c in group.commands) == ["reset", "role", "set", "show"]
    set_command = group.get_command("set")
    assert isinstance(set_command, app_commands.Command)
    assert [choice.value for choice in set_command.parameters[0].choices][:2] == [
        "channels",
        "style",
    ]

    admin = _interaction(admin=True)
    await set_command.callback(admin, setting="queued", value="3")  # type: ignore[call-arg]
    assert admin.response.sent == [("**queued** is now 3.", True)]
    role_command = group.get_command("role")
    assert isinstance(role_command, app_commands.Command)
    await role_command.callback(  # type: ignore[call-arg]
        admin, role=SimpleNamespace(id=7), limit="cooldown", value="45s"
    )
    assert admin.response.sent[-1] == ("For <@&7>, **cooldown** is now 45 s.", True)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("30s", 30), ("5m", 300), ("5 min", 300), ("1h 30m", 5400), ("2 hours", 7200)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration("cooldown", text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5x", "m5", "1h and 5m", "-5"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InvalidSetting, match="needs a duration"):
        parse_duration("cooldown", text)


def test_channels_from_mentions_and_ids() -> None:
    assert parse_channels("<#1> <#2>,3") == {1, 2, 3}
    assert parse_channels("all") == frozenset()
    with pytest.raises(InvalidSetting):
        parse_channels("<#x>")
