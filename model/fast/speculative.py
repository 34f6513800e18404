"""Prompt-lookup drafts for speculative decoding: guess a row's next tokens from its context.

A refine rewrites a page the prompt already holds, so most of its answer is a copy: after
the last few tokens written, the page usually goes on the way it went on in the prompt.
:class:`PromptLookup` proposes those continuations (n-gram lookup, no draft model); the
engine checks a row's whole draft in one forward (``LlamaForward.verify_body``) and keeps
the longest prefix of it that the model itself would have written, plus the model's own next
token. Decoding stays exact: each kept token is the one the sampler picks at that position
(greedy or seeded, see ``model.sampling``), so the answer is the same as without drafts and
only the number of forward passes changes.

Two ways to find a continuation, in order:

* **Alignment.** When the tokens just written are the ones the last draft's source went on
  with, the draft continues from there. A copy stays aligned with its source through
  repeated markup (``</div>`` recurs everywhere) where a fresh lookup could jump elsewhere.
* **Lookup.** Otherwise the most recent earlier occurrence of the context's last
  ``max_ngram`` tokens (then fewer, down to ``min_ngram``) gives the position to copy from.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_MAX_NGRAM = 4
# 2: a 1-token lookup drafts more often, which a replay of real refine answers favoured,
# but measured on an H200 it won only for one user in bf16 and lost at 8 users and in
# float32 (bench/RESULTS.md, "Speculative refine, drafting"), so it stays an option.
DEFAULT_MIN_NGRAM = 2


class PromptLookup:
    """Drafts from earlier occurrences in one sequence's context (prompt + answer so far).

    Call :meth:`update` with the answer's tokens (all of them so far: the new ones are taken
    from its end), then :meth:`propose`. Indexing costs one dict write per n-gram size and
    token, so a 2,000-token prompt takes a few milliseconds once.
    """

    def __init__(
        self,
        prompt: Sequence[int],
        *,
        max_ngram: int = DEFAULT_MAX_NGRAM,
        min_ngram: int = DEFAULT_MIN_NGRAM,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, not {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.context: list[int] = []
        # n-gram -> the position right after its latest occurrence, one table per size.
        self._follows: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(min_ngram, max_ngram + 1)
        }
        self._answer_tokens = 0
        # Where the context is expected to go on, in its own earlier tokens (None: lost).
        self._source: int | None = None
        self._extend(prompt)

    def _extend(self, tokens: Sequence[int]) -> None:
        context = self.context
        for token in tokens:
            end = len(context)
            # The n-grams ending here are followed by ``token``: register them before it
            # joins, so a lookup never finds the context's own last n-gram.
            for n, table in self._follows.items():
                if end >= n:
                    table[tuple(context[end - n : end])] = end
            source = self._source
            if source is not None:
                self._source = source + 1 if context[source] == token else None
            context.append(token)

    def update(self, answer: Sequence[int]) -> None:
        """Take the answer's tokens written since the last call (``answer`` is all of it)."""
        self._extend(answer[self._answer_tokens :])
        self._answer_tokens = len(answer)

    def propose(self, count: int) -> list[int]:
        """Up to ``count`` tokens that may come next (none when nothing earlier matches)."""
        context = self.context
        if count <= 0 or not context:
            return []
        source = self._source
        if source is None:
            source = self._lookup()
            self._source = source
        if source is None:
            return []
        return context[source : source + count]

    def _lookup(self) -> int | None:
        context, end = self.context, len(self.context)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if end < n:
                continue
            found = self._follows[n].get(tuple(context[end - n :]))
            if found is not None and found < end:
                return found
        return None
