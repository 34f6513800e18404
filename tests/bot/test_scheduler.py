"""The scheduler: bounds, per-user limits, round-robin fairness, cancel, expiry, ETA."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

from bot.errors import QueueFull, ShuttingDown, UserLimitReached
from bot.jobs import Job, JobState
from bot.scheduler import Scheduler, Throughput, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    *, max_total: int = 100, max_per_user: int = 10, max_batch: int = 4, job_s: float = 10.0
) -> tuple[Scheduler, Clock]:
    clock = Clock()
    scheduler = Scheduler(
        max_total=max_total,
        max_per_user=max_per_user,
        max_batch=max_batch,
        throughput=Throughput(initial_job_seconds=job_s),
        delivery_margin_s=5.0,
        clock=clock,
    )
    return scheduler, clock


def job(user: int, prompt: str = "p", ttl: float = 900.0, clock: Clock | None = None) -> Job:
    created = Job.create(user_id=user, prompt=prompt, ttl_s=ttl)
    if clock is not None:
        created.expires_at = clock.now + ttl
    return created


def test_round_robin_across_users_and_positions_match_take_order() -> None:
    scheduler, clock = make()
    heavy = [job(1, f"a{i}", clock=clock) for i in range(4)]
    for item in heavy:
        scheduler.submit(item)
    light = job(2, "b0", clock=clock)
    assert scheduler.submit(light) == 2  # right after the heavy user's first job
    third = job(3, "c0", clock=clock)
    assert scheduler.submit(third) == 3

    positions = scheduler.positions()
    expected = ["a0", "b0", "c0", "a1", "a2", "a3"]
    by_position = sorted(scheduler.pending(), key=lambda j: positions[j.job_id])
    assert [j.prompt for j in by_position] == expected

    taken = [j.prompt for j in scheduler.take(2)] + [j.prompt for j in scheduler.take(10)]
    assert taken == expected
    assert all(j.state is JobState.RUNNING for j in [*heavy, light, third])


def test_a_late_user_waits_at_most_one_turn_behind_a_flooder() -> None:
    scheduler, clock = make(max_per_user=50)
    for i in range(20):
        scheduler.submit(job(1, f"a{i}", clock=clock))
    scheduler.take(1)  # a0 runs
    late = job(2, "late", clock=clock)
    assert scheduler.submit(late) == 1  # user 1 had its turn in this round already
    assert [j.prompt for j in scheduler.take(2)] == ["late", "a1"]


def test_a_user_whose_first_job_ran_at_once_is_not_a_round_ahead() -> None:
    # The held-out run: one user got a 3rd page before two others got their 2nd.
    scheduler, clock = make()
    scheduler.submit(job(1, "a1", clock=clock))
    assert [j.prompt for j in scheduler.take(1)] == ["a1"]  # ran at once
    for name in ("a2", "a3"):
        scheduler.submit(job(1, name, clock=clock))
    for user, names in ((2, ("b1", "b2")), (3, ("c1", "c2"))):
        for name in names:
            scheduler.submit(job(user, name, clock=clock))
    expected = ["b1", "c1", "a2", "b2", "c2", "a3"]
    positions = scheduler.positions()
    assert [
        j.prompt for j in sorted(scheduler.pending()[1:], key=lambda j: positions[j.job_id])
    ] == expected
    assert [j.prompt for j in scheduler.pending()] == ["a1", *expected]
    assert [j.prompt for j in scheduler.take(10)] == expected


def test_a_user_whose_queue_emptied_keeps_their_turn() -> None:
    scheduler, clock = make()
    for name in ("a1", "a2", "a3"):
        scheduler.submit(job(1, name, clock=clock))
    scheduler.submit(job(2, "b1", clock=clock))
    assert [j.prompt for j in scheduler.take(2)] == ["a1", "b1"]  # user 2's queue is empty
    scheduler.submit(job(2, "b2", clock=clock))  # round 1, with a2
    scheduler.submit(job(3, "c1", clock=clock))  # a newcomer joins the current round
    assert [j.prompt for j in scheduler.take(10)] == ["c1", "a2", "b2", "a3"]


def test_no_job_waits_behind_more_than_one_round_of_anyone_else() -> None:
    # Random arrivals and takes: while a job waits, another user gets at most one job per
    # job of its own user served meanwhile, plus the rest of the current round and the next.
    rng = random.Random(7)
    scheduler, clock = make(max_total=10_000, max_per_user=10_000)
    submitted_at: dict[str, int] = {}
    taken_log: list[Job] = []
    for step in range(3000):
        if rng.random() < 0.55:
            newcomer = rng.random() < 0.05  # a user never seen before
            user = 100 + step if newcomer else rng.randrange(8)
            item = job(user, f"s{step}", clock=clock)
            others = {j.user_id for j in scheduler.pending() if j.state is JobState.QUEUED}
            position = scheduler.submit(item)
            if newcomer:  # joins the current round: behind at most one job per other user
                assert position <= len(others) + 1
            submitted_at[item.job_id] = len(taken_log)
        else:
            expected_next = min(scheduler.positions().items(), key=lambda kv: kv[1], default=None)
            for taken in scheduler.take(1):
                assert expected_next is not None and taken.job_id == expected_next[0]
                taken_log.append(taken)
                scheduler.finish(taken, JobState.DONE)
    assert len(taken_log) > 1000
    for index, taken in enumerate(taken_log):
        during = Counter(j.user_id for j in taken_log[submitted_at[taken.job_id] : index])
        own = during.pop(taken.user_id, 0)
        assert all(count <= own + 2 for count in during.values()), (index, during, own)


def test_cancelling_a_queued_job_gives_its_round_back() -> None:
    scheduler, clock = make()
    scheduler.submit(job(1, "a1", clock=clock))
    a2 = job(1, "a2", clock=clock)
    scheduler.submit(a2)
    scheduler.cancel(a2.job_id)
    for name in ("b1", "b2", "b3"):
        scheduler.submit(job(2, name, clock=clock))
    scheduler.submit(job(1, "a3", clock=clock))  # takes a2's round, not the one after it
    assert [j.prompt for j in scheduler.take(10)] == ["a1", "b1", "b2", "a3", "b3"]


def test_restore_keeps_the_given_order_past_the_limits() -> None:
    scheduler, clock = make(max_total=2, max_per_user=1)
    jobs = [job(1, "a1", clock=clock), job(1, "a2", clock=clock), job(1, "a3", clock=clock)]
    jobs.append(job(2, "b1", clock=clock))
    for item in jobs:
        item.state = JobState.RUNNING
        item.started_at = clock.now
    scheduler.restore(jobs)
    assert all(item.state is JobState.QUEUED and item.started_at is None for item in jobs)
    assert [j.prompt for j in scheduler.pending()] == ["a1", "a2", "a3", "b1"]
    with pytest.raises(UserLimitReached):
        scheduler.submit(job(2, clock=clock))
    scheduler.restore([jobs[0]])  # already pending: skipped
    assert scheduler.queued_count == 4
    scheduler.take(1)
    scheduler.max_total = 10
    scheduler.submit(job(3, "c1", clock=clock))  # a newcomer still joins the current round
    assert [j.prompt for j in scheduler.take(10)] == ["c1", "a2", "a3", "b1"]


def test_per_user_limit_counts_running_jobs_too() -> None:
    scheduler, clock = make(max_per_user=2)
    scheduler.submit(job(1, clock=clock))
    scheduler.submit(job(1, clock=clock))
    with pytest.raises(UserLimitReached, match="limit is 2"):
        scheduler.submit(job(1, clock=clock))
    scheduler.take(1)  # one runs: still pending, still counts
    with pytest.raises(UserLimitReached):
        scheduler.submit(job(1, clock=clock))
    scheduler.submit(job(2, clock=clock))  # other users are not affected
    running = scheduler.pending(1)[0]
    scheduler.finish(running, JobState.DONE)
    scheduler.submit(job(1, clock=clock))


def test_queue_full_says_when_to_retry() -> None:
    scheduler, clock = make(max_total=3, max_per_user=5, job_s=40.0)
    for user in range(3):
        scheduler.submit(job(user, clock=clock))
    with pytest.raises(QueueFull) as info:
        scheduler.submit(job(9, clock=clock))
    assert info.value.retry_after_s == pytest.approx(40.0)
    assert "try again in about 40 s" in str(info.value)
    # Running jobs don't count against the queue bound.
    scheduler.take(1)
    scheduler.submit(job(9, clock=clock))


def test_cancel_a_queued_job_removes_it_and_moves_the_others_up() -> None:
    scheduler, clock = make()
    first, second, third = (job(u, clock=clock) for u in (1, 2, 3))
    for item in (first, second, third):
        scheduler.submit(item)
    assert scheduler.cancel(second.job_id) is second
    assert second.state is JobState.CANCELLED and second.request.cancelled
    assert scheduler.positions() == {first.job_id: 1, third.job_id: 2}
    assert scheduler.take(10) == [first, third]
    assert scheduler.cancel("nope") is None


def test_cancel_a_running_job_sets_its_request_flag() -> None:
    scheduler, clock = make()
    item = job(1, clock=clock)
    scheduler.submit(item)
    scheduler.take(1)
    assert scheduler.cancel(item.job_id) is item
    assert item.request.cancelled
    assert item.state is JobState.RUNNING  # the worker reports the outcome


def test_jobs_whose_token_would_expire_are_dropped_before_the_gpu() -> None:
    scheduler, clock = make(job_s=10.0)
    dropped: list[Job] = []
    scheduler.add_expired_listener(dropped.append)
    doomed = job(1, "doomed", ttl=30.0, clock=clock)
    fine = job(2, "fine", ttl=900.0, clock=clock)
    scheduler.submit(doomed)
    scheduler.submit(fine)
    clock.now += 20.0  # 10 s left, but a job takes 10 s plus a 5 s delivery margin
    assert scheduler.take(10) == [fine]
    assert dropped == [doomed]
    assert doomed.state is JobState.EXPIRED
    assert scheduler.pending() == [fine]


def test_eta_grows_with_position_and_follows_measured_speed() -> None:
    scheduler, _ = make(max_batch=4, job_s=60.0)
    assert scheduler.eta_s(1) == pytest.approx(120.0)  # this batch, then ours
    assert scheduler.eta_s(4) == scheduler.eta_s(1)
    assert scheduler.eta_s(5) == pytest.approx(180.0)
    scheduler.throughput.record_job(6.0)  # the first measurement replaces the guess
    assert scheduler.eta_s(1) == pytest.approx(12.0)
    for _ in range(30):
        scheduler.throughput.record_job(2.0)
    assert scheduler.eta_s(1) == pytest.approx(4.0, rel=0.01)


def test_take_waits_for_work_and_wakes_on_submit() -> None:
    scheduler, _ = make()
    got: list[list[Job]] = []
    worker = threading.Thread(target=lambda: got.append(scheduler.take(4, wait_s=5.0)))
    worker.start()
    item = job(1)
    scheduler.submit(item)
    worker.join(5.0)
    assert got == [[item]]


def test_close_refuses_new_jobs_and_hands_back_the_queued_ones() -> None:
    scheduler, clock = make()
    running, queued = job(1, clock=clock), job(2, clock=clock)
    scheduler.submit(running)
    scheduler.take(1)
    scheduler.submit(queued)
    assert scheduler.close() == [queued]
    assert queued.state is JobState.CANCELLED
    with pytest.raises(ShuttingDown):
        scheduler.submit(job(3, clock=clock))
    assert scheduler.take(4) == []
    assert scheduler.pending() == [running]


def test_requeue_front_puts_jobs_back_first() -> None:
    scheduler, clock = make()
    a, b, c = job(1, "a", clock=clock), job(2, "b", clock=clock), job(3, "c", clock=clock)
    for item in (a, b, c):
        scheduler.submit(item)
    taken = scheduler.take(2)
    scheduler.requeue_front(taken)
    assert [j.prompt for j in scheduler.take(3)] == ["a", "b", "c"]


def test_requeue_front_keeps_each_job_its_old_place() -> None:
    scheduler, clock = make()
    for user, name in ((1, "a1"), (1, "a2"), (2, "b1")):
        scheduler.submit(job(user, name, clock=clock))
    taken = scheduler.take(2)
    assert [j.prompt for j in taken] == ["a1", "b1"]
    scheduler.submit(job(3, "c1", clock=clock))  # arrived after both, in their round
    scheduler.requeue_front(reversed(taken))
    assert all(j.state is JobState.QUEUED for j in taken)
    assert [j.prompt for j in scheduler.take(10)] == ["a1", "b1", "c1", "a2"]


def test_duplicate_job_ids_are_refused() -> None:
    scheduler, clock = make()
    item = job(1, clock=clock)
    scheduler.submit(item)
    with pytest.raises(ValueError, match="duplicate"):
        scheduler.submit(item)


def test_format_duration() -> None:
    assert format_duration(0.2) == "1 s"
    assert format_duration(42) == "42 s"
    assert format_duration(600) == "10 min"
    assert format_duration(3900) == "1 h 5 min"


def test_tokens_per_second_is_the_aggregate_over_a_window() -> None:
    clock = Clock()
    meter = Throughput(initial_job_seconds=1.0, window_s=10.0, clock=clock)
    clock.now += 5.0
    meter.record_tokens(100)
    meter.record_tokens(150)  # two sequences that ran side by side
    assert meter.tokens_per_second == pytest.approx(50.0)  # 250 tokens in 5 s
    clock.now += 20.0
    assert meter.tokens_per_second == 0.0  # idle: nothing in the last 10 s


def test_the_token_window_stays_bounded_when_nobody_reads_the_rate() -> None:
    # With metrics off nothing reads tokens_per_second; recording must still forget old jobs.
    clock = Clock()
    meter = Throughput(initial_job_seconds=1.0, window_s=10.0, clock=clock)
    for _ in range(1000):
        clock.now += 1.0
        meter.record_tokens(10)
    assert len(meter._generated) <= 11
    assert meter.tokens_per_second == pytest.approx(11.0)  # 11 records within 10 s, ends included


def test_a_seed_replaces_the_guess_until_a_job_is_measured() -> None:
    scheduler, _ = make(max_batch=4, job_s=60.0)
    meter = scheduler.throughput
    assert not meter.seed_rate(0.0, 500) and not meter.seed_rate(20.0, 0)  # no speed yet
    assert meter.job_seconds == 60.0 and not meter.seeded
    assert meter.seed_rate(tokens_per_second_per_job=50.0, expected_tokens=600)
    assert meter.job_seconds == pytest.approx(12.0) and meter.seeded
    assert scheduler.eta_s(1) == pytest.approx(24.0)
    assert meter.seed_rate(40.0, 600)  # a later (steadier) reading replaces the first
    assert meter.job_seconds == pytest.approx(15.0)
    meter.record_job(9.0)  # a real measurement wins from now on
    assert meter.measured
    assert not meter.seed_rate(1.0, 600) and not meter.seed_job_seconds(100.0)
    assert meter.job_seconds == pytest.approx(9.0)


def test_a_warm_up_time_seeds_the_estimate() -> None:
    meter = Throughput(initial_job_seconds=60.0)
    assert meter.seed_job_seconds(7.5)
    assert meter.job_seconds == 7.5
    assert not meter.seed_job_seconds(float("inf")) and not meter.seed_job_seconds(-1.0)
    assert meter.job_seconds == 7.5
