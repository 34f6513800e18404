"""Document mode: the model wrote the whole page; make it one safe, complete, well-formed page.

:func:`build_page` runs the stages in order: text hygiene and repetition (``text``),
extraction (``extract``), size and shape (``guard``), then parsing, completion and
serialization (``markup``). See each module for what its stage does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from model.errors import HtmlExtractionError
from model.page.extract import HTML_OPEN_RE, closes_document, extract_source, prose_to_html
from model.page.guard import Guarded, guard_markup
from model.page.markup import MIN_MAX_BYTES, Rendered, render, source_repairs
from model.page.result import WARNING_ORDER, HtmlPage, PageWarning, size_warning
from model.page.text import clean_text, detect_repetition

log = logging.getLogger(__name__)


def build_page(
    model_output: str | bytes,
    *,
    prompt: str,
    truncated: bool = False,
    repetition: bool = False,
    max_bytes: int = 1_000_000,
) -> HtmlPage:
    """Make a complete, well-formed, UTF-8 page out of a model's answer.

    ``truncated`` says the generation hit its token limit (the only source of that flag);
    ``repetition`` that the engine stopped it on a loop (the text may show none any more).
    ``max_bytes`` bounds the page (at least 4096). Scripts are the SAFETY policy's business
    (``model.page.safety``, applied by ``page_from_result``), not this builder's.
    See the module docstring for each step and :class:`PageWarning` for what is reported.

    Raises :class:`HtmlExtractionError` when the output holds nothing usable (empty or
    whitespace only, after removing invalid characters and empty fences).
    """
    if not isinstance(model_output, str | bytes | bytearray):
        raise TypeError(f"model_output must be str or bytes, not {type(model_output).__name__}")
    if max_bytes < MIN_MAX_BYTES:
        raise ValueError(f"max_bytes must be at least {MIN_MAX_BYTES}")
    warnings: set[PageWarning] = set()
    if truncated:
        warnings.add(PageWarning.TRUNCATED)
    text, invalid = clean_text(model_output)
    if invalid:
        warnings.add(PageWarning.INVALID_TEXT)
    if not text.strip():
        raise HtmlExtractionError("the model's output is empty")

    source = _take_source(text)
    if source.not_html:
        warnings.add(PageWarning.NOT_HTML)
    if source.repeated or repetition:
        warnings.add(PageWarning.REPETITION)
    guarded = guard_markup(source.markup)
    if guarded.degenerate:
        warnings.add(PageWarning.DEGENERATE)
    rendered = render(guarded.source, prompt=prompt, max_bytes=max_bytes)
    if rendered.oversize:
        warnings.add(PageWarning.OVERSIZE)
    if _repaired(source, guarded, rendered):
        warnings.add(PageWarning.REPAIRED)
    size = size_warning(rendered.visible_words)
    if size is not None:
        warnings.add(size)
    ordered = tuple(sorted(warnings, key=WARNING_ORDER.__getitem__))
    if ordered:
        log.debug("page built with warnings: %s", ", ".join(ordered))
    return HtmlPage(
        html=rendered.html, title=rendered.title, warnings=ordered, complete=source.complete
    )


@dataclass(frozen=True)
class _Source:
    markup: str  # the model's page, or its prose wrapped into one
    not_html: bool  # the answer held no HTML: ``markup`` is the wrapped prose
    complete: bool  # the model's own markup was a whole <html>...</html> document
    repeated: bool  # a repeated tail was cut from the answer or from its page


def _take_source(text: str) -> _Source:
    """The markup to render: the page extracted from the answer, else the prose wrapped."""
    text, repeated = detect_repetition(text)
    extraction = extract_source(text)
    if not extraction.html:
        wrapped = prose_to_html(text, extraction.blocks)
        if not wrapped:
            raise HtmlExtractionError("the model's output holds no page and no text")
        return _Source(wrapped, not_html=True, complete=False, repeated=repeated)
    markup = extraction.html
    complete = bool(HTML_OPEN_RE.search(markup)) and closes_document(markup)
    markup, repeated_inside = detect_repetition(markup)
    return _Source(markup, not_html=False, complete=complete, repeated=repeated or repeated_inside)


def _repaired(source: _Source, guarded: Guarded, rendered: Rendered) -> bool:
    """Whether the model's markup had to be mended (not the routine charset/viewport/title).

    A cut of our own (repetition, degenerate markup, size) explains an unfinished tag or
    unclosed elements: only the model's own count. A tag the model left unfinished is mended
    (dropped), not a sign of truncation: only the caller knows whether the length limit cut
    the answer off.
    """
    if source.not_html:
        return False
    our_cut = source.repeated or guarded.degenerate or rendered.oversize
    cut_or_unclosed = rendered.cut_mid_tag or guarded.cut_tag or rendered.closed_elements
    return source_repairs(source.markup) or rendered.misnested or (cut_or_unclosed and not our_cut)
