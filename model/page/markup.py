"""Stages 5-7 together: parse, complete and serialize the source into a page that fits.

The source is parsed in standards mode with scripting on, as a browser will read the page we
write (with our ``<!DOCTYPE html>``); the tree is normalized and its head completed; and pages
up to 300k characters are re-parsed until they come back without a single parse error.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from model.page.guard import cut_to_bytes
from model.page.parse import (
    CUT_ERRORS,
    MISNESTED_ERRORS,
    UNCLOSED_ERRORS,
    parse,
    parse_robustly,
)
from model.page.serialize import serialize
from model.page.tree import complete_head, sanitize_tree, visible_words

log = logging.getLogger(__name__)

_DANGLING_LT_RE = re.compile(r"<[/!]?\s*$")
_LEADING_DOCTYPE_RE = re.compile(r"\A\s*<!doctype[^>]*>", re.IGNORECASE)
MIN_MAX_BYTES = 4096
_SIZE_RESERVE = 2048  # room for what completion adds (doctype, metas, title, closing tags)


@dataclass(frozen=True)
class Rendered:
    html: str
    title: str
    oversize: bool  # the source was cut to fit max_bytes
    cut_mid_tag: bool  # the source ended inside a tag, comment or raw-text element
    closed_elements: bool  # the parser closed elements that were left open
    misnested: bool  # the parser moved, split or dropped elements to build the tree
    visible_words: int  # words a reader sees in the body


def source_repairs(source: str) -> bool:
    """Whether the model's markup lacked a structural piece that a full document has: the
    doctype, ``<html>``, ``<body>`` or ``</html>``. (A missing ``<head>`` is not one: the
    parser implies it without an error, and what goes in it is routine completion.)"""
    checks = (
        r"<!doctype\s+html",
        r"<html(?=[\s>])",
        r"<body(?=[\s>])",
        r"</html\s*>",
    )
    return not all(re.search(c, source, re.IGNORECASE) for c in checks)


_SETTLE_MAX_CHARS = 300_000


def settle(page_html: str) -> str:
    """Re-parse a page until its serialization is a fixed point of the parser.

    Error recovery can build trees that no markup produces (a <p> kept inside <svg>); written
    out and read again they come out different, with parse errors. One more round trip
    normalizes them. Pages beyond 300k characters skip the check (it costs a parse).
    """
    if len(page_html) > _SETTLE_MAX_CHARS:
        return page_html
    for _ in range(3):
        try:
            root, errors = parse(page_html)
        except Exception:  # see parse_robustly; keep the page we have
            log.debug("html5lib failed on re-parsing a page", exc_info=True)
            break
        if not errors:
            break
        log.debug("re-serializing a page that re-parses with errors: %s", sorted(errors))
        sanitize_tree(root, scrub_text=True)
        page_html = serialize(root)
    return page_html


def render(source: str, *, prompt: str, max_bytes: int) -> Rendered:
    """Parse, complete and serialize ``source``, cutting it until the page fits ``max_bytes``."""
    budget = max_bytes - _SIZE_RESERVE
    while True:
        part, oversize = cut_to_bytes(source, budget)
        # A bare "<" or "</" at the end would become text; a cut tag is dropped by the parser.
        part, dangling = _DANGLING_LT_RE.subn("", part.rstrip())
        # Parse in standards mode, as a browser will read the page we write: a missing or
        # legacy doctype would build a quirks-mode tree (<p> around <table>) that does not
        # survive serialization under <!DOCTYPE html>.
        root, errors = parse_robustly(
            "<!DOCTYPE html>" + _LEADING_DOCTYPE_RE.sub("", part, count=1)
        )
        sanitize_tree(root, scrub_text="illegal-codepoint-for-numeric-entity" in errors)
        title = complete_head(root, prompt)
        page_html = settle(serialize(root))
        size = len(page_html.encode("utf-8"))
        if size <= max_bytes:
            return Rendered(
                html=page_html,
                title=title,
                oversize=oversize,
                cut_mid_tag=bool(dangling or errors & CUT_ERRORS),
                closed_elements=bool(errors & UNCLOSED_ERRORS),
                misnested=bool(errors & MISNESTED_ERRORS),
                visible_words=visible_words(root),
            )
        # Serialization grew the source (escaping, implied end tags): cut it in proportion.
        used = len(part.encode("utf-8"))
        budget = max(0, min(used - 1024, int(used * max_bytes / size * 0.95) - 1024))
        source = part
