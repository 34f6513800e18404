"""CPU generation speed of the embedded model by torch thread count, idle and under load.

On a small shared machine other processes compete for the cores, and torch's default of one
thread per core can then be much slower than fewer threads (a thread that loses its core
stalls every parallel matmul at its barrier). This loads the embedded SmolLM2 the way the
bot does (``load_model`` with the ``smollm2`` preset, on CPU), then times the standard
engine (``model.engine.Engine``) generating ``--tokens`` tokens for each thread count, with
0, 1, 2... busy competing processes (a Python busy loop each). Thread counts alternate
within each round, so a change in the machine's other load hits them alike. Prints a
Markdown table: median tokens/s of ``--runs`` runs.

    python -m bench.cpu_threads                       # threads 1,2,nproc; 0,1,2 competitors
    python -m bench.cpu_threads --tokens 32 --runs 3 --threads 1,2 --competitors 0,2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT = "a landing page for a bakery"
BUSY_LOOP = "while True: pass"


@dataclass
class Row:
    competitors: int
    threads: int
    rates: list[float]
    tokens: list[int]
    load_before: float
    load_after: float


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return result.stdout.strip()


@contextmanager
def competitors(count: int) -> Iterator[None]:
    """``count`` processes spinning on a core each while the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0)  # let the scheduler see them busy
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def generate_once(engine: Any, tokens: int) -> tuple[float, int]:
    """(tokens/s, tokens) of one greedy generation of at most ``tokens`` tokens."""
    from model.types import GenerationRequest, SamplingParams

    # Greedy with no repetition penalty: the same tokens every run, so runs compare alike.
    sampling = SamplingParams(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
    (result,) = engine.generate([GenerationRequest(prompt=PROMPT, sampling=sampling)])
    return result.tokens_per_second, result.generated_tokens


def measure(
    engine: Any, counts: Sequence[int], thread_counts: Sequence[int], tokens: int, runs: int
) -> list[Row]:
    import torch

    rows: list[Row] = []
    for count in counts:
        with competitors(count):
            load_before = os.getloadavg()[0]
            torch.set_num_threads(max(thread_counts))
            generate_once(engine, 8)  # warm-up under this condition
            results: dict[int, list[tuple[float, int]]] = {n: [] for n in thread_counts}
            for _ in range(runs):
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    results[threads].append(generate_once(engine, tokens))
            load_after = os.getloadavg()[0]
        for threads in thread_counts:
            rates = [rate for rate, _ in results[threads]]
            made = [count for _, count in results[threads]]
            rows.append(Row(count, threads, rates, made, load_before, load_after))
            print(f"competitors={count} threads={threads}: {rates}", file=sys.stderr)
    return rows


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| busy competitors | torch threads | tokens/s (median) | min - max | tokens | "
        "load avg before / after |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.competitors} | {row.threads} | **{statistics.median(row.rates):.1f}** | "
            f"{min(row.rates):.1f} - {max(row.rates):.1f} | {statistics.median(row.tokens):.0f} "
            f"| {row.load_before:.1f} / {row.load_after:.1f} |"
        )
    return "\n".join(lines)


def parse_counts(text: str) -> list[int]:
    nproc = os.cpu_count() or 1
    values = [nproc if part.strip() == "nproc" else int(part) for part in text.split(",")]
    return sorted(set(values))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,nproc", help="torch thread counts to try")
    parser.add_argument("--competitors", default="0,1,2", help="busy processes per condition")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per cell (median)")
    args = parser.parse_args(argv)

    import torch

    from model.engine import Engine
    from model.loading import load_model
    from model.spec import resolve_spec

    default_threads = torch.get_num_threads()
    started = time.perf_counter()
    engine = Engine(load_model(resolve_spec("smollm2", device="cpu")))
    load_s = time.perf_counter() - started
    thread_counts = parse_counts(args.threads)
    rows = measure(engine, parse_counts(args.competitors), thread_counts, args.tokens, args.runs)
    print(
        f"nproc {os.cpu_count()}, {cpu_model()}; torch {torch.__version__} "
        f"(default threads {default_threads}); commit {commit()}; "
        f"model load {load_s:.1f} s; {args.tokens} new tokens, greedy, {args.runs} runs a cell"
    )
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
