"""One way from an engine's result to a delivered page, for the bot, the CLI and evaluation.

:func:`page_from_result` is the only place that reads the engine's finish reason into page
flags (``LENGTH``: the page was cut off, so ``truncated``; ``REPETITION``: the engine stopped
a loop, so ``repetition``), picks the mode's builder and applies the SAFETY policy.

Two hook points are left for the parts built in parallel (marked ``HOOK``): the compose
mode's builder (:func:`_compose_page`, themes and content) and the SAFETY policy
(:func:`_apply_safety`, CSP and sanitizer), which for now only maps ``strict`` to the
best-effort script stripping of document mode.
"""

from __future__ import annotations

import dataclasses

from model.page.document import build_page
from model.page.markup import strip_page_scripts
from model.page.result import WARNING_ORDER, HtmlPage, PageWarning
from model.types import FinishReason, GenerationResult, PageMode, SafetyPolicy

__all__ = ["page_from_result"]


def page_from_result(
    result: GenerationResult,
    *,
    prompt: str,
    mode: PageMode = PageMode.DOCUMENT,
    style: str | None = None,
    safety: SafetyPolicy = SafetyPolicy.STANDARD,
) -> HtmlPage:
    """The page for one engine result: built in ``mode``, then made to follow ``safety``.

    ``prompt`` is the user's prompt (it titles a page that has no title); ``style`` the
    requested style, used by compose mode's themes. Blocking and CPU-bound: the bot runs it in
    a thread. Raises :class:`model.errors.HtmlExtractionError` when the answer holds nothing
    usable, ``NotImplementedError`` for compose mode until its builder is wired in.
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
    html, added = _apply_safety(page.html, safety)
    if not added and html == page.html:
        return page
    warnings = tuple(sorted({*page.warnings, *added}, key=WARNING_ORDER.__getitem__))
    return dataclasses.replace(page, html=html, warnings=warnings)


def _compose_page(result: GenerationResult, *, prompt: str, style: str | None) -> HtmlPage:
    """HOOK (compose mode): the model's content JSON rendered through a themed template.

    To be wired to ``model.page.content`` and ``model.page.themes``.
    """
    raise NotImplementedError("compose mode's page builder is not wired in yet")


def _apply_safety(html: str, safety: SafetyPolicy) -> tuple[str, tuple[PageWarning, ...]]:
    """HOOK (SAFETY): the page as ``safety`` allows it, and the warnings that adds.

    For now ``strict`` removes scripts the way ``build_page(strip_scripts=True)`` does and
    every other policy passes the page through; ``model.page.safety`` (CSP first in
    ``<head>``, the sanitizer) replaces this.
    """
    if safety is SafetyPolicy.STRICT:
        stripped, removed = strip_page_scripts(html)
        return stripped, (PageWarning.SCRIPTS_REMOVED,) if removed else ()
    return html, ()
