"""model.page.form: the compose form's grammar, parser and writer agree with each other."""

from __future__ import annotations

from typing import Any

import pytest

from model.page.content import PageContent, PageKind, classify_prompt, page_subject, page_title
from model.page.form import (
    answer_text,
    form_for,
    form_leads,
    grammar_for,
    parse_answer,
)

xgrammar = pytest.importorskip("xgrammar")

SUBJECT = "A bakery in Lyon"

# A filled-in value for every field pattern, as a model would write it.
_VALUES = {
    "price": "$12",
    "value": "4.2k",
    "status": "OK",
    "time": "18:30",
    "years": "2019-2023",
}


def _value_for(lead: str) -> str:
    lowered = lead.lower()
    if "button" in lowered:  # picked from a list, not written
        return "Send" if "send button" in lowered else "Book now"
    if "price" in lowered:
        return _VALUES["price"]
    if "value" in lowered:
        return _VALUES["value"]
    if "status" in lowered:
        return _VALUES["status"]
    if "time" in lowered:
        return _VALUES["time"]
    if "years" in lowered:
        return _VALUES["years"]
    if "question" in lowered:
        return "Do you bake bread every day?"
    if "comma-separated" in lowered:
        return "Fresh bread, warm croissants, good coffee"
    if "sentence" in lowered or "paragraph" in lowered:
        return "We bake fresh bread every morning."
    return "Fresh Bread"


def _filled_form(kind: PageKind, subject: str = SUBJECT) -> str:
    """A complete answer for ``kind``: every lead-in followed by a plausible value."""
    return "".join(f"{lead} {_value_for(lead)}" for lead in form_leads(kind, subject)) + "\n"


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer: Any) -> Any:
    info = xgrammar.TokenizerInfo.from_huggingface(tiny_tokenizer)
    return xgrammar.GrammarCompiler(info)


def _accepts(compiler: Any, kind: PageKind, text: str, subject: str = SUBJECT) -> bool:
    matcher = xgrammar.GrammarMatcher(compiler.compile_grammar(grammar_for(kind, subject)))
    return bool(matcher.accept_string(text)) and bool(matcher.is_completed())


@pytest.mark.parametrize("kind", list(PageKind))
def test_grammar_accepts_a_filled_form_and_parser_reads_it_back(
    compiler: Any, kind: PageKind
) -> None:
    text = _filled_form(kind)
    assert _accepts(compiler, kind, text)
    content = parse_answer(text, kind=kind, title="Bakery", subject=SUBJECT)
    assert content.title == "Bakery"
    assert content.tagline == "We bake fresh bread every morning."
    assert len(content.sections) == 2
    assert content.call_to_action is not None
    # The block of the kind is filled, the others are not.
    block = {
        PageKind.LANDING: content.features,
        PageKind.PRICING: content.plans,
        PageKind.FORM: content.form,
        PageKind.FAQ: content.questions,
        PageKind.ARTICLE: content.paragraphs,
        PageKind.DASHBOARD: content.stats,
        PageKind.ITINERARY: content.days,
        PageKind.PORTFOLIO: content.projects,
        PageKind.RESUME: content.experience,
        PageKind.MENU: content.dishes,
        PageKind.EVENT: content.schedule,
    }[kind]
    assert block
    # Writing the content back gives the same form (training builds answers this way).
    assert answer_text(content, kind, SUBJECT) == text


@pytest.mark.parametrize(
    "bad",
    [
        ("Tagline (one short sentence about a bakery in Lyon):", " ```html <div>"),
        ("Tagline (one short sentence about a bakery in Lyon):", " مرحبا بكم."),
        ("Tagline (one short sentence about a bakery in Lyon):", " " + "Very " * 40 + "long."),
        ("Tagline (one short sentence about a bakery in Lyon):", ' "Quoted tagline."'),
    ],
    ids=["markup", "other-script", "run-on-sentence", "quotes"],
)
def test_grammar_refuses_what_small_models_drift_into(compiler: Any, bad: tuple[str, str]) -> None:
    lead, value = bad
    matcher = xgrammar.GrammarMatcher(
        compiler.compile_grammar(grammar_for(PageKind.LANDING, SUBJECT))
    )
    assert matcher.accept_string(lead)
    assert not matcher.accept_string(value)


def test_price_and_status_follow_their_patterns(compiler: Any) -> None:
    good = _filled_form(PageKind.PRICING)
    assert _accepts(compiler, PageKind.PRICING, good)
    assert not _accepts(compiler, PageKind.PRICING, good.replace("$12", "twelve"))
    dashboard = _filled_form(PageKind.DASHBOARD)
    assert not _accepts(compiler, PageKind.DASHBOARD, dashboard.replace(" OK", " Fine"))


def test_lead_ins_ask_about_the_subject() -> None:
    grammar = grammar_for(PageKind.FAQ, "A dog grooming salon")
    assert "about a dog grooming salon" in grammar
    assert form_leads(PageKind.FAQ, "A dog grooming salon")[0].startswith("Tagline")
    fields = [line for line in grammar.splitlines() if line.startswith("f")]
    assert len(form_for(PageKind.FAQ)) == len(fields)


def test_cut_off_answer_keeps_what_it_has() -> None:
    text = _filled_form(PageKind.PRICING, "A yoga app")
    cut = text[: text.index("Plan 2 price")]
    content = parse_answer(cut, kind=PageKind.PRICING, title="Yoga", subject="A yoga app")
    assert content.plans is not None and content.plans[0].price == "$12"
    # The second plan has a name but no price: an incomplete entry is dropped, not invented.
    assert all(plan.price for plan in content.plans)
    assert content.call_to_action is None


def test_answer_without_any_field_is_refused() -> None:
    with pytest.raises(ValueError, match="none of the form"):
        parse_answer("Sure! Here is your page.", kind=PageKind.LANDING, title="X", subject="X")


def test_overlong_values_are_cut_at_a_word_within_the_content_bounds() -> None:
    text = _filled_form(PageKind.PORTFOLIO).replace(
        "Fresh Bread", "Fresh " + "Sourdough " * 12 + "Bread", 1
    )
    content = parse_answer(text, kind=PageKind.PORTFOLIO, title="Bakery", subject=SUBJECT)
    assert content.projects is not None
    title = content.projects[0].title
    assert len(title) <= 40 and title.endswith("…") and "  " not in title
    PageContent.model_validate(content.model_dump())  # still within every bound


def test_form_field_types_come_from_labels() -> None:
    text = _filled_form(PageKind.FORM, "A chess club")
    for label in ["Your email", "Phone number", "Preferred date", "Your message"]:
        text = text.replace("Fresh Bread", label, 1)
    content = parse_answer(text, kind=PageKind.FORM, title="Sign up", subject="A chess club")
    assert content.form is not None
    assert [field.type for field in content.form.fields] == ["email", "tel", "date", "textarea"]
    assert all(field.required for field in content.form.fields)


@pytest.mark.parametrize(
    ("prompt", "kind", "subject", "title"),
    [
        (
            "a landing page for a bakery in Lyon",
            PageKind.LANDING,
            "A bakery in Lyon",
            "Bakery in Lyon",
        ),
        (
            "A pricing page for a yoga studio app",
            PageKind.PRICING,
            "A yoga studio app",
            "Yoga studio app",
        ),
        (
            "an FAQ for a dog grooming salon",
            PageKind.FAQ,
            "A dog grooming salon",
            "Dog grooming salon",
        ),
        ("a signup form for a chess club", PageKind.FORM, "A chess club", "Chess club"),
        ("my resume as a nurse", PageKind.RESUME, "My resume as a nurse", "My resume as a nurse"),
        ("a dashboard for a solar farm", PageKind.DASHBOARD, "A solar farm", "Solar farm"),
        (
            "a blog post about learning to bake bread",
            PageKind.ARTICLE,
            "Learning to bake bread",
            "Learning to bake bread",
        ),
        ("a 3-day itinerary for Rome", PageKind.ITINERARY, "Rome", "Rome"),
        (
            "a price list for a house cleaning service",
            PageKind.PRICING,
            "A house cleaning service",
            "House cleaning service",
        ),
        (
            "a sales dashboard with revenue and recent orders",
            PageKind.DASHBOARD,
            "A sales dashboard",
            "Sales dashboard",
        ),
        (
            "a blog post with five tips for working from home",
            PageKind.ARTICLE,
            "Five tips for working from home",
            "Five tips for working from home",
        ),
        (
            "a homepage for a coworking space in Berlin: desks, meeting rooms",
            PageKind.LANDING,
            "A coworking space in Berlin",
            "Coworking space in Berlin",
        ),
        (
            "a landing page for a dog walking service with three reasons to choose us",
            PageKind.LANDING,
            "A dog walking service",
            "Dog walking service",
        ),
    ],
)
def test_prompt_gives_kind_subject_and_title(
    prompt: str, kind: PageKind, subject: str, title: str
) -> None:
    assert classify_prompt(prompt) is kind
    assert page_subject(prompt) == subject
    assert page_title(prompt) == title


@pytest.mark.parametrize(
    ("prompt", "kind"),
    [
        ("a resume for a registered nurse", PageKind.RESUME),  # not a registration form
        ("a registration form for a marathon", PageKind.FORM),
        ("pricing plans for a gym", PageKind.PRICING),
        ("a page about the format of our podcast", PageKind.LANDING),  # "format" is no form
        ("our upcoming events", PageKind.EVENT),
    ],
)
def test_kinds_match_whole_words(prompt: str, kind: PageKind) -> None:
    assert classify_prompt(prompt) is kind


@pytest.mark.parametrize(
    ("sentence", "title"),
    [
        (
            "A warm and welcoming atmosphere that makes you feel at home.",
            "Warm and welcoming atmosphere",
        ),
        ("Fresh sourdough loaves baked every morning.", "Fresh sourdough loaves"),
        ("Your furry companion is always with you!", "Your furry companion"),
        ("Hand-picked coffee beans, roasted in small batches.", "Hand-picked coffee beans"),
        ("A fresh and delicious selection of baked goods.", "Fresh and delicious selection"),
    ],
)
def test_feature_titles_are_read_out_of_their_sentence(sentence: str, title: str) -> None:
    from model.page.form import title_from_sentence

    assert title_from_sentence(sentence) == title
    text = _filled_form(PageKind.LANDING).replace("We bake fresh bread every morning.", sentence)
    content = parse_answer(text, kind=PageKind.LANDING, title="X", subject=SUBJECT)
    assert content.features is not None and content.features[0].title == title
