"""What the page-quality benchmark measures on one page, in the real browser.

The browser (``bench.browser.render``) runs :data:`MEASURE_JS` in the rendered page; it
gathers raw facts (the rendered text, headings, counts of elements, computed styles), and the
functions here turn them into verdicts. Styles are compared with what the same browser gives
an unstyled page (:data:`REFERENCE_PAGE`), not with numbers written down here, so "styled"
means "differs from this browser's defaults".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from bench.png import pixel_variance
from bench.quality_prompts import Block, QualityPrompt

# Computed-style properties compared with the browser's defaults.
STYLE_PROPERTIES = (
    "font-family",
    "background-color",
    "background-image",
    "color",
    "margin-top",
    "margin-left",
    "font-size",
)

# Gathers the facts as a JSON string (so every browser API returns it the same way).
MEASURE_JS = r"""
(() => {
  const props = %(props)s;
  const style = (el) => {
    if (!el) return null;
    const s = getComputedStyle(el);
    const out = {};
    for (const p of props) out[p] = s.getPropertyValue(p);
    return out;
  };
  const text = (el) => (el ? (el.innerText || el.textContent || "").trim() : "");
  const all = (sel) => Array.from(document.querySelectorAll(sel));
  const h1 = document.querySelector("h1");
  const first = document.querySelector("h1, h2, h3, h4, h5, h6");
  const sections = all("section, article").filter(
    (el) => !el.parentElement || !el.parentElement.closest("section, article"));
  const notControls = ["hidden", "submit", "button", "reset", "image"];
  const controls = all("input, textarea, select").filter(
    (el) => !notControls.includes((el.type || "").toLowerCase()));
  const questionSel =
    "h1, h2, h3, h4, h5, h6, dt, summary, strong, b, p, li, button, label, span, div";
  const questions = all(questionSel).filter((el) => {
    const own = Array.from(el.childNodes).filter((n) => n.nodeType === 3)
      .map((n) => n.textContent).join(" ").trim();
    const full = text(el);
    return (own.endsWith("?") || (el.children.length === 0 && full.endsWith("?")));
  });
  const tableRows = all("table").map((t) => t.querySelectorAll("tr").length);
  const listItems = all("ul, ol").map((l) => l.querySelectorAll(":scope > li").length);
  const paragraphs = all("p").filter((p) => text(p).split(/\s+/).filter(Boolean).length >= 12);
  const actions = all("button, input[type=submit], input[type=button], a[href]").filter(
    (el) => text(el).split(/\s+/).filter(Boolean).length <= 6 || el.tagName === "INPUT");
  return JSON.stringify({
    text: text(document.body),
    h1: h1 ? text(h1) : null,
    first_heading: first ? text(first) : null,
    headings: all("h1, h2, h3, h4, h5, h6").map(text).slice(0, 40),
    sections: sections.length,
    h2: all("h2").length,
    subheadings: all("h2, h3, h4").length,
    controls: controls.length,
    forms: all("form").length,
    questions: questions.length,
    table_rows: tableRows.length ? Math.max(...tableRows) : 0,
    list_items: listItems.length ? Math.max(...listItems) : 0,
    paragraphs: paragraphs.length,
    actions: actions.length,
    body_style: style(document.body),
    h1_style: style(h1),
    scroll_height: document.documentElement.scrollHeight,
  });
})()
""".replace("%(props)s", json.dumps(list(STYLE_PROPERTIES)))

# The same browser's defaults: what an unstyled page's body and h1 look like.
REFERENCE_PAGE = (
    "<!DOCTYPE html><html><head><title>reference</title></head>"
    "<body><h1>Reference</h1><p>Plain text.</p></body></html>"
)

# A screenshot whose colour variance is below this is blank (one flat colour, or a few
# stray pixels); one short line of text scores well above it.
BLANK_VARIANCE = 1.0

_DOCTYPE_RE = re.compile(r"^\s*(?:<!--.*?-->\s*)*<!doctype\s+html", re.IGNORECASE | re.DOTALL)
_PRICE_RE = re.compile(
    r"[$€£¥]\s?\d|\b\d+(?:[.,]\d+)?\s?(?:€|\$|£|usd|eur|gbp|/\s?mo\b|/\s?month|/\s?year"
    r"|per month|a month)",
    re.IGNORECASE,
)
_TIME_RE = re.compile(r"\b\d{1,2}[:.h]\d{2}\b|\b\d{1,2}\s?(?:am|pm|a\.m\.|p\.m\.)", re.IGNORECASE)
_DAY_RE = re.compile(
    r"\bday\s*(?:\d+|one|two|three|four|five|six|seven)\b|\b(?:mon|tues|wednes|thurs|fri|"
    r"satur|sun)day\b",
    re.IGNORECASE,
)
_NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)*")
_EXPERIENCE_RE = re.compile(r"\b(?:experience|employment|work history|career)\b", re.I)
_SKILLS_RE = re.compile(r"\bskills?\b", re.IGNORECASE)


@dataclass(frozen=True)
class PageFacts:
    """The raw facts :data:`MEASURE_JS` returns for one rendered page."""

    text: str
    h1: str | None
    first_heading: str | None
    headings: list[str]
    sections: int
    h2: int
    subheadings: int
    controls: int
    forms: int
    questions: int
    table_rows: int
    list_items: int
    paragraphs: int
    actions: int
    body_style: dict[str, str] | None
    h1_style: dict[str, str] | None
    scroll_height: int = 0

    @classmethod
    def from_measure(cls, measure: Any) -> PageFacts:
        """From what the browser returned: the JSON string, or the value already parsed."""
        data = json.loads(measure) if isinstance(measure, str) else dict(measure)
        known = cls.__dataclass_fields__
        return cls(**{key: value for key, value in data.items() if key in known})

    @classmethod
    def empty(cls) -> PageFacts:
        """The facts of a page the browser could not show: nothing at all."""
        return cls("", None, None, [], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, None, None)


def is_complete(html: str) -> bool:
    """The page's own source is a whole document: doctype first, html, head and body
    elements, and the closing tags of body and html."""
    lower = html.lower()
    return bool(_DOCTYPE_RE.match(html)) and all(
        tag in lower for tag in ("<html", "<head", "<body", "</body>", "</html>")
    )


def visible_words(text: str) -> int:
    """Words in the rendered text (``innerText``: what is displayed, scripts and hidden
    elements left out)."""
    return len(text.split())


def heading_of(facts: PageFacts) -> str | None:
    """The page's heading: its first ``<h1>``, else its first heading of any level."""
    return facts.h1 if facts.h1 else facts.first_heading


def on_topic(heading: str | None, keywords: Iterable[str]) -> bool:
    """The heading contains one of the prompt's keywords (case-insensitive substring)."""
    if not heading:
        return False
    text = heading.lower()
    return any(keyword.lower() in text for keyword in keywords)


def section_count(facts: PageFacts) -> int:
    """Top-level ``<section>``/``<article>`` elements; a page built of divs counts its
    ``<h2>`` headings instead (each starts a section of the outline)."""
    return facts.sections if facts.sections else facts.h2


def _distinct(pattern: re.Pattern[str], text: str) -> int:
    return len({match.group(0).lower() for match in pattern.finditer(text)})


def block_present(block: Block, facts: PageFacts) -> bool:
    """Whether the rendered page shows ``block`` (see :class:`Block` for each rule)."""
    text = facts.text
    checks = {
        Block.CARDS: lambda: facts.subheadings >= 3,
        Block.CTA: lambda: facts.actions >= 1,
        Block.PRICES: lambda: len(_PRICE_RE.findall(text)) >= 3,
        Block.FORM: lambda: facts.controls >= 2,
        Block.QUESTIONS: lambda: facts.questions >= 3,
        Block.TABLE: lambda: facts.table_rows >= 3,
        Block.STATS: lambda: len(_NUMBER_RE.findall(text)) >= 3,
        Block.DAYS: lambda: _distinct(_DAY_RE, text) >= 2,
        Block.TIMES: lambda: _distinct(_TIME_RE, text) >= 2,
        Block.PARAGRAPHS: lambda: facts.paragraphs >= 3,
        Block.EXPERIENCE: lambda: bool(_EXPERIENCE_RE.search(text)),
        Block.SKILLS: lambda: bool(_SKILLS_RE.search(text)) and facts.list_items >= 3,
        Block.LIST: lambda: facts.list_items >= 3,
    }
    return checks[block]()


def missing_blocks(blocks: Iterable[Block], facts: PageFacts) -> list[Block]:
    """The asked-for blocks the page does not show."""
    return [block for block in blocks if not block_present(block, facts)]


def _style_changes(style: Mapping[str, str] | None, default: Mapping[str, str] | None) -> list[str]:
    if not style or not default:
        return []
    return [prop for prop in STYLE_PROPERTIES if style.get(prop) != default.get(prop)]


def style_changes(facts: PageFacts, reference: PageFacts) -> list[str]:
    """The computed-style properties of body and h1 that differ from the browser's default
    (``reference``: :data:`REFERENCE_PAGE` measured in the same browser)."""
    changed = [f"body {p}" for p in _style_changes(facts.body_style, reference.body_style)]
    changed += [f"h1 {p}" for p in _style_changes(facts.h1_style, reference.h1_style)]
    return changed


def _host(target: str) -> str | None:
    """The host of a proxy request's target: an absolute URL, or ``host:port`` (CONNECT)."""
    if "://" in target:
        return urlsplit(target).hostname
    return urlsplit("//" + target).hostname


def page_remote_loads(proxied: Iterable[str], page_urls: Iterable[str]) -> list[str]:
    """The proxied requests (``"GET http://..."``, ``"CONNECT host:443"``) that the page made.

    Chromium talks to its own services too (``CONNECT www.google.com:443`` at start, for
    one), through the same proxy; a request counts when its host is one the page itself
    asked for (``page_urls``, from the DevTools Network domain of the page's target).
    """
    hosts = {urlsplit(url).hostname for url in page_urls} - {None}
    loads = []
    for request in proxied:
        _, _, target = request.partition(" ")
        if _host(target) in hosts:
            loads.append(request)
    return loads


def is_blank(png: bytes | None, threshold: float = BLANK_VARIANCE) -> bool:
    """The screenshot is one flat colour (pixel variance under ``threshold``); a page that
    could not be captured counts as blank."""
    if not png:
        return True
    try:
        return pixel_variance(png) < threshold
    except ValueError:
        return True


@dataclass
class PageMeasure:
    """Every verdict on one page (a row of the benchmark's per-page table)."""

    complete: bool
    words: int
    heading: str | None
    on_topic: bool
    sections: int
    missing: list[str]
    styled: bool
    style_changes: list[str]
    blank: bool
    variance: float
    remote_loads: int
    remote_urls: list[str]

    @property
    def sections_ok(self) -> bool:
        """Three sections or more, and every block the prompt asked for."""
        return self.sections >= 3 and not self.missing

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def judge(
    html: str,
    facts: PageFacts,
    reference: PageFacts,
    prompt: QualityPrompt,
    png: bytes | None,
    remote_urls: list[str],
) -> PageMeasure:
    """All verdicts for one rendered page."""
    heading = heading_of(facts)
    changes = style_changes(facts, reference)
    try:
        variance = pixel_variance(png) if png else 0.0
    except ValueError:
        variance = 0.0
    return PageMeasure(
        complete=is_complete(html),
        words=visible_words(facts.text),
        heading=heading,
        on_topic=on_topic(heading, prompt.keywords),
        sections=section_count(facts),
        missing=[block.value for block in missing_blocks(prompt.blocks, facts)],
        styled=bool(changes),
        style_changes=changes,
        blank=variance < BLANK_VARIANCE,
        variance=variance,
        remote_loads=len(remote_urls),
        remote_urls=remote_urls,
    )
