"""Compose-mode training examples: a dataset page's words, as the form the model fills in.

Compose mode asks the model for a guided form of short lines (:mod:`model.page.form`), not
markup. The dataset holds pages, so :func:`content_from_page` reads a landing page's content
out of one: the tagline is the first paragraph sentence that fits, the three features are the
first headings (h2-h4) of a few words with the sentence that follows each, the two sections
are further paragraphs, the call to action a sentence and a button's (or link's) label.
Values are cleaned to what the form's grammar allows (Latin-script words, no quotes, bounded
sentences ending with ``.`` or ``!``); a value that can't be made to fit is passed over, and
a page with too little usable text gives ``None``.

:class:`FormChecker` then runs every answer through the form's real grammar (xgrammar), so
training never teaches an answer that constrained decoding would refuse.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from pydantic import ValidationError

from model.page.content import PageContent, PageKind, page_subject, page_title
from model.page.form import BUTTON_LABELS, answer_text, form_for, grammar_for

log = logging.getLogger(__name__)

__all__ = ["COMPOSE_KIND", "FormChecker", "compose_answer", "content_from_page"]

# Every compose example is a landing page: the one kind whose parts (tagline, features,
# sections, call to action) any web page has.
COMPOSE_KIND = PageKind.LANDING

# The grammar's word and sentence rules (model.page.form) as regexes, to choose among a
# page's candidate values. They only pick candidates: FormChecker's real grammar decides.
_LETTER = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u00ff"
_WORD = rf"[{_LETTER}0-9'&%$\u20ac\u00a3]{{1,15}}(?:-[{_LETTER}0-9]{{1,12}})?"
_CAPWORD = rf"[A-Z\u00c0-\u00d6][{_LETTER}0-9'&]{{0,14}}(?:-[{_LETTER}0-9]{{1,12}})?"
_GAP = r"(?: |, |; |: | - | \(|\) | & )"
_SENTENCE_RE = re.compile(rf"{_CAPWORD}(?:{_GAP}{_WORD}){{2,20}}[.!]")
_TITLE_RE = re.compile(rf"{_CAPWORD}(?: {_WORD}){{0,4}}")  # "a few words": at most 5
_BUTTON_RE = re.compile(rf"{_CAPWORD}(?: {_WORD}){{0,2}}")  # two or three words

# The longest value of each landing field (a longer one would be cut when parsed back).
_LIMITS = {f.path: f.max_chars for f in form_for(COMPOSE_KIND)}

# A feature card's title: the form reads it out of the feature's sentence at inference (it
# is not part of the answer), and the page's own heading, this long at most, is kept.
FEATURE_TITLE_CHARS = 40
_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_FEATURE_HEADINGS = frozenset({"h2", "h3", "h4"})
_PARAGRAPHS = frozenset({"p", "blockquote", "figcaption", "li", "dd"})
_BLOCKS = _HEADINGS | _PARAGRAPHS
_BUTTONS = frozenset({"button", "a"})
_SKIPPED = frozenset({"script", "style", "template", "noscript", "svg", "head", "title", "select"})
_CHROME = frozenset({"nav", "footer"})  # links there are navigation, not calls to action


# ------------------------------------------------------------------------ reading the page


@dataclass
class _Block:
    """A piece of the page's text: a heading, a paragraph or a button/link label."""

    tag: str
    order: int
    text: str = ""
    cta: bool = False  # a <button>, submit input or link styled as a button
    in_chrome: bool = False


class _TextBlocks(HTMLParser):
    """The page's headings, paragraphs and button labels, in document order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[_Block] = []
        self._open: list[_Block] = []
        self._skipping: list[str] = []
        self._chrome = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skipping:
            if tag == self._skipping[-1]:
                self._skipping.append(tag)
            return
        if tag in _SKIPPED:
            self._skipping.append(tag)
            return
        if tag in _CHROME:
            self._chrome += 1
        values = {name: value or "" for name, value in attrs}
        if tag == "input" and values.get("type", "").lower() in ("submit", "button"):
            self._add(_Block("button", len(self.blocks), values.get("value", ""), cta=True))
            return
        if tag in _BLOCKS:
            # A new heading or paragraph ends the one before it, as in HTML's own rules
            # for <p> (sloppy pages leave them open).
            self._close(lambda block: block.tag in _BLOCKS)
        if tag in _BLOCKS or tag in _BUTTONS:
            styled = re.search(r"btn|button|cta", values.get("class", ""), re.IGNORECASE)
            block = _Block(tag, len(self.blocks), cta=tag == "button" or bool(styled))
            self._add(block)
            self._open.append(block)

    def handle_endtag(self, tag: str) -> None:
        if self._skipping:
            if tag == self._skipping[-1]:
                self._skipping.pop()
            return
        if tag in _CHROME and self._chrome:
            self._chrome -= 1
        if any(block.tag == tag for block in self._open):
            self._close(lambda block: block.tag == tag, innermost=True)

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            for block in self._open:
                block.text += data

    def _add(self, block: _Block) -> None:
        block.in_chrome = self._chrome > 0
        self.blocks.append(block)

    def _close(self, matches: Any, innermost: bool = False) -> None:
        """Close the innermost open block that ``matches`` and every block opened inside it
        (with ``innermost=False``: the outermost match)."""
        indexes = [i for i, block in enumerate(self._open) if matches(block)]
        if indexes:
            del self._open[indexes[-1] if innermost else indexes[0] :]


def _page_blocks(html: str) -> list[_Block]:
    parser = _TextBlocks()
    parser.feed(html)
    parser.close()
    return [block for block in parser.blocks if block.text.strip()]


# ------------------------------------------------------------------- cleaning the values

_QUOTES = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u02bc": "'",
        "`": "'",
        '"': None,
        "\u201c": None,
        "\u201d": None,
        "\u201e": None,
        "\u00ab": None,
        "\u00bb": None,
        "\u2026": ".",
    }
)


def _normalize(text: str) -> str:
    """One line of plain text: quotes dropped, dashes as `` - ``, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    text = re.sub(r"\s*[\u2013\u2014]\s*", " - ", text)
    # An apostrophe that is not inside a word is a quote mark.
    text = re.sub(r"(?<![\w])'|'(?![\w])", "", text)
    text = " ".join(text.split())
    return re.sub(r" ([,;:.!])", r"\1", text)


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentences(text: str, max_chars: int) -> list[str]:
    """The sentences of ``text`` that fit the grammar's sentence rule, in order."""
    found = []
    for piece in re.split(r"(?<=[.!?])\s+", _normalize(text)):
        if piece and piece[-1].isalnum():
            piece += "."  # a paragraph that just stops still ends a sentence
        piece = _capitalized(piece)
        if len(piece) <= max_chars and _SENTENCE_RE.fullmatch(piece):
            found.append(piece)
    return found


def _label(text: str, pattern: re.Pattern[str], max_chars: int) -> str | None:
    """A heading or button text as a few words the grammar allows, or ``None``."""
    text = _normalize(text).strip(" .:;!?,-\u2192\u2190\u00bb\u203a>|*#")
    text = _capitalized(text)
    if len(text) <= max_chars and pattern.fullmatch(text):
        return text
    return None


# ------------------------------------------------------------------- choosing the content


@dataclass
class _Candidates:
    """The page's usable sentences by block, and which ones are taken."""

    blocks: list[_Block]
    sentences: dict[int, list[str]] = field(default_factory=dict)
    used: set[tuple[int, int]] = field(default_factory=set)

    def free(self, index: int, max_chars: int) -> list[tuple[int, str]]:
        block = self.blocks[index]
        if block.tag not in _PARAGRAPHS or block.in_chrome:
            return []
        if index not in self.sentences:
            self.sentences[index] = _sentences(block.text, 240)
        return [
            (n, sentence)
            for n, sentence in enumerate(self.sentences[index])
            if (index, n) not in self.used and len(sentence) <= max_chars
        ]

    def take(self, indexes: range | list[int], max_chars: int) -> str | None:
        """The first free sentence within ``max_chars`` in these blocks, now taken."""
        for index in indexes:
            for n, sentence in self.free(index, max_chars):
                self.used.add((index, n))
                return sentence
        return None


def _tagline(pool: _Candidates) -> str | None:
    return pool.take(range(len(pool.blocks)), _LIMITS["tagline"])


def _features(pool: _Candidates) -> list[dict[str, str]]:
    """Up to three (heading, the sentence after it) pairs, from h2-h4 headings in order."""
    blocks = pool.blocks
    heads = [i for i, block in enumerate(blocks) if block.tag in _HEADINGS]
    features = []
    for position, index in enumerate(heads):
        if blocks[index].tag not in _FEATURE_HEADINGS or blocks[index].in_chrome:
            continue
        title = _label(blocks[index].text, _TITLE_RE, FEATURE_TITLE_CHARS)
        if title is None:
            continue
        end = heads[position + 1] if position + 1 < len(heads) else len(blocks)
        text = pool.take(range(index + 1, end), _LIMITS["features.0.text"])
        if text is not None:
            features.append({"title": title, "text": text})
        if len(features) == 3:
            break
    return features


def closest_button_label(label: str) -> str:
    """The form's button label (picked from ``BUTTON_LABELS``, not written) closest to a
    page's own: the most words shared, else "Learn more"."""
    words = set(label.lower().split())
    best = max(BUTTON_LABELS, key=lambda option: len(words & set(option.lower().split())))
    return best if words & set(best.lower().split()) else "Learn more"


def _call_to_action(pool: _Candidates) -> dict[str, str] | None:
    """A button's label, preferring real buttons to plain links, with the sentence nearest
    before it (or the page's last free sentence)."""
    blocks = pool.blocks
    buttons = [i for i, b in enumerate(blocks) if b.tag in _BUTTONS and b.cta]
    buttons += [i for i, b in enumerate(blocks) if b.tag == "a" and not b.cta and not b.in_chrome]
    for index in buttons:
        label = _label(blocks[index].text, _BUTTON_RE, _LIMITS["call_to_action.button"])
        if label is None:
            continue
        label = closest_button_label(label)
        limit = _LIMITS["call_to_action.text"]
        text = pool.take(range(index, -1, -1), limit) or pool.take(
            range(len(blocks) - 1, -1, -1), limit
        )
        return {"text": text, "button": label} if text else None
    return None


def _section_texts(pool: _Candidates) -> list[str]:
    """Two texts of one or two free sentences, each from a paragraph of its own."""
    texts = []
    # Paragraphs nothing was taken from first: a feature's leftover sentence reads badly
    # as a section of its own.
    touched = {index for index, _ in pool.used}
    order = sorted(range(len(pool.blocks)), key=lambda index: (index in touched, index))
    for index in order:
        free = pool.free(index, _LIMITS["sections.0.text"])
        if not free:
            continue
        chosen = [free[0]]
        if len(free) > 1 and len(f"{free[0][1]} {free[1][1]}") <= _LIMITS["sections.0.text"]:
            chosen.append(free[1])
        pool.used.update((index, n) for n, _ in chosen)
        texts.append(" ".join(sentence for _, sentence in chosen))
        if len(texts) == 2:
            break
    return texts


def content_from_page(html: str, description: str) -> PageContent | None:
    """The landing-page content of a dataset page, or ``None`` when it has too little text.

    Every form field gets a value (tagline, three features, two sections, the call to
    action), each cleaned to the grammar's rules, or the page gives ``None``.
    """
    pool = _Candidates(_page_blocks(html))
    tagline = _tagline(pool)
    features = _features(pool)
    action = _call_to_action(pool)
    sections = _section_texts(pool)
    if tagline is None or len(features) < 3 or action is None or len(sections) < 2:
        return None
    title = page_title(description)
    headings = [f"About {title}"[:40].rstrip(), "Why people choose us"]
    data = {
        "title": title,
        "tagline": tagline,
        "features": features,
        "sections": [
            {"heading": heading, "text": text}
            for heading, text in zip(headings, sections, strict=True)
        ],
        "call_to_action": action,
        "footer": title,
    }
    try:
        return PageContent.model_validate(data)
    except ValidationError:
        return None


def compose_answer(content: PageContent, description: str) -> str:
    """The form answer the model should give for ``content`` (what inference parses back)."""
    return answer_text(content, COMPOSE_KIND, page_subject(description))


# ------------------------------------------------------------------- the grammar's verdict

# The lead-ins are literal text and the values' rules do not depend on the subject, so one
# grammar compiled for a stand-in subject judges the values of every answer: compiling one
# per description would cost ~0.2 s each.
_STAND_IN_SUBJECT = "A page"


class FormChecker:
    """Whether the form grammar (:func:`model.page.form.grammar_for`, the one compose-mode
    decoding follows) accepts an answer's values, judged with xgrammar."""

    def __init__(self, tokenizer: Any, kind: PageKind = COMPOSE_KIND) -> None:
        import xgrammar

        self._xgrammar = xgrammar
        self.kind = kind
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
        self._grammar = xgrammar.GrammarCompiler(info).compile_grammar(
            grammar_for(kind, _STAND_IN_SUBJECT)
        )

    def accepts(self, content: PageContent) -> bool:
        """True when ``content``'s whole form answer is one the grammar allows."""
        text = answer_text(content, self.kind, _STAND_IN_SUBJECT)
        matcher = self._xgrammar.GrammarMatcher(self._grammar)
        return bool(matcher.accept_string(text)) and _complete(matcher)


def _complete(matcher: Any) -> bool:
    """The matcher has reached the grammar's end (it would accept the stop token now)."""
    return bool(matcher.is_completed())
