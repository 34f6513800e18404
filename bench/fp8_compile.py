"""Compile ``bench.fp8_gemm``'s kernel variants in parallel worker processes before timing.

Triton compiles one variant at a time per process (about a second each, holding the GIL), and
the sweep has a few hundred. Workers (``python -m bench.fp8_compile TASKS OUT``) each launch a
share of the variants once on small tensors with the sweep's specializations (every integer a
multiple of 16, aligned pointers), check the result against the widened weight, and write one
JSON line per task; Triton's on-disk cache then hands the sweep's own process the compiled
kernels. A variant that fails to compile, computes something else, or crashes its worker is
reported, never timed; a crashed worker is restarted on the tasks after the one it died on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

Task = dict[str, Any]
# The workers' device ("cuda"; the tests set "cpu", with Triton's interpreter).
DEVICE_VARIABLE = "FP8_COMPILE_DEVICE"


def task_key(task: Task) -> str:
    return json.dumps(task, sort_keys=True)


def run_task(task: Task, device_name: str = "cuda") -> str:
    """Launch one variant; '' when it ran and agreed with the reference, else why not."""
    import torch
    import torch.nn.functional as F

    from model import fp8
    from model.fast import fp8_gemm, fp8_splitk

    device = torch.device(device_name)
    n, k = 256, task["k"]
    torch.manual_seed(0)
    weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.05
    w_fp8, scale = fp8.quantize_weight(weight)
    widened = fp8.dequantize(w_fp8, scale, torch.float32)
    worst = 0.0
    for m in task["ms"]:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        if task["kind"] == "splitk":
            config = fp8_splitk.SplitKConfig(**task["config"])
            out = fp8_splitk.splitk_matmul(x, w_fp8, scale, task["mode"], config)
        elif task["kind"] == "dot":
            c = task["config"]
            out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
            grid = (-(-n // c["block_n"]), -(-m // c["block_m"]))
            fp8_gemm._kernel(False)[grid](
                x, w_fp8, scale, out, m, n, k, x.stride(0), w_fp8.stride(0), out.stride(0),
                BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], BLOCK_K=c["block_k"],
                DOT_F32=device.type != "cuda",
                num_warps=c["num_warps"], num_stages=c["num_stages"],
            )  # fmt: skip
        else:  # the one-row GEMV through its autotuner (all its configs compile here)
            out = fp8_gemm.fp8_weight_matmul(x, w_fp8, scale)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ref = F.linear(x.float(), widened)
        worst = max(worst, float((out.float() - ref).abs().max() / ref.abs().max()))
    limit = 0.15 if task.get("mode") == "fp8" else 0.02
    return "" if worst <= limit else f"error {worst:.3g} against the widened weight"


def worker(tasks_path: str, out_path: str) -> int:
    with open(tasks_path, encoding="utf-8") as file:
        tasks = json.load(file)
    with open(out_path, "a", encoding="utf-8") as out:
        for task in tasks:
            try:
                problem = run_task(task, os.environ.get(DEVICE_VARIABLE, "cuda"))
            except Exception as exc:  # one variant failing must not stop the others
                problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            out.write(json.dumps({"key": task_key(task), "problem": problem}) + "\n")
            out.flush()
    return 0


def _read(out_path: str) -> dict[str, str]:
    if not os.path.exists(out_path):
        return {}
    done = {}
    with open(out_path, encoding="utf-8") as file:
        for line in file:
            if line.strip():
                record = json.loads(line)
                done[record["key"]] = record["problem"]
    return done


def precompile(tasks: Sequence[Task], workers: int, budget_s: float) -> dict[str, str]:
    """Run ``tasks`` over ``workers`` processes; task key -> '' (ok) or the problem. Tasks not
    reached within ``budget_s`` seconds are left out (the sweep then compiles them itself)."""
    folder = tempfile.mkdtemp(prefix="fp8_compile_")
    shards = [list(tasks[i::workers]) for i in range(workers)]
    results: dict[str, str] = {}
    running: list[tuple[subprocess.Popen[bytes], list[Task], str]] = []
    deadline = time.monotonic() + budget_s

    def start(shard: list[Task], index: int) -> None:
        tasks_path = os.path.join(folder, f"tasks{index}.json")
        out_path = os.path.join(folder, f"out{index}.jsonl")
        with open(tasks_path, "w", encoding="utf-8") as file:
            json.dump(shard, file)
        command = [sys.executable, "-m", "bench.fp8_compile", tasks_path, out_path]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        running.append((process, shard, out_path))

    restarts = 0
    for index, shard in enumerate(shards):
        if shard:
            start(shard, index)
    while running and time.monotonic() < deadline:
        time.sleep(0.5)
        for entry in list(running):
            process, shard, out_path = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            done = _read(out_path)
            results.update(done)
            left = [t for t in shard if task_key(t) not in done]
            if left:  # it died on left[0]: report that one, go on with the rest
                results[task_key(left[0])] = f"worker exited with {process.returncode}"
                restarts += 1
                if left[1:]:
                    start(left[1:], len(shards) + restarts)
    for process, _shard, out_path in running:  # out of time: keep what they finished
        process.kill()
        process.wait()
        results.update(_read(out_path))
    return results


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2]))
