"""What the page pipeline hands back: :class:`HtmlPage` and its :class:`PageWarning` flags."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class PageWarning(StrEnum):
    """Something :func:`build_page` noticed or changed; listed in this order on a page."""

    TRUNCATED = "truncated"  # the caller says generation hit its length limit
    REPETITION = "repetition"  # the engine stopped a loop, or a repeated tail was cut
    NOT_HTML = "not_html"  # the model answered with prose only; it was wrapped into a page
    EMPTY = "empty"  # the page shows fewer than EMPTY_BELOW_WORDS words
    THIN = "thin"  # the page shows fewer than THIN_BELOW_WORDS words (and is not empty)
    REPAIRED = "repaired"  # markup mended: elements closed or misnesting fixed, a cut tag
    # dropped, doctype/html/body/</html> missing (not the routine charset/viewport/title)
    SCRIPTS_REMOVED = "scripts_removed"  # the SAFETY policy removed scripts or loaders
    OVERSIZE = "oversize"  # the source was cut to max_bytes
    INVALID_TEXT = "invalid_text"  # NUL, control chars or invalid UTF-8 were removed/replaced
    DEGENERATE = "degenerate"  # thousands of unclosed elements or attributes in a tag; cut there


WARNING_ORDER = {w: i for i, w in enumerate(PageWarning)}

# What each flag means, in the words the CLI and the bot's summary show.
WARNING_TEXT: dict[PageWarning, str] = {
    PageWarning.TRUNCATED: "cut off by the length limit",
    PageWarning.REPETITION: "the model got stuck repeating itself; the loop was cut",
    PageWarning.NOT_HTML: "the model wrote prose, not markup; it was wrapped into a page",
    PageWarning.EMPTY: "almost nothing on the page",
    PageWarning.THIN: "very little text on the page",
    PageWarning.REPAIRED: "broken markup was mended",
    PageWarning.SCRIPTS_REMOVED: "unsafe scripts or loaders were removed",
    PageWarning.OVERSIZE: "too large; cut to the size limit",
    PageWarning.INVALID_TEXT: "invalid characters were removed",
    PageWarning.DEGENERATE: "degenerate markup was cut",
}

# Words a reader sees in the page's body (text outside script, style and template), below
# which the page is flagged: a landing page, a form or a FAQ has dozens; a model that failed
# leaves a heading or nothing at all.
EMPTY_BELOW_WORDS = 5
THIN_BELOW_WORDS = 40


def size_warning(visible_words: int) -> PageWarning | None:
    """``EMPTY``, ``THIN`` or ``None`` for a page that shows ``visible_words`` words."""
    if visible_words < EMPTY_BELOW_WORDS:
        return PageWarning.EMPTY
    if visible_words < THIN_BELOW_WORDS:
        return PageWarning.THIN
    return None


@dataclass(frozen=True)
class HtmlPage:
    """A finished page.

    ``html`` is a complete, well-formed document; ``title`` is its title as plain text (the
    HTML holds it escaped); ``complete`` tells whether the model's own output already was a
    full ``<html>…</html>`` document before any repair. ``content`` (compose pages only) is
    the page's :class:`~model.page.content.PageContent` as JSON: what a restyle re-renders
    and a refine edits; ``None`` for a document page.
    """

    html: str
    title: str
    warnings: tuple[PageWarning, ...]
    complete: bool
    content: str | None = None

    @property
    def data(self) -> bytes:
        """The page as UTF-8 bytes, ready to attach as a file."""
        return self.html.encode("utf-8")


def summarize_pages(pages: Sequence[HtmlPage]) -> dict[str, float]:
    """Quality rates over many pages (e.g. an evaluation run): ``count``, ``mean_bytes``,
    ``complete_document_rate``, ``truncation_rate``, ``repetition_rate``, ``not_html_rate``,
    ``empty_rate``, ``thin_rate``, ``repaired_rate``. Rates are fractions in [0, 1]; all zero
    for no pages."""
    count = len(pages)

    def rate(predicate: Any) -> float:
        return sum(1 for p in pages if predicate(p)) / count if count else 0.0

    return {
        "count": float(count),
        "mean_bytes": sum(len(p.data) for p in pages) / count if count else 0.0,
        "complete_document_rate": rate(lambda p: p.complete),
        "truncation_rate": rate(lambda p: PageWarning.TRUNCATED in p.warnings),
        "repetition_rate": rate(lambda p: PageWarning.REPETITION in p.warnings),
        "not_html_rate": rate(lambda p: PageWarning.NOT_HTML in p.warnings),
        "empty_rate": rate(lambda p: PageWarning.EMPTY in p.warnings),
        "thin_rate": rate(lambda p: PageWarning.THIN in p.warnings),
        "repaired_rate": rate(lambda p: PageWarning.REPAIRED in p.warnings),
    }
