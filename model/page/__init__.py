"""The page pipeline: whatever a model said becomes one safe, complete HTML page.

``document`` mode (:func:`build_page`): the model wrote the whole page; its markup is
extracted, guarded, parsed, completed and serialized, one module per stage (``text``,
``extract``, ``guard``, ``parse``, ``tree``, ``serialize``, with ``markup`` tying the last three
together). ``compose`` mode: the model fills in structured content (``content``) that the
project's themes render. :func:`page_from_result` takes an engine's result through the
mode's builder and the SAFETY policy; the bot, the CLI and evaluation all use it.
:func:`restyle` shows a finished page in another theme without the model.
"""

from __future__ import annotations

from model.page.document import build_page
from model.page.extract import extract_html
from model.page.pipeline import page_from_result
from model.page.restyle import restyle
from model.page.result import HtmlPage, PageWarning, summarize_pages
from model.page.text import detect_repetition
from model.page.tree import title_from_prompt

__all__ = [
    "HtmlPage",
    "PageWarning",
    "build_page",
    "detect_repetition",
    "extract_html",
    "page_from_result",
    "restyle",
    "summarize_pages",
    "title_from_prompt",
]
