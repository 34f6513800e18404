"""Compose-mode examples: content read out of a page, an answer the form grammar accepts and
the page pipeline reads back, the prompt inference uses, and both modes from one pair."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from model.page.content import PageContent, PageKind, page_subject, page_title
from model.page.form import grammar_for, parse_answer
from model.prompting import plan_answer
from model.types import GenerationRequest, PageMode
from training.compose import FormChecker, compose_answer, content_from_page
from training.data import Pair
from training.tokenization import IGNORE_INDEX, encode_pair, encode_pairs

from .conftest import FIXTURE

LANDING = (Path(__file__).parent / "data" / "landing.html").read_text(encoding="utf-8")
DESCRIPTION = "a landing page for a yoga studio"


def _accepted_by_grammar(tokenizer: Any, answer: str, subject: str) -> bool:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
    compiled = xgrammar.GrammarCompiler(info).compile_grammar(
        grammar_for(PageKind.LANDING, subject)
    )
    matcher = xgrammar.GrammarMatcher(compiled)
    return bool(matcher.accept_string(answer)) and bool(matcher.is_completed())


def test_content_from_the_fixture_page() -> None:
    content = content_from_page(LANDING, DESCRIPTION)
    assert content is not None
    # Quotes dropped, the dash spaced, the unfinished sentence ended.
    assert content.tagline == "Calm classes for busy people - in the heart of the old town."
    # The Greek heading and the one too long for "a few words" are passed over; a heading's
    # end punctuation goes.
    assert content.features is not None
    assert [(card.title, card.text) for card in content.features] == [
        ("Morning flow", "Start the day with an easy hour of gentle stretching."),
        ("Lunchtime reset", "Thirty quiet minutes that fit inside your lunch break."),
        ("Evening restore", "Slow poses and breathing help you sleep better at night."),
    ]
    texts = [section.text for section in content.sections]
    assert len(texts) == 2 and all(text.endswith((".", "!")) for text in texts)
    assert (
        "Our teachers have practised for over ten years. Every class is kept small, "
        "so you get real attention."
    ) in texts
    assert content.call_to_action is not None
    # The styled link, not the navigation's "Home"; the sentence just before it.
    # The page says "Book a class"; the form picks its label from a list: the closest is kept.
    assert content.call_to_action.button == "Book now"
    assert content.call_to_action.text == "Your first class is free, so come and try it!"
    assert content.title == page_title(DESCRIPTION)
    everything = json.dumps(content.model_dump())
    assert "Should never be read" not in everything  # script text is not page text
    assert "Willow" not in everything  # nor is the footer's


def test_answer_is_accepted_by_the_grammar_and_parses_back(tokenizer: Any) -> None:
    content = content_from_page(LANDING, DESCRIPTION)
    assert content is not None
    subject = page_subject(DESCRIPTION)
    answer = compose_answer(content, DESCRIPTION)
    assert _accepted_by_grammar(tokenizer, answer, subject)
    parsed = parse_answer(
        answer, kind=PageKind.LANDING, title=page_title(DESCRIPTION), subject=subject
    )
    assert parsed.tagline == content.tagline
    # A feature's title is not in the answer: inference reads it out of the sentence.
    assert parsed.features is not None and content.features is not None
    assert [f.text for f in parsed.features] == [f.text for f in content.features]
    assert [s.text for s in parsed.sections] == [s.text for s in content.sections]
    assert parsed.call_to_action == content.call_to_action
    assert compose_answer(parsed, DESCRIPTION) == answer


def test_form_checker_refuses_what_the_grammar_refuses(tokenizer: Any) -> None:
    content = content_from_page(LANDING, DESCRIPTION)
    assert content is not None
    checker = FormChecker(tokenizer)
    assert checker.accepts(content)
    cases = {
        "tagline": "Supercalifragilisticexpialidocious bread for everyone.",  # a 34-letter word
        "call_to_action": {"text": "Come and see us?", "button": "Book"},  # not . or !
    }
    for key, value in cases.items():
        bad = PageContent.model_validate({**content.model_dump(), key: value})
        assert not checker.accepts(bad), key
        assert not _accepted_by_grammar(tokenizer, compose_answer(bad, DESCRIPTION), "A page")


def test_pages_with_little_text_give_no_content() -> None:
    assert (
        content_from_page("<html><body><h1>Hi</h1><p>Hello there.</p></body></html>", "x") is None
    )
    assert content_from_page("", "a page") is None
    # The fixture's small pages have a heading or two and a sentence each: not enough.
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    assert rows and all(content_from_page(row["html"], row["label"]) is None for row in rows)


def test_non_latin_page_gives_no_content() -> None:
    greek = LANDING
    for latin, other in [("Morning flow", "Πρωινή ροή"), ("Evening restore", "Βραδινή")]:
        greek = greek.replace(latin, other)
    # Two headings fewer leaves two features ("Lunchtime reset", "About us"): not enough.
    assert content_from_page(greek, DESCRIPTION) is None


def test_compose_example_uses_the_inference_prompt(tokenizer: Any) -> None:
    example = encode_pair(tokenizer, Pair(DESCRIPTION, LANDING), 4096, mode=PageMode.COMPOSE)
    assert example is not None
    plan = plan_answer(tokenizer, GenerationRequest(prompt=DESCRIPTION, mode=PageMode.COMPOSE))
    assert plan.kind is PageKind.LANDING and not plan.prefix
    n_prompt = len(plan.prompt_ids)
    assert example.input_ids[:n_prompt] == plan.prompt_ids
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    answer = example.labels[n_prompt:]
    assert answer == example.input_ids[n_prompt:]
    assert answer[-1] == tokenizer.eos_token_id
    content = content_from_page(LANDING, DESCRIPTION)
    assert content is not None
    assert tokenizer.decode(answer[:-1]) == compose_answer(content, DESCRIPTION)


def test_compose_prompt_is_the_landing_kind_whatever_the_description(tokenizer: Any) -> None:
    pricing = "a pricing page for a yoga studio"
    example = encode_pair(tokenizer, Pair(pricing, LANDING), 4096, mode=PageMode.COMPOSE)
    assert example is not None
    n_prompt = example.labels.count(IGNORE_INDEX)
    prompt = tokenizer.decode(example.input_ids[:n_prompt])
    assert "a landing web page" in prompt and "a pricing web page" not in prompt


@pytest.mark.parametrize(
    ("modes", "document", "compose"),
    [
        ((PageMode.DOCUMENT,), 2, 0),
        ((PageMode.COMPOSE,), 0, 1),
        ((PageMode.DOCUMENT, PageMode.COMPOSE), 2, 1),
    ],
)
def test_modes_give_examples_per_mode(
    tokenizer: Any, modes: tuple[PageMode, ...], document: int, compose: int
) -> None:
    small = "<html><body><h1>Hi</h1><p>Hello there, friend.</p></body></html>"
    pairs = [Pair(DESCRIPTION, LANDING), Pair("a tiny page", small)]
    examples, report = encode_pairs(tokenizer, pairs, 4096, modes=modes)
    assert report.document_examples == document
    assert report.compose_examples == compose
    assert report.examples == len(examples) == document + compose
    assert report.compose_skipped == (1 if PageMode.COMPOSE in modes else 0)
    assert report.compose_refused == 0
    assert report.as_dict()["compose_examples"] == compose


def test_button_labels_map_to_the_forms_list() -> None:
    from training.compose import closest_button_label

    assert closest_button_label("Order your cake") == "Order now"
    assert closest_button_label("Contact our team") == "Contact us"
    assert closest_button_label("Zzz") == "Learn more"
