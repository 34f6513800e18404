"""Shared-prefix reuse: the KV of prompt beginnings that many prompts share, kept on the device.

Every prompt the bot sends starts with the same tokens: the chat template and the system prompt
(``model.prompting``), before the user's description. Their keys and values depend only on
those tokens (positions from 0) and on the model, so they are computed once: a newcomer whose
prompt starts with an entry's tokens gets that KV copied into its cache row (one copy) and
prefills only the rest, at an offset (``LlamaForward.prefill``'s ``starts``).

Entries are learned without knowing the template, from the prompts themselves, after each
prefill (:meth:`PrefixCache.learn`):

- a prompt sharing at least ``min_tokens`` with an entry makes that shared part (rounded down
  to whole ``block``-token blocks) an entry of its own: two prompts starting alike is the sign
  that more will, and a block-aligned length lets prompts that diverge a few tokens apart
  (``a bakery`` / ``a bar``) share one entry;
- a prompt sharing nothing makes its own first ``max_entry_tokens`` (whole blocks) an entry,
  so the second prompt like it already hits (a regenerate reuses that much of its prompt).

:meth:`PrefixCache.lookup` picks the entry sharing the most whole blocks with a prompt, the
shortest on a tie (so the compact shared entries are the ones kept in use, and first
sightings age out), and uses all it shares, up to the prompt's last token: a prompt equal to
an entry still runs its last token, for the logits of its first answer token.

Bounds: ``max_entries`` and ``max_bytes``, least recently used out first. The entries belong
to one model state: :meth:`PrefixCache.keep_for` drops them when it changes (the weights
switched to FP8, say). :func:`read_prefix` and :func:`write_prefix` are the only places here
that touch the slot cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model.fast.kv_cache import SlotCache

log = logging.getLogger(__name__)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (lists: slices compare in C)."""
    limit = min(len(a), len(b))
    i, step = 0, 64
    while i + step <= limit and a[i : i + step] == b[i : i + step]:
        i += step
    while i < limit and a[i] == b[i]:
        i += 1
    return i


def read_prefix(cache: SlotCache, row: int, length: int) -> torch.Tensor:
    """A copy of ``row``'s KV at positions ``[0, length)`` in the cache's own format
    (:meth:`SlotCache.save_prefix`: (layers, 2, kv heads, length, ...))."""
    return cache.save_prefix(row, length)


def write_prefix(cache: SlotCache, row: int, kv: torch.Tensor, length: int) -> None:
    """Copy the first ``length`` positions of an entry's ``kv`` into ``row`` (one copy)."""
    cache.load_prefix(row, kv, length)


@dataclass
class PrefixEntry:
    """Tokens ``[0, len(tokens))`` of some prompts and their KV (layers, 2, kv heads, T, D)."""

    tokens: list[int]
    kv: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True)
class PrefixHit:
    """``length`` leading tokens of a prompt whose KV ``entry`` holds."""

    entry: PrefixEntry
    length: int


class PrefixCache:
    """A few shared prompt prefixes and their KV, LRU; see the module docstring."""

    def __init__(
        self,
        *,
        max_bytes: int,
        max_entries: int = 8,
        block: int = 16,
        min_tokens: int = 32,
        max_entry_tokens: int = 256,
    ) -> None:
        if min_tokens % block or max_entry_tokens % block or min_tokens < block:
            raise ValueError("min_tokens and max_entry_tokens must be whole blocks")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.block = block
        self.min_tokens = min_tokens
        self.max_entry_tokens = max_entry_tokens
        self.entries: list[PrefixEntry] = []  # least recently used first
        self._state: object = None

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)

    def clear(self) -> None:
        self.entries.clear()

    def keep_for(self, state: object) -> None:
        """Drop every entry if the model state that computed them is not ``state``."""
        if state != self._state:
            if self.entries:
                log.info("prefix cache cleared: the model changed (%r -> %r)", self._state, state)
            self.entries.clear()
            self._state = state

    def _blocks(self, length: int) -> int:
        return length - length % self.block

    def _best(self, prompt: list[int]) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the most whole blocks with ``prompt`` (the shortest of a tie)
        and how many tokens it shares."""
        best: PrefixEntry | None = None
        best_key, shared = (0, 0), 0
        for entry in self.entries:
            common = common_prefix(prompt, entry.tokens)
            key = (self._blocks(common), -len(entry.tokens))
            if best is None or key > best_key:
                best, best_key, shared = entry, key, common
        return best, shared

    def lookup(self, prompt: list[int]) -> PrefixHit | None:
        """The cached KV this prompt may start from (never its last token), or None."""
        entry, shared = self._best(prompt)
        length = min(shared, len(prompt) - 1)
        if entry is None or length < self.min_tokens:
            return None
        self.entries.remove(entry)
        self.entries.append(entry)  # most recently used
        return PrefixHit(entry, length)

    def learn(self, prompt: list[int], read: Callable[[int], torch.Tensor]) -> PrefixEntry | None:
        """After ``prompt``'s prefill: the entry it teaches, if any (see the module
        docstring). ``read(n)`` copies its row's KV of positions ``[0, n)``."""
        entry, shared = self._best(prompt)
        length = self._blocks(shared)
        if entry is not None and length >= self.min_tokens:
            if len(entry.tokens) == length:
                return None  # that shared part is an entry already
            # The entry holds this KV already (the same tokens at the same positions).
            with torch.inference_mode():
                kv = entry.kv[:, :, :, :length].clone()
        else:
            length = self._blocks(min(len(prompt), self.max_entry_tokens))
            if length < self.min_tokens:
                return None
            kv = read(length)
        return self._insert(PrefixEntry(prompt[:length], kv))

    def _insert(self, entry: PrefixEntry) -> PrefixEntry | None:
        if entry.nbytes > self.max_bytes:
            return None
        while self.entries and (
            len(self.entries) >= self.max_entries or self.nbytes + entry.nbytes > self.max_bytes
        ):
            self.entries.pop(0)
        self.entries.append(entry)
        log.debug("prefix cache: +%d tokens (%d entries)", len(entry.tokens), len(self.entries))
        return entry
