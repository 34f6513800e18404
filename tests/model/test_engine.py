"""The batched engine: batching is invisible, cancellation is per request, pages stop at
</html>, sampling settings are per request."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from model.engine import Engine
from model.loading import LoadedModel, load_model
from model.prompting import plan_answer
from model.spec import resolve_spec
from model.types import FinishReason, GenerationRequest, SamplingParams

GREEDY = SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0)
PROMPTS = [
    "a bakery",
    "a landing page for a small bakery in Lyon with opening hours, a menu of pastries, prices "
    "and a contact form",
    "a portfolio for a wedding photographer",
]


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir: Path, tiny_adapter_dir: Path) -> LoadedModel:
    return load_model(resolve_spec(base=str(tiny_llama_dir), adapter=str(tiny_adapter_dir)))


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Engine:
    return Engine(loaded)


def request(prompt: str, sampling: SamplingParams = GREEDY, **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(prompt, sampling=sampling, **kwargs)


def test_batched_greedy_equals_one_at_a_time(engine: Engine) -> None:
    alone = [engine.generate([request(prompt)])[0] for prompt in PROMPTS]
    together = engine.generate([request(prompt) for prompt in PROMPTS])
    assert [r.text for r in together] == [r.text for r in alone]
    assert all(r.generated_tokens == GREEDY.max_new_tokens for r in together)
    assert all(r.finish_reason == FinishReason.LENGTH for r in together)
    # The prompts really differ in length, so left padding was exercised.
    assert len({r.prompt_tokens for r in together}) == len(PROMPTS)


def test_an_unmerged_adapter_generates_like_the_merged_one(
    tiny_llama_dir: Path, tiny_adapter_dir: Path, engine: Engine
) -> None:
    unmerged = load_model(
        resolve_spec(base=str(tiny_llama_dir), adapter=str(tiny_adapter_dir), merge_adapter="no")
    )
    assert not unmerged.merged
    expected = engine.generate([request(prompt) for prompt in PROMPTS])
    results = Engine(unmerged).generate([request(prompt) for prompt in PROMPTS])
    assert [r.text for r in results] == [r.text for r in expected]


def test_results_keep_request_order_and_ids(engine: Engine) -> None:
    requests = [request(prompt) for prompt in PROMPTS]
    results = engine.generate(requests)
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    for result in results:
        assert 0 < result.time_to_first_token_s <= result.total_s


def test_cancelling_one_request_leaves_the_others_intact(engine: Engine) -> None:
    long = dataclasses.replace(GREEDY, max_new_tokens=40)
    expected = engine.generate([request(prompt, long) for prompt in PROMPTS])
    requests = [request(prompt, long) for prompt in PROMPTS]
    victim = requests[1]

    def cancel_at_16(request_id: str, tokens: int) -> None:
        if request_id == victim.request_id and tokens >= 16:
            victim.cancel()

    batch_sizes: list[int] = []
    hook = engine.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    try:
        results = engine.generate(requests, progress=cancel_at_16)
    finally:
        hook.remove()
    assert results[1].finish_reason == FinishReason.CANCELLED
    assert 16 <= results[1].generated_tokens < 40
    for index in (0, 2):
        assert results[index].text == expected[index].text
        assert results[index].finish_reason == FinishReason.LENGTH
    # The cancelled sequence left the batch: later steps ran on two rows, not three.
    assert batch_sizes[0] == 3 and batch_sizes[-1] == 2


def test_a_request_cancelled_before_the_start_costs_nothing(engine: Engine) -> None:
    cancelled = request(PROMPTS[0])
    cancelled.cancel()
    results = engine.generate([cancelled, request(PROMPTS[1])])
    assert results[0].finish_reason == FinishReason.CANCELLED
    # Nothing was generated: the text is the document's fixed start alone.
    prefix = plan_answer(engine.tokenizer, cancelled).prefix
    assert results[0].generated_tokens == 0 and results[0].text == prefix
    assert results[1].generated_tokens == GREEDY.max_new_tokens


def test_seeded_sampling_is_reproducible_and_per_request(engine: Engine) -> None:
    hot = SamplingParams(max_new_tokens=20, temperature=1.5, top_p=1.0, seed=7)
    first = engine.generate([request(PROMPTS[0], hot)])[0]
    second = engine.generate([request(PROMPTS[0], hot)])[0]
    other_seed = engine.generate([request(PROMPTS[0], dataclasses.replace(hot, seed=8))])[0]
    assert first.text == second.text
    assert first.text != other_seed.text
    # A greedy request batched with a hot one is unaffected by its neighbour's settings.
    greedy_alone = engine.generate([request(PROMPTS[2])])[0]
    mixed = engine.generate([request(PROMPTS[0], hot), request(PROMPTS[2])])
    assert mixed[0].text == first.text
    assert mixed[1].text == greedy_alone.text


def test_a_seeded_request_samples_alike_in_both_engines(
    loaded: LoadedModel, engine: Engine
) -> None:
    from model.fast import FastEngine

    hot = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=11)
    standard = engine.generate([request(PROMPTS[1], hot)])[0]
    fast = FastEngine.from_loaded(loaded).generate([request(PROMPTS[1], hot)])[0]
    assert standard.text == fast.text


def test_progress_reports_growing_token_counts(engine: Engine) -> None:
    seen: list[int] = []
    engine.generate(
        [request(PROMPTS[0], dataclasses.replace(GREEDY, max_new_tokens=40))],
        progress=lambda _id, tokens: seen.append(tokens),
    )
    assert seen == sorted(seen) and seen[-1] == 40 and len(seen) >= 2


class ScriptedLM(torch.nn.Module):
    """A causal LM whose every step emits the next token of a fixed script.

    It stands in for a model that writes a complete page, so the stop rule can be tested
    without hoping a random model ever writes ``</html>``.
    """

    def __init__(self, script: list[int], vocab_size: int, generation_config: Any) -> None:
        super().__init__()
        self.script = script
        self.vocab_size = vocab_size
        self.generation_config = generation_config
        self.step = 0
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        self.calls += 1
        token = self.script[min(self.step, len(self.script) - 1)]
        self.step += 1
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab_size)
        logits[:, -1, token] = 10.0
        return type("Output", (), {"logits": logits})()


def scripted_engine(loaded: LoadedModel, answer: str) -> tuple[Engine, ScriptedLM]:
    tokenizer = loaded.tokenizer
    script = tokenizer(answer, add_special_tokens=False)["input_ids"]
    lm = ScriptedLM(script, len(tokenizer), loaded.model.generation_config)
    return Engine(dataclasses.replace(loaded, model=lm)), lm


def test_generation_stops_when_the_page_is_closed(loaded: LoadedModel) -> None:
    answer = "<!DOCTYPE html><html><body><p>Fresh bread</p></body></html>\nHope this helps! " * 3
    engine, lm = scripted_engine(loaded, answer)
    (result,) = engine.generate(
        [request("a bakery", dataclasses.replace(GREEDY, max_new_tokens=500))]
    )
    assert result.finish_reason == FinishReason.HTML_COMPLETE
    prefix = plan_answer(loaded.tokenizer, request("a bakery")).prefix
    assert result.text == prefix + "<!DOCTYPE html><html><body><p>Fresh bread</p></body></html>"
    assert lm.calls == result.generated_tokens  # no step after the page closed


def test_generation_stops_at_eos(loaded: LoadedModel) -> None:
    engine, _ = scripted_engine(loaded, "<p>short</p>" + loaded.tokenizer.eos_token + "junk junk")
    (result,) = engine.generate(
        [request("a bakery", dataclasses.replace(GREEDY, max_new_tokens=500))]
    )
    assert result.finish_reason == FinishReason.EOS
    assert result.text == plan_answer(loaded.tokenizer, request("a bakery")).prefix + "<p>short</p>"


def test_a_looping_answer_is_stopped_early(loaded: LoadedModel) -> None:
    engine, _ = scripted_engine(loaded, "<p>intro</p>" + "<div>again</div>\n" * 400)
    long = dataclasses.replace(GREEDY, max_new_tokens=1500)
    (result,) = engine.generate([request("a bakery", long)])
    assert result.finish_reason == FinishReason.REPETITION
    assert result.generated_tokens < 300  # not the whole budget
    prefix = plan_answer(loaded.tokenizer, request("a bakery")).prefix
    assert result.text.startswith(prefix + "<p>intro</p><div>again</div>")


def test_repetition_penalty_discourages_repeats(loaded: LoadedModel) -> None:
    from model.engine import sample_next_tokens

    logits = torch.tensor([[5.0, 4.9, 0.0]])
    plain = SamplingParams(temperature=0, repetition_penalty=1.0)
    penalised = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert sample_next_tokens(logits, [plain], [[0]], [0]) == [0]
    assert sample_next_tokens(logits, [penalised], [[0]], [0]) == [1]


def test_top_p_keeps_only_the_nucleus() -> None:
    from model.engine import sample_next_tokens

    logits = torch.tensor([[10.0, 9.0, -5.0, -5.0]])
    nucleus = SamplingParams(temperature=1.0, top_p=0.5, repetition_penalty=1.0)
    picks = {sample_next_tokens(logits, [nucleus], [[]], [seed])[0] for seed in range(50)}
    assert picks == {0}
    # Without the cut, the second token (e^-1 of the first's mass) is drawn now and then.
    everything = dataclasses.replace(nucleus, top_p=1.0)
    assert {sample_next_tokens(logits, [everything], [[]], [seed])[0] for seed in range(50)} == {
        0,
        1,
    }
