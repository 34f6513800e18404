"""Serving through Redis vs in process: the serving benchmark's workload on both queue paths.

For each concurrency, the closed-loop workload of ``bench.serving.run_phase`` (same prompts
and lengths, same seeds: 64-256-token prompts, ``--new-tokens`` new tokens, EOS ignored, a
CodeLlama-7B-shaped Llama with random bf16 weights and a merged LoRA) runs through

* ``local``: Scheduler + LocalQueue + Worker in this process (``run_phase`` itself);
* ``redis``: a real ``redis-server`` (started from ``--redis-server``), jobs submitted by an
  asyncio "bot" through ``RedisQueue.submit`` and their end read through
  ``read_deliveries`` (that is the latency measured, submit to delivery read), served by a
  Worker + RedisJobSource in this process on the *same engine* as ``local``;
* with ``--gpus N`` (N > 1) or ``--workers-per-gpu K`` (K > 1): worker processes, K per GPU,
  each with ``CUDA_VISIBLE_DEVICES`` set and its own engine, behind the same Redis:
  ``redis 1gpu`` (the K workers of GPU 0 alone) and ``redis Ngpu`` (all of them). The
  N-GPU phase runs N times the clients (the same load per GPU), so ``xN/x1`` is the
  aggregate tokens/s of N GPUs over one GPU's at equal load per GPU. ``per worker`` shows
  how many jobs each worker served: a worker takes as many queued jobs as its batch has
  room for, so one busy worker (polling every decode step) can starve an idle one
  (polling every ``--poll-s``). ``--fair-cap`` adds the N-GPU phase with each worker's
  batch capped at its share of the clients (``Ngpu capK``): what a fair-share take gives.

Local and in-process Redis phases of one concurrency run back to back in one process,
their order alternating from one concurrency (and repeat) to the next to cancel drift;
``--repeats 2`` runs each pair twice (ABBA). An untimed warm-up of every path comes first.

On the device (``nvidia-h200-x2``; carry ``.whl`` and ``.gl/redis``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1; set -o pipefail; \\
    python3 -m bench.queue_serving --redis-server .gl/redis/usr/bin/redis-server \\
        --gpus 2 --repeats 2 --fair-cap --json $OUT/queue_serving.json \\
        2>&1 | tee $OUT/queue_serving.log

(timeout_s 600; one GPU, ``nvidia-h200``: the same with ``--gpus 1``, no ``--fair-cap``).
Rows print as each concurrency ends and ``--json`` is rewritten then, so a run cut short
keeps what it measured. ``.gl/redis`` is Debian 12's ``redis-server`` and
``redis-tools`` unpacked with ``dpkg -x``, plus ``libjemalloc2`` and ``liblzf1`` (not on a
plain Ubuntu host): their folder ``usr/lib/x86_64-linux-gnu`` next to the binary is put on
``LD_LIBRARY_PATH`` for redis-server alone. It needs glibc 2.34+ and OpenSSL 3 (Ubuntu 22.04+,
Debian 12+). The smoke test on a CPU::

    python -m bench.queue_serving --redis-server .gl/redis/usr/bin/redis-server \\
        --cpu --small --concurrency 1,4 --new-tokens 16 [--gpus 2]

Redis runs without persistence (``--save '' --appendonly no``, as the tests' server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from bench.serving import (
    SMALL,
    TINY_CPU,
    JobRecord,
    Phase,
    add_lora,
    build_base,
    build_tokenizer,
    lag_sampler,
    make_description,
    run_phase,
)

if TYPE_CHECKING:
    from bot.jobs import Job
    from bot.queue.redis_queue import RedisQueue

log = logging.getLogger("bench.queue_serving")
T = TypeVar("T")

# The queue's limits, as bench.serving's scheduler has them.
MAX_TOTAL = 4096
MAX_PER_USER = 4
CONSUMER = "bench-bot"
# Lines of the worker processes' control protocol on their stdout start with this.
CONTROL = "@@queue_serving "
CHILD_READY_S = 1800.0  # building and warming up a 7B engine
CHILD_REPLY_S = 300.0  # a phase's stop waits for its last jobs
SAMPLE_S = 0.05  # batch-size samples, as run_phase takes them
READ_BLOCK_MS = 100  # the bot's XREADGROUP wait; new entries end it at once


def no_floor(batch: float, context: float) -> float:
    """Phase.summary's bandwidth floor: not measured here."""
    return float("nan")


# ------------------------------------------------------------------------------ redis


def redis_lib_dir(binary: str) -> Path | None:
    """The folder of libraries unpacked next to a ``dpkg -x``'d redis-server, if any."""
    root = Path(binary).resolve().parent.parent  # .../usr/bin/redis-server -> .../usr
    lib = root / "lib" / "x86_64-linux-gnu"
    return lib if (lib / "libjemalloc.so.2").exists() or (lib / "liblzf.so.1").exists() else None


@contextlib.contextmanager
def library_path(lib: Path | None) -> Iterator[None]:
    """``lib`` first on LD_LIBRARY_PATH while the block runs (for one child process)."""
    if lib is None:
        yield
        return
    before = os.environ.get("LD_LIBRARY_PATH")
    os.environ["LD_LIBRARY_PATH"] = f"{lib}:{before}" if before else str(lib)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = before


def redis_version(binary: str) -> str:
    """``redis-server --version``, run with the bundled libraries."""
    with library_path(redis_lib_dir(binary)):
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"{binary} --version failed ({done.returncode}): {done.stderr.strip()[-500:]}"
        )
    return done.stdout.strip()


def make_queue(client: Any, prefix: str, lease_s: float) -> RedisQueue:
    """A RedisQueue with bench.serving's limits (4 per user, 4096 in all)."""
    from bot.queue.redis_queue import RedisQueue

    return RedisQueue(
        client, prefix=prefix, max_total=MAX_TOTAL, max_per_user=MAX_PER_USER, lease_s=lease_s
    )


# ----------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class EngineArgs:
    """How every engine of a run is built (the main process's and each worker's)."""

    cpu: bool
    small: bool
    max_seq_len: int
    attention: str
    max_slots: int = 64

    def shape(self) -> dict[str, Any]:
        from bench.common import CODELLAMA_7B

        return TINY_CPU if self.cpu else SMALL if self.small else CODELLAMA_7B

    def flags(self) -> list[str]:
        """The command-line flags that rebuild these args in a worker process."""
        flags = ["--max-seq-len", str(self.max_seq_len), "--attention", self.attention]
        return flags + (["--cpu"] if self.cpu else []) + (["--small"] if self.small else [])


def build_engine(spec: EngineArgs) -> tuple[Any, Any, float]:
    """bench.serving's engine (random base + LoRA merged, 64 slots, warmed up); with its
    tokenizer and the seconds it took."""
    import torch

    from model.fast import FastEngine, FastEngineOptions

    device = torch.device("cpu" if spec.cpu else "cuda")
    dtype = torch.float32 if spec.cpu else torch.bfloat16
    shape = spec.shape()
    started = time.perf_counter()
    tokenizer = build_tokenizer(shape["vocab_size"])
    model = add_lora(build_base(shape, device, dtype))
    options = FastEngineOptions(
        max_seq_len=spec.max_seq_len,
        ignore_eos=True,
        attention=spec.attention,
        max_slots=spec.max_slots,
    )
    engine = FastEngine(model, tokenizer, model_name="codellama-7b-shape", options=options)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    engine.warmup(max_batch=spec.max_slots)
    return engine, tokenizer, time.perf_counter() - started


# ---------------------------------------------------------------------------- workers


class CountingSink:
    """The worker's reports: only counted (the bot side reads Redis)."""

    def __init__(self) -> None:
        self.finished = 0

    def job_started(self, job: Job) -> None:
        pass

    def job_progress(self, job: Job) -> None:
        pass

    def job_finished(self, job: Job) -> None:
        self.finished += 1


class RedisWorkerRun:
    """One Worker + RedisJobSource on ``engine`` serving one queue prefix, as
    ``bot.gpu_worker.serve`` runs them (no throughput object; the source's defaults)."""

    def __init__(
        self,
        engine: Any,
        url: str,
        name: str,
        *,
        lease_s: float,
        poll_s: float,
        max_batch: int | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.url = url
        self.name = name
        self.lease_s = lease_s
        self.poll_s = poll_s
        self._client: Any = None
        self._worker: Any = None
        self._sink = CountingSink()
        self._samples: list[int] = []
        self._sampler: asyncio.Task[None] | None = None

    async def start(self, prefix: str, max_batch: int | None = None) -> None:
        """Serve ``prefix``; ``max_batch`` (this phase's cap) overrides the run's."""
        from bot.queue.redis_queue import connect
        from bot.queue.redis_source import RedisJobSource
        from bot.worker import Worker

        loop = asyncio.get_running_loop()
        self._client = connect(self.url)
        queue = make_queue(self._client, prefix, self.lease_s)
        slots = min(self.engine.slots, max_batch or self.max_batch or self.engine.slots)
        source = RedisJobSource(
            queue, loop, self.name, self.lease_s, max_batch=slots, poll_s=self.poll_s
        )
        self._sink = CountingSink()
        self._samples = []
        self._worker = Worker(self.engine, source, self._sink, loop, max_batch=slots)
        reset_peak_memory()
        self._worker.start()
        self._sampler = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_S)
            self._samples.append(len(self._worker.running_jobs()))

    async def stop(self) -> dict[str, Any]:
        """Stop after the running jobs; what it served."""
        worker = self._worker
        worker.stop()
        if not await asyncio.to_thread(worker.join, CHILD_REPLY_S / 2):
            raise RuntimeError(f"worker {self.name} did not stop")
        if self._sampler is not None:
            self._sampler.cancel()
        await self._client.aclose()
        busy = [b for b in self._samples if b > 0]
        return {
            "name": self.name,
            "jobs": self._sink.finished,
            "mean_batch": statistics.mean(busy) if busy else 0.0,
            "peak_gpu_gb": peak_memory_bytes() / 1e9,
        }


def reset_peak_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes() -> int:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return 0


class WorkerPool(Protocol):
    """Whatever serves a phase's prefix: started before the clients, stopped after."""

    async def start(self, prefix: str) -> None: ...

    async def stop(self) -> list[dict[str, Any]]: ...


class InProcessPool:
    """One worker thread in this process, on the engine the local path uses too."""

    def __init__(self, run: RedisWorkerRun) -> None:
        self.run = run

    async def start(self, prefix: str) -> None:
        await self.run.start(prefix)

    async def stop(self) -> list[dict[str, Any]]:
        return [await self.run.stop()]


class Child:
    """A worker process (``--child``) and its line protocol over stdin/stdout."""

    def __init__(self, name: str, gpu: int, url: str, args: argparse.Namespace) -> None:
        self.name = name
        self.gpu = gpu
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        env["PYTHONUNBUFFERED"] = "1"
        spec: EngineArgs = args.engine
        command = [
            sys.executable,
            "-m",
            "bench.queue_serving",
            "--child",
            "--redis-url",
            url,
            "--name",
            name,
            "--lease-s",
            repr(args.lease_s),
            "--poll-s",
            repr(args.poll_s),
            *(["--max-batch", str(args.max_batch)] if args.max_batch else []),
            *spec.flags(),
        ]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.ready: dict[str, Any] = {}

    def send(self, message: dict[str, Any]) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(json.dumps(message) + "\n")
        stdin.flush()

    def _read(self) -> dict[str, Any]:
        stdout = self.process.stdout
        assert stdout is not None
        for line in stdout:
            if line.startswith(CONTROL):
                reply: dict[str, Any] = json.loads(line[len(CONTROL) :])
                return reply
            sys.stdout.write(f"[{self.name}] {line}")  # something else printed: pass it on
        code = self.process.wait()
        raise RuntimeError(f"worker process {self.name} exited (status {code})")

    async def receive(self, expect: str, timeout_s: float) -> dict[str, Any]:
        try:
            reply = await asyncio.wait_for(asyncio.to_thread(self._read), timeout_s)
        except TimeoutError:
            raise RuntimeError(
                f"worker process {self.name}: no '{expect}' in {timeout_s} s"
            ) from None
        if reply.get("op") != expect:
            raise RuntimeError(f"worker process {self.name}: {reply} instead of '{expect}'")
        return reply

    def close(self) -> None:
        """Ask it to quit; kill it if it won't."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send({"op": "quit"})
                assert self.process.stdin is not None
                self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ProcessPool:
    """Some of the worker processes, serving one prefix together; ``cap``: each one's
    batch limit for the phase (None: the run's)."""

    def __init__(self, children: list[Child], cap: int | None = None) -> None:
        self.children = children
        self.cap = cap

    async def start(self, prefix: str) -> None:
        for child in self.children:
            child.send({"op": "serve", "prefix": prefix, "max_batch": self.cap})
        await asyncio.gather(*(c.receive("serving", CHILD_REPLY_S) for c in self.children))

    async def stop(self) -> list[dict[str, Any]]:
        for child in self.children:
            child.send({"op": "stop"})
        replies = await asyncio.gather(
            *(c.receive("stopped", CHILD_REPLY_S) for c in self.children)
        )
        return [dict(reply["stats"]) for reply in replies]


# ----------------------------------------------------------------------------- phases


@dataclass
class RedisPhase:
    """A phase through Redis and what its workers said about it."""

    phase: Phase
    workers: list[dict[str, Any]] = field(default_factory=list)


async def run_redis_phase(
    client: Any,
    pool: WorkerPool,
    tokenizer: Any,
    name: str,
    *,
    concurrency: int,
    jobs: int,
    new_tokens: int,
    seed: int,
    lease_s: float,
    job_timeout_s: float = 600.0,
) -> RedisPhase:
    """``run_phase``'s closed loop (same draws from ``Random(seed)``), through Redis.

    A job's latency runs from just before ``submit`` to the moment ``read_deliveries``
    hands its event to the bot (``mark_delivered`` comes after, as the bot's does).
    """
    from bot.jobs import Job
    from model.prompting import encode_prompt
    from model.types import SamplingParams

    loop = asyncio.get_running_loop()
    prefix = f"qs-{uuid.uuid4().hex[:8]}"
    queue = make_queue(client, prefix, lease_s)
    rng = random.Random(seed)
    phase = Phase(name)
    sampling = SamplingParams(max_new_tokens=new_tokens)  # the bot's defaults: sampled
    template_tokens = len(encode_prompt(tokenizer, "a landing page"))
    futures: dict[str, asyncio.Future[tuple[float, Job]]] = {}

    done = asyncio.Event()

    async def deliveries() -> None:
        # Ended by ``done``, never cancelled: redis-py 8.1 can leave a task cancelled in a
        # blocking XREADGROUP waiting forever (seen here on Python 3.11).
        try:
            while not done.is_set():
                entries = await queue.read_deliveries(CONSUMER, count=256, block_ms=READ_BLOCK_MS)
                now = time.perf_counter()
                for _, job in entries:
                    future = futures.pop(job.job_id, None)
                    if future is not None and not future.done():
                        future.set_result((now, job))
                for entry_id, job in entries:
                    await queue.mark_delivered(job.job_id, entry_id)
        except Exception as exc:  # the clients waiting for deliveries must hear of it
            for future in futures.values():
                if not future.done():
                    future.set_exception(exc)
            raise

    async def one_job(user: int) -> None:
        target = rng.randint(64, 256)
        description = make_description(rng, max(1, target - template_tokens))
        job = Job.create(user_id=user, prompt=description, ttl_s=3600.0, sampling=sampling)
        future: asyncio.Future[tuple[float, Job]] = loop.create_future()
        futures[job.job_id] = future
        record = JobRecord(submitted=time.perf_counter())
        await queue.submit(job)
        try:
            record.finished, finished = await asyncio.wait_for(future, job_timeout_s)
        except TimeoutError:
            raise RuntimeError(
                f"{name}: job {job.job_id} not delivered in {job_timeout_s:.0f} s"
            ) from None
        record.state = finished.state.value
        result = finished.result
        if result is not None and record.state == "done":
            started = finished.started_at or finished.created_at
            record.prompt_tokens = result.prompt_tokens
            record.ttft = started - finished.created_at + result.time_to_first_token_s
            record.engine_ttft = result.time_to_first_token_s
            record.generated = result.generated_tokens
            record.decode_s = result.total_s - result.time_to_first_token_s
        phase.records.append(record)

    async def client_loop(user: int, count: int) -> None:
        for _ in range(count):
            await one_job(user)

    reader = asyncio.create_task(deliveries())
    workers: list[dict[str, Any]] = []
    try:
        await pool.start(prefix)
        lag_task = asyncio.create_task(lag_sampler(phase.lags))
        started = time.perf_counter()
        try:
            per_client = max(1, jobs // concurrency)
            await asyncio.gather(*(client_loop(u, per_client) for u in range(concurrency)))
        finally:
            phase.wall_s = time.perf_counter() - started
            lag_task.cancel()
            workers = await pool.stop()
    finally:
        done.set()
        await asyncio.wait({reader}, timeout=5 * READ_BLOCK_MS / 1000 + 5)
        if not reader.done():
            log.warning("%s: the delivery reader did not stop; leaving it behind", name)
    phase.mean_batch = sum(w["mean_batch"] for w in workers)
    phase.peak_bytes = int(max((w["peak_gpu_gb"] for w in workers), default=0.0) * 1e9)
    return RedisPhase(phase, workers)


def merge_workers(stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each worker's stats over the repeats: jobs added, mean batch averaged, peak max."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for item in stats:
        by_name.setdefault(item["name"], []).append(item)
    return [
        {
            "name": name,
            "jobs": sum(i["jobs"] for i in items),
            "mean_batch": statistics.mean(i["mean_batch"] for i in items),
            "peak_gpu_gb": max(i["peak_gpu_gb"] for i in items),
        }
        for name, items in by_name.items()
    ]


def run_bounded(main: Coroutine[Any, Any, T], grace_s: float = 10.0) -> T:
    """``asyncio.run`` whose exit can't hang: tasks still pending at the end get
    ``grace_s`` to honour their cancel (a redis-py read may never), then are left behind."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=grace_s))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def merge(phases: list[Phase]) -> Phase:
    """Repeats of one phase as one: records pooled, walls added (tokens/s over all)."""
    merged = Phase(phases[0].name)
    for phase in phases:
        merged.records += phase.records
        merged.lags += phase.lags
        merged.wall_s += phase.wall_s
        merged.peak_bytes = max(merged.peak_bytes, phase.peak_bytes)
    merged.mean_batch = statistics.mean(p.mean_batch for p in phases)
    return merged


# ------------------------------------------------------------------------------ table


COLUMNS = (
    f"{'phase':>6s} {'path':>10s} {'clients':>7s} {'jobs':>5s} {'tok/s':>9s} {'r/local':>7s} "
    f"{'e2e50':>7s} {'e2e99':>7s} {'ttft50':>7s} {'ttft99':>7s} {'batch':>6s} {'xN/x1':>6s} "
    f"{'per worker':>12s}"
)


def _num(value: float | None, width: int, digits: int) -> str:
    if value is None or value != value:
        return f"{'-':>{width}s}"
    return f"{value:{width}.{digits}f}"


def fmt(row: dict[str, Any]) -> str:
    """One line of the table."""
    split = "/".join(str(w["jobs"]) for w in row.get("workers", [])) or "-"
    return (
        f"{row['phase']:>6s} {row['path']:>10s} {row['clients']:7d} {row['jobs']:5d} "
        f"{row['tokens_per_s']:9.1f} {_num(row.get('ratio_vs_local'), 7, 3)} "
        f"{row['e2e_p50_s']:7.3f} {row['e2e_p99_s']:7.3f} {row['ttft_p50_s']:7.3f} "
        f"{row['ttft_p99_s']:7.3f} {row['mean_batch']:6.1f} "
        f"{_num(row.get('ratio_vs_1gpu'), 6, 3)} {split:>12s}"
    )


def row_of(
    phase: Phase, label: str, path: str, clients: int, workers: list[dict[str, Any]] | None
) -> dict[str, Any]:
    row = phase.summary(no_floor)
    row.update(phase=label, path=path, clients=clients)
    if workers is not None:
        row["workers"] = merge_workers(workers)
    return row


# ------------------------------------------------------------------------------ main


@dataclass
class Paths:
    """What serves each path in this run."""

    engine: Any
    tokenizer: Any
    client: Any
    inprocess: InProcessPool
    one_gpu: ProcessPool | None = None
    all_gpus: ProcessPool | None = None


async def local(paths: Paths, label: str, c: int, args: argparse.Namespace, **kw: Any) -> Phase:
    return await run_phase(
        paths.engine,
        paths.tokenizer,
        label,
        concurrency=c,
        jobs=c * args.rounds,
        rate=None,
        new_tokens=kw.get("new_tokens", args.new_tokens),
        seed=c,
    )


async def redis(
    paths: Paths, pool: WorkerPool, label: str, c: int, args: argparse.Namespace, **kw: Any
) -> RedisPhase:
    return await run_redis_phase(
        paths.client,
        pool,
        paths.tokenizer,
        label,
        concurrency=c,
        jobs=c * args.rounds,
        new_tokens=kw.get("new_tokens", args.new_tokens),
        seed=c,
        lease_s=args.lease_s,
        job_timeout_s=args.job_timeout_s,
    )


async def warm_up(paths: Paths, args: argparse.Namespace, concurrencies: list[int]) -> None:
    """Every path once, untimed, at the largest concurrency with a few tokens."""
    c, tokens = max(concurrencies), min(args.new_tokens, 32)
    print(f"warm-up: every path at c={c}, {tokens} new tokens", flush=True)
    await local(paths, "warm", c, args, new_tokens=tokens)
    await redis(paths, paths.inprocess, "warm", c, args, new_tokens=tokens)
    if paths.one_gpu is not None:
        await redis(paths, paths.one_gpu, "warm", c, args, new_tokens=tokens)
    if paths.all_gpus is not None:
        await redis(paths, paths.all_gpus, "warm", c * args.gpus, args, new_tokens=tokens)


async def measure(paths: Paths, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Every concurrency's phases (orders alternating): the table's rows, printed and put in
    ``report["rows"]`` (written to ``--json`` too) as each concurrency ends."""
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    await warm_up(paths, args, concurrencies)
    print(COLUMNS, flush=True)
    rows: list[dict[str, Any]] = report.setdefault("rows", [])
    for index, c in enumerate(concurrencies):
        label = f"c={c}"
        pools = phase_pools(paths, args, c)
        runs: dict[str, list[Phase]] = {path: [] for path in pools}
        runs["local"] = []
        workers: dict[str, list[dict[str, Any]]] = {path: [] for path in pools}
        for repeat in range(args.repeats):
            flip = (index + repeat) % 2 == 1
            # Pairs in turn: local/redis on this engine, then the worker processes' paths.
            order = ["redis", "local"] if flip else ["local", "redis"]
            rest = [path for path in pools if path != "redis"]
            order += rest[::-1] if flip else rest
            for path in order:
                if path == "local":
                    runs["local"].append(await local(paths, label, c, args))
                    progress(runs["local"][-1], path, repeat)
                    continue
                pool, clients = pools[path]
                measured = await redis(paths, pool, label, clients, args)
                runs[path].append(measured.phase)
                workers[path] += measured.workers
                progress(measured.phase, path, repeat)
        base = row_of(merge(runs["local"]), label, "local", c, None)
        new_rows = [base]
        for path, (_, clients) in pools.items():
            new_rows.append(row_of(merge(runs[path]), label, path, clients, workers[path]))
        one = next((row for row in new_rows if row["path"] == "redis 1gpu"), None)
        for row in new_rows:
            if row["clients"] == c and row["path"] != "local":
                row["ratio_vs_local"] = row["tokens_per_s"] / base["tokens_per_s"]
            if one is not None and row["clients"] > c:
                row["ratio_vs_1gpu"] = row["tokens_per_s"] / one["tokens_per_s"]
        for row in new_rows:
            print(fmt(row), flush=True)
        rows += new_rows
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))


def phase_pools(
    paths: Paths, args: argparse.Namespace, c: int
) -> dict[str, tuple[WorkerPool, int]]:
    """The Redis paths of concurrency ``c``: path name -> (what serves it, clients)."""
    pools: dict[str, tuple[WorkerPool, int]] = {"redis": (paths.inprocess, c)}
    if paths.one_gpu is not None:
        pools["redis 1gpu"] = (paths.one_gpu, c)
    if paths.all_gpus is not None:
        children = paths.all_gpus.children
        pools[f"redis {args.gpus}gpu"] = (paths.all_gpus, c * args.gpus)
        if args.fair_cap:
            # Each worker capped at its share: what a fair-share take would give.
            cap = -(-c * args.gpus // len(children))
            pools[f"{args.gpus}gpu cap{cap}"] = (ProcessPool(children, cap), c * args.gpus)
    return pools


def progress(phase: Phase, path: str, repeat: int) -> None:
    """One phase's tokens/s as soon as it ends (the table comes per concurrency)."""
    row = phase.summary(no_floor)
    print(
        f"  ({phase.name} {path} #{repeat + 1}: {row['jobs']} jobs, "
        f"{row['tokens_per_s']:.1f} tok/s, {phase.wall_s:.1f} s)",
        flush=True,
    )


def start_children(args: argparse.Namespace, url: str, gpus: list[int]) -> list[Child]:
    return [
        Child(f"gpu{gpu}-w{k}", gpu, url, args) for gpu in gpus for k in range(args.workers_per_gpu)
    ]


def run_all(args: argparse.Namespace, url: str, report: dict[str, Any]) -> None:
    """Build the engines (this process's in its main thread: CUDA graphs and compiled
    kernels are made where they always are), then measure every path."""
    multi = args.gpus > 1 or args.workers_per_gpu > 1
    children: list[Child] = []
    try:
        if multi:
            # GPU 0's workers start once this process's engine is built (less memory at once,
            # and each engine's 64 slots fit for sure).
            children += start_children(args, url, list(range(1, args.gpus)))
        engine, tokenizer, seconds = build_engine(args.engine)
        print(f"engine: {engine.slots} slots, ready in {seconds:.1f} s", flush=True)
        report["engine"] = {"slots": engine.slots, "ready_s": seconds}
        if multi:
            children = start_children(args, url, [0]) + children
        run_bounded(serve_all(args, url, report, engine, tokenizer, children))
    finally:
        for child in children:
            child.close()


async def serve_all(
    args: argparse.Namespace,
    url: str,
    report: dict[str, Any],
    engine: Any,
    tokenizer: Any,
    children: list[Child],
) -> None:
    """Wait for the worker processes (if any), then run every phase."""
    from bot.queue.redis_queue import connect

    if children:
        try:
            readies = await asyncio.gather(*(c.receive("ready", CHILD_READY_S) for c in children))
        except RuntimeError as exc:
            # Keep the one-engine comparison rather than lose the whole run.
            print(f"worker processes failed ({exc}); measuring in process only", flush=True)
            report["worker_processes_error"] = str(exc)
            for child in children:
                child.close()
            children = []
        else:
            for child, ready in zip(children, readies, strict=True):
                print(f"worker process {child.name}: {ready}", flush=True)
            report["worker_processes"] = readies
    client = connect(url)
    try:
        run = RedisWorkerRun(engine, url, "inproc", lease_s=args.lease_s, poll_s=args.poll_s)
        paths = Paths(engine, tokenizer, client, InProcessPool(run))
        if children:
            paths.one_gpu = ProcessPool([c for c in children if c.gpu == 0])
            if args.gpus > 1:
                paths.all_gpus = ProcessPool(children)
        await measure(paths, args, report)
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-server", help="the redis-server binary to start")
    parser.add_argument("--small", action="store_true", help="a 4-layer model: smoke test")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (tiny model)")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=2, help="jobs per client")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each phase (ABBA)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs with worker processes")
    parser.add_argument("--workers-per-gpu", type=int, default=1)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--attention", default="auto", choices=["auto", "triton", "sdpa", "matmul"])
    parser.add_argument("--lease-s", type=float, default=30.0, help="WORKER_LEASE_S")
    parser.add_argument(
        "--poll-s", type=float, default=0.1, help="RedisJobSource's poll interval when idle"
    )
    parser.add_argument(
        "--job-timeout-s",
        type=float,
        default=600.0,
        help="a Redis job not delivered by then fails the run",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="MAX_BATCH of the worker processes (default: the engine's slots, as unset)",
    )
    parser.add_argument(
        "--fair-cap",
        action="store_true",
        help="also run the N-GPU phase with each worker's batch capped at its share",
    )
    parser.add_argument("--json", type=Path, default=None)
    # A worker process: started by the main one, never by hand.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.engine = EngineArgs(args.cpu, args.small, args.max_seq_len, args.attention)
    if args.child:
        return child_main(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.redis_server:
        parser.error("--redis-server PATH is required")
    problem = check_device(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2

    import torch
    import transformers

    from tests.redis_server import RedisServer

    version = redis_version(args.redis_server)
    card = "cpu" if args.cpu else torch.cuda.get_device_name()
    report: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "card": card,
        "redis_server": version,
    }
    print(f"card: {card}; {report['versions']}; {version}", flush=True)
    with tempfile.TemporaryDirectory(prefix="queue-serving-") as folder:
        server = RedisServer(Path(folder), binary=args.redis_server)
        with library_path(redis_lib_dir(args.redis_server)):
            server.start()
        try:
            run_all(args, server.url, report)
        finally:
            server.stop()
    summarize(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


def check_device(args: argparse.Namespace) -> str | None:
    """Why this run can't go ahead here, or None."""
    if min(args.gpus, args.workers_per_gpu, args.repeats, args.rounds) < 1:
        return "--gpus, --workers-per-gpu, --repeats and --rounds must be at least 1"
    if args.cpu:
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU here; use --cpu --small for a smoke test"
    if torch.cuda.device_count() < args.gpus:
        return f"--gpus {args.gpus}, but only {torch.cuda.device_count()} GPU(s) are visible"
    return None


def summarize(report: dict[str, Any]) -> None:
    """The lines the issue asks about: redis/local on one GPU, N GPUs over one."""
    rows = report.get("rows", [])
    for row in rows:
        if row["path"] == "redis":
            print(f"{row['phase']}: redis/local on one engine {row['ratio_vs_local']:.3f}")
        if "ratio_vs_1gpu" in row:
            print(
                f"{row['phase']} per GPU: {row['path']} / redis 1gpu tokens/s "
                f"{row['ratio_vs_1gpu']:.3f}"
            )


# ------------------------------------------------------------------------ worker process


def child_main(args: argparse.Namespace) -> int:
    """A worker process: build the engine, say ready, then serve prefixes when told."""
    global _control
    # The control lines get stdout's pipe to themselves; whatever else writes to fd 1 (a C
    # library too) goes to stderr, so it can neither garble nor fill the pipe.
    _control = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [{args.name}] %(name)s %(message)s"
    )
    if args.cpu:
        import torch

        torch.set_num_threads(1)  # several workers share the CPU
    engine, _tokenizer, seconds = build_engine(args.engine)
    card = "cpu"
    if not args.cpu:
        import torch

        card = torch.cuda.get_device_name()
    reply(
        {
            "op": "ready",
            "slots": engine.slots,
            "ready_s": seconds,
            "card": card,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
    )
    run = RedisWorkerRun(
        engine,
        args.redis_url,
        args.name,
        lease_s=args.lease_s,
        poll_s=args.poll_s,
        max_batch=args.max_batch,
    )
    run_bounded(child_loop(run))
    return 0


_control: Any = None  # a worker process's channel to the main one (child_main)


def reply(message: dict[str, Any]) -> None:
    """One control line to the main process."""
    out = _control or sys.stdout
    out.write(CONTROL + json.dumps(message) + "\n")
    out.flush()


async def child_loop(run: RedisWorkerRun) -> None:
    """Commands, one a line on stdin: serve PREFIX, stop, quit (or end of input)."""
    serving = False
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        op = command.get("op")
        if op == "serve" and not serving:
            await run.start(str(command["prefix"]), command.get("max_batch"))
            serving = True
            reply({"op": "serving"})
        elif op == "stop" and serving:
            stats = await run.stop()
            serving = False
            reply({"op": "stopped", "stats": stats})
        elif op == "quit":
            break
        else:
            reply({"op": "error", "command": command})
    if serving:
        await run.stop()


if __name__ == "__main__":
    sys.exit(main())
