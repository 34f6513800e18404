"""Loading a ready-to-run model: base + optional LoRA adapter, quantized or merged."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.embedded import converted_folder
from model.errors import (
    AdapterError,
    MissingPackageError,
    ModelError,
    ModelLoadError,
    OfflineError,
    QuantizationError,
    first_line,
)
from model.spec import ModelSpec, Quantization

log = logging.getLogger(__name__)

_ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class LoadedModel:
    """A model ready for batched generation (or for training, with ``for_training``)."""

    model: Any
    tokenizer: Any
    spec: ModelSpec
    device: Any  # torch.device
    merged: bool
    load_seconds: float

    @property
    def name(self) -> str:
        return self.spec.name


def hub_offline() -> bool:
    """True when huggingface_hub was told not to use the network."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") in {"1", "true"}


def looks_like_local_path(name: str) -> bool:
    """Hub ids are ``owner/name``; anything that exists or reads like a path is local."""
    return (
        Path(name).expanduser().exists()
        or name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or (os.sep in name and not _is_hub_id(name))
    )


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but CUDA is not available here")
    return resolved


def resolve_dtype(dtype: str, device: Any) -> Any:
    import torch

    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # bf16 matmuls are slow on most CPUs; float32 is the safe fast choice there.
        return torch.float32
    return getattr(torch, dtype)


def base_location(spec: ModelSpec) -> str:
    """A folder or hub id for the base, converting the embedded model if needed."""
    if spec.is_embedded:
        return str(converted_folder())
    if looks_like_local_path(spec.base):
        folder = Path(spec.base).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"base model folder {folder} has no config.json")
        return str(folder)
    return spec.base


def resolve_auto_quantization(spec: ModelSpec, device: Any) -> ModelSpec:
    """``quantization=auto``: fp8 on a card that runs it (Ada, Hopper), none elsewhere."""
    if spec.quantization != Quantization.AUTO:
        return spec
    from model import fp8

    chosen = Quantization.FP8 if fp8.supported(device) else Quantization.NONE
    log.info("quantization auto: %s on %s", chosen.value, device)
    return spec.replace(quantization=chosen)


def _check_quantization(spec: ModelSpec, device: Any) -> Any:
    """The bitsandbytes config for ``spec``, or None for full-precision weights."""
    if spec.quantization == Quantization.NONE:
        return None
    if spec.quantization == Quantization.FP8:
        from model import fp8

        if not fp8.supported(device):
            raise QuantizationError(
                "quantization fp8 needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper); "
                "use none (or nf4 on older cards)"
            )
        return None  # loaded in bf16; the continuous engine quantizes the merged weights
    if device.type != "cuda":
        raise QuantizationError(
            f"quantization {spec.quantization.value} needs a CUDA GPU; use --quantize none on CPU"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingPackageError(
            f"quantization {spec.quantization.value} needs bitsandbytes: pip install bitsandbytes"
        )
    import torch
    from transformers import BitsAndBytesConfig

    if spec.quantization == Quantization.NF4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _hub_error(what: str, name: str, error: Exception) -> ModelError:
    unreachable = "couldn't connect" in str(error) or isinstance(error, ConnectionError)
    if not looks_like_local_path(name) and (hub_offline() or unreachable):
        return OfflineError(
            f"{what} {name!r} is a hub id but the hub is offline (HF_HUB_OFFLINE); "
            "use a local folder or the embedded model (--preset smollm2)"
        )
    return ModelLoadError(f"could not load {what} {name!r}: {first_line(error)}")


def load_tokenizer(spec: ModelSpec, location: str | None = None) -> Any:
    """The tokenizer, with a pad token and left padding (for batched generation)."""
    from transformers import AutoTokenizer

    location = location or base_location(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, revision=spec.base_revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise _hub_error("base model", location, error) from None
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # Llama tokenizers have no pad token. Padding is masked out, so any id works, but
        # one distinct from EOS keeps padding from ever being mistaken for the answer's end.
        distinct = tokenizer.unk_token not in (None, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.unk_token if distinct else tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def check_adapter(spec: ModelSpec) -> dict[str, Any] | None:
    """Validate a local adapter folder; returns its adapter_config (None for hub ids)."""
    if spec.adapter is None or not looks_like_local_path(spec.adapter):
        return None
    folder = Path(spec.adapter).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterError(f"adapter folder {folder} has no adapter_config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise AdapterError(f"adapter config {config_path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter config {config_path} is not a JSON object")
    if not any((folder / name).is_file() for name in _ADAPTER_WEIGHT_FILES):
        raise AdapterError(f"adapter folder {folder} has no adapter_model.safetensors")
    return config


def _warn_if_other_base(spec: ModelSpec, adapter_config: dict[str, Any] | None) -> None:
    if not adapter_config:
        return
    trained_on = adapter_config.get("base_model_name_or_path")
    if trained_on and not spec.is_embedded and not _same_model(trained_on, spec.base):
        log.warning(
            "adapter %s was trained on %s but is being loaded on %s; outputs may be poor",
            spec.adapter,
            trained_on,
            spec.base,
        )


def _same_model(first: str, second: str) -> bool:
    def key(name: str) -> str:
        return name.rstrip("/").split("/")[-1].lower()

    return key(first) == key(second)


def _attach_adapter(model: Any, spec: ModelSpec, for_training: bool) -> Any:
    import pickle

    from peft import PeftModel
    from safetensors import SafetensorError

    assert spec.adapter is not None
    try:
        return PeftModel.from_pretrained(
            model, spec.adapter, revision=spec.adapter_revision, is_trainable=for_training
        )
    except (
        OSError,
        ValueError,
        KeyError,
        RuntimeError,
        SafetensorError,
        pickle.UnpicklingError,
    ) as error:
        if not looks_like_local_path(spec.adapter) and hub_offline():
            raise _hub_error("adapter", spec.adapter, error) from None
        raise AdapterError(
            f"could not load adapter {spec.adapter!r}: {first_line(error)}"
        ) from None


def should_merge(spec: ModelSpec, for_training: bool) -> bool:
    if spec.adapter is None or for_training:
        return False
    # FP8 is applied after loading, to the merged weights: the adapter merges as unquantized.
    unquantized = spec.quantization in (Quantization.NONE, Quantization.FP8)
    if spec.merge_adapter == "auto":
        return unquantized
    if spec.merge_adapter == "yes" and not unquantized:
        raise QuantizationError("merging an adapter into quantized weights is not supported")
    return spec.merge_adapter == "yes"


def load_model(spec: ModelSpec, *, for_training: bool = False) -> LoadedModel:
    """Load base (+ adapter) as ``spec`` says.

    Raises a :class:`~model.errors.ModelError` subclass with a one-line message for every
    expected failure (unknown folder, corrupt adapter, offline hub id, nf4 without CUDA, a
    missing optional package).
    """
    started = time.perf_counter()
    device = resolve_device(spec.device)
    spec = resolve_auto_quantization(spec, device)
    quantization_config = _check_quantization(spec, device)
    adapter_config = check_adapter(spec)
    _warn_if_other_base(spec, adapter_config)
    location = base_location(spec)
    tokenizer = load_tokenizer(spec, location)

    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(spec.dtype, device)
    kwargs: dict[str, Any] = {
        "revision": spec.base_revision,
        "dtype": dtype,
        "trust_remote_code": spec.trust_remote_code,
    }
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise _hub_error("base model", location, error) from None
    if quantization_config is None:
        model.to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    merged = False
    if spec.adapter is not None:
        model = _attach_adapter(model, spec, for_training)
        if should_merge(spec, for_training):
            model = model.merge_and_unload()
            merged = True
    if not for_training:
        model.eval()
    seconds = time.perf_counter() - started
    log.info("loaded %s on %s in %.1f s (adapter merged: %s)", spec.name, device, seconds, merged)
    return LoadedModel(model, tokenizer, spec, device, merged, seconds)
