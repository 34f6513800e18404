"""Refine examples: a dataset page, an instruction and the page after an exact edit, with
inference's own refine prompt (model.prompting), in both page modes."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from model.page import page_from_result
from model.page.content import PageContent, PageKind
from model.page.form import BUTTON_LABELS
from model.prompting import document_prefix, plan_answer
from model.types import FinishReason, GenerationRequest, GenerationResult, PageMode
from training.compose import FormChecker, content_from_page
from training.config import TrainConfig, parse_config
from training.data import Pair
from training.errors import ConfigError
from training.refine import compose_edit, document_edit
from training.tokenization import (
    DOCUMENT_END,
    IGNORE_INDEX,
    body_content,
    encode_pairs,
    refine_ids,
)

from .conftest import FIXTURE
from .test_compose import LANDING

DESCRIPTION = "a landing page for a yoga studio"


def fixture_pairs() -> list[Pair]:
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    return [Pair(row["label"], row["html"]) for row in rows]


def _text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


# ----------------------------------------------------------------------- the edits


@pytest.mark.parametrize("seed", range(12))
def test_document_edits_do_what_their_instruction_says(seed: int) -> None:
    pair = fixture_pairs()[0]  # the bakery: a heading, a footer, a body
    edit = document_edit(pair.page, pair.description, random.Random(seed))
    assert edit is not None and edit.page != pair.page
    quoted = re.findall(r'"([^"]+)"', edit.instruction)
    if edit.instruction.startswith("Change the main heading"):
        h1 = re.search(r"<h1>(.*?)</h1>", edit.page)
        assert h1 is not None and h1.group(1) == quoted[0]
        assert edit.page.count("<h1>") == 1
    elif edit.instruction.startswith("Add a section"):
        heading, text = quoted[0], edit.instruction.split("that says: ", 1)[1]
        assert f"<h2>{heading}</h2>\n<p>{text}</p>" in edit.page
        assert edit.page.index(heading) < edit.page.index("<footer")  # before the footer
        assert _text(pair.page) in _text(edit.page).replace(f" {heading} {text}", "")
    elif edit.instruction == "Remove the footer.":
        assert "<footer" not in edit.page and "12 Mill Lane" not in edit.page
        assert "Opening hours" in edit.page
    else:
        assert edit.instruction.startswith("Make the background")
        assert re.search(r"<body>\n<style>body\{background:#\w+;color:#\w+\}</style>", edit.page)
        assert _text(edit.page).endswith(_text(pair.page).split("}", 1)[-1][-40:])
    # Whatever the edit, the rest of the page is the page: one change, nothing else.
    assert len(edit.page) - len(pair.page) < 200


def test_every_kind_of_document_edit_occurs_and_none_applies_to_nothing() -> None:
    pair = fixture_pairs()[0]
    kinds = {
        document_edit(pair.page, pair.description, random.Random(seed)).instruction.split()[0]  # type: ignore[union-attr]
        for seed in range(40)
    }
    assert kinds == {"Change", "Add", "Make", "Remove"}
    assert document_edit("just words", "a page", random.Random(0)) is None


@pytest.mark.parametrize("seed", range(8))
def test_compose_edits_change_one_thing(seed: int) -> None:
    content = content_from_page(LANDING, DESCRIPTION)
    assert content is not None
    change = compose_edit(content, random.Random(seed))
    assert change is not None
    before, after = content.model_dump(), change.content.model_dump()
    differing = {key for key in before if before[key] != after[key]}
    assert len(differing) == 1
    (key,) = differing
    if key == "tagline":
        assert f'"{change.content.tagline}"' in change.instruction
    elif key == "call_to_action":
        button = change.content.call_to_action.button  # type: ignore[union-attr]
        assert button in BUTTON_LABELS and f'"{button}"' in change.instruction
        assert after["call_to_action"]["text"] == before["call_to_action"]["text"]
    elif key == "features":
        assert sorted(map(str, after["features"])) == sorted(map(str, before["features"]))
        assert change.instruction.endswith("feature first.")
    else:
        assert key == "sections"
        texts = [section["text"] for section in after["sections"]]
        assert texts == [section["text"] for section in before["sections"]][::-1]


# -------------------------------------------------------------------- the examples


def test_a_document_refine_example_is_inferences_refine_prompt_and_the_edited_body(
    tokenizer: Any,
) -> None:
    pair = fixture_pairs()[0]
    ids = refine_ids(tokenizer, pair, PageMode.DOCUMENT, random.Random(3))
    assert ids is not None
    request = GenerationRequest(
        ids.instruction, description=pair.description, source_page=pair.page
    )
    assert ids.prompt == plan_answer(tokenizer, request).prompt_ids
    prompt = tokenizer.decode(ids.prompt)
    assert prompt.endswith(document_prefix(pair.description))
    assert body_content(pair.page) in prompt and ids.instruction in prompt
    # The answer: the edited page's body, the closing tags, EOS.
    assert ids.answer[-1] == tokenizer.eos_token_id
    answer = tokenizer.decode(ids.answer[:-1])
    assert answer.endswith(DOCUMENT_END)
    assert answer != body_content(pair.page) + "\n" + DOCUMENT_END


def test_a_compose_refine_example_fills_the_form_with_the_edited_content(
    tokenizer: Any,
) -> None:
    pair = Pair(DESCRIPTION, LANDING)
    checker = FormChecker(tokenizer)
    ids = refine_ids(tokenizer, pair, PageMode.COMPOSE, random.Random(1), checker=checker)
    assert ids is not None
    content = content_from_page(LANDING, DESCRIPTION)
    assert content is not None
    request = GenerationRequest(
        ids.instruction,
        mode=PageMode.COMPOSE,
        description=DESCRIPTION,
        source_content=content.model_dump_json(),
    )
    plan = plan_answer(tokenizer, request)
    assert plan.kind is PageKind.LANDING
    assert ids.prompt == plan.prompt_ids  # the very prompt a refine is decoded from
    # The answer read back by the page pipeline is the edited content.
    form = tokenizer.decode(ids.answer[:-1])
    result = GenerationResult("r", form, FinishReason.EOS, 1, 1, 0.1, 1.0)
    page = page_from_result(result, prompt=DESCRIPTION, mode=PageMode.COMPOSE)
    assert page.content is not None
    edited = PageContent.model_validate_json(page.content)
    change = compose_edit(content, random.Random(1))
    assert change is not None and change.instruction == ids.instruction
    assert edited.tagline == change.content.tagline
    assert edited.call_to_action == change.content.call_to_action
    assert [s.text for s in edited.sections] == [s.text for s in change.content.sections]
    assert [f.text for f in edited.features or []] == [
        f.text for f in change.content.features or []
    ]
    assert "Tagline (one short sentence about a yoga studio):" in tokenizer.decode(ids.prompt)


def test_truncated_pages_and_pages_without_content_give_no_refine(tokenizer: Any) -> None:
    pair = fixture_pairs()[0]
    cut = Pair(pair.description, pair.page[:300], truncated=True)
    assert refine_ids(tokenizer, cut, PageMode.DOCUMENT, random.Random(0)) is None
    thin = Pair("a landing page for a bakery", "<p>Hi</p>")
    assert refine_ids(tokenizer, thin, PageMode.COMPOSE, random.Random(0)) is None


def test_encode_pairs_adds_refine_examples_for_the_fraction_asked(tokenizer: Any) -> None:
    pairs = fixture_pairs()
    plain, plain_report = encode_pairs(tokenizer, pairs, 4096)
    assert plain_report.refine_examples == 0
    every, report = encode_pairs(tokenizer, pairs, 4096, refine_fraction=1.0)
    assert report.document_examples == plain_report.document_examples == len(pairs)
    assert report.refine_examples + report.refine_skipped == len(pairs)
    assert report.refine_examples >= len(pairs) - 2  # nearly every page has a heading
    assert report.examples == len(every) == len(plain) + report.refine_examples
    for example in every:  # the prompt masked, the answer labelled with itself
        n = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        assert example.labels[n:] == example.input_ids[n:]
    some, some_report = encode_pairs(tokenizer, pairs, 4096, refine_fraction=0.5, seed=7)
    again, _ = encode_pairs(tokenizer, pairs, 4096, refine_fraction=0.5, seed=7)
    assert 0 < some_report.refine_examples < len(pairs)
    assert [e.input_ids for e in some] == [e.input_ids for e in again]  # reproducible
    with pytest.raises(ValueError, match="refine_fraction"):
        encode_pairs(tokenizer, pairs, 4096, refine_fraction=1.5)


def test_compose_refine_examples_from_the_fixture(tokenizer: Any) -> None:
    pairs = [*fixture_pairs(), Pair(DESCRIPTION, LANDING)]
    _, report = encode_pairs(tokenizer, pairs, 4096, modes=(PageMode.COMPOSE,), refine_fraction=1.0)
    assert report.refine_examples >= 1  # the yoga landing page at least
    assert report.refine_examples <= report.compose_examples
    assert report.refine_examples + report.refine_skipped == len(pairs)


def test_the_refine_examples_setting() -> None:
    assert TrainConfig().refine_examples == 0.0
    assert parse_config(["--refine-examples", "0.25"]).refine_examples == 0.25
    with pytest.raises(ConfigError, match="refine_examples"):
        TrainConfig(refine_examples=2.0)
