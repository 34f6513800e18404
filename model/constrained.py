"""Per-sequence token constraints, shared by both engines: a form grammar and banned strings.

A constraint says, before each decode step, which tokens the sequence may take next (bits in
an int32 bitmask row, 32 tokens a word, bit ``t & 31`` of word ``t >> 5``: the layout
xgrammar fills), hears the token that was taken, and says when the answer is complete.
The engines set every disallowed token's logit to ``-inf`` before sampling, so a masked
token can never be drawn, whatever the temperature, top-p or repetition penalty.

* :class:`GrammarConstraint` (compose mode): the answer follows ``AnswerPlan.grammar``, the
  EBNF of the page kind's guided form (``model.page.form``).
* :class:`BannedStrings` (document mode): ``AnswerPlan.banned`` never appears in the answer
  (ASCII case-insensitive), even across token boundaries.

**Why xgrammar** (measured by ``bench/constrained.py``, table in ``bench/RESULTS.md``, on the
SmolLM2 tokenizer and every page kind's schema): xgrammar compiles a schema in ~7-30 ms
(cached: ~0.1 ms), and one step (fill the mask + accept the token) costs a few microseconds,
because it precomputes which tokens are context-independent; its compiled grammars are
~0.4 MB. It enforced every probed feature exactly (minLength/maxLength, minItems/maxItems,
enum, required, ``additionalProperties: false``, nested ones too). llguidance was as exact
and compiles faster (~1-8 ms) but spends ~70-400 us a step: at 1,500 tokens an answer and
a batch of 32 that is up to 19 s of host time per batch where xgrammar needs well under one.
outlines-core builds a DFA over every string's length bound: the simplest kind took ~16 s
to compile and the larger ones did not finish in a minute. Two things xgrammar let through,
which :class:`GrammarConstraint` masks itself: the tokenizer's special tokens
(``<|im_start|>``, ...) standing for their text inside a JSON string (the decoded answer
drops them, which can break a ``minLength``), and raw control characters inside strings
(``\x0f``: invalid JSON; a random model found it in the tests).

:class:`BannedStrings` needs no grammar library: an Aho-Corasick automaton over the banned
strings' bytes, run once per tokenizer over every (automaton state, token) pair, gives a
table ``next_state[state, token]`` (``DEAD`` when the token would complete a banned string)
and a ready bitmask row per state. A step is then one table lookup and one row copy, and
the fast engine runs the same table on the GPU inside its decode graph (no host work).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "DEAD",
    "BanAutomaton",
    "BannedStrings",
    "GrammarConstraint",
    "TokenConstraint",
    "allowed_from_bitmask",
    "ban_automaton",
    "bitmask_width",
    "compiled_grammar",
    "constraint_for",
    "fill_masks",
    "full_bitmask",
]

DEAD = -1  # next_state of a token that would complete a banned string


class TokenConstraint(Protocol):
    """What an engine needs from one sequence's constraint."""

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row ``row`` of ``bitmask`` (int32, CPU,
        ``(rows, bitmask_width(vocab))``): bit set = allowed."""
        ...

    def accept(self, token: int) -> bool:
        """Take ``token`` as the sequence's next one; False if it was not allowed."""
        ...

    def is_finished(self) -> bool:
        """The answer is complete (the grammar's end was reached): end it like EOS."""
        ...

    def forced_tokens(self) -> list[int]:
        """Tokens the constraint allows no alternative to right now (a form's lead-in),
        already accepted: the engine feeds them in one forward instead of one step each."""
        ...


# ------------------------------------------------------------------------ bitmasks


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


def full_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An all-allowed bitmask (every bit set), int32 ``(rows, width)`` on CPU."""
    return torch.full((rows, bitmask_width(vocab_size)), -1, dtype=torch.int32)


def allowed_from_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool ``(rows, vocab_size)``: True where the bitmask allows the token."""
    vocab = torch.arange(vocab_size, device=bitmask.device)
    words = bitmask[:, vocab >> 5]
    return ((words >> (vocab & 31).to(torch.int32)) & 1).bool()


def _pack(allowed: np.ndarray) -> torch.Tensor:
    """Bool ``(rows, V)`` -> int32 bitmask ``(rows, width)``."""
    rows, vocab = allowed.shape
    width = bitmask_width(vocab)
    padded = np.zeros((rows, width * 32), dtype=np.uint64)
    padded[:, :vocab] = allowed
    weights = (np.uint64(1) << np.arange(32, dtype=np.uint64))[None, None, :]
    words = (padded.reshape(rows, width, 32) * weights).sum(axis=2).astype(np.uint32)
    return torch.from_numpy(words.view(np.int32).copy())


# ------------------------------------------------------------- per-tokenizer indexes


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids the decoded answer drops (``skip_special_tokens``): special and added-special."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


class _TokenizerIndex:
    """Everything built once per (tokenizer, vocab size): the grammar compiler, compiled
    grammars by grammar text (most recent last), ban automata by banned strings, the token bytes."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar as xg

        self.tokenizer = tokenizer  # kept alive so its id() is not reused while cached
        self.vocab_size = vocab_size
        self.stop_ids = sorted(_stop_ids(tokenizer))
        self.info = xg.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_ids
        )
        self.compiler = xg.GrammarCompiler(self.info, max_threads=2)
        self.special = special_token_ids(tokenizer)
        # What a grammar's token may never be: a special token other than the stops (it
        # stands for its text in the grammar but the decoded answer drops it), or one
        # holding a control character other than the form's newlines.
        text_ok = np.ones((1, vocab_size), dtype=bool)
        text_ok[0, [t for t in self.special - set(self.stop_ids) if t < vocab_size]] = False
        for token, data in enumerate(self.token_bytes()):
            if token not in self.special and any(byte < 0x20 and byte != 0x0A for byte in data):
                text_ok[0, token] = False
        self.text_ok = _pack(text_ok)[0]
        self.grammars: dict[str, Any] = {}
        self.automata: dict[tuple[str, ...], BanAutomaton] = {}
        self.lock = threading.Lock()

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes in the decoded answer (special ones and padding ids: none)."""
        decoded = [bytes(b) for b in self.info.decoded_vocab]
        decoded += [b""] * (self.vocab_size - len(decoded))
        for token in self.special:
            if token < len(decoded):
                decoded[token] = b""
        return decoded[: self.vocab_size]


def _stop_ids(tokenizer: Any) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return set() if eos is None else {int(eos)}


_indexes: dict[tuple[int, int], _TokenizerIndex] = {}
_indexes_lock = threading.Lock()


def _index(tokenizer: Any, vocab_size: int | None) -> _TokenizerIndex:
    size = int(vocab_size or len(tokenizer))
    key = (id(tokenizer), size)
    with _indexes_lock:
        index = _indexes.get(key)
        if index is None or index.tokenizer is not tokenizer:
            index = _TokenizerIndex(tokenizer, size)
            _indexes[key] = index
        return index


# -------------------------------------------------------------------------- grammar


# Compiled grammars kept per tokenizer. A form's lead-ins name the page's subject, so
# grammars are per prompt: the most recent ones are kept (a regenerate or a retry reuses
# its own) and older ones dropped, so memory stays bounded however many prompts come.
GRAMMAR_CACHE_SIZE = 64


def compiled_grammar(tokenizer: Any, grammar: str, vocab_size: int | None = None) -> Any:
    """xgrammar's compiled form of the EBNF ``grammar``, cached per (tokenizer, grammar).

    Compiling a form takes ~0.1-0.4 s on a busy 2-core CPU (bench/RESULTS.md).
    """
    index = _index(tokenizer, vocab_size)
    with index.lock:
        compiled = index.grammars.pop(grammar, None)
        if compiled is None:
            compiled = index.compiler.compile_grammar(grammar)
        index.grammars[grammar] = compiled  # now the most recent
        while len(index.grammars) > GRAMMAR_CACHE_SIZE:
            index.grammars.pop(next(iter(index.grammars)))
    return compiled


class GrammarConstraint:
    """The answer must follow the plan's grammar; it is complete once the grammar is.

    EOS is allowed only where the grammar is complete, and the grammar terminates as soon
    as it is complete (nothing may follow), so the engine ends the answer then.

    Where the grammar forces text (a form's lead-in), the constraint plans its tokens once
    (the tokenizer's own spelling of it) and then allows only the plan's next token: the
    mask alone would allow every token that starts the text ("T", "Ta", "Tag"), so an
    engine that takes forced text one step at a time would spell it differently from one
    that feeds :meth:`forced_tokens` in one forward, and the two would write different
    answers for one seed.
    """

    def __init__(self, tokenizer: Any, grammar: str, vocab_size: int | None = None):
        import xgrammar as xg

        self._index = _index(tokenizer, vocab_size)
        self.matcher = xg.GrammarMatcher(
            compiled_grammar(tokenizer, grammar, vocab_size), terminate_without_stop_token=True
        )
        self._planned: list[int] | None = None  # None: not planned for the current state

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        if not self.fill_planned(bitmask, row):
            self.matcher.fill_next_token_bitmask(bitmask, row)
            bitmask[row] &= self._index.text_ok

    def fill_planned(self, bitmask: torch.Tensor, row: int) -> bool:
        """Allow only the planned token where the grammar forces text; False (nothing
        written) where the grammar's own mask is needed (see :func:`fill_masks`)."""
        planned = self._plan()
        if not planned:
            return False
        bitmask[row] = 0
        bitmask[row, planned[0] >> 5] = _bit(planned[0] & 31)
        return True

    def accept(self, token: int) -> bool:
        planned = self._planned
        if planned and planned[0] == token:
            self._planned = planned[1:] or None  # None once used up: plan again
        else:
            self._planned = None
        return bool(self.matcher.accept_token(token))

    def is_finished(self) -> bool:
        return bool(self.matcher.is_terminated())

    def forced_tokens(self) -> list[int]:
        planned = self._plan()
        for token in planned:
            self.matcher.accept_token(token)
        self._planned = None
        return planned

    def _plan(self) -> list[int]:
        """The tokens of the text the grammar forces from here (planned once per run)."""
        if self._planned is not None:
            return self._planned
        # A trailing space is left to the model: in a BPE vocabulary it starts the next
        # word's token (" bread"), and forced alone it would make the model spell the word
        # without one.
        text = self.matcher.find_jump_forward_string().rstrip(" ")
        planned: list[int] = []
        if text:
            tokenizer = self._index.tokenizer
            for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
                # The tokenizer may spell the text in a way the grammar refuses (a
                # SentencePiece word-start mark, a special token): the plan stops there.
                index = self._index
                if token >= index.vocab_size or token in index.special:
                    break
                if not self.matcher.accept_token(token):
                    break
                planned.append(int(token))
            if planned:
                self.matcher.rollback(len(planned))
        self._planned = planned
        return planned


_batch_matchers: dict[int, Any] = {}


def fill_masks(constraints: Sequence[TokenConstraint | None], bitmask: torch.Tensor) -> None:
    """Row ``i`` of ``bitmask`` for ``constraints[i]`` (``None``: left as it is).

    Grammar rows that need xgrammar's own mask are filled together by its batch matcher,
    on several threads: one mask costs ~1-2 ms on average (up to ~10 ms where a value
    starts), so filling 32 of them one after another would stall a GPU step many times
    over (measured on an H200: the form grammar at batch 32 ran at 0.05 of unconstrained).
    """
    grammar_rows: list[int] = []
    matchers: list[Any] = []
    for row, constraint in enumerate(constraints):
        if constraint is None:
            continue
        if isinstance(constraint, GrammarConstraint):
            if not constraint.fill_planned(bitmask, row):
                grammar_rows.append(row)
                matchers.append(constraint.matcher)
        else:
            constraint.fill_mask(bitmask, row)
    if not matchers:
        return
    if len(matchers) == 1:
        matchers[0].fill_next_token_bitmask(bitmask, grammar_rows[0])
    else:
        _batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask, grammar_rows)
    for row in grammar_rows:
        bitmask[row] &= constraints[row]._index.text_ok  # type: ignore[union-attr]


def _batch_matcher() -> Any:
    """xgrammar's batch matcher of this thread (each engine fills masks from one thread)."""
    import xgrammar as xg

    key = threading.get_ident()
    matcher = _batch_matchers.get(key)
    if matcher is None:
        matcher = _batch_matchers[key] = xg.BatchGrammarMatcher(max_threads="auto")
    return matcher


def _bit(position: int) -> int:
    """The int32 word with only bit ``position`` set (bit 31 is the sign bit)."""
    return int(np.array([1 << position], dtype=np.uint32).view(np.int32)[0])


# -------------------------------------------------------------------- banned strings


@dataclass(frozen=True)
class BanAutomaton:
    """Banned strings as tables over (state, token), built once per tokenizer.

    A state is the longest tail of the answer's (lowercased) bytes that starts one of the
    banned strings. ``next_state`` int32 ``(states, V)``: the state after the token, or
    ``DEAD`` when the tail + the token's bytes would contain a banned string. ``masks``:
    ``next_state != DEAD`` packed as bitmask rows. ``goto`` int32 ``(states, 256)``: one
    byte's transition (to feed a prefix).
    """

    banned: tuple[str, ...]
    next_state: torch.Tensor
    masks: torch.Tensor
    goto: np.ndarray

    @property
    def states(self) -> int:
        return int(self.next_state.shape[0])

    def feed(self, state: int, text: str) -> int:
        """The state after ``text`` (the answer's fixed prefix, say) from ``state``."""
        for byte in text.encode("utf-8").lower():
            state = int(self.goto[state, byte])
        return state


def _aho_corasick(patterns: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(goto (states, 256) int32, matched (states,) bool) of the patterns' automaton."""
    children: list[dict[int, int]] = [{}]
    matched = [False]
    for pattern in patterns:
        state = 0
        for byte in pattern:
            if byte not in children[state]:
                children.append({})
                matched.append(False)
                children[state][byte] = len(children) - 1
            state = children[state][byte]
        matched[state] = True
    goto = np.zeros((len(children), 256), dtype=np.int32)
    fail = [0] * len(children)
    queue = list(children[0].values())
    for byte, child in children[0].items():
        goto[0, byte] = child
    # Breadth first: a state's fail link and row are complete before its children's.
    while queue:
        state = queue.pop(0)
        matched[state] = matched[state] or matched[fail[state]]
        goto[state] = goto[fail[state]]
        for byte, child in children[state].items():
            goto[state, byte] = child
            fail[child] = int(goto[fail[state], byte]) if state else 0
            queue.append(child)
    return goto, np.array(matched)


def _run_tokens(
    goto: np.ndarray, matched: np.ndarray, tokens: list[bytes]
) -> tuple[np.ndarray, np.ndarray]:
    """Every token's bytes from every state: (end state, hit a match) as (S, V) arrays.

    Vectorized per byte position over the tokens sorted longest first, so position p
    works on a leading slice (the tokens longer than p) rather than on all of them.
    """
    states, vocab = goto.shape[0], len(tokens)
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    longest = int(lengths.max(initial=0))
    table = np.zeros((vocab, max(longest, 1)), dtype=np.uint8)
    for rank, token in enumerate(order):
        data = tokens[token]
        if data:
            table[rank, : len(data)] = np.frombuffer(data.lower(), dtype=np.uint8)
    longer = np.searchsorted(-lengths[order], -np.arange(longest), side="left")
    current = np.repeat(np.arange(states, dtype=np.int32)[:, None], vocab, axis=1)
    hit = np.zeros((states, vocab), dtype=bool)
    for position in range(longest):
        count = int(longer[position])  # tokens longer than position
        step = goto[current[:, :count], table[None, :count, position]]
        current[:, :count] = step
        hit[:, :count] |= matched[step]
    ends, hits = np.empty_like(current), np.empty_like(hit)
    ends[:, order], hits[:, order] = current, hit
    return ends, hits


def ban_automaton(
    tokenizer: Any, banned: Sequence[str], vocab_size: int | None = None
) -> BanAutomaton:
    """The :class:`BanAutomaton` of ``banned`` for ``tokenizer``, built once and cached."""
    index = _index(tokenizer, vocab_size)
    key = tuple(banned)
    with index.lock:
        automaton = index.automata.get(key)
        if automaton is None:
            patterns = sorted({s.encode("utf-8").lower() for s in banned if s})
            goto, matched = _aho_corasick(patterns)
            current, hit = _run_tokens(goto, matched, index.token_bytes())
            next_state = np.where(hit, DEAD, current).astype(np.int32)
            automaton = BanAutomaton(
                banned=key,
                next_state=torch.from_numpy(next_state),
                masks=_pack(~hit),
                goto=goto,
            )
            index.automata[key] = automaton
    return automaton


class BannedStrings:
    """The answer may not contain any of the automaton's strings (ASCII case-insensitive).

    Matched on the answer's bytes, so a string split over several tokens is caught and a
    special token (dropped from the decoded text) neither hides nor breaks a match.
    ``state`` starts where ``prefix`` (the answer's fixed start) leaves the automaton.
    """

    def __init__(self, automaton: BanAutomaton, prefix: str = "") -> None:
        self.automaton = automaton
        self.state = automaton.feed(0, prefix)

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = self.automaton.masks[self.state]

    def accept(self, token: int) -> bool:
        following = int(self.automaton.next_state[self.state, token])
        if following == DEAD:
            return False
        self.state = following
        return True

    def is_finished(self) -> bool:
        return False

    def forced_tokens(self) -> list[int]:
        return []


def constraint_for(
    plan: Any, tokenizer: Any, vocab_size: int | None = None
) -> TokenConstraint | None:
    """The constraint an :class:`model.prompting.AnswerPlan` asks for (None: none).

    ``vocab_size`` is the model's (its logits' width), which may exceed the tokenizer's.
    """
    if plan.grammar is not None:
        return GrammarConstraint(tokenizer, plan.grammar, vocab_size)
    if plan.banned:
        return BannedStrings(ban_automaton(tokenizer, plan.banned, vocab_size), plan.prefix)
    return None
