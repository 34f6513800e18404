"""LlamaWeights in FP8: the bf16 twin is kept only when asked (or when a route runs it), and
dropping it really frees the bf16 weights, the HF modules' views of them included."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from model import fp8
from model.fast import fp8_gemm
from model.fast.fp8_gemm import UNLIMITED, Fp8Weight
from model.fast.weights import LlamaWeights
from tests.tiny import tiny_llama


class _Vocabulary:
    """What tiny_llama reads of a tokenizer."""

    bos_token_id = 1
    eos_token_id = 2

    def __len__(self) -> int:
        return 96


def bf16_model() -> Any:
    return tiny_llama(_Vocabulary(), hidden_size=64, layers=2).to(torch.bfloat16)


def projections(weights: LlamaWeights) -> list[Any]:
    return [p for layer in weights.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]


def test_without_the_twin_the_bf16_weights_are_freed() -> None:
    model = bf16_model()
    weights = LlamaWeights(model)
    bf16_bytes = weights.weight_bytes()
    fused = weakref.ref(weights.layers[0].gate_up.transposed)  # type: ignore[attr-defined]
    reference_down = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    weights.use_fp8(keep_bf16=False)
    gc.collect()
    assert fused() is None  # nothing holds the fused bf16 weight any more
    assert all(isinstance(p, Fp8Weight) and p.bf16 is None for p in projections(weights))
    assert model.model.layers[0].self_attn.q_proj.weight.numel() == 0  # HF views released
    assert not weights.bf16_twin
    # The decoder's projections went from 2 bytes a weight to 1 (+ a float32 scale a row).
    layer_weights = sum(p.weight.numel() for p in projections(weights))
    scales = sum(p.scale.numel() for p in projections(weights))
    assert weights.weight_bytes() == bf16_bytes - 2 * layer_weights + layer_weights + 4 * scales
    # And the layer computes with the quantized weight of the original one.
    x = torch.randn(3, reference_down.shape[1]).to(torch.bfloat16)
    w_fp8, scale = fp8.quantize_weight(reference_down)
    expected = F.linear(x.float(), fp8.dequantize(w_fp8, scale, torch.float32))
    got = weights.layers[1].down(x)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_with_the_twin_both_copies_stay() -> None:
    model = bf16_model()
    weights = LlamaWeights(model)
    bf16_bytes = weights.weight_bytes()
    twin = weights.layers[0].o
    weights.use_fp8(keep_bf16=True)
    assert weights.layers[0].o.bf16 is twin  # type: ignore[attr-defined]
    assert weights.bf16_twin
    assert model.model.layers[0].self_attn.o_proj.weight.numel() > 0
    assert weights.weight_bytes() > bf16_bytes


@pytest.mark.parametrize(
    ("routes", "kept"),
    [
        (((1, "gemv"), (16, "dot"), (UNLIMITED, "bf16")), True),
        (((1, "gemv"), (64, "splitk_f16"), (UNLIMITED, "scaled_mm")), False),
    ],
)
def test_by_default_the_twin_is_kept_only_when_a_route_runs_it(
    monkeypatch: pytest.MonkeyPatch, routes: tuple[tuple[int, str], ...], kept: bool
) -> None:
    monkeypatch.setattr(fp8_gemm, "ROUTES", routes)
    weights = LlamaWeights(bf16_model(), "fp8")
    assert weights.bf16_twin is kept
    assert all((p.bf16 is not None) is kept for p in projections(weights))


def test_a_model_fp8_cannot_read_is_left_as_it_was() -> None:
    model = bf16_model()
    model.model.layers[1].mlp.down_proj = torch.nn.Sequential(model.model.layers[1].mlp.down_proj)
    weights = LlamaWeights(model)
    before = weights.weight_bytes()
    with pytest.raises(ValueError, match="plain bf16"):
        weights.use_fp8(keep_bf16=False)
    assert weights.weight_format == "bf16"
    assert not any(isinstance(p, Fp8Weight) for p in projections(weights))
    assert model.model.layers[0].self_attn.q_proj.weight.numel() > 0
    assert weights.weight_bytes() == before
