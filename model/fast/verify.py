"""The verify step of speculative decoding: every row's draft checked in one forward.

Row ``r`` enters with its next input token ``t`` at position ``p`` (as a decode step) and a
draft ``d_1..d_k`` (``SlotCache.draft``; ``draft_length`` of them real). The step runs the
``k + 1`` tokens ``t, d_1..d_k`` at positions ``p..p+k`` through the model at once, each
attending to the row's cache and to the tokens before it, and picks at each position the
token a decode step would pick there: the same constraint masks, the repetition penalty over
everything seen up to that position (the drafts before it included), and the sampler's draw
for that position (``model.sampling`` keys its noise by seed and position). Position ``i``'s
pick is valid only if the drafts before it were right, so the row keeps the picks up to and
including the first one that differs from the draft (``accepted`` drafts plus one token of
the model's own). The answer is therefore the one plain decoding writes, token for token,
for greedy and sampled rows alike (exactly in float32; in bf16 the batched forward rounds
differently, so a near-tie may now and then go the other way); a wrong draft costs only the
extra positions' compute.

Its shapes are fixed per (batch bucket, context bucket), so it is captured in CUDA graphs
like the decode step (``model.fast.graphs``), with its own set of graphs. With the Triton
attention it writes K and V with the decode step's kernel, each of a row's ``k + 1`` tokens
as a row of its own on the row's slot (``rows_per_slot``), and attends with
``model.fast.verify_attention``: each key read once for the slot's tokens, each token's keys
stopping at its own position (the causal mask). Other attentions take a mask (SDPA, matmul).
The rows' state is updated in place for the next step: input token, position, seen set and
banned-strings state. KV is written for all ``k + 1`` positions; those past the kept ones are
overwritten before any query can see them (a key is visible only to queries at its position
or later).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.fast import kernels
from model.fast.forward import LlamaForward
from model.fast.verify_attention import verify_attention
from model.sampling import sample_rows


class VerifyStep:
    """The verify step of one :class:`LlamaForward` (its weights, cache and fused pieces)."""

    def __init__(self, forward: LlamaForward) -> None:
        if forward.cache.draft_tokens < 1:
            raise ValueError("the cache holds no drafts (draft_tokens=0)")
        self.forward = forward
        self.draft_tokens = forward.cache.draft_tokens
        device = forward.weights.device
        self.offsets = torch.arange(self.draft_tokens + 1, dtype=torch.int64, device=device)
        # (k + 1, k): True where draft j comes before position i (j < i), i.e. was seen there.
        draft_index = self.offsets[: self.draft_tokens]
        self.seen_before = draft_index[None, :] < self.offsets[:, None]

    def body(self, b: int, ctx: int) -> None:
        """Verify the drafts of rows ``[:b]`` against keys ``[0, ctx)``; updates state."""
        fwd, cache, w = self.forward, self.forward.cache, self.forward.weights
        k = self.draft_tokens
        width = k + 1
        total = b * width
        vocab = w.vocab_size
        draft = cache.draft[:b]
        start = cache.positions[:b]
        inputs = torch.cat((cache.tokens[:b, None], draft), dim=1)  # (b, k + 1)
        counters = start[:, None] + self.offsets[None, :] + 1  # the sampler's, as in decode
        positions = (counters - 1).clamp(max=fwd.max_seq_len - 1)
        flat_positions = positions.reshape(-1)
        triton = fwd.attention == "triton"
        if not triton:
            cos = fwd.cos[flat_positions][:, None, :]
            sin = fwd.sin[flat_positions][:, None, :]
            rows = fwd.rows[:b].repeat_interleave(width)
            bias = self._bias(positions, ctx)
        x = w.embed[inputs.reshape(-1)]
        layers = w.layers
        h = fwd._norm(x, layers[0].input_norm, w.eps)
        if triton:
            # The decode kernels, each row's k + 1 tokens as rows of their own on its slot.
            queries = torch.empty((total, w.n_heads, w.head_dim), dtype=w.dtype, device=x.device)
            attended = torch.empty((total, w.n_heads * w.head_dim), dtype=w.dtype, device=x.device)
        for index, layer in enumerate(layers):
            if triton:
                keys, values, k_scales, v_scales = cache.layer_kv(index)
                kernels.rope_store(
                    layer.qkv(h),
                    fwd.cos,
                    fwd.sin,
                    flat_positions,
                    keys,
                    values,
                    queries,
                    k_scales,
                    v_scales,
                    rows_per_slot=width,
                )
                # Each key read once for the slot's k + 1 queries (model.fast.verify_attention).
                verify_attention(
                    queries,
                    keys,
                    values,
                    flat_positions,
                    ctx,
                    fwd.scale,
                    attended,
                    width,
                    k_scales,
                    v_scales,
                )
                attn = attended
            else:
                q, kv = fwd._rope_kv(layer.qkv(h), cos, sin, w.n_heads, w.n_kv)
                cache.write_kv(index, rows, flat_positions, kv)  # every position's K and V
                attn = self._attend(q, b, ctx, index, bias)
            x, h = fwd._add_norm(x, layer.o(attn), layer.post_norm, w.eps)
            down = layer.down(fwd._silu_mul(layer.gate_up(h)))
            following = layers[index + 1].input_norm if index + 1 < len(layers) else None
            x, h = fwd._add_norm(x, down, w.final_norm if following is None else following, w.eps)
        logits = w.lm_head(h).float()

        # Each position's banned-strings state: the row's, advanced through the drafts before it.
        states = [cache.ban_state[:b]]
        for j in range(k):
            advanced = cache.ban_next[states[-1], draft[:, j]].clamp(min=0)
            states.append(advanced.to(torch.int64))
        state = torch.stack(states, dim=1).reshape(-1)
        bits = cache.allowed_bits[:b].repeat_interleave(width, dim=0)
        logits, ban_rows = fwd._constrain(logits, bits, state)
        # Each position's seen set: the row's, plus the drafts before it (the input token is
        # in the row's set already, so it stands in where there is nothing to add).
        marks = torch.where(self.seen_before[None], draft[:, None, :], cache.tokens[:b, None, None])
        seen = cache.seen[:b, None, :].expand(b, width, vocab).clone()
        seen.scatter_(2, marks, True)
        token = sample_rows(
            logits,
            seen.view(total, vocab),
            cache.temperature[:b].repeat_interleave(width),
            cache.top_p[:b].repeat_interleave(width),
            cache.repetition_penalty[:b].repeat_interleave(width),
            cache.greedy[:b].repeat_interleave(width),
            cache.seed[:b].repeat_interleave(width),
            counters.reshape(-1),
            fwd.vocab,
            penalize_fn=fwd._penalize,
            race_fn=fwd._race,
        )
        self._keep(token.view(b, width), ban_rows.view(b, width, vocab), start)

    def _keep(self, picked: torch.Tensor, ban_rows: torch.Tensor, start: torch.Tensor) -> None:
        """Keep each row's picks up to its first miss; the rows' state moves past them."""
        cache = self.forward.cache
        b, k = picked.shape[0], self.draft_tokens
        real = self.offsets[None, :k] < cache.draft_length[:b, None]
        hits = (picked[:, :k] == cache.draft[:b]) & real
        accepted = hits.to(torch.int64).cumprod(dim=1).sum(dim=1)
        last = picked.gather(1, accepted[:, None]).squeeze(1)
        cache.verified[:b].copy_(picked)
        cache.accepted[:b].copy_(accepted)
        kept = self.offsets[None, :] <= accepted[:, None]
        cache.seen[:b].scatter_(1, torch.where(kept, picked, last[:, None]), True)
        following = ban_rows[self.forward.rows[:b], accepted]  # (b, V): the last pick's state
        cache.ban_state[:b].copy_(following.gather(1, last[:, None]).squeeze(1).clamp_(min=0))
        cache.tokens[:b].copy_(last)
        # Rows past the live ones (bucket padding) run on garbage; the clamp keeps their
        # writes inside the cache.
        cache.positions[:b].copy_((start + accepted + 1).clamp_(max=self.forward.max_seq_len - 1))

    def _bias(self, positions: torch.Tensor, ctx: int) -> torch.Tensor:
        """The additive mask (b, 1, group * (k + 1), ctx): position ``p`` sees keys ``<= p``.

        Queries are laid out as (kv head, group member, position), see :meth:`_attend`.
        """
        fwd, w = self.forward, self.forward.weights
        b, width = positions.shape
        visible = fwd.key_positions[:ctx][None, None, :] <= positions[:, :, None]
        dtype = torch.float32 if fwd.attention == "matmul" else w.dtype
        zero = torch.zeros((), dtype=dtype, device=w.device)
        bias = torch.where(visible, zero, -torch.inf)
        return bias[:, None, None].expand(b, 1, w.group, width, ctx).reshape(b, 1, -1, ctx)

    def _attend(
        self, q: torch.Tensor, b: int, ctx: int, layer: int, bias: torch.Tensor
    ) -> torch.Tensor:
        """Attention of the ``k + 1`` queries of each row over its cached keys ``[0, ctx)``.

        As in decode, the queries that share a KV head are that head's queries: (b, kv heads,
        group * (k + 1), D), with no copy of K/V.
        """
        fwd, w = self.forward, self.forward.weights
        width = self.draft_tokens + 1
        keys, values = fwd.cache.read_kv(layer, b, ctx)
        q = q.view(b, width, w.n_heads, w.head_dim).transpose(1, 2)
        q = q.reshape(b, w.n_kv, w.group * width, w.head_dim)
        if fwd.attention == "matmul":
            scores = torch.matmul(q, keys.transpose(-1, -2)).float() * fwd.scale + bias
            out = torch.matmul(scores.softmax(dim=-1).to(q.dtype), values)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=fwd.scale)
        out = out.view(b, w.n_heads, width, w.head_dim).transpose(1, 2)
        return out.reshape(b * width, w.n_heads * w.head_dim)
