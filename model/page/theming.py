"""The project's page themes, and the renderer that turns page content into a whole page.

Each style the ``/html`` command offers (:data:`THEMES`) is one designed stylesheet in
``model/page/themes/``, on top of a shared ``base.css`` (the layout, and the element styles
that make plain semantic markup look designed without any class). The stylesheets are used
two ways:

* ``compose`` mode: :func:`render_content` renders a :class:`PageContent` through the Jinja2
  templates in ``model/page/templates/`` (autoescaped: the model's words never become markup)
  into a complete HTML5 document with the theme's CSS in its head;
* ``document`` mode: the model wrote the body itself, and :func:`inject_theme` puts the
  theme's CSS first in the document's head, so any CSS the model wrote still overrides it.

The module is named ``theming`` because ``themes/`` is the folder of stylesheets.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Any

import jinja2

from model.page.content import PageContent

__all__ = [
    "DEFAULT_THEME",
    "THEMES",
    "inject_theme",
    "render_content",
    "resolve_theme",
    "swap_theme",
    "theme_css",
]

THEMES: tuple[str, ...] = ("modern", "minimal", "playful", "corporate", "dark", "retro")
DEFAULT_THEME = "modern"

_PACKAGE = "model.page"


def resolve_theme(name: str | None) -> str:
    """``name`` checked against :data:`THEMES`, :data:`DEFAULT_THEME` when None or empty.

    Raises ``ValueError`` naming the known themes for any other name.
    """
    if not name:
        return DEFAULT_THEME
    key = name.strip().lower()
    if key not in THEMES:
        raise ValueError(f"unknown theme {name!r}; the themes are: {', '.join(THEMES)}")
    return key


@cache
def _stylesheet(file_name: str) -> str:
    return (resources.files(_PACKAGE) / "themes" / file_name).read_text(encoding="utf-8")


@cache
def theme_css(name: str | None) -> str:
    """The whole stylesheet of theme ``name`` (the shared base, then the theme's own rules).

    None means :data:`DEFAULT_THEME`; an unknown name raises ``ValueError`` listing the names.
    """
    theme = resolve_theme(name)
    css = f"{_stylesheet('base.css')}\n{_stylesheet(theme + '.css')}"
    # The sheet goes inside <style>, where only "</style" could end it early.
    if "</style" in css.lower():
        raise ValueError(f"theme {theme!r} contains '</style'")
    return css


# ---------------------------------------------------------------------------- compose mode


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader(_PACKAGE, "templates"),
        autoescape=True,  # every value comes from the model: it is text, never markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


# The heading (and nav label) each kind's block gets, with the id it is anchored at.
_BLOCK_HEADINGS: tuple[tuple[str, str, str], ...] = (
    # (content field, id, heading)
    ("features", "features", "Features"),
    ("plans", "plans", "Plans"),
    ("form", "form", "Your details"),
    ("questions", "questions", "Questions"),
    ("paragraphs", "article", "Article"),
    ("stats", "overview", "Overview"),
    ("table", "overview", "Overview"),
    ("days", "itinerary", "Itinerary"),
    ("projects", "projects", "Projects"),
    ("experience", "experience", "Experience"),
    ("skills", "skills", "Skills"),
    ("dishes", "menu", "Menu"),
    ("schedule", "schedule", "Schedule"),
)
_CTA_ID = "get-started"
# Ids the page itself uses; a section heading that slugs to one of these gets a suffix.
_RESERVED_IDS = frozenset({"top", "page-title", _CTA_ID, *(item[1] for item in _BLOCK_HEADINGS)})


def _slug(text: str) -> str:
    """An id from a heading: lower-case ASCII words joined by hyphens ('' when none)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-")


def _unique_id(base: str, taken: set[str]) -> str:
    candidate, number = base, 2
    while candidate in taken:
        candidate, number = f"{base}-{number}", number + 1
    taken.add(candidate)
    return candidate


def _blocks(content: PageContent) -> list[dict[str, str]]:
    """The kind blocks this content fills, in page order, each once (stats and table share
    one block): ``{"id", "heading", "kind"}``."""
    blocks: list[dict[str, str]] = []
    seen: set[str] = set()
    for field, block_id, heading in _BLOCK_HEADINGS:
        if getattr(content, field) and block_id not in seen:
            seen.add(block_id)
            blocks.append({"id": block_id, "heading": heading, "kind": block_id})
    return blocks


def _section_ids(content: PageContent) -> list[str]:
    taken = set(_RESERVED_IDS)
    return [
        _unique_id(_slug(section.heading) or f"section-{number}", taken)
        for number, section in enumerate(content.sections, start=1)
    ]


def _table_rows(content: PageContent) -> list[list[str]]:
    """The table's rows padded or cut to the number of columns, so every row lines up."""
    if content.table is None:
        return []
    width = len(content.table.columns)
    return [(row + [""] * width)[:width] for row in content.table.rows]


_NUMERIC_RE = re.compile(r"^[\s$€£¥+\-−]*[\d.,]+\s*[%a-zA-Z/]{0,4}\s*$")


def _is_numeric(cell: str) -> bool:
    """Whether a table cell reads as a number (right-aligned, tabular figures)."""
    return bool(_NUMERIC_RE.match(cell))


def _numeric_columns(rows: list[list[str]]) -> set[int]:
    """The columns (after the first, the row headers) whose filled cells are all numbers."""
    width = len(rows[0]) if rows else 0
    return {
        column
        for column in range(1, width)
        if any(row[column] for row in rows)
        and all(_is_numeric(row[column]) for row in rows if row[column])
    }


def _template_context(content: PageContent, theme: str, description: str) -> dict[str, Any]:
    blocks = _blocks(content)
    section_ids = _section_ids(content)
    nav = [(block["id"], block["heading"]) for block in blocks]
    sections = list(zip(section_ids, content.sections, strict=True))
    nav += [(anchor, section.heading) for anchor, section in sections]
    hero_target = "form" if content.form else _CTA_ID
    rows = _table_rows(content)
    return {
        "content": content,
        "theme": theme,
        "css": theme_css(theme),
        "description": description.strip(),
        "blocks": blocks,
        "sections": sections,
        "nav": nav,
        "cta_id": _CTA_ID,
        "hero_target": hero_target,
        # The call-to-action band's button leads to the page's main block (the plans, the
        # form...), or back to the top when there is none: the content names no URL.
        "cta_target": blocks[0]["id"] if blocks else "top",
        "table_rows": rows,
        "numeric_columns": _numeric_columns(rows),
    }


def render_content(content: PageContent, *, theme: str | None, description: str) -> str:
    """``content`` as a complete HTML5 document in ``theme`` (None: :data:`DEFAULT_THEME`).

    The ``<title>`` is ``content.title``; ``description`` (the user's prompt) becomes the
    meta description. Every value is escaped, so no field can add an element or attribute.
    Raises ``ValueError`` for an unknown theme.
    """
    name = resolve_theme(theme)
    template = _environment().get_template("page.html.j2")
    return template.render(_template_context(content, name, description))


# --------------------------------------------------------------------------- document mode

_HEAD_OPEN_RE = re.compile(r"<head(?:\s[^>]*)?>", re.IGNORECASE)
_HTML_OPEN_RE = re.compile(r"<html(?:\s[^>]*)?>", re.IGNORECASE)
_DOCTYPE_RE = re.compile(r"<!doctype[^>]*>", re.IGNORECASE)
_CHARSET_META_RE = re.compile(r"\s*<meta\s+charset\s*=[^>]*>", re.IGNORECASE)
_COMMENT_RE = re.compile(r"<!--.*?-->", re.DOTALL)


def _style_element(theme: str) -> str:
    return f'<style data-theme="{theme}">\n{theme_css(theme)}\n</style>'


def inject_theme(html: str, theme: str | None) -> str:
    """A document with theme ``theme``'s CSS as the first stylesheet in its head.

    The ``<style data-theme="...">`` goes right after ``<head>`` (after its
    ``<meta charset>`` when that comes first, which must stay in the first bytes), before
    any style the model wrote, so the model's own CSS still wins where it says something.
    A document with no ``<head>`` gets one after ``<html>`` (or at the start).
    Raises ``ValueError`` for an unknown theme.
    """
    name = resolve_theme(theme)
    style = _style_element(name)
    # Only look for tags outside comments: a "<head>" inside a comment is not the head.
    searchable = _COMMENT_RE.sub(lambda match: " " * len(match.group(0)), html)
    head = _HEAD_OPEN_RE.search(searchable)
    if head is not None:
        at = head.end()
        charset = _CHARSET_META_RE.match(searchable, at)
        if charset is not None:
            at = charset.end()
        return f"{html[:at]}\n{style}{html[at:]}"
    opening = _HTML_OPEN_RE.search(searchable) or _DOCTYPE_RE.search(searchable)
    at = opening.end() if opening is not None else 0
    return f"{html[:at]}\n<head>\n{style}\n</head>\n{html[at:]}"


# The stylesheet inject_theme and the compose template put in the head; the theme's CSS
# never contains "</style" (theme_css checks), so the first one after it ends the element.
_THEME_STYLE_RE = re.compile(
    r"<style\s+data-theme=(?:\"[^\"]*\"|'[^']*'|[^\s>]+)\s*>.*?</style\s*>",
    re.IGNORECASE | re.DOTALL,
)
_HTML_THEME_ATTR_RE = re.compile(
    r"(<html\b[^>]*?\sdata-theme=)(?:\"[^\"]*\"|'[^']*'|[^\s>]+)", re.IGNORECASE
)


def swap_theme(html: str, theme: str | None) -> str:
    """``html`` with its theme stylesheet (the ``<style data-theme>`` that
    :func:`inject_theme` or the compose template put there) replaced by ``theme``'s, in
    the same place, and the ``<html data-theme>`` attribute, when there is one, renamed.

    Everything else stays byte for byte. A page that has no theme stylesheet gets one from
    :func:`inject_theme`. Raises ``ValueError`` for an unknown theme.
    """
    name = resolve_theme(theme)
    searchable = _COMMENT_RE.sub(lambda match: " " * len(match.group(0)), html)
    found = _THEME_STYLE_RE.search(searchable)
    if found is None:
        return inject_theme(html, name)
    html = html[: found.start()] + _style_element(name) + html[found.end() :]
    return _HTML_THEME_ATTR_RE.sub(lambda match: f'{match.group(1)}"{name}"', html, count=1)
