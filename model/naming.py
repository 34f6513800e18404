"""Safe file names for generated pages."""

from __future__ import annotations

import re
import unicodedata

# Names Windows refuses for a file, whatever the extension.
_RESERVED = {"con", "prn", "aux", "nul"} | {
    f"{port}{n}" for port in ("com", "lpt") for n in range(10)
}
_STOP_WORDS = {"a", "an", "the", "for", "of", "and", "with", "to", "in", "on", "my", "page"}


def page_slug(prompt: str, max_length: int = 40) -> str:
    """A short, filesystem- and URL-safe name from a prompt: ``"A bakery!"`` -> ``bakery``.

    ASCII letters, digits and dashes only, never empty, never a dot file, so it is safe as
    a Discord attachment name on every OS.
    """
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    meaningful = [word for word in words if word not in _STOP_WORDS] or words
    slug = ""
    for word in meaningful:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_length:
            break
        slug = candidate
    slug = slug or (meaningful[0][:max_length] if meaningful else "page")
    return f"{slug}-page" if slug in _RESERVED else slug


def page_filename(prompt: str) -> str:
    return f"{page_slug(prompt)}.html"
