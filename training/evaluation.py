"""Evaluation: token-level eval loss / perplexity, and page quality of generated pages.

The page measures (complete-document, truncation and repetition rates) come from
:func:`model.page.summarize_pages`, generated through :class:`model.engine.Engine`: the same
code path the bot serves with, so "after training" numbers mean what users will see.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from model.types import GenerationRequest, GenerationResult, PageMode
from training.data import Pair
from training.tokenization import IGNORE_INDEX

log = logging.getLogger(__name__)

# The headline measures (label, metrics key), before and after training: the log line after
# each evaluation and the model card's table show these.
HEADLINE_MEASURES = (
    ("eval loss", "eval_loss"),
    ("perplexity", "perplexity"),
    ("complete-document rate", "complete_document_rate"),
    ("truncation rate", "truncation_rate"),
    ("repetition rate", "repetition_rate"),
)


@torch.no_grad()
def eval_loss(
    model: Any, batches: Iterable[dict[str, torch.Tensor]], accelerator: Any
) -> dict[str, float]:
    """Mean loss per target token over all eval batches (all processes), and perplexity."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        outputs = model(**batch, use_cache=False)
        # HF's loss is the mean over this batch's shifted target tokens; weight it by their
        # count so the result is a per-token mean over the whole eval set.
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        total[0] += outputs.loss.double() * targets
        total[1] += targets
    total = accelerator.reduce(total, reduction="sum")
    if was_training:
        model.train()
    if total[1] == 0:
        return {"eval_loss": float("nan"), "perplexity": float("nan"), "eval_tokens": 0}
    loss = float(total[0] / total[1])
    return {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "eval_tokens": int(total[1]),
    }


def generation_metrics(
    loaded: Any,
    pairs: Sequence[Pair],
    *,
    max_new_tokens: int,
    style: str | None = None,
    seed: int = 0,
    modes: Sequence[PageMode] = (PageMode.DOCUMENT,),
) -> dict[str, Any]:
    """Generate a page for each eval description in each of ``modes`` and summarise them.

    ``loaded`` is a :class:`model.loading.LoadedModel` whose model may be a PeftModel in
    training. Decoding is greedy so before/after numbers are comparable. The top-level
    measures are over every page generated; with several modes, ``by_mode`` holds each
    mode's own.
    """
    if not pairs or not modes:
        return {}
    from model.engine import Engine
    from model.types import GenerationRequest, SamplingParams

    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
    requests = [
        GenerationRequest(prompt=pair.description, style=style, mode=mode, sampling=sampling)
        for mode in modes
        for pair in pairs
    ]
    model = loaded.model
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", True)
    model.eval()
    model.config.use_cache = True
    try:
        results = Engine(loaded).generate(requests)
    finally:
        model.config.use_cache = use_cache
        if was_training:
            model.train()
    summary = _summarize(requests, results, style)
    if len(modes) > 1:
        summary["by_mode"] = {
            mode.value: _summarize(
                [r for r in requests if r.mode is mode],
                [res for r, res in zip(requests, results, strict=True) if r.mode is mode],
                style,
            )
            for mode in modes
        }
    return summary


def _summarize(
    requests: Sequence[GenerationRequest], results: Sequence[GenerationResult], style: str | None
) -> dict[str, Any]:
    """Page measures of these results, built into pages as the bot builds them."""
    from model.errors import HtmlExtractionError
    from model.page import page_from_result, summarize_pages

    pages = []
    unusable = 0
    for request, result in zip(requests, results, strict=True):
        try:
            pages.append(
                page_from_result(result, prompt=request.prompt, mode=request.mode, style=style)
            )
        except HtmlExtractionError:
            unusable += 1
    # Rates over the pages that could be built; outputs with nothing page-like are counted
    # apart (and as incomplete in complete_rate_all_prompts).
    summary: dict[str, Any] = dict(summarize_pages(pages))
    complete = sum(1 for page in pages if page.complete)
    summary.update(
        {
            "prompts": len(requests),
            "unusable_outputs": unusable,
            # Over all prompts, counting unusable outputs as incomplete.
            "complete_rate_all_prompts": complete / len(requests),
            "mean_generated_tokens": sum(r.generated_tokens for r in results) / len(results),
        }
    )
    return summary
