"""Helpers for the end-to-end tests: the tiny model, a controllable engine, log checks."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from model.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ProgressCallback,
    TextGenerator,
)
from tests.fake_discord import FakeDiscord

# ChatML, the format of SmolLM2 and many small chat models.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Bakery</title>",
    "<style>body{font-family:sans-serif;margin:0;padding:2rem;color:#333}</style></head>",
    "<body><header><h1>Welcome</h1><nav><a href='#menu'>Menu</a></nav></header>",
    "<main><section id='menu'><ul><li>Croissant</li><li>Baguette</li></ul></section></main>",
    "<footer><p>Open every day</p></footer><script>console.log('hi')</script></body></html>",
    "Create a web page: a landing page for a bakery. You are an expert web developer.",
    "Answer with one complete, self-contained HTML5 document and nothing else.",
]


def build_tiny_model(folder: Path) -> None:
    """A tiny random Llama and a trained 400-token byte-level BPE tokenizer in ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_CORPUS * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    # A random model may end its answer at once (EOS first), and an empty answer is no page:
    # that would make page-delivery tests flaky. So every embedding gets a large constant
    # in dimension 0, which dominates the normalised hidden state, and the special tokens'
    # output rows get a large negative weight there: their logits are about -50, so they
    # are never sampled, while the other tokens stay random.
    special_ids = [tokenizer.convert_tokens_to_ids(t) for t in specials]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[special_ids, 0] = -10.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class ControlledEngine:
    """Wraps the real engine to fail or stall on cue (the engine is not under test here).

    * ``hold()`` / ``release()``: ``generate`` blocks (like a long GPU batch) until released,
      returning early with a cancelled result for requests cancelled meanwhile;
      ``allow(n)`` while held lets exactly ``n`` more batches through;
    * ``fail_next(n)``: the next ``n`` ``generate`` calls raise ``RuntimeError``;
    * ``delay_s``: each batch takes at least this long.

    It records every batch of prompts it was given.
    """

    def __init__(self, inner: TextGenerator, *, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self._cond = threading.Condition()
        self._held = False
        self._permits = 0
        self._failures = 0
        self._lock = threading.Lock()
        self.batches: list[list[str]] = []
        self.busy = threading.Event()  # set while a batch is inside generate

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @property
    def prompts(self) -> list[str]:
        return [p for batch in self.batches for p in batch]

    def hold(self) -> None:
        with self._cond:
            self._held = True
            self._permits = 0

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def allow(self, batches: int = 1) -> None:
        with self._cond:
            self._permits += batches
            self._cond.notify_all()

    def _pass_gate(self, requests: Sequence[GenerationRequest]) -> None:
        with self._cond:
            while self._held and self._permits == 0:
                if all(r.cancelled for r in requests):
                    return
                self._cond.wait(0.01)
            if self._held:
                self._permits -= 1

    def fail_next(self, n: int = 1) -> None:
        with self._lock:
            self._failures += n

    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        self.batches.append([r.prompt for r in requests])
        self.busy.set()
        try:
            started = time.monotonic()
            self._pass_gate(requests)
            remaining = self.delay_s - (time.monotonic() - started)
            if remaining > 0:
                time.sleep(remaining)
            with self._lock:
                if self._failures:
                    self._failures -= 1
                    raise RuntimeError("injected engine failure")
            return self.inner.generate(requests, progress)
        finally:
            self.busy.clear()


class ShortAnswers:
    """The real engine with every request's ``max_new_tokens`` capped (the bot's own
    setting can't go below 16): for tests about the bot, where many pages must be quick.
    Request ids and cancel flags are kept, so the bot sees its own requests come back."""

    def __init__(self, inner: TextGenerator, max_new_tokens: int = 4) -> None:
        self.inner = inner
        self.max_new_tokens = max_new_tokens
        self.batch_sizes: list[int] = []

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        self.batch_sizes.append(len(requests))
        short = [
            replace(r, sampling=replace(r.sampling, max_new_tokens=self.max_new_tokens))
            for r in requests
        ]
        return self.inner.generate(short, progress)


class FixedAnswer:
    """An engine that answers every request with ``text`` (for tests of delivery sizes)."""

    model_name = "fixed-answer"

    def __init__(self, text: str) -> None:
        self.text = text

    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        return [
            GenerationResult(
                request_id=r.request_id,
                text=self.text,
                finish_reason=FinishReason.HTML_COMPLETE,
                prompt_tokens=10,
                generated_tokens=100,
                time_to_first_token_s=0.01,
                total_s=0.1,
            )
            for r in requests
        ]


@dataclass
class BotRun:
    """A running HtmlBot connected to the fake."""

    bot: Any
    task: asyncio.Task[None]
    fake: FakeDiscord
    settings: Any
    engine: Any
    sync_payload: list[dict[str, Any]] = field(default_factory=list)


async def close_bot(run: BotRun, timeout: float = 40.0) -> None:  # noqa: ASYNC109
    """``bot.close()`` and the end of ``bot.start()``, failing with every stack if it hangs."""
    try:
        await asyncio.wait_for(run.bot.close(), timeout)
        await asyncio.wait_for(run.task, 10)
    except TimeoutError:
        pytest.fail(f"HtmlBot.close() did not finish in {timeout} s\n" + hang_report())


def hang_report() -> str:
    """Where every task and thread is, to tell why a shutdown hangs."""
    lines = ["tasks:"]
    for task in asyncio.all_tasks():
        if task.done():
            continue
        frames = task.get_stack(limit=4)
        where = " <- ".join(
            f"{Path(f.f_code.co_filename).name}:{f.f_code.co_name}:{f.f_lineno}"
            for f in reversed(frames)
        )
        lines.append(f"  {task.get_name()}: {where}")
    lines.append("threads:")
    for thread_id, frame in sys._current_frames().items():
        stack = traceback.extract_stack(frame, limit=4)
        where = " <- ".join(f"{Path(s.filename).name}:{s.name}:{s.lineno}" for s in reversed(stack))
        lines.append(f"  {thread_id}: {where}")
    return "\n".join(lines)


StartBot = Callable[..., Awaitable[BotRun]]


def default_settings(fake: FakeDiscord, tmp_path: Path, **overrides: Any) -> Any:
    from bot.settings import Settings

    values: dict[str, Any] = {
        "discord_token": fake.bot_token,
        "discord_api_base": fake.api_base,
        "discord_gateway_url": fake.gateway_url,
        "dev_guild_id": fake.guild.id,
        "results_dir": tmp_path / "results",
        "max_new_tokens": 16,
        "queue_edit_interval_s": 0.2,
        "edits_per_second": 50.0,
        "shutdown_deadline_s": 5.0,
        "initial_job_seconds": 1.0,
        "log_level": "INFO",
        # The engines here write documents; the compose flow has its own test.
        "page_mode": "document",
        # A tiny random model's 16-token pages are often empty: regenerating them would
        # change the queue these tests watch (tests/bot covers the regeneration).
        "regenerate_empty": False,
        # Previews cost a Chromium run each: only the tests about them turn them on.
        "preview": "off",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# discord.py start-up notices that say nothing about the protocol: no voice libraries, and
# the bot's choice of Intents.none() (interactions need no intents).
_BENIGN = ("voice will NOT be supported", "Guilds intent seems to be disabled")


def discord_problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings and errors logged by discord.py (benign start-up notices aside)."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("discord")
        and r.levelno >= logging.WARNING
        and not any(b in r.getMessage() for b in _BENIGN)
    ]


def bot_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Errors logged by the bot package."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("bot") and r.levelno >= logging.ERROR
    ]
