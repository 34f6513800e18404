"""The limit policy (channels, jobs waiting, pages a day, cooldown) and the usage counters
on SQLite and on a real Redis, including the reset at the end of the UTC day."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bot.errors import NotAllowed, QueueUnavailable, UserLimitReached
from bot.guilds.gate import GuildGate, open_gate
from bot.guilds.model import GuildDefaults, GuildSettings
from bot.guilds.store import GuildSettingsStore, SqliteFields
from bot.guilds.usage import RedisUsage, SqliteUsage, Usage, UsageStore, day_end, utc_day
from bot.limits import CoolingDown, DailyLimitReached, check_request
from bot.queue.redis_queue import connect
from bot.settings import Settings
from tests.redis_server import RedisServer

GUILD = 1000
USER = 42
# 2024-05-01 20:48:00 UTC: 3 h 12 min before the day ends.
EVENING = datetime(2024, 5, 1, 20, 48, tzinfo=UTC).timestamp()


def _settings(**values: Any) -> GuildSettings:
    return GuildSettings(guild_id=GUILD, **values)


def _check(settings: GuildSettings, **values: Any) -> Any:
    arguments: dict[str, Any] = {
        "role_ids": (),
        "channel_id": 5,
        "queued": 0,
        "usage": Usage(),
        "now": EVENING,
    }
    arguments.update(values)
    return check_request(settings, **arguments)


def test_a_request_within_every_limit_gets_its_limits() -> None:
    settings = _settings(max_queued=2, pages_per_day=5, cooldown_s=60)
    limits = _check(settings, queued=1, usage=Usage(4, EVENING - 61))
    assert (limits.max_queued, limits.pages_per_day, limits.cooldown_s) == (2, 5, 60)


def test_only_the_allowed_channels() -> None:
    settings = _settings(allowed_channel_ids=frozenset({7, 8}))
    with pytest.raises(NotAllowed, match="only in <#7>, <#8>"):
        _check(settings, channel_id=5)
    _check(settings, channel_id=8)
    _check(_settings(), channel_id=5)  # none set: every channel


def test_jobs_waiting() -> None:
    with pytest.raises(
        UserLimitReached,
        match=r"You have 2 request\(s\) waiting in this server \(your limit is 2\)",
    ):
        _check(_settings(max_queued=2), queued=2)


def test_pages_a_day_says_when_the_next_one_comes() -> None:
    with pytest.raises(DailyLimitReached) as refused:
        _check(_settings(pages_per_day=5), usage=Usage(5, EVENING - 3600))
    assert str(refused.value) == (
        "You can make 5 pages a day in this server; the next one in 3 h 12 min."
    )
    assert refused.value.retry_after_s == 3 * 3600 + 12 * 60
    with pytest.raises(DailyLimitReached, match="allow no pages"):
        _check(_settings(pages_per_day=0))
    _check(_settings(pages_per_day=None), usage=Usage(10_000, EVENING))


def test_cooldown_says_how_long_to_wait() -> None:
    settings = _settings(cooldown_s=60)
    with pytest.raises(CoolingDown) as refused:
        _check(settings, usage=Usage(1, EVENING - 18))
    assert str(refused.value) == "Cooldown: try again in 42 s."
    assert refused.value.retry_after_s == pytest.approx(42)
    _check(settings, usage=Usage(1, EVENING - 60))
    _check(settings, usage=Usage())  # never asked before


def test_a_role_lifts_the_limit_it_sets() -> None:
    settings = _settings(
        pages_per_day=2,
        cooldown_s=600,
        role_limits={7: {"pages_per_day": None}, 8: {"cooldown_s": 0}},
    )
    busy = Usage(2, EVENING - 5)
    with pytest.raises(DailyLimitReached):
        _check(settings, role_ids=[8], usage=busy)
    with pytest.raises(CoolingDown, match="10 min"):
        _check(settings, role_ids=[7], usage=busy)
    limits = _check(settings, role_ids=[7, 8], usage=busy)
    assert limits.granted_by == {"pages_per_day": 7, "cooldown_s": 8}


def test_utc_days() -> None:
    assert utc_day(EVENING) == "2024-05-01"
    assert day_end(EVENING) == datetime(2024, 5, 2, tzinfo=UTC).timestamp()
    assert utc_day(day_end(EVENING)) == "2024-05-02"
    assert utc_day(day_end(EVENING) - 0.001) == "2024-05-01"


# -- the counters, on both backends ---------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


MakeUsage = Callable[[Clock], UsageStore]


@pytest.fixture(params=["sqlite", "redis"])
async def make_usage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeUsage]:
    """Usage stores on one backend's data (a second one sees the first one's counts)."""
    opened: list[UsageStore] = []
    clients: list[Any] = []
    prefix = f"test-{secrets.token_hex(4)}"

    def make(clock: Clock) -> UsageStore:
        store: UsageStore
        if request.param == "sqlite":
            store = SqliteUsage(tmp_path / "usage.sqlite3", clock=clock)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            client = connect(server.url)
            clients.append(client)
            store = RedisUsage(client, prefix, clock=clock)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.aclose()
    for client in clients:
        await client.aclose()


async def test_pages_are_counted_per_server_and_member(make_usage: MakeUsage) -> None:
    clock = Clock(EVENING)
    usage = make_usage(clock)
    assert await usage.get(GUILD, USER) == Usage(0, None)
    assert await usage.record(GUILD, USER) == Usage(1, EVENING)
    clock.now += 30
    assert await usage.record(GUILD, USER) == Usage(2, EVENING + 30)
    assert await usage.get(GUILD, USER) == Usage(2, EVENING + 30)
    assert await usage.get(GUILD, USER + 1) == Usage()
    assert await usage.get(GUILD + 1, USER) == Usage()
    # A restarted bot (or another shard) sees the same counts.
    assert await make_usage(clock).get(GUILD, USER) == Usage(2, EVENING + 30)


async def test_the_count_starts_again_with_the_utc_day(make_usage: MakeUsage) -> None:
    clock = Clock(EVENING)
    usage = make_usage(clock)
    for _ in range(3):
        await usage.record(GUILD, USER)
    clock.now = day_end(EVENING) + 1  # 00:00:01 the next day
    assert await usage.get(GUILD, USER) == Usage(0, EVENING)  # the last request is kept
    assert (await usage.record(GUILD, USER)).pages_today == 1


async def test_the_daily_limit_over_a_day_with_the_counters(make_usage: MakeUsage) -> None:
    clock = Clock(EVENING)
    usage = make_usage(clock)
    settings = _settings(pages_per_day=2, cooldown_s=10)

    def check() -> None:
        check_request(
            settings,
            role_ids=(),
            channel_id=5,
            queued=0,
            usage=seen,
            now=clock.now,
        )

    for _ in range(2):
        seen = await usage.get(GUILD, USER)
        check()
        await usage.record(GUILD, USER)
        clock.now += 11
    seen = await usage.get(GUILD, USER)
    with pytest.raises(DailyLimitReached, match="the next one in 3 h 12 min"):
        check()
    clock.now = day_end(EVENING) + 5
    seen = await usage.get(GUILD, USER)
    check()
    await usage.record(GUILD, USER)
    seen = await usage.get(GUILD, USER)
    with pytest.raises(CoolingDown, match="10 s"):
        check()


async def test_redis_keys_expire_after_their_day(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    usage = RedisUsage(client, f"test-{secrets.token_hex(4)}", clock=Clock(EVENING))
    await usage.record(GUILD, USER)
    day_key = usage.pages_key(GUILD, USER, "2024-05-01")
    assert await client.get(day_key) == "1"
    left_of_the_day = day_end(EVENING) - EVENING
    assert left_of_the_day < await client.ttl(day_key) <= left_of_the_day + 3600
    assert 0 < await client.ttl(usage.last_key(GUILD, USER)) <= 86400
    await client.aclose()


async def test_redis_down_is_queue_unavailable() -> None:
    client = connect("redis://127.0.0.1:9/0", timeout_s=0.2)
    usage = RedisUsage(client, "down")
    with pytest.raises(QueueUnavailable):
        await usage.get(GUILD, USER)
    with pytest.raises(QueueUnavailable):
        await usage.record(GUILD, USER)
    await client.aclose()


async def test_the_gate_admits_records_and_refuses(make_usage: MakeUsage, tmp_path: Path) -> None:
    clock = Clock(EVENING)
    store = GuildSettingsStore(SqliteFields(tmp_path / "settings.sqlite3"), GuildDefaults())
    gate = GuildGate(settings=store, usage=make_usage(clock), clock=clock)
    await store.update(GUILD, pages_per_day=1, default_style="dark")
    request: dict[str, Any] = {
        "guild_id": GUILD,
        "user_id": USER,
        "role_ids": [],
        "channel_id": 5,
        "queued": 0,
    }

    admitted = await gate.admit(**request)
    assert admitted is not None and admitted.default_style == "dark"
    assert await gate.record(GUILD, USER) == Usage(1, EVENING)
    with pytest.raises(DailyLimitReached):
        await gate.admit(**request)
    # A DM has no server: no server limits, nothing counted.
    assert await gate.admit(**{**request, "guild_id": None}) is None
    assert await gate.record(None, USER) is None
    await store.aclose()


def test_open_gate_follows_the_backend(tmp_path: Path) -> None:
    settings = Settings(
        discord_token="x",  # type: ignore[arg-type]
        results_dir=tmp_path,
        _env_file=None,  # type: ignore[call-arg]
    )
    gate = open_gate(settings)
    assert isinstance(gate.usage, SqliteUsage)
    assert gate.usage.path == tmp_path / "htmlbot-guilds.sqlite3"


async def test_a_burst_of_first_requests_counts_each_and_closes_cleanly(
    make_usage: MakeUsage,
) -> None:
    # 40 members' first requests at once, as a busy server sends them after a restart: every
    # one counted, and (SQLite) one connection opened, which aclose closes: the autouse
    # check in tests/conftest.py fails a test that leaves a connection thread behind.
    usage = make_usage(Clock(EVENING))
    counted = await asyncio.gather(*(usage.record(GUILD, USER + n) for n in range(40)))
    assert [u.pages_today for u in counted] == [1] * 40
    seen = await asyncio.gather(*(usage.get(GUILD, USER + n) for n in range(40)))
    assert all(u.pages_today == 1 for u in seen)
