"""A continuous-batching engine for Llama models: slots, CUDA-graph decode, merged weights.

``FastEngine`` implements both ``TextGenerator`` (``generate``: serve a fixed list) and
``ContinuousGenerator`` (``serve``: take requests between decode steps). Each loop iteration:

1. drop cancelled sequences (their slots free at once);
2. take up to as many new requests as there are free slots (the scheduler keeps the queue);
3. prefill at most ``prefill_tokens`` of the waiting prompts' tokens in one batched forward
   (``idle_prefill_tokens`` when more wait than decode), so the running sequences wait at
   most one such prefill between two of their tokens: a longer prompt is cut into chunks,
   one per iteration (``model.fast.prefill_plan``), and a
   prompt starting like earlier ones gets their shared prefix's KV copied into its row
   instead (``model.fast.prefix_cache``);
4. one decode step for all live sequences (one CUDA graph launch on a GPU), then deliver the
   ones that finished (``model.stopping.StopRule``: EOS, the page's closing ``</html>``,
   ``max_new_tokens``...). With speculative decoding (``FastEngineOptions.speculation``),
   while a row drafts and the batch is small the step is a verify step instead
   (``model.fast.verify``): each row's draft (``model.fast.speculative``, n-grams of its own
   prompt: a refine copies most of its page) checked in one forward, several tokens a step,
   the same tokens as plain decoding.

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

import functools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from model.constrained import (
    BannedStrings,
    ban_automaton,
    constraint_for,
    fill_masks,
    full_bitmask,
)
from model.fast.prefill_plan import PrefillStats, plan_chunks
from model.fast.prefix_cache import PrefixCache, PrefixHit, read_prefix, write_prefix
from model.fast.runner import FastLlama
from model.fast.sequences import (
    SPECULATION_KINDS,
    FastEngineOptions,
    ServedSequence,
    SpeculationStats,
)
from model.fast.speculative import DEFAULT_MAX_NGRAM, PromptLookup
from model.prompting import BANNED_STRINGS, plan_answer
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
        if opts.speculation not in SPECULATION_KINDS:
            raise ValueError(
                f"speculation must be one of {SPECULATION_KINDS}, not {opts.speculation!r}"
            )
        if opts.draft_tokens < 1 and opts.speculation != "off":
            raise ValueError("draft_tokens must be at least 1 (or speculation='off')")
        if not 1 <= opts.draft_min_ngram <= DEFAULT_MAX_NGRAM:
            raise ValueError(
                f"draft_min_ngram must be 1 to {DEFAULT_MAX_NGRAM}, not {opts.draft_min_ngram}"
            )
        self.runner = FastLlama(
            model,
            max_seq_len=opts.max_seq_len,
            max_slots=opts.max_slots,
            memory_fraction=opts.memory_fraction,
            use_cuda_graphs=opts.use_cuda_graphs,
            compile_kernels=opts.compile_kernels,
            attention=opts.attention,
            weight_format=opts.weights,
            draft_tokens=opts.draft_tokens if opts.speculation != "off" else 0,
            verify_rows=opts.speculative_rows,
            kv_cache=opts.kv_cache,
        )
        # Drafted and kept draft tokens, and verify steps run, since the engine was built.
        self.speculation_stats = SpeculationStats()
        self.stop_rule = StopRule.for_model(
            model, tokenizer, self.runner.vocab_size, ignore_eos=opts.ignore_eos
        )
        # The policies' banned strings, on the device before any graph is captured.
        banned = sorted(set(BANNED_STRINGS.values()))
        tables = [ban_automaton(tokenizer, b, self.runner.vocab_size).next_state for b in banned]
        self._ban_offsets = dict(zip(banned, self.runner.register_ban_tables(tables), strict=True))
        # False decodes every request without its constraint (benchmarks' baseline).
        self.constrain = True
        self.prefix_cache = PrefixCache(max_bytes=opts.prefix_cache_mb * 2**20)
        self.prefill_stats = PrefillStats()
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

        Returns how many graphs were captured. Call before serving (it uses slots as scratch).
        """
        graphs = self.runner.capture_all(max_batch)
        opts = self.options
        self.runner.warm_prefill(max(opts.prefill_tokens, opts.idle_prefill_tokens))
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
            live: list[ServedSequence] = []
            waiting: deque[ServedSequence] = deque()
            # The step in flight and the rows it ran (row -> sequence at launch time).
            inflight: tuple[tuple[int, int], list[ServedSequence]] | None = None
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
                    if self._speculating(live):
                        # Drafts need every row's latest token: collect, then verify.
                        if inflight is not None:
                            self._collect(inflight, live, finished, progress)
                            inflight = None
                        drafts = self._drafts(live)
                        if any(drafts):
                            self._verify(live, drafts, finished, progress)
                        elif live:
                            inflight = self._launch(live)
                        continue
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
        self, request: GenerationRequest, waiting: deque[ServedSequence], finished: ResultSink
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
        seq = ServedSequence(
            request=request, plan=plan, prompt=prompt, max_new=max_new, started=now
        )
        if self.constrain:
            seq.constraint = constraint_for(plan, self.tokenizer, self.runner.vocab_size)
            offset = self._ban_offsets.get(plan.banned)
            if isinstance(seq.constraint, BannedStrings) and offset is not None:
                seq.ban_state = offset + seq.constraint.state
        if self._drafts_for(seq):
            seq.drafter = PromptLookup(prompt, min_ngram=self.options.draft_min_ngram)
        if request.cancelled:
            finished(self._result(seq, FinishReason.CANCELLED))
            return
        waiting.append(seq)

    def _drafts_for(self, seq: ServedSequence) -> bool:
        """Whether ``seq`` drafts: per ``options.speculation``, and never under a grammar
        (its masks are filled on the host one token at a time)."""
        kind = self.options.speculation
        if kind == "off" or seq.is_form or seq.host_masked:
            return False
        return kind == "all" or seq.request.is_refine

    def _drop_cancelled(
        self, live: list[ServedSequence], waiting: deque[ServedSequence], finished: ResultSink
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
        live: list[ServedSequence],
        waiting: deque[ServedSequence],
        finished: ResultSink,
        progress: ProgressCallback | None,
    ) -> None:
        """Prefill the next chunks of the waiting prompts (``plan_chunks``); those whose last
        chunk ran sample their first token and join ``live``.

        Rows: live sequences hold rows ``0..n-1``. The prompts completing here take rows
        ``n, n+1, ...`` in order; the one cut short (at most one: chunks go in order) keeps
        the next row, parked (``SlotCache.park_row``), and stays first in ``waiting``. Not
        being in ``live``, ``_release`` never moves it and decode steps run it only as
        padding. If rows below it are freed meanwhile it moves down with its last chunk.
        """
        runner, cache, stats = self.runner, self.runner.cache, self.prefill_stats
        prefixes = self.prefix_cache if self.options.prefix_cache else None
        if prefixes is not None:
            prefixes.keep_for((runner.weights.weight_format, cache.kv_format))
        hits: list[PrefixHit | None] = []

        def spans() -> Iterator[tuple[int, int]]:
            for seq in waiting:
                hit = None
                if prefixes is not None and seq.row < 0:  # not started: a shared prefix?
                    hit = prefixes.lookup(seq.prompt)
                hits.append(hit)
                yield (hit.length if hit else seq.prefilled), len(seq.prompt)

        opts = self.options
        plan = plan_chunks(spans(), self._prefill_budget(live, len(waiting)), opts.chunked_prefill)
        batch = [waiting[i] for i in range(len(plan))]
        first = len(live)
        for i, (seq, hit, (_, end)) in enumerate(zip(batch, hits, plan, strict=False)):
            row = first + i
            if seq.row < 0:  # its first chunk
                seq.row = row
                cache.park_row(row)
                if hit is not None:
                    write_prefix(cache, row, hit.entry.kv, hit.length)
                    seq.prefilled = hit.length
                    stats.reused_tokens += hit.length
            elif seq.row != row and end == len(seq.prompt):
                assert seq.row > row, "a partly prefilled row below the live ones"
                cache.move_row(seq.row, row, seq.prefilled)  # live rows below it left
                seq.row = row
        began = time.perf_counter()
        logits = runner.prefill(
            [seq.row for seq in batch],
            [seq.prompt[start:end] for seq, (start, end) in zip(batch, plan, strict=True)],
            [start for start, _ in plan],
        )
        stats.forwards += 1
        stats.computed_tokens += sum(end - start for start, end in plan)
        for seq, (_, end) in zip(batch, plan, strict=True):
            seq.prefilled = end
        ready = [seq for seq in batch if seq.prefilled == len(seq.prompt)]
        stats.cuts += len(batch) - len(ready)
        for seq in ready:
            popped = waiting.popleft()  # the ready ones are the first waiting
            assert popped is seq
        log.debug(
            "prefill: %d chunk(s), %d tokens, %d prompt(s) ready, %.1f ms (%d still waiting)",
            len(batch),
            sum(end - start for start, end in plan),
            len(ready),
            (time.perf_counter() - began) * 1000,
            len(waiting),
        )
        if not ready:
            stats.seconds += time.perf_counter() - began
            return
        stats.prompts += len(ready)
        for seq in ready:
            sampling = seq.request.sampling
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
            cache.set_row(
                seq.row,
                prompt=seq.prompt,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                repetition_penalty=sampling.repetition_penalty,
                seed=seed,
                ban_state=seq.ban_state,
            )
        self._fill_masks(ready)
        rows = [seq.row for seq in ready]
        tokens = runner.sample(rows, logits[: len(ready)], [len(s.prompt) for s in ready])
        now = time.perf_counter()
        stats.seconds += now - began
        if prefixes is not None:
            for seq in ready:  # its row holds the whole prompt's KV now
                prefixes.learn(seq.prompt, functools.partial(read_prefix, cache, seq.row))
        live.extend(ready)
        assert all(s.row == i for i, s in enumerate(live)), "slot rows out of order"
        done: list[tuple[ServedSequence, FinishReason]] = []
        accept = self.stop_rule.accept
        for seq, token in zip(ready, tokens, strict=True):
            seq.first_token_at = now
            cache.start_row(seq.row, token, len(seq.prompt))
            reason = accept(seq, token)
            if reason is not None:
                done.append((seq, reason))
            else:
                self._report(seq, progress, now, force=True)
        self._deliver(live, done, finished)

    def _prefill_budget(self, live: list[ServedSequence], waiting: int) -> int:
        """Prompt tokens the next prefill may take: up to ``idle_prefill_tokens`` when none
        decodes or more wait than decode (a burst: the few decoding rows' longer stall costs
        less than the many waiting prompts' extra iterations; measured in bench/RESULTS.md),
        else ``prefill_tokens`` (each decoding sequence waits for it)."""
        opts = self.options
        if live and len(live) >= waiting:
            return max(1, opts.prefill_tokens)
        return max(1, opts.prefill_tokens, opts.idle_prefill_tokens)

    def _fill_masks(self, seqs: list[ServedSequence]) -> None:
        """Fill and upload the next-token masks of the rows whose host fills them."""
        masked = [seq for seq in seqs if seq.host_masked]
        if not masked:
            return
        bitmask = full_bitmask(len(masked), self.runner.vocab_size)
        fill_masks([seq.constraint for seq in masked], bitmask)
        self.runner.cache.set_masks([seq.row for seq in masked], bitmask)

    def _launch(self, live: list[ServedSequence]) -> tuple[tuple[int, int], list[ServedSequence]]:
        context = max(s.cached for s in live) + 1
        ticket = self.runner.launch(len(live), context)
        for seq in live:
            seq.launched += 1
        return ticket, list(live)

    def _speculating(self, live: list[ServedSequence]) -> bool:
        """Whether this step is a verify step's turn: a row that drafts, few enough rows for
        the verify graphs, none under a host-filled mask, and room in every row for a draft."""
        runner = self.runner
        if not live or len(live) > runner.verify_rows:
            return False
        if not any(seq.drafter is not None for seq in live):
            return False
        if any(seq.host_masked for seq in live):
            return False
        room = runner.max_seq_len - runner.cache.draft_tokens - 1
        return max(seq.cached for seq in live) <= room

    def _drafts(self, live: list[ServedSequence]) -> list[list[int]]:
        """Each live row's draft (empty where it has none)."""
        count = self.runner.cache.draft_tokens
        drafts: list[list[int]] = []
        for seq in live:
            drafter = seq.drafter
            if drafter is None:
                drafts.append([])
                continue
            drafter.update(seq.generated)
            # A step gives its kept drafts plus one token: never more than the budget left.
            room = seq.max_new - len(seq.generated) - 1
            drafts.append(drafter.propose(min(count, room)))
        return drafts

    def _verify(
        self,
        live: list[ServedSequence],
        drafts: list[list[int]],
        finished: ResultSink,
        progress: ProgressCallback | None,
    ) -> None:
        """One verify step: every row keeps the drafts the model agrees with, plus one."""
        context = max(s.cached for s in live) + self.runner.cache.draft_tokens + 1
        rows = list(live)
        kept = self.runner.verify(drafts, context)
        now = time.perf_counter()
        stats = self.speculation_stats
        stats.steps += 1
        stats.rows += len(rows)
        done: list[tuple[ServedSequence, FinishReason]] = []
        accept = self.stop_rule.accept
        for seq, draft, tokens in zip(rows, drafts, kept, strict=True):
            seq.launched += len(tokens)
            stats.drafted += len(draft)
            stats.accepted += len(tokens) - 1
            stats.tokens += len(tokens)
            for token in tokens:
                reason = accept(seq, token)
                if reason is not None:
                    done.append((seq, reason))
                    break
            else:
                if progress is not None:
                    self._report(seq, progress, now)
        self._deliver(live, done, finished)

    def _collect(
        self,
        inflight: tuple[tuple[int, int], list[ServedSequence]],
        live: list[ServedSequence],
        finished: ResultSink,
        progress: ProgressCallback | None,
    ) -> None:
        ticket, rows = inflight
        tokens = self.runner.collect(ticket)
        now = time.perf_counter()
        done: list[tuple[ServedSequence, FinishReason]] = []
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
        self,
        seq: ServedSequence,
        progress: ProgressCallback | None,
        now: float,
        force: bool = False,
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
        live: list[ServedSequence],
        done: list[tuple[ServedSequence, FinishReason]],
        finished: ResultSink,
    ) -> None:
        if not done:
            return
        self._release(live, [seq for seq, _ in done])
        for seq, reason in done:
            finished(self._result(seq, reason))

    def _release(self, live: list[ServedSequence], gone: list[ServedSequence]) -> None:
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

    def _result(self, seq: ServedSequence, reason: FinishReason) -> GenerationResult:
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
