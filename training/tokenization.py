"""Turning pairs into causal-LM examples, and batches with dynamic padding.

One sequence per example: exactly the prompt ids inference decodes from, then the answer
the model should give and EOS. Labels copy the answer tokens and are -100 on the prompt and
on padding, so the loss is the model's skill at answering and nothing else. (The seed
labelled description tokens with page tokens and counted padding: its loss stayed near 9.)

Each page mode has its own example (``TrainConfig.page_mode`` picks one or both):

* ``document``: the prompt is :func:`model.prompting.plan_answer`'s, which ends with the
  page skeleton up to ``<body>`` (:func:`model.prompting.document_prefix`); the answer is
  the dataset page's body content, then ``</body>`` and ``</html>`` (:func:`body_answer`).
* ``compose``: the landing kind's compose prompt
  (:func:`model.prompting.encode_compose_prompt`); the answer is the form filled in with
  the content read out of the page (:mod:`training.compose`), when the page has enough
  text and the form's grammar accepts the result.

With ``refine_fraction`` (``--refine-examples``), a share of the pairs also gives a refine
example in each mode (:mod:`training.refine`): the prompt is inference's refine prompt
(:func:`model.prompting.refine_document_prompt_ids` / ``refine_compose_prompt_ids``) for
the page and an instruction, the answer the page after that edit, in the mode's shape.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from model.page.content import PageContent
from model.prompting import (
    encode_compose_prompt,
    plan_answer,
    refine_compose_prompt_ids,
    refine_document_prompt_ids,
)
from model.types import GenerationRequest, PageMode
from training.compose import COMPOSE_KIND, FormChecker, compose_answer, content_from_page
from training.data import Pair
from training.refine import compose_edit, document_edit

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
    """What tokenization made of the pairs: examples per mode, what was dropped or cut.

    ``compose_skipped`` counts the pairs that gave no compose example: too little usable
    text in the page, or (``compose_refused``, a part of it) an answer the grammar refuses.
    ``refine_examples`` (also counted in ``examples``) are the refine examples made;
    ``refine_skipped`` the pairs drawn for one that gave none (no edit applies, a truncated
    page, no compose content, or an edit the grammar refuses).
    """

    examples: int = 0
    document_examples: int = 0
    compose_examples: int = 0
    compose_skipped: int = 0
    compose_refused: int = 0
    refine_examples: int = 0
    refine_skipped: int = 0
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


_BODY_OPEN = re.compile(r"<body\b[^>]*>", re.IGNORECASE)
_BODY_CLOSE = re.compile(r"</body\s*>", re.IGNORECASE)
_HTML_CLOSE = re.compile(r"</html\s*>", re.IGNORECASE)
# What a page without <body> may still hold before its content; the skeleton has its own.
_DOCUMENT_START = re.compile(
    r"^\s*(?:<!doctype[^>]*>\s*)?(?:<html\b[^>]*>\s*)?(?:<head\b.*?</head\s*>\s*)?",
    re.IGNORECASE | re.DOTALL,
)
DOCUMENT_END = "</body>\n</html>"


def body_content(page: str) -> str:
    """What comes after the page's ``<body ...>`` tag, up to its last ``</body>`` (or
    ``</html>``). A page with no ``<body>`` tag is all body, less any doctype, ``<html>``
    and ``<head>`` before it (the skeleton the model continues has those)."""
    opening = _BODY_OPEN.search(page)
    content = page[opening.end() :] if opening else _DOCUMENT_START.sub("", page, count=1)
    for closing in (_BODY_CLOSE, _HTML_CLOSE):
        ends = list(closing.finditer(content))
        if ends:
            content = content[: ends[-1].start()]
            break
    return content.strip()


def body_answer(page: str, truncated: bool = False) -> str:
    """The document-mode answer for ``page``: its body content, then ``</body>`` and
    ``</html>`` (a truncated page did not end, so it gets no closing tags)."""
    content = body_content(page)
    if truncated:
        return content
    return f"{content}\n{DOCUMENT_END}" if content else DOCUMENT_END


def _answer_ids(tokenizer: Any, answer: str, eos: bool) -> list[int]:
    ids: list[int] = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def document_prompt_ids(tokenizer: Any, description: str, style: str | None) -> list[int]:
    """The ids a document-mode request for ``description`` is decoded from (chat prompt
    and the skeleton up to ``<body>``), from inference's own :func:`plan_answer`."""
    request = GenerationRequest(prompt=description, style=style, mode=PageMode.DOCUMENT)
    return plan_answer(tokenizer, request).prompt_ids


def _encode(tokenizer: Any, pair: Pair, style: str | None) -> tuple[list[int], list[int]]:
    """The document-mode prompt and answer ids of ``pair``; a truncated page keeps no EOS."""
    prompt = document_prompt_ids(tokenizer, pair.description, style)
    answer = _answer_ids(tokenizer, body_answer(pair.page, pair.truncated), not pair.truncated)
    return prompt, answer


def _encode_compose(
    tokenizer: Any, pair: Pair, style: str | None, content: PageContent
) -> tuple[list[int], list[int]]:
    """The compose-mode prompt and answer ids of ``pair``, whose page gave ``content``."""
    prompt = encode_compose_prompt(tokenizer, pair.description, style, COMPOSE_KIND)
    # The form is complete even when the page was cut, so the answer always ends (EOS).
    answer = _answer_ids(tokenizer, compose_answer(content, pair.description), eos=True)
    return prompt, answer


def _mode_ids(
    tokenizer: Any,
    pair: Pair,
    mode: PageMode,
    style: str | None,
    checker: FormChecker | None,
    report: TokenizeReport,
) -> tuple[list[int], list[int]] | None:
    """Prompt and answer ids of ``pair`` in ``mode``; ``None`` (counted in ``report``) when
    the page gives no compose content or one the form grammar refuses."""
    if mode is PageMode.DOCUMENT:
        return _encode(tokenizer, pair, style)
    content = content_from_page(pair.page, pair.description)
    if content is None:
        report.compose_skipped += 1
        return None
    if checker is None:
        checker = FormChecker(tokenizer)
    if not checker.accepts(content):
        report.compose_skipped += 1
        report.compose_refused += 1
        return None
    return _encode_compose(tokenizer, pair, style, content)


@dataclass(frozen=True)
class RefineIds:
    """A refine example before fitting: the edit's instruction, prompt and answer ids."""

    instruction: str
    prompt: list[int]
    answer: list[int]


def refine_ids(
    tokenizer: Any,
    pair: Pair,
    mode: PageMode,
    rng: random.Random,
    *,
    style: str | None = None,
    checker: FormChecker | None = None,
) -> RefineIds | None:
    """The refine example of ``pair`` in ``mode`` (an edit picked with ``rng``), or
    ``None`` when the pair gives none (no edit applies, a truncated page, no compose
    content, or an answer the form grammar refuses). The prompt ids are exactly those
    :func:`model.prompting.plan_answer` gives the same refine request (compose: for the
    landing kind every compose example uses)."""
    if mode is PageMode.DOCUMENT:
        if pair.truncated:
            return None  # the edited page would not be the page the target shows
        edit = document_edit(pair.page, pair.description, rng)
        if edit is None:
            return None
        prompt = refine_document_prompt_ids(
            tokenizer, pair.description, edit.instruction, pair.page, style
        )
        answer = _answer_ids(tokenizer, body_answer(edit.page), eos=True)
        return RefineIds(edit.instruction, prompt, answer)
    content = content_from_page(pair.page, pair.description)
    if content is None:
        return None
    change = compose_edit(content, rng)
    if change is None:
        return None
    if checker is None:
        checker = FormChecker(tokenizer)
    if not (checker.accepts(content) and checker.accepts(change.content)):
        return None
    prompt = refine_compose_prompt_ids(
        tokenizer, pair.description, change.instruction, content, style, COMPOSE_KIND
    )
    form = compose_answer(change.content, pair.description)
    return RefineIds(change.instruction, prompt, _answer_ids(tokenizer, form, eos=True))


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
    mode: PageMode = PageMode.DOCUMENT,
    checker: FormChecker | None = None,
) -> Example | None:
    """The example for one pair in ``mode``, or ``None`` when it is over ``max_seq_len`` and
    not truncated, or (compose) its page gives no usable content.

    A truncated page keeps no EOS: the model must not learn to stop in the middle of a page.
    ``checker`` (compose) is reused across calls when given; built here otherwise.
    """
    ids = _mode_ids(tokenizer, pair, mode, style, checker, TokenizeReport())
    if ids is None:
        return None
    return _fit(tokenizer, *ids, max_seq_len, truncate)


def encode_pairs(
    tokenizer: Any,
    pairs: Iterable[Pair],
    max_seq_len: int,
    *,
    style: str | None = None,
    truncate: bool = False,
    modes: Sequence[PageMode] = (PageMode.DOCUMENT,),
    refine_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[Example], TokenizeReport]:
    """Encode many pairs, one example per pair and mode (a compose example only when the
    page gives usable content); over-long ones are dropped or truncated and counted.

    ``refine_fraction`` of the pairs (drawn with ``seed``, per mode) also give a refine
    example, right after the pair's own (:mod:`training.refine`).
    """
    if not 0 <= refine_fraction <= 1:
        raise ValueError(f"refine_fraction must be in [0, 1], got {refine_fraction}")
    report = TokenizeReport()
    checker = FormChecker(tokenizer) if PageMode.COMPOSE in modes else None
    draws = random.Random(seed)
    examples: list[Example] = []
    for index, pair in enumerate(pairs):
        for mode in modes:
            example = _encode_one(
                tokenizer, pair, mode, max_seq_len, style, truncate, checker, report
            )
            if example is not None:
                _count(report, example)
                examples.append(example)
                if mode is PageMode.DOCUMENT:
                    report.document_examples += 1
                else:
                    report.compose_examples += 1
            # Drawn for every pair and mode, and each edit picked by a generator of its
            # own: which pairs get one, and which edit, depends on nothing else.
            if draws.random() >= refine_fraction:
                continue
            rng = random.Random(f"{seed}:{index}:{mode.value}")
            refine = _encode_refine(
                tokenizer, pair, mode, max_seq_len, style, truncate, checker, rng, report
            )
            if refine is not None:
                _count(report, refine)
                examples.append(refine)
                report.refine_examples += 1
    report.examples = len(examples)
    report.longest = max(report.lengths, default=0)
    return examples, report


def _count(report: TokenizeReport, example: Example) -> None:
    report.target_tokens += example.target_tokens
    report.prompt_tokens += len(example) - example.target_tokens
    report.lengths.append(len(example))


def _encode_refine(
    tokenizer: Any,
    pair: Pair,
    mode: PageMode,
    max_seq_len: int,
    style: str | None,
    truncate: bool,
    checker: FormChecker | None,
    rng: random.Random,
    report: TokenizeReport,
) -> Example | None:
    """A refine example of ``pair`` in ``mode``, with what happened counted in ``report``."""
    ids = refine_ids(tokenizer, pair, mode, rng, style=style, checker=checker)
    if ids is None:
        report.refine_skipped += 1
        return None
    return _fit_counted(tokenizer, ids.prompt, ids.answer, max_seq_len, truncate, report)


def _encode_one(
    tokenizer: Any,
    pair: Pair,
    mode: PageMode,
    max_seq_len: int,
    style: str | None,
    truncate: bool,
    checker: FormChecker | None,
    report: TokenizeReport,
) -> Example | None:
    """One pair's example in ``mode``, with what happened to it counted in ``report``."""
    # Each pair is tokenized once per mode; only an over-long one is then cut to fit.
    ids = _mode_ids(tokenizer, pair, mode, style, checker, report)
    if ids is None:
        return None
    prompt, answer = ids
    return _fit_counted(tokenizer, prompt, answer, max_seq_len, truncate, report)


def _fit_counted(
    tokenizer: Any,
    prompt: list[int],
    answer: list[int],
    max_seq_len: int,
    truncate: bool,
    report: TokenizeReport,
) -> Example | None:
    """:func:`_fit`, counting in ``report`` what was cut or dropped for its length."""
    if len(prompt) + len(answer) > max_seq_len:
        if not truncate:
            report.dropped_too_long += 1
            return None
        report.truncated += 1
    example = _fit(tokenizer, prompt, answer, max_seq_len, truncate)
    if example is None:
        report.dropped_too_long += 1
    return example


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
