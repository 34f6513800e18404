"""The Redis queue under load: N jobs from U users through W workers, end to end.

``python -m bench.queue_load --jobs 1000 --users 100 --workers 3`` starts its own
``redis-server`` (``tests.redis_server.RedisServer``), the in-repo fake Discord, one real bot
process (``python -m bot`` with ``QUEUE_BACKEND=redis``: it has no model) and W real worker
processes (``python -m bot.worker``), each running the tiny random Llama of the tests
(``tests.e2e.helpers.build_tiny_model``) on the CPU through the standard engine and the real
Worker thread, one torch thread each. Users send their ``/html`` commands at random
(Poisson) times at ``--rate`` per second in all, so the queue builds up and drains while
users come and go. Then it reports:

* **Outcomes.** Each interaction must get exactly one: a page (deferred, one ``.html``
  file, the message ending on "Done"), or one final message (failed, expired, refused).
  *Lost*: an interaction with no outcome when the run ends; *duplicated*: one with two
  pages or more.
* **Fairness**, from the take order Redis recorded per job (``started_at``, Redis's clock,
  ties within one take broken by the score, the order the script popped them). A job
  *becomes its user's head* when it arrives or when its user's previous job is taken,
  whichever is later; it is *waiting* from then until it is taken.

  - *late overtakes*: for a job j and another user v, the jobs of v that arrived after j
    became its user's head and were taken before j. The gate: at most 1 for every job and
    user (no user's job waits behind more than one round of other users' later jobs). The
    held-out bug (a user whose first job ran at once staying a round ahead) breaks it.
  - *turns while waiting*: the same without the arrival condition: every job of v taken
    while j was waiting. At most 2 under round-robin by arrival (the rest of the round
    being served, plus the next one, whose order follows arrival). Printed, not gated.
* **Enqueue to first status**: from the fake Discord sending INTERACTION_CREATE (the
  interaction's arrival at the bot, over the loopback gateway) to the fake accepting the
  bot's defer callback, which is the user's first status ("htmlbot is thinking…"). The gate:
  p99 under 1 s. Also printed: to the first status *edit* (the "Queued: position…" line),
  which the board paces at ``EDITS_PER_SECOND`` (Discord's rate limits), so it grows with the
  queue by design.

``--write-results`` puts the table in ``bench/RESULTS.md`` under "Queue load (Redis)".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Queue load (Redis)"
PREFIX = "qload"
START_TIMEOUT_S = 180.0
P99_GATE_S = 1.0
STALL_S = 60.0
LATE_OVERTAKES_GATE = 1


@dataclass
class Config:
    """One run's shape."""

    jobs: int = 1000
    users: int = 100
    workers: int = 3
    rate: float = 40.0  # arrivals per second, all users together
    max_batch: int = 8
    max_new_tokens: int = 16
    seed: int = 0
    timeout_s: float = 900.0


@dataclass
class TakeRecord:
    """One job as Redis recorded it."""

    job_id: str
    user_id: int
    prompt: str
    state: str
    submitted_at: float
    started_at: float | None
    score: int
    attempts: int
    worker: str


@dataclass
class Fairness:
    """The fairness measures of one run (see the module docstring)."""

    max_late_overtakes: int
    max_turns_waiting: int
    jobs_over_gate: int
    taken: int
    max_queued: int  # jobs submitted and not yet taken, at the busiest moment


@dataclass
class Report:
    """What one run measured."""

    config: Config
    outcomes: Counter[str]
    lost: int
    duplicated: int
    defer_s: list[float]
    first_edit_s: list[float]
    fairness: Fairness
    elapsed_s: float
    retakes: int
    per_worker: Counter[str] = field(default_factory=Counter)

    @property
    def passed(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.fairness.max_late_overtakes <= LATE_OVERTAKES_GATE
            and percentile(self.defer_s, 99) < P99_GATE_S
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- fairness ---------------------------------------------------------------------------


def take_order(records: Sequence[TakeRecord]) -> list[TakeRecord]:
    """The taken jobs in the order Redis handed them out."""
    taken = [r for r in records if r.started_at is not None]
    return sorted(taken, key=lambda r: (r.started_at, r.score))


def fairness(records: Sequence[TakeRecord]) -> Fairness:
    """Late overtakes and turns while waiting, over every taken job."""
    order = take_order(records)
    position = {r.job_id: i for i, r in enumerate(order)}
    # Each user's jobs in take order, and the moment each became its user's head.
    by_user: dict[int, list[TakeRecord]] = defaultdict(list)
    for r in order:
        by_user[r.user_id].append(r)
    head_at: dict[str, float] = {}
    for jobs in by_user.values():
        previous_take: float | None = None
        for r in jobs:
            head_at[r.job_id] = max(r.submitted_at, previous_take or r.submitted_at)
            previous_take = r.started_at
    max_late = max_turns = over = 0
    for r in order:
        start = head_at[r.job_id]
        late: Counter[int] = Counter()
        turns: Counter[int] = Counter()
        # Jobs taken before r whose take falls in r's waiting time.
        for other in reversed(order[: position[r.job_id]]):
            assert other.started_at is not None
            if other.started_at < start:
                break
            if other.user_id == r.user_id:
                continue
            turns[other.user_id] += 1
            if other.submitted_at > start:
                late[other.user_id] += 1
        job_late = max(late.values(), default=0)
        max_late = max(max_late, job_late)
        max_turns = max(max_turns, max(turns.values(), default=0))
        over += job_late > LATE_OVERTAKES_GATE
    return Fairness(max_late, max_turns, over, len(order), max_queued(records))


def max_queued(records: Sequence[TakeRecord]) -> int:
    """The longest the queue got (on Redis's clock; a take counts before a same-time submit)."""
    events = [(r.submitted_at, 1) for r in records]
    events += [(r.started_at, -1) for r in records if r.started_at is not None]
    depth = deepest = 0
    for _, step in sorted(events):
        depth += step
        deepest = max(deepest, depth)
    return deepest


# -- processes ----------------------------------------------------------------------------


def child_env(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "QUEUE_"))}
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    env.update(settings)
    return env


def start_child(
    module: str, env: dict[str, str], log_path: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", module], cwd=cwd, env=env, stdout=log_file, stderr=log_file
        )


def stop_children(children: Sequence[subprocess.Popen[bytes]]) -> list[int | None]:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    codes: list[int | None] = []
    for child in children:
        try:
            codes.append(child.wait(timeout=60))
        except subprocess.TimeoutExpired:
            child.kill()
            codes.append(child.wait())
    return codes


# -- the run ------------------------------------------------------------------------------


def arrivals(config: Config) -> list[tuple[float, int, int]]:
    """(seconds from the start, user index, job number): Poisson times, users shuffled."""
    rng = random.Random(config.seed)
    per_user = [
        config.jobs // config.users + (u < config.jobs % config.users) for u in range(config.users)
    ]
    owners = [u for u in range(config.users) for _ in range(per_user[u])]
    rng.shuffle(owners)
    t = 0.0
    out = []
    seen: Counter[int] = Counter()
    for user in owners:
        t += rng.expovariate(config.rate)
        out.append((t, user, seen[user]))
        seen[user] += 1
    return out


def outcome(inter: Any) -> str:
    """'page', 'final: <text>', 'rejected: <text>', 'lost' or 'duplicated' for one
    interaction."""
    from tests.fake_discord import CB_DEFERRED_MESSAGE, CB_MESSAGE

    if inter.callback_type == CB_MESSAGE:
        return f"rejected: {inter.original_content[:48]}"
    if inter.callback_type is None and inter.late_callbacks:
        return "defer too late (refused by Discord)"  # the user saw "did not respond"
    if inter.callback_type != CB_DEFERRED_MESSAGE:
        return "lost"  # no answer at all (yet)
    pages = len(inter.html_files)
    if pages > 1:
        return "duplicated"
    if pages == 1:
        return "page" if inter.original_content.startswith("✅ Done") else "page (no Done)"
    text = inter.original_content
    return f"final: {text[:40]}" if text.startswith(("❌", "⌛", "🛑")) else "lost"


async def read_records(url: str) -> list[TakeRecord]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        keys = [k async for k in client.scan_iter(match=f"{PREFIX}:job:*", count=1000)]
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        rows = await pipe.execute()
    finally:
        await client.aclose()
    records = []
    for key, row in zip(keys, rows, strict=True):
        started = row.get("started_at")
        records.append(
            TakeRecord(
                job_id=key.rsplit(":", 1)[1],
                user_id=int(row["user_id"]),
                prompt=row.get("prompt", ""),
                state=row.get("state", ""),
                submitted_at=float(row["submitted_at"]),
                started_at=float(started) if started else None,
                score=int(float(row.get("score", "0"))),
                attempts=int(row.get("attempts", "0")),
                worker=row.get("worker", ""),
            )
        )
    return records


async def wait_for_workers(
    url: str, count: int, children: Sequence[subprocess.Popen[bytes]]
) -> None:
    """Until ``count`` workers have called take once (each is loaded and warmed up)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while await client.hlen(f"{PREFIX}:workers") < count:
            if any(c.poll() is not None for c in children):
                raise RuntimeError("a worker exited at start; see its log")
            if time.monotonic() > deadline:
                raise TimeoutError("the workers did not start")
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()


async def run(config: Config, folder: Path) -> Report:
    """Start everything, send the load, wait for every outcome, measure, stop."""
    from tests.e2e.helpers import build_tiny_model
    from tests.fake_discord import FakeDiscord
    from tests.redis_server import RedisServer

    model = folder / "tiny-llama"
    await asyncio.to_thread(build_tiny_model, model)
    redis = RedisServer(folder / "redis")
    redis.start()
    fake = FakeDiscord()  # Discord's 3 s window for the defer, as in production
    await fake.start()
    children: list[subprocess.Popen[bytes]] = []
    try:
        common = {
            "DISCORD_TOKEN": fake.bot_token,
            "DISCORD_API_BASE": fake.api_base,
            "DISCORD_GATEWAY_URL": fake.gateway_url,
            "DEV_GUILD_ID": str(fake.guild.id),
            "QUEUE_BACKEND": "redis",
            "REDIS_URL": redis.url,
            "REDIS_PREFIX": PREFIX,
            "RESULTS_DIR": str(folder / "results"),
            "MODEL_BASE": str(model),
            "MODEL_DEVICE": "cpu",
            "ENGINE": "standard",
            "CPU_THREADS": "1",
            "MAX_BATCH": str(config.max_batch),
            "MAX_NEW_TOKENS": str(config.max_new_tokens),
            "PAGE_MODE": "document",
            "PREVIEW": "off",
            "REGENERATE_EMPTY": "false",
            # Every user may have all their jobs pending at once: nothing is refused, so
            # each interaction's outcome is its page.
            "QUEUE_MAX_PER_USER": str(config.jobs),
            "QUEUE_MAX_TOTAL": str(config.jobs),
            "LOG_LEVEL": "INFO",
        }
        bot = start_child("bot", child_env(common), folder / "bot.log", folder)
        children.append(bot)
        for i in range(config.workers):
            env = child_env(common | {"WORKER_NAME": f"worker{i}"})
            children.append(start_child("bot.worker", env, folder / f"worker{i}.log", folder))
        await fake.wait_for_sync(timeout=START_TIMEOUT_S)
        await fake.wait_until_ready(timeout=START_TIMEOUT_S)
        await wait_for_workers(redis.url, config.workers, children)
        users = [fake.user(f"user{u}") for u in range(config.users)]
        started = time.monotonic()
        interactions = await send_load(fake, users, arrivals(config))
        await wait_for_outcomes(interactions, config.timeout_s)
        await asyncio.sleep(2.0)  # a duplicate would show up meanwhile
        elapsed = time.monotonic() - started
        records = await read_records(redis.url)
    finally:
        codes = stop_children(children)
        await fake.stop()
        redis.stop()
    if any(code not in (0, None) for code in codes):
        print(f"warning: exit codes {codes}; logs in {folder}", file=sys.stderr)
    return measure(config, interactions, records, elapsed)


async def send_load(
    fake: Any, users: Sequence[Any], plan: Sequence[tuple[float, int, int]]
) -> list[Any]:
    """Send every command at its planned time; the interactions in plan order."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(at: float, user: int, k: int) -> Any:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        prompt = f"page {k} for user{user}"
        return await fake.send_command("html", {"prompt": prompt}, user=users[user])

    return list(await asyncio.gather(*(one(*item) for item in plan)))


async def wait_for_outcomes(interactions: Sequence[Any], timeout_s: float) -> None:
    """Until every interaction has its outcome, ``timeout_s`` passed, or nothing changed
    for a minute (what is still missing then counts as lost); progress on stderr."""
    deadline = time.monotonic() + timeout_s
    last_change, last_missing, last_print = time.monotonic(), -1, 0.0
    while True:
        counts = Counter(outcome(i) for i in interactions)
        missing = counts["lost"]
        now = time.monotonic()
        if missing != last_missing:
            last_change, last_missing = now, missing
        if now - last_print >= 10:
            last_print = now
            print(f"  {dict(counts)}", file=sys.stderr)
        if missing == 0 or now > deadline or now - last_change > STALL_S:
            return
        await asyncio.sleep(0.5)


def measure(
    config: Config, interactions: Sequence[Any], records: Sequence[TakeRecord], elapsed: float
) -> Report:
    outcomes = Counter(outcome(i) for i in interactions)
    defer = [i.callback_latency for i in interactions if i.callback_latency is not None]
    first_edit = []
    for inter in interactions:
        edits = [
            r.time
            for r in inter.ok_requests
            if r.method == "PATCH" and r.path.endswith("/messages/@original")
        ]
        if edits:
            first_edit.append(min(edits) - inter.sent_at)
    mine = [r for r in records if r.prompt.startswith("page ")]
    return Report(
        config=config,
        outcomes=outcomes,
        lost=outcomes["lost"] + (len(interactions) - config.jobs),
        duplicated=outcomes["duplicated"],
        defer_s=defer,
        first_edit_s=first_edit,
        fairness=fairness(mine),
        elapsed_s=elapsed,
        retakes=sum(r.attempts > 1 for r in mine),
        per_worker=Counter(r.worker for r in mine if r.started_at is not None),
    )


# -- the report ---------------------------------------------------------------------------


def table(report: Report) -> str:
    """The result as a Markdown table."""
    c = report.config
    f = report.fairness
    d, e = report.defer_s, report.first_edit_s
    rows = [
        ("jobs / users / workers", f"{c.jobs} / {c.users} / {c.workers}"),
        ("arrivals", f"Poisson, {c.rate:g}/s in all (seed {c.seed})"),
        ("engine", f"tiny random Llama, CPU, standard engine, batch {c.max_batch}, "
                   f"{c.max_new_tokens} new tokens, 1 torch thread per worker"),
        ("outcomes", ", ".join(f"{k}: {v}" for k, v in sorted(report.outcomes.items()))),
        ("lost / duplicated", f"{report.lost} / {report.duplicated}"),
        ("jobs taken twice (lease lost)", str(report.retakes)),
        ("jobs per worker", ", ".join(f"{k}: {v}" for k, v in sorted(report.per_worker.items()))),
        ("late overtakes, max per job and user (gate <= 1)", f"{f.max_late_overtakes} "
         f"({f.jobs_over_gate} of {f.taken} jobs over)"),
        ("turns of one other user while waiting, max", str(f.max_turns_waiting)),
        ("longest queue (jobs waiting at once)", str(f.max_queued)),
        ("enqueue -> defer (first status) p50 / p99 / max",
         f"{percentile(d, 50) * 1000:.0f} / {percentile(d, 99) * 1000:.0f} / "
         f"{max(d, default=float('nan')) * 1000:.0f} ms (gate p99 < 1000 ms)"),
        ("enqueue -> first status edit p50 / p99",
         f"{percentile(e, 50):.1f} / {percentile(e, 99):.1f} s"),
        ("wall time (first command to last outcome + 2 s)", f"{report.elapsed_s:.0f} s"),
        ("result", "PASS" if report.passed else "FAIL"),
    ]  # fmt: skip
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def card() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU; Python "
        f"{platform.python_version()}; commit {commit()}"
    )


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section of ``path`` that starts with :data:`SECTION`."""
    content = path.read_text()
    start = content.find(SECTION)
    if start == -1:
        content = content.rstrip("\n") + "\n\n" + text + "\n"
    else:
        nxt = content.find("\n## ", start + len(SECTION))
        end = len(content) if nxt == -1 else nxt + 1
        content = content[:start] + text + ("\n" if nxt != -1 else "") + content[end:]
    path.write_text(content)


def section(report: Report, command: str) -> str:
    return "\n".join(
        [
            SECTION,
            "",
            f"`{command}` ({card()}). One bot process (`python -m bot`, Redis backend, no model),"
            " the workers as `python -m bot.worker` processes, the in-repo fake Discord and a"
            " redis-server of its own; definitions of every measure in `bench/queue_load.py`.",
            "",
            table(report),
        ]
    )


def parse_args(argv: Sequence[str] | None) -> tuple[Config, bool]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Config()
    parser.add_argument("--jobs", type=int, default=defaults.jobs)
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="arrivals per second")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s)
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args(argv)
    config = Config(
        jobs=args.jobs,
        users=args.users,
        workers=args.workers,
        rate=args.rate,
        max_batch=args.max_batch,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    return config, args.write_results


def main(argv: Sequence[str] | None = None) -> int:
    config, write = parse_args(argv)
    # SIGTERM (a `timeout`, a CI runner) unwinds like Ctrl-C: the children are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # The processes' logs stay there (out/ is not versioned).
    folder = Path(tempfile.mkdtemp(prefix="queue-load-", dir=REPO / "out"))
    print(f"logs in {folder}", file=sys.stderr)
    report = asyncio.run(run(config, folder))
    command = "python -m bench.queue_load " + " ".join(sys.argv[1:] if argv is None else argv)
    text = section(report, command.strip())
    print(text)
    if write:
        write_results(text)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
