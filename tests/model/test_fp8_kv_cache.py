"""The fp8 KV cache (``KV_CACHE=fp8``): every writer quantizes, every reader dequantizes.

On CPU, on the tiny random Llama of test_fast_engine.py; the Triton kernels run under
Triton's interpreter (tests/conftest.py). The engine-level checks are two: with its K and V
rounded the way the cache rounds them, transformers writes exactly the fp8 engine's text (so
nothing reads or writes the cache any other way), and the fp8 engine's teacher-forced
decode logits stay close to the bf16 engine's (so the rounding is a small one).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench.fp8_agreement import engine_fp8_kv_cache
from model.fast import FastLlama, kernels
from model.fast.forward import rotate
from model.fast.kv_cache import (
    KV_SCALE_DTYPE,
    RESERVED_BYTES,
    SlotCache,
    dequantize_kv,
    fp8_round_trip,
    quantize_kv,
)
from model.fp8 import E4M3_MAX
from model.prompting import plan_answer
from model.types import GenerationRequest, SamplingParams
from tests import tiny
from tests.model.test_fast_engine import (
    DESCRIPTIONS,
    hf_text,
    make_engine,
    request,
    tiny_llama,
)
from tests.model.test_fast_kernels import reference_attention, rope_tables

FP8 = torch.float8_e4m3fn


def fp8_zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.uint8).view(FP8)


# ------------------------------------------------------------------ the engine


@pytest.mark.parametrize(("attention", "tokens"), [("sdpa", 16), ("matmul", 16), ("triton", 10)])
def test_fp8_engine_is_the_model_with_its_kv_rounded(
    tiny_tokenizer: Any, attention: str, tokens: int
) -> None:
    """transformers with its keys (after RoPE) and values put through the cache's round trip
    (``fp8_round_trip``, at every position, prompt included) writes exactly the engine's text:
    prefill's and the decode steps' writes are quantized, and every read dequantized, the
    same way. Rounding changes this sharp tiny model's text, so a cache that skipped it (or
    rounded differently) fails."""
    tokenizer = tiny_tokenizer
    model = tiny_llama(tokenizer)
    sampling = SamplingParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)
    unrounded = [hf_text(model, tokenizer, d, sampling) for d in DESCRIPTIONS]
    with engine_fp8_kv_cache(model):
        expected = [hf_text(model, tokenizer, d, sampling) for d in DESCRIPTIONS]
    assert expected != unrounded
    engine = make_engine(model, tokenizer, max_seq_len=256, attention=attention, kv_cache="fp8")
    assert engine.runner.attention == attention and engine.runner.cache.kv.dtype == FP8
    results = engine.generate([request(d, sampling) for d in DESCRIPTIONS])
    assert [r.text for r in results] == expected


def prompts_for(tokenizer: Any) -> list[list[int]]:
    return [plan_answer(tokenizer, GenerationRequest(prompt=d)).prompt_ids for d in DESCRIPTIONS]


def fast_llama(model: Any, kv_cache: str, attention: str = "sdpa") -> FastLlama:
    return FastLlama(
        model,
        max_seq_len=256,
        max_slots=4,
        memory_fraction=0.9,
        use_cuda_graphs=False,
        compile_kernels=False,
        attention=attention,
        kv_cache=kv_cache,
    )


def teacher_forced_logits(
    runner: FastLlama, prompts: list[list[int]], forced: list[list[int]]
) -> torch.Tensor:
    """Logits (len(forced), rows, V): prefill's, then one decode step's per forced token
    (row ``i`` reads ``forced[step][i]`` whatever it predicted)."""
    rows = len(prompts)
    longest = max(len(p) for p in prompts)
    captured: list[torch.Tensor] = []
    head = runner.weights.lm_head

    def recording_head(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        captured.append(logits.float()[:rows])
        return logits

    for row, prompt in enumerate(prompts):
        runner.cache.set_row(
            row, prompt=prompt, temperature=0.0, top_p=1.0, repetition_penalty=1.0, seed=0
        )
    runner.weights.lm_head = recording_head
    try:
        runner.prefill(list(range(rows)), prompts)
        for row, prompt in enumerate(prompts):
            runner.cache.start_row(row, forced[0][row], len(prompt))
        for step in range(1, len(forced)):
            runner.decode(rows, longest + step)
            runner.cache.tokens[:rows] = torch.tensor(forced[step])
    finally:
        runner.weights.lm_head = head
    return torch.stack(captured)


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_fp8_decode_logits_stay_close_to_bf16(tiny_tokenizer: Any, attention: str) -> None:
    """Teacher-forced along the bf16 engine's greedy tokens, the fp8 cache's logits differ by
    a few percent of their spread and pick the same top-1 almost everywhere.

    Measured here: largest difference 0.04 of the logits' std, top-1 100%, mean KL 3e-4
    (sdpa and triton alike). A cache read back at twice its scale scored 2.9 / 22% / 1.9, one
    read without its scales 8.8 / 0% / 14 (30 steps): the bounds sit well between. The
    default attention init, not the sharp one above, so that the rounding stays small (the
    sharp model amplifies it).
    """
    tokenizer = tiny_tokenizer
    model = tiny.tiny_llama(
        tokenizer,
        max_position_embeddings=512,
        lm_head_std=0.5,
        rope_theta=50000.0,
        pad_token_id=tokenizer.eos_token_id,
    ).eval()
    prompts = prompts_for(tokenizer)
    reference = fast_llama(model, "bf16")
    steps = 12 if attention == "triton" else 20
    greedy = [reference.prefill(list(range(len(prompts))), prompts).argmax(-1).tolist()]
    for row, prompt in enumerate(prompts):
        reference.cache.start_row(row, greedy[0][row], len(prompt))
    longest = max(len(p) for p in prompts)
    greedy += [reference.decode(len(prompts), longest + step) for step in range(1, steps)]
    expected = teacher_forced_logits(fast_llama(model, "bf16"), prompts, greedy)
    got = teacher_forced_logits(fast_llama(model, "fp8", attention), prompts, greedy)

    spread = expected.std(dim=-1, keepdim=True)
    difference = ((got - expected).abs() / spread).amax(dim=-1)
    assert 0 < float(difference.max()) < 0.15
    top1 = (got.argmax(-1) == expected.argmax(-1)).float().mean()
    assert float(top1) >= 0.9
    log_p, log_q = expected.log_softmax(-1), got.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert float(kl.mean()) < 5e-3


def test_bad_kv_cache_format_is_refused(tiny_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        make_engine(tiny_llama(tiny_tokenizer), tiny_tokenizer, max_seq_len=64, kv_cache="fp16")


def test_switching_the_cache_to_fp8_serves_as_an_fp8_engine(tiny_tokenizer: Any) -> None:
    """What ``bench/serving.py --kv-cache fp8`` does between its phases."""
    model = tiny_llama(tiny_tokenizer)
    sampling = SamplingParams(max_new_tokens=10, temperature=0.0, repetition_penalty=1.0)
    requests = [request(d, sampling) for d in DESCRIPTIONS]
    fp8 = make_engine(model, tiny_tokenizer, max_seq_len=256, kv_cache="fp8")
    expected = [r.text for r in fp8.generate(requests)]
    switched = make_engine(model, tiny_tokenizer, max_seq_len=256)
    bf16 = [r.text for r in switched.generate(requests)]
    switched.runner.set_kv_cache("fp8")
    assert switched.runner.cache.kv.dtype == FP8 and switched.slots == fp8.slots
    assert [r.text for r in switched.generate(requests)] == expected != bf16


# ------------------------------------------------------------------ the format


def test_quantize_kv_scales_each_vector_to_e4m3s_range() -> None:
    torch.manual_seed(0)
    # Vectors of very different sizes (an outlier head, a quiet one) and an all-zero one.
    x = torch.randn(3, 4, 64) * torch.tensor([1e-3, 1.0, 30.0, 0.0])[None, :, None]
    values, scale = quantize_kv(x)
    assert values.dtype == FP8 and scale.dtype == KV_SCALE_DTYPE and scale.shape == (3, 4)
    absmax = x.abs().amax(dim=-1)
    torch.testing.assert_close(scale[:, :3], absmax[:, :3] / E4M3_MAX)
    assert bool((scale > 0).all())  # the zero vector too: no division by zero
    # Each vector's largest element lands on +-448; every element within E4M3's rounding
    # (half a step: 2^-4 of its own size, or less) of its value.
    widened = values.float()
    assert torch.equal(widened.abs().amax(dim=-1)[:, :3], torch.full((3, 3), E4M3_MAX))
    back = dequantize_kv(values, scale, torch.float32)
    assert bool(((back - x).abs() <= x.abs() / 16 + scale[..., None] * 2**-9).all())
    assert torch.equal(back[:, 3], torch.zeros(3, 64))
    assert torch.equal(fp8_round_trip(x), back)


def cache(kv_format: str, slots: int = 4, dtype: torch.dtype = torch.float32) -> SlotCache:
    return SlotCache(
        layers=2,
        kv_heads=2,
        head_dim=16,
        max_seq_len=32,
        vocab_size=50,
        dtype=dtype,
        device=torch.device("cpu"),
        max_slots=slots,
        memory_fraction=0.9,
        kv_format=kv_format,
    )


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_write_kv_then_read_kv_give_back_what_as_read_says(kv_format: str) -> None:
    slots = cache(kv_format)
    torch.manual_seed(1)
    kv = torch.randn(3, 2, 2, 16)  # 3 tokens: K and V of 2 heads
    rows, positions = torch.tensor([0, 2, 2]), torch.tensor([5, 0, 7])
    slots.write_kv(1, rows, positions, kv)
    keys, values = slots.read_kv(1, 3, 8)
    assert keys.shape == values.shape == (3, 2, 8, 16) and keys.dtype == torch.float32
    for i, (row, position) in enumerate(zip(rows.tolist(), positions.tolist(), strict=True)):
        assert torch.equal(keys[row, :, position], slots.as_read(kv[i, 0]))
        assert torch.equal(values[row, :, position], slots.as_read(kv[i, 1]))
    assert torch.equal(keys[1], torch.zeros(2, 8, 16))  # row 1 untouched
    if kv_format == "bf16":
        # Views of the cache, no copy; and as_read is the identity.
        assert keys.data_ptr() == slots.kv[1, 0].data_ptr()
        assert slots.as_read(kv) is kv
    else:
        assert not torch.equal(slots.as_read(kv), kv)  # really rounded
        # Layer 0 was not written.
        assert torch.equal(slots.read_kv(0, 3, 8)[0], torch.zeros(3, 2, 8, 16))


def test_move_row_moves_the_scales_with_the_values() -> None:
    slots = cache("fp8")
    torch.manual_seed(2)
    length = 6
    for layer in range(2):
        kv = torch.randn(length, 2, 2, 16) * (layer + 1) * 10
        slots.write_kv(layer, torch.full((length,), 3), torch.arange(length), kv)
    before = [slots.read_kv(layer, 4, length) for layer in range(2)]
    slots.move_row(3, 1, length)
    for layer in range(2):
        keys, values = slots.read_kv(layer, 4, length)
        assert torch.equal(keys[1], before[layer][0][3])
        assert torch.equal(values[1], before[layer][1][3])
    assert slots.kv_scale is not None
    assert torch.equal(slots.kv_scale[:, :, 1, :, :length], slots.kv_scale[:, :, 3, :, :length])


def test_slot_size_counts_the_values_and_their_scales() -> None:
    wide, narrow = cache("bf16", dtype=torch.bfloat16), cache("fp8", dtype=torch.bfloat16)
    for slots in (wide, narrow):
        allocated = slots.kv.numel() * slots.kv.element_size()
        if slots.kv_scale is not None:
            allocated += slots.kv_scale.numel() * slots.kv_scale.element_size()
        assert slots.kv_bytes_per_slot() * slots.slots == allocated
    # Per token and head: 16 bf16 values (32 bytes), or 16 E4M3 values and a float32 scale.
    vectors = 2 * 2 * 2 * 32
    assert wide.kv_bytes_per_slot() == vectors * 32
    assert narrow.kv_bytes_per_slot() == vectors * 20
    free = RESERVED_BYTES + 100 * wide.kv_bytes_per_slot()
    assert wide.slots_that_fit(free, 1.0) == 100
    assert narrow.slots_that_fit(free, 1.0) == 160


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        cache("int8")
    slots = cache("bf16")
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        slots.set_kv_format("e5m2")


# ------------------------------------------------------------------ the kernels


def test_rope_store_stores_what_quantize_kv_stores() -> None:
    """The Triton writer and the torch writer put the same bytes and scales in the cache."""
    heads, kv_heads, dim, slots, length = 4, 2, 16, 5, 64
    torch.manual_seed(3)
    cos, sin = rope_tables(length, dim)
    positions = torch.tensor([3, 0, 17, 63])
    b = len(positions)
    qkv = torch.randn(b, (heads + 2 * kv_heads) * dim) * torch.linspace(0.01, 20, b)[:, None]
    k_cache = fp8_zeros(slots, kv_heads, length, dim)
    v_cache = fp8_zeros(slots, kv_heads, length, dim)
    k_scales, v_scales = torch.zeros(slots, kv_heads, length), torch.zeros(slots, kv_heads, length)
    queries = torch.empty(b, heads, dim)

    kernels.rope_store(qkv, cos, sin, positions, k_cache, v_cache, queries, k_scales, v_scales)

    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    torch.testing.assert_close(queries, rotate(qkv[:, : heads * dim].view(b, heads, dim), c, s))
    k = rotate(qkv[:, heads * dim : (heads + kv_heads) * dim].view(b, kv_heads, dim), c, s)
    v = qkv[:, (heads + kv_heads) * dim :].view(b, kv_heads, dim)
    rows = torch.arange(b)
    for stored, scales, vectors in ((k_cache, k_scales, k), (v_cache, v_scales, v)):
        values, scale = quantize_kv(vectors)
        assert torch.equal(stored[rows, :, positions].view(torch.uint8), values.view(torch.uint8))
        assert torch.equal(scales[rows, :, positions], scale)
        written = torch.zeros(slots, length, dtype=torch.bool)
        written[rows, positions] = True
        # Nothing else written (slot 4 and every other position stay zero).
        assert not bool(stored.view(torch.uint8).permute(0, 2, 1, 3)[~written].any())
        assert not bool(scales.permute(0, 2, 1)[~written].any())


def test_rope_store_rounds_ties_to_even_and_subnormals_like_torch() -> None:
    """The kernel's own rounding (it does not rely on the backend's conversion): with scale 1
    (each vector's absmax is 448), values on E4M3's ties, in its subnormal range, and just
    under a power of two (where rounding up carries into the exponent) come out as torch's
    conversion makes them."""
    dim = 16
    ties = [17.0, 19.0, 8.5, 0.5 + 1 / 32, 3 * 2**-10, 5 * 2**-10, 2**-10, 31.8, 63.7, 447.0]
    tricky = torch.tensor([448.0, -15.9, 2**-7, -(2**-8), *ties, 0.0, -0.0])[:dim]
    qkv = torch.stack([tricky, -tricky.flip(0)]).reshape(1, 2 * dim)  # K and V of one head
    # Layout q|k|v with one query head: the query part is zeros.
    qkv = torch.cat([torch.zeros(1, dim), qkv], dim=1)
    ones, zeros = torch.ones(4, dim), torch.zeros(4, dim)
    k_cache, v_cache = fp8_zeros(1, 1, 4, dim), fp8_zeros(1, 1, 4, dim)
    k_scales, v_scales = torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    kernels.rope_store(
        qkv, ones, zeros, torch.tensor([2]), k_cache, v_cache, torch.empty(1, 1, dim),
        k_scales, v_scales,
    )  # fmt: skip
    assert float(k_scales[0, 0, 2]) == float(v_scales[0, 0, 2]) == 1.0
    assert torch.equal(k_cache[0, 0, 2].float(), tricky.to(FP8).float())
    assert torch.equal(v_cache[0, 0, 2].float(), (-tricky.flip(0)).to(FP8).float())


@pytest.mark.parametrize(
    ("positions", "context", "settings"),
    [
        ([0, 130, 257, 299], 300, None),
        ([299, 5], 256, None),
        # The fp8 cache's own settings (chunks of 128 keys in blocks of 32) are used, not
        # the bf16 cache's: the chunk edges then fall elsewhere, the result stays. Four rows
        # are a small batch (below 8 rows: the small-batch split), two rows here are not.
        ([0, 130, 257, 299], 300, (128, 32, 4, 8)),
        ([299, 5], 256, (256, 128, 4, 1)),
    ],
)
def test_decode_attention_over_fp8_matches_the_dequantized_reference(
    monkeypatch: pytest.MonkeyPatch,
    positions: list[int],
    context: int,
    settings: tuple[int, int, int, int] | None,
) -> None:
    if settings is not None:
        split, block, warps, small_batch_rows = settings
        small = len(positions) < small_batch_rows
        # The split the rule does not pick is one no kernel could run (not a whole block).
        monkeypatch.setattr(kernels, "FP8_SMALL_BATCH_ROWS", small_batch_rows)
        monkeypatch.setattr(kernels, "FP8_SMALL_BATCH_SPLIT_KEYS", split if small else 999)
        monkeypatch.setattr(kernels, "FP8_SPLIT_KEYS", 999 if small else split)
        monkeypatch.setattr(kernels, "FP8_BLOCK_KEYS", block)
        monkeypatch.setattr(kernels, "FP8_ATTENTION_WARPS", warps)
        built: list[int] = []
        real_partials = kernels.SplitPartials

        def recording(*args: Any) -> Any:
            partials = real_partials(*args)
            built.append(partials.split)
            return partials

        monkeypatch.setattr(kernels, "SplitPartials", recording)
    heads, kv_heads, dim, capacity = 4, 2, 16, 300
    b = len(positions)
    torch.manual_seed(4)
    raw_keys = torch.randn(b + 1, kv_heads, capacity, dim) * 3
    raw_values = torch.randn(b + 1, kv_heads, capacity, dim)
    (keys, k_scales), (values, v_scales) = quantize_kv(raw_keys), quantize_kv(raw_values)
    lengths = [min(p + 1, context) for p in positions]
    widened_keys = dequantize_kv(keys, k_scales, torch.float64)
    widened_values = dequantize_kv(values, v_scales, torch.float64)
    for row, length in enumerate(lengths):
        # Past a row's length: NaN bytes (0x7F) and NaN scales, which a stray read would spread.
        keys.view(torch.uint8)[row, :, length:] = 0x7F
        values.view(torch.uint8)[row, :, length:] = 0x7F
        k_scales[row, :, length:] = float("nan")
        v_scales[row, :, length:] = float("nan")
    q = torch.randn(b, heads, dim)
    out = torch.empty(b, heads * dim)

    kernels.decode_attention(
        q, keys, values, torch.tensor(positions), context, dim**-0.5, out, k_scales, v_scales
    )

    expected = reference_attention(q, widened_keys, widened_values, lengths).float()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    if settings is not None:
        assert built == [settings[0]]
    # And the rounding itself is small: within a few percent of the unquantized attention.
    unquantized = reference_attention(q, raw_keys, raw_values, lengths).float()
    assert float((out - unquantized).abs().max()) < 0.15


def test_fp8_attention_takes_bigger_programs_from_eight_rows() -> None:
    """The sweep's choice: 128 keys a program below 8 rows, 256 from 8, blocks of 128; the
    bf16 cache's settings do not depend on the rows."""
    assert kernels.attention_settings(True, 1) == (128, 128, 2)
    assert kernels.attention_settings(True, 7) == (128, 128, 2)
    assert kernels.attention_settings(True, 8) == (256, 128, 2)
    assert kernels.attention_settings(True, 64) == (256, 128, 2)
    bf16 = kernels.attention_settings(False, 1)
    assert bf16 == kernels.attention_settings(False, 64) == (64, 64, 2)


def test_the_kernels_refuse_an_fp8_cache_without_its_scales() -> None:
    q, out = torch.randn(1, 2, 16), torch.empty(1, 32)
    keys = fp8_zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="needs its k_scales"):
        kernels.decode_attention(q, keys, keys, torch.tensor([3]), 8, 0.25, out)


def test_self_check_covers_the_fp8_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the engine runs before it picks the kernels for an fp8 cache on a GPU."""
    kernels.self_check(torch.device("cpu"), torch.float32, 4, 2, 16, "fp8")

    def value_scales_for_keys(q: torch.Tensor, k: Any, v: Any, *rest: Any) -> None:
        *others, _k_scales, v_scales = rest
        real_attention(q, k, v, *others, v_scales, v_scales)

    real_attention: Any = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", value_scales_for_keys)
    with pytest.raises(RuntimeError, match="differs from the reference"):
        kernels.self_check(torch.device("cpu"), torch.float32, 4, 2, 16, "fp8")
