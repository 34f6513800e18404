"""The worker: the one thread that owns the engine (and so the GPU).

It takes up to ``max_batch`` jobs from its job source (the in-process scheduler, or Redis
when it runs as ``python -m bot.worker``) and runs them through the engine. If
the engine offers ``serve`` (a ContinuousGenerator) the worker hands it ``take`` and
``finished`` callbacks, so jobs join and leave between decode steps; otherwise it loops
over batched ``generate`` calls. Outcomes go to the source first (``finish``: only the
job's current owner may finish it, so a job taken over after a lost lease is never
reported twice), then to the sink through ``loop.call_soon_threadsafe``: the event loop
never waits on the engine.

An exception in generation fails only the jobs of that batch; on CUDA out-of-memory the
batch is retried in halves (down to single jobs) before those jobs fail.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from typing import Any, Protocol

from bot.jobs import Job, JobState
from bot.queue import JobSource
from bot.scheduler import Throughput
from model.errors import ModelError
from model.types import FinishReason, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

# Seconds between two progress reports of one job posted to the loop; the engine may
# report every token, and each report wakes the loop.
PROGRESS_INTERVAL_S = 0.5
# After an out-of-memory the batch cap is halved; this many good batches double it again.
RECOVER_AFTER_BATCHES = 20
MAX_ATTEMPTS = 3


class WorkerSink(Protocol):
    """What the worker reports; every method is called on the event loop."""

    def job_started(self, job: Job) -> None: ...

    def job_progress(self, job: Job) -> None: ...

    def job_finished(self, job: Job) -> None:
        """``job.state`` is DONE (``job.result`` set), FAILED (``job.error``) or CANCELLED."""
        ...


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's CUDA OOM (and the plain RuntimeError older builds raise)."""
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_gpu_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def failure_message(exc: BaseException) -> str:
    """The message a user sees when generation raised ``exc``."""
    if is_out_of_memory(exc):
        return "The GPU ran out of memory on this request, even on its own. Try a shorter prompt."
    if isinstance(exc, ModelError):
        return f"Generation failed: {exc}"
    name = type(exc).__name__
    return f"Generation failed because of an internal error ({name}). Please try again."


class Worker:
    """Runs jobs from ``source`` through ``engine`` on one dedicated thread.

    ``throughput`` (optional) is told each finished job's time and tokens, for ETAs.
    """

    def __init__(
        self,
        engine: Any,
        source: JobSource,
        sink: WorkerSink,
        loop: asyncio.AbstractEventLoop,
        *,
        max_batch: int,
        throughput: Throughput | None = None,
        take_wait_s: float = 0.2,
    ) -> None:
        self.engine = engine
        self.source = source
        self.throughput = throughput
        self.sink = sink
        self.loop = loop
        self.max_batch = max_batch
        self.batch_cap = max_batch
        self.take_wait_s = take_wait_s
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._orphans: dict[str, Job] = {}
        self._thread: threading.Thread | None = None
        self._good_batches = 0
        self._last_progress: dict[str, float] = {}
        self._seeded = False
        # Every job the engine holds now (both modes), by id.
        self._inflight: dict[str, Job] = {}
        self._inflight_lock = threading.Lock()
        self.batches_run = 0
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # the latest, for tests and logs

    @property
    def continuous(self) -> bool:
        """Whether the engine offers ``serve`` (continuous batching)."""
        return callable(getattr(self.engine, "serve", None))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="htmlbot-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Take no more jobs; stop once the running ones end (see :meth:`cancel_running`).

        A continuous engine cancels whatever runs when its ``stop`` event is set, so that
        event is only set once nothing runs any more.
        """
        self._draining.set()
        if not self.continuous:
            self._stop.set()
        else:
            self._stop_when_idle()
        self.source.wake()

    def cancel_running(self, note: str | None = None) -> None:
        """Set the cancel flag of every job the engine holds now (``note``: tell the user)."""
        with self._inflight_lock:
            running = list(self._inflight.values())
        for job in running:
            if note is not None:
                job.cancel_note = note
            job.request.cancel()

    def running_jobs(self) -> list[Job]:
        """The jobs the engine holds now."""
        with self._inflight_lock:
            return list(self._inflight.values())

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True if it has ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        log.info(
            "worker started (%s mode, max batch %d)",
            "continuous" if self.continuous else "batch",
            self.max_batch,
        )
        while not self._stop.is_set():
            try:
                if self.continuous:
                    self._serve_loop()
                else:
                    self._batch_loop()
            except Exception:
                # A bug of ours, not the engine's (those are caught per batch): keep serving.
                log.exception("worker loop failed; restarting it")
                self._stop.wait(1.0)
        log.info("worker stopped")

    def _batch_loop(self) -> None:
        while not self._stop.is_set():
            jobs = self.source.take(self.batch_cap, wait_s=self.take_wait_s)
            if not jobs:
                continue
            with self._inflight_lock:
                self._inflight.update((job.job_id, job) for job in jobs)
            try:
                self._run_batch(jobs)
            except Exception:
                log.exception("handling a batch of %d job(s) failed", len(jobs))
                for job in jobs:
                    if not job.state.terminal:
                        self._fail(job, "Something went wrong on our side. Please try again.")
            finally:
                with self._inflight_lock:
                    for job in jobs:
                        self._inflight.pop(job.job_id, None)

    def _run_batch(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._post(self.sink.job_started, job)
        started = time.perf_counter()
        try:
            results = self.engine.generate([job.request for job in jobs], self._progress)
            if len(results) != len(jobs):
                raise RuntimeError(
                    f"engine returned {len(results)} results for {len(jobs)} requests"
                )
        except Exception as exc:
            if is_out_of_memory(exc):
                self._on_batch_oom(jobs, exc)
            else:
                log.exception("generation failed for a batch of %d job(s)", len(jobs))
                for job in jobs:
                    self._fail(job, failure_message(exc))
            return
        wall = time.perf_counter() - started
        tokens = sum(r.generated_tokens for r in results)
        log.debug("batch of %d: %d tokens in %.2f s", len(jobs), tokens, wall)
        self.batches_run += 1
        self.batch_sizes.append(len(jobs))
        if self.throughput is not None:
            self.throughput.record_tokens(tokens)
        self._note_good_batch()
        for job, result in zip(jobs, results, strict=True):
            self._complete(job, result)

    def _on_batch_oom(self, jobs: list[Job], exc: BaseException) -> None:
        _free_gpu_memory()
        if len(jobs) == 1:
            log.error("out of memory on a single job %s", jobs[0].job_id)
            self._fail(jobs[0], failure_message(exc))
            return
        half = len(jobs) // 2
        self.batch_cap = max(1, min(self.batch_cap, half))
        self._good_batches = 0
        log.warning(
            "out of memory on a batch of %d; retrying as %d + %d", len(jobs), half, len(jobs) - half
        )
        for part in (jobs[:half], jobs[half:]):
            # One read of each cancel flag: a cancel landing between two reads would have
            # the job both reported cancelled and run again.
            fresh: list[Job] = []
            for job in part:
                if job.request.cancelled:
                    self._complete(job, _cancelled_result(job.request))
                else:
                    fresh.append(job)
            if fresh:
                self._run_batch(fresh)

    def _note_good_batch(self) -> None:
        if self.batch_cap >= self.max_batch:
            return
        self._good_batches += 1
        if self._good_batches >= RECOVER_AFTER_BATCHES:
            self.batch_cap = min(self.max_batch, self.batch_cap * 2)
            self._good_batches = 0
            log.info("batch cap raised back to %d", self.batch_cap)

    def _serve_loop(self) -> None:
        while not self._stop.is_set():
            error: Exception | None = None
            try:
                self.engine.serve(self._take, self._finished, self._progress, self._stop)
            except Exception as exc:
                error = exc
            with self._inflight_lock:
                stranded = list(self._inflight.values())
                orphans = dict(self._orphans)
                self._inflight.clear()
                self._orphans.clear()
            stranded += [job for job in orphans.values() if job not in stranded]
            if error is None:
                # serve() returned because we stopped it: what it gave back unfinished
                # was cancelled by the stop.
                for job in stranded:
                    self._complete(job, job.result or _cancelled_result(job.request))
                if not self._stop.is_set():
                    log.warning("engine.serve returned before stop; restarting it")
                continue
            for job in stranded:
                job.result = None
            if is_out_of_memory(error):
                _free_gpu_memory()
                self.batch_cap = max(1, len(stranded) // 2)
                self._good_batches = 0
                retry = [job for job in stranded if job.attempts < MAX_ATTEMPTS]
                log.warning(
                    "out of memory with %d running; cap now %d, requeueing %d",
                    len(stranded),
                    self.batch_cap,
                    len(retry),
                )
                self.source.requeue_front(retry)
                for job in stranded:
                    if job not in retry:
                        self._fail(job, failure_message(error))
            else:
                log.error(
                    "engine.serve failed with %d job(s) running",
                    len(stranded),
                    exc_info=error,
                )
                for job in stranded:
                    self._fail(job, failure_message(error))
                # Don't spin if the engine fails at once on every start.
                self._stop.wait(1.0)

    def _take(self, max_count: int, wait: bool) -> list[GenerationRequest]:
        if self._draining.is_set():
            self._stop_when_idle()
            return []
        with self._inflight_lock:
            room = min(max_count, self.batch_cap - len(self._inflight))
        if room <= 0:
            return []
        jobs = self.source.take(room, wait_s=self.take_wait_s if wait else 0.0)
        with self._inflight_lock:
            for job in jobs:
                self._inflight[job.job_id] = job
        for job in jobs:
            self._post(self.sink.job_started, job)
        return [job.request for job in jobs]

    def _finished(self, result: GenerationResult) -> None:
        with self._inflight_lock:
            job = self._inflight.pop(result.request_id, None)
            if (
                job is not None
                and result.finish_reason is FinishReason.CANCELLED
                and not job.request.cancelled
            ):
                # Nobody asked to cancel it: the engine is stopping or failing. Wait for
                # serve() to return or raise before deciding what to tell the user.
                job.result = result
                self._orphans[job.job_id] = job
                return
        if job is None:
            log.warning("engine finished unknown request %s", result.request_id)
            return
        if self.throughput is not None:
            self.throughput.record_tokens(result.generated_tokens)
        self._note_good_batch()
        self._complete(job, result)
        if self._draining.is_set():
            self._stop_when_idle()

    def _stop_when_idle(self) -> None:
        with self._inflight_lock:
            idle = not self._inflight
        if idle:
            self._stop.set()

    def _progress(self, request_id: str, tokens: int) -> None:
        with self._inflight_lock:
            job = self._inflight.get(request_id)
        if job is None:
            return
        job.tokens_so_far = tokens
        now = time.monotonic()
        if now - self._last_progress.get(request_id, 0.0) >= PROGRESS_INTERVAL_S:
            self._last_progress[request_id] = now
            self._seed_throughput(job, now)
            if not self.source.progress(job, tokens):
                # Cancelled, or no longer ours (another worker took it over): stop it.
                job.request.cancel()
            self._post(self.sink.job_progress, job)

    def _seed_throughput(self, job: Job, now: float) -> None:
        # Until a first job has finished, ETAs come from a guess (INITIAL_JOB_SECONDS, 60 s:
        # about 5x too high on a GPU). The first measured rate of a running job is a far
        # better one: half the answer limit at this speed (pages end at their closing tag,
        # well before the limit). Once, for the first job that reports progress.
        if self._seeded or job.started_at is None:
            return
        if self.throughput is not None and self.throughput.samples:
            self._seeded = True
            return
        elapsed = now - job.started_at
        if elapsed <= 0 or job.tokens_so_far <= 0:
            return
        self._seeded = True
        rate = job.tokens_so_far / elapsed
        expected = max(1, job.request.sampling.max_new_tokens // 2)
        if self.throughput is not None:
            self.throughput.seed_rate(rate, expected)
        else:
            seed = getattr(self.source, "seed_job_seconds", None)
            if seed is not None:
                seed(expected / rate)

    # -- outcomes --------------------------------------------------------------------

    def _complete(self, job: Job, result: GenerationResult) -> None:
        self._last_progress.pop(job.job_id, None)
        job.result = result
        job.tokens_so_far = result.generated_tokens
        if result.finish_reason is FinishReason.CANCELLED:
            state = JobState.CANCELLED
        else:
            state = JobState.DONE
            if self.throughput is not None:
                self.throughput.record_job(result.total_s)
        self._report(job, state)

    def _fail(self, job: Job, message: str) -> None:
        self._last_progress.pop(job.job_id, None)
        job.error = message
        self._report(job, JobState.FAILED)

    def _report(self, job: Job, state: JobState) -> None:
        if not self.source.finish(job, state):
            log.info("job %s was taken over by another worker; dropping this result", job.job_id)
            return
        self._post(self.sink.job_finished, job)

    def _post(self, callback: Any, job: Job) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, job)
        except RuntimeError:  # the loop is closed: we are shutting down anyway
            log.debug("loop closed; dropped a %s report for job %s", callback, job.job_id)


def _cancelled_result(request: GenerationRequest) -> GenerationResult:
    return GenerationResult(
        request_id=request.request_id,
        text="",
        finish_reason=FinishReason.CANCELLED,
        prompt_tokens=0,
        generated_tokens=0,
        time_to_first_token_s=0.0,
        total_s=0.0,
    )


if __name__ == "__main__":  # python -m bot.worker: the standalone GPU worker
    from bot.gpu_worker import main

    sys.exit(main())
