"""model.page.restyle: a style switch re-renders without the model, keeping every word.

Compose pages are rendered again from their kept content (``HtmlPage.content``); document
pages get the new theme's stylesheet in place of the old one. The last test makes a real
compose page with the embedded SmolLM2 and restyles it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import html5lib
import pytest

from model.page import HtmlPage, PageWarning, page_from_result, restyle
from model.page.content import EXAMPLES, PageContent, PageKind, page_subject
from model.page.form import answer_text
from model.page.theming import THEMES, swap_theme, theme_css
from model.prompting import document_prefix
from model.types import FinishReason, GenerationResult, PageMode, SafetyPolicy

DESCRIPTION = "a landing page for a garden service in Leeds"
WORDS = " ".join(f"word{i}" for i in range(50))
BODY = (
    f"<header><h1>Green Thumb</h1></header>\n<section><h2>Our work</h2><p>{WORDS}</p>"
    "</section>\n<style>h2{color:#123456}</style>\n"
    '<button onclick="hello()">Say hello</button><script>function hello() {}</script>'
)
_HIDDEN = {"script", "style", "template", "head"}


def _result(text: str) -> GenerationResult:
    return GenerationResult("r", text, FinishReason.EOS, 10, 10, 0.1, 1.0)


def visible_text(html: str) -> list[str]:
    """The words a reader sees, in page order: the title and the body's text outside
    script, style and template, as a browser parses the document."""
    root = html5lib.parse(html, namespaceHTMLElements=False)
    words: list[str] = []
    title = root.find("head/title")
    if title is not None:
        words += (title.text or "").split()

    def walk(element: ET.Element) -> None:
        if element.tag in _HIDDEN or not isinstance(element.tag, str):
            return
        words.extend((element.text or "").split())
        for child in element:
            walk(child)
            words.extend((child.tail or "").split())

    body = root.find("body")
    assert body is not None
    walk(body)
    return words


def theme_of(html: str) -> str:
    """The name on the page's theme stylesheet (there must be exactly one)."""
    root = html5lib.parse(html, namespaceHTMLElements=False)
    themed = [style for style in root.iter("style") if style.get("data-theme")]
    assert len(themed) == 1
    name = themed[0].get("data-theme")
    assert name is not None
    assert theme_css(name) in (themed[0].text or "")  # the whole sheet of that theme
    return name


def compose_page(
    style: str | None = "modern", policy: SafetyPolicy = SafetyPolicy.STANDARD
) -> HtmlPage:
    content = PageContent.model_validate(EXAMPLES[PageKind.LANDING])
    answer = answer_text(content, PageKind.LANDING, page_subject(DESCRIPTION))
    return page_from_result(
        _result(answer), prompt=DESCRIPTION, mode=PageMode.COMPOSE, style=style, safety=policy
    )


def document_page(
    style: str | None = "modern", policy: SafetyPolicy = SafetyPolicy.STANDARD
) -> HtmlPage:
    answer = document_prefix(DESCRIPTION) + BODY + "\n</body>\n</html>"
    return page_from_result(_result(answer), prompt=DESCRIPTION, style=style, safety=policy)


def test_a_compose_page_keeps_its_content_and_a_document_page_has_none() -> None:
    page = compose_page()
    assert page.content is not None
    content = PageContent.model_validate_json(page.content)
    assert content.title == page.title
    assert content.tagline == EXAMPLES[PageKind.LANDING]["tagline"]
    assert document_page().content is None


@pytest.mark.parametrize("policy", list(SafetyPolicy))
@pytest.mark.parametrize("new_theme", [t for t in THEMES if t != "modern"])
def test_a_restyled_compose_page_keeps_every_word_and_changes_the_theme(
    new_theme: str, policy: SafetyPolicy
) -> None:
    page = compose_page("modern", policy)
    restyled = restyle(page, new_theme, safety=policy)
    assert theme_of(page.html) == "modern"
    assert theme_of(restyled.html) == new_theme
    assert visible_text(restyled.html) == visible_text(page.html)
    assert (restyled.title, restyled.content, restyled.warnings) == (
        page.title,
        page.content,
        page.warnings,
    )
    # The same page as if it had been made in that theme in the first place.
    assert restyled.html == compose_page(new_theme, policy).html


@pytest.mark.parametrize("policy", list(SafetyPolicy))
def test_a_restyled_document_page_keeps_its_markup_and_changes_the_theme(
    policy: SafetyPolicy,
) -> None:
    page = document_page("dark", policy)
    restyled = restyle(page, "retro", safety=policy)
    assert theme_of(page.html) == "dark" and theme_of(restyled.html) == "retro"
    assert visible_text(restyled.html) == visible_text(page.html)
    assert WORDS in restyled.html
    assert "h2{color:#123456}" in restyled.html  # the model's own CSS stays, after ours
    assert restyled.html.index("data-theme") < restyled.html.index("#123456")
    if policy is not SafetyPolicy.OFF:
        head = restyled.html.split("<head>", 1)[1]
        assert head.startswith('<meta http-equiv="Content-Security-Policy"')
        assert restyled.html.count("Content-Security-Policy") == 1
    assert restyled.warnings == page.warnings
    # Back again: the very page it was.
    assert restyle(restyled, "dark", safety=policy).html == page.html


def test_swap_theme_changes_only_the_stylesheet() -> None:
    html = document_page("minimal", SafetyPolicy.OFF).html
    swapped = swap_theme(html, "playful")
    before, sheet, after = html.partition(theme_css("minimal"))
    assert sheet
    assert swapped == (
        before.replace('data-theme="minimal"', 'data-theme="playful"')
        + theme_css("playful")
        + after
    )
    assert swap_theme("<html><body><p>hi</p></body></html>", "dark").count("data-theme") == 1


def test_strict_pages_stay_without_scripts_and_flagged() -> None:
    page = document_page("modern", SafetyPolicy.STRICT)
    assert PageWarning.SCRIPTS_REMOVED in page.warnings
    restyled = restyle(page, "corporate", safety=SafetyPolicy.STRICT)
    assert "<script" not in restyled.html and "onclick" not in restyled.html
    assert PageWarning.SCRIPTS_REMOVED in restyled.warnings


def test_unknown_themes_and_broken_content_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown theme"):
        restyle(compose_page(), "neon")
    page = compose_page()
    broken = HtmlPage(page.html, page.title, page.warnings, page.complete, content="{}")
    with pytest.raises(ValueError, match="not page content"):
        restyle(broken, "dark")


@pytest.mark.slow
def test_a_real_compose_page_of_the_embedded_model_restyles_word_for_word() -> None:
    from model.engine import Engine
    from model.loading import load_model
    from model.spec import resolve_spec
    from model.types import GenerationRequest, SamplingParams

    loaded = load_model(resolve_spec(preset="smollm2"))
    request = GenerationRequest(
        "a landing page for a bakery that sells sourdough",
        style="playful",
        mode=PageMode.COMPOSE,
        sampling=SamplingParams(max_new_tokens=900, temperature=0.2, seed=5),
    )
    (result,) = Engine(loaded).generate([request])
    page = page_from_result(
        result, prompt=request.prompt, mode=PageMode.COMPOSE, style=request.style
    )
    assert len(visible_text(page.html)) > 40  # a real page with the model's words on it
    for theme in ("dark", "corporate"):
        restyled = restyle(page, theme)
        assert theme_of(page.html) == "playful" and theme_of(restyled.html) == theme
        assert visible_text(restyled.html) == visible_text(page.html)
        assert restyled.content == page.content
