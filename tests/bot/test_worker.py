"""The worker thread: batching, failure isolation, OOM halving, continuous mode, loop lag."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

import pytest

from bot.jobs import Job, JobState
from bot.loopmon import LagMonitor
from bot.queue.local import LocalQueue
from bot.scheduler import Scheduler, Throughput
from bot.worker import Worker, is_out_of_memory
from model.types import SamplingParams
from tests.bot.fakes import BOOM, FakeContinuousEngine, FakeEngine


class Sink:
    """Records the worker's reports and checks they arrive on the loop's thread."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.started: list[Job] = []
        self.progress: list[tuple[str, int]] = []
        self.finished: list[Job] = []
        self.wrong_thread = 0
        self.changed = asyncio.Event()

    def _check(self) -> None:
        if threading.get_ident() != self.loop_thread:
            self.wrong_thread += 1
        self.changed.set()

    def job_started(self, job: Job) -> None:
        self._check()
        self.started.append(job)

    def job_progress(self, job: Job) -> None:
        self._check()
        self.progress.append((job.job_id, job.tokens_so_far))

    def job_finished(self, job: Job) -> None:
        self._check()
        self.finished.append(job)

    async def wait_finished(self, count: int, limit_s: float = 10.0) -> None:
        async with asyncio.timeout(limit_s):
            while len(self.finished) < count:
                self.changed.clear()
                await self.changed.wait()


def scheduler(max_batch: int = 4) -> Scheduler:
    return Scheduler(
        max_total=100,
        max_per_user=100,
        max_batch=max_batch,
        throughput=Throughput(initial_job_seconds=1.0),
        delivery_margin_s=0.0,
    )


def submit(sched: Scheduler, prompts: Iterable[str], user: int = 1) -> list[Job]:
    jobs = [Job.create(user_id=user, prompt=prompt, ttl_s=900) for prompt in prompts]
    for job in jobs:
        sched.submit(job)
    return jobs


async def run_worker(engine: object, sched: Scheduler, sink: Sink, max_batch: int) -> Worker:
    # The worker's side of the local backend: the scheduler behind a LocalQueue.
    worker = Worker(
        engine,
        LocalQueue(sched),
        sink,
        asyncio.get_running_loop(),
        max_batch=max_batch,
        throughput=sched.throughput,
        take_wait_s=0.05,
    )
    worker.start()
    return worker


async def stop(worker: Worker) -> None:
    worker.stop()
    assert await asyncio.to_thread(worker.join, 5.0)


async def test_batches_up_to_max_batch_on_one_thread_and_reports_on_the_loop() -> None:
    engine = FakeEngine(tokens=3)
    engine.release.clear()  # hold the first batch until all jobs are queued
    sched, sink = scheduler(), Sink()
    worker = await run_worker(engine, sched, sink, max_batch=4)
    jobs = submit(sched, [f"page {i}" for i in range(6)])
    assert await asyncio.to_thread(engine.started.wait, 5)
    engine.release.set()
    await sink.wait_finished(6)
    await stop(worker)
    assert all(len(call) <= 4 for call in engine.calls)
    assert sum(len(call) for call in engine.calls) == 6
    assert engine.threads == {"htmlbot-worker"}
    assert sink.wrong_thread == 0
    assert {job.state for job in jobs} == {JobState.DONE}
    assert all(job.result is not None and "<html>" in job.result.text for job in jobs)
    assert sched.throughput.samples == 6


async def test_an_exception_fails_only_that_batch_and_the_next_job_succeeds() -> None:
    engine = FakeEngine()
    sched, sink = scheduler(max_batch=1), Sink()
    worker = await run_worker(engine, sched, sink, max_batch=1)
    bad, good = submit(sched, [f"{BOOM} page", "fine page"])
    await sink.wait_finished(2)
    await stop(worker)
    assert bad.state is JobState.FAILED
    assert bad.error is not None and "RuntimeError" in bad.error
    assert good.state is JobState.DONE
    assert worker.alive is False


async def test_out_of_memory_retries_with_half_the_batch() -> None:
    engine = FakeEngine(oom_above=2, use_torch_oom=True)
    engine.release.clear()
    sched, sink = scheduler(max_batch=8), Sink()
    worker = await run_worker(engine, sched, sink, max_batch=8)
    jobs = [submit(sched, [f"p{i}"], user=i)[0] for i in range(8)]
    engine.release.set()
    await sink.wait_finished(8)
    await stop(worker)
    assert {job.state for job in jobs} == {JobState.DONE}
    sizes = [len(call) for call in engine.calls]
    assert max(sizes) > 2  # it tried big batches first
    assert worker.batch_sizes and max(worker.batch_sizes) <= 2
    assert worker.batch_cap <= 2


async def test_out_of_memory_on_a_single_job_fails_it_clearly() -> None:
    engine = FakeEngine(oom_above=0)
    sched, sink = scheduler(max_batch=2), Sink()
    worker = await run_worker(engine, sched, sink, max_batch=2)
    (job,) = submit(sched, ["huge"])
    await sink.wait_finished(1)
    await stop(worker)
    assert job.state is JobState.FAILED
    assert job.error is not None and "out of memory" in job.error


async def test_cancel_while_generating_comes_back_cancelled() -> None:
    engine = FakeEngine(tokens=200, token_delay_s=0.01)
    sched, sink = scheduler(), Sink()
    worker = await run_worker(engine, sched, sink, max_batch=4)
    (job,) = submit(sched, ["slow page"])
    assert await asyncio.to_thread(engine.started.wait, 5)
    await asyncio.sleep(0.05)
    sched.cancel(job.job_id)
    await sink.wait_finished(1)
    await stop(worker)
    assert job.state is JobState.CANCELLED
    assert job.result is not None and job.result.generated_tokens < 200


async def test_progress_is_throttled_and_marshalled_to_the_loop() -> None:
    engine = FakeEngine(tokens=60, token_delay_s=0.02)
    sched, sink = scheduler(), Sink()
    worker = await run_worker(engine, sched, sink, max_batch=4)
    (job,) = submit(sched, ["page"])
    await sink.wait_finished(1)
    await stop(worker)
    # 60 progress calls from the engine; at most one report per 0.5 s reaches the loop.
    assert job.result is not None
    assert 1 <= len(sink.progress) <= job.result.total_s / 0.5 + 1
    assert len(sink.progress) < 10
    assert sink.wrong_thread == 0


async def test_the_loop_stays_responsive_while_generating() -> None:
    engine = FakeEngine(tokens=100, token_delay_s=0.01)
    sched, sink = scheduler(), Sink()
    lag = LagMonitor(interval_s=0.01)
    monitor = asyncio.create_task(lag.run())
    worker = await run_worker(engine, sched, sink, max_batch=2)
    submit(sched, [f"p{i}" for i in range(4)], user=1)
    await sink.wait_finished(4)
    await stop(worker)
    monitor.cancel()
    assert lag.samples > 20
    assert lag.max_lag_s < 0.5  # blocking the loop would cost the whole generation time


async def test_continuous_engine_is_served_and_jobs_join_while_others_run() -> None:
    engine = FakeContinuousEngine(slots=4, tokens=20, token_delay_s=0.005)
    sched, sink = scheduler(max_batch=3), Sink()
    worker = await run_worker(engine, sched, sink, max_batch=3)
    assert worker.continuous
    jobs = [submit(sched, [f"p{i}"], user=i)[0] for i in range(7)]
    await sink.wait_finished(7)
    await stop(worker)
    assert {job.state for job in jobs} == {JobState.DONE}
    assert engine.max_active <= 3  # the worker's cap, below the engine's 4 slots
    assert engine.threads == {"htmlbot-worker"}


async def test_continuous_engine_failure_fails_running_jobs_and_restarts() -> None:
    engine = FakeContinuousEngine(slots=4, tokens=3)
    sched, sink = scheduler(max_batch=4), Sink()
    worker = await run_worker(engine, sched, sink, max_batch=4)
    (bad,) = submit(sched, [f"{BOOM}"], user=1)
    await sink.wait_finished(1)
    (good,) = submit(sched, ["fine"], user=2)
    await sink.wait_finished(2, limit_s=10)
    await stop(worker)
    assert bad.state is JobState.FAILED
    assert good.state is JobState.DONE
    assert engine.serve_calls >= 2


async def test_continuous_engine_oom_requeues_with_a_smaller_cap() -> None:
    engine = FakeContinuousEngine(slots=8, tokens=3, oom_above=2)
    engine.release.clear()
    sched, sink = scheduler(max_batch=8), Sink()
    jobs = [submit(sched, [f"p{i}"], user=i)[0] for i in range(6)]
    worker = await run_worker(engine, sched, sink, max_batch=8)
    engine.release.set()
    await sink.wait_finished(6)
    await stop(worker)
    assert {job.state for job in jobs} == {JobState.DONE}
    assert worker.batch_cap <= 2


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RuntimeError("CUDA out of memory. Tried to allocate"), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_out_of_memory(exc: BaseException, expected: bool) -> None:
    assert is_out_of_memory(exc) is expected


async def test_continuous_stop_lets_running_jobs_finish_then_stops_the_engine() -> None:
    engine = FakeContinuousEngine(slots=4, tokens=30, token_delay_s=0.01)
    engine.release.clear()
    sched, sink = scheduler(max_batch=4), Sink()
    jobs = [submit(sched, [f"p{i}"], user=i)[0] for i in range(2)]
    worker = await run_worker(engine, sched, sink, max_batch=4)
    async with asyncio.timeout(5):
        while sched.running_count < 2:  # noqa: ASYNC110 - no event for this
            await asyncio.sleep(0.01)
    engine.release.set()
    sched.close()
    worker.stop()
    assert await asyncio.to_thread(worker.join, 10.0)
    await sink.wait_finished(2)
    assert {job.state for job in jobs} == {JobState.DONE}  # finished, not cut off


async def test_continuous_cancel_running_after_the_deadline() -> None:
    engine = FakeContinuousEngine(slots=4, tokens=10_000, token_delay_s=0.005)
    sched, sink = scheduler(max_batch=4), Sink()
    worker = await run_worker(engine, sched, sink, max_batch=4)
    (job,) = submit(sched, ["endless"])
    assert await asyncio.to_thread(engine.started.wait, 5)
    worker.stop()
    assert not await asyncio.to_thread(worker.join, 0.3)  # still generating
    worker.cancel_running()
    assert await asyncio.to_thread(worker.join, 5.0)
    await sink.wait_finished(1)
    assert job.state is JobState.CANCELLED


async def test_a_failing_report_does_not_kill_the_worker() -> None:
    engine = FakeEngine()
    sched, sink = scheduler(max_batch=1), Sink()
    worker = await run_worker(engine, sched, sink, max_batch=1)
    original = worker._complete
    calls = 0

    def complete_once_broken(job: Job, result: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("bug in our own bookkeeping")
        original(job, result)  # type: ignore[arg-type]

    worker._complete = complete_once_broken  # type: ignore[method-assign]
    first, second = submit(sched, ["first", "second"])
    await sink.wait_finished(2)
    await stop(worker)
    assert first.state is JobState.FAILED and first.error is not None
    assert second.state is JobState.DONE


async def test_the_first_progress_seeds_the_eta_before_any_job_has_finished() -> None:
    # Held-out run: ETAs ~5x too high until the first job finished (the 60 s guess).
    engine = FakeEngine(tokens=400, token_delay_s=0.005)  # ~200 tokens/s, ~2 s a job
    sched, sink = scheduler(max_batch=1), Sink()
    sched.throughput.job_seconds = 60.0  # the settings' guess
    [job] = submit(sched, ["a long page"])
    job.request.sampling = SamplingParams(max_new_tokens=400)
    worker = await run_worker(engine, sched, sink, max_batch=1)
    async with asyncio.timeout(10):
        while not sink.progress:  # noqa: ASYNC110 - the sink offers no event per report
            await asyncio.sleep(0.02)
    seeded = sched.throughput.job_seconds
    assert sched.throughput.samples == 0  # nothing has finished yet
    assert seeded < 10.0  # 200 tokens (half the limit) at the measured rate, not 60 s
    await sink.wait_finished(1)
    await stop(worker)
