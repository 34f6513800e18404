"""The guided form a compose-mode answer fills in, its grammar, and its parser.

A small model asked for a JSON object copies the worked example's words, or rambles once it
is past the title (measured on SmolLM2-135M: a bakery page about gardening in Leeds, a yoga
pricing page selling "Camel Cakes"). The same model answers a plain question about the
subject well in a sentence. So the answer is a form of short lines, each one led by a
question about the subject that the grammar writes for the model::

    Tagline (one short sentence about a bakery in Lyon): Fresh bread every morning.
    Something a bakery in Lyon offers, named in a few words: Sourdough loaves
    That, in one sentence: Baked overnight with organic flour.
    ...

The grammar (xgrammar EBNF, :func:`grammar_for`) makes every answer a complete form: the
lead-ins are literal text (the engines feed them without sampling where they can), values
are one line of bounded length, prices, times and years follow small patterns. The result
always parses (:func:`parse_answer`) into :class:`~model.page.content.PageContent`, which the
themed templates render. :func:`answer_text` writes the form for given content, which is
how training builds compose examples from existing pages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from model.page.content import PageContent, PageKind

__all__ = [
    "BUTTON_LABELS",
    "SUBMIT_LABELS",
    "FormField",
    "answer_text",
    "form_for",
    "form_leads",
    "grammar_for",
    "parse_answer",
    "title_from_sentence",
]

# Value patterns, as EBNF right-hand sides over the shared rules of _SHARED_RULES. Values
# are one line of Latin-script words: sampled freely, SmolLM2-135M drifted into Arabic,
# emoji floods and Tifinagh letters, and wrote 300-character hyphenated "words" and
# sentences with no end, until words, sentences and lists were bounded here.
_LETTER = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u00ff"
_SHARED_RULES = f"""
word ::= [{_LETTER}0-9'&%$\u20ac\u00a3]{{1,12}} ("-" [{_LETTER}0-9]{{1,10}})?
capword ::= [A-Z\u00c0-\u00d6] [{_LETTER}0-9'&]{{0,11}} ("-" [{_LETTER}0-9]{{1,10}})?
gap ::= " " | ", " | "; " | ": " | " - " | " (" | ") " | " & "
sentence ::= capword (gap word){{2,18}} [.!]
question ::= capword (gap word){{1,14}} "?"
"""
# Lengths are bounded by counting words in shared rules: bounded character repeats written
# out in every field ({{2,118}}) made xgrammar compile a form in 4-6 s instead of ~0.2 s.
_QUESTION = '" "? question'
_PRICE = '" "? [$\u20ac\u00a3] [1-9] [0-9]{0,2} ("." [0-9] [0-9])?'
_NUMBER = '" "? [1-9] [0-9,.]{0,6} ("%" | "k" | "M")?'
_TIME = '" "? [0-2]? [0-9] ":" [0-5] [0-9]'
_YEARS = '" "? [12] [09] [0-9] [0-9] ("-" ([12] [09] [0-9] [0-9] | "now"))?'
# Button labels are picked, not written: free-form, the model's labels were half sentences
# ("We are here for all", "Bien sûr, le Coeur de").
BUTTON_LABELS = (
    "Book now",
    "Get started",
    "Contact us",
    "Learn more",
    "Order now",
    "Sign up",
    "Join us",
    "Visit us",
    "Shop now",
    "Call us",
    "Get in touch",
    "Reserve a table",
    "Try it free",
    "Subscribe",
    "See the menu",
    "Buy now",
    "Get tickets",
    "Apply now",
    "Download",
    "Hire me",
)
SUBMIT_LABELS = ("Send", "Submit", "Sign up", "Register", "Book now", "Send message", "Join")


def _choice(labels: tuple[str, ...]) -> str:
    return '" " (' + " | ".join(json.dumps(label) for label in labels) + ")"


_BUTTON = _choice(BUTTON_LABELS)
_SUBMIT = _choice(SUBMIT_LABELS)
_STATUS = '" " ("OK" | "Warning" | "Late" | "Done" | "Pending")'


def _words(count: int) -> str:
    """At most ``count`` words: names and labels end where a small model would ramble on."""
    return f'" "? capword (" " word){{0,{count - 1}}}'


def _list(count: int, words: int) -> str:
    """Two to ``count`` comma-separated items of at most ``words`` words each."""
    item = f'word (" " word){{0,{words - 1}}}'
    return f'" "? {item} (", " {item}){{1,{count - 1}}}'


def _sentences(count: int) -> str:
    """One to ``count`` sentences, each ended by its full stop."""
    if count == 1:
        return '" "? sentence'
    return f'" "? sentence (" " sentence){{0,{count - 1}}}'


@dataclass(frozen=True)
class FormField:
    """One line of the form: where its value goes, the lead-in before it, its pattern.

    ``path`` names the place in the content ("tagline", "plans.1.price"; a ``[]`` suffix
    splits a comma-separated value into a list). ``lead`` may hold ``{subject}``.
    """

    path: str
    lead: str
    max_chars: int = 100
    pattern: str | None = None  # EBNF over the shared rules; None = up to 12 words

    def value_rule(self) -> str:
        return self.pattern or _words(12)


def _numbered(count: int, *fields: tuple[str, str, int, str | None]) -> list[FormField]:
    """``count`` copies of a group of fields, ``{i}`` numbered from 1 in paths and leads."""
    return [
        FormField(path.format(i=i - 1), lead.format(i=i, subject="{subject}"), size, pattern)
        for i in range(1, count + 1)
        for path, lead, size, pattern in fields
    ]


def _sections(second_lead: str) -> list[FormField]:
    return [
        FormField("sections.0.text", "About {subject}, in two sentences", 240, _sentences(2)),
        FormField("sections.1.text", second_lead, 240, _sentences(2)),
    ]


# The headings of the two sections every kind ends with (the first is "About <title>").
_SECOND_HEADING: dict[PageKind, str] = {
    PageKind.LANDING: "Why people choose us",
    PageKind.PRICING: "Every plan includes",
    PageKind.FORM: "What happens next",
    PageKind.FAQ: "Still have questions?",
    PageKind.ARTICLE: "The takeaway",
    PageKind.DASHBOARD: "Notes",
    PageKind.ITINERARY: "Travel tips",
    PageKind.PORTFOLIO: "Working together",
    PageKind.RESUME: "Education",
    PageKind.MENU: "Visit us",
    PageKind.EVENT: "Getting there",
}
_SECOND_LEAD: dict[PageKind, str] = {
    PageKind.LANDING: "Why people choose {subject}, in two sentences",
    PageKind.PRICING: "What every plan includes, in one sentence",
    PageKind.FORM: "What happens after someone sends the form, in one sentence",
    PageKind.FAQ: "How to get more help, in one sentence",
    PageKind.ARTICLE: "The main lesson of the post, in one sentence",
    PageKind.DASHBOARD: "The most important thing to notice today, in one sentence",
    PageKind.ITINERARY: "One travel tip for this trip, in one sentence",
    PageKind.PORTFOLIO: "How to work with {subject}, in one sentence",
    PageKind.RESUME: "Education, in one sentence",
    PageKind.MENU: "Opening hours and where to find {subject}, in one sentence",
    PageKind.EVENT: "How to get to the event, in one sentence",
}

_BLOCK_FIELDS: dict[PageKind, list[FormField]] = {
    # Only the sentence: asked for a name first, the model wrote sentence starts ("Our
    # bakery is a") however the question was put; the card's title is read out of it.
    PageKind.LANDING: _numbered(
        3, ("features.{i}.text", "One thing {subject} offers, in one sentence", 140, _sentences(1))
    ),
    PageKind.PRICING: _numbered(
        3,
        ("plans.{i}.name", "Plan {i} name (one word)", 16, _words(2)),
        ("plans.{i}.price", "Plan {i} price per month", 12, _PRICE),
        (
            "plans.{i}.features[]",
            "Plan {i} includes (three things, comma-separated)",
            120,
            _list(3, 4),
        ),
    ),
    PageKind.FORM: [
        *_numbered(4, ("form.fields.{i}.label", "Field {i} the form asks for", 30, _words(4))),
        FormField("form.submit", "Label of the send button", 24, _SUBMIT),
    ],
    PageKind.FAQ: _numbered(
        4,
        ("questions.{i}.question", "Question {i} a visitor asks about {subject}", 160, _QUESTION),
        ("questions.{i}.answer", "Answer {i}, in one or two sentences", 240, _sentences(2)),
    ),
    PageKind.ARTICLE: _numbered(
        3, ("paragraphs.{i}", "Paragraph {i} of the post (two sentences)", 300, _sentences(2))
    ),
    PageKind.DASHBOARD: [
        *_numbered(
            3,
            ("stats.{i}.label", "Metric {i} on the dashboard (two words)", 24, _words(3)),
            ("stats.{i}.value", "Metric {i} value", 10, _NUMBER),
        ),
        *_numbered(
            3,
            ("table.rows.{i}.0", "Table row {i} name", 20, _words(3)),
            ("table.rows.{i}.1", "Table row {i} value", 10, _NUMBER),
            ("table.rows.{i}.2", "Table row {i} status", 8, _STATUS),
        ),
    ],
    PageKind.ITINERARY: _numbered(
        3,
        ("days.{i}.title", "Day {i} plan (a few words)", 40, _words(6)),
        ("days.{i}.activities[]", "Day {i} activities (two, comma-separated)", 120, _list(3, 5)),
    ),
    PageKind.PORTFOLIO: _numbered(
        3,
        ("projects.{i}.title", "Project {i} name", 40, _words(4)),
        ("projects.{i}.text", "Project {i}, in one sentence", 140, _sentences(1)),
    ),
    PageKind.RESUME: [
        *_numbered(
            2,
            ("experience.{i}.role", "Job {i} title", 40, _words(4)),
            ("experience.{i}.organization", "Job {i} employer", 40, _words(4)),
            ("experience.{i}.period", "Job {i} years", 10, _YEARS),
            (
                "experience.{i}.summary",
                "Job {i}, what was done, in one sentence",
                160,
                _sentences(1),
            ),
        ),
        FormField("skills[]", "Skills (five, comma-separated)", 120, _list(6, 3)),
    ],
    PageKind.MENU: _numbered(
        4,
        ("dishes.{i}.name", "Dish {i} name", 40, _words(4)),
        ("dishes.{i}.description", "Dish {i} in a few words", 100, None),
        ("dishes.{i}.price", "Dish {i} price", 8, _PRICE),
    ),
    PageKind.EVENT: _numbered(
        4,
        ("schedule.{i}.time", "Schedule item {i} time", 6, _TIME),
        ("schedule.{i}.title", "Schedule item {i}", 60, None),
    ),
}

_HEAD_FIELDS = [
    FormField("tagline", "Tagline (one short sentence about {subject})", 120, _sentences(1))
]
_TAIL_FIELDS = [
    FormField(
        "call_to_action.text", "An invitation to visitors, in one sentence", 90, _sentences(1)
    ),
    FormField("call_to_action.button", "Its button label", 24, _BUTTON),
]


def form_for(kind: PageKind) -> list[FormField]:
    """The fields of ``kind``'s form, in the order the answer gives them."""
    return [
        *_HEAD_FIELDS,
        *_BLOCK_FIELDS[kind],
        *_sections(_SECOND_LEAD[kind]),
        *_TAIL_FIELDS,
    ]


def _subject_phrase(subject: str) -> str:
    """The subject as it reads inside a sentence: "A bakery in Lyon" -> "a bakery in Lyon"."""
    first, _, rest = subject.partition(" ")
    if first in {"A", "An", "The", "My", "Our"}:
        return f"{first.lower()} {rest}".strip()
    return subject


def _leads(kind: PageKind, subject: str) -> Iterator[tuple[FormField, str]]:
    phrase = _subject_phrase(subject).replace("\n", " ")
    for index, field in enumerate(form_for(kind)):
        lead = field.lead.replace("{subject}", phrase) + ":"
        yield field, ("" if index == 0 else "\n") + lead


def form_leads(kind: PageKind, subject: str) -> list[str]:
    """The lead-ins of ``kind``'s form about ``subject``, as the answer holds them (each but
    the first starts a new line)."""
    return [lead for _, lead in _leads(kind, subject)]


def _ebnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def grammar_for(kind: PageKind, subject: str) -> str:
    """The EBNF grammar of ``kind``'s form about ``subject``: lead-ins literal, values bounded.

    The answer ends with a newline after the last value; the engine then ends it (EOS).
    """
    rules = []
    names = []
    for index, (field, lead) in enumerate(_leads(kind, subject)):
        name = f"f{index}"
        names.append(name)
        rules.append(f"{name} ::= {_ebnf_literal(lead)} {field.value_rule()}")
    return "\n".join([f'root ::= {" ".join(names)} "\\n"', *rules]) + _SHARED_RULES


def parse_answer(text: str, *, kind: PageKind, title: str, subject: str) -> PageContent:
    """The content of a compose answer (a form written under :func:`grammar_for`).

    Values are found by their lead-ins, in order; a form cut short by the token limit keeps
    the fields it has (lists cut mid-way drop their incomplete entries). Raises
    ``ValueError`` when not even the tagline is there.
    """
    data: dict[str, Any] = {"title": title}
    position = 0
    found = 0
    for field, lead in _leads(kind, subject):
        start = text.find(lead.lstrip("\n"), position)
        if start < 0:
            break
        value_start = start + len(lead.lstrip("\n"))
        end = text.find("\n", value_start)
        value = text[value_start : end if end >= 0 else len(text)].strip()
        position = end if end >= 0 else len(text)
        if value:
            _put(data, field.path, _fit(value, field.max_chars))
            found += 1
    if not found:
        raise ValueError("the answer holds none of the form's fields")
    _add_fixed_parts(data, kind, title)
    return _lenient(data)


def _fit(value: str, max_chars: int) -> str:
    """``value`` within ``max_chars``: whole sentences where they fit, else cut at a word."""
    value = " ".join(value.split())
    if len(value) <= max_chars:
        return value
    cut = value[:max_chars]
    sentence_end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
    if sentence_end > max_chars // 3:
        return cut[: sentence_end + 1]
    return cut[: max_chars - 1].rsplit(" ", 1)[0].rstrip(" ,;:") + "…"


def _put(data: dict[str, Any], path: str, value: str) -> None:
    """Set ``path`` ("plans.1.features[]") in nested dicts/lists, creating them as needed."""
    as_list = path.endswith("[]")
    keys = path.removesuffix("[]").split(".")
    node: Any = data
    for key, following in zip(keys, [*keys[1:], None], strict=True):
        container: Any = [] if following is not None and following.isdigit() else {}
        if following is None:
            final: Any = _split_list(value) if as_list else value
            if isinstance(node, list):
                _grow(node, int(key))
                node[int(key)] = final
            else:
                node[key] = final
            return
        if isinstance(node, list):
            _grow(node, int(key))
            if node[int(key)] is None:
                node[int(key)] = container
            node = node[int(key)]
        else:
            node = node.setdefault(key, container)


def _grow(items: list[Any], index: int) -> None:
    items.extend([None] * (index + 1 - len(items)))


def _split_list(value: str) -> list[str]:
    parts = [part.strip(" .;") for part in re.split(r",|;| and ", value)]
    return [part for part in parts if part][:4]


# Where a sentence's leading noun phrase ends: "A warm atmosphere that makes you..."
_PHRASE_END_RE = re.compile(
    r"\s(?:that|which|who|where|when|with|for|to|is|are|was|were|makes?|gives?|brings?|"
    r"has|have|will|can|from|in|on|at|by|so|because|and then)\b|[,;:.!?]",
    re.IGNORECASE,
)
_DANGLING_WORDS = frozenset({"of", "and", "or", "the", "a", "an", "our", "your", "about", "using"})
_LEADING_ARTICLE_RE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)


def title_from_sentence(sentence: str, max_words: int = 5) -> str:
    """A card title read out of its sentence: the leading noun phrase, without its article
    ("A warm and welcoming atmosphere that makes..." -> "Warm and welcoming atmosphere")."""
    text = _LEADING_ARTICLE_RE.sub("", sentence.strip())
    end = _PHRASE_END_RE.search(text)
    phrase = text[: end.start()] if end is not None and end.start() > 0 else text
    words = phrase.split()[:max_words]
    # A participle past the first two words starts the rest of the sentence ("loaves baked
    # every morning").
    for index in range(2, len(words)):
        if words[index].lower().endswith("ed"):
            words = words[:index]
            break
    while len(words) > 1 and words[-1].lower() in _DANGLING_WORDS:
        words = words[:-1]  # "Fresh and delicious selection of" -> "... selection"
    title = " ".join(words).rstrip(" ,;:-")
    return title[:1].upper() + title[1:] if title else sentence[:40]


def _add_fixed_parts(data: dict[str, Any], kind: PageKind, title: str) -> None:
    """Headings and parts the form does not ask for: section headings, table columns,
    form field types (from the label's words), the footer."""
    for feature in data.get("features") or []:
        if isinstance(feature, dict) and feature.get("text") and not feature.get("title"):
            feature["title"] = title_from_sentence(feature["text"])
    headings = [f"About {title}", _SECOND_HEADING[kind]]
    sections = data.get("sections") or []
    data["sections"] = [
        {"heading": heading, "text": section["text"]}
        for heading, section in zip(headings, sections, strict=False)
        if isinstance(section, dict) and section.get("text")
    ]
    for number, day in enumerate(data.get("days") or [], start=1):
        if isinstance(day, dict):
            day["name"] = f"Day {number}"
    table = data.get("table")
    if isinstance(table, dict):
        table["columns"] = ["Name", "Value", "Status"]
        table["rows"] = [row for row in table.get("rows") or [] if row and all(row)]
    form = data.get("form")
    if isinstance(form, dict):
        for field in form.get("fields") or []:
            if isinstance(field, dict):
                field["type"] = _input_type(str(field.get("label", "")))
                field["required"] = True
        form.setdefault("submit", "Send")
    data["footer"] = title


_INPUT_TYPES = [
    ("email", ("email", "e-mail", "mail")),
    ("tel", ("phone", "telephone", "mobile")),
    ("date", ("date", "birthday", "day")),
    ("number", ("number", "age", "guests", "people", "quantity", "how many")),
    ("textarea", ("message", "comment", "question", "notes", "details", "tell us")),
]


def _input_type(label: str) -> str:
    lowered = label.lower()
    for input_type, words in _INPUT_TYPES:
        if any(re.search(rf"\b{re.escape(word)}\b", lowered) for word in words):
            return input_type
    return "text"


def _lenient(data: dict[str, Any]) -> PageContent:
    """Validate, dropping the list entries a cut-off left incomplete (a plan with a name but
    no price), then whole fields that still fail; only the title is indispensable."""
    for key, value in list(data.items()):
        if isinstance(value, list):
            data[key] = [item for item in value if item not in (None, "", [], {})]
    while True:
        try:
            return PageContent.model_validate(data)
        except ValidationError as error:
            entries: set[tuple[str, int]] = set()
            fields: set[str] = set()
            for issue in error.errors():
                location = issue["loc"]
                if not location or location[0] == "title":
                    raise ValueError(f"the answer's content is unusable: {error}") from None
                key = str(location[0])
                if len(location) > 1 and isinstance(location[1], int):
                    entries.add((key, location[1]))
                else:
                    fields.add(key)
            for key, index in sorted(entries, reverse=True):
                items = data.get(key)
                if isinstance(items, list) and index < len(items) and key not in fields:
                    del items[index]
                else:  # nothing to drop an entry of: drop the field, so the loop ends
                    fields.add(key)
            for key in fields:
                data.pop(key, None)
            for key in {key for key, _ in entries}:
                if data.get(key) == []:
                    data.pop(key)


def answer_text(content: PageContent, kind: PageKind, subject: str) -> str:
    """The form filled in with ``content``: the answer a model should give (for training).

    Fields the content lacks are left out of the text, which is then not a complete form;
    :func:`is_complete_answer` tells.
    """
    flat = content.model_dump()
    lines: list[str] = []
    for field, lead in _leads(kind, subject):
        value = _get(flat, field.path)
        if value is None:
            return "".join(lines)
        lines.append(f"{lead} {value}")
    return "".join(lines) + "\n"


def _get(data: Any, path: str) -> str | None:
    as_list = path.endswith("[]")
    node = data
    for key in path.removesuffix("[]").split("."):
        if isinstance(node, list):
            index = int(key)
            node = node[index] if index < len(node) else None
        elif isinstance(node, dict):
            node = node.get(key)
        if node is None:
            return None
    if as_list and isinstance(node, list):
        return ", ".join(str(item) for item in node) or None
    text = " ".join(str(node).split())
    return text or None
