"""The model side of training: the LoRA config, the base's spec, and loading for training.

A pure builder (``build_lora_config``) like TRL's scripts, and ``load_for_training``, which
loads the base through :func:`model.loading.load_model` (the same loader inference uses, and
the one place that builds the bitsandbytes config for nf4 / int8) and wraps it for QLoRA.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import Any

import torch

from model.loading import LoadedModel, load_model
from model.spec import ModelSpec, Quantization, resolve_spec
from training.config import DEFAULT_TARGET_MODULES, TrainConfig
from training.errors import ConfigError

log = logging.getLogger(__name__)


def build_lora_config(
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: list[str] | tuple[str, ...] = DEFAULT_TARGET_MODULES,
    *,
    train_lm_head: bool = False,
    train_embeddings: bool = False,
) -> Any:
    """A causal-LM ``LoraConfig``.

    ``lm_head`` and the embeddings stay frozen unless asked for: on a 32k-vocabulary 7B model
    they are what made the seed's adapter 687 MB instead of ~40 MB, and they are rarely needed
    to learn an output format.
    """
    from peft import LoraConfig, TaskType

    modules = list(target_modules)
    if train_lm_head and "lm_head" not in modules:
        modules.append("lm_head")
    if train_embeddings and "embed_tokens" not in modules:
        modules.append("embed_tokens")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def lora_config_from(config: TrainConfig) -> Any:
    return build_lora_config(
        config.lora_r,
        config.lora_alpha,
        config.lora_dropout,
        config.target_modules,
        train_lm_head=config.train_lm_head,
        train_embeddings=config.train_embeddings,
    )


def default_quantization(device: torch.device) -> Quantization:
    """NF4 (QLoRA) on CUDA when bitsandbytes is installed, full precision otherwise."""
    if device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
        return Quantization.NF4
    if device.type == "cuda":
        log.warning("bitsandbytes is not installed: training in bf16 without quantization")
    return Quantization.NONE


def training_spec(config: TrainConfig, device: torch.device) -> ModelSpec:
    """The ModelSpec of the base to train on (no adapter), on ``device``."""
    quantization = config.quantization or default_quantization(device).value
    spec = resolve_spec(config.preset, base=config.base, quantization=quantization)
    dtype: Any = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    # Training starts from the bare base: a preset's serving adapter is not the thing trained.
    return dataclasses.replace(
        spec,
        adapter=None,
        dtype=dtype,
        device=str(device),
        trust_remote_code=config.trust_remote_code,
    )


def wrap_for_training(model: Any, config: TrainConfig, *, quantized: bool) -> Any:
    """Prepare a loaded base for (Q)LoRA training and add a fresh adapter; returns the PeftModel.

    Shared by :func:`load_for_training` and the GPU benchmark, so the benchmark measures the
    exact recipe training runs.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    model.config.use_cache = False  # the KV cache is useless in training and fights checkpointing
    checkpointing_kwargs = {"use_reentrant": False}
    if quantized:
        # Casts norms (and other small non-quantized weights) to fp32 for stability, and
        # turns on gradient checkpointing the way peft expects for k-bit bases.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif config.gradient_checkpointing:
        # transformers 5.2x renamed it; older 5.x (the GPU image's 5.17) has only the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=checkpointing_kwargs
            )
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        model.enable_input_require_grads()
    try:
        model = get_peft_model(model, lora_config_from(config))
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"can't apply LoRA: {first} (check --target-modules)") from None
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA: %d trainable parameters of %d (%.3f%%)", trainable, total, 100 * trainable / total
    )
    return model


def load_for_training(config: TrainConfig, device: torch.device) -> LoadedModel:
    """Load the base for ``config`` through :func:`model.loading.load_model` and wrap it
    with a fresh LoRA adapter; the LoadedModel's ``model`` is then a ``PeftModel``."""
    spec = training_spec(config, device)
    loaded = load_model(spec, for_training=True)
    loaded.model = wrap_for_training(
        loaded.model, config, quantized=spec.quantization != Quantization.NONE
    )
    loaded.spec = spec
    return loaded
