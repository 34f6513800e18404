"""The fast engine's Triton kernels, run on CPU by Triton's interpreter, against plain torch.

The same kernel source runs compiled on a GPU; here the interpreter executes it program by
program with numpy, which checks the indexing, the masks and the split-K arithmetic.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from model.fast import kernels
from model.fast.forward import rotate
from tests.model.test_fast_engine import (
    DESCRIPTIONS,
    GREEDY,
    hf_text,
    make_engine,
    request,
    tiny_llama,
)


def test_kernels_run_interpreted() -> None:
    """tests/conftest.py sets TRITON_INTERPRET before Triton is imported; without it these
    tests would need a GPU."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert kernels.available()


def rope_tables(positions: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def test_rope_store_rotates_q_and_writes_k_v_at_each_rows_position() -> None:
    heads, kv_heads, dim, slots, length = 4, 2, 16, 5, 64
    torch.manual_seed(0)
    cos, sin = rope_tables(length, dim)
    positions = torch.tensor([3, 0, 17, 63])
    b = len(positions)
    qkv = torch.randn(b, (heads + 2 * kv_heads) * dim)
    k_cache = torch.zeros(slots, kv_heads, length, dim)
    v_cache = torch.zeros(slots, kv_heads, length, dim)
    queries = torch.empty(b, heads, dim)

    kernels.rope_store(qkv, cos, sin, positions, k_cache, v_cache, queries)

    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    q = rotate(qkv[:, : heads * dim].view(b, heads, dim), c, s)
    k = rotate(qkv[:, heads * dim : (heads + kv_heads) * dim].view(b, kv_heads, dim), c, s)
    v = qkv[:, (heads + kv_heads) * dim :].view(b, kv_heads, dim)
    torch.testing.assert_close(queries, q)
    expected_k = torch.zeros_like(k_cache)
    expected_v = torch.zeros_like(v_cache)
    for row, position in enumerate(positions.tolist()):
        expected_k[row, :, position] = k[row]
        expected_v[row, :, position] = v[row]
    torch.testing.assert_close(k_cache, expected_k)  # nothing else written, slot 4 untouched
    torch.testing.assert_close(v_cache, expected_v)


def reference_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: list[int]
) -> torch.Tensor:
    """Softmax attention of each row's query over its first ``lengths[row]`` keys, in float64."""
    b, heads, dim = q.shape
    group = heads // keys.shape[1]
    out = torch.empty(b, heads, dim, dtype=torch.float64)
    for row, length in enumerate(lengths):
        for head in range(heads):
            k = keys[row, head // group, :length].double()
            v = values[row, head // group, :length].double()
            scores = (k @ q[row, head].double()) * dim**-0.5
            out[row, head] = scores.softmax(-1) @ v
    return out.reshape(b, heads * dim)


@pytest.mark.parametrize(
    ("positions", "context", "capacity"),
    [
        ([0, 130, 257, 299], 300, 300),  # lengths within one split, across two, across three
        ([299, 5], 256, 300),  # a row past the context bucket (batch padding) is cut to it
        ([4999, 1500, 20], 5000, 5000),  # long context: bigger chunks, at most MAX_SPLITS
    ],
)
def test_decode_attention_reads_only_each_rows_own_keys(
    positions: list[int], context: int, capacity: int
) -> None:
    heads, kv_heads, dim = 4, 2, 16
    b = len(positions)
    torch.manual_seed(1)
    keys = torch.randn(b + 1, kv_heads, capacity, dim)
    values = torch.randn(b + 1, kv_heads, capacity, dim)
    lengths = [min(p + 1, context) for p in positions]
    for row, length in enumerate(lengths):
        # Past a row's length the cache holds garbage: reading it would poison the result.
        keys[row, :, length:] = float("nan")
        values[row, :, length:] = float("nan")
    q = torch.randn(b, heads, dim)
    out = torch.empty(b, heads * dim)

    kernels.decode_attention(q, keys, values, torch.tensor(positions), context, dim**-0.5, out)

    expected = reference_attention(q, keys, values, lengths).float()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert -(-context // kernels.split_size(context)) <= kernels.MAX_SPLITS


def test_decode_attention_in_bfloat16_matches_within_rounding() -> None:
    heads, dim, length = 2, 32, 200
    torch.manual_seed(2)
    keys = torch.randn(1, heads, length, dim, dtype=torch.bfloat16)
    values = torch.randn(1, heads, length, dim, dtype=torch.bfloat16)
    q = torch.randn(1, heads, dim, dtype=torch.bfloat16)
    out = torch.empty(1, heads * dim, dtype=torch.bfloat16)
    kernels.decode_attention(q, keys, values, torch.tensor([length - 1]), length, dim**-0.5, out)
    expected = reference_attention(q, keys, values, [length])
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=1e-2)


def test_fast_engine_with_triton_attention_matches_transformers(tiny_tokenizer: Any) -> None:
    """The whole decode path with the kernels (rope + KV write, split-K attention) in place."""
    tokenizer = tiny_tokenizer
    model = tiny_llama(tokenizer)
    expected = [hf_text(model, tokenizer, d, GREEDY) for d in DESCRIPTIONS]
    engine = make_engine(model, tokenizer, max_seq_len=256, attention="triton")
    assert engine.runner.attention == "triton"
    results = engine.generate([request(d) for d in DESCRIPTIONS])
    assert [r.text for r in results] == expected


def test_auto_attention_stays_on_sdpa_on_cpu(tiny_tokenizer: Any) -> None:
    model = tiny_llama(tiny_tokenizer)
    engine = make_engine(model, tiny_tokenizer, max_seq_len=128)
    assert engine.runner.attention == "sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        make_engine(model, tiny_tokenizer, max_seq_len=128, attention="flash")


def test_self_check_passes_and_catches_a_wrong_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the engine runs before it picks the kernels on a GPU (else it keeps SDPA)."""
    kernels.self_check(torch.device("cpu"), torch.float32, 4, 2, 16)

    def off_by_one(q: torch.Tensor, k: Any, v: Any, positions: torch.Tensor, *rest: Any) -> None:
        real_attention(q, k, v, positions - 1, *rest)  # misses each row's newest key

    real_attention = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", off_by_one)
    with pytest.raises(RuntimeError, match="differs from the reference"):
        kernels.self_check(torch.device("cpu"), torch.float32, 4, 2, 16)
