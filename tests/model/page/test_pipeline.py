"""model.page.pipeline: an engine's result becomes a page, its finish reason becomes flags."""

from __future__ import annotations

import pytest

from model.errors import HtmlExtractionError
from model.page import PageWarning, page_from_result
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
    # The model's page, themed and under the CSP; nothing of it lost.
    assert "<h1>Fresh bread</h1>" in page.html and WORDS in page.html


def test_document_pages_get_the_theme_first_and_the_csp_before_anything() -> None:
    page = page_from_result(_result(DOC, FinishReason.EOS), prompt=PROMPT, style="dark")
    head = page.html.split("<head>", 1)[1]
    assert head.startswith('<meta http-equiv="Content-Security-Policy"')
    assert '<style data-theme="dark">' in head
    plain = page_from_result(_result(DOC, FinishReason.EOS), prompt=PROMPT, safety=SafetyPolicy.OFF)
    assert "Content-Security-Policy" not in plain.html
    assert '<style data-theme="modern">' in plain.html  # the default theme


def test_standard_and_off_keep_scripts() -> None:
    for safety in (SafetyPolicy.STANDARD, SafetyPolicy.OFF):
        page = page_from_result(_result(DOC, FinishReason.EOS), prompt=PROMPT, safety=safety)
        assert "<script>function order() {}</script>" in page.html
        assert 'onclick="order()"' in page.html


def test_strict_removes_scripts_and_says_so() -> None:
    page = page_from_result(
        _result(DOC, FinishReason.EOS), prompt=PROMPT, safety=SafetyPolicy.STRICT
    )
    assert page.warnings == (W.SCRIPTS_REMOVED,)
    assert "<script" not in page.html and "onclick" not in page.html
    assert "<h1>Fresh bread</h1>" in page.html


def test_strict_flags_nothing_when_there_is_nothing_to_strip() -> None:
    text = DOC.replace(' onclick="order()"', "").replace("<script>function order() {}</script>", "")
    page = page_from_result(
        _result(text, FinishReason.EOS), prompt=PROMPT, safety=SafetyPolicy.STRICT
    )
    assert page.warnings == ()


COMPOSE_PROMPT = "a pricing page for a yoga studio"


def _compose_answer(*, plans: int = 3) -> str:
    """A filled pricing form; with ``plans`` < 3 cut off inside the plans (the length limit)."""
    from tests.bot.fakes import fake_compose_answer

    answer = fake_compose_answer(COMPOSE_PROMPT)
    if plans < 3:
        lines = answer.split("\n")
        answer = "\n".join(lines[: 1 + 3 * plans])  # the tagline, then 3 lines a plan
    return answer


def test_compose_renders_the_content_through_the_theme() -> None:
    page = page_from_result(
        _result(_compose_answer(), FinishReason.EOS),
        prompt=COMPOSE_PROMPT,
        mode=PageMode.COMPOSE,
        style="corporate",
    )
    assert page.title == "Yoga studio"
    assert page.complete and page.warnings == ()
    assert page.html.count("$12.50") == 3
    assert '<style data-theme="corporate">' in page.html or "corporate" in page.html
    assert 'http-equiv="Content-Security-Policy"' in page.html
    assert "Tagline (" not in page.html  # the form's lead-ins never reach the page


def test_compose_cut_off_by_the_length_limit_is_truncated_and_keeps_its_plans() -> None:
    page = page_from_result(
        _result(_compose_answer(plans=2), FinishReason.LENGTH),
        prompt=COMPOSE_PROMPT,
        mode=PageMode.COMPOSE,
    )
    assert W.TRUNCATED in page.warnings and not page.complete
    assert page.html.count("$12.50") == 2


def test_compose_with_little_content_is_flagged_thin() -> None:
    answer = "Tagline (one short sentence about a yoga studio): Stretch with us.\n"
    page = page_from_result(
        _result(answer, FinishReason.REPETITION), prompt=COMPOSE_PROMPT, mode=PageMode.COMPOSE
    )
    assert page.warnings == (W.REPETITION, W.EMPTY)


def test_compose_answer_without_the_form_raises() -> None:
    with pytest.raises(HtmlExtractionError, match="no page content"):
        page_from_result(
            _result("Sure, here is a page!", FinishReason.EOS),
            prompt=COMPOSE_PROMPT,
            mode=PageMode.COMPOSE,
        )


def test_nothing_usable_raises() -> None:
    with pytest.raises(HtmlExtractionError):
        page_from_result(_result("  \n", FinishReason.EOS), prompt=PROMPT)


def test_the_engine_stopping_a_loop_means_repetition() -> None:
    page = page_from_result(_result(DOC, FinishReason.REPETITION), prompt=PROMPT)
    assert page.warnings == (W.REPETITION,)


def test_compose_cut_off_before_any_field_says_so() -> None:
    with pytest.raises(HtmlExtractionError, match="length limit"):
        page_from_result(
            _result("Tagline (one short sentence about", FinishReason.LENGTH),
            prompt=COMPOSE_PROMPT,
            mode=PageMode.COMPOSE,
        )


def test_an_empty_document_shows_its_title_and_stays_flagged() -> None:
    page = page_from_result(
        _result(
            "<!DOCTYPE html><html><head><title>Bakery</title></head><body></body></html>",
            FinishReason.EOS,
        ),
        prompt=PROMPT,
    )
    assert W.EMPTY in page.warnings
    assert "<h1>Bakery</h1>" in page.html
