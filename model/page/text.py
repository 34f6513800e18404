"""Stage 1-2 of the page pipeline: text hygiene and repetition.

1. **Text** – bytes are decoded as UTF-8 with replacement; BOMs (U+FEFF) are dropped; CRLF/CR
   become LF; NUL, the other C0 controls except tab/newline, DEL, the C1 controls and Unicode
   noncharacters are removed and lone surrogates replaced (``invalid_text``). Everything the
   HTML parser would call an "invalid codepoint" is gone here, so the output is valid UTF-8.
2. **Repetition** – a degenerate repeated tail (the same line or block again and again until
   the token limit) is cut to its first occurrence (``repetition``), *before* parsing, so a
   megabyte of loop costs milliseconds.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

# Everything html5lib's input stream reports as "invalid-codepoint", plus NUL and form feed.
_NONCHARS = "".join(chr(p * 0x10000 + 0xFFFE) + chr(p * 0x10000 + 0xFFFF) for p in range(17))
_INVALID_CHARS_RE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufdd0-\ufdef" + _NONCHARS + "]"
)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def clean_text(raw: str | bytes) -> tuple[str, bool]:
    """Decode and scrub the model's output; return the text and whether anything was invalid."""
    invalid = False
    if isinstance(raw, bytes | bytearray | memoryview):
        data = bytes(raw)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="replace")
            invalid = True
    else:
        text = raw
    # A BOM (U+FEFF) is noise wherever a model or a concatenation put it; not worth a warning.
    text = text.replace("\ufeff", "")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, removed = _INVALID_CHARS_RE.subn("", text)
    text, replaced = _SURROGATE_RE.subn("\ufffd", text)
    return text, invalid or bool(removed or replaced)


def scrub(value: str) -> str:
    """Remove invalid characters from a string found in the tree (e.g. from ``&#1;``)."""
    return _SURROGATE_RE.sub("\ufffd", _INVALID_CHARS_RE.sub("", value))


# --------------------------------------------------------------------------------------------
# 2. Repetition

_REP_MAX_PERIOD = 8192  # longest repeated unit looked for, in characters
_REP_MIN_REPEATS = 3  # the unit must occur at least this often (partial last copy counts pro rata)
_REP_MIN_CHARS = 200  # and the repeated region must be at least this long
_CLOSING_TAGS_ONLY_RE = re.compile(r"\s*(?:</[A-Za-z][^<>]*>\s*)*")


def _periodic_start(text: str, n: int, q: int) -> int:
    """Smallest ``a`` such that ``text[a:n]`` has period ``q`` (``text[n-3q:n]`` already has)."""

    def periodic(length: int) -> bool:
        return text[n - length : n - q] == text[n - length + q : n]

    good = 3 * q
    bad = 0
    step = good
    while bad == 0:
        trial = min(n, good + step)
        if periodic(trial):
            good = trial
            if trial == n:
                return 0
            step *= 2
        else:
            bad = trial
    while bad - good > 1:
        mid = (good + bad) // 2
        if periodic(mid):
            good = mid
        else:
            bad = mid
    return n - good


def detect_repetition(text: str) -> tuple[str, bool]:
    """Cut a degenerate repeated tail down to its first occurrence.

    A model stuck in a loop writes the same line or block until it hits the token limit, and
    is often cut inside the last copy. The tail (trailing whitespace ignored) is looked at as
    characters: if it has a period ``q`` (1…8192 characters) over at least 3 periods and 200
    characters, everything after the first copy is removed (completed to the end of its line
    or tag, so no half line remains). Units made only of whitespace or closing tags are never
    cut (``</div></div></div>`` ends a page, it is not a loop). Repetition in the middle of a
    page that later ends properly is left alone: a 10×10 game board is not a fault.

    Returns the text (unchanged if nothing was found) and whether a repeated tail was removed.
    Runs in milliseconds on a megabyte.
    """
    body = text.rstrip()
    n = len(body)
    last = n - 1
    for q in range(1, min(_REP_MAX_PERIOD, n // _REP_MIN_REPEATS) + 1):
        # Cheap single-character checks before comparing whole slices.
        if body[last] != body[last - q] or body[last] != body[last - 2 * q]:
            continue
        unit = body[n - q :]
        if unit != body[n - 2 * q : n - q] or unit != body[n - 3 * q : n - 2 * q]:
            continue
        if not unit.strip() or _CLOSING_TAGS_ONLY_RE.fullmatch(unit):
            continue
        start = _periodic_start(body, n, q)
        region = n - start
        if region < _REP_MIN_CHARS or region < _REP_MIN_REPEATS * q:
            continue
        keep = start + q
        # End the kept copy at a line (or tag) boundary inside the repeated region.
        for boundary in ("\n", ">"):
            if boundary in unit:
                keep = body.index(boundary, keep - 1) + 1
                break
        log.debug("repetition: period %d chars, %d chars removed", q, n - keep)
        return body[:keep], True
    return text, False
