"""What the compose form's grammar costs and saves: compile, mask+accept, jump-forward.

The measurements behind ``python -m bench.constrained`` (the default mode): for every
page kind's form grammar (``model.page.form.grammar_for(kind, SUBJECT)``) on a tokenizer,
each grammar library's compile time (cold, then the same grammar again), the mean cost of
one decode step's grammar work (fill the next-token mask, accept the token) over a filled
form, a few probes it must judge right, and, through the product's own
``model.constrained.GrammarConstraint``, the share of the answer's tokens that the grammar
forces (jump-forward: fed without being sampled).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from model.page.content import PageKind
from model.page.form import form_leads, grammar_for

__all__ = ["SUBJECT", "filled_form", "forced_share", "form_probes", "form_table", "measure_form"]

SUBJECT = "A bakery in Lyon"


def _value_for(lead: str) -> str:
    """A plausible value for the field asked by ``lead`` (what a good model would write)."""
    lowered = lead.lower()
    patterns = [
        ("send button", "Send message"),
        ("button", "Order now"),
        ("price", "$12.50"),
        ("value", "4.2k"),
        ("status", "OK"),
        ("time", "18:30"),
        ("years", "2019-2023"),
        ("question", "Do you bake gluten-free bread every day?"),
        ("comma-separated", "Fresh sourdough, warm croissants, local coffee"),
        ("two sentences", "We bake bread before dawn. Every loaf rests for a whole night."),
        ("paragraph", "Our ovens start at four. The first loaves leave the shop at seven."),
        ("sentence", "We bake fresh bread every morning with organic flour."),
        ("field", "Email address"),
    ]
    for key, value in patterns:
        if key in lowered:
            return value
    return "Sourdough Loaves"


def filled_form(kind: PageKind, subject: str = SUBJECT) -> str:
    """A complete answer for ``kind``: every lead-in followed by a plausible value."""
    return "".join(f"{lead} {_value_for(lead)}" for lead in form_leads(kind, subject)) + "\n"


def form_probes(kind: PageKind, subject: str = SUBJECT) -> dict[str, tuple[str, bool]]:
    """Answers for ``kind``'s form, each with whether the grammar must accept it."""
    whole = filled_form(kind, subject)
    lines = whole[:-1].split("\n")
    tagline = lines[0]
    return {
        "filled form": (whole, True),
        "a field left out": ("\n".join([lines[0], *lines[2:]]) + "\n", False),
        "markup in a value": (whole.replace(tagline, tagline[:-1] + " <b>now</b>."), False),
        "an extra line": ("\n".join([*lines, "Also: more bread."]) + "\n", False),
        "a 40-letter word": (whole.replace(tagline, tagline[:-1] + " " + "a" * 40 + "."), False),
        "lead-in changed": (whole.replace(lines[1][:12], lines[1][:12].upper(), 1), False),
    }


def forced_share(tokenizer: Any, kind: PageKind, text: str) -> tuple[int, int]:
    """(forced, sampled) tokens when an engine writes ``text`` under the product's
    constraint: forced tokens are what ``GrammarConstraint.forced_tokens`` feeds; each other
    token is the tokenizer's first token of what remains (what a model would sample)."""
    from model.constrained import GrammarConstraint

    constraint = GrammarConstraint(tokenizer, grammar_for(kind, SUBJECT), len(tokenizer))
    remaining = text
    forced = sampled = 0
    while remaining and not constraint.is_finished():
        tokens = constraint.forced_tokens()
        if tokens:
            piece = tokenizer.decode(tokens)
            if not remaining.startswith(piece):
                raise AssertionError(f"forced {piece!r} where the answer has {remaining[:40]!r}")
            remaining = remaining[len(piece) :]
            forced += len(tokens)
            continue
        token = tokenizer(remaining, add_special_tokens=False)["input_ids"][0]
        if not constraint.accept(token):
            raise AssertionError(f"the grammar refused {tokenizer.decode([token])!r}")
        remaining = remaining[len(tokenizer.decode([token])) :]
        sampled += 1
    if remaining or not constraint.is_finished():
        raise AssertionError(f"the form did not end where the answer does: {remaining!r}")
    return forced, sampled


def step_costs_us(library: Any, compiled: Any, text: str) -> list[float]:
    """Microseconds of each decode step's grammar work (mask + accept) over ``text``."""
    tokens = library.tokenizer(text, add_special_tokens=False)["input_ids"]
    matcher = library.matcher(compiled)
    mask = library.new_mask()
    costs = []
    for token in tokens:
        began = time.perf_counter()
        library.step(matcher, mask, token)
        costs.append((time.perf_counter() - began) * 1e6)
    return costs


def _timed_ms(call: Any) -> tuple[Any, float]:
    began = time.perf_counter()
    result = call()
    return result, (time.perf_counter() - began) * 1000


def measure_form(library: Any, kind: PageKind, tokenizer: Any) -> dict[str, Any]:
    """One row: ``library`` (a ``bench.constrained.Library``) on ``kind``'s form grammar."""
    from bench.constrained import accepts

    grammar = grammar_for(kind, SUBJECT)
    compiled, cold_ms = _timed_ms(lambda: library.compile_form(grammar))
    _, cached_ms = _timed_ms(lambda: library.compile_form(grammar))
    cases = form_probes(kind)
    wrong = [
        name for name, (text, valid) in cases.items() if accepts(library, compiled, text) != valid
    ]
    row: dict[str, Any] = {
        "library": library.name,
        "kind": kind.value,
        "cold_ms": cold_ms,
        "cached_ms": cached_ms,
        **_spread(step_costs_us(library, compiled, filled_form(kind))),
        "probes": len(cases),
        "wrong": wrong,
    }
    if library.name == "xgrammar":  # the product's constraint: its jump-forward
        forced, sampled = forced_share(tokenizer, kind, filled_form(kind))
        row.update(forced=forced, sampled=sampled)
    return row


def _spread(costs: list[float]) -> dict[str, float]:
    ordered = sorted(costs)
    return {
        "step_us": statistics.fmean(costs),
        "step_median_us": statistics.median(costs),
        "step_p90_us": ordered[int(0.9 * (len(ordered) - 1))],
        "step_max_us": ordered[-1],
    }


def form_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| library | kind | compile cold | again | mask+accept: mean | median | p90 | max "
        "| probes wrong | answer tokens | forced | decode steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        wrong = ", ".join(row["wrong"]) or f"none of {row['probes']}"
        jump = "| | |"
        if "forced" in row:
            total = row["forced"] + row["sampled"]
            jump = f"| {total} | {row['forced'] / total:.0%} | {row['sampled']} |"
        lines.append(
            f"| {row['library']} | {row['kind']} | {row['cold_ms']:.1f} ms "
            f"| {row['cached_ms']:.3f} ms | {row['step_us']:.0f} us "
            f"| {row['step_median_us']:.0f} us | {row['step_p90_us']:.0f} us "
            f"| {row['step_max_us'] / 1000:.1f} ms | {wrong} {jump}"
        )
    return "\n".join(lines)
