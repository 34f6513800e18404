"""The page pipeline: whatever a model said becomes one safe, complete HTML page.

``document`` mode (:func:`build_page`): the model wrote the whole page; its markup is
extracted, guarded, parsed, completed and serialized, one module per stage (``text``,
``extract``, ``guard``, ``parse``, ``tree``, ``serialize``, with ``markup`` tying the last three
together). ``compose`` mode: the model fills in structured content (``content``) that the
project's themes render.
"""

from __future__ import annotations

from model.page.document import build_page
from model.page.extract import extract_html
from model.page.result import HtmlPage, PageWarning, summarize_pages
from model.page.text import detect_repetition
from model.page.tree import title_from_prompt

__all__ = [
    "HtmlPage",
    "PageWarning",
    "build_page",
    "detect_repetition",
    "extract_html",
    "summarize_pages",
    "title_from_prompt",
]
