"""The slot KV cache and the per-row state that the decode step reads and updates in place.

:class:`SlotCache` holds, for each of its ``slots`` rows, the keys and values of one sequence
(``kv``: (layers, 2, slots, kv heads, max_seq_len, head_dim)) and that row's decode state: the
next input token and its position, its sampling settings, the set of tokens it has seen (the
repetition penalty's), and its constraint state. All of it is allocated once: CUDA graphs
capture these tensors' addresses, so they are only ever written in place (``ban_next``, set up
by :meth:`SlotCache.register_ban_tables` before any capture, excepted).

Slots are kept compact: live sequences occupy rows ``0..n-1``; when one leaves, the last row
moves into its place (:meth:`SlotCache.move_row`: one copy of that sequence's KV), so a
batch-``b`` step works on plain views ``[:b]`` with no gather.

Speculative decoding adds four small per-row buffers (``draft``, ``draft_length``,
``verified``, ``accepted``): the host writes drafts, the verify step writes its verdict.

Constraints (``model.constrained``) live in two per-row buffers: ``allowed_bits`` (a bitmask
row the host fills for rows under a grammar; all ones otherwise) and ``ban_state`` (the row's
state in the banned-strings table ``ban_next``, which the decode step itself advances).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Left free when the cache is sized from free memory: prefill activations, graph pools and
# the allocator's slack.
RESERVED_BYTES = 3 * 1024**3


class SlotCache:
    """The KV cache and decode state of ``slots`` rows; see the module docstring.

    ``max_slots=None`` on CUDA fits as many slots as ``memory_fraction`` of the free memory
    holds (less :data:`RESERVED_BYTES`); on CPU it means 8.
    """

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        vocab_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_slots: int | None,
        memory_fraction: float,
        draft_tokens: int = 0,
    ) -> None:
        self.layers = layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.device = device
        self.draft_tokens = draft_tokens
        self.slots = self._count_slots(max_slots, memory_fraction)
        self._allocate()

    def kv_bytes_per_slot(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.max_seq_len * self.head_dim * element

    def _count_slots(self, max_slots: int | None, memory_fraction: float) -> int:
        if self.device.type != "cuda":
            return max_slots or 8
        free, _total = torch.cuda.mem_get_info(self.device)
        budget = max(0, int(free * memory_fraction) - RESERVED_BYTES)
        fit = budget // self.kv_bytes_per_slot()
        slots = min(fit, max_slots) if max_slots else fit
        if slots < 1:
            raise RuntimeError(
                f"no room for a KV cache of {self.max_seq_len} tokens "
                f"({free / 1e9:.1f} GB free); lower max_seq_len"
            )
        log.info(
            "KV cache: %d slots x %d tokens (%.1f GB; %.1f GB were free)",
            slots,
            self.max_seq_len,
            slots * self.kv_bytes_per_slot() / 1e9,
            free / 1e9,
        )
        return int(slots)

    def _allocate(self) -> None:
        d, s = self.device, self.slots
        self.kv = torch.zeros(
            (self.layers, 2, s, self.kv_heads, self.max_seq_len, self.head_dim),
            dtype=self.dtype,
            device=d,
        )
        self.tokens = torch.zeros(s, dtype=torch.int64, device=d)
        self.positions = torch.zeros(s, dtype=torch.int64, device=d)
        self.temperature = torch.ones(s, dtype=torch.float32, device=d)
        self.top_p = torch.ones(s, dtype=torch.float32, device=d)
        self.repetition_penalty = torch.ones(s, dtype=torch.float32, device=d)
        self.greedy = torch.ones(s, dtype=torch.bool, device=d)
        self.seed = torch.zeros(s, dtype=torch.int64, device=d)
        self.seen = torch.zeros((s, self.vocab_size), dtype=torch.bool, device=d)
        # Row 0 of ban_next is the free state: every token allowed, staying free.
        words = (self.vocab_size + 31) // 32
        self.allowed_bits = torch.full((s, words), -1, dtype=torch.int32, device=d)
        self.ban_state = torch.zeros(s, dtype=torch.int64, device=d)
        self.ban_next = torch.zeros((1, self.vocab_size), dtype=torch.int32, device=d)
        # Speculative decoding (model.fast.speculative): each row's draft and how much of it
        # is real, and what the verify step made of it (the tokens the model picks at each
        # of the 1 + draft positions, and how many of the draft it kept).
        k = self.draft_tokens
        self.draft = torch.zeros((s, k), dtype=torch.int64, device=d)
        self.draft_length = torch.zeros(s, dtype=torch.int64, device=d)
        self.verified = torch.zeros((s, k + 1), dtype=torch.int64, device=d)
        self.accepted = torch.zeros(s, dtype=torch.int64, device=d)

    def step_state(self, b: int) -> tuple[torch.Tensor, ...]:
        """What a decode step of rows ``[:b]`` changes besides the KV: views of the rows'
        next tokens, positions, seen sets and banned-strings states."""
        return self.tokens[:b], self.positions[:b], self.seen[:b], self.ban_state[:b]

    def register_ban_tables(self, tables: list[torch.Tensor]) -> list[int]:
        """Put banned-strings tables (``BanAutomaton.next_state``, int32 (states, V)) on
        the device, one after the other after the free state; each one's state offset.

        This replaces ``ban_next``: call it before any decode graph is captured.
        """
        offsets, parts, start = [], [self.ban_next[:1].cpu()], 1
        for table in tables:
            if table.shape[1] != self.vocab_size:
                raise ValueError(f"table width {table.shape[1]} != vocab {self.vocab_size}")
            offsets.append(start)
            parts.append(torch.where(table >= 0, table + start, table))
            start += table.shape[0]
        self.ban_next = torch.cat(parts).to(torch.int32).to(self.device)
        return offsets

    def set_row(
        self,
        row: int,
        *,
        prompt: list[int],
        temperature: float,
        top_p: float,
        repetition_penalty: float,
        seed: int,
        ban_state: int = 0,
    ) -> None:
        """Sampling settings, the repetition set and the constraint state of a newly
        admitted row: no bitmask (all allowed), ``ban_state`` in ``ban_next`` (0: free)."""
        with torch.inference_mode():
            greedy = temperature <= 0
            self.temperature[row] = 1.0 if greedy else temperature
            self.top_p[row] = top_p
            self.repetition_penalty[row] = repetition_penalty
            self.greedy[row] = greedy
            self.seed[row] = seed & 0xFFFFFFFF
            self.seen[row] = False
            ids = torch.tensor(prompt, dtype=torch.int64, device=self.device)
            self.seen[row, ids] = True
            self.allowed_bits[row] = -1
            self.ban_state[row] = ban_state

    def set_masks(self, rows: list[int], bitmask: torch.Tensor) -> None:
        """Copy host-filled bitmask rows (int32 (len(rows), words)) to those rows."""
        with torch.inference_mode():
            index = torch.tensor(rows, dtype=torch.int64, device=self.device)
            self.allowed_bits[index] = bitmask.to(self.device, non_blocking=True)

    def park_row(self, row: int) -> None:
        """Point a row being prefilled (not decoding yet) at the last position.

        A decode step runs its whole batch bucket, so rows past the live ones run as padding
        and write K/V at their own position: parked there, they write where no prompt or
        answer reads (a row's last position is read only by a step past ``max_new_tokens``,
        whose token is dropped). :meth:`set_row` and :meth:`start_row` set the rest when the
        row goes live.
        """
        with torch.inference_mode():
            self.positions[row] = self.max_seq_len - 1

    def start_row(self, row: int, token: int, position: int) -> None:
        """Make ``token`` (at ``position``) the next decode input of ``row``."""
        with torch.inference_mode():
            self.tokens[row] = token
            self.positions[row] = position
            self.seen[row, token] = True
            following = self.ban_next[self.ban_state[row], token].clamp(min=0)
            self.ban_state[row] = following.to(torch.int64)

    def move_row(self, source: int, target: int, length: int) -> None:
        """Move a live row's KV (first ``length`` positions) and state to a freed row."""
        with torch.inference_mode():
            self.kv[:, :, target, :, :length] = self.kv[:, :, source, :, :length]
            for buffer in (
                self.tokens,
                self.positions,
                self.temperature,
                self.top_p,
                self.repetition_penalty,
                self.greedy,
                self.seed,
                self.seen,
                self.allowed_bits,
                self.ban_state,
            ):
                buffer[target] = buffer[source]
