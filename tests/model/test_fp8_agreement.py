"""FP8 quality guard, small: FP8 E4M3 weights must keep the embedded model's top-1 tokens.

The real SmolLM2-135M-Instruct (offline, float32 on the CPU) writes a greedy 48-token
continuation for 2 page prompts; the model with every decoder projection quantized the way
the GPU engine does (``model.fp8``: E4M3, one scale per output channel) reads them
teacher-forced and must pick the same top-1 tokens. A deliberately bad quantization (3-bit
per-channel) must score far lower, so the measure itself can fail. ``bench.fp8_agreement``
is the full version (8 prompts x 200 tokens, more variants).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench import fp8_agreement
from bench.fp8_agreement import Case, Reference

PROMPTS = 2
TOKENS = 48

# Measured here (2 x 48 = 96 positions, float32 CPU): fp8 weights agree at 93/96 = 96.9%,
# mean KL 1.5e-2 nats, and every flip is a near-tie (the reference's top-1 led by < 1 logit).
# 3-bit weights: 5% agreement, KL ~7. The bound allows twice the measured flips (6 of 96),
# so a different CPU's float32 rounding can't trip it, while a quantizer that lost a bit of
# precision or got its scales wrong would (int4 per-channel scores ~78% here, 87% on the full
# bench). It is below the 99% target on purpose: the full bench measures 97.6% for
# fp8 weights on this small model (bench/RESULTS.md, "FP8 quality guard"), so a 99% bound
# here would fail today; this test guards the scheme against getting worse.
MIN_FP8_AGREEMENT = 0.93
MAX_FP8_MEAN_KL = 0.05
MAX_BAD_AGREEMENT = 0.5


@pytest.fixture(scope="module")
def embedded() -> tuple[Any, list[Case], list[Reference]]:
    model, tokenizer = fp8_agreement.load_embedded()
    prompts = fp8_agreement.prompt_ids(tokenizer, PROMPTS)
    cases = fp8_agreement.greedy_cases(model, tokenizer, prompts, TOKENS)
    references = [fp8_agreement.reference(model, case) for case in cases]
    return model, cases, references


@pytest.mark.slow
def test_fp8_weights_keep_the_top_token_and_a_bad_quantization_does_not(
    embedded: tuple[Any, list[Case], list[Reference]],
) -> None:
    model, cases, references = embedded
    assert sum(len(case.continuation) for case in cases) == PROMPTS * TOKENS

    with fp8_agreement.quantized_weights(model, fp8_agreement.fp8_per_channel):
        fp8 = fp8_agreement.compare("fp8 weights", model, cases, references)
    with fp8_agreement.quantized_weights(model, fp8_agreement.int_per_channel(3)):
        bad = fp8_agreement.compare("3-bit", model, cases, references)

    assert fp8.rate >= MIN_FP8_AGREEMENT, fp8
    assert fp8.mean_kl <= MAX_FP8_MEAN_KL, fp8
    assert fp8.clear_flips == 0, fp8  # only near-ties may flip
    assert bad.rate <= MAX_BAD_AGREEMENT, bad
    assert bad.mean_kl > 20 * fp8.mean_kl, (bad, fp8)


@pytest.mark.slow
def test_each_variant_changes_the_model_only_while_it_lasts(
    embedded: tuple[Any, list[Case], list[Reference]],
) -> None:
    model, cases, _ = embedded
    # A short piece of the first case: each variant costs two forwards.
    case = Case("short", cases[0].prompt[:24], cases[0].continuation[:8])
    before = fp8_agreement.reference(model, case)
    head = model.lm_head.weight
    kv_scales = fp8_agreement.calibrate_kv_scales(model, [case.prompt])
    variants = {
        "fp8 weights and LM head": lambda: fp8_agreement.quantized_weights(
            model, fp8_agreement.fp8_per_channel, lm_head=True
        ),
        "fp8 KV": lambda: fp8_agreement.fp8_kv_cache(model, kv_scales),
        "fp8 KV, the engine's": lambda: fp8_agreement.engine_fp8_kv_cache(model),
        "bf16 compute": lambda: fp8_agreement.bf16_compute(model),
    }
    for name, make in variants.items():
        with make():
            during = fp8_agreement.reference(model, case)
        after = fp8_agreement.reference(model, case)
        assert not torch.equal(during.log_probs, before.log_probs), f"{name} changed nothing"
        # Bit for bit the same logits afterwards: the original tensors and attention are back.
        assert torch.equal(after.log_probs, before.log_probs), name
        assert model.lm_head.weight is head is model.model.embed_tokens.weight  # still tied
        assert model.config._attn_implementation != fp8_agreement.FP8_KV_ATTENTION
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_e4m3_rows_simulate_the_split_k_kernels_fp8_mode() -> None:
    """The bench's "E4M3 rows" is what model.fast.fp8_splitk computes in MODE_FP8 (run here
    by Triton's interpreter, tests/conftest.py): the same K blocks (a short last one: K is
    not a multiple of the block), the same rounding, up to float32 accumulation order."""
    from model import fp8
    from model.fast.fp8_splitk import SplitKConfig, splitk_matmul

    block_k = fp8_agreement.ROWS_BLOCK_K_WIDE
    generator = torch.Generator().manual_seed(0)
    k = 2 * block_k + 64
    rows = torch.randn(3, k, generator=generator).bfloat16()
    w_fp8, scale = fp8.quantize_weight(torch.randn(16, k, generator=generator) * 0.05)
    kernel = splitk_matmul(rows, w_fp8, scale, "fp8", SplitKConfig(16, 16, block_k, 2)).float()
    simulated = torch.nn.functional.linear(
        fp8_agreement.e4m3_row_blocks(rows, block_k),
        fp8.dequantize(w_fp8, scale, torch.float32),
    )
    torch.testing.assert_close(kernel, simulated, rtol=1e-2, atol=1e-2)  # bf16 output
    # And it is not the unrounded product: the rows' rounding is what is simulated.
    exact = torch.nn.functional.linear(rows.float(), fp8.dequantize(w_fp8, scale, torch.float32))
    assert float((simulated - exact).abs().max()) > 1e-2
