"""Where a decode step's time goes, per batch size and weight / KV format.

``python -m bench.step_profile`` builds the CodeLlama-7B-shaped engine of ``bench.serving``
(random weights, a merged LoRA, 64 slots) and, for each format (bf16 weights; FP8 weights; FP8
weights + FP8 KV cache) and each batch of ``--batches``, with every row at a served page's
midpoint (a 64-256-token prompt plus 256 generated tokens):

- the captured step's time (graph replay, median of ``--repeats``) against its bandwidth floor
  (the weights the step's routes read + each row's K/V, at the measured copy bandwidth);
- the kernels of one eager step (the graph replays the same ones) summed by kind: weight
  matmuls, the LM head, attention, the rope + KV write, sampling, the rest; with the bytes
  each kind must move, its achieved TB/s.

``--top-out`` writes each step's 25 longest kernels. ``--attention-sweep`` first times one
layer's decode attention over a bf16 and an fp8 cache at each kernel setting (the module's
``SPLIT_KEYS``... and ``FP8_SPLIT_KEYS``... come from it). ``--cpu --small`` is a smoke test (eager
steps, profiler on the CPU). The serving benchmark times whole phases; this one says which
kernel to work on.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import CODELLAMA_7B
from bench.serving import (
    ATTENTION_GRID,
    SMALL,
    TINY_CPU,
    add_lora,
    build_base,
    build_tokenizer,
    measure_bandwidth,
)

FORMATS = ("bf16", "fp8", "fp8+kv8")

# Kernel kinds, first match wins (lower-case substrings of the kernel's name).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("attention_partial", "attention_reduce", "fmha", "flash", "attention")),
    ("rope + KV write", ("rope_store",)),
    ("fp8 weight matmul", ("fp8_splitk", "fp8_weight")),
    ("bf16 matmul", ("gemm", "gemv", "cutlass", "sm90", "xmma", "cublas", "nvjet")),
    ("sampling sort/scan", ("sort", "radix", "scan", "cumsum")),
    # ATen's gathers, indexed writes, concatenations and copies (eager prefill's glue).
    (
        "index / copy",
        (
            "index_elementwise",
            "index_put",
            "catarraybatchedcopy",
            "direct_copy",
            "gather_kernel",
            "scatter_gather",
            "fillfunctor",
            "copy_kernel",
        ),
    ),
)


def kind_of(kernel: str) -> str:
    """The kind a kernel's time is counted under (``other`` when nothing matches)."""
    name = kernel.lower()
    for kind, needles in KINDS:
        if any(needle in name for needle in needles):
            return kind
    return "other"


def mixed_keys(batch: int, seed: int = 5) -> list[int]:
    """Each row's keys at a served page's midpoint: a 64-256-token prompt + 256 generated."""
    rng = random.Random(seed)
    return [rng.randint(64, 256) + 256 for _ in range(batch)]


def context_for(keys: list[int], bucket: int = 128) -> int:
    """The decode context bucket that holds every row's keys (the engine's 128 apart)."""
    return -(-max(keys) // bucket) * bucket


def step_bytes(engine: Any, batch: int, keys: list[int]) -> dict[str, int]:
    """Bytes a step must move at least: the projections as the step's route reads them, the
    LM head, and the rows' K/V (scales included for an FP8 cache)."""
    from model.fast.fp8_gemm import Fp8Weight, route_for

    weights = engine.runner.weights
    projections = 0
    for layer in weights.layers:
        for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
            if isinstance(linear, Fp8Weight) and route_for(batch) != "bf16":
                projections += linear.weight.numel() + linear.scale.numel() * 4
            else:
                target = linear.bf16 if isinstance(linear, Fp8Weight) else linear
                projections += sum(t.numel() * t.element_size() for t in _tensors(target))
    head = sum(t.numel() * t.element_size() for t in _tensors(weights.lm_head))
    cache = engine.runner.cache
    per_token = cache.kv_bytes_per_slot() // cache.max_seq_len
    return {"projections": projections, "lm_head": head, "kv": per_token * sum(keys)}


def _tensors(linear: Any) -> list[Any]:
    from model.fast.weights import _linear_tensors

    return list(_linear_tensors(linear))


def graph_step_ms(engine: Any, keys: list[int], repeats: int) -> float:
    """Median time of the captured step for these rows (CUDA events around replays)."""
    import torch

    runner = engine.runner
    batch, context = len(keys), context_for(keys)
    positions = torch.tensor([k - 1 for k in keys], device=runner.cache.positions.device)
    runner.cache.positions[:batch] = positions
    runner.decode(batch, context)  # captures when needed
    graphs = runner.graphs
    graph = graphs.captured[(graphs.batch_bucket(batch), graphs.context_bucket(context))]
    times = []
    for _ in range(repeats):
        runner.cache.positions[:batch] = positions  # the step advances them
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def eager_step_ms(engine: Any, keys: list[int], repeats: int) -> float:
    """Wall time of one eager step (CPU smoke runs: no graphs there)."""
    runner = engine.runner
    batch, context = len(keys), context_for(keys)
    import torch

    times = []
    for _ in range(repeats):
        runner.cache.positions[:batch] = torch.tensor([k - 1 for k in keys])
        began = time.perf_counter()
        with torch.inference_mode():
            runner.forward.decode_body(batch, context)
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def profile_kernels(engine: Any, keys: list[int]) -> list[dict[str, Any]]:
    """The kernels of one eager step: name, calls, total microseconds (device time on a GPU,
    CPU time of the ops on CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    batch, context = len(keys), context_for(keys)
    device = runner.cache.positions.device
    positions = torch.tensor([k - 1 for k in keys], device=device)
    cuda = device.type == "cuda"
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with torch.inference_mode():
        runner.cache.positions[:batch] = positions
        runner.forward.decode_body(batch, context)  # warm (Triton autotune, compiles)
        runner.cache.positions[:batch] = positions
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=[activity]) as prof:
            runner.forward.decode_body(batch, context)
            if cuda:
                torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if cuda:
            us = getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append({"kernel": event.key, "calls": event.count, "us": us})
    return sorted(rows, key=lambda r: -r["us"])


def by_kind(kernels: list[dict[str, Any]], lm_head_us: float) -> dict[str, float]:
    """Kernel microseconds summed by :func:`kind_of`; the LM head's measured time is moved out
    of the bf16 matmuls (its kernel's name is a matmul's like the projections' twins)."""
    kinds: dict[str, float] = {}
    for row in kernels:
        kind = kind_of(row["kernel"])
        kinds[kind] = kinds.get(kind, 0.0) + row["us"]
    if lm_head_us > 0 and kinds.get("bf16 matmul", 0.0) >= lm_head_us:
        kinds["bf16 matmul"] -= lm_head_us
        kinds["lm head"] = lm_head_us
    return kinds


def lm_head_us(engine: Any, batch: int, repeats: int) -> float:
    """GPU time of the LM head alone on ``batch`` rows (0 on CPU)."""
    import torch

    weights = engine.runner.weights
    if weights.device.type != "cuda":
        return 0.0
    h = torch.randn(batch, weights.embed.shape[1], device=weights.device, dtype=weights.dtype)
    with torch.inference_mode():
        weights.lm_head(h)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            weights.lm_head(h)
        end.record()
        end.synchronize()
    return start.elapsed_time(end) * 1000 / repeats


def attention_sweep(batches: list[int], repeats: int = 32) -> list[dict[str, Any]]:
    """One layer's decode attention (CodeLlama-7B's 32 heads x 128) over a bf16 and an fp8
    cache at each of ``batches`` (rows at served pages' midpoints), for every (keys per
    program, keys per block, warps) of :data:`ATTENTION_GRID`: microseconds, the KV read's
    TB/s, and the module's current settings for comparison."""
    import torch

    from bench.serving import _graph_time_ms
    from model.fast import kernels
    from model.fast.kv_cache import quantize_kv

    heads, dim, capacity = 32, 128, 1024
    device = torch.device("cuda")
    names = {
        "bf16": ("SPLIT_KEYS", "BLOCK_KEYS", "ATTENTION_WARPS"),
        "fp8": ("FP8_SPLIT_KEYS", "FP8_BLOCK_KEYS", "FP8_ATTENTION_WARPS"),
    }
    rows = []
    small_split = kernels.FP8_SMALL_BATCH_SPLIT_KEYS
    for kv_format, attributes in names.items():
        saved = tuple(getattr(kernels, a) for a in attributes)
        for batch in batches:
            keys_per_row = mixed_keys(batch)
            context = context_for(keys_per_row)
            torch.manual_seed(0)
            raw = torch.randn(2, batch, heads, capacity, dim, device=device, dtype=torch.bfloat16)
            scales: tuple[Any, ...] = ()
            if kv_format == "fp8":
                (k, k_scales), (v, v_scales) = quantize_kv(raw[0]), quantize_kv(raw[1])
                scales = (k_scales, v_scales)
            else:
                k, v = raw[0], raw[1]
            positions = torch.tensor([n - 1 for n in keys_per_row], device=device)
            q = torch.randn(batch, heads, dim, device=device, dtype=torch.bfloat16)
            out = torch.empty(batch, heads * dim, device=device, dtype=torch.bfloat16)

            def attend(
                k: Any = k, v: Any = v, positions: Any = positions, q: Any = q, out: Any = out,
                context: int = context, scales: tuple[Any, ...] = scales,
            ) -> None:  # fmt: skip
                kernels.decode_attention(q, k, v, positions, context, dim**-0.5, out, *scales)

            per_token = heads * dim * 2 * (1 if kv_format == "fp8" else 2)
            per_token += heads * 2 * 4 if kv_format == "fp8" else 0
            kv_bytes = per_token * sum(keys_per_row)
            current = kernels.attention_settings(kv_format == "fp8", batch)
            current_us = _graph_time_ms(attend, repeats) * 1000
            timings = []
            try:
                for setting in ATTENTION_GRID:
                    for attribute, value in zip(attributes, setting, strict=True):
                        setattr(kernels, attribute, value)
                    if kv_format == "fp8":  # the setting's split at every batch
                        kernels.FP8_SMALL_BATCH_SPLIT_KEYS = setting[0]
                    timings.append((_graph_time_ms(attend, repeats) * 1000, setting))
            finally:
                for attribute, value in zip(attributes, saved, strict=True):
                    setattr(kernels, attribute, value)
                kernels.FP8_SMALL_BATCH_SPLIT_KEYS = small_split
            timings.sort()
            rows.append(
                {
                    "kv": kv_format,
                    "batch": batch,
                    "mean_keys": statistics.mean(keys_per_row),
                    "current": list(current),
                    "current_us": current_us,
                    "best": [{"us": us, "setting": list(st)} for us, st in timings[:3]],
                    "kv_bytes": kv_bytes,
                }
            )
            best_us, best_setting = timings[0]
            print(
                f"attention {kv_format:4s} b={batch:3d} keys {statistics.mean(keys_per_row):.0f}: "
                f"current {current} {current_us:.1f} us "
                f"({kv_bytes / current_us / 1e6:.2f} TB/s); best {best_setting} {best_us:.1f} us "
                f"({kv_bytes / best_us / 1e6:.2f} TB/s); next "
                + ", ".join(f"{st} {us:.1f}" for us, st in timings[1:3]),
                flush=True,
            )
            del raw, k, v, scales
            torch.cuda.empty_cache()
    return rows


def burst_prompts(count: int, prefix: int, seed: int = 7) -> tuple[list[list[int]], list[int]]:
    """A burst of ``count`` served prompts past a shared ``prefix``-token template (the
    serving benchmark's 64-256 tokens in all): the suffixes, and where each starts."""
    rng = random.Random(seed)
    suffixes = [[rng.randrange(100, 30000) for _ in range(max(8, rng.randint(64, 256) - prefix))]
                for _ in range(count)]  # fmt: skip
    return suffixes, [prefix] * count


def prefill_profile(
    engine: Any, count: int, prefix: int, budget: int
) -> tuple[float, int, list[dict[str, Any]]]:
    """One burst of ``count`` prompts continuing a cached ``prefix`` (the engine's prefix
    reuse), prefilled in forwards of at most ``budget`` tokens as the engine packs them: wall
    milliseconds of the whole burst (after a warm run), its prompt tokens, and its kernels
    (:func:`profile_kernels`' rows)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    suffixes, starts = burst_prompts(count, prefix)
    forwards: list[list[int]] = [[]]
    used = 0
    for row, suffix in enumerate(suffixes):
        if forwards[-1] and used + len(suffix) > budget:
            forwards.append([])
            used = 0
        forwards[-1].append(row)
        used += len(suffix)

    def burst() -> None:
        for members in forwards:
            runner.prefill(members, [suffixes[r] for r in members], [starts[r] for r in members])

    cuda = runner.cache.positions.device.type == "cuda"
    burst()  # first-call costs of these shapes
    if cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    burst()
    if cuda:
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - began) * 1000
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        burst()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if cuda:
            us = getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append({"kernel": event.key, "calls": event.count, "us": us})
    return wall_ms, sum(len(s) for s in suffixes), sorted(rows, key=lambda r: -r["us"])


def set_format(engine: Any, name: str) -> None:
    """Turn the engine to ``name`` (formats only go forward: bf16 -> fp8 -> fp8+kv8)."""
    runner = engine.runner
    if name in ("fp8", "fp8+kv8") and runner.weights.weight_format != "fp8":
        runner.weights.use_fp8()
    if name == "fp8+kv8" and runner.cache.kv_format != "fp8":
        runner.set_kv_cache("fp8")
    runner.clear_graphs()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,16,32,48,64")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--small", action="store_true", help="a 4-layer model")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (tiny model, eager)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--top-out", type=Path, default=None, help="each step's top kernels")
    parser.add_argument(
        "--attention-sweep",
        action="store_true",
        help="first time one layer's attention at each setting, bf16 and fp8 caches",
    )
    parser.add_argument("--no-steps", action="store_true", help="skip the engine's steps")
    parser.add_argument(
        "--prefill-bursts",
        default="",
        help="also profile bursts of this many prompts past a shared prefix, e.g. 8,32,64",
    )
    parser.add_argument(
        "--prefill-paths",
        default="engine",
        help="the prefill paths to profile: engine (the decode attention's: the kernels on a "
        "GPU), sdpa (the gathers and SDPA), or both, e.g. engine,sdpa",
    )
    parser.add_argument(
        "--prefix-tokens",
        type=int,
        default=35,
        help="the bursts' shared prefix (the serving benchmark's template: 35 tokens)",
    )
    parser.add_argument(
        "--prefill-budget", type=int, default=4096, help="a burst's tokens per forward"
    )
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown formats {unknown}; choose from {FORMATS}")
    batches = [int(b) for b in args.batches.split(",") if b]
    paths = [p for p in args.prefill_paths.split(",") if p]
    if any(p not in ("engine", "sdpa") for p in paths):
        parser.error(f"--prefill-paths takes engine and sdpa, not {args.prefill_paths}")

    import torch

    from model.fast import FastEngine, FastEngineOptions

    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; use --cpu for a smoke test", file=sys.stderr)
        return 2
    shape = TINY_CPU if args.cpu else SMALL if args.small else CODELLAMA_7B
    dtype = torch.float32 if args.cpu else torch.bfloat16
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    bandwidth = measure_bandwidth(device)
    print(f"card: {card}; torch {torch.__version__}; copy {bandwidth / 1e12:.2f} TB/s", flush=True)
    report: dict[str, Any] = {"card": card, "torch": torch.__version__, "rows": []}
    report["copy_tb_s"] = bandwidth / 1e12
    if args.attention_sweep:
        if device.type != "cuda":
            parser.error("--attention-sweep times CUDA graphs: it needs a GPU")
        report["attention_sweep"] = attention_sweep([b for b in batches if b > 1])
    if args.no_steps:
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    model = add_lora(build_base(shape, device, dtype))
    options = FastEngineOptions(
        max_seq_len=args.max_seq_len, ignore_eos=True, max_slots=max(batches)
    )
    engine = FastEngine(
        model, build_tokenizer(shape["vocab_size"]), model_name="step-profile", options=options
    )
    del model
    gc.collect()
    top_lines: list[str] = []
    print(
        f"{'format':>16s} {'batch':>5s} {'step ms':>8s} {'tok/s':>7s} {'floor ms':>8s} "
        f"{'of floor':>8s}  kernels by kind, ms (TB/s where it moves bytes)",
        flush=True,
    )
    for name in formats:
        set_format(engine, name)
        for batch in batches:
            if batch > engine.runner.slots:
                continue
            keys = mixed_keys(batch)
            if device.type == "cuda":
                step = graph_step_ms(engine, keys, args.repeats)
            else:
                step = eager_step_ms(engine, keys, max(1, args.repeats // 10))
            needed = step_bytes(engine, batch, keys)
            floor_ms = sum(needed.values()) / bandwidth * 1000 if bandwidth == bandwidth else 0
            kernels = profile_kernels(engine, keys)
            kinds = by_kind(kernels, lm_head_us(engine, batch, args.repeats))
            row = {
                "format": name,
                "batch": batch,
                "mean_keys": statistics.mean(keys),
                "step_ms": step,
                "tokens_per_s": batch / step * 1000,
                "floor_ms": floor_ms,
                "bytes": needed,
                "kinds_ms": {k: v / 1000 for k, v in kinds.items()},
            }
            report["rows"].append(row)
            print(
                f"{name:>16s} {batch:5d} {step:8.2f} {row['tokens_per_s']:7.0f} "
                f"{floor_ms:8.2f} {floor_ms / step if step else 0:8.2f}  " + describe(row),
                flush=True,
            )
            top_lines.append(f"== {name}, batch {batch}, step {step:.2f} ms")
            top_lines += [
                f"{r['us']:10.1f} us {r['calls']:5d}x  {kind_of(r['kernel']):20s} "
                f"{r['kernel'][:110]}"
                for r in kernels[:25]
            ]
        bursts = [(int(c), path) for c in args.prefill_bursts.split(",") if c for path in paths]
        for count, path in bursts:
            if count > engine.runner.slots:
                continue
            decode_attention = engine.runner.forward.attention
            if path == "sdpa":  # the prefill's own path only: decode steps keep theirs
                engine.runner.forward.attention = "sdpa"
            try:
                wall, tokens, kernels = prefill_profile(
                    engine, count, args.prefix_tokens, args.prefill_budget
                )
            finally:
                engine.runner.forward.attention = decode_attention
            kinds = {k: v / 1000 for k, v in by_kind(kernels, 0.0).items()}
            report.setdefault("prefill", []).append(
                {"format": name, "path": path, "prompts": count, "tokens": tokens,
                 "wall_ms": wall, "kinds_ms": kinds}
            )  # fmt: skip
            print(
                f"{name:>16s} prefill ({path}) burst {count} prompts, {tokens} tokens past a "
                f"{args.prefix_tokens}-token prefix: {wall:.1f} ms ({tokens / wall * 1000:.0f} "
                "tokens/s); kernels "
                + "; ".join(
                    f"{k} {ms:.1f}" for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1])
                ),
                flush=True,
            )
            top_lines.append(f"== {name}, prefill ({path}) burst of {count}, {wall:.1f} ms")
            top_lines += [
                f"{r['us']:10.1f} us {r['calls']:5d}x  {kind_of(r['kernel']):20s} "
                f"{r['kernel'][:110]}"
                for r in kernels[:25]
            ]
    if args.top_out:
        args.top_out.write_text("\n".join(top_lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def describe(row: dict[str, Any]) -> str:
    """Kinds in ms, the byte-moving ones with their achieved TB/s."""
    moved = {
        "attention": row["bytes"]["kv"],
        "lm head": row["bytes"]["lm_head"],
    }
    weight_kind = "fp8 weight matmul" if row["kinds_ms"].get("fp8 weight matmul") else "bf16 matmul"
    moved[weight_kind] = row["bytes"]["projections"]
    parts = []
    for kind, ms in sorted(row["kinds_ms"].items(), key=lambda kv: -kv[1]):
        text = f"{kind} {ms:.2f}"
        if kind in moved and ms > 0:
            text += f" ({moved[kind] / ms / 1e9:.2f})"
        parts.append(text)
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
