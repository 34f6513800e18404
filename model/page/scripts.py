"""The best-effort script stripping of ``strip_scripts=True``.

``<script>`` elements, ``on*`` attributes, ``javascript:``/``vbscript:`` URLs, ``srcdoc``,
HTML/SVG ``data:`` documents in frames and SVG animations of handlers are removed
(``scripts_removed``): a cleaner for the common cases, not a sanitizer (the SAFETY policy's
sanitizer lives in ``model.page.safety``). By default scripts stay, since pages use JS.
"""

from __future__ import annotations

import re
from xml.etree.ElementTree import Element

from model.page.tree import remove, split_tag

_ANIMATION_TAGS = frozenset({"set", "animate"})
_EMBEDDING_TAGS = frozenset({"iframe", "frame", "object", "embed"})


def _is_active_data_url(value: str) -> bool:
    """A ``data:`` document that would run its own scripts inside an iframe or object."""
    squashed = re.sub(r"[\x00-\x20]", "", value).lower()
    return squashed.startswith(("data:text/html", "data:application/xhtml", "data:image/svg"))


def _is_dangerous_url(value: str) -> bool:
    # Browsers ignore ASCII whitespace and controls inside a URL scheme ("java\tscript:").
    squashed = re.sub(r"[\x00-\x20]", "", value).lower()
    return squashed.startswith(("javascript:", "vbscript:"))


def remove_scripts(root: Element) -> bool:
    parents = {child: parent for parent in root.iter() for child in parent}
    removed = False
    for el in list(root.iter()):
        if not isinstance(el.tag, str):
            continue
        tag = split_tag(el.tag)[1].lower()
        # SVG <set>/<animate> can write an event handler or a javascript: link at run time.
        animated = (el.get("attributeName") or el.get("attributename") or "").lower()
        if tag == "script" or (
            tag in _ANIMATION_TAGS and (animated.startswith("on") or animated.endswith("href"))
        ):
            remove(parents, el)
            removed = True
            continue
        for key in list(el.attrib):
            name = split_tag(key)[1].lower()
            value = el.attrib[key]
            if (
                name.startswith("on")
                or name == "srcdoc"
                or _is_dangerous_url(value)
                or (tag in _EMBEDDING_TAGS and _is_active_data_url(value))
            ):
                del el.attrib[key]
                removed = True
    return removed
