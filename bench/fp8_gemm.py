"""FP8 E4M3 weights vs bf16 for CodeLlama-7B's decode matmuls, on one CUDA GPU (issue 12).

Measure first: before the engine adopts ``model.fp8``, how much faster is each decode GEMM
with fp8 weights and fp8 activations (``torch._scaled_mm``, row-wise scales) than in bf16, and
how far off are its outputs? A decode step reads every weight once, so at decode batch sizes
the time should follow the weight bytes, which fp8 halves.

For each GEMM of a decode step (fused qkv 4096->12288, o 4096->4096, fused gate_up
4096->22016, down 11008->4096, LM head 4096->32016) and M (rows: sequences in the step) in
1, 8, 32, 64, it times

- ``bf16``: ``x @ w.t()`` (``F.linear``, the weight stored (out, in));
- ``bf16 (in,out)``: ``x @ wt`` with the weight stored (in, out), the fast engine's layout;
- ``fp8``: :class:`model.fp8.Fp8Linear` (quantize x per row, then ``_scaled_mm``);
- ``fp8 gemm``: ``_scaled_mm`` alone on pre-quantized x: what a fused quantization kernel
  could reach;
- ``fp8 fast``: ``fp8`` with ``use_fast_accum=True``;

with CUDA events, after a warm-up, as the median over many samples, in two modes: ``graph``
(the calls captured in one CUDA graph and replayed, as the engine runs a decode step) and
``eager`` (launched one by one from Python). Each variant cycles through enough copies of its
weight that the L2 cache (50 MB on an H200) never holds the next one. GB/s is weight bytes
over time. The errors are the largest difference to the bf16 output in each output row,
divided by that row's largest bf16 magnitude, maximized over rows (``err w-only``: bf16
activations times the dequantized fp8 weight, i.e. the weight quantization alone). Random
weights (normal, std 0.02) and activations (standard normal).

The last table sums the GEMMs of 32 layers and the LM head into milliseconds per decode
step for each M. Attention, norms and sampling are not included.

    python -m bench.fp8_gemm                          # on the GPU machine (~1-2 min, estimated)
    python -m bench.fp8_gemm --modes graph --batches 1,8 --samples 20
    python -m bench.fp8_gemm --json fp8_gemm.json     # also save the rows

Needs compute capability >= 8.9 (Ada, Hopper) and a torch with float8; elsewhere it says so
and exits with status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import CODELLAMA_7B
from model import fp8
from model.fast.fp8_gemm import Fp8Weight

VARIANTS = ("bf16", "bf16_t", "fp8", "fp8_gemm", "fp8_fast", "fp8_triton")
VARIANT_TITLES = {
    "bf16": "bf16 us",
    "bf16_t": "bf16 (in,out) us",
    "fp8": "fp8 us",
    "fp8_gemm": "fp8 gemm us",
    "fp8_fast": "fp8 fast us",
    "fp8_triton": "fp8 triton us",
}
BATCHES = (1, 8, 32, 64)
MODES = ("graph", "eager")
# The weight copies a variant cycles through cover this many L2 caches.
L2_COVER = 4
DEFAULT_L2_BYTES = 50 * 2**20
# A captured graph holds at least this many calls, so the replay launch is amortized.
MIN_CALLS_PER_GRAPH = 16
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class Gemm:
    """One decode matmul: [M, in] @ [in, out], run ``per_step`` times a decode step."""

    name: str
    out_features: int
    in_features: int
    per_step: int

    @property
    def label(self) -> str:
        return f"{self.name} {self.in_features}->{self.out_features}"

    def weight_bytes(self, bytes_per_element: int) -> int:
        return self.out_features * self.in_features * bytes_per_element


def decode_gemms(shape: dict[str, Any] = CODELLAMA_7B) -> list[Gemm]:
    """The matmuls of one decode step of a Llama of ``shape``, with the engine's fusions."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    layers = shape["num_hidden_layers"]
    head_dim = hidden // shape["num_attention_heads"]
    qkv = hidden + 2 * shape["num_key_value_heads"] * head_dim
    return [
        Gemm("qkv", qkv, hidden, layers),
        Gemm("o", hidden, hidden, layers),
        Gemm("gate_up", 2 * inter, hidden, layers),
        Gemm("down", hidden, inter, layers),
        Gemm("lm_head", shape["vocab_size"], hidden, 1),
    ]


def weight_copies(copy_bytes: int, l2_bytes: int, max_copies: int = 16) -> int:
    """How many copies of a weight to cycle through so that together they cover
    :data:`L2_COVER` L2 caches (at least 2, so no call finds its weight still cached)."""
    return max(2, min(max_copies, math.ceil(L2_COVER * l2_bytes / copy_bytes)))


def max_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows of ``max|out - ref| / max|ref|`` (in float32). A row where ``ref`` is
    all zero counts 0 if ``out`` is too and inf otherwise."""
    diff = (out.float() - ref.float()).abs().amax(dim=-1)
    scale = ref.float().abs().amax(dim=-1)
    ratio = torch.where(scale > 0, diff / scale.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    ratio = torch.where((scale == 0) & (diff > 0), math.inf, ratio)
    return float(ratio.max()) if ratio.numel() else 0.0


def gb_per_s(num_bytes: int, microseconds: float) -> float:
    return num_bytes / (microseconds * 1e-6) / 1e9


def step_totals(rows: list[dict[str, Any]], gemms: Sequence[Gemm]) -> list[dict[str, Any]]:
    """Per (mode, M): each variant's milliseconds per decode step, summed over ``gemms``
    (each counted ``per_step`` times), plus ``bf16_best`` (the faster bf16 layout per GEMM)
    and the weight bytes read per step in bf16 and fp8. Only complete (mode, M) groups."""
    by_key = {(r["mode"], r["m"], r["gemm"]): r for r in rows}
    totals = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for m in dict.fromkeys(r["m"] for r in rows if r["mode"] == mode):
            group = [by_key.get((mode, m, g.name)) for g in gemms]
            if any(r is None for r in group):
                continue
            total: dict[str, Any] = {"mode": mode, "m": m}
            for variant in (*VARIANTS, "bf16_best"):
                total[f"{variant}_ms"] = (
                    sum(
                        g.per_step * _variant_us(r, variant)
                        for g, r in zip(gemms, group, strict=True)
                        if r is not None
                    )
                    / 1000
                )
            total["bf16_bytes"] = sum(g.per_step * g.weight_bytes(2) for g in gemms)
            total["fp8_bytes"] = sum(g.per_step * g.weight_bytes(1) for g in gemms)
            totals.append(total)
    return totals


def _variant_us(row: dict[str, Any], variant: str) -> float:
    if variant == "bf16_best":
        return min(float(row["bf16_us"]), float(row["bf16_t_us"]))
    return float(row[f"{variant}_us"])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; every row must have as many cells as ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row has {len(row)} cells, header {len(header)}: {row}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def gemm_table(rows: list[dict[str, Any]], gemms: Sequence[Gemm]) -> str:
    """The per-GEMM table of one mode's rows."""
    sizes = {g.name: g for g in gemms}
    header = [
        "shape",
        "M",
        *(VARIANT_TITLES[v] for v in VARIANTS),
        "speedup",
        "vs best bf16",
        "bf16 GB/s",
        "fp8 GB/s",
        "err fp8",
        "err fast",
        "err w-only",
        "triton vs best bf16",
        "triton GB/s",
        "err triton",
    ]
    cells = []
    for r in rows:
        gemm = sizes[r["gemm"]]
        cells.append(
            [
                gemm.label,
                str(r["m"]),
                *(f"{r[f'{v}_us']:.1f}" for v in VARIANTS),
                f"{r['bf16_us'] / r['fp8_us']:.2f}x",
                f"{_variant_us(r, 'bf16_best') / r['fp8_us']:.2f}x",
                f"{gb_per_s(gemm.weight_bytes(2), r['bf16_us']):.0f}",
                f"{gb_per_s(gemm.weight_bytes(1), r['fp8_us']):.0f}",
                f"{r['err_fp8']:.4f}",
                f"{r['err_fp8_fast']:.4f}",
                f"{r['err_weight_only']:.4f}",
                f"{_variant_us(r, 'bf16_best') / r['fp8_triton_us']:.2f}x",
                f"{gb_per_s(gemm.weight_bytes(1), r['fp8_triton_us']):.0f}",
                f"{r.get('err_fp8_triton', float('nan')):.4f}",
            ]
        )
    return markdown_table(header, cells)


def totals_table(totals: list[dict[str, Any]]) -> str:
    header = [
        "mode",
        "M",
        "bf16 ms",
        "best bf16 ms",
        "fp8 ms",
        "fp8 gemm ms",
        "fp8 fast ms",
        "fp8 triton ms",
        "fp8 vs best bf16",
        "triton vs best bf16",
        "bf16 GB/s",
        "fp8 GB/s",
    ]
    cells = [
        [
            t["mode"],
            str(t["m"]),
            *(
                f"{t[f'{v}_ms']:.3f}"
                for v in ("bf16", "bf16_best", "fp8", "fp8_gemm", "fp8_fast", "fp8_triton")
            ),
            f"{t['bf16_best_ms'] / t['fp8_ms']:.2f}x",
            f"{t['bf16_best_ms'] / t['fp8_triton_ms']:.2f}x",
            f"{t['bf16_bytes'] / (t['bf16_ms'] * 1e-3) / 1e9:.0f}",
            f"{t['fp8_bytes'] / (t['fp8_ms'] * 1e-3) / 1e9:.0f}",
        ]
        for t in totals
    ]
    return markdown_table(header, cells)


# ---------------------------------------------------------------------------- timing (CUDA)


def _median_event_us(run: Callable[[], Any], calls: int, samples: int) -> float:
    """Median GPU microseconds per call over ``samples`` runs of ``run`` (``calls`` calls)."""
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(samples)
    ]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) * 1000 / calls


def time_eager_us(calls: Sequence[Callable[[], Any]], samples: int) -> float:
    """Each call launched from Python in turn; the median per call."""

    def run() -> None:
        for call in calls:
            call()

    for _ in range(3):
        run()
    return _median_event_us(run, len(calls), samples)


def time_graph_us(calls: Sequence[Callable[[], Any]], samples: int) -> float:
    """The calls (repeated up to :data:`MIN_CALLS_PER_GRAPH`) captured in one CUDA graph;
    the median per call over replays."""
    sequence = list(calls) * math.ceil(MIN_CALLS_PER_GRAPH / len(calls))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's docs advise
        for call in sequence:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in sequence:
            call()
    for _ in range(3):
        graph.replay()
    us = _median_event_us(graph.replay, len(sequence), samples)
    del graph
    return us


Timer = Callable[[Sequence[Callable[[], Any]], int], float]
TIMERS: dict[str, Timer] = {"graph": time_graph_us, "eager": time_eager_us}


def measure_gemm(
    gemm: Gemm,
    batches: Sequence[int],
    modes: Sequence[str],
    samples: int,
    l2_bytes: int,
    device: torch.device | None = None,
    timers: dict[str, Timer] | None = None,
) -> list[dict[str, Any]]:
    """Rows (one per mode and M) of times and errors for one GEMM shape, on ``device`` (the
    current CUDA device by default; the tests pass the CPU and fake ``timers``)."""
    device = device or torch.device("cuda", torch.cuda.current_device())
    timers = timers or TIMERS
    copies = weight_copies(gemm.weight_bytes(1), l2_bytes)
    weights = [
        torch.randn(gemm.out_features, gemm.in_features, device=device, dtype=torch.bfloat16)
        * WEIGHT_STD
        for _ in range(copies)
    ]
    transposed = [w.t().contiguous() for w in weights]
    linears = [fp8.Fp8Linear.from_weight(w, backend="scaled_mm") for w in weights]
    fast = [
        fp8.Fp8Linear(lin.weight, lin.scale, backend="scaled_mm", use_fast_accum=True)
        for lin in linears
    ]
    # The engine's kernel: FP8 weights, bf16 rows (model.fast.fp8_gemm).
    triton_backend = "triton" if device.type == "cuda" else "dequantize"
    kernel = [Fp8Weight(lin.weight, lin.scale, backend=triton_backend) for lin in linears]
    rows = []
    for m in batches:
        x = torch.randn(m, gemm.in_features, device=device, dtype=torch.bfloat16)
        x_fp8, x_scale = fp8.quantize_rows(fp8.pad_rows(x, linears[0].row_multiple))
        calls: dict[str, list[Callable[[], Any]]] = {
            "bf16": [functools.partial(F.linear, x, w) for w in weights],
            "bf16_t": [functools.partial(torch.matmul, x, wt) for wt in transposed],
            "fp8": [functools.partial(lin, x) for lin in linears],
            "fp8_gemm": [functools.partial(lin.scaled_matmul, x_fp8, x_scale) for lin in linears],
            "fp8_fast": [functools.partial(lin, x) for lin in fast],
            "fp8_triton": [functools.partial(lin, x) for lin in kernel],
        }
        ref = F.linear(x, weights[0])
        weight_only = F.linear(x, fp8.dequantize(linears[0].weight, linears[0].scale))
        errors = {
            "err_fp8": max_relative_error(linears[0](x), ref),
            "err_fp8_fast": max_relative_error(fast[0](x), ref),
            "err_weight_only": max_relative_error(weight_only, ref),
            "err_fp8_triton": max_relative_error(kernel[0](x), ref),
        }
        for mode in modes:
            timer = timers[mode]
            row: dict[str, Any] = {"gemm": gemm.name, "m": m, "mode": mode, "copies": copies}
            for variant in VARIANTS:
                row[f"{variant}_us"] = timer(calls[variant], samples)
            row.update(errors)
            rows.append(row)
            print(
                f"  {gemm.label:24s} M={m:3d} {mode:5s} "
                + " ".join(f"{v}={row[f'{v}_us']:.1f}us" for v in VARIANTS),
                file=sys.stderr,
                flush=True,
            )
    del weights, transposed, linears, fast, kernel
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _why_unsupported() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    name = torch.cuda.get_device_name()
    capability = torch.cuda.get_device_capability()
    if not fp8.supported("cuda"):
        return (
            f"{name} (compute capability {capability[0]}.{capability[1]}, torch "
            f"{torch.__version__}) lacks fp8 tensor-core matmuls (needs 8.9 or higher and "
            "torch.float8_e4m3fn / torch._scaled_mm)"
        )
    try:
        fp8.scaled_mm_row_multiple(torch.device("cuda", torch.cuda.current_device()))
    except RuntimeError as exc:
        return str(exc)
    return None


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batches", type=_int_list, default=list(BATCHES), help="M values")
    parser.add_argument("--modes", default=",".join(MODES), help="graph, eager or both")
    parser.add_argument("--samples", type=int, default=50, help="timed samples per variant")
    parser.add_argument("--json", help="also write the rows and totals to this file")
    args = parser.parse_args(argv)
    modes = [mode for mode in args.modes.split(",") if mode]
    if not modes or any(mode not in MODES for mode in modes):
        parser.error(f"--modes takes a comma-separated subset of {','.join(MODES)}")

    reason = _why_unsupported()
    if reason is not None:
        print(f"bench.fp8_gemm needs a CUDA GPU with fp8 matmuls: {reason}", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2_bytes = int(getattr(properties, "L2_cache_size", 0)) or DEFAULT_L2_BYTES
    row_multiple = fp8.scaled_mm_row_multiple(torch.device("cuda", torch.cuda.current_device()))
    print(
        f"# fp8 vs bf16 decode GEMMs: {properties.name} (cc {properties.major}."
        f"{properties.minor}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"L2 {l2_bytes / 2**20:.0f} MiB, _scaled_mm rows padded to a multiple of "
        f"{row_multiple}, {args.samples} samples, median",
        flush=True,
    )
    gemms = decode_gemms()
    rows: list[dict[str, Any]] = []
    for gemm in gemms:
        rows.extend(measure_gemm(gemm, args.batches, modes, args.samples, l2_bytes))
    for mode in modes:
        mode_rows = [r for r in rows if r["mode"] == mode]
        print(f"\n## {mode}\n")
        print(gemm_table(mode_rows, gemms))
    totals = step_totals(rows, gemms)
    print("\n## whole model: GEMMs of one decode step (32 layers + LM head), ms\n")
    print(totals_table(totals))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"device": properties.name, "rows": rows, "totals": totals}, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
