"""Batched generation on one device, with per-request sampling, cancellation and progress.

A plain decode loop over the Hugging Face forward (not ``generate``) so that each request
keeps its own temperature, top-p, seed and token budget, and so that a finished or
cancelled sequence leaves the batch at once instead of costing compute until the slowest
one ends. It runs on CPU and GPU alike; ``model.fast`` is the GPU-tuned path. When a sequence
is finished is ``model.stopping.StopRule``'s call, the same as the fast engine's.

Each request is decoded as ``model.prompting.plan_answer`` plans it: a compose answer under
its form grammar (jump-forward: forced lead-ins ride with the sampled token in one
forward), a document answer after its fixed prefix and without its banned strings
(``model.constrained``). A row's disallowed tokens get ``-inf`` logits before sampling.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model.constrained import (
    TokenConstraint,
    allowed_from_bitmask,
    constraint_for,
    fill_masks,
    full_bitmask,
)
from model.loading import LoadedModel
from model.prompting import AnswerPlan, plan_answer
from model.sampling import sample_rows
from model.stopping import StopRule, cut_after_page
from model.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ProgressCallback,
    SamplingParams,
)

log = logging.getLogger(__name__)

# How often (in tokens) the progress callback hears about each sequence.
PROGRESS_EVERY = 16


@dataclass
class _Sequence:
    """Decode state of one request inside the batch."""

    request: GenerationRequest
    plan: AnswerPlan
    constraint: TokenConstraint | None
    seed: int
    started: float
    generated: list[int] = field(default_factory=list)
    # Tokens the constraint forced after the last sampled one: fed with it in one forward.
    forced: list[int] = field(default_factory=list)
    reported: int = 0  # generated count at the last progress report
    first_token_at: float | None = None
    finish: FinishReason | None = None

    @property
    def prompt_ids(self) -> list[int]:
        return self.plan.prompt_ids

    # What the stop rule reads (model.stopping.DecodingSequence).
    @property
    def max_new(self) -> int:
        return self.request.sampling.max_new_tokens

    @property
    def is_form(self) -> bool:
        return self.plan.grammar is not None

    @property
    def host_constraint(self) -> TokenConstraint | None:
        return self.constraint


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[list[int]],
    seeds: Sequence[int],
    allowed: torch.Tensor | None = None,
) -> list[int]:
    """One token per row of ``logits`` [batch, vocab], each row with its own settings.

    The same sampler as the fast engine (:func:`model.sampling.sample_rows`): each
    row's draw depends only on its seed and position (``len(history)``), so a seeded request
    gives the same page whichever engine runs it and whatever shares its batch. ``allowed``
    (bool [batch, vocab]) masks tokens out: their logits become ``-inf`` first, so no
    setting (temperature, top-p, the repetition penalty) can bring them back.
    """
    rows, vocab = logits.shape
    device = logits.device
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(device), -torch.inf)
    seen = torch.zeros((rows, vocab), dtype=torch.bool, device=device)
    for row, history in enumerate(histories):
        if history:
            seen[row, torch.tensor(history, device=device)] = True

    def column(values: list[float] | list[int] | list[bool], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    greedy = [setting.temperature <= 0 for setting in params]
    tokens = sample_rows(
        logits,
        seen,
        column(
            [1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)],
            torch.float32,
        ),
        column([p.top_p for p in params], torch.float32),
        column([p.repetition_penalty for p in params], torch.float32),
        column(greedy, torch.bool),
        column([seed & 0xFFFFFFFF for seed in seeds], torch.int64),
        column([len(history) for history in histories], torch.int64),
        torch.arange(vocab, device=device),
    )
    return [int(token) for token in tokens.tolist()]


class Engine:
    """Implements :class:`model.types.TextGenerator` over a :class:`LoadedModel`."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        # Forced tokens ride with the sampled one in one forward (_step_inputs).
        self.stop_rule = StopRule.for_model(self.model, self.tokenizer, jump_forward=True)
        self.vocab_size = _vocab_size(self.model, self.tokenizer)
        # False decodes every request without its constraint (benchmarks' baseline).
        self.constrain = True
        # transformers 5.2x renamed ``past_key_values`` to ``cache``; accept both releases.
        # An unmerged peft model forwards keyword arguments to its base: ask the base.
        base_model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else None
        forward_params = inspect.signature((base_model or self.model).forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"

    @property
    def model_name(self) -> str:
        return self.loaded.name

    def _new_sequence(self, request: GenerationRequest, started: float) -> _Sequence:
        seed = request.sampling.seed
        if seed is None:
            seed = random.getrandbits(32)
        plan = plan_answer(self.tokenizer, request)
        constraint = (
            constraint_for(plan, self.tokenizer, self.vocab_size) if self.constrain else None
        )
        return _Sequence(request, plan, constraint, seed, started)

    @torch.inference_mode()
    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """Generate for ``requests`` in one batched pass; results come back in order."""
        started = time.perf_counter()
        sequences = [self._new_sequence(request, started) for request in requests]
        active = [seq for seq in sequences if not seq.request.cancelled]
        for seq in sequences:
            if seq.request.cancelled:
                seq.finish = FinishReason.CANCELLED
        if active:
            self._decode(active, progress)
        return [self._result(seq) for seq in sequences]

    def _prefill_inputs(self, active: list[_Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(seq.prompt_ids) for seq in active)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(active), width), pad, dtype=torch.long)
        attention = torch.zeros((len(active), width), dtype=torch.long)
        for row, seq in enumerate(active):
            length = len(seq.prompt_ids)
            input_ids[row, width - length :] = torch.tensor(seq.prompt_ids)
            attention[row, width - length :] = 1
        return input_ids.to(self.device), attention.to(self.device)

    def _decode(self, active: list[_Sequence], progress: ProgressCallback | None) -> None:
        from transformers import DynamicCache

        input_ids, attention = self._prefill_inputs(active)
        # Left padding: positions count real tokens only, so a padded prompt sees the same
        # rotary positions as it would alone.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits are needed
            **{self._cache_kwarg: cache},
        )
        next_positions = positions[:, -1:] + 1
        logits = outputs.logits[:, -1, :]
        while active:
            tokens = sample_next_tokens(
                logits,
                [seq.request.sampling for seq in active],
                [seq.prompt_ids + seq.generated for seq in active],
                [seq.seed for seq in active],
                self._allowed(active, logits.shape[-1]),
            )
            now = time.perf_counter()
            keep: list[int] = []
            for row, (seq, token) in enumerate(zip(active, tokens, strict=True)):
                self._append(seq, token, now, progress)
                if seq.finish is None:
                    keep.append(row)
            if len(keep) < len(active):
                # Finished and cancelled sequences leave the batch: they stop costing compute.
                active = [active[row] for row in keep]
                if not active:
                    break
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                attention = attention[index]
                next_positions = next_positions[index]
                tokens = [tokens[row] for row in keep]
            step_ids, step_attention, step_positions = self._step_inputs(
                active, tokens, next_positions
            )
            attention = torch.cat([attention, step_attention], dim=-1)
            outputs = self.model(
                input_ids=step_ids,
                attention_mask=attention,
                position_ids=step_positions,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: cache},
            )
            next_positions = step_positions[:, -1:] + 1
            logits = outputs.logits[:, -1, :]

    def _step_inputs(
        self, active: list[_Sequence], tokens: list[int], next_positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ids, attention and positions of one step: each row's sampled token and the tokens
        its constraint forced after it (a form's lead-in: one forward instead of one step a
        token), left-padded to the longest row; padding is masked and takes no position."""
        feeds = [[token, *seq.forced] for seq, token in zip(active, tokens, strict=True)]
        for seq in active:
            seq.forced = []
        width = max(len(feed) for feed in feeds)
        ids = torch.full((len(feeds), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(feeds), width), dtype=torch.long)
        for row, feed in enumerate(feeds):
            ids[row, width - len(feed) :] = torch.tensor(feed)
            attention[row, width - len(feed) :] = 1
        attention = attention.to(self.device)
        # Real tokens continue each row's positions; padding repeats the first one (masked).
        offsets = (attention.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), attention, next_positions + offsets

    def _allowed(self, active: list[_Sequence], vocab: int) -> torch.Tensor | None:
        """The rows' allowed tokens (bool [rows, vocab]); None when no row is constrained."""
        if all(seq.constraint is None for seq in active):
            return None
        bitmask = full_bitmask(len(active), vocab)
        fill_masks([seq.constraint for seq in active], bitmask)
        return allowed_from_bitmask(bitmask.to(self.device), vocab)

    def _append(
        self, seq: _Sequence, token: int, now: float, progress: ProgressCallback | None
    ) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = now
        if seq.request.cancelled:
            seq.finish = FinishReason.CANCELLED
            return
        seq.finish = self.stop_rule.accept(seq, token)
        count = len(seq.generated)
        # Forced tokens move the count in jumps: report each time it passes a multiple.
        crossed = count // PROGRESS_EVERY != seq.reported // PROGRESS_EVERY
        if progress is not None and (seq.finish is not None or crossed):
            seq.reported = count
            try:
                progress(seq.request.request_id, count)
            except Exception:  # a broken listener must not kill everyone's generation
                log.exception("progress callback failed")

    def _result(self, seq: _Sequence) -> GenerationResult:
        finished = time.perf_counter()
        text = seq.plan.prefix + self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        if seq.finish == FinishReason.HTML_COMPLETE:
            text = cut_after_page(text)
        first = seq.first_token_at or finished
        return GenerationResult(
            request_id=seq.request.request_id,
            text=text,
            finish_reason=seq.finish or FinishReason.CANCELLED,
            prompt_tokens=len(seq.prompt_ids),
            generated_tokens=len(seq.generated),
            time_to_first_token_s=first - seq.started,
            total_s=finished - seq.started,
        )


def _vocab_size(model: Any, tokenizer: Any) -> int:
    """Width of the model's logits (its lm_head may have more rows than the tokenizer)."""
    embeddings = getattr(model, "get_output_embeddings", None)
    head = embeddings() if callable(embeddings) else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None) or getattr(
        model, "vocab_size", None
    )
    return int(size or len(tokenizer))
