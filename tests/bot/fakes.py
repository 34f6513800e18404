"""Small engines implementing model.types' TextGenerator / ContinuousGenerator protocols.

They stand in for the GPU in the scheduler and worker tests (the e2e tests may use them too):
each request "generates" ``tokens`` steps, sleeping ``token_delay_s`` per step, and returns
a tiny HTML page naming the prompt. Failures are injected by prompt text.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Sequence

from model.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    PageMode,
    ProgressCallback,
    RequestSource,
    ResultSink,
)

BOOM = "boom"  # a prompt containing this makes the engine raise


def fake_page(prompt: str) -> str:
    title = html.escape(prompt)
    return (
        f"<!DOCTYPE html><html><head><title>{title}</title></head>"
        f"<body><h1>{title}</h1><p>made by a fake engine</p></body></html>"
    )


def fake_compose_answer(prompt: str) -> str:
    """A complete compose-mode answer (the guided form of ``model.page.form``) for ``prompt``,
    with the plausible values the grammar benchmark fills forms with."""
    from bench.constrained_forms import filled_form
    from model.page.content import classify_prompt, page_subject

    return filled_form(classify_prompt(prompt), page_subject(prompt))


def fake_answer(request: GenerationRequest) -> str:
    """What the fake engines answer: a page in document mode, the form in compose mode."""
    if request.mode is PageMode.COMPOSE:
        return fake_compose_answer(request.prompt)
    return fake_page(request.prompt)


class OutOfMemory(RuntimeError):
    """What older torch builds raise; the worker recognises the message."""


class FakeEngine:
    """A batched TextGenerator. ``oom_above``: batches larger than this raise OOM."""

    model_name = "fake-model"

    def __init__(
        self,
        *,
        tokens: int = 5,
        token_delay_s: float = 0.0,
        oom_above: int | None = None,
        use_torch_oom: bool = False,
    ) -> None:
        self.tokens = tokens
        self.token_delay_s = token_delay_s
        self.oom_above = oom_above
        self.use_torch_oom = use_torch_oom
        self.calls: list[list[str]] = []
        self.threads: set[str] = set()
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def _raise_oom(self) -> None:
        if self.use_torch_oom:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise OutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB")

    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        self.calls.append([request.prompt for request in requests])
        self.threads.add(threading.current_thread().name)
        self.started.set()
        self.release.wait()
        if any(BOOM in request.prompt for request in requests):
            raise RuntimeError("the fake engine exploded")
        if self.oom_above is not None and len(requests) > self.oom_above:
            self._raise_oom()
        start = time.perf_counter()
        done = {request.request_id: 0 for request in requests}
        for step in range(1, self.tokens + 1):
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
            live = [request for request in requests if not request.cancelled]
            if not live:
                break
            for request in live:
                done[request.request_id] = step
                if progress is not None:
                    progress(request.request_id, step)
        total = time.perf_counter() - start
        return [self._result(request, done[request.request_id], total) for request in requests]

    def _result(self, request: GenerationRequest, tokens: int, total: float) -> GenerationResult:
        cancelled = request.cancelled
        return GenerationResult(
            request_id=request.request_id,
            text="" if cancelled else fake_answer(request),
            finish_reason=FinishReason.CANCELLED if cancelled else FinishReason.HTML_COMPLETE,
            prompt_tokens=len(request.prompt.split()),
            generated_tokens=tokens,
            time_to_first_token_s=min(total, self.token_delay_s),
            total_s=total,
        )


class FakeContinuousEngine(FakeEngine):
    """A ContinuousGenerator: ``slots`` sequences decode together, joining between steps."""

    def __init__(self, *, slots: int = 4, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.slots = slots
        self.serve_calls = 0
        self.max_active = 0

    def serve(
        self,
        take: RequestSource,
        finished: ResultSink,
        progress: ProgressCallback | None,
        stop: threading.Event,
    ) -> None:
        self.serve_calls += 1
        self.threads.add(threading.current_thread().name)
        active: dict[str, tuple[GenerationRequest, int, float]] = {}
        # Like model.fast.FastEngine: serve until stop is set; whatever still runs
        # then (or when an error escapes) is delivered as cancelled.
        try:
            while not stop.is_set():
                if len(active) < self.slots:
                    for request in take(self.slots - len(active), not active):
                        self.calls.append([request.prompt])
                        active[request.request_id] = (request, 0, time.perf_counter())
                        if BOOM in request.prompt:
                            raise RuntimeError("the fake engine exploded")
                    if self.oom_above is not None and len(active) > self.oom_above:
                        self._raise_oom()
                    self.max_active = max(self.max_active, len(active))
                if not active:
                    continue
                self.started.set()
                self.release.wait()
                if self.token_delay_s:
                    time.sleep(self.token_delay_s)
                for request_id, (request, steps, began) in list(active.items()):
                    if not request.cancelled:
                        steps += 1
                        active[request_id] = (request, steps, began)
                        if progress is not None:
                            progress(request_id, steps)
                    if request.cancelled or steps >= self.tokens:
                        del active[request_id]
                        finished(self._result(request, steps, time.perf_counter() - began))
        finally:
            for request, steps, began in active.values():
                result = self._result(request, steps, time.perf_counter() - began)
                finished(
                    GenerationResult(
                        **{**result.__dict__, "finish_reason": FinishReason.CANCELLED, "text": ""}
                    )
                )
