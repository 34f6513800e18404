"""The fast engine's Llama forward: prefill and the decode step, over the slot cache.

:class:`LlamaForward` computes the same function as transformers' ``LlamaForCausalLM`` from
:class:`~model.fast.weights.LlamaWeights`: RMSNorm, rotary embeddings, grouped-query
attention, SiLU MLP. :meth:`LlamaForward.prefill` runs new prompts into their cache rows;
:meth:`LlamaForward.decode_body` is one decode step over all live rows, written to be captured
in a CUDA graph (``model.fast.graphs``): it reads and writes the
:class:`~model.fast.kv_cache.SlotCache`'s tensors in place, samples the next tokens on the
device and leaves them in ``cache.tokens``. On CPU the same code runs eagerly (that is what the
tests check). Decode attention is the Triton kernels (``model.fast.kernels``: per-row lengths),
SDPA or plain matmuls over the cache (:data:`ATTENTION_KINDS`).

Constraints (``model.constrained``) are applied inside the step, before sampling, from the
cache's ``allowed_bits`` and ``ban_state`` rows; the step itself advances ``ban_state``
through ``ban_next``, so document mode costs no host work. An unconstrained row costs one
gather and one masked fill over its logits.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.errors import first_line
from model.fast import kernels
from model.fast.kv_cache import SlotCache
from model.fast.prefill_attention import prefill_attention, query_blocks
from model.fast.weights import LlamaWeights
from model.sampling import penalize, race, sample_rows

log = logging.getLogger(__name__)

# Prefill attention: flash / memory-efficient kernels (math on CPU), never cuDNN (see prefill).
PREFILL_ATTENTION_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]

# Prefill pads its packed tokens to a multiple of this, so its matmuls see few shapes.
PREFILL_TOKEN_BUCKET = 128

ATTENTION_KINDS = ("auto", "triton", "sdpa", "matmul")


@dataclass(frozen=True)
class _CachedKeys:
    """Prompts of a prefill that continue their rows: those rows, how many of each row's
    positions attention reads, and which of them each query sees ((m, 1, width, keys))."""

    rows: torch.Tensor
    keys: int
    mask: torch.Tensor


@dataclass(frozen=True)
class _AttentionGroup:
    """Prompts of a prefill attended together: ``gather`` (m, width) their packed token
    indices (padding repeats the last), ``real`` which are tokens, ``packed`` where their
    outputs go (None: all the packed tokens, in order), ``cached`` set when they continue
    their rows' cached keys."""

    gather: torch.Tensor
    real: torch.Tensor
    packed: torch.Tensor | None = None
    cached: _CachedKeys | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in float32, scale in the input dtype."""
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (..., D) with the ``cos`` / ``sin`` of its positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _add_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm, one fused kernel once compiled."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def _rope_kv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split one decode step's fused q|k|v, rotate q and k; K and V stacked for one write."""
    b = qkv.shape[0]
    dim = cos.shape[-1]
    q = rotate(qkv[:, : heads * dim].view(b, heads, dim), cos, sin)
    k = rotate(qkv[:, heads * dim : (heads + kv_heads) * dim].view(b, kv_heads, dim), cos, sin)
    v = qkv[:, (heads + kv_heads) * dim :].view(b, kv_heads, dim)
    return q, torch.stack((k, v), dim=1)


def choose_attention(attention: str, weights: LlamaWeights, kv_format: str = "bf16") -> str:
    """The decode attention to run for ``attention`` (one of :data:`ATTENTION_KINDS`) over a
    cache in ``kv_format``.

    ``auto``: the Triton kernels on CUDA when Triton is there and passes its self-check (for
    that cache format), else SDPA. ``triton`` may be forced on CPU (the tests run it under
    Triton's interpreter).
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, not {attention!r}")
    head_dim = weights.head_dim
    # The kernels take whole power-of-two head dims (and halves of them) per program.
    fits = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    if attention == "triton" and not fits:
        raise ValueError(f"the triton attention needs a power-of-two head dim, not {head_dim}")
    if attention != "auto":
        return attention
    if weights.device.type == "cuda" and fits and kernels.available():
        try:
            kernels.self_check(
                weights.device, weights.dtype, weights.n_heads, weights.n_kv, head_dim, kv_format
            )
        except Exception as error:  # an optimisation only: SDPA is still correct
            log.warning(
                "the Triton decode kernels failed on this GPU (%s); using SDPA",
                first_line(error),
            )
            return "sdpa"
        log.info("decode attention: Triton kernels (per-row lengths)")
        return "triton"
    return "sdpa"


class LlamaForward:
    """Prefill, the decode step and sampling of one model over one slot cache.

    ``attention`` is a kind :func:`choose_attention` returned; it may be changed between
    steps (graphs captured with the old one must then be dropped).
    """

    def __init__(
        self,
        weights: LlamaWeights,
        cache: SlotCache,
        *,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: str,
        compile_kernels: bool | str,
    ) -> None:
        self.weights = weights
        self.cache = cache
        self.cos = cos
        self.sin = sin
        self.attention = attention
        self.scale = weights.head_dim**-0.5
        self.max_seq_len = cache.max_seq_len
        d = weights.device
        # Index constants the step reads (allocated once, like the cache: graphs keep them).
        self.rows = torch.arange(cache.slots, dtype=torch.int64, device=d)
        self.vocab = torch.arange(weights.vocab_size, dtype=torch.int64, device=d)
        self.key_positions = torch.arange(self.max_seq_len, dtype=torch.int64, device=d)
        self.vocab_word = self.vocab >> 5
        self.vocab_bit = (self.vocab & 31).to(torch.int32)
        # The decode step's pieces; _compile_kernels swaps in fused (compiled) versions.
        self._norm: Callable[..., Any] = rms_norm
        self._add_norm: Callable[..., Any] = _add_norm
        self._rope_kv: Callable[..., Any] = _rope_kv
        self._silu_mul: Callable[..., Any] = _silu_mul
        self._penalize: Callable[..., Any] = penalize
        self._race: Callable[..., Any] = race
        if compile_kernels and (d.type == "cuda" or compile_kernels == "force"):
            self._compile_kernels()

    def _compile_kernels(self) -> None:
        """Fuse the small elementwise pieces with Inductor (the matmuls stay cuBLAS).

        Without this a decode step is ~35 kernels a layer, and their launch gaps alone cost
        more than a millisecond per step at batch 1, even inside a CUDA graph. Each compiled
        piece is tried once here; if compiling fails the eager version stays (still exact).
        """
        w, cache = self.weights, self.cache
        d, h, v = w.device, w.embed.shape[1], w.vocab_size
        width = (w.n_heads + 2 * w.n_kv) * w.head_dim

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=d, dtype=w.dtype)

        cos, sin = self.cos[:2][:, None, :], self.sin[:2][:, None, :]
        logits = torch.randn(2, v, device=d)
        order = torch.arange(v, device=d).expand(2, -1).contiguous()
        probs = logits.softmax(-1)
        trials: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
            ("_norm", rms_norm, (rand(2, h), w.final_norm, w.eps)),
            ("_add_norm", _add_norm, (rand(2, h), rand(2, h), w.final_norm, w.eps)),
            ("_rope_kv", _rope_kv, (rand(2, width), cos, sin, w.n_heads, w.n_kv)),
            ("_silu_mul", _silu_mul, (rand(2, 64),)),
            (
                "_penalize",
                penalize,
                (logits, cache.seen[:2], cache.temperature[:2], cache.repetition_penalty[:2]),
            ),
            (
                "_race",
                race,
                (
                    logits,
                    order,
                    probs,
                    probs.cumsum(-1),
                    cache.top_p[:2],
                    cache.greedy[:2],
                    cache.tokens[:2],
                    cache.seed[:2],
                    cache.positions[:2],
                    self.vocab,
                ),
            ),
        ]
        compile_: Any = torch.compile
        for attribute, function, example in trials:
            try:
                compiled = compile_(function, dynamic=True, fullgraph=True)
                with torch.inference_mode():
                    compiled(*example)
            except Exception as error:  # an optimisation only: eager is still correct
                log.warning("torch.compile of %s failed (%s); it runs eagerly", attribute, error)
                continue
            setattr(self, attribute, compiled)

    def _constrain(
        self, logits: torch.Tensor, bits: torch.Tensor, ban_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits with each row's disallowed tokens at -inf, and the rows of the banned
        table (the state each token would lead to, DEAD = -1 where banned)."""
        ban_rows = self.cache.ban_next[ban_state]
        allowed = (bits[:, self.vocab_word] >> self.vocab_bit) & 1
        blocked = (allowed == 0) | (ban_rows < 0)
        return logits.masked_fill(blocked, -torch.inf), ban_rows

    # ------------------------------------------------------------------ decode

    def _attend_decode(
        self, q: torch.Tensor, b: int, ctx: int, layer: int, bias: torch.Tensor
    ) -> torch.Tensor:
        """Attention of one new query per row over its cached keys ``[0, ctx)``.

        Grouped-query heads need no copy of K/V: the ``group`` query heads that share a KV
        head are laid out as ``group`` queries of that head. (An fp8 cache is dequantized
        into a temporary first: this path is the fallback, the Triton kernel reads fp8.)
        """
        w = self.weights
        keys, values = self.cache.read_kv(layer, b, ctx)
        q = q.view(b, w.n_kv, w.group, w.head_dim)
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=self.scale)
        else:
            scores = torch.matmul(q, keys.transpose(-1, -2)).float() * self.scale + bias
            out = torch.matmul(scores.softmax(dim=-1).to(q.dtype), values)
        return out.reshape(b, w.n_heads * w.head_dim)

    def decode_body(self, b: int, ctx: int) -> None:
        """One decode step for rows ``[:b]`` with keys ``[0, ctx)``; updates state in place."""
        w, cache = self.weights, self.cache
        tokens = cache.tokens[:b]
        positions = cache.positions[:b]
        x = w.embed[tokens]
        triton = self.attention == "triton"
        if triton:
            # Scratch reused by every layer: the rotated queries and attention's output.
            queries = torch.empty((b, w.n_heads, w.head_dim), dtype=w.dtype, device=x.device)
            attended = torch.empty((b, w.n_heads * w.head_dim), dtype=w.dtype, device=x.device)
        else:
            cos = self.cos[positions][:, None, :]
            sin = self.sin[positions][:, None, :]
            visible = self.key_positions[:ctx][None, :] <= positions[:, None]
            zero = torch.zeros((), dtype=w.dtype, device=w.device)
            bias_dtype = w.dtype if self.attention == "sdpa" else torch.float32
            bias = torch.where(visible, zero, -torch.inf).to(bias_dtype)[:, None, None, :]
        layers = w.layers
        h = self._norm(x, layers[0].input_norm, w.eps)
        for index, layer in enumerate(layers):
            if triton:
                keys, values, k_scales, v_scales = cache.layer_kv(index)
                kernels.rope_store(
                    layer.qkv(h),
                    self.cos,
                    self.sin,
                    positions,
                    keys,
                    values,
                    queries,
                    k_scales,
                    v_scales,
                )
                kernels.decode_attention(
                    queries, keys, values, positions, ctx, self.scale, attended, k_scales, v_scales
                )
                attn = attended
            else:
                q, kv = self._rope_kv(layer.qkv(h), cos, sin, w.n_heads, w.n_kv)
                # K and V of every row at its position, in one indexed write (two in fp8).
                cache.write_kv(index, self.rows[:b], positions, kv)
                attn = self._attend_decode(q, b, ctx, index, bias)
            x, h = self._add_norm(x, layer.o(attn), layer.post_norm, w.eps)
            down = layer.down(self._silu_mul(layer.gate_up(h)))
            following = layers[index + 1].input_norm if index + 1 < len(layers) else None
            x, h = self._add_norm(x, down, w.final_norm if following is None else following, w.eps)
        logits = w.lm_head(h).float()
        logits, ban_rows = self._constrain(logits, cache.allowed_bits[:b], cache.ban_state[:b])
        nxt = positions + 1
        token = sample_rows(
            logits,
            cache.seen[:b],
            cache.temperature[:b],
            cache.top_p[:b],
            cache.repetition_penalty[:b],
            cache.greedy[:b],
            cache.seed[:b],
            nxt,
            self.vocab,
            penalize_fn=self._penalize,
            race_fn=self._race,
        )
        tokens.copy_(token)
        # Rows past the live ones (bucket padding) keep running on garbage; clamping keeps
        # their writes inside the cache.
        positions.copy_(nxt.clamp_(max=self.max_seq_len - 1))
        cache.seen[:b].scatter_(1, token[:, None], True)
        cache.ban_state[:b].copy_(ban_rows.gather(1, token[:, None]).squeeze(1).clamp_(min=0))

    # ----------------------------------------------------------------- prefill

    def prefill(
        self,
        rows: list[int],
        prompts: list[list[int]],
        logit_rows: int,
        starts: list[int] | None = None,
    ) -> torch.Tensor:
        """Run the prompts into the cache rows; returns last-position logits (n, V) float32.

        ``starts[i]`` (default 0) is the position of ``prompts[i]``'s first token in its row:
        a prompt may continue one whose first ``starts[i]`` tokens are in that row already (a
        chunk of a long prompt, or the rest after a shared prefix was copied in); it attends
        to those cached keys and causally among its own tokens.

        The prompts are packed into one sequence, padded to a multiple of
        ``PREFILL_TOKEN_BUCKET`` tokens: the projections and the MLP see only a few shapes,
        which a warm-up runs once at start-up (a matmul's first call at a new shape costs tens
        of milliseconds on an H100; a whole prefill ~20-50 ms). With the Triton attention
        (the decode step's, ``attention == "triton"``) the layers run on the kernels and read
        K and V from the cache (:meth:`_prefill_layers_kernels`); otherwise attention runs
        on the prompts gathered into a right-padded batch through SDPA
        (:meth:`_prefill_layers`), kept off cuDNN, which builds a plan for every new prompt
        length (~80 ms on an H100). ``lm_head`` runs on ``logit_rows`` rows (a decode batch
        bucket: the decode step's shapes). No graphs, and only the decode step's compiled
        pieces (compiled for any row count): compiling more would recompile for new shapes
        in the middle of serving.
        """
        w = self.weights
        lengths = [len(p) for p in prompts]
        starts = starts if starts is not None else [0] * len(prompts)
        if any(s < 0 or s + n > self.max_seq_len for s, n in zip(starts, lengths, strict=True)):
            raise ValueError(f"prompt past the cache rows' {self.max_seq_len} positions")
        n, total = len(prompts), sum(lengths)
        padded = -(-total // PREFILL_TOKEN_BUCKET) * PREFILL_TOKEN_BUCKET
        device = w.device
        with torch.inference_mode(), sdpa_kernel(PREFILL_ATTENTION_BACKENDS):
            flat = torch.zeros(padded, dtype=torch.int64)
            flat[:total] = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)
            positions = torch.zeros(padded, dtype=torch.int64)
            positions[:total] = torch.cat(
                [torch.arange(s, s + length) for s, length in zip(starts, lengths, strict=True)]
            )
            sizes = torch.tensor(lengths)
            slot_of_token = torch.repeat_interleave(torch.tensor(rows), sizes)
            ids, positions = flat.to(device), positions.to(device)
            slot_of_token = slot_of_token.to(device)
            x = w.embed[ids]
            if self.attention == "triton":
                x = self._prefill_layers_kernels(x, rows, lengths, starts, positions, slot_of_token)
            else:
                x = self._prefill_layers(x, rows, lengths, starts, positions, slot_of_token)
            # lm_head on a batch bucket of rows, so its shapes are the decode step's ones.
            last = [*itertools.accumulate(lengths)]
            last += [last[-1]] * (logit_rows - n)
            x = rms_norm(x[torch.tensor(last, device=device) - 1], w.final_norm, w.eps)
            return w.lm_head(x).float()[:n]

    def _prefill_layers_kernels(
        self,
        x: torch.Tensor,
        rows: list[int],
        lengths: list[int],
        starts: list[int],
        positions: torch.Tensor,
        slot_of_token: torch.Tensor,
    ) -> torch.Tensor:
        """The decoder layers over packed prompt tokens ``x`` (padded, hidden) with the Triton
        kernels: ``rope_store`` writes each real token's K and V into its row (quantized there
        for an fp8 cache), ``prefill_attention`` reads them back from the cache, and the
        norms, residual adds and SiLU are the decode step's fused pieces. Returns the last
        layer's output (before the final norm)."""
        w, cache = self.weights, self.cache
        total = sum(lengths)
        blocks = query_blocks(lengths, starts, rows).to(x.device)
        queries = torch.empty((total, w.n_heads, w.head_dim), dtype=w.dtype, device=x.device)
        # Padding rows stay zero: the projections after attention see finite values there.
        attended = torch.zeros((x.shape[0], w.n_heads * w.head_dim), dtype=w.dtype, device=x.device)
        layers = w.layers
        h = self._norm(x, layers[0].input_norm, w.eps)
        for index, layer in enumerate(layers):
            keys, values, k_scales, v_scales = cache.layer_kv(index)
            kernels.rope_store(
                layer.qkv(h)[:total],
                self.cos,
                self.sin,
                positions[:total],
                keys,
                values,
                queries,
                k_scales,
                v_scales,
                slots=slot_of_token,
                num_warps=1,
            )
            prefill_attention(
                queries, keys, values, blocks, self.scale, attended, k_scales, v_scales
            )
            x, h = self._add_norm(x, layer.o(attended), layer.post_norm, w.eps)
            down = layer.down(self._silu_mul(layer.gate_up(h)))
            following = layers[index + 1].input_norm if index + 1 < len(layers) else None
            if following is None:
                x = x + down
            else:
                x, h = self._add_norm(x, down, following, w.eps)
        return x

    def _prefill_layers(
        self,
        x: torch.Tensor,
        rows: list[int],
        lengths: list[int],
        starts: list[int],
        positions: torch.Tensor,
        slot_of_token: torch.Tensor,
    ) -> torch.Tensor:
        """The decoder layers over packed prompt tokens ``x`` with SDPA: the prompts gathered
        into a right-padded batch, continuing rows' keys read back from the cache under an
        explicit mask. Returns the last layer's output (before the final norm)."""
        w, cache = self.weights, self.cache
        device = x.device
        padded, total, longest = x.shape[0], sum(lengths), max(lengths)
        sizes = torch.tensor(lengths)
        # (n, longest): the packed index of each prompt's tokens. Padding repeats the
        # prompt's last token; it sits after every real query, so the causal mask hides it.
        first = torch.cumsum(sizes, 0) - sizes
        offsets = torch.arange(longest)
        gather = first[:, None] + torch.minimum(offsets, sizes[:, None] - 1)
        real = offsets[None, :] < sizes[:, None]
        groups = self._attention_groups(rows, starts, gather, real)
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        hq = w.n_heads * w.head_dim
        hkv = w.n_kv * w.head_dim
        for index, layer in enumerate(w.layers):
            h = rms_norm(x, layer.input_norm, w.eps)
            qkv = layer.qkv(h)
            q = rotate(qkv[:, :hq].view(padded, w.n_heads, w.head_dim), cos, sin)
            k = rotate(qkv[:, hq : hq + hkv].view(padded, w.n_kv, w.head_dim), cos, sin)
            v = qkv[:, hq + hkv :].view(padded, w.n_kv, w.head_dim)
            # Every real token's K and V at its (slot, position), in one indexed write.
            kv = torch.stack((k[:total], v[:total]), dim=1)
            cache.write_kv(index, slot_of_token, positions[:total], kv)
            # The prompt attends over K and V as the cache holds them (an fp8 round trip,
            # or themselves): what decode steps will read, so prompt and answer tokens
            # see the same keys.
            k, v = cache.as_read(k), cache.as_read(v)
            attn = torch.zeros((padded, hq), dtype=x.dtype, device=device)
            for group in groups:
                if group.cached is None:
                    out = self._attend_prompts(q, k, v, group.gather, group.real)
                else:
                    out = self._attend_cached(q, index, group)
                if group.packed is None:
                    attn[:total] = out
                else:
                    attn[group.packed] = out
            x = x + layer.o(attn)
            h = rms_norm(x, layer.post_norm, w.eps)
            x = x + layer.down(_silu_mul(layer.gate_up(h)))
        return x

    def _attention_groups(
        self, rows: list[int], starts: list[int], gather: torch.Tensor, real: torch.Tensor
    ) -> list[_AttentionGroup]:
        """The prompts split by how they attend: those starting at position 0 (causal among
        their own tokens, today's fast path) and those continuing a row's cached keys (one
        explicit mask); each with the packed indices its outputs go to (host-built, then
        moved to the device once)."""
        device = self.weights.device
        fresh = [i for i, s in enumerate(starts) if s == 0]
        later = [i for i, s in enumerate(starts) if s > 0]
        if not later:  # the common case, exactly as before offsets existed
            return [_AttentionGroup(gather.to(device), real.to(device))]
        groups = []
        for members in (fresh, later):
            if not members:
                continue
            index = torch.tensor(members)
            width = int(real[index].sum(1).max())
            g, r = gather[index, :width], real[index, :width]
            cached = None
            if members is later:
                begin = torch.tensor([starts[i] for i in members])
                # Query j of a prompt sits at position start + j (padding repeats the last);
                # it sees the row's keys [0, that position].
                query_pos = begin[:, None] + torch.minimum(torch.arange(width), r.sum(1, True) - 1)
                # Read up to a multiple of 16 keys (masked): the memory-efficient kernel
                # wants an aligned mask, and attention sees fewer shapes.
                keys = min(-(-(int(query_pos.max()) + 1) // 16) * 16, self.max_seq_len)
                visible = torch.arange(keys)[None, None, :] <= query_pos[:, :, None]
                cached = _CachedKeys(
                    rows=torch.tensor([rows[i] for i in members]).to(device),
                    keys=keys,
                    mask=visible[:, None].to(device),
                )
            groups.append(_AttentionGroup(g.to(device), r.to(device), g[r].to(device), cached))
        return groups

    def _attend_prompts(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gather: torch.Tensor,
        real: torch.Tensor,
    ) -> torch.Tensor:
        """Causal attention within each prompt, from packed (tokens, heads, D) to packed
        (real tokens, heads * D), through one right-padded batch (n, heads, longest, D)."""
        w = self.weights
        q, k, v = (t[gather].transpose(1, 2) for t in (q, k, v))
        if w.group > 1:
            k = k.repeat_interleave(w.group, dim=1)
            v = v.repeat_interleave(w.group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        out = out.transpose(1, 2)[real]  # (real tokens in packed order, heads, D)
        return out.reshape(out.shape[0], w.n_heads * w.head_dim)

    def _attend_cached(self, q: torch.Tensor, layer: int, group: _AttentionGroup) -> torch.Tensor:
        """Attention of prompts that continue their rows: each query over its row's cached
        keys up to its own position (the new tokens' keys were written there just before),
        from packed (tokens, heads, D) to packed (the group's real tokens, heads * D)."""
        w, cached = self.weights, group.cached
        assert cached is not None
        queries = q[group.gather].transpose(1, 2)  # (m, heads, width, D)
        keys, values = self._row_keys_values(layer, cached.rows, cached.keys)
        if w.group > 1:
            keys = keys.repeat_interleave(w.group, dim=1)
            values = values.repeat_interleave(w.group, dim=1)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=cached.mask, scale=self.scale
        )
        out = out.transpose(1, 2)[group.real]
        return out.reshape(out.shape[0], w.n_heads * w.head_dim)

    def _row_keys_values(
        self, layer: int, rows: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``rows``' positions ``[0, length)`` in ``layer``, (m, kv heads, length,
        D) each: the one place where prefill reads the cache back."""
        return self.cache.read_rows(layer, rows, length)

    def sample(self, rows: list[int], logits: torch.Tensor, counters: list[int]) -> list[int]:
        """Sample one token per row from given logits (used after prefill)."""
        cache = self.cache
        with torch.inference_mode():
            index = torch.tensor(rows, dtype=torch.int64, device=self.weights.device)
            counter = torch.tensor(counters, dtype=torch.int64, device=self.weights.device)
            logits, _ = self._constrain(logits, cache.allowed_bits[index], cache.ban_state[index])
            token = sample_rows(
                logits,
                cache.seen[index],
                cache.temperature[index],
                cache.top_p[index],
                cache.repetition_penalty[index],
                cache.greedy[index],
                cache.seed[index],
                counter,
                self.vocab,
            )
            return list(token.tolist())
