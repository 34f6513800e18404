"""Fixtures for the training tests: the SmolLM2 tokenizer and a tiny random Llama on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import tiny

FIXTURE = Path(__file__).parent / "data" / "pages.jsonl"


@pytest.fixture(scope="session")
def tokenizer(smollm2_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_base(
    smollm2_tokenizer_dir: Path, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny random LlamaForCausalLM with the SmolLM2 tokenizer, saved like a hub model."""
    # The final RMSNorm fixes the hidden state's norm (~8 at width 64), so with the default
    # 0.02 init the tied embeddings can move a logit by about +-1 at most and the loss could
    # never fall far below ln(49152) = 10.8, however well LoRA learns. Real models have
    # larger embeddings; 0.1 gives this one room to learn.
    return tiny.save_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama"),
        smollm2_tokenizer_dir,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        lm_head_std=None,
        embed_std=0.1,
        pad_token_id=tokenizer.pad_token_id,
    )


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons, so that the next training run starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # PartialState too
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps process-wide singletons; each training run in a test starts clean."""
    yield
    reset_accelerate_state()
