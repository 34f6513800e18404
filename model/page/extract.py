"""Stage 3 of the page pipeline: take the page out of what the model said.

The page is taken out of markdown: ```` ``` ````/``~~~`` fences with or without a language,
nested, unclosed or glued to a line, several of them (the one holding the document wins; a
document split over consecutive fences is joined; ``css``/``js`` fences are inlined as
``<style>``/``<script>``), or raw HTML in prose (from ``<!DOCTYPE``/``<html>`` to the last
``</html>``, or the lines that start with tags). A ``</html>`` inside a code sample (pre,
code), a script, style, textarea, xmp or a comment does not end the page
(:func:`model.stopping.page_end_spans`, the rule the engines stop by). Prose with no HTML at
all is wrapped into a simple page (``not_html``) by :func:`prose_to_html`.
"""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from model.stopping import page_end_spans

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
HTML_OPEN_RE = re.compile(r"<html(?=[\s>])", re.IGNORECASE)


def closes_document(source: str) -> bool:
    """Whether ``source`` holds a ``</html>`` that ends the page (not one in a code sample,
    script or comment: :func:`model.stopping.page_end_spans`)."""
    return bool(page_end_spans(source))


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
        return closes_document(docs[i]), len(docs[i]), i

    return docs[max(range(len(docs)), key=score)]


def _trim_document(source: str) -> str:
    """Cut prose before ``<!DOCTYPE``/``<html>`` and after the last ``</html>`` that ends the
    page (one in a code sample, script or comment does not); keep markup."""
    source = _best_document(source)
    start = _DOC_START_RE.search(source)
    if start:
        prefix = source[: start.start()].strip()
        if not (prefix.startswith("<") and prefix.endswith(">")):
            source = source[start.start() :]
    ends = page_end_spans(source)
    if ends:
        end = ends[-1][1]
        suffix = source[end:].strip()
        if not suffix.startswith("<"):
            source = source[:end]
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
class Extraction:
    html: str  # "" when the answer holds no HTML
    blocks: tuple[_Fence, ...]  # the top-level fences, for the prose fallback


def extract_source(text: str) -> Extraction:
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
                closes_document(content),
                len(content),
                i,  # on a tie the later, usually revised, version
            )

        best = max(range(len(html_blocks)), key=score)
        page = html_blocks[best].content
        # A document split over consecutive fences: append fragments until </html>.
        if _DOC_START_RE.search(page) and not closes_document(page):
            for later in html_blocks[best + 1 :]:
                if _DOC_START_RE.search(later.content):
                    break
                page += "\n" + later.content
                if closes_document(page):
                    break
        page = _trim_document(page)
    else:
        page = _raw_html(text, top)
    if not page.strip():
        return Extraction("", top)
    return Extraction(_inline_assets(page, css, js), top)


def extract_html(text: str) -> str:
    """The page part of what the model said, or ``""`` when it holds no HTML at all.

    Handles fenced blocks (with or without language, nested, unclosed, several: the one holding
    the document wins, css/js blocks are inlined) and raw HTML in prose. The result is the
    model's own markup, not yet completed or parsed.
    """
    return extract_source(text.replace("\r\n", "\n").replace("\r", "\n")).html


# --------------------------------------------------------------------------------------------
# Prose fallback

_PROSE_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:42rem;margin:2rem auto;padding:0 1rem;"
    "line-height:1.5}pre{background:#f4f4f4;padding:1rem;overflow:auto}"
)


def prose_to_html(text: str, blocks: Sequence[_Fence]) -> str:
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
