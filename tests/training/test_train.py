"""Training a tiny random Llama on the fixture: it learns, only the adapter moves, the output
folder loads through the model package, and --resume continues exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from model.engine import Engine
from model.loading import load_model
from model.spec import resolve_spec
from model.types import GenerationRequest, SamplingParams
from training.config import TrainConfig, load_yaml
from training.errors import TrainingError
from training.loop import TrainResult, train

from .conftest import FIXTURE, reset_accelerate_state

pytestmark = pytest.mark.slow


def tiny_config(base: Path, output_dir: Path, **changes: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "data": str(FIXTURE),
        "base": str(base),
        "output_dir": str(output_dir),
        "max_seq_len": 192,
        "overlong": "truncate",
        "batch_size": 2,
        "grad_accum": 1,
        "learning_rate": 1e-2,
        "lora_dropout": 0.0,
        "gradient_checkpointing": False,  # exercised by the SmolLM2 run; slower here
        "packing": False,  # one example a row keeps the step counts below easy to reason about
        "eval_generate": 0,
        "progress": False,
        "log_every": 5,
    }
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("trained")
    # 30 train rows, batch 2: 15 optimizer steps an epoch.
    config = tiny_config(tiny_base, out, epochs=2, eval_generate=2, eval_max_new_tokens=8)
    try:
        return train(config)
    finally:
        reset_accelerate_state()


def test_loss_falls_clearly(trained: TrainResult) -> None:
    history = [entry["loss"] for entry in trained.metrics["history"]]
    assert len(history) == 30
    first, last = sum(history[:3]) / 3, sum(history[-5:]) / 5
    assert last < first - 1.5, history
    before, after = trained.metrics["before"]["eval_loss"], trained.metrics["after"]["eval_loss"]
    assert after < before - 1.5
    assert trained.metrics["after"]["perplexity"] < trained.metrics["before"]["perplexity"] / 4
    assert [epoch["epoch"] for epoch in trained.metrics["epochs"]] == [1, 2]


def test_base_weights_unchanged_adapter_changed(trained: TrainResult, tiny_base: Path) -> None:
    base = load_file(str(tiny_base / "model.safetensors"))
    state = trained.model.state_dict()
    compared = 0
    for name, value in state.items():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if key in base:
            assert torch.equal(value.cpu(), base[key]), name
            compared += 1
    assert compared >= len(base) - 1  # lm_head is tied to the embeddings
    lora_b = [value for name, value in state.items() if "lora_B" in name]
    assert lora_b and all(value.abs().sum() > 0 for value in lora_b)  # B starts at zero
    trainable = {name for name, p in trained.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_output_folder_layout(trained: TrainResult) -> None:
    out = trained.output_dir
    for name in ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]:
        assert (out / name).is_file(), name
    config = load_yaml(out / "training_config.yaml")
    assert config["epochs"] == 2 and config["base"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["kept"] == 33 and metrics["steps"] == 30
    assert metrics["before"]["eval_loss"] > metrics["after"]["eval_loss"]
    # The page measures of the model package are reported before and after training.
    for key in ("complete_document_rate", "truncation_rate", "repetition_rate"):
        assert key in metrics["before"] and key in metrics["after"]
    card = (out / "README.md").read_text()
    assert "| eval loss |" in card and "library_name: peft" in card
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert "lm_head" not in adapter["target_modules"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all("lora_" in key for key in weights)
    assert (out / "adapter_model.safetensors").stat().st_size < 1_000_000


def test_adapter_loads_through_model_package_and_changes_output(
    trained: TrainResult, tiny_base: Path
) -> None:
    request = GenerationRequest(
        prompt="a landing page for a bakery with opening hours",
        sampling=SamplingParams(max_new_tokens=12, temperature=0.0),
    )
    plain = load_model(resolve_spec(base=str(tiny_base), device="cpu"))
    with_adapter = load_model(
        resolve_spec(base=str(tiny_base), adapter=str(trained.output_dir), device="cpu")
    )
    assert with_adapter.spec.adapter == str(trained.output_dir)
    [base_result] = Engine(plain).generate([request])
    [tuned_result] = Engine(with_adapter).generate([request])
    assert tuned_result.text != base_result.text
    # and it is the trained weights that do it: the same logits as the in-memory model
    ids = torch.tensor([with_adapter.tokenizer("<!DOCTYPE html>")["input_ids"]])
    trained.model.eval()
    with torch.no_grad():
        expected = trained.model(input_ids=ids).logits
        got = with_adapter.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_resume_continues_with_same_step_and_optimizer_state(
    tiny_base: Path, tmp_path: Path
) -> None:
    # 10 train rows, batch 2, grad_accum 2: 3 optimizer steps an epoch (the last one on a
    # single micro-batch), 6 in all; a checkpoint every 2 steps and at each epoch's end.
    common = {"max_rows": 12, "epochs": 2, "grad_accum": 2, "save_every": 2, "keep_checkpoints": 10}
    full = train(tiny_config(tiny_base, tmp_path / "full", **common))
    reset_accelerate_state()
    assert full.metrics["steps"] == 6
    steps = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert steps == ["step-000002", "step-000003", "step-000004", "step-000006"]

    # Resume mid-epoch (step 2) into a fresh folder: the rest of the run must be the same.
    checkpoint = tmp_path / "full" / "checkpoints" / "step-000002"
    resumed = train(tiny_config(tiny_base, tmp_path / "resumed", resume=str(checkpoint), **common))
    reset_accelerate_state()
    assert resumed.metrics["resumed_from_step"] == 2
    assert [entry["step"] for entry in resumed.metrics["history"]] == [1, 2, 3, 4, 5, 6]
    assert resumed.metrics["history"][:2] == full.metrics["history"][:2]
    for mine, theirs in zip(resumed.metrics["history"], full.metrics["history"], strict=True):
        assert mine["lr"] == pytest.approx(theirs["lr"])
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    final_full = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    final_resumed = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    for key, value in final_full.items():
        torch.testing.assert_close(final_resumed[key], value, atol=1e-5, rtol=1e-4)
    # The optimizer's moments at the end match too (they were restored, not restarted).
    opt_full = torch.load(tmp_path / "full" / "checkpoints" / "step-000006" / "optimizer.pt")
    opt_resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "step-000006" / "optimizer.pt")
    for index, state in opt_full["state"].items():
        assert int(opt_resumed["state"][index]["step"]) == int(state["step"]) == 6
        torch.testing.assert_close(
            opt_resumed["state"][index]["exp_avg_sq"], state["exp_avg_sq"], atol=1e-7, rtol=1e-3
        )

    # `--resume` (latest) picks the newest checkpoint: the run is already finished.
    again = train(tiny_config(tiny_base, tmp_path / "full", resume="latest", **common))
    reset_accelerate_state()
    assert again.metrics["resumed_from_step"] == 6 and again.metrics["steps"] == 6

    # Resuming with settings that change the batch schedule is refused, by name.
    changed = {**common, "batch_size": 3}
    with pytest.raises(TrainingError, match=r"other settings \(batch_size 2 -> 3\)"):
        train(tiny_config(tiny_base, tmp_path / "full", resume="latest", **changed))
    reset_accelerate_state()


def test_resume_without_checkpoint_is_a_clear_error(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="no checkpoint in"):
        train(tiny_config(tiny_base, tmp_path / "none", resume="latest", max_rows=6))


def test_packed_run_and_early_stopping(tiny_base: Path, tmp_path: Path) -> None:
    """Packing puts several examples in a row; a run that stops improving stops early and
    keeps the best epoch's adapter."""
    config = tiny_config(
        tiny_base,
        tmp_path / "packed",
        packing=True,
        max_seq_len=1024,
        max_rows=12,
        epochs=5,
        learning_rate=1e-9,  # too small to move the eval loss by the 1e-4 that counts
        early_stopping_patience=1,
    )
    result = train(config)
    reset_accelerate_state()
    tokens = result.metrics["tokens"]["train"]
    assert tokens["rows_after_packing"] < tokens["examples"]
    assert result.metrics["early_stopped_at_epoch"] == 2
    assert [epoch["epoch"] for epoch in result.metrics["epochs"]] == [1, 2]
    assert all(math.isfinite(entry["loss"]) for entry in result.metrics["history"])
    # The adapter written out is epoch 1's (the best), not epoch 2's: bit for bit, since a
    # 1e-9 learning rate moves the weights too little for a tolerance to tell them apart.
    [best] = [
        folder
        for folder in (tmp_path / "packed" / "checkpoints").iterdir()
        if json.loads((folder / "trainer_state.json").read_text())["epoch"] == 1
    ]
    written = load_file(str(tmp_path / "packed" / "adapter_model.safetensors"))
    at_best = load_file(str(best / "adapter_model.safetensors"))
    assert written.keys() == at_best.keys()
    assert all(torch.equal(written[key], at_best[key]) for key in written)


def _landing_pairs(path: Path, count: int) -> Path:
    """``count`` landing pages with enough text for compose examples, as a JSONL file."""
    page = (Path(__file__).parent / "data" / "landing.html").read_text(encoding="utf-8")
    names = ["Juniper", "Cedar", "Maple", "Willow", "Aspen", "Rowan", "Hazel", "Linden"]
    with path.open("w", encoding="utf-8") as file:
        for name in names[:count]:
            row = {
                "label": f"a landing page for {name} yoga",
                "html": page.replace("Juniper", name),
            }
            file.write(json.dumps(row) + "\n")
    return path


def test_compose_mode_run(tiny_base: Path, tmp_path: Path) -> None:
    """Compose mode trains on form answers only; 'both' adds a document example per pair."""
    data = _landing_pairs(tmp_path / "landing.jsonl", 8)
    config = tiny_config(
        tiny_base,
        tmp_path / "compose",
        data=str(data),
        page_mode="compose",
        max_seq_len=512,
        epochs=3,
        eval_generate=1,
        eval_max_new_tokens=16,
    )
    result = train(config)
    reset_accelerate_state()
    tokens = result.metrics["tokens"]["train"]
    assert (tokens["document_examples"], tokens["compose_examples"]) == (0, 7)
    assert tokens["compose_skipped"] == 0
    assert result.metrics["tokens"]["eval"]["compose_examples"] == 1
    history = [entry["loss"] for entry in result.metrics["history"]]
    assert all(math.isfinite(loss) for loss in history)
    # Seven near-identical form answers: the adapter learns them quickly.
    assert result.metrics["after"]["eval_loss"] < result.metrics["before"]["eval_loss"] - 1.0
    assert result.metrics["after"]["prompts"] == 1  # one eval page, generated in compose mode
    assert TrainConfig(**load_yaml(tmp_path / "compose" / "training_config.yaml")).page_mode == (
        "compose"
    )

    both = tiny_config(
        tiny_base, tmp_path / "both", data=str(data), page_mode="both", max_seq_len=512, max_steps=1
    )
    tokens = train(both).metrics["tokens"]["train"]
    reset_accelerate_state()
    assert (tokens["document_examples"], tokens["compose_examples"]) == (7, 7)
