"""``python -m model``: generate a page from the command line, or show the resolved setup."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from model.errors import ModelError
from model.prompting import STYLE_HINTS
from model.spec import PRESETS, ModelSpec, Quantization, resolve_spec
from model.types import PageMode, SafetyPolicy, SamplingParams

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named model setup (default: smollm2, the embedded offline model)",
    )
    group.add_argument("--base", help="base model: hub id or local folder (overrides the preset)")
    group.add_argument("--adapter", help="LoRA adapter: hub id or local folder; 'none' to drop it")
    group.add_argument("--base-revision", help="pin the base to a hub revision (commit or tag)")
    group.add_argument("--adapter-revision", help="pin the adapter to a hub revision")
    group.add_argument(
        "--quantize", choices=[q.value for q in Quantization], help="weight quantization (CUDA)"
    )
    group.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    group.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    group.add_argument(
        "--merge", choices=["auto", "yes", "no"], help="merge the adapter (auto: when unquantized)"
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="allow custom model code from the hub (off by default)",
    )


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    return resolve_spec(
        args.preset,
        base=args.base,
        adapter=args.adapter,
        quantization=args.quantize,
        base_revision=args.base_revision,
        adapter_revision=args.adapter_revision,
        dtype=args.dtype,
        device=args.device,
        merge_adapter=args.merge,
        trust_remote_code=args.trust_remote_code,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model", description="Generate web pages with the HTML model."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="show debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate", parents=[common], help="generate one page from a description"
    )
    generate.add_argument("prompt", help='what the page is, e.g. "a landing page for a bakery"')
    generate.add_argument(
        "-o", "--output", type=Path, help="where to write (default: out/<slug>.html)"
    )
    generate.add_argument(
        "--style", choices=sorted(STYLE_HINTS), help="the page's theme (default: modern)"
    )
    generate.add_argument(
        "--mode",
        choices=[mode.value for mode in PageMode],
        help="compose: the model writes the content, the theme's templates the page; "
        "document: the model writes the whole page (default: the preset's; smollm2: compose)",
    )
    generate.add_argument(
        "--safety",
        choices=[policy.value for policy in SafetyPolicy],
        default=SafetyPolicy.STANDARD.value,
        help="standard: inline scripts kept, remote loads and form posts blocked (CSP); "
        "strict: scripts and handlers removed too; off: the page as written "
        "(default: standard)",
    )
    generate.add_argument(
        "--cpu-threads",
        type=int,
        help="torch threads on a CPU (default: all cores but one; measured faster on 2 cores)",
    )
    generate.add_argument("--max-new-tokens", type=int, default=SamplingParams.max_new_tokens)
    generate.add_argument("--temperature", type=float, default=SamplingParams.temperature)
    generate.add_argument("--top-p", type=float, default=SamplingParams.top_p)
    generate.add_argument(
        "--repetition-penalty", type=float, default=SamplingParams.repetition_penalty
    )
    generate.add_argument("--seed", type=int, help="make sampling reproducible")
    _add_model_options(generate)

    info = commands.add_parser(
        "info", parents=[common], help="print the resolved model setup, device and cache"
    )
    _add_model_options(info)
    return parser


def _validate_prompt(prompt: str) -> str:
    cleaned = " ".join(prompt.split())
    if not cleaned:
        raise ModelError("the prompt is empty: describe the page you want")
    if len(cleaned) > MAX_PROMPT_CHARS:
        raise ModelError(
            f"the prompt is {len(cleaned)} characters; the limit is {MAX_PROMPT_CHARS}"
        )
    return cleaned


class _ProgressBar:
    """A tqdm bar of generated tokens, fed from the generating thread."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="tok", desc="generating", file=sys.stderr)
        self._lock = threading.Lock()

    def __call__(self, request_id: str, tokens: int) -> None:
        with self._lock:
            self._bar.update(tokens - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def run_generate(args: argparse.Namespace) -> int:
    from model.engine import Engine
    from model.loading import load_model
    from model.naming import page_filename
    from model.page import page_from_result
    from model.page.result import WARNING_TEXT
    from model.threads import configure_cpu_threads
    from model.types import GenerationRequest

    prompt = _validate_prompt(args.prompt)
    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    spec = spec_from_args(args)
    print(f"loading {spec.name} ...", file=sys.stderr)
    loaded = load_model(spec)
    threads = configure_cpu_threads(args.cpu_threads, device=str(loaded.device))
    print(f"loaded in {loaded.load_seconds:.1f} s on {loaded.device}", file=sys.stderr)
    mode = PageMode(args.mode) if args.mode else spec.page_mode
    safety = SafetyPolicy(args.safety)
    log.debug("mode %s, safety %s, %d CPU threads", mode, safety, threads)
    request = GenerationRequest(
        prompt, style=args.style, mode=mode, safety=safety, sampling=sampling
    )
    bar = _ProgressBar(sampling.max_new_tokens)
    try:
        (result,) = Engine(loaded).generate([request], progress=bar)
    finally:
        bar.close()
    page = page_from_result(result, prompt=prompt, mode=mode, style=args.style, safety=safety)
    output: Path = args.output or Path("out") / page_filename(prompt)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(page.data)
    except OSError as error:
        raise ModelError(f"could not write {output}: {error.strerror or error}") from None
    print(
        f"wrote {output} ({len(page.data):,} bytes, {result.generated_tokens} tokens "
        f"in {result.total_s:.1f} s, {result.tokens_per_second:.1f} tokens/s)"
    )
    print(f"mode {mode}, theme {args.style or 'modern'}, safety {safety}")
    for warning in page.warnings:
        print(f"flag {warning.value}: {WARNING_TEXT[warning]}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    import torch

    from model.embedded import cache_root
    from model.loading import hub_offline, resolve_device

    spec = spec_from_args(args)
    info = {
        "spec": spec.describe(),
        "device": str(resolve_device(spec.device)),
        "cuda_available": torch.cuda.is_available(),
        "cache_dir": str(cache_root()),
        "hub_offline": hub_offline(),
    }
    print(json.dumps(info, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Our own progress notes (e.g. the one-time model conversion) are shown by default.
    logging.getLogger("model").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.command == "generate":
            return run_generate(args)
        return run_info(args)
    except ModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # e.g. SamplingParams rejecting a flag's value
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
