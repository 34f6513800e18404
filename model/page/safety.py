"""The SAFETY policy: what a delivered page may do once a user opens it in a browser.

:func:`apply_safety` takes a complete document (the pipeline's output) and a
:class:`~model.types.SafetyPolicy`:

``standard`` (the default)
    The page keeps its inline scripts and styles, and cannot load anything from anywhere:
    a Content-Security-Policy ``<meta>`` (:data:`STANDARD_CSP`) is put first in ``<head>``,
    before anything the page could load, so images, fonts, styles, frames, objects, media,
    workers, ``fetch``/XHR/WebSocket/EventSource/beacons, pings, dynamic ``import()`` and form
    posts to any URL are refused by the browser; only ``data:``/``blob:`` URLs and inline code
    work. What a CSP in a ``<meta>`` cannot stop is removed from the markup:
    ``<meta http-equiv=refresh>`` (a navigation), ``<base>``, ``<link rel=prefetch|preconnect|
    dns-prefetch|prerender>``, speculation rules (``<script type=speculationrules>``, which
    'unsafe-inline' would let through) and any other CSP ``<meta>`` (one with a report URI
    would call out). ``x-dns-prefetch-control: off`` is set too.

    **Script-driven navigation is NOT blocked.** No CSP can stop a script from navigating
    the page itself (``location = "https://x/?" + data``, ``window.open(...)``, a script
    clicking a link, or a script writing a refresh ``<meta>``), and such a navigation carries
    whatever the script puts in the URL. ``standard`` accepts that on purpose: it is the
    policy for pages whose scripts are wanted (menus, tabs, small games), the navigation is
    visible (the page is replaced and the address bar shows where it went), and it cannot
    read anything the page did not already hold (the page is a local file; it has no
    cookies or secrets of the user's). Nor can a CSP stop WebRTC (an ``RTCPeerConnection``
    to a STUN server) in Chromium. A deployment that cannot accept either uses ``strict``.

``strict``
    The same CSP with ``script-src 'none'``, and the markup sanitized by nh3 (ammonia): no
    ``<script>``, no event-handler attributes, no ``javascript:`` URLs, no frames, objects
    or embeds. The head keeps only its ``<title>``, ``<meta charset>``, ``<meta
    name=viewport>`` and ``<style>`` elements; the body's inner HTML goes through nh3 with a
    generous allowance for page markup (sections, navigation, forms, tables, media, inline
    SVG, ``class``/``id``/``style``, ``aria-*``/``data-*``), and the document is put back
    together. With no script left, scripted navigation is gone too.

``off``
    The page passes through unchanged.

The document is parsed with html5lib (the HTML5 parsing algorithm, as a browser parses it)
and serialized again, so what the browser sees is what was checked here.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator

import html5lib
import nh3
from html5lib.serializer import HTMLSerializer

from model.types import SafetyPolicy

_CSP_COMMON = (
    "default-src 'none'",
    "style-src 'unsafe-inline'",
    "img-src data: blob:",
    "font-src data:",
    "media-src data: blob:",
    "connect-src 'none'",
    "frame-src 'none'",
    "child-src 'none'",
    "worker-src 'none'",
    "manifest-src 'none'",
    "form-action 'none'",
    "base-uri 'none'",
    "object-src 'none'",
)
STANDARD_CSP = "; ".join(("script-src 'unsafe-inline'", *_CSP_COMMON))
"""The ``standard`` policy's CSP: inline scripts and styles, nothing remote."""
STRICT_CSP = "; ".join(("script-src 'none'", *_CSP_COMMON))
"""The ``strict`` policy's CSP: no script at all (nh3 removed them anyway)."""

# http-equiv values dropped wherever they appear: navigation, a competing CSP (with report
# URIs, a way out), cookies, and the page's own DNS-prefetch switch (ours comes first).
_DROPPED_HTTP_EQUIV = frozenset(
    {
        "refresh",
        "content-security-policy",
        "content-security-policy-report-only",
        "set-cookie",
        "x-dns-prefetch-control",
    }
)
# <link rel> values that make the browser connect without a fetch a CSP governs.
_DROPPED_LINK_RELS = frozenset({"prefetch", "preconnect", "dns-prefetch", "prerender"})

_SVG = "http://www.w3.org/2000/svg"
_MATHML = "http://www.w3.org/1998/Math/MathML"

_SERIALIZER = HTMLSerializer(
    omit_optional_tags=False,
    quote_attr_values="always",
    minimize_boolean_attributes=False,
    use_trailing_solidus=False,
    escape_lt_in_attrs=True,
    resolve_entities=False,
    sanitize=False,
)
_WALKER = html5lib.getTreeWalker("etree")


def apply_safety(html: str, policy: SafetyPolicy) -> tuple[str, bool]:
    """The page made safe under ``policy``, and whether anything was removed from it
    (adding the CSP alone counts as no removal). See the module docstring."""
    if policy == SafetyPolicy.OFF:
        return html, False
    document = _parse(html)
    if policy == SafetyPolicy.STANDARD:
        return _standard(document)
    if policy == SafetyPolicy.STRICT:
        return _strict(document)
    raise ValueError(f"unknown safety policy {policy!r}")


# -- parsing and serializing ------------------------------------------------------------


def _parse(html: str) -> ET.Element:
    parser = html5lib.HTMLParser(
        tree=html5lib.getTreeBuilder("etree", ET, fullTree=True), namespaceHTMLElements=False
    )
    document: ET.Element = parser.parse(html)
    return document


def _serialize(node: ET.Element) -> str:
    return str(_SERIALIZER.render(_WALKER(node)))


def _inner_html(element: ET.Element) -> str:
    """The element's children (and its leading text) as markup."""
    holder = ET.Element("div")
    holder.text = element.text
    holder.extend(list(element))
    markup = _serialize(holder)
    return markup[len("<div>") : -len("</div>")]


def _child(document: ET.Element, tag: str) -> ET.Element:
    html = document.find("html")
    if html is None:  # html5lib always makes one; this keeps mypy and a stray caller honest
        raise ValueError("not an HTML document")
    found = html.find(tag)
    if found is None:
        raise ValueError(f"the document has no <{tag}>")
    return found


def _meta(**attributes: str) -> ET.Element:
    return ET.Element("meta", attributes)


def _safety_metas(csp: str) -> list[ET.Element]:
    return [
        _meta(**{"http-equiv": "Content-Security-Policy", "content": csp}),
        _meta(**{"http-equiv": "x-dns-prefetch-control", "content": "off"}),
    ]


def _with_parents(root: ET.Element) -> Iterator[tuple[ET.Element, ET.Element]]:
    for parent in root.iter():
        for child in list(parent):
            yield parent, child


def _remove_tail_safely(parent: ET.Element, child: ET.Element) -> None:
    """Remove ``child`` and keep the text that followed it (ElementTree keeps it on the
    child as ``tail``)."""
    if child.tail:
        index = list(parent).index(child)
        if index > 0:
            previous = parent[index - 1]
            previous.tail = (previous.tail or "") + child.tail
        else:
            parent.text = (parent.text or "") + child.tail
    parent.remove(child)


# -- standard ---------------------------------------------------------------------------


def _is_escape_hatch(element: ET.Element) -> bool:
    """An element that makes the browser load or go somewhere a meta CSP cannot stop."""
    tag = element.tag
    if tag == "base":
        return True
    if tag == "meta":
        return element.get("http-equiv", "").strip().lower() in _DROPPED_HTTP_EQUIV
    if tag == "link":
        rels = set(element.get("rel", "").lower().split())
        return bool(rels & _DROPPED_LINK_RELS)
    if tag == "script":
        return element.get("type", "").strip().lower() == "speculationrules"
    return False


def _standard(document: ET.Element) -> tuple[str, bool]:
    html = document.find("html")
    assert html is not None
    removed = False
    for parent, child in list(_with_parents(html)):
        if isinstance(child.tag, str) and _is_escape_hatch(child):
            _remove_tail_safely(parent, child)
            removed = True
    head = _child(document, "head")
    for index, meta in enumerate(_safety_metas(STANDARD_CSP)):
        head.insert(index, meta)
    if head.text and head.text.strip() == "":
        head.text = None
    return _serialize(document), removed


# -- strict -----------------------------------------------------------------------------


_SVG_TAGS = frozenset(
    "svg g path circle ellipse line polyline polygon rect text tspan defs symbol title desc"  # noqa: SIM905
    " stop linearGradient radialGradient clipPath mask pattern marker".split()
)
_STRICT_TAGS = (
    set(nh3.ALLOWED_TAGS)
    | set(
        "main section article aside header footer nav address figure figcaption dialog tfoot"  # noqa: SIM905
        " caption style form input button select option optgroup textarea label fieldset"
        " legend output progress meter datalist picture source video audio track".split()
    )
    | _SVG_TAGS
)
_GLOBAL_ATTRIBUTES = set("class id style title lang dir role hidden tabindex".split())  # noqa: SIM905
_SVG_ATTRIBUTES = set(
    "viewBox width height xmlns fill stroke stroke-width stroke-linecap stroke-linejoin"  # noqa: SIM905
    " stroke-dasharray d cx cy r rx ry x y x1 y1 x2 y2 dx dy points transform opacity"
    " fill-opacity stroke-opacity fill-rule clip-rule font-size font-family font-weight"
    " text-anchor dominant-baseline offset stop-color stop-opacity gradientUnits"
    " gradientTransform preserveAspectRatio clip-path mask".split()
)
# Per tag, on top of the global ones. URL attributes stay: nh3 drops javascript: and other
# odd schemes, and the CSP refuses every remote load or form post.
_TAG_ATTRIBUTES = {
    "a": "href hreflang target name download",
    "img": "src srcset sizes alt width height loading decoding",
    "form": "action method enctype name autocomplete novalidate target",
    "input": "type name value placeholder required checked disabled min max step pattern"
    " maxlength minlength size readonly autocomplete multiple list accept",
    "button": "type name value disabled",
    "select": "name multiple required disabled size",
    "option": "value selected disabled label",
    "optgroup": "label disabled",
    "textarea": "name rows cols placeholder required disabled readonly maxlength",
    "label": "for",
    "fieldset": "disabled name",
    "output": "for name",
    "progress": "value max",
    "meter": "value min max low high optimum",
    "ol": "start reversed type",
    "li": "value",
    "time": "datetime",
    "details": "open",
    "source": "srcset sizes media type src",
    "video": "controls width height muted loop src poster",
    "audio": "controls muted loop src",
    "track": "kind label srclang src default",
    "th": "abbr",
}
_STRICT_ATTRIBUTES: dict[str, set[str]] = {
    tag: set(values) for tag, values in nh3.ALLOWED_ATTRIBUTES.items()
}
for _tag, _names in _TAG_ATTRIBUTES.items():
    _STRICT_ATTRIBUTES.setdefault(_tag, set()).update(_names.split())
for _tag in _SVG_TAGS:
    _STRICT_ATTRIBUTES.setdefault(_tag, set()).update(_SVG_ATTRIBUTES)
_STRICT_ATTRIBUTES["*"] = _GLOBAL_ATTRIBUTES
# Removed with everything inside: code, and the fallback a scripting browser never shows.
_STRICT_CLEAN_CONTENT = {"script", "noscript", "template", "iframe", "object", "embed"}
_HEAD_KEPT_META_NAMES = frozenset({"viewport"})
_ROOT_ATTRIBUTES = ("lang", "dir", "class", "id", "style")


def _sanitize_fragment(markup: str) -> str:
    return nh3.clean(
        markup,
        tags=_STRICT_TAGS,
        clean_content_tags=_STRICT_CLEAN_CONTENT,
        attributes=_STRICT_ATTRIBUTES,
        generic_attribute_prefixes={"aria-", "data-"},
        strip_comments=True,
    )


def _kept_head(head: ET.Element) -> tuple[list[ET.Element], bool]:
    """The head elements strict keeps (title, charset, viewport, styles), and whether any
    other was dropped. Kept elements lose every attribute but the ones that make them."""
    kept: list[ET.Element] = []
    dropped = False
    for element in head:
        if not isinstance(element.tag, str):
            continue  # comments
        copy = _head_copy(element)
        if copy is None:
            dropped = True
        else:
            kept.append(copy)
            dropped = dropped or len(copy.attrib) < len(element.attrib)
    return kept, dropped


def _head_copy(element: ET.Element) -> ET.Element | None:
    if element.tag in ("title", "style"):
        # data-theme marks the project's own theme stylesheet (model.page.theming).
        kept = (
            {"data-theme": element.attrib["data-theme"]} if "data-theme" in element.attrib else {}
        )
        copy = ET.Element(element.tag, kept if element.tag == "style" else {})
        copy.text = element.text
        return copy
    if element.tag == "meta" and element.get("charset"):
        return _meta(charset=element.get("charset", "utf-8"))
    if element.tag == "meta" and element.get("name", "").lower() in _HEAD_KEPT_META_NAMES:
        return _meta(name=element.get("name", ""), content=element.get("content", ""))
    return None


def _shape(markup: str) -> Counter[tuple[str, str]]:
    """What a fragment holds: each (element, attribute) pair and each element, counted.
    ``rel`` is left out: nh3 adds ``rel="noopener noreferrer"`` to links."""
    fragment = html5lib.parseFragment(markup, treebuilder="etree", namespaceHTMLElements=False)
    shape: Counter[tuple[str, str]] = Counter()
    for element in fragment.iter():
        if not isinstance(element.tag, str):
            continue
        shape[(element.tag, "")] += 1
        for name in element.attrib:
            if name != "rel":
                shape[(element.tag, name)] += 1
    return shape


def _root_attributes(element: ET.Element) -> dict[str, str]:
    return {k: v for k, v in element.attrib.items() if k in _ROOT_ATTRIBUTES}


def _strict(document: ET.Element) -> tuple[str, bool]:
    html = document.find("html")
    assert html is not None
    head = _child(document, "head")
    body = _child(document, "body")
    kept, removed = _kept_head(head)
    before = _inner_html(body)
    cleaned = _sanitize_fragment(before)
    removed = removed or _shape(cleaned) != _shape(before)
    html_attributes = _root_attributes(html)
    body_attributes = _root_attributes(body)
    removed = removed or len(html_attributes) < len(html.attrib)
    removed = removed or len(body_attributes) < len(body.attrib)
    new_head = ET.Element("head")
    new_head.extend([*_safety_metas(STRICT_CSP), *kept])
    new_html = ET.Element("html", html_attributes)
    new_html.extend([new_head, ET.Element("body", body_attributes)])
    # The sanitized body is markup already: it is spliced in before the closing tags rather
    # than parsed into the tree again.
    markup = _serialize(new_html)
    closing = "</body></html>"
    assert markup.endswith(closing)
    return f"<!DOCTYPE html>{markup[: -len(closing)]}{cleaned}{closing}", removed
