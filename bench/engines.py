"""The model package's own load paths on a GPU: standard vs fast engine, bf16 vs NF4.

Everything goes through ``model.loading.load_model`` from folders on disk, as the bot does
(base + LoRA adapter; merged for bf16, unmerged for NF4), then through ``model.engine.Engine``
(the HF-forward decode loop) or ``model.fast.FastEngine`` (slots + CUDA graphs).
The model is a random Llama (no download) of a configurable size. Prints a table.

    python -m bench.engines                 # on the GPU machine
    python -m bench.engines --tiny          # a seconds-long CPU check of the script itself
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

SMALL = {
    "vocab_size": 32016,
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 4096,
}
TINY = {**SMALL, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4}  # fmt: skip


def save_model_and_adapter(shape: dict[str, Any], root: Path) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig

    from bench.common import random_llama
    from bench.serving import build_tokenizer
    from training.config import DEFAULT_TARGET_MODULES

    torch.manual_seed(0)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    model = random_llama(config, "cpu", torch.bfloat16)
    base, adapter = root / "base", root / "adapter"
    model.save_pretrained(base)
    build_tokenizer(shape["vocab_size"]).save_pretrained(base)
    lora = LoraConfig(
        r=16,
        lora_alpha=64,
        target_modules=list(DEFAULT_TARGET_MODULES),
        init_lora_weights=False,  # non-zero B: the adapter really changes outputs
    )
    get_peft_model(model, lora).save_pretrained(str(adapter))
    return base, adapter


def run_case(name: str, engine: Any, batch: int, new_tokens: int, load_s: float) -> dict[str, Any]:
    from model.types import GenerationRequest, SamplingParams

    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.2, seed=0)
    warm = [GenerationRequest(f"warm up {i}", sampling=sampling) for i in range(batch)]
    engine.generate(warm)
    requests = [
        GenerationRequest(f"a landing page number {i}", sampling=sampling) for i in range(batch)
    ]
    started = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - started
    tokens = sum(result.generated_tokens for result in results)
    return {"path": name, "batch": batch, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "load_s": load_s}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU check)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)

    import torch

    from model.engine import Engine
    from model.fast import FastEngine
    from model.loading import load_model
    from model.spec import resolve_spec

    cuda = torch.cuda.is_available()
    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = save_model_and_adapter(TINY if args.tiny else SMALL, Path(tmp))
        quantizations = ["none", "nf4"] if cuda else ["none"]
        for quantization in quantizations:
            spec = resolve_spec(base=str(base), adapter=str(adapter), quantization=quantization)
            loaded = load_model(spec)
            label = f"{quantization}, adapter {'merged' if loaded.merged else 'unmerged'}"
            engines: list[tuple[str, Any]] = [("Engine", Engine(loaded))]
            fast = FastEngine.from_loaded(loaded)
            if cuda:
                fast.warmup(max(batches))
            engines.append(("FastEngine", fast))
            for engine_name, engine in engines:
                for batch in batches:
                    row = run_case(f"{engine_name} ({label})", engine, batch, args.new_tokens,
                                   loaded.load_seconds)  # fmt: skip
                    rows.append(row)
                    print(row, flush=True)
            del engines, fast, loaded
            if cuda:
                torch.cuda.empty_cache()
    card = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n{card}, random Llama {'tiny' if args.tiny else SMALL}, {args.new_tokens} new tokens")
    print("| path | batch | tokens | s | tokens/s | load s |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['path']} | {row['batch']} | {row['tokens']} | {row['seconds']:.2f} | "
              f"{row['tokens_per_s']:.1f} | {row['load_s']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
