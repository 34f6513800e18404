"""Constrained decoding in both engines: compose answers fill their kind's form (the
grammar of ``model.page.form``), forced lead-ins cost no sampling and change no token,
document answers never contain a banned string, a masked token is never sampled."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
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
    special_token_ids,
)
from model.engine import Engine, sample_next_tokens
from model.fast import FastEngine, FastEngineOptions
from model.loading import LoadedModel, load_model
from model.page.content import PageContent, PageKind, classify_prompt, page_subject, page_title
from model.page.form import form_for, form_leads, grammar_for, parse_answer
from model.prompting import plan_answer
from model.spec import resolve_spec
from model.types import FinishReason, GenerationRequest, PageMode, SafetyPolicy, SamplingParams

BANNED = ("```", "<link", "<script src")
SUBJECT = "A bakery in Lyon"
COMPOSE_PROMPTS = ["a landing page for a bakery", "an faq page for a bike shop"]


def form_values(text: str, kind: PageKind, subject: str) -> list[str]:
    """The values of a complete form, in order; AssertionError where ``text`` is not one
    (a line out of place, a lead-in missing or changed, an empty value, no final newline)."""
    leads = [lead.lstrip("\n") for lead in form_leads(kind, subject)]
    assert text.endswith("\n"), repr(text[-80:])
    lines = text[:-1].split("\n")
    assert len(lines) == len(leads), (len(lines), len(leads), text)
    values = []
    for line, lead in zip(lines, leads, strict=True):
        assert line.startswith(lead), (line, lead)
        value = line[len(lead) :].strip()
        assert value, f"empty value after {lead!r}"
        values.append(value)
    return values


def block_of(kind: PageKind) -> str:
    """The content field that holds ``kind``'s own block ("features", "plans", ...)."""
    return form_for(kind)[1].path.split(".")[0].removesuffix("[]")


def assert_complete_content(content: PageContent, kind: PageKind) -> None:
    assert content.tagline
    assert getattr(content, block_of(kind)), f"{kind}: no {block_of(kind)}"
    assert len(content.sections) == 2
    assert content.call_to_action is not None and content.call_to_action.button


def test_form_values_rejects_what_it_should() -> None:
    leads = form_leads(PageKind.EVENT, SUBJECT)
    whole = "".join(f"{lead} x" for lead in leads) + "\n"
    assert len(form_values(whole, PageKind.EVENT, SUBJECT)) == len(leads)
    with pytest.raises(AssertionError):  # a value left empty
        form_values(whole.replace(f"{leads[1]} x", leads[1]), PageKind.EVENT, SUBJECT)
    with pytest.raises(AssertionError):  # cut short
        form_values(whole[: len(whole) // 2] + "\n", PageKind.EVENT, SUBJECT)
    with pytest.raises(AssertionError):  # no final newline
        form_values(whole[:-1], PageKind.EVENT, SUBJECT)


# --------------------------------------------------------------- the constraints alone


def allowed_tokens(constraint: Any, vocab: int) -> torch.Tensor:
    bitmask = full_bitmask(1, vocab)
    constraint.fill_mask(bitmask, 0)
    return allowed_from_bitmask(bitmask, vocab)[0]


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_forced_tokens_are_the_lead_in_after_a_newline_and_none_inside_a_value(
    tiny_tokenizer: Any,
) -> None:
    # A portfolio's form: the tagline (a sentence), then a project's name (a few words).
    leads = form_leads(PageKind.PORTFOLIO, SUBJECT)
    grammar = grammar_for(PageKind.PORTFOLIO, SUBJECT)
    constraint = GrammarConstraint(tiny_tokenizer, grammar)
    # The answer starts with the first lead-in: all of it is forced.
    assert tiny_tokenizer.decode(constraint.forced_tokens()) == leads[0]
    assert constraint.forced_tokens() == []  # taken already: the value is the model's
    for token in ids(tiny_tokenizer, " Fresh bread"):
        assert constraint.accept(token)
        assert constraint.forced_tokens() == []  # inside a value: nothing is forced
    for token in ids(tiny_tokenizer, " every day."):
        assert constraint.accept(token)
    # The tagline is one sentence: after its full stop the line ends, and the next lead-in
    # (newline included) is forced.
    assert tiny_tokenizer.decode(constraint.forced_tokens()) == leads[1]
    for token in ids(tiny_tokenizer, " Fresh Bread"):
        assert constraint.accept(token)
        assert constraint.forced_tokens() == []  # a few words: it may go on, or end here
    assert constraint.accept(ids(tiny_tokenizer, "\n")[0])
    forced = constraint.forced_tokens()
    assert tiny_tokenizer.decode(forced) == leads[2].lstrip("\n")
    assert forced == ids(tiny_tokenizer, leads[2].lstrip("\n"))  # the tokenizer's spelling
    assert not constraint.is_finished()


def test_a_forced_space_is_left_to_the_model(tiny_tokenizer: Any) -> None:
    """After a list's comma the grammar forces a space; forced alone it would make the model
    write the next word without its own leading space, so nothing is forced and the mask
    lets the model write " warm" as one token."""
    constraint = GrammarConstraint(tiny_tokenizer, grammar_for(PageKind.PRICING, SUBJECT))
    answer = "".join(
        f"{lead} {value}"
        for lead, value in zip(
            form_leads(PageKind.PRICING, SUBJECT)[:4],
            ["We bake bread.", "Basic", "$5", "Bread,"],
            strict=True,
        )
    )
    for token in ids(tiny_tokenizer, answer):
        assert constraint.accept(token)
    assert constraint.matcher.find_jump_forward_string() == " "
    assert constraint.forced_tokens() == []
    allowed = allowed_tokens(constraint, len(tiny_tokenizer))
    assert allowed[ids(tiny_tokenizer, " warm")[0]]
    assert not allowed[ids(tiny_tokenizer, "warm")[0]]


def test_forced_text_allows_one_token_at_a_time_the_same_as_at_once(
    tiny_tokenizer: Any,
) -> None:
    """An engine that takes forced text one step at a time (the fast one) spells it as one
    that feeds it in one forward: the mask allows only the planned token, though the grammar
    alone would allow every token that starts the text ("T", "Ta", "Tag")."""
    grammar = grammar_for(PageKind.MENU, SUBJECT)
    at_once = GrammarConstraint(tiny_tokenizer, grammar).forced_tokens()
    assert len(at_once) > 3
    stepwise = GrammarConstraint(tiny_tokenizer, grammar)
    vocab = len(tiny_tokenizer)
    for expected in at_once:
        allowed = allowed_tokens(stepwise, vocab)
        assert allowed.nonzero().flatten().tolist() == [expected]
        assert stepwise.accept(expected)
    assert allowed_tokens(stepwise, vocab).sum() > 1  # the value: the model's choice again
    assert stepwise.matcher.find_jump_forward_string() == ""


def test_another_token_where_text_is_planned_drops_the_plan(tiny_tokenizer: Any) -> None:
    """The grammar takes any spelling of forced text: a token other than the planned one
    (here "T" before "agline") is accepted, and the rest is planned again from there."""
    constraint = GrammarConstraint(tiny_tokenizer, grammar_for(PageKind.FAQ, SUBJECT))
    lead = form_leads(PageKind.FAQ, SUBJECT)[0]
    allowed_tokens(constraint, len(tiny_tokenizer))  # plans "Tagline ..."
    assert constraint.accept(tiny_tokenizer.convert_tokens_to_ids("T"))
    rest = constraint.forced_tokens()
    assert tiny_tokenizer.decode(rest) == lead[1:]


def random_walk(tokenizer: Any, kind: PageKind, seed: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """Steps of a walk that takes a random allowed token each time (the mask's worst case:
    no model to stay near natural text), with the constraint's state before each choice."""
    rng = random.Random(seed)
    constraint = GrammarConstraint(tokenizer, grammar_for(kind, SUBJECT))
    vocab = len(tokenizer)
    newline = ids(tokenizer, "\n")[0]
    for _ in range(5000):
        if constraint.is_finished():
            return
        allowed = allowed_tokens(constraint, vocab)
        yield allowed, constraint
        choices = allowed.nonzero().flatten().tolist()
        # Mostly end a value as soon as the grammar lets it, so the walk ends in time.
        token = newline if newline in choices and rng.random() < 0.5 else rng.choice(choices)
        assert constraint.accept(token)
    raise AssertionError("the walk did not finish")


@pytest.mark.parametrize("kind", [PageKind.LANDING, PageKind.DASHBOARD, PageKind.RESUME])
def test_the_mask_never_allows_a_special_token_and_eos_only_at_the_end(
    tiny_tokenizer: Any, kind: PageKind
) -> None:
    special = sorted(special_token_ids(tiny_tokenizer))
    eos = tiny_tokenizer.eos_token_id
    steps = 0
    for allowed, constraint in random_walk(tiny_tokenizer, kind, seed=len(kind.value)):
        steps += 1
        assert not allowed[special].any()
        assert bool(allowed[eos]) == bool(constraint.matcher.is_completed())
    assert steps > len(form_for(kind))


def test_compiled_once_per_tokenizer_and_grammar(tiny_tokenizer: Any) -> None:
    from model.constrained import compiled_grammar

    grammar = grammar_for(PageKind.EVENT, SUBJECT)
    first = compiled_grammar(tiny_tokenizer, grammar)
    assert compiled_grammar(tiny_tokenizer, grammar) is first
    assert compiled_grammar(tiny_tokenizer, grammar_for(PageKind.EVENT, "A school")) is not first


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
        fast.runner.weights.lm_head = bias.wrap(fast.runner.weights.lm_head)
    try:
        return engine.generate(requests()), fast.generate(requests())
    finally:
        if handle is not None:
            handle.remove()


def compose_requests(seeds: range) -> list[GenerationRequest]:
    prompts = [f"a {kind.value} page about kite surfing" for kind in PageKind]
    return [
        GenerationRequest(
            prompts[(seed * 5) % len(prompts)],  # several kinds in a few seeds
            mode=PageMode.COMPOSE,
            sampling=SamplingParams(max_new_tokens=1500, temperature=1.0, seed=seed),
        )
        for seed in seeds
    ]


class Recorder:
    """Every token the grammar constraints take (sampled or forced), read off their calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tokens: list[int] = []
        self.forced = 0
        accept, forced_tokens = GrammarConstraint.accept, GrammarConstraint.forced_tokens

        def recording_accept(constraint: GrammarConstraint, token: int) -> bool:
            self.tokens.append(token)
            return accept(constraint, token)

        def recording_forced(constraint: GrammarConstraint) -> list[int]:
            tokens = forced_tokens(constraint)
            self.tokens += tokens
            self.forced += len(tokens)
            return tokens

        monkeypatch.setattr(GrammarConstraint, "accept", recording_accept)
        monkeypatch.setattr(GrammarConstraint, "forced_tokens", recording_forced)


def compose_bias(loaded: LoadedModel) -> Bias:
    """Towards a value's end (newline, full stop, question mark): a random model otherwise
    runs every value to its bound. It does not help validity: the grammar decides where each
    may go."""
    tokenizer = loaded.tokenizer
    ends = [t for t in range(len(tokenizer)) if tokenizer.decode([t]) in {"\n", ".", "?"}]
    return Bias(ends, 3.0, loaded.model.config.vocab_size)


def test_a_random_model_under_the_grammar_fills_every_field_in_both_engines(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several seeds and kinds: each answer is the whole form with every value written, it
    parses with every part there, and both engines write the same one (the standard engine
    feeds forced lead-ins in one forward, the fast one a token a step)."""
    recorder = Recorder(monkeypatch)
    seeds = range(4)
    standard, fast = run_both(loaded, lambda: compose_requests(seeds), compose_bias(loaded))
    for request, result in zip(compose_requests(seeds), standard, strict=True):
        kind = classify_prompt(request.prompt)
        subject = page_subject(request.prompt)
        assert result.finish_reason == FinishReason.EOS, result.text[-80:]
        form_values(result.text, kind, subject)
        content = parse_answer(
            result.text, kind=kind, title=page_title(request.prompt), subject=subject
        )
        assert_complete_content(content, kind)
    assert len({classify_prompt(r.prompt) for r in compose_requests(seeds)}) > 2
    assert [r.text for r in fast] == [r.text for r in standard]
    assert [r.finish_reason for r in fast] == [r.finish_reason for r in standard]
    assert len({r.text for r in standard}) == len(standard)  # the seeds really differ
    # No special token was ever taken (the decoded text would hide one), and the lead-ins
    # were forced: a good share of every answer was never sampled.
    assert not set(recorder.tokens) & special_token_ids(loaded.tokenizer)
    assert recorder.forced > sum(r.generated_tokens for r in standard) // 4


def test_jump_forward_changes_no_token(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard engine with forced tokens fed in one forward and without (each one then
    sampled under a one-token mask) writes the same answers, and counts the same tokens."""
    bias = compose_bias(loaded)
    seeds = range(4, 7)
    handle = loaded.model.lm_head.register_forward_hook(bias.hook)
    try:
        jumping = Engine(loaded).generate(compose_requests(seeds))
        monkeypatch.setattr(GrammarConstraint, "forced_tokens", lambda self: [])
        stepping = Engine(loaded).generate(compose_requests(seeds))
    finally:
        handle.remove()
    assert [r.text for r in stepping] == [r.text for r in jumping]
    assert [r.generated_tokens for r in stepping] == [r.generated_tokens for r in jumping]
    assert all(r.finish_reason == FinishReason.EOS for r in jumping)


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
    for request, result in zip(requests, Engine(embedded).generate(requests), strict=True):
        kind = classify_prompt(request.prompt)
        subject = page_subject(request.prompt)
        assert result.finish_reason == FinishReason.EOS, result.text
        form_values(result.text, kind, subject)
        content = parse_answer(
            result.text, kind=kind, title=page_title(request.prompt), subject=subject
        )
        assert_complete_content(content, kind)
