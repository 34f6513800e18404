"""Prefill through the Triton kernels (``model.fast.prefill_attention`` and ``rope_store`` with
a slot per token), under Triton's interpreter, against plain attention and against the SDPA
prefill it replaces on a GPU.

Each packed prompt token must attend to its own row's keys up to its own position, over keys
the row held before (a shared prefix, earlier chunks) and the prompt's own, in bf16 and fp8
caches, with grouped-query heads and prompts longer than one block of queries.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model.fast import prefill_attention as module
from model.fast.kv_cache import dequantize_kv, quantize_kv
from model.fast.prefill_attention import prefill_attention, query_blocks
from tests.model.test_fast_engine import make_engine, tiny_llama


def test_query_blocks_cut_each_prompt_into_blocks_of_one_prompt() -> None:
    block = module.BLOCK_QUERIES
    table = query_blocks([block + 6, 3], [10, 0], [4, 1])
    assert table.dtype == torch.int32
    assert table.tolist() == [
        [0, block, block + 6],  # packed index of each block's first query
        [block, 6, 3],  # its queries
        [4, 4, 1],  # its cache row
        [10, 10 + block, 0],  # the position of its first query
    ]


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_each_token_attends_to_its_rows_keys_up_to_its_position(kv_format: str) -> None:
    generator = torch.Generator().manual_seed(3)
    slots, kv_heads, heads, dim, length = 4, 2, 4, 32, 256
    block = module.BLOCK_QUERIES
    # Prompt 0 continues 20 cached keys of row 2 over two query blocks; prompt 1 starts
    # row 0; prompt 2 continues row 3 from position 150.
    lengths, starts, rows = [block + 7, 5, 30], [20, 0, 150], [2, 0, 3]
    keys = torch.randn(slots, kv_heads, length, dim, generator=generator)
    values = torch.randn(slots, kv_heads, length, dim, generator=generator)
    for row, start, count in zip(rows, starts, lengths, strict=True):
        # Garbage past each prompt's last key must not leak in.
        keys[row, :, start + count :] = float("nan")
        values[row, :, start + count :] = float("nan")
    keys[1], values[1] = float("nan"), float("nan")  # a row no prompt uses
    k_scales = v_scales = None
    if kv_format == "fp8":
        (keys, k_scales), (values, v_scales) = quantize_kv(keys), quantize_kv(values)
    stored_keys, stored_values = keys, values
    if k_scales is not None and v_scales is not None:
        stored_keys = dequantize_kv(keys, k_scales, torch.float32)
        stored_values = dequantize_kv(values, v_scales, torch.float32)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, generator=generator)
    expected = torch.empty(total, heads * dim)
    group = heads // kv_heads
    token = 0
    for row, start, count in zip(rows, starts, lengths, strict=True):
        for j in range(count):
            seen = start + j + 1
            row_keys = stored_keys[row, :, :seen].repeat_interleave(group, dim=0)
            row_values = stored_values[row, :, :seen].repeat_interleave(group, dim=0)
            scores = q[token][:, None, :] @ row_keys.transpose(1, 2) * dim**-0.5
            expected[token] = (torch.softmax(scores, -1) @ row_values).reshape(-1)
            token += 1
    got = torch.full((total + 4, heads * dim), 7.0)  # rows past the table stay as they were
    prefill_attention(
        q, keys, values, query_blocks(lengths, starts, rows), dim**-0.5, got, k_scales, v_scales
    )
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:total], expected, rtol=1e-5, atol=1e-5)
    assert (got[total:] == 7.0).all()


def test_a_table_that_is_not_query_blocks_is_refused() -> None:
    q = torch.zeros(3, 2, 16)
    cache = torch.zeros(2, 2, 64, 16)
    out = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="query_blocks"):
        prefill_attention(q, cache, cache, torch.zeros(3, 1, dtype=torch.int64), 0.25, out)


@pytest.mark.parametrize("kv_cache", ["bf16", "fp8"])
def test_kernel_prefill_matches_the_sdpa_prefill(tiny_tokenizer: Any, kv_cache: str) -> None:
    """The whole prefill, fresh prompts next to prompts continuing their rows (a shared
    prefix copied in, a chunk): the same logits and the same cache as the SDPA path."""
    model = tiny_llama(tiny_tokenizer)
    engines = {
        attention: make_engine(
            model, tiny_tokenizer, max_seq_len=256, attention=attention, kv_cache=kv_cache
        )
        for attention in ("sdpa", "triton")
    }
    generator = torch.Generator().manual_seed(5)

    def tokens(count: int) -> list[int]:
        return torch.randint(5, 400, (count,), generator=generator).tolist()

    first = [tokens(70), tokens(9)]
    rest = [tokens(40), tokens(3), tokens(12)]
    logits = {}
    for attention, engine in engines.items():
        runner = engine.runner
        assert runner.attention == attention
        logits[attention] = [
            runner.prefill([3, 1], first),
            # Rows 3 and 1 continue (at 70 and 9); row 0 starts fresh beside them.
            runner.prefill([3, 1, 0], rest, starts=[70, 9, 0]),
        ]
    for sdpa, kernel in zip(logits["sdpa"], logits["triton"], strict=True):
        torch.testing.assert_close(kernel, sdpa, rtol=1e-4, atol=1e-4)
    caches = [engines[a].runner.cache for a in ("sdpa", "triton")]
    for row, used in ((3, 110), (1, 12), (0, 12)):
        for layer in range(len(engines["sdpa"].runner.weights.layers)):
            index = torch.tensor([row])
            sdpa_kv, kernel_kv = (c.read_rows(layer, index, used) for c in caches)
            for a, b in zip(sdpa_kv, kernel_kv, strict=True):
                if kv_cache == "bf16":
                    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
                    continue
                # Both writers quantize alike, but values a rounding apart before E4M3 may
                # land one code apart: almost all agree to float32 rounding, none further
                # than one code.
                step = a.abs().amax(dim=-1, keepdim=True) / 8
                assert ((b - a).abs() <= step * 1.01).all()
                assert ((b - a).abs() <= 1e-5 * a.abs() + 1e-6).float().mean() > 0.99
