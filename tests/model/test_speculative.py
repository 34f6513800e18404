"""Speculative decoding in the fast engine: prompt-lookup drafts and the verify step.

The verify step must give exactly the tokens plain decoding gives (greedy and seeded
sampling, repetition penalty, several rows at once, rows leaving mid-batch), whatever the
drafts are. A tiny random Llama never copies its prompt, so these tests feed it drafts from
an oracle (the plain run's own answer, with wrong tokens put in on purpose): every verdict
is then exercised, all kept, some kept, none kept. The last test runs the real drafter on a
real refine with the embedded SmolLM2, which does copy its page.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pytest
import torch

from model import prompting
from model.fast import FastEngine, FastEngineOptions
from model.fast import engine as engine_module
from model.fast import verify as verify_module
from model.fast.speculative import PromptLookup
from model.prompting import plan_answer
from model.types import GenerationRequest, SafetyPolicy, SamplingParams
from tests.model.test_fast_engine import tiny_llama

PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Crumb &amp; Co</title></head><body>\n"
    "<header><h1>Crumb &amp; Co</h1><p>Bread baked at dawn in Lyon.</p></header>\n"
    "<section><h2>Menu</h2><ul><li>Croissant 1.20</li><li>Baguette 1.10</li>"
    "<li>Pain au chocolat 1.40</li></ul></section>\n"
    "<footer><p>Open 7am-7pm, closed Mondays.</p></footer>\n</body></html>"
)


# ------------------------------------------------------------------ the drafter


def test_lookup_continues_from_the_latest_earlier_occurrence() -> None:
    drafter = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8])
    drafter.update([2, 3])  # context ... 9 2 3 7 8 2 3: "2 3" last came before "7 8"
    assert drafter.propose(3) == [7, 8, 2]


def test_lookup_never_matches_the_context_own_end_and_may_find_nothing() -> None:
    drafter = PromptLookup([5, 6, 7])
    assert drafter.propose(4) == []  # "6 7" occurs only at the end itself
    drafter.update([40])
    assert drafter.propose(4) == []  # no earlier "7 40"
    assert PromptLookup([1, 2]).propose(0) == []


def test_a_copy_stays_aligned_with_its_source_through_repeated_tokens() -> None:
    # "<li> x </li>" repeats: a fresh lookup of "</li> <li>" would jump to the latest item;
    # a copy that is following the first item's source must go on from there.
    li, end = 10, 11
    prompt = [1, li, 21, end, li, 22, end, li, 23, end, 2]
    drafter = PromptLookup(prompt, min_ngram=2)
    drafter.update([1, li])
    assert drafter.propose(4) == [21, end, li, 22]
    drafter.update([1, li, 21, end, li])  # as drafted: still aligned
    assert drafter.propose(2) == [22, end]
    drafter.update([1, li, 21, end, li, 30])  # a change: alignment lost, lookup finds nothing
    assert drafter.propose(2) == []


def test_lookup_prefers_the_longest_matching_ngram() -> None:
    # The last 3 tokens "7 8 9" occurred once (followed by 50); "8 9" alone later (by 60).
    drafter = PromptLookup([7, 8, 9, 50, 0, 8, 9, 60, 0], max_ngram=3, min_ngram=2)
    drafter.update([7, 8, 9])
    assert drafter.propose(1) == [50]


def test_bad_ngram_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup([1], min_ngram=3, max_ngram=2)


# ------------------------------------------------------- verify against plain


@pytest.fixture
def model(tiny_tokenizer: Any) -> Any:
    return tiny_llama(tiny_tokenizer)


class OracleDrafts:
    """Stands in for PromptLookup: proposes the plain run's answer, wrong at ``wrong``.

    ``answers`` maps a prompt (its token tuple) to the answer plain decoding gave it; a
    draft token at answer position ``i`` in ``wrong`` is replaced by another token.
    """

    answers: ClassVar[dict[tuple[int, ...], list[int]]] = {}
    wrong: ClassVar[set[int]] = set()

    def __init__(self, prompt: Sequence[int], min_ngram: int = 2) -> None:
        self.answer = self.answers.get(tuple(prompt), [])
        self.written = 0

    def update(self, answer: Sequence[int]) -> None:
        self.written = len(answer)

    def propose(self, count: int) -> list[int]:
        start = self.written
        draft = self.answer[start : start + max(count, 0)]
        return [t + 1 if start + i in self.wrong else t for i, t in enumerate(draft)]


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[OracleDrafts]]:
    monkeypatch.setattr(engine_module, "PromptLookup", OracleDrafts)
    OracleDrafts.answers, OracleDrafts.wrong = {}, set()
    yield OracleDrafts


def engine(model: Any, tokenizer: Any, **options: Any) -> FastEngine:
    return FastEngine(
        model, tokenizer, model_name="tiny", options=FastEngineOptions(max_seq_len=320, **options)
    )


def requests(samplings: list[SamplingParams]) -> list[GenerationRequest]:
    descriptions = ["a bakery", "a photographer's portfolio", "a chess club", "a garden"]
    return [
        GenerationRequest(prompt=descriptions[i % 4], sampling=s) for i, s in enumerate(samplings)
    ]


def plain_answers(
    model: Any, tokenizer: Any, batch: list[GenerationRequest], **options: Any
) -> tuple[list[str], list[list[int]]]:
    """Plain decoding's texts, and each answer's tokens (read back from the engine rows)."""
    plain = engine(model, tokenizer, speculation="off", **options)
    captured: dict[str, list[int]] = {}
    original = plain._deliver

    def deliver(live: Any, done: Any, finished: Any) -> None:
        for seq, _ in done:
            captured[seq.request.request_id] = list(seq.generated)
        original(live, done, finished)

    plain._deliver = deliver  # type: ignore[method-assign]
    texts = [r.text for r in plain.generate(batch)]
    return texts, [captured[r.request_id] for r in batch]


SAMPLED = [
    SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0),
    SamplingParams(max_new_tokens=33, temperature=0.9, top_p=0.9, repetition_penalty=1.3, seed=7),
    SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.2),
    SamplingParams(max_new_tokens=40, temperature=1.2, top_p=1.0, repetition_penalty=1.0, seed=3),
]


@pytest.mark.parametrize(
    ("wrong", "kv_cache", "attention"),
    [
        (set(), "bf16", "sdpa"),
        ({0, 5, 6, 19, 20, 21, 30}, "bf16", "sdpa"),
        (set(range(64)), "bf16", "matmul"),
        ({3, 4, 17}, "fp8", "sdpa"),
        ({2, 9, 10}, "bf16", "triton"),
        ({2, 9, 10}, "fp8", "triton"),
    ],
)
def test_verify_steps_give_exactly_the_plain_answers(
    model: Any,
    tiny_tokenizer: Any,
    oracle: type[OracleDrafts],
    wrong: set[int],
    kv_cache: str,
    attention: str,
) -> None:
    """Greedy and seeded rows, penalties, rows of different lengths leaving mid-batch: the
    same texts as plain decoding, whether the drafts are all right, partly or all wrong,
    over an fp8 KV cache (its writes and reads are the decode step's), with each attention
    (the Triton kernels under their CPU interpreter)."""
    batch = requests(SAMPLED)
    options = {"kv_cache": kv_cache, "attention": attention}
    texts, answers = plain_answers(model, tiny_tokenizer, batch, **options)
    assert len(set(texts)) == len(texts)
    fast = engine(model, tiny_tokenizer, speculation="all", draft_tokens=5, **options)
    assert fast.runner.attention == attention
    for request_, answer in zip(batch, answers, strict=True):
        oracle.answers[tuple(plan_answer(tiny_tokenizer, request_).prompt_ids)] = answer
    oracle.wrong = wrong
    again = [
        GenerationRequest(prompt=r.prompt, sampling=r.sampling, request_id=r.request_id)
        for r in batch
    ]
    results = fast.generate(again)
    assert [r.text for r in results] == texts
    assert [r.generated_tokens for r in results] == [len(a) for a in answers]
    stats = fast.speculation_stats
    assert stats.steps > 0 and stats.drafted > 0
    if not wrong:
        # Every draft token is right: each step keeps its whole draft (the last step of a
        # row may be cut by its budget), so far fewer steps than tokens.
        assert stats.accepted == stats.drafted
        assert stats.steps * 3 < sum(len(a) for a in answers)
    elif len(wrong) == 64:
        assert stats.accepted == 0  # one token a step, as plain decoding
    else:
        assert 0 < stats.accepted < stats.drafted


def test_rows_without_drafts_share_verify_steps_and_stay_exact(
    model: Any, tiny_tokenizer: Any, oracle: type[OracleDrafts]
) -> None:
    """speculation="refine": only the refine drafts; the new page beside it decodes in the
    same verify steps (an empty draft) and both match plain decoding."""
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0, repetition_penalty=1.1)
    refine = GenerationRequest(
        prompt="make the title larger", source_page=PAGE, description="a bakery", sampling=greedy
    )
    fresh = GenerationRequest(prompt="a chess club", sampling=greedy)
    batch = [refine, fresh]
    texts, answers = plain_answers(model, tiny_tokenizer, batch)
    oracle.answers[tuple(plan_answer(tiny_tokenizer, refine).prompt_ids)] = answers[0]
    fast = engine(model, tiny_tokenizer, speculation="refine", draft_tokens=4)
    results = fast.generate(batch)
    assert [r.text for r in results] == texts
    stats = fast.speculation_stats
    assert stats.accepted == stats.drafted > 0
    # The refine's 30 tokens came in steps of up to 5; the new page's one a step.
    assert stats.steps < 30


def test_the_engine_drafts_with_its_shortest_ngram_and_stays_exact(
    model: Any, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``draft_min_ngram`` reaches the real drafter (no oracle), and the refine's answers,
    sampled or greedy, are plain decoding's."""
    made: list[PromptLookup] = []

    def lookup(prompt: Sequence[int], **kwargs: Any) -> PromptLookup:
        made.append(PromptLookup(prompt, **kwargs))
        return made[-1]

    monkeypatch.setattr(engine_module, "PromptLookup", lookup)
    batch = [
        GenerationRequest(
            prompt="make the title larger",
            source_page=PAGE,
            description="a bakery",
            sampling=SamplingParams(
                max_new_tokens=24, temperature=temperature, seed=7, repetition_penalty=1.1
            ),
        )
        for temperature in (0.0, 0.8)
    ]
    texts, _ = plain_answers(model, tiny_tokenizer, batch)
    fast = engine(model, tiny_tokenizer, speculation="refine", draft_min_ngram=1)
    assert [r.text for r in fast.generate(batch)] == texts
    assert [drafter.min_ngram for drafter in made] == [1, 1]


def test_no_speculation_builds_no_verify_graphs_and_bad_options_are_refused(
    model: Any, tiny_tokenizer: Any
) -> None:
    off = engine(model, tiny_tokenizer, speculation="off")
    assert off.runner.verify_graphs is None
    with pytest.raises(RuntimeError, match="without drafts"):
        off.runner.verify([[1]], 64)
    with pytest.raises(ValueError, match="speculation must be one of"):
        engine(model, tiny_tokenizer, speculation="sometimes")
    with pytest.raises(ValueError, match="draft_tokens"):
        engine(model, tiny_tokenizer, draft_tokens=0)
    for shortest in (0, 5):
        with pytest.raises(ValueError, match="draft_min_ngram"):
            engine(model, tiny_tokenizer, draft_min_ngram=shortest)


def echo_llama(tokenizer: Any) -> Any:
    """A Llama that mostly predicts its own input token again (tied-like lm_head, layers
    damped): under a strong repetition penalty each pick is then the nearest token not yet
    seen, so what counts as seen at each draft position decides every token."""
    echo = tiny_llama(tokenizer)
    with torch.no_grad():
        echo.lm_head.weight.copy_(echo.model.embed_tokens.weight * 8)
        for layer in echo.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
    return echo


def test_a_draft_token_counts_as_seen_for_the_positions_after_it(
    tiny_tokenizer: Any, oracle: type[OracleDrafts]
) -> None:
    echo = echo_llama(tiny_tokenizer)
    penalized = SamplingParams(max_new_tokens=30, temperature=0.0, repetition_penalty=50.0)
    batch = requests([penalized, penalized])
    texts, answers = plain_answers(echo, tiny_tokenizer, batch)
    unpenalized = SamplingParams(max_new_tokens=30, temperature=0.0, repetition_penalty=1.0)
    _, echoed = plain_answers(echo, tiny_tokenizer, requests([unpenalized]))
    assert len(set(echoed[0])) < 5  # without the penalty it does echo itself
    for request_, answer in zip(batch, answers, strict=True):
        oracle.answers[tuple(plan_answer(tiny_tokenizer, request_).prompt_ids)] = answer
    fast = engine(echo, tiny_tokenizer, speculation="all", draft_tokens=6)
    results = fast.generate(batch)
    assert [r.text for r in results] == texts
    assert fast.speculation_stats.accepted == fast.speculation_stats.drafted > 0


def test_drafts_through_a_banned_string_are_cut_where_plain_decoding_turns_away(
    model: Any, tiny_tokenizer: Any, oracle: type[OracleDrafts], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The banned-strings state advances through the draft inside the step: a draft that
    spells a banned string is cut at the token plain decoding may not take."""
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
    (free_text,), (free,) = plain_answers(model, tiny_tokenizer, requests([greedy]))
    banned = tiny_tokenizer.decode(free[8:10])
    monkeypatch.setitem(prompting.BANNED_STRINGS, SafetyPolicy.STANDARD, (banned,))
    batch = requests([greedy])
    (kept_text,), (kept,) = plain_answers(model, tiny_tokenizer, batch)
    assert banned in free_text and banned not in kept_text
    prompt = tuple(plan_answer(tiny_tokenizer, batch[0]).prompt_ids)
    for drafts in (free, kept):  # the banned answer as a draft, then the right one
        oracle.answers[prompt] = drafts
        fast = engine(model, tiny_tokenizer, speculation="all", draft_tokens=6)
        (result,) = fast.generate(requests([greedy]))
        assert result.text == kept_text


def test_a_verify_step_leaves_the_row_where_its_kept_tokens_put_it(
    model: Any, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input token, position, seen set and banned-strings state after a verify step are
    those its kept tokens lead to (the next step, verify or plain, starts from them)."""
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    _, (answer,) = plain_answers(model, tiny_tokenizer, requests([greedy]))
    # A banned string the answer walks half into at its 7th token: the state is mid-match.
    banned = tiny_tokenizer.decode(answer[4:7]) + "\x00never"
    monkeypatch.setitem(prompting.BANNED_STRINGS, SafetyPolicy.STANDARD, (banned,))
    fast = engine(model, tiny_tokenizer, speculation="all", draft_tokens=5)
    runner, cache = fast.runner, fast.runner.cache
    plan = plan_answer(tiny_tokenizer, requests([greedy])[0])
    prompt, start_state = plan.prompt_ids, fast._ban_offsets[plan.banned]
    cache.set_row(
        0,
        prompt=prompt,
        temperature=0.0,
        top_p=1.0,
        repetition_penalty=1.0,
        seed=0,
        ban_state=start_state,
    )
    first = runner.sample([0], runner.prefill([0], [prompt]), [len(prompt)])
    assert first == answer[:1]
    cache.start_row(0, first[0], len(prompt))

    kept = runner.verify([answer[1:6]], len(prompt) + 8)
    assert kept == [answer[1:7]]  # five drafts kept, and the model's sixth token
    ban_next = cache.ban_next.cpu()
    state = start_state
    for token in answer[:7]:
        state = max(int(ban_next[state, token]), 0)
    assert state != 0  # mid-match, so a wrong chain would show
    assert int(cache.ban_state[0]) == state
    assert int(cache.tokens[0]) == answer[6]
    assert int(cache.positions[0]) == len(prompt) + 6
    assert set(cache.seen[0].nonzero().flatten().tolist()) == set(prompt) | set(answer[:7])


def test_verify_steps_beside_a_refine_prefilled_in_chunks(
    model: Any, tiny_tokenizer: Any, oracle: type[OracleDrafts]
) -> None:
    """One refine verifies while the next one's long prompt comes in 32-token chunks, and
    every step runs all verify rows (a GPU batch bucket runs rows past the live ones, the
    parked row being prefilled among them): both answers are plain decoding's."""
    greedy = SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.1)
    batch = [
        GenerationRequest(prompt=p, source_page=PAGE, description="a bakery", sampling=greedy)
        for p in ("make the title larger", "add a menu item for tarts")
    ]
    texts, answers = plain_answers(model, tiny_tokenizer, batch)
    for request_, answer in zip(batch, answers, strict=True):
        oracle.answers[tuple(plan_answer(tiny_tokenizer, request_).prompt_ids)] = answer
    fast = engine(model, tiny_tokenizer, draft_tokens=4, prefill_tokens=32, idle_prefill_tokens=0)
    runner = fast.runner
    assert runner.verifier is not None
    verifier = runner.verifier

    def every_row(b: int, ctx: int) -> None:
        with torch.inference_mode():
            verifier.body(runner.verify_rows, ctx)

    assert runner.verify_graphs is not None
    runner.verify_graphs.run = every_row  # type: ignore[method-assign]
    results = fast.generate(batch)
    assert [r.text for r in results] == texts
    assert fast.prefill_stats.cuts > 0
    assert fast.speculation_stats.accepted == fast.speculation_stats.drafted > 0


@pytest.mark.parametrize("kv_cache", ["bf16", "fp8"])
def test_triton_verify_steps_read_each_slot_once_and_stay_exact(
    model: Any, tiny_tokenizer: Any, oracle: type[OracleDrafts], kv_cache: str
) -> None:
    """With the Triton attention a verify step attends through ``verify_attention`` (a
    slot's k + 1 queries together), at two rows and then one; the answers are plain
    decoding's."""
    batch = requests([SAMPLED[1], SAMPLED[2]])
    options = {"kv_cache": kv_cache, "attention": "triton"}
    texts, answers = plain_answers(model, tiny_tokenizer, batch, **options)
    for request_, answer in zip(batch, answers, strict=True):
        oracle.answers[tuple(plan_answer(tiny_tokenizer, request_).prompt_ids)] = answer
    oracle.wrong = {4, 11, 12}
    fast = engine(model, tiny_tokenizer, speculation="all", draft_tokens=5, **options)
    slots: list[int] = []
    original = verify_module.verify_attention

    def counted(q: torch.Tensor, *args: Any) -> None:
        slots.append(q.shape[0] // 6)
        original(q, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(verify_module, "verify_attention", counted)
        results = fast.generate(batch)
    assert [r.text for r in results] == texts
    assert {1, 2} <= set(slots)  # steps of two slots, then of the longer one alone
    assert 0 < fast.speculation_stats.accepted < fast.speculation_stats.drafted
