"""A continuous-batching engine for Llama models: slots, CUDA-graph decode, merged weights.

``FastEngine`` implements both ``TextGenerator`` (``generate``: serve a fixed list) and
``ContinuousGenerator`` (``serve``: take requests between decode steps). Each loop iteration:

1. drop cancelled sequences (their slots free at once);
2. take up to as many new requests as there are free slots (the scheduler keeps the queue);
3. prefill a limited number of newcomers' prompt tokens in one batched forward, so the
   running sequences wait at most one prefill between two of their tokens;
4. one decode step for all live sequences (one CUDA graph launch on a GPU), then deliver the
   ones that finished (``model.stopping.StopRule``: EOS, the page's closing ``</html>``,
   ``max_new_tokens``...).

This module is the scheduling: which request holds which row, when to prefill, launch and
collect. The model it drives is :class:`model.fast.runner.FastLlama`.

Semantics per request match ``model.engine.Engine``: the answer is planned by
``model.prompting.plan_answer`` (prompt, document prefix, constraint); greedy when
``temperature == 0``; the repetition penalty covers prompt and generated tokens, as in
transformers; a ``seed`` makes sampling repeatable (independent of which other requests
share the batch).

Constraints (``model.constrained``): a document's banned strings run on the device inside
the decode step (``SlotCache.ban_next``), so document mode keeps the launch-ahead loop. A
compose row's grammar mask depends on its previous token, which the host learns only when
it collects the step; while such a row is live the loop collects each step *before*
launching the next and fills the grammar rows' masks in between (one sync per step, only
then). The cost on the host is the grammar's (a few microseconds a row, xgrammar), and on
the GPU the gap between two steps: the host's bookkeeping of a step no longer overlaps the
next one (``bench/constrained.py --engine fast`` measures it).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from model.constrained import (
    BannedStrings,
    TokenConstraint,
    ban_automaton,
    constraint_for,
    fill_masks,
    full_bitmask,
)
from model.fast.runner import FastLlama
from model.prompting import BANNED_STRINGS, AnswerPlan, plan_answer
from model.stopping import StopRule, cut_after_page
from model.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ProgressCallback,
    RequestSource,
    ResultSink,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastEngineOptions:
    """Settings of :class:`FastEngine`.

    ``max_slots=None`` sizes the KV cache from free GPU memory (8 slots on CPU).
    ``ignore_eos`` runs every request to ``max_new_tokens`` (EOS and ``</html>`` ignored):
    for benchmarks, where random weights must produce fixed-length answers.
    """

    max_seq_len: int = 2048
    max_slots: int | None = None
    memory_fraction: float = 0.92
    prefill_tokens: int = 2048  # prompt tokens prefilled between two decode steps, at most
    use_cuda_graphs: bool = True
    compile_kernels: bool = True
    attention: str = "auto"  # Triton kernels on CUDA, else "sdpa"; or "matmul"
    progress_interval_s: float = 0.25
    ignore_eos: bool = False
    idle_wait: bool = True  # pass wait=True to take() when nothing runs
    # After an idle engine takes a request, how long it waits for others arriving with it
    # (many users at once): they then share one prefill instead of one each.
    burst_window_s: float = 0.005
    # "fp8": the decoder's projections in E4M3 (Hopper/Ada; model.fast.fp8_gemm), else bf16.
    weights: str = "bf16"
    # "fp8": K and V stored as E4M3 with a scale per token and head (model.fast.kv_cache):
    # half the cache bytes a step reads, twice the slots; "bf16": the model's dtype.
    kv_cache: str = "bf16"


@dataclass
class _Sequence:
    request: GenerationRequest
    plan: AnswerPlan
    prompt: list[int]
    max_new: int
    started: float
    constraint: TokenConstraint | None = None
    # Its banned strings run on the device from this state (0: none there).
    ban_state: int = 0
    row: int = -1
    first_token_at: float | None = None
    last_progress: float = 0.0
    generated: list[int] = field(default_factory=list)
    # Stays empty: forced tokens go one decode step each here (StopRule without jump_forward).
    forced: list[int] = field(default_factory=list)
    launched: int = 0  # decode steps launched for it (one may still be in flight)
    done: bool = False  # finished or cancelled: tokens of steps in flight are dropped

    @property
    def host_masked(self) -> bool:
        """Its mask must be filled by the host before each step (a grammar)."""
        return self.constraint is not None and self.ban_state == 0

    @property
    def host_constraint(self) -> TokenConstraint | None:
        """Its constraint when the host advances it (not one run on the device)."""
        return self.constraint if self.ban_state == 0 else None

    @property
    def is_form(self) -> bool:
        return self.plan.grammar is not None

    @property
    def cached(self) -> int:
        """Positions of its KV written once every launched step has run."""
        return len(self.prompt) + self.launched


class FastEngine:
    """Continuous batching over a slot KV cache; see the module docstring."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str | None = None,
        options: FastEngineOptions | None = None,
    ) -> None:
        self.options = options or FastEngineOptions()
        self.tokenizer = tokenizer
        self._name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "")
        opts = self.options
        self.runner = FastLlama(
            model,
            max_seq_len=opts.max_seq_len,
            max_slots=opts.max_slots,
            memory_fraction=opts.memory_fraction,
            use_cuda_graphs=opts.use_cuda_graphs,
            compile_kernels=opts.compile_kernels,
            attention=opts.attention,
            weight_format=opts.weights,
            kv_cache=opts.kv_cache,
        )
        self.stop_rule = StopRule.for_model(
            model, tokenizer, self.runner.vocab_size, ignore_eos=opts.ignore_eos
        )
        # The policies' banned strings, on the device before any graph is captured.
        banned = sorted(set(BANNED_STRINGS.values()))
        tables = [ban_automaton(tokenizer, b, self.runner.vocab_size).next_state for b in banned]
        self._ban_offsets = dict(zip(banned, self.runner.register_ban_tables(tables), strict=True))
        # False decodes every request without its constraint (benchmarks' baseline).
        self.constrain = True
        self._lock = threading.Lock()  # one serve()/generate() at a time

    @classmethod
    def from_loaded(cls, loaded: Any, options: FastEngineOptions | None = None) -> FastEngine:
        """Build from ``model.loading.LoadedModel``."""
        return cls(loaded.model, loaded.tokenizer, model_name=loaded.spec.name, options=options)

    @property
    def model_name(self) -> str:
        return str(self._name)

    @property
    def slots(self) -> int:
        return self.runner.slots

    def warmup(self, max_batch: int | None = None) -> int:
        """Capture the decode graphs and run the prefill shapes now rather than on first use.

        Returns how many graphs were captured. Call before serving (it uses slot 0 as scratch).
        """
        graphs = self.runner.capture_all(max_batch)
        self.runner.warm_prefill(self.options.prefill_tokens)
        return graphs

    # ------------------------------------------------------------ TextGenerator

    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """Generate all ``requests`` (continuously batched); results in the same order."""
        if not requests:
            return []
        pending = list(requests)
        results: dict[int, GenerationResult] = {}
        stop = threading.Event()
        index_of: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            index_of.setdefault(r.request_id, []).append(i)

        def take(count: int, wait: bool) -> list[GenerationRequest]:
            batch = pending[:count]
            del pending[:count]
            return batch

        def finished(result: GenerationResult) -> None:
            for i in index_of[result.request_id]:
                if i not in results:
                    results[i] = result
                    break
            if len(results) == len(requests):
                stop.set()

        self.serve(take, finished, progress, stop)
        return [results[i] for i in range(len(requests))]

    # ------------------------------------------------------ ContinuousGenerator

    def serve(
        self,
        take: RequestSource,
        finished: ResultSink,
        progress: ProgressCallback | None,
        stop: threading.Event,
    ) -> None:
        """Serve until ``stop`` is set; running requests are then cancelled and delivered."""
        with self._lock:
            live: list[_Sequence] = []
            waiting: deque[_Sequence] = deque()
            # The step in flight and the rows it ran (row -> sequence at launch time).
            inflight: tuple[tuple[int, int], list[_Sequence]] | None = None
            try:
                while not stop.is_set():
                    self._drop_cancelled(live, waiting, finished)
                    free = self.runner.slots - len(live) - len(waiting)
                    if free > 0:
                        idle = not live and not waiting and inflight is None
                        taken = take(free, idle and self.options.idle_wait)
                        window = self.options.burst_window_s
                        if idle and taken and len(taken) < free and window > 0:
                            time.sleep(window)  # nobody is decoding: this delays no one
                            taken += take(free - len(taken), False)
                        for request in taken:
                            self._admit(request, waiting, finished)
                    if waiting:
                        self._prefill(live, waiting, finished, progress)
                    if any(seq.host_masked for seq in live):
                        # A grammar's next mask needs the last token: collect, then launch.
                        if inflight is not None:
                            self._collect(inflight, live, finished, progress)
                        self._fill_masks(live)
                        inflight = self._launch(live) if live else None
                        continue
                    # Launch the next step before reading the last one's tokens: the GPU
                    # computes while the host does the bookkeeping of the previous step.
                    launched = self._launch(live) if live else None
                    if inflight is not None:
                        self._collect(inflight, live, finished, progress)
                    inflight = launched
            finally:
                for seq in [*live, *waiting]:
                    finished(self._result(seq, FinishReason.CANCELLED))

    # ------------------------------------------------------------------ steps

    def _admit(
        self, request: GenerationRequest, waiting: deque[_Sequence], finished: ResultSink
    ) -> None:
        now = time.perf_counter()
        plan = plan_answer(self.tokenizer, request)
        prompt = plan.prompt_ids
        limit = self.options.max_seq_len
        if len(prompt) >= limit:
            log.warning(
                "prompt of %d tokens cut to the last %d (max_seq_len %d)",
                len(prompt),
                limit // 2,
                limit,
            )
            prompt = prompt[-(limit // 2) :]
        # The token budget also keeps prompt + answer inside the sequence's cache row.
        max_new = min(request.sampling.max_new_tokens, limit - len(prompt))
        seq = _Sequence(request=request, plan=plan, prompt=prompt, max_new=max_new, started=now)
        if self.constrain:
            seq.constraint = constraint_for(plan, self.tokenizer, self.runner.vocab_size)
            offset = self._ban_offsets.get(plan.banned)
            if isinstance(seq.constraint, BannedStrings) and offset is not None:
                seq.ban_state = offset + seq.constraint.state
        if request.cancelled:
            finished(self._result(seq, FinishReason.CANCELLED))
            return
        waiting.append(seq)

    def _drop_cancelled(
        self, live: list[_Sequence], waiting: deque[_Sequence], finished: ResultSink
    ) -> None:
        for seq in [s for s in waiting if s.request.cancelled]:
            waiting.remove(seq)
            finished(self._result(seq, FinishReason.CANCELLED))
        gone = [s for s in live if s.request.cancelled]
        if gone:
            self._release(live, gone)
            for seq in gone:
                finished(self._result(seq, FinishReason.CANCELLED))

    def _prefill(
        self,
        live: list[_Sequence],
        waiting: deque[_Sequence],
        finished: ResultSink,
        progress: ProgressCallback | None,
    ) -> None:
        """Prefill newcomers up to the token budget (at least one) into rows after ``live``."""
        batch: list[_Sequence] = []
        budget = self.options.prefill_tokens
        while waiting and (not batch or budget >= len(waiting[0].prompt)):
            seq = waiting.popleft()
            budget -= len(seq.prompt)
            batch.append(seq)
        runner = self.runner
        for offset, seq in enumerate(batch):
            seq.row = len(live) + offset
            sampling = seq.request.sampling
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
            runner.cache.set_row(
                seq.row,
                prompt=seq.prompt,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                repetition_penalty=sampling.repetition_penalty,
                seed=seed,
                ban_state=seq.ban_state,
            )
        self._fill_masks(batch)
        rows = [s.row for s in batch]
        began = time.perf_counter()
        logits = runner.prefill(rows, [s.prompt for s in batch])
        tokens = runner.sample(rows, logits, [len(s.prompt) for s in batch])
        now = time.perf_counter()
        log.debug(
            "prefill: %d prompt(s), %d tokens, %.1f ms (%d still waiting)",
            len(batch),
            sum(len(s.prompt) for s in batch),
            (now - began) * 1000,
            len(waiting),
        )
        live.extend(batch)
        done: list[tuple[_Sequence, FinishReason]] = []
        accept = self.stop_rule.accept
        for seq, token in zip(batch, tokens, strict=True):
            seq.first_token_at = now
            runner.cache.start_row(seq.row, token, len(seq.prompt))
            reason = accept(seq, token)
            if reason is not None:
                done.append((seq, reason))
            else:
                self._report(seq, progress, now, force=True)
        self._deliver(live, done, finished)

    def _fill_masks(self, seqs: list[_Sequence]) -> None:
        """Fill and upload the next-token masks of the rows whose host fills them."""
        masked = [seq for seq in seqs if seq.host_masked]
        if not masked:
            return
        bitmask = full_bitmask(len(masked), self.runner.vocab_size)
        fill_masks([seq.constraint for seq in masked], bitmask)
        self.runner.cache.set_masks([seq.row for seq in masked], bitmask)

    def _launch(self, live: list[_Sequence]) -> tuple[tuple[int, int], list[_Sequence]]:
        context = max(s.cached for s in live) + 1
        ticket = self.runner.launch(len(live), context)
        for seq in live:
            seq.launched += 1
        return ticket, list(live)

    def _collect(
        self,
        inflight: tuple[tuple[int, int], list[_Sequence]],
        live: list[_Sequence],
        finished: ResultSink,
        progress: ProgressCallback | None,
    ) -> None:
        ticket, rows = inflight
        tokens = self.runner.collect(ticket)
        now = time.perf_counter()
        done: list[tuple[_Sequence, FinishReason]] = []
        accept = self.stop_rule.accept
        for seq, token in zip(rows, tokens, strict=True):
            if seq.done:  # finished or cancelled after this step was launched
                continue
            reason = accept(seq, token)
            if reason is not None:
                done.append((seq, reason))
            elif progress is not None:
                self._report(seq, progress, now)
        self._deliver(live, done, finished)

    def _report(
        self, seq: _Sequence, progress: ProgressCallback | None, now: float, force: bool = False
    ) -> None:
        if progress is None:
            return
        if not force and now - seq.last_progress < self.options.progress_interval_s:
            return
        seq.last_progress = now
        try:
            progress(seq.request.request_id, len(seq.generated))
        except Exception:  # a broken callback must not stop everyone's generation
            log.exception("progress callback failed for %s", seq.request.request_id)

    def _deliver(
        self,
        live: list[_Sequence],
        done: list[tuple[_Sequence, FinishReason]],
        finished: ResultSink,
    ) -> None:
        if not done:
            return
        self._release(live, [seq for seq, _ in done])
        for seq, reason in done:
            finished(self._result(seq, reason))

    def _release(self, live: list[_Sequence], gone: list[_Sequence]) -> None:
        """Remove ``gone`` from ``live``, moving the last live rows into the holes."""
        leaving = {id(s) for s in gone}
        for seq in gone:
            seq.done = True
        for seq in sorted(gone, key=lambda s: s.row):
            while live and id(live[-1]) in leaving:
                live.pop()
            if seq.row >= len(live):
                continue  # it was at the end and is gone already
            last = live.pop()
            self.runner.cache.move_row(last.row, seq.row, last.cached)
            last.row = seq.row
            live[seq.row] = last
        while live and id(live[-1]) in leaving:
            live.pop()
        assert all(s.row == i for i, s in enumerate(live)), "slot rows out of order"

    def _result(self, seq: _Sequence, reason: FinishReason) -> GenerationResult:
        now = time.perf_counter()
        text = seq.plan.prefix + self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        if reason == FinishReason.HTML_COMPLETE:
            text = cut_after_page(text)
        first = (seq.first_token_at - seq.started) if seq.first_token_at is not None else 0.0
        return GenerationResult(
            request_id=seq.request.request_id,
            text=text,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            generated_tokens=len(seq.generated),
            time_to_first_token_s=first,
            total_s=now - seq.started,
        )
