"""A Llama forward in plain torch over a slot-based KV cache, for the fast engine.

It reads the weights of a transformers ``LlamaForCausalLM`` (merged bf16, or modules such as
bitsandbytes 4-bit or unmerged peft LoRA layers, which it calls as they are) and computes the
same function: RMSNorm, rotary embeddings with the config's theta, grouped-query attention,
SiLU MLP. On CUDA the decode step over all live slots is captured in CUDA graphs, one per
(batch bucket, context bucket), so a step is one graph launch and short contexts don't read
the whole cache. On CPU the same code runs eagerly (that is what the tests check).

Slots are kept compact: live sequences occupy rows ``0..n-1``; when one leaves, the last row
moves into its place (one copy of that sequence's KV), so a batch-``b`` step works on plain
views ``[:b]`` with no gather.

Constraints (``model.constrained``) are applied inside the step, before sampling, from two
per-row device buffers: ``allowed_bits`` (a bitmask row the host fills for rows under a
grammar; all ones otherwise) and ``ban_state`` (the row's state in the banned-strings table
``ban_next``, which the step itself advances: document mode costs no host work). An
unconstrained row costs one gather and one masked fill over its logits.
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

from model import fast_kernels
from model.errors import first_line
from model.fast_sampling import penalize, race, sample_rows

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor], torch.Tensor]

# Prefill attention: flash / memory-efficient kernels (math on CPU), never cuDNN (see prefill).
PREFILL_ATTENTION_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]

# Prefill pads its packed tokens to a multiple of this, so its matmuls see few shapes.
PREFILL_TOKEN_BUCKET = 128

ATTENTION_KINDS = ("auto", "triton", "sdpa", "matmul")

BATCH_BUCKETS = [1, 2, 4, 8, *range(12, 33, 4), *range(40, 65, 8), 80, 96, 112, 128, 160, 192, 256]
CONTEXT_BUCKETS = [
    *range(128, 1024, 128),
    *range(1024, 2048, 256),
    *range(2048, 4096, 512),
    *range(4096, 32768 + 1, 1024),
]


class _Weight:
    """A bias-free linear layer held as one (out, in) weight; may be several fused."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _TransposedWeight:
    """The same layer with its weight stored (in, out): ``x @ Wt``.

    cuBLAS picks faster kernels for this layout at decode batch sizes: on an H100, at 8 rows,
    o_proj 17.2 vs 23.4 us, gate_up 63.4 vs 70.7 us (bench/serving.py, gemm rows).
    """

    def __init__(self, transposed: torch.Tensor) -> None:
        self.transposed = transposed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.transposed)


class _Modules:
    """Calls modules as they are (4-bit, LoRA-wrapped, biased) and concatenates outputs."""

    def __init__(self, *modules: Any) -> None:
        self.modules = modules

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.modules) == 1:
            out: torch.Tensor = self.modules[0](x)
            return out
        return torch.cat([module(x) for module in self.modules], dim=-1)


def _is_plain_linear(module: Any) -> bool:
    return type(module) is torch.nn.Linear and module.bias is None


def _fuse(modules: list[Any], transpose: bool = True) -> Linear:
    """One weight for several plain linears; the HF modules then view slices of it.

    Rebinding the HF parameters to views keeps the HF model working while the weights exist
    once in memory (a 7B model in bf16 is 13.5 GB; a second copy would not fit small cards).
    With ``transpose`` the one copy is stored (in, out) and the HF weights are transposed
    views of it.
    """
    if not all(_is_plain_linear(m) for m in modules):
        return _Modules(*modules)
    with torch.no_grad():
        if transpose:
            fused = torch.cat([m.weight.data.t() for m in modules], dim=1).contiguous()
            start = 0
            for module in modules:
                rows = module.weight.shape[0]
                module.weight.data = fused[:, start : start + rows].t()
                start += rows
            return _TransposedWeight(fused)
        if len(modules) == 1:
            return _Weight(modules[0].weight.data)
        fused = torch.cat([m.weight.data for m in modules], dim=0)
        start = 0
        for module in modules:
            rows = module.weight.shape[0]
            module.weight.data = fused[start : start + rows]
            start += rows
    return _Weight(fused)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear


def is_quantized(model: Any) -> bool:
    """Whether any layer holds bitsandbytes 4/8-bit weights."""
    return any(
        type(m).__name__ in {"Linear4bit", "Linear8bitLt"} or hasattr(m, "quant_state")
        for m in model.modules()
    )


def _unwrap(model: Any) -> Any:
    """The LlamaForCausalLM inside a peft wrapper; merges the adapter when it can."""
    if hasattr(model, "merge_and_unload"):
        if not is_quantized(model):
            log.info("merging the LoRA adapter into the base weights")
            return model.merge_and_unload()
        # Quantized base: keep the LoRA layers unmerged and call them as modules.
        return model.get_base_model()
    return model


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in float32, scale in the input dtype."""
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
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
    q = _rotate(qkv[:, : heads * dim].view(b, heads, dim), cos, sin)
    k = _rotate(qkv[:, heads * dim : (heads + kv_heads) * dim].view(b, kv_heads, dim), cos, sin)
    v = qkv[:, (heads + kv_heads) * dim :].view(b, kv_heads, dim)
    return q, torch.stack((k, v), dim=1)


class FastLlama:
    """Weights, KV cache and the two forwards (prefill, decode step) of a Llama model."""

    def __init__(
        self,
        model: Any,
        *,
        max_seq_len: int,
        max_slots: int | None,
        memory_fraction: float,
        use_cuda_graphs: bool,
        compile_kernels: bool | str,
        attention: str,
    ) -> None:
        llama = _unwrap(model)
        config = llama.config
        if getattr(config, "model_type", "llama") not in {"llama", "mistral"}:
            raise ValueError(f"the fast engine runs Llama models, not {config.model_type!r}")
        self.llama = llama
        inner = llama.model
        self.n_layers = int(config.num_hidden_layers)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(config.num_key_value_heads or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.group = self.n_heads // self.n_kv
        self.eps = float(config.rms_norm_eps)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r}")
        self.embed = inner.embed_tokens.weight
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.vocab_size = int(llama.lm_head.weight.shape[0])
        self.final_norm = inner.norm.weight
        # lm_head keeps the (out, in) layout: it may be tied to the embedding table.
        self.lm_head = _fuse([llama.lm_head], transpose=False)
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm.weight,
                post_norm=layer.post_attention_layernorm.weight,
                qkv=_fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                o=_fuse([layer.self_attn.o_proj]),
                gate_up=_fuse([layer.mlp.gate_proj, layer.mlp.up_proj]),
                down=_fuse([layer.mlp.down_proj]),
            )
            for layer in inner.layers
        ]
        self.attention = self._choose_attention(attention)
        self.scale = self.head_dim**-0.5
        self.max_seq_len = int(max_seq_len)
        self._build_rope(llama, config)

        cuda = self.device.type == "cuda"
        self.use_graphs = use_cuda_graphs and cuda
        self.slots = self._count_slots(max_slots, memory_fraction)
        self._allocate()
        # The decode step's pieces; _compile_kernels swaps in fused (compiled) versions.
        self._norm: Callable[..., Any] = rms_norm
        self._add_norm: Callable[..., Any] = _add_norm
        self._rope_kv: Callable[..., Any] = _rope_kv
        self._silu_mul: Callable[..., Any] = _silu_mul
        self._penalize: Callable[..., Any] = penalize
        self._race: Callable[..., Any] = race
        if compile_kernels and (cuda or compile_kernels == "force"):
            self._compile_kernels()
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool: Any = None
        # Fine buckets: a step reads K/V up to its context bucket for every row of its batch
        # bucket, so coarse ones waste bandwidth (at batch 32, 1024 vs 640 keys is ~2 ms).
        self.batch_buckets = _buckets(BATCH_BUCKETS, self.slots)
        self.context_buckets = _buckets(CONTEXT_BUCKETS, self.max_seq_len)

    def set_attention(self, attention: str) -> None:
        """Switch the decode attention (benchmarks compare them); graphs are captured again."""
        self.attention = self._choose_attention(attention)
        self._graphs.clear()
        # A fresh pool: the old graphs' memory can't be handed to new captures while any
        # tensor of theirs may still be referenced.
        self._pool = None

    # ----------------------------------------------------------------- setup

    def _choose_attention(self, attention: str) -> str:
        """``auto``: the Triton kernels on CUDA when Triton is there, else SDPA.

        ``triton`` may be forced on CPU (the tests run it under Triton's interpreter).
        """
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, not {attention!r}")
        # The kernels take whole power-of-two head dims (and halves of them) per program.
        fits = self.head_dim >= 16 and self.head_dim & (self.head_dim - 1) == 0
        if attention == "triton" and not fits:
            raise ValueError(
                f"the triton attention needs a power-of-two head dim, not {self.head_dim}"
            )
        if attention != "auto":
            return attention
        if self.device.type == "cuda" and fits and fast_kernels.available():
            try:
                fast_kernels.self_check(
                    self.device, self.dtype, self.n_heads, self.n_kv, self.head_dim
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

    def _build_rope(self, llama: Any, config: Any) -> None:
        # transformers 5 keeps these in rope_parameters; older configs in rope_theta/rope_scaling.
        rope: dict[str, Any] = dict(getattr(config, "rope_scaling", None) or {})
        rope.update(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta: Any = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        dim = self.head_dim
        if rope_type == "default":
            # Computed here in float32: a model cast to bf16 also casts HF's inv_freq buffer.
            inv_freq = 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            scaling = 1.0
        else:
            rotary = llama.model.rotary_emb
            inv_freq = rotary.inv_freq.detach().float().cpu()
            scaling = float(getattr(rotary, "attention_scaling", 1.0))
        positions = torch.arange(self.max_seq_len, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scaling).to(self.dtype).to(self.device)
        self.sin = (emb.sin() * scaling).to(self.dtype).to(self.device)

    def kv_bytes_per_slot(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.n_layers * self.n_kv * self.max_seq_len * self.head_dim * element

    def _count_slots(self, max_slots: int | None, memory_fraction: float) -> int:
        if self.device.type != "cuda":
            return max_slots or 8
        free, _total = torch.cuda.mem_get_info(self.device)
        # Leave room for prefill activations, graph pools and the allocator's slack.
        reserve = 3 * 1024**3
        budget = max(0, int(free * memory_fraction) - reserve)
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
        self.cache = torch.zeros(
            (self.n_layers, 2, s, self.n_kv, self.max_seq_len, self.head_dim),
            dtype=self.dtype,
            device=d,
        )
        # Per-row decode state; the graphs read and update these in place.
        self.tokens = torch.zeros(s, dtype=torch.int64, device=d)
        self.positions = torch.zeros(s, dtype=torch.int64, device=d)
        self.temperature = torch.ones(s, dtype=torch.float32, device=d)
        self.top_p = torch.ones(s, dtype=torch.float32, device=d)
        self.repetition_penalty = torch.ones(s, dtype=torch.float32, device=d)
        self.greedy = torch.ones(s, dtype=torch.bool, device=d)
        self.seed = torch.zeros(s, dtype=torch.int64, device=d)
        self.seen = torch.zeros((s, self.vocab_size), dtype=torch.bool, device=d)
        self.rows = torch.arange(s, dtype=torch.int64, device=d)
        self.vocab = torch.arange(self.vocab_size, dtype=torch.int64, device=d)
        self.key_positions = torch.arange(self.max_seq_len, dtype=torch.int64, device=d)
        # Constraints: per-row allowed-token bitmask (host-filled) and banned-strings state.
        # Row 0 of ban_next is the free state: every token allowed, staying free.
        words = (self.vocab_size + 31) // 32
        self.allowed_bits = torch.full((s, words), -1, dtype=torch.int32, device=d)
        self.ban_state = torch.zeros(s, dtype=torch.int64, device=d)
        self.ban_next = torch.zeros((1, self.vocab_size), dtype=torch.int32, device=d)
        self.vocab_word = self.vocab >> 5
        self.vocab_bit = (self.vocab & 31).to(torch.int32)
        # Two host buffers (pinned on CUDA) for the tokens of two steps in flight.
        pinned = d.type == "cuda"
        self._host_tokens = [torch.zeros(s, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
        self._done = [torch.cuda.Event() for _ in range(2)] if pinned else []
        self._next_buffer = 0

    def _compile_kernels(self) -> None:
        """Fuse the small elementwise pieces with Inductor (the matmuls stay cuBLAS).

        Without this a decode step is ~35 kernels a layer, and their launch gaps alone cost
        more than a millisecond per step at batch 1, even inside a CUDA graph. Each compiled
        piece is tried once here; if compiling fails the eager version stays (still exact).
        """
        d, h, v = self.device, self.embed.shape[1], self.vocab_size
        width = (self.n_heads + 2 * self.n_kv) * self.head_dim

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=d, dtype=self.dtype)

        cos, sin = self.cos[:2][:, None, :], self.sin[:2][:, None, :]
        logits = torch.randn(2, v, device=d)
        order = torch.arange(v, device=d).expand(2, -1).contiguous()
        probs = logits.softmax(-1)
        trials: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
            ("_norm", rms_norm, (rand(2, h), self.final_norm, self.eps)),
            ("_add_norm", _add_norm, (rand(2, h), rand(2, h), self.final_norm, self.eps)),
            ("_rope_kv", _rope_kv, (rand(2, width), cos, sin, self.n_heads, self.n_kv)),
            ("_silu_mul", _silu_mul, (rand(2, 64),)),
            (
                "_penalize",
                penalize,
                (logits, self.seen[:2], self.temperature[:2], self.repetition_penalty[:2]),
            ),
            (
                "_race",
                race,
                (
                    logits,
                    order,
                    probs,
                    probs.cumsum(-1),
                    self.top_p[:2],
                    self.greedy[:2],
                    self.tokens[:2],
                    self.seed[:2],
                    self.positions[:2],
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

    def register_ban_tables(self, tables: list[torch.Tensor]) -> list[int]:
        """Put banned-strings tables (``BanAutomaton.next_state``, int32 (states, V)) on
        the device, one after the other after the free state; each one's state offset.

        Call before any decode graph is captured (the graphs read ``ban_next``).
        """
        if self._graphs:
            raise RuntimeError("register the banned-strings tables before capturing graphs")
        offsets, parts, start = [], [self.ban_next[:1].cpu()], 1
        for table in tables:
            if table.shape[1] != self.vocab_size:
                raise ValueError(f"table width {table.shape[1]} != vocab {self.vocab_size}")
            offsets.append(start)
            parts.append(torch.where(table >= 0, table + start, table))
            start += table.shape[0]
        self.ban_next = torch.cat(parts).to(torch.int32).to(self.device)
        return offsets

    def _constrain(
        self, logits: torch.Tensor, bits: torch.Tensor, ban_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits with each row's disallowed tokens at -inf, and the rows of the banned
        table (the state each token would lead to, DEAD = -1 where banned)."""
        ban_rows = self.ban_next[ban_state]
        allowed = (bits[:, self.vocab_word] >> self.vocab_bit) & 1
        blocked = (allowed == 0) | (ban_rows < 0)
        return logits.masked_fill(blocked, -torch.inf), ban_rows

    # -------------------------------------------------------------- forwards

    def _attend_decode(
        self, q: torch.Tensor, b: int, ctx: int, layer: int, bias: torch.Tensor
    ) -> torch.Tensor:
        """Attention of one new query per row over its cached keys ``[0, ctx)``.

        Grouped-query heads need no copy of K/V: the ``group`` query heads that share a KV
        head are laid out as ``group`` queries of that head.
        """
        keys = self.cache[layer, 0, :b, :, :ctx]
        values = self.cache[layer, 1, :b, :, :ctx]
        q = q.view(b, self.n_kv, self.group, self.head_dim)
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=self.scale)
        else:
            scores = torch.matmul(q, keys.transpose(-1, -2)).float() * self.scale + bias
            out = torch.matmul(scores.softmax(dim=-1).to(q.dtype), values)
        return out.reshape(b, self.n_heads * self.head_dim)

    def decode_body(self, b: int, ctx: int) -> None:
        """One decode step for rows ``[:b]`` with keys ``[0, ctx)``; updates state in place."""
        tokens = self.tokens[:b]
        positions = self.positions[:b]
        x = self.embed[tokens]
        triton = self.attention == "triton"
        if triton:
            # Scratch reused by every layer: the rotated queries and attention's output.
            queries = torch.empty(
                (b, self.n_heads, self.head_dim), dtype=self.dtype, device=x.device
            )
            attended = torch.empty(
                (b, self.n_heads * self.head_dim), dtype=self.dtype, device=x.device
            )
        else:
            cos = self.cos[positions][:, None, :]
            sin = self.sin[positions][:, None, :]
            visible = self.key_positions[:ctx][None, :] <= positions[:, None]
            zero = torch.zeros((), dtype=self.dtype, device=self.device)
            bias_dtype = self.dtype if self.attention == "sdpa" else torch.float32
            bias = torch.where(visible, zero, -torch.inf).to(bias_dtype)[:, None, None, :]
        layers = self.layers
        h = self._norm(x, layers[0].input_norm, self.eps)
        for index, layer in enumerate(layers):
            if triton:
                keys, values = self.cache[index, 0], self.cache[index, 1]
                fast_kernels.rope_store(
                    layer.qkv(h), self.cos, self.sin, positions, keys, values, queries
                )
                fast_kernels.decode_attention(
                    queries, keys, values, positions, ctx, self.scale, attended
                )
                attn = attended
            else:
                q, kv = self._rope_kv(layer.qkv(h), cos, sin, self.n_heads, self.n_kv)
                # cache[index] is (2, slots, kv heads, T, D); this writes K and V of every
                # row at its position in one kernel.
                self.cache[index][:, self.rows[:b], :, positions] = kv
                attn = self._attend_decode(q, b, ctx, index, bias)
            x, h = self._add_norm(x, layer.o(attn), layer.post_norm, self.eps)
            down = layer.down(self._silu_mul(layer.gate_up(h)))
            following = layers[index + 1].input_norm if index + 1 < len(layers) else None
            x, h = self._add_norm(
                x, down, self.final_norm if following is None else following, self.eps
            )
        logits = self.lm_head(h).float()
        logits, ban_rows = self._constrain(logits, self.allowed_bits[:b], self.ban_state[:b])
        nxt = positions + 1
        token = sample_rows(
            logits,
            self.seen[:b],
            self.temperature[:b],
            self.top_p[:b],
            self.repetition_penalty[:b],
            self.greedy[:b],
            self.seed[:b],
            nxt,
            self.vocab,
            penalize_fn=self._penalize,
            race_fn=self._race,
        )
        tokens.copy_(token)
        # Rows past the live ones (bucket padding) keep running on garbage; clamping keeps
        # their writes inside the cache.
        positions.copy_(nxt.clamp_(max=self.max_seq_len - 1))
        self.seen[:b].scatter_(1, token[:, None], True)
        self.ban_state[:b].copy_(ban_rows.gather(1, token[:, None]).squeeze(1).clamp_(min=0))

    def decode(self, b: int, ctx: int) -> list[int]:
        """Run one step for rows ``[:b]`` (context bucket ``ctx``); the new tokens."""
        return self.collect(self.launch(b, ctx))

    def launch(self, b: int, ctx: int) -> tuple[int, int]:
        """Start one decode step for rows ``[:b]``; :meth:`collect` its tokens later.

        On a GPU this only enqueues work, so the caller can do its bookkeeping for the
        previous step while this one runs. Two steps may be in flight's reach at once (the
        host copies alternate between two pinned buffers): collect each before launching
        the one after next.
        """
        ctx = min(ctx, self.max_seq_len)
        if self.use_graphs:
            bb = self.batch_bucket(b)
            cb = self.context_bucket(ctx)
            graph = self._graphs.get((bb, cb))
            if graph is None:
                try:
                    graph = self._capture(bb, cb)
                except RuntimeError as error:
                    # Some layers (e.g. a quantization kernel that syncs) can't be captured;
                    # eager decode is slower but correct.
                    log.warning("CUDA graph capture failed (%s); decoding eagerly", error)
                    self.use_graphs = False
                    self._graphs.clear()
            if graph is not None:
                graph.replay()
        if not self.use_graphs:
            with torch.inference_mode():
                self.decode_body(b, ctx)
        slot = self._next_buffer
        self._next_buffer ^= 1
        if self.device.type == "cuda":
            self._host_tokens[slot][:b].copy_(self.tokens[:b], non_blocking=True)
            self._done[slot].record()
        else:
            self._host_tokens[slot][:b] = self.tokens[:b]
        return slot, b

    def collect(self, ticket: tuple[int, int]) -> list[int]:
        """The tokens of a launched step (waits for it; the wait releases the GIL)."""
        slot, b = ticket
        if self.device.type == "cuda":
            self._done[slot].synchronize()
        return list(self._host_tokens[slot][:b].tolist())

    def batch_bucket(self, b: int) -> int:
        return next(size for size in self.batch_buckets if size >= b)

    def context_bucket(self, ctx: int) -> int:
        return next(size for size in self.context_buckets if size >= ctx)

    def _capture(self, b: int, ctx: int) -> torch.cuda.CUDAGraph:
        """Capture the step for (b, ctx); live rows' state is saved and put back around it."""
        saved = (
            self.tokens.clone(),
            self.positions.clone(),
            self.seen[:b].clone(),
            self.ban_state.clone(),
        )
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode():
            with torch.cuda.stream(stream):
                self.decode_body(b, ctx)  # warm-up: compiles kernels, creates cuBLAS handles
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self.decode_body(b, ctx)
        self.tokens.copy_(saved[0])
        self.positions.copy_(saved[1])
        self.seen[:b].copy_(saved[2])
        self.ban_state.copy_(saved[3])
        self._graphs[(b, ctx)] = graph
        log.debug("captured decode graph batch=%d context=%d", b, ctx)
        return graph

    def capture_all(self, max_batch: int | None = None) -> int:
        """Capture every (batch, context) graph up to ``max_batch`` rows; how many."""
        if not self.use_graphs:
            return 0
        sizes = [s for s in self.batch_buckets if max_batch is None or s <= max_batch]
        if max_batch is not None and max_batch not in sizes:
            sizes.append(self.batch_bucket(max_batch))
        for b in sorted(sizes, reverse=True):  # largest first: the pool is sized once
            for ctx in self.context_buckets:
                if (b, ctx) not in self._graphs:
                    self._capture(b, ctx)
        return len(self._graphs)

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run the prompts into the cache rows; returns last-position logits (n, V) float32.

        The prompts are packed into one sequence, padded to a multiple of
        ``PREFILL_TOKEN_BUCKET`` tokens: the projections and the MLP see only a few shapes,
        which :meth:`warm_prefill` runs once at start-up (a matmul's first call at a new
        shape costs tens of milliseconds on an H100; a whole prefill ~20-50 ms). Attention runs on
        the prompts gathered into a right-padded batch. Eager on purpose: compiled code would
        recompile for new shapes in the middle of serving. Attention is kept off cuDNN, which
        builds a plan for every new prompt length (~80 ms on an H100).
        """
        lengths = [len(p) for p in prompts]
        n, longest, total = len(prompts), max(lengths), sum(lengths)
        padded = -(-total // PREFILL_TOKEN_BUCKET) * PREFILL_TOKEN_BUCKET
        device = self.device
        with torch.inference_mode(), sdpa_kernel(PREFILL_ATTENTION_BACKENDS):
            flat = torch.zeros(padded, dtype=torch.int64)
            flat[:total] = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)
            positions = torch.zeros(padded, dtype=torch.int64)
            positions[:total] = torch.cat([torch.arange(length) for length in lengths])
            sizes = torch.tensor(lengths)
            slot_of_token = torch.repeat_interleave(torch.tensor(rows), sizes)
            # (n, longest): the packed index of each prompt's tokens. Padding repeats the
            # prompt's last token; it sits after every real query, so the causal mask hides it.
            starts = torch.cumsum(sizes, 0) - sizes
            offsets = torch.arange(longest)
            gather = starts[:, None] + torch.minimum(offsets, sizes[:, None] - 1)
            real = offsets[None, :] < sizes[:, None]
            ids, positions = flat.to(device), positions.to(device)
            slot_of_token, gather, real = (
                slot_of_token.to(device),
                gather.to(device),
                real.to(device),
            )
            x = self.embed[ids]
            cos = self.cos[positions][:, None, :]
            sin = self.sin[positions][:, None, :]
            hq = self.n_heads * self.head_dim
            hkv = self.n_kv * self.head_dim
            for index, layer in enumerate(self.layers):
                h = rms_norm(x, layer.input_norm, self.eps)
                qkv = layer.qkv(h)
                q = _rotate(qkv[:, :hq].view(padded, self.n_heads, self.head_dim), cos, sin)
                k = _rotate(qkv[:, hq : hq + hkv].view(padded, self.n_kv, self.head_dim), cos, sin)
                v = qkv[:, hq + hkv :].view(padded, self.n_kv, self.head_dim)
                # cache[index] is (2, slots, kv heads, T, D): every real token's K and V at
                # its (slot, position) in one write.
                kv = torch.stack((k[:total], v[:total]), dim=1)
                self.cache[index][:, slot_of_token, :, positions[:total]] = kv
                attn = torch.zeros((padded, hq), dtype=x.dtype, device=device)
                attn[:total] = self._attend_prompts(q, k, v, gather, real)
                x = x + layer.o(attn)
                h = rms_norm(x, layer.post_norm, self.eps)
                x = x + layer.down(_silu_mul(layer.gate_up(h)))
            # lm_head on a batch-bucket of rows, so its shapes are the decode step's ones.
            last = [*itertools.accumulate(lengths)]
            last += [last[-1]] * (self.batch_bucket(n) - n)
            x = rms_norm(x[torch.tensor(last, device=device) - 1], self.final_norm, self.eps)
            return self.lm_head(x).float()[:n]

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
        q, k, v = (t[gather].transpose(1, 2) for t in (q, k, v))
        if self.group > 1:
            k = k.repeat_interleave(self.group, dim=1)
            v = v.repeat_interleave(self.group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        out = out.transpose(1, 2)[real]  # (real tokens in packed order, heads, D)
        return out.reshape(out.shape[0], self.n_heads * self.head_dim)

    def warm_prefill(self, max_tokens: int) -> int:
        """Run one prefill per token bucket up to ``max_tokens`` (first-call costs paid now).

        Row 0 is used as scratch: call before serving. Returns how many prefills ran.
        """
        limit = min(max_tokens, self.max_seq_len - 1)
        sizes = range(PREFILL_TOKEN_BUCKET, limit + PREFILL_TOKEN_BUCKET, PREFILL_TOKEN_BUCKET)
        for size in sizes:
            self.prefill([0], [[0] * min(size, limit)])
        # A few multi-prompt batches: their attention and lm_head shapes differ.
        for count in (2, 4, 8):
            if count <= self.slots and count * 16 <= limit:
                self.prefill(list(range(count)), [[0] * 16] * count)
        return len(sizes)

    def sample(self, rows: list[int], logits: torch.Tensor, counters: list[int]) -> list[int]:
        """Sample one token per row from given logits (used after prefill)."""
        with torch.inference_mode():
            index = torch.tensor(rows, dtype=torch.int64, device=self.device)
            counter = torch.tensor(counters, dtype=torch.int64, device=self.device)
            logits, _ = self._constrain(logits, self.allowed_bits[index], self.ban_state[index])
            token = sample_rows(
                logits,
                self.seen[index],
                self.temperature[index],
                self.top_p[index],
                self.repetition_penalty[index],
                self.greedy[index],
                self.seed[index],
                counter,
                self.vocab,
            )
            return list(token.tolist())

    # ----------------------------------------------------------- row state

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
            self.cache[:, :, target, :, :length] = self.cache[:, :, source, :, :length]
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


def _buckets(candidates: list[int], limit: int) -> list[int]:
    sizes = sorted({c for c in candidates if c < limit} | {limit})
    return sizes
