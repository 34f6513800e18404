"""How closely the fast engine's decode attentions agree, teacher-forced, on a CUDA GPU.

Random Llamas (4 layers, hidden 2048, 16 heads; once with 16 KV heads, once with 4) with a
merged LoRA; eight prompts of 5-300 tokens prefilled; then 30 decode steps in which every
attention ("sdpa": cuDNN over the slot cache with a length mask, the reference; "triton": the
engine's split-K kernel; "matmul": plain matmuls in float32 scores) gets the same forced input
tokens. Prints the largest logit difference against SDPA (in units of the logits' standard
deviation) and how often the top token agrees. Random weights give near-ties (a median top-1
margin of ~0.15 logits), so a few argmax flips are bf16 rounding; the matmul row shows how far
two correct implementations drift apart.

    python -m bench.attention_agreement
"""

from __future__ import annotations

import sys
from typing import Any

ATTENTIONS = ("sdpa", "triton", "matmul")
PROMPT_LENGTHS = [37, 200, 64, 129, 255, 5, 90, 300]
STEPS = 30


def shape(kv_heads: int) -> dict[str, Any]:
    return {
        "vocab_size": 32016,
        "hidden_size": 2048,
        "intermediate_size": 5504,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-5,
    }


def teacher_forced_logits(runner: Any, forced: Any) -> dict[str, Any]:
    """Logits of every step for each attention, from the same cache and forced inputs."""
    import torch

    rows = len(PROMPT_LENGTHS)
    cache = runner.cache
    saved = [t.clone() for t in (cache.kv, cache.tokens, cache.positions, cache.seen)]
    captured: list[torch.Tensor] = []
    head = runner.weights.lm_head

    def recording_head(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        captured.append(logits.float())
        return logits

    runner.weights.lm_head = recording_head
    results = {}
    try:
        for attention in ATTENTIONS:
            for buffer, value in zip(
                (cache.kv, cache.tokens, cache.positions, cache.seen), saved, strict=True
            ):
                buffer.copy_(value)
            runner.forward.attention = attention  # eager decode_body: no graphs to recapture
            captured.clear()
            with torch.inference_mode():
                for step in range(STEPS):
                    runner.forward.decode_body(rows, 640)
                    cache.tokens[:rows] = forced[step]
            results[attention] = torch.stack(captured)
    finally:
        runner.weights.lm_head = head
    return results


def main() -> int:
    import torch

    from bench.serving import add_lora, build_base, build_tokenizer
    from model.fast import FastEngine, FastEngineOptions

    if not torch.cuda.is_available():
        print("needs a CUDA GPU (the triton and cuDNN kernels)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name()}")
    print("| KV heads | against SDPA | max abs logit difference / std | top-1 agreement |")
    print("|---|---|---|---|")
    for kv_heads in (16, 4):
        config = shape(kv_heads)
        tokenizer = build_tokenizer(config["vocab_size"])
        model = add_lora(build_base(config, device, torch.bfloat16))
        options = FastEngineOptions(max_seq_len=1024, max_slots=len(PROMPT_LENGTHS))
        runner = FastEngine(model, tokenizer, options=options).runner
        generator = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(3, 32000, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS
        ]
        runner.prefill(list(range(len(prompts))), prompts)
        for row, prompt in enumerate(prompts):
            runner.cache.set_row(
                row, prompt=prompt, temperature=0.0, top_p=1.0, repetition_penalty=1.0, seed=0
            )
            runner.cache.start_row(row, 7, len(prompt))
        forced = torch.randint(3, 32000, (STEPS, len(prompts)), generator=generator).to(device)
        logits = teacher_forced_logits(runner, forced)
        reference = logits["sdpa"]
        for other in ATTENTIONS[1:]:
            difference = (reference - logits[other]).abs().max() / reference.std()
            agreement = (reference.argmax(-1) == logits[other].argmax(-1)).float().mean()
            print(f"| {kv_heads} | {other} | {difference:.3f} | {agreement:.1%} |")
        del runner, model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
