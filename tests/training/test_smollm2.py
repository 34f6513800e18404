"""A short real LoRA run on the embedded SmolLM2-135M-Instruct (CPU, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.spec import resolve_spec
from training.cli import main

from .conftest import FIXTURE

pytestmark = pytest.mark.slow


def test_short_lora_run_on_embedded_smollm2(tmp_path: Path) -> None:
    assert resolve_spec("smollm2").is_embedded
    out = tmp_path / "smollm2-html"
    argv = [
        "--preset", "smollm2", "--data", str(FIXTURE), "--output-dir", str(out),
        "--max-rows", "8", "--max-seq-len", "160", "--overlong", "truncate",
        "--batch-size", "1", "--grad-accum", "2", "--max-steps", "3", "--epochs", "1",
        "--learning-rate", "5e-4", "--eval-generate", "1", "--eval-max-new-tokens", "8",
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["quantization"] == "none"
    # A real pretrained model starts far below ln(vocab) = 10.8 on real pages.
    assert metrics["before"]["eval_loss"] < 5
    # Three steps on pages like the eval one already help (1.33 -> 1.04 when measured).
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"] - 0.05
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and "lm_head" not in adapter["target_modules"]
    # fp32 LoRA weights, ~4.9M parameters: ~20 MB, against 540 MB for the base.
    assert (out / "adapter_model.safetensors").stat().st_size < 25_000_000
