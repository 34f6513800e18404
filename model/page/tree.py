"""Stage 6 of the page pipeline: edits on the parsed tree.

Trees that markup cannot express are normalized (comments with ``--``, invalid attribute
names, ``<plaintext>``, forms inside tables, table parts inside SVG), and the head is
completed: a first ``<meta charset="utf-8">``, a viewport meta and a ``<title>`` (from the
prompt when the model gave none). :func:`visible_words` counts what a reader would see.
"""

from __future__ import annotations

import re
from xml.etree import ElementTree
from xml.etree.ElementTree import Element

from model.page.parse import INSERTION_MODES
from model.page.text import scrub

_ATTR_NAME_RE = re.compile(r"[^\s\"'<>/=\x00-\x1f\x7f]+")
_VIEWPORT = "width=device-width, initial-scale=1"
_DEFAULT_TITLE = "Generated page"
_TITLE_MAX = 70


def title_from_prompt(prompt: str) -> str:
    """A page title made from the user's prompt: one line, capitalised, at most ~70 chars."""
    title = " ".join(scrub(prompt).split())
    if not title:
        return _DEFAULT_TITLE
    if len(title) > _TITLE_MAX:
        cut = title[:_TITLE_MAX].rsplit(" ", 1)[0] or title[:_TITLE_MAX]
        title = cut.rstrip(" ,.;:") + "…"
    return title[0].upper() + title[1:]


def split_tag(tag: str) -> tuple[str | None, str]:
    """``(namespace, local name)`` of an ElementTree tag or attribute name: ``{ns}name``.

    A model can write an attribute named ``{x``: html5lib keeps it as is, so a leading brace
    without a closing one is a plain name, not a namespace."""
    if tag.startswith("{") and "}" in tag:
        ns, name = tag[1:].split("}", 1)
        return ns, name
    return None, tag


def remove(parents: dict[Element, Element], el: Element) -> None:
    """Remove ``el`` from the tree, keeping the text that followed it."""
    _remove_child(parents[el], el)


def _unwrap(parent: Element, el: Element) -> None:
    """Replace ``el`` by its content (text and children) in ``parent``."""
    index = list(parent).index(el)
    children = list(el)
    _append_text(parent, index - 1, el.text or "")
    parent.remove(el)
    for offset, child in enumerate(children):
        parent.insert(index + offset, child)
    _append_text(parent, index + len(children) - 1, el.tail or "")


def _append_text(parent: Element, index: int, text: str) -> None:
    """Add ``text`` after child ``index`` of ``parent`` (-1: at the start)."""
    if not text:
        return
    if index < 0:
        parent.text = (parent.text or "") + text
    else:
        parent[index].tail = (parent[index].tail or "") + text


def _remove_child(parent: Element, el: Element) -> None:
    index = list(parent).index(el)
    prev = parent[index - 1] if index > 0 else None
    before = (prev.tail if prev is not None else parent.text) or ""
    # A whitespace-only tail is dropped where whitespace (or nothing) precedes it already.
    if el.tail and (el.tail.strip() or (before and not before[-1].isspace())):
        if prev is not None:
            prev.tail = before + el.tail
        else:
            parent.text = before + el.tail
    parent.remove(el)


_TABLE_PARTS = frozenset({"table", "tbody", "thead", "tfoot", "tr"})


def sanitize_tree(root: Element, scrub_text: bool) -> None:
    """Make the tree serializable without parse errors on re-parsing."""
    # <table><form> leaves an empty form inside the table, which no markup can express.
    stray_forms = [
        (parent, child)
        for parent in root.iter()
        if parent.tag in _TABLE_PARTS
        for child in parent
        if child.tag == "form"
    ]
    for parent, form in stray_forms:
        _remove_child(parent, form)
    # Table parts inside <svg>/<math> mean nothing there, and html5lib's reset of the
    # insertion mode asserts on them when the page is parsed again: keep just their content.
    misplaced = [
        (parent, child)
        for parent in root.iter()
        for child in parent
        if isinstance(child.tag, str)
        and child.tag.startswith("{")
        and split_tag(child.tag)[1] in INSERTION_MODES
    ]
    for parent, child in reversed(misplaced):
        _unwrap(parent, child)
    for el in root.iter():
        if el.tag is ElementTree.Comment:
            data = scrub(el.text or "")
            while "--" in data:
                data = data.replace("--", "- -")
            if data.startswith(">") or data.startswith("->"):
                data = " " + data
            if data.endswith("-") or data.endswith("<!"):
                data += " "
            el.text = data.replace("<!-", "<! -")
        else:
            if el.tag == "plaintext":  # swallows the rest of any page it is written into
                el.tag = "pre"
            for key in list(el.attrib):
                if not _ATTR_NAME_RE.fullmatch(split_tag(key)[1]):
                    del el.attrib[key]
                elif scrub_text:
                    el.attrib[key] = scrub(el.attrib[key])
            if scrub_text and el.text:
                el.text = scrub(el.text)
        if scrub_text and el.tail:
            el.tail = scrub(el.tail)


def complete_head(root: Element, prompt: str) -> str:
    """Ensure charset, viewport and title (routine additions, not repairs); return the title."""
    head = root.find("head")
    if head is None:  # html5lib always creates one; be safe anyway
        head = Element("head")
        root.insert(0, head)
    parents = {child: parent for parent in root.iter() for child in parent}

    for meta in [m for m in root.iter("meta")]:
        charset = meta.get("charset")
        equiv = (meta.get("http-equiv") or "").lower()
        if charset is not None or equiv == "content-type":
            remove(parents, meta)
    head.insert(0, Element("meta", {"charset": "utf-8"}))

    viewports = [m for m in root.iter("meta") if (m.get("name") or "").lower() == "viewport"]
    if not viewports:
        head.insert(1, Element("meta", {"name": "viewport", "content": _VIEWPORT}))

    title_el = next(iter(root.iter("title")), None)
    title = " ".join((title_el.text or "").split()) if title_el is not None else ""
    if title_el is None:
        title_el = Element("title")
        head.insert(2, title_el)
    elif parents.get(title_el) is not head:
        remove(parents, title_el)
        title_el.tail = None
        head.insert(2, title_el)
    if not title:
        title = title_from_prompt(prompt)
        title_el.text = title
    return title


_HIDDEN_TAGS = frozenset({"script", "style", "template"})


def visible_words(root: Element) -> int:
    """Words of text in ``<body>`` outside script, style, template and comments.

    Iterative (degenerate pages nest deeply); an element's tail is text of its parent, so it
    counts even when the element itself is hidden.
    """
    body = root.find("body")
    if body is None:
        return 0
    words = len((body.text or "").split())
    stack = list(body)
    while stack:
        el = stack.pop()
        words += len((el.tail or "").split())
        if el.tag is ElementTree.Comment:
            continue
        if isinstance(el.tag, str) and split_tag(el.tag)[1].lower() in _HIDDEN_TAGS:
            continue
        words += len((el.text or "").split())
        stack.extend(el)
    return words
