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

KV formats (:data:`KV_FORMATS`): ``"bf16"`` keeps K and V in the model's dtype (bf16 on a GPU).
``"fp8"`` keeps them as float8 E4M3 with one float32 scale per (token, KV head) vector,
``absmax / 448`` (``kv_scale``: (layers, 2, slots, kv heads, max_seq_len)): half the bytes a
decode step reads from the cache at large batches, and twice the slots in the same memory,
for 4 bytes of scale per 64-256 of data. A scale of the vector's own makes every vector use
E4M3's whole range (3 mantissa bits: each element within 2^-4 of its value, relative), so
nothing needs calibrating and nothing saturates; one static scale per layer and head is
cheaper but rounds small vectors coarsely and clips the ones larger than its calibration's
(bench/fp8_agreement.py measures both). Writers quantize (:func:`quantize_kv`: the Triton
``rope_store`` kernel does the same arithmetic), readers dequantize: the Triton attention in
registers, torch code through :meth:`SlotCache.read_kv`. Code outside the kernels reads and
writes the cache through :meth:`SlotCache.write_kv` / :meth:`SlotCache.read_kv` only, so it
need not know the format.
"""

from __future__ import annotations

import logging

import torch

from model.fp8 import E4M3_MAX

log = logging.getLogger(__name__)

# Left free when the cache is sized from free memory: prefill activations, graph pools and
# the allocator's slack.
RESERVED_BYTES = 3 * 1024**3

KV_FORMATS = ("bf16", "fp8")
KV_FP8_DTYPE = torch.float8_e4m3fn
# The dtype of the fp8 format's per-vector scales (4 bytes per token and KV head, for K and V).
KV_SCALE_DTYPE = torch.float32
# An all-zero vector (a padding token's can be) still gets a positive scale; its values stay 0.
MIN_KV_ABSMAX = 1e-12


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 values of ``x`` (..., head_dim) and their scales (...) float32, one per vector:
    ``absmax / 448``, so each vector's largest element maps onto E4M3's largest value.

    The arithmetic (float32: absmax, divide, clamp, round to nearest even) is the one the
    Triton ``rope_store`` kernel does, so both writers store the same bytes.
    """
    values = x.float()
    scale = values.abs().amax(dim=-1).clamp(min=MIN_KV_ABSMAX) / E4M3_MAX
    scaled = (values / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX)
    return scaled.to(KV_FP8_DTYPE), scale


def dequantize_kv(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What E4M3 ``values`` (..., head_dim) with ``scale`` (...) stand for, in ``dtype``.

    Widened to ``dtype`` first and multiplied in place there: one temporary of the output's
    size (an E4M3 value is exact in bf16; the product rounds once).
    """
    out = values.to(dtype)
    return out.mul_(scale.to(dtype)[..., None])


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the fp8 cache gives it back: quantized and dequantized, in ``x``'s dtype."""
    return dequantize_kv(*quantize_kv(x), x.dtype)


class SlotCache:
    """The KV cache and decode state of ``slots`` rows; see the module docstring.

    ``max_slots=None`` on CUDA fits as many slots as ``memory_fraction`` of the free memory
    holds (less :data:`RESERVED_BYTES`); on CPU it means 8. ``kv_format`` is one of
    :data:`KV_FORMATS`; ``dtype`` is the model's (what :meth:`read_kv` returns).
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
        kv_format: str = "bf16",
    ) -> None:
        if kv_format not in KV_FORMATS:
            raise ValueError(f"kv_cache must be one of {KV_FORMATS}, not {kv_format!r}")
        self.kv_format = kv_format
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

    @property
    def quantized(self) -> bool:
        """Whether K and V are stored as fp8 with scales."""
        return self.kv_format == "fp8"

    @property
    def kv_dtype(self) -> torch.dtype:
        """The element type ``kv`` holds."""
        return KV_FP8_DTYPE if self.quantized else self.dtype

    def kv_bytes_per_slot(self) -> int:
        """Bytes of one slot's K and V (and their scales, in fp8) over ``max_seq_len``."""
        element = torch.tensor([], dtype=self.kv_dtype).element_size()
        vector = self.head_dim * element
        if self.quantized:
            vector += torch.tensor([], dtype=KV_SCALE_DTYPE).element_size()
        return 2 * self.layers * self.kv_heads * self.max_seq_len * vector

    def slots_that_fit(self, free_bytes: int, memory_fraction: float) -> int:
        """How many slots ``memory_fraction`` of ``free_bytes`` holds, less the reserve."""
        budget = max(0, int(free_bytes * memory_fraction) - RESERVED_BYTES)
        return budget // self.kv_bytes_per_slot()

    def _count_slots(self, max_slots: int | None, memory_fraction: float) -> int:
        if self.device.type != "cuda":
            return max_slots or 8
        free, _total = torch.cuda.mem_get_info(self.device)
        fit = self.slots_that_fit(free, memory_fraction)
        slots = min(fit, max_slots) if max_slots else fit
        if slots < 1:
            raise RuntimeError(
                f"no room for a KV cache of {self.max_seq_len} tokens "
                f"({free / 1e9:.1f} GB free); lower max_seq_len"
            )
        log.info(
            "KV cache (%s): %d slots x %d tokens (%.1f GB; %.1f GB were free)",
            self.kv_format,
            slots,
            self.max_seq_len,
            slots * self.kv_bytes_per_slot() / 1e9,
            free / 1e9,
        )
        return int(slots)

    def _allocate(self) -> None:
        d, s = self.device, self.slots
        self._allocate_kv()
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

    def _allocate_kv(self) -> None:
        shape = (self.layers, 2, self.slots, self.kv_heads, self.max_seq_len)
        self.kv_scale: torch.Tensor | None = None
        if self.quantized:
            # Zeroed as bytes (E4M3 zero is byte 0): filling needs no float8 kernel.
            self.kv = torch.zeros((*shape, self.head_dim), dtype=torch.uint8, device=self.device)
            self.kv = self.kv.view(KV_FP8_DTYPE)
            self.kv_scale = torch.zeros(shape, dtype=KV_SCALE_DTYPE, device=self.device)
        else:
            self.kv = torch.zeros((*shape, self.head_dim), dtype=self.dtype, device=self.device)

    def set_kv_format(self, kv_format: str) -> None:
        """Store K and V in ``kv_format`` from now on, with the same slots (benchmarks
        compare the formats in one process). The cached keys and values are dropped: call it
        with no row live, and drop every captured graph (they hold the old tensors)."""
        if kv_format not in KV_FORMATS:
            raise ValueError(f"kv_cache must be one of {KV_FORMATS}, not {kv_format!r}")
        del self.kv, self.kv_scale  # free the old cache before the new one is allocated
        self.kv_format = kv_format
        self._allocate_kv()

    # ---------------------------------------------------------------- K and V

    def write_kv(
        self, layer: int, rows: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor
    ) -> None:
        """Store ``kv`` (n, 2, kv heads, head_dim: K and V of n tokens) at (``rows[i]``,
        ``positions[i]``) of ``layer``, in the cache's format (one indexed write each for the
        values and, in fp8, the scales; no host sync: capturable in a CUDA graph)."""
        if self.kv_scale is None:
            self.kv[layer][:, rows, :, positions] = kv
            return
        values, scale = quantize_kv(kv)
        # Indexed as bytes: an index_put needs no float8 kernel that way, on any device.
        self.kv[layer].view(torch.uint8)[:, rows, :, positions] = values.view(torch.uint8)
        self.kv_scale[layer][:, rows, :, positions] = scale

    def read_kv(self, layer: int, b: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows ``[:b]``, positions ``[0, ctx)`` of ``layer``, each
        (b, kv heads, ctx, head_dim) in the model's dtype: views of the cache in bf16, a
        dequantized copy in fp8."""
        if self.kv_scale is None:
            return self.kv[layer, 0, :b, :, :ctx], self.kv[layer, 1, :b, :, :ctx]
        both = dequantize_kv(
            self.kv[layer, :, :b, :, :ctx], self.kv_scale[layer, :, :b, :, :ctx], self.dtype
        )
        return both[0], both[1]

    def read_rows(
        self, layer: int, rows: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``rows`` (an index tensor), positions ``[0, length)`` of
        ``layer``, each (len(rows), kv heads, length, head_dim) in the model's dtype."""
        if self.kv_scale is None:
            kv = self.kv[layer]
            return kv[0][rows, :, :length], kv[1][rows, :, :length]
        both = dequantize_kv(
            self.kv[layer][:, rows, :, :length],
            self.kv_scale[layer][:, rows, :, :length],
            self.dtype,
        )
        return both[0], both[1]

    def save_prefix(self, row: int, length: int) -> torch.Tensor:
        """A copy of ``row``'s KV at positions ``[0, length)``, every layer, as stored: (layers,
        2, kv heads, length, X), where X is head_dim in bf16, and in fp8 head_dim bytes
        followed by the 4 bytes of the position's float32 scale. :meth:`load_prefix` puts it
        back into any row."""
        with torch.inference_mode():
            if self.kv_scale is None:
                return self.kv[:, :, row, :, :length].clone()
            values = self.kv[:, :, row, :, :length].view(torch.uint8)
            scales = self.kv_scale[:, :, row, :, :length, None].view(torch.uint8)
            return torch.cat((values, scales), dim=-1)

    def load_prefix(self, row: int, saved: torch.Tensor, length: int) -> None:
        """Copy the first ``length`` positions of a :meth:`save_prefix` copy into ``row``."""
        with torch.inference_mode():
            if self.kv_scale is None:
                self.kv[:, :, row, :, :length] = saved[:, :, :, :length]
                return
            d = self.head_dim
            self.kv.view(torch.uint8)[:, :, row, :, :length] = saved[:, :, :, :length, :d]
            scales = saved[:, :, :, :length, d:].contiguous().view(torch.float32)
            self.kv_scale[:, :, row, :, :length] = scales[..., 0]

    def as_read(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., head_dim) as :meth:`read_kv` would give it back once written: ``x``
        itself in bf16, its E4M3 round trip in fp8 (prefill attends over that, so prompt
        tokens see the keys and values that decode steps will see)."""
        return x if self.kv_scale is None else fp8_round_trip(x)

    def layer_kv(
        self, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``layer``'s K and V caches (slots, kv heads, max_seq_len, head_dim) and, in fp8,
        their scales (slots, kv heads, max_seq_len), else None: what the Triton kernels take."""
        if self.kv_scale is None:
            return self.kv[layer, 0], self.kv[layer, 1], None, None
        scales = self.kv_scale[layer]
        return self.kv[layer, 0], self.kv[layer, 1], scales[0], scales[1]

    # ------------------------------------------------------------- row state

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
        """Move a live row's KV (first ``length`` positions, fp8 scales with them) and state
        to a freed row."""
        with torch.inference_mode():
            # fp8 moved as bytes: a plain copy, whatever float8 kernels the device has.
            kv = self.kv.view(torch.uint8) if self.quantized else self.kv
            kv[:, :, target, :, :length] = kv[:, :, source, :, :length]
            if self.kv_scale is not None:
                self.kv_scale[:, :, target, :, :length] = self.kv_scale[:, :, source, :, :length]
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
