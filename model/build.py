"""Building the engine that serves jobs: load the model, pick the engine, size the batch.

One place decides which engine runs a model and how many jobs it takes at once, for every
process that generates: the one-process bot (``python -m bot``), a standalone GPU worker, the
CLI. It imports nothing from ``bot``: a worker process builds its engine from a
:class:`~model.spec.ModelSpec` and an :class:`EngineConfig` alone.

``kind``: ``"standard"`` is :class:`model.engine.Engine` (batched ``generate``); ``"continuous"``
is :class:`model.fast.FastEngine` (jobs join between decode steps; Llama models only);
``"auto"`` picks the continuous engine on CUDA and the standard one elsewhere (on a CPU the
simple loop is as fast), falling back to the standard engine when the model is not a Llama.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from model.errors import ModelError
from model.spec import ModelSpec, Quantization
from model.types import ContinuousGenerator, TextGenerator

if TYPE_CHECKING:
    from model.fast import FastEngine, FastEngineOptions
    from model.loading import LoadedModel

log = logging.getLogger(__name__)

EngineKind = Literal["auto", "standard", "continuous"]
# The continuous engine's KV cache: the model's dtype, or E4M3 with a scale per token and head
# (model.fast.kv_cache). The standard engine keeps transformers' cache whatever this says.
KvCacheFormat = Literal["bf16", "fp8"]
# Which jobs the continuous engine decodes speculatively (model.fast.speculative).
Speculation = Literal["refine", "all", "off"]
# What ``build_engine`` returns: the standard engine is a TextGenerator, the continuous one
# both (the worker serves it through ``serve`` when it has it).
GeneratingEngine = TextGenerator | ContinuousGenerator

# The batch when ``max_batch`` is unset. The standard engine pads a batch to its longest
# prompt and runs it to its longest answer, so small batches suit it (and a CPU).
STANDARD_MAX_BATCH = 8
# The continuous engine takes as many jobs as its KV cache has slots, up to this: past 64 a
# decode step grows to ~11 ms on an H100 (bench/RESULTS.md), ~90 tokens/s for each user.
AUTO_MAX_BATCH = 64
# A slot holds the prompt template's tokens (a few dozen; this leaves room for a long
# system prompt) plus the user's prompt at two characters a token or more.
TEMPLATE_TOKENS = 256
CHARS_PER_TOKEN = 2


@dataclass(frozen=True)
class EngineConfig:
    """How to build the engine (the bot's ``ENGINE``, ``MAX_BATCH``... settings).

    ``max_batch=None`` sizes the batch from the engine (see :func:`batch_size`); for the
    continuous engine an explicit value also bounds its KV cache. ``max_new_tokens`` and
    ``max_prompt_chars`` size each KV slot so that no answer is cut short by the cache.
    ``cpu_threads`` is torch's thread count on a CPU (None: :mod:`model.threads` picks).
    ``warmup`` captures the continuous engine's CUDA graphs before returning (~30 s for a
    7B model) rather than on users' first jobs; it does nothing on a CPU. ``kv_cache`` is the
    continuous engine's KV-cache format (the bot's ``KV_CACHE``), ``speculation`` which of its
    jobs draft tokens (``SPECULATION``).
    """

    kind: EngineKind = "auto"
    max_batch: int | None = None
    max_new_tokens: int = 1536
    max_prompt_chars: int = 1000
    cpu_threads: int | None = None
    warmup: bool = True
    kv_cache: KvCacheFormat = "bf16"
    speculation: Speculation = "refine"

    def __post_init__(self) -> None:
        if self.kind not in get_args(EngineKind):
            kinds = ", ".join(get_args(EngineKind))
            raise ValueError(f"engine kind must be one of {kinds}, not {self.kind!r}")
        if self.kv_cache not in get_args(KvCacheFormat):
            formats = ", ".join(get_args(KvCacheFormat))
            raise ValueError(f"kv_cache must be one of {formats}, not {self.kv_cache!r}")
        if self.speculation not in get_args(Speculation):
            kinds = ", ".join(get_args(Speculation))
            raise ValueError(f"speculation must be one of {kinds}, not {self.speculation!r}")
        for name in ("max_batch", "cpu_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None), got {value}")
        if self.max_new_tokens < 1 or self.max_prompt_chars < 1:
            raise ValueError("max_new_tokens and max_prompt_chars must be at least 1")


@dataclass(frozen=True)
class BuiltEngine:
    """An engine ready to serve, with what its callers need to know about it."""

    engine: GeneratingEngine
    kind: Literal["standard", "continuous"]
    batch_size: int  # jobs the worker runs together
    model_name: str
    device: str  # "cpu", "cuda:0", ...
    load_seconds: float
    warmup_seconds: float  # 0.0 when there was no warm-up


def batch_size(engine: object, max_batch: int | None) -> int:
    """How many jobs a worker runs together: ``max_batch``, or when it is None the
    continuous engine's KV-cache slots (sized from free GPU memory; at most
    ``AUTO_MAX_BATCH``), else ``STANDARD_MAX_BATCH`` for the standard engine."""
    if max_batch is not None:
        return max_batch
    slots = getattr(engine, "slots", None)
    if isinstance(slots, int) and slots > 0:
        return min(slots, AUTO_MAX_BATCH)
    return STANDARD_MAX_BATCH


def continuous_options(config: EngineConfig, *, weights: str = "bf16") -> FastEngineOptions:
    """The continuous engine's options for ``config``: its slot count and slot length, its
    weight format (``"fp8"`` for ``MODEL_QUANTIZATION=fp8``), its KV-cache format and which
    jobs it decodes speculatively."""
    from model.fast import FastEngineOptions

    prompt_tokens = TEMPLATE_TOKENS + config.max_prompt_chars // CHARS_PER_TOKEN
    return FastEngineOptions(
        max_slots=config.max_batch,
        max_seq_len=max(FastEngineOptions.max_seq_len, prompt_tokens + config.max_new_tokens),
        weights=weights,
        kv_cache=config.kv_cache,
        speculation=config.speculation,
    )


def build_engine(spec: ModelSpec, config: EngineConfig | None = None) -> BuiltEngine:
    """Load ``spec`` and wrap it in the engine ``config`` asks for (blocking: seconds to
    minutes; run it off an event loop).

    Raises :class:`~model.errors.ModelError` with a one-line message when the model can't
    load or the continuous engine was asked for on a model it can't run.
    """
    from model.loading import load_model

    config = config or EngineConfig()
    log.info("loading model %s (base %s, adapter %s)", spec.name, spec.base, spec.adapter)
    return engine_for(load_model(spec), config)


def engine_for(loaded: LoadedModel, config: EngineConfig) -> BuiltEngine:
    """The engine for a model already loaded (see :func:`build_engine`)."""
    from model.threads import configure_cpu_threads

    threads = configure_cpu_threads(config.cpu_threads, device=str(loaded.device))
    if loaded.device.type == "cpu":
        log.info("generating on the CPU with %d torch thread(s)", threads)
    on_gpu = loaded.device.type == "cuda"
    engine: GeneratingEngine | None = None
    warmup_seconds = 0.0
    if loaded.spec.quantization == Quantization.FP8 and config.kind == "standard":
        # Loaded as bf16 (FP8 is applied by the continuous engine): run them as they are.
        log.warning("fp8 weights need ENGINE=auto or continuous; the standard engine runs bf16")
    if config.kind == "continuous" or (config.kind == "auto" and on_gpu):
        fast = _continuous_engine(loaded, config)
        if fast is not None:
            engine = fast
            if on_gpu and config.warmup:
                warmup_seconds = _warm_up(fast, batch_size(fast, config.max_batch))
    if engine is None:
        from model.engine import Engine

        if config.kv_cache != "bf16":
            log.warning("KV_CACHE=%s needs the continuous engine; ignored", config.kv_cache)
        engine = Engine(loaded)
    size = batch_size(engine, config.max_batch)
    kind: Literal["standard", "continuous"] = (
        "continuous" if callable(getattr(engine, "serve", None)) else "standard"
    )
    log.info("%s engine for %s on %s, batch %d", kind, loaded.name, loaded.device, size)
    return BuiltEngine(
        engine=engine,
        kind=kind,
        batch_size=size,
        model_name=engine.model_name,
        device=str(loaded.device),
        load_seconds=float(loaded.load_seconds),
        warmup_seconds=warmup_seconds,
    )


def _continuous_engine(loaded: LoadedModel, config: EngineConfig) -> FastEngine | None:
    """The continuous-batching engine; None (kind "auto") when the model can't use it."""
    from model.fast import FastEngine

    fp8_weights = loaded.spec.quantization == Quantization.FP8
    options = continuous_options(config, weights="fp8" if fp8_weights else "bf16")
    try:
        return FastEngine.from_loaded(loaded, options)
    except ValueError as exc:  # not a Llama-family model, or an unsupported variant
        if config.kind == "continuous":
            raise ModelError(
                f"ENGINE=continuous can't run {loaded.name}: {exc}; "
                "use ENGINE=standard (or auto, which falls back to it)"
            ) from None
        # FP8 lives in the continuous engine; the weights were loaded as bf16, and the
        # standard engine runs them so (MODEL_QUANTIZATION=auto on an H100 must not fail).
        unquantized = "; its weights run in bf16" if fp8_weights else ""
        log.warning(
            "continuous engine unavailable (%s); using the standard one%s", exc, unquantized
        )
        return None


def _warm_up(engine: FastEngine, batch: int) -> float:
    """Capture the CUDA graphs for up to ``batch`` rows now; returns the seconds it took."""
    log.info("continuous-batching engine: capturing CUDA graphs")
    started = time.perf_counter()
    engine.warmup(batch)
    seconds = time.perf_counter() - started
    log.info("warm-up done in %.1f s", seconds)
    return seconds
