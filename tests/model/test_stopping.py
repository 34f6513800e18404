"""The stop rule both engines use: EOS, grammars, the page's end, the budget, loops."""

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from model.stopping import MIN_LOOP_TOKENS, closes_page, ends_in_loop, should_check


def test_a_long_loop_is_detected() -> None:
    prefix = list(range(100, 400))
    block = [7, 8, 9, 10, 11, 12, 13]
    assert ends_in_loop(prefix + block * 30)
    assert ends_in_loop(prefix + [5] * MIN_LOOP_TOKENS)


def test_short_legitimate_repeats_are_kept() -> None:
    star = [60, 2000, 1500, 62]  # e.g. <span>★</span>
    assert not ends_in_loop(list(range(300)) + star * 5)
    # Just under the threshold: not yet a loop.
    assert not ends_in_loop(list(range(300)) + [5] * (MIN_LOOP_TOKENS - 1))


def test_varied_text_is_not_a_loop() -> None:
    rng = random.Random(0)
    assert not ends_in_loop([rng.randrange(50000) for _ in range(2000)])
    # A repeated structure with changing content (a list of items) is not a loop.
    items: list[int] = []
    for number in range(60):
        items += [60, 1100, 62, 3000 + number, 60, 1101, 62]
    assert not ends_in_loop(items)


def test_a_loop_must_end_the_text() -> None:
    rng = random.Random(1)
    looped = [1, 2, 3] * 100 + [rng.randrange(50000) for _ in range(50)]
    assert not ends_in_loop(looped)


def test_checks_run_periodically_after_the_minimum() -> None:
    assert not should_check(MIN_LOOP_TOKENS - 16)
    assert should_check(MIN_LOOP_TOKENS) == (MIN_LOOP_TOKENS % 16 == 0)
    assert sum(should_check(n) for n in range(1, 1001)) < 60


@pytest.mark.parametrize("engine_kind", ["standard", "fast"])
def test_both_engines_stop_a_model_stuck_in_a_loop(tiny_llama_dir: Path, engine_kind: str) -> None:
    """A model whose final norm is zeroed gives all-zero logits, so greedy decoding repeats
    one token forever: the engine must end it long before max_new_tokens."""
    import torch

    from model.engine import Engine
    from model.fast import FastEngine
    from model.loading import load_model
    from model.spec import resolve_spec
    from model.types import FinishReason, GenerationRequest, SamplingParams

    loaded = load_model(resolve_spec(base=str(tiny_llama_dir)))
    with torch.no_grad():
        loaded.model.model.norm.weight.zero_()
    engine = FastEngine.from_loaded(loaded) if engine_kind == "fast" else Engine(loaded)
    sampling = SamplingParams(max_new_tokens=1000, temperature=0, repetition_penalty=1.0)
    (result,) = engine.generate([GenerationRequest("a bakery", sampling=sampling)])
    assert result.finish_reason == FinishReason.REPETITION
    assert MIN_LOOP_TOKENS <= result.generated_tokens < MIN_LOOP_TOKENS + 32


def test_page_end_detector_agrees_with_decoding_every_step(smollm2_tokenizer_dir: Path) -> None:
    """Skipping the decode after tokens without '>' stops at the same token as decoding the
    tail every step (the engines stop at the first step that sees the tag)."""
    from transformers import AutoTokenizer

    from model.stopping import PageEndDetector, page_closed

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    decodes = 0
    real_decode = tokenizer.decode

    def counting_decode(*args: object, **kwargs: object) -> str:
        nonlocal decodes
        decodes += 1
        return str(real_decode(*args, **kwargs))

    detector = PageEndDetector(tokenizer)
    tokenizer.decode = counting_decode  # the detector holds this tokenizer
    for page, closes in (
        ("<html><body><p>a > b</p></body></html>\n<p>after</p>", True),
        ("<HTML><body>x</body></HTML>", True),
        ("<html><body><p>no end yet</p></body>", False),
    ):
        ids = tokenizer.encode(page, add_special_tokens=False)
        every_step = [page_closed(tokenizer, ids[: i + 1]) for i in range(len(ids))]
        decodes = 0
        skipping = [detector.closed(ids[: i + 1]) for i in range(len(ids))]
        first = every_step.index(True) if True in every_step else None
        assert (skipping.index(True) if True in skipping else None) == first
        assert decodes < len(ids)  # the tail was not decoded on every step
        assert (first is not None) == closes


@pytest.mark.parametrize(
    ("text", "closes"),
    [
        pytest.param("<html><body>x</body></html>", True, id="plain"),
        pytest.param("<html><body>x</body></HTML >\n\n", True, id="case-space-newlines"),
        pytest.param("<html><body>x</body></html> and more", False, id="not-at-the-end"),
        pytest.param("<html><body>x</body>", False, id="no-end-tag"),
        pytest.param("<html><body><pre>\n<html>\n</html>", False, id="in-pre"),
        pytest.param("<html><body><pre><code>&lt;p&gt; </html>", False, id="in-pre-code"),
        pytest.param("<html><body><p>Use <code></html>", False, id="in-code"),
        pytest.param("<html><body><textarea></html>", False, id="in-textarea"),
        pytest.param("<html><body><xmp></html>", False, id="in-xmp"),
        pytest.param('<html><body><script>w("</html>', False, id="in-script"),
        pytest.param("<html><head><style>/* </html>", False, id="in-style"),
        pytest.param("<html><body><!-- </html>", False, id="in-comment"),
        pytest.param(
            "<html><body><pre><code><html></html></code></pre>\n</body></html>",
            True,
            id="after-a-closed-sample",
        ),
        pytest.param(
            "<html><body><script>if (a < b) w('</html>');</script></body></html>",
            True,
            id="after-a-script-that-wrote-it",
        ),
        pytest.param("<html><body><!-- a --><!--></body></html>", True, id="after-comments"),
        pytest.param("<html><body><pre><pre></pre></html>", False, id="nested-pre-still-open"),
        pytest.param("<html><body></pre></code></html>", True, id="stray-end-tags"),
    ],
)
def test_closes_page(text: str, closes: bool) -> None:
    assert closes_page(text) is closes


def test_page_end_detector_skips_a_closing_tag_inside_a_code_sample(
    smollm2_tokenizer_dir: Path,
) -> None:
    """A page about HTML shows '</html>' in a <pre>: the engines stop at the page's own end."""
    from transformers import AutoTokenizer

    from model.stopping import PageEndDetector

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    detector = PageEndDetector(tokenizer)
    page = (
        "<html><body><h1>A skeleton</h1><pre><code><html>\n<body></body>\n</html></code></pre>"
        "<p>That is all.</p></body></html>"
    )
    ids = tokenizer.encode(page, add_special_tokens=False)
    stops = [i for i in range(len(ids)) if detector.closed(ids[: i + 1])]
    assert stops, "the page's own </html> was missed"
    stopped_at = tokenizer.decode(ids[: stops[0] + 1])
    assert stopped_at.rstrip().endswith("That is all.</p></body></html>")


@dataclass
class Row:
    """The least a sequence needs to go through StopRule.accept (an engine's _Sequence)."""

    max_new: int = 100
    is_form: bool = False
    host_constraint: Any = None
    generated: list[int] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    request: Any = None


class ScriptedConstraint:
    """Refuses ``refused``, finishes after ``finish_after`` tokens, forces ``forcing`` once."""

    def __init__(self, refused: int = -1, finish_after: int = 99, forcing: list[int] | None = None):
        self.refused, self.finish_after, self.forcing = refused, finish_after, forcing or []
        self.taken = 0

    def accept(self, token: int) -> bool:
        self.taken += 1
        return token != self.refused

    def is_finished(self) -> bool:
        return self.taken >= self.finish_after

    def forced_tokens(self) -> list[int]:
        forced, self.forcing = self.forcing, []
        self.taken += len(forced)
        return forced


def test_stop_rule_ends_at_eos_the_page_and_the_budget(tiny_tokenizer: Any) -> None:
    from model.stopping import PageEndDetector, StopRule
    from model.types import FinishReason

    eos = tiny_tokenizer.eos_token_id
    page = tiny_tokenizer.encode("<html><body>x</body></html>", add_special_tokens=False)
    rule = StopRule(frozenset({eos}), PageEndDetector(tiny_tokenizer))

    def run(rule: StopRule, row: Row, tokens: list[int]) -> list[FinishReason | None]:
        return [rule.accept(row, token) for token in tokens]

    row = Row()
    assert run(rule, row, [*page[:2], eos]) == [None, None, FinishReason.EOS]
    assert row.generated == page[:2]  # EOS ends the answer and is not part of it
    row = Row()
    assert run(rule, row, page)[-1] == FinishReason.HTML_COMPLETE
    assert row.generated == page
    # A form's strings may hold "</html>": it runs on to its budget.
    form = Row(is_form=True, max_new=len(page))
    assert run(rule, form, page) == [None] * (len(page) - 1) + [FinishReason.LENGTH]
    # ignore_eos (benchmarks) runs through EOS and the page's end to the budget.
    bench = StopRule(frozenset({eos}), PageEndDetector(tiny_tokenizer), ignore_eos=True)
    row = Row(max_new=len(page) + 2)
    assert run(bench, row, [*page, eos, eos])[-3:] == [None, None, FinishReason.LENGTH]
    assert row.generated == [*page, eos, eos]
    # A loop ends a document, not a form.
    loop = [7] * MIN_LOOP_TOKENS
    assert run(rule, Row(max_new=1000), loop)[-1] == FinishReason.REPETITION
    assert run(rule, Row(max_new=1000, is_form=True), loop)[-1] is None


def test_stop_rule_advances_the_host_constraint(tiny_tokenizer: Any) -> None:
    from model.stopping import PageEndDetector, StopRule
    from model.types import FinishReason, GenerationRequest

    def rule(jump_forward: bool) -> StopRule:
        return StopRule(frozenset({0}), PageEndDetector(tiny_tokenizer), jump_forward=jump_forward)

    refusing = Row(host_constraint=ScriptedConstraint(refused=5), request=GenerationRequest("x"))
    assert rule(False).accept(refusing, 5) == FinishReason.EOS  # logged as a bug
    finishing = Row(host_constraint=ScriptedConstraint(finish_after=2))
    assert [rule(False).accept(finishing, t) for t in (3, 4)] == [None, FinishReason.EOS]
    # Without jump_forward the forced tokens are left to the masks (one step each).
    stepping = Row(is_form=True, host_constraint=ScriptedConstraint(forcing=[8, 9]))
    assert rule(False).accept(stepping, 3) is None
    assert stepping.generated == [3] and stepping.forced == []
    # With it they join the answer (and count towards its budget), kept for the next feed.
    jumping = Row(is_form=True, max_new=3, host_constraint=ScriptedConstraint(forcing=[8, 9]))
    assert rule(True).accept(jumping, 3) == FinishReason.LENGTH
    assert jumping.generated == [3, 8, 9] and jumping.forced == [8, 9]
    done = Row(is_form=True, host_constraint=ScriptedConstraint(finish_after=3, forcing=[8, 9]))
    assert rule(True).accept(done, 3) == FinishReason.EOS  # the forced run completed it
