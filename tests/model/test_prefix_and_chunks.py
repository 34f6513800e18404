"""Prefill at an offset, shared-prefix reuse and chunked prefill in the fast engine (CPU, fp32).

Everything is checked against the engine without them (and transformers): greedy output must
be token-identical, whatever the chunk boundaries, the prefix hits or the rows moving. Decode
steps here also run every slot (:func:`pad_every_step`), as a GPU's batch buckets run rows past
the live ones: a partly prefilled row must survive them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from model.fast import FastEngine
from model.fast.prefill_plan import plan_chunks
from model.fast.prefix_cache import PrefixCache, common_prefix
from model.prompting import plan_answer
from model.types import FinishReason, GenerationRequest, SamplingParams
from tests.model.test_fast_engine import (
    DESCRIPTIONS,
    GREEDY,
    hf_text,
    make_engine,
    request,
    serve_in_thread,
    tiny_llama,
)

PLAIN = {"prefix_cache": False, "chunked_prefill": False, "prefill_tokens": 4096}
PENALIZED = SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.3)
LONG_DESCRIPTION = (
    "a one-page site for a neighbourhood bicycle repair workshop: a hero with the motto, "
    "services with prices (flat tyre, brakes, gears, full service, wheel truing), opening "
    "hours for every day of the week, a short story of the two founders, three customer "
    "quotes, a map placeholder, a booking form with name, email, bike type and preferred "
    "date, and a footer with the address, phone number and social links"
)


@pytest.fixture
def tokenizer(tiny_tokenizer: Any) -> Any:
    return tiny_tokenizer


@pytest.fixture
def model(tokenizer: Any) -> LlamaForCausalLM:
    return tiny_llama(tokenizer)


def prompt_of(tokenizer: Any, description: str) -> list[int]:
    return plan_answer(tokenizer, GenerationRequest(prompt=description)).prompt_ids


def pad_every_step(engine: FastEngine) -> None:
    """Decode steps run every slot, as a CUDA graph of a larger batch bucket does: rows past
    the live ones run on whatever they hold (parked rows being prefilled included)."""
    runner = engine.runner

    def run(b: int, ctx: int) -> None:
        with torch.inference_mode():
            runner.forward.decode_body(runner.slots, ctx)

    runner.graphs.run = run  # type: ignore[method-assign]


def queue_source(queue: list[GenerationRequest]) -> Any:
    def take(count: int, wait: bool) -> list[GenerationRequest]:
        batch = queue[:count]
        del queue[:count]
        return batch

    return take


# ------------------------------------------------------------------- prefill at an offset


def test_prefill_in_two_pieces_matches_one_prefill_at_every_cut(model: Any, tokenizer: Any) -> None:
    """A prompt prefilled as [0, c) then [c, n) at offset c leaves the same KV and logits as
    one prefill, for every cut c, next to a fresh prompt in the same forward."""
    engine = make_engine(model, tokenizer, max_seq_len=128, max_slots=4)
    runner, kv = engine.runner, engine.runner.cache.kv
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 2000, (20,), generator=generator).tolist()
    other = torch.randint(0, 2000, (9,), generator=generator).tolist()
    whole = runner.prefill([0, 2], [prompt, other])
    n = len(prompt)
    for cut in range(1, n):
        runner.prefill([1], [prompt[:cut]])
        logits = runner.prefill([3, 1], [other, prompt[cut:]], [0, cut])
        torch.testing.assert_close(logits[1], whole[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[0], whole[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kv[:, :, 1, :, :n], kv[:, :, 0, :, :n], rtol=1e-4, atol=1e-4)
    # The cached part matters: the rest alone, as if it started the row, is another answer.
    alone = runner.prefill([1], [prompt[n // 2 :]])
    assert (alone[0] - whole[0]).abs().max() > 1.0


def test_prefill_in_many_pieces_at_once(model: Any, tokenizer: Any) -> None:
    """Several rows continuing at different offsets in one forward."""
    engine = make_engine(model, tokenizer, max_seq_len=128, max_slots=6)
    runner = engine.runner
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 2000, (n,), generator=generator).tolist() for n in (30, 17, 41)]
    whole = runner.prefill([0, 1, 2], prompts)
    cuts = [7, 16, 40]
    runner.prefill([3, 4, 5], [p[:c] for p, c in zip(prompts, cuts, strict=True)])
    rest = runner.prefill(
        [5, 3, 4], [prompts[2][40:], prompts[0][7:], prompts[1][16:]], [40, 7, 16]
    )
    torch.testing.assert_close(rest[[1, 2, 0]], whole, rtol=1e-4, atol=1e-4)


def test_prefill_refuses_a_prompt_past_the_row(model: Any, tokenizer: Any) -> None:
    engine = make_engine(model, tokenizer, max_seq_len=64, max_slots=2)
    with pytest.raises(ValueError, match="past the cache rows"):
        engine.runner.prefill([0], [[1] * 10], [60])


# --------------------------------------------------------------------------- planning


def test_chunk_plans() -> None:
    spans = [(0, 10), (4, 30), (0, 5)]
    assert plan_chunks(iter(spans), 100, chunked=True) == [(0, 10), (4, 30), (0, 5)]
    assert plan_chunks(iter(spans), 20, chunked=True) == [(0, 10), (4, 14)]
    assert plan_chunks(iter(spans), 10, chunked=True) == [(0, 10)]
    assert plan_chunks(iter([(3, 100)]), 8, chunked=True) == [(3, 11)]
    # Unchunked: whole prompts while they fit, at least one however long.
    assert plan_chunks(iter(spans), 20, chunked=False) == [(0, 10)]
    assert plan_chunks(iter(spans), 4, chunked=False) == [(0, 10)]
    assert plan_chunks(iter(spans), 40, chunked=False) == [(0, 10), (4, 30)]
    assert plan_chunks(iter(spans), 41, chunked=False) == [(0, 10), (4, 30), (0, 5)]


# ----------------------------------------------------------------------- prefix cache


def fake_kv(length: int) -> torch.Tensor:
    return torch.arange(length, dtype=torch.float32).expand(2, 2, 1, length)[..., None].clone()


def test_prefix_cache_learns_shared_blocks_and_looks_up_the_best() -> None:
    cache = PrefixCache(max_bytes=10**6, block=4, min_tokens=8, max_entry_tokens=16)
    first = list(range(100, 130))
    assert cache.lookup(first) is None
    learned = cache.learn(first, fake_kv)
    assert learned is not None and learned.tokens == first[:16]  # a first sighting, capped
    second = first[:11] + [7] * 20
    hit = cache.lookup(second)
    assert hit is not None and hit.length == 11  # all it shares
    shared = cache.learn(second, fake_kv)
    assert shared is not None and shared.tokens == first[:8]  # whole blocks of what it shares
    torch.testing.assert_close(shared.kv, learned.kv[:, :, :, :8])
    assert cache.learn(first[:9] + [5] * 9, fake_kv) is None  # that part is an entry already
    # A tie in whole blocks goes to the shorter entry; a prompt equal to an entry still runs
    # its last token; sharing less than min_tokens is no hit.
    third = first[:10] + [1] * 5
    hit = cache.lookup(third)
    assert hit is not None and hit.entry is shared and hit.length == 8
    hit = cache.lookup(first[:16])
    assert hit is not None and hit.entry is learned and hit.length == 15
    assert cache.lookup(first[:7] + [0] * 10) is None
    assert cache.learn([1, 2, 3, 4, 5], fake_kv) is None  # too short to be worth an entry


def test_prefix_cache_evicts_the_least_recently_used_under_its_bounds() -> None:
    entry_bytes = fake_kv(8).numel() * 4
    cache = PrefixCache(max_bytes=10**6, max_entries=2, block=4, min_tokens=8, max_entry_tokens=8)
    prompts = [[k] * 12 for k in range(4)]
    for p in prompts[:2]:
        cache.learn(p, fake_kv)
    assert cache.lookup(prompts[0]) is not None  # the first is the most recent now
    cache.learn(prompts[2], fake_kv)
    assert [e.tokens[0] for e in cache.entries] == [0, 2]
    assert cache.lookup(prompts[1]) is None
    # By bytes: room for two entries of 8 tokens.
    cache = PrefixCache(max_bytes=2 * entry_bytes, block=4, min_tokens=8, max_entry_tokens=8)
    for p in prompts:
        cache.learn(p, fake_kv)
    assert [e.tokens[0] for e in cache.entries] == [2, 3]
    assert cache.nbytes == 2 * entry_bytes
    small = PrefixCache(max_bytes=entry_bytes - 1, block=4, min_tokens=8, max_entry_tokens=8)
    assert small.learn(prompts[0], fake_kv) is None and not small.entries
    # Another model state: every entry goes.
    cache.keep_for("bf16")
    assert not cache.entries
    cache.learn(prompts[0], fake_kv)
    cache.keep_for("bf16")
    assert len(cache.entries) == 1
    cache.keep_for("fp8")
    assert not cache.entries


def test_second_request_with_the_same_system_prompt_reuses_its_prefix(
    model: Any, tokenizer: Any
) -> None:
    prompts = [prompt_of(tokenizer, d) for d in DESCRIPTIONS]
    shared = common_prefix(prompts[0], prompts[1])
    assert shared >= 32  # template + system prompt
    expected = [hf_text(model, tokenizer, d, GREEDY) for d in DESCRIPTIONS]
    engine = make_engine(model, tokenizer, max_seq_len=256, prefill_tokens=4096)
    stats = engine.prefill_stats
    results = []
    for i, description in enumerate(DESCRIPTIONS):
        before = (stats.computed_tokens, stats.reused_tokens)
        results.append(engine.generate([request(description)])[0])
        computed = stats.computed_tokens - before[0]
        reused = stats.reused_tokens - before[1]
        assert computed + reused == len(prompts[i])
        # The second hits the first's entry (all it shares); the third the shared part's
        # own entry, learned from the second (whole blocks).
        assert reused == [0, shared, shared - shared % 16][i]
    assert [r.text for r in results] == expected
    assert sorted(len(e.tokens) for e in engine.prefix_cache.entries) == [
        shared - shared % 16,
        len(prompts[0]) - len(prompts[0]) % 16,
    ]
    # The first prompt again (a regenerate): all of its first sighting, whole blocks.
    reused_before = stats.reused_tokens
    again = engine.generate([request(DESCRIPTIONS[0])])[0]
    assert stats.reused_tokens - reused_before == len(prompts[0]) - len(prompts[0]) % 16
    assert again.text == expected[0]


def test_a_prompt_equal_to_an_entry_runs_only_its_last_token(model: Any, tokenizer: Any) -> None:
    description = next(
        d for d in (f"a bakery{' and cakes' * k}" for k in range(16))
        if len(prompt_of(tokenizer, d)) % 16 == 0
    )  # fmt: skip
    length = len(prompt_of(tokenizer, description))
    engine = make_engine(model, tokenizer, max_seq_len=256)
    first = engine.generate([request(description)])[0]
    before = engine.prefill_stats.computed_tokens
    second = engine.generate([request(description)])[0]
    assert engine.prefill_stats.computed_tokens - before == 1
    assert engine.prefill_stats.reused_tokens == length - 1
    assert first.text == second.text == hf_text(model, tokenizer, description, GREEDY)


def test_prefix_entries_are_dropped_when_the_weights_change(model: Any, tokenizer: Any) -> None:
    engine = make_engine(model, tokenizer, max_seq_len=256)
    engine.generate([request(DESCRIPTIONS[0])])
    assert engine.prefix_cache.entries
    engine.runner.weights.weight_format = "changed"  # what use_fp8() does, among the rest
    reused = engine.prefill_stats.reused_tokens
    engine.generate([request(DESCRIPTIONS[1])])
    assert engine.prefill_stats.reused_tokens == reused  # no hit on the old model's KV


def test_no_prefix_entry_fits_a_zero_byte_bound(model: Any, tokenizer: Any) -> None:
    engine = make_engine(model, tokenizer, max_seq_len=256, prefix_cache_mb=0)
    results = [engine.generate([request(d)])[0] for d in DESCRIPTIONS]
    assert not engine.prefix_cache.entries
    assert engine.prefill_stats.reused_tokens == 0
    assert [r.text for r in results] == [hf_text(model, tokenizer, d, GREEDY) for d in DESCRIPTIONS]


# ------------------------------------------------------------------ engine equivalence


@pytest.mark.parametrize("prefill_tokens", [1, 5, 16, 48, 100, 4096])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_chunked_and_reused_prefills_decode_what_the_plain_engine_does(
    model: Any, tokenizer: Any, prefill_tokens: int, prefix_cache: bool
) -> None:
    """Cuts at every position (1 token a forward) up to all prompts in one forward; with the
    prefix cache warmed by a first request, the rest hit it in the same forward."""
    requests = [request(d, PENALIZED) for d in [*DESCRIPTIONS, LONG_DESCRIPTION]]
    plain = make_engine(model, tokenizer, max_seq_len=512, **PLAIN)
    expected = [r.text for r in plain.generate(requests)]
    assert expected[0] == hf_text(model, tokenizer, DESCRIPTIONS[0], PENALIZED)
    engine = make_engine(
        model,
        tokenizer,
        max_seq_len=512,
        prefill_tokens=prefill_tokens,
        idle_prefill_tokens=0,  # cut from the first forward on, as under load
        prefix_cache=prefix_cache,
    )
    pad_every_step(engine)
    first = engine.generate(requests[:1])
    rest = engine.generate(requests[1:])
    assert [r.text for r in [*first, *rest]] == expected
    stats = engine.prefill_stats
    assert (stats.reused_tokens > 0) == prefix_cache
    longest = max(len(prompt_of(tokenizer, r.prompt)) for r in requests)
    assert (stats.cuts > 0) == (prefill_tokens < longest)


@pytest.mark.parametrize("idle_prefill_tokens", [4096, 0])
def test_an_idle_engine_prefills_a_burst_past_the_chunk_budget(
    model: Any, tokenizer: Any, idle_prefill_tokens: int
) -> None:
    """Nobody decodes yet, so a burst of prompts reaching an idle engine is prefilled in one
    forward whatever the chunk budget; with the idle budget off it goes in 16-token chunks.
    The answers are the same either way."""
    requests = [request(d, PENALIZED) for d in [*DESCRIPTIONS, LONG_DESCRIPTION]]
    plain = make_engine(model, tokenizer, max_seq_len=512, **PLAIN)
    expected = [r.text for r in plain.generate(requests)]
    engine = make_engine(
        model,
        tokenizer,
        max_seq_len=512,
        prefill_tokens=16,
        idle_prefill_tokens=idle_prefill_tokens,
        prefix_cache=False,
    )
    assert [r.text for r in engine.generate(requests)] == expected
    stats = engine.prefill_stats
    total = sum(len(prompt_of(tokenizer, r.prompt)) for r in requests)
    assert stats.computed_tokens == total
    if idle_prefill_tokens:
        assert (stats.forwards, stats.cuts) == (1, 0)
    else:
        assert stats.forwards >= total // 16 and stats.cuts > 0


def serve_beside_one_decoding(
    model: Any, tokenizer: Any, arriving: list[str], idle_prefill_tokens: int
) -> Any:
    """Serve one request, and ``arriving`` once it decodes (its first token out), with a
    16-token chunk budget; every answer is checked against transformers. The prefill stats."""
    running = request(DESCRIPTIONS[0], SamplingParams(max_new_tokens=40, temperature=0))
    later = [request(d, PENALIZED) for d in arriving]
    engine = make_engine(
        model,
        tokenizer,
        max_seq_len=512,
        prefill_tokens=16,
        idle_prefill_tokens=idle_prefill_tokens,
        prefix_cache=False,
        progress_interval_s=0,
    )
    queue = [running]

    def progress(request_id: str, tokens: int) -> None:
        if request_id == running.request_id and tokens == 1:
            queue.extend(later)

    results, _ = serve_in_thread(engine, queue_source(queue), progress, expected=1 + len(later))
    for r in [running, *later]:
        assert results[r.request_id].text == hf_text(model, tokenizer, r.prompt, r.sampling)
    return engine.prefill_stats


@pytest.mark.parametrize("idle_prefill_tokens", [4096, 0])
def test_a_burst_outnumbering_the_decoding_rows_takes_the_big_budget(
    model: Any, tokenizer: Any, idle_prefill_tokens: int
) -> None:
    """Three prompts reach an engine decoding one row: more wait than decode, so they are
    prefilled in one forward (the decoding row waits once), not in 16-token chunks."""
    burst = [*DESCRIPTIONS[1:], LONG_DESCRIPTION]
    stats = serve_beside_one_decoding(model, tokenizer, burst, idle_prefill_tokens)
    if idle_prefill_tokens:
        assert (stats.forwards, stats.cuts) == (2, 0)  # the first prompt, then the burst
    else:
        assert stats.cuts > 0


def test_a_prompt_arriving_while_as_many_decode_is_still_cut(model: Any, tokenizer: Any) -> None:
    """One long prompt reaching an engine decoding one row is no burst: it goes in
    ``prefill_tokens`` chunks between the running row's steps."""
    stats = serve_beside_one_decoding(model, tokenizer, [LONG_DESCRIPTION], 4096)
    long_prompt = len(prompt_of(tokenizer, LONG_DESCRIPTION))
    assert long_prompt < 16 * 30  # all its chunks run while the first one decodes
    assert stats.cuts == -(-long_prompt // 16) - 1


# ------------------------------------------------------------- rows while prefilling


def test_cancelled_mid_prefill_frees_its_row_and_leaves_the_others(
    model: Any, tokenizer: Any
) -> None:
    running = request(DESCRIPTIONS[0], SamplingParams(max_new_tokens=30, temperature=0))
    doomed, later = request(LONG_DESCRIPTION, PENALIZED), request(DESCRIPTIONS[2], PENALIZED)
    engine = make_engine(
        model, tokenizer, max_seq_len=512, max_slots=2, prefill_tokens=16, progress_interval_s=0
    )
    pad_every_step(engine)
    queue = [running]
    real_prefill = engine.runner.prefill
    continued = []

    def prefill(rows: list[int], prompts: list[list[int]], starts: list[int]) -> Any:
        logits = real_prefill(rows, prompts, starts)
        if rows == [1] and starts[0] > 0 and not doomed.cancelled:
            continued.append(starts[0])
            if len(continued) == 2:
                doomed.cancel()  # after its second chunk, well before its last
                queue.append(later)  # takes the freed row
        return logits

    engine.runner.prefill = prefill  # type: ignore[method-assign,assignment]

    def progress(request_id: str, tokens: int) -> None:
        if request_id == running.request_id and tokens == 2:
            queue.append(doomed)

    results, _ = serve_in_thread(engine, queue_source(queue), progress, expected=3)
    assert results[doomed.request_id].finish_reason == FinishReason.CANCELLED
    assert results[doomed.request_id].generated_tokens == 0
    assert len(continued) == 2
    assert results[running.request_id].text == hf_text(
        model, tokenizer, DESCRIPTIONS[0], running.sampling
    )
    assert results[later.request_id].text == hf_text(model, tokenizer, DESCRIPTIONS[2], PENALIZED)


def test_a_live_row_leaving_while_another_is_mid_prefill(model: Any, tokenizer: Any) -> None:
    """The short one finishes while the long prompt is being prefilled in chunks: the last
    live row moves into its place and the partly prefilled row moves down when it goes live."""
    short = request(DESCRIPTIONS[0], SamplingParams(max_new_tokens=3, temperature=0))
    steady_sampling = SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=1.3)
    steady = request(DESCRIPTIONS[1], steady_sampling)
    long = request(LONG_DESCRIPTION, PENALIZED)
    engine = make_engine(model, tokenizer, max_seq_len=512, max_slots=4, progress_interval_s=0)
    pad_every_step(engine)
    cache = engine.runner.cache
    moves: list[tuple[int, int, int]] = []
    real_move = cache.move_row

    def move_row(source: int, target: int, length: int) -> None:
        moves.append((source, target, length))
        real_move(source, target, length)

    cache.move_row = move_row  # type: ignore[method-assign]
    queue = [short, steady]

    def progress(request_id: str, tokens: int) -> None:
        if request_id == steady.request_id and tokens == 1:
            # Both run (rows 0 and 1); from now on prefills take 16 tokens (the engine reads
            # its options at each one), so the long prompt takes a dozen.
            engine.options = dataclasses.replace(engine.options, prefill_tokens=16)
            queue.append(long)

    results, order = serve_in_thread(engine, queue_source(queue), progress, expected=3)
    long_prompt = len(prompt_of(tokenizer, LONG_DESCRIPTION))
    assert long_prompt > 10 * 16  # many chunks
    assert order[0] == short.request_id
    # steady (row 1) moved into short's row 0; long moved from row 2 to row 1 with the part of
    # its prompt prefilled by then.
    assert moves[0][:2] == (1, 0)
    [(_, _, length)] = [m for m in moves if m[:2] == (2, 1)]
    assert 0 < length < long_prompt
    expected = {
        short.request_id: hf_text(model, tokenizer, DESCRIPTIONS[0], short.sampling),
        steady.request_id: hf_text(model, tokenizer, DESCRIPTIONS[1], steady_sampling),
        long.request_id: hf_text(model, tokenizer, LONG_DESCRIPTION, PENALIZED),
    }
    assert {k: r.text for k, r in results.items()} == expected
    # The running ones kept getting tokens between the long prompt's chunks.
    assert engine.prefill_stats.cuts >= 5


def test_chunks_and_prefix_entries_keep_an_fp8_cache_exact(model: Any, tokenizer: Any) -> None:
    """With the KV cache in fp8, prefix entries carry the scales and chunks read back the
    stored keys: the same text as the fp8 engine prefilling whole prompts, no reuse."""
    requests = [request(d, PENALIZED) for d in [*DESCRIPTIONS, LONG_DESCRIPTION]]
    plain = make_engine(model, tokenizer, max_seq_len=512, kv_cache="fp8", **PLAIN)
    expected = [r.text for r in plain.generate(requests)]
    engine = make_engine(
        model, tokenizer, max_seq_len=512, kv_cache="fp8", prefill_tokens=16, idle_prefill_tokens=0
    )
    pad_every_step(engine)
    first = engine.generate(requests[:1])
    rest = engine.generate(requests[1:])
    assert [r.text for r in [*first, *rest]] == expected
    assert engine.prefill_stats.reused_tokens > 0 and engine.prefill_stats.cuts > 0
    entry = engine.prefix_cache.entries[0]
    assert entry.kv.dtype == torch.uint8  # E4M3 bytes, then each position's scale
    assert entry.kv.shape[-1] == engine.runner.cache.head_dim + 4
