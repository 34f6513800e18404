"""A style switch: the same page in another theme, without the model.

A restyle keeps every word of the page and changes only how it looks:

* a compose page (one with ``HtmlPage.content``) is rendered again from its kept content
  through the new theme's templates (:func:`~model.page.theming.render_content`);
* a document page keeps its markup and gets the new theme's stylesheet in place of the old
  one (:func:`~model.page.theming.swap_theme`); the model's own CSS still overrides it.

Either way the result goes through the SAFETY policy again, as any delivered page does.
"""

from __future__ import annotations

import dataclasses
import html as html_lib
import re

from model.page.content import PageContent
from model.page.result import HtmlPage
from model.page.safety import apply_safety
from model.page.theming import render_content, resolve_theme, swap_theme
from model.types import SafetyPolicy

__all__ = ["restyle", "restyle_stored"]

_META_DESCRIPTION_RE = re.compile(
    r"<meta\s+name=\"description\"\s+content=\"([^\"]*)\"\s*/?>", re.IGNORECASE
)


def restyle(
    page: HtmlPage,
    theme: str | None,
    *,
    safety: SafetyPolicy = SafetyPolicy.STANDARD,
    description: str | None = None,
) -> HtmlPage:
    """``page`` in ``theme`` (None: the default theme), its content kept exactly.

    ``safety`` is the policy the page is delivered under (the one it was made with).
    ``description`` (compose pages) is the meta description of the new render; ``None``
    keeps the page's own. Title, flags (``scripts_removed`` included: what the policy
    removed is still gone) and ``content`` are the page's. Raises ``ValueError`` for an unknown
    theme or content that is not page content.
    """
    name = resolve_theme(theme)
    if page.content is not None:
        if description is None:
            description = _meta_description(page.html)
        try:
            content = PageContent.model_validate_json(page.content)
        except ValueError as error:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"the page's content is not page content: {error}") from None
        html = render_content(content, theme=name, description=description)
    else:
        html = swap_theme(page.html, name)
    # The page was made safe under this policy when it was delivered; this pass keeps the
    # CSP first in the head whatever the swap did. Its "removed" answer is not news about
    # the page (it counts the CSP meta it replaces), so the page's own flags stand.
    html, _ = apply_safety(html, safety)
    return dataclasses.replace(page, html=html)


def restyle_stored(
    data: bytes,
    content: str | None,
    theme: str | None,
    *,
    safety: SafetyPolicy = SafetyPolicy.STANDARD,
) -> HtmlPage:
    """:func:`restyle` for a kept page: its bytes and (compose pages) its content JSON."""
    html = data.decode("utf-8", "replace")
    found = _TITLE_RE.search(html)
    title = html_lib.unescape(found.group(1)).strip() if found else ""
    page = HtmlPage(html=html, title=title, warnings=(), complete=True, content=content)
    return restyle(page, theme, safety=safety)


_TITLE_RE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _meta_description(html: str) -> str:
    """The page's meta description, unescaped ('' when it has none: strict drops it)."""
    found = _META_DESCRIPTION_RE.search(html)
    return html_lib.unescape(found.group(1)) if found else ""
