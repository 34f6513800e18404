"""QLoRA training throughput and peak memory: this package's recipe vs the seed's.

Builds a CodeLlama-7B-shaped ``LlamaForCausalLM`` with random weights directly on the GPU
(no download; random weights cost the same time as real ones), quantizes its decoder
linears to NF4 with double quantization (what ``BitsAndBytesConfig(load_in_4bit=...)``
does at load time), then wraps it with :func:`training.modeling.wrap_for_training`: the
same prepare-for-k-bit, gradient checkpointing and LoRA (r=16 on q,k,v,o,gate,up,down)
that ``python -m training`` uses. Each scenario runs warm-up steps, then timed optimizer
steps (forward, backward, clipping, AdamW) under bf16 autocast.

Scenarios (same model, same step code; only the batches differ):

- ``seed``: every example truncated / padded to 512 tokens, padding counted in the loss.
- ``ours-512``: the same examples, dynamic padding to the batch's longest (labels -100 on
  prompt and padding).
- ``ours-512-packed``: whole examples packed into full 512-token rows.
- ``ours-2048`` / ``ours-2048-packed``: the same at max_seq_len 2048 (no truncation at 512).

"Real tokens/s" counts only non-padding tokens (``training.tokenization.count_tokens``, what
the training loop's progress bar counts): the work that teaches the model.
Example lengths are drawn from a log-normal (median ``--median-len`` tokens, sigma 0.6)
as a stand-in for page lengths; the prompt is the first 48 tokens.

    python bench/training_throughput.py              # on a GPU (needs bitsandbytes, peft)
    python bench/training_throughput.py --tiny       # a seconds-long CPU check of the script
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CODELLAMA_7B, random_llama
from training.config import TrainConfig
from training.modeling import wrap_for_training
from training.tokenization import IGNORE_INDEX, Collator, Example, count_tokens, pack

PROMPT_TOKENS = 48

TINY = {
    **CODELLAMA_7B,
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
}


@dataclass
class Scenario:
    name: str
    batches: list[dict[str, torch.Tensor]]
    note: str


def build_model(shape: dict[str, Any], device: torch.device, quantize: bool) -> Any:
    """A random-weight Llama on ``device``; decoder linears as NF4 ``Linear4bit`` if asked."""
    from transformers import LlamaConfig

    config = LlamaConfig(**shape, tie_word_embeddings=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config.dtype = dtype
    model = random_llama(config, device, dtype)
    if quantize:
        from bench.serving import quantized_copy

        # The serving benchmark's NF4 (double-quant) copy; the bf16 linears go with `model`.
        model = quantized_copy(model)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return model


def sample_lengths(count: int, median: int, generator: torch.Generator, cap: int) -> list[int]:
    normal = torch.randn(count, generator=generator) * 0.6 + math.log(median)
    return [max(PROMPT_TOKENS + 16, min(cap, int(math.exp(float(v))))) for v in normal]


def make_examples(lengths: list[int], vocab: int, generator: torch.Generator) -> list[Example]:
    examples = []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * PROMPT_TOKENS + ids[PROMPT_TOKENS:]
        examples.append(Example(ids, labels))
    return examples


def seed_batches(
    lengths: list[int], vocab: int, batch: int, generator: torch.Generator
) -> list[dict[str, torch.Tensor]]:
    """The seed's recipe: truncate/pad every example to 512; labels = inputs, padding included."""
    batches = []
    for start in range(0, len(lengths) - batch + 1, batch):
        ids = torch.zeros((batch, 512), dtype=torch.long)  # pad id 0
        mask = torch.zeros((batch, 512), dtype=torch.long)
        for row, length in enumerate(lengths[start : start + batch]):
            real = min(length, 512)
            ids[row, :real] = torch.randint(3, vocab, (real,), generator=generator)
            mask[row, :real] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return batches


def batches_of(examples: list[Example], batch: int) -> list[dict[str, torch.Tensor]]:
    collator = Collator(pad_token_id=0, pad_to_multiple_of=8)
    return [collator(examples[i : i + batch]) for i in range(0, len(examples) - batch + 1, batch)]


def scenarios(args: argparse.Namespace, vocab: int) -> list[Scenario]:
    generator = torch.Generator().manual_seed(0)
    steps = args.warmup + args.steps
    lengths = sample_lengths(args.batch_512 * steps * 8, args.median_len, generator, cap=2048)
    short = [min(length, 512) for length in lengths]  # max_seq_len 512 truncates like the seed
    n_512, n_2048 = args.batch_512 * steps, args.batch_2048 * steps
    packed_512 = pack(make_examples(short, vocab, generator), 512)
    packed_2048 = pack(make_examples(lengths, vocab, generator), 2048)
    b512, b2048 = args.batch_512, args.batch_2048
    return [
        Scenario(
            "seed",
            seed_batches(lengths[:n_512], vocab, b512, generator),
            f"batch {b512} x 512, all padded, padding in loss",
        ),
        Scenario(
            "ours-512",
            batches_of(make_examples(short[:n_512], vocab, generator), b512),
            f"batch {b512}, dynamic padding",
        ),
        Scenario(
            "ours-512-packed", batches_of(packed_512, b512)[:steps], f"batch {b512} x 512 packed"
        ),
        Scenario(
            "ours-512-packed",
            batches_of(packed_512, 2 * b512)[:steps],
            f"batch {2 * b512} x 512 packed",
        ),
        Scenario(
            "ours-2048",
            batches_of(make_examples(lengths[:n_2048], vocab, generator), b2048),
            f"batch {b2048}, dynamic padding",
        ),
        Scenario(
            "ours-2048-packed",
            batches_of(packed_2048, b2048)[:steps],
            f"batch {b2048} x 2048 packed",
        ),
        Scenario(
            "ours-2048-packed",
            batches_of(packed_2048, 2 * b2048)[:steps],
            f"batch {2 * b2048} x 2048 packed",
        ),
    ]


def run_scenario(
    model: Any, scenario: Scenario, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    counted_real, counted_all = 0, 0
    model.train()
    for index, batch in enumerate(scenario.batches):
        inputs = {key: value.to(device) for key, value in batch.items()}
        start = time.perf_counter()
        with autocast:
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if index >= args.warmup:
            times.append(elapsed)
            counted_real += count_tokens(batch)
            counted_all += batch["input_ids"].numel()
    del optimizer
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    total = sum(times)
    return {
        "scenario": scenario.name,
        "setup": scenario.note,
        "steps": len(times),
        "median_step_s": statistics.median(times),
        "tokens_per_s": counted_all / total,
        "real_tokens_per_s": counted_real / total,
        "padding_share": 1 - counted_real / counted_all,
        "peak_gib": peak,
        "final_loss": float(loss.detach()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script")
    parser.add_argument("--quantization", choices=["nf4", "none"], default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-512", type=int, default=8)
    parser.add_argument("--batch-2048", type=int, default=2)
    parser.add_argument("--median-len", type=int, default=400)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    quantization = args.quantization or ("nf4" if device.type == "cuda" else "none")
    shape = TINY if args.tiny else CODELLAMA_7B
    torch.manual_seed(0)
    started = time.perf_counter()
    model = build_model(shape, device, quantize=quantization == "nf4")
    config = TrainConfig(lora_r=16, lora_alpha=32, lora_dropout=0.05, gradient_checkpointing=True)
    model = wrap_for_training(model, config, quantized=quantization == "nf4")
    build_s = time.perf_counter() - started
    lora_layer = type(model.base_model.model.model.layers[0].self_attn.q_proj)
    print(f"# LoRA layer type: {lora_layer.__module__}.{lora_layer.__name__}")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    base_gib = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(
        f"# {card}; model {'CodeLlama-7B-shaped' if not args.tiny else 'tiny'}, {quantization}, "
        f"built in {build_s:.0f} s, {base_gib:.1f} GiB after build; torch {torch.__version__}"
    )
    results = []
    for scenario in scenarios(args, int(shape["vocab_size"])):
        results.append(run_scenario(model, scenario, args, device))
        print(
            f"  done {scenario.name}: {results[-1]['real_tokens_per_s']:.0f} real tokens/s",
            flush=True,
        )
    seed_rate = results[0]["real_tokens_per_s"]
    print()
    header = "| recipe | setup | tokens/s (all) | real tokens/s | vs seed | padding | peak GiB |"
    print(header + " step s (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['scenario']} | {row['setup']} | {row['tokens_per_s']:.0f} "
            f"| {row['real_tokens_per_s']:.0f} "
            f"| {row['real_tokens_per_s'] / seed_rate:.2f}x | {100 * row['padding_share']:.0f}% "
            f"| {row['peak_gib']:.1f} | {row['median_step_s']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"card": card, "quantization": quantization, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
