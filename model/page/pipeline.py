"""One way from an engine's result to a delivered page, for the bot, the CLI and evaluation.

:func:`page_from_result` is the only place that reads the engine's finish reason into page
flags (``LENGTH``: the page was cut off, so ``truncated``; ``REPETITION``: the engine stopped
a loop, so ``repetition``), picks the mode's builder and applies the SAFETY policy:

* ``document``: the model's markup through :func:`~model.page.document.build_page`, then the
  theme's CSS put first in its ``<head>`` (the model's own styles still override it);
* ``compose``: the model's form (:mod:`model.page.form`) parsed into content and rendered by
  the theme's templates (:func:`~model.page.theming.render_content`);
* then :func:`~model.page.safety.apply_safety` (CSP first in ``<head>``; ``strict`` also
  sanitizes), whose removals are flagged ``scripts_removed``.
"""

from __future__ import annotations

import dataclasses
import html as html_lib
import re

from model.errors import HtmlExtractionError
from model.page.content import PageContent, classify_prompt, page_subject, page_title
from model.page.document import build_page
from model.page.form import parse_answer
from model.page.result import WARNING_ORDER, HtmlPage, PageWarning, size_warning
from model.page.safety import apply_safety
from model.page.theming import inject_theme, render_content
from model.types import FinishReason, GenerationResult, PageMode, SafetyPolicy

__all__ = ["content_words", "page_from_result"]


def page_from_result(
    result: GenerationResult,
    *,
    prompt: str,
    mode: PageMode = PageMode.DOCUMENT,
    style: str | None = None,
    safety: SafetyPolicy = SafetyPolicy.STANDARD,
) -> HtmlPage:
    """The page for one engine result: built in ``mode``, themed, made to follow ``safety``.

    ``prompt`` is the user's prompt (it titles the page); ``style`` the theme (the default
    theme when ``None``). Blocking and CPU-bound: the bot runs it in a thread. Raises
    :class:`model.errors.HtmlExtractionError` when the answer holds nothing usable.
    """
    if mode is PageMode.COMPOSE:
        page = _compose_page(result, prompt=prompt, style=style)
    else:
        page = build_page(
            result.text,
            prompt=prompt,
            truncated=result.finish_reason is FinishReason.LENGTH,
            repetition=result.finish_reason is FinishReason.REPETITION,
        )
        if PageWarning.EMPTY in page.warnings:
            page = dataclasses.replace(page, html=_with_title_heading(page.html, page.title))
        page = dataclasses.replace(page, html=inject_theme(page.html, style))
    html, removed = apply_safety(page.html, safety)
    added = (PageWarning.SCRIPTS_REMOVED,) if removed else ()
    warnings = tuple(sorted({*page.warnings, *added}, key=WARNING_ORDER.__getitem__))
    return dataclasses.replace(page, html=html, warnings=warnings)


def _with_title_heading(html: str, title: str) -> str:
    """An empty page shows at least its title (still flagged ``empty``): a blank screen
    tells a user nothing, not even which request it answers."""
    opening = re.search(r"<body[^>]*>", html, re.IGNORECASE)
    if opening is None:
        return html
    heading = f"<header><h1>{html_lib.escape(title, quote=False)}</h1></header>"
    return html[: opening.end()] + heading + html[opening.end() :]


def content_words(content: PageContent) -> int:
    """Words the model wrote into ``content`` (the title, which comes from the prompt, and
    the template's own labels do not count)."""
    data = content.model_dump(exclude={"title", "footer"})

    def words(value: object) -> int:
        if isinstance(value, str):
            return len(value.split())
        if isinstance(value, dict):
            return sum(words(item) for item in value.values())
        if isinstance(value, list):
            return sum(words(item) for item in value)
        return 0

    return words(data)


def _compose_page(result: GenerationResult, *, prompt: str, style: str | None) -> HtmlPage:
    """The model's form, parsed into content and rendered through the theme's templates."""
    kind = classify_prompt(prompt)
    title = page_title(prompt)
    try:
        content = parse_answer(result.text, kind=kind, title=title, subject=page_subject(prompt))
    except ValueError as error:
        if result.finish_reason is FinishReason.LENGTH:
            raise HtmlExtractionError(
                "the answer was cut off by the length limit before its first field; "
                "allow more new tokens"
            ) from None
        raise HtmlExtractionError(f"the answer holds no page content: {error}") from None
    warnings: set[PageWarning] = set()
    truncated = result.finish_reason is FinishReason.LENGTH
    if truncated:
        warnings.add(PageWarning.TRUNCATED)
    if result.finish_reason is FinishReason.REPETITION:
        warnings.add(PageWarning.REPETITION)
    size = size_warning(content_words(content))
    if size is not None:
        warnings.add(size)
    html = render_content(content, theme=style, description=prompt)
    ordered = tuple(sorted(warnings, key=WARNING_ORDER.__getitem__))
    return HtmlPage(
        html=html,
        title=content.title,
        warnings=ordered,
        complete=not truncated,
        content=content.model_dump_json(),
    )
