"""Serving benchmark: the fast engine behind the bot's own scheduler and worker.

Runs offline on one GPU: a CodeLlama-7B-shaped Llama with random weights is built on the
GPU in bf16 with a LoRA r=16 adapter (non-zero B) that the engine merges. /html jobs
(prompts of 64-256 tokens, 512 new tokens, EOS ignored) go through ``bot.scheduler`` and
``bot.worker`` exactly as the Discord side submits them, at concurrency 1, 8, 32 and at a
Poisson arrival rate. In the same run: the seed's path (NF4 + unmerged peft adapter, HF
``generate``, one job at a time) for the ratio, and the engine's 4-bit path at batch 1.

    python -m bench.serving                 # the full run (H100: about 5 minutes)
    python -m bench.serving --small         # a 4-layer model, a minute: a smoke test
    python -m bench.serving --small --cpu   # the same on CPU (no 4-bit, no graphs)

Prints tables; ``--json PATH`` writes every number. Random weights cost the same time as
real ones; tokens/s counts generated tokens of all jobs together.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import gc
import json
import logging
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import CODELLAMA_7B, random_llama

log = logging.getLogger("bench.serving")

SMALL: dict[str, Any] = {
    **CODELLAMA_7B,
    "num_hidden_layers": 4,
    "hidden_size": 1024,
    "intermediate_size": 2816,
}
TINY_CPU: dict[str, Any] = {
    **CODELLAMA_7B,
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


# ------------------------------------------------------------------------------ model


def build_tokenizer(vocab_size: int) -> Any:
    """A real (fast, word-level) HF tokenizer of exactly ``vocab_size`` ids, built offline.

    CodeLlama's tokenizer can't be downloaded here; for speed only the ids' count matters.
    The template's words are in the vocabulary so prompts tokenize like text.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from model.prompting import SYSTEM_PROMPT

    specials = ["<unk>", "<s>", "</s>"]
    words = sorted(
        set((SYSTEM_PROMPT + " [INST] [/INST] <<SYS>> <</SYS>> Create a web page:").split())
    )
    vocab_words = specials + words
    vocab_words += [f"w{i}" for i in range(vocab_size - len(vocab_words))]
    vocab = {word: i for i, word in enumerate(vocab_words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.pad_token = "<unk>"
    return tokenizer


def build_base(shape: dict[str, Any], device: Any, dtype: Any) -> Any:
    """A Llama with random weights made directly on ``device`` (no download, no CPU copy)."""
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return random_llama(config, device, dtype).eval()


def add_lora(model: Any) -> Any:
    """A LoRA r=16, alpha 64 on every projection, B non-zero (it really changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from training.config import DEFAULT_TARGET_MODULES

    torch.manual_seed(1)
    config = LoraConfig(
        r=16,
        lora_alpha=64,
        target_modules=list(DEFAULT_TARGET_MODULES),
        init_lora_weights=False,
    )
    return get_peft_model(model, config).eval()


def quantized_copy(base: Any) -> Any:
    """An NF4 (double-quant) copy of ``base``'s decoder linears, as the seed loaded it.

    Quantized from the GPU weights layer by layer (no checkpoint on disk); embeddings,
    norms, rotary tables and lm_head are shared with ``base`` (bitsandbytes leaves lm_head
    unquantized too).
    """
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        quantized = LlamaForCausalLM(base.config)
    quantized.model.embed_tokens = base.model.embed_tokens
    quantized.model.norm = base.model.norm
    quantized.model.rotary_emb = base.model.rotary_emb
    quantized.lm_head = base.lm_head
    for mine, theirs in zip(quantized.model.layers, base.model.layers, strict=True):
        mine.input_layernorm = theirs.input_layernorm
        mine.post_attention_layernorm = theirs.post_attention_layernorm
        for owner, source in ((mine.self_attn, theirs.self_attn), (mine.mlp, theirs.mlp)):
            for name, linear in list(source.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                params: Any = bnb.nn.Params4bit(
                    linear.weight.data,
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                q.weight = params.to(linear.weight.device)  # quantizes on the GPU
                setattr(owner, name, q)
    quantized.generation_config = base.generation_config
    # What transformers sets after a bitsandbytes load; peft then wraps with its 4-bit LoRA.
    setattr(quantized, "is_loaded_in_4bit", True)  # noqa: B010
    return quantized.eval()


# --------------------------------------------------------------------------- measuring


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def measure_bandwidth(device: Any) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    import torch

    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 * 1024**3 / seconds


def weight_bytes(model: Any) -> int:
    """Bytes a decode step must read: every parameter except the embedding table."""
    total = 0
    embed = model.get_input_embeddings().weight
    for param in model.parameters():
        if param is embed and model.lm_head.weight is not embed:
            continue
        total += param.numel() * param.element_size()
    return total


def floor_tokens_per_s(
    bandwidth: float, weights: int, kv_per_token: int, batch: float, context: float
) -> float:
    """Tokens/s if a step moved only weights + each live sequence's KV, at ``bandwidth``."""
    step_bytes = weights + batch * context * kv_per_token
    return batch * bandwidth / step_bytes


@dataclass
class JobRecord:
    submitted: float
    prompt_tokens: int = 0
    finished: float = 0.0
    ttft: float = 0.0
    engine_ttft: float = 0.0
    generated: int = 0
    decode_s: float = 0.0
    state: str = ""


@dataclass
class Phase:
    name: str
    records: list[JobRecord] = field(default_factory=list)
    wall_s: float = 0.0
    lags: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    mean_batch: float = 0.0
    token_gaps: list[float] = field(default_factory=list)  # Poisson phases only
    prefill: dict[str, int] = field(default_factory=dict)  # the engine's counts, this phase

    def summary(self, floor: Callable[[float, float], float]) -> dict[str, Any]:
        done = [r for r in self.records if r.state == "done"]
        ttft = [r.ttft for r in done]
        tpot = [r.decode_s / max(1, r.generated - 1) for r in done]
        e2e = [r.finished - r.submitted for r in done]
        tokens = sum(r.generated for r in done)
        rate = tokens / self.wall_s if self.wall_s else 0.0
        context = statistics.mean(r.prompt_tokens + r.generated / 2 for r in done) if done else 0
        ideal = floor(max(self.mean_batch, 1.0), context)
        return {
            "phase": self.name,
            "jobs": len(done),
            "failed": len(self.records) - len(done),
            "tokens": tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": rate,
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99),
            "engine_ttft_p50_s": percentile([r.engine_ttft for r in done], 50),
            "engine_ttft_p99_s": percentile([r.engine_ttft for r in done], 99),
            "tpot_p50_ms": 1000 * percentile(tpot, 50),
            "tpot_p99_ms": 1000 * percentile(tpot, 99),
            "e2e_p50_s": percentile(e2e, 50),
            "e2e_p99_s": percentile(e2e, 99),
            "mean_batch": self.mean_batch,
            "floor_tokens_per_s": ideal,
            "fraction_of_floor": rate / ideal if ideal == ideal and ideal > 0 else float("nan"),
            "loop_lag_p99_ms": 1000 * percentile(self.lags, 99),
            "loop_lag_max_ms": 1000 * max(self.lags, default=0.0),
            "peak_gpu_gb": self.peak_bytes / 1e9,
            "token_gap_p99_ms": 1000 * percentile(self.token_gaps, 99),
            "token_gap_max_ms": 1000 * max(self.token_gaps, default=float("nan")),
            "prefill_computed_tokens": self.prefill.get("computed_tokens", 0),
            "prefill_reused_tokens": self.prefill.get("reused_tokens", 0),
            "prefill_cuts": self.prefill.get("cuts", 0),
            "prefill_forwards": self.prefill.get("forwards", 0),
            "prefill_s": self.prefill.get("seconds", 0.0),
        }


class Sink:
    """The worker's reports, on the event loop: completes one future per job."""

    def __init__(self) -> None:
        self.futures: dict[str, asyncio.Future[Any]] = {}

    def job_started(self, job: Any) -> None:
        pass

    def job_progress(self, job: Any) -> None:
        pass

    def job_finished(self, job: Any) -> None:
        future = self.futures.pop(job.job_id, None)
        if future is not None and not future.done():
            future.set_result(job)


class TokenGaps:
    """The engine as the worker sees it, with every token's progress report timed: the
    gaps between two tokens of one job (a prefill of newcomers stalls every running one).

    The engine reports each token (``progress_interval_s=0`` for the phase); the worker still
    gets them at the engine's usual pace, so its own work stays as it was.
    """

    def __init__(self, engine: Any, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.gaps: list[float] = []

    def serve(self, take: Any, finished: Any, progress: Any, stop: Any) -> None:
        last: dict[str, float] = {}
        passed: dict[str, float] = {}

        def timed(request_id: str, tokens: int) -> None:
            now = time.perf_counter()
            before = last.get(request_id)
            if before is not None:
                self.gaps.append(now - before)
            last[request_id] = now
            if now - passed.get(request_id, 0.0) >= self.interval_s:
                passed[request_id] = now
                progress(request_id, tokens)

        self.engine.serve(take, finished, timed, stop)


async def lag_sampler(lags: list[float], interval: float = 0.005) -> None:
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        lags.append(max(0.0, loop.time() - start - interval))


def make_description(rng: random.Random, words: int) -> str:
    return "a landing page " + " ".join(f"w{rng.randrange(1000, 30000)}" for _ in range(words))


async def run_phase(
    engine: Any,
    tokenizer: Any,
    name: str,
    *,
    concurrency: int | None,
    jobs: int,
    rate: float | None,
    new_tokens: int,
    seed: int,
    long_every: int = 0,
) -> Phase:
    """Submit ``jobs`` jobs: closed loop of ``concurrency`` clients, or Poisson at ``rate``/s.

    Poisson phases also time every token (:class:`TokenGaps`); with ``long_every`` every
    such job in that many carries a refine-sized prompt (1,000-2,000 tokens, within
    ``max_seq_len``).
    """
    import torch

    from bot.jobs import Job
    from bot.queue.local import LocalQueue
    from bot.scheduler import Scheduler, Throughput
    from bot.worker import Worker
    from model.prompting import encode_prompt
    from model.types import SamplingParams

    loop = asyncio.get_running_loop()
    throughput = Throughput(30.0)
    scheduler = Scheduler(
        max_total=4096, max_per_user=4, max_batch=engine.slots, throughput=throughput
    )
    sink = Sink()
    options = engine.options
    gaps = TokenGaps(engine, options.progress_interval_s) if rate is not None else None
    if gaps is not None:
        engine.options = dataclasses.replace(options, progress_interval_s=0.0)
    worker = Worker(
        gaps or engine,
        LocalQueue(scheduler),
        sink,
        loop,
        max_batch=engine.slots,
        throughput=throughput,
    )
    counts_before = dataclasses.asdict(engine.prefill_stats)
    longest_prompt = options.max_seq_len - new_tokens - 128
    rng = random.Random(seed)
    phase = Phase(name)
    batch_samples: list[int] = []
    sampling = SamplingParams(max_new_tokens=new_tokens)  # the bot's defaults: sampled
    template_tokens = len(encode_prompt(tokenizer, "a landing page"))

    async def one_job(user: int) -> None:
        target = rng.randint(64, 256)
        if long_every and user % long_every == long_every - 1:
            target = max(target, min(rng.randint(1000, 2000), longest_prompt))
        description = make_description(rng, max(1, target - template_tokens))
        job = Job.create(user_id=user, prompt=description, ttl_s=3600.0, sampling=sampling)
        record = JobRecord(submitted=time.perf_counter())
        future: asyncio.Future[Any] = loop.create_future()
        sink.futures[job.job_id] = future
        scheduler.submit(job)
        finished = await future
        record.finished = time.perf_counter()
        record.state = finished.state.value
        result = finished.result
        if result is not None and record.state == "done":
            queued = (finished.started_at or finished.created_at) - finished.created_at
            record.prompt_tokens = result.prompt_tokens
            record.ttft = queued + result.time_to_first_token_s
            record.engine_ttft = result.time_to_first_token_s
            record.generated = result.generated_tokens
            record.decode_s = result.total_s - result.time_to_first_token_s
        phase.records.append(record)

    async def client(user: int, count: int) -> None:
        for _ in range(count):
            await one_job(user)

    async def batch_sampler() -> None:
        while True:
            await asyncio.sleep(0.05)
            batch_samples.append(scheduler.running_count)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    worker.start()
    lag_task = asyncio.create_task(lag_sampler(phase.lags))
    batch_task = asyncio.create_task(batch_sampler())
    started = time.perf_counter()
    try:
        if concurrency is not None:
            per_client = max(1, jobs // concurrency)
            await asyncio.gather(*(client(u, per_client) for u in range(concurrency)))
        else:
            assert rate is not None
            tasks = []
            for user in range(jobs):
                tasks.append(asyncio.create_task(one_job(user)))
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)
    finally:
        phase.wall_s = time.perf_counter() - started
        lag_task.cancel()
        batch_task.cancel()
        worker.stop()
        await asyncio.to_thread(worker.join, 60)
        engine.options = options
    counts = dataclasses.asdict(engine.prefill_stats)
    phase.prefill = {key: counts[key] - counts_before[key] for key in counts}
    phase.token_gaps = gaps.gaps if gaps is not None else []
    busy = [b for b in batch_samples if b > 0]
    phase.mean_batch = statistics.mean(busy) if busy else 0.0
    if torch.cuda.is_available():
        phase.peak_bytes = torch.cuda.max_memory_allocated()
    return phase


# ----------------------------------------------------------------------- baselines


def seed_path(model: Any, tokenizer: Any, jobs: int, new_tokens: int) -> dict[str, Any]:
    """The seed's way: HF ``generate`` on NF4 + unmerged adapter, one job at a time."""
    import torch

    from model.prompting import encode_prompt

    rng = random.Random(7)
    times = []
    tokens = 0
    for i in range(jobs + 1):  # the first is a warm-up
        ids = torch.tensor([encode_prompt(tokenizer, make_description(rng, 100))], device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens if i else 8,
                min_new_tokens=new_tokens if i else 8,
                do_sample=False,
                pad_token_id=0,
            )
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
            tokens += out.shape[1] - ids.shape[1]
    return {"jobs": jobs, "tokens": tokens, "tokens_per_s": tokens / sum(times)}


def single_stream(engine: Any, new_tokens: int) -> dict[str, Any]:
    """One request alone through ``engine.generate`` (after a short warm-up one)."""
    from model.types import GenerationRequest, SamplingParams

    engine.generate([GenerationRequest("warm up", sampling=SamplingParams(max_new_tokens=16))])
    request = GenerationRequest(
        make_description(random.Random(3), 100),
        sampling=SamplingParams(max_new_tokens=new_tokens),
    )
    [result] = engine.generate([request])
    decode = result.total_s - result.time_to_first_token_s
    return {
        "tokens": result.generated_tokens,
        "ttft_s": result.time_to_first_token_s,
        "tokens_per_s": result.generated_tokens / result.total_s,
        "decode_tokens_per_s": (result.generated_tokens - 1) / decode,
    }


def step_times(
    engine: Any, batches: list[int], context: int, mixed: bool = False
) -> list[dict[str, Any]]:
    """Median time of one captured decode step (graph replay) per batch size.

    Every row at ``context - 64`` keys, or with ``mixed`` each row at a served page's midpoint
    (a 64-256-token prompt plus 256 generated tokens) in the same context bucket.
    """
    import torch

    runner = engine.runner
    rng = random.Random(5)
    rows = []
    for b in batches:
        if b > runner.slots:
            continue
        if mixed:
            keys = [min(rng.randint(64, 256) + 256, context) for _ in range(b)]
        else:
            keys = [context - 64] * b
        positions = torch.tensor([k - 1 for k in keys], device=runner.cache.positions.device)
        runner.cache.positions[:b] = positions
        runner.decode(b, context)  # captures if needed
        graphs = runner.graphs
        graph = graphs.captured[(graphs.batch_bucket(b), graphs.context_bucket(context))]

        def rewind(b: int = b, positions: Any = positions) -> None:
            runner.cache.positions[:b] = positions  # the step advances them

        ms = _median_ms(graph.replay, 30, prepare=rewind)
        rows.append(
            {
                "batch": b,
                "context": context,
                "mean_keys": statistics.mean(keys),
                "step_ms": ms,
                "tokens_per_s": b / ms * 1000,
            }
        )
    return rows


def prefill_times(engine: Any, rounds: int = 4) -> list[dict[str, Any]]:
    """Wall time of a prefill (prompts in, first logits out) for prompt lengths not seen before.

    The engine's own backends (flash / memory-efficient) against every backend enabled (SDPA's
    default choice, which on an H100 is cuDNN: it builds an execution plan for every new shape).
    """
    import torch
    from torch.nn.attention import SDPBackend

    from model.fast import forward

    runner = engine.runner
    rng = random.Random(11)
    default_backends = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    rows = []
    for label, backends in (
        ("flash/efficient (engine)", forward.PREFILL_ATTENTION_BACKENDS),
        ("cuDNN allowed", default_backends),
    ):
        for prompts in (1, 8):
            times = []
            for _ in range(rounds):
                lengths = [rng.randint(64, 256) for _ in range(prompts)]
                saved = forward.PREFILL_ATTENTION_BACKENDS
                forward.PREFILL_ATTENTION_BACKENDS = backends
                try:
                    torch.cuda.synchronize()
                    began = time.perf_counter()
                    runner.prefill(list(range(prompts)), [[5] * n for n in lengths])
                    torch.cuda.synchronize()
                finally:
                    forward.PREFILL_ATTENTION_BACKENDS = saved
                times.append((time.perf_counter() - began) * 1000)
            rows.append(
                {
                    "backends": label,
                    "prompts": prompts,
                    "median_ms": statistics.median(times),
                    "max_ms": max(times),
                }
            )
    return rows


def profile_step(engine: Any, batch: int, context: int, path: Path | None) -> str:
    """Kernel time by kind for one eager decode step (the graph runs the same kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    runner.cache.positions[:batch] = context - 64
    with torch.inference_mode():
        runner.forward.decode_body(batch, context)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.forward.decode_body(batch, context)
            torch.cuda.synchronize()
    events = prof.key_averages()
    kinds: dict[str, float] = {}
    for event in events:
        name = event.key.lower()
        time_us = getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
        if any(k in name for k in ("gemm", "gemv", "cutlass", "sm90", "xmma", "cublas")):
            kind = "matmul (weights)"
        elif "fmha" in name or "attention" in name or "flash" in name:
            kind = "attention (KV)"
        elif "rope_store" in name:
            kind = "rope + KV write (triton)"
        elif "sort" in name or "radix" in name or "scan" in name:
            kind = "sampling sort"
        elif "index" in name or "scatter" in name or "gather" in name:
            kind = "index/scatter (KV write, embed)"
        elif "triton" in name:
            kind = "fused elementwise (triton)"
        else:
            kind = "other elementwise"
        kinds[kind] = kinds.get(kind, 0.0) + time_us
    table = events.table(sort_by="cuda_time_total", row_limit=25)
    if path is not None:
        path.write_text(table)
    total = sum(kinds.values())
    lines = [
        f"  {k:34s} {v / 1000:7.3f} ms  {100 * v / total:5.1f}%"
        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
    ]
    kernel_count = sum(e.count for e in events)
    lines.append(f"  {'sum of kernel time':34s} {total / 1000:7.3f} ms  ({kernel_count} kernels)")
    return "\n".join(lines)


def _median_ms(
    run: Callable[[], Any], times: int, prepare: Callable[[], Any] | None = None
) -> float:
    """Median GPU time of ``run()`` over ``times`` calls, by CUDA events; ``prepare()`` runs
    before each call, outside the timed span."""
    import torch

    start = [torch.cuda.Event(enable_timing=True) for _ in range(times)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(times)]
    for i in range(times):
        if prepare is not None:
            prepare()
        start[i].record()
        run()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(start, end, strict=True))


def _graph_time_ms(fn: Callable[[], Any], repeats: int = 32) -> float:
    """GPU time of one ``fn()`` call, captured ``repeats`` times in a CUDA graph (no launch
    overhead, as inside the decode graph)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    return _median_ms(graph.replay, 20) / repeats


# The decode attention kernel's settings the sweeps time: (keys per program, keys per block,
# warps); bench.step_profile's sweep covers the fp8 cache too.
ATTENTION_GRID = [
    (split, block, warps)
    for split in (64, 128, 256)
    for block in (32, 64, 128)
    for warps in (2, 4, 8)
    if block <= split
]


def attention_sweep(shape: dict[str, Any]) -> list[dict[str, Any]]:
    """One layer's decode attention at CodeLlama-7B's heads: cuDNN SDPA over the slot cache
    with a length mask vs the Triton kernel at each (keys per program, keys per block, warps).
    """
    import torch
    import torch.nn.functional as F

    from model.fast import kernels

    heads = shape["num_attention_heads"]
    dim = shape["hidden_size"] // heads
    device, dtype = torch.device("cuda"), torch.bfloat16
    cache = torch.randn(2, 32, heads, 1024, dim, device=device, dtype=dtype)
    saved = (kernels.SPLIT_KEYS, kernels.BLOCK_KEYS, kernels.ATTENTION_WARPS)
    rows = []
    try:
        for batch, context, mixed in ((8, 512, False), (8, 640, True), (32, 640, True)):
            rng = random.Random(0)
            keys = [rng.randint(64, 256) + 300 if mixed else 448 for _ in range(batch)]
            positions = torch.tensor([min(k, context) - 1 for k in keys], device=device)
            q = torch.randn(batch, heads, dim, device=device, dtype=dtype)
            out = torch.empty(batch, heads * dim, device=device, dtype=dtype)
            visible = torch.arange(context, device=device)[None, :] <= positions[:, None]
            bias = torch.zeros(visible.shape, device=device, dtype=dtype)
            bias = bias.masked_fill(~visible, -torch.inf)[:, None, None, :]

            sdpa = functools.partial(
                F.scaled_dot_product_attention,
                q.view(batch, heads, 1, dim),
                cache[0, :batch, :, :context],
                cache[1, :batch, :, :context],
                attn_mask=bias,
            )
            # decode_attention reads the module's settings at each call: the sweep sets them.
            kernel = functools.partial(
                kernels.decode_attention,
                q,
                cache[0],
                cache[1],
                positions,
                context,
                dim**-0.5,
                out,
            )

            row: dict[str, Any] = {
                "batch": batch,
                "context": context,
                "mean_keys": statistics.mean(min(k, context) for k in keys),
                "sdpa_us": _graph_time_ms(sdpa) * 1000,
            }
            timings = []
            for split, block, warps in ATTENTION_GRID:
                kernels.SPLIT_KEYS = split
                kernels.BLOCK_KEYS = block
                kernels.ATTENTION_WARPS = warps
                timings.append((_graph_time_ms(kernel) * 1000, split, block, warps))
            timings.sort()
            row["triton_best"] = [
                {"us": us, "split": sp, "block": bl, "warps": w} for us, sp, bl, w in timings[:3]
            ]
            kernels.SPLIT_KEYS, kernels.BLOCK_KEYS, kernels.ATTENTION_WARPS = saved
            row["triton_default_us"] = _graph_time_ms(kernel) * 1000
            rows.append(row)
    finally:
        kernels.SPLIT_KEYS, kernels.BLOCK_KEYS, kernels.ATTENTION_WARPS = saved
    return rows


def gemm_layouts(shape: dict[str, Any], batches: list[int]) -> list[dict[str, Any]]:
    """Weight-read bandwidth of the decode matmuls: x @ W.T (the engine's) vs x @ Wt."""
    import torch

    h, inter = shape["hidden_size"], shape["intermediate_size"]
    kinds = {"qkv": (3 * h, h), "o": (h, h), "gate_up": (2 * inter, h), "down": (h, inter)}
    rows = []
    for kind, (out_features, in_features) in kinds.items():
        # Eight copies, used in turn, so the 50 MB L2 never holds the next weight.
        weights = [
            torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
            for _ in range(8)
        ]
        transposed = [w.t().contiguous() for w in weights]
        for m in batches:
            x = torch.randn(m, in_features, device="cuda", dtype=torch.bfloat16)
            for layout, mats in (("linear", weights), ("x@Wt", transposed)):
                seconds = _time_matmul(x, mats, layout == "linear")
                rows.append(
                    {
                        "kind": kind,
                        "m": m,
                        "layout": layout,
                        "us": seconds * 1e6,
                        "tb_s": weights[0].numel() * 2 / seconds / 1e12,
                    }
                )
    torch.cuda.empty_cache()
    return rows


def _time_matmul(x: Any, mats: list[Any], linear: bool) -> float:
    """Seconds per product, cycling through ``mats`` (the mean of 64 after a warm-up)."""
    import torch
    import torch.nn.functional as F

    def run(i: int) -> Any:
        w = mats[i % len(mats)]
        return F.linear(x, w) if linear else x @ w

    for i in range(8):
        run(i)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(64):
        run(i)
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / 1000 / 64


# ---------------------------------------------------------------------------- main


def fmt(row: dict[str, Any]) -> str:
    return (
        f"{row['phase']:>12s} {row['jobs']:5d} {row['tokens_per_s']:9.1f} "
        f"{row['ttft_p50_s']:7.3f} {row['ttft_p99_s']:7.3f} {row['tpot_p50_ms']:7.2f} "
        f"{row['tpot_p99_ms']:7.2f} {row['e2e_p50_s']:7.2f} {row['e2e_p99_s']:7.2f} "
        f"{row['mean_batch']:6.1f} {row['fraction_of_floor']:6.2f} "
        f"{row['loop_lag_p99_ms']:7.2f} {row['peak_gpu_gb']:6.1f}"
    )


def prefill_line(row: dict[str, Any]) -> str:
    computed, reused = row["prefill_computed_tokens"], row["prefill_reused_tokens"]
    return (
        f"{row['phase']:>12s}: ttft p99 {row['ttft_p99_s']:.3f} s, longest gap between two "
        f"tokens of a job {row['token_gap_max_ms']:.1f} ms (p99 {row['token_gap_p99_ms']:.1f}"
        f" ms); prefill ran {computed} prompt tokens, reused {reused} from the prefix cache "
        f"({reused / max(1, computed + reused):.0%}), cut {row['prefill_cuts']} times, in "
        f"{row['prefill_forwards']} forwards, {row['prefill_s']:.2f} s of the phase's "
        f"{row['wall_s']:.2f} s"
    )


HEADER = (
    f"{'phase':>12s} {'jobs':>5s} {'tok/s':>9s} {'ttft50':>7s} {'ttft99':>7s} {'tpot50':>7s} "
    f"{'tpot99':>7s} {'e2e50':>7s} {'e2e99':>7s} {'batch':>6s} {'floor':>6s} {'lag99':>7s} "
    f"{'peakGB':>6s}"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 4-layer model: smoke test")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (tiny model)")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=2, help="jobs per client")
    parser.add_argument("--poisson-rate", type=float, default=4.0, help="jobs/s; 0 = skip")
    parser.add_argument("--poisson-jobs", type=int, default=48)
    parser.add_argument(
        "--poisson-long-every",
        type=int,
        default=0,
        help="every Nth Poisson job has a refine-sized prompt, 1000-2000 tokens (needs "
        "--max-seq-len 2560 or so for all of it)",
    )
    parser.add_argument(
        "--prefill-tokens", type=int, default=None, help="the engine's prefill chunk"
    )
    parser.add_argument(
        "--idle-prefill-tokens",
        type=int,
        default=None,
        help="the engine's prefill budget when more prompts wait than rows decode (a burst)",
    )
    parser.add_argument(
        "--idle-prefill-compare",
        action="store_true",
        help="at the end, the concurrency phases again with a burst cut into "
        "--prefill-tokens chunks, as before the burst budget (ratio)",
    )
    parser.add_argument(
        "--no-prefill-compare",
        action="store_true",
        help="skip the Poisson phase again without prefix reuse and chunking",
    )
    parser.add_argument("--seed-jobs", type=int, default=2)
    parser.add_argument("--seed-tokens", type=int, default=128)
    parser.add_argument("--skip-4bit", action="store_true")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--attention", default="auto", choices=["auto", "triton", "sdpa", "matmul"])
    parser.add_argument(
        "--compare-attention", action="store_true", help="time the triton and sdpa steps first"
    )
    parser.add_argument("--no-gemm", action="store_true", help="skip the GEMM layout rows")
    parser.add_argument("--no-profile", action="store_true", help="skip the step profile")
    parser.add_argument("--verbose", action="store_true", help="log every prefill (DEBUG)")
    parser.add_argument(
        "--attention-sweep",
        action="store_true",
        help="time one layer's attention: SDPA vs the Triton kernel's settings",
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="then hold the same engine's weights in FP8 and serve the phases again (ratio)",
    )
    parser.add_argument(
        "--kv-cache",
        choices=["bf16", "fp8"],
        default="bf16",
        help="fp8: then store the same engine's KV cache in FP8 and serve the phases again "
        "(ratio; after --fp8's phases when both are given, so with FP8 weights too)",
    )
    parser.add_argument(
        "--fp8-rows",
        action="store_true",
        help="with --fp8: then round the rows to E4M3 too at 2-32 rows (FP8 x FP8 tensor "
        "cores) and serve the phases again (ratio)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.fp8_rows and not args.fp8:
        parser.error("--fp8-rows needs --fp8 (the rows meet FP8 weights)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.verbose:
        logging.getLogger("model.fast.engine").setLevel(logging.DEBUG)

    import torch
    import transformers

    from model.fast import FastEngine, FastEngineOptions

    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; use --cpu --small for a smoke test", file=sys.stderr)
        return 2
    shape = TINY_CPU if args.cpu else SMALL if args.small else CODELLAMA_7B
    dtype = torch.float32 if args.cpu else torch.bfloat16
    report: dict[str, Any] = {
        "args": vars(args) | {"json": str(args.json), "profile_out": str(args.profile_out)}
    }
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report["versions"], report["card"] = versions, card
    print(f"card: {card}; {versions}; shape: {shape}", flush=True)

    bandwidth = measure_bandwidth(device)
    report["copy_bandwidth_tb_s"] = bandwidth / 1e12
    print(f"device copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)

    tokenizer = build_tokenizer(shape["vocab_size"])
    t0 = time.perf_counter()
    base = build_base(shape, device, dtype)
    print(f"built base model in {time.perf_counter() - t0:.1f} s", flush=True)
    weights = weight_bytes(base)
    kv_per_token = (
        2
        * shape["num_hidden_layers"]
        * shape["hidden_size"]
        * (2 if dtype == torch.bfloat16 else 4)
    )
    kv_per_token = kv_per_token * shape["num_key_value_heads"] // shape["num_attention_heads"]
    report["weight_gb"] = weights / 1e9

    def floor(batch: float, context: float) -> float:
        return floor_tokens_per_s(bandwidth, weights, kv_per_token, batch, context)

    have_bnb = "bitsandbytes" in versions and device.type == "cuda"
    if have_bnb:
        # Seed's path first, while memory is free: NF4 + unmerged adapter + HF generate.
        nf4 = add_lora(quantized_copy(base))
        t0 = time.perf_counter()
        seed = seed_path(nf4, tokenizer, args.seed_jobs, args.seed_tokens)
        report["seed_path"] = seed
        print(f"seed path (NF4 + unmerged LoRA, HF generate, batch 1): {seed}", flush=True)
        if not args.skip_4bit:
            options = FastEngineOptions(max_seq_len=args.max_seq_len, max_slots=2, ignore_eos=True)
            engine4 = FastEngine(nf4, tokenizer, model_name="nf4", options=options)
            engine4.warmup(max_batch=1)
            four = single_stream(engine4, args.new_tokens)
            four["graphs"] = engine4.runner.graphs.enabled
            report["nf4_engine_batch1"] = four
            print(f"4-bit path (fast engine, NF4 + unmerged LoRA, batch 1): {four}", flush=True)
            del engine4
        del nf4
        gc.collect()
        torch.cuda.empty_cache()
    else:
        print("bitsandbytes or CUDA missing: no seed path / 4-bit rows", flush=True)

    t0 = time.perf_counter()
    model = add_lora(base)
    del base
    options = FastEngineOptions(
        max_seq_len=args.max_seq_len, ignore_eos=True, attention=args.attention, max_slots=64
    )
    if args.prefill_tokens:
        options = dataclasses.replace(options, prefill_tokens=args.prefill_tokens)
    if args.idle_prefill_tokens is not None:
        options = dataclasses.replace(options, idle_prefill_tokens=args.idle_prefill_tokens)
    engine = FastEngine(model, tokenizer, model_name="codellama-7b-shape", options=options)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    graphs = engine.warmup(max_batch=64)
    built = time.perf_counter() - t0
    print(f"engine: {engine.slots} slots, {graphs} graphs, ready in {built:.1f} s", flush=True)
    report["engine"] = {"slots": engine.slots, "graphs": graphs, "ready_s": built}

    one = single_stream(engine, args.new_tokens)
    report["bf16_engine_batch1"] = one
    print(f"single stream (bf16 merged, engine.generate): {one}", flush=True)
    if device.type == "cuda":
        runner = engine.runner
        by_attention: dict[str, list[dict[str, Any]]] = {}
        serving_attention = runner.attention
        kinds = ("triton", "sdpa") if args.compare_attention else (serving_attention,)
        for attention in kinds:
            if runner.attention != attention:
                runner.set_attention(attention)
            by_attention[attention] = step_times(engine, [1, 8, 32, 64], 512)
            by_attention[attention] += step_times(engine, [8, 32], 640, mixed=True)
            for row in by_attention[attention]:
                row["attention"] = attention
                row["floor_tokens_per_s"] = floor(row["batch"], row["mean_keys"])
                row["fraction_of_floor"] = row["tokens_per_s"] / row["floor_tokens_per_s"]
                print(
                    f"decode step ({attention}) b={row['batch']:3d} "
                    f"bucket {row['context']} mean keys {row['mean_keys']:.0f}: "
                    f"{row['step_ms']:.2f} ms, {row['tokens_per_s']:.0f} tok/s, "
                    f"{row['fraction_of_floor']:.2f} of floor",
                    flush=True,
                )
        if runner.attention != serving_attention or len(runner.graphs.captured) < graphs:
            runner.set_attention(serving_attention)
            engine.warmup(max_batch=64)
        print(f"serving with attention={serving_attention}", flush=True)
        report["attention"] = serving_attention
        steps = [row for rows in by_attention.values() for row in rows]
        report["step_times"] = steps
        try:
            if args.no_profile:
                raise RuntimeError("skipped (--no-profile)")
            breakdown = profile_step(engine, 8, 512, args.profile_out)
            print("profile of one eager decode step, batch 8, context bucket 512:\n" + breakdown)
            report["profile"] = breakdown
        except Exception as error:  # the profile is a nice-to-have; keep the numbers
            print(f"profile failed: {error!r}")

        if args.attention_sweep:
            report["attention_sweep"] = attention_sweep(shape)
            for sweep in report["attention_sweep"]:
                best = sweep["triton_best"][0]
                print(
                    f"attention, one layer, b={sweep['batch']} bucket {sweep['context']} "
                    f"mean keys {sweep['mean_keys']:.0f}: sdpa {sweep['sdpa_us']:.1f} us, "
                    f"triton default {sweep['triton_default_us']:.1f} us, best {best['us']:.1f} "
                    f"us (split {best['split']}, block {best['block']}, warps {best['warps']})",
                    flush=True,
                )

        prefills = prefill_times(engine)
        report["prefill_times"] = prefills
        for row in prefills:
            print(
                f"prefill of {row['prompts']} new-length prompt(s) of 64-256 tokens, "
                f"{row['backends']}: median {row['median_ms']:.1f} ms, max {row['max_ms']:.1f} ms",
                flush=True,
            )

        layouts = [] if args.no_gemm else gemm_layouts(shape, [1, 8, 32])
        report["gemm_layouts"] = layouts
        for row in layouts:
            print(
                f"gemm {row['kind']:8s} m={row['m']:3d} {row['layout']:7s} "
                f"{row['us']:8.1f} us {row['tb_s']:5.2f} TB/s",
                flush=True,
            )

    phases: list[dict[str, Any]] = []
    print(HEADER, flush=True)

    async def serve_all(suffix: str = "") -> None:
        for c in [int(c) for c in args.concurrency.split(",") if c]:
            phase = await run_phase(
                engine,
                tokenizer,
                f"c={c}{suffix}",
                concurrency=c,
                jobs=c * args.rounds,
                rate=None,
                new_tokens=args.new_tokens,
                seed=c,
            )
            phases.append(phase.summary(floor))
            print(fmt(phases[-1]), flush=True)
            print(prefill_line(phases[-1]), flush=True)
        if args.poisson_rate > 0:
            await serve_poisson(suffix)

    async def serve_poisson(suffix: str) -> None:
        """The Poisson phase (same arrivals every time: seed 99), its prefill line too."""
        phase = await run_phase(
            engine,
            tokenizer,
            f"poisson{args.poisson_rate:g}{suffix}",
            concurrency=None,
            jobs=args.poisson_jobs,
            rate=args.poisson_rate,
            new_tokens=args.new_tokens,
            seed=99,
            long_every=args.poisson_long_every,
        )
        phases.append(phase.summary(floor))
        print(fmt(phases[-1]), flush=True)
        print(prefill_line(phases[-1]), flush=True)

    asyncio.run(serve_all())
    bf16_phases = list(phases)
    if args.poisson_rate > 0 and not args.no_prefill_compare:
        # The same arrivals through the engine's prefill as it was before prefix reuse and
        # chunking (whole prompts, 2048 tokens a forward, its shapes warmed first).
        serving_options = engine.options
        engine.options = dataclasses.replace(
            serving_options, prefix_cache=False, chunked_prefill=False, prefill_tokens=2048
        )
        engine.warmup(max_batch=64)
        asyncio.run(serve_poisson(" plain"))
        engine.options = serving_options

    def serve_changed(name: str, suffix: str) -> None:
        """The phases again once the engine changed (same process, same slots): ratios to
        the bf16 phases (the floor column stays bf16's)."""
        engine.runner.clear_graphs()
        engine.warmup(max_batch=64)
        one_changed = single_stream(engine, args.new_tokens)
        report[f"{name}_engine_batch1"] = one_changed
        print(f"single stream ({name}, engine.generate): {one_changed}", flush=True)
        first = len(phases)
        print(HEADER, flush=True)
        asyncio.run(serve_all(suffix))
        ratios = []
        for bf16_phase, phase in zip(bf16_phases, phases[first:], strict=True):
            ratio = phase["tokens_per_s"] / bf16_phase["tokens_per_s"]
            ratios.append({"phase": bf16_phase["phase"], f"{name}_vs_bf16": ratio})
            print(
                f"{bf16_phase['phase']:>12s}: bf16 {bf16_phase['tokens_per_s']:.0f} tok/s, "
                f"{name} {phase['tokens_per_s']:.0f} tok/s, {ratio:.2f}x",
                flush=True,
            )
        report[f"{name}_ratios"] = ratios

    if args.fp8:
        # The same engine, KV cache and process: only the projections change to FP8.
        engine.runner.weights.use_fp8()
        serve_changed("fp8", " fp8")
    if args.kv_cache == "fp8":
        # Then only the cache's format (same slot count: the phases' batches are alike).
        engine.runner.set_kv_cache("fp8")
        serve_changed("fp8_weights_kv" if args.fp8 else "fp8_kv", " kv8")
    if args.fp8_rows:
        # Then the FP8 x FP8 tensor cores at 2-32 rows: the rows rounded to E4M3 per row and
        # K block (split-K's "fp8" mode), a change of numerics the quality guard measures
        # (bench.fp8_agreement, "E4M3 rows"); the engine's routes are the exact ones.
        from model.fast import fp8_gemm

        fp8_gemm.ROUTES = (
            (1, "gemv"),
            (fp8_gemm.SPLITK_WINS_UP_TO_ROWS, "splitk_fp8"),
            (fp8_gemm.UNLIMITED, "bf16"),
        )
        try:
            serve_changed("fp8_rows", " r8")
        except Exception as error:  # keep the phases measured before it
            print(f"the E4M3-rows phases failed: {error!r}", flush=True)
            report["fp8_rows_error"] = repr(error)
    if args.idle_prefill_compare:
        # The last engine again, with a burst cut into prefill_tokens chunks between decode
        # steps as when few wait (the engine before the burst budget): the concurrency
        # phases' ratio and TTFT side by side.
        serving_options = engine.options
        before = len(phases)
        engine.options = dataclasses.replace(serving_options, idle_prefill_tokens=0)
        print(HEADER, flush=True)
        asyncio.run(serve_all(" idle-cut"))
        engine.options = serving_options
        cut_phases = [p for p in phases[before:] if p["phase"].startswith("c=")]
        last = [p for p in phases[:before] if p["phase"].startswith("c=")][-len(cut_phases) :]
        ratios = []
        for now_phase, cut in zip(last, cut_phases, strict=True):
            ratio = now_phase["tokens_per_s"] / cut["tokens_per_s"]
            ratios.append({"phase": now_phase["phase"], "idle_budget_vs_cut": ratio})
            print(
                f"{now_phase['phase']:>12s}: idle budget {now_phase['tokens_per_s']:.0f} tok/s"
                f" (ttft p99 {now_phase['ttft_p99_s']:.2f} s), cut {cut['tokens_per_s']:.0f}"
                f" tok/s (ttft p99 {cut['ttft_p99_s']:.2f} s), {ratio:.2f}x",
                flush=True,
            )
        report["idle_prefill_ratios"] = ratios
    report["phases"] = phases
    seed_rate = report.get("seed_path", {}).get("tokens_per_s")
    c8 = next((p for p in phases if p["phase"] == "c=8"), None)
    if seed_rate and c8:
        report["ratio_c8_vs_seed"] = c8["tokens_per_s"] / seed_rate
        print(f"concurrency 8 vs the seed's path: {report['ratio_c8_vs_seed']:.0f}x")
    if seed_rate and "nf4_engine_batch1" in report:
        ratio = report["nf4_engine_batch1"]["tokens_per_s"] / seed_rate
        report["ratio_4bit_vs_seed"] = ratio
        print(f"4-bit path vs the seed's 4-bit path, batch 1: {ratio:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
