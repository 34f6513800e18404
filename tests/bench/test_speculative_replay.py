"""bench.speculative.replay: the engine's speculative loop run over answers already written."""

from __future__ import annotations

from bench.speculative import replay

PROMPT = [*range(1, 41), 99]  # tokens 1..40, then one the answers never use


def test_a_copy_is_drafted_whole_after_one_plain_step() -> None:
    # Prefill writes 7; (99, 7) is not in the prompt, so one plain step writes 8; then
    # (7, 8) is found and every draft is kept: 9 tokens a verify step (8 drafted + 1).
    answer = list(range(7, 41))  # 34 tokens
    row = replay([{"prompt": PROMPT, "answer": answer}], users=1, draft_tokens=8, min_ngram=2)
    assert row["plain_steps"] == 1
    # 32 tokens left after two: three steps of 9, then 5 (4 kept, the model's own last).
    assert row["verify_steps"] == 4
    assert row["acceptance"] == (8 + 8 + 8 + 4) / 32
    assert row["steps_without_drafts"] == 33
    assert row["tokens"] == 34


def test_an_answer_with_nothing_to_copy_takes_plain_steps_only() -> None:
    answer = [500 + i for i in range(20)]
    row = replay([{"prompt": PROMPT, "answer": answer}], users=1, draft_tokens=8, min_ngram=2)
    assert row["verify_steps"] == 0
    assert row["plain_steps"] == 19
    assert row["acceptance"] == 0.0


def test_a_wrong_draft_still_gives_one_token() -> None:
    # After (7, 8) the prompt goes on with 9, the answer with 600: nothing kept, one token.
    answer = [7, 8, 600, 601]
    row = replay([{"prompt": PROMPT, "answer": answer}], users=1, draft_tokens=4, min_ngram=2)
    assert row["verify_steps"] == 1  # (7, 8) -> [9, 10, 11, 12], none kept; writes 600
    assert row["plain_steps"] == 2  # 8 (no draft yet), then 601 ((8, 600) is new)
    assert row["acceptance"] == 0.0


def test_rows_in_lockstep_verify_when_any_row_has_a_draft() -> None:
    copy = {"prompt": PROMPT, "answer": list(range(7, 41))}
    novel = {"prompt": PROMPT, "answer": [500 + i for i in range(20)]}
    together = replay([copy, novel], users=2, draft_tokens=8, min_ngram=2)
    alone = replay([copy], users=1, draft_tokens=8, min_ngram=2)
    # The novel row rides along in the copy's verify steps, and takes plain steps with it
    # only when neither row has a draft; after the copy ends it goes on alone.
    assert together["verify_steps"] == alone["verify_steps"]
    assert together["steps_without_drafts"] == 33  # the longer answer's tokens after prefill
    assert together["plain_steps"] == alone["plain_steps"] + (19 - 1 - 4)
    assert together["tokens"] == 54
