"""Turn whatever a code model said into one safe, complete, well-formed HTML page.

The pipeline of :func:`build_page`, in order:

1. **Text** – bytes are decoded as UTF-8 with replacement; BOMs (U+FEFF) are dropped; CRLF/CR
   become LF; NUL, the other C0 controls except tab/newline, DEL, the C1 controls and Unicode
   noncharacters are removed and lone surrogates replaced (``invalid_text``). Everything the
   HTML parser would call an "invalid codepoint" is gone here, so the output is valid UTF-8.
2. **Repetition** – a degenerate repeated tail (the same line or block again and again until
   the token limit) is cut to its first occurrence (``repetition``), *before* parsing, so a
   megabyte of loop costs milliseconds.
3. **Extraction** – the page is taken out of markdown: ```` ``` ````/``~~~`` fences with or
   without a language, nested, unclosed or glued to a line, several of them (the one holding
   the document wins; a document split over consecutive fences is joined; ``css``/``js`` fences
   are inlined as ``<style>``/``<script>``), or raw HTML in prose (from ``<!DOCTYPE``/``<html>``
   to the last ``</html>``, or the lines that start with tags). Prose with no HTML at all is
   wrapped into a simple page (``not_html``).
4. **Size and shape** – the source is cut to ``max_bytes`` at a tag boundary (``oversize``),
   and where thousands of elements are left open or one tag has thousands of attributes
   (``degenerate``): html5lib is quadratic in both, browsers cap the depth too.
5. **Parsing** – with **html5lib**. It is pure Python and implements the WHATWG HTML parsing
   algorithm, the one browsers use, so "close what was left open" follows exactly the rules a
   browser applies: a tag cut at end-of-file (mid-name or mid-attribute) is dropped rather than
   leaked, misnested and unclosed elements are fixed up the standard way, and its parse-error
   codes tell us *that* the model's output was cut mid-tag (``truncated``). lxml or
   BeautifulSoup's default parser follow libxml2's own recovery rules instead, and regexes
   cannot do this at all. The source is parsed in standards mode with scripting on, as a
   browser will read the page we write (with our ``<!DOCTYPE html>``). Two small adaptations:
   runs of character tokens are merged (the etree builder's ``+=`` is quadratic otherwise),
   and two asserts that SVG elements named like table parts trip are left out.
6. **Completion** – on the tree: ``<!DOCTYPE html>``, html/head/body (the parser creates
   them), a first ``<meta charset="utf-8">``, a viewport meta and a ``<title>`` (from the
   prompt when the model gave none) are ensured (``repaired``). With ``strip_scripts=True``
   ``<script>`` elements, ``on*`` attributes, ``javascript:``/``vbscript:`` URLs, ``srcdoc``,
   HTML/SVG ``data:`` documents in frames and SVG animations of handlers are removed
   (``scripts_removed``): a best-effort cleaner for the common cases, not a sanitizer. By
   default scripts stay, since pages use JS.
7. **Serialization** – html5lib's ``HTMLSerializer`` (all the escaping rules) fed by a small
   iterative tree walker of our own (html5lib's etree walker is quadratic in the number of
   siblings, and recursion would fail on degenerate nesting). Trees that markup cannot express
   are normalized first (comments with ``--``, invalid attribute names, ``<plaintext>``, forms
   inside tables, table parts inside SVG), and pages up to 300k characters are re-parsed until
   they come back without a single parse error.
"""

from __future__ import annotations

import html as html_lib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from xml.etree import ElementTree

import html5lib
from html5lib._tokenizer import HTMLTokenizer
from html5lib.constants import namespaces, rcdataElements, tokenTypes, voidElements
from html5lib.serializer import HTMLSerializer
from html5lib.treewalkers.base import TreeWalker

from model.errors import HtmlExtractionError

log = logging.getLogger(__name__)

__all__ = [
    "HtmlPage",
    "PageWarning",
    "build_page",
    "detect_repetition",
    "extract_html",
    "summarize_pages",
    "title_from_prompt",
]


class PageWarning(StrEnum):
    """Something :func:`build_page` noticed or changed; listed in this order on a page."""

    TRUNCATED = "truncated"  # generation hit max tokens, or the output was cut mid-tag
    REPETITION = "repetition"  # a degenerate repeated tail was removed
    NOT_HTML = "not_html"  # the model answered with prose only; it was wrapped into a page
    REPAIRED = "repaired"  # doctype/html/head/body/charset/viewport/title added or elements closed
    SCRIPTS_REMOVED = "scripts_removed"  # only with strip_scripts=True
    OVERSIZE = "oversize"  # the source was cut to max_bytes
    INVALID_TEXT = "invalid_text"  # NUL, control chars or invalid UTF-8 were removed/replaced
    DEGENERATE = "degenerate"  # thousands of unclosed elements or attributes in a tag; cut there


_WARNING_ORDER = {w: i for i, w in enumerate(PageWarning)}


@dataclass(frozen=True)
class HtmlPage:
    """A finished page.

    ``html`` is a complete, well-formed document; ``title`` is its title as plain text (the
    HTML holds it escaped); ``complete`` tells whether the model's own output already was a
    full ``<html>…</html>`` document before any repair.
    """

    html: str
    title: str
    warnings: tuple[PageWarning, ...]
    complete: bool

    @property
    def data(self) -> bytes:
        """The page as UTF-8 bytes, ready to attach as a file."""
        return self.html.encode("utf-8")


# --------------------------------------------------------------------------------------------
# 1. Text hygiene

# Everything html5lib's input stream reports as "invalid-codepoint", plus NUL and form feed.
_NONCHARS = "".join(chr(p * 0x10000 + 0xFFFE) + chr(p * 0x10000 + 0xFFFF) for p in range(17))
_INVALID_CHARS_RE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufdd0-\ufdef" + _NONCHARS + "]"
)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _clean_text(raw: str | bytes) -> tuple[str, bool]:
    """Decode and scrub the model's output; return the text and whether anything was invalid."""
    invalid = False
    if isinstance(raw, bytes | bytearray | memoryview):
        data = bytes(raw)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="replace")
            invalid = True
    else:
        text = raw
    # A BOM (U+FEFF) is noise wherever a model or a concatenation put it; not worth a warning.
    text = text.replace("\ufeff", "")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, removed = _INVALID_CHARS_RE.subn("", text)
    text, replaced = _SURROGATE_RE.subn("\ufffd", text)
    return text, invalid or bool(removed or replaced)


def _scrub(value: str) -> str:
    """Remove invalid characters from a string found in the tree (e.g. from ``&#1;``)."""
    return _SURROGATE_RE.sub("\ufffd", _INVALID_CHARS_RE.sub("", value))


# --------------------------------------------------------------------------------------------
# 2. Repetition

_REP_MAX_PERIOD = 8192  # longest repeated unit looked for, in characters
_REP_MIN_REPEATS = 3  # the unit must occur at least this often (partial last copy counts pro rata)
_REP_MIN_CHARS = 200  # and the repeated region must be at least this long
_CLOSING_TAGS_ONLY_RE = re.compile(r"\s*(?:</[A-Za-z][^<>]*>\s*)*")


def _periodic_start(text: str, n: int, q: int) -> int:
    """Smallest ``a`` such that ``text[a:n]`` has period ``q`` (``text[n-3q:n]`` already has)."""

    def periodic(length: int) -> bool:
        return text[n - length : n - q] == text[n - length + q : n]

    good = 3 * q
    bad = 0
    step = good
    while bad == 0:
        trial = min(n, good + step)
        if periodic(trial):
            good = trial
            if trial == n:
                return 0
            step *= 2
        else:
            bad = trial
    while bad - good > 1:
        mid = (good + bad) // 2
        if periodic(mid):
            good = mid
        else:
            bad = mid
    return n - good


def detect_repetition(text: str) -> tuple[str, bool]:
    """Cut a degenerate repeated tail down to its first occurrence.

    A model stuck in a loop writes the same line or block until it hits the token limit, and
    is often cut inside the last copy. The tail (trailing whitespace ignored) is looked at as
    characters: if it has a period ``q`` (1…8192 characters) over at least 3 periods and 200
    characters, everything after the first copy is removed (completed to the end of its line
    or tag, so no half line remains). Units made only of whitespace or closing tags are never
    cut (``</div></div></div>`` ends a page, it is not a loop). Repetition in the middle of a
    page that later ends properly is left alone: a 10×10 game board is not a fault.

    Returns the text (unchanged if nothing was found) and whether a repeated tail was removed.
    Runs in milliseconds on a megabyte.
    """
    body = text.rstrip()
    n = len(body)
    last = n - 1
    for q in range(1, min(_REP_MAX_PERIOD, n // _REP_MIN_REPEATS) + 1):
        # Cheap single-character checks before comparing whole slices.
        if body[last] != body[last - q] or body[last] != body[last - 2 * q]:
            continue
        unit = body[n - q :]
        if unit != body[n - 2 * q : n - q] or unit != body[n - 3 * q : n - 2 * q]:
            continue
        if not unit.strip() or _CLOSING_TAGS_ONLY_RE.fullmatch(unit):
            continue
        start = _periodic_start(body, n, q)
        region = n - start
        if region < _REP_MIN_CHARS or region < _REP_MIN_REPEATS * q:
            continue
        keep = start + q
        # End the kept copy at a line (or tag) boundary inside the repeated region.
        for boundary in ("\n", ">"):
            if boundary in unit:
                keep = body.index(boundary, keep - 1) + 1
                break
        log.debug("repetition: period %d chars, %d chars removed", q, n - keep)
        return body[:keep], True
    return text, False


# --------------------------------------------------------------------------------------------
# 3. Extraction

_HTML_TAGS = [
    "a",
    "abbr",
    "address",
    "area",
    "article",
    "aside",
    "audio",
    "b",
    "base",
    "bdi",
    "bdo",
    "blockquote",
    "body",
    "br",
    "button",
    "canvas",
    "caption",
    "center",
    "cite",
    "code",
    "col",
    "colgroup",
    "data",
    "datalist",
    "dd",
    "del",
    "details",
    "dfn",
    "dialog",
    "div",
    "dl",
    "dt",
    "em",
    "embed",
    "fieldset",
    "figcaption",
    "figure",
    "font",
    "footer",
    "form",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "head",
    "header",
    "hgroup",
    "hr",
    "html",
    "i",
    "iframe",
    "img",
    "input",
    "ins",
    "kbd",
    "label",
    "legend",
    "li",
    "link",
    "main",
    "map",
    "mark",
    "marquee",
    "math",
    "menu",
    "meta",
    "meter",
    "nav",
    "noscript",
    "object",
    "ol",
    "optgroup",
    "option",
    "output",
    "p",
    "picture",
    "pre",
    "progress",
    "q",
    "rp",
    "rt",
    "ruby",
    "s",
    "samp",
    "script",
    "section",
    "select",
    "slot",
    "small",
    "source",
    "span",
    "strong",
    "style",
    "sub",
    "summary",
    "sup",
    "svg",
    "table",
    "tbody",
    "td",
    "template",
    "textarea",
    "tfoot",
    "th",
    "thead",
    "time",
    "title",
    "tr",
    "track",
    "u",
    "ul",
    "var",
    "video",
    "wbr",
]
_TAG_ALT = "|".join(sorted(_HTML_TAGS, key=len, reverse=True))
_KNOWN_TAG_RE = re.compile(rf"</?(?:{_TAG_ALT})(?=[\s/>])", re.IGNORECASE)
_TAG_LINE_RE = re.compile(rf"^[ \t]*<(?:!--|/?(?:{_TAG_ALT})(?=[\s/>]|$))", re.IGNORECASE)
_DOC_START_RE = re.compile(r"<!doctype\s+html|<html(?=[\s>])", re.IGNORECASE)
_DOCTYPE_RE = re.compile(r"<!doctype\s+html", re.IGNORECASE)
_HTML_OPEN_RE = re.compile(r"<html(?=[\s>])", re.IGNORECASE)
_HTML_CLOSE_RE = re.compile(r"</html\s*>", re.IGNORECASE)

_FENCE_OPEN_RE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
_FENCE_CLOSE_RE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*$")
_FENCE_LINE_RE = re.compile(r"^[ \t]*(?:`{3,}|~{3,})[^`\n]*$", re.MULTILINE)

_HTML_LANGS = {"html", "htm", "html5", "xhtml", "markup", "htmldjango", "jinja", "jinja2"}
_MAYBE_HTML_LANGS = {"xml", "svg", "vue", "php", "handlebars", "hbs", "erb", "markdown", "md"}
_CSS_LANGS = {"css", "scss", "less"}
_JS_LANGS = {"js", "javascript", "mjs", "ecmascript"}
_CSS_RE = re.compile(r"[^{}<>;]+\{[^{}<>]*:[^{}<>]*\}")
_FENCE_DEPTH = 3  # how deep fences inside fences are followed


@dataclass(frozen=True)
class _Fence:
    lang: str
    content: str
    start: int  # offset of the opening line in the text it was found in
    end: int  # offset just past the closing line (or the end of the text)

    @property
    def kind(self) -> str:
        return _classify(self.lang, self.content)


def _split_info(info: str) -> tuple[str, str]:
    """Language of a fence's info string, and content glued onto the opening line."""
    glued = ""
    lt = info.find("<")
    if lt != -1:
        info, glued = info[:lt], info[lt:]
    words = info.strip().split()
    word = words[0].strip("{}.").lower() if words else ""
    if "." in word:  # ```index.html
        word = word.rsplit(".", 1)[1]
    match = re.match(r"[a-z0-9+#-]*", word)
    return (match.group(0) if match else ""), glued


def _find_fences(text: str) -> list[_Fence]:
    """Markdown code fences, CommonMark-like but lenient: any indentation, unclosed blocks run
    to the end, content may be glued to the opening or closing fence line."""
    lines = text.split("\n")
    starts: list[int] = []
    pos = 0
    for line in lines:
        starts.append(pos)
        pos += len(line) + 1
    fences: list[_Fence] = []
    i = 0
    while i < len(lines):
        opening = _FENCE_OPEN_RE.match(lines[i])
        if not opening:
            i += 1
            continue
        marker = opening["fence"]
        lang, glued = _split_info(opening["info"])
        body = [glued] if glued else []
        j = i + 1
        closed = False
        while j < len(lines):
            line = lines[j]
            closing = _FENCE_CLOSE_RE.match(line)
            if (
                closing
                and closing["fence"][0] == marker[0]
                and len(closing["fence"]) >= len(marker)
            ):
                closed = True
                break
            stripped = line.rstrip()
            if marker[0] == "`" and stripped.endswith(marker):
                rest = stripped.rstrip("`")
                if rest.strip() and len(stripped) - len(rest) >= len(marker):  # "</html>```"
                    body.append(rest)
                    closed = True
                    break
            body.append(line)
            j += 1
        end = min(len(text), starts[j] + len(lines[j]) + 1) if closed else len(text)
        fences.append(_Fence(lang, "\n".join(body), starts[i], end))
        i = j + 1
    return fences


def _strip_marker_lines(content: str) -> str:
    """Drop stray fence-marker lines at the start or end of a block (double-opened fences)."""
    lines = content.split("\n")
    while lines and (not lines[0].strip() or _FENCE_LINE_RE.fullmatch(lines[0])):
        lines.pop(0)
    while lines and (not lines[-1].strip() or _FENCE_LINE_RE.fullmatch(lines[-1])):
        lines.pop()
    return "\n".join(lines)


def _looks_like_html(content: str) -> bool:
    stripped = content.lstrip()
    if _DOC_START_RE.search(content):
        return True
    return stripped.startswith("<") and _KNOWN_TAG_RE.search(content) is not None


def _looks_like_css(content: str) -> bool:
    head = content[:2000]
    return "<" not in head and _CSS_RE.match(head.lstrip()) is not None


def _classify(lang: str, content: str) -> str:
    """``html``, ``css``, ``js`` or ``other``."""
    if not content.strip():
        return "other"
    if lang in _HTML_LANGS:
        return "html"
    if lang in _CSS_LANGS:
        return "css"
    if lang in _JS_LANGS:
        return "html" if _DOC_START_RE.search(content) else "js"
    if not lang:
        if _looks_like_html(content):
            return "html"
        return "css" if _looks_like_css(content) else "other"
    if lang in _MAYBE_HTML_LANGS:
        return "html" if _looks_like_html(content) else "other"
    return "html" if _DOC_START_RE.search(content) else "other"


def _collect_blocks(text: str, depth: int = 0) -> list[_Fence]:
    """Top-level fences, with fences nested inside a fence replacing it when they hold code."""
    blocks: list[_Fence] = []
    for fence in _find_fences(text):
        if depth < _FENCE_DEPTH and _FENCE_LINE_RE.search(fence.content):
            inner = _collect_blocks(fence.content, depth + 1)
            if any(b.kind != "other" for b in inner):
                blocks.extend(inner)
                continue
            fence = _Fence(fence.lang, _strip_marker_lines(fence.content), fence.start, fence.end)
        blocks.append(fence)
    return blocks


def _best_document(source: str) -> str:
    """Of several documents written one after another, the finished (then longest, then last)."""
    starts = [m.start() for m in _DOCTYPE_RE.finditer(source)]
    if len(starts) < 2:
        return source
    docs = [source[a:b] for a, b in zip(starts, [*starts[1:], len(source)], strict=True)]

    def score(i: int) -> tuple[bool, int, int]:
        return bool(_HTML_CLOSE_RE.search(docs[i])), len(docs[i]), i

    return docs[max(range(len(docs)), key=score)]


def _trim_document(source: str) -> str:
    """Cut prose before ``<!DOCTYPE``/``<html>`` and after the last ``</html>``; keep markup."""
    source = _best_document(source)
    start = _DOC_START_RE.search(source)
    if start:
        prefix = source[: start.start()].strip()
        if not (prefix.startswith("<") and prefix.endswith(">")):
            source = source[start.start() :]
    ends = list(_HTML_CLOSE_RE.finditer(source))
    if ends:
        suffix = source[ends[-1].end() :].strip()
        if not suffix.startswith("<"):
            source = source[: ends[-1].end()]
    return source.strip("\n")


def _raw_html(text: str, fences: Sequence[_Fence]) -> str:
    """HTML written straight into the answer, without fences; ``""`` if there is none."""
    doc = _DOC_START_RE.search(text)
    if doc:  # a whole document: fences after its start are its content (a <pre> of markdown)
        return _trim_document(text[doc.start() :])
    outside = text
    for fence in reversed(fences):
        outside = outside[: fence.start] + "\n" + outside[fence.end :]
    lines = outside.split("\n")
    tag_lines = [i for i, line in enumerate(lines) if _TAG_LINE_RE.match(line)]
    if not tag_lines:
        return ""
    first = tag_lines[0]
    last = max(
        [tag_lines[-1]] + [i for i in range(first, len(lines)) if lines[i].rstrip().endswith(">")]
    )
    return "\n".join(lines[first : last + 1]).strip("\n")


def _escape_raw_text(content: str, tag: str) -> str:
    """Keep an inlined stylesheet/script from closing its element early."""
    return re.sub(rf"</(?={tag})", r"<\\/", content, flags=re.IGNORECASE)


def _inline_assets(page: str, css: list[str], js: list[str]) -> str:
    """Put separate css/js fences into the page, where a browser would have loaded them."""
    css = [c for c in css if c.strip() not in page]
    js = [j for j in js if j.strip() not in page]
    if css:
        style = "<style>\n" + "\n".join(_escape_raw_text(c, "style") for c in css) + "\n</style>\n"
        head_end = re.search(r"</head\s*>", page, re.IGNORECASE)
        body_start = re.search(r"<body(?=[\s>])", page, re.IGNORECASE)
        html_start = re.search(r"<html(?=[\s>])[^>]*>", page, re.IGNORECASE)
        if head_end:
            page = page[: head_end.start()] + style + page[head_end.start() :]
        elif body_start:
            page = page[: body_start.start()] + style + page[body_start.start() :]
        elif html_start:
            page = page[: html_start.end()] + style + page[html_start.end() :]
        else:
            page = style + page
    if js:
        script = (
            "<script>\n" + "\n".join(_escape_raw_text(j, "script") for j in js) + "\n</script>\n"
        )
        ends = list(re.finditer(r"</body\s*>|</html\s*>", page, re.IGNORECASE))
        if ends:
            at = ends[0].start()
            page = page[:at] + script + page[at:]
        else:
            page = page + "\n" + script
    return page


@dataclass(frozen=True)
class _Extraction:
    html: str  # "" when the answer holds no HTML
    blocks: tuple[_Fence, ...]  # the top-level fences, for the prose fallback


def _extract(text: str) -> _Extraction:
    blocks = _collect_blocks(text)
    top = tuple(_find_fences(text))
    html_blocks = [b for b in blocks if b.kind == "html"]
    css = [b.content for b in blocks if b.kind == "css"]
    js = [b.content for b in blocks if b.kind == "js"]
    # A fenced snippet does not beat a whole document written without fences.
    fenced_doc = any(_DOC_START_RE.search(b.content) for b in html_blocks)
    if html_blocks and (fenced_doc or not _DOC_START_RE.search(text)):

        def score(i: int) -> tuple[bool, bool, int, int]:
            content = html_blocks[i].content
            return (
                bool(_DOC_START_RE.search(content)),
                bool(_HTML_CLOSE_RE.search(content)),
                len(content),
                i,  # on a tie the later, usually revised, version
            )

        best = max(range(len(html_blocks)), key=score)
        page = html_blocks[best].content
        # A document split over consecutive fences: append fragments until </html>.
        if _DOC_START_RE.search(page) and not _HTML_CLOSE_RE.search(page):
            for later in html_blocks[best + 1 :]:
                if _DOC_START_RE.search(later.content):
                    break
                page += "\n" + later.content
                if _HTML_CLOSE_RE.search(later.content):
                    break
        page = _trim_document(page)
    else:
        page = _raw_html(text, top)
    if not page.strip():
        return _Extraction("", top)
    return _Extraction(_inline_assets(page, css, js), top)


def extract_html(text: str) -> str:
    """The page part of what the model said, or ``""`` when it holds no HTML at all.

    Handles fenced blocks (with or without language, nested, unclosed, several: the one holding
    the document wins, css/js blocks are inlined) and raw HTML in prose. The result is the
    model's own markup, not yet completed or parsed.
    """
    return _extract(text.replace("\r\n", "\n").replace("\r", "\n")).html


# --------------------------------------------------------------------------------------------
# 4. Size and nesting

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
class _Guarded:
    source: str
    degenerate: bool  # cut where the markup became degenerate
    cut_tag: bool  # a long tag that never ends (the parser would drop it) was cut off


def _guard_markup(source: str) -> _Guarded:
    """Cut the source where parsing it would go quadratic (see above). Linear time."""
    depth = cost = pos = 0
    while (match := _SCAN_TAG_RE.search(source, pos)) is not None:
        start = match.start()
        gt = source.find(">", match.end())
        if gt == -1:  # this tag runs to the end: html5lib drops it, slowly if it is long
            if len(source) - start > _LONG_TAG:
                return _Guarded(source[:start], degenerate=False, cut_tag=True)
            break
        if gt - start > _LONG_TAG:
            inside = _QUOTED_RE.sub("", source[match.end() : gt])
            if len(_ATTR_TOKEN_RE.findall(inside)) > _MAX_ATTRS:
                log.debug("degenerate markup: a tag with too many attributes at %d", start)
                return _Guarded(source[:start], degenerate=True, cut_tag=False)
        closing, name = match.group(1), match.group(2).lower()
        if name not in _NO_DEPTH_TAGS and source[gt - 1] != "/":
            depth = max(0, depth - 1) if closing else depth + 1
        cost += depth
        if depth > _MAX_DEPTH or cost > _MAX_COST:
            log.debug("degenerate markup: depth %d, cost %d at %d", depth, cost, start)
            return _Guarded(source[:start], degenerate=True, cut_tag=False)
        pos = gt + 1
        if not closing and name in _RAW_TEXT_TAGS:
            end_re = _RAW_END_RE.setdefault(name, re.compile(rf"</{name}", re.IGNORECASE))
            end = end_re.search(source, pos)
            pos = end.start() if end else len(source)
    return _Guarded(source, degenerate=False, cut_tag=False)


def _cut_to_bytes(source: str, budget: int) -> tuple[str, bool]:
    data = source.encode("utf-8")
    if len(data) <= budget:
        return source, False
    cut = data[:budget].decode("utf-8", errors="ignore")
    gt = cut.rfind(">", max(0, len(cut) - 4096))
    return (cut[: gt + 1] if gt != -1 else cut), True


# --------------------------------------------------------------------------------------------
# Prose fallback

_PROSE_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:42rem;margin:2rem auto;padding:0 1rem;"
    "line-height:1.5}pre{background:#f4f4f4;padding:1rem;overflow:auto}"
)


def _prose_to_html(text: str, blocks: Sequence[_Fence]) -> str:
    """Wrap a prose answer into a page: paragraphs, ``#`` headings, fences as ``<pre>``."""
    parts: list[str] = []

    def add_prose(chunk: str) -> None:
        for para in re.split(r"\n\s*\n", chunk):
            para = para.strip()
            if not para:
                continue
            heading = re.match(r"(#{1,6})\s+(.*)", para)
            if heading and "\n" not in para:
                level = len(heading.group(1))
                parts.append(f"<h{level}>{html_lib.escape(heading.group(2))}</h{level}>")
            else:
                parts.append(f"<p>{html_lib.escape(para)}</p>")

    pos = 0
    for fence in blocks:
        add_prose(text[pos : fence.start])
        if fence.content.strip():
            parts.append(f"<pre><code>{html_lib.escape(fence.content)}</code></pre>")
        pos = fence.end
    add_prose(text[pos:])
    if not parts:
        return ""
    return (
        f"<!DOCTYPE html><html><head><style>{_PROSE_CSS}</style></head>"
        f"<body><main>{''.join(parts)}</main></body></html>"
    )


# --------------------------------------------------------------------------------------------
# 5-7. Parse, complete, serialize

# Parse errors meaning the input ended inside a tag, comment, doctype or raw-text element.
_CUT_ERRORS = frozenset(
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
_UNCLOSED_ERRORS = frozenset(
    {"expected-closing-tag-but-got-eof", "eof-in-table", "eof-in-select", "eof-in-frameset"}
)
_ATTR_NAME_RE = re.compile(r"[^\s\"'<>/=\x00-\x1f\x7f]+")
_DANGLING_LT_RE = re.compile(r"<[/!]?\s*$")
_LEADING_DOCTYPE_RE = re.compile(r"\A\s*<!doctype[^>]*>", re.IGNORECASE)
_VIEWPORT = "width=device-width, initial-scale=1"
_DEFAULT_TITLE = "Generated page"
_TITLE_MAX = 70
_MIN_MAX_BYTES = 4096
_SIZE_RESERVE = 2048  # room for what completion adds (doctype, metas, title, closing tags)
_NS_PREFIX = {
    namespaces["xlink"]: "xlink:",
    namespaces["xml"]: "xml:",
    namespaces["xmlns"]: "xmlns:",
}
Element = ElementTree.Element


def title_from_prompt(prompt: str) -> str:
    """A page title made from the user's prompt: one line, capitalised, at most ~70 chars."""
    title = " ".join(_scrub(prompt).split())
    if not title:
        return _DEFAULT_TITLE
    if len(title) > _TITLE_MAX:
        cut = title[:_TITLE_MAX].rsplit(" ", 1)[0] or title[:_TITLE_MAX]
        title = cut.rstrip(" ,.;:") + "…"
    return title[0].upper() + title[1:]


def _split_tag(tag: str) -> tuple[str | None, str]:
    if tag.startswith("{"):
        ns, name = tag[1:].split("}", 1)
        return ns, name
    return None, tag


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
                ns, name = _split_tag(el.tag)
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
            ns, name = _split_tag(el.tag)
            attrs: dict[tuple[str | None, str], str] = {}
            for key, value in el.attrib.items():
                attr_ns, attr_name = _split_tag(key)
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


def _serialize(root: Element) -> str:
    serializer = HTMLSerializer(
        quote_attr_values="always",
        omit_optional_tags=False,
        use_trailing_solidus=False,
        escape_lt_in_attrs=True,
    )
    return str(serializer.render(_Walker(root)))


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


_INSERTION_MODES = {
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
            if node_name in _INSERTION_MODES:
                new_phase = self.phases[_INSERTION_MODES[node_name]]
                break
            if last:
                new_phase = self.phases["inBody"]
                break
        self.phase = new_phase


def _parse(source: str) -> tuple[Element, set[str]]:
    parser = _Parser(tree=html5lib.getTreeBuilder("etree"), namespaceHTMLElements=False)
    # Scripting on, as in a browser: <noscript> holds raw text, not markup.
    root = parser.parse(source, scripting=True)
    return root, {code for _pos, code, _vars in parser.errors}


def _remove(parents: dict[Element, Element], el: Element) -> None:
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


def _strip_scripts(root: Element) -> bool:
    parents = {child: parent for parent in root.iter() for child in parent}
    removed = False
    for el in list(root.iter()):
        if not isinstance(el.tag, str):
            continue
        tag = _split_tag(el.tag)[1].lower()
        # SVG <set>/<animate> can write an event handler or a javascript: link at run time.
        animated = (el.get("attributeName") or el.get("attributename") or "").lower()
        if tag == "script" or (
            tag in _ANIMATION_TAGS and (animated.startswith("on") or animated.endswith("href"))
        ):
            _remove(parents, el)
            removed = True
            continue
        for key in list(el.attrib):
            name = _split_tag(key)[1].lower()
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


_TABLE_PARTS = frozenset({"table", "tbody", "thead", "tfoot", "tr"})


def _sanitize_tree(root: Element, scrub_text: bool) -> None:
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
        and _split_tag(child.tag)[1] in _INSERTION_MODES
    ]
    for parent, child in reversed(misplaced):
        _unwrap(parent, child)
    for el in root.iter():
        if el.tag is ElementTree.Comment:
            data = _scrub(el.text or "")
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
                if not _ATTR_NAME_RE.fullmatch(_split_tag(key)[1]):
                    del el.attrib[key]
                elif scrub_text:
                    el.attrib[key] = _scrub(el.attrib[key])
            if scrub_text and el.text:
                el.text = _scrub(el.text)
        if scrub_text and el.tail:
            el.tail = _scrub(el.tail)


def _complete_head(root: Element, prompt: str) -> tuple[str, bool]:
    """Ensure charset, viewport and title; return the title and whether anything was added."""
    repaired = False
    head = root.find("head")
    if head is None:  # html5lib always creates one; be safe anyway
        head = Element("head")
        root.insert(0, head)
        repaired = True
    parents = {child: parent for parent in root.iter() for child in parent}

    had_utf8 = False
    for meta in [m for m in root.iter("meta")]:
        charset = meta.get("charset")
        equiv = (meta.get("http-equiv") or "").lower()
        if charset is not None or equiv == "content-type":
            declared = (charset or meta.get("content") or "").lower().replace("-", "")
            had_utf8 = had_utf8 or "utf8" in declared
            _remove(parents, meta)
    head.insert(0, Element("meta", {"charset": "utf-8"}))
    repaired = repaired or not had_utf8

    viewports = [m for m in root.iter("meta") if (m.get("name") or "").lower() == "viewport"]
    if not viewports:
        head.insert(1, Element("meta", {"name": "viewport", "content": _VIEWPORT}))
        repaired = True

    title_el = next(iter(root.iter("title")), None)
    title = " ".join((title_el.text or "").split()) if title_el is not None else ""
    if title_el is None:
        title_el = Element("title")
        head.insert(2, title_el)
    elif parents.get(title_el) is not head:
        _remove(parents, title_el)
        title_el.tail = None
        head.insert(2, title_el)
    if not title:
        title = title_from_prompt(prompt)
        title_el.text = title
        repaired = True
    return title, repaired


def _source_repairs(source: str) -> bool:
    """Whether the model's markup lacked a structural piece that a full document has."""
    checks = (
        r"<!doctype\s+html",
        r"<html(?=[\s>])",
        r"<head(?=[\s>])",
        r"<body(?=[\s>])",
        r"</html\s*>",
    )
    return not all(re.search(c, source, re.IGNORECASE) for c in checks)


@dataclass(frozen=True)
class _Rendered:
    html: str
    title: str
    oversize: bool  # the source was cut to fit max_bytes
    cut_mid_tag: bool  # the source ended inside a tag, comment or raw-text element
    closed_elements: bool  # the parser closed elements that were left open
    head_repaired: bool  # charset, viewport or title had to be added
    scripts_removed: bool


_FOREIGN_TAG_RE = re.compile(r"</?(?:svg|math)(?=[\s/>])[^>]*>", re.IGNORECASE)


def _parse_robustly(source: str) -> tuple[Element, set[str]]:
    """:func:`_parse`, surviving html5lib's internal asserts (odd svg/math inside tables trip
    them): then without the svg/math tags, and at last the source as plain text."""
    try:
        return _parse(source)
    except Exception:
        log.warning("html5lib failed on this page; retrying without svg/math", exc_info=True)
    try:
        return _parse(_FOREIGN_TAG_RE.sub("", source))
    except Exception:
        log.warning("html5lib failed again; the page is kept as text", exc_info=True)
    return _parse(f"<!DOCTYPE html><pre>{html_lib.escape(source, quote=False)}</pre>")


_SETTLE_MAX_CHARS = 300_000


def _settle(page_html: str, *, strip_scripts: bool) -> str:
    """Re-parse a page until its serialization is a fixed point of the parser.

    Error recovery can build trees that no markup produces (a <p> kept inside <svg>); written
    out and read again they come out different, with parse errors. One more round trip
    normalizes them. Pages beyond 300k characters skip the check (it costs a parse).
    """
    if len(page_html) > _SETTLE_MAX_CHARS:
        return page_html
    for _ in range(3):
        try:
            root, errors = _parse(page_html)
        except Exception:  # see _parse_robustly; keep the page we have
            log.debug("html5lib failed on re-parsing a page", exc_info=True)
            break
        if not errors:
            break
        log.debug("re-serializing a page that re-parses with errors: %s", sorted(errors))
        _sanitize_tree(root, scrub_text=True)
        if strip_scripts:
            _strip_scripts(root)
        page_html = _serialize(root)
    return page_html


def _render(source: str, *, prompt: str, strip_scripts: bool, max_bytes: int) -> _Rendered:
    """Parse, complete and serialize ``source``, cutting it until the page fits ``max_bytes``."""
    budget = max_bytes - _SIZE_RESERVE
    while True:
        part, oversize = _cut_to_bytes(source, budget)
        # A bare "<" or "</" at the end would become text; a cut tag is dropped by the parser.
        part, dangling = _DANGLING_LT_RE.subn("", part.rstrip())
        # Parse in standards mode, as a browser will read the page we write: a missing or
        # legacy doctype would build a quirks-mode tree (<p> around <table>) that does not
        # survive serialization under <!DOCTYPE html>.
        root, errors = _parse_robustly(
            "<!DOCTYPE html>" + _LEADING_DOCTYPE_RE.sub("", part, count=1)
        )
        _sanitize_tree(root, scrub_text="illegal-codepoint-for-numeric-entity" in errors)
        scripts_removed = strip_scripts and _strip_scripts(root)
        title, head_repaired = _complete_head(root, prompt)
        page_html = _settle(_serialize(root), strip_scripts=strip_scripts)
        size = len(page_html.encode("utf-8"))
        if size <= max_bytes:
            return _Rendered(
                html=page_html,
                title=title,
                oversize=oversize,
                cut_mid_tag=bool(dangling or errors & _CUT_ERRORS),
                closed_elements=bool(errors & _UNCLOSED_ERRORS),
                head_repaired=head_repaired,
                scripts_removed=scripts_removed,
            )
        # Serialization grew the source (escaping, implied end tags): cut it in proportion.
        used = len(part.encode("utf-8"))
        budget = max(0, min(used - 1024, int(used * max_bytes / size * 0.95) - 1024))
        source = part


def build_page(
    model_output: str | bytes,
    *,
    prompt: str,
    truncated: bool = False,
    strip_scripts: bool = False,
    max_bytes: int = 1_000_000,
) -> HtmlPage:
    """Make a complete, well-formed, UTF-8 page out of a model's answer.

    ``truncated`` says the generation hit its token limit. ``strip_scripts`` removes scripts,
    event handlers and ``javascript:`` URLs. ``max_bytes`` bounds the page (at least 4096).
    See the module docstring for each step and :class:`PageWarning` for what is reported.

    Raises :class:`HtmlExtractionError` when the output holds nothing usable (empty or
    whitespace only, after removing invalid characters and empty fences).
    """
    if not isinstance(model_output, str | bytes | bytearray):
        raise TypeError(f"model_output must be str or bytes, not {type(model_output).__name__}")
    if max_bytes < _MIN_MAX_BYTES:
        raise ValueError(f"max_bytes must be at least {_MIN_MAX_BYTES}")
    warnings: set[PageWarning] = set()
    if truncated:
        warnings.add(PageWarning.TRUNCATED)
    text, invalid = _clean_text(model_output)
    if invalid:
        warnings.add(PageWarning.INVALID_TEXT)
    if not text.strip():
        raise HtmlExtractionError("the model's output is empty")

    text, repeated = detect_repetition(text)
    extraction = _extract(text)
    not_html = not extraction.html
    if not_html:
        source = _prose_to_html(text, extraction.blocks)
        if not source:
            raise HtmlExtractionError("the model's output holds no page and no text")
        warnings.add(PageWarning.NOT_HTML)
        complete = False
    else:
        source = extraction.html
        complete = bool(_HTML_OPEN_RE.search(source) and _HTML_CLOSE_RE.search(source))
        source, repeated_inside = detect_repetition(source)
        repeated = repeated or repeated_inside
    if repeated:
        warnings.add(PageWarning.REPETITION)
    source_repaired = not not_html and _source_repairs(source)
    guarded = _guard_markup(source)
    source, too_deep = guarded.source, guarded.degenerate
    if too_deep:
        warnings.add(PageWarning.DEGENERATE)

    rendered = _render(source, prompt=prompt, strip_scripts=strip_scripts, max_bytes=max_bytes)
    if rendered.oversize:
        warnings.add(PageWarning.OVERSIZE)
    # A cut of our own explains an unfinished tag or unclosed elements; flag only the model's.
    our_cut = repeated or too_deep or rendered.oversize
    if (rendered.cut_mid_tag or guarded.cut_tag) and not our_cut:
        warnings.add(PageWarning.TRUNCATED)
    if not not_html and (
        source_repaired or rendered.head_repaired or (rendered.closed_elements and not our_cut)
    ):
        warnings.add(PageWarning.REPAIRED)
    if rendered.scripts_removed:
        warnings.add(PageWarning.SCRIPTS_REMOVED)
    ordered = tuple(sorted(warnings, key=_WARNING_ORDER.__getitem__))
    if ordered:
        log.debug("page built with warnings: %s", ", ".join(ordered))
    return HtmlPage(html=rendered.html, title=rendered.title, warnings=ordered, complete=complete)


def summarize_pages(pages: Sequence[HtmlPage]) -> dict[str, float]:
    """Quality rates over many pages (e.g. an evaluation run): ``count``, ``mean_bytes``,
    ``complete_document_rate``, ``truncation_rate``, ``repetition_rate``, ``not_html_rate``,
    ``repaired_rate``. Rates are fractions in [0, 1]; all zero for no pages."""
    count = len(pages)

    def rate(predicate: Any) -> float:
        return sum(1 for p in pages if predicate(p)) / count if count else 0.0

    return {
        "count": float(count),
        "mean_bytes": sum(len(p.data) for p in pages) / count if count else 0.0,
        "complete_document_rate": rate(lambda p: p.complete),
        "truncation_rate": rate(lambda p: PageWarning.TRUNCATED in p.warnings),
        "repetition_rate": rate(lambda p: PageWarning.REPETITION in p.warnings),
        "not_html_rate": rate(lambda p: PageWarning.NOT_HTML in p.warnings),
        "repaired_rate": rate(lambda p: PageWarning.REPAIRED in p.warnings),
    }
