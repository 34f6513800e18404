"""model.prompting's refine format: the model gets the current page and the instruction and
answers with the whole new page, in the same shape (skeleton or form) as a fresh answer."""

from __future__ import annotations

from typing import Any

import pytest

from model.page import page_from_result
from model.page.content import EXAMPLES, PageContent, PageKind, classify_prompt, page_subject
from model.page.form import answer_text, grammar_for
from model.prompting import (
    BANNED_STRINGS,
    build_prompt,
    document_prefix,
    page_body,
    plan_answer,
    plan_refine,
)
from model.types import FinishReason, GenerationRequest, GenerationResult, PageMode, SafetyPolicy

DESCRIPTION = "a landing page for a bakery in Lyon"
INSTRUCTION = "make the headline about sourdough"
BODY = "<header><h1>Crumb &amp; Co.</h1></header>\n<p>Bread every morning.</p>"


def _result(text: str) -> GenerationResult:
    return GenerationResult("r", text, FinishReason.EOS, 10, 10, 0.1, 1.0)


def _delivered_document(style: str = "dark") -> str:
    """A document page as the pipeline delivers it: CSP and the theme's CSS in its head."""
    answer = document_prefix(DESCRIPTION) + BODY + "\n</body>\n</html>"
    return page_from_result(_result(answer), prompt=DESCRIPTION, style=style).html


def _landing_content(title: str = "Bakery in Lyon") -> PageContent:
    data = dict(EXAMPLES[PageKind.LANDING], title=title)
    # The form's second section is the kind's own; the example's "How it works" is not.
    return PageContent.model_validate(data)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids))


def test_a_request_is_no_refine_by_default() -> None:
    request = GenerationRequest("a page")
    assert not request.is_refine
    assert request.page_prompt == "a page"
    refine = GenerationRequest(INSTRUCTION, description=DESCRIPTION, source_page="<p>x</p>")
    assert refine.is_refine
    assert refine.page_prompt == DESCRIPTION  # what titles and classifies the page


def test_a_new_page_is_planned_as_before(tiny_tokenizer: Any) -> None:
    request = GenerationRequest(DESCRIPTION)
    plan = plan_answer(tiny_tokenizer, request)
    expected = build_prompt(tiny_tokenizer, DESCRIPTION) + document_prefix(DESCRIPTION)
    assert plan.prompt_ids == tiny_tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_page_body_is_the_body_without_the_pipelines_head() -> None:
    delivered = _delivered_document()
    assert "<style" in delivered and "Content-Security-Policy" in delivered
    body = page_body(delivered)
    assert "Crumb &amp; Co." in body and "Bread every morning." in body
    assert "<style" not in body and "Content-Security-Policy" not in body
    assert "<body" not in body and "</html>" not in body
    assert page_body("<h1>Bare</h1><p>no body tag</p>") == "<h1>Bare</h1><p>no body tag</p>"


@pytest.mark.parametrize("policy", list(SafetyPolicy))
def test_a_document_refine_shows_the_page_and_continues_the_same_skeleton(
    tiny_tokenizer: Any, policy: SafetyPolicy
) -> None:
    request = GenerationRequest(
        INSTRUCTION,
        safety=policy,
        description=DESCRIPTION,
        source_page=_delivered_document(),
    )
    plan = plan_answer(tiny_tokenizer, request)
    prompt = _decode(tiny_tokenizer, plan.prompt_ids)
    assert plan.prefix == document_prefix(DESCRIPTION)
    assert prompt.endswith(plan.prefix)
    assert plan.banned == BANNED_STRINGS[policy]
    assert plan.grammar is None
    # The current page's body and the instruction are in the prompt, the theme's CSS not.
    assert "<p>Bread every morning.</p>" in prompt
    assert INSTRUCTION in prompt and DESCRIPTION in prompt
    assert "data-theme" not in prompt and "Content-Security-Policy" not in prompt


def test_a_compose_refine_shows_the_current_form_and_fills_the_same_grammar(
    tiny_tokenizer: Any,
) -> None:
    content = _landing_content()
    request = GenerationRequest(
        INSTRUCTION,
        mode=PageMode.COMPOSE,
        description=DESCRIPTION,
        source_content=content.model_dump_json(),
    )
    plan = plan_answer(tiny_tokenizer, request)
    kind = classify_prompt(DESCRIPTION)
    assert plan.kind is kind is PageKind.LANDING
    assert plan.grammar == grammar_for(kind, page_subject(DESCRIPTION))
    assert plan.prefix == "" and plan.banned == ()
    prompt = _decode(tiny_tokenizer, plan.prompt_ids)
    current_form = answer_text(content, kind, page_subject(DESCRIPTION)).strip()
    assert current_form in prompt  # every current line, to copy what the change leaves
    assert INSTRUCTION in prompt


def test_a_compose_refine_answer_that_copies_the_form_keeps_the_content() -> None:
    """The answer fills the same form, so copying every line gives the same page back."""
    content = _landing_content(title="Bakery in Lyon")
    answer = answer_text(content, PageKind.LANDING, page_subject(DESCRIPTION))
    refine = GenerationRequest(
        INSTRUCTION,
        mode=PageMode.COMPOSE,
        description=DESCRIPTION,
        source_content=content.model_dump_json(),
    )
    page = page_from_result(_result(answer), prompt=refine.page_prompt, mode=PageMode.COMPOSE)
    assert page.content is not None
    kept = PageContent.model_validate_json(page.content)
    assert kept.tagline == content.tagline
    # (A card's title is read out of its sentence, which the form holds.)
    assert [f.text for f in kept.features or []] == [f.text for f in content.features or []]
    assert [s.text for s in kept.sections] == [s.text for s in content.sections]
    assert kept.call_to_action == content.call_to_action
    assert kept.title == content.title


def test_a_refine_without_its_modes_source_is_refused(tiny_tokenizer: Any) -> None:
    compose = GenerationRequest(
        INSTRUCTION, mode=PageMode.COMPOSE, description=DESCRIPTION, source_page="<p>x</p>"
    )
    with pytest.raises(ValueError, match="source_content"):
        plan_refine(tiny_tokenizer, compose)
    document = GenerationRequest(INSTRUCTION, description=DESCRIPTION, source_content="{}")
    with pytest.raises(ValueError, match="source_page"):
        plan_refine(tiny_tokenizer, document)
    broken = GenerationRequest(
        INSTRUCTION, mode=PageMode.COMPOSE, description=DESCRIPTION, source_content="not json"
    )
    with pytest.raises(ValueError, match="not page content"):
        plan_refine(tiny_tokenizer, broken)


def test_a_refine_without_a_description_is_about_its_instruction(tiny_tokenizer: Any) -> None:
    request = GenerationRequest("a landing page for a farm shop", source_page="<p>Eggs</p>")
    plan = plan_answer(tiny_tokenizer, request)
    assert plan.prefix == document_prefix("a landing page for a farm shop")
