"""Refine examples: (current page, instruction, new page), derived from a dataset page.

A refine asks the model to edit a page it is shown (``model.prompting.plan_refine``). The
dataset holds single pages, so each example is made by an edit whose result is known
exactly: the edit is applied to the page mechanically, and the instruction says what it
did, quoting any new words, so the target is never a guess.

* Document mode (:func:`document_edit`): change the main heading, add a section, recolour
  the page, remove the footer. The prompt shows the page's body; the answer is the edited
  body, ``</body>`` and ``</html>``, as a fresh document answer is.
* Compose mode (:func:`compose_edit`): on the landing content read out of the page
  (:mod:`training.compose`): a new tagline, another button label, the features in another
  order, the two sections' texts swapped. The prompt shows the current form; the answer is
  the whole form again, so most lines are copies (what the model must learn to keep).

Both prompts come from :mod:`model.prompting`, the module inference uses.
"""

from __future__ import annotations

import html as html_lib
import random
import re
from dataclasses import dataclass

from model.page.content import PageContent, page_title
from model.page.form import BUTTON_LABELS

__all__ = ["ComposeEdit", "DocumentEdit", "compose_edit", "document_edit"]


@dataclass(frozen=True)
class DocumentEdit:
    """A document-mode refine: ``instruction`` turned the page into ``page``."""

    instruction: str
    page: str


@dataclass(frozen=True)
class ComposeEdit:
    """A compose-mode refine: ``instruction`` turned the content into ``content``."""

    instruction: str
    content: PageContent


# ---------------------------------------------------------------------------- document mode

_HEADING_RE = re.compile(r"(<(h[1-3])\b[^>]*>)(.*?)(</\2\s*>)", re.IGNORECASE | re.DOTALL)
_FOOTER_RE = re.compile(r"\s*<footer\b.*?</footer\s*>", re.IGNORECASE | re.DOTALL)
_BODY_OPEN_RE = re.compile(r"<body\b[^>]*>", re.IGNORECASE)
_BODY_CLOSE_RE = re.compile(r"</body\s*>", re.IGNORECASE)
_FOOTER_OPEN_RE = re.compile(r"<footer\b", re.IGNORECASE)
_TAG_RE = re.compile(r"<[^>]+>")

_HEADING_PATTERNS = ("Welcome to {title}", "All about {title}", "Meet {title}", "{title}")
_NEW_SECTIONS = (
    ("Opening hours", "We are open Monday to Saturday, from 9 am to 6 pm."),
    ("Contact", "Write to us any time and we will answer within a day."),
    ("Our story", "We started small, with one idea and a lot of care."),
    ("Find us", "We are in the town centre, five minutes from the station."),
    ("Newsletter", "Get our news once a month, and nothing else."),
)
_COLOURS = (
    ("dark blue", "#1e3a5f", "light", "#f5f7fa"),
    ("pale yellow", "#fff8dc", "dark", "#222222"),
    ("black", "#111111", "white", "#ffffff"),
    ("soft green", "#e8f5e9", "dark green", "#1b5e20"),
    ("light grey", "#f0f0f0", "dark", "#333333"),
)


def _plain(markup: str) -> str:
    return " ".join(html_lib.unescape(_TAG_RE.sub(" ", markup)).split())


def _retitle(page: str, description: str, rng: random.Random) -> DocumentEdit | None:
    """The first h1 (else h2, h3) gets a new text, named in the instruction."""
    headings = list(_HEADING_RE.finditer(page))
    if not headings:
        return None
    heading = min(headings, key=lambda match: (match.group(2).lower(), match.start()))
    old = _plain(heading.group(3))
    options = [p.format(title=page_title(description)) for p in _HEADING_PATTERNS]
    options = [option for option in options if option != old]
    new = rng.choice(options)
    edited = page[: heading.start(3)] + html_lib.escape(new, quote=False) + page[heading.end(3) :]
    return DocumentEdit(f'Change the main heading to "{new}".', edited)


def _insert_before_end(page: str, markup: str) -> str | None:
    """``markup`` put before the page's footer, else before ``</body>``."""
    footer = _FOOTER_OPEN_RE.search(page)
    closing = list(_BODY_CLOSE_RE.finditer(page))
    if footer is not None:
        at = footer.start()
    elif closing:
        at = closing[-1].start()
    else:
        return None
    return f"{page[:at]}{markup}\n{page[at:]}"


def _add_section(page: str, rng: random.Random) -> DocumentEdit | None:
    """A new section, its heading and text quoted in the instruction."""
    free = [(h, t) for h, t in _NEW_SECTIONS if h.lower() not in _plain(page).lower()]
    if not free:
        return None
    heading, text = rng.choice(free)
    edited = _insert_before_end(page, f"<section>\n<h2>{heading}</h2>\n<p>{text}</p>\n</section>")
    if edited is None:
        return None
    return DocumentEdit(f'Add a section "{heading}" that says: {text}', edited)


def _recolour(page: str, rng: random.Random) -> DocumentEdit | None:
    """A stylesheet at the start of the body sets the page's background and text colour
    (after the head's CSS, so it wins)."""
    opening = _BODY_OPEN_RE.search(page)
    if opening is None:
        return None
    name, background, text_name, colour = rng.choice(_COLOURS)
    style = f"\n<style>body{{background:{background};color:{colour}}}</style>"
    edited = page[: opening.end()] + style + page[opening.end() :]
    return DocumentEdit(f"Make the background {name} with {text_name} text.", edited)


def _remove_footer(page: str) -> DocumentEdit | None:
    footer = _FOOTER_RE.search(page)
    if footer is None:
        return None
    return DocumentEdit("Remove the footer.", page[: footer.start()] + page[footer.end() :])


def document_edit(page: str, description: str, rng: random.Random) -> DocumentEdit | None:
    """One edit of ``page`` (HTML), picked with ``rng`` among those that apply; ``None``
    when none does (no heading, no body)."""
    edits = [
        _retitle(page, description, rng),
        _add_section(page, rng),
        _recolour(page, rng),
        _remove_footer(page),
    ]
    possible = [edit for edit in edits if edit is not None and edit.page != page]
    return rng.choice(possible) if possible else None


# ----------------------------------------------------------------------------- compose mode

_TAGLINE_PATTERNS = (
    "Welcome to {title}, where every visit counts.",
    "Good things happen at {title} every day.",
    "Come and see what {title} can do for you.",
)
_ORDINALS = ("first", "second", "third")


def _new_tagline(content: PageContent, rng: random.Random) -> ComposeEdit | None:
    tagline = rng.choice(_TAGLINE_PATTERNS).format(title=content.title)
    if tagline == content.tagline:
        return None
    changed = content.model_copy(update={"tagline": tagline})
    return ComposeEdit(f'Change the tagline to "{tagline}"', changed)


def _new_button(content: PageContent, rng: random.Random) -> ComposeEdit | None:
    action = content.call_to_action
    if action is None:
        return None
    label = rng.choice([label for label in BUTTON_LABELS if label != action.button])
    changed = content.model_copy(
        update={"call_to_action": action.model_copy(update={"button": label})}
    )
    return ComposeEdit(f'Make the button say "{label}".', changed)


def _feature_first(content: PageContent, rng: random.Random) -> ComposeEdit | None:
    features = list(content.features or [])
    if len(features) < 2:
        return None
    index = rng.randrange(1, len(features))
    reordered = [features[index], *features[:index], *features[index + 1 :]]
    changed = content.model_copy(update={"features": reordered})
    return ComposeEdit(f"Put the {_ORDINALS[index]} feature first.", changed)


def _swap_sections(content: PageContent) -> ComposeEdit | None:
    sections = content.sections
    if len(sections) < 2 or sections[0].text == sections[1].text:
        return None
    first = sections[0].model_copy(update={"text": sections[1].text})
    second = sections[1].model_copy(update={"text": sections[0].text})
    changed = content.model_copy(update={"sections": [first, second, *sections[2:]]})
    return ComposeEdit("Swap the texts of the two sections.", changed)


def compose_edit(content: PageContent, rng: random.Random) -> ComposeEdit | None:
    """One edit of ``content``, picked with ``rng`` among those that apply."""
    edits = [
        _new_tagline(content, rng),
        _new_button(content, rng),
        _feature_first(content, rng),
        _swap_sections(content),
    ]
    possible = [edit for edit in edits if edit is not None]
    return rng.choice(possible) if possible else None
