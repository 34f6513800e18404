"""Turning pairs into causal-LM examples, and batches with dynamic padding.

One sequence per example: the inference prompt (:func:`model.prompting.encode_prompt`)
followed by the page and EOS (:func:`model.prompting.encode_answer`). Labels copy the
page tokens and are -100 on the prompt and on padding, so the loss is the model's skill at
writing the page and nothing else. (The seed labelled description tokens with page tokens
and counted padding: its loss stayed near 9.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from model.prompting import encode_answer, encode_prompt
from training.data import Pair

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One training row. ``position_ids`` is set for packed rows (restarts per example)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class TokenizeReport:
    examples: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    prompt_tokens: int = 0
    target_tokens: int = 0
    rows_after_packing: int | None = None
    longest: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("lengths")
        return data


def _encode(tokenizer: Any, pair: Pair, style: str | None) -> tuple[list[int], list[int]]:
    """The whole prompt and answer ids of ``pair``; a truncated page keeps no EOS."""
    prompt = encode_prompt(tokenizer, pair.description, style)
    answer = encode_answer(tokenizer, pair.page)
    if pair.truncated and answer and answer[-1] == tokenizer.eos_token_id:
        answer = answer[:-1]
    return prompt, answer


def _fit(
    tokenizer: Any, prompt: list[int], answer: list[int], max_seq_len: int, truncate: bool
) -> Example | None:
    """The example of ``prompt`` + ``answer`` in ``max_seq_len`` tokens, or ``None``."""
    if len(prompt) + len(answer) > max_seq_len:
        room = max_seq_len - len(prompt)
        if not truncate or room < 1:
            return None
        answer = answer[:room]
        if answer[-1] == tokenizer.eos_token_id:
            answer = answer[:-1]
            if not answer:
                return None
    input_ids = prompt + answer
    labels = [IGNORE_INDEX] * len(prompt) + list(answer)
    return Example(input_ids=input_ids, labels=labels)


def encode_pair(
    tokenizer: Any,
    pair: Pair,
    max_seq_len: int,
    *,
    style: str | None = None,
    truncate: bool = False,
) -> Example | None:
    """The example for one pair, or ``None`` when it is over ``max_seq_len`` and not truncated.

    A truncated page keeps no EOS: the model must not learn to stop in the middle of a page.
    """
    prompt, answer = _encode(tokenizer, pair, style)
    return _fit(tokenizer, prompt, answer, max_seq_len, truncate)


def encode_pairs(
    tokenizer: Any,
    pairs: Iterable[Pair],
    max_seq_len: int,
    *,
    style: str | None = None,
    truncate: bool = False,
) -> tuple[list[Example], TokenizeReport]:
    """Encode many pairs; over-long ones are dropped or truncated and counted."""
    report = TokenizeReport()
    examples: list[Example] = []
    for pair in pairs:
        # Each pair is tokenized once; only an over-long one is then cut to fit.
        prompt, answer = _encode(tokenizer, pair, style)
        if len(prompt) + len(answer) > max_seq_len:
            if not truncate:
                report.dropped_too_long += 1
                continue
            report.truncated += 1
        example = _fit(tokenizer, prompt, answer, max_seq_len, truncate)
        if example is None:
            report.dropped_too_long += 1
            continue
        examples.append(example)
        report.target_tokens += example.target_tokens
        report.prompt_tokens += len(example) - example.target_tokens
        report.lengths.append(len(example))
    report.examples = len(examples)
    report.longest = max(report.lengths, default=0)
    return examples, report


def pack(examples: Sequence[Example], max_seq_len: int) -> list[Example]:
    """Whole examples packed into rows of at most ``max_seq_len`` tokens (first-fit decreasing).

    Each row carries position ids that restart at 0 for each example; the collator then sends
    no attention mask, and transformers turns the restarts into a block-diagonal mask, so
    packed examples do not attend to each other.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = len(examples[index])
        for row, free in enumerate(room):
            if size <= free:
                rows[row].append(index)
                room[row] -= size
                break
        else:
            rows.append([index])
            room.append(max_seq_len - size)
    packed: list[Example] = []
    for members in rows:
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for index in members:
            example = examples[index]
            input_ids += example.input_ids
            labels += example.labels
            positions += list(range(len(example)))
        packed.append(Example(input_ids, labels, positions))
    return packed


class Collator:
    """Pads a batch to its own longest row (rounded up to ``pad_to_multiple_of``).

    Padding goes on the right, with label -100 and attention mask 0. Packed rows (with
    position ids) get position ids instead of an attention mask; their padding continues as
    one more "sequence" whose labels are all -100.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("empty batch")
        width = max(len(example) for example in batch)
        if self.pad_to_multiple_of:
            multiple = self.pad_to_multiple_of
            width = -(-width // multiple) * multiple
        packed = any(example.position_ids is not None for example in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            size = len(example)
            input_ids[row, :size] = torch.tensor(example.input_ids)
            labels[row, :size] = torch.tensor(example.labels)
            attention[row, :size] = 1
            own = example.position_ids if example.position_ids is not None else range(size)
            positions[row, :size] = torch.tensor(list(own))
            positions[row, size:] = torch.arange(width - size)
        result = {"input_ids": input_ids, "labels": labels}
        if packed:
            result["position_ids"] = positions
        else:
            result["attention_mask"] = attention
        return result


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a collated batch: what tokens/s counts."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    # Packed rows: everything up to the last labelled token of each row is real.
    labelled = batch["labels"] != IGNORE_INDEX
    width = labelled.shape[1]
    last = width - torch.flip(labelled.long(), dims=[1]).argmax(dim=1)
    last = torch.where(labelled.any(dim=1), last, torch.zeros_like(last))
    return int(last.sum())
