"""The output folder (adapter, tokenizer, config, metrics, model card) and checkpoints.

Output layout, loadable as ``resolve_spec(base=..., adapter=<output_dir>)``::

    adapter_config.json  adapter_model.safetensors   # peft adapter
    tokenizer.json tokenizer_config.json ...          # the tokenizer trained with
    training_config.yaml                              # the resolved TrainConfig
    metrics.json                                      # data report, losses, page measures
    README.md                                         # model card
    checkpoints/step-000040/                          # resumable state (not pushed)
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from model.errors import first_line
from training.config import TrainConfig
from training.errors import TrainingError
from training.evaluation import HEADLINE_MEASURES

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_json_safe(data), indent=2) + "\n", encoding="utf-8")


# --- checkpoints ---------------------------------------------------------------------------


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [
        path
        for path in root.glob("step-*")
        if not path.name.endswith(".partial") and (path / STATE_FILE).is_file()
    ]
    return sorted(done, key=lambda path: path.name)


def find_checkpoint(output_dir: str | Path, resume: str) -> Path:
    """The folder ``--resume`` points at: "latest" or an explicit checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise TrainingError(f"--resume: no checkpoint in {Path(output_dir) / CHECKPOINTS}")
        return found[-1]
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise TrainingError(f"--resume: {folder} is not a checkpoint folder (no {STATE_FILE})")
    return folder


def save_checkpoint(
    folder: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> None:
    """Adapter weights, optimizer and scheduler state, counters and RNG states.

    Written to a temporary folder and renamed, so a crash never leaves a half checkpoint
    that ``--resume latest`` would pick.
    """
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(scheduler.state_dict(), partial / "scheduler.pt")
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, partial / "rng.pt")
    write_json(partial / STATE_FILE, state)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    for old in list_checkpoints(folder.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint saved: %s", folder)


def read_state(folder: Path) -> dict[str, Any]:
    """The counters and run settings a checkpoint was saved with."""
    state: dict[str, Any] = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    return state


def load_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the counters."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise TrainingError(f"--resume: {folder} has no adapter_model.safetensors")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    missing_lora = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
    if missing_lora:
        raise TrainingError(
            f"--resume: {folder} does not match this LoRA config ({missing_lora[0]})"
        )
    optimizer.load_state_dict(
        torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    )
    scheduler.load_state_dict(
        torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True)
    )
    rng = torch.load(folder / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = read_state(folder)
    log.info("resumed from %s at step %d", folder, state["step"])
    return state


# --- final output --------------------------------------------------------------------------


def model_card(config: TrainConfig, spec: Any, metrics: dict[str, Any]) -> str:
    """A short README.md for the adapter folder (also the hub's model card)."""
    before = metrics.get("before", {})
    after = metrics.get("after", {})

    def number(values: dict[str, Any], key: str) -> str:
        value = values.get(key)
        return f"{value:.3f}" if isinstance(value, int | float) else "-"

    table = "\n".join(
        f"| {label} | {number(before, key)} | {number(after, key)} |"
        for label, key in HEADLINE_MEASURES
    )
    data = metrics.get("data", {})
    modules = ", ".join(config.target_modules)
    modules += ", lm_head" if config.train_lm_head else ""
    modules += ", embeddings" if config.train_embeddings else ""
    return f"""---
library_name: peft
base_model: {spec.base}
tags: [lora, html, text-generation]
---
# HTML page LoRA adapter

A LoRA adapter (r={config.lora_r}, alpha={config.lora_alpha}, on {modules})
that makes `{spec.base}` answer a page description with one complete HTML document.
Trained by `python -m training` (quantization: {spec.quantization},
{metrics.get("steps", "?")} optimizer steps).

Data: `{config.data}`; {data.get("kept", "?")} pairs after cleaning
({data.get("train_rows", "?")} train, {data.get("eval_rows", "?")} eval).

| measure | before | after |
|---|---|---|
{table}

Use it with the bot's model package (same prompt template as training):

```python
from model.loading import load_model
from model.spec import resolve_spec
loaded = load_model(resolve_spec(base="{spec.base}", adapter="<this folder or hub id>"))
```

The full training settings are in `training_config.yaml`; all numbers in `metrics.json`.
"""


def save_output(
    output_dir: Path,
    model: Any,
    tokenizer: Any,
    config: TrainConfig,
    spec: Any,
    metrics: dict[str, Any],
) -> None:
    """Write the adapter, tokenizer, config, metrics and model card to ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    config.save(output_dir / "training_config.yaml")
    write_json(output_dir / "metrics.json", metrics)
    (output_dir / "README.md").write_text(model_card(config, spec, metrics), encoding="utf-8")
    log.info("adapter written to %s", output_dir)


def push_to_hub(output_dir: Path, repo_id: str, private: bool = True) -> str:
    """Upload the output folder (without checkpoints) to a hub model repo; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(output_dir), repo_id=repo_id, ignore_patterns=[f"{CHECKPOINTS}/*"]
        )
    except Exception as exc:  # network, auth and permission errors all end the upload here
        raise TrainingError(f"push to hub {repo_id!r} failed: {first_line(exc)}") from None
    return f"https://huggingface.co/{repo_id}"
