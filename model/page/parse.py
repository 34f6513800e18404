"""Stage 5 of the page pipeline: parsing with html5lib.

html5lib is pure Python and implements the WHATWG HTML parsing algorithm, the one browsers
use, so "close what was left open" follows exactly the rules a browser applies: a tag cut at
end-of-file (mid-name or mid-attribute) is dropped rather than leaked, misnested and unclosed
elements are fixed up the standard way, and its parse-error codes tell us *that* the model's
output was cut mid-tag or left elements open. lxml or BeautifulSoup's default parser follow
libxml2's own recovery rules instead, and regexes cannot do this at all. Two small
adaptations: runs of character tokens are merged (the etree builder's ``+=`` is quadratic
otherwise), and two asserts that SVG elements named like table parts trip are left out.
"""

from __future__ import annotations

import html as html_lib
import logging
import re
from collections.abc import Iterator
from typing import Any
from xml.etree.ElementTree import Element

import html5lib
from html5lib._tokenizer import HTMLTokenizer
from html5lib.constants import tokenTypes

log = logging.getLogger(__name__)

# Parse errors meaning the input ended inside a tag, comment, doctype or raw-text element.
CUT_ERRORS = frozenset(
    {
        "eof-in-tag-name",
        "expected-attribute-name-but-got-eof",
        "eof-in-attribute-name",
        "expected-end-of-tag-name-but-got-eof",
        "expected-attribute-value-but-got-eof",
        "eof-in-attribute-value-double-quote",
        "eof-in-attribute-value-single-quote",
        "eof-in-attribute-value-no-quotes",
        "eof-in-comment",
        "eof-in-comment-end-dash",
        "eof-in-comment-double-dash",
        "eof-in-comment-end-space-state",
        "eof-in-comment-end-bang-state",
        "expected-doctype-name-but-got-eof",
        "eof-in-doctype-name",
        "eof-in-doctype",
        "expected-named-closing-tag-but-got-eof",
        "eof-in-script-in-script",
    }
)
# Parse errors meaning elements were still open at the end and the parser closed them.
UNCLOSED_ERRORS = frozenset(
    {"expected-closing-tag-but-got-eof", "eof-in-table", "eof-in-select", "eof-in-frameset"}
)
# Parse errors meaning the parser built a tree that differs from what the markup says: it
# moved, split, closed early or dropped elements (misnesting, stray end tags, content fostered
# out of tables or moved back into <body>). Tokenizer-level errors (attributes, entities,
# comments) are left out: the tree they give is the one the markup meant.
MISNESTED_ERRORS = frozenset(
    {
        "unexpected-end-tag",
        "unexpected-end-tag-treated-as",
        "unexpected-end-tag-before-html",
        "missing-end-tag",
        "missing-end-tags",
        "no-end-tag",
        "expected-one-end-tag-but-got-another",
        "end-tag-too-early",
        "end-tag-too-early-named",
        "end-tag-too-early-ignored",
        "adoption-agency-1.1",
        "adoption-agency-1.2",
        "adoption-agency-1.3",
        "adoption-agency-4.4",
        "unexpected-start-tag",
        "unexpected-start-tag-ignored",
        "unexpected-start-tag-implies-end-tag",
        "unexpected-start-tag-out-of-my-head",
        "two-heads-are-not-better-than-one",
        "unexpected-char-implies-table-voodoo",
        "unexpected-start-tag-implies-table-voodoo",
        "unexpected-end-tag-implies-table-voodoo",
        "unexpected-form-in-table",
        "unexpected-implied-end-tag-in-table",
        "unexpected-implied-end-tag-in-table-body",
        "unexpected-implied-end-tag-in-table-row",
        "unexpected-cell-in-table-body",
        "unexpected-cell-end-tag",
        "unexpected-end-tag-in-table-body",
        "unexpected-end-tag-in-table-row",
        "unexpected-select-in-select",
        "unexpected-input-in-select",
        "unexpected-start-tag-in-select",
        "unexpected-end-tag-in-select",
        "unexpected-table-element-start-tag-in-select-in-table",
        "unexpected-table-element-end-tag-in-select-in-table",
        "unexpected-char-after-body",
        "unexpected-start-tag-after-body",
        "unexpected-end-tag-after-body",
        "unexpected-html-element-in-foreign-content",
    }
)


_CHARACTERS = tokenTypes["Characters"]
_SPACE_CHARACTERS = tokenTypes["SpaceCharacters"]
_PARSE_ERROR = tokenTypes["ParseError"]


class _CoalescingTokenizer(HTMLTokenizer):
    """html5lib's tokenizer, with runs of character tokens merged into one.

    The etree builder appends every character token to the text node with ``+=``, which is
    quadratic when a text has thousands of ``&amp;`` or stray ``<`` (each its own token).
    Merging is safe: processing characters never changes the tokenizer's state, and whitespace
    is only merged after non-whitespace, where the tree builder treats it alike.
    """

    def __iter__(self) -> Iterator[dict[str, Any]]:
        run: list[str] = []
        for token in super().__iter__():
            kind = token["type"]
            if kind == _CHARACTERS or (kind == _SPACE_CHARACTERS and run):
                run.append(token["data"])
                continue
            if run and kind != _PARSE_ERROR:
                yield {"type": _CHARACTERS, "data": "".join(run)}
                run = []
            yield token
        if run:
            yield {"type": _CHARACTERS, "data": "".join(run)}


INSERTION_MODES = {
    "select": "inSelect",
    "td": "inCell",
    "th": "inCell",
    "tr": "inRow",
    "tbody": "inTableBody",
    "thead": "inTableBody",
    "tfoot": "inTableBody",
    "caption": "inCaption",
    "colgroup": "inColumnGroup",
    "table": "inTable",
    "head": "inBody",
    "body": "inBody",
    "frameset": "inFrameset",
    "html": "beforeHead",
}


class _Parser(html5lib.HTMLParser):
    """``html5lib.HTMLParser`` using :class:`_CoalescingTokenizer` (text input only)."""

    def _parse(
        self,
        stream: Any,
        innerHTML: bool = False,
        container: str = "div",
        scripting: bool = False,
        **kwargs: Any,
    ) -> None:
        self.innerHTMLMode = innerHTML
        self.container = container
        self.scripting = scripting
        self.tokenizer = _CoalescingTokenizer(stream, parser=self, **kwargs)
        self.reset()
        self.mainLoop()  # a str never needs html5lib's re-parse for a changed encoding

    def resetInsertionMode(self) -> None:
        """html5lib's own, less two asserts that an <svg><colgroup> on the stack trips (it
        checks the name before the namespace). Without them it does what the spec says."""
        last = False
        new_phase = None
        for node in self.tree.openElements[::-1]:
            node_name = node.name
            if node == self.tree.openElements[0]:
                last = True
                node_name = self.innerHTML
            if not last and node.namespace != self.tree.defaultNamespace:
                continue
            if node_name in INSERTION_MODES:
                new_phase = self.phases[INSERTION_MODES[node_name]]
                break
            if last:
                new_phase = self.phases["inBody"]
                break
        self.phase = new_phase


def parse(source: str) -> tuple[Element, set[str]]:
    parser = _Parser(tree=html5lib.getTreeBuilder("etree"), namespaceHTMLElements=False)
    # Scripting on, as in a browser: <noscript> holds raw text, not markup.
    root = parser.parse(source, scripting=True)
    return root, {code for _pos, code, _vars in parser.errors}


_FOREIGN_TAG_RE = re.compile(r"</?(?:svg|math)(?=[\s/>])[^>]*>", re.IGNORECASE)


def parse_robustly(source: str) -> tuple[Element, set[str]]:
    """:func:`_parse`, surviving html5lib's internal asserts (odd svg/math inside tables trip
    them): then without the svg/math tags, and at last the source as plain text."""
    try:
        return parse(source)
    except Exception:
        log.warning("html5lib failed on this page; retrying without svg/math", exc_info=True)
    try:
        return parse(_FOREIGN_TAG_RE.sub("", source))
    except Exception:
        log.warning("html5lib failed again; the page is kept as text", exc_info=True)
    return parse(f"<!DOCTYPE html><pre>{html_lib.escape(source, quote=False)}</pre>")
