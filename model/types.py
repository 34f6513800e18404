"""Plain data types shared by the engine, the bot and training.

They hold no tensors, so ``bot/`` can import them without touching the GPU.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 1536
    temperature: float = 0.2
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


class PageMode(StrEnum):
    """How the model's answer becomes a page (``model.page``).

    ``document``: the model writes the whole HTML document, starting from the project's
    skeleton (doctype, head, the theme's CSS); for models that write good markup.
    ``compose``: the model writes the page's content as JSON under a grammar, and the project
    renders it through its own themed templates; the page comes out right whatever the model.
    """

    DOCUMENT = "document"
    COMPOSE = "compose"


class SafetyPolicy(StrEnum):
    """What a delivered page may do (``SAFETY``; ``model.page.safety`` applies it).

    ``standard``: inline scripts stay, remote loads and form posts are blocked by a
    Content-Security-Policy placed first in ``<head>``. ``strict``: scripts and handlers are
    removed by a sanitizer too. ``off``: the model's page passes through.
    """

    STRICT = "strict"
    STANDARD = "standard"
    OFF = "off"


@dataclass
class GenerationRequest:
    """One page to generate. ``cancel()`` may be called from any thread.

    A *refine* edits an existing page instead of making a new one: ``prompt`` is then the
    user's instruction ("make the headline about sourdough"), ``description`` the prompt
    the page was first made from (it titles the page and, in compose mode, picks the kind
    of page and its form), and the current page is ``source_page`` (document mode: its
    HTML) or ``source_content`` (compose mode: ``HtmlPage.content``, the content JSON).
    ``model.prompting.plan_answer`` builds the refine prompt from them.
    """

    prompt: str
    style: str | None = None
    mode: PageMode = PageMode.DOCUMENT
    safety: SafetyPolicy = SafetyPolicy.STANDARD
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancel_event: threading.Event = field(
        default_factory=threading.Event, repr=False, compare=False
    )
    source_page: str | None = field(default=None, repr=False)
    source_content: str | None = field(default=None, repr=False)
    description: str | None = None

    @property
    def is_refine(self) -> bool:
        """Whether this request edits a current page (a source page or content is set)."""
        return self.source_page is not None or self.source_content is not None

    @property
    def page_prompt(self) -> str:
        """The prompt the page is about: ``description`` for a refine that has one, else
        ``prompt``. Pass it as ``prompt`` to ``model.page.page_from_result``."""
        if self.is_refine and self.description:
            return self.description
        return self.prompt

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


class FinishReason(StrEnum):
    HTML_COMPLETE = "html_complete"  # the page's closing </html> was generated
    EOS = "eos"  # the model ended its answer
    LENGTH = "length"  # hit max_new_tokens: the page is probably truncated
    REPETITION = "repetition"  # stopped early: the answer had become a loop
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    total_s: float

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0


# Called from the generating thread with (request_id, tokens generated so far).
ProgressCallback = Callable[[str, int], None]


class TextGenerator(Protocol):
    """What the bot's worker needs from an engine (the real one or a test fake)."""

    @property
    def model_name(self) -> str: ...

    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """Generate for all requests in one batched pass; results in the same order."""
        ...


# take(max_count, wait) -> up to max_count new requests. With wait=True it may block
# briefly (the engine is idle); with wait=False it must return at once, maybe [].
RequestSource = Callable[[int, bool], list[GenerationRequest]]
ResultSink = Callable[[GenerationResult], None]


class ContinuousGenerator(Protocol):
    """An engine that admits new requests between decode steps (continuous batching).

    The bot's worker prefers this shape when the engine offers it: a job that arrives while
    others decode joins at the next step and a finished one is delivered at once.
    """

    @property
    def model_name(self) -> str: ...

    def serve(
        self,
        take: RequestSource,
        finished: ResultSink,
        progress: ProgressCallback | None,
        stop: threading.Event,
    ) -> None:
        """Serve until ``stop`` is set, then finish or cancel what is running and return."""
        ...
