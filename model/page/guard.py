"""Stage 4 of the page pipeline: size and shape, before html5lib sees the markup.

The source is cut to ``max_bytes`` at a tag boundary (``oversize``), and where thousands of
elements are left open or one tag has thousands of attributes (``degenerate``): html5lib is
quadratic in both, browsers cap the depth too.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from html5lib.constants import voidElements

log = logging.getLogger(__name__)

# html5lib walks its stack of open elements for most tags, so parsing costs about the sum of
# the nesting depth over all tags: fine for real pages (depth ~20), minutes for a degenerate
# megabyte of never-closed elements (browsers cap the tree depth at 512 too). Its check for
# duplicate attributes is quadratic in the attributes of one tag.
_MAX_DEPTH = 512
_MAX_COST = 3_000_000  # ≈ 1-2 s of extra parsing at worst
_MAX_ATTRS = 256
_LONG_TAG = 2048  # only tags longer than this have their attributes counted
_SCAN_TAG_RE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:-]*)")
_QUOTED_RE = re.compile(r"\"[^\"]*\"|'[^']*'")
_ATTR_TOKEN_RE = re.compile(r"[^\s=/]+")
_RAW_TEXT_TAGS = frozenset(
    {"script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes"}
)
_NO_DEPTH_TAGS = frozenset(voidElements) | frozenset(
    {"html", "head", "body", "p", "li", "dt", "dd", "option", "optgroup", "tr", "td", "th"}
    | {"thead", "tbody", "tfoot", "colgroup", "caption", "rb", "rt", "rp", "rtc"}
)
_RAW_END_RE: dict[str, re.Pattern[str]] = {}


@dataclass(frozen=True)
class Guarded:
    source: str
    degenerate: bool  # cut where the markup became degenerate
    cut_tag: bool  # a long tag that never ends (the parser would drop it) was cut off


def guard_markup(source: str) -> Guarded:
    """Cut the source where parsing it would go quadratic (see above). Linear time."""
    depth = cost = pos = 0
    while (match := _SCAN_TAG_RE.search(source, pos)) is not None:
        start = match.start()
        gt = source.find(">", match.end())
        if gt == -1:  # this tag runs to the end: html5lib drops it, slowly if it is long
            if len(source) - start > _LONG_TAG:
                return Guarded(source[:start], degenerate=False, cut_tag=True)
            break
        if gt - start > _LONG_TAG:
            inside = _QUOTED_RE.sub("", source[match.end() : gt])
            if len(_ATTR_TOKEN_RE.findall(inside)) > _MAX_ATTRS:
                log.debug("degenerate markup: a tag with too many attributes at %d", start)
                return Guarded(source[:start], degenerate=True, cut_tag=False)
        closing, name = match.group(1), match.group(2).lower()
        if name not in _NO_DEPTH_TAGS and source[gt - 1] != "/":
            depth = max(0, depth - 1) if closing else depth + 1
        cost += depth
        if depth > _MAX_DEPTH or cost > _MAX_COST:
            log.debug("degenerate markup: depth %d, cost %d at %d", depth, cost, start)
            return Guarded(source[:start], degenerate=True, cut_tag=False)
        pos = gt + 1
        if not closing and name in _RAW_TEXT_TAGS:
            end_re = _RAW_END_RE.setdefault(name, re.compile(rf"</{name}", re.IGNORECASE))
            end = end_re.search(source, pos)
            pos = end.start() if end else len(source)
    return Guarded(source, degenerate=False, cut_tag=False)


def cut_to_bytes(source: str, budget: int) -> tuple[str, bool]:
    data = source.encode("utf-8")
    if len(data) <= budget:
        return source, False
    cut = data[:budget].decode("utf-8", errors="ignore")
    gt = cut.rfind(">", max(0, len(cut) - 4096))
    return (cut[: gt + 1] if gt != -1 else cut), True
