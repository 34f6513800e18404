"""Constrained decoding: what the compose form's grammar costs, which library, engine speed.

``python -m bench.constrained`` (the default, ``--forms``) measures the product's case: the
guided form of every page kind (``model.page.form.grammar_for(kind, "A bakery in Lyon")``)
on the embedded SmolLM2 tokenizer (49,152 tokens), in xgrammar (the product's library) and
llguidance (which takes the same EBNF through its GBNF converter): compile time (cold, then
the same grammar again), the per-token cost of one step (fill the next-token mask + accept
the token) over a filled form, probes each must judge right, and the share of the answer's
tokens the grammar forces (jump-forward: ``GrammarConstraint.forced_tokens``), which the
standard engine feeds without decode steps (``bench.constrained_forms``).

``python -m bench.constrained --schemas`` is the comparison that chose xgrammar: xgrammar,
llguidance and outlines-core on the first compose design's JSON schemas
(``bench.constrained_schemas``): compile, step cost over the kind's sample content, memory,
and whether each enforces every schema feature exactly.

``python -m bench.constrained --engine fast`` (or ``standard``) measures tokens/s of an
engine with the constraint on against the same requests without one: on a GPU with a
random CodeLlama-7B-shaped model (built on the device, no download), on CPU with a small one.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from datetime import date
from importlib import metadata
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LIBRARIES = ("xgrammar", "llguidance", "outlines-core")
# outlines-core builds a DFA of every string's length bound; past this it is reported as a
# timeout rather than holding the machine for minutes.
OUTLINES_TIMEOUT_S = 60.0


def load_tokenizer() -> Any:
    """The embedded model's tokenizer, from the converted folder (converted once)."""
    from transformers import AutoTokenizer

    from model.embedded import converted_folder

    return AutoTokenizer.from_pretrained(converted_folder())


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------ libraries


class Library:
    """One grammar library behind the few calls the comparison makes."""

    name = ""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def compile(self, schema: dict[str, Any]) -> Any:
        raise NotImplementedError

    def compile_form(self, grammar: str) -> Any:
        """Compile an xgrammar EBNF grammar (a compose form)."""
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def step(self, matcher: Any, mask: Any, token: int) -> bool:
        """Fill the next-token mask, then accept ``token``; whether it was allowed."""
        raise NotImplementedError

    def accepting(self, matcher: Any) -> bool:
        raise NotImplementedError

    def new_mask(self) -> Any:
        return None

    def reported_bytes(self, compiled: Any) -> int | None:
        return None


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        import xgrammar as xg

        self.xg = xg
        info = xg.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=len(tokenizer), stop_token_ids=[tokenizer.eos_token_id]
        )
        self.compiler = xg.GrammarCompiler(info, max_threads=2)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=True
        )

    def compile_form(self, grammar: str) -> Any:
        return self.compiler.compile_grammar(grammar)

    def matcher(self, compiled: Any) -> Any:
        return self.xg.GrammarMatcher(compiled)

    def new_mask(self) -> Any:
        return self.xg.allocate_token_bitmask(1, len(self.tokenizer))

    def step(self, matcher: Any, mask: Any, token: int) -> bool:
        matcher.fill_next_token_bitmask(mask, 0)
        return bool(matcher.accept_token(token))

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_completed())

    def reported_bytes(self, compiled: Any) -> int | None:
        return int(compiled.memory_size_bytes)


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.llg_torch = llguidance.torch
        self.lltokenizer = llguidance.hf.from_tokenizer(tokenizer)

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        # llguidance builds its lexer lazily; the first matcher pays for it.
        self.matcher(grammar)
        return grammar

    def compile_form(self, grammar: str) -> Any:
        # xgrammar's EBNF is GBNF (llama.cpp's) for what the forms use; llguidance converts
        # GBNF to its Lark dialect. It keeps no cache: "again" is a second full compile.
        compiled = self.llg.grammar_from("gbnf", grammar)
        self.matcher(compiled)
        return compiled

    def matcher(self, compiled: Any) -> Any:
        matcher = self.llg.LLMatcher(self.lltokenizer, compiled)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def new_mask(self) -> Any:
        return self.llg_torch.allocate_token_bitmask(1, self.lltokenizer.vocab_size)

    def step(self, matcher: Any, mask: Any, token: int) -> bool:
        self.llg_torch.fill_next_token_bitmask(matcher, mask, 0)
        return bool(matcher.consume_token(token)) and not matcher.is_error()

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_accepting()) and not matcher.is_error()


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        import outlines_core
        import xgrammar as xg

        self.oc = outlines_core
        # The token bytes as the tokenizer decodes them (byte-level BPE undone).
        info = xg.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
        special = set(tokenizer.all_special_ids)
        vocabulary: dict[bytes, list[int]] = {}
        for token, text in enumerate(info.decoded_vocab):
            if token not in special:
                vocabulary.setdefault(bytes(text), []).append(token)
        self.vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, vocabulary)

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(
            json.dumps(schema), whitespace_pattern=""
        )
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def step(self, matcher: Any, mask: Any, token: int) -> bool:
        allowed = matcher.get_tokens()
        if token not in allowed:
            return False
        matcher.advance(token)
        return True

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_finished())


LIBRARY_CLASSES: dict[str, type[Library]] = {
    "xgrammar": XGrammar,
    "llguidance": LLGuidance,
    "outlines-core": OutlinesCore,
}


def accepts(library: Library, compiled: Any, text: str) -> bool:
    """Whether the grammar takes ``text`` (tokenized as the model would write it) whole."""
    tokens = library.tokenizer(text, add_special_tokens=False)["input_ids"]
    matcher = library.matcher(compiled)
    mask = library.new_mask()
    try:
        if not all(library.step(matcher, mask, token) for token in tokens):
            return False
    except (ValueError, RuntimeError):  # outlines raises on a token it does not allow
        return False
    return library.accepting(matcher)


def step_cost_us(library: Library, compiled: Any, text: str) -> float:
    """Mean microseconds of one decode step's grammar work (mask + accept) over ``text``."""
    tokens = library.tokenizer(text, add_special_tokens=False)["input_ids"]
    matcher = library.matcher(compiled)
    mask = library.new_mask()
    began = time.perf_counter()
    for token in tokens:
        library.step(matcher, mask, token)
    return (time.perf_counter() - began) / len(tokens) * 1e6


def measure_kind(library: Library, kind: Any) -> dict[str, Any]:
    """One row of the table: ``library`` on ``kind``'s schema."""
    from bench.constrained_schemas import example_json, probes, schema_for

    schema = schema_for(kind)
    before = rss_bytes()
    began = time.perf_counter()
    compiled = library.compile(schema)
    cold_ms = (time.perf_counter() - began) * 1000
    began = time.perf_counter()
    library.compile(schema)
    cached_ms = (time.perf_counter() - began) * 1000
    grown = rss_bytes() - before
    wrong = [
        name
        for name, (text, valid) in probes(kind).items()
        if accepts(library, compiled, text) != valid
    ]
    return {
        "library": library.name,
        "kind": kind.value,
        "cold_ms": cold_ms,
        "cached_ms": cached_ms,
        "step_us": step_cost_us(library, compiled, example_json(kind)),
        "memory_bytes": library.reported_bytes(compiled) or max(grown, 0),
        "memory_reported": library.reported_bytes(compiled) is not None,
        "probes": len(probes(kind)),
        "wrong": wrong,
    }


def _measure_in_child(name: str, kind_value: str, queue: Any) -> None:
    from model.page.content import PageKind

    library = LIBRARY_CLASSES[name](load_tokenizer())
    queue.put(measure_kind(library, PageKind(kind_value)))


def measure_with_timeout(name: str, kind: Any, timeout_s: float) -> dict[str, Any]:
    """``measure_kind`` in a child process, given up after ``timeout_s`` (outlines-core)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_measure_in_child, args=(name, kind.value, queue))
    child.start()
    child.join(timeout_s)
    if child.is_alive():
        child.kill()
        child.join()
        return {"library": name, "kind": kind.value, "timeout_s": timeout_s}
    result: dict[str, Any] = queue.get()
    return result


def library_rows(names: list[str], kinds: list[Any], outlines_kinds: int) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer()
    rows: list[dict[str, Any]] = []
    for name in names:
        if name == "outlines-core":
            # Each kind in a child: a compile that runs away is killed, not waited for.
            rows += [
                measure_with_timeout(name, kind, OUTLINES_TIMEOUT_S)
                for kind in kinds[:outlines_kinds]
            ]
            continue
        began = time.perf_counter()
        library = LIBRARY_CLASSES[name](tokenizer)
        setup_ms = (time.perf_counter() - began) * 1000
        for kind in kinds:
            row = measure_kind(library, kind)
            row["tokenizer_setup_ms"] = setup_ms
            rows.append(row)
    return rows


def library_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| library | kind | compile cold | cached | mask+accept / token | memory | probes wrong |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "timeout_s" in row:
            lines.append(
                f"| {row['library']} | {row['kind']} | > {row['timeout_s']:.0f} s (killed) "
                "| | | | |"
            )
            continue
        memory = f"{row['memory_bytes'] / 1e6:.2f} MB"
        if not row["memory_reported"]:
            memory += " (RSS)"
        wrong = ", ".join(row["wrong"]) or f"none of {row['probes']}"
        lines.append(
            f"| {row['library']} | {row['kind']} | {row['cold_ms']:.1f} ms "
            f"| {row['cached_ms']:.3f} ms | {row['step_us']:.0f} us | {memory} | {wrong} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    lines = []
    for name in LIBRARIES:
        done = [r for r in rows if r["library"] == name and "timeout_s" not in r]
        killed = [r for r in rows if r["library"] == name and "timeout_s" in r]
        if not done and not killed:
            continue
        if not done:
            lines.append(f"{name}: every compile killed after {OUTLINES_TIMEOUT_S:.0f} s")
            continue
        wrong = sum(len(r["wrong"]) for r in done)
        lines.append(
            f"{name}: compile median {statistics.median(r['cold_ms'] for r in done):.1f} ms "
            f"(max {max(r['cold_ms'] for r in done):.1f}), step median "
            f"{statistics.median(r['step_us'] for r in done):.0f} us, "
            f"{wrong} wrong probe answers, {len(killed)} compiles killed"
            + (
                f", tokenizer setup {done[0]['tokenizer_setup_ms']:.0f} ms"
                if "tokenizer_setup_ms" in done[0]
                else ""
            )
        )
    return "\n".join(lines)


def versions() -> str:
    names = ["xgrammar", "llguidance", "outlines-core", "torch", "transformers"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


# -------------------------------------------------------------------------- engines


def engine_rows(
    engine_kind: str, cpu: bool, batch: int, new_tokens: int, tokenizer_dir: str | None = None
) -> list[dict[str, Any]]:
    """tokens/s of ``engine_kind`` for ``batch`` requests: unconstrained, document mode's
    banned strings, compose mode's grammar (random weights: the tokens are noise, the
    costs are real)."""
    import torch

    from model.types import GenerationRequest, PageMode, SafetyPolicy, SamplingParams

    model, tokenizer, device = _bench_model(cpu, tokenizer_dir)
    engine = _build_engine(engine_kind, model, tokenizer, device, batch)
    if engine_kind == "fast" and device.type == "cuda":
        engine.warmup(batch)  # capture the graphs before timing
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.8, top_p=0.95, seed=1)
    cases = {
        "unconstrained": (PageMode.DOCUMENT, None),
        "document, banned strings": (PageMode.DOCUMENT, SafetyPolicy.STANDARD),
        "compose, form grammar": (PageMode.COMPOSE, None),
    }
    rows = []
    for label, (mode, safety) in cases.items():
        requests = [
            GenerationRequest(
                f"a landing page for shop number {i}",
                mode=mode,
                safety=safety or SafetyPolicy.STANDARD,
                sampling=sampling,
            )
            for i in range(batch)
        ]
        if label == "unconstrained":
            _unconstrain(engine)
        else:
            _constrain(engine)
        engine.generate(requests[:1])  # warm: graphs, grammar compile
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        results = engine.generate(requests)
        elapsed = time.perf_counter() - began
        tokens = sum(r.generated_tokens for r in results)
        rows.append(
            {
                "engine": engine_kind,
                "case": label,
                "batch": batch,
                "tokens": tokens,
                "seconds": elapsed,
                "tokens_per_s": tokens / elapsed,
            }
        )
    return rows


def _unconstrain(engine: Any) -> None:
    engine.constrain = False


def _constrain(engine: Any) -> None:
    engine.constrain = True


def _bench_model(cpu: bool, tokenizer_dir: str | None = None) -> tuple[Any, Any, Any]:
    """A random Llama: CodeLlama-7B-shaped in bf16 on a GPU, a small one on the CPU.

    The form grammar needs a tokenizer that can spell English: ``tokenizer_dir`` (a saved
    tokenizer folder, e.g. SmolLM2's; the model's vocabulary then takes its size) replaces
    the GPU run's word-level stand-in, whose ids spell no text."""
    import torch
    from transformers import LlamaConfig

    from bench.common import CODELLAMA_7B, random_llama

    use_cuda = torch.cuda.is_available() and not cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    if use_cuda:
        from bench.serving import build_tokenizer

        if tokenizer_dir:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            shape = dict(CODELLAMA_7B, vocab_size=len(tokenizer))
        else:
            tokenizer = build_tokenizer(CODELLAMA_7B["vocab_size"])
            shape = dict(CODELLAMA_7B)
        dtype = torch.bfloat16
    else:
        tokenizer = load_tokenizer()
        shape = {
            "vocab_size": len(tokenizer),
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
        }
        dtype = torch.float32
    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = random_llama(config, device, dtype).eval()
    return model, tokenizer, device


def _build_engine(kind: str, model: Any, tokenizer: Any, device: Any, batch: int) -> Any:
    if kind == "fast":
        from model.fast import FastEngine, FastEngineOptions

        options = FastEngineOptions(
            max_seq_len=2048, max_slots=max(batch, 1), ignore_eos=True, progress_interval_s=1.0
        )
        return FastEngine(model, tokenizer, model_name="bench", options=options)
    from model.engine import Engine
    from model.loading import LoadedModel
    from model.spec import ModelSpec

    loaded = LoadedModel(
        spec=ModelSpec(name="bench", base="random"),
        model=model,
        tokenizer=tokenizer,
        device=device,
        merged=True,
        load_seconds=0.0,
    )
    return Engine(loaded)


def engine_table(rows: list[dict[str, Any]]) -> str:
    base = {
        (r["engine"], r["batch"]): r["tokens_per_s"] for r in rows if r["case"] == "unconstrained"
    }
    lines = [
        "| engine | batch | case | tokens | tokens/s | vs unconstrained |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["tokens_per_s"] / base[(r["engine"], r["batch"])]
        lines.append(
            f"| {r['engine']} | {r['batch']} | {r['case']} | {r['tokens']} "
            f"| {r['tokens_per_s']:.1f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


FORM_LIBRARIES = ("xgrammar", "llguidance")  # outlines-core takes no grammar, only regex/JSON


def form_rows(names: list[str], kinds: list[Any]) -> list[dict[str, Any]]:
    """``bench.constrained_forms.measure_form`` for each library and kind."""
    from bench.constrained_forms import measure_form

    tokenizer = load_tokenizer()
    rows = []
    for name in names:
        began = time.perf_counter()
        library = LIBRARY_CLASSES[name](tokenizer)
        setup_ms = (time.perf_counter() - began) * 1000
        for kind in kinds:
            rows.append({**measure_form(library, kind, tokenizer), "tokenizer_setup_ms": setup_ms})
    return rows


def form_summary(rows: list[dict[str, Any]]) -> str:
    lines = []
    for name in FORM_LIBRARIES:
        done = [r for r in rows if r["library"] == name]
        if not done:
            continue
        line = (
            f"{name}: compile median {statistics.median(r['cold_ms'] for r in done):.1f} ms "
            f"(max {max(r['cold_ms'] for r in done):.1f}), again median "
            f"{statistics.median(r['cached_ms'] for r in done):.3f} ms, step median "
            f"{statistics.median(r['step_us'] for r in done):.0f} us (of per-kind means; "
            f"per-token median {statistics.median(r['step_median_us'] for r in done):.0f} us), "
            f"{sum(len(r['wrong']) for r in done)} wrong probe answers, "
            f"tokenizer setup {done[0]['tokenizer_setup_ms']:.0f} ms"
        )
        forced = sum(r.get("forced", 0) for r in done)
        if forced:
            total = forced + sum(r["sampled"] for r in done)
            line += f"; forced {forced} of {total} answer tokens ({forced / total:.0%})"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--forms", action="store_true", help="form grammars (the default)")
    mode.add_argument("--schemas", action="store_true", help="the JSON-schema comparison")
    mode.add_argument("--engine", choices=["fast", "standard"], help="measure an engine")
    parser.add_argument("--cpu", action="store_true", help="engine bench on CPU")
    parser.add_argument("--batch", default="1,8", help="engine bench batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--libraries", help=f"default: {','.join(FORM_LIBRARIES)} (forms), all (schemas)"
    )
    parser.add_argument("--kinds", default="all", help="comma-separated page kinds, or all")
    parser.add_argument(
        "--outlines-kinds",
        type=int,
        default=3,
        help=f"how many kinds outlines-core compiles ({OUTLINES_TIMEOUT_S:.0f} s cap each)",
    )
    parser.add_argument(
        "--tokenizer", help="engine bench on a GPU: a saved tokenizer folder (e.g. SmolLM2's)"
    )
    parser.add_argument("--json", help="write the rows here as JSON")
    args = parser.parse_args(argv)

    from model.page.content import PageKind

    print(f"# {date.today()} {platform.node()} {platform.processor() or platform.machine()}")
    print(f"# {versions()}; {os.cpu_count()} CPUs")
    kinds = list(PageKind) if args.kinds == "all" else [PageKind(k) for k in args.kinds.split(",")]
    rows: list[dict[str, Any]]
    if args.engine:
        rows = [
            row
            for batch in (int(b) for b in args.batch.split(","))
            for row in engine_rows(args.engine, args.cpu, batch, args.new_tokens, args.tokenizer)
        ]
        print(engine_table(rows))
    elif args.schemas:
        names = (args.libraries or ",".join(LIBRARIES)).split(",")
        rows = library_rows(names, kinds, args.outlines_kinds)
        print(library_table(rows))
        print()
        print(summary(rows))
    else:
        from bench.constrained_forms import form_table

        rows = form_rows((args.libraries or ",".join(FORM_LIBRARIES)).split(","), kinds)
        print(form_table(rows))
        print()
        print(form_summary(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0 if all(math.isfinite(r.get("cold_ms", 0.0)) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
