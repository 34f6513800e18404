"""What a page says, apart from how it looks: the content compose mode renders.

In ``compose`` mode the model does not write markup: it fills in a guided form of short
lines (``model.page.form``) whose values become a :class:`PageContent` (title, tagline, a
block that fits the kind of page the prompt asks for, a few sections, a call to action, a
footer), and the project's themed templates (``model.page.theming``) turn it into the page.
Every field is short and bounded: a 135M model writes usable prose in a sentence or two and
rambles past that.

The kind of page (pricing, FAQ, form, ...) comes from the prompt's words
(:func:`classify_prompt`); the title from its subject (:func:`page_subject`). Each kind has
hand-written sample content (:data:`EXAMPLES`) that the themes are designed and tested with.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "EXAMPLES",
    "PageContent",
    "PageKind",
    "classify_prompt",
    "page_subject",
    "page_title",
]


class PageKind(StrEnum):
    """The kinds of page compose mode knows; each has its own content block."""

    LANDING = "landing"
    PRICING = "pricing"
    FORM = "form"
    FAQ = "faq"
    ARTICLE = "article"
    DASHBOARD = "dashboard"
    ITINERARY = "itinerary"
    PORTFOLIO = "portfolio"
    RESUME = "resume"
    MENU = "menu"
    EVENT = "event"


# First match wins, so the more specific kinds come first ("a pricing page for a café" is
# pricing, not a menu). Words match whole words (or their plurals), case-insensitively.
_KIND_WORDS: list[tuple[PageKind, tuple[str, ...]]] = [
    (PageKind.PRICING, ("pricing", "price list", "plans", "subscription", "tiers")),
    (PageKind.FAQ, ("faq", "frequently asked", "questions and answers", "q&a", "help center")),
    (
        PageKind.FORM,
        ("form", "sign up", "signup", "sign-up", "register", "registration", "rsvp", "survey"),
    ),
    (PageKind.RESUME, ("resume", "résumé", "cv", "curriculum vitae")),
    (PageKind.DASHBOARD, ("dashboard", "analytics", "admin panel", "metrics", "statistics")),
    (PageKind.ITINERARY, ("itinerary", "trip", "travel plan", "road trip", "day-by-day")),
    (PageKind.PORTFOLIO, ("portfolio", "gallery", "showcase", "projects")),
    (PageKind.MENU, ("menu", "restaurant", "café", "cafe", "bistro", "pizzeria", "food truck")),
    (PageKind.EVENT, ("event", "conference", "wedding", "festival", "meetup", "concert")),
    (PageKind.ARTICLE, ("blog", "article", "post", "essay", "news", "story", "recipe")),
]


def classify_prompt(prompt: str) -> PageKind:
    """The kind of page a prompt asks for; :attr:`PageKind.LANDING` when nothing says more."""
    text = prompt.lower()
    for kind, words in _KIND_WORDS:
        for word in words:
            # Whole words (plurals too): "registered nurse" is no registration form.
            if re.search(r"(?<![\w])" + re.escape(word) + r"(?:s|es)?(?![\w])", text):
                return kind
    return PageKind.LANDING


# Leading words that say what kind of page it is rather than what it is about:
# "a landing page for a bakery in Lyon" is about "a bakery in Lyon".
_PAGE_WORDS_RE = re.compile(
    r"^(?:please\s+)?(?:(?:create|make|build|write|design|generate|give me)\s+)?"
    r"(?:(?:a|an|the|my|our)\s+)?"
    r"(?:(?:simple|modern|dark|minimal|clean|beautiful|playful|corporate|retro|responsive|"
    r"one[- ]page|single[- ]page|small|new|\d+[- ]days?|weekend|short|personal)\s+)*"
    r"(?:(?:landing|home|web|pricing|faq|contact|signup|sign-up|registration|portfolio|"
    r"resume|cv|blog|dashboard|menu|event|product|about|itinerary|booking|order)"
    r"(?:\s+(?:page|site|website|homepage|post|form|table))?\s+"
    r"|(?:page|site|website|homepage|post|form)\s+)(?:for|about|of|on)\s+",
    re.IGNORECASE,
)


# Where the subject ends and the wish list begins: "a bakery in Lyon with our breads".
_DETAILS_RE = re.compile(
    r"(?::|;|,| - | with | that | which | including | featuring | showing | where | listing )",
    re.IGNORECASE,
)


_PAGE_NOUN_FOR_RE = re.compile(
    r"^(?:[\w'-]+\s+){0,4}?"
    r"(?:page|site|list|menu|plans?|itinerary|questions|faq|showcase|gallery|story|article|"
    r"post|form|survey|table|dashboard|panel|schedule|resume|cv|portfolio|newsletter)"
    r"\s+(?:for|about|of|on)\s+",
    re.IGNORECASE,
)
_PAGE_ONLY_RE = re.compile(
    r"^(?:(?:a|an|the|my|our)\s+)?(?:[\w-]+\s+)?"
    r"(?:page|site|website|homepage|post|blog|form|article)$",
    re.IGNORECASE,
)


def page_subject(description: str) -> str:
    """What the page is about, for its title and the form's questions: "a landing page for
    a bakery in Lyon with our breads" -> "A bakery in Lyon"."""
    text = " ".join(description.split())
    subject = _PAGE_WORDS_RE.sub("", text, count=1) or text
    # "a price list for a house cleaning service", "questions for a VPN app": what comes
    # before "for" names the kind of page, what comes after is the subject.
    named = _PAGE_NOUN_FOR_RE.match(subject)
    if named is not None and len(subject) > named.end():
        subject = subject[named.end() :]
    details = _DETAILS_RE.search(subject)
    if details is not None and details.start() >= 3:
        head, tail = subject[: details.start()], subject[details.end() :]
        # "a blog post with five tips for working from home": the head names only the kind
        # of page, so the subject is what follows.
        subject = tail if _PAGE_ONLY_RE.match(head) and tail.strip() else head
    subject = subject.rstrip(" .!")
    if len(subject) > 60:
        subject = subject[:60].rsplit(" ", 1)[0].rstrip(" ,.;:") + "…"
    return subject[:1].upper() + subject[1:] if subject else "Generated page"


def page_title(description: str) -> str:
    """The page's title, from its subject: "a landing page for a bakery" -> "Bakery"."""
    subject = page_subject(description)
    first, _, rest = subject.partition(" ")
    if first in {"A", "An", "The"} and rest:
        return rest[:1].upper() + rest[1:]
    return subject


# ------------------------------------------------------------------------------- the data

_SHORT = 40
_LINE = 90
_SENTENCES = 240


def _text(max_length: int) -> Any:
    return Field(min_length=1, max_length=max_length)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class Section(_Strict):
    heading: str = _text(_SHORT)
    text: str = _text(_SENTENCES)
    items: list[str] = Field(default_factory=list, max_length=4)


class Card(_Strict):
    title: str = _text(_SHORT)
    text: str = _text(140)


class CallToAction(_Strict):
    text: str = _text(_LINE)
    button: str = _text(24)


class Plan(_Strict):
    name: str = _text(24)
    price: str = _text(12)
    features: list[str] = Field(min_length=1, max_length=4)


class FormField(_Strict):
    label: str = _text(30)
    type: Literal["text", "email", "tel", "number", "date", "textarea"] = "text"
    required: bool = False


class Form(_Strict):
    fields: list[FormField] = Field(min_length=1, max_length=6)
    submit: str = _text(24)


class Question(_Strict):
    question: str = _text(160)  # the grammar bounds it to 15 words: keep its "?"
    answer: str = _text(_SENTENCES)


class Stat(_Strict):
    label: str = _text(24)
    value: str = _text(12)


class Table(_Strict):
    columns: list[str] = Field(min_length=2, max_length=4)
    rows: list[list[str]] = Field(min_length=1, max_length=5)


class Day(_Strict):
    name: str = _text(16)
    title: str = _text(_SHORT)
    activities: list[str] = Field(min_length=1, max_length=4)


class Role(_Strict):
    role: str = _text(_SHORT)
    organization: str = _text(_SHORT)
    period: str = _text(20)
    summary: str = _text(160)


class Dish(_Strict):
    name: str = _text(_SHORT)
    description: str = _text(100)
    price: str = _text(10)


class Slot(_Strict):
    time: str = _text(12)
    title: str = _text(60)


class PageContent(_Strict):
    """Everything a composed page shows. Only the block of the page's kind is filled."""

    title: str = _text(60)
    tagline: str = Field(default="", max_length=140)
    features: list[Card] | None = None  # landing
    plans: list[Plan] | None = None  # pricing
    form: Form | None = None  # form
    questions: list[Question] | None = None  # faq
    paragraphs: list[str] | None = None  # article
    stats: list[Stat] | None = None  # dashboard
    table: Table | None = None  # dashboard
    days: list[Day] | None = None  # itinerary
    projects: list[Card] | None = None  # portfolio
    experience: list[Role] | None = None  # resume
    skills: list[str] | None = None  # resume
    dishes: list[Dish] | None = None  # menu
    schedule: list[Slot] | None = None  # event
    sections: list[Section] = Field(default_factory=list, max_length=5)
    call_to_action: CallToAction | None = None
    footer: str = Field(default="", max_length=_LINE)


# ---------------------------------------------------------------------------- sample content

_COMMON_TAIL = {
    "call_to_action": {"text": "Questions before you start?", "button": "Contact us"},
}

# Hand-written content of every kind: what the themes are designed and tested with, and
# what `python -m bench.constrained` measures the grammar libraries on.
EXAMPLES: dict[PageKind, dict[str, Any]] = {
    PageKind.LANDING: {
        "title": "Green Thumb Gardening",
        "tagline": "Garden care for busy people in Leeds.",
        "features": [
            {"title": "Weekly visits", "text": "We mow, weed and water so you don't have to."},
            {"title": "Seasonal planting", "text": "Fresh flowers chosen for each season."},
            {"title": "Fair prices", "text": "One flat monthly fee, no surprises."},
        ],
        "sections": [
            {
                "heading": "About us",
                "text": "A small team of gardeners who have loved plants for twenty years.",
                "items": [],
            },
            {
                "heading": "How it works",
                "text": "Book a free visit and we plan your garden together.",
                "items": ["Book a visit", "Get a plan", "Enjoy your garden"],
            },
        ],
        "call_to_action": {"text": "Ready for a greener garden?", "button": "Book a visit"},
        "footer": "Green Thumb Gardening, Leeds",
    },
    PageKind.PRICING: {
        "title": "CloudNote Pricing",
        "tagline": "Simple plans for notes that follow you everywhere.",
        "plans": [
            {"name": "Free", "price": "$0", "features": ["100 notes", "1 device", "Sync"]},
            {
                "name": "Pro",
                "price": "$4/mo",
                "features": ["Unlimited notes", "5 devices", "Offline mode"],
            },
            {
                "name": "Team",
                "price": "$12/mo",
                "features": ["Shared folders", "Admin tools", "Priority support"],
            },
        ],
        "sections": [
            {
                "heading": "Every plan includes",
                "text": "Encryption and daily backups.",
                "items": ["Encryption", "Backups"],
            },
            {
                "heading": "Cancel anytime",
                "text": "No contracts. Change plans in one click.",
                "items": [],
            },
        ],
        **_COMMON_TAIL,
        "footer": "CloudNote, 2025",
    },
    PageKind.FORM: {
        "title": "Join the Chess Club",
        "tagline": "Weekly games for players of every level.",
        "form": {
            "fields": [
                {"label": "Full name", "type": "text", "required": True},
                {"label": "Email", "type": "email", "required": True},
                {"label": "Your rating", "type": "number", "required": False},
            ],
            "submit": "Sign me up",
        },
        "sections": [
            {
                "heading": "When we meet",
                "text": "Every Tuesday at 7 pm in the library.",
                "items": [],
            },
            {
                "heading": "What to bring",
                "text": "Just yourself. We have boards and clocks.",
                "items": [],
            },
        ],
        **_COMMON_TAIL,
        "footer": "City Chess Club",
    },
    PageKind.FAQ: {
        "title": "Bike Rental FAQ",
        "tagline": "Answers to what riders ask us most.",
        "questions": [
            {"question": "Do I need a helmet?", "answer": "Yes, and we lend one for free."},
            {"question": "How long can I rent?", "answer": "From one hour to one week."},
            {"question": "Can I cancel?", "answer": "Cancel up to a day before at no cost."},
            {"question": "Are e-bikes available?", "answer": "Yes, book them online."},
        ],
        "sections": [
            {"heading": "Still unsure?", "text": "Call us and we will help.", "items": []},
            {"heading": "Opening hours", "text": "Every day from 8 am to 8 pm.", "items": []},
        ],
        **_COMMON_TAIL,
        "footer": "Pedal Rentals",
    },
    PageKind.ARTICLE: {
        "title": "Why I Switched to Cold Showers",
        "tagline": "One month of cold water, and what changed.",
        "paragraphs": [
            "It started as a dare from a friend in January.",
            "The first week was hard, but I felt awake every morning.",
            "By the end of the month I slept better and felt calmer.",
        ],
        "sections": [
            {"heading": "What I learned", "text": "Small habits add up.", "items": []},
            {
                "heading": "Try it yourself",
                "text": "Start with thirty seconds.",
                "items": ["Go slowly", "Breathe"],
            },
        ],
        "call_to_action": {"text": "Want more stories like this?", "button": "Subscribe"},
        "footer": "Written by Sam Lee",
    },
    PageKind.DASHBOARD: {
        "title": "Solar Farm Dashboard",
        "tagline": "Today's output at a glance.",
        "stats": [
            {"label": "Output", "value": "4.2 MW"},
            {"label": "Panels online", "value": "98%"},
            {"label": "Savings", "value": "$1,240"},
        ],
        "table": {
            "columns": ["Site", "Output", "Status"],
            "rows": [
                ["North", "2.1 MW", "OK"],
                ["South", "1.4 MW", "OK"],
                ["East", "0.7 MW", "Check"],
            ],
        },
        "sections": [
            {"heading": "Alerts", "text": "East site needs a panel check.", "items": []},
            {"heading": "Weather", "text": "Sunny all day.", "items": []},
        ],
        "call_to_action": {"text": "Need the full report?", "button": "Download"},
        "footer": "Updated every hour",
    },
    PageKind.ITINERARY: {
        "title": "Three Days in Kyoto",
        "tagline": "Temples, gardens and food.",
        "days": [
            {
                "name": "Day 1",
                "title": "Eastern temples",
                "activities": ["Kiyomizu-dera", "Walk to Gion"],
            },
            {
                "name": "Day 2",
                "title": "Bamboo and gardens",
                "activities": ["Arashiyama grove", "Tenryu-ji garden"],
            },
            {"name": "Day 3", "title": "Markets", "activities": ["Nishiki market", "Tea class"]},
        ],
        "sections": [
            {"heading": "Getting around", "text": "Buses reach every stop.", "items": []},
            {"heading": "Packing", "text": "Comfortable shoes.", "items": ["Shoes", "Umbrella"]},
        ],
        "call_to_action": {"text": "Want this trip?", "button": "Plan it"},
        "footer": "Happy travels",
    },
    PageKind.PORTFOLIO: {
        "title": "Mia Chen, Illustrator",
        "tagline": "Children's books and editorial art.",
        "projects": [
            {"title": "The Lost Kite", "text": "A picture book about a kite and a girl."},
            {"title": "City Birds", "text": "Twelve prints of birds in the city."},
            {"title": "Food Magazine", "text": "Monthly covers for a cooking magazine."},
        ],
        "sections": [
            {"heading": "About me", "text": "I draw with ink and watercolour.", "items": []},
            {"heading": "Clients", "text": "Publishers and magazines.", "items": []},
        ],
        "call_to_action": {"text": "Have a project in mind?", "button": "Get in touch"},
        "footer": "Mia Chen Studio",
    },
    PageKind.RESUME: {
        "title": "Alex Rivera",
        "tagline": "Data analyst who turns numbers into decisions.",
        "experience": [
            {
                "role": "Data Analyst",
                "organization": "Metro Bank",
                "period": "2021-now",
                "summary": "Built weekly reports used by 40 branches.",
            },
            {
                "role": "Intern",
                "organization": "City Council",
                "period": "2020",
                "summary": "Cleaned survey data.",
            },
        ],
        "skills": ["SQL", "Python", "Excel", "Tableau"],
        "sections": [
            {"heading": "Education", "text": "BSc Statistics, 2020.", "items": []},
            {"heading": "Languages", "text": "English and Spanish.", "items": []},
        ],
        "call_to_action": {"text": "Looking for an analyst?", "button": "Email me"},
        "footer": "Alex Rivera",
    },
    PageKind.MENU: {
        "title": "Luna Noodle Bar",
        "tagline": "Hand-pulled noodles since 2010.",
        "dishes": [
            {"name": "Beef noodles", "description": "Slow broth, fresh noodles.", "price": "$12"},
            {"name": "Veggie bowl", "description": "Tofu, greens, sesame.", "price": "$10"},
            {"name": "Dumplings", "description": "Six pork dumplings.", "price": "$7"},
            {"name": "Iced tea", "description": "Jasmine, lightly sweet.", "price": "$3"},
        ],
        "sections": [
            {"heading": "Opening hours", "text": "Tuesday to Sunday, noon to 10 pm.", "items": []},
            {"heading": "Find us", "text": "12 Harbour Street.", "items": []},
        ],
        "call_to_action": {"text": "Hungry?", "button": "Book a table"},
        "footer": "Luna Noodle Bar",
    },
    PageKind.EVENT: {
        "title": "Harbour Jazz Night",
        "tagline": "Live jazz by the water, June 14.",
        "schedule": [
            {"time": "18:00", "title": "Doors open"},
            {"time": "19:00", "title": "The Blue Trio"},
            {"time": "21:00", "title": "Late jam session"},
        ],
        "sections": [
            {"heading": "Tickets", "text": "Free entry, donations welcome.", "items": []},
            {"heading": "Getting there", "text": "Tram 4 to the harbour.", "items": []},
        ],
        "call_to_action": {"text": "Coming along?", "button": "Save my spot"},
        "footer": "Harbour Arts",
    },
}
