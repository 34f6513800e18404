"""Attachment names made from prompts."""

import pytest

from model.naming import page_filename, page_slug


@pytest.mark.parametrize(
    ("prompt", "slug"),
    [
        ("A landing page for a bakery!", "landing-bakery"),
        ("Café «Lumière» in Zürich", "cafe-lumiere-zurich"),
        ("../../etc/passwd", "etc-passwd"),
        ("   ", "page"),
        ("日本語のページ", "page"),
        ("con", "con-page"),
        ("COM1", "com1-page"),
        ("a page", "a-page"),  # only stop words: keep them rather than nothing
        ("x" * 100, "x" * 40),
    ],
)
def test_slug(prompt: str, slug: str) -> None:
    assert page_slug(prompt) == slug


def test_filename_is_short_and_safe() -> None:
    name = page_filename("a portfolio site for a wedding photographer in the Alps, with a gallery")
    assert name.endswith(".html") and len(name) <= 45
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-.")
