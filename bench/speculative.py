"""Speculative refine: prompt-lookup drafts against plain decoding, side by side.

Two measurements, one run:

1. **Refines on a real model** (the embedded SmolLM2-135M-Instruct: real weights, so real
   copying): document-mode refines of real pages (the product's own compose pages for each
   page kind, rendered in a theme) with a range of instructions, served by one
   :class:`~model.fast.FastEngine` at 1 and N users, first with ``speculation="off"``, then
   ``"refine"``, with the same seeds. Reported: generated tokens/s for both and their ratio,
   the drafts' acceptance rate, tokens per verify step, and how many answers are identical
   (exact in float32, see tests/model/test_speculative.py; in bf16 on a GPU a near-tie can
   round the other way in a batched forward).
2. **Step costs at CodeLlama-7B's shape** (random weights, GPU): one captured decode step
   against one captured verify step of ``1 + draft`` tokens a row, at 1, 8 and 16 rows. With
   the tokens per verify step of (1), this gives what the same refines would run at on the
   7B model, labelled as a projection: the 7B model is not on the device, and its own
   acceptance rate will differ from the small model's.

    python -m bench.speculative --device cuda --json out/speculative.json
    python -m bench.speculative --device cpu --users 1 --jobs 2 --new-tokens 256   # a CPU look
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from model.fast.speculative import DEFAULT_MAX_NGRAM, DEFAULT_MIN_NGRAM

INSTRUCTIONS = [
    "Make the main heading say 'Welcome' instead.",
    "Change the footer text to thank the visitor.",
    "Add one more item at the end of the first list.",
    "Make the page's tone friendlier, keeping its layout.",
    "Replace the first paragraph with a shorter one.",
    "Change the button's text to 'Book now'.",
    "Add a short testimonial section before the footer.",
    "Fix any typos and keep everything else the same.",
]
THEMES = ["modern", "dark", "playful", "minimal"]


def long_content(kind: Any) -> dict[str, Any]:
    """The hand-written content of ``kind`` grown to the sections a page may hold (five),
    taken from the other kinds' sections: a page of about twice the tokens, the size of
    a page the 7B model writes (1,000-2,000 tokens), where a refine copies the most."""
    from model.page.content import EXAMPLES, PageContent

    content = dict(EXAMPLES[kind])
    sections = list(content.get("sections", []))
    pool = [s for k, c in EXAMPLES.items() if k != kind for s in c.get("sections", [])]
    limit = PageContent.model_fields["sections"].metadata[0].max_length
    for section in pool:
        if len(sections) >= limit:
            break
        if section["heading"] not in {s["heading"] for s in sections}:
            sections.append(section)
    content["sections"] = sections
    return content


def refine_requests(
    count: int, new_tokens: int, seed: int = 0, long_pages: bool = True
) -> list[Any]:
    """``count`` document-mode refines of the product's own pages (one per page kind, in
    turn, rendered in a theme; grown to five sections with ``long_pages``), with seeded
    product sampling."""
    from model.page import page_from_result
    from model.page.content import EXAMPLES, PageContent, page_subject
    from model.page.form import answer_text
    from model.page.theming import render_content
    from model.types import (
        FinishReason,
        GenerationRequest,
        GenerationResult,
        PageMode,
        SamplingParams,
    )

    kinds = list(EXAMPLES)
    requests = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        description = f"a {kind.value} page for a small business"
        theme = THEMES[i % len(THEMES)]
        if long_pages:
            # The compose form has two sections' slots, so these pages go straight to the
            # templates (the form would drop the other three).
            content = PageContent.model_validate(long_content(kind))
            html = render_content(content, theme=theme, description=description)
        else:
            content = PageContent.model_validate(EXAMPLES[kind])
            answer = answer_text(content, kind, page_subject(description))
            result = GenerationResult("source", answer, FinishReason.EOS, 0, 0, 0.0, 0.0)
            html = page_from_result(
                result, prompt=description, mode=PageMode.COMPOSE, style=theme
            ).html
        requests.append(
            GenerationRequest(
                prompt=INSTRUCTIONS[i % len(INSTRUCTIONS)],
                source_page=html,
                description=description,
                sampling=SamplingParams(max_new_tokens=new_tokens, seed=seed + i),
                request_id=f"refine-{i}",
            )
        )
    return requests


def copy_request(request: Any) -> Any:
    """The same request under a fresh id and cancel event (a request is served once)."""
    return dataclasses.replace(request, cancel_event=type(request.cancel_event)())


@contextlib.contextmanager
def wrapped(obj: Any, name: str, hook: Callable[..., Any]) -> Iterator[None]:
    """``obj.name(*args)`` runs as ``hook(original, *args)`` inside the block (this instance
    only: the attribute is removed again after, so the class's method shows through)."""
    original = getattr(obj, name)
    setattr(obj, name, lambda *args: hook(original, *args))
    try:
        yield
    finally:
        delattr(obj, name)


def serve_phase(
    engine: Any,
    requests: list[Any],
    users: int,
    speculation: str,
    min_ngram: int = DEFAULT_MIN_NGRAM,
) -> dict[str, Any]:
    """Serve ``requests`` ``users`` at a time (all of a batch at once), speculation set.
    Each answer's prompt and token ids are kept too (``"answers"``), for :func:`replay`."""
    engine.options = dataclasses.replace(
        engine.options, speculation=speculation, draft_min_ngram=min_ngram
    )
    before = dataclasses.replace(engine.speculation_stats)
    texts: list[str] = []
    jobs: list[tuple[int, float]] = []  # (tokens, seconds decoding) per request, in order
    tokens = 0
    waits = 0.0  # each batch's wait for its last first token: prefill, not decoding
    runner = engine.runner
    spent = {"verify": 0.0}  # wall time inside the runner's verify step: GPU, copies, sync
    counts = {"launch": 0}  # steps with no draft in any row: plain decoding in the phase
    answers: list[dict[str, list[int]]] = []  # in the order the jobs finish, batch by batch

    def timed(call: Any, *args: Any) -> Any:
        began = time.perf_counter()
        try:
            return call(*args)
        finally:
            spent["verify"] += time.perf_counter() - began

    def counted(call: Any, *args: Any) -> Any:
        counts["launch"] += 1
        return call(*args)

    def kept(call: Any, seq: Any, reason: Any) -> Any:
        answers.append({"prompt": list(seq.prompt), "answer": list(seq.generated)})
        return call(seq, reason)

    started = time.perf_counter()
    with (
        wrapped(runner, "verify", timed),
        wrapped(runner, "launch", counted),
        wrapped(engine, "_result", kept),
    ):
        for first in range(0, len(requests), users):
            batch = [copy_request(r) for r in requests[first : first + users]]
            results = engine.generate(batch)
            texts += [r.text for r in results]
            # Each job's own decoding: its tokens after the first, over its time after it.
            jobs += [(r.generated_tokens, r.total_s - r.time_to_first_token_s) for r in results]
            tokens += sum(r.generated_tokens for r in results)
            waits += max(r.time_to_first_token_s for r in results)
    seconds = time.perf_counter() - started
    stats = engine.speculation_stats
    drafted = stats.drafted - before.drafted
    accepted = stats.accepted - before.accepted
    steps = stats.steps - before.steps
    rows = stats.rows - before.rows
    return {
        "users": users,
        "speculation": speculation,
        "jobs": len(requests),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "decode_tokens_per_s": tokens / max(seconds - waits, 1e-9),
        "drafted": drafted,
        "accepted": accepted,
        "acceptance": accepted / drafted if drafted else 0.0,
        "verify_steps": steps,
        "plain_steps": counts["launch"],
        "tokens_per_verify_step": (stats.tokens - before.tokens) / rows if rows else 0.0,
        # Where a verify step's time goes: inside the runner's call, and the whole loop's
        # decoding time per verify step (the difference is the host's drafting, stop rule
        # and bookkeeping, which a verify step cannot overlap, plus any plain steps).
        "verify_call_ms": 1000 * spent["verify"] / steps if steps else 0.0,
        "loop_ms_per_verify_step": 1000 * (seconds - waits) / steps if steps else 0.0,
        "texts": texts,
        "answers": answers,
        "per_job": jobs,
    }


def refine_table(
    device: str,
    users: list[int],
    jobs: int,
    new_tokens: int,
    draft_tokens: int,
    dtype: str,
    long_pages: bool = True,
    min_ngrams: tuple[int, ...] = (DEFAULT_MIN_NGRAM,),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Section (1): plain and speculative phases on the embedded model, per user count (a
    speculative phase for each shortest n-gram in ``min_ngrams``); on a GPU also the same
    model's decode and verify step costs (graph replays, no host)."""
    from model.fast import FastEngine, FastEngineOptions
    from model.loading import load_model
    from model.prompting import page_body
    from model.spec import resolve_spec

    loaded = load_model(resolve_spec(preset="smollm2", device=device, dtype=dtype))
    options = FastEngineOptions(
        max_seq_len=4096,
        max_slots=max(users),
        draft_tokens=draft_tokens,
        speculative_rows=max(users),
    )
    engine = FastEngine.from_loaded(loaded, options)
    if device == "cuda":
        engine.warmup(max(users))
    rows = []
    for count in users:
        requests = refine_requests(max(jobs, count), new_tokens, long_pages=long_pages)
        serve_phase(engine, requests[:count], count, "refine")  # first-use costs paid
        plain = serve_phase(engine, requests, count, "off")
        tokenizer = engine.tokenizer
        prompt_tokens = [len(tokenizer(page_body(r.source_page))["input_ids"]) for r in requests]
        for min_ngram in min_ngrams:
            fast = serve_phase(engine, requests, count, "refine", min_ngram)
            rows.append(refine_row(count, requests, prompt_tokens, plain, fast, min_ngram))
            print(fmt_refine(rows[-1]), flush=True)
    steps: list[dict[str, Any]] = []
    if device == "cuda":
        print("\nThe same model's steps alone (graph replays, context 2,048):\n")
        print(STEP_HEADER, flush=True)
        steps = step_costs(engine, sorted(set(users)), 2048)
    return rows, steps


# The refines the 2x target is about are 1,000-2,000 tokens long.
LONG_ANSWER = 1000


def job_speed(jobs: list[tuple[int, float]], picked: list[int]) -> float:
    """Tokens over decoding seconds of the ``picked`` jobs together (0 when none)."""
    seconds = sum(jobs[i][1] for i in picked)
    return sum(jobs[i][0] for i in picked) / seconds if seconds > 0 else 0.0


def refine_row(
    users: int,
    requests: list[Any],
    prompt_tokens: list[int],
    plain: dict[str, Any],
    fast: dict[str, Any],
    min_ngram: int,
) -> dict[str, Any]:
    """One row of section (1): a speculative phase against the plain one."""
    same = sum(a == b for a, b in zip(plain["texts"], fast["texts"], strict=True))
    long_jobs = [i for i, (count, _) in enumerate(plain["per_job"]) if count >= LONG_ANSWER]
    return {
        "users": users,
        "min_ngram": min_ngram,
        "jobs": len(requests),
        "page_tokens_mean": statistics.mean(prompt_tokens),
        "answer_tokens_mean": fast["tokens"] / len(requests),
        "plain_tokens_per_s": plain["tokens_per_s"],
        "speculative_tokens_per_s": fast["tokens_per_s"],
        "speedup": fast["tokens_per_s"] / plain["tokens_per_s"],
        "plain_decode_tokens_per_s": plain["decode_tokens_per_s"],
        "speculative_decode_tokens_per_s": fast["decode_tokens_per_s"],
        "decode_speedup": fast["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
        "acceptance": fast["acceptance"],
        "tokens_per_verify_step": fast["tokens_per_verify_step"],
        "identical_answers": same,
        # The refines, 1,000-2,000 tokens: the jobs whose plain answer is that long
        # (the same jobs in both phases), each job's own decode tokens/s, summed over them.
        "long_jobs": len(long_jobs),
        "long_plain_tokens_per_s": job_speed(plain["per_job"], long_jobs),
        "long_speculative_tokens_per_s": job_speed(fast["per_job"], long_jobs),
        "verify_call_ms": fast["verify_call_ms"],
        "loop_ms_per_verify_step": fast["loop_ms_per_verify_step"],
        # Step counts, for the projection: plain decoding's steps, and the
        # speculative phase's verify steps and the plain steps between them (no row
        # had a draft).
        "plain_phase_steps": plain["plain_steps"],
        "verify_steps": fast["verify_steps"],
        "plain_steps_between": fast["plain_steps"],
        "answers": plain["answers"],
    }


def step_costs(engine: Any, batches: list[int], context: int) -> list[dict[str, Any]]:
    """One captured decode step against one captured verify step of ``engine`` (drafts of
    ``engine``'s ``draft_tokens``), at each row count in ``batches``, the context at
    ``context``: median GPU times of graph replays, positions rewound before each."""
    import torch

    from bench.serving import _median_ms

    runner = engine.runner
    cache = runner.cache
    draft_tokens = cache.draft_tokens
    keys = context - draft_tokens - 64
    rows = []
    for b in batches:
        positions = torch.full((b,), keys, dtype=torch.int64, device=cache.positions.device)

        def rewind(b: int = b, positions: Any = positions) -> None:
            cache.positions[:b] = positions

        rewind()
        runner.decode(b, context)
        decode_graph = runner.graphs.captured[
            (runner.graphs.batch_bucket(b), runner.graphs.context_bucket(context))
        ]
        decode_ms = _median_ms(decode_graph.replay, 30, prepare=rewind)
        rewind()
        runner.verify([[5] * draft_tokens] * b, context)
        verify_graphs = runner.verify_graphs
        assert verify_graphs is not None
        verify_graph = verify_graphs.captured[
            (verify_graphs.batch_bucket(b), verify_graphs.context_bucket(context))
        ]
        verify_ms = _median_ms(verify_graph.replay, 30, prepare=rewind)
        rows.append(
            {
                "batch": b,
                "context": context,
                "decode_ms": decode_ms,
                "verify_ms": verify_ms,
                "verify_over_decode": verify_ms / decode_ms,
            }
        )
        print(fmt_step(rows[-1]), flush=True)
    return rows


def step_table(draft_tokens: int, batches: list[int], context: int) -> list[dict[str, Any]]:
    """Section (2): captured decode vs verify step at CodeLlama-7B's shape (random bf16)."""
    import torch

    from bench.serving import CODELLAMA_7B, build_base, build_tokenizer
    from model.fast import FastEngine, FastEngineOptions

    model = build_base(CODELLAMA_7B, torch.device("cuda"), torch.bfloat16)
    tokenizer = build_tokenizer(CODELLAMA_7B["vocab_size"])
    options = FastEngineOptions(
        max_seq_len=context,
        max_slots=max(batches),
        draft_tokens=draft_tokens,
        speculative_rows=max(batches),
        speculation="all",
    )
    engine = FastEngine(model, tokenizer, model_name="codellama-7b-shape", options=options)
    rows = step_costs(engine, batches, context)
    del engine, model
    return rows


def replay(
    answers: list[dict[str, list[int]]],
    users: int,
    draft_tokens: int,
    max_ngram: int = DEFAULT_MAX_NGRAM,
    min_ngram: int = DEFAULT_MIN_NGRAM,
) -> dict[str, Any]:
    """The steps the engine's speculative loop would take for answers already written.

    Verification keeps exactly the tokens plain decoding writes, so an answer's tokens fix
    what each draft keeps: its longest prefix that the answer goes on with. This runs the
    loop without a model, ``users`` rows in lockstep as the engine batches them (a verify
    step when any row has a draft, rows without one taking a single token; a plain step
    when none has), each row's first token from its prefill. Drafting settings can be
    compared offline on a GPU run's answers (``--answers``, then ``--replay``).
    """
    from model.fast.speculative import PromptLookup

    verify_steps = plain_steps = drafted = accepted = tokens = without_drafts = 0
    for first in range(0, len(answers), users):
        rows = answers[first : first + users]
        without_drafts += max(len(row["answer"]) for row in rows) - 1
        drafters = [
            PromptLookup(row["prompt"], max_ngram=max_ngram, min_ngram=min_ngram) for row in rows
        ]
        written = [min(1, len(row["answer"])) for row in rows]  # the prefill's token
        while True:
            live = [i for i, row in enumerate(rows) if written[i] < len(row["answer"])]
            if not live:
                break
            drafts = {}
            for i in live:
                answer = rows[i]["answer"]
                drafters[i].update(answer[: written[i]])
                drafts[i] = drafters[i].propose(draft_tokens)
            if not any(drafts.values()):
                plain_steps += 1
                for i in live:
                    written[i] += 1
                continue
            verify_steps += 1
            for i in live:
                answer, draft, at = rows[i]["answer"], drafts[i], written[i]
                # The step's last token is the model's own, as the engine's budget keeps it.
                limit = min(len(draft), len(answer) - at - 1)
                kept = 0
                while kept < limit and draft[kept] == answer[at + kept]:
                    kept += 1
                drafted += len(draft)
                accepted += kept
                written[i] = at + kept + 1
        tokens += sum(len(row["answer"]) for row in rows)
    return {
        "users": users,
        "draft_tokens": draft_tokens,
        "max_ngram": max_ngram,
        "min_ngram": min_ngram,
        "tokens": tokens,
        "verify_steps": verify_steps,
        "plain_steps": plain_steps,
        "acceptance": accepted / drafted if drafted else 0.0,
        "steps_without_drafts": without_drafts,
    }


# The drafting settings --replay compares: (draft tokens, longest n-gram, shortest n-gram).
REPLAY_SETTINGS = [(8, 4, 2), (8, 4, 1), (8, 6, 3), (16, 4, 2), (16, 4, 1), (4, 4, 2)]


def replay_table(tables: dict[str, Any]) -> list[str]:
    """Markdown rows: each of :data:`REPLAY_SETTINGS` replayed on a run's answers; the
    speed-up uses that run's 7B-shape verify / decode cost at 8 draft tokens (so for other
    draft lengths it is a bound: longer drafts cost a little more per step)."""
    costs = {row["batch"]: row["verify_over_decode"] for row in tables.get("steps", [])}
    lines = [
        "| users | draft tokens | n-grams | drafts kept | verify steps | plain steps "
        "| steps without drafts | projected speed-up (7B step costs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for users_key, answers in sorted(tables["answers"].items(), key=lambda kv: int(kv[0])):
        users = int(users_key)
        cost = costs.get(users)
        for draft_tokens, max_ngram, min_ngram in REPLAY_SETTINGS:
            row = replay(answers, users, draft_tokens, max_ngram, min_ngram)
            speedup = "-"
            if cost is not None:
                spent = row["verify_steps"] * cost + row["plain_steps"]
                speedup = f"{row['steps_without_drafts'] / spent:.2f}x"
            lines.append(
                f"| {users} | {draft_tokens} | {max_ngram}..{min_ngram} | "
                f"{row['acceptance']:.0%} | {row['verify_steps']} | {row['plain_steps']} | "
                f"{row['steps_without_drafts']} | {speedup} |"
            )
    return lines


def fmt_refine(row: dict[str, Any]) -> str:
    return (
        f"| {row['users']} | {row['min_ngram']} | {row['jobs']} | {row['page_tokens_mean']:.0f} | "
        f"{row['answer_tokens_mean']:.0f} | {row['plain_tokens_per_s']:.0f} | "
        f"{row['speculative_tokens_per_s']:.0f} | **{row['speedup']:.2f}x** | "
        f"{row['plain_decode_tokens_per_s']:.0f} | {row['speculative_decode_tokens_per_s']:.0f} | "
        f"**{row['decode_speedup']:.2f}x** | "
        f"{row['acceptance']:.0%} | {row['tokens_per_verify_step']:.2f} | "
        f"{row['identical_answers']}/{row['jobs']} | {row['verify_call_ms']:.2f} | "
        f"{row['loop_ms_per_verify_step']:.2f} | {row['long_jobs']} | "
        f"{row['long_plain_tokens_per_s']:.0f} | {row['long_speculative_tokens_per_s']:.0f} | "
        f"**{ratio(row['long_speculative_tokens_per_s'], row['long_plain_tokens_per_s'])}** |"
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def fmt_step(row: dict[str, Any]) -> str:
    return (
        f"| {row['batch']} | {row['context']} | {row['decode_ms']:.2f} | "
        f"{row['verify_ms']:.2f} | {row['verify_over_decode']:.2f} |"
    )


REFINE_HEADER = (
    "| users | shortest n-gram | jobs | page tokens | answer tokens | plain tok/s "
    "| speculative tok/s | speed-up "
    "| plain decode tok/s | speculative decode tok/s | decode speed-up "
    "| drafts kept | tokens / row / verify step | identical answers "
    "| verify call ms | loop ms / verify step | jobs of 1,000+ tokens "
    "| their plain tok/s per job | their speculative tok/s per job | their speed-up |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
STEP_HEADER = (
    "| rows | context | decode step ms | verify step ms | verify / decode |\n|---|---|---|---|---|"
)


def projection(refines: list[dict[str, Any]], steps: list[dict[str, Any]]) -> list[str]:
    """What the refines' steps would take at the 7B shape's step costs: plain decoding's
    steps against the speculative phase's verify steps (each ``verify / decode`` of a decode
    step) plus its plain steps. Host time and prefill are left out."""
    lines = []
    by_batch = {row["batch"]: row for row in steps}
    for row in refines:
        step = by_batch.get(row["users"])
        if step is None or not row["verify_steps"]:
            continue
        cost = step["verify_over_decode"]
        speculative = row["verify_steps"] * cost + row["plain_steps_between"]
        ratio = row["plain_phase_steps"] / speculative
        lines.append(
            f"- {row['users']} user(s): {row['plain_phase_steps']} plain steps against "
            f"{row['verify_steps']} verify steps at {cost:.2f}x a decode step's time plus "
            f"{row['plain_steps_between']} plain ones: **{ratio:.2f}x** plain decoding's "
            "tokens/s (projected)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--users", default="1,8", help="comma-separated user counts")
    parser.add_argument("--jobs", type=int, default=8, help="refine jobs per phase")
    parser.add_argument("--new-tokens", type=int, default=2048, help="answer budget")
    parser.add_argument("--draft-tokens", type=int, default=8)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="refines' model dtype")
    parser.add_argument("--context", type=int, default=2048, help="step-cost context")
    parser.add_argument("--skip-steps", action="store_true", help="skip the 7B-shape steps")
    parser.add_argument("--skip-refines", action="store_true", help="skip the real refines")
    parser.add_argument(
        "--short-pages",
        action="store_true",
        help="the hand-written pages as they are (~700 tokens) instead of grown to five "
        "sections (~1,100)",
    )
    parser.add_argument("--json", type=Path, help="write the tables here too")
    parser.add_argument(
        "--min-ngrams",
        default=str(DEFAULT_MIN_NGRAM),
        help="comma-separated shortest n-grams to draft with, a speculative phase each",
    )
    parser.add_argument(
        "--replay",
        type=Path,
        help="no model: replay drafting settings on the answers a --json run saved",
    )
    args = parser.parse_args(argv)
    if args.replay:
        print("\n".join(replay_table(json.loads(args.replay.read_text()))))
        return 0
    users = [int(u) for u in args.users.split(",")]

    refines: list[dict[str, Any]] = []
    small_steps: list[dict[str, Any]] = []
    if not args.skip_refines:
        print("## Refines on the embedded SmolLM2-135M-Instruct\n")
        print(REFINE_HEADER, flush=True)
        dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
        print(f"({dtype}, draft of {args.draft_tokens} tokens)\n")
        refines, small_steps = refine_table(
            args.device,
            users,
            args.jobs,
            args.new_tokens,
            args.draft_tokens,
            dtype,
            long_pages=not args.short_pages,
            min_ngrams=tuple(int(n) for n in args.min_ngrams.split(",")),
        )
    steps: list[dict[str, Any]] = []
    if args.device == "cuda" and not args.skip_steps:
        print("\n## Step costs at CodeLlama-7B's shape (random bf16 weights)\n")
        print(STEP_HEADER, flush=True)
        steps = step_table(args.draft_tokens, sorted({1, *users, 16}), args.context)
        print()
        print("\n".join(projection(refines, steps)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        answers = {str(row["users"]): row.pop("answers") for row in refines}
        tables = {
            "refines": refines,
            "small_model_steps": small_steps,
            "steps": steps,
            "answers": answers,
        }
        args.json.write_text(json.dumps(tables, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
