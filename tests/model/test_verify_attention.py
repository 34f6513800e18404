"""The verify step's attention kernel against plain attention, under Triton's interpreter.

``verify_attention`` reads each key once for all of a slot's queries; each query must get
softmax attention over its own slot's keys ``[0, min(position + 1, context))``, as decode
attention gives one query, for bf16 and fp8 caches, slots at different positions, queries
past a short context and GQA heads.
"""

from __future__ import annotations

import pytest
import torch

from model.fast.kv_cache import dequantize_kv, quantize_kv
from model.fast.verify_attention import verify_attention


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
@pytest.mark.parametrize("queries", [1, 5, 9])
def test_each_query_attends_to_its_own_slot_up_to_its_position(
    kv_format: str, queries: int
) -> None:
    generator = torch.Generator().manual_seed(queries)
    slots, kv_heads, heads, dim, length = 3, 2, 4, 32, 200
    keys = torch.randn(slots, kv_heads, length, dim, generator=generator)
    values = torch.randn(slots, kv_heads, length, dim, generator=generator)
    # Garbage past each row's length must not leak in.
    keys[:, :, 150:] = float("nan")
    values[:, :, 150:] = float("nan")
    k_scales = v_scales = None
    if kv_format == "fp8":
        (keys, k_scales), (values, v_scales) = quantize_kv(keys), quantize_kv(values)
    starts = torch.tensor([3, 70, 150 - queries])  # slot 0 short, slot 2 up to the garbage
    positions = (starts[:, None] + torch.arange(queries)[None, :]).reshape(-1)
    q = torch.randn(slots * queries, heads, dim, generator=generator)
    context = 192
    stored_keys, stored_values = keys, values
    if k_scales is not None and v_scales is not None:
        stored_keys = dequantize_kv(keys, k_scales, torch.float32)
        stored_values = dequantize_kv(values, v_scales, torch.float32)
    expected = torch.empty(slots * queries, heads * dim)
    group = heads // kv_heads
    for row, position in enumerate(positions.tolist()):
        seen = min(position + 1, context)
        slot_keys = stored_keys[row // queries, :, :seen].repeat_interleave(group, dim=0)
        slot_values = stored_values[row // queries, :, :seen].repeat_interleave(group, dim=0)
        weights = torch.softmax(q[row][:, None, :] @ slot_keys.transpose(1, 2) * dim**-0.5, -1)
        expected[row] = (weights @ slot_values).reshape(-1)
    got = torch.empty_like(expected)
    verify_attention(
        q, keys, values, positions, context, dim**-0.5, got, queries, k_scales, v_scales
    )
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rows_must_be_whole_slots() -> None:
    q = torch.zeros(5, 2, 16)
    cache = torch.zeros(2, 2, 64, 16)
    with pytest.raises(ValueError, match="whole slots"):
        verify_attention(
            q, cache, cache, torch.zeros(5, dtype=torch.int64), 64, 1.0, torch.empty(5, 32), 2
        )
