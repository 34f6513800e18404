"""When a sequence is finished, the same for both engines: :class:`StopRule`.

EOS, a finished grammar, the page's closing ``</html>``, the token budget, and loops; the
engines (``model.engine``, ``model.fast.engine``) call :meth:`StopRule.accept` with each new
token of each sequence and deliver the sequence when it returns a reason.

The closing ``</html>`` counts only where it ends the page: not inside a comment, a raw-text
element (script, style, textarea, xmp) or a code sample (pre, code) that a page about HTML
writes unescaped (:func:`page_end_spans`, also used by ``model.page``'s extraction).

A small model that falls into a loop ("<div></div><div></div>..." or the same paragraph again
and again) would otherwise burn GPU time until ``max_new_tokens``, delaying everyone queued
behind it. The post-processor cuts such a tail anyway (``model.page.detect_repetition``), so
stopping early loses nothing a user wants.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from model.types import FinishReason, GenerationRequest

if TYPE_CHECKING:
    from model.constrained import TokenConstraint

log = logging.getLogger(__name__)

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


class DecodingSequence(Protocol):
    """What :class:`StopRule` reads and updates of a sequence being decoded (each engine's
    own per-request state satisfies it)."""

    generated: list[int]
    # Tokens the constraint forced after the newest sampled one (the rule's jump_forward).
    forced: list[int]

    @property
    def request(self) -> GenerationRequest: ...

    @property
    def max_new(self) -> int:
        """How many tokens it may generate at most."""
        ...

    @property
    def is_form(self) -> bool:
        """A compose answer under its form grammar (bounded; its strings may hold
        ``</html>``), not a document."""
        ...

    @property
    def host_constraint(self) -> TokenConstraint | None:
        """The constraint the host advances token by token (None: none, or the device
        advances it)."""
        ...


class StopRule:
    """Takes each new token of a sequence and says when, and why, the sequence is finished.

    In this order: an EOS token (any of ``eos_ids``) ends the answer and is not part of it;
    otherwise the token is appended, and the host constraint takes it (a refusal cannot happen
    while masks are applied: a bug, logged and ended like EOS) and ends the answer when its
    grammar is complete; with ``jump_forward`` the tokens the constraint then forces are
    appended too and kept in ``seq.forced`` for the engine to feed in one forward. Then a
    document ends at its page-closing ``</html>`` (HTML_COMPLETE), any answer at
    ``seq.max_new`` tokens (LENGTH), and a document stuck in a loop (REPETITION; a form
    repeats its lead-ins by design and its grammar bounds it anyway).

    ``ignore_eos`` (benchmarks, where random weights must give fixed-length answers) runs to
    the token budget: EOS, ``</html>`` and loops are ignored.
    """

    def __init__(
        self,
        eos_ids: frozenset[int],
        page_end: PageEndDetector,
        *,
        ignore_eos: bool = False,
        jump_forward: bool = False,
    ) -> None:
        self.eos_ids = eos_ids
        self.page_end = page_end
        self.ignore_eos = ignore_eos
        self.jump_forward = jump_forward

    @classmethod
    def for_model(
        cls,
        model: Any,
        tokenizer: Any,
        vocab_size: int | None = None,
        *,
        ignore_eos: bool = False,
        jump_forward: bool = False,
    ) -> StopRule:
        """The rule for a model and its tokenizer (``vocab_size``: the logits' width)."""
        return cls(
            eos_token_ids(model, tokenizer),
            PageEndDetector(tokenizer, vocab_size),
            ignore_eos=ignore_eos,
            jump_forward=jump_forward,
        )

    def accept(self, seq: DecodingSequence, token: int) -> FinishReason | None:
        """Add ``token`` to ``seq``; why it is finished now, if it is."""
        ignore_eos = self.ignore_eos
        if not ignore_eos and token in self.eos_ids:
            return FinishReason.EOS
        generated = seq.generated
        generated.append(token)
        constraint = seq.host_constraint
        if constraint is not None:
            if not constraint.accept(token):
                # Cannot happen while masks are applied: a bug, not the model's fault.
                log.error("token %d broke the constraint of %s", token, seq.request.request_id)
                return FinishReason.EOS
            if constraint.is_finished():
                return FinishReason.EOS  # the grammar's answer is complete
            if self.jump_forward:
                seq.forced = constraint.forced_tokens()
                generated.extend(seq.forced)
                if constraint.is_finished():
                    return FinishReason.EOS
        # A form's strings may hold "</html>", and its lead-ins repeat by design (its grammar
        # bounds it anyway): only documents end at the page's end or in a loop.
        document = not seq.is_form
        if not ignore_eos and document and self.page_end.closed(generated):
            return FinishReason.HTML_COMPLETE
        if len(generated) >= seq.max_new:
            return FinishReason.LENGTH
        if not ignore_eos and document and should_check(len(generated)) and ends_in_loop(generated):
            return FinishReason.REPETITION
        return None
