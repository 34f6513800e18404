"""Two processes (DDP over gloo on CPU, as `accelerate launch` / torchrun start them on GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FIXTURE

pytestmark = pytest.mark.slow


def test_two_process_run_shards_the_data(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "training", "--device", "cpu", "--base", str(tiny_base), "--data", str(FIXTURE),
        "--output-dir", str(out), "--max-rows", "16", "--epochs", "1", "--max-seq-len", "256",
        "--overlong", "truncate", "--no-packing", "--batch-size", "2", "--grad-accum", "2",
        "--eval-generate", "1", "--eval-max-new-tokens", "4", "--no-progress", "--save-every", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # 14 train rows, 2 processes x batch 2 x accumulation 2 = 8 rows a step: 2 steps
    # (one process alone would take 4).
    assert metrics["steps"] == 2
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
