"""Page quality: generate every benchmark prompt's page, render it in Chromium, judge it.

    python -m bench.quality [--mode compose|document|both] [--preset smollm2|codellama-html]
        [--base ..] [--adapter ..] [--limit N] [--style S] [--out DIR] [--json FILE] [--batch B]

The model is loaded through ``model.loading`` (the same flags as ``python -m model``) and run
by the standard batched engine (``model.engine.Engine``); each page is built by
``model.page.page_from_result`` (document mode falls back to ``model.page.build_page`` where
that is missing), written to ``--out/<mode>/<id>.html``, rendered with JavaScript on through
``bench.browser.render`` (a recording proxy sees every remote load) and screenshotted to
``<id>.png``. What is measured is in :mod:`bench.quality_measure`; the prompts are in
:mod:`bench.quality_prompts`.

It is resumable: each judged page leaves ``<id>.json`` next to its HTML, and a later run with
the same settings keeps those pages instead of generating them again (``--fresh`` starts
over). One line of progress is printed per page.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.quality_measure import (
    MEASURE_JS,
    REFERENCE_PAGE,
    PageFacts,
    judge,
    page_remote_loads,
)
from bench.quality_prompts import PROMPTS, QualityPrompt
from model.cli import _add_model_options, spec_from_args
from model.errors import HtmlExtractionError
from model.prompting import STYLE_HINTS
from model.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    PageMode,
    SafetyPolicy,
    SamplingParams,
)

log = logging.getLogger(__name__)

# A page with fewer rendered words than this is a failure that a flag should explain.
FEW_WORDS = 20


@dataclass(frozen=True)
class BuiltPage:
    """A page as ``model.page`` built it: the HTML, its warnings, the seconds it took."""

    html: str
    warnings: list[str]
    build_s: float


def build_page_for(
    result: GenerationResult, prompt: str, mode: PageMode, style: str | None, safety: SafetyPolicy
) -> BuiltPage:
    """The delivered page for ``result``, through the product's own page pipeline."""
    started = time.perf_counter()
    try:
        page = _product_page(result, prompt, mode, style, safety)
    except HtmlExtractionError as error:
        # The product answers with an error message instead of a page: nothing is shown,
        # and the user is told (so it counts as flagged).
        return BuiltPage("", [f"no_page: {error}"], time.perf_counter() - started)
    elapsed = time.perf_counter() - started
    html = page.html if hasattr(page, "html") else bytes(page.data).decode("utf-8")
    warnings = [getattr(w, "value", str(w)) for w in getattr(page, "warnings", ())]
    return BuiltPage(html, warnings, elapsed)


def _product_page(
    result: GenerationResult, prompt: str, mode: PageMode, style: str | None, safety: SafetyPolicy
) -> Any:
    import model.page as page_package

    page_from_result = getattr(page_package, "page_from_result", None)
    if page_from_result is not None:
        try:
            page = page_from_result(result, prompt=prompt, mode=mode, style=style, safety=safety)
        except NotImplementedError as error:  # a mode whose builder is not wired in yet
            raise SystemExit(f"{mode.value} mode: {error}") from None
    elif mode is PageMode.DOCUMENT:
        # What `python -m model generate` does before the page modes land.
        page = page_package.build_page(
            result.text, prompt=prompt, truncated=result.finish_reason == FinishReason.LENGTH
        )
    else:
        raise SystemExit("compose mode needs model.page.page_from_result, which is not there yet")
    return page


class Judge:
    """Renders pages in Chromium (JavaScript on, screenshot, :data:`MEASURE_JS`) and judges
    them against the same browser's defaults, measured once."""

    def __init__(self, chromium: str | None = None, timeout_s: float = 30.0) -> None:
        self.chromium = chromium
        self.timeout_s = timeout_s
        self._reference: PageFacts | None = None

    def _render(self, html: str) -> Any:
        from bench.browser import render

        return render(
            html,
            javascript=True,
            screenshot=True,
            measure_js=MEASURE_JS,
            timeout_s=self.timeout_s,
            chromium=self.chromium,
        )

    @property
    def reference(self) -> PageFacts:
        if self._reference is None:
            self._reference = PageFacts.from_measure(self._render(REFERENCE_PAGE).measure)
        return self._reference

    def measure(self, html: str, prompt: QualityPrompt) -> tuple[dict[str, Any], bytes | None]:
        """The verdicts (as JSON data) and the screenshot of one page."""
        from bench.browser import BrowserError

        try:
            run = self._render(html)
        except BrowserError as error:
            # A page that kills or hangs the browser is judged as blank, and says why.
            facts = PageFacts.empty()
            verdict = judge(html, facts, self.reference, prompt, None, []).to_json()
            verdict["browser_error"] = str(error)
            return verdict, None
        facts = PageFacts.from_measure(run.measure)
        page_urls = [request.url for request in run.remote_network()]
        urls = page_remote_loads([str(request) for request in run.requests], page_urls)
        verdict = judge(html, facts, self.reference, prompt, run.screenshot, urls).to_json()
        # Remote loads the browser stopped itself (the page's Content-Security-Policy).
        verdict["remote_blocked"] = sum(1 for r in run.remote_network() if r.blocked_reason)
        return verdict, run.screenshot


# ----------------------------------------------------------------------------- the run


def _settings(args: argparse.Namespace, mode: PageMode, model_name: str) -> dict[str, Any]:
    """What makes a saved page reusable by a later run (``--resume``)."""
    return {
        "model": model_name,
        "mode": mode.value,
        "style": args.style,
        "safety": args.safety,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
    }


def _record_path(out: Path, mode: PageMode, prompt: QualityPrompt) -> Path:
    return out / mode.value / f"{prompt.id}.json"


def _load_record(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("settings") == settings else None


def _requests(
    batch: Sequence[tuple[int, QualityPrompt]], mode: PageMode, args: argparse.Namespace
) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt.prompt,
            style=args.style,
            mode=mode,
            safety=SafetyPolicy(args.safety),
            sampling=SamplingParams(
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed + index,  # each prompt its own seed, the same every run
            ),
        )
        for index, prompt in batch
    ]


def _progress_line(done: int, total: int, record: dict[str, Any]) -> str:
    m = record["measure"]
    marks = [
        "complete" if m["complete"] else "INCOMPLETE",
        "styled" if m["styled"] else "unstyled",
        "BLANK" if m["blank"] else f"{m['words']} words",
        "on-topic" if m["on_topic"] else "off-topic",
        f"{m['sections']} sections"
        + (f" (missing {','.join(m['missing'])})" if m["missing"] else ""),
    ]
    if m["remote_loads"]:
        marks.append(f"{m['remote_loads']} remote loads")
    if record["warnings"]:
        marks.append("flags " + ",".join(record["warnings"]))
    return f"[{done}/{total}] {record['mode']} {record['id']}: {record['seconds']:.1f} s, " + (
        "; ".join(marks)
    )


def run_mode(
    engine: Any,
    judge_: Judge,
    mode: PageMode,
    prompts: Sequence[QualityPrompt],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Generate, build, render and judge every prompt in ``mode``; one record per page."""
    out: Path = args.out
    (out / mode.value).mkdir(parents=True, exist_ok=True)
    settings = _settings(args, mode, engine.model_name)
    records: dict[str, dict[str, Any]] = {}
    todo: list[tuple[int, QualityPrompt]] = []
    for index, prompt in enumerate(prompts):
        kept = None if args.fresh else _load_record(_record_path(out, mode, prompt), settings)
        if kept is not None:
            records[prompt.id] = kept
        else:
            todo.append((index, prompt))
    if records:
        print(f"{mode.value}: {len(records)} pages kept from an earlier run", file=sys.stderr)
    for start in range(0, len(todo), args.batch):
        batch = todo[start : start + args.batch]
        batch_started = time.perf_counter()
        results = engine.generate(_requests(batch, mode, args))
        batch_s = time.perf_counter() - batch_started
        for (_, prompt), result in zip(batch, results, strict=True):
            record = _page_record(judge_, mode, prompt, result, args, settings)
            record["batch_s_per_page"] = batch_s / len(batch) + record["build_s"]
            _record_path(out, mode, prompt).write_text(json.dumps(record, indent=1))
            records[prompt.id] = record
            print(_progress_line(len(records), len(prompts), record), file=sys.stderr, flush=True)
    return [records[prompt.id] for prompt in prompts]


def _page_record(
    judge_: Judge,
    mode: PageMode,
    prompt: QualityPrompt,
    result: GenerationResult,
    args: argparse.Namespace,
    settings: dict[str, Any],
) -> dict[str, Any]:
    built = build_page_for(result, prompt.prompt, mode, args.style, SafetyPolicy(args.safety))
    folder: Path = args.out / mode.value
    (folder / f"{prompt.id}.html").write_text(built.html, encoding="utf-8")
    verdict, png = judge_.measure(built.html, prompt)
    if png:
        (folder / f"{prompt.id}.png").write_bytes(png)
    return {
        "id": prompt.id,
        "prompt": prompt.prompt,
        "mode": mode.value,
        "settings": settings,
        "finish_reason": result.finish_reason.value,
        "generated_tokens": result.generated_tokens,
        "generate_s": result.total_s,
        "build_s": built.build_s,
        # The page's own time in its batch (its latency there), plus building it.
        "seconds": result.total_s + built.build_s,
        "warnings": built.warnings,
        "measure": verdict,
    }


# --------------------------------------------------------------------------- the tables


def _failed(record: dict[str, Any]) -> bool:
    m = record["measure"]
    return bool(m["blank"] or not m["complete"] or m["words"] < FEW_WORDS)


def _percent(records: Sequence[dict[str, Any]], test: Any) -> float:
    return 100.0 * sum(1 for r in records if test(r)) / len(records) if records else 0.0


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The totals of one mode's pages (the numbers the targets are about)."""
    seconds = [r["seconds"] for r in records]
    return {
        "pages": len(records),
        "complete_pct": _percent(records, lambda r: r["measure"]["complete"]),
        "styled_pct": _percent(records, lambda r: r["measure"]["styled"]),
        "blank": sum(1 for r in records if r["measure"]["blank"]),
        "on_topic_pct": _percent(records, lambda r: r["measure"]["on_topic"]),
        "sections3_pct": _percent(records, lambda r: r["measure"]["sections"] >= 3),
        "blocks_pct": _percent(records, lambda r: not r["measure"]["missing"]),
        "sections_ok_pct": _percent(
            records, lambda r: r["measure"]["sections"] >= 3 and not r["measure"]["missing"]
        ),
        "median_words": statistics.median(r["measure"]["words"] for r in records) if records else 0,
        "remote_loads": sum(r["measure"]["remote_loads"] for r in records),
        "flagged": sum(1 for r in records if r["warnings"]),
        "failures": sum(1 for r in records if _failed(r)),
        "unflagged_failures": sum(1 for r in records if _failed(r) and not r["warnings"]),
        "median_s": statistics.median(seconds) if seconds else 0.0,
        "p90_s": _quantile(seconds, 0.9),
    }


# (key, label, target test, target text) per mode; compose's are the issue's, on the
# embedded model on a 2-core CPU.
TARGETS: dict[PageMode, list[tuple[str, Any, str]]] = {
    PageMode.COMPOSE: [
        ("complete_pct", lambda v: v >= 100, "100%"),
        ("styled_pct", lambda v: v >= 100, "100%"),
        ("blank", lambda v: v == 0, "0"),
        ("on_topic_pct", lambda v: v >= 90, ">=90%"),
        ("sections_ok_pct", lambda v: v >= 90, ">=90%"),
        ("median_words", lambda v: v >= 80, ">=80"),
        ("remote_loads", lambda v: v == 0, "0"),
        ("median_s", lambda v: v <= 30, "<=30 s"),
    ],
    PageMode.DOCUMENT: [
        ("blank", lambda v: v == 0, "0"),
        ("unflagged_failures", lambda v: v == 0, "0"),
    ],
}


def targets_met(mode: PageMode, totals: dict[str, Any]) -> dict[str, bool]:
    """Each target of ``mode`` and whether ``totals`` meets it."""
    return {key: bool(test(totals[key])) for key, test, _ in TARGETS[mode]}


def _yes(value: bool) -> str:
    return "yes" if value else "NO"


def page_table(records: Sequence[dict[str, Any]]) -> str:
    """The per-page table (markdown)."""
    lines = [
        "| page | complete | styled | blank | heading | on-topic | sections | missing | words "
        "| remote | flags | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        m = r["measure"]
        heading = (m["heading"] or "").replace("|", "/").replace("\n", " ")[:40]
        lines.append(
            f"| {r['id']} | {_yes(m['complete'])} | {_yes(m['styled'])} | "
            f"{'BLANK' if m['blank'] else 'no'} | {heading} | {_yes(m['on_topic'])} | "
            f"{m['sections']} | {','.join(m['missing'])} | {m['words']} | {m['remote_loads']} | "
            f"{','.join(r['warnings'])} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


_TOTAL_LABELS = {
    "complete_pct": ("complete", "{:.0f}%"),
    "styled_pct": ("styled", "{:.0f}%"),
    "blank": ("blank", "{}"),
    "on_topic_pct": ("on-topic heading", "{:.0f}%"),
    "sections3_pct": (">=3 sections", "{:.0f}%"),
    "blocks_pct": ("asked-for blocks present", "{:.0f}%"),
    "sections_ok_pct": (">=3 sections and the blocks", "{:.0f}%"),
    "median_words": ("median visible words", "{:.0f}"),
    "remote_loads": ("remote loads", "{}"),
    "flagged": ("pages flagged", "{}"),
    "failures": ("failures (blank, incomplete or < 20 words)", "{}"),
    "unflagged_failures": ("failures without a flag", "{}"),
    "median_s": ("median s / page", "{:.1f}"),
    "p90_s": ("p90 s / page", "{:.1f}"),
}


def totals_table(mode: PageMode, totals: dict[str, Any]) -> str:
    """The totals of one mode next to its targets (markdown)."""
    targets = {key: text for key, _, text in TARGETS[mode]}
    met = targets_met(mode, totals)
    lines = [
        f"| {mode.value} ({totals['pages']} pages) | value | target | met |",
        "|---|---|---|---|",
    ]
    for key, (label, fmt) in _TOTAL_LABELS.items():
        target = targets.get(key, "")
        verdict = _yes(met[key]) if key in met else ""
        lines.append(f"| {label} | {fmt.format(totals[key])} | {target} | {verdict} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality", description="Page quality of the page modes."
    )
    parser.add_argument("--mode", choices=["compose", "document", "both"], default="both")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--only", help="comma-separated prompt ids")
    parser.add_argument("--style", choices=sorted(STYLE_HINTS), help="a visual style hint")
    parser.add_argument("--safety", choices=[p.value for p in SafetyPolicy], default="standard")
    parser.add_argument("--out", type=Path, default=Path("out/quality"), help="pages go here")
    parser.add_argument("--json", type=Path, help="write every record and the totals here")
    parser.add_argument("--batch", type=int, default=4, help="prompts per engine batch")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=SamplingParams.temperature)
    parser.add_argument("--seed", type=int, default=0, help="prompt i samples with seed+i")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--chromium", help="the Chromium binary (default: found on PATH)")
    parser.add_argument("--fresh", action="store_true", help="ignore pages of an earlier run")
    parser.add_argument("--no-pages", action="store_true", help="print the totals only")
    parser.add_argument("-v", "--verbose", action="store_true")
    _add_model_options(parser)
    return parser


def select_prompts(args: argparse.Namespace) -> list[QualityPrompt]:
    """The prompts of this run: ``--only`` ids, else all, cut to ``--limit``."""
    prompts = list(PROMPTS)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {p.id for p in prompts}
        if unknown:
            raise SystemExit(f"unknown prompt ids: {', '.join(sorted(unknown))}")
        prompts = [p for p in prompts if p.id in wanted]
    return prompts[: args.limit] if args.limit else prompts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.batch < 1:
        raise SystemExit("--batch must be at least 1")
    import torch

    from model.engine import Engine
    from model.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = select_prompts(args)
    modes = [PageMode.COMPOSE, PageMode.DOCUMENT] if args.mode == "both" else [PageMode(args.mode)]
    spec = spec_from_args(args)
    print(f"loading {spec.name} ...", file=sys.stderr)
    loaded = load_model(spec)
    engine = Engine(loaded)
    judge_ = Judge(args.chromium)
    report: dict[str, Any] = {"model": spec.describe(), "device": str(loaded.device), "modes": {}}
    for mode in modes:
        records = run_mode(engine, judge_, mode, prompts, args)
        totals = summarize(records)
        report["modes"][mode.value] = {
            "totals": totals,
            "targets_met": targets_met(mode, totals),
            "pages": records,
        }
        print(f"\n## {mode.value}: {spec.name} on {loaded.device}\n")
        if not args.no_pages:
            print(page_table(records) + "\n")
        print(totals_table(mode, totals))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
