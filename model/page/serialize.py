"""Stage 7 of the page pipeline: serialization.

html5lib's ``HTMLSerializer`` (all the escaping rules) fed by a small iterative tree walker of
our own: html5lib's etree walker is quadratic in the number of siblings, and recursion would
fail on degenerate nesting.
"""

from __future__ import annotations

import html as html_lib
from collections.abc import Iterator
from typing import Any
from xml.etree import ElementTree
from xml.etree.ElementTree import Element

from html5lib.constants import namespaces, rcdataElements, voidElements
from html5lib.serializer import HTMLSerializer
from html5lib.treewalkers.base import TreeWalker

from model.page.tree import split_tag

_NS_PREFIX = {
    namespaces["xlink"]: "xlink:",
    namespaces["xml"]: "xml:",
    namespaces["xmlns"]: "xmlns:",
}


# The parser's void elements; html5lib's serializer list lacks wbr and the legacy ones, and
# would write an end tag ("</wbr>") that is a parse error.
_VOID_TAGS = frozenset(voidElements) | {"wbr", "keygen", "basefont", "bgsound", "frame"}


_SERIALIZER_RAW_TAGS = frozenset(rcdataElements)  # names whose text it never escapes


class _Walker(TreeWalker):
    """Iterative token stream over an html5lib etree tree (doctype first)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield self.doctype("html")
        stack: list[tuple[bool, Element]] = [(False, self.tree)]
        # The serializer writes the text of any element named script/style/... unescaped, but
        # inside <svg>/<math> such text was parsed as normal text: escape it ourselves there.
        foreign_raw = 0
        while stack:
            leaving, el = stack.pop()
            if leaving:
                ns, name = split_tag(el.tag)
                yield self.endTag(ns, name)
                if ns is not None and name in _SERIALIZER_RAW_TAGS:
                    foreign_raw -= 1
                if el.tail and el is not self.tree:
                    yield from self._text(el.tail, foreign_raw)
                continue
            if el.tag is ElementTree.Comment:
                yield self.comment(el.text or "")
                if el.tail:
                    yield from self._text(el.tail, foreign_raw)
                continue
            ns, name = split_tag(el.tag)
            attrs: dict[tuple[str | None, str], str] = {}
            for key, value in el.attrib.items():
                attr_ns, attr_name = split_tag(key)
                if attr_ns is not None:
                    prefix = _NS_PREFIX.get(attr_ns, "")
                    attr_name = "xmlns" if attr_name == "xmlns" else prefix + attr_name
                attrs[(None, attr_name)] = value
            if ns is None and name in _VOID_TAGS:
                yield from self.emptyTag(ns, name, attrs)
                if el.tail:
                    yield from self._text(el.tail, foreign_raw)
                continue
            yield self.startTag(ns, name, attrs)
            if ns is not None and name in _SERIALIZER_RAW_TAGS:
                foreign_raw += 1
            if el.text:
                yield from self._text(el.text, foreign_raw)
            stack.append((True, el))
            stack.extend((False, child) for child in reversed(el))

    def _text(self, data: str, foreign_raw: int) -> Iterator[dict[str, Any]]:
        if foreign_raw:
            yield {"type": "Characters", "data": html_lib.escape(data, quote=False)}
        else:
            yield from self.text(data)


def serialize(root: Element) -> str:
    serializer = HTMLSerializer(
        quote_attr_values="always",
        omit_optional_tags=False,
        use_trailing_solidus=False,
        escape_lt_in_attrs=True,
    )
    return str(serializer.render(_Walker(root)))
