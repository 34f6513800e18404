"""The page themes: the renderer's markup (unit tests) and what the real headless Chromium
draws with each theme (pixel tests on its screenshots).

Set THEME_SCREENSHOTS=/some/folder to keep the screenshots for a look.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import html5lib
import pytest

from model.page.content import EXAMPLES, PageContent, PageKind
from model.page.theming import (
    DEFAULT_THEME,
    THEMES,
    inject_theme,
    render_content,
    theme_css,
)

# ----------------------------------------------------------------------------- helpers


def _parse(html: str) -> ET.Element:
    return html5lib.parse(html, namespaceHTMLElements=False)


def _classes(element: ET.Element) -> set[str]:
    return set(element.get("class", "").split())


def _with_class(root: ET.Element, tag: str, name: str) -> list[ET.Element]:
    return [element for element in root.iter(tag) if name in _classes(element)]


def _by_id(root: ET.Element, element_id: str) -> ET.Element:
    found = [element for element in root.iter() if element.get("id") == element_id]
    assert len(found) == 1, f"{len(found)} elements with id {element_id!r}"
    return found[0]


def _text(element: ET.Element | None) -> str:
    assert element is not None, "element missing"
    return " ".join("".join(element.itertext()).split())


def _content(kind: PageKind, **changes: Any) -> PageContent:
    return PageContent.model_validate({**EXAMPLES[kind], **changes})


def _render(kind: PageKind = PageKind.LANDING, theme: str | None = None, **changes: Any) -> str:
    return render_content(_content(kind, **changes), theme=theme, description="a test page")


# ----------------------------------------------------------------------- the stylesheets


def test_every_theme_has_a_stylesheet_and_none_loads_anything_remote() -> None:
    sheets = {name: theme_css(name) for name in THEMES}
    assert len(set(sheets.values())) == len(THEMES)
    for name, css in sheets.items():
        assert "@import" not in css, name
        assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/", css, re.IGNORECASE), name
        for target in re.findall(r"url\(\s*['\"]?([^'\")]*)", css):
            assert target.startswith("data:"), (name, target)
        assert "</style" not in css.lower()


def test_default_and_names() -> None:
    assert DEFAULT_THEME == "modern"
    assert set(THEMES) == {"modern", "minimal", "playful", "corporate", "dark", "retro"}
    assert theme_css(None) == theme_css("modern") == theme_css(" Modern ")


@pytest.mark.parametrize(
    "call",
    [
        lambda: theme_css("neon"),
        lambda: render_content(_content(PageKind.LANDING), theme="neon", description=""),
        lambda: inject_theme("<html><head></head><body></body></html>", "neon"),
    ],
    ids=["theme_css", "render_content", "inject_theme"],
)
def test_unknown_theme_is_an_error_naming_the_themes(call: Any) -> None:
    with pytest.raises(ValueError, match="neon") as error:
        call()
    for name in THEMES:
        assert name in str(error.value)


# -------------------------------------------------------------------------- compose mode


def test_the_document_is_complete_with_the_theme_first_and_the_title() -> None:
    html = _render(theme="dark")
    assert html.startswith("<!DOCTYPE html>")
    root = _parse(html)
    head = root.find("head")
    assert head is not None
    title = head.find("title")
    assert title is not None and title.text == EXAMPLES[PageKind.LANDING]["title"]
    styles = head.findall("style")
    assert len(styles) == 1 and styles[0].get("data-theme") == "dark"
    assert styles[0].text is not None and theme_css("dark") in styles[0].text
    description = [m for m in head.iter("meta") if m.get("name") == "description"]
    assert description[0].get("content") == "a test page"
    for tag in ("header", "nav", "main", "footer"):
        assert root.find(f".//{tag}") is not None, tag


_INJECTION = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def test_content_is_escaped_everywhere_and_never_becomes_markup() -> None:
    content = _content(
        PageKind.LANDING,
        title="<script>alert(1)</script>",
        tagline=_INJECTION,
        footer=_INJECTION,
        sections=[{"heading": '" onclick="x', "text": _INJECTION, "items": [_INJECTION]}],
        call_to_action={"text": _INJECTION, "button": '"><b>x</b>'},
    )
    html = render_content(content, theme=None, description='"><script>bad()</script>')
    root = _parse(html)
    assert root.find(".//script") is None
    assert root.find(".//img") is None
    assert root.find(".//b") is None
    for element in root.iter():
        assert not any(name.startswith("on") for name in element.attrib), element.attrib
    title = root.find("head/title")
    assert title is not None and title.text == "<script>alert(1)</script>"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    h1 = _by_id(root, "page-title")
    assert _text(h1) == "<script>alert(1)</script>"


# For each kind: the id of its block and what must be inside it.
def _check_features(block: ET.Element) -> None:
    assert len(_with_class(block, "li", "card")) == 3


def _check_plans(block: ET.Element) -> None:
    plans = _with_class(block, "li", "plan")
    assert len(plans) == 3
    assert [_text(p.find("h3")) for p in plans] == ["Free", "Pro", "Team"]
    assert len(_with_class(block, "li", "featured")) == 1
    assert len(_with_class(block, "p", "price")) == 3


def _check_form(block: ET.Element) -> None:
    form = block.find(".//form")
    assert form is not None
    fields = EXAMPLES[PageKind.FORM]["form"]["fields"]
    inputs = form.findall(".//input")
    assert [i.get("type") for i in inputs] == [f["type"] for f in fields]
    assert [i.get("required") is not None for i in inputs] == [f["required"] for f in fields]
    labels = {label.get("for"): _text(label) for label in form.iter("label")}
    for field, control in zip(fields, inputs, strict=True):
        assert labels[control.get("id")].startswith(field["label"])
    button = form.find(".//button")
    assert button is not None and button.get("type") == "submit"
    assert _text(button) == "Sign me up"


def _check_questions(block: ET.Element) -> None:
    details = block.findall(".//details")
    assert len(details) == 4
    assert all(d.find("summary") is not None for d in details)
    assert details[0].get("open") is not None


def _check_article(block: ET.Element) -> None:
    article = block.find(".//article")
    assert article is not None
    assert len(article.findall("p")) == 3


def _check_overview(block: ET.Element) -> None:
    assert len(_with_class(block, "div", "stat")) == 3
    table = block.find(".//table")
    assert table is not None
    head_cells = table.findall("thead/tr/th")
    assert [_text(c) for c in head_cells] == ["Site", "Output", "Status"]
    rows = table.findall("tbody/tr")
    assert len(rows) == 3 and all(len(list(row)) == 3 for row in rows)
    # The numbers' column is right-aligned, header included; the words' is not.
    assert "num" in _classes(head_cells[1]) and "num" not in _classes(head_cells[2])


def _check_days(block: ET.Element) -> None:
    days = _with_class(block, "li", "day")
    assert len(days) == 3
    assert _text(_with_class(days[0], "p", "day-name")[0]) == "Day 1"


def _check_projects(block: ET.Element) -> None:
    assert len(_with_class(block, "li", "card")) == 3
    assert len(_with_class(block, "div", "thumb")) == 3


def _check_experience(block: ET.Element) -> None:
    assert len(_with_class(block, "li", "role")) == 2
    assert "Metro Bank" in _text(block)


def _check_skills(block: ET.Element) -> None:
    assert [_text(li) for li in block.findall(".//li")] == ["SQL", "Python", "Excel", "Tableau"]


def _check_menu(block: ET.Element) -> None:
    dishes = _with_class(block, "li", "dish")
    assert len(dishes) == 4
    assert _text(_with_class(dishes[0], "span", "price")[0]) == "$12"


def _check_schedule(block: ET.Element) -> None:
    slots = block.findall(".//ol/li")
    assert [_text(_with_class(s, "span", "time")[0]) for s in slots] == ["18:00", "19:00", "21:00"]


_KIND_BLOCKS: dict[PageKind, list[tuple[str, Any]]] = {
    PageKind.LANDING: [("features", _check_features)],
    PageKind.PRICING: [("plans", _check_plans)],
    PageKind.FORM: [("form", _check_form)],
    PageKind.FAQ: [("questions", _check_questions)],
    PageKind.ARTICLE: [("article", _check_article)],
    PageKind.DASHBOARD: [("overview", _check_overview)],
    PageKind.ITINERARY: [("itinerary", _check_days)],
    PageKind.PORTFOLIO: [("projects", _check_projects)],
    PageKind.RESUME: [("experience", _check_experience), ("skills", _check_skills)],
    PageKind.MENU: [("menu", _check_menu)],
    PageKind.EVENT: [("schedule", _check_schedule)],
}


@pytest.mark.parametrize("kind", list(PageKind))
def test_every_kind_renders_its_block(kind: PageKind) -> None:
    root = _parse(_render(kind))
    blocks = _KIND_BLOCKS[kind]
    for block_id, check in blocks:
        block = _by_id(root, block_id)
        assert block.tag == "section"
        check(block)
    # Only this kind's block is there, then one <section> per content section.
    block_ids = {block_id for checks in _KIND_BLOCKS.values() for block_id, _ in checks}
    present = {e.get("id") for e in root.iter("section")} & block_ids
    assert present == {block_id for block_id, _ in blocks}
    sections = [s for s in root.iter("section") if "section" in _classes(s)]
    assert [_text(s.find("h2")) for s in sections] == [
        section["heading"] for section in EXAMPLES[kind]["sections"]
    ]


@pytest.mark.parametrize("kind", list(PageKind))
def test_nav_and_every_in_page_link_lead_to_an_id(kind: PageKind) -> None:
    root = _parse(_render(kind))
    ids = [e.get("id") for e in root.iter() if e.get("id")]
    assert len(ids) == len(set(ids)), "duplicate ids"
    nav = root.find(".//header/nav")
    assert nav is not None
    nav_targets = [a.get("href", "")[1:] for a in nav.iter("a")]
    assert len(nav_targets) == len(_KIND_BLOCKS[kind]) + len(EXAMPLES[kind]["sections"])
    for element in root.iter("a"):
        href = element.get("href", "")
        assert href.startswith("#"), href
        assert href[1:] in ids, href


def test_section_ids_are_unique_and_never_empty() -> None:
    root = _parse(
        _render(
            PageKind.LANDING,
            sections=[
                {"heading": "Features", "text": "Same as the block's id.", "items": []},
                {"heading": "About us", "text": "One.", "items": []},
                {"heading": "About us!", "text": "Two.", "items": []},
                {"heading": "私たちについて", "text": "No ASCII words.", "items": []},
            ],
        )
    )
    nav = root.find(".//header/nav")
    assert nav is not None
    targets = [a.get("href") for a in nav.iter("a")]
    assert targets == ["#features", "#features-2", "#about-us", "#about-us-2", "#section-4"]


def test_a_page_without_call_to_action_or_footer_still_renders() -> None:
    content = PageContent(title="Just a title")
    root = _parse(render_content(content, theme="retro", description=""))
    assert _text(_by_id(root, "page-title")) == "Just a title"
    assert root.find(".//form") is None
    assert not any(e.get("id") == "get-started" for e in root.iter())
    for element in root.iter("a"):
        assert element.get("href") in {"#top", "#main"}


# ------------------------------------------------------------------------- document mode


_DOCUMENT = (
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    "<title>Bakery</title>\n<style>body { color: red; }</style>\n</head>\n"
    "<body><h1>Bakery</h1></body>\n</html>\n"
)


def test_inject_theme_puts_the_theme_first_in_head_after_charset() -> None:
    html = inject_theme(_DOCUMENT, "corporate")
    head = _parse(html).find("head")
    assert head is not None
    children = list(head)
    assert children[0].tag == "meta" and children[0].get("charset") == "utf-8"
    assert children[1].tag == "style" and children[1].get("data-theme") == "corporate"
    styles = head.findall("style")
    assert [s.get("data-theme") for s in styles] == ["corporate", None]
    assert html.index("data-theme") < html.index("color: red")
    assert html.count("<style") == 2
    # The rest of the document is untouched.
    assert (
        html.replace(f'\n<style data-theme="corporate">\n{theme_css("corporate")}\n</style>', "")
        == _DOCUMENT
    )


@pytest.mark.parametrize(
    "document",
    [
        "<!DOCTYPE html><html><HEAD lang='en'><title>t</title></HEAD><body><p>x</p></body></html>",
        "<!-- <head> in a comment --><!DOCTYPE html><html><head></head><body></body></html>",
        "<!DOCTYPE html><html><body><header>no head</header></body></html>",
        "<p>a fragment</p>",
    ],
    ids=["upper-case head", "head in a comment", "no head", "fragment"],
)
def test_inject_theme_finds_or_makes_the_head(document: str) -> None:
    html = inject_theme(document, None)
    head = _parse(html).find("head")
    assert head is not None
    first = next(iter(head))
    assert first.tag == "style" and first.get("data-theme") == DEFAULT_THEME
    assert html.count('data-theme="modern"') == 1
    assert "<!-- <head> in a comment -->" in html or "comment" not in document


# --------------------------------------------------------------- the real browser's view

_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(_CHROMIUM is None, reason="chromium is not installed")

_WIDTH, _HEIGHT = 1280, 1800


def _screenshot(html: str, name: str, folder: Path) -> Any:
    """Chromium's screenshot of ``html`` as an RGB Pillow image."""
    from PIL import Image

    assert _CHROMIUM is not None
    page = folder / f"{name}.html"
    page.write_text(html, encoding="utf-8")
    png = folder / f"{name}.png"
    with tempfile.TemporaryDirectory(prefix="theme-shot-") as profile:
        args = [
            _CHROMIUM,
            "--headless",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={_WIDTH},{_HEIGHT}",
        ]
        if os.geteuid() == 0:
            args.append("--no-sandbox")
        subprocess.run([*args, page.as_uri()], capture_output=True, timeout=90, check=False)
    assert png.exists(), f"Chromium wrote no screenshot for {name}"
    keep = os.environ.get("THEME_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / png.name)
    with Image.open(png) as image:
        return image.convert("RGB")


# One content that fills several kinds' blocks at once, so one screenshot shows cards,
# plans, a FAQ and a table.
def _sample_content() -> PageContent:
    data = dict(EXAMPLES[PageKind.LANDING])
    for kind, field in [
        (PageKind.PRICING, "plans"),
        (PageKind.FAQ, "questions"),
        (PageKind.DASHBOARD, "stats"),
        (PageKind.DASHBOARD, "table"),
    ]:
        data[field] = EXAMPLES[kind][field]
    return PageContent.model_validate(data)


@pytest.fixture(scope="module")
def shot_folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="theme-shots-") as folder:
        yield Path(folder)


@pytest.fixture(scope="module")
def composed_shots(shot_folder: Path) -> dict[str, Any]:
    content = _sample_content()
    return {
        theme: _screenshot(
            render_content(content, theme=theme, description="sample"),
            f"compose-{theme}",
            shot_folder,
        )
        for theme in THEMES
    }


_PLAIN_DOCUMENT = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Sunrise Bakery</title></head>
<body>
<header><h1>Sunrise Bakery</h1>
<nav><ul><li><a href="#about">About</a></li><li><a href="#order">Order</a></li></ul></nav></header>
<main>
<section id="about"><h2>Fresh bread every morning</h2>
<p>Sourdough, rye and pastries, baked before dawn with flour from local mills.</p>
<blockquote>The best croissant in town.</blockquote>
<article><h3>Sourdough</h3><p>Crusty and tangy.</p></article>
<article><h3>Croissant</h3><p>Flaky layers.</p></article>
<table><thead><tr><th>Item</th><th>Price</th></tr></thead>
<tbody><tr><td>Loaf</td><td>$6</td></tr><tr><td>Croissant</td><td>$3</td></tr></tbody></table>
</section>
<section id="order"><h2>Order ahead</h2>
<form><label for="n">Name</label><input id="n" type="text" required>
<label for="e">Email</label><input id="e" type="email">
<button type="submit">Send</button></form></section>
</main>
<footer><p>Sunrise Bakery, Market Street</p></footer>
</body></html>
"""


@pytest.fixture(scope="module")
def document_shots(shot_folder: Path) -> dict[str | None, Any]:
    shots: dict[str | None, Any] = {
        None: _screenshot(_PLAIN_DOCUMENT, "document-plain", shot_folder)
    }
    for theme in THEMES:
        shots[theme] = _screenshot(
            inject_theme(_PLAIN_DOCUMENT, theme), f"document-{theme}", shot_folder
        )
    return shots


def _luminance(image: Any) -> float:
    """Mean luminance (0-255) of the whole screenshot, mostly its background."""
    from PIL import ImageStat

    return float(ImageStat.Stat(image.convert("L")).mean[0])


def _spread(image: Any) -> float:
    from PIL import ImageStat

    return float(ImageStat.Stat(image.convert("L")).stddev[0])


def _ink_bottom(image: Any) -> int:
    """How far down the page's ink goes: the lowest row with a pixel far from the
    screenshot's commonest (background) grey."""
    grey = image.convert("L")
    background = max(grey.getcolors(256))[1]
    ink = grey.point(lambda value: 255 if abs(value - background) > 40 else 0)
    box = ink.getbbox()
    return 0 if box is None else int(box[3])


def _difference(first: Any, second: Any) -> float:
    """Mean absolute difference per channel (0-255) between two screenshots."""
    from PIL import ImageChops, ImageStat

    return sum(ImageStat.Stat(ImageChops.difference(first, second)).mean) / 3


@needs_chromium
def test_no_theme_draws_a_blank_page(composed_shots: dict[str, Any]) -> None:
    for theme, image in composed_shots.items():
        assert image.size == (_WIDTH, _HEIGHT)
        assert _spread(image) > 20, (theme, _spread(image))


@needs_chromium
def test_dark_is_dark_and_the_others_are_light(composed_shots: dict[str, Any]) -> None:
    luminance = {theme: _luminance(image) for theme, image in composed_shots.items()}
    assert luminance["dark"] < 50, luminance
    for theme in THEMES:
        if theme not in {"dark", "retro"}:
            assert luminance[theme] > 170, luminance
    # Retro's teal desktop is mid-tone, its grey windows light: still far above dark.
    assert luminance["retro"] > 90, luminance


@needs_chromium
def test_every_theme_looks_different_from_every_other(composed_shots: dict[str, Any]) -> None:
    for index, first in enumerate(THEMES):
        for second in THEMES[index + 1 :]:
            difference = _difference(composed_shots[first], composed_shots[second])
            assert difference > 15, (first, second, difference)


@needs_chromium
def test_document_mode_styles_plain_markup(document_shots: dict[str | None, Any]) -> None:
    plain = document_shots[None]
    assert _spread(plain) > 10
    for theme in THEMES:
        themed = document_shots[theme]
        difference = _difference(plain, themed)
        assert difference > 5, (theme, difference)
        # The theme lays the markup out (type scale, spacing, the nav in a row, cards in a
        # grid): the same content reaches far lower than in the browser's default styles.
        assert _ink_bottom(themed) > 1.5 * _ink_bottom(plain), (theme, _ink_bottom(themed))
    assert _luminance(document_shots["dark"]) < 50
