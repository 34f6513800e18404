"""Stop rules shared by both engines: EOS, the page's closing ``</html>``, and loops.

The closing ``</html>`` counts only where it ends the page: not inside a comment, a raw-text
element (script, style, textarea, xmp) or a code sample (pre, code) that a page about HTML
writes unescaped (:func:`page_end_spans`, also used by ``model.page``'s extraction).

A small model that falls into a loop ("<div></div><div></div>..." or the same paragraph again
and again) would otherwise burn GPU time until ``max_new_tokens``, delaying everyone queued
behind it. The post-processor cuts such a tail anyway (``model.page.detect_repetition``), so
stopping early loses nothing a user wants.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# A loop must cover this many tokens, in at least this many identical copies, before the
# sequence is stopped: long enough that legitimate repeated markup (a row of five star
# icons, a short list of identical placeholders) is never cut.
MIN_LOOP_TOKENS = 160
MIN_LOOP_COPIES = 4
MAX_PERIOD_TOKENS = 128
# How often, in generated tokens, the check runs (it costs a few list comparisons).
CHECK_EVERY = 16


def ends_in_loop(tokens: Sequence[int]) -> bool:
    """True when the end of ``tokens`` is one block of tokens repeated over and over."""
    count = len(tokens)
    for period in range(1, MAX_PERIOD_TOKENS + 1):
        copies = max(MIN_LOOP_COPIES, -(-MIN_LOOP_TOKENS // period))
        span = period * copies
        if span > count:
            if period * MIN_LOOP_COPIES > count:
                break
            continue
        tail = tokens[count - span :]
        block = tail[-period:]
        if all(tail[start : start + period] == block for start in range(0, span, period)):
            return True
    return False


def should_check(generated_count: int) -> bool:
    return generated_count >= MIN_LOOP_TOKENS and generated_count % CHECK_EVERY == 0


HTML_END = "</html>"
# Tokens decoded from the end of a sequence to look for HTML_END: a few suffice, and
# decoding the whole sequence every step would be quadratic.
HTML_END_WINDOW_TOKENS = 12


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends an answer: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(token) for token in configured)
    return frozenset(ids)


def page_closed(tokenizer: Any, generated: Sequence[int]) -> bool:
    """True when the last tokens of ``generated`` hold the page's closing tag."""
    tail = tokenizer.decode(list(generated[-HTML_END_WINDOW_TOKENS:]), skip_special_tokens=True)
    return HTML_END in tail.lower()


def cut_after_page(text: str) -> str:
    """``text`` up to and including its last ``</html>`` (what a final token carried past
    the closing tag is dropped)."""
    end = text.lower().rfind(HTML_END)
    return text if end < 0 else text[: end + len(HTML_END)]


# Where a closing </html> may stand without ending the page: what the scan below steps over.
_CODE_SCAN_RE = re.compile(
    r"(?P<comment><!--)"
    r"|<(?P<slash>/?)(?P<name>pre|code|textarea|xmp|script|style)(?=[\s/>])[^>]*>"
    r"|(?P<end></html\s*>)",
    re.IGNORECASE,
)
_COMMENT_END_RE = re.compile(r"--!?>")
_RAW_END_RES = {
    name: re.compile(rf"</{name}(?=[\s/>])", re.IGNORECASE)
    for name in ("textarea", "xmp", "script", "style")
}
_PAGE_END_AT_END_RE = re.compile(r"</html\s*>\Z", re.IGNORECASE)


def page_end_spans(text: str) -> list[tuple[int, int]]:
    """The spans of the ``</html>`` tags in ``text`` that end a page, in order.

    Left out are those inside a comment or a raw-text element (script, style, textarea,
    xmp: text up to their own end tag, or to the end when it never comes) and those inside
    an open ``<pre>`` or ``<code>`` (a code sample; markup inside it is still followed, so a
    ``<script>`` in a sample is stepped over too). Linear in ``len(text)``.
    """
    spans: list[tuple[int, int]] = []
    samples = {"pre": 0, "code": 0}
    pos = 0
    while (match := _CODE_SCAN_RE.search(text, pos)) is not None:
        pos = match.end()
        if match["comment"]:
            # "<!-->" and "<!--->" are whole (empty) comments.
            if text.startswith(">", pos) or text.startswith("->", pos):
                continue
            comment_end = _COMMENT_END_RE.search(text, pos)
            if comment_end is None:
                break
            pos = comment_end.end()
        elif match["end"]:
            if not any(samples.values()):
                spans.append(match.span())
        else:
            name = match["name"].lower()
            if name in samples:
                samples[name] = max(0, samples[name] + (-1 if match["slash"] else 1))
            elif not match["slash"]:
                raw_end = _RAW_END_RES[name].search(text, pos)
                if raw_end is None:
                    break
                pos = raw_end.start()
    return spans


def closes_page(text: str) -> bool:
    """True when ``text`` (trailing whitespace aside) ends with a ``</html>`` that ends the
    page: one outside any open pre, code, textarea, xmp, script, style or comment."""
    body = text.rstrip()
    if _PAGE_END_AT_END_RE.search(body) is None:
        return False
    spans = page_end_spans(body)
    return bool(spans) and spans[-1][1] == len(body)


class PageEndDetector:
    """Tells when a sequence's newest token completes the page's ``</html>``.

    Only a token whose text holds '>' can complete the tag, so the tail is decoded (by
    :func:`page_closed`) only after such a token: a rare step, instead of every step. Only
    when that tail holds ``</html>`` is the whole answer decoded, to tell (by
    :func:`closes_page`) a real end from one inside a code sample, comment or script.
    """

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        size = len(tokenizer) if vocab_size is None else min(vocab_size, len(tokenizer))
        pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
        self.tokenizer = tokenizer
        self._may_close = [piece is not None and ">" in piece for piece in pieces]

    def closed(self, generated: Sequence[int]) -> bool:
        token = generated[-1]
        if not (0 <= token < len(self._may_close) and self._may_close[token]):
            return False
        if not page_closed(self.tokenizer, generated):
            return False
        text = self.tokenizer.decode(list(generated), skip_special_tokens=True)
        # What the final token carried past the tag is dropped by the engines as well.
        return closes_page(cut_after_page(text))
