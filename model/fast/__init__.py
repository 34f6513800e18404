"""The continuous-batching GPU engine for Llama models, one module per concern.

- ``engine``: :class:`FastEngine`, the scheduling: requests
  admitted into free rows, prefilled in batches, decoded together, delivered when
  ``model.stopping.StopRule`` says they are finished, cancelled ones dropped at once.
- ``runner``: :class:`FastLlama`, what the engine drives: the pieces below wired together,
  and decode steps launched and their tokens collected (two in flight).
- ``weights``: :class:`LlamaWeights`, the model's dimensions and weights (projections fused,
  a LoRA adapter merged, 4-bit layers called as they are) and its rotary tables.
- ``kv_cache``: :class:`SlotCache`, the slot KV cache and every row's decode state
  (sampling settings, repetition set, constraint state); rows admitted, started, moved.
- ``forward``: :class:`LlamaForward`, prefill, the decode step (on the device: attention,
  constraints, sampling) and sampling after prefill.
- ``graphs``: :class:`DecodeGraphs`, the decode step captured in CUDA graphs per (batch
  bucket, context bucket) and replayed.
- ``kernels``: the Triton kernels of the decode step (rotary + KV write, split-K attention).
- ``prefix_cache``: :class:`~model.fast.prefix_cache.PrefixCache`, the KV of prompt prefixes
  many prompts share (template, system prompt), copied into new rows instead of prefilled.
- ``prefill_plan``: which prompt tokens one prefill takes (chunks under a token budget).
- ``sequences``: :class:`FastEngineOptions`, and each served request's state (row, prompt,
  answer so far, constraint, drafter).
- ``speculative`` and ``verify``: prompt-lookup drafts (:class:`PromptLookup`) and the verify
  step that checks a draft of ``k`` tokens per row in one forward (its own CUDA graphs).
- ``fp8_gemm``, ``fp8_splitk``, ``fp8_tuning``, ``fp8_prefill``: FP8 weights' kernels, which
  one serves how many rows, their per-shape configurations, and prefill sizes.

Sampling (``model.sampling``) and the stop rule (``model.stopping``) are shared with the
standard engine, ``model.engine``.
"""

from __future__ import annotations

from model.fast.engine import FastEngine
from model.fast.forward import LlamaForward
from model.fast.graphs import DecodeGraphs
from model.fast.kv_cache import SlotCache
from model.fast.runner import FastLlama
from model.fast.sequences import FastEngineOptions
from model.fast.weights import LlamaWeights

__all__ = [
    "DecodeGraphs",
    "FastEngine",
    "FastEngineOptions",
    "FastLlama",
    "LlamaForward",
    "LlamaWeights",
    "SlotCache",
]
