"""model.page.pipeline: an engine's result becomes a page, its finish reason becomes flags."""

from __future__ import annotations

import pytest

from model.errors import HtmlExtractionError
from model.page import PageWarning, build_page, page_from_result
from model.types import FinishReason, GenerationResult, PageMode, SafetyPolicy

W = PageWarning
PROMPT = "a landing page for a bakery"
WORDS = " ".join(f"word{i}" for i in range(60))
DOC = (
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>Bakery</title>\n'
    f"</head>\n<body>\n<h1>Fresh bread</h1>\n<p>{WORDS}</p>\n"
    '<button onclick="order()">Order</button><script>function order() {}</script>\n'
    "</body>\n</html>"
)


def _result(text: str, reason: FinishReason) -> GenerationResult:
    return GenerationResult(
        request_id="r1",
        text=text,
        finish_reason=reason,
        prompt_tokens=10,
        generated_tokens=100,
        time_to_first_token_s=0.1,
        total_s=1.0,
    )


def test_length_means_truncated() -> None:
    page = page_from_result(_result(DOC[:-20], FinishReason.LENGTH), prompt=PROMPT)
    assert W.TRUNCATED in page.warnings


@pytest.mark.parametrize(
    "reason", [FinishReason.HTML_COMPLETE, FinishReason.EOS, FinishReason.CANCELLED]
)
def test_other_reasons_are_not_truncated(reason: FinishReason) -> None:
    page = page_from_result(_result(DOC, reason), prompt=PROMPT)
    assert page.warnings == ()
    assert page.complete
    assert page.html == build_page(DOC, prompt=PROMPT).html


def test_standard_and_off_keep_scripts() -> None:
    for safety in (SafetyPolicy.STANDARD, SafetyPolicy.OFF):
        page = page_from_result(_result(DOC, FinishReason.EOS), prompt=PROMPT, safety=safety)
        assert "<script>function order() {}</script>" in page.html
        assert 'onclick="order()"' in page.html


def test_strict_strips_scripts_as_the_document_builder_does() -> None:
    page = page_from_result(
        _result(DOC, FinishReason.EOS), prompt=PROMPT, safety=SafetyPolicy.STRICT
    )
    assert page.warnings == (W.SCRIPTS_REMOVED,)
    assert "script" not in page.html and "onclick" not in page.html
    assert page.html == build_page(DOC, prompt=PROMPT, strip_scripts=True).html


def test_strict_flags_nothing_when_there_is_nothing_to_strip() -> None:
    text = DOC.replace(' onclick="order()"', "").replace("<script>function order() {}</script>", "")
    page = page_from_result(
        _result(text, FinishReason.EOS), prompt=PROMPT, safety=SafetyPolicy.STRICT
    )
    assert page.warnings == ()
    assert page.html == build_page(text, prompt=PROMPT).html


def test_compose_is_a_hook_not_yet_wired() -> None:
    with pytest.raises(NotImplementedError, match="compose"):
        page_from_result(_result("{}", FinishReason.EOS), prompt=PROMPT, mode=PageMode.COMPOSE)


def test_nothing_usable_raises() -> None:
    with pytest.raises(HtmlExtractionError):
        page_from_result(_result("  \n", FinishReason.EOS), prompt=PROMPT)


def test_the_engine_stopping_a_loop_means_repetition() -> None:
    page = page_from_result(_result(DOC, FinishReason.REPETITION), prompt=PROMPT)
    assert page.warnings == (W.REPETITION,)
