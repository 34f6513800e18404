"""Constrained decoding in both engines: compose answers follow their JSON schema, document
answers never contain a banned string, a masked token is never sampled."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from model.constrained import (
    BannedStrings,
    GrammarConstraint,
    allowed_from_bitmask,
    ban_automaton,
    constraint_for,
    full_bitmask,
)
from model.engine import Engine, sample_next_tokens
from model.fast_engine import FastEngine, FastEngineOptions
from model.loading import LoadedModel, load_model
from model.page.content import PageKind, classify_prompt, parse_content, schema_for
from model.prompting import plan_answer
from model.spec import resolve_spec
from model.types import FinishReason, GenerationRequest, PageMode, SafetyPolicy, SamplingParams

BANNED = ("```", "<link", "<script src")
COMPOSE_PROMPTS = ["a landing page for a bakery", "an faq page for a bike shop"]


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> None:
    """Raise AssertionError where ``value`` breaks ``schema`` (the subset schema_for uses)."""
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in enum"
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict), path
        assert set(value) == set(schema["properties"]), f"{path}: keys {sorted(value)}"
        for key, sub in schema["properties"].items():
            validate(value[key], sub, f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list), path
        assert schema["minItems"] <= len(value) <= schema["maxItems"], f"{path}: {len(value)}"
        for index, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{index}]")
    elif kind == "string":
        assert isinstance(value, str), path
        assert schema["minLength"] <= len(value) <= schema["maxLength"], f"{path}: {value!r}"
    elif kind == "boolean":
        assert isinstance(value, bool), path
    else:
        raise AssertionError(f"unexpected schema type {kind}")


def test_the_validator_rejects_what_it_should() -> None:
    schema = schema_for(PageKind.EVENT)
    with pytest.raises(AssertionError):
        validate({"title": "x"}, schema)
    with pytest.raises(AssertionError):
        validate({"title": "", "tagline": "t"}, schema)


# --------------------------------------------------------------- the constraints alone


def test_grammar_rejects_extra_keys_and_allows_eos_only_at_the_end(tiny_tokenizer: Any) -> None:
    schema = schema_for(PageKind.LANDING)
    grammar = GrammarConstraint(tiny_tokenizer, schema)
    vocab = len(tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    bitmask = full_bitmask(1, vocab)
    grammar.fill_mask(bitmask, 0)
    allowed = allowed_from_bitmask(bitmask, vocab)[0]
    assert not allowed[eos]  # nothing written yet: the document can't end
    for special in tiny_tokenizer.all_special_ids:
        assert not allowed[special]
    opening = tiny_tokenizer('{"title":"', add_special_tokens=False)["input_ids"]
    assert all(grammar.accept(token) for token in opening)
    wrong_key = GrammarConstraint(tiny_tokenizer, schema)
    tokens = tiny_tokenizer('{"name":"', add_special_tokens=False)["input_ids"]
    assert not all(wrong_key.accept(token) for token in tokens)
    # Compiled once per (tokenizer, schema): a second constraint reuses the grammar.
    assert grammar.matcher is not wrong_key.matcher


def banned_in(text: str, banned: tuple[str, ...] = BANNED) -> list[str]:
    lowered = text.lower()
    return [b for b in banned if b in lowered]


def test_banned_strings_mask_exactly_what_would_complete_one(tiny_tokenizer: Any) -> None:
    """Every token from many tails: masked iff tail + token text contains a banned string."""
    automaton = ban_automaton(tiny_tokenizer, BANNED)
    vocab = len(tiny_tokenizer)
    tails = ["", "x`", "``", "a <", "<LIN", "<scr", "<script", "<Script sr", "`x", "<lin k"]
    texts = [tiny_tokenizer.decode([t]) for t in range(vocab)]
    for tail in tails:
        constraint = BannedStrings(automaton, prefix=tail)
        bitmask = full_bitmask(1, vocab)
        constraint.fill_mask(bitmask, 0)
        allowed = allowed_from_bitmask(bitmask, vocab)[0].tolist()
        special = set(tiny_tokenizer.all_special_ids)
        for token, text in enumerate(texts):
            expected = token in special or not banned_in(tail + text)
            assert allowed[token] == expected, (tail, text)
    # The case that needs the tail: "``" then "`" (a token that alone is harmless).
    tick = tiny_tokenizer.convert_tokens_to_ids("`")
    assert not BannedStrings(automaton, prefix="``").accept(tick)
    assert BannedStrings(automaton, prefix="`").accept(tick)


def test_constraint_for_follows_the_plan(tiny_tokenizer: Any) -> None:
    compose = plan_answer(tiny_tokenizer, GenerationRequest("a bakery", mode=PageMode.COMPOSE))
    document = plan_answer(tiny_tokenizer, GenerationRequest("a bakery"))
    assert isinstance(constraint_for(compose, tiny_tokenizer), GrammarConstraint)
    assert isinstance(constraint_for(document, tiny_tokenizer), BannedStrings)
    assert constraint_for(dataclasses.replace(document, banned=()), tiny_tokenizer) is None


def test_a_masked_token_is_never_sampled() -> None:
    """The masked token has by far the best logit, is boosted by the repetition penalty's
    set and sampled hot: it still never comes out."""
    logits = torch.tensor([[9.0, 1.0, 0.5, 0.0]]).expand(64, -1).clone()
    allowed = torch.tensor([[False, True, True, True]]).expand(64, -1)
    hot = SamplingParams(temperature=5.0, top_p=1.0, repetition_penalty=0.5)
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    for params in (hot, greedy):
        picks = sample_next_tokens(
            logits, [params] * 64, [[0]] * 64, list(range(64)), allowed=allowed
        )
        assert 0 not in picks
        assert len(set(picks)) > 1 or params is greedy
    assert sample_next_tokens(logits[:1], [greedy], [[]], [0]) == [0]  # unmasked: it wins


# ------------------------------------------------------------------- in the engines


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir: Path) -> LoadedModel:
    return load_model(resolve_spec(base=str(tiny_llama_dir)))


def fast_engine(loaded: LoadedModel) -> FastEngine:
    return FastEngine.from_loaded(loaded, FastEngineOptions(max_seq_len=2048, max_slots=4))


class Bias:
    """A logits bias on some tokens, added after the model's head (an edge, not the core)."""

    def __init__(self, tokens: list[int], amount: float, vocab: int) -> None:
        self.vector = torch.zeros(vocab)
        self.vector[tokens] = amount

    def hook(self, _module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output + self.vector.to(output.dtype)

    def wrap(self, head: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda x: head(x) + self.vector.to(head(x).dtype)


def tokens_with(tokenizer: Any, pieces: tuple[str, ...]) -> list[int]:
    return [
        t
        for t in range(len(tokenizer))
        if any(p in tokenizer.decode([t]).lower() for p in pieces)
        and t not in tokenizer.all_special_ids
    ]


def run_both(
    loaded: LoadedModel, requests: Callable[[], list[GenerationRequest]], bias: Bias | None
) -> tuple[list[Any], list[Any]]:
    """The same requests through the standard and the fast engine (with the bias, if any)."""
    engine = Engine(loaded)
    fast = fast_engine(loaded)
    handle = None
    if bias is not None:
        handle = loaded.model.lm_head.register_forward_hook(bias.hook)
        fast.runner.lm_head = bias.wrap(fast.runner.lm_head)
    try:
        return engine.generate(requests()), fast.generate(requests())
    finally:
        if handle is not None:
            handle.remove()


def compose_requests(seeds: range) -> list[GenerationRequest]:
    prompts = [f"a {kind.value} page about kite surfing" for kind in PageKind]
    return [
        GenerationRequest(
            prompts[seed % len(prompts)],
            mode=PageMode.COMPOSE,
            sampling=SamplingParams(max_new_tokens=1500, temperature=1.0, seed=seed),
        )
        for seed in seeds
    ]


def test_random_model_under_the_grammar_writes_valid_json_in_both_engines(
    loaded: LoadedModel,
) -> None:
    """Many seeds: every answer is complete JSON of its kind's schema, and both engines
    write the same one. A bias towards closing quotes and brackets keeps strings short (a
    random model otherwise runs every string to its maxLength); it does not help validity:
    the grammar decides where each may go."""
    tokenizer = loaded.tokenizer
    bias = Bias(tokens_with(tokenizer, ('"', "]", "}")), 4.0, loaded.model.config.vocab_size)
    seeds = range(4)
    standard, fast = run_both(loaded, lambda: compose_requests(seeds), bias)
    for request, result in zip(compose_requests(seeds), standard, strict=True):
        assert result.finish_reason == FinishReason.EOS, result.text[-80:]
        data = json.loads(result.text)
        validate(data, schema_for(classify_prompt(request.prompt)))
        content, closed = parse_content(result.text)
        assert not closed and content.title
    assert [r.text for r in fast] == [r.text for r in standard]
    assert len({r.text for r in standard}) == len(standard)  # the seeds really differ


def document_requests() -> list[GenerationRequest]:
    return [
        GenerationRequest(
            "a page for a code school",
            safety=safety,
            sampling=SamplingParams(max_new_tokens=40, temperature=0.7, seed=seed),
        )
        for seed, safety in enumerate([SafetyPolicy.STANDARD, SafetyPolicy.OFF] * 2)
    ]


def test_banned_strings_never_appear_though_the_model_wants_them(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    # A few exact pieces, so that unconstrained they soon line up into banned strings.
    pieces = {"`", "``", "```", "<", "link", "<link", "LINK", "<script", " src", " SRC"}
    favoured = [t for t in range(len(tokenizer)) if tokenizer.decode([t]) in pieces]
    bias = Bias(favoured, 12.0, loaded.model.config.vocab_size)
    standard, fast = run_both(loaded, document_requests, bias)
    for request, result in zip(document_requests(), standard, strict=True):
        prefix = plan_answer(tokenizer, request).prefix
        assert result.text.startswith(prefix)
        banned = BANNED if request.safety is SafetyPolicy.STANDARD else ("```",)
        assert banned_in(result.text[len(prefix) :], banned) == []
    assert [r.text for r in fast] == [r.text for r in standard]

    # The same model unconstrained does write them: the bias really pushes.
    engine = Engine(loaded)
    engine.constrain = False
    handle = loaded.model.lm_head.register_forward_hook(bias.hook)
    try:
        free = engine.generate(document_requests())
    finally:
        handle.remove()
    assert any(banned_in(r.text) for r in free)


@pytest.mark.slow
def test_the_embedded_model_composes_pages_that_parse_whole() -> None:
    from model.loading import load_model as load

    embedded = load(resolve_spec(preset="smollm2"))
    sampling = SamplingParams(max_new_tokens=1200, temperature=0.2, seed=3)
    requests = [
        GenerationRequest(prompt, mode=PageMode.COMPOSE, sampling=sampling)
        for prompt in COMPOSE_PROMPTS
    ]
    for result in Engine(embedded).generate(requests):
        assert result.finish_reason == FinishReason.EOS
        content, closed = parse_content(result.text)
        assert not closed and content.title
