"""Label masking, the shared prompt template, dynamic padding and packing."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from model.prompting import document_prefix, plan_answer
from model.types import GenerationRequest
from training.data import Pair
from training.tokenization import (
    IGNORE_INDEX,
    Collator,
    body_answer,
    body_content,
    count_tokens,
    encode_pair,
    encode_pairs,
    pack,
)

PAGE = (
    '<!DOCTYPE html>\n<html lang="en">\n'
    "<body><h1>Crumb &amp; Co.</h1><p>Fresh bread</p></body>\n</html>"
)


def test_prompt_masked_page_and_eos_labelled(tokenizer: Any) -> None:
    pair = Pair("a landing page for a bakery", PAGE)
    example = encode_pair(tokenizer, pair, 4096)
    assert example is not None
    n_prompt = example.labels.index(
        next(label for label in example.labels if label != IGNORE_INDEX)
    )
    # Prompt: every label masked, and its ids are exactly those inference decodes from
    # (the chat prompt and the page skeleton up to <body>).
    plan = plan_answer(tokenizer, GenerationRequest(prompt=pair.description))
    assert example.input_ids[:n_prompt] == plan.prompt_ids
    assert all(label == IGNORE_INDEX for label in example.labels[:n_prompt])
    assert tokenizer.decode(example.input_ids[:n_prompt]).endswith(
        document_prefix(pair.description)
    )
    # Answer: every token labelled with itself; it is the page's body content, the closing
    # tags, then EOS.
    answer = example.labels[n_prompt:]
    assert answer == example.input_ids[n_prompt:]
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == (
        "<h1>Crumb &amp; Co.</h1><p>Fresh bread</p>\n</body>\n</html>"
    )
    # No doubled BOS from add_special_tokens on top of the template's own.
    assert example.input_ids[:2] != [tokenizer.bos_token_id] * 2


def test_document_prompt_follows_style(tokenizer: Any) -> None:
    pair = Pair("a pricing page for a gym", PAGE)
    example = encode_pair(tokenizer, pair, 4096, style="retro")
    assert example is not None
    plan = plan_answer(tokenizer, GenerationRequest(prompt=pair.description, style="retro"))
    assert example.input_ids[: len(plan.prompt_ids)] == plan.prompt_ids
    assert example.labels.count(IGNORE_INDEX) == len(plan.prompt_ids)


@pytest.mark.parametrize(
    ("page", "body"),
    [
        (
            '<html><head><title>t</title></head><body class="x">\n<p>Hi</p>\n</body></html>',
            "<p>Hi</p>",
        ),
        (
            "<!DOCTYPE html><html><head><title>t</title></head><p>No body tag</p></html>",
            "<p>No body tag</p>",
        ),
        ("<div>Just a fragment</div>", "<div>Just a fragment</div>"),
        ("<BODY><p>Upper</p></BODY>\n</HTML>", "<p>Upper</p>"),
        # Only the page's last </body> ends it.
        (
            "<body><script>s='</body>'</script><p>x</p></body>",
            "<script>s='</body>'</script><p>x</p>",
        ),
    ],
)
def test_body_content(page: str, body: str) -> None:
    assert body_content(page) == body
    assert body_answer(page) == body + "\n</body>\n</html>"
    assert body_answer(page, truncated=True) == body


def test_style_reaches_the_prompt(tokenizer: Any) -> None:
    example = encode_pair(tokenizer, Pair("a bakery", PAGE), 4096, style="dark")
    assert example is not None
    assert "dark theme" in tokenizer.decode(example.input_ids)


def test_padding_is_masked_even_when_pad_is_eos(tokenizer: Any) -> None:
    # SmolLM2's pad token is its EOS: masking must go by position, never by token id.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = encode_pair(tokenizer, Pair("a short page", "<html></html>"), 4096)
    long = encode_pair(tokenizer, Pair("a longer page", PAGE), 4096)
    assert short is not None and long is not None
    batch = Collator(tokenizer.pad_token_id, pad_to_multiple_of=8)([short, long])
    width = batch["input_ids"].shape[1]
    assert width == -(-len(long) // 8) * 8  # dynamic: padded to this batch's longest, not 512
    for row, example in enumerate([short, long]):
        assert batch["attention_mask"][row, : len(example)].all()
        assert not batch["attention_mask"][row, len(example) :].any()
        assert (batch["labels"][row, len(example) :] == IGNORE_INDEX).all()
        assert batch["labels"][row, : len(example)].tolist() == example.labels
        # The real EOS (same id as padding) stays a target.
        assert batch["labels"][row, len(example) - 1] == tokenizer.eos_token_id
    assert count_tokens(batch) == len(short) + len(long)


def test_truncated_pages_get_no_eos(tokenizer: Any) -> None:
    example = encode_pair(tokenizer, Pair("a page", PAGE, truncated=True), 4096)
    assert example is not None and example.labels[-1] != tokenizer.eos_token_id
    full = encode_pair(tokenizer, Pair("a page", PAGE), 4096)
    assert full is not None
    limit = len(full) - 5
    assert encode_pair(tokenizer, Pair("a page", PAGE), limit) is None  # dropped
    cut = encode_pair(tokenizer, Pair("a page", PAGE), limit, truncate=True)
    assert cut is not None and len(cut) <= limit and cut.labels[-1] != tokenizer.eos_token_id


def test_encode_pairs_reports(tokenizer: Any) -> None:
    pairs = [Pair("one", PAGE), Pair("two", PAGE * 20), Pair("three", "<html></html>")]
    _examples, report = encode_pairs(tokenizer, pairs, 200)
    assert report.examples == 2 and report.dropped_too_long == 1
    _examples, report = encode_pairs(tokenizer, pairs, 200, truncate=True)
    assert report.examples == 3 and report.truncated == 1 and report.longest <= 200


def test_packing_keeps_examples_apart(tokenizer: Any, tiny_base: Path) -> None:
    """Packed examples get restarted position ids, and the model sees each one alone."""
    from transformers import AutoModelForCausalLM

    pairs = [Pair(f"page {i}", PAGE.replace("Fresh", "Fresh" * i)) for i in range(1, 5)]
    examples, _ = encode_pairs(tokenizer, pairs, 4096)
    packed = pack(examples, max_seq_len=2 * max(len(e) for e in examples))
    assert len(packed) < len(examples)
    assert sorted(e.target_tokens for e in examples) == sorted(
        t for row in packed for t in _targets_per_member(row)
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    collator = Collator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    batch = collator(packed)
    assert "attention_mask" not in batch and "position_ids" in batch
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        packed_logits = model(**inputs, use_cache=False).logits
        row = packed[0]
        starts = [i for i, p in enumerate(row.position_ids or []) if p == 0]
        second = starts[1]
        alone = model(input_ids=torch.tensor([row.input_ids[second:]])).logits
    torch.testing.assert_close(packed_logits[0, second : len(row)], alone[0], atol=1e-4, rtol=1e-4)


def _targets_per_member(row: Any) -> list[int]:
    starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row)]
    return [
        sum(1 for label in row.labels[a:b] if label != IGNORE_INDEX)
        for a, b in itertools.pairwise(starts)
    ]


def test_empty_batch_is_an_error() -> None:
    with pytest.raises(ValueError):
        Collator(0)([])
