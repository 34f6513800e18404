"""FP8 weight GEMMs against bf16 at decode and prefill sizes, and the engine settings that follow
(issue 12): one run on the H200 sets ``ROUTES`` (model.fast.fp8_gemm) and ``PRETUNED``
(model.fast.fp8_tuning).

For CodeLlama-7B's four decoder GEMMs (fused qkv 4096->12288, o 4096->4096, fused gate_up
4096->22016, down 11008->4096) and each row count M of ``--rows`` (decode: 1-64) it times

- ``bf16``: the faster of ``F.linear`` (weight (out, in)) and ``x @ wt`` (the engine's (in, out));
- ``gemv`` (M = 1) and ``dot`` (M >= 2): the engine's first FP8 kernels (model.fast.fp8_gemm);
- ``splitk_bf16`` / ``splitk_f16`` / ``splitk_fp8``: the split-K kernel (model.fast.fp8_splitk)
  in each mode over a grid of configurations: every tile of the grid at a split chosen to fill
  the card, then the three best tiles at every split;

and at each M of ``--prefill-rows`` (128-4096): ``bf16``, ``scaled_mm`` (rows quantized per
token + ``torch._scaled_mm``), ``dequantize`` (the weight widened into a scratch buffer + bf16
GEMM) and, at 256 rows or fewer, the split-K modes with the best 64-row configuration.

Each time is the median over ``--samples`` replays of a CUDA graph of 16+ calls that cycle
through copies of the weight covering 4x the L2 cache (so each call reads from memory, as in a
decode step). GB/s: the FP8 (or, for bf16, bf16) weight bytes over the time. err: the largest
difference to the float32 product of the widened weight over its largest magnitude
(splitk_fp8 and scaled_mm also round the rows to E4M3: allowed 0.15, the others 0.02); for
bf16, to the product of its own weight.

Before timing, worker processes compile every variant (bench.fp8_compile); a variant that
fails to compile or computes something else is listed and skipped. The report: a table per
shape, the per-M totals of one layer's four GEMMs per path, the winners under four policies
(bf16 twin allowed or not; E4M3 rows allowed or not) with the ``ROUTES`` line of each, and the
``PRETUNED`` table. ``--json`` writes every row and the choices.

    python -m bench.fp8_gemm --json fp8_sweep.json            # the H200 (about 3 minutes)
    python -m bench.fp8_gemm --quick --rows 1,16,64 --prefill-rows 512

Needs compute capability >= 8.9 and a torch with float8; elsewhere it says so and exits 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench import fp8_choice
from bench.common import CODELLAMA_7B
from model import fp8
from model.fast import fp8_gemm, fp8_prefill, fp8_splitk
from model.fast.fp8_splitk import SplitKConfig, block_m_for

ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
PREFILL_ROWS = (128, 512, 2048, 4096)
MODES = ("bf16", "f16", "fp8")
# (block_n, block_k, num_warps, num_stages) swept per mode and row tile.
TILES: tuple[tuple[int, int, int, int], ...] = (
    (64, 128, 4, 4),
    (64, 128, 4, 6),
    (64, 256, 4, 3),
    (64, 256, 4, 4),
    (64, 512, 4, 2),
    (64, 512, 4, 3),
    (128, 128, 4, 4),
    (128, 128, 8, 4),
    (128, 256, 8, 3),
    (128, 256, 4, 3),
)
QUICK_TILES = ((64, 256, 4, 4), (128, 128, 4, 4), (128, 256, 8, 3))
SPLITS = (1, 2, 3, 4, 6, 8)
FINALISTS = 3  # tiles tried at every split
# Splits are first chosen so that the grid has about this many programs per SM.
PROGRAMS_PER_SM = 2
L2_COVER = 4
DEFAULT_L2_BYTES = 50 * 2**20
MIN_CALLS_PER_GRAPH = 16
WEIGHT_STD = 0.02
PREFILL_SPLITK_MAX_ROWS = 256


@dataclass(frozen=True)
class Gemm:
    """One decoder matmul: [M, in] @ [in, out]."""

    name: str
    out_features: int
    in_features: int

    @property
    def label(self) -> str:
        return f"{self.name} {self.in_features}->{self.out_features}"

    def weight_bytes(self, bytes_per_element: int) -> int:
        return self.out_features * self.in_features * bytes_per_element


def decode_gemms(shape: dict[str, Any] = CODELLAMA_7B) -> list[Gemm]:
    """The four matmuls of a decoder layer of a Llama of ``shape``, with the engine's fusions."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    qkv = hidden + 2 * shape["num_key_value_heads"] * head_dim
    return [
        Gemm("qkv", qkv, hidden),
        Gemm("o", hidden, hidden),
        Gemm("gate_up", 2 * inter, hidden),
        Gemm("down", hidden, inter),
    ]


def weight_copies(copy_bytes: int, l2_bytes: int, max_copies: int = 16) -> int:
    """How many copies of a weight to cycle through so that together they cover
    :data:`L2_COVER` L2 caches (at least 2, so no call finds its weight still cached)."""
    return max(2, min(max_copies, math.ceil(L2_COVER * l2_bytes / copy_bytes)))


def max_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|out - ref| / max|ref|`` in float32 (inf when ref is zero and out is not)."""
    diff = float((out.float() - ref.float()).abs().max())
    scale = float(ref.float().abs().max())
    if scale == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / scale


def gb_per_s(num_bytes: int, microseconds: float) -> float:
    return num_bytes / (microseconds * 1e-6) / 1e9


def first_split(m: int, gemm: Gemm, tile: tuple[int, int, int, int], sms: int) -> int:
    """The smallest split of :data:`SPLITS` that gives the grid :data:`PROGRAMS_PER_SM`
    programs per SM (the largest that fits K when none does)."""
    block_n, block_k = tile[0], tile[1]
    programs = -(-m // block_m_for(m)) * -(-gemm.out_features // block_n)
    fitting = [s for s in SPLITS if fp8_splitk.splits_that_fit(gemm.in_features, block_k, s) == s]
    for split in fitting:
        if programs * split >= PROGRAMS_PER_SM * sms:
            return split
    return fitting[-1]


def compile_tasks(
    gemms: Sequence[Gemm], ms: Sequence[int], modes: Sequence[str], tiles: Sequence[Any]
) -> list[dict[str, Any]]:
    """Every kernel variant the sweep will launch, as bench.fp8_compile tasks."""
    tasks: list[dict[str, Any]] = []
    block_ms = sorted({block_m_for(m) for m in ms})
    ks = sorted({g.in_features for g in gemms})
    for mode in modes:
        for block_m in block_ms:
            for block_n, block_k, warps, stages in tiles:
                for even in sorted({k % block_k == 0 for k in ks}):
                    k = 4 * block_k if even else 4 * block_k + 16
                    for split in (1, 2):
                        config = SplitKConfig(block_m, block_n, block_k, split, warps, stages)
                        tasks.append(
                            {"kind": "splitk", "mode": mode, "k": k, "ms": [block_m],
                             "config": asdict(config)}
                        )  # fmt: skip
    # The dot kernel's autotuned configs at each row tile, with M both a multiple of 16 and
    # not (Triton compiles the two apart).
    for block_m in block_ms:
        dot_ms = sorted({m for m in ms if m > 1 and block_m_for(m) == block_m})
        for block_n, block_k, warps, stages in fp8_gemm._CONFIGS:
            fields = {"block_m": block_m, "block_n": block_n, "block_k": block_k,
                      "num_warps": warps, "num_stages": stages}  # fmt: skip
            if dot_ms:
                tasks.append({"kind": "dot", "k": 4096, "ms": dot_ms, "config": fields})
    if 1 in ms:
        tasks.append({"kind": "gemv", "k": 4096, "ms": [1]})
    return tasks


# ------------------------------------------------------------------------ timing (CUDA)


def time_graph_us(calls: Sequence[Callable[[], Any]], samples: int) -> float:
    """The calls (repeated up to :data:`MIN_CALLS_PER_GRAPH`) captured in one CUDA graph;
    the median microseconds per call over ``samples`` replays."""
    sequence = list(calls) * math.ceil(MIN_CALLS_PER_GRAPH / len(calls))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: compiles, grows buffers
        for call in sequence:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in sequence:
            call()
    graph.replay()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(samples)
    ]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    us = statistics.median(s.elapsed_time(e) for s, e in events) * 1000 / len(sequence)
    del graph
    return us


class Bank:
    """Copies of one GEMM's weight (bf16, bf16 transposed, E4M3 + scales) on the GPU."""

    def __init__(self, gemm: Gemm, copies: int, device: torch.device) -> None:
        self.gemm = gemm
        self.bf16 = [
            torch.randn(gemm.out_features, gemm.in_features, device=device, dtype=torch.bfloat16)
            * WEIGHT_STD
            for _ in range(copies)
        ]
        self.transposed = [w.t().contiguous() for w in self.bf16]
        self.fp8 = [fp8.quantize_weight(w) for w in self.bf16]
        self.widened = fp8.dequantize(*self.fp8[0], torch.float32)


class Sweep:
    """The timings of one run; a failure is a row with ``us`` None and its reason."""

    def __init__(
        self,
        samples: int,
        sms: int,
        skip: set[str],
        timer: Callable[[Sequence[Callable[[], Any]], int], float] = time_graph_us,
    ) -> None:
        self.timer = timer  # the tests pass one that runs on CPU
        self.samples = samples
        self.sms = sms
        self.skip = skip  # compile task keys that failed in the workers
        self.rows: list[dict[str, Any]] = []
        self.aborted: str | None = None

    def measure(
        self,
        bank: Bank,
        m: int,
        x: torch.Tensor,
        ref: torch.Tensor,
        path: str,
        make: Callable[[int], Callable[[], torch.Tensor]],
        config: SplitKConfig | None = None,
        weight_bytes: int | None = None,
        label: str | None = None,
    ) -> dict[str, Any]:
        gemm = bank.gemm
        row: dict[str, Any] = {
            "shape": gemm.name, "n": gemm.out_features, "k": gemm.in_features, "m": m,
            "path": path, "config": asdict(config) if config else None,
            "label": config.label() if config else (label or path), "us": None, "err": None,
            "gbps": None,
        }  # fmt: skip
        self.rows.append(row)
        if self.aborted:
            row["error"] = "not run: " + self.aborted
            return row
        try:
            calls = [make(i) for i in range(len(bank.bf16))]
            row["err"] = max_relative_error(calls[0](), ref)
            row["us"] = self.timer(calls, self.samples)
            row["gbps"] = gb_per_s(weight_bytes or gemm.weight_bytes(1), row["us"])
        except Exception as exc:  # one variant failing must not stop the sweep
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            row["us"] = None
            if "CUDA error" in str(exc) or "illegal" in str(exc):
                self.aborted = row["error"]  # the context is gone: report what was measured
        return row

    def splitk(
        self, bank: Bank, m: int, x: torch.Tensor, ref: torch.Tensor, mode: str,
        config: SplitKConfig,
    ) -> dict[str, Any]:  # fmt: skip
        def make(i: int) -> Callable[[], torch.Tensor]:
            w, s = bank.fp8[i]
            return functools.partial(fp8_splitk.splitk_matmul, x, w, s, mode, config)

        return self.measure(bank, m, x, ref, f"splitk_{mode}", make, config)


def sweep_decode(
    sweep: Sweep, bank: Bank, ms: Sequence[int], modes: Sequence[str], tiles: Sequence[Any]
) -> dict[tuple[str, int], SplitKConfig]:
    """The decode row counts of one shape; returns each mode's best config at 64 rows."""
    gemm = bank.gemm
    device = bank.bf16[0].device
    best_at_64: dict[tuple[str, int], SplitKConfig] = {}
    for m in ms:
        x = torch.randn(m, gemm.in_features, device=device, dtype=torch.bfloat16)
        ref = x.float() @ bank.widened.t()

        def linear(i: int, x: torch.Tensor = x) -> Callable[[], torch.Tensor]:
            return functools.partial(F.linear, x, bank.bf16[i])

        def transposed(i: int, x: torch.Tensor = x) -> Callable[[], torch.Tensor]:
            return functools.partial(torch.matmul, x, bank.transposed[i])

        def first_kernels(i: int, x: torch.Tensor = x) -> Callable[[], torch.Tensor]:
            return functools.partial(fp8_gemm.fp8_weight_matmul, x, *bank.fp8[i])

        bf16_bytes = gemm.weight_bytes(2)
        exact = x.float() @ bank.bf16[0].float().t()  # bf16's own reference: its weight
        sweep.measure(bank, m, x, exact, "bf16", linear, weight_bytes=bf16_bytes, label="F.linear")
        sweep.measure(
            bank, m, x, exact, "bf16", transposed, weight_bytes=bf16_bytes, label="x @ wt"
        )
        sweep.measure(bank, m, x, ref, "gemv" if m == 1 else "dot", first_kernels)
        block_m = block_m_for(m)
        for mode in modes:
            first = []
            for tile in tiles:
                if _skipped(sweep.skip, mode, block_m, tile, gemm.in_features):
                    continue
                split = first_split(m, gemm, tile, sweep.sms)
                config = SplitKConfig(block_m, tile[0], tile[1], split, tile[2], tile[3])
                row = sweep.splitk(bank, m, x, ref, mode, config)
                if fp8_choice.valid(row):
                    first.append((row["us"], tile, split))
            for _, tile, tried in sorted(first)[:FINALISTS]:
                for split in SPLITS:
                    fits = fp8_splitk.splits_that_fit(gemm.in_features, tile[1], split) == split
                    if split != tried and fits:
                        config = SplitKConfig(block_m, tile[0], tile[1], split, tile[2], tile[3])
                        sweep.splitk(bank, m, x, ref, mode, config)
            if m == max(ms):
                mine = [
                    r for r in sweep.rows
                    if r["shape"] == gemm.name and r["m"] == m and r["path"] == f"splitk_{mode}"
                    and fp8_choice.valid(r)
                ]  # fmt: skip
                if mine:
                    top = min(mine, key=lambda r: float(r["us"]))
                    best_at_64[(mode, gemm.out_features)] = SplitKConfig(**top["config"])
        _progress(sweep, gemm, m)
    return best_at_64


def sweep_prefill(
    sweep: Sweep, bank: Bank, ms: Sequence[int], best_at_64: dict[tuple[str, int], SplitKConfig]
) -> None:
    gemm = bank.gemm
    device = bank.bf16[0].device
    w0, s0 = bank.fp8[0]
    scaled = fp8_prefill.scaled_mm_linear(w0, s0)
    for m in ms:
        x = torch.randn(m, gemm.in_features, device=device, dtype=torch.bfloat16)
        ref = x.float() @ bank.widened.t()
        # Compute-bound: one weight is enough (the copies only matter for memory-bound calls).
        one = {
            "bf16": functools.partial(F.linear, x, bank.bf16[0]),
            "dequantize": functools.partial(fp8_prefill.dequantize_matmul, x, w0, s0),
        }
        if scaled is not None:
            one["scaled_mm"] = functools.partial(scaled, x)
        for path, call in one.items():

            def same(i: int, call: Callable[[], torch.Tensor] = call) -> Callable[[], torch.Tensor]:
                return call

            size = gemm.weight_bytes(2 if path == "bf16" else 1)
            own = x.float() @ bank.bf16[0].float().t() if path == "bf16" else ref
            sweep.measure(bank, m, x, own, path, same, weight_bytes=size)
        if m <= PREFILL_SPLITK_MAX_ROWS:
            for (mode, n), config in best_at_64.items():
                if n == gemm.out_features:
                    sweep.splitk(bank, m, x, ref, mode, config)
        _progress(sweep, gemm, m)


def _skipped(skip: set[str], mode: str, block_m: int, tile: Any, k: int) -> bool:
    """Whether the workers found this variant broken (either split flavour)."""
    from bench.fp8_compile import task_key

    block_n, block_k, warps, stages = tile
    even = k % block_k == 0
    kk = 4 * block_k if even else 4 * block_k + 16
    for split in (1, 2):
        config = SplitKConfig(block_m, block_n, block_k, split, warps, stages)
        task = {"kind": "splitk", "mode": mode, "k": kk, "ms": [block_m], "config": asdict(config)}
        if task_key(task) in skip:
            return True
    return False


def _progress(sweep: Sweep, gemm: Gemm, m: int) -> None:
    mine = [r for r in sweep.rows if r["shape"] == gemm.name and r["m"] == m]
    best = fp8_choice.best_rows(mine)
    text = " ".join(f"{p}={r['us']:.1f}" for (_, _, p), r in sorted(best.items()))
    print(f"  {gemm.label:22s} M={m:4d} {text}", file=sys.stderr, flush=True)


def _why_unsupported() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if not fp8.supported("cuda"):
        capability = torch.cuda.get_device_capability()
        return (
            f"{torch.cuda.get_device_name()} (compute capability {capability[0]}."
            f"{capability[1]}, torch {torch.__version__}) lacks FP8 (needs 8.9 or higher)"
        )
    return None


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=_int_list, default=list(ROWS), help="decode M values")
    parser.add_argument("--prefill-rows", type=_int_list, default=list(PREFILL_ROWS))
    parser.add_argument("--shapes", default="qkv,o,gate_up,down")
    parser.add_argument("--modes", default=",".join(MODES), help="split-K modes to sweep")
    parser.add_argument("--samples", type=int, default=20, help="timed replays per variant")
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK_TILES)} tiles only")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--compile-budget", type=float, default=150.0, help="seconds")
    parser.add_argument("--json", help="also write every row and the choices to this file")
    args = parser.parse_args(argv)
    reason = _why_unsupported()
    if reason is not None:
        print(f"bench.fp8_gemm needs a CUDA GPU with FP8: {reason}", file=sys.stderr)
        return 2
    gemms = [g for g in decode_gemms() if g.name in args.shapes.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    tiles = QUICK_TILES if args.quick else TILES
    device = torch.device("cuda", torch.cuda.current_device())
    properties = torch.cuda.get_device_properties(device)
    l2_bytes = int(getattr(properties, "L2_cache_size", 0)) or DEFAULT_L2_BYTES
    import triton

    print(
        f"# FP8 weight GEMMs vs bf16: {properties.name}, {properties.multi_processor_count} SMs, "
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"L2 {l2_bytes / 2**20:.0f} MiB, median of {args.samples} graph replays",
        flush=True,
    )
    started = time.monotonic()
    from bench.fp8_compile import precompile

    tasks = compile_tasks(gemms, args.rows, modes, tiles)
    results = precompile(tasks, args.workers, args.compile_budget)
    broken = {key: why for key, why in results.items() if why}
    print(
        f"compiled {len(results)}/{len(tasks)} variants in {time.monotonic() - started:.0f} s "
        f"with {args.workers} workers; {len(broken)} broken",
        flush=True,
    )
    for key, why in list(broken.items())[:20]:
        print(f"  broken: {key}: {why}", flush=True)
    torch.manual_seed(0)
    sweep = Sweep(args.samples, properties.multi_processor_count, set(broken))
    for gemm in gemms:
        bank = Bank(gemm, weight_copies(gemm.weight_bytes(1), l2_bytes), device)
        best_at_64 = sweep_decode(sweep, bank, args.rows, modes, tiles)
        sweep_prefill(sweep, bank, args.prefill_rows, best_at_64)
        del bank
        torch.cuda.empty_cache()
    shapes = [(g.name, g.label) for g in gemms]
    text, summary = fp8_choice.report(sweep.rows, shapes, [*args.rows, *args.prefill_rows])
    print(text)
    if sweep.aborted:
        print(f"\nABORTED after a CUDA error: {sweep.aborted}")
    print(f"\n{time.monotonic() - started:.0f} s in all", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(
                {"device": properties.name, "torch": torch.__version__,
                 "triton": triton.__version__, "rows": sweep.rows, "summary": summary,
                 "broken": broken, "aborted": sweep.aborted},
                file, indent=1, default=str,
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
