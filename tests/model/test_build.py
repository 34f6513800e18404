"""model.build: which engine a model gets, how big its batch is, how its KV slots are sized."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from model.build import (
    AUTO_MAX_BATCH,
    STANDARD_MAX_BATCH,
    BuiltEngine,
    EngineConfig,
    batch_size,
    build_engine,
    continuous_options,
    engine_for,
)
from model.errors import ModelError
from model.spec import resolve_spec
from model.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]


class _EngineWithSlots:
    """Stands in for the continuous engine: only its slot count matters here."""

    def __init__(self, slots: int) -> None:
        self.slots = slots


def test_batch_size_follows_the_engine_unless_max_batch_is_set() -> None:
    assert batch_size(object(), None) == STANDARD_MAX_BATCH == 8  # the standard engine
    assert batch_size(_EngineWithSlots(5), None) == 5  # a small card's KV cache
    assert batch_size(_EngineWithSlots(300), None) == AUTO_MAX_BATCH == 64
    assert batch_size(_EngineWithSlots(300), 12) == 12
    assert batch_size(object(), 12) == 12


def test_continuous_slots_hold_a_whole_prompt_and_answer() -> None:
    small = continuous_options(EngineConfig(max_new_tokens=64, max_prompt_chars=100))
    assert small.max_slots is None  # sized from free memory
    assert small.max_seq_len == 2048  # never below the engine's default
    long = continuous_options(EngineConfig(max_batch=4, max_new_tokens=4000, max_prompt_chars=3000))
    assert long.max_slots == 4
    # 4,000 answer tokens and 3,000 characters of prompt (at most 1,500 tokens) fit a slot.
    assert long.max_seq_len >= 4000 + 1500
    assert small.kv_cache == "bf16"
    assert continuous_options(EngineConfig(kv_cache="fp8")).kv_cache == "fp8"
    assert small.speculation == "refine"
    assert continuous_options(EngineConfig(speculation="off")).speculation == "off"


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "fast"},
        {"max_batch": 0},
        {"cpu_threads": 0},
        {"max_new_tokens": 0},
        {"kv_cache": "fp16"},
        {"speculation": "sometimes"},
    ],
)
def test_engine_config_refuses_nonsense(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EngineConfig(**changes)


def _cpu_spec(folder: Path) -> Any:
    return resolve_spec(base=str(folder), device="cpu")


def test_auto_on_a_cpu_builds_the_standard_engine(tiny_llama_dir: Path) -> None:
    built = build_engine(_cpu_spec(tiny_llama_dir), EngineConfig(kind="auto", cpu_threads=1))
    assert isinstance(built, BuiltEngine)
    assert built.kind == "standard" and not hasattr(built.engine, "serve")
    assert built.batch_size == STANDARD_MAX_BATCH
    assert built.device == "cpu" and built.warmup_seconds == 0.0
    assert built.model_name == built.engine.model_name == tiny_llama_dir.name
    request = GenerationRequest("a bakery", sampling=SamplingParams(max_new_tokens=4, seed=1))
    [result] = built.engine.generate([request])
    assert result.request_id == request.request_id and result.generated_tokens >= 1


def test_continuous_engine_batch_is_its_slots(tiny_llama_dir: Path) -> None:
    spec = _cpu_spec(tiny_llama_dir)
    built = build_engine(spec, EngineConfig(kind="continuous", cpu_threads=1))
    assert built.kind == "continuous" and callable(getattr(built.engine, "serve", None))
    assert built.batch_size == built.engine.slots  # type: ignore[union-attr]
    bounded = build_engine(spec, EngineConfig(kind="continuous", max_batch=3, cpu_threads=1))
    assert bounded.batch_size == 3 and bounded.engine.slots == 3  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def tiny_gpt2_dir(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2: a model the continuous (Llama-only) engine can't run."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_continuous_on_a_model_it_cannot_run_is_a_clear_model_error(tiny_gpt2_dir: Path) -> None:
    with pytest.raises(ModelError) as caught:
        build_engine(_cpu_spec(tiny_gpt2_dir), EngineConfig(kind="continuous", cpu_threads=1))
    message = str(caught.value)
    assert message.startswith("ENGINE=continuous can't run tiny-gpt2")
    assert "Llama" in message and "'gpt2'" in message and "ENGINE=standard" in message
    assert "\n" not in message


def test_auto_on_a_gpu_falls_back_to_the_standard_engine_for_other_models(
    tiny_gpt2_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    from model.loading import load_model

    loaded = load_model(_cpu_spec(tiny_gpt2_dir))
    # Only the device's name is read before the fast engine refuses the model, so a CPU
    # model labelled "cuda" stands in for a GPU here.
    on_gpu = dataclasses.replace(loaded, device=torch.device("cuda"))
    built = engine_for(on_gpu, EngineConfig(kind="auto"))
    assert built.kind == "standard" and built.batch_size == STANDARD_MAX_BATCH
    assert "continuous engine unavailable" in caplog.text


def test_fp8_on_a_model_the_continuous_engine_cannot_run_falls_back_to_bf16(
    tiny_gpt2_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # What MODEL_QUANTIZATION=auto gives on an H100 for any model: fp8 must not turn a
    # model the standard engine runs into a start-up failure.
    import torch

    from model.loading import load_model
    from model.spec import Quantization

    loaded = load_model(_cpu_spec(tiny_gpt2_dir))
    spec = loaded.spec.replace(quantization=Quantization.FP8)
    on_gpu = dataclasses.replace(loaded, spec=spec, device=torch.device("cuda"))
    built = engine_for(on_gpu, EngineConfig(kind="auto"))
    assert built.kind == "standard"
    assert "its weights run in bf16" in caplog.text


def test_a_model_that_cannot_load_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        build_engine(_cpu_spec(tmp_path / "no-such-model"), EngineConfig())


def test_building_an_engine_needs_no_bot_import() -> None:
    # A GPU worker process builds its engine from model.build alone.
    code = (
        "import sys, model.build, model.engine, model.fast\n"
        "bad = ('bot', 'discord')\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in bad)\n"
        "print(','.join(leaked))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.strip() == ""
