"""The in-flight loop detector both engines use."""

import random

from model.stopping import MIN_LOOP_TOKENS, ends_in_loop, should_check


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
